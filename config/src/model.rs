//! The config structs. Each field's doc comment is its reference documentation:
//! what it means, its unit and its default.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::load::ConfigError;
use crate::units::{ByteSize, Duration};

/// The URL that means "the broker Sluice embeds" (`[broker]`).
pub const EMBEDDED_URL: &str = "embedded";

/// The embedded default config's text.
pub const DEFAULT_TOML: &str = include_str!("../examples/default.toml");

/// A whole Sluice configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `[http]`: the HTTP API, ingest and dashboard.
    pub http: HttpConfig,
    /// `[broker]`: the embedded MQTT broker.
    pub broker: BrokerConfig,
    /// `[lake]`: where and how tables are written.
    pub lake: LakeConfig,
    /// `[decode]`: limits applied to every incoming message.
    pub decode: DecodeConfig,
    /// `[sources.<name>]`: where events come from.
    pub sources: BTreeMap<String, SourceConfig>,
    /// `[streams.<name>]`: the streams sources feed; each lands as a lake table.
    pub streams: BTreeMap<String, StreamConfig>,
    /// `[functions.<name>]`: stateless functions over streams.
    pub functions: BTreeMap<String, FunctionConfig>,
    /// `[windows.<name>]`: event-time windows over streams.
    pub windows: BTreeMap<String, WindowConfig>,
    /// `[alerts.<name>]`: threshold and missing-data rules over streams or windows.
    pub alerts: BTreeMap<String, AlertConfig>,
    /// `[notifiers.<name>]`: where alert notifications go.
    pub notifiers: BTreeMap<String, NotifierConfig>,
    /// `[alerting]`: limits across every rule.
    pub alerting: AlertingConfig,
    /// `[limits]`: protection across the whole pipeline (the loop guard).
    pub limits: crate::LimitsConfig,
    /// `[publish.<name>]`: streams whose rows are sent out through a notifier.
    pub publish: BTreeMap<String, crate::PublishConfig>,
    /// `[cluster]`: this node is one of several sharing the lake. Absent: one node.
    pub cluster: Option<ClusterConfig>,
    /// `[runtime]`: how this process spreads its work over its cores.
    pub runtime: RuntimeConfig,
    /// What loading filled in that the file did not say, one line each (a source's
    /// built-in stream and its default pipeline): `sluice check` prints them and
    /// `sluice run` logs them.
    pub notes: Vec<String>,
}

/// `[runtime]`: how one process uses its machine.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Decode workers of a bounded run (`--from-file`): each file is cut into chunks
    /// decoded in parallel and handed on in file order, so any count gives the same
    /// batches. Default: the cores this process may run on.
    pub workers: Option<usize>,
}

/// `[cluster]`: several nodes run one pipeline over one lake (see ARCHITECTURE.md,
/// "Scale-out"). Nodes share work through the systems they already share (the Kafka
/// group, the lake); there is no leader to configure.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster: it names the node's checkpoints in the
    /// lake and its Delta transaction marker. Letters, digits, `-` and `_`. Default:
    /// the host name and the HTTP port (`host-8080`).
    pub node_id: Option<String>,
    /// `[cluster.repartition]`: keyed work over MQTT and Kinesis goes through a Kafka
    /// topic.
    pub repartition: Option<RepartitionConfig>,
}

/// `[cluster.repartition]`: each stream fed by MQTT or Kinesis is published, keyed by
/// the stream's key, to the Kafka topic `<topic_prefix><stream>`, and its windows,
/// alert rules and functions read that topic (source `repartition-<stream>`), so each
/// device's keyed state lives on one node although a shared subscription spreads its
/// messages over all of them, and Kinesis shards move between nodes and split (see
/// ARCHITECTURE.md, "The repartition topic").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepartitionConfig {
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Partitions of a topic this node creates (1–10000; an existing topic keeps its
    /// own). Default: 12.
    #[serde(default = "default_repartition_partitions")]
    pub partitions: u32,
    /// Topic name before the stream's. Default: `"sluice-repartition-"`.
    #[serde(default = "default_repartition_prefix")]
    pub topic_prefix: String,
}

fn default_repartition_partitions() -> u32 {
    12
}
fn default_repartition_prefix() -> String {
    "sluice-repartition-".into()
}

/// Names the source a repartitioned stream's keyed work reads.
pub const REPARTITION_SOURCE_PREFIX: &str = "repartition-";

/// The source name under which HTTP ingest feeds `stream` (in `_source`, positions,
/// metrics and the write-ahead log's directory).
pub fn http_source(stream: &str) -> String {
    format!("http:{stream}")
}

impl Config {
    /// `[runtime] workers`, else the cores this process may run on (its CPU affinity,
    /// so `taskset -c 0` means one).
    pub fn workers(&self) -> usize {
        self.runtime
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// This node's id when it is one of a cluster (`[cluster]`): `node_id`, else the
    /// host name and the HTTP port.
    pub fn node_id(&self) -> Option<String> {
        let cluster = self.cluster.as_ref()?;
        Some(cluster.node_id.clone().unwrap_or_else(|| {
            let port = self.http.listen.rsplit(':').next().unwrap_or("0");
            let host: String = hostname()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .take(50)
                .collect();
            format!("{host}-{port}")
        }))
    }
}

/// This machine's name (for default ids).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

impl ClusterConfig {
    /// Whether `id` can name a node: 1 to 64 of `[A-Za-z0-9_-]`.
    pub fn valid_node_id(id: &str) -> bool {
        (1..=64).contains(&id.len())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }
}

/// `[alerts.<name>]`: a rule. Each (rule, key) is `ok`, `pending` or `firing`; a fire
/// and its resolve become rows of the `alerts` table and notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The stream (raw events, or a function's output) or window table it reads. Required.
    pub input: String,
    /// SQL predicate that counts toward firing, e.g. `"temperature > 80"`. A rule has
    /// a `condition` or a `missing_after`, not both.
    pub condition: Option<String>,
    /// SQL predicate that counts toward resolving while firing (hysteresis), e.g.
    /// `"temperature < 75"`. Default: `NOT (condition)`.
    pub clear: Option<String>,
    /// SQL expression reported as the alert's `value`, e.g. `"temperature"`. Default: none.
    pub value: Option<String>,
    /// Columns whose values make the alert key. Default: the input's key column (a
    /// stream's `key`, a window's first `group_by` column).
    #[serde(default)]
    pub group_by: Vec<String>,
    /// When to fire: a count of evaluations (`3`: three in a row; with `of`, M of the
    /// last N), or a duration of event time the condition must hold (`"2m"`). Default: 1.
    #[serde(rename = "for")]
    pub fire_for: Option<FireFor>,
    /// With a count `for`: out of how many of the newest evaluations (M-of-N, as
    /// CloudWatch's datapoints to alarm). At most 64. Default: the `for` count.
    pub of: Option<u32>,
    /// How many consecutive clear evaluations resolve a firing alert. Default: 1.
    #[serde(default = "one")]
    pub clear_for: u32,
    /// Missing data: fire when a key has sent nothing for this long (pipeline clock),
    /// resolve when it reports again. Default: off.
    pub missing_after: Option<Duration>,
    /// At most one notification (fire and its resolve) per key within this long of the
    /// last one; the `alerts` table still records every transition. Default: `"0s"`.
    #[serde(default)]
    pub cooldown: Duration,
    /// Free text carried into every event, e.g. `"critical"`. Default: `"warning"`.
    #[serde(default = "warning")]
    pub severity: String,
    /// Extra labels carried into every event. Default: none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Message template; `{column}` takes the value from the row that caused the
    /// event, and `{rule}`, `{key}`, `{event}`, `{value}`, `{severity}` are known too.
    /// Default: `"{rule} {event} for {key}"`.
    pub message: Option<String>,
    /// Names of `[notifiers.<name>]` to send to. Default: none (the `alerts` table only).
    #[serde(default)]
    pub notify: Vec<String>,
}

fn one() -> u32 {
    1
}

fn warning() -> String {
    "warning".into()
}

/// `for` of a rule: a count of evaluations or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FireFor {
    /// This many evaluations (in a row, or of the last `of`).
    Count(u32),
    /// The condition held this long in event time.
    Duration(Duration),
}

impl NotifierConfig {
    /// Deliveries in flight at once.
    pub fn concurrency(&self) -> usize {
        match self {
            NotifierConfig::Mqtt(c) => c.concurrency,
            NotifierConfig::Webhook(c) => c.concurrency,
            NotifierConfig::Kafka(c) => c.concurrency,
        }
    }

    /// The notifier's rate limit, if any.
    pub fn limit(&self) -> Option<&LimitConfig> {
        match self {
            NotifierConfig::Mqtt(c) => c.limit.as_ref(),
            NotifierConfig::Webhook(c) => c.limit.as_ref(),
            NotifierConfig::Kafka(c) => c.limit.as_ref(),
        }
    }
}

/// `[notifiers.<name>]`, chosen by its `type` key.
#[derive(Debug, Clone)]
pub enum NotifierConfig {
    /// `type = "mqtt"`
    Mqtt(MqttNotifierConfig),
    /// `type = "webhook"`
    Webhook(WebhookNotifierConfig),
    /// `type = "kafka"`
    Kafka(KafkaNotifierConfig),
}

/// `type = "mqtt"`: publishes each notification as JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttNotifierConfig {
    /// `"embedded"` (the `[broker]`), or `mqtt://host:port`. Default: `"embedded"`.
    #[serde(default = "embedded")]
    pub url: String,
    /// Topic template: `{rule}`, `{key}`, `{event}`, `{severity}` and the rule's
    /// `group_by` columns, e.g. `"alerts/{rule}/{device_id}"`. Default:
    /// `"alerts/{rule}/{key}"`.
    #[serde(default = "alert_topic")]
    pub topic: String,
    /// 0 or 1. Default: 1.
    #[serde(default = "one_u8")]
    pub qos: u8,
    /// Notifications waiting at most; beyond it they are dropped and counted. Default: 10000.
    #[serde(default = "queue")]
    pub queue: usize,
    /// Deliveries per second (`rate`, `burst`, `mode`): in `block` mode the excess
    /// waits in the queue (a full queue drops, counted); in `shed` mode it is dropped
    /// at once and counted (`outcome="dropped_rate_limited"`). Default: no limit.
    pub limit: Option<LimitConfig>,
    /// Deliveries in flight at once (1–64), each with its own retries. Above 1 they
    /// can complete out of order. Default: 1 (in order).
    #[serde(default = "one_usize")]
    pub concurrency: usize,
}

fn embedded() -> String {
    EMBEDDED_URL.into()
}

fn alert_topic() -> String {
    "alerts/{rule}/{key}".into()
}

fn one_u8() -> u8 {
    1
}

fn one_usize() -> usize {
    1
}

fn queue() -> usize {
    10_000
}

/// `type = "webhook"`: HTTP POST of the notification's JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookNotifierConfig {
    /// `http://host:port/path`. Required.
    pub url: String,
    /// Environment variable holding the HMAC-SHA256 secret; each request then carries
    /// `X-Sluice-Signature: sha256=<hex of HMAC(secret, body)>`. Default: unsigned.
    pub secret_env: Option<String>,
    /// Per request. Default: `"5s"`.
    #[serde(default = "five_s")]
    pub timeout: Duration,
    /// How long one notification is retried (exponential backoff with jitter) before
    /// it is dropped and counted. Default: `"5m"`.
    #[serde(default = "five_m")]
    pub retry_for: Duration,
    /// Consecutive failures that open the circuit breaker. Default: 5.
    #[serde(default = "five")]
    pub breaker_failures: u32,
    /// How long an open breaker waits before one probe request. Default: `"10s"`.
    #[serde(default = "ten_s")]
    pub breaker_cooldown: Duration,
    /// Notifications waiting at most; beyond it they are dropped and counted. Default: 10000.
    #[serde(default = "queue")]
    pub queue: usize,
    /// Deliveries per second (`rate`, `burst`, `mode`): in `block` mode the excess
    /// waits in the queue (a full queue drops, counted); in `shed` mode it is dropped
    /// at once and counted (`outcome="dropped_rate_limited"`). Default: no limit.
    pub limit: Option<LimitConfig>,
    /// Deliveries in flight at once (1–64), each with its own retries. Above 1 they
    /// can complete out of order. Default: 1 (in order).
    #[serde(default = "one_usize")]
    pub concurrency: usize,
}

fn five_s() -> Duration {
    Duration::from_secs(5)
}

fn five_m() -> Duration {
    Duration::from_secs(300)
}

fn ten_s() -> Duration {
    Duration::from_secs(10)
}

fn five() -> u32 {
    5
}

/// `type = "kafka"`: produces each notification as JSON, keyed by the alert key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaNotifierConfig {
    /// `host:port[,host:port]`. Required.
    pub brokers: String,
    /// The topic (it must exist). Required.
    pub topic: String,
    /// Notifications waiting at most; beyond it they are dropped and counted. Default: 10000.
    #[serde(default = "queue")]
    pub queue: usize,
    /// Deliveries per second (`rate`, `burst`, `mode`): in `block` mode the excess
    /// waits in the queue (a full queue drops, counted); in `shed` mode it is dropped
    /// at once and counted (`outcome="dropped_rate_limited"`). Default: no limit.
    pub limit: Option<LimitConfig>,
    /// Deliveries in flight at once (1–64), each with its own retries. Above 1 they
    /// can complete out of order. Default: 1 (in order).
    #[serde(default = "one_usize")]
    pub concurrency: usize,
}

/// `limit` of a source: rate limits that protect Sluice (and what is behind it) from a
/// flood. Each refused event is counted in `sluice_limit_events_total`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Events per second for the whole source. Default: unlimited.
    pub rate: Option<u32>,
    /// Events allowed at once above `rate`. Default: one second's worth (`rate`).
    pub burst: Option<u32>,
    /// What `rate` does with the excess: `"block"` waits (Kafka and Kinesis poll
    /// slower; MQTT reads slower, so the broker holds messages and QoS 1 publishers slow
    /// down) or `"shed"` drops it. Default: `"block"`.
    #[serde(default)]
    pub mode: LimitMode,
    /// Events per second per key (device or user id), so one noisy device cannot crowd
    /// out the rest. Default: unlimited.
    pub per_key_rate: Option<u32>,
    /// Events allowed at once above `per_key_rate`. Default: `per_key_rate`.
    pub per_key_burst: Option<u32>,
    /// What `per_key_rate` does with a key's excess: `"shed"` drops it (counted and
    /// sampled); `"block"` holds it until the key has room, and with it the source
    /// and every key behind it on the same connection or partition (`sluice check`
    /// warns); `[http.limit]` instead refuses the body holding it with 429 and
    /// `Retry-After`. Default: `"shed"`.
    #[serde(default = "shed")]
    pub per_key_mode: LimitMode,
    /// One in this many shed events is kept in `dead_letter` (reason `rate_limited`);
    /// every one is counted. Default: 1 (all).
    #[serde(default = "one")]
    pub dead_letter_sample: u32,
}

/// What a rate limit does with the excess.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// Wait for room: backpressure.
    #[default]
    Block,
    /// Drop the excess, counted (and sampled into `dead_letter`).
    Shed,
}

fn shed() -> LimitMode {
    LimitMode::Shed
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            rate: None,
            burst: None,
            mode: LimitMode::Block,
            per_key_rate: None,
            per_key_burst: None,
            per_key_mode: LimitMode::Shed,
            dead_letter_sample: 1,
        }
    }
}

impl LimitConfig {
    /// Every problem, as (key under the source, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (key, v) in [
            ("rate", self.rate),
            ("burst", self.burst),
            ("per_key_rate", self.per_key_rate),
            ("per_key_burst", self.per_key_burst),
            ("dead_letter_sample", Some(self.dead_letter_sample)),
        ] {
            if v == Some(0) {
                out.push((key, "must be at least 1".to_owned()));
            }
        }
        if self.burst.is_some() && self.rate.is_none() {
            out.push(("burst", "needs a rate".to_owned()));
        }
        if self.per_key_burst.is_some() && self.per_key_rate.is_none() {
            out.push(("per_key_burst", "needs a per_key_rate".to_owned()));
        }
        out
    }

    /// [`Self::problems`] of a limit inside the pipeline (a function's, the lake's):
    /// it needs a rate and takes no per-key rate.
    pub fn rate_only_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = self.problems();
        if self.rate.is_none() {
            out.push(("rate", "this limit needs a rate".to_owned()));
        }
        if self.per_key_rate.is_some() {
            out.push((
                "per_key_rate",
                "per-key limits belong to sources".to_owned(),
            ));
        }
        out
    }
}

/// `[alerting]`: protection across every rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// Notifications per second across all rules; the excess is suppressed, counted,
    /// and summarised in one notification when they flow again. Default: 100.
    pub max_notifications_per_second: u32,
    /// Notifications allowed at once above the rate. Default: 200.
    pub burst: u32,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            max_notifications_per_second: 100,
            burst: 200,
        }
    }
}

/// `[functions.<name>]`: filter, reshape and route one stream's rows. The SQL is
/// compiled once (DataFusion) and evaluated per batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The stream it reads: a declared stream or another function's output. Required.
    pub input: String,
    /// The stream (and lake table) its output lands in. Default: none, only routes.
    pub output: Option<String>,
    /// Keep rows for which this SQL predicate holds, e.g. `"status <> 'error'"`.
    /// Default: every row.
    pub filter: Option<String>,
    /// SQL select items, e.g. `["device_id", "temperature * 9 / 5 + 32 AS temperature_f"]`;
    /// `"*"` keeps every declared column. Event time, key and system columns are
    /// always kept. Default: every column unchanged.
    #[serde(default)]
    pub select: Vec<String>,
    /// Rows of the output for which `when` holds also go to stream `to`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Rows per second the function takes (`rate`, `burst`, `mode`,
    /// `dead_letter_sample`). `block` (the default): the function takes every row, and
    /// the pipeline takes no more batches until the rate has paid for them, so every
    /// stream and then the sources wait (the function runs inside the one pipeline).
    /// `shed`: the excess is dropped, counted, and sampled into `dead_letter` as
    /// `rate_limited`.
    pub limit: Option<LimitConfig>,
    /// Threads one batch of this function may use at once, at most (1 to 64): a batch
    /// of at least 8,192 rows is split into slices of at least 4,096 evaluated in
    /// parallel, and put back together in order. Worth it for expensive functions
    /// (string work, regular expressions, many columns). Default 1.
    #[serde(default = "one_thread")]
    pub concurrency: usize,
}

fn one_thread() -> usize {
    1
}

/// One route of a function.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// SQL predicate over the function's output columns.
    pub when: String,
    /// The stream (and lake table) the rows go to.
    pub to: String,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address for the HTTP API (`/api/query`, `/api/ingest/<stream>`, `/health`, `/metrics`).
    /// Default `"127.0.0.1:8080"`.
    pub listen: String,
    /// Largest accepted request body. Default `"16MB"`.
    pub max_body_size: ByteSize,
    /// Longest a `POST /api/query` may run; past it the query is cancelled and the
    /// client gets 504. `"0s"`: no limit. Default `"60s"`.
    pub query_timeout: Duration,
    /// Memory all running queries share; a query that needs more ends with 413.
    /// `"0"`: no limit. Default `"512MB"`.
    pub query_memory: ByteSize,
    /// Rows a query's result may hold; past it the query ends with 413. 0: no limit.
    /// Default 1,000,000.
    pub query_max_rows: u64,
    /// Bytes a query's result may hold (in memory, before JSON or CSV); past it the
    /// query ends with 413. `"0"`: no limit. Default `"128MB"`.
    pub query_max_bytes: ByteSize,
    /// A join without equal keys (a cross or nested-loop join) whose inputs' estimated
    /// rows multiply past this many pairs is refused with 413 before it runs. 0: no
    /// limit. Default 1,000,000,000.
    pub query_max_join_pairs: u64,
    /// Resident memory of the whole process past which running queries are cancelled,
    /// the oldest first, and new ones refused (503) until it is back under: the
    /// query memory pool does not see all a query holds (scans, joins' candidate
    /// pairs, regex programs). `"0"`: no limit. Default `"1536MB"`.
    pub query_rss_limit: ByteSize,
    /// Queries running at once; one more gets 429 with `Retry-After`. 0: no limit.
    /// Default 4.
    pub query_concurrency: u32,
    /// API tokens (`[[http.tokens]]`). With none, the API is open (bind it to
    /// loopback); with any, every endpoint but `/health` and `/` wants
    /// `Authorization: Bearer <token>` of a token with the endpoint's scope.
    pub tokens: Vec<TokenConfig>,
    /// More API tokens, in a file of their own: `[[tokens]]` entries with the keys of
    /// `[[http.tokens]]`. Re-read within a second of a change, so a token is added or
    /// revoked without a restart; a change that does not load is logged and the last
    /// good file stays in force. Default none.
    pub tokens_file: Option<PathBuf>,
    /// Lets the API listen on a non-loopback address with no tokens (anyone who
    /// reaches it may query and ingest). Default `false`: such a config is refused.
    pub allow_unauthenticated: bool,
    /// Serve HTTPS (`[http.tls]`) instead of plain HTTP. Default none.
    pub tls: Option<HttpTlsConfig>,
    /// Also take JSON Web Tokens from an identity provider (`[http.jwt]`). Default none.
    pub jwt: Option<JwtConfig>,
    /// Rate limits of `POST /api/ingest/<stream>` (`[http.limit]`, the keys of a
    /// source's `limit`): in `block` mode a body over the rate is refused with 429 and
    /// `Retry-After`; `shed` and the per-key limit drop events as for other sources.
    /// Default: no limit.
    pub limit: LimitConfig,
    /// Whether `POST /api/ingest/<stream>` answers a body only once it is fsynced to
    /// the stream's write-ahead log (`<lake>/_wal/http:<stream>`), replayed past the
    /// last checkpoint after a crash, so that a body answered 200 is never lost. Off,
    /// a body is answered once decoded, and a crash loses what the last checkpoint did
    /// not cover. Needs checkpoints on (`[lake] checkpoint_interval`); always on for a
    /// stream keyed through a cluster's repartition topic. Default `false`: a client
    /// then waits for an fsync per body, which caps a few connections' throughput at
    /// the disk's fsync rate (see README, "HTTP ingest with its log").
    pub durable_acks: bool,
    /// How long a stream remembers a body's `Idempotency-Key`: the same key within
    /// this time gets the first answer again, and nothing is taken twice. Default
    /// `"1h"`.
    pub idempotency_ttl: Duration,
    /// Keys each stream remembers at most, the oldest forgotten first (about 250 bytes
    /// each for a 36-character key). 0: keys are off, and a body with one gets 400.
    /// Default 100,000.
    pub idempotency_keys: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_size: ByteSize(16_000_000),
            query_timeout: Duration::from_secs(60),
            query_memory: ByteSize(512_000_000),
            query_max_rows: 1_000_000,
            query_max_bytes: ByteSize(128_000_000),
            query_max_join_pairs: 1_000_000_000,
            query_rss_limit: ByteSize(1_536_000_000),
            query_concurrency: 4,
            tokens: Vec::new(),
            tokens_file: None,
            allow_unauthenticated: false,
            tls: None,
            jwt: None,
            limit: LimitConfig::default(),
            durable_acks: false,
            idempotency_ttl: Duration::from_secs(3600),
            idempotency_keys: 100_000,
        }
    }
}

/// One `[[http.tokens]]` entry: an API token, kept as its hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs and errors (never the token).
    pub name: String,
    /// The SHA-256 of the token, in hex (`sluice token` prints a new token and this).
    pub sha256: String,
    /// What it may do: `query` (`/api/query`, `/api/tables`), `ingest:<stream>` or
    /// `ingest:*` (`/api/ingest/<stream>`), `tap`, `admin` (everything, and
    /// `/metrics`, `/api/cluster`).
    pub scopes: Vec<String>,
}

impl TokenConfig {
    /// Whether this token may use `scope` (see [`TokenConfig::scopes`]).
    pub fn allows(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| {
            s == "admin" || s == scope || (s == "ingest:*" && scope.starts_with("ingest:"))
        })
    }

    /// The tokens of a `tokens_file` (`[[tokens]]` entries), or every problem of it,
    /// each naming its key (`tokens[i].scopes`).
    pub fn read_file(path: &Path) -> Result<Vec<TokenConfig>, Vec<String>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            tokens: Vec<TokenConfig>,
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
        let file: File = toml::from_str(&text)
            .map_err(|e| vec![format!("{}: {}", path.display(), e.message())])?;
        let problems: Vec<String> = file
            .tokens
            .iter()
            .enumerate()
            .flat_map(|(i, token)| {
                token.problems().into_iter().map(move |(k, message)| {
                    format!("{}: tokens[{i}].{k} {message}", path.display())
                })
            })
            .collect();
        if problems.is_empty() {
            Ok(file.tokens)
        } else {
            Err(problems)
        }
    }

    /// Each problem of the entry, by its key under `http.tokens[i]`.
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            problems.push((
                "sha256",
                "is not a SHA-256 in hex (64 characters); `sluice token` prints one".to_owned(),
            ));
        }
        if self.scopes.is_empty() {
            problems.push(("scopes", "is empty: the token could do nothing".to_owned()));
        }
        for scope in &self.scopes {
            let known = matches!(scope.as_str(), "query" | "tap" | "admin")
                || scope.strip_prefix("ingest:").is_some_and(|s| !s.is_empty());
            if !known {
                problems.push((
                    "scopes",
                    format!("{scope:?} is not query, tap, admin, ingest:<stream> or ingest:*"),
                ));
            }
        }
        problems
    }
}

/// `[http.jwt]`: bearer tokens that are JWTs signed by a key of a JWKS file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The identity provider's public keys (a JWKS document, RSA or EC keys), re-read
    /// when the file changes. Required.
    pub jwks_file: PathBuf,
    /// The `iss` a token must carry. Default: any.
    pub issuer: Option<String>,
    /// An `aud` a token must carry. Default: any.
    pub audience: Option<String>,
    /// The claim holding the token's scopes: a space-separated string (OAuth 2) or an
    /// array. Default `"scope"`.
    #[serde(default = "default_scopes_claim")]
    pub scopes_claim: String,
    /// Clock skew allowed on `exp` and `nbf`. Default `"60s"`.
    #[serde(default = "default_jwt_leeway")]
    pub leeway: Duration,
}

fn default_scopes_claim() -> String {
    "scope".into()
}

fn default_jwt_leeway() -> Duration {
    Duration::from_secs(60)
}

/// `[http.tls]`: the API over HTTPS (HTTP/1.1 and HTTP/2 by ALPN).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// PEM certificate chain, re-read when it changes (new connections get it).
    pub cert_file: PathBuf,
    /// PEM private key, re-read with `cert_file`.
    pub key_file: PathBuf,
}

/// `[broker]`: the embedded MQTT broker (rumqttd, MQTT 3.1.1).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Run the embedded broker. Default `true` with no config file, `false` in a file.
    pub enabled: bool,
    /// Address the broker listens on. Default `"127.0.0.1:1883"`.
    pub listen: String,
    /// Largest MQTT payload the broker accepts. Default `"256KB"`.
    pub max_payload_size: ByteSize,
    /// Unacknowledged QoS 1 messages per connection. Default `1000`.
    pub max_inflight: u16,
    /// Most simultaneous client connections. Default `10000`.
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address; more are closed at once.
    /// 0: no limit. Default `100`.
    pub max_connections_per_address: usize,
    /// How long a new connection may take to send its CONNECT; a slower or silent one
    /// is closed, so it cannot hold a slot (slowloris). Default `"10s"`.
    pub connect_timeout: Duration,
    /// How devices on `listen` prove who they are: `"none"` (the client id is taken as
    /// said) or `"password"` (user name and password, checked against
    /// `passwords_file`; the client id must equal the user name). Default `"none"`.
    pub auth: DeviceAuth,
    /// Devices' passwords: one `<device id>:<argon2 hash>` line each (`sluice passwd`
    /// makes one), re-read when it changes. Required by `auth = "password"` on either
    /// listener.
    pub passwords_file: Option<PathBuf>,
    /// A TLS listener (`[broker.tls]`), next to the plain one. Default none.
    pub tls: Option<BrokerTlsConfig>,
    /// Which topics a device may publish and subscribe to (`[broker.acl]`), with
    /// `{client_id}` standing for its identity. Default none: any topic.
    pub acl: Option<AclConfig>,
    /// Lets a listener on a non-loopback address take devices without authentication
    /// (any client may publish as any device). Default `false`: such a config is
    /// refused.
    pub allow_anonymous: bool,
}

/// How a listener of the embedded broker authenticates devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceAuth {
    /// None: the CONNECT's client id is the device's identity, unchecked.
    #[default]
    None,
    /// User name and password from `[broker] passwords_file`; the client id must equal
    /// the user name.
    Password,
    /// A client certificate signed by `[broker.tls] client_ca_file` (mTLS); the
    /// certificate's common name is the identity, and the client id must equal it.
    Certificate,
}

/// `[broker.tls]`: the embedded broker's TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerTlsConfig {
    /// Address it listens on. Default `"0.0.0.0:8883"`.
    pub listen: String,
    /// PEM certificate chain of the server. Re-read when it changes: new connections
    /// get the new certificate, open ones keep theirs. Required.
    pub cert_file: PathBuf,
    /// PEM private key of the server, re-read with `cert_file`. Required.
    pub key_file: PathBuf,
    /// PEM CA certificates that sign device certificates; with it, a device must
    /// present one (mTLS). Required by `auth = "certificate"`.
    pub client_ca_file: Option<PathBuf>,
    /// How devices on this listener prove who they are. Default `"certificate"` with a
    /// `client_ca_file`, else `"none"`.
    pub auth: Option<DeviceAuth>,
}

impl Default for BrokerTlsConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8883".into(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_ca_file: None,
            auth: None,
        }
    }
}

impl BrokerTlsConfig {
    /// The authentication in force on this listener.
    pub fn auth(&self) -> DeviceAuth {
        self.auth.unwrap_or(if self.client_ca_file.is_some() {
            DeviceAuth::Certificate
        } else {
            DeviceAuth::None
        })
    }
}

/// `[broker.acl]`: topic patterns (MQTT filters, `+` and `#` allowed) a device may use;
/// `{client_id}` in a pattern is one whole level equal to the device's identity.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// Topics a device may publish to, for example `["devices/{client_id}/#"]`. A
    /// publish elsewhere is acknowledged and dropped (MQTT 3.1.1 has no refusal), and
    /// counted. Default none.
    pub publish: Vec<String>,
    /// Filters a device may subscribe to; a SUBSCRIBE to another closes the connection.
    /// Default none.
    pub subscribe: Vec<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "127.0.0.1:1883".into(),
            max_payload_size: ByteSize(256_000),
            max_inflight: 1000,
            max_connections: 10_000,
            max_connections_per_address: 100,
            connect_timeout: Duration::from_secs(10),
            auth: DeviceAuth::None,
            passwords_file: None,
            tls: None,
            acl: None,
            allow_anonymous: false,
        }
    }
}

impl BrokerConfig {
    /// Whether devices may connect without TLS: `listen` is not `""`.
    pub fn plain_listener(&self) -> bool {
        !self.listen.is_empty()
    }

    /// What is wrong with these settings, by key under `broker.`; `public` tells a
    /// non-loopback address.
    fn problems(&self, public: &dyn Fn(&str) -> bool) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut listeners = Vec::new();
        if self.plain_listener() {
            listeners.push(("listen".to_owned(), self.listen.as_str(), self.auth));
        } else if self.tls.is_none() {
            problems.push((
                "listen".into(),
                "is empty (no plain listener) and there is no [broker.tls] listener".into(),
            ));
        }
        if self.auth == DeviceAuth::Certificate {
            problems.push((
                "auth".into(),
                "\"certificate\" needs TLS: set it in [broker.tls] (auth, client_ca_file)".into(),
            ));
        }
        if let Some(tls) = &self.tls {
            listeners.push(("tls.listen".to_owned(), tls.listen.as_str(), tls.auth()));
            if tls.cert_file.as_os_str().is_empty() {
                problems.push(("tls.cert_file".into(), "is required".into()));
            }
            if tls.key_file.as_os_str().is_empty() {
                problems.push(("tls.key_file".into(), "is required".into()));
            }
            if tls.auth() == DeviceAuth::Certificate && tls.client_ca_file.is_none() {
                problems.push((
                    "tls.client_ca_file".into(),
                    "is required by auth = \"certificate\": the CA that signs device certificates"
                        .into(),
                ));
            }
        }
        for (key, addr, auth) in listeners {
            if addr.parse::<SocketAddr>().is_err() {
                problems.push((
                    key,
                    format!("{addr:?} is not an address like \"127.0.0.1:1883\""),
                ));
            } else if public(addr) && auth == DeviceAuth::None && !self.allow_anonymous {
                problems.push((
                    key,
                    format!(
                        "{addr:?} is not a loopback address and this listener authenticates no device: any client could publish as any device; set its auth (\"password\" or \"certificate\") or broker.allow_anonymous = true"
                    ),
                ));
            } else if auth == DeviceAuth::Password && self.passwords_file.is_none() {
                problems.push((
                    "passwords_file".into(),
                    format!("is required by auth = \"password\" on {key}"),
                ));
            }
        }
        if let Some(acl) = &self.acl {
            for (kind, patterns) in [("publish", &acl.publish), ("subscribe", &acl.subscribe)] {
                for (i, pattern) in patterns.iter().enumerate() {
                    if let Some(problem) = acl_pattern_problem(pattern) {
                        problems.push((
                            format!("acl.{kind}[{i}]"),
                            format!("{pattern:?}: {problem}"),
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// What is wrong with an ACL pattern: an MQTT filter whose levels may also be
/// `{client_id}`.
fn acl_pattern_problem(pattern: &str) -> Option<&'static str> {
    if pattern.is_empty() {
        return Some("is empty");
    }
    let levels: Vec<&str> = pattern.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if *level == "#" && i + 1 != levels.len() {
            return Some("'#' must be the last level");
        }
        if *level != "#"
            && *level != "+"
            && *level != "{client_id}"
            && level.contains(['#', '+', '{', '}'])
        {
            return Some("a level is a name, '+', '#' or {client_id}, whole");
        }
    }
    None
}

/// `[lake]`: the Parquet lake.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    /// Where the lake lives: a local directory, or `s3://bucket/prefix` (see `s3`); one
    /// Delta table per sub-directory. Default `"./sluice-data"`.
    pub dir: PathBuf,
    /// How to reach S3 when `dir` is `s3://…` (`[lake.s3]`). Credentials come from the
    /// standard AWS chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, a profile, an
    /// instance role), never from this file.
    pub s3: S3Config,
    /// A local directory for what must stay on this machine when `dir` is on S3: the
    /// MQTT sources' write-ahead logs. Default: `dir` itself for a local lake,
    /// `"./sluice-local"` for one on S3.
    pub local_dir: Option<PathBuf>,
    /// Roll (commit) an open file once its encoded size reaches this. Default `"64MB"`.
    pub roll_size: ByteSize,
    /// Roll an open file this long after its first row, so data is queryable soon.
    /// Default `"3s"`.
    pub roll_interval: Duration,
    /// Rows per Parquet row group. Default `131072`.
    pub row_group_rows: usize,
    /// zstd level, 1 (fast) to 22 (small). Default `1`: on telemetry it is faster than 3
    /// and the files were no larger (`sluice-loadtest bench --zstd-level`).
    pub zstd_level: i32,
    /// At most this long between checkpoints (window state and source positions are
    /// saved, Kafka offsets committed). A rolled file is committed by a checkpoint at
    /// once. Default `"3s"`; `"0s"` turns checkpoints off: files commit as they roll,
    /// state is saved only at a clean stop, and a crash can duplicate or drop rows.
    pub checkpoint_interval: Duration,
    /// Rows per second written to the lake, across its tables (`dead_letter` is not
    /// counted): `{ rate, burst, mode, dead_letter_sample }`. `block` (the default):
    /// past it the lake task takes no more batches until the rows written are paid
    /// for, so the queue fills and the sources wait. `shed`: the rows over it are not
    /// written; they are counted, and one in `dead_letter_sample` goes to `dead_letter`
    /// as `rate_limited`. Default: none.
    pub limit: Option<LimitConfig>,
    /// Per table, how long to keep its data by event time: a partition (`date`,
    /// `hour`) whose hour ended longer ago than this is removed by a Delta commit, and
    /// its files are deleted by vacuum after `maintenance.vacuum_grace`. `"*"` applies
    /// to every table not named. Example: `{ telemetry = "30d", "*" = "365d" }`.
    /// Default: keep everything.
    pub retain: BTreeMap<String, Duration>,
    /// Background compaction and vacuum of the Delta tables (`[lake.maintenance]`).
    pub maintenance: MaintenanceConfig,
}

/// `[lake.s3]`: an S3-compatible store for the lake.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The bucket's region. Default: `AWS_REGION`, else `"us-east-1"`.
    pub region: Option<String>,
    /// An endpoint other than AWS's, such as `"http://127.0.0.1:8333"` for a local
    /// SeaweedFS or MinIO. Default: AWS.
    pub endpoint: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which most local servers need.
    /// Default `false` (virtual-hosted style, as AWS wants).
    pub path_style: bool,
    /// Allow an `http://` endpoint. Default `false`.
    pub allow_http: bool,
}

impl LakeConfig {
    /// Whether `dir` is on S3.
    pub fn is_s3(&self) -> bool {
        self.dir.to_string_lossy().starts_with("s3://")
    }

    /// The local directory for write-ahead logs (see `local_dir`).
    pub fn local_dir(&self) -> PathBuf {
        match &self.local_dir {
            Some(dir) => dir.clone(),
            None if self.is_s3() => PathBuf::from("./sluice-local"),
            None => self.dir.clone(),
        }
    }
}

/// `[lake.maintenance]`: compaction, retention and vacuum beside ingest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Whether it runs at all. Default `true`.
    pub enabled: bool,
    /// Pause between rounds over the tables. Default `"1m"`.
    pub interval: Duration,
    /// Compacted files are about this large: a closed hour ends with one file per
    /// target size. Default `"128MB"`.
    pub target_size: ByteSize,
    /// An hour partition is closed this long after its hour ended; then its files under
    /// the target are packed into as few as the target allows. Default `"1h"`.
    pub closed_after: Duration,
    /// The open hour is compacted once it holds this many files under three quarters
    /// of the target. Default `50`.
    pub open_min_files: usize,
    /// Bytes per second compaction reads, at most (its I/O budget). Default `"32MB"`.
    pub read_rate: ByteSize,
    /// Memory a compaction's sort may hold (its memory budget); past it, sorted runs
    /// spill to the system's temporary directory. At least `"32MB"`. Default `"256MB"`.
    pub memory: ByteSize,
    /// Files no version of this age references are deleted by vacuum, so readers of
    /// older versions (time travel) are safe that long. From `"1d"` on, vacuum also
    /// deletes files no commit ever named (left by a crash). Default `"7d"`.
    pub vacuum_grace: Duration,
    /// Vacuum a table at most this often: it lists the table's files. Default `"1h"`.
    pub vacuum_interval: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(60),
            target_size: ByteSize(128_000_000),
            closed_after: Duration::from_secs(3600),
            open_min_files: 50,
            read_rate: ByteSize(32_000_000),
            memory: ByteSize(256_000_000),
            vacuum_grace: Duration::from_secs(7 * 86_400),
            vacuum_interval: Duration::from_secs(3600),
        }
    }
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./sluice-data"),
            s3: S3Config::default(),
            local_dir: None,
            roll_size: ByteSize(64_000_000),
            roll_interval: Duration::from_secs(3),
            row_group_rows: 128 * 1024,
            zstd_level: 1,
            checkpoint_interval: Duration::from_secs(3),
            limit: None,
            retain: BTreeMap::new(),
            maintenance: MaintenanceConfig::default(),
        }
    }
}

/// `[decode]`: limits on every message, from any source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Larger payloads are dead-lettered as `oversized`. Default `"64KB"`.
    pub max_payload_size: ByteSize,
    /// Deeper nesting is dead-lettered as `too_deep`. Default `16`.
    pub max_depth: usize,
    /// Bytes of a rejected payload kept in `dead_letter.payload`. Default `"4KB"`.
    pub dead_letter_payload_cap: ByteSize,
    /// A source hands on a batch once it holds this many rows. Default `8192`.
    pub batch_rows: usize,
    /// ... or once this much time has passed since the last hand-off. Default `"50ms"`.
    pub flush_interval: Duration,
    /// A row whose event time is further ahead of its arrival than this is
    /// dead-lettered as `bad_timestamp`: a device clock years ahead would otherwise
    /// open an hour partition (a file) per row. `"0s"`: no bound. Default `"1d"`.
    pub max_event_time_ahead: Duration,
    /// A row whose event time is further behind its arrival than this is
    /// dead-lettered as `bad_timestamp` (each past hour is a file too). `"0s"`: no
    /// bound, the default: a device that was offline for weeks sends its backlog.
    pub max_event_time_behind: Duration,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_payload_size: ByteSize(64_000),
            max_depth: 16,
            dead_letter_payload_cap: ByteSize(4_000),
            batch_rows: 8192,
            flush_interval: Duration::from_millis(50),
            max_event_time_ahead: Duration::from_secs(86_400),
            max_event_time_behind: Duration::from_secs(0),
        }
    }
}

/// `[sources.<name>]`, chosen by its `type` key.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// `type = "mqtt"`
    Mqtt(MqttSourceConfig),
    /// `type = "kafka"`
    Kafka(KafkaSourceConfig),
    /// `type = "kinesis"`
    Kinesis(KinesisSourceConfig),
}

impl SourceConfig {
    /// The source's rate limits.
    pub fn limit(&self) -> &LimitConfig {
        match self {
            SourceConfig::Mqtt(m) => &m.limit,
            SourceConfig::Kafka(k) => &k.limit,
            SourceConfig::Kinesis(k) => &k.limit,
        }
    }

    /// The stream this source feeds.
    pub fn stream(&self) -> Option<&str> {
        match self {
            SourceConfig::Mqtt(m) => Some(&m.stream),
            SourceConfig::Kafka(k) => Some(&k.stream),
            SourceConfig::Kinesis(k) => Some(&k.stream),
        }
    }
}

/// `[sources.<name>]` with `type = "mqtt"`: subscribe to an MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// `mqtt://host:port`, `mqtts://host:port` (TLS), or `"embedded"` for the embedded
    /// broker. Required.
    pub url: String,
    /// Topic filters, wildcards allowed (`devices/+/telemetry`). Required.
    pub topics: Vec<String>,
    /// Subscription QoS: 0 (best effort) or 1 (at least once). Default `1`.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// MQTT client id. Default `sluice-<source name>`, stable across restarts so the
    /// broker keeps the persistent session. A node of a cluster appends `-<node_id>`.
    pub client_id: Option<String>,
    /// In a cluster (`[cluster]`), the MQTT shared-subscription group the nodes read an
    /// external broker through (`$share/<group>/<filter>`): the broker hands each
    /// message to one of them. Default `sluice-<source name>`.
    pub share_group: Option<String>,
    /// Keep the session (subscriptions and queued QoS 1 messages) across reconnects.
    /// Default `true`.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
    /// User name, if the broker wants one. Default none.
    pub username: Option<String>,
    /// Password. Prefer `password_env`; a password here is never logged. Default none.
    pub password: Option<String>,
    /// Name of an environment variable holding the password. Default none.
    pub password_env: Option<String>,
    /// PEM file of CA certificates for `mqtts://`. Default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The stream this source feeds. Required.
    pub stream: String,
    /// How many events this source may take in (`[sources.<name>.limit]`). Default: no limit.
    #[serde(default)]
    pub limit: LimitConfig,
    /// If a message lacks the stream's key field, take it from this topic segment
    /// (0-based: `devices/<id>/telemetry` has the id at 1). Default none.
    pub key_from_topic_segment: Option<usize>,
    /// MQTT keep-alive. Default `"30s"`.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Duration,
    /// Acknowledge a QoS 1 message (PUBACK) only once it is fsynced to the source's
    /// write-ahead log, `<lake.dir>/_wal/<source>`; the broker redelivers what was not
    /// acknowledged, and a restart replays the log past the last checkpoint. Applies
    /// with `qos = 1`, `persistent_session = true`, an external broker and checkpoints
    /// on; otherwise messages are acknowledged on receipt. Default `true`.
    #[serde(default = "default_true")]
    pub durable_acks: bool,
}

impl MqttSourceConfig {
    /// Whether QoS 1 messages go through the write-ahead log (see `durable_acks`):
    /// the embedded broker dies with us, so a log would protect nothing there.
    pub fn uses_wal(&self, checkpoints_on: bool) -> bool {
        self.durable_acks
            && self.qos == 1
            && self.persistent_session
            && self.url != EMBEDDED_URL
            && checkpoints_on
    }
}

/// `[sources.<name>]` with `type = "kafka"`: a consumer group member reading topics.
/// Offsets are committed to Kafka only after the checkpoint that covers them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`. Required.
    pub brokers: String,
    /// Topics to read. Required.
    pub topics: Vec<String>,
    /// Consumer group. Default `sluice-<source name>`.
    pub group_id: Option<String>,
    /// Static group membership (KIP-345): a restart rejoins as the same member at once
    /// instead of waiting for the broker to expire the crashed one. Default
    /// `<source name>@<hostname>`; `""` for dynamic membership.
    pub group_instance_id: Option<String>,
    /// Where a partition without a checkpoint or group offset starts: `"earliest"`,
    /// `"latest"`, or an RFC 3339 time (`"2026-11-22T10:00:00Z"`). Default `"earliest"`.
    #[serde(default = "default_kafka_start")]
    pub start: String,
    /// Where a message lacking the stream's key field gets it: `"payload"` (nowhere
    /// else) or `"record_key"` (the Kafka record key). Default `"payload"`.
    #[serde(default = "default_kafka_key")]
    pub key: String,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`. Default `plaintext`.
    pub security_protocol: Option<String>,
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`. Default none.
    pub sasl_mechanism: Option<String>,
    /// SASL user name. Default none.
    pub sasl_username: Option<String>,
    /// Name of an environment variable holding the SASL password. Default none.
    pub sasl_password_env: Option<String>,
    /// PEM file of CA certificates for `ssl`/`sasl_ssl`. Default: the system's roots.
    pub ssl_ca_file: Option<PathBuf>,
    /// Further librdkafka consumer properties, passed through as given. Default none.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// The stream this source feeds. Required.
    pub stream: String,
    /// How many events this source may take in (`[sources.<name>.limit]`). Default: no limit.
    #[serde(default)]
    pub limit: LimitConfig,
    /// Set on the source a repartitioned stream's keyed work reads (never from a
    /// file): it skips a record whose `sluice-seq` header is not above the last one
    /// seen from its `sluice-origin` in that partition.
    #[serde(skip)]
    pub repartition: bool,
}

/// `[sources.<name>]` with `type = "kinesis"`: every shard of a Kinesis data stream.
/// Positions (sequence numbers per shard) live in the checkpoint manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisSourceConfig {
    /// The Kinesis stream's name or ARN. Required.
    pub kinesis_stream: String,
    /// AWS region. Default: the SDK's (environment, profile), else `us-east-1`.
    pub region: Option<String>,
    /// Endpoint override for local servers (`http://127.0.0.1:4566`). Default none.
    pub endpoint: Option<String>,
    /// Where a shard without a checkpoint starts: `"trim_horizon"`, `"latest"`, or an
    /// RFC 3339 time (AT_TIMESTAMP). Shards created by resharding always start at
    /// their beginning. Default `"trim_horizon"`.
    #[serde(default = "default_kinesis_start")]
    pub start: String,
    /// How often the shard list is re-read to pick up resharding. Default `"10s"`.
    #[serde(default = "default_shard_refresh")]
    pub shard_refresh: Duration,
    /// In a cluster (`[cluster]`), how long a node's shard lease lasts without renewal
    /// before another node may take the shard; renewed every third of it. Default `"10s"`.
    #[serde(default = "default_lease_time")]
    pub lease_time: Duration,
    /// The stream this source feeds. Required.
    pub stream: String,
    /// How many events this source may take in (`[sources.<name>.limit]`). Default: no limit.
    #[serde(default)]
    pub limit: LimitConfig,
}

fn default_kinesis_start() -> String {
    "trim_horizon".into()
}
fn default_lease_time() -> Duration {
    Duration::from_secs(10)
}
fn default_shard_refresh() -> Duration {
    Duration::from_secs(10)
}

/// Parses a Kinesis `start`: `None` for trim_horizon/latest, else the time's epoch ms.
pub fn parse_kinesis_start(start: &str) -> Result<Option<i64>, String> {
    match start {
        "trim_horizon" | "latest" => Ok(None),
        other => parse_rfc3339_ms(other).map(Some).ok_or_else(|| {
            format!("{other:?} is not \"trim_horizon\", \"latest\" or an RFC 3339 time")
        }),
    }
}

fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
}

fn default_kafka_start() -> String {
    "earliest".into()
}
fn default_kafka_key() -> String {
    "payload".into()
}

/// Parses a Kafka `start`: `None` for earliest/latest (librdkafka's own reset), else
/// the epoch milliseconds of the RFC 3339 time.
pub fn parse_kafka_start(start: &str) -> Result<Option<i64>, String> {
    match start {
        "earliest" | "latest" => Ok(None),
        other => parse_rfc3339_ms(other).map(Some).ok_or_else(|| {
            format!("{other:?} is not \"earliest\", \"latest\" or an RFC 3339 time")
        }),
    }
}

fn default_qos() -> u8 {
    1
}
fn default_true() -> bool {
    true
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

/// `[streams.<name>]`: a stream, which lands as the lake table of the same name. Give
/// either a built-in `schema` or your own `fields`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// How far behind the newest event seen an event may arrive and still count as on
    /// time for windows: the watermark is (largest event time − this). Default `"5s"`.
    #[serde(default = "default_out_of_orderness")]
    pub max_out_of_orderness: Duration,
    /// A source (one MQTT source, HTTP ingest, one file) that sends nothing for this
    /// long stops holding the watermark back. Default `"30s"`; `"0s"` turns it off.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// Whether the stream's own rows land in the lake table of its name. `false` keeps
    /// only what functions and windows make of them. Default `true`.
    #[serde(default = "yes")]
    pub store: bool,
    /// A built-in schema: `"telemetry"` or `"clickstream"` (DESIGN.md formats).
    pub schema: Option<String>,
    /// Declared fields, in column order, e.g.
    /// `[{ name = "ts", type = "timestamp", required = true }]`. Types: `string`,
    /// `float`, `int`, `bool`, `timestamp` (epoch ms or RFC 3339).
    #[serde(default)]
    pub fields: Vec<FieldConfig>,
    /// With `fields`: the event-time field (a required timestamp). Default `"ts"`.
    pub event_time: Option<String>,
    /// With `fields`: the key field (a string), e.g. the device id. Required with `fields`.
    pub key: Option<String>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            max_out_of_orderness: default_out_of_orderness(),
            idle_timeout: default_idle_timeout(),
            store: true,
            schema: None,
            fields: Vec::new(),
            event_time: None,
            key: None,
        }
    }
}

fn default_out_of_orderness() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn yes() -> bool {
    true
}

/// `[windows.<name>]`: event-time aggregates over one stream, landing in the lake table
/// `<name>` with columns: the `group_by` columns, `window_start`, `window_end`,
/// `version`, then the `select` items.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// The stream it reads: a declared stream or a function's output. Required.
    pub input: String,
    /// `"tumbling"` (`size`), `"hopping"` (`size`, `slide`) or `"session"` (`gap`). Required.
    pub kind: String,
    /// Window length, e.g. `"1m"` (tumbling, hopping).
    pub size: Option<Duration>,
    /// Distance between hopping window starts; `size` must be a multiple of it.
    pub slide: Option<Duration>,
    /// Inactivity that ends a session (session).
    pub gap: Option<Duration>,
    /// Columns to group by, e.g. `["device_id"]`. Default: none (one group).
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Only rows for which this SQL predicate holds are aggregated. Default: all rows.
    pub filter: Option<String>,
    /// SQL aggregate items, e.g. `["count(*) AS events", "max(temperature) AS t_max",
    /// "approx_percentile_cont(temperature, 0.99) AS t_p99"]`. Required.
    pub select: Vec<String>,
    /// How long after the watermark passes a window's end late rows still update it
    /// (it is emitted again with `version` + 1). Later rows go to the `late` table.
    /// Default `"0s"`.
    #[serde(default = "no_time")]
    pub allowed_lateness: Duration,
}

fn no_time() -> Duration {
    Duration::from_millis(0)
}

/// One declared field of a stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// JSON key and column name.
    pub name: String,
    /// `string`, `float`, `int`, `bool` or `timestamp`.
    #[serde(rename = "type")]
    pub ty: String,
    /// A message without it goes to `dead_letter` as `missing_field`. Default `false`.
    #[serde(default)]
    pub required: bool,
}

impl StreamConfig {
    /// The stream's schema: the built-in one, or one built from `fields`. The error
    /// names the key at fault (relative to the stream) and says what is wrong.
    pub fn build_schema(&self) -> Result<sluice_core::StreamSchema, (String, String)> {
        use sluice_core::schema::{FieldSpec, FieldType, StreamSchema};
        match (&self.schema, self.fields.is_empty()) {
            (Some(_), false) => Err((
                "fields".into(),
                "give either schema or fields, not both".into(),
            )),
            (Some(name), true) => StreamSchema::builtin(name).ok_or_else(|| {
                (
                    "schema".into(),
                    format!("{name:?} is not a built-in schema (\"telemetry\" or \"clickstream\")"),
                )
            }),
            (None, true) => Err((
                "schema".into(),
                "give a built-in schema or declare fields".into(),
            )),
            (None, false) => {
                let mut specs = Vec::new();
                for (i, f) in self.fields.iter().enumerate() {
                    let ty = FieldType::parse(&f.ty).ok_or_else(|| {
                        (
                            format!("fields[{i}].type"),
                            format!(
                                "{:?} is not one of string, float, int, bool, timestamp",
                                f.ty
                            ),
                        )
                    })?;
                    specs.push(FieldSpec::new(&f.name, ty, f.required));
                }
                let key = self
                    .key
                    .as_deref()
                    .ok_or_else(|| ("key".to_owned(), "is required with fields".to_owned()))?;
                let event_time = self.event_time.as_deref().unwrap_or("ts");
                StreamSchema::new(specs, event_time, key).map_err(|e| {
                    let at = match e {
                        sluice_core::schema::SchemaError::EventTime(_) => "event_time",
                        sluice_core::schema::SchemaError::Key(_) => "key",
                        sluice_core::schema::SchemaError::Name(_) => "fields",
                    };
                    (at.to_owned(), e.to_string())
                })
            }
        }
    }
}

impl Config {
    /// What `sluice run` does with no config file: the embedded broker, MQTT telemetry
    /// from `devices/+/telemetry` and clicks from `clicks/+`, the default windows
    /// (`device_minute`, `sessions`, `page_minute`), HTTP on 8080, the lake in
    /// `./sluice-data`. It is `config/examples/default.toml`, compiled in, so the file
    /// users start from is exactly what runs.
    pub fn embedded_default() -> Self {
        // A test parses the same text; a failure here is a build of a broken file.
        #[allow(clippy::expect_used)]
        Config::from_toml(DEFAULT_TOML).expect("config/examples/default.toml is valid")
    }

    /// A source that feeds a built-in stream (`telemetry`, `clicks`) no `[streams]`
    /// entry declares gets that stream and the default pipeline's windows and alert
    /// rules over it, as DESIGN.md promises a config with sources and no pipeline. A
    /// window or rule of the same name in the file wins; the default rule keeps its
    /// notifier only where the embedded broker runs and no `local` notifier is
    /// declared. Each stream filled adds one line to [`Config::notes`].
    pub(crate) fn fill_default_streams(&mut self) {
        let missing: BTreeMap<String, String> = self
            .sources
            .iter()
            .filter_map(|(name, s)| Some((s.stream()?.to_owned(), name.clone())))
            .filter(|(stream, _)| {
                !self.streams.contains_key(stream)
                    && matches!(stream.as_str(), "telemetry" | "clicks")
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        let default = Config::embedded_default();
        for (stream, source) in missing {
            let Some(decl) = default.streams.get(&stream) else {
                continue;
            };
            self.streams.insert(stream.clone(), decl.clone());
            let mut added = Vec::new();
            for (name, window) in default.windows.iter().filter(|(_, w)| w.input == stream) {
                if !self.windows.contains_key(name) {
                    self.windows.insert(name.clone(), window.clone());
                    added.push(format!("window {name}"));
                }
            }
            for (name, rule) in default.alerts.iter().filter(|(_, a)| a.input == stream) {
                if self.alerts.contains_key(name) {
                    continue;
                }
                let mut rule = rule.clone();
                let notify = self.broker.enabled && !self.notifiers.contains_key("local");
                if notify {
                    for n in &rule.notify {
                        if let Some(notifier) = default.notifiers.get(n) {
                            self.notifiers.insert(n.clone(), notifier.clone());
                        }
                    }
                    added.push(format!("alert {name} (notified on the embedded broker)"));
                } else {
                    rule.notify.clear();
                    added.push(format!("alert {name} (to the alerts table)"));
                }
                self.alerts.insert(name.clone(), rule);
            }
            let pipeline = if added.is_empty() {
                String::new()
            } else {
                format!(" with the default {}", added.join(", "))
            };
            self.notes.push(format!(
                "sources.{source}: stream {stream:?} has no [streams] entry: using the built-in {stream} stream{pipeline}"
            ));
        }
    }

    /// The streams whose keyed work goes through the repartition topic, on a node of a
    /// cluster with `[cluster.repartition]`: those MQTT or Kinesis sources feed, and
    /// those HTTP ingest alone feeds. Each with its origins: those sources and HTTP
    /// ingest ([`http_source`]).
    pub fn repartitioned_streams(&self) -> BTreeMap<String, Vec<String>> {
        let mut streams = BTreeMap::<String, Vec<String>>::new();
        if self
            .cluster
            .as_ref()
            .and_then(|c| c.repartition.as_ref())
            .is_none()
        {
            return streams;
        }
        for (name, source) in &self.sources {
            if let SourceConfig::Mqtt(MqttSourceConfig { stream, .. })
            | SourceConfig::Kinesis(KinesisSourceConfig { stream, .. }) = source
            {
                streams
                    .entry(stream.clone())
                    .or_default()
                    .push(name.clone());
            }
        }
        // So is every stream fed by HTTP ingest alone; one a Kafka source feeds is
        // keyed by its partitions already.
        for stream in self.streams.keys() {
            let from_kafka = self.sources.values().any(
                |s| matches!(s, SourceConfig::Kafka(k) if k.stream == *stream && !k.repartition),
            );
            if !from_kafka {
                streams.entry(stream.clone()).or_default();
            }
        }
        // HTTP ingest into such a stream is an origin too (logged; see `http_source`).
        for (stream, origins) in &mut streams {
            origins.push(http_source(stream));
        }
        streams
    }

    /// The streams whose HTTP ingest is logged before it answers: every stream with
    /// `[http] durable_acks` and checkpoints on, and every repartitioned one.
    pub fn logged_http_streams(&self) -> BTreeSet<String> {
        let mut streams: BTreeSet<String> = self.repartitioned_streams().into_keys().collect();
        if self.http.durable_acks && !self.lake.checkpoint_interval.0.is_zero() {
            streams.extend(self.streams.keys().cloned());
        }
        streams
    }

    /// Adds, for each repartitioned stream, the Kafka source
    /// `repartition-<stream>` that its keyed work reads (see [`RepartitionConfig`]);
    /// on a node of a cluster without `[cluster.repartition]`, notes that windows and
    /// rules over MQTT see only this node's share of each device, and those over
    /// Kinesis one state per node.
    pub(crate) fn fill_repartition(&mut self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Some(r) = cluster.repartition.clone() else {
            let keyed = !self.windows.is_empty() || !self.alerts.is_empty();
            let has = |kind: fn(&SourceConfig) -> bool| keyed && self.sources.values().any(kind);
            if has(|s| matches!(s, SourceConfig::Mqtt(_))) {
                self.notes.push(
                    "cluster: MQTT messages are spread over the nodes, so windows and alert rules over them see only this node's share of each device; [cluster.repartition] keys them through a Kafka topic".into(),
                );
            }
            if has(|s| matches!(s, SourceConfig::Kinesis(_))) {
                self.notes.push(
                    "cluster: windows and alert rules over Kinesis keep one state per node, which is right only while each device's shard stays on one node (no node lost, no split); [cluster.repartition] keys them through a Kafka topic".into(),
                );
            }
            return;
        };
        for (stream, origins) in self.repartitioned_streams() {
            let name = format!("{REPARTITION_SOURCE_PREFIX}{stream}");
            let topic = format!("{}{stream}", r.topic_prefix);
            if self.sources.contains_key(&name) {
                continue; // validate() names the clash
            }
            self.notes.push(format!(
                "cluster.repartition: stream {stream:?} (from {}) is stored where it arrives and published to Kafka topic {topic:?}; its windows, rules and functions read that topic as source {name:?}",
                origins.join(", ")
            ));
            self.sources.insert(
                name,
                SourceConfig::Kafka(KafkaSourceConfig {
                    brokers: r.brokers.clone(),
                    group_id: Some(topic.clone()),
                    topics: vec![topic],
                    group_instance_id: None,
                    start: default_kafka_start(),
                    key: default_kafka_key(),
                    security_protocol: None,
                    sasl_mechanism: None,
                    sasl_username: None,
                    sasl_password_env: None,
                    ssl_ca_file: None,
                    properties: BTreeMap::new(),
                    stream,
                    limit: LimitConfig::default(),
                    repartition: true,
                }),
            );
        }
    }

    /// Checks what the types cannot; returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut err = |key: String, message: String| errors.push(ConfigError { key, message });
        if self.http.listen.parse::<SocketAddr>().is_err() {
            err(
                "http.listen".into(),
                format!(
                    "{:?} is not an address like \"127.0.0.1:8080\"",
                    self.http.listen
                ),
            );
        }
        for (k, message) in self.http.limit.problems() {
            err(format!("http.limit.{k}"), message);
        }
        // Nothing reachable from another machine without a way to tell who calls.
        let public = |addr: &str| {
            addr.parse::<SocketAddr>()
                .is_ok_and(|a| !a.ip().is_loopback())
        };
        if public(&self.http.listen)
            && self.http.tokens.is_empty()
            && self.http.tokens_file.is_none()
            && self.http.jwt.is_none()
            && !self.http.allow_unauthenticated
        {
            err(
                "http.listen".into(),
                format!(
                    "{:?} is not a loopback address and no [[http.tokens]] are configured: anyone who reaches it could query and ingest; add tokens (`sluice token`) or set http.allow_unauthenticated = true",
                    self.http.listen
                ),
            );
        }
        if self.broker.enabled {
            for (k, message) in self.broker.problems(&public) {
                err(format!("broker.{k}"), message);
            }
        }
        for (i, token) in self.http.tokens.iter().enumerate() {
            for (k, message) in token.problems() {
                err(format!("http.tokens[{i}].{k}"), message);
            }
        }
        if let Some(Err(problems)) = self.http.tokens_file.as_deref().map(TokenConfig::read_file) {
            for message in problems {
                err("http.tokens_file".into(), message);
            }
        }
        if self.lake.roll_size.0 == 0 {
            err("lake.roll_size".into(), "must be larger than 0".into());
        }
        if let Some(id) = self.cluster.as_ref().and_then(|c| c.node_id.as_deref())
            && !ClusterConfig::valid_node_id(id)
        {
            err(
                "cluster.node_id".into(),
                format!("{id:?}: use 1 to 64 letters, digits, '-' and '_'"),
            );
        }
        if let Some(r) = self.cluster.as_ref().and_then(|c| c.repartition.as_ref()) {
            let checkpoints_on = !self.lake.checkpoint_interval.0.is_zero();
            if !checkpoints_on && !self.repartitioned_streams().is_empty() {
                err(
                    "lake.checkpoint_interval".into(),
                    "[cluster.repartition] needs checkpoints on: HTTP ingest into a repartitioned stream is replayed from its write-ahead log past the last checkpoint".into(),
                );
            }
            for source in self.repartitioned_streams().values().flatten() {
                match self.sources.get(source) {
                    Some(SourceConfig::Mqtt(m)) if !m.uses_wal(checkpoints_on) => err(
                        format!("sources.{source}"),
                        "a repartitioned source needs its write-ahead log (its sequence numbers let the repartition topic's readers skip a replay): qos = 1, durable_acks and persistent_session on, an external broker, checkpoints on".into(),
                    ),
                    Some(SourceConfig::Kinesis(_)) if !checkpoints_on => err(
                        format!("sources.{source}"),
                        "a repartitioned Kinesis source needs checkpoints on (lake.checkpoint_interval): a shard is read again from its checkpointed position, and the repartition topic's readers skip what was published before".into(),
                    ),
                    _ => {}
                }
            }
            if r.brokers.trim().is_empty() {
                err(
                    "cluster.repartition.brokers".into(),
                    "must name at least one broker (host:port)".into(),
                );
            }
            if !(1..=10_000).contains(&r.partitions) {
                err(
                    "cluster.repartition.partitions".into(),
                    format!("{}: must be 1 to 10000", r.partitions),
                );
            }
            if !r
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                err(
                    "cluster.repartition.topic_prefix".into(),
                    format!(
                        "{:?}: a Kafka topic name takes letters, digits, '.', '_' and '-'",
                        r.topic_prefix
                    ),
                );
            }
        }
        if let Some(limit) = &self.lake.limit {
            for (k, message) in limit.rate_only_problems() {
                err(format!("lake.limit.{k}"), message);
            }
        }
        let dir = self.lake.dir.to_string_lossy();
        if let Some(rest) = dir.strip_prefix("s3://")
            && rest.split('/').next().is_none_or(str::is_empty)
        {
            err(
                "lake.dir".into(),
                format!("{dir:?} names no bucket; write s3://bucket/prefix"),
            );
        } else if dir.contains("://") && !self.lake.is_s3() {
            err(
                "lake.dir".into(),
                format!("{dir:?}: only local paths and s3://bucket/prefix are supported"),
            );
        }
        if let Some(endpoint) = &self.lake.s3.endpoint
            && endpoint.starts_with("http://")
            && !self.lake.s3.allow_http
        {
            err(
                "lake.s3.endpoint".into(),
                format!("{endpoint:?} is plain http; set lake.s3.allow_http = true to allow it"),
            );
        }
        if self.lake.maintenance.target_size.0 == 0 {
            err(
                "lake.maintenance.target_size".into(),
                "must be larger than 0".into(),
            );
        }
        if self.lake.maintenance.memory.0 < 32_000_000 {
            err(
                "lake.maintenance.memory".into(),
                "must be at least 32MB (a compaction's sort merges its spilled runs in it)".into(),
            );
        }
        if self.lake.maintenance.interval.0.is_zero() {
            err(
                "lake.maintenance.interval".into(),
                "must be longer than 0s".into(),
            );
        }
        for (table, keep) in &self.lake.retain {
            if keep.0.is_zero() {
                err(
                    format!("lake.retain.{table}"),
                    "must be longer than 0s (leave the table out to keep everything)".into(),
                );
            }
        }
        if self.lake.roll_interval.0.is_zero() {
            err("lake.roll_interval".into(), "must be longer than 0s".into());
        }
        if self.lake.row_group_rows == 0 {
            err("lake.row_group_rows".into(), "must be at least 1".into());
        }
        if !(1..=22).contains(&self.lake.zstd_level) {
            err(
                "lake.zstd_level".into(),
                format!("{} is outside 1..=22", self.lake.zstd_level),
            );
        }
        if self.decode.batch_rows == 0 {
            err("decode.batch_rows".into(), "must be at least 1".into());
        }
        if self.runtime.workers == Some(0) {
            err("runtime.workers".into(), "must be at least 1".into());
        }
        if self.decode.max_depth == 0 {
            err("decode.max_depth".into(), "must be at least 1".into());
        }
        if self.decode.flush_interval.0.is_zero() {
            err(
                "decode.flush_interval".into(),
                "must be longer than 0s".into(),
            );
        }
        for (name, stream) in &self.streams {
            if let Err((key, message)) = stream.build_schema() {
                err(format!("streams.{name}.{key}"), message);
            }
            if !valid_table_name(name) {
                err(format!("streams.{name}"), "a stream name must be lower-case letters, digits and '_', starting with a letter, and not \"dead_letter\"".into());
            }
        }
        for (name, function) in &self.functions {
            let key = |k: &str| format!("functions.{name}.{k}");
            let targets = function.output.iter().map(|o| (key("output"), o)).chain(
                function
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (key(&format!("routes[{i}].to")), &r.to)),
            );
            for (k, stream) in targets {
                if !valid_table_name(stream) {
                    err(
                        k,
                        format!(
                            "{stream:?} is not a valid stream name (lower-case letters, digits, '_')"
                        ),
                    );
                } else if self.streams.contains_key(stream) {
                    err(
                        k,
                        format!(
                            "{stream:?} is a declared input stream; a function writes to a new stream"
                        ),
                    );
                }
            }
            if let Some(limit) = &function.limit {
                for (k, message) in limit.rate_only_problems() {
                    err(key(&format!("limit.{k}")), message);
                }
            }
            if !(1..=64).contains(&function.concurrency) {
                err(
                    key("concurrency"),
                    format!("{} is outside 1..=64", function.concurrency),
                );
            }
            if function.output.is_none() && function.routes.is_empty() {
                err(
                    key("output"),
                    "a function needs an output or at least one route".into(),
                );
            }
        }
        for (name, window) in &self.windows {
            let key = |k: &str| format!("windows.{name}.{k}");
            if !valid_table_name(name) {
                err(format!("windows.{name}"), "a window name is its table name: lower-case letters, digits and '_', starting with a letter, not \"dead_letter\" or \"late\"".into());
            } else if self.streams.contains_key(name)
                || self.functions.values().any(|f| {
                    f.output.as_deref() == Some(name) || f.routes.iter().any(|r| &r.to == name)
                })
            {
                err(
                    format!("windows.{name}"),
                    format!("{name:?} is already a stream; a window writes its own table"),
                );
            }
            // Windows count in milliseconds: a shorter size, slide or gap is none.
            let positive = |d: Option<Duration>| d.is_some_and(|d| d.0.as_millis() > 0);
            match window.kind.as_str() {
                "tumbling" => {
                    if !positive(window.size) {
                        err(key("size"), "a tumbling window needs a size of 1ms or more, e.g. \"1m\"".into());
                    }
                }
                "hopping" => match (window.size, window.slide) {
                    (Some(size), Some(slide)) if positive(Some(size)) && positive(Some(slide)) => {
                        if size.0.as_millis() % slide.0.as_millis() != 0 {
                            err(key("slide"), format!("size ({}) must be a multiple of slide ({})", size, slide));
                        }
                    }
                    _ => err(key("slide"), "a hopping window needs a size and a slide of 1ms or more, e.g. size = \"1h\", slide = \"1m\"".into()),
                },
                "session" => {
                    if !positive(window.gap) {
                        err(key("gap"), "a session window needs a gap of 1ms or more, e.g. \"30m\"".into());
                    }
                }
                other => err(key("kind"), format!("{other:?} is not a window kind; expected tumbling, hopping or session")),
            }
            if window.select.is_empty() {
                err(
                    key("select"),
                    "a window needs at least one aggregate".into(),
                );
            }
        }
        for (name, source) in &self.sources {
            let key = |k: &str| format!("sources.{name}.{k}");
            let synthesized = matches!(source, SourceConfig::Kafka(k) if k.repartition);
            if name.starts_with(REPARTITION_SOURCE_PREFIX) && !synthesized {
                err(
                    format!("sources.{name}"),
                    format!(
                        "source names starting with {REPARTITION_SOURCE_PREFIX:?} are reserved for [cluster.repartition]"
                    ),
                );
            }
            for (k, message) in source.limit().problems() {
                err(key(&format!("limit.{k}")), message);
            }
            match source.stream() {
                Some(s) if self.streams.contains_key(s) => {}
                Some(s) => err(
                    key("stream"),
                    format!("stream {s:?} is not declared under [streams]"),
                ),
                None => err(key("stream"), "is required".into()),
            }
            match source {
                SourceConfig::Mqtt(m) => {
                    if m.url == EMBEDDED_URL {
                        if !self.broker.enabled {
                            err(
                                key("url"),
                                "\"embedded\" needs [broker] enabled = true".into(),
                            );
                        }
                    } else if let Err(problem) = parse_mqtt_url(&m.url) {
                        err(key("url"), problem);
                    }
                    if m.topics.is_empty() {
                        err(key("topics"), "needs at least one topic filter".into());
                    }
                    for t in &m.topics {
                        if !valid_topic_filter(t) {
                            err(
                                key("topics"),
                                format!("{t:?} is not a valid MQTT topic filter"),
                            );
                        }
                    }
                    if m.qos > 1 {
                        err(
                            key("qos"),
                            format!("{} is not supported; use 0 or 1", m.qos),
                        );
                    }
                    if m.password.is_some() && m.password_env.is_some() {
                        err(
                            key("password_env"),
                            "set password or password_env, not both".into(),
                        );
                    }
                    if m.keep_alive.0.as_secs() < 5 {
                        err(key("keep_alive"), "must be at least 5s".into());
                    }
                    if let Some(group) = &m.share_group
                        && (group.is_empty() || group.contains(['/', '+', '#']))
                    {
                        err(
                            key("share_group"),
                            format!("{group:?} must be non-empty, without '/', '+' or '#'"),
                        );
                    }
                }
                SourceConfig::Kafka(k) => {
                    if k.brokers.trim().is_empty() {
                        err(key("brokers"), "needs at least one host:port".into());
                    }
                    if k.topics.is_empty() || k.topics.iter().any(|t| t.is_empty()) {
                        err(key("topics"), "needs at least one non-empty topic".into());
                    }
                    if let Err(problem) = parse_kafka_start(&k.start) {
                        err(key("start"), problem);
                    }
                    if !matches!(k.key.as_str(), "payload" | "record_key") {
                        err(
                            key("key"),
                            format!("{:?} is not \"payload\" or \"record_key\"", k.key),
                        );
                    }
                    if let Some(p) = &k.security_protocol
                        && !matches!(
                            p.as_str(),
                            "plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl"
                        )
                    {
                        err(
                            key("security_protocol"),
                            format!("{p:?} is not plaintext, ssl, sasl_plaintext or sasl_ssl"),
                        );
                    }
                    if k.sasl_password_env.is_some() && k.sasl_username.is_none() {
                        err(
                            key("sasl_username"),
                            "is required with sasl_password_env".into(),
                        );
                    }
                }
                SourceConfig::Kinesis(k) => {
                    if k.kinesis_stream.trim().is_empty() {
                        err(key("kinesis_stream"), "needs a stream name or ARN".into());
                    }
                    if let Err(problem) = parse_kinesis_start(&k.start) {
                        err(key("start"), problem);
                    }
                    if let Some(e) = &k.endpoint
                        && !(e.starts_with("http://") || e.starts_with("https://"))
                    {
                        err(
                            key("endpoint"),
                            format!("{e:?} must start with http:// or https://"),
                        );
                    }
                    if k.shard_refresh.0.as_secs() < 1 {
                        err(key("shard_refresh"), "must be at least 1s".into());
                    }
                    if k.lease_time.0.as_secs() < 1 {
                        err(key("lease_time"), "must be at least 1s".into());
                    }
                }
            }
        }
        self.validate_alerts(&mut err);
        self.validate_guard(&mut err);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The `[alerts]`, `[notifiers]` and `[alerting]` part of [`Config::validate`].
    fn validate_alerts(&self, err: &mut impl FnMut(String, String)) {
        for (name, rule) in &self.alerts {
            let key = |k: &str| format!("alerts.{name}.{k}");
            if !valid_table_name(name) {
                err(
                    format!("alerts.{name}"),
                    "a rule name must be lower-case letters, digits and '_', starting with a letter".into(),
                );
            }
            match (&rule.condition, rule.missing_after) {
                (Some(_), Some(_)) => err(
                    key("missing_after"),
                    "a rule has a condition or missing_after, not both; declare two rules".into(),
                ),
                (None, None) => err(
                    key("condition"),
                    "a rule needs a condition (e.g. \"temperature > 80\") or missing_after".into(),
                ),
                (None, Some(d)) if d.0.is_zero() => {
                    err(key("missing_after"), "must be longer than 0s".into())
                }
                _ => {}
            }
            match (rule.fire_for, rule.of) {
                (Some(FireFor::Count(0)), _) => err(key("for"), "must be at least 1".into()),
                (Some(FireFor::Duration(d)), _) if d.0.is_zero() => {
                    err(key("for"), "must be longer than 0s".into())
                }
                (Some(FireFor::Duration(_)), Some(_)) => err(
                    key("of"),
                    "M-of-N needs a count in `for`, not a duration".into(),
                ),
                (count, Some(n)) => {
                    let m = match count {
                        Some(FireFor::Count(m)) => m,
                        _ => 1,
                    };
                    if n < m || n > 64 {
                        err(key("of"), format!("{n} must be between `for` ({m}) and 64"));
                    }
                }
                (Some(FireFor::Count(m)), None) if m > 64 => {
                    err(key("for"), format!("{m} is more than 64 evaluations"))
                }
                _ => {}
            }
            if !(1..=64).contains(&rule.clear_for) {
                err(
                    key("clear_for"),
                    format!("{} is outside 1..=64", rule.clear_for),
                );
            }
            if rule.missing_after.is_some() && (rule.clear.is_some() || rule.value.is_some()) {
                err(
                    key("clear"),
                    "a missing-data rule resolves when the key reports again; clear and value do not apply".into(),
                );
            }
            for n in &rule.notify {
                if !self.notifiers.contains_key(n) {
                    err(
                        key("notify"),
                        format!("{n:?} is not declared under [notifiers]"),
                    );
                }
            }
        }
        for (name, notifier) in &self.notifiers {
            let key = |k: &str| format!("notifiers.{name}.{k}");
            if !(1..=64).contains(&notifier.concurrency()) {
                err(
                    key("concurrency"),
                    format!("{} is outside 1..=64", notifier.concurrency()),
                );
            }
            if let Some(limit) = notifier.limit() {
                for (k, message) in limit.problems() {
                    err(key(&format!("limit.{k}")), message);
                }
                if limit.rate.is_none() {
                    err(key("limit.rate"), "a notifier's limit needs a rate".into());
                }
                if limit.per_key_rate.is_some() {
                    err(
                        key("limit.per_key_rate"),
                        "per-key limits belong to sources".into(),
                    );
                }
            }
            let queue = match notifier {
                NotifierConfig::Mqtt(m) => {
                    if m.url == EMBEDDED_URL {
                        if !self.broker.enabled {
                            err(
                                key("url"),
                                "\"embedded\" needs [broker] enabled = true".into(),
                            );
                        }
                    } else if let Err(problem) = parse_mqtt_url(&m.url) {
                        err(key("url"), problem);
                    }
                    if m.qos > 1 {
                        err(
                            key("qos"),
                            format!("{} is not supported; use 0 or 1", m.qos),
                        );
                    }
                    if m.topic.is_empty() || m.topic.contains(['+', '#']) {
                        err(
                            key("topic"),
                            format!("{:?} is not a topic to publish to", m.topic),
                        );
                    }
                    m.queue
                }
                NotifierConfig::Webhook(w) => {
                    if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                        err(
                            key("url"),
                            format!("{:?} must start with http:// or https://", w.url),
                        );
                    }
                    if w.timeout.0.is_zero() {
                        err(key("timeout"), "must be longer than 0s".into());
                    }
                    if w.breaker_failures == 0 {
                        err(key("breaker_failures"), "must be at least 1".into());
                    }
                    w.queue
                }
                NotifierConfig::Kafka(k) => {
                    if k.brokers.trim().is_empty() {
                        err(key("brokers"), "needs at least one host:port".into());
                    }
                    if k.topic.is_empty() {
                        err(key("topic"), "is required".into());
                    }
                    k.queue
                }
            };
            if !(1..=crate::MAX_QUEUE).contains(&queue) {
                err(
                    key("queue"),
                    format!("{queue} is outside 1..={}", crate::MAX_QUEUE),
                );
            }
        }
        if self.alerting.max_notifications_per_second == 0 {
            err(
                "alerting.max_notifications_per_second".into(),
                "must be at least 1".into(),
            );
        }
        if self.alerting.burst == 0 {
            err("alerting.burst".into(), "must be at least 1".into());
        }
    }
}

/// Whether `name` can be a lake table directory.
pub fn valid_table_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name != "dead_letter"
        && name != "late"
        && name != "alerts"
}

/// Splits `mqtt://host:port` or `mqtts://host:port` into (tls, host, port).
pub fn parse_mqtt_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "{url:?} must start with mqtt:// or mqtts:// (or be \"embedded\")"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => return Err(format!("{url:?} has a bad port {p:?}")),
        },
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((
        tls,
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

/// MQTT topic-filter rules: `#` only last and alone in its level, `+` alone in its level.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| {
        (!level.contains('#') || (*level == "#" && i == levels.len() - 1))
            && (!level.contains('+') || *level == "+")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::embedded_default();
        config.validate().expect("valid");
        assert!(config.notes.is_empty(), "{:?}", config.notes);
    }

    #[test]
    fn a_source_of_a_built_in_stream_gets_the_default_pipeline_over_it() {
        let config = Config::from_toml(
            r#"
[sources.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["devices/+/telemetry"]
stream = "telemetry"

[windows.device_minute]
input = "telemetry"
kind = "tumbling"
size = "5m"
group_by = ["device_id"]
select = ["count(*) AS events"]
"#,
        )
        .expect("a source alone is a config");
        let default = Config::embedded_default();
        assert!(config.streams.contains_key("telemetry"));
        assert!(
            !config.streams.contains_key("clicks"),
            "only the streams sources name"
        );
        // The file's window wins over the default of the same name.
        assert_eq!(
            config.windows["device_minute"].size,
            Some(Duration(std::time::Duration::from_secs(300)))
        );
        assert!(
            config
                .windows
                .keys()
                .all(|w| config.windows[w].input == "telemetry")
        );
        // No embedded broker in a file: the rule writes the alerts table only.
        let rule = &config.alerts["temperature_high"];
        assert_eq!(rule.condition, default.alerts["temperature_high"].condition);
        assert!(rule.notify.is_empty() && config.notifiers.is_empty());
        assert_eq!(
            config.notes,
            [
                "sources.plant: stream \"telemetry\" has no [streams] entry: using the built-in telemetry stream with the default alert temperature_high (to the alerts table)"
            ]
        );
        // A stream that is not built in is still an error naming the key.
        let errors = Config::from_toml(
            "[sources.x]\ntype = \"mqtt\"\nurl = \"mqtt://h:1883\"\ntopics = [\"a\"]\nstream = \"orders\"\n",
        )
        .unwrap_err();
        assert!(
            errors.iter().any(|e| e.key == "sources.x.stream"),
            "{errors:?}"
        );
    }

    #[test]
    fn urls_and_filters() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884"),
            Ok((false, "127.0.0.1".into(), 1884))
        );
        assert_eq!(
            parse_mqtt_url("mqtts://broker"),
            Ok((true, "broker".into(), 8883))
        );
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("mqtt://x:port").is_err());
        assert!(valid_topic_filter("devices/+/telemetry"));
        assert!(valid_topic_filter("#"));
        assert!(!valid_topic_filter("a/#/b"));
        assert!(!valid_topic_filter("a/b+"));
        assert!(valid_table_name("device_minute"));
        assert!(!valid_table_name("Dev"));
        assert!(!valid_table_name("dead_letter"));
    }
}
