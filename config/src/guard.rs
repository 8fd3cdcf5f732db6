//! `[limits]` (the loop guard's `max_hops`), `[publish.<name>]` (a stream's rows sent
//! out through a notifier), and the warning `sluice check` gives when the config wires
//! an output back into one of its own inputs.

use serde::Deserialize;

use crate::load::ConfigError;
use crate::model::{Config, EMBEDDED_URL, LimitMode, NotifierConfig, SourceConfig};
use crate::units::ByteSize;

/// `[limits]`: protection across the whole pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Batches waiting between the sources and the lake task, at most. Default 64; a
    /// bounded run (`--from-file`) queues at most 4.
    pub queue_batches: usize,
    /// Arrow memory of those batches, at most: a full queue makes sources wait (Kafka
    /// and Kinesis poll no more, MQTT leaves messages with the broker). Default "256MB".
    pub queue_bytes: ByteSize,
    /// Payload bytes an MQTT source holds between its connection and its decoder, at
    /// most (besides 4,096 messages): when full, the source stops reading its socket,
    /// so the broker holds the rest. Per source. Default "64MB".
    pub source_queue_bytes: ByteSize,
    /// Notification bytes queued for one notifier, at most (besides its `queue` count):
    /// past it, notifications to it are dropped and counted
    /// (`outcome="dropped_queue_full"`). Per notifier. Default "64MB".
    pub notifier_queue_bytes: ByteSize,
    /// Encoded Parquet held in memory (open files, and sealed files the store has not
    /// taken yet), at most: past it the lake task takes no more batches until the
    /// store takes files again, so a stalled disk or bucket throttles the sources
    /// instead of growing memory. Default "512MB".
    pub lake_backlog: ByteSize,
    /// Memory of all window state together, at most (measured every 250 ms): past
    /// it, windows take rows only of keys they already hold (in the row's pane, or
    /// with an open session); rows of new keys go to `dead_letter` with reason
    /// `state_budget` (the stream's own table still gets them). Windows keep closing
    /// and emitting, which frees state. Default "1GB".
    pub window_state: ByteSize,
    /// How many function hops an event may make, counted in its `_hops` column and
    /// carried through published rows (payload field `_hops`, Kafka header
    /// `sluice-hops`). A function output or an arriving message over it is stopped:
    /// dead-lettered as `loop_detected`, counted, and raised as a `loop_detected`
    /// event in the `alerts` table. 1 to 254. Default 16 (as Lambda's loop detection).
    pub max_hops: u8,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            queue_batches: 64,
            queue_bytes: ByteSize(256 << 20),
            source_queue_bytes: ByteSize(64 << 20),
            notifier_queue_bytes: ByteSize(64 << 20),
            lake_backlog: ByteSize(512 << 20),
            window_state: ByteSize(1 << 30),
            max_hops: 16,
        }
    }
}

/// `[publish.<name>]`: every row of a stream (a declared stream, a function's output
/// or a window table) published as one JSON object through a notifier (MQTT, Kafka or
/// webhook), with its queue, retries and breaker. System columns other than `_hops`
/// are left out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// The stream or window table whose rows are published. Required.
    pub input: String,
    /// The `[notifiers.<name>]` they go through. Required.
    pub notifier: String,
}

impl Config {
    /// The `[limits]` and `[publish]` part of [`Config::validate`].
    pub(crate) fn validate_guard(&self, err: &mut impl FnMut(String, String)) {
        if !(1..=254).contains(&self.limits.max_hops) {
            err(
                "limits.max_hops".into(),
                format!("{} is outside 1..=254", self.limits.max_hops),
            );
        }
        if !(1..=crate::MAX_QUEUE).contains(&self.limits.queue_batches) {
            err(
                "limits.queue_batches".into(),
                format!(
                    "{} is outside 1..={}",
                    self.limits.queue_batches,
                    crate::MAX_QUEUE
                ),
            );
        }
        for (key, bytes) in [
            ("queue_bytes", self.limits.queue_bytes),
            ("source_queue_bytes", self.limits.source_queue_bytes),
            ("notifier_queue_bytes", self.limits.notifier_queue_bytes),
        ] {
            if !(64_000..=u32::MAX as usize).contains(&bytes.as_usize()) {
                err(
                    format!("limits.{key}"),
                    "must be between 64KB and 4GB".into(),
                );
            }
        }
        if self.limits.window_state.as_usize() == 0 {
            err("limits.window_state".into(), "must be larger than 0".into());
        }
        if self.limits.lake_backlog.as_usize() < 64_000 {
            err("limits.lake_backlog".into(), "must be at least 64KB".into());
        }
        for (name, publish) in &self.publish {
            if !self.notifiers.contains_key(&publish.notifier) {
                err(
                    format!("publish.{name}.notifier"),
                    format!(
                        "{:?} is not a [notifiers.<name>] of this config",
                        publish.notifier
                    ),
                );
            }
        }
    }

    /// What is valid but worth a look:
    /// - outputs wired back into inputs: a `[publish]` or an alert rule whose notifier
    ///   sends to a topic a source of this config reads (a deliberate loop ends after
    ///   `max_hops`);
    /// - a per-key limit in `block` mode on a source: holding one key holds every key
    ///   behind it on the same connection or partition.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let outputs = self
            .publish
            .iter()
            .map(|(name, p)| (format!("publish.{name}.notifier"), &p.notifier))
            .chain(self.alerts.iter().flat_map(|(name, rule)| {
                rule.notify
                    .iter()
                    .map(move |n| (format!("alerts.{name}.notify"), n))
            }));
        let mut warnings = Vec::new();
        for (key, notifier) in outputs {
            let Some(target) = self.notifiers.get(notifier) else {
                continue;
            };
            let sources = self
                .sources
                .iter()
                .filter_map(|(name, config)| {
                    reads_back(target, config).map(|read| (format!("sources.{name}"), read))
                })
                .chain(self.ingests_back(target));
            for (reader, read) in sources {
                warnings.push(ConfigError {
                    key: key.clone(),
                    message: format!(
                        "notifier {notifier:?} publishes to {read}, which {reader} reads: \
                         its output comes back as input (a loop, stopped after limits.max_hops = {} hops)",
                        self.limits.max_hops
                    ),
                });
            }
        }
        for (name, source) in &self.sources {
            if source.limit().per_key_mode == LimitMode::Block
                && source.limit().per_key_rate.is_some()
            {
                warnings.push(ConfigError {
                    key: format!("sources.{name}.limit.per_key_mode"),
                    message: "\"block\" holds a key's events over its rate, and with them every event behind them on the same connection or partition, other keys' included; \"shed\" keeps the other keys flowing".into(),
                });
            }
        }
        warnings
    }
}

impl Config {
    /// A webhook posting to this service's own HTTP ingest.
    fn ingests_back(&self, target: &NotifierConfig) -> Option<(String, String)> {
        let NotifierConfig::Webhook(w) = target else {
            return None;
        };
        let port = self.http.listen.rsplit(':').next()?;
        let url = w.url.replace("localhost", "127.0.0.1");
        let own = [
            format!("http://{}/api/ingest/", self.http.listen),
            format!("http://127.0.0.1:{port}/api/ingest/"),
        ];
        own.iter()
            .any(|prefix| url.starts_with(prefix))
            .then(|| ("HTTP ingest".to_owned(), format!("{:?}", w.url)))
    }
}

/// How `source` reads what `target` sends, if it does.
fn reads_back(target: &NotifierConfig, source: &SourceConfig) -> Option<String> {
    match (target, source) {
        (NotifierConfig::Mqtt(n), SourceConfig::Mqtt(s)) if same_broker(&n.url, &s.url) => s
            .topics
            .iter()
            .find(|filter| filter_may_match(filter, &n.topic))
            .map(|filter| format!("topic {:?} (filter {filter:?})", n.topic)),
        (NotifierConfig::Kafka(n), SourceConfig::Kafka(s))
            if same_brokers(&n.brokers, &s.brokers) && s.topics.contains(&n.topic) =>
        {
            Some(format!("Kafka topic {:?}", n.topic))
        }
        _ => None,
    }
}

fn same_broker(a: &str, b: &str) -> bool {
    let norm = |u: &str| {
        if u == EMBEDDED_URL {
            EMBEDDED_URL.to_owned()
        } else {
            u.trim_end_matches('/').replace("localhost", "127.0.0.1")
        }
    };
    norm(a) == norm(b)
}

fn same_brokers(a: &str, b: &str) -> bool {
    let set = |s: &str| {
        let mut v: Vec<String> = s
            .split(',')
            .map(|b| b.trim().replace("localhost", "127.0.0.1"))
            .collect();
        v.sort();
        v
    };
    set(a) == set(b)
}

/// Whether MQTT `filter` may match a topic rendered from `template`, whose `{column}`
/// segments may become anything.
fn filter_may_match(filter: &str, template: &str) -> bool {
    let mut topic = template.split('/');
    for level in filter.split('/') {
        match (level, topic.next()) {
            ("#", _) => return true,
            (_, None) => return false,
            ("+", Some(_)) => {}
            (_, Some(t)) if t.contains('{') => {}
            (l, Some(t)) if l == t => {}
            _ => return false,
        }
    }
    topic.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_templates_with_placeholders_as_any_segment() {
        assert!(filter_may_match(
            "devices/+/telemetry",
            "devices/{device_id}/telemetry"
        ));
        assert!(filter_may_match("devices/#", "devices/x/telemetry"));
        assert!(filter_may_match("#", "a"));
        assert!(filter_may_match(
            "devices/dev-1/telemetry",
            "devices/{id}/telemetry"
        ));
        assert!(!filter_may_match(
            "devices/+/telemetry",
            "alerts/{rule}/{key}"
        ));
        assert!(!filter_may_match("devices/+", "devices/{id}/telemetry"));
        assert!(!filter_may_match(
            "devices/+/telemetry/x",
            "devices/{id}/telemetry"
        ));
    }

    /// The one warning of a valid config.
    fn only_warning(toml: &str) -> ConfigError {
        let mut warnings = Config::from_toml(toml).expect("valid").warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        warnings.remove(0)
    }

    #[test]
    fn a_publish_back_into_a_source_topic_is_a_warning_not_an_error() {
        let warning = only_warning(
            r#"
[broker]
enabled = true
[sources.plant]
type = "mqtt"
url = "embedded"
topics = ["devices/+/telemetry"]
stream = "telemetry"
[streams.telemetry]
schema = "telemetry"
[functions.echo]
input = "telemetry"
output = "echo"
[notifiers.back]
type = "mqtt"
topic = "devices/{device_id}/telemetry"
[notifiers.elsewhere]
type = "mqtt"
topic = "out/{device_id}"
[publish.back]
input = "echo"
notifier = "back"
[publish.out]
input = "echo"
notifier = "elsewhere"
"#,
        );
        assert_eq!(warning.key, "publish.back.notifier");
        assert!(warning.message.contains("sources.plant"));
    }

    #[test]
    fn a_webhook_into_our_own_http_ingest_is_a_warning() {
        let warning = only_warning(
            r#"
[http]
listen = "127.0.0.1:8080"
[streams.telemetry]
schema = "telemetry"
[notifiers.hook]
type = "webhook"
url = "http://localhost:8080/api/ingest/telemetry"
[publish.back]
input = "telemetry"
notifier = "hook"
"#,
        );
        assert!(warning.message.contains("HTTP ingest"));
    }

    #[test]
    fn publish_and_limits_problems_name_their_keys() {
        let errors = Config::from_toml(
            r#"
[lake]
limit = { mode = "shed", per_key_rate = 3 }
[limits]
max_hops = 0
source_queue_bytes = "1KB"
notifier_queue_bytes = "8GB"
[publish.x]
input = "telemetry"
notifier = "nowhere"
[notifiers.hook]
type = "webhook"
url = "http://127.0.0.1:9/hook"
concurrency = 0
[functions.f]
input = "telemetry"
output = "g"
limit = { mode = "block", per_key_rate = 5 }
concurrency = 0
"#,
        )
        .expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        let want = [
            "limits.max_hops",
            "limits.source_queue_bytes",
            "limits.notifier_queue_bytes",
            "publish.x.notifier",
            "functions.f.limit.rate",
            "functions.f.limit.per_key_rate",
            "functions.f.concurrency",
            "lake.limit.rate",
            "lake.limit.per_key_rate",
            "notifiers.hook.concurrency",
        ];
        assert!(want.iter().all(|k| keys.contains(k)), "{keys:?}");
        assert!(
            !keys.contains(&"functions.f.limit.mode") && !keys.contains(&"lake.limit.mode"),
            "a function's and the lake's limits block or shed: {keys:?}"
        );
    }

    #[test]
    fn per_key_block_on_a_source_is_valid_with_a_warning() {
        let warning = only_warning(
            r#"
[http.limit]
per_key_rate = 5
per_key_mode = "block"
[streams.telemetry]
schema = "telemetry"
[sources.m]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["a/#"]
stream = "telemetry"
limit = { per_key_rate = 5, per_key_mode = "block" }
"#,
        );
        assert_eq!(warning.key, "sources.m.limit.per_key_mode");
        assert!(
            warning.message.contains("every event behind"),
            "{warning:?}"
        );
    }
}
