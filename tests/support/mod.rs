//! Helpers for the end-to-end tests: free ports, the `sluice` process, a tiny HTTP
//! client, metrics scraping, and the real services `scripts/test.sh` started.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nobody is listening on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// The external mosquitto started by scripts/test.sh, as `host:port`.
pub fn mosquitto() -> String {
    std::env::var("SLUICE_TEST_MOSQUITTO")
        .expect("SLUICE_TEST_MOSQUITTO is not set: run the tests through ./scripts/test.sh, which starts mosquitto")
}

/// The external mosquitto's `host:port`, host and port.
pub fn mosquitto_address() -> (String, String, u16) {
    let broker = mosquitto();
    let (host, port) = broker.rsplit_once(':').expect("host:port");
    let port = port.parse().expect("port");
    (broker.clone(), host.to_owned(), port)
}

/// The Kafka-protocol broker (tansu) started by scripts/test.sh, as `host:port`.
pub fn kafka() -> String {
    std::env::var("SLUICE_TEST_KAFKA").expect(
        "SLUICE_TEST_KAFKA is not set: run the tests through ./scripts/test.sh, which starts tansu",
    )
}

/// The Kinesis (and S3) server (moto) started by scripts/test.sh, as a URL.
pub fn kinesis_endpoint() -> String {
    std::env::var("SLUICE_TEST_KINESIS")
        .expect("SLUICE_TEST_KINESIS is not set: run the tests through ./scripts/test.sh, which starts moto")
}

/// The Python with duckdb and pyarrow installed by scripts/test.sh.
pub fn python() -> String {
    std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON is not set: run the tests through ./scripts/test.sh, which installs duckdb and pyarrow")
}

/// The load tester built beside `sluice` (`cargo nextest run --workspace` builds both).
pub fn loadtest_bin() -> PathBuf {
    let bin = Path::new(sluice_bin())
        .with_file_name(format!("sluice-loadtest{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo build --workspace)",
        bin.display()
    );
    bin
}

pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// A child process killed (and reaped) when dropped: a helper a test starts, gone
/// even when the test fails first.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `sluice run`, killed on drop if the test did not stop it.
pub struct Service {
    pub child: Option<Child>,
    pub http: String,
    pub mqtt_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Service {
    /// Starts `sluice run` with the given extra args on free ports and waits for /health.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Service {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// As [`Service::start`], with extra environment variables.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Service {
        Self::start_logged(data_dir, data_dir.with_extension("log"), extra, env)
    }

    /// As [`Service::start_with_env`], logging to `log` (for a lake that is not a
    /// local path, such as `s3://bucket/prefix`).
    pub fn start_logged(
        data_dir: &Path,
        log: PathBuf,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Service {
        let service = Self::spawn_logged(data_dir, log, extra, env);
        service.wait_until("health", || service.healthy());
        service
    }

    /// `sluice run --config <config>` on the lake at `lake` (an `s3://` URL on the
    /// test S3 server, which `config` names), with the server's credentials in the
    /// environment, logging to `log`; returns once it is up.
    pub fn start_on_s3(lake: &str, log: PathBuf, config: &Path) -> Service {
        let service = Self::spawn_on_s3(lake, log, config);
        service.wait_until("health", || service.healthy());
        service
    }

    /// As [`Service::start_on_s3`], without waiting for it to be up.
    pub fn spawn_on_s3(lake: &str, log: PathBuf, config: &Path) -> Service {
        let (_, key, secret) = s3();
        let args = ["--config", config.to_str().expect("utf8")];
        let env = [
            ("AWS_ACCESS_KEY_ID", key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ];
        Self::spawn_logged(Path::new(lake), log, &args, &env)
    }

    /// Whether `/health` answers ok.
    pub fn healthy(&self) -> bool {
        http_get(&self.http, "/health").is_some_and(|b| b.contains("ok"))
    }

    /// As [`Service::start_logged`], without waiting for it to be up.
    pub fn spawn_logged(
        data_dir: &Path,
        log: PathBuf,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Service {
        let http_port = free_port();
        let mqtt_port = free_port();
        let http = format!("127.0.0.1:{http_port}");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(sluice_bin());
        command
            .arg("run")
            .arg("--data-dir")
            .arg(lake_url(data_dir))
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{mqtt_port}"))
            .arg("--http-listen")
            .arg(&http)
            .args(extra)
            .env("SLUICE_LOG", "info")
            .envs(env.iter().copied())
            .envs(s3_credentials(&lake_url(data_dir)))
            .stdout(Stdio::null())
            .stderr(log_file);
        // A lake on S3 keeps its local files (the MQTT write-ahead log) under
        // `./sluice-local`: beside the log, in the test's own directory.
        if (data_dir.starts_with("s3:") || lakes_on_s3())
            && let Some(dir) = log.parent()
        {
            command.current_dir(dir);
        }
        let child = command.spawn().expect("spawn sluice");
        Service {
            child: Some(child),
            http,
            mqtt_port,
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    /// Waits (bounded) until `ready` holds; panics with the service log otherwise.
    pub fn wait_until(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Current value of every `sluice_*` metric series, keyed by the full series text.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        parse_metrics(&http_get(&self.http, "/metrics").unwrap_or_default())
    }

    /// `sluice_limit_events_total` of one limit (`source`, `per_key`, `function`,
    /// `sink`) and outcome (`allowed`, `shed`, `blocked`), summed over components.
    pub fn limit_events(&self, limit: &str, outcome: &str) -> u64 {
        self.metric_sum(
            "sluice_limit_events_total",
            &[
                &format!("limit=\"{limit}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        ) as u64
    }

    /// Sum of a metric over series whose labels contain every `filter` fragment.
    pub fn metric_sum(&self, name: &str, filter: &[&str]) -> f64 {
        self.metrics()
            .iter()
            .filter(|(k, _)| {
                k.split('{').next() == Some(name) && filter.iter().all(|f| k.contains(f))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The process's resident memory now (Linux `/proc`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Kills the process with SIGKILL (a crash) and waits for it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("still running");
        child.kill().expect("kill -9");
        child.wait().expect("wait");
    }

    /// Whether source `component` has its subscriptions confirmed by the broker.
    pub fn subscribed(&self, component: &str) -> bool {
        self.metric_sum(
            "sluice_source_subscribed",
            &[&format!("component=\"{component}\"")],
        ) >= 1.0
    }

    /// Messages source `component` has received (decoded or dead-lettered).
    pub fn received(&self, component: &str) -> f64 {
        self.metric_sum(
            "sluice_source_events_received_total",
            &[&format!("component=\"{component}\"")],
        )
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`…) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("still running").id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// Waits up to `within` for the process to exit on its own; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("still running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sluice did not exit within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and asserts a clean exit, showing the status and the log if not.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "sluice exited with {status} after SIGTERM; log:\n{}",
            self.log_text()
        );
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("still running");
        let pid = child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit after SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("sluice_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// GET over a fresh connection; the body, or None if the server is not there yet.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    http_request(addr, "GET", path, "").map(|(_, body)| body)
}

/// A minimal HTTP/1.1 request (Connection: close); (status, body).
pub fn http_request(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    http_exchange(addr, method, path, body).map(|(status, _, body)| (status, body))
}

/// As [`http_request`], with the response head (status line and headers) too.
pub fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String, String)> {
    http_exchange_with(addr, method, path, "", body)
}

/// As [`http_exchange`], with extra request header lines (each ending in `\r\n`).
pub fn http_exchange_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<(u16, String, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, head.to_owned(), body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Runs `sluice query --format json` and parses the rows.
pub fn query_json(data_dir: &Path, sql: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let lake = lake_url(data_dir);
    let mut args = vec!["query", "--data-dir", &lake, "--format", "json"];
    let config = lake.starts_with("s3:").then(s3_query_config);
    if let Some(config) = &config {
        args.extend(["--config", config.to_str().expect("utf8 path")]);
    }
    args.push(sql);
    let out = sluice(&args);
    assert_ran(&out, &format!("query {sql:?}"));
    serde_json::from_slice(&out.stdout).expect("json rows")
}

/// Creates `topic` on the Kafka-protocol broker (tansu has no auto-create).
pub fn create_kafka_topic(broker: &str, topic: &str, partitions: u32) {
    run_python(&format!(
        r#"
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({{"bootstrap.servers": "{broker}"}})
for f in a.create_topics([NewTopic("{topic}", num_partitions={partitions}, replication_factor=1)]).values():
    f.result(30)
"#
    ));
}

/// Writes a config file `name` into `dir`; its path.
pub fn write_config(dir: &Path, name: &str, text: impl AsRef<str>) -> PathBuf {
    let path = dir.join(name);
    let mut text = text.as_ref().to_owned();
    if lakes_on_s3() && !text.contains("[lake.s3]") {
        text.push_str(&s3_lake_section());
    }
    std::fs::write(&path, text).expect("write config");
    path
}

/// Panics with the command's stderr unless it succeeded.
pub fn assert_ran(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sluice token`'s printed token and config entry.
pub fn new_token(name: &str, scopes: &[&str]) -> (String, String) {
    let mut args = vec!["token", "--name", name];
    for scope in scopes {
        args.extend(["--scope", scope]);
    }
    let out = sluice(&args);
    assert_ran(&out, "sluice token");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("a token line")
        .to_owned();
    let entry = text[text.find("[[http.tokens]]").expect("an entry")..].to_owned();
    assert!(
        !entry.contains(&token),
        "the config entry holds the hash, not the token"
    );
    (token, entry)
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert_ran(&out, &format!("openssl {args:?}"));
}

pub fn sluice(args: &[&str]) -> Output {
    Command::new(sluice_bin())
        .args(args)
        .envs(s3_credentials(
            args.iter()
                .position(|a| *a == "--data-dir")
                .and_then(|i| args.get(i + 1))
                .copied()
                .unwrap_or_default(),
        ))
        .output()
        .expect("run sluice")
}

/// `SLUICE_TEST_LAKE=s3`: the lakes tests name by a local directory live on the test
/// S3 server instead (see [`lake_url`]); for running the crash tests against S3:
/// `SLUICE_TEST_LAKE=s3 ./scripts/test.sh -E 'test(exactly_once::)'`.
pub fn lakes_on_s3() -> bool {
    std::env::var("SLUICE_TEST_LAKE").is_ok_and(|v| v == "s3")
}

/// The `--data-dir` for a test's lake at `dir`: `dir` itself, or with
/// [`lakes_on_s3`] a prefix named after it in one bucket of the test S3 server. A
/// `s3://` URL passes through.
pub fn lake_url(dir: &Path) -> String {
    let text = dir.to_str().expect("utf8 path");
    if !lakes_on_s3() || text.starts_with("s3:") {
        return text.to_owned();
    }
    static BUCKET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let bucket = BUCKET.get_or_init(|| {
        let bucket = create_bucket("lakes");
        eprintln!("SLUICE_TEST_LAKE=s3: lakes in s3://{bucket}/");
        bucket
    });
    format!("s3://{bucket}/{}", text.trim_start_matches('/'))
}

/// The test S3 server's credentials for a `sluice` process of the lake `lake`, when it
/// or every test's lake is on S3.
fn s3_credentials(lake: &str) -> Vec<(&'static str, String)> {
    if !lakes_on_s3() && !lake.starts_with("s3:") {
        return Vec::new();
    }
    let (_, key, secret) = s3();
    vec![
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
    ]
}

/// The `[lake.s3]` section for the S3 server at `endpoint` (path style, plain HTTP).
pub fn s3_section(endpoint: &str) -> String {
    format!("\n[lake.s3]\nendpoint = {endpoint:?}\npath_style = true\nallow_http = true\n")
}

/// `sluice query` against a lake on the test S3 server (its config names the endpoint;
/// the credentials come from the environment, as the AWS chain reads them).
/// `None` while the query fails (a table not created yet).
pub fn s3_query(
    config: &Path,
    lake: &str,
    sql: &str,
) -> Option<Vec<serde_json::Map<String, serde_json::Value>>> {
    let (_, key, secret) = s3();
    let out = Command::new(sluice_bin())
        .args(["query", "--config", config.to_str().expect("utf8")])
        .args(["--data-dir", lake, "--format", "json", sql])
        .env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .output()
        .expect("run sluice query");
    if !out.status.success() {
        eprintln!("query {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The `[lake.s3]` section for the test S3 server.
pub fn s3_lake_section() -> String {
    s3_section(&s3().0)
}

/// A config holding only [`s3_lake_section`], for `sluice query`.
fn s3_query_config() -> PathBuf {
    static CONFIG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let path =
                std::env::temp_dir().join(format!("sluice-s3-query-{}.toml", std::process::id()));
            std::fs::write(&path, s3_lake_section()).expect("write the S3 query config");
            path
        })
        .clone()
}

/// Runs Python code with the test virtualenv; returns stdout.
///
/// A script that gets to its end leaves with `os._exit(0)` instead of the interpreter's
/// teardown: DuckDB with the Delta extension loaded sometimes aborts there
/// ("terminate called without an active exception", once in about ten runs) after
/// every result was printed. A script that raises still fails as usual.
pub fn run_python(code: &str) -> String {
    let code =
        format!("{code}\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_os._exit(0)\n");
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// Python that defines `duck()`: a DuckDB connection with the Delta extension loaded
/// from its PyPI package (scripts/test.sh installs it; DuckDB cannot download here).
pub const DUCKDB_DELTA: &str = r#"
import duckdb, os, duckdb_extension_delta
def duck():
    con = duckdb.connect()
    ext = os.path.join(os.path.dirname(duckdb_extension_delta.__file__), "extensions", "v" + duckdb.__version__, "delta.duckdb_extension")
    con.load_extension(ext)
    return con
"#;

/// A table's directory replaced by a file, as a store that refuses every write and
/// read of that table; [`BrokenTable::fix`] puts it back.
#[derive(Debug)]
pub struct BrokenTable {
    dir: PathBuf,
    aside: PathBuf,
}

impl BrokenTable {
    /// Breaks `table` of the lake at `lake`.
    pub fn new(lake: &Path, table: &str) -> Self {
        let dir = lake.join(table);
        let aside = lake.join(format!("{table}-aside"));
        std::fs::rename(&dir, &aside).expect("move the table aside");
        std::fs::write(&dir, b"not a directory").expect("plant a file");
        Self { dir, aside }
    }

    /// The store comes back.
    pub fn fix(self) {
        std::fs::remove_file(&self.dir).expect("remove the file");
        std::fs::rename(&self.aside, &self.dir).expect("restore the table");
    }
}

/// The S3 server scripts/test.sh started (SeaweedFS): endpoint, access key, secret.
pub fn s3() -> (String, String, String) {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: run the tests through ./scripts/test.sh, which starts SeaweedFS"
            )
        })
    };
    (
        var("SLUICE_TEST_S3"),
        var("SLUICE_TEST_S3_KEY"),
        var("SLUICE_TEST_S3_SECRET"),
    )
}

/// Creates a bucket of its own on the test S3 server; returns its name.
pub fn create_bucket(hint: &str) -> String {
    create_bucket_at(&s3().0, hint)
}

/// Creates a bucket of its own on the S3 server at `endpoint` (retrying for up to 30 s
/// while a server that just started answers with errors); returns its name.
pub fn create_bucket_at(endpoint: &str, hint: &str) -> String {
    let (_, key, secret) = s3();
    let bucket = format!("{hint}-{}-{}", std::process::id(), free_port());
    run_python(&format!(
        "import boto3, time
s3 = boto3.client('s3', endpoint_url={endpoint:?}, region_name='us-east-1', aws_access_key_id={key:?}, aws_secret_access_key={secret:?})
for attempt in range(150):
    try:
        s3.create_bucket(Bucket={bucket:?})
        break
    except Exception:
        if attempt == 149:
            raise
        time.sleep(0.2)"
    ));
    bucket
}

/// Whether `table` is a Delta table of the lake at `dir` (it can be queried).
pub fn has_table(dir: &Path, table: &str) -> bool {
    let lake = lake_url(dir);
    if lake.starts_with("s3:") {
        let config = s3_query_config();
        let sql = format!("SELECT 1 AS one FROM {table} LIMIT 0");
        let args = [
            "query",
            "--data-dir",
            &lake,
            "--config",
            config.to_str().expect("utf8"),
            &sql,
        ];
        return sluice(&args).status.success();
    }
    dir.join(table)
        .join("_delta_log")
        .join(format!("{:020}.json", 0))
        .exists()
}

/// Every lake file under `dir`, recursively (not the checkpoint directories `_*`).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                // `_state`, `_staging` and `_manifests` are not part of the lake.
                if !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('_'))
                {
                    dirs.push(p);
                }
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A server process of the test's own (for tests that stop, kill or reconfigure a
/// broker), restartable on the same port with the same command. Killed on drop.
pub struct OwnServer {
    pub port: u16,
    name: &'static str,
    command: Box<dyn Fn(u16) -> Command>,
    child: Option<Child>,
}

impl OwnServer {
    /// Starts `command(port)` on `port` (0 = a free one) and waits until it listens.
    pub fn start(
        name: &'static str,
        port: u16,
        command: impl Fn(u16) -> Command + 'static,
    ) -> Self {
        let mut server = OwnServer {
            port: if port == 0 { free_port() } else { port },
            name,
            command: Box::new(command),
            child: None,
        };
        server.restart();
        server
    }

    /// A mosquitto from the binary scripts/test.sh installed, with `extra` config lines.
    pub fn mosquitto(dir: &Path, port: u16, extra: &str) -> Self {
        let dir = dir.to_path_buf();
        let extra = extra.to_string();
        OwnServer::start("mosquitto", port, move |port| {
            let conf = dir.join(format!("mosquitto-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 1000\nuser root\n{extra}\n"
                ),
            )
            .expect("write mosquitto.conf");
            let bin = ["/usr/sbin/mosquitto", "mosquitto"]
                .into_iter()
                .find(|b| Path::new(b).exists() || *b == "mosquitto")
                .expect("mosquitto");
            let mut command = Command::new(bin);
            command.arg("-c").arg(conf);
            command
        })
    }

    /// A tansu with SQLite storage in `dir`, so a killed broker restarts with its log
    /// (and its users); with `authentication`, clients must authenticate (SASL SCRAM).
    pub fn tansu(dir: &Path, authentication: bool) -> Self {
        Self::tansu_advertising(dir, authentication, None)
    }

    /// As [`OwnServer::tansu`], but telling clients to connect to `front` (a proxy in
    /// front of it, such as [`OwnServer::tls_proxy`]) instead of its own port.
    pub fn tansu_advertising(dir: &Path, authentication: bool, front: Option<u16>) -> Self {
        let bin = std::env::var("SLUICE_TEST_TANSU_BIN")
            .expect("SLUICE_TEST_TANSU_BIN is not set: run the tests through ./scripts/test.sh");
        let dir = dir.to_path_buf();
        OwnServer::start("tansu", 0, move |port| {
            let url = format!("tcp://127.0.0.1:{port}");
            let advertised = format!("tcp://127.0.0.1:{}", front.unwrap_or(port));
            let mut command = Command::new(&bin);
            command
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &advertised,
                ])
                .args(["--storage-engine", "sqlite://tansu.db"])
                // tansu reads the SQLite path relative to its working directory.
                .current_dir(&dir);
            if authentication {
                command.arg("--authentication");
            }
            command
        })
    }

    /// A TLS front on `port` for the plain TCP server at `backend` (socat with OpenSSL,
    /// serving `cert` and `key`). tansu 0.6 cannot serve TLS itself: its `--cert` and
    /// `--key` flags are in one clap group, so giving both is refused.
    pub fn tls_proxy(port: u16, backend: String, cert: &Path, key: &Path) -> Self {
        let files = format!("cert={},key={}", cert.display(), key.display());
        Self::socat(port, backend, move |port| {
            format!("openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,{files}")
        })
    }

    /// A plain TCP front on a free port for the server at `backend` (socat): a way in
    /// that a test can take away and give back while the server itself runs on.
    pub fn tcp_proxy(backend: String) -> Self {
        Self::socat(0, backend, |port| {
            format!("tcp-listen:{port},bind=127.0.0.1,reuseaddr,fork")
        })
    }

    /// socat from `listen(port)` to `backend`.
    fn socat(port: u16, backend: String, listen: impl Fn(u16) -> String + 'static) -> Self {
        OwnServer::start("socat", port, move |port| {
            let mut command = Command::new("socat");
            command.arg(listen(port)).arg(format!("tcp:{backend}"));
            command
        })
    }

    /// A kinesalite keeping its streams in LevelDB under `dir`, so a killed server
    /// restarts with them (scripts/test.sh sets `NODE_PATH` to its install).
    pub fn kinesalite(dir: &Path) -> Self {
        let script = std::env::var("SLUICE_TEST_KINESALITE_JS").expect(
            "SLUICE_TEST_KINESALITE_JS is not set: run the tests through ./scripts/test.sh",
        );
        let db = dir.join("kinesalite");
        std::fs::create_dir_all(&db).expect("kinesalite dir");
        OwnServer::start("kinesalite", 0, move |port| {
            let mut command = Command::new("node");
            command.arg(&script).arg(port.to_string()).arg(&db);
            command
        })
    }

    /// A SeaweedFS (`weed mini`, from the binary scripts/test.sh installed) serving S3
    /// on its port with the test credentials, keeping its data under `dir`, so a killed
    /// server restarts with its buckets and objects. Its other ports are fixed at the
    /// first start, so a restart binds the same ones.
    pub fn seaweedfs(dir: &Path) -> Self {
        let bin = std::env::var("SLUICE_TEST_WEED_BIN")
            .expect("SLUICE_TEST_WEED_BIN is not set: run the tests through ./scripts/test.sh");
        let (_, key, secret) = s3();
        let data = dir.join("weed");
        std::fs::create_dir_all(&data).expect("weed dir");
        let ports: Vec<String> = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
            "webdav.port",
            "s3.port.grpc",
            "s3.port.iceberg",
        ]
        .iter()
        .map(|flag| format!("-{flag}={}", free_port()))
        .collect();
        OwnServer::start("weed", 0, move |port| {
            let mut command = Command::new(&bin);
            command
                .arg("mini")
                .arg(format!("-dir={}", data.display()))
                .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
                .arg(format!("-s3.port={port}"))
                .args(&ports)
                .env("AWS_ACCESS_KEY_ID", &key)
                .env("AWS_SECRET_ACCESS_KEY", &secret);
            command
        })
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address())
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// (Re)starts the process on the same port; waits until it listens.
    pub fn restart(&mut self) {
        let child = (self.command)(self.port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} (scripts/test.sh installs it): {e}", self.name));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not start on {}",
                self.name,
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process with SIGTERM, as a maintenance restart does: mosquitto with
    /// `persistence true` saves its sessions and queued messages first.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP): it keeps its port and accepts connections, but
    /// answers nothing until [`OwnServer::resume`], as a hung server does.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {signal} {}", self.name);
        }
    }

    /// Kills the process with SIGKILL (the broker "goes away").
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Publishes `lines` (one message each) with mosquitto_pub at QoS 1, plus extra args.
///
/// In chunks of 5,000: `mosquitto_pub -l` (2.0.11) disconnects at end of input with
/// messages still queued in its client, and those are lost (100,000 lines in one go
/// reached the broker as about 34,000; in chunks of 5,000, all of them).
pub fn mosquitto_pub(port: u16, topic: &str, lines: &[String], extra: &[&str]) {
    for chunk in lines.chunks(5_000) {
        mosquitto_pub_once(port, topic, chunk, extra);
    }
}

fn mosquitto_pub_once(port: u16, topic: &str, lines: &[String], extra: &[&str]) {
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-l",
            "-t",
            topic,
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub is installed by scripts/test.sh");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all((lines.join("\n") + "\n").as_bytes())
        .expect("write lines");
    drop(stdin);
    assert!(
        child.wait().expect("mosquitto_pub").success(),
        "mosquitto_pub failed"
    );
}

/// Publishes `expected` `messages` (topic, payload) at QoS 1 as client `client_id`
/// (persistent session, 1,000 in flight) from a thread, riding out reconnects. Returns
/// how many publishes the broker acknowledged, once every one has been.
pub fn spawn_mqtt_publisher(
    port: u16,
    client_id: &str,
    expected: u64,
    messages: impl Iterator<Item = (String, String)> + Send + 'static,
) -> std::thread::JoinHandle<u64> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_clean_session(false)
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_keep_alive(Duration::from_secs(30));
    std::thread::spawn(move || {
        let (client, mut connection) = Client::new(options, 1000);
        let publisher = std::thread::spawn(move || {
            for (topic, payload) in messages {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .expect("queue publish");
            }
            // Returned, so the connection is not closed before the last ack.
            client
        });
        let mut acked = 0;
        let mut down = false;
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == expected {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => down = false,
                Ok(_) => {}
                Err(e) => {
                    if !down {
                        eprintln!("producer: {e}; reconnecting");
                        down = true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        drop(publisher.join().expect("publisher"));
        acked
    })
}

/// A TCP relay in front of a server, which a test cuts as a network partition would:
/// while cut, no byte passes either way and new connections get no answer; once
/// healed, the connections that lived through the cut are closed (their requests fail
/// and are retried) and new ones pass again.
pub struct Relay {
    /// Where clients connect, `127.0.0.1:<port>`.
    pub address: String,
    state: std::sync::Arc<RelayState>,
}

#[derive(Default)]
struct RelayState {
    cut: std::sync::atomic::AtomicBool,
    /// Bumped by every heal: a connection of an older generation is closed.
    generation: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

impl RelayState {
    fn current(&self, generation: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.generation.load(Relaxed) == generation && !self.stop.load(Relaxed)
    }
}

impl Relay {
    /// A relay to `backend` (`host:port`) on a free loopback port.
    pub fn start(backend: &str) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let address = listener.local_addr().expect("relay address").to_string();
        listener.set_nonblocking(true).expect("nonblocking");
        let state = std::sync::Arc::new(RelayState::default());
        let (shared, backend) = (state.clone(), backend.to_owned());
        std::thread::spawn(move || {
            while !shared.stop.load(Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (state, backend) = (shared.clone(), backend.clone());
                        std::thread::spawn(move || relay_connection(client, &backend, &state));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { address, state }
    }

    /// `http://` and the relay's address.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops every byte.
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes the connections that lived through the cut and lets new ones pass.
    pub fn heal(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.state.generation.fetch_add(1, Relaxed);
        self.state.cut.store(false, Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One client connection through a [`Relay`].
fn relay_connection(client: TcpStream, backend: &str, state: &std::sync::Arc<RelayState>) {
    use std::sync::atomic::Ordering::Relaxed;
    let generation = state.generation.load(Relaxed);
    // Accepted during a cut: no answer until the heal closes it.
    while state.cut.load(Relaxed) {
        if !state.current(generation) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Ok(server) = TcpStream::connect(backend) else {
        return;
    };
    let (Ok(client_in), Ok(server_in)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = {
        let state = state.clone();
        std::thread::spawn(move || pump(client_in, server, &state, generation))
    };
    pump(server_in, client, state, generation);
    let _ = up.join();
}

/// Copies `from` to `to` while the relay is not cut and the connection's generation is
/// current; closes both ends after.
fn pump(mut from: TcpStream, mut to: TcpStream, state: &RelayState, generation: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 * 1024];
    while state.current(generation) {
        if state.cut.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
