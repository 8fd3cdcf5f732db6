//! HTTP ingest: `POST /api/ingest/<stream>` with one JSON object per line.
//!
//! The axum handler lives with the rest of the HTTP API in the binary; it hands each
//! body to [`HttpIngest::ingest`]. Each stream has one task that owns its [`Emitter`],
//! so request handlers never share a decoder, and batches flush by size or tick like
//! every other source. The same decode and dead-letter rules apply as for MQTT.
//!
//! A stream given a write-ahead log (one keyed through a cluster's repartition topic)
//! answers a body only once it is fsynced there ([`GroupLog`], a group commit of the
//! bodies that arrive meanwhile). Each line is numbered in the log, and the number is
//! the row's `_offset` and the checkpoint's position, so a restart replays what the
//! lake had not committed, under the same numbers, and the repartition topic's readers
//! recognise what they have seen. Without a log, a body is answered once decoded, and
//! a crash loses what was not yet checkpointed.
//!
//! A body sent with an `Idempotency-Key` is taken once per key ([`keys`]): sent again,
//! it gets the first answer's report back, marked `duplicate`.

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
use crate::decode::Reason;
use crate::decode::{DecodeLimits, Decoder, MessageMeta};
use crate::emit::Emitter;
use crate::limit::{RateLimit, SharedKeyLimit};
use crate::wal::{DurableAcks, GroupLog, WAL_PARTITION, WalRecord, checkpointed};
pub use keys::{IdempotencyKey, MAX_KEY_LEN};
use keys::{KEYS_FILE, Keys};
use sluice_config::{LimitConfig, LimitMode, http_source};

mod keys;

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
    /// The body was sent before under its `Idempotency-Key`, and this is that first
    /// answer's report: nothing was ingested again. Left out when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

impl IngestReport {
    /// Counts one line: taken, or dead-lettered for `reason`.
    fn count(&mut self, failed: Option<Reason>) {
        match failed {
            None => self.accepted += 1,
            Some(reason) => {
                self.dead_lettered += 1;
                *self.reasons.entry(reason.code()).or_default() += 1;
            }
        }
    }

    /// Adds the counts of `other` (another part of the same body).
    fn add(&mut self, other: &Self) {
        self.accepted += other.accepted;
        self.dead_lettered += other.dead_lettered;
        for (reason, n) in &other.reasons {
            *self.reasons.entry(reason).or_default() += n;
        }
    }
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
    /// The `Idempotency-Key` header is not 1 to 255 visible ASCII characters.
    #[error("an Idempotency-Key is 1 to {MAX_KEY_LEN} visible ASCII characters")]
    BadKey,
    /// `[http] idempotency_keys = 0`: keys are off.
    #[error("idempotency keys are off ([http] idempotency_keys = 0); send the body without one")]
    KeysOff,
    /// The `Idempotency-Key` came before with another body.
    #[error("this Idempotency-Key was sent before with another body; use a new key for a new body")]
    KeyReused,
}

/// Where a request's answer goes.
type Reply = oneshot::Sender<Result<IngestReport, IngestError>>;

struct Request {
    body: Bytes,
    key: Option<IdempotencyKey>,
    reply: Reply,
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
    gates: Gates,
    /// `[http] idempotency_keys = 0`.
    keys_off: bool,
}

/// The blocking rate limits a body passes before it is taken, or is refused with 429:
/// a body without an idempotency key in the request handler, one with a key on its
/// stream task once the key is known to be new.
#[derive(Debug, Clone, Default)]
struct Gates {
    /// `[http.limit]` in block mode: one rate across every stream.
    rate: Option<Arc<RateLimit>>,
    /// `[http.limit]` with `per_key_mode = "block"`: the key field of each stream and
    /// one rate per key across them.
    keyed: Option<Arc<(SharedKeyLimit, HashMap<String, String>)>>,
}

impl Gates {
    /// Takes room for `body` of `stream` in every limit, or refuses it.
    fn pass(&self, stream: &str, body: &[u8]) -> Result<(), IngestError> {
        if let Some(keyed) = &self.keyed {
            check_keys(stream, body, &keyed.0, keyed.1.get(stream))?;
        }
        let Some(gate) = &self.rate else {
            return Ok(());
        };
        let lines = u32::try_from(lines(body)).unwrap_or(u32::MAX);
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
        })
    }
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
    /// The rows' `_partition`: `http`, or `http@<node>` on a node of a cluster, where
    /// each node numbers its own lines.
    pub partition: String,
    /// How long a stream remembers an `Idempotency-Key` (`[http] idempotency_ttl`).
    pub idempotency_ttl: Duration,
    /// Keys a stream remembers at most (`[http] idempotency_keys`; 0: keys are off).
    pub idempotency_keys: usize,
}

impl HttpIngest {
    /// Starts one task per stream; they stop at `shutdown` after flushing. The streams
    /// in `logs` answer a body once it is in their write-ahead log, and replay what
    /// the newest checkpoint does not cover first.
    pub fn spawn(
        streams: Vec<(String, StreamSchema)>,
        options: &HttpIngestOptions,
        mut logs: HashMap<String, DurableAcks>,
        out: PipeSender,
        clock: Arc<dyn Clock>,
        shutdown: Shutdown,
    ) -> Result<(Self, Vec<JoinHandle<Result<()>>>)> {
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
        let key_fields = streams
            .iter()
            .map(|(stream, schema)| {
                let key_field = &schema.fields()[schema.key_index()].name;
                (stream.clone(), key_field.clone())
            })
            .collect();
        let gates = Gates {
            rate: gate,
            keyed: key_limit.map(|limit| Arc::new((limit, key_fields))),
        };
        for (stream, schema) in streams {
            let (tx, rx) = sluice_core::bounded(QUEUE_REQUESTS, options.queue_bytes);
            let recount = Decoder::new(schema.clone(), &stream, "http", None, options.limits);
            let decoder = Decoder::new(schema, &stream, "http", None, options.limits);
            let name = http_source(&stream);
            let keys = Keys::new(
                &name,
                i64::try_from(options.idempotency_ttl.as_millis()).unwrap_or(i64::MAX),
                options.idempotency_keys,
            );
            let mut emitter = Emitter::new(decoder, out.clone(), options.batch_rows, &name, "http")
                .with_limits(&emitter_limit);
            let log = match logs.remove(&stream) {
                Some(durable) => {
                    emitter = emitter.track_positions_as(durable.resume.clone(), WAL_PARTITION);
                    let (log, recovered, covered) = GroupLog::open(&name, "http", &durable)?;
                    // Bodies the checkpoint covers are not decoded again, but their
                    // keys are still to be known.
                    let (keyed, records): (Vec<_>, Vec<_>) = recovered
                        .records
                        .into_iter()
                        .partition(|r| r.seq <= covered && !r.topic.is_empty());
                    let replay = log.replay(records, covered);
                    Some(Logged {
                        name,
                        log,
                        replay,
                        keyed,
                        recount,
                        covered,
                        checkpoints: durable.checkpoints,
                    })
                }
                None => None,
            };
            let stream_task = Stream {
                stream_name: stream.clone(),
                gates: gates.clone(),
                emitter,
                keys,
                partition: options.partition.clone(),
                flush_interval: options.flush_interval,
            };
            tasks.push(tokio::spawn(run(
                stream_task,
                rx,
                log,
                clock.clone(),
                shutdown.clone(),
            )));
            senders.insert(stream, tx);
        }
        Ok((
            Self {
                streams: Arc::new(senders),
                gates,
                keys_off: options.idempotency_keys == 0,
            },
            tasks,
        ))
    }

    /// Decodes `body` (JSON lines) into `stream`, once per idempotency `key` if it
    /// has one.
    pub async fn ingest(
        &self,
        stream: &str,
        body: Bytes,
        key: Option<&str>,
    ) -> Result<IngestReport, IngestError> {
        let sender = self
            .streams
            .get(stream)
            .ok_or_else(|| IngestError::UnknownStream(stream.to_owned()))?;
        let key = match key {
            Some(_) if self.keys_off => return Err(IngestError::KeysOff),
            Some(key) => Some(IdempotencyKey::new(key, &body)?),
            None => None,
        };
        // A keyed body passes the limits on its stream task, and only if its key is new:
        // a body sent again under its key spends no room.
        if key.is_none() {
            self.gates.pass(stream, &body)?;
        }
        let (reply, answer) = oneshot::channel();
        tokio::time::timeout(QUEUE_WAIT, sender.send(Request { body, key, reply }))
            .await
            .map_err(|_| IngestError::Busy)?
            .map_err(|_| IngestError::Closed)?;
        answer.await.map_err(|_| IngestError::Closed)?
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
    events(body).count()
}

/// A body's events: its lines, trimmed, but for empty ones.
fn events(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty())
}

/// A logged stream's write-ahead log and what its task needs of it.
struct Logged {
    name: String,
    log: GroupLog<Waiting>,
    /// Replayed at start: the bodies past the checkpoint.
    replay: Vec<WalRecord>,
    /// The bodies with idempotency keys that the checkpoint covers: their keys are
    /// learnt again at start, with reports counted by `recount`.
    keyed: Vec<WalRecord>,
    /// A decoder whose rows are thrown away, to count what a body the checkpoint
    /// covers was answered.
    recount: Decoder,
    /// The line number the newest checkpoint covers at start.
    covered: u64,
    checkpoints: tokio::sync::watch::Receiver<sluice_core::Checkpointed>,
}

/// A body in the write-ahead log's next group commit, answered once it is on disk.
struct Waiting {
    body: Bytes,
    key: Option<String>,
    reply: Reply,
    /// The number of its first line.
    first: u64,
    ingest_ms: i64,
}

/// A stream task's own parts.
struct Stream {
    stream_name: String,
    /// The limits a keyed body passes here (see [`HttpIngest::ingest`]).
    gates: Gates,
    emitter: Emitter,
    keys: Keys,
    /// The rows' `_partition`.
    partition: String,
    flush_interval: Duration,
}

async fn run(
    stream: Stream,
    mut requests: BoundedReceiver<Request>,
    mut logged: Option<Logged>,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
) -> Result<()> {
    let Stream {
        stream_name,
        gates,
        mut emitter,
        mut keys,
        partition,
        flush_interval,
    } = stream;
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Without a log, lines are numbered within this run.
    let mut sequence: u64 = 0;
    let mut checkpoints = None;
    if let Some(l) = &mut logged {
        let now = clock.now_ms();
        let saved = l.log.dir().join(KEYS_FILE);
        if let Err(error) = keys.load(&saved, now) {
            tracing::warn!(component = %l.name, path = %saved.display(), %error,
                "cannot read the idempotency keys of trimmed log segments; a body sent again under one of them is taken again");
        }
        for record in std::mem::take(&mut l.keyed) {
            let report = recount(&mut l.recount, &partition, &record, l.covered);
            if let Ok(key) = IdempotencyKey::new(&record.topic, &record.payload) {
                keys.restore(&key, record.ingest_ms, report, now);
            }
        }
        for record in std::mem::take(&mut l.replay) {
            let mut report = IngestReport::default();
            if !record.topic.is_empty() {
                // A body the checkpoint covers in part: its first lines were taken
                // before the restart.
                report = recount(&mut l.recount, &partition, &record, l.covered);
            }
            let body = Body::of(&record);
            report.add(&decode(&mut emitter, &partition, body, l.covered).await?);
            if let Ok(key) = IdempotencyKey::new(&record.topic, &record.payload) {
                keys.restore(&key, record.ingest_ms, report, now);
            }
        }
        checkpoints = Some(l.checkpoints.clone());
    }
    let name = logged.as_ref().map(|l| l.name.clone()).unwrap_or_default();
    loop {
        // While the log cannot be written, or a slow fsync has gathered enough for the
        // next, bodies wait in the queue (a full one answers 503), not in memory.
        let held = logged
            .as_ref()
            .is_some_and(|l| l.log.is_failing() || l.log.is_gathering_full());
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            done = GroupLog::committed(logged.as_mut().map(|l| &mut l.log)) => {
                if let Some(l) = &mut logged {
                    answer(&mut emitter, &mut keys, &partition, l.log.finish(done)?).await?;
                }
            }
            _ = tick.tick() => emitter.flush().await?,
            covered = checkpointed(&mut checkpoints, &name) => {
                if let Some(l) = &mut logged {
                    l.log.trim(covered, |dir| keys.save(&dir.join(KEYS_FILE)));
                }
            }
            request = requests.recv(), if !held => {
                let Some(Request { body, key, reply }) = request else { break };
                let now = clock.now_ms();
                // A known key is answered (or waits) without its body being taken; a
                // new one passes the limits first.
                let reply = match &key {
                    Some(key) => match keys.admit(key, now, reply, || gates.pass(&stream_name, &body)) {
                        Some(reply) => reply,
                        None => continue,
                    },
                    None => reply,
                };
                let key = key.map(|k| k.as_str().to_owned());
                match &mut logged {
                    Some(l) => {
                        let lines = lines(&body) as u64;
                        if lines == 0 {
                            reply_once(&mut keys, key.as_deref(), reply, IngestReport::default());
                            continue;
                        }
                        let topic = key.as_deref().unwrap_or_default();
                        let first = l.log.write(lines, 0, now, topic, &body);
                        l.log.wait(Waiting { body, key, reply, first, ingest_ms: now });
                    }
                    None => {
                        let first = sequence + 1;
                        sequence += lines(&body) as u64;
                        let body = Body { lines: &body, first, ingest_time_ms: now };
                        let report = decode(&mut emitter, &partition, body, 0).await?;
                        reply_once(&mut keys, key.as_deref(), reply, report);
                    }
                }
            }
        }
        if let Some(l) = &mut logged {
            l.log.start_commit();
        }
    }
    // Log and answer what is gathered (no retry after a failure: those bodies were
    // not answered, and their clients send them again).
    if let Some(l) = &mut logged {
        l.log.start_commit();
        while !l.log.is_idle() {
            let done = GroupLog::committed(Some(&mut l.log)).await;
            answer(&mut emitter, &mut keys, &partition, l.log.finish(done)?).await?;
        }
    }
    emitter.flush().await
}

/// Answers a request with `report`, and keeps it as its `key`'s answer.
fn reply_once(keys: &mut Keys, key: Option<&str>, reply: Reply, report: IngestReport) {
    if let Some(key) = key {
        keys.done(key, &report);
    }
    // The client may have gone; its rows are kept either way.
    let _ = reply.send(Ok(report));
}

/// Decodes and answers the bodies of a group commit, now on disk.
async fn answer(
    emitter: &mut Emitter,
    keys: &mut Keys,
    partition: &str,
    logged: Option<Vec<Waiting>>,
) -> Result<()> {
    for w in logged.into_iter().flatten() {
        let body = Body {
            lines: &w.body,
            first: w.first,
            ingest_time_ms: w.ingest_ms,
        };
        let report = decode(emitter, partition, body, 0).await?;
        reply_once(keys, w.key.as_deref(), w.reply, report);
    }
    Ok(())
}

/// A body to decode: its lines, the number of the first, and when it arrived.
struct Body<'a> {
    lines: &'a [u8],
    first: u64,
    ingest_time_ms: i64,
}

impl<'a> Body<'a> {
    /// The decoder's view of its line numbered `offset`.
    fn meta<'m>(&self, partition: &'m str, offset: &'m str) -> MessageMeta<'m> {
        MessageMeta {
            partition,
            offset,
            ingest_time_ms: self.ingest_time_ms,
            hops: 0,
            origin: None,
        }
    }

    /// The body of a log record, which carries its last line's number.
    fn of(record: &'a WalRecord) -> Self {
        Self {
            lines: &record.payload,
            first: (record.seq + 1).saturating_sub(lines(&record.payload) as u64),
            ingest_time_ms: record.ingest_ms,
        }
    }
}

/// Decodes the non-empty lines of `body` (each line's number is its `_offset`),
/// skipping those numbered `covered` or less (a replay of a body the checkpoint covers
/// in part).
async fn decode(
    emitter: &mut Emitter,
    partition: &str,
    body: Body<'_>,
    covered: u64,
) -> Result<IngestReport> {
    let mut report = IngestReport::default();
    let mut offset = itoa::Buffer::new();
    for (seq, line) in (body.first..).zip(events(body.lines)) {
        if seq <= covered {
            continue;
        }
        let meta = body.meta(partition, offset.format(seq));
        report.count(emitter.push(line, "", &meta));
        if emitter.is_full() {
            emitter.flush().await?;
        }
    }
    Ok(report)
}

/// What the lines of a logged body numbered `covered` or less were answered: decoded
/// again by `decoder`, whose rows are thrown away. A rate limit in `shed` mode is
/// not applied again, so lines it dropped then count as taken.
fn recount(
    decoder: &mut Decoder,
    partition: &str,
    record: &WalRecord,
    covered: u64,
) -> IngestReport {
    let body = Body::of(record);
    let mut report = IngestReport::default();
    let mut offset = itoa::Buffer::new();
    for (seq, line) in (body.first..=covered).zip(events(body.lines)) {
        let meta = body.meta(partition, offset.format(seq));
        report.count(decoder.push(line, "", &meta));
    }
    drop(decoder.flush());
    report
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

    /// Options of the tests: batches of `batch_rows`, a 10 ms tick, no limit, 1 MB
    /// queues.
    fn options(batch_rows: usize) -> HttpIngestOptions {
        HttpIngestOptions {
            limits: DecodeLimits::default(),
            batch_rows,
            flush_interval: Duration::from_millis(10),
            limit: LimitConfig::default(),
            queue_bytes: 1 << 20,
            partition: "http".into(),
            idempotency_ttl: Duration::from_secs(3600),
            idempotency_keys: 100,
        }
    }

    /// Stops `ingest` and counts the rows it handed on.
    async fn stop_and_count(
        ingest: HttpIngest,
        tasks: Vec<JoinHandle<Result<()>>>,
        shutdown: Shutdown,
        mut batches: sluice_core::PipeReceiver,
    ) -> usize {
        shutdown.trigger();
        drop(ingest);
        for task in tasks {
            task.await.expect("task").expect("stream task");
        }
        let mut rows = 0;
        while let Some(batch) = batches.recv().await {
            rows += batch.batch.num_rows();
        }
        rows
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
            HashMap::new(),
            out,
            Arc::new(SystemClock),
            shutdown.clone(),
        )
        .expect("spawn");
        (ingest, tasks, shutdown)
    }

    /// Runs HTTP ingest of `telemetry` with its write-ahead log in `dir`, resuming at
    /// a checkpoint covering line `covered`; posts `bodies`, then, if `checkpoint` is
    /// given, announces a checkpoint covering that line and waits for its trim to
    /// save the idempotency keys; then stops. The reports, and the rows handed on as
    /// (`_offset`, `status`), in order.
    async fn logged_run(
        dir: &std::path::Path,
        covered: u64,
        bodies: Vec<(Bytes, Option<&str>)>,
        checkpoint: Option<u64>,
    ) -> (Vec<IngestReport>, Vec<(String, String)>) {
        use arrow::array::AsArray;
        let (out, mut batches) = sluice_core::pipe(64, 1 << 24);
        let options = options(7);
        let mut resume = sluice_core::SourcePositions::default();
        if covered > 0 {
            resume
                .offsets
                .insert(WAL_PARTITION.into(), covered.to_string());
        }
        let (checkpoints, rx) = tokio::sync::watch::channel(Default::default());
        let durable = DurableAcks {
            dir: dir.to_owned(),
            resume,
            checkpoints: rx,
        };
        let shutdown = Shutdown::new();
        let (ingest, tasks) = HttpIngest::spawn(
            vec![(
                "telemetry".into(),
                StreamSchema::builtin("telemetry").expect("telemetry"),
            )],
            &options,
            [("telemetry".to_owned(), durable)].into(),
            out,
            Arc::new(SystemClock),
            shutdown.clone(),
        )
        .expect("spawn");
        let mut reports = Vec::new();
        for (body, key) in bodies {
            reports.push(ingest.ingest("telemetry", body, key).await.expect("taken"));
        }
        if let Some(line) = checkpoint {
            let positions = [(WAL_PARTITION.to_owned(), line.to_string())].into();
            checkpoints.send_replace(Arc::new([(http_source("telemetry"), positions)].into()));
            let saved = dir.join(KEYS_FILE);
            while !saved.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        shutdown.trigger();
        drop(ingest);
        for task in tasks {
            task.await.expect("task").expect("stream task");
        }
        let mut rows = Vec::new();
        while let Some(batch) = batches.recv().await {
            if batch.stream.as_ref() != "telemetry" {
                continue;
            }
            let column = |name: &str| {
                let c = batch.batch.column_by_name(name).expect(name);
                arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).expect("cast")
            };
            let (offsets, statuses) = (column("_offset"), column("status"));
            for i in 0..batch.batch.num_rows() {
                rows.push((
                    offsets.as_string::<i32>().value(i).to_owned(),
                    statuses.as_string::<i32>().value(i).to_owned(),
                ));
            }
        }
        (reports, rows)
    }

    #[tokio::test]
    async fn a_logged_stream_numbers_lines_in_its_log_and_replays_what_the_checkpoint_does_not_cover()
     {
        let dir = tempfile::tempdir().expect("tmp");
        // Two bodies: lines 1–3 (with a blank line between, not numbered), then 4–8.
        let mut first = body("a", 2).to_vec();
        first.extend_from_slice(b"\n   \n");
        first.extend_from_slice(&body("b", 1));
        let first = Bytes::from(first);
        let (reports, rows) = logged_run(
            dir.path(),
            0,
            vec![(first, None), (body("c", 5), None)],
            None,
        )
        .await;
        assert_eq!(
            reports.iter().map(|r| r.accepted).collect::<Vec<_>>(),
            [3, 5],
            "answered once logged"
        );
        let offsets: Vec<&str> = rows.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(offsets, ["1", "2", "3", "4", "5", "6", "7", "8"]);

        // A restart whose checkpoint covers line 5, the middle of the second body:
        // lines 6–8 come again, under their numbers, then new lines go on from 9.
        let (_, again) = logged_run(dir.path(), 5, vec![(body("d", 2), None)], None).await;
        assert_eq!(again.len(), 5, "{again:?}");
        assert_eq!(again[..3], rows[5..], "the replay, as first decoded");
        let numbers: Vec<&str> = again[3..].iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(numbers, ["9", "10"]);
    }

    #[tokio::test]
    async fn a_logged_stream_knows_its_idempotency_keys_again_after_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        // Lines 1–3 (one of them not JSON) under key k1, lines 4–5 under k2.
        let mut first = body("a", 2).to_vec();
        first.extend_from_slice(b"not json\n");
        let first = Bytes::from(first);
        let (reports, rows) = logged_run(
            dir.path(),
            0,
            vec![(first.clone(), Some("k1")), (body("b", 2), Some("k2"))],
            None,
        )
        .await;
        let counts = |r: &IngestReport| (r.accepted, r.dead_lettered, r.duplicate);
        assert_eq!(
            reports.iter().map(counts).collect::<Vec<_>>(),
            [(2, 1, false), (2, 0, false)]
        );
        assert_eq!(rows.len(), 4);

        // A restart whose checkpoint covers line 4: k1 is wholly behind it, k2 in part.
        // Both are answered as first, and only line 5 (the replay) and k3 come in.
        // Then a checkpoint covers line 6, and the first run's segment is deleted.
        let sent = vec![
            (first, Some("k1")),
            (body("b", 2), Some("k2")),
            (body("c", 1), Some("k3")),
        ];
        let (again, rows) = logged_run(dir.path(), 4, sent.clone(), Some(6)).await;
        assert_eq!(
            again.iter().map(counts).collect::<Vec<_>>(),
            [(2, 1, true), (2, 0, true), (1, 0, false)]
        );
        assert_eq!(again[0].reasons.get("invalid_json"), Some(&1));
        let numbers: Vec<&str> = rows.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(numbers, ["5", "6"]);

        // k1 and k2 are in no segment now, only in the saved keys; k3 is in the log.
        let (third, rows) = logged_run(dir.path(), 6, sent, None).await;
        assert_eq!(
            third.iter().map(counts).collect::<Vec<_>>(),
            [(2, 1, true), (2, 0, true), (1, 0, true)]
        );
        assert!(rows.is_empty(), "{rows:?}");
    }

    /// Posts `body` to `telemetry` under `key`: the lines accepted, and whether it was
    /// a duplicate.
    async fn accepted(
        ingest: &HttpIngest,
        body: Bytes,
        key: Option<&str>,
    ) -> Result<(u64, bool), IngestError> {
        ingest
            .ingest("telemetry", body, key)
            .await
            .map(|r| (r.accepted, r.duplicate))
    }

    #[tokio::test]
    async fn a_body_sent_again_under_its_key_is_answered_as_first_and_taken_once() {
        let (out, batches) = sluice_core::pipe(64, 1 << 20);
        let options = options(100);
        let (ingest, tasks, shutdown) = telemetry_ingest(&options, out);
        let send = |b, key| accepted(&ingest, b, key);
        assert_eq!(send(body("a", 3), Some("k")).await, Ok((3, false)));
        assert_eq!(send(body("a", 3), Some("k")).await, Ok((3, true)));
        assert_eq!(
            send(body("b", 3), Some("k")).await,
            Err(IngestError::KeyReused)
        );
        assert_eq!(
            send(body("a", 3), None).await,
            Ok((3, false)),
            "no key: taken again"
        );
        assert_eq!(
            send(body("a", 1), Some("bad key")).await,
            Err(IngestError::BadKey)
        );
        let rows = stop_and_count(ingest, tasks, shutdown, batches).await;
        assert_eq!(rows, 6);
    }

    #[tokio::test]
    async fn a_body_sent_again_under_its_key_spends_no_rate_limit_room() {
        let ingest_rate = LimitConfig {
            rate: Some(1),
            burst: Some(3),
            mode: LimitMode::Block,
            ..LimitConfig::default()
        };
        let per_key = LimitConfig {
            per_key_rate: Some(1),
            per_key_burst: Some(3),
            per_key_mode: LimitMode::Block,
            ..LimitConfig::default()
        };
        for (limit, other_device) in [(ingest_rate, Err(())), (per_key, Ok((1, false)))] {
            let (out, batches) = sluice_core::pipe(64, 1 << 20);
            let options = HttpIngestOptions {
                limit,
                ..options(100)
            };
            let (ingest, tasks, shutdown) = telemetry_ingest(&options, out);
            let shared = &ingest;
            let send = |b, key| async move {
                accepted(shared, b, key)
                    .await
                    .map_err(|e| assert!(matches!(e, IngestError::RateLimited(_)), "{e:?}"))
            };
            assert_eq!(send(body("a", 3), Some("k")).await, Ok((3, false)));
            // The room is spent: a resend is still answered, new bodies are refused.
            assert_eq!(send(body("a", 3), Some("k")).await, Ok((3, true)));
            assert_eq!(send(body("a", 1), Some("k2")).await, Err(()));
            assert_eq!(send(body("a", 1), None).await, Err(()));
            assert_eq!(send(body("b", 1), Some("k3")).await, other_device);
            let rows = stop_and_count(ingest, tasks, shutdown, batches).await;
            assert_eq!(rows as u64, 3 + other_device.map_or(0, |(n, _)| n));
        }
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
        let (out, batches) = sluice_core::pipe(64, 1 << 20);
        let options = HttpIngestOptions {
            limit: LimitConfig {
                per_key_rate: Some(1),
                per_key_burst: Some(3),
                per_key_mode: LimitMode::Block,
                ..LimitConfig::default()
            },
            ..options(100)
        };
        let (ingest, tasks, shutdown) = telemetry_ingest(&options, out);
        let taken = |r: Result<IngestReport, IngestError>| r.map(|r| r.accepted);
        assert_eq!(
            taken(ingest.ingest("telemetry", body("a", 3), None).await),
            Ok(3)
        );
        let refused = ingest.ingest("telemetry", body("a", 1), None).await;
        assert!(
            matches!(refused, Err(IngestError::RateLimited(w)) if w > Duration::ZERO),
            "{refused:?}"
        );
        assert_eq!(
            taken(ingest.ingest("telemetry", body("b", 3), None).await),
            Ok(3),
            "another device is not held back"
        );
        assert!(matches!(
            ingest.ingest("telemetry", body("c", 4), None).await,
            Err(IngestError::OverBurst {
                lines: 4,
                burst: 3,
                ..
            })
        ));
        let rows = stop_and_count(ingest, tasks, shutdown, batches).await;
        assert_eq!(rows, 6, "the refused bodies took nothing, nothing was shed");
    }

    #[tokio::test]
    async fn a_stream_queue_full_in_bytes_answers_busy_and_keeps_what_it_took() {
        // The pipeline holds one batch and is not read yet, so the stream task stops
        // at its second flush and requests queue up behind it.
        let (out, mut batches) = sluice_core::pipe(1, 64_000);
        let options = HttpIngestOptions {
            flush_interval: Duration::from_secs(3600),
            queue_bytes: 64_000,
            ..options(100)
        };
        let (ingest, tasks, shutdown) = telemetry_ingest(&options, out);
        // 400 lines (~40 KB) each: the first fills the pipeline and blocks the task,
        // the second waits in the queue, the third does not fit its 64 KB.
        let mut taken = Vec::new();
        for device in ["a", "b"] {
            let ingest = ingest.clone();
            taken.push(tokio::spawn(async move {
                ingest.ingest("telemetry", body(device, 400), None).await
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused = ingest.ingest("telemetry", body("c", 400), None).await;
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
