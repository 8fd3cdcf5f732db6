//! JSON messages straight into Arrow columns, one message at a time, with every
//! rejected message kept for the `dead_letter` table.
//!
//! # Why not arrow-json
//! arrow-json's `Decoder` is fast, but one bad row fails the whole batch and it cannot
//! say which message was at fault or why. Sluice must dead-letter exactly the bad
//! message with a reason and keep the rest, so each message is parsed by serde_json
//! (which owns the JSON grammar, escapes and number parsing) through a visitor that
//! writes into a reused scratch row; only a fully valid row is appended to the column
//! builders. Nothing is allocated per message on the success path.

mod fast;
mod visitor;

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMillisecondBuilder, UInt8Builder, UInt64Builder,
};
use arrow::record_batch::RecordBatch;
use sluice_config::LimitMode;
use sluice_core::schema::{FieldSpec, FieldType, HOPS, StreamSchema, dead_letter_schema};

use visitor::{RowSeed, Slot};

use crate::limit::{KeyLimit, Sampler};
use crate::mqtt::auth::Acl;

/// Why a message was dead-lettered. The code is what lands in the `reason` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Larger than the configured maximum payload size.
    Oversized,
    /// Not valid UTF-8.
    InvalidUtf8,
    /// Not valid JSON.
    InvalidJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// A required field is absent or null.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A number is NaN, Infinity or out of the f64 range.
    NonFiniteNumber,
    /// The event-time field cannot be read as a timestamp.
    BadTimestamp,
    /// Nested deeper than the configured maximum depth.
    TooDeep,
    /// Shed by a rate limit of the source (`limit`); only a sample is kept.
    RateLimited,
    /// Carries more hops (`_hops` field, Kafka header) than `limits.max_hops`: an
    /// output feeds back into this input.
    LoopDetected,
    /// Its key field names another device than the one the embedded broker
    /// authenticated as its publisher (`[broker.acl]`'s `{client_id}`).
    IdentityMismatch,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 12] = [
        Reason::Oversized,
        Reason::InvalidUtf8,
        Reason::InvalidJson,
        Reason::NotAnObject,
        Reason::MissingField,
        Reason::WrongType,
        Reason::NonFiniteNumber,
        Reason::BadTimestamp,
        Reason::TooDeep,
        Reason::RateLimited,
        Reason::LoopDetected,
        Reason::IdentityMismatch,
    ];

    /// The reason whose [`code`](Self::code) is `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The code stored in the `reason` column.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Oversized => "oversized",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::InvalidJson => "invalid_json",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::NonFiniteNumber => "non_finite_number",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::TooDeep => "too_deep",
            Reason::RateLimited => "rate_limited",
            Reason::LoopDetected => "loop_detected",
            Reason::IdentityMismatch => "identity_mismatch",
        }
    }
}

/// The key field's text in the scratch row (`""` if it has none).
fn key_text<'a>(slots: &[Slot], texts: &'a [String], key: usize, message: &'a str) -> &'a str {
    match slots.get(key) {
        Some(Slot::Str) => &texts[key],
        Some(&Slot::Span(start, end)) => message
            .get(start as usize..end as usize)
            .unwrap_or_default(),
        _ => "",
    }
}

/// A rejected message: the reason and a sentence for the `detail` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The classification.
    pub reason: Reason,
    /// Human-readable detail, e.g. which field and what was found.
    pub detail: String,
}

impl Failure {
    /// A failure with its reason and detail.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Limits applied to every message.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Messages larger than this many bytes are dead-lettered as `oversized`.
    pub max_payload: usize,
    /// Objects/arrays nested deeper than this are dead-lettered as `too_deep`.
    pub max_depth: usize,
    /// At most this many bytes of a rejected payload are kept in `dead_letter.payload`.
    pub dead_letter_payload_cap: usize,
    /// Messages carrying more hops than this are dead-lettered as `loop_detected`.
    pub max_hops: u8,
    /// A row whose event time is further than this ahead of its arrival is
    /// dead-lettered as `bad_timestamp` (`None`: no bound).
    pub max_ahead_ms: Option<i64>,
    /// ... or further than this behind it (`None`: no bound).
    pub max_behind_ms: Option<i64>,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_payload: 64 * 1024,
            max_depth: 16,
            dead_letter_payload_cap: 4096,
            max_hops: 16,
            max_ahead_ms: None,
            max_behind_ms: None,
        }
    }
}

impl DecodeLimits {
    /// Why event time `at` is refused for a row that arrived at `arrival`: further
    /// ahead of it or behind it than the bounds allow.
    fn event_time_problem(&self, at: i64, arrival: i64) -> Option<String> {
        let (how, bound, key) = if let Some(ahead) = self.max_ahead_ms
            && at > arrival.saturating_add(ahead)
        {
            ("ahead of", ahead, "max_event_time_ahead")
        } else if let Some(behind) = self.max_behind_ms
            && at < arrival.saturating_sub(behind)
        {
            ("behind", behind, "max_event_time_behind")
        } else {
            return None;
        };
        Some(format!(
            "event time {} is more than {} {how} its arrival at {} (decode.{key})",
            millis_text(at),
            sluice_config::Duration::from_millis(bound.unsigned_abs()),
            millis_text(arrival),
        ))
    }
}

/// Where a message came from; becomes the system columns.
#[derive(Debug, Clone, Copy)]
pub struct MessageMeta<'a> {
    /// Topic, topic/partition or shard.
    pub partition: &'a str,
    /// Position within the partition.
    pub offset: &'a str,
    /// When Sluice received it (epoch ms).
    pub ingest_time_ms: i64,
    /// Loop-guard hop count carried outside the payload (the Kafka header); a
    /// `_hops` field of the payload counts too, the larger wins.
    pub hops: u8,
    /// The row's `_source` when it is not the decoding source's name: a repartitioned
    /// row names the node and source that received it (`<node>/<source>`).
    pub origin: Option<&'a str>,
}

/// What one [`Decoder::flush`] hands on.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Valid rows, in the stream's schema.
    pub rows: Option<RecordBatch>,
    /// Rejected messages, in the `dead_letter` schema.
    pub dead_letters: Option<RecordBatch>,
}

enum Column {
    Utf8(StringBuilder),
    Float64(Float64Builder),
    Int64(Int64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMillisecondBuilder),
}

impl Column {
    fn new(ty: FieldType) -> Self {
        match ty {
            FieldType::Utf8 => Column::Utf8(StringBuilder::new()),
            FieldType::Float64 => Column::Float64(Float64Builder::new()),
            FieldType::Int64 => Column::Int64(Int64Builder::new()),
            FieldType::Boolean => Column::Boolean(BooleanBuilder::new()),
            FieldType::Timestamp => Column::Timestamp(TimestampMillisecondBuilder::new()),
        }
    }

    /// Appends one value; `own` is the slot's text buffer, `message` the message text.
    fn append(&mut self, slot: &Slot, own: &str, message: &str) {
        match (self, slot) {
            (Column::Utf8(b), Slot::Str) => b.append_value(own),
            (Column::Utf8(b), Slot::Span(start, end)) => b.append_value(
                message
                    .get(*start as usize..*end as usize)
                    .unwrap_or_default(),
            ),
            (Column::Float64(b), Slot::F64(v)) => b.append_value(*v),
            (Column::Int64(b), Slot::I64(v)) => b.append_value(*v),
            (Column::Boolean(b), Slot::Bool(v)) => b.append_value(*v),
            (Column::Timestamp(b), Slot::I64(v)) => b.append_value(*v),
            (Column::Utf8(b), _) => b.append_null(),
            (Column::Float64(b), _) => b.append_null(),
            (Column::Int64(b), _) => b.append_null(),
            (Column::Boolean(b), _) => b.append_null(),
            (Column::Timestamp(b), _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Utf8(b) => finish_text(b),
            Column::Float64(b) => finish_primitive(b),
            Column::Int64(b) => finish_primitive(b),
            Column::Boolean(b) => {
                let array = b.finish();
                *b = BooleanBuilder::with_capacity(array.len());
                Arc::new(array)
            }
            Column::Timestamp(b) => finish_timestamp(b),
        }
    }
}

// Arrow builders hand their buffers over on `finish` and start again empty. The next
// batch is usually the same size, so each is re-created with the last batch's
// capacity instead of regrowing from nothing (callgrind: ~3% of decode → Parquet).

fn finish_text(builder: &mut StringBuilder) -> ArrayRef {
    let array = builder.finish();
    *builder = StringBuilder::with_capacity(array.len(), array.values().len());
    Arc::new(array)
}

fn finish_primitive<T: arrow::datatypes::ArrowPrimitiveType>(
    builder: &mut arrow::array::PrimitiveBuilder<T>,
) -> ArrayRef {
    let array = builder.finish();
    *builder = arrow::array::PrimitiveBuilder::with_capacity(array.len());
    Arc::new(array)
}

fn finish_timestamp(builder: &mut TimestampMillisecondBuilder) -> ArrayRef {
    let array = builder.finish();
    *builder = TimestampMillisecondBuilder::with_capacity(array.len());
    Arc::new(array.with_timezone("UTC"))
}

/// Builders for the system columns shared by data and dead-letter batches.
struct SystemColumns {
    ingest_time: TimestampMillisecondBuilder,
    source: StringBuilder,
    partition: StringBuilder,
    offset: StringBuilder,
}

impl SystemColumns {
    fn new() -> Self {
        Self {
            ingest_time: TimestampMillisecondBuilder::new(),
            source: StringBuilder::new(),
            partition: StringBuilder::new(),
            offset: StringBuilder::new(),
        }
    }

    fn append(&mut self, source: &str, meta: &MessageMeta<'_>) {
        self.ingest_time.append_value(meta.ingest_time_ms);
        self.source.append_value(source);
        self.partition.append_value(meta.partition);
        self.offset.append_value(meta.offset);
    }

    fn finish(&mut self) -> [ArrayRef; 4] {
        [
            finish_timestamp(&mut self.ingest_time),
            finish_text(&mut self.source),
            finish_text(&mut self.partition),
            finish_text(&mut self.offset),
        ]
    }
}

/// Where a message lacking the stream's key field gets its key from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFrom {
    /// Nowhere: the message is dead-lettered if the key is required.
    Nowhere,
    /// One `/`-separated segment of the MQTT topic.
    TopicSegment(usize),
    /// The whole text given as the topic (the Kafka record key).
    Whole,
}

/// Decodes one stream's messages from one source into batches.
pub struct Decoder {
    schema: StreamSchema,
    /// The schema's fields plus an optional `_hops` (the hop count a published row
    /// carries back in), which lands in the `_hops` system column, not a field.
    parse_fields: Vec<FieldSpec>,
    stream: Arc<str>,
    source: Arc<str>,
    key_from: KeyFrom,
    /// Tells the device that published a topic (the embedded broker's ACL): a message
    /// whose key names another is dead-lettered.
    publishers: Option<Arc<Acl>>,
    limits: DecodeLimits,
    columns: Vec<Column>,
    system: SystemColumns,
    hops: UInt8Builder,
    rows: usize,
    /// Bytes taken since the last flush (payloads, and dead letters' details and kept
    /// payloads): an upper bound of what the batch's text columns hold.
    bytes: usize,
    // Scratch row, reused for every message.
    slots: Vec<Slot>,
    texts: Vec<String>,
    // Dead letters.
    dead: SystemColumns,
    dead_stream: StringBuilder,
    dead_reason: StringBuilder,
    dead_detail: StringBuilder,
    dead_payload: BinaryBuilder,
    dead_size: UInt64Builder,
    dead_rows: usize,
    // Per-key rate limit: what it shed since the last flush, and how many of those
    // were kept as dead letters.
    key_limit: Option<(KeyLimit, Sampler)>,
    shed: u64,
    shed_kept: u64,
    /// Block mode: how long the rows since the last flush must wait for their keys'
    /// room, and how many of them had to.
    held: Duration,
    held_rows: u64,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("stream", &self.stream)
            .field("source", &self.source)
            .field("rows", &self.rows)
            .field("dead_rows", &self.dead_rows)
            .finish()
    }
}

impl Decoder {
    /// A decoder for `stream` (with `schema`) fed by `source`.
    ///
    /// With `key_from_topic_segment = Some(i)`, a message without the key field takes
    /// segment `i` of its topic (`devices/<id>/telemetry` has the id at 1).
    pub fn new(
        schema: StreamSchema,
        stream: &str,
        source: &str,
        key_from_topic_segment: Option<usize>,
        limits: DecodeLimits,
    ) -> Self {
        let mut parse_fields = schema.fields().to_vec();
        parse_fields.push(FieldSpec::new(HOPS, FieldType::Int64, false));
        let n = parse_fields.len();
        Self {
            parse_fields,
            columns: schema.fields().iter().map(|f| Column::new(f.ty)).collect(),
            schema,
            stream: stream.into(),
            source: source.into(),
            key_from: key_from_topic_segment.map_or(KeyFrom::Nowhere, KeyFrom::TopicSegment),
            publishers: None,
            limits,
            system: SystemColumns::new(),
            hops: UInt8Builder::new(),
            rows: 0,
            bytes: 0,
            slots: vec![Slot::Absent; n],
            texts: vec![String::new(); n],
            dead: SystemColumns::new(),
            dead_stream: StringBuilder::new(),
            dead_reason: StringBuilder::new(),
            dead_detail: StringBuilder::new(),
            dead_payload: BinaryBuilder::new(),
            dead_size: UInt64Builder::new(),
            dead_rows: 0,
            key_limit: None,
            shed: 0,
            shed_kept: 0,
            held: Duration::ZERO,
            held_rows: 0,
        }
    }

    /// Sheds a key's events above its rate, or holds them in block mode (see
    /// [`crate::limit`]); one in `sample` of those shed is kept as a dead letter.
    pub fn set_key_limit(&mut self, limit: KeyLimit, sample: u32) {
        self.key_limit = Some((limit, Sampler::new(sample)));
    }

    /// Whether a per-key limit is set.
    pub fn has_key_limit(&self) -> bool {
        self.key_limit.is_some()
    }

    /// Events the per-key limit shed since the last call, and how many of them became
    /// dead letters; prunes the limit's quiet keys now and then.
    pub fn take_shed(&mut self) -> (u64, u64) {
        if let Some((limit, _)) = &mut self.key_limit {
            limit.prune();
        }
        (
            std::mem::take(&mut self.shed),
            std::mem::take(&mut self.shed_kept),
        )
    }

    /// Block mode: how long the rows since the last call must wait before they are
    /// handed on, and how many rows had to wait.
    pub fn take_held(&mut self) -> (Duration, u64) {
        (
            std::mem::take(&mut self.held),
            std::mem::take(&mut self.held_rows),
        )
    }

    /// Whether a row waits for its key's room (the emitter flushes at once).
    pub fn is_held(&self) -> bool {
        self.held_rows > 0
    }

    /// The stream this decoder feeds.
    pub fn stream(&self) -> &Arc<str> {
        &self.stream
    }

    /// Valid rows buffered since the last flush.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Dead letters buffered since the last flush.
    pub fn dead_rows(&self) -> usize {
        self.dead_rows
    }

    /// Bytes of messages and dead letters buffered since the last flush, at most: a
    /// batch of large messages must be handed on before a text column nears Arrow's
    /// 2 GiB (its offsets are 32-bit), and before it holds that much memory.
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    /// A message without the key field takes the whole `topic` argument of
    /// [`Decoder::push`] as its key: Kafka passes the record key there.
    pub fn key_from_whole_topic(mut self) -> Self {
        self.key_from = KeyFrom::Whole;
        self
    }

    /// A message whose key differs from the identity of the device that published it
    /// (for the embedded broker: the topic's level at `{client_id}` in `acl`) is
    /// dead-lettered as `identity_mismatch`.
    pub fn check_publisher(mut self, acl: Arc<Acl>) -> Self {
        self.publishers = Some(acl);
        self
    }

    /// Decodes one message received on `topic` (for Kafka: the record key); a bad one
    /// becomes a dead letter.
    /// Returns the failure, if any, for callers that report per request.
    pub fn push(&mut self, payload: &[u8], topic: &str, meta: &MessageMeta<'_>) -> Option<Reason> {
        self.bytes = self.bytes.saturating_add(payload.len());
        if let Some((size, kept)) = crate::mqtt::inspect::parse_trimmed(payload) {
            let detail = format!(
                "message of {size} bytes is over the embedded broker's max_payload_size; its first {} bytes are kept",
                kept.len()
            );
            self.dead_letter_sized(kept, size, meta, Failure::new(Reason::Oversized, detail));
            return Some(Reason::Oversized);
        }
        match self.parse(payload, topic) {
            Ok(message) => {
                let hops = match self.slots.last() {
                    Some(&Slot::I64(h)) => h.clamp(0, 255) as u8,
                    _ => 0,
                }
                .max(meta.hops);
                if hops > self.limits.max_hops {
                    let detail = format!(
                        "carries {hops} hops, over limits.max_hops = {}: an output feeds back into this input",
                        self.limits.max_hops
                    );
                    self.dead_letter(payload, meta, Failure::new(Reason::LoopDetected, detail));
                    return Some(Reason::LoopDetected);
                }
                if let Slot::I64(at) = self.slots[self.schema.event_time_index()]
                    && let Some(detail) = self.limits.event_time_problem(at, meta.ingest_time_ms)
                {
                    self.dead_letter(payload, meta, Failure::new(Reason::BadTimestamp, detail));
                    return Some(Reason::BadTimestamp);
                }
                if let Some((limit, sampler)) = &mut self.key_limit {
                    let key = key_text(&self.slots, &self.texts, self.schema.key_index(), message);
                    if limit.mode == LimitMode::Block {
                        let wait = limit.take(key, meta.ingest_time_ms);
                        if !wait.is_zero() {
                            self.held += wait;
                            self.held_rows += 1;
                        }
                    } else if !limit.admit(key, meta.ingest_time_ms) {
                        self.shed += 1;
                        if !sampler.keep() {
                            return Some(Reason::RateLimited);
                        }
                        self.shed_kept += 1;
                        let detail = format!("key {key:?} is over its per-key rate limit");
                        self.dead_letter(payload, meta, Failure::new(Reason::RateLimited, detail));
                        return Some(Reason::RateLimited);
                    }
                }
                for ((column, slot), own) in
                    self.columns.iter_mut().zip(&self.slots).zip(&self.texts)
                {
                    column.append(slot, own, message);
                }
                self.system
                    .append(meta.origin.unwrap_or(&self.source), meta);
                self.hops.append_value(hops);
                self.rows += 1;
                None
            }
            Err(failure) => {
                let reason = failure.reason;
                self.dead_letter(payload, meta, failure);
                Some(reason)
            }
        }
    }

    /// Records a message that was rejected before or during decoding.
    pub fn dead_letter(&mut self, payload: &[u8], meta: &MessageMeta<'_>, failure: Failure) {
        self.dead_letter_sized(payload, payload.len() as u64, meta, failure);
    }

    /// As [`dead_letter`](Self::dead_letter), for a message of `size` bytes of which
    /// only `payload` is left (the door trimmed it).
    fn dead_letter_sized(
        &mut self,
        payload: &[u8],
        size: u64,
        meta: &MessageMeta<'_>,
        failure: Failure,
    ) {
        self.dead.append(&self.source, meta);
        self.dead_stream.append_value(&*self.stream);
        self.dead_reason.append_value(failure.reason.code());
        // A detail may quote the message (a bad timestamp, a key): kept to a prefix, so
        // that a device cannot make it larger than the payload cap makes its payload.
        let detail = clip(&failure.detail, DETAIL_CAP);
        self.dead_detail.append_value(&detail);
        let cap = payload.len().min(self.limits.dead_letter_payload_cap);
        self.bytes = self.bytes.saturating_add(detail.len() + cap);
        self.dead_payload.append_value(&payload[..cap]);
        self.dead_size.append_value(size);
        self.dead_rows += 1;
    }

    /// Reads `payload` into the scratch row; the message as text on success.
    fn parse<'p>(&mut self, payload: &'p [u8], topic: &str) -> Result<&'p str, Failure> {
        if payload.len() > self.limits.max_payload {
            return Err(Failure::new(
                Reason::Oversized,
                format!(
                    "payload is {} bytes; the limit is {}",
                    payload.len(),
                    self.limits.max_payload
                ),
            ));
        }
        // simdutf8: the same answer as std::str::from_utf8 (the `compat` flavour also
        // gives the error position), several times faster; it was 4 % of a W1 run.
        let text = simdutf8::compat::from_utf8(payload).map_err(|e| {
            Failure::new(
                Reason::InvalidUtf8,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            )
        })?;
        self.slots.fill(Slot::Absent);
        if fast::parse(text, &self.parse_fields, &mut self.slots) == fast::Fast::Fallback {
            self.slots.fill(Slot::Absent);
            self.parse_full(text, payload)?;
        }
        self.finish_row(topic, text)?;
        Ok(text)
    }

    /// The full parser (serde_json): handles every message and names what is wrong.
    fn parse_full(&mut self, text: &str, payload: &[u8]) -> Result<(), Failure> {
        let mut failure = None;
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = RowSeed {
            fields: &self.parse_fields,
            slots: &mut self.slots,
            texts: &mut self.texts,
            failure: &mut failure,
            max_depth: self.limits.max_depth,
        };
        let parsed = serde::de::DeserializeSeed::deserialize(seed, &mut de).and_then(|()| de.end());
        parsed.map_err(|e| failure.unwrap_or_else(|| visitor::classify(&e, payload)))
    }

    fn finish_row(&mut self, topic: &str, message: &str) -> Result<(), Failure> {
        let key = self.schema.key_index();
        if matches!(self.slots[key], Slot::Absent | Slot::Null)
            && let Some(id) = match self.key_from {
                KeyFrom::Nowhere => None,
                KeyFrom::TopicSegment(i) => topic.split('/').nth(i),
                KeyFrom::Whole => Some(topic),
            }
            .filter(|s| !s.is_empty())
        {
            self.texts[key].clear();
            self.texts[key].push_str(id);
            self.slots[key] = Slot::Str;
        }
        if let Some(publisher) = self.publishers.as_ref().and_then(|a| a.publisher_of(topic)) {
            let claimed = key_text(&self.slots, &self.texts, key, message);
            if !claimed.is_empty() && claimed != publisher {
                return Err(Failure::new(
                    Reason::IdentityMismatch,
                    format!("key {claimed:?} is not the device {publisher:?} that published it"),
                ));
            }
        }
        for (field, slot) in self.parse_fields.iter().zip(&self.slots) {
            if field.required && matches!(slot, Slot::Absent | Slot::Null) {
                return Err(Failure::new(
                    Reason::MissingField,
                    format!("required field \"{}\" is missing or null", field.name),
                ));
            }
        }
        Ok(())
    }

    /// Hands on everything buffered, leaving the decoder empty.
    pub fn flush(&mut self) -> Decoded {
        let mut out = Decoded::default();
        self.bytes = 0;
        if self.rows > 0 {
            let mut arrays: Vec<ArrayRef> = self.columns.iter_mut().map(Column::finish).collect();
            arrays.extend(self.system.finish());
            arrays.push(finish_primitive(&mut self.hops));
            self.rows = 0;
            // The arrays are built from the schema, so a mismatch is a bug here, not bad input.
            out.rows = Some(
                RecordBatch::try_new(self.schema.arrow().clone(), arrays)
                    .unwrap_or_else(|e| unreachable!("decoder built a batch off its schema: {e}")),
            );
        }
        if self.dead_rows > 0 {
            let mut arrays: Vec<ArrayRef> = self.dead.finish().into();
            arrays.push(Arc::new(self.dead_stream.finish()));
            arrays.push(Arc::new(self.dead_reason.finish()));
            arrays.push(Arc::new(self.dead_detail.finish()));
            arrays.push(Arc::new(self.dead_payload.finish()));
            arrays.push(Arc::new(self.dead_size.finish()));
            self.dead_rows = 0;
            out.dead_letters = Some(
                RecordBatch::try_new(dead_letter_schema(), arrays)
                    .unwrap_or_else(|e| unreachable!("dead-letter batch off its schema: {e}")),
            );
        }
        out
    }
}

/// Whether the fast path and the full (serde_json) parser agree on `text`, decoded as
/// the built-in telemetry schema: whatever the fast path accepts, serde_json accepts
/// with the same values. For the property tests and the fuzz target (`fuzz/`).
#[doc(hidden)]
pub fn paths_agree(text: &str) -> Result<(), String> {
    let schema = StreamSchema::builtin("telemetry")
        .ok_or_else(|| "no built-in telemetry schema".to_owned())?;
    let mut d = Decoder::new(schema, "telemetry", "fuzz", None, DecodeLimits::default());
    d.slots.fill(Slot::Absent);
    let fields = d.schema.fields().to_vec();
    if fast::parse(text, &fields, &mut d.slots) != fast::Fast::Done {
        return Ok(());
    }
    let fast_slots = d.slots.clone();
    d.slots.fill(Slot::Absent);
    d.parse_full(text, text.as_bytes()).map_err(|e| {
        format!(
            "fast path accepted what serde_json refuses ({}): {text}",
            e.detail
        )
    })?;
    for (i, (f, s)) in fast_slots.iter().zip(&d.slots).enumerate() {
        let same = match (f, s) {
            (Slot::Span(a, b), Slot::Str) => {
                text.get(*a as usize..*b as usize) == Some(d.texts[i].as_str())
            }
            (Slot::F64(p), Slot::F64(q)) => (p - q).abs() <= 1e-12 * p.abs().max(1.0),
            _ => f == s,
        };
        if !same {
            return Err(format!("{text}: field {i}: fast {f:?}, serde_json {s:?}"));
        }
    }
    Ok(())
}

/// `ms` since 1970 as RFC 3339 (UTC), or the number when out of chrono's range.
fn millis_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// The longest dead letter's `detail`, in bytes.
const DETAIL_CAP: usize = 1024;

/// `text` cut to at most `max` bytes at a character boundary, marked with "…" when cut.
pub(crate) fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let end = text.floor_char_boundary(max.saturating_sub('…'.len_utf8()));
    format!("{}…", &text[..end]).into()
}

#[cfg(test)]
mod tests;
