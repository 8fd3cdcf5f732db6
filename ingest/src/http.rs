//! HTTP ingest: `POST /api/ingest/<stream>` with one JSON object per line.
//!
//! The axum handler lives with the rest of the HTTP API in the binary; it hands each
//! body to [`HttpIngest::ingest`]. Each stream has one task that owns its [`Emitter`],
//! so request handlers never share a decoder, and batches flush by size or tick like
//! every other source. The same decode and dead-letter rules apply as for MQTT.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use sluice_core::{
    BoundedReceiver, BoundedSender, Clock, PipeSender, Shutdown, StreamSchema, Weigh,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::Result;
use crate::decode::{DecodeLimits, Decoder, MessageMeta};
use crate::emit::Emitter;
use crate::limit::{RateLimit, SharedKeyLimit};
use sluice_config::{LimitConfig, LimitMode};

/// What became of one request's lines.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct IngestReport {
    /// Lines decoded into the stream.
    pub accepted: u64,
    /// Lines sent to `dead_letter`.
    pub dead_lettered: u64,
    /// Dead-letter counts by reason.
    #[schema(value_type = std::collections::BTreeMap<String, u64>)]
    pub reasons: BTreeMap<&'static str, u64>,
}

/// Why a body was not taken at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    /// No such stream is declared.
    #[error("unknown stream {0:?}")]
    UnknownStream(String),
    /// The service is shutting down.
    #[error("the service is shutting down")]
    Closed,
    /// Over the HTTP ingest rate limit (`[http.limit]`, block mode): retry after this.
    #[error("over the ingest rate limit; retry in {0:?}")]
    RateLimited(Duration),
    /// The stream's queue stayed full (in requests or bytes) for [`QUEUE_WAIT`]: the
    /// pipeline is behind; retry after a second.
    #[error("the ingest queue of this stream is full; retry in a second")]
    Busy,
    /// More lines in one body than the limit's burst: it can never pass; split it.
    #[error("{lines} lines in one request is more than {of} of {burst}; send smaller bodies")]
    OverBurst {
        /// Whose burst: the ingest limit's, or one key's.
        of: &'static str,
        /// Lines in the body (of one key, for a key's burst).
        lines: u32,
        /// The limit's burst.
        burst: u32,
    },
}

struct Request {
    body: Bytes,
    reply: oneshot::Sender<IngestReport>,
}

impl Weigh for Request {
    fn weigh(&self) -> usize {
        self.body.len()
    }
}

/// Requests a stream's queue holds, at most (besides `queue_bytes` of bodies).
const QUEUE_REQUESTS: usize = 64;

/// How long a request waits for room in its stream's queue before it is answered
/// [`IngestError::Busy`]: waiting requests hold their bodies, so the wait is short.
pub const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Handle for feeding HTTP bodies into streams.
#[derive(Debug, Clone, Default)]
pub struct HttpIngest {
    streams: Arc<HashMap<String, BoundedSender<Request>>>,
    /// `[http.limit]` in block mode: one rate across every stream, refused with 429.
    gate: Option<Arc<RateLimit>>,
    /// `[http.limit]` with `per_key_mode = "block"`: the key field of each stream and
    /// one rate per key across them, refused with 429.
    key_gate: Option<Arc<(SharedKeyLimit, HashMap<String, String>)>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("bytes", &self.body.len())
            .finish()
    }
}

/// Settings shared by every HTTP stream task.
#[derive(Debug, Clone)]
pub struct HttpIngestOptions {
    /// Decode limits.
    pub limits: DecodeLimits,
    /// Rows per batch.
    pub batch_rows: usize,
    /// Flush tick.
    pub flush_interval: Duration,
    /// `[http.limit]`.
    pub limit: LimitConfig,
    /// Body bytes each stream's queue holds, at most (`[limits] source_queue_bytes`).
    pub queue_bytes: usize,
}

impl HttpIngest {
    /// Starts one task per stream; they stop at `shutdown` after flushing.
    pub fn spawn(
        streams: Vec<(String, StreamSchema)>,
        options: &HttpIngestOptions,
        out: PipeSender,
        clock: Arc<dyn Clock>,
        shutdown: Shutdown,
    ) -> (Self, Vec<JoinHandle<Result<()>>>) {
        let mut senders = HashMap::new();
        let mut tasks = Vec::new();
        // Block mode answers 429 here; what is left (shed, per key) is the emitters'.
        let gate = (options.limit.mode == LimitMode::Block)
            .then(|| RateLimit::new(&options.limit))
            .flatten()
            .map(Arc::new);
        let mut emitter_limit = options.limit.clone();
        if gate.is_some() {
            emitter_limit.rate = None;
            emitter_limit.burst = None;
        }
        let key_limit = SharedKeyLimit::new(&options.limit);
        if key_limit.is_some() {
            emitter_limit.per_key_rate = None;
            emitter_limit.per_key_burst = None;
        }
        let mut key_fields = HashMap::new();
        for (stream, schema) in streams {
            let key_field = &schema.fields()[schema.key_index()].name;
            key_fields.insert(stream.clone(), key_field.clone());
            let (tx, rx) = sluice_core::bounded(QUEUE_REQUESTS, options.queue_bytes);
            let decoder = Decoder::new(schema, &stream, "http", None, options.limits);
            let emitter = Emitter::new(
                decoder,
                out.clone(),
                options.batch_rows,
                &format!("http:{stream}"),
                "http",
            )
            .with_limits(&emitter_limit);
            tasks.push(tokio::spawn(run(
                emitter,
                rx,
                options.flush_interval,
                clock.clone(),
                shutdown.clone(),
            )));
            senders.insert(stream, tx);
        }
        (
            Self {
                streams: Arc::new(senders),
                gate,
                key_gate: key_limit.map(|limit| Arc::new((limit, key_fields))),
            },
            tasks,
        )
    }

    /// Decodes `body` (JSON lines) into `stream`.
    pub async fn ingest(&self, stream: &str, body: Bytes) -> Result<IngestReport, IngestError> {
        let sender = self
            .streams
            .get(stream)
            .ok_or_else(|| IngestError::UnknownStream(stream.to_owned()))?;
        if let Some(keys) = &self.key_gate {
            check_keys(stream, &body, &keys.0, keys.1.get(stream))?;
        }
        if let Some(gate) = &self.gate {
            let lines = u32::try_from(lines(&body)).unwrap_or(u32::MAX);
            gate.try_take(lines).map_err(|wait| {
                metrics::counter!("sluice_limit_events_total", "component" => format!("http:{stream}"), "kind" => "http", "limit" => "source", "outcome" => "refused")
                    .increment(u64::from(lines));
                match wait {
                    Some(wait) => IngestError::RateLimited(wait),
                    None => IngestError::OverBurst {
                        of: "the ingest limit's burst",
                        lines,
                        burst: gate.burst(),
                    },
                }
            })?;
        }
        let (reply, answer) = oneshot::channel();
        tokio::time::timeout(QUEUE_WAIT, sender.send(Request { body, reply }))
            .await
            .map_err(|_| IngestError::Busy)?
            .map_err(|_| IngestError::Closed)?;
        answer.await.map_err(|_| IngestError::Closed)
    }
}

/// `[http.limit] per_key_mode = "block"`: takes room for each key's lines of `body`
/// (keyed by the stream's `key_field`), or refuses the body. A line that is not a JSON
/// object with a string key is left to the decoder (a dead letter, or no key). Keys
/// checked before the one refused keep what they took: a body of one device (the
/// usual) is all or nothing.
fn check_keys(
    stream: &str,
    body: &[u8],
    limit: &SharedKeyLimit,
    key_field: Option<&String>,
) -> Result<(), IngestError> {
    let Some(field) = key_field else {
        return Ok(());
    };
    let mut per_key: HashMap<String, u32> = HashMap::new();
    for line in body.split(|&b| b == b'\n') {
        if let Some(key) = key_of(line.trim_ascii(), field) {
            *per_key.entry(key).or_default() += 1;
        }
    }
    let mut wait = Duration::ZERO;
    let mut over = None;
    for (key, &lines) in &per_key {
        match limit.try_take(key, lines) {
            Ok(()) => {}
            Err(Some(w)) => wait = wait.max(w),
            Err(None) => {
                over = Some(lines);
                break;
            }
        }
    }
    let refused = match over {
        Some(lines) => IngestError::OverBurst {
            of: "one key's per-key burst",
            lines,
            burst: limit.burst(),
        },
        None if wait.is_zero() => return Ok(()),
        None => IngestError::RateLimited(wait),
    };
    let lines: u32 = per_key.values().sum();
    metrics::counter!("sluice_limit_events_total", "component" => format!("http:{stream}"), "kind" => "http", "limit" => "per_key", "outcome" => "refused")
        .increment(u64::from(lines));
    Err(refused)
}

/// The string value of the top-level field `field` of the JSON object `line`, if it
/// has one. serde walks the object and skips the other values without building them.
fn key_of(line: &[u8], field: &str) -> Option<String> {
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

    struct Key<'f>(&'f str);

    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = Option<String>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Key<'_> {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if name == self.0 && found.is_none() {
                    let value: serde_json::Value = map.next_value()?;
                    found = value.as_str().map(str::to_owned);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }

    if line.is_empty() {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    Key(field).deserialize(&mut de).ok().flatten()
}

/// Non-empty lines of a body: the events it holds.
fn lines(body: &[u8]) -> usize {
    body.split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count()
}

async fn run(
    mut emitter: Emitter,
    mut requests: BoundedReceiver<Request>,
    flush_interval: Duration,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
) -> Result<()> {
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence: u64 = 0;
    let mut offset = itoa::Buffer::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = tick.tick() => emitter.flush().await?,
            request = requests.recv() => {
                let Some(Request { body, reply }) = request else { break };
                let mut report = IngestReport::default();
                let now = clock.now_ms();
                for line in body.split(|b| *b == b'\n') {
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    sequence += 1;
                    let meta = MessageMeta { partition: "http", offset: offset.format(sequence), ingest_time_ms: now, hops: 0, origin: None };
                    match emitter.push(line, "", &meta) {
                        None => report.accepted += 1,
                        Some(reason) => {
                            report.dead_lettered += 1;
                            *report.reasons.entry(reason.code()).or_default() += 1;
                        }
                    }
                    if emitter.is_full() {
                        emitter.flush().await?;
                    }
                }
                // The client may have gone; its rows are kept either way.
                let _ = reply.send(report);
            }
        }
    }
    emitter.flush().await
}

#[cfg(test)]
mod tests {
    use sluice_core::SystemClock;

    use super::*;

    /// `lines` telemetry lines of about 100 bytes each.
    fn body(device: &str, lines: usize) -> Bytes {
        let text: String = (0..lines)
            .map(|i| {
                format!(
                    "{{\"device_id\":\"{device}\",\"ts\":{},\"temperature\":20.5,\"status\":\"ok-{i:030}\"}}\n",
                    1_767_225_600_000u64 + i as u64
                )
            })
            .collect();
        Bytes::from(text)
    }

    /// HTTP ingest of one `telemetry` stream into `out`, and its stop.
    fn telemetry_ingest(
        options: &HttpIngestOptions,
        out: PipeSender,
    ) -> (HttpIngest, Vec<JoinHandle<Result<()>>>, Shutdown) {
        let schema = StreamSchema::builtin("telemetry").expect("telemetry");
        let shutdown = Shutdown::new();
        let (ingest, tasks) = HttpIngest::spawn(
            vec![("telemetry".into(), schema)],
            options,
            out,
            Arc::new(SystemClock),
            shutdown.clone(),
        );
        (ingest, tasks, shutdown)
    }

    #[test]
    fn the_key_is_read_from_the_top_level_of_a_json_line() {
        let key = |line: &str| key_of(line.as_bytes(), "device_id");
        assert_eq!(key(r#"{"ts":1,"device_id":"a"}"#).as_deref(), Some("a"));
        assert_eq!(
            key(r#"{"nested":{"device_id":"x"},"device_id":"b\u0041"}"#).as_deref(),
            Some("bA")
        );
        assert_eq!(key(r#"{"device_id":7}"#), None, "not a string");
        assert_eq!(key(r#"{"ts":1}"#), None);
        assert_eq!(key("not json"), None);
        assert_eq!(key(r#"["device_id","a"]"#), None);
    }

    #[tokio::test]
    async fn a_key_over_its_blocking_per_key_rate_gets_429_and_other_keys_pass() {
        let (out, mut batches) = sluice_core::pipe(64, 1 << 20);
        let options = HttpIngestOptions {
            limits: DecodeLimits::default(),
            batch_rows: 100,
            flush_interval: Duration::from_millis(10),
            limit: LimitConfig {
                per_key_rate: Some(1),
                per_key_burst: Some(3),
                per_key_mode: LimitMode::Block,
                ..LimitConfig::default()
            },
            queue_bytes: 1 << 20,
        };
        let (ingest, tasks, shutdown) = telemetry_ingest(&options, out);
        let taken = |r: Result<IngestReport, IngestError>| r.map(|r| r.accepted);
        assert_eq!(taken(ingest.ingest("telemetry", body("a", 3)).await), Ok(3));
        let refused = ingest.ingest("telemetry", body("a", 1)).await;
        assert!(
            matches!(refused, Err(IngestError::RateLimited(w)) if w > Duration::ZERO),
            "{refused:?}"
        );
        assert_eq!(
            taken(ingest.ingest("telemetry", body("b", 3)).await),
            Ok(3),
            "another device is not held back"
        );
        assert!(matches!(
            ingest.ingest("telemetry", body("c", 4)).await,
            Err(IngestError::OverBurst {
                lines: 4,
                burst: 3,
                ..
            })
        ));
        shutdown.trigger();
        drop(ingest);
        for task in tasks {
            task.await.expect("task").expect("stream task");
        }
        let mut rows = 0;
        while let Some(batch) = batches.recv().await {
            rows += batch.batch.num_rows();
        }
        assert_eq!(rows, 6, "the refused bodies took nothing, nothing was shed");
    }

    #[tokio::test]
    async fn a_stream_queue_full_in_bytes_answers_busy_and_keeps_what_it_took() {
        // The pipeline holds one batch and is not read yet, so the stream task stops
        // at its second flush and requests queue up behind it.
        let (out, mut batches) = sluice_core::pipe(1, 64_000);
        let options = HttpIngestOptions {
            limits: DecodeLimits::default(),
            batch_rows: 100,
            flush_interval: Duration::from_secs(3600),
            limit: LimitConfig::default(),
            queue_bytes: 64_000,
        };
        let (ingest, tasks, shutdown) = telemetry_ingest(&options, out);
        // 400 lines (~40 KB) each: the first fills the pipeline and blocks the task,
        // the second waits in the queue, the third does not fit its 64 KB.
        let mut taken = Vec::new();
        for device in ["a", "b"] {
            let ingest = ingest.clone();
            taken.push(tokio::spawn(async move {
                ingest.ingest("telemetry", body(device, 400)).await
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused = ingest.ingest("telemetry", body("c", 400)).await;
        assert_eq!(refused, Err(IngestError::Busy));
        // The pipeline drains: both requests that were taken are decoded in full.
        let reader = tokio::spawn(async move {
            let mut rows = 0;
            while let Some(batch) = batches.recv().await {
                rows += batch.batch.num_rows();
            }
            rows
        });
        for request in taken {
            let report = request.await.expect("task").expect("taken");
            assert_eq!((report.accepted, report.dead_lettered), (400, 0));
        }
        shutdown.trigger();
        drop(ingest);
        for task in tasks {
            task.await.expect("task").expect("stream task");
        }
        assert_eq!(reader.await.expect("reader"), 800);
    }
}
