//! The `sluice-loadtest` binary against a real mosquitto and a real `sluice run`:
//! pacing, the report files, record → replay, refused connections, probes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_loadtest::record::read_recording;

use crate::support::*;

fn loadtest(args: &[&str]) -> Output {
    Command::new(loadtest_bin())
        .args(args)
        .output()
        .expect("run sluice-loadtest")
}

fn report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("report is JSON")
}

/// Topic prefixes unique to this test run, so tests sharing the mosquitto stay apart.
fn prefix(name: &str) -> String {
    format!("lt-{name}-{}", std::process::id())
}

/// `mosquitto_sub` printing `topic arrival-unix-time` per message, ready once a marker
/// published through the broker has come back.
struct Subscriber {
    child: Child,
    out: PathBuf,
}

impl Subscriber {
    fn start(port: u16, filter: &str, marker_topic: &str, out: PathBuf) -> Subscriber {
        let file = std::fs::File::create(&out).expect("subscriber output");
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args(["-t", filter, "-F", "%t %U"])
            .stdout(file)
            .spawn()
            .expect("mosquitto_sub is installed by scripts/test.sh");
        let sub = Subscriber { child, out };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sub.lines().iter().any(|l| l.starts_with(marker_topic)) {
            assert!(Instant::now() < deadline, "mosquitto_sub never subscribed");
            mosquitto_pub(port, marker_topic, &["marker".to_owned()], &[]);
            std::thread::sleep(Duration::from_millis(200));
        }
        sub
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Lines once no new one arrived for a second (bounded).
    fn settle(mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = usize::MAX;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let n = self.lines().len();
            if n == last || Instant::now() > deadline {
                break;
            }
            last = n;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines()
    }
}

#[test]
fn loadtest_paces_10k_events_per_second_and_writes_its_reports() {
    let (broker, _, port) = mosquitto_address();
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = prefix("pace");
    let sub = Subscriber::start(
        port,
        &format!("{p}/#"),
        &format!("{p}/marker"),
        tmp.path().join("sub.txt"),
    );
    let report_path = tmp.path().join("report.json");
    let hgrm = tmp.path().join("ack.hgrm");
    let png = tmp.path().join("latency.png");
    let out = loadtest(&[
        "telemetry",
        "--target",
        &format!("mqtt://{broker}"),
        "--devices",
        "100",
        "--rate",
        "10000",
        "--duration",
        "5s",
        "--qos",
        "1",
        "--topic",
        &format!("{p}/devices/{{id}}/telemetry"),
        "--report",
        report_path.to_str().expect("utf8"),
        "--hgrm",
        hgrm.to_str().expect("utf8"),
        "--plot",
        png.to_str().expect("utf8"),
        "--no-progress",
    ]);
    assert_ran(&out, "loadtest telemetry");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("ack latency"), "{summary}");

    let lines = sub.settle();
    let arrivals: Vec<f64> = lines
        .iter()
        .filter(|l| l.starts_with(&format!("{p}/devices/")))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|t| t.parse().ok())
                .expect("arrival time")
        })
        .collect();
    let n = arrivals.len() as f64;
    assert!(
        (n - 50_000.0).abs() <= 1_000.0,
        "subscriber saw {n} messages, want 50,000 ± 2%"
    );
    // Paced, not a burst: the arrivals span the 5 s schedule (a lower bound only; a
    // slow machine can only stretch it).
    let span = arrivals.iter().copied().fold(f64::MIN, f64::max)
        - arrivals.iter().copied().fold(f64::MAX, f64::min);
    assert!(span >= 4.5, "50,000 messages arrived within {span:.2} s");

    let r = report(&report_path);
    for field in [
        "tool",
        "version",
        "command",
        "target",
        "qos",
        "connections",
        "target_rate",
        "scheduled",
        "scheduled_s",
        "send_s",
        "total_s",
        "sent",
        "acked",
        "unacked",
        "errors",
        "malformed",
        "achieved_rate",
        "acked_rate",
        "backpressure_s",
        "schedule_lag",
        "ack_latency",
        "probes_sent",
        "probes_seen",
        "queryable_latency",
        "alert_latency",
        "timeline",
    ] {
        assert!(r.get(field).is_some(), "report lacks {field}: {r}");
    }
    assert_eq!(r["command"], "telemetry");
    assert_eq!(r["scheduled"], 50_000);
    assert_eq!(r["sent"], 50_000);
    assert_eq!(r["acked"], 50_000);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["target_rate"], 10_000.0);
    for p in ["p50_us", "p90_us", "p99_us", "p99_9_us", "max_us"] {
        assert!(r["ack_latency"][p].as_u64().is_some_and(|v| v > 0), "{p}");
        assert!(r["schedule_lag"][p].as_u64().is_some(), "{p}");
    }
    assert_eq!(r["ack_latency"]["count"], 50_000);
    assert!(r["timeline"].as_array().is_some_and(|t| t.len() >= 4));

    let hgrm = std::fs::read_to_string(&hgrm).expect("hgrm");
    assert!(hgrm.contains("Total count    =        50000"), "{hgrm}");
    let png = std::fs::read(&png).expect("png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
}

#[test]
fn loadtest_refused_connection_is_a_clear_error() {
    let port = free_port();
    for target in [
        format!("mqtt://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}"),
    ] {
        let out = loadtest(&[
            "telemetry",
            "--target",
            &target,
            "--duration",
            "1s",
            "--no-progress",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{target}: exited 0");
        assert!(
            err.contains(&format!("cannot connect to {target}"))
                && err.to_lowercase().contains("refused"),
            "{target}: {err}"
        );
    }
    let out = loadtest(&[
        "telemetry",
        "--target",
        &format!("kafka://127.0.0.1:{port}/t"),
        "--duration",
        "1s",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("cannot connect to kafka://127.0.0.1:{port}/t")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = loadtest(&["telemetry", "--target", "ftp://x", "--duration", "1s"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected mqtt://"));
}

/// `sluice-loadtest record` in the background, returned once it has subscribed.
fn start_recorder(broker: &str, filter: &str, out: &Path) -> Child {
    let mut child = Command::new(loadtest_bin())
        .args(["record", "--source", &format!("mqtt://{broker}")])
        .args(["--topic", filter, "--idle", "3s", "--out"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recorder");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .expect("recorder exited before subscribing")
            .expect("read");
        if line.starts_with("recording: subscribed") {
            break;
        }
    }
    // Keep draining stderr so the recorder never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

#[test]
fn loadtest_record_then_replay_is_byte_identical() {
    let (broker, _, port) = mosquitto_address();
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = prefix("rec");
    let filter = format!("{p}/#");
    let first = tmp.path().join("first.jsonl");
    let mut recorder = start_recorder(&broker, &filter, &first);
    let out = loadtest(&[
        "telemetry",
        "--target",
        &format!("mqtt://{broker}"),
        "--devices",
        "20",
        "--rate",
        "2000",
        "--duration",
        "1s",
        "--malformed-fraction",
        "0.1",
        "--extra-fields",
        "2",
        "--topic",
        &format!("{p}/{{id}}"),
        "--no-progress",
    ]);
    assert_ran(&out, "loadtest telemetry");
    // Bytes that are not UTF-8 take the payload_b64 path.
    let binary = tmp.path().join("blob.bin");
    std::fs::write(&binary, [0xff, 0x00, b'\n', 0xc3, 0x28]).expect("write blob");
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", &format!("{p}/blob"), "-f"])
        .arg(&binary)
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    assert!(recorder.wait().expect("recorder").success());
    let recorded = read_recording(&first).expect("read recording");
    assert_eq!(recorded.len(), 2001, "2000 telemetry + 1 binary");
    assert!(
        recorded
            .iter()
            .any(|r| serde_json::from_slice::<Value>(&r.payload).is_err()),
        "malformed payloads were recorded as sent"
    );

    // Replay at 4× while a second recorder (Parquet this time) listens.
    let second = tmp.path().join("second.parquet");
    let mut recorder = start_recorder(&broker, &filter, &second);
    let report_path = tmp.path().join("replay.json");
    let out = loadtest(&[
        "replay",
        "--input",
        first.to_str().expect("utf8"),
        "--target",
        &format!("mqtt://{broker}"),
        "--speed",
        "4",
        "--report",
        report_path.to_str().expect("utf8"),
        "--no-progress",
    ]);
    assert_ran(&out, "loadtest replay");
    assert!(recorder.wait().expect("recorder").success());
    let replayed = read_recording(&second).expect("read replay");
    let strip = |r: &[sluice_loadtest::record::Recorded]| -> Vec<(String, Vec<u8>)> {
        r.iter()
            .map(|m| (m.topic.clone(), m.payload.clone()))
            .collect()
    };
    // One connection and one subscriber: the same messages, byte for byte, in the same
    // order (so also per device).
    assert_eq!(strip(&replayed), strip(&recorded));
    let r = report(&report_path);
    assert_eq!(r["command"], "replay");
    assert_eq!(r["acked"], 2001);
    // The recording spanned ≥ 1 s; at 4× the replay took about a quarter of it.
    let span_s = (recorded[2000].arrival_us - recorded[0].arrival_us) as f64 / 1e6;
    assert!((r["scheduled_s"].as_f64().expect("scheduled_s") - span_s / 4.0).abs() < 1e-3);
}

#[test]
fn loadtest_probes_measure_publish_to_queryable_and_alert_through_sluice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &[]);
    let report_path = tmp.path().join("report.json");
    let out = loadtest(&[
        "telemetry",
        "--target",
        &format!("mqtt://127.0.0.1:{}", service.mqtt_port),
        "--devices",
        "50",
        "--rate",
        "2000",
        "--duration",
        "3s",
        "--connections",
        "2",
        "--malformed-fraction",
        "0.01",
        "--query-url",
        &format!("http://{}", service.http),
        "--probe-every",
        "250ms",
        "--excursion-probability",
        "0.01",
        "--alert-topic",
        "alerts/#",
        "--report",
        report_path.to_str().expect("utf8"),
        "--no-progress",
    ]);
    assert_ran(&out, "loadtest telemetry with probes and alerts");
    let r = report(&report_path);
    let probes = r["probes_sent"].as_u64().expect("probes_sent");
    assert!(probes >= 12, "{r}");
    assert_eq!(r["probes_seen"], probes, "every probe became queryable");
    assert_eq!(r["queryable_latency"]["count"], probes);
    assert_eq!(r["acked"], r["sent"]);
    let malformed = r["malformed"].as_u64().expect("malformed");
    assert!(malformed > 0);

    // Everything that was acknowledged landed: rows plus dead letters.
    let expected_rows = 6000 - malformed;
    service.wait_until("all rows committed", || {
        let (_, body) = http_request(
            &service.http,
            "POST",
            "/api/query",
            r#"{"sql":"SELECT count(*) AS n FROM telemetry WHERE device_id LIKE 'dev-%'"}"#,
        )
        .unwrap_or_default();
        body.contains(&format!(r#""n":{expected_rows}"#))
    });
    // Excursions above 85 fired the default rule; the tool timed every fire it heard.
    let fires = r["alert_latency"]["count"]
        .as_u64()
        .expect("alert_latency.count");
    service.wait_until("the fires committed", || {
        let (_, body) = http_request(
            &service.http,
            "POST",
            "/api/query",
            r#"{"sql":"SELECT count(*) AS n FROM alerts WHERE event = 'fire'"}"#,
        )
        .unwrap_or_default();
        body.contains(&format!(r#""n":{fires}"#))
    });
    assert!(fires > 5, "{r}");
    assert!(r["alert_latency"]["p99_us"].as_u64().expect("p99") > 0);

    // Clicks over HTTP ingest land in the clicks table.
    let out = loadtest(&[
        "clicks",
        "--target",
        &format!("http://{}", service.http),
        "--users",
        "30",
        "--rate",
        "1000",
        "--duration",
        "1s",
        "--report",
        report_path.to_str().expect("utf8"),
        "--no-progress",
    ]);
    assert_ran(&out, "loadtest clicks over http");
    let r = report(&report_path);
    assert_eq!(r["acked"], 1000, "{r}");
    service.wait_until("clicks committed", || {
        let (_, body) = http_request(
            &service.http,
            "POST",
            "/api/query",
            r#"{"sql":"SELECT count(*) AS n FROM clicks"}"#,
        )
        .unwrap_or_default();
        body.contains(r#""n":1000"#)
    });
    service.stop();
}

/// Devices in the payloads, with each record's key: the key must be the device id.
fn check_keys_and_count(consumed: &str, expected: usize) {
    let records: Vec<Value> = consumed
        .lines()
        .map(|l| serde_json::from_str(l).expect("consumer line"))
        .collect();
    assert_eq!(records.len(), expected, "records read back");
    for r in &records {
        let payload: Value =
            serde_json::from_str(r["value"].as_str().expect("value")).expect("payload json");
        assert_eq!(r["key"], payload["device_id"], "{r}");
    }
}

#[test]
fn loadtest_produces_to_kafka_with_delivery_reports() {
    let broker = kafka();
    let topic = prefix("kafka");
    // confluent-kafka from PyPI: an independent client (tansu does not auto-create).
    run_python(&format!(
        r#"
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({{"bootstrap.servers": "{broker}"}})
for f in a.create_topics([NewTopic("{topic}", num_partitions=3, replication_factor=1)]).values():
    f.result(30)
"#
    ));
    let tmp = tempfile::tempdir().expect("tempdir");
    let report_path = tmp.path().join("kafka.json");
    let out = loadtest(&[
        "telemetry",
        "--target",
        &format!("kafka://{broker}/{topic}"),
        "--devices",
        "40",
        "--rate",
        "2000",
        "--duration",
        "2s",
        "--report",
        report_path.to_str().expect("utf8"),
        "--no-progress",
    ]);
    assert_ran(&out, "loadtest telemetry to kafka");
    let r = report(&report_path);
    assert_eq!(r["acked"], 4000, "delivery reports: {r}");
    assert!(r["ack_latency"]["p99_us"].as_u64().is_some_and(|v| v > 0));
    let consumed = run_python(&format!(
        r#"
import json, time
from confluent_kafka import Consumer
c = Consumer({{"bootstrap.servers": "{broker}", "group.id": "check-{topic}",
               "auto.offset.reset": "earliest", "enable.auto.commit": False}})
c.subscribe(["{topic}"])
n, deadline = 0, time.time() + 60
while n < 4000 and time.time() < deadline:
    m = c.poll(1.0)
    if m is None or m.error():
        continue
    n += 1
    print(json.dumps({{"key": m.key().decode(), "value": m.value().decode()}}))
c.close()
"#
    ));
    check_keys_and_count(&consumed, 4000);

    // The recorder reads the same records back through its own consumer group.
    let recording = tmp.path().join("kafka.jsonl");
    record_everything(&format!("kafka://{broker}/{topic}"), &recording, &[]);
    let recorded = read_recording(&recording).expect("kafka recording");
    assert_eq!(recorded.len(), 4000);
    assert!(recorded.iter().all(|r| r.topic == topic));

    let missing = loadtest(&[
        "telemetry",
        "--target",
        &format!("kafka://{broker}/{topic}-missing"),
        "--duration",
        "1s",
        "--no-progress",
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist; create it first"));
}

#[test]
fn loadtest_puts_records_to_kinesis_in_batches() {
    let endpoint = kinesis_endpoint();
    let stream = prefix("kinesis");
    let boto = format!(
        r#"
import boto3
k = boto3.client("kinesis", endpoint_url="{endpoint}", region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test")
"#
    );
    run_python(&format!(
        r#"{boto}
k.create_stream(StreamName="{stream}", ShardCount=2)
k.get_waiter("stream_exists").wait(StreamName="{stream}", WaiterConfig={{"Delay": 0.2}})
"#
    ));
    let tmp = tempfile::tempdir().expect("tempdir");
    let report_path = tmp.path().join("kinesis.json");
    let out = Command::new(loadtest_bin())
        .args(["telemetry", "--target"])
        .arg(format!(
            "kinesis://{stream}?endpoint={endpoint}&region=us-east-1"
        ))
        .args(["--devices", "40", "--rate", "1500", "--duration", "2s"])
        .args(["--connections", "4", "--no-progress", "--report"])
        .arg(&report_path)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .expect("run loadtest");
    assert_ran(&out, "loadtest telemetry to kinesis");
    let r = report(&report_path);
    assert_eq!(r["acked"], 3000, "{r}");
    let consumed = run_python(&format!(
        r#"{boto}
import json
for shard in k.list_shards(StreamName="{stream}")["Shards"]:
    it = k.get_shard_iterator(StreamName="{stream}", ShardId=shard["ShardId"],
                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    while it:
        out = k.get_records(ShardIterator=it, Limit=10000)
        for rec in out["Records"]:
            print(json.dumps({{"key": rec["PartitionKey"], "value": rec["Data"].decode()}}))
        if not out["Records"]:
            break
        it = out.get("NextShardIterator")
"#
    ));
    check_keys_and_count(&consumed, 3000);

    let recording = tmp.path().join("kinesis.parquet");
    record_everything(
        &format!("kinesis://{stream}?endpoint={endpoint}&region=us-east-1"),
        &recording,
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ],
    );
    let recorded = read_recording(&recording).expect("kinesis recording");
    assert_eq!(recorded.len(), 3000);
    let mut payloads: Vec<Vec<u8>> = recorded.into_iter().map(|r| r.payload).collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), 3000, "no duplicates");
}

/// `record --from-beginning` until the source has been idle for 3 s.
fn record_everything(source: &str, out: &Path, env: &[(&str, &str)]) {
    let output = Command::new(loadtest_bin())
        .args([
            "record",
            "--source",
            source,
            "--from-beginning",
            "--idle",
            "3s",
        ])
        .args(["--duration", "60s", "--out"])
        .arg(out)
        .envs(env.iter().copied())
        .output()
        .expect("run recorder");
    assert_ran(&output, &format!("record {source}"));
}
