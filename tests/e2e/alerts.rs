//! Alerts end to end: telemetry through a real mosquitto crosses and re-crosses the
//! thresholds; the exact fire/resolve sequence must arrive on MQTT (mosquitto_sub), on
//! a webhook (a Python HTTP receiver that checks the HMAC signature itself) and in the
//! `alerts` table, across a restart mid-alert and a webhook that is down for 30 s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const SECRET: &str = "s3cret-for-tests";

/// An HTTP receiver in Python (stdlib only): every POST becomes one JSON line in
/// `out` with the body and whether its `X-Sluice-Signature` is the HMAC-SHA256 of the
/// body under [`SECRET`]. Killed on drop.
struct Receiver {
    child: Child,
}

impl Receiver {
    fn start(port: u16, out: &Path) -> Receiver {
        let code = r#"
import hashlib, hmac, http.server, json, sys
port, secret, out = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(self.headers.get("X-Sluice-Signature", ""), want)
        with open(out, "a") as f:
            f.write(json.dumps({"sig_ok": ok, "body": json.loads(body)}) + "\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;
        let child = Command::new(python())
            .args(["-c", code, &port.to_string(), SECRET])
            .arg(out)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the receiver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the receiver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Receiver { child }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_sub -v` on `filter`, writing `topic payload` lines to `out`; killed on
/// drop. Returns once a probe message published to `probe` has come back, so nothing
/// published afterwards can be missed.
struct Subscriber {
    child: Child,
    out: PathBuf,
}

impl Subscriber {
    fn start(port: u16, filter: &str, probe: &str, out: &Path) -> Subscriber {
        let file = std::fs::File::create(out).expect("subscriber output");
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-v"])
            .args(["-t", filter])
            .stdout(file)
            .spawn()
            .expect("mosquitto_sub is installed by scripts/test.sh");
        let sub = Subscriber {
            child,
            out: out.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            mosquitto_pub(port, probe, &["probe".to_owned()], &[]);
            std::thread::sleep(Duration::from_millis(200));
            if std::fs::read_to_string(out).is_ok_and(|t| t.contains(probe)) {
                return sub;
            }
            assert!(Instant::now() < deadline, "mosquitto_sub never subscribed");
        }
    }

    /// `event alert_id` of each alert received, in order (probes left out).
    fn events(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(_, payload)| serde_json::from_str::<Value>(payload).ok())
            .map(|v| describe(&v))
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn describe(v: &Value) -> String {
    format!(
        "{} {}",
        v["event"].as_str().unwrap_or("?"),
        v["alert_id"].as_str().unwrap_or("?")
    )
}

/// `event alert_id` of each webhook call, in order; panics on a bad signature.
fn webhook_events(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("receiver line");
            assert_eq!(v["sig_ok"], true, "bad signature on {l}");
            describe(&v["body"])
        })
        .collect()
}

/// `event alert_id` of each `alerts` row, in event-time order.
fn table_events(dir: &Path) -> Vec<String> {
    query_json(
        dir,
        "SELECT event, alert_id FROM alerts ORDER BY at, event = 'resolve'",
    )
    .iter()
    .map(|r| {
        format!(
            "{} {}",
            r["event"].as_str().unwrap_or("?"),
            r["alert_id"].as_str().unwrap_or("?")
        )
    })
    .collect()
}

/// Publishes one telemetry message per temperature for `device`, in order, with event
/// times one second apart from `start` s.
fn publish_temperatures(port: u16, prefix: &str, device: &str, start: i64, temps: &[f64]) {
    let lines: Vec<String> = temps
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                r#"{{"device_id":"{device}","ts":{},"temperature":{t}}}"#,
                1_767_225_600_000 + (start + i as i64) * 1000
            )
        })
        .collect();
    mosquitto_pub(
        port,
        &format!("{prefix}devices/{device}/telemetry"),
        &lines,
        &[],
    );
}

fn wait_for(what: &str, service: &Service, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The default rule's semantics (fire > 80 three times in a row, clear < 75 three
/// times) on an external mosquitto, with MQTT and webhook notifiers; a clean restart
/// while firing, and a kill -9 while firing (after a checkpoint covered the fire),
/// neither re-fire nor lose the resolve.
#[test]
fn alerts_fire_and_resolve_on_mqtt_webhook_and_table_across_a_restart() {
    let (broker, _, port) = mosquitto_address();
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = format!("al{}/", free_port());
    let hook_port = free_port();
    let hook_out = tmp.path().join("hook.jsonl");
    let _receiver = Receiver::start(hook_port, &hook_out);
    let subscriber = Subscriber::start(
        port,
        &format!("{prefix}alerts/#"),
        &format!("{prefix}alerts/probe"),
        &tmp.path().join("sub.txt"),
    );
    let config = write_config(
        tmp.path(),
        "alerts.toml",
        format!(
            r#"
[lake]
roll_interval = "200ms"
[sources.devices]
type = "mqtt"
url = "mqtt://{broker}"
topics = ["{prefix}devices/+/telemetry"]
qos = 1
client_id = "sluice-alerts-{hook_port}"
stream = "telemetry"
[streams.telemetry]
schema = "telemetry"
[notifiers.mqtt]
type = "mqtt"
url = "mqtt://{broker}"
topic = "{prefix}alerts/{{rule}}/{{device_id}}"
[notifiers.hook]
type = "webhook"
url = "http://127.0.0.1:{hook_port}/alerts"
secret_env = "ALERT_SECRET"
[alerts.temperature_high]
input = "telemetry"
condition = "temperature > 80"
for = 3
clear = "temperature < 75"
clear_for = 3
value = "temperature"
notify = ["mqtt", "hook"]
"#
        ),
    );
    let dir = tmp.path().join("lake");
    let args = ["--config", config.to_str().expect("utf8")];
    let env = [("ALERT_SECRET", SECRET)];
    let mut service = Service::start_with_env(&dir, &args, &env);
    service.wait_until("the source to subscribe", || service.subscribed("devices"));
    // d1: 70 81 82 83 → fire; 78 74 73 79 (no run of three below 75) 74 73 72 →
    // resolve; 85 86 87 → fire again. d2 stays cool.
    let temps = [
        70.0, 81.0, 82.0, 83.0, 78.0, 74.0, 73.0, 79.0, 74.0, 73.0, 72.0, 85.0, 86.0, 87.0,
    ];
    publish_temperatures(port, &prefix, "d1", 0, &temps);
    publish_temperatures(port, &prefix, "d2", 0, &[60.0; 5]);
    let before = strings(&[
        "fire temperature_high/d1/1",
        "resolve temperature_high/d1/1",
        "fire temperature_high/d1/2",
    ]);
    wait_for("three notifications on each", &service, || {
        subscriber.events().len() >= 3 && webhook_events(&hook_out).len() >= 3
    });
    assert_eq!(subscriber.events(), before, "MQTT");
    assert_eq!(webhook_events(&hook_out), before, "webhook");

    // Restart while d1 is firing.
    service.stop();
    assert_eq!(table_events(&dir), before, "alerts table");
    let mut service = Service::start_with_env(&dir, &args, &env);
    service.wait_until("the source to subscribe again", || {
        service.subscribed("devices")
    });
    // Still hot: no second fire. Then three below 75: the resolve of episode 2.
    publish_temperatures(port, &prefix, "d1", 14, &[88.0, 70.0, 71.0, 72.0]);
    let all = strings(&[
        "fire temperature_high/d1/1",
        "resolve temperature_high/d1/1",
        "fire temperature_high/d1/2",
        "resolve temperature_high/d1/2",
    ]);
    wait_for("the resolve after the restart", &service, || {
        subscriber.events().len() >= 4 && webhook_events(&hook_out).len() >= 4
    });
    assert_eq!(subscriber.events(), all, "MQTT after the restart");
    // A crash while firing: fire episode 3, let a checkpoint cover it, kill -9. The
    // restart restores the firing state: no second fire, and the resolve arrives.
    publish_temperatures(port, &prefix, "d1", 18, &[85.0, 86.0, 87.0]);
    wait_for("the third fire", &service, || {
        subscriber.events().len() >= 5 && webhook_events(&hook_out).len() >= 5
    });
    let checkpoints = service.metric_sum("sluice_checkpoints_total", &[]);
    wait_for("a checkpoint after the fire", &service, || {
        service.metric_sum("sluice_checkpoints_total", &[]) >= checkpoints + 2.0
    });
    service.kill9();
    let mut service = Service::start_with_env(&dir, &args, &env);
    service.wait_until("the source to subscribe after the crash", || {
        service.subscribed("devices")
    });
    publish_temperatures(port, &prefix, "d1", 21, &[89.0, 70.0, 71.0, 72.0]);
    let all = strings(&[
        "fire temperature_high/d1/1",
        "resolve temperature_high/d1/1",
        "fire temperature_high/d1/2",
        "resolve temperature_high/d1/2",
        "fire temperature_high/d1/3",
        "resolve temperature_high/d1/3",
    ]);
    wait_for("the resolve after the crash", &service, || {
        subscriber.events().len() >= 6 && webhook_events(&hook_out).len() >= 6
    });
    std::thread::sleep(Duration::from_millis(500));
    service.stop();
    assert_eq!(subscriber.events(), all, "MQTT");
    assert_eq!(webhook_events(&hook_out), all, "webhook");
    assert_eq!(table_events(&dir), all, "alerts table");
    let row = &query_json(
        &dir,
        "SELECT value, message, severity, notified, fired_at < resolved_at AS ordered
         FROM alerts WHERE alert_id = 'temperature_high/d1/2' AND event = 'resolve'",
    )[0];
    assert_eq!(row["value"].as_f64(), Some(72.0));
    assert_eq!(row["message"], "temperature_high resolve for d1");
    assert_eq!(
        (&row["severity"], &row["notified"]),
        (&"warning".into(), &true.into())
    );
    assert_eq!(row["ordered"], true);
}

/// The lake's S3 server hangs (SIGSTOP: it accepts connections and answers nothing)
/// while telemetry flows: a checkpoint waits on it, but the lake task goes on, so a
/// reading over the threshold still fires its alert on MQTT while no checkpoint can
/// finish. Once the server answers again, every reading and both alert rows land once.
#[test]
fn alerts_fire_while_the_lakes_object_store_hangs() {
    let (broker, _, port) = mosquitto_address();
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3_server = OwnServer::seaweedfs(tmp.path());
    let endpoint = s3_server.url();
    let bucket = create_bucket_at(&endpoint, "hang");
    let lake = format!("s3://{bucket}/lake");
    let prefix = format!("hang{}/", free_port());
    let subscriber = Subscriber::start(
        port,
        &format!("{prefix}alerts/#"),
        &format!("{prefix}alerts/probe"),
        &tmp.path().join("sub.txt"),
    );
    let config = write_config(
        tmp.path(),
        "hang.toml",
        format!(
            r#"
[lake]
checkpoint_interval = "1s"
[sources.devices]
type = "mqtt"
url = "mqtt://{broker}"
topics = ["{prefix}devices/+/telemetry"]
qos = 1
client_id = "sluice-hang-{port}-{}"
stream = "telemetry"
[streams.telemetry]
schema = "telemetry"
[notifiers.mqtt]
type = "mqtt"
url = "mqtt://{broker}"
topic = "{prefix}alerts/{{rule}}/{{device_id}}"
[alerts.temperature_high]
input = "telemetry"
condition = "temperature > 80"
for = 3
clear = "temperature < 75"
clear_for = 3
value = "temperature"
notify = ["mqtt"]
{}"#,
            free_port(),
            s3_section(&endpoint)
        ),
    );
    let mut service = Service::start_on_s3(&lake, tmp.path().join("sluice.log"), &config);
    service.wait_until("the source to subscribe", || service.subscribed("devices"));
    publish_temperatures(port, &prefix, "d1", 0, &[70.0, 71.0]);
    wait_for("a checkpoint with rows", &service, || {
        service.metric_sum("sluice_lake_rows_written_total", &["table=\"telemetry\""]) >= 2.0
            && service.metric_sum("sluice_checkpoints_total", &[]) >= 1.0
    });

    // The store hangs; rows keep coming, so the next checkpoints have files to put.
    s3_server.pause();
    let received = service.received("devices");
    publish_temperatures(port, &prefix, "d2", 0, &[60.0; 20]);
    wait_for("the readings during the hang", &service, || {
        service.received("devices") >= received + 20.0
    });
    // Past the checkpoint interval: a checkpoint has started and waits on the store.
    std::thread::sleep(Duration::from_secs(3));
    let checkpoints = service.metric_sum("sluice_checkpoints_total", &[]);
    publish_temperatures(
        port,
        &prefix,
        "d1",
        2,
        &[81.0, 82.0, 83.0, 70.0, 71.0, 72.0],
    );
    // The store's client waits 30 s for an answer and then retries for minutes: a lake
    // task held by the checkpoint would send nothing within this wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    while subscriber.events().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no alert while the store hangs: {:?}; log:\n{}",
            subscriber.events(),
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        subscriber.events(),
        strings(&[
            "fire temperature_high/d1/1",
            "resolve temperature_high/d1/1"
        ]),
        "MQTT"
    );
    assert_eq!(
        service.metric_sum("sluice_checkpoints_total", &[]),
        checkpoints,
        "no checkpoint finished while the store hung"
    );

    s3_server.resume();
    let counts = || {
        s3_query(
            &config,
            &lake,
            "SELECT (SELECT count(*) FROM telemetry) AS readings, \
             (SELECT count(DISTINCT device_id || CAST(ts AS VARCHAR)) FROM telemetry) AS distinct_readings, \
             (SELECT count(*) FROM alerts) AS alerts",
        )
        .and_then(|rows| rows.into_iter().next())
        .map(|row| {
            ["readings", "distinct_readings", "alerts"].map(|k| row[k].as_u64().unwrap_or(0))
        })
    };
    wait_for("every row in the lake after the hang", &service, || {
        counts().is_some_and(|c| c[0] >= 28 && c[2] >= 2)
    });
    service.stop();
    assert_eq!(
        counts(),
        Some([28, 28, 2]),
        "every reading and alert row once"
    );
}

/// A webhook that is down for 30 s gets every notification, in order, once it is
/// back (within its retry budget); a second webhook that never comes back drops them
/// after its short budget, and the drops are counted.
#[test]
fn a_webhook_down_for_30_s_gets_everything_in_order_and_drops_are_counted() {
    let (broker, _, port) = mosquitto_address();
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = format!("wh{}/", free_port());
    let hook_port = free_port();
    let dead_port = free_port();
    let hook_out = tmp.path().join("hook.jsonl");
    let config = write_config(
        tmp.path(),
        "webhook.toml",
        format!(
            r#"
[sources.devices]
type = "mqtt"
url = "mqtt://{broker}"
topics = ["{prefix}devices/+/telemetry"]
qos = 1
client_id = "sluice-webhook-{hook_port}"
stream = "telemetry"
[streams.telemetry]
schema = "telemetry"
[notifiers.hook]
type = "webhook"
url = "http://127.0.0.1:{hook_port}/alerts"
secret_env = "ALERT_SECRET"
retry_for = "5m"
breaker_failures = 3
breaker_cooldown = "2s"
[notifiers.short]
type = "webhook"
url = "http://127.0.0.1:{dead_port}/alerts"
retry_for = "2s"
[alerts.hot]
input = "telemetry"
condition = "temperature > 80"
notify = ["hook", "short"]
"#
        ),
    );
    let dir = tmp.path().join("lake");
    let args = ["--config", config.to_str().expect("utf8")];
    let mut service = Service::start_with_env(&dir, &args, &[("ALERT_SECRET", SECRET)]);
    service.wait_until("the source to subscribe", || service.subscribed("devices"));
    publish_temperatures(
        port,
        &prefix,
        "d1",
        0,
        &[81.0, 70.0, 82.0, 70.0, 83.0, 70.0],
    );
    let expected: Vec<String> = (1..=3)
        .flat_map(|e| [format!("fire hot/d1/{e}"), format!("resolve hot/d1/{e}")])
        .collect();
    let sent = |outcome: &str, notifier: &str| {
        service.metric_sum(
            "sluice_notifications_total",
            &[
                &format!("notifier=\"{notifier}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        )
    };
    wait_for("the short webhook to give up on all six", &service, || {
        sent("dropped_retry_budget", "short") >= 6.0
    });
    std::thread::sleep(Duration::from_secs(28));
    assert!(sent("failed_attempt", "hook") >= 3.0, "the hook was tried");
    assert_eq!(sent("sent", "hook"), 0.0);
    let _receiver = Receiver::start(hook_port, &hook_out);
    wait_for("all six after the webhook is back", &service, || {
        webhook_events(&hook_out).len() >= 6
    });
    assert_eq!(webhook_events(&hook_out), expected, "in order, none lost");
    assert_eq!(
        sent("dropped_retry_budget", "short"),
        6.0,
        "counted exactly"
    );
    assert_eq!(sent("sent", "hook"), 6.0);
    assert_eq!(sent("dropped_retry_budget", "hook"), 0.0);
    service.stop();
    let log = service.log_text();
    assert_eq!(
        log.matches("circuit breaker open").count(),
        2,
        "one breaker per webhook, logged once each:\n{log}"
    );
}

/// A Kafka notifier (read back with confluent-kafka) gets a threshold rule's events
/// and a missing-data rule's: a device silent for 2 s fires `silent`, and resolves
/// when it reports again. Events come in over HTTP ingest.
#[test]
fn kafka_notifier_carries_threshold_and_missing_data_alerts() {
    let broker = kafka();
    let topic = format!("alerts-{}", free_port());
    create_kafka_topic(&broker, &topic, 1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "kafka-alerts.toml",
        format!(
            r#"
[streams.telemetry]
schema = "telemetry"
[notifiers.bus]
type = "kafka"
brokers = "{broker}"
topic = "{topic}"
[alerts.hot]
input = "telemetry"
condition = "temperature > 80"
for = 2
of = 3
severity = "critical"
labels = {{ site = "plant-7" }}
message = "{{device_id}} hot: {{temperature}}"
notify = ["bus"]
[alerts.silent]
input = "telemetry"
missing_after = "2s"
notify = ["bus"]
"#
        ),
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    let ingest = |device: &str, temps: &[f64]| {
        let body: String = temps
            .iter()
            .map(|t| {
                format!("{{\"device_id\":\"{device}\",\"ts\":1767225600000,\"temperature\":{t}}}\n")
            })
            .collect();
        let (status, reply) =
            http_request(&service.http, "POST", "/api/ingest/telemetry", &body).expect("ingest");
        assert_eq!(status, 200, "{reply}");
    };
    // 2 of 3: 81, 70, 82 fires on 82.
    ingest("k1", &[81.0, 70.0, 82.0]);
    // Silent for 2 s or more (the scan runs every second), then back.
    std::thread::sleep(Duration::from_millis(3_500));
    ingest("k1", &[60.0]);
    let read = || -> Vec<Value> {
        let out = run_python(&format!(
            r#"
import json
from confluent_kafka import Consumer
c = Consumer({{"bootstrap.servers": "{broker}", "group.id": "read-{topic}", "auto.offset.reset": "earliest"}})
c.subscribe(["{topic}"])
got, empty = [], 0
while empty < 3:
    m = c.poll(1.0)
    if m is None:
        empty += 1
        continue
    if m.error() is None:
        got.append({{"key": m.key().decode(), "value": json.loads(m.value())}})
c.close()
print(json.dumps(got))
"#
        ));
        serde_json::from_str(out.trim()).expect("consumer output")
    };
    let mut records = Vec::new();
    wait_for("four alert records on Kafka", &service, || {
        records.extend(read());
        records.len() >= 4
    });
    let seq: Vec<String> = records.iter().map(|r| describe(&r["value"])).collect();
    assert_eq!(
        seq[..4],
        strings(&[
            "fire hot/k1/1",
            "fire silent/k1/1",
            "resolve hot/k1/1",
            "resolve silent/k1/1",
        ]),
        "hot fires on the second hit of three; silent fires; the next row resolves both \
         (60 is not > 80), rules in name order"
    );
    // Quiet again after that row: a new silent episode, and nothing else.
    assert!(
        seq[4..].iter().all(|s| s.starts_with("fire silent/k1/")),
        "{seq:?}"
    );
    let hot = &records[0]["value"];
    assert_eq!(records[0]["key"], "k1", "keyed by the alert key");
    assert_eq!(hot["message"], "k1 hot: 82.0");
    assert_eq!(
        (&hot["severity"], &hot["labels"]["site"]),
        (&"critical".into(), &"plant-7".into())
    );
    service.stop();
}
