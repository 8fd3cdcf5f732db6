//! The console: its data over plain HTTP (the overview, the first SSE event, streams
//! that end at shutdown), and the page itself in a real browser (Debian's Chromium
//! driven by playwright-core, `tests/browser/console.test.mjs`).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// Opens `GET /api/events` and returns the reader after the response head.
fn open_events(addr: &str) -> (String, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("request");
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("response head");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    (head, reader)
}

/// The next SSE event (name and data) from `reader`.
fn next_event(reader: &mut BufReader<TcpStream>) -> Option<(String, serde_json::Value)> {
    let (mut name, mut data) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        // Chunked framing: size lines carry no field.
        let line = line.trim_end();
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim());
        } else if line.is_empty() && !data.is_empty() {
            return Some((
                name,
                serde_json::from_str(&data).expect("event data is JSON"),
            ));
        }
    }
}

#[test]
fn the_overview_and_the_event_stream_over_plain_http() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &[]);
    // The overview: series as columns, the newest point, the pipeline's shape.
    service.wait_until("a first point", || {
        http_get(&service.http, "/api/overview?range=5m")
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|o| !o["latest"].is_null())
    });
    let body = http_get(&service.http, "/api/overview?range=5m").expect("overview");
    let o: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(o["range_s"], 300);
    let t = o["series"]["t"].as_array().expect("t");
    assert_eq!(t.len(), o["series"]["events_in"].as_array().unwrap().len());
    assert_eq!(o["shape"]["alerts"][0]["name"], "temperature_high");
    assert!(o["latest"]["sources"]["devices"]["kind"] == "mqtt", "{o}");
    let (status, bad) = http_request(&service.http, "GET", "/api/overview?range=2h", "").unwrap();
    assert_eq!(status, 400);
    assert!(bad.contains("range"), "{bad}");

    // Events: a malformed message comes as a dead_letter event; metrics come once a
    // second and count it.
    let (head, mut events) = open_events(&service.http);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    let (name, first) = next_event(&mut events).expect("a first event");
    assert_eq!(name, "metrics");
    assert!(first["t"].as_i64().unwrap() > 0);
    mosquitto_pub(
        service.mqtt_port,
        "devices/sse-1/telemetry",
        &["{\"device_id\": \"sse-1\", oops".to_owned()],
        &[],
    );
    let mut dead = None;
    let mut counted = false;
    while dead.is_none() || !counted {
        let (name, data) = next_event(&mut events).expect("events go on");
        match name.as_str() {
            "dead_letter" => dead = Some(data),
            "metrics" => {
                counted |= data["dead_letter_reasons"]["invalid_json"].as_f64() > Some(0.0)
            }
            _ => {}
        }
    }
    let dead = dead.unwrap();
    assert_eq!(dead["reason"], "invalid_json");
    assert!(dead["payload"].as_str().unwrap().contains("oops"), "{dead}");

    // An open stream does not hold the stop: it ends, and the service exits.
    service.stop();
    let mut rest = String::new();
    while events.read_line(&mut rest).is_ok_and(|n| n > 0) {}
}

/// Where scripts/test.sh installed playwright-core.
fn node_path() -> String {
    std::env::var("SLUICE_TEST_NODE_PATH").expect(
        "SLUICE_TEST_NODE_PATH is not set: run the tests through ./scripts/test.sh, which installs Chromium and playwright-core",
    )
}

#[test]
fn the_console_in_a_real_browser() {
    if lakes_on_s3() {
        eprintln!("stalls a local lake's table; the console reads an S3 lake the same way");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    // The default pipeline with small queues, so a stalled lake holds the source
    // within seconds and the broker's lag shows.
    let default = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/default.toml"),
    )
    .expect("default config");
    let config = write_config(
        tmp.path(),
        "sluice.toml",
        format!(
            "{default}\n[limits]\nlake_backlog = \"1MB\"\nqueue_bytes = \"64KB\"\nsource_queue_bytes = \"64KB\"\n"
        ),
    );
    let service = Service::start(&dir, &["--config", config.to_str().unwrap()]);
    run_browser_test(&service, "console.test.mjs", &[]);
}

/// Runs `tests/browser/<script>` with node against `service`, screenshots to
/// `$SLUICE_SCREENSHOTS` (where a CI keeps its artifacts; default
/// `target/console-screenshots`); fails with its output and the service's log.
fn run_browser_test(service: &Service, script: &str, env: &[(&str, &str)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec"])
        .arg(root.join("tests/browser").join(script))
        .env("NODE_PATH", node_path())
        .env("SLUICE_URL", format!("http://{}/", service.http))
        .env("SLUICE_MQTT_PORT", service.mqtt_port.to_string())
        .env("SLUICE_DATA_DIR", &service.data_dir)
        .env("SLUICE_LOADTEST", loadtest_bin())
        .env(
            "SLUICE_SHOTS",
            std::env::var_os("SLUICE_SCREENSHOTS")
                .map_or_else(|| root.join("target/console-screenshots"), Into::into),
        )
        .envs(env.iter().copied())
        .output()
        .expect("run node --test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{}\n--- sluice log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        service.log_text()
    );
}

#[test]
fn the_console_keeps_up_with_ten_thousand_devices_and_fifty_tables() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let default = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/default.toml"),
    )
    .expect("default config");
    // Fifty functions, each writing a table of its own.
    let tables = 50;
    let functions: String = (0..tables)
        .map(|i| {
            format!(
                "[functions.f{i:02}]\ninput = \"telemetry\"\noutput = \"f{i:02}\"\nfilter = \"temperature > -1000\"\nselect = [\"device_id\", \"temperature\"]\n"
            )
        })
        .collect();
    let config = write_config(tmp.path(), "scale.toml", format!("{default}\n{functions}"));
    let service = Service::start(
        &tmp.path().join("lake"),
        &["--config", config.to_str().unwrap()],
    );
    run_browser_test(
        &service,
        "console-scale.test.mjs",
        &[("SLUICE_TABLES", &tables.to_string())],
    );
}

fn reading(device: &str, i: usize, temperature: f64) -> String {
    format!(
        r#"{{"device_id":"{device}","ts":{},"temperature":{temperature},"humidity":40,"battery":3.7,"status":"ok"}}"#,
        1_767_225_600_000_i64 + i as i64 * 1_000
    )
}

#[test]
fn sluice_tap_shows_the_rows_a_filter_keeps_and_refuses_what_cannot_be_tapped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let service = Service::start(&tmp.path().join("lake"), &[]);
    let http = service.http.clone();
    // What cannot be tapped: each a clear error, naming the problem.
    for (args, expected) in [
        (vec!["nope"], "no stream or table \"nope\""),
        (
            vec!["telemetry", "--filter", "no_such_column > 1"],
            "no_such_column",
        ),
        (
            vec!["telemetry", "--filter", "temperature"],
            "not a boolean",
        ),
        (vec!["telemetry", "--sample", "0"], "sample \"0\""),
    ] {
        let out = sluice(&[&["tap", "--http", &http][..], &args[..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // Bad parameters over plain HTTP: each a JSON error.
    for path in [
        "/api/tap/telemetry?sample=abc",
        "/api/tap/telemetry?sample=1&sample=1",
        "/api/tap/telemetry?filter=a&filter=b",
        "/api/overview?range=1m&range=2m",
    ] {
        let (status, head, body) = http_exchange(&http, "GET", path, "").expect("response");
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            head.to_ascii_lowercase().contains("application/json"),
            "{path}: {head}"
        );
        assert!(body.contains("\"error\""), "{path}: {body}");
    }
    // A tap of hot readings, every second one of them.
    let mut tap = Command::new(sluice_bin())
        .args([
            "tap",
            "telemetry",
            "--http",
            &http,
            "--filter",
            "temperature > 80",
            "--sample",
            "0.5",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sluice tap");
    let mut lines = BufReader::new(tap.stdout.take().expect("stdout")).lines();
    let _tap = KillOnDrop(tap);
    service.wait_until("the tap is open", || {
        service.metric_sum("sluice_tap_readers", &[]) >= 1.0
    });
    let readings: Vec<String> = (0..40)
        .map(|i| reading("tap-1", i, if i % 2 == 0 { 90.0 + i as f64 } else { 20.0 }))
        .collect();
    mosquitto_pub(service.mqtt_port, "devices/tap-1/telemetry", &readings, &[]);
    // 20 hot readings, every second one: 10 rows, in order.
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let line = lines.next().expect("the tap goes on").expect("a line");
        let row: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        assert_eq!(row["device_id"], "tap-1");
        seen.push(row["temperature"].as_f64().expect("temperature"));
    }
    let hot: Vec<f64> = (0..40).step_by(2).map(|i| 90.0 + i as f64).collect();
    assert_eq!(
        seen,
        hot.iter().skip(1).step_by(2).copied().collect::<Vec<_>>()
    );
}

#[test]
fn a_stalled_tap_reader_loses_rows_and_never_holds_ingest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &[]);
    // A reader that opens the tap and then reads nothing while the load runs.
    let mut stream = TcpStream::connect(&service.http).expect("connect");
    write!(
        stream,
        "GET /api/tap/telemetry HTTP/1.1\r\nHost: {}\r\n\r\n",
        service.http
    )
    .expect("request");
    service.wait_until("the tap is open", || {
        service.metric_sum("sluice_tap_readers", &[]) >= 1.0
    });
    let load = |service: &Service| {
        let out = Command::new(loadtest_bin())
            .args([
                "telemetry",
                "--target",
                &format!("mqtt://127.0.0.1:{}", service.mqtt_port),
            ])
            .args([
                "--devices",
                "50",
                "--rate",
                "20000",
                "--duration",
                "3s",
                "--qos",
                "1",
                "--no-progress",
            ])
            .stdout(std::process::Stdio::null())
            .output()
            .expect("sluice-loadtest");
        assert_ran(&out, "sluice-loadtest");
    };
    let committed = |service: &Service, events: u64| {
        service.wait_until("every event committed", || {
            query_json(&dir, "SELECT count(*) AS n FROM telemetry")
                .first()
                .and_then(|r| r["n"].as_u64())
                == Some(events)
        });
    };
    load(&service);
    // Every event lands, whatever the reader does.
    committed(&service, 60_000);
    // Reading again, the reader is told it lost batches.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("the tap goes on");
        assert!(n > 0, "the tap ended before it reported a loss");
        if line.starts_with("event: dropped") {
            break;
        }
    }
    // Stalled again, with the service's writes to it blocked on a full socket: the
    // load lands, and the reader does not hold the stop either.
    load(&service);
    committed(&service, 120_000);
    assert!(service.metric_sum("sluice_tap_dropped_batches_total", &[]) > 0.0);
    service.stop();
}

/// The first config a user writes: one source naming the built-in `telemetry` stream,
/// nothing else. `sluice check` says in one line what it fills in, and the service
/// lands the rows and runs the default alert over them.
#[test]
fn a_config_with_only_a_source_gets_the_default_pipeline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (broker, host, port) = mosquitto_address();
    let prefix = format!("first-{}", std::process::id());
    let config = write_config(
        tmp.path(),
        "first.toml",
        format!(
            "[sources.plant]\ntype = \"mqtt\"\nurl = \"mqtt://{broker}\"\ntopics = [\"{prefix}/+/telemetry\"]\nstream = \"telemetry\"\nqos = 1\n"
        ),
    );
    let config = config.to_str().expect("utf8");
    let out = sluice(&["check", "--config", config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let notes: Vec<&str> = stdout.lines().filter(|l| l.starts_with("note:")).collect();
    assert_eq!(
        notes,
        [
            "note: sources.plant: stream \"telemetry\" has no [streams] entry: using the built-in telemetry stream with the default window device_minute, alert temperature_high (to the alerts table)"
        ],
        "{stdout}"
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config]);
    service.wait_until("subscribed", || service.subscribed("plant"));
    // Three hot readings in a row fire the default rule (`for = 3`).
    let readings: Vec<String> = (0..3).map(|i| reading("first-1", i, 95.0)).collect();
    // scripts/test.sh's mosquitto listens on 127.0.0.1, where the helper publishes.
    assert_eq!(host, "127.0.0.1");
    mosquitto_pub(port, &format!("{prefix}/first-1/telemetry"), &readings, &[]);
    service.wait_until("the rows and the alert", || {
        has_table(&dir, "alerts")
            && query_json(&dir, "SELECT count(*) AS n FROM telemetry")
                .first()
                .and_then(|r| r["n"].as_u64())
                == Some(3)
            && query_json(&dir, "SELECT rule, key, event FROM alerts")
                .iter()
                .any(|r| {
                    r["rule"] == "temperature_high" && r["key"] == "first-1" && r["event"] == "fire"
                })
    });
    service.stop();
}

/// An MQTT source on an external mosquitto: its lag is what the broker's message store
/// holds (`$SYS/broker/store/messages/bytes`, read over a connection of its own). It
/// rises while a stalled lake holds the source, which then stops acknowledging, and
/// falls once the source has read the backlog; nothing is lost meanwhile.
#[test]
fn an_external_mosquittos_backlog_is_the_sources_lag_and_rises_while_the_lake_is_stalled() {
    if lakes_on_s3() {
        eprintln!("stalls a local lake's table; the lag is read the same way on S3");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = OwnServer::mosquitto(tmp.path(), 0, "allow_anonymous true\nsys_interval 1");
    let config = write_config(
        tmp.path(),
        "lag.toml",
        format!(
            r#"
[lake]
roll_interval = "200ms"
checkpoint_interval = "200ms"
[limits]
lake_backlog = "64KB"
queue_bytes = "64KB"
source_queue_bytes = "64KB"
[streams.telemetry]
schema = "telemetry"
[sources.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
topics = ["lag/#"]
client_id = "lag-sluice"
stream = "telemetry"
"#,
            broker.port
        ),
    );
    let dir = tmp.path().join("lake");
    let service = Service::start(&dir, &["--config", config.to_str().unwrap()]);
    service.wait_until("the subscription", || service.subscribed("plant"));
    let lag = || {
        let body = http_get(&service.http, "/api/overview?range=5m")?;
        let o: serde_json::Value = serde_json::from_str(&body).ok()?;
        let plant = &o["latest"]["sources"]["plant"];
        assert!(
            plant["lag_unit"].is_null() || plant["lag_unit"] == "bytes",
            "{plant}"
        );
        plant["lag"].as_f64()
    };
    service.wait_until("a lag read from the broker", || lag().is_some());
    let publish = |range: std::ops::Range<usize>| {
        let n = range.len() as u64;
        let messages = range.map(|i| {
            (
                format!("lag/d{}", i % 50),
                reading(&format!("d{}", i % 50), i, 20.0),
            )
        });
        let acked = spawn_mqtt_publisher(broker.port, "lag-producer", n, messages)
            .join()
            .expect("producer");
        assert_eq!(acked, n, "every publish acknowledged by the broker");
    };
    publish(0..1);
    let table = dir.join("telemetry");
    service.wait_until("the first row", || {
        table.join("_delta_log").exists()
            && count_rows(&dir, "SELECT count(*) AS n FROM telemetry") == 1
    });
    // The table's directory replaced by a file: every commit fails, the lake's
    // backlog fills, the queues fill, and the source stops reading and acknowledging.
    let aside = dir.join("telemetry-aside");
    std::fs::rename(&table, &aside).expect("move the table aside");
    std::fs::write(&table, "not a directory").expect("block the table");
    let events = 60_000;
    publish(1..events);
    service.wait_until("the broker's backlog as the lag", || {
        let bytes = lag();
        eprintln!("lag {bytes:?}");
        bytes.is_some_and(|bytes| bytes > 500_000.0)
    });
    let held = lag().unwrap_or_default();
    std::fs::remove_file(&table).expect("unblock");
    std::fs::rename(&aside, &table).expect("move the table back");
    service.wait_until("every row", || {
        count_rows(&dir, "SELECT count(*) AS n FROM telemetry") == events as u64
    });
    // What is left in the store: mosquitto's retained $SYS values.
    service.wait_until("the backlog read", || {
        lag().is_some_and(|bytes| bytes < 20_000.0)
    });
    eprintln!("lag while stalled: {held} bytes; after: {:?}", lag());
    assert_eq!(
        count_rows(&dir, "SELECT count(DISTINCT ts) AS n FROM telemetry"),
        events as u64,
        "each reading once"
    );
}

fn count_rows(dir: &Path, sql: &str) -> u64 {
    query_json(dir, sql)
        .first()
        .and_then(|row| row["n"].as_u64())
        .unwrap_or(0)
}
