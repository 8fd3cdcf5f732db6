//! The default windows (`device_minute`, `sessions`, `page_minute`) end to end: telemetry
//! and clicks published through a real broker (the embedded one, and the mosquitto
//! scripts/test.sh started), compared with the same aggregates computed in one batch
//! by SQL over the raw `telemetry` and `clicks` tables.

use std::path::Path;

use crate::support::*;

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const MINUTE: i64 = 60_000;
/// Far enough ahead to close every window and session of the data (gap 30 min).
const SENTINEL: i64 = T0 + 5 * 60 * MINUTE;

/// 3,000 readings from 25 devices over 10 minutes, up to ±2 s out of order, 5% errors,
/// some without a status; then one sentinel reading far ahead.
fn telemetry_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..3_000i64 {
        let jitter = (i * 7_919) % 4_000 - 2_000;
        let ts = T0 + i * 200 + jitter;
        let status = match i {
            _ if i % 20 == 0 => r#","status":"error""#,
            _ if i % 33 == 0 => "",
            _ => r#","status":"ok""#,
        };
        lines.push(format!(
            r#"{{"device_id":"dev-{:02}","ts":{ts},"temperature":{},"humidity":{},"battery":{}{status}}}"#,
            i % 25,
            (i * 37 % 400) as f64 / 10.0,
            (i * 13 % 100) as f64,
            3.0 + (i % 7) as f64 / 10.0,
        ));
    }
    lines.push(sentinel_reading(SENTINEL));
    lines
}

fn sentinel_reading(ts: i64) -> String {
    format!(r#"{{"device_id":"zz-sentinel","ts":{ts},"temperature":0,"status":"ok"}}"#)
}

/// Clicks of 40 users in three bursts each: 45 minutes apart for even users (three
/// sessions), 20 minutes apart for odd ones (one session). In time order.
fn click_lines() -> Vec<String> {
    let mut events = Vec::new();
    for u in 0..40i64 {
        let spacing = if u % 2 == 0 { 45 } else { 20 } * MINUTE;
        for b in 0..3i64 {
            let start = T0 + u * 1_000 + b * spacing;
            let n = 1 + (u + b) % 6;
            for j in 0..n {
                let event = match j {
                    _ if j == n - 1 && (u + b) % 5 == 0 => "purchase",
                    _ if j % 3 == 2 => "click",
                    _ => "page_view",
                };
                let ts = start + j * 20_000;
                events.push((ts, format!(
                    r#"{{"user_id":"u-{u:02}","ts":{ts},"event":"{event}","page":"/p/{}","referrer":"/"}}"#,
                    (u * b + j) % 7
                )));
            }
        }
    }
    events.sort();
    let mut lines: Vec<String> = events.into_iter().map(|(_, l)| l).collect();
    lines.push(format!(
        r#"{{"user_id":"zz-sentinel","ts":{SENTINEL},"event":"page_view","page":"/zz"}}"#
    ));
    lines
}

/// Rows of `sql` (which must return a single `n` column) as a number.
fn count(dir: &Path, sql: &str) -> u64 {
    query_json(dir, sql)[0]["n"].as_u64().expect("n")
}

/// Publishes both workloads through the broker and checks the three window tables.
fn publish_and_verify(service: &Service, port: u16, prefix: &str) {
    service.wait_until("both sources to subscribe", || {
        service.subscribed("devices") && service.subscribed("clicks")
    });
    let telemetry = telemetry_lines();
    let clicks = click_lines();
    mosquitto_pub(
        port,
        &format!("{prefix}devices/all/telemetry"),
        &telemetry,
        &[],
    );
    mosquitto_pub(port, &format!("{prefix}clicks/web"), &clicks, &[]);
    let dir = &service.data_dir;
    // The raw tables too: their first commit may come after the windows' (the
    // counts below would then query a table not there yet).
    let tables = [
        "device_minute",
        "sessions",
        "page_minute",
        "telemetry",
        "clicks",
    ];
    service.wait_until("the windows to land", || {
        tables.iter().all(|t| has_table(dir, t))
            && count(dir, "SELECT count(*) AS n FROM telemetry") == telemetry.len() as u64
            && count(dir, "SELECT count(*) AS n FROM clicks") == clicks.len() as u64
            && windows_match(dir)
    });
    // The sentinels moved each watermark to their time − out-of-orderness (5 s).
    let watermark = service.metric_sum("sluice_window_watermark_ms", &["device_minute"]);
    assert_eq!(watermark as i64, SENTINEL - 5_000);
    assert!(service.metric_sum("sluice_window_state_bytes", &["sessions"]) > 0.0);
}

/// Whether the three window tables equal the batch computation (and are not empty).
fn windows_match(dir: &Path) -> bool {
    let device_minute = count(
        dir,
        "WITH b AS (
            SELECT device_id, date_bin(INTERVAL '1 minute', ts) AS ws, count(*) AS events,
                   min(temperature) AS tmin, max(temperature) AS tmax, avg(temperature) AS tavg,
                   max(humidity) AS hmax, min(battery) AS bmin
            FROM telemetry WHERE (status IS DISTINCT FROM 'error') AND device_id <> 'zz-sentinel'
            GROUP BY 1, 2),
         d AS (SELECT * FROM device_minute WHERE device_id <> 'zz-sentinel')
         SELECT count(*) AS n FROM b FULL OUTER JOIN d
           ON b.device_id = d.device_id AND b.ws = d.window_start
         WHERE b.device_id IS NULL OR d.device_id IS NULL
            OR d.window_end <> b.ws + INTERVAL '1 minute' OR d.version <> 1
            OR b.events <> d.events OR b.tmin <> d.temperature_min OR b.tmax <> d.temperature_max
            OR abs(b.tavg - d.temperature_avg) > 1e-9 OR b.hmax <> d.humidity_max
            OR b.bmin <> d.battery_min
            OR d.temperature_p99 < b.tmin OR d.temperature_p99 > b.tmax",
    );
    let sessions = count(
        dir,
        "WITH o AS (
            SELECT *, CASE WHEN ts - lag(ts) OVER (PARTITION BY user_id ORDER BY ts) < INTERVAL '30 minutes'
                           THEN 0 ELSE 1 END AS new_session
            FROM clicks WHERE user_id <> 'zz-sentinel'),
         n AS (SELECT *, sum(new_session) OVER (PARTITION BY user_id ORDER BY ts ROWS UNBOUNDED PRECEDING) AS sid FROM o),
         b AS (SELECT user_id, min(ts) AS ws, max(ts) AS last, count(*) AS events,
                      count(*) FILTER (WHERE event = 'page_view') AS views,
                      count(DISTINCT page) AS pages, bool_or(event = 'purchase') AS converted
               FROM n GROUP BY user_id, sid),
         s AS (SELECT * FROM sessions WHERE user_id <> 'zz-sentinel')
         SELECT count(*) AS n FROM b FULL OUTER JOIN s ON b.user_id = s.user_id AND b.ws = s.window_start
         WHERE b.user_id IS NULL OR s.user_id IS NULL
            OR s.window_end <> b.last + INTERVAL '30 minutes' OR s.last_event_at <> b.last
            OR s.events <> b.events OR s.page_views <> b.views OR s.distinct_pages <> b.pages
            OR s.converted <> b.converted OR s.bounced <> (b.views = 1)
            OR abs(s.duration_s - (date_part('epoch', b.last) - date_part('epoch', b.ws))) > 1e-6",
    );
    let page_minute = count(
        dir,
        "WITH b AS (
            SELECT page, date_bin(INTERVAL '1 minute', ts) AS ws, count(*) AS views,
                   count(DISTINCT user_id) AS users
            FROM clicks WHERE event = 'page_view' AND page IS NOT NULL AND user_id <> 'zz-sentinel'
            GROUP BY 1, 2),
         p AS (SELECT * FROM page_minute WHERE page <> '/zz')
         SELECT count(*) AS n FROM b FULL OUTER JOIN p ON b.page = p.page AND b.ws = p.window_start
         WHERE b.page IS NULL OR p.page IS NULL OR b.views <> p.views OR b.users <> p.users",
    );
    let sizes = [
        count(dir, "SELECT count(*) AS n FROM device_minute"),
        count(dir, "SELECT count(*) AS n FROM sessions"),
        count(dir, "SELECT count(*) AS n FROM page_minute"),
    ];
    device_minute == 0 && sessions == 0 && page_minute == 0 && sizes.iter().all(|&n| n > 0)
}

/// What a stop leaves: the sentinels' open windows, saved; no late rows.
fn check_saved_state(service: &mut Service) {
    service.stop();
    // The stop's checkpoint: the newest manifest names each window's state file.
    let manifests = service.data_dir.join("_manifests");
    let mut names: Vec<_> = std::fs::read_dir(&manifests)
        .expect("manifests written")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    let newest = names.last().expect("a manifest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(newest).expect("read manifest")).expect("json");
    for w in ["device_minute", "sessions", "page_minute"] {
        let file = manifest["state"][w].as_str().expect("state listed");
        assert!(service.data_dir.join(file).exists(), "{w} state saved");
    }
    assert!(!has_table(&service.data_dir, "late"), "no row was late");
}

#[test]
fn default_windows_through_the_embedded_broker_survive_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &[]);
    let port = service.mqtt_port;
    publish_and_verify(&service, port, "");
    check_saved_state(&mut service);

    // The sentinel's window was open at the stop; the next start restores it, and a
    // later reading closes it.
    let service = Service::start(&dir, &[]);
    service.wait_until("the devices source to subscribe", || {
        service.subscribed("devices")
    });
    mosquitto_pub(
        service.mqtt_port,
        "devices/all/telemetry",
        &[sentinel_reading(SENTINEL + 60 * MINUTE)],
        &[],
    );
    service.wait_until("the restored window to land", || {
        query_json(
            &dir,
            "SELECT events, version FROM device_minute WHERE device_id = 'zz-sentinel'",
        )
        .first()
        .is_some_and(|r| r["events"] == 1 && r["version"] == 1)
    });
}

#[test]
fn default_windows_through_mosquitto() {
    let (broker, _, port) = mosquitto_address();
    let prefix = format!("w{}/", free_port());
    // The shipped default's streams and windows, with sources on the test's mosquitto.
    let default = include_str!("../../config/examples/default.toml");
    // Its alert notifier publishes to the test's mosquitto too (no embedded broker).
    let pipeline = default[default
        .find("[streams.telemetry]")
        .expect("streams section")..]
        .replace("url = \"embedded\"", &format!("url = \"mqtt://{broker}\""));
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "sluice.toml",
        format!(
            r#"
[sources.devices]
type = "mqtt"
url = "mqtt://{broker}"
topics = ["{prefix}devices/+/telemetry"]
client_id = "sluice-w-{hint}"
stream = "telemetry"

[sources.clicks]
type = "mqtt"
url = "mqtt://{broker}"
topics = ["{prefix}clicks/+"]
client_id = "sluice-wc-{hint}"
stream = "clicks"

{pipeline}"#,
            hint = free_port()
        ),
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    publish_and_verify(&service, port, &prefix);
    check_saved_state(&mut service);
}
