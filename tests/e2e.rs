//! End-to-end tests against real brokers: the `sluice` binary, the embedded broker,
//! an external mosquitto (started by scripts/test.sh), DuckDB, Python deltalake and
//! pyarrow.

#[path = "e2e/alerts.rs"]
mod alerts;
#[path = "e2e/console.rs"]
mod console;
#[path = "e2e/exactly_once.rs"]
mod exactly_once;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/lake.rs"]
mod lake;
#[path = "e2e/limits.rs"]
mod limits;
#[path = "e2e/loadtest.rs"]
mod loadtest;
#[path = "e2e/security.rs"]
mod security;
mod support;
#[path = "e2e/windows.rs"]
mod windows;

use std::collections::BTreeMap;
use std::path::Path;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use support::*;

/// Messages the rumqttc client publishes at QoS 1.
const BULK: u64 = 100_000;
const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// What a test sent, to compare with what landed.
#[derive(Debug, Default)]
struct Sent {
    rows: u64,
    temperature_sum: f64,
    dead: BTreeMap<&'static str, u64>,
    total: u64,
}

/// Publishes BULK valid messages plus a few raw bad ones with rumqttc, waiting for
/// every PUBACK.
async fn publish_bulk(host: &str, port: u16, prefix: &str, sent: &mut Sent) {
    let mut options = MqttOptions::new(format!("e2e-bulk-{}", free_port()), host, port);
    options
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 10_000);
    let bad: Vec<(Vec<u8>, &'static str)> = vec![
        (
            b"{\"device_id\":\"u\",\"ts\":1,\"status\":\"\xff\"}".to_vec(),
            "invalid_utf8",
        ),
        (b"\xfe\xff\x00".to_vec(), "invalid_utf8"),
        (b"\xc3\x28".to_vec(), "invalid_utf8"),
        (vec![b'{'; 70_000], "oversized"),
        (
            format!(
                "{{\"device_id\":\"o\",\"ts\":1,\"pad\":\"{}\"}}",
                "x".repeat(80_000)
            )
            .into_bytes(),
            "oversized",
        ),
    ];
    let expected_acks = BULK + bad.len() as u64;
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < expected_acks {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("publisher connection failed: {e}"),
            }
        }
    });
    for i in 0..BULK {
        let device = format!("dev-{:05}", i % 1000);
        let temperature = (i % 64) as f64 * 0.25;
        let payload = format!(
            r#"{{"device_id":"{device}","ts":{},"temperature":{temperature},"humidity":{},"battery":3.25,"status":"ok"}}"#,
            T0 + i as i64 * 10,
            (i % 100) as f64
        );
        client
            .publish(
                format!("{prefix}devices/{device}/telemetry"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("queue publish");
        sent.temperature_sum += temperature;
    }
    sent.rows += BULK;
    for (payload, reason) in bad {
        client
            .publish(
                format!("{prefix}devices/bad/telemetry"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("queue publish");
        *sent.dead.entry(reason).or_default() += 1;
    }
    sent.total += expected_acks;
    acks.await.expect("all PUBACKs");
}

/// Publishes 250 valid and 50 malformed lines with `mosquitto_pub -l`, one message each.
fn publish_with_mosquitto_pub(host: &str, port: u16, prefix: &str, sent: &mut Sent) {
    let mut lines = Vec::new();
    for k in 0..250u64 {
        let t = k as f64 * 0.5;
        lines.push(format!(
            r#"{{"device_id":"mp-{k}","ts":"2026-01-01T00:30:00.{:03}Z","temperature":{t}}}"#,
            k
        ));
        sent.temperature_sum += t;
    }
    sent.rows += 250;
    let deep = format!(
        r#"{{"device_id":"d","ts":{T0},"x":{}1{}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let bad: [(&str, &'static str, usize); 8] = [
        (r#"{"device_id": "x", ts: }"#, "invalid_json", 8),
        ("not json at all", "invalid_json", 6),
        ("[1,2,3]", "not_an_object", 6),
        (r#"{"device_id":"m","temperature":1}"#, "missing_field", 6),
        (
            r#"{"device_id":"m","ts":1767225600000,"temperature":"hot"}"#,
            "wrong_type",
            6,
        ),
        (
            r#"{"device_id":"m","ts":1767225600000,"temperature":NaN}"#,
            "non_finite_number",
            6,
        ),
        (r#"{"device_id":"m","ts":"yesterday"}"#, "bad_timestamp", 6),
        (&deep, "too_deep", 6),
    ];
    for (line, reason, n) in bad {
        for _ in 0..n {
            lines.push(line.to_owned());
        }
        *sent.dead.entry(reason).or_default() += n as u64;
    }
    sent.total += lines.len() as u64;
    assert_eq!(
        host, "127.0.0.1",
        "mosquitto_pub helper publishes on loopback"
    );
    mosquitto_pub(port, &format!("{prefix}devices/mp/telemetry"), &lines, &[]);
}

/// Publishes through the broker at host:port, stops the service, and checks the lake
/// with `sluice query`, DuckDB and Python deltalake (both through the Delta log).
async fn ingest_and_verify(service: &mut Service, host: &str, port: u16, prefix: &str) {
    service.wait_until("the devices source to subscribe", || {
        service.subscribed("devices")
    });
    let mut sent = Sent::default();
    publish_bulk(host, port, prefix, &mut sent).await;
    publish_with_mosquitto_pub(host, port, prefix, &mut sent);
    let total = sent.total as f64;
    service.wait_until("every message to be received", || {
        service.received("devices") >= total
    });
    service.stop();

    let dir = service.data_dir.clone();
    let rows = query_json(
        &dir,
        "SELECT count(*) AS n, sum(temperature) AS s FROM telemetry",
    );
    assert_eq!(rows[0]["n"], Value::from(sent.rows));
    assert_eq!(rows[0]["s"].as_f64(), Some(sent.temperature_sum));

    let dead = query_json(
        &dir,
        "SELECT reason, count(*) AS n FROM dead_letter GROUP BY reason ORDER BY reason",
    );
    let got: BTreeMap<String, u64> = dead
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().expect("reason").to_owned(),
                r["n"].as_u64().expect("n"),
            )
        })
        .collect();
    let want: BTreeMap<String, u64> = sent.dead.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(got, want);
    let sample = query_json(
        &dir,
        "SELECT payload_size, length(payload) AS kept, _source, _partition, detail FROM dead_letter WHERE reason = 'oversized' ORDER BY payload_size",
    );
    assert_eq!(sample[0]["payload_size"], Value::from(70_000));
    assert_eq!(
        sample[0]["kept"],
        Value::from(4_000),
        "payload capped at dead_letter_payload_cap"
    );
    assert_eq!(sample[0]["_source"], Value::from("devices"));
    assert_eq!(
        sample[0]["_partition"],
        Value::from(format!("{prefix}devices/bad/telemetry"))
    );

    let files = files_under(&dir);
    assert!(
        files
            .iter()
            .all(|f| f.extension().is_some_and(|e| e == "parquet")),
        "only committed files: {files:?}"
    );
    assert!(files.iter().any(|f| {
        f.to_string_lossy()
            .contains("telemetry/date=2026-01-01/hour=00/part-")
    }));

    // Other engines read the tables through the Delta log, as analysts do.
    let out = run_python(&format!(
        r#"{DUCKDB_DELTA}
import deltalake
d = {dir:?}
con = duck()
n, s = con.execute(f"SELECT count(*), sum(temperature) FROM delta_scan('{{d}}/telemetry')").fetchall()[0]
dead = con.execute(f"SELECT count(*) FROM delta_scan('{{d}}/dead_letter')").fetchall()[0][0]
t = deltalake.DeltaTable(d + "/telemetry").to_pyarrow_table()
print(n, repr(float(s)), dead, t.num_rows, t.column("temperature").to_pylist().count(None))
"#,
        dir = dir.to_str().expect("utf8 path"),
    ));
    let fields: Vec<&str> = out.split_whitespace().collect();
    let dead_total: u64 = sent.dead.values().sum();
    assert_eq!(fields[0], sent.rows.to_string(), "duckdb count");
    assert_eq!(
        fields[1].parse::<f64>().expect("sum"),
        sent.temperature_sum,
        "duckdb sum"
    );
    assert_eq!(fields[2], dead_total.to_string(), "duckdb dead letters");
    assert_eq!(fields[3], sent.rows.to_string(), "Python deltalake rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_end_to_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &[]);
    let port = service.mqtt_port;
    ingest_and_verify(&mut service, "127.0.0.1", port, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mosquitto_end_to_end() {
    let (broker, host, port) = mosquitto_address();
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = format!("e2e{}/", free_port());
    let config = write_config(
        tmp.path(),
        "sluice.toml",
        format!(
            r#"
[sources.devices]
type = "mqtt"
url = "mqtt://{broker}"
topics = ["{prefix}devices/+/telemetry"]
qos = 1
client_id = "sluice-e2e-{port_hint}"
stream = "telemetry"
key_from_topic_segment = 2

[streams.telemetry]
schema = "telemetry"
"#,
            port_hint = free_port()
        ),
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    ingest_and_verify(&mut service, &host, port, &prefix).await;
}

#[test]
fn http_ingest_uses_the_same_rules() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &[]);
    let body = concat!(
        r#"{"device_id":"h-1","ts":1767225600000,"temperature":10.5}"#,
        "\n",
        r#"{"device_id":"h-2","ts":"2026-01-01T00:00:01Z","temperature":11}"#,
        "\n",
        "\n",
        r#"{"device_id":"h-3"}"#,
        "\n",
        "[]\n",
    );
    let (status, reply) =
        http_request(&service.http, "POST", "/api/ingest/telemetry", body).expect("ingest");
    assert_eq!(status, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply["accepted"], 2);
    assert_eq!(reply["dead_lettered"], 2);
    assert_eq!(reply["reasons"]["missing_field"], 1);
    assert_eq!(reply["reasons"]["not_an_object"], 1);
    let (status, _) =
        http_request(&service.http, "POST", "/api/ingest/nope", body).expect("ingest");
    assert_eq!(status, 404);

    // Queryable over HTTP within the roll interval, without a restart.
    service.wait_until("rows to be committed", || {
        http_request(
            &service.http,
            "POST",
            "/api/query",
            r#"{"sql":"SELECT count(*) AS n FROM telemetry"}"#,
        )
        .is_some_and(|(s, b)| s == 200 && b.contains(r#""n":2"#))
    });
    let (status, csv) = http_request(
        &service.http,
        "POST",
        "/api/query?format=csv",
        r#"{"sql":"SELECT device_id, temperature FROM telemetry ORDER BY device_id"}"#,
    )
    .expect("csv");
    assert_eq!(status, 200);
    assert_eq!(csv, "device_id,temperature\nh-1,10.5\nh-2,11.0\n");
    let metrics = http_get(&service.http, "/metrics").expect("metrics");
    for name in [
        "sluice_source_events_received_total",
        "sluice_source_events_decoded_total",
        "sluice_source_events_dead_lettered_total",
        "sluice_lake_rows_written_total",
        "sluice_lake_bytes_written_total",
        "sluice_lake_files_committed_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(
        http_get(&service.http, "/")
            .expect("dashboard")
            .contains("<title>Sluice</title>")
    );
    service.stop();
}

#[test]
fn queries_are_read_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &[]);
    let refused = [
        "COPY (SELECT 1) TO '/tmp/sluice-copy.csv'",
        "CREATE TABLE t AS SELECT 1",
        "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
        "INSERT INTO telemetry VALUES (1)",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_csv('/etc/passwd')",
    ];
    let d = dir.to_str().expect("utf8");
    for sql in refused {
        let out = sluice(&["query", "--data-dir", d, sql]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sql} was allowed");
        assert!(stderr.contains("error:"), "{sql}: {stderr}");
        assert!(!stderr.contains("root:"), "{sql} leaked /etc/passwd");
        let body = serde_json::json!({ "sql": sql }).to_string();
        let (status, reply) =
            http_request(&service.http, "POST", "/api/query", &body).expect("query");
        assert_eq!(status, 400, "{sql}: {reply}");
        assert!(
            reply.contains("error") && !reply.contains("root:"),
            "{sql}: {reply}"
        );
    }
    assert!(!Path::new("/tmp/sluice-copy.csv").exists());
    service.stop();
    // A query names a lake; it never creates one.
    let missing = tmp.path().join("no-lake-here");
    let out = sluice(&[
        "query",
        "--data-dir",
        missing.to_str().expect("utf8"),
        "SELECT 1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no lake at"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!missing.exists(), "the query created the directory");
}

/// Every shipped config passes `sluice check` (SQL of functions and windows included).
#[test]
fn every_example_config_checks() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).expect("config/examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = sluice(&["check", "--config", path.to_str().expect("utf8")]);
            assert_ran(&out, &format!("sluice check {}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 3, "default, w1-tumbling, w1-hopping");
}

#[test]
fn check_lists_every_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "bad.toml",
        r#"
[http]
listen = "nowhere"
[lake]
roll_interval = "soon"
zstd_level = 99
[sources.plant]
type = "mqtt"
url = "ftp://broker"
topics = ["devices/#/telemetry"]
qos = 2
stream = "weather"
colour = "red"
[streams.telemetry]
schema = "telemetree"
[windows.hourly]
input = "telemetry"
kind = "hopping"
size = "1h"
slide = "7m"
select = ["count(*) AS n"]
[windows.late]
input = "telemetry"
kind = "sometimes"
select = []
[alerts.bad]
input = "telemetry"
for = 0
notify = ["nowhere"]
[notifiers.hook]
type = "webhook"
url = "ftp://x"
[notifiers.pager]
type = "carrier-pigeon"
"#,
    );
    let out = sluice(&["check", "--config", config.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "http.listen",
        "lake.roll_interval",
        "lake.zstd_level",
        "sources.plant.url",
        "sources.plant.topics",
        "sources.plant.qos",
        "sources.plant.stream",
        "sources.plant.colour",
        "streams.telemetry.schema",
        "windows.hourly.slide",
        "windows.late",
        "windows.late.kind",
        "windows.late.select",
        "alerts.bad.condition",
        "alerts.bad.for",
        "alerts.bad.notify",
        "notifiers.hook.url",
        "notifiers.pager.type",
    ] {
        assert!(
            stderr.contains(&format!("  - {key}:")),
            "{key} missing from:\n{stderr}"
        );
    }
    // A config that loads, with SQL the windows cannot compile: each named too.
    let streams = "[streams.telemetry]\nschema = \"telemetry\"\n";
    std::fs::write(
        &config,
        format!(
            r#"{streams}
[windows.w]
input = "telemetry"
kind = "tumbling"
size = "1m"
group_by = ["device"]
filter = "temperature + 1"
select = ["sum(nope) AS x", "first_value(temperature) AS f"]
[alerts.hot]
input = "telemetry"
condition = "temprature > 80"
[alerts.gone]
input = "nowhere"
missing_after = "1m"
"#
        ),
    )
    .expect("write");
    let out = sluice(&["check", "--config", config.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "windows.w.group_by[0]",
        "windows.w.filter",
        "windows.w.select[0]",
        "alerts.hot.condition",
        "alerts.gone.input",
    ] {
        assert!(
            stderr.contains(&format!("  - {key}:")),
            "{key} missing from:\n{stderr}"
        );
    }
    std::fs::write(&config, streams).expect("write");
    let out = sluice(&["check", "--config", config.to_str().expect("utf8")]);
    assert_ran(&out, "sluice check");
}

#[test]
fn a_taken_port_is_a_one_line_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().join("lake");
    let d = d.to_str().expect("utf8");
    for (flag, other) in [
        ("--http-listen", "--mqtt-listen"),
        ("--mqtt-listen", "--http-listen"),
    ] {
        let out = sluice(&[
            "run",
            "--data-dir",
            d,
            flag,
            &format!("127.0.0.1:{port}"),
            other,
            &format!("127.0.0.1:{}", free_port()),
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(&port.to_string()), "{stderr}");
    }
}

/// A function filters, computes a column and routes, compiled from the config; its
/// output and route land as their own tables.
#[test]
fn functions_filter_project_and_route() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "functions.toml",
        r#"
[broker]
enabled = true
[streams.telemetry]
schema = "telemetry"
[functions.clean]
input = "telemetry"
output = "telemetry_f"
filter = "status <> 'error' AND temperature IS NOT NULL"
select = ["device_id", "temperature * 9 / 5 + 32 AS temperature_f"]
routes = [{ when = "temperature_f > 176", to = "hot" }]
"#,
    );
    let cfg = config.to_str().expect("utf8");
    let out = sluice(&["check", "--config", cfg]);
    assert_ran(&out, "sluice check");

    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", cfg]);
    let body = concat!(
        r#"{"device_id":"a","ts":1767225600000,"temperature":20,"status":"ok"}"#,
        "\n",
        r#"{"device_id":"b","ts":1767225600001,"temperature":90,"status":"ok"}"#,
        "\n",
        r#"{"device_id":"c","ts":1767225600002,"temperature":95,"status":"error"}"#,
        "\n",
        r#"{"device_id":"d","ts":1767225600003,"status":"ok"}"#,
        "\n",
    );
    let (status, reply) =
        http_request(&service.http, "POST", "/api/ingest/telemetry", body).expect("ingest");
    assert_eq!(status, 200, "{reply}");
    service.stop();

    assert_eq!(
        query_json(&dir, "SELECT count(*) AS n FROM telemetry")[0]["n"],
        4,
        "raw stream kept whole"
    );
    let rows = query_json(
        &dir,
        "SELECT device_id, temperature_f FROM telemetry_f ORDER BY device_id",
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["device_id"], "a");
    assert_eq!(rows[0]["temperature_f"].as_f64(), Some(68.0));
    assert_eq!(rows[1]["temperature_f"].as_f64(), Some(194.0));
    let hot = query_json(&dir, "SELECT device_id, ts FROM hot");
    assert_eq!(hot.len(), 1);
    assert_eq!(hot[0]["device_id"], "b");

    // A bad expression is a check error naming its key and quoting DataFusion.
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("temperature IS NOT NULL", "temprature IS NOT NULL");
    std::fs::write(&config, text).expect("write");
    let out = sluice(&["check", "--config", cfg]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("functions.clean.filter:") && stderr.contains("temprature"),
        "{stderr}"
    );
}

/// `--from-file`: a bounded run through the same decode, functions and lake, plain and
/// gzip, that exits 0 with everything committed.
#[test]
fn bounded_run_from_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"device_id":"f-{}","ts":{},"temperature":{}}}"#,
                i % 10,
                T0 + i,
                i % 50
            )
        })
        .collect();
    lines.extend([
        "not json".to_owned(),
        "[]".to_owned(),
        r#"{"device_id":"x"}"#.to_owned(),
    ]);
    let plain = tmp.path().join("telemetry.jsonl");
    std::fs::write(&plain, lines.join("\n") + "\n").expect("write");
    let gz = tmp.path().join("more.jsonl");
    std::fs::write(&gz, lines[..500].join("\n")).expect("write");
    let status = std::process::Command::new("gzip")
        .arg(&gz)
        .status()
        .expect("gzip");
    assert!(status.success());
    let gz = tmp.path().join("more.jsonl.gz");

    let config = write_config(
        tmp.path(),
        "files.toml",
        r#"
[streams.telemetry]
schema = "telemetry"
[streams.extra]  # declared fields instead of a built-in schema
fields = [
  { name = "device_id", type = "string", required = true },
  { name = "ts", type = "timestamp", required = true },
  { name = "temperature", type = "float" },
]
key = "device_id"
# Neither window closes before the input ends: end of input must emit them.
[windows.per_second]
input = "telemetry"
kind = "tumbling"
size = "1s"
group_by = ["device_id"]
select = ["count(*) AS events"]
[windows.extra_sessions]
input = "extra"
kind = "session"
gap = "1h"
group_by = ["device_id"]
select = ["count(*) AS events", "max(temperature) AS t_max"]
"#,
    );
    let dir = tmp.path().join("lake");
    bounded_run(
        &config,
        &dir,
        &[
            "--from-file",
            &format!("telemetry={}", plain.display()),
            "--from-file",
            &format!("extra={}", gz.display()),
        ],
    );
    assert_eq!(
        query_json(&dir, "SELECT count(*) AS n FROM telemetry")[0]["n"],
        1000
    );
    assert_eq!(
        query_json(&dir, "SELECT count(*) AS n FROM extra")[0]["n"],
        500
    );
    assert_eq!(
        query_json(&dir, "SELECT count(*) AS n FROM dead_letter")[0]["n"],
        3
    );
    for (table, windows, events) in [("per_second", 10, 1000), ("extra_sessions", 10, 500)] {
        let row = &query_json(
            &dir,
            &format!("SELECT count(*) AS n, sum(events) AS e, max(version) AS v FROM {table}"),
        )[0];
        assert_eq!(
            (&row["n"], &row["e"], &row["v"]),
            (&windows.into(), &events.into(), &1.into()),
            "{table}"
        );
    }

    let out = sluice(&[
        "run",
        "--data-dir",
        dir.to_str().expect("utf8"),
        "--from-file",
        "nope=/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\" is not declared"));
}

/// A window without `group_by` is one group per window (it once panicked the lake
/// task on its first row): through a bounded run, its table holds per window what the
/// per-device window's rows add up to, and no key column.
#[test]
fn a_window_without_group_by_aggregates_every_key_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "all.toml",
        r#"
[streams.readings]
fields = [
  { name = "device_id", type = "string", required = true },
  { name = "ts", type = "timestamp", required = true },
  { name = "temperature", type = "float" },
]
key = "device_id"
[windows.per_device]
input = "readings"
kind = "tumbling"
size = "1m"
group_by = ["device_id"]
select = ["count(*) AS n", "sum(temperature) AS s"]
[windows.all_devices]
input = "readings"
kind = "tumbling"
size = "1m"
select = ["count(*) AS n", "sum(temperature) AS s", "count(DISTINCT device_id) AS devices"]
"#,
    );
    let input = tmp.path().join("readings.jsonl");
    let lines: Vec<String> = (0..600)
        .map(|i| {
            format!(
                r#"{{"device_id":"d{}","ts":{},"temperature":{}}}"#,
                i % 7,
                T0 + i64::from(i) * 700,
                i % 11
            )
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).expect("write");
    let dir = tmp.path().join("lake");
    let from = format!("readings={}", input.display());
    assert_ran(
        &sluice(&[
            "run",
            "--config",
            config.to_str().expect("utf8"),
            "--data-dir",
            &lake_url(&dir),
            "--from-file",
            &from,
        ]),
        "bounded run",
    );
    let all = query_json(
        &dir,
        "SELECT window_start, n, s, devices FROM all_devices ORDER BY window_start",
    );
    let per_device = query_json(
        &dir,
        "SELECT window_start, sum(n) AS n, sum(s) AS s, count(*) AS devices \
         FROM per_device GROUP BY window_start ORDER BY window_start",
    );
    assert_eq!(all.len(), 7, "600 rows 0.7 s apart: 7 minutes");
    assert_eq!(all, per_device);
    let columns = query_json(&dir, "SELECT * FROM all_devices LIMIT 1");
    assert!(columns[0].get("device_id").is_none(), "{columns:?}");
}

/// A stream given one more field, and a window one more column, between two runs: the
/// tables gain the columns (Delta schema evolution), read as null in the older rows by
/// `sluice query` and by DuckDB and Python `deltalake` through the log; a field whose
/// type changed is refused at start, naming its key and the column.
#[test]
fn a_table_gains_the_columns_a_stream_gains_and_refuses_a_changed_type() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = |humidity: bool, temperature: &str| {
        let (field, column) = match humidity {
            true => (
                r#"{ name = "humidity", type = "float" },"#,
                r#", "max(humidity) AS h_max""#,
            ),
            false => ("", ""),
        };
        let text = format!(
            r#"
[streams.readings]
fields = [
  {{ name = "device_id", type = "string", required = true }},
  {{ name = "ts", type = "timestamp", required = true }},
  {{ name = "temperature", type = "{temperature}" }},
  {field}
]
key = "device_id"
[windows.per_device]
input = "readings"
kind = "tumbling"
size = "1h"
group_by = ["device_id"]
select = ["count(*) AS n"{column}]
"#
        );
        write_config(tmp.path(), "readings.toml", text)
    };
    let dir = tmp.path().join("lake");
    let input = tmp.path().join("readings.jsonl");
    let run = |config: &Path, lines: &[String]| {
        std::fs::write(&input, lines.join("\n")).expect("write");
        let from = format!("readings={}", input.display());
        let (config, lake) = (config.to_str().expect("utf8"), lake_url(&dir));
        sluice(&[
            "run",
            "--config",
            config,
            "--data-dir",
            &lake,
            "--from-file",
            &from,
        ])
    };
    let line = |d: u32, ts: i64, humidity: &str| {
        format!(r#"{{"device_id":"d{d}","ts":{ts},"temperature":20.5{humidity}}}"#)
    };
    let before: Vec<String> = (0..3).map(|i| line(i % 2, T0 + i64::from(i), "")).collect();
    assert_ran(&run(&config(false, "float"), &before), "first run");
    let later = T0 + 2 * 3_600_000;
    let after: Vec<String> = (0..2)
        .map(|i| {
            line(
                i,
                later + i64::from(i),
                &format!(r#","humidity":{}"#, 40 + i),
            )
        })
        .collect();
    assert_ran(&run(&config(true, "float"), &after), "run with humidity");

    let row = &query_json(
        &dir,
        "SELECT count(*) AS n, count(humidity) AS h, sum(humidity) AS s FROM readings",
    )[0];
    assert_eq!(
        (&row["n"], &row["h"], &row["s"]),
        (&5.into(), &2.into(), &81.0.into())
    );
    let windows = query_json(
        &dir,
        "SELECT device_id, n, h_max FROM per_device ORDER BY window_start, device_id",
    );
    let windows: Vec<String> = windows
        .iter()
        .map(|r| {
            // JSON rows leave null columns out.
            let h_max = r.get("h_max").unwrap_or(&Value::Null);
            format!("{} {} {h_max}", r["device_id"], r["n"])
        })
        .collect();
    assert_eq!(
        windows,
        [
            r#""d0" 2 null"#,
            r#""d1" 1 null"#,
            r#""d0" 1 40.0"#,
            r#""d1" 1 41.0"#
        ]
    );
    if !lakes_on_s3() {
        // Other Delta readers see the new column through the log.
        let out = run_python(&format!(
            r#"{DUCKDB_DELTA}
import deltalake
path = {path:?}
t = deltalake.DeltaTable(path).to_pyarrow_table()
duck = duck().execute(f"SELECT count(humidity), sum(humidity) FROM delta_scan('{{path}}')").fetchall()
print(t.num_rows, sum(1 for h in t.column("humidity").to_pylist() if h is not None), duck)
"#,
            path = dir.join("readings").to_string_lossy(),
        ));
        assert_eq!(out.trim(), "5 2 [(2, 81.0)]");
    }

    // The temperature as text: its rows could not share the column. `sluice check`
    // says so given the lake, and `sluice run` refuses to start.
    let conflict = r#"streams.readings: table "readings": column "temperature" is double in the table and string in the rows"#;
    let check = |config: &Path| {
        let config = config.to_str().expect("utf8");
        sluice(&["check", "--config", config, "--data-dir", &lake_url(&dir)])
    };
    assert_ran(&check(&config(true, "float")), "check of the config in use");
    let out = check(&config(true, "string"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(conflict), "{stderr}");
    let out = run(&config(true, "string"), &after);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(conflict), "{stderr}");
    assert_eq!(
        query_json(&dir, "SELECT count(*) AS n FROM readings")[0]["n"],
        5
    );
}

/// `sluice run --config <config> --data-dir <dir> <args>`, which must exit 0.
fn bounded_run(config: &Path, dir: &Path, args: &[&str]) {
    let (config, dir) = (config.to_str().expect("utf8"), dir.to_str().expect("utf8"));
    let mut all = vec!["run", "--config", config, "--data-dir", dir];
    all.extend(args);
    assert_ran(&sluice(&all), &format!("sluice {}", all.join(" ")));
}

/// `[runtime] workers`: a bounded run decoded by one worker and by three writes the
/// same tables, down to which rows came too late for their window (which depends on
/// the order rows reach the windows) and the line numbers of the dead letters.
#[test]
fn bounded_runs_with_any_worker_count_write_the_same_tables() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let generated = tmp.path().join("generated.jsonl");
    let status = std::process::Command::new(loadtest_bin())
        .args(["generate", "--events", "200000", "--devices", "300"])
        .args(["--span-secs", "600", "--out"])
        .arg(&generated)
        .status()
        .expect("sluice-loadtest generate");
    assert!(status.success());
    // Malformed lines and blank lines among the good ones.
    let text = std::fs::read_to_string(&generated).expect("read");
    let mut lines = String::new();
    for (i, line) in text.lines().enumerate() {
        match i % 9_973 {
            0 => lines.push_str("not json\n"),
            1 => lines.push('\n'),
            _ => {}
        }
        lines.push_str(line);
        lines.push('\n');
    }
    let input = tmp.path().join("w1.jsonl");
    std::fs::write(&input, lines).expect("write");
    // A bound smaller than the generator's 2 s of disorder: some rows are late.
    let config = write_config(
        tmp.path(),
        "workers.toml",
        r#"
[broker]
enabled = false
[streams.telemetry]
schema = "telemetry"
max_out_of_orderness = "1s"
[windows.device_minute]
input = "telemetry"
kind = "tumbling"
size = "1m"
group_by = ["device_id"]
select = ["count(*) AS events", "max(temperature) AS t_max", "avg(humidity) AS h_avg"]
"#,
    );
    let tables = |workers: &str| {
        let dir = tmp.path().join(format!("lake-{workers}"));
        let file = format!("telemetry={}", input.display());
        bounded_run(&config, &dir, &["--workers", workers, "--from-file", &file]);
        [
            "SELECT device_id, window_start, events, t_max, h_avg FROM device_minute \
             ORDER BY device_id, window_start",
            // Whole numbers: a float sum's last bits depend on the order DataFusion
            // adds the files' partial sums in, which is not fixed.
            "SELECT count(*) AS n, sum(round(temperature * 1000)) AS t FROM telemetry",
            "SELECT _offset, reason FROM dead_letter ORDER BY _offset",
            "SELECT window_start, split_part(row, ',\"_ingest_time\"', 1) AS r, \
             split_part(row, '\"_offset\":', 2) AS o FROM late ORDER BY o",
        ]
        .map(|sql| query_json(&dir, sql))
    };
    let one = tables("1");
    let three = tables("3");
    assert!(one[0].len() > 1_000, "{} window rows", one[0].len());
    assert!(one[2].len() >= 20, "{:?}", one[2]);
    assert!(!one[3].is_empty(), "no late rows");
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        assert!(
            a == b,
            "query {i} differs between 1 and 3 workers: {:?} / {:?}",
            &a[..a.len().min(3)],
            &b[..b.len().min(3)]
        );
    }
}
