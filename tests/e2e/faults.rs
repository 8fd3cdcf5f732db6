//! The service under trouble: kill -9 mid-write, a broker that goes away and comes
//! back, and a TLS broker that wants a password.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::support::*;

fn telemetry_lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"device_id":"{prefix}-{}","ts":{},"temperature":{}}}"#,
                i % 7,
                1_767_225_600_000u64 + i as u64,
                i
            )
        })
        .collect()
}

/// kill -9 while files are being written and committed: no partial or corrupt file is
/// ever visible, staging leftovers are removed at the next start, and the lake stays
/// queryable.
#[test]
fn kill_9_leaves_no_partial_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "crash.toml",
        r#"
[broker]
enabled = true
[lake]
roll_interval = "100ms"
roll_size = "256KB"
[streams.telemetry]
schema = "telemetry"
"#,
    );
    let dir = tmp.path().join("lake");
    let body: String = telemetry_lines("crash", 5_000).join("\n");
    for round in 0..3 {
        // A staging file as a crash inside `put` would leave it.
        let planted = dir.join(format!(
            "telemetry/date=2026-01-01/hour=00/part-planted{round}.parquet#7"
        ));
        if round > 0 {
            std::fs::write(&planted, b"PAR1 half a file").expect("plant staging file");
        }
        let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
        assert!(!planted.exists(), "staging leftovers are deleted at start");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, accepted, http, body) = (
                stop.clone(),
                accepted.clone(),
                service.http.clone(),
                body.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((200, _)) =
                        http_request(&http, "POST", "/api/ingest/telemetry", &body)
                    {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        service.wait_until("some commits", || {
            service.metric_sum(
                "sluice_lake_files_committed_total",
                &["table=\"telemetry\""],
            ) >= 3.0
        });
        std::thread::sleep(Duration::from_millis(150 * (round + 1) as u64));
        service.kill9();
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        assert!(accepted.load(Ordering::Relaxed) > 0);

        // Every file the Delta log names is a complete Parquet file, and other
        // engines reading through the log see what `sluice query` sees.
        let out = run_python(&format!(
            r#"{DUCKDB_DELTA}
import deltalake, pyarrow.parquet as pq
t = deltalake.DeltaTable({table:?})
rows = sum(pq.read_metadata(f).num_rows for f in t.file_uris())
print(rows, t.to_pyarrow_table().num_rows, duck().execute("SELECT count(*) FROM delta_scan('{table}')").fetchall()[0][0])
"#,
            table = dir.join("telemetry").to_string_lossy(),
        ));
        let counts: Vec<u64> = out
            .split_whitespace()
            .map(|n| n.parse().expect("row count"))
            .collect();
        let rows = counts[0];
        assert_eq!(
            counts, [rows; 3],
            "footers, Python deltalake and DuckDB agree"
        );
        let queried = query_json(&dir, "SELECT count(*) AS n FROM telemetry");
        assert_eq!(
            queried[0]["n"].as_u64(),
            Some(rows),
            "sluice query reads exactly the committed files"
        );
        assert!(rows > 0, "committed rows survive the crash");
    }
}

/// The broker goes away and comes back: the outage is logged once, the source
/// reconnects with backoff and resubscribes, and later messages still arrive.
#[test]
fn broker_outage_is_logged_once_and_survived() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut broker = OwnServer::mosquitto(tmp.path(), 0, "allow_anonymous true");
    let config = write_config(
        tmp.path(),
        "outage.toml",
        format!(
            r#"
[sources.devices]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
topics = ["devices/+/telemetry"]
stream = "telemetry"
[streams.telemetry]
schema = "telemetry"
"#,
            broker.port
        ),
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    let subscribed = |s: &Service| s.subscribed("devices");
    let received = |s: &Service| s.received("devices");
    service.wait_until("subscription", || subscribed(&service));
    mosquitto_pub(
        broker.port,
        "devices/a/telemetry",
        &telemetry_lines("before", 100),
        &[],
    );
    service.wait_until("first 100", || received(&service) >= 100.0);

    broker.stop();
    service.wait_until("the outage to be noticed", || !subscribed(&service));
    std::thread::sleep(Duration::from_secs(2)); // several reconnect attempts
    broker.restart();
    service.wait_until("resubscription", || subscribed(&service));
    mosquitto_pub(
        broker.port,
        "devices/b/telemetry",
        &telemetry_lines("after", 100),
        &[],
    );
    service.wait_until("all 200", || received(&service) >= 200.0);
    service.stop();

    let log = service.log_text();
    assert_eq!(
        log.matches("broker connection lost").count(),
        1,
        "one line per outage:\n{log}"
    );
    assert_eq!(log.matches("reconnected to the broker").count(), 1, "{log}");
    let rows = query_json(&dir, "SELECT count(*) AS n FROM telemetry");
    assert_eq!(rows[0]["n"].as_u64(), Some(200));
}

/// mqtts:// with a private CA, and a username/password from the environment; a wrong
/// password is an error naming the cause, not a crash.
#[test]
fn tls_and_password_against_mosquitto() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=sluice-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    let passwd = d.join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args([
            "-c",
            "-b",
            passwd.to_str().expect("utf8"),
            "sluice",
            "s3cret",
        ])
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success());
    let broker = OwnServer::mosquitto(
        d,
        0,
        &format!(
            "allow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}",
            passwd.display(),
            d.join("ca.pem").display(),
            d.join("server.pem").display(),
            d.join("server.key").display()
        ),
    );
    let config = write_config(
        d,
        "tls.toml",
        format!(
            r#"
[sources.devices]
type = "mqtt"
url = "mqtts://127.0.0.1:{port}"
topics = ["devices/+/telemetry"]
stream = "telemetry"
username = "sluice"
password_env = "SLUICE_TEST_MQTT_PASSWORD"
ca_file = "{ca}"
[streams.telemetry]
schema = "telemetry"
"#,
            port = broker.port,
            ca = d.join("ca.pem").display()
        ),
    );
    let cfg = config.to_str().expect("utf8");

    // Wrong password: the service stays up and says why, once.
    let mut wrong = Service::start_with_env(
        &d.join("lake-wrong"),
        &["--config", cfg],
        &[("SLUICE_TEST_MQTT_PASSWORD", "nope")],
    );
    wrong.wait_until("the refusal to be logged", || {
        wrong.log_text().contains("check username/password")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        wrong.log_text().matches("check username/password").count(),
        1
    );
    wrong.stop();

    let dir = d.join("lake");
    let mut service = Service::start_with_env(
        &dir,
        &["--config", cfg],
        &[("SLUICE_TEST_MQTT_PASSWORD", "s3cret")],
    );
    service.wait_until("subscription over TLS", || service.subscribed("devices"));
    let ca = d.join("ca.pem");
    mosquitto_pub(
        broker.port,
        "devices/tls/telemetry",
        &telemetry_lines("tls", 50),
        &[
            "--cafile",
            ca.to_str().expect("utf8"),
            "-u",
            "sluice",
            "-P",
            "s3cret",
        ],
    );
    service.wait_until("50 messages", || service.received("devices") >= 50.0);
    service.stop();
    assert!(
        !service.log_text().contains("s3cret"),
        "the password is never logged"
    );
    let rows = query_json(&dir, "SELECT count(*) AS n FROM telemetry");
    assert_eq!(rows[0]["n"].as_u64(), Some(50));
}

/// A self-join of three copies of 3,000 rows: 27 billion combinations, hours of work.
const ENDLESS_QUERY: &str = r#"{"sql": "SELECT count(*) AS n FROM telemetry a, telemetry b, telemetry c WHERE a.temperature + b.temperature > c.temperature"}"#;

/// The embedded default config with the values of `settings` (`key`, value as TOML)
/// in place of the default's, written to `dir`.
fn default_config_with(dir: &std::path::Path, settings: &[(&str, &str)]) -> std::path::PathBuf {
    let default = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/default.toml"),
    )
    .expect("default config");
    let text: Vec<String> = default
        .lines()
        .map(|line| {
            let key = line.split('=').next().unwrap_or_default().trim();
            match settings.iter().find(|(k, _)| *k == key) {
                Some((k, v)) => format!("{k} = {v}"),
                None => line.to_owned(),
            }
        })
        .collect();
    for (key, _) in settings {
        assert!(
            default.contains(&format!("\n{key} =")),
            "the default config sets {key}"
        );
    }
    write_config(dir, "settings.toml", text.join("\n"))
}

/// `sluice run` with the embedded default config and `limits` (see
/// [`default_config_with`]), and 3,000 telemetry rows queryable.
fn service_with_query_limits(dir: &std::path::Path, limits: &[(&str, &str)]) -> Service {
    let config = default_config_with(dir, limits);
    let service = Service::start(
        &dir.join("lake"),
        &["--config", config.to_str().expect("utf8")],
    );
    let lines = telemetry_lines("q", 3_000).join("\n");
    let (status, body) =
        http_request(&service.http, "POST", "/api/ingest/telemetry", &lines).expect("ingest");
    assert_eq!(status, 200, "{body}");
    let count = r#"{"sql": "SELECT count(*) AS n FROM telemetry"}"#;
    service.wait_until("the rows to be queryable", || {
        http_request(&service.http, "POST", "/api/query", count)
            .is_some_and(|(s, b)| s == 200 && b.contains("3000"))
    });
    service
}

/// A query ends when its client goes away, at `[http] query_timeout`, and at shutdown:
/// a client that gives up on a huge join leaves nothing running behind it, a query past
/// the limit gets 504 with the reason, and SIGTERM during a query stops the service
/// cleanly (the query's client gets 503) instead of the server waiting for the query.
#[test]
fn a_query_ends_when_its_client_leaves_at_its_time_limit_and_at_shutdown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // No join cap: the endless join must run to be cancelled.
    let limits = [("query_timeout", r#""5s""#), ("query_max_join_pairs", "0")];
    let mut service = service_with_query_limits(tmp.path(), &limits);
    let running = |s: &Service| s.metric_sum("sluice_queries_running", &[]);
    let timeouts = |s: &Service| s.metric_sum("sluice_query_timeouts_total", &[]);

    // The client goes away: the query is cancelled (not left to hit the time limit).
    let mut client = std::net::TcpStream::connect(&service.http).expect("connect");
    let request = format!(
        "POST /api/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{ENDLESS_QUERY}",
        ENDLESS_QUERY.len()
    );
    std::io::Write::write_all(&mut client, request.as_bytes()).expect("send");
    service.wait_until("the query to run", || running(&service) == 1.0);
    drop(client);
    service.wait_until("the query to end with its client", || {
        running(&service) == 0.0
    });
    assert_eq!(
        timeouts(&service),
        0.0,
        "cancelled by the disconnect, not the limit"
    );

    // Past the limit: 504 and why.
    let (status, body) =
        http_request(&service.http, "POST", "/api/query", ENDLESS_QUERY).expect("answer");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("query_timeout (5s)"), "{body}");
    assert_eq!(timeouts(&service), 1.0);
    assert_eq!(running(&service), 0.0);

    // SIGTERM during a query: the query is cancelled and the service stops cleanly.
    let http = service.http.clone();
    let client =
        std::thread::spawn(move || http_request(&http, "POST", "/api/query", ENDLESS_QUERY));
    service.wait_until("the query to run", || running(&service) == 1.0);
    service.stop();
    let (code, body) = client.join().expect("client").expect("an answer");
    assert_eq!(code, 503, "{body}");
    let log = service.log_text();
    assert!(log.contains("stopped cleanly"), "{log}");
}

/// A device publishes a QoS 1 message larger than the embedded broker's
/// `max_payload_size` between ordinary ones, on one connection. The message is
/// acknowledged and lands in `dead_letter` as `oversized` with its size and first
/// bytes, and every message after it lands: the device is not disconnected and does
/// not resend it forever (rumqttd alone drops the connection unacknowledged).
#[test]
fn an_oversized_mqtt_message_is_dead_lettered_and_the_device_goes_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lake");
    let service = Service::start(&dir, &[]);
    service.wait_until("the source to subscribe", || service.subscribed("devices"));
    let topic = "devices/big/telemetry".to_owned();
    let line = |i: usize| {
        format!(
            r#"{{"device_id":"big","ts":{},"temperature":{i}}}"#,
            1_767_225_600_000u64 + i as u64
        )
    };
    // 300 KB: over the broker's 256 KB, not just the decoder's 64 KB.
    let big = format!(
        r#"{{"device_id":"big","ts":1767225600500,"note":"{}"}}"#,
        "x".repeat(300_000)
    );
    let big_size = big.len() as u64;
    let messages: Vec<(String, String)> = (0..10)
        .map(line)
        .chain(std::iter::once(big))
        .chain((10..20).map(line))
        .map(|p| (topic.clone(), p))
        .collect();
    let publisher = spawn_mqtt_publisher(service.mqtt_port, "big-device", 21, messages.into_iter());
    // Without the door's trimming the device reconnects and resends forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !publisher.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never got its 21 acknowledgements; log:\n{}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked = publisher.join().expect("publisher");
    assert_eq!(
        acked, 21,
        "every message acknowledged, the oversized one too"
    );
    service.wait_until("the 20 ordinary messages and the dead letter", || {
        has_table(&dir, "dead_letter")
            && query_json(&dir, "SELECT count(*) AS n FROM telemetry")[0]["n"] == 20
    });
    let dead = query_json(
        &dir,
        "SELECT reason, detail, payload_size, length(payload) AS kept FROM dead_letter",
    );
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "oversized");
    assert_eq!(dead[0]["payload_size"], big_size);
    assert_eq!(dead[0]["kept"], 1024);
    let detail = dead[0]["detail"].as_str().expect("detail");
    assert!(
        detail.contains(&format!("message of {big_size} bytes")),
        "{detail}"
    );
    assert_eq!(
        service.metric_sum("sluice_broker_oversized_total", &[]),
        1.0
    );
}

/// Queries over `[http]` limits end with a clear error and the service goes on: a
/// result over `query_max_rows` gets 413, a join that needs more than `query_memory`
/// gets 413, a join without equal keys past `query_max_join_pairs` gets 413 before it
/// runs, and a query beyond `query_concurrency` gets 429 with `Retry-After`.
#[test]
fn queries_over_their_limits_end_with_413_or_429_and_the_service_goes_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let service = service_with_query_limits(
        tmp.path(),
        &[
            ("query_max_rows", "1000"),
            ("query_memory", r#""1MB""#),
            ("query_concurrency", "1"),
            ("query_timeout", r#""60s""#),
            // Over the endless query's 3,000 × 3,000 × 3,000, under four tables'.
            ("query_max_join_pairs", "100000000000"),
        ],
    );
    let ask = |sql: &str| {
        let body = serde_json::json!({ "sql": sql }).to_string();
        http_exchange(&service.http, "POST", "/api/query", &body).expect("an answer")
    };
    let (status, _, body) = ask("SELECT * FROM telemetry");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("more than 1000 rows"), "{body}");
    // 3,000 × 3,000 pairs grouped by both times: the hash table outgrows 1 MB.
    let (status, _, body) =
        ask("SELECT a.ts, b.ts, count(*) AS n FROM telemetry a, telemetry b GROUP BY 1, 2");
    assert_eq!(status, 413, "{body}");
    assert!(
        body.to_lowercase().contains("resources exhausted"),
        "{body}"
    );
    let (status, _, body) = ask(
        "SELECT count(*) AS n FROM telemetry a, telemetry b, telemetry c, telemetry d \
         WHERE a.temperature + b.temperature > c.temperature + d.temperature",
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("query_max_join_pairs"), "{body}");
    // One query at a time: a second one while the first runs is refused.
    let http = service.http.clone();
    let first = std::thread::spawn(move || {
        http_request(&http, "POST", "/api/query", ENDLESS_QUERY).map(|(s, _)| s)
    });
    service.wait_until("the first query to run", || {
        service.metric_sum("sluice_queries_running", &[]) == 1.0
    });
    let (status, head, body) = ask("SELECT count(*) AS n FROM telemetry");
    assert_eq!(status, 429, "{body}");
    assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
    // The first one ends with the service, which stops cleanly.
    let mut service = service;
    service.stop();
    assert_eq!(first.join().expect("client"), Some(503));
}

/// An MQTT 3.1.1 connection through the door as client `id`, once it has its CONNACK;
/// `None` if the door closed it instead.
fn mqtt_connect(door: &str, id: &str) -> Option<std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(door).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    stream.write_all(&packet).ok()?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).ok()?;
    (connack == [0x20, 2, 0, 0]).then_some(stream)
}

/// Whether the door closed `stream` (EOF on read) rather than keeping it open.
fn closed_by_door(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0))
}

/// The embedded broker's door closes a connection that sends no CONNECT within
/// `connect_timeout` (a silent or slow client cannot hold a slot), and connections from
/// one address past `max_connections_per_address`; each refusal is counted and logged
/// once a minute per address, and a slot freed is taken again.
#[test]
fn the_broker_door_closes_silent_clients_and_caps_connections_per_address() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = default_config_with(
        tmp.path(),
        &[
            ("connect_timeout", r#""1s""#),
            ("max_connections_per_address", "3"),
        ],
    );
    let args = ["--config", config.to_str().expect("utf8")];
    let service = Service::start(&tmp.path().join("lake"), &args);
    let door = format!("127.0.0.1:{}", service.mqtt_port);
    let refused = |reason: &str| service.metric_sum("sluice_broker_refused_total", &[reason]);

    let mut silent = std::net::TcpStream::connect(&door).expect("connect");
    assert!(closed_by_door(&mut silent), "a silent client is closed");
    // Bytes that never make a whole CONNECT: closed as well.
    let mut slow = std::net::TcpStream::connect(&door).expect("connect");
    std::io::Write::write_all(&mut slow, &[0x10, 0x20, 0]).expect("send");
    assert!(
        closed_by_door(&mut slow),
        "a client stuck inside its CONNECT is closed"
    );
    // The door closes the connection, then counts it: wait for the count.
    service.wait_until("both refusals to be counted", || {
        refused("connect_timeout") == 2.0
    });

    let mut clients: Vec<_> = (0..3)
        .map(|i| mqtt_connect(&door, &format!("door-{i}")).expect("accepted"))
        .collect();
    let mut fourth = std::net::TcpStream::connect(&door).expect("connect");
    assert!(
        closed_by_door(&mut fourth),
        "a fourth connection from one address is closed"
    );
    service.wait_until("the refusal to be counted", || {
        refused("per_address") == 1.0
    });
    drop(clients.pop());
    service.wait_until("the freed slot to be taken again", || {
        mqtt_connect(&door, "door-again").is_some()
    });
    let log = service.log_text();
    let logged = log.matches("reason=\"connect_timeout\"").count();
    assert_eq!(logged, 1, "logged once a minute per address:\n{log}");
}

/// With `[[http.tokens]]` configured, every endpoint but `/health` and `/` wants a
/// bearer token with its scope: none or a wrong one gets 401, one without the scope
/// 403, each with a JSON error; the right one passes. Tokens come from `sluice token`;
/// one kept in `tokens_file` is revoked by editing the file; a malformed entry is
/// refused by `sluice check`, naming its key.
#[test]
fn api_tokens_with_scopes_guard_every_endpoint_but_health() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (reader, reader_entry) = new_token("reader", &["query"]);
    let (device, device_entry) = new_token("device", &["ingest:telemetry"]);
    let (admin, admin_entry) = new_token("ops", &["admin"]);
    let base = std::fs::read_to_string(default_config_with(tmp.path(), &[])).expect("config");
    // The admin token is kept in a tokens file of its own.
    let tokens_file = tmp.path().join("api-tokens.toml");
    std::fs::write(
        &tokens_file,
        admin_entry.replace("[[http.tokens]]", "[[tokens]]"),
    )
    .expect("tokens file");
    let with_file = base.replacen(
        "[http]\n",
        &format!(
            "[http]\ntokens_file = {:?}\n",
            tokens_file.display().to_string()
        ),
        1,
    );
    let config = write_config(
        tmp.path(),
        "tokens.toml",
        format!("{with_file}\n{reader_entry}\n{device_entry}"),
    );
    let service = Service::start(
        &tmp.path().join("lake"),
        &["--config", config.to_str().expect("utf8")],
    );
    let call = |method: &str, path: &str, body: &str, token: Option<&str>| {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let (status, head, body) =
            http_exchange_with(&service.http, method, path, &auth, body).expect("an answer");
        (status, head + &body)
    };
    let query = r#"{"sql": "SELECT 1 AS n"}"#;
    let line = r#"{"device_id":"t","ts":1767225600000,"temperature":1}"#;
    assert_eq!(call("GET", "/health", "", None).0, 200, "health stays open");
    let (status, raw) = call("POST", "/api/query", query, None);
    assert_eq!(status, 401, "{raw}");
    assert!(raw.contains("Authorization: Bearer"), "{raw}");
    assert_eq!(call("POST", "/api/query", query, Some("slc_wrong")).0, 401);
    let (status, raw) = call("POST", "/api/query", query, Some(&device));
    assert_eq!(status, 403, "{raw}");
    assert!(
        raw.contains(r#"token \"device\" lacks the scope \"query\""#),
        "{raw}"
    );
    assert_eq!(call("POST", "/api/query", query, Some(&reader)).0, 200);
    assert_eq!(
        call("POST", "/api/ingest/telemetry", line, Some(&reader)).0,
        403
    );
    assert_eq!(
        call("POST", "/api/ingest/clicks", line, Some(&device)).0,
        403
    );
    assert_eq!(
        call("POST", "/api/ingest/telemetry", line, Some(&device)).0,
        200
    );
    assert_eq!(call("GET", "/metrics", "", Some(&reader)).0, 403);
    assert_eq!(call("GET", "/metrics", "", Some(&admin)).0, 200);
    assert_eq!(call("POST", "/api/query", query, Some(&admin)).0, 200);
    // Revoked by editing the tokens file: refused within a second or two, no restart.
    std::fs::write(&tokens_file, "").expect("tokens file");
    service.wait_until("the revoked token to be refused", || {
        call("GET", "/metrics", "", Some(&admin)).0 == 401
    });
    assert_eq!(call("POST", "/api/query", query, Some(&reader)).0, 200);

    let bad = write_config(
        tmp.path(),
        "bad.toml",
        format!("{base}\n[[http.tokens]]\nname = \"x\"\nsha256 = \"abc\"\nscopes = [\"write\"]\n"),
    );
    let out = sluice(&["check", "--config", bad.to_str().expect("utf8")]);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("http.tokens[0].sha256"), "{text}");
    assert!(text.contains("http.tokens[0].scopes"), "{text}");
}

/// `sluice run` on a public address refuses to start while nothing authenticates
/// callers: the API without tokens, the embedded broker (no device authentication
/// yet) without `allow_anonymous`. Each problem names its key.
#[test]
fn sluice_run_refuses_a_public_address_without_authentication() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("lake");
    let out = sluice(&[
        "run",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--http-listen",
        &format!("0.0.0.0:{}", free_port()),
        "--mqtt-listen",
        &format!("0.0.0.0:{}", free_port()),
    ]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("http.listen") && text.contains("sluice token"),
        "{text}"
    );
    assert!(
        text.contains("broker.listen") && text.contains("allow_anonymous"),
        "{text}"
    );
}
