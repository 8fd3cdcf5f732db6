//! The shape of the data between components.
//!
//! A stream's batches hold its declared fields followed by the system columns
//! ([`INGEST_TIME`], [`SOURCE`], [`PARTITION`], [`OFFSET`], [`HOPS`]). The event time
//! and the key are ordinary declared fields (`ts` and `device_id` for telemetry); the
//! Arrow schema's metadata names them under [`EVENT_TIME_META`] and [`KEY_META`], so
//! analysts see their own column names and nothing is stored twice.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

/// Schema metadata key naming the event-time column.
pub const EVENT_TIME_META: &str = "sluice.event_time";
/// Schema metadata key naming the key column.
pub const KEY_META: &str = "sluice.key";

/// System column: when Sluice received the message (UTC, ms).
pub const INGEST_TIME: &str = "_ingest_time";
/// System column: the name of the source that received the message.
pub const SOURCE: &str = "_source";
/// System column: topic, topic/partition or shard the message came from.
pub const PARTITION: &str = "_partition";
/// System column: the position within [`PARTITION`] (offset, sequence or receive count).
pub const OFFSET: &str = "_offset";
/// System column: how many function/topic hops the event has made (loop guard).
pub const HOPS: &str = "_hops";
/// Kafka header carrying [`HOPS`] (decimal text) on records Sluice produces; the
/// payload field of the same name as `HOPS` carries it on MQTT and webhooks.
pub const HOPS_HEADER: &str = "sluice-hops";
/// Kafka header of a repartition record: who published it (`<node>/<source>`).
pub const ORIGIN_HEADER: &str = "sluice-origin";
/// Kafka header of a repartition record: its row's sequence number at the origin (the
/// write-ahead log's, decimal text), rising in publishing order; or
/// [`SourcePositions::END`] (a farewell), or [`SeqText::REST`] (a goodbye).
pub const SEQ_HEADER: &str = "sluice-seq";

/// The Arrow type of every timestamp Sluice writes: UTC milliseconds.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The type of a declared field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// UTF-8 text.
    Utf8,
    /// 64-bit float; JSON integers are accepted and widened.
    Float64,
    /// 64-bit signed integer.
    Int64,
    /// true / false.
    Boolean,
    /// Epoch milliseconds (JSON integer) or an RFC 3339 string, stored as UTC ms.
    Timestamp,
}

impl FieldType {
    /// The Arrow type the field is stored as.
    pub fn arrow_type(self) -> DataType {
        match self {
            FieldType::Utf8 => DataType::Utf8,
            FieldType::Float64 => DataType::Float64,
            FieldType::Int64 => DataType::Int64,
            FieldType::Boolean => DataType::Boolean,
            FieldType::Timestamp => timestamp_type(),
        }
    }

    /// Parses the config spelling (`string`, `float`, `int`, `bool`, `timestamp`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "string" | "utf8" => FieldType::Utf8,
            "float" | "double" | "float64" => FieldType::Float64,
            "int" | "integer" | "int64" => FieldType::Int64,
            "bool" | "boolean" => FieldType::Boolean,
            "timestamp" => FieldType::Timestamp,
            _ => return None,
        })
    }

    /// What the decoder says it expected, for dead-letter reasons.
    pub fn describe(self) -> &'static str {
        match self {
            FieldType::Utf8 => "a string",
            FieldType::Float64 => "a number",
            FieldType::Int64 => "an integer",
            FieldType::Boolean => "a boolean",
            FieldType::Timestamp => "epoch milliseconds or an RFC 3339 string",
        }
    }
}

/// One declared field of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    /// JSON key and column name.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// Whether a message without it is dead-lettered.
    pub required: bool,
}

impl FieldSpec {
    /// A field spec.
    pub fn new(name: &str, ty: FieldType, required: bool) -> Self {
        Self {
            name: name.to_owned(),
            ty,
            required,
        }
    }
}

/// Why a stream schema cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The named event-time field is not declared or is not a timestamp.
    #[error("event-time field \"{0}\" must be a declared, required timestamp field")]
    EventTime(String),
    /// The named key field is not declared or is not a string.
    #[error("key field \"{0}\" must be a declared string field")]
    Key(String),
    /// A declared name clashes with another or with a system column.
    #[error("field \"{0}\" is declared twice or starts with '_' (reserved for system columns)")]
    Name(String),
}

/// A stream's declared fields plus its Arrow schema (declared + system columns).
#[derive(Debug, Clone)]
pub struct StreamSchema {
    fields: Vec<FieldSpec>,
    event_time: usize,
    key: usize,
    arrow: SchemaRef,
}

impl StreamSchema {
    /// Builds a schema; the event-time field must be a required timestamp and the key a string.
    pub fn new(fields: Vec<FieldSpec>, event_time: &str, key: &str) -> Result<Self, SchemaError> {
        for (i, f) in fields.iter().enumerate() {
            if f.name.starts_with('_') || fields[..i].iter().any(|g| g.name == f.name) {
                return Err(SchemaError::Name(f.name.clone()));
            }
        }
        let event_time_idx = fields
            .iter()
            .position(|f| f.name == event_time && f.ty == FieldType::Timestamp && f.required)
            .ok_or_else(|| SchemaError::EventTime(event_time.to_owned()))?;
        let key_idx = fields
            .iter()
            .position(|f| f.name == key && f.ty == FieldType::Utf8)
            .ok_or_else(|| SchemaError::Key(key.to_owned()))?;
        let mut columns: Vec<Field> = fields
            .iter()
            .map(|f| Field::new(&f.name, f.ty.arrow_type(), !f.required))
            .collect();
        columns.extend(system_fields());
        let metadata = HashMap::from([
            (EVENT_TIME_META.to_owned(), event_time.to_owned()),
            (KEY_META.to_owned(), key.to_owned()),
        ]);
        Ok(Self {
            fields,
            event_time: event_time_idx,
            key: key_idx,
            arrow: Arc::new(Schema::new_with_metadata(columns, metadata)),
        })
    }

    /// The built-in schemas: `telemetry` and `clickstream` (DESIGN.md formats).
    pub fn builtin(name: &str) -> Option<Self> {
        use FieldType::*;
        let (fields, key) = match name {
            "telemetry" => (
                vec![
                    FieldSpec::new("device_id", Utf8, true),
                    FieldSpec::new("ts", Timestamp, true),
                    FieldSpec::new("temperature", Float64, false),
                    FieldSpec::new("humidity", Float64, false),
                    FieldSpec::new("battery", Float64, false),
                    FieldSpec::new("status", Utf8, false),
                ],
                "device_id",
            ),
            "clickstream" => (
                vec![
                    FieldSpec::new("user_id", Utf8, true),
                    FieldSpec::new("session_hint", Utf8, false),
                    FieldSpec::new("ts", Timestamp, true),
                    FieldSpec::new("event", Utf8, true),
                    FieldSpec::new("page", Utf8, false),
                    FieldSpec::new("referrer", Utf8, false),
                    FieldSpec::new("ua", Utf8, false),
                ],
                "user_id",
            ),
            _ => return None,
        };
        Self::new(fields, "ts", key).ok()
    }

    /// The declared fields, in column order.
    pub fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }

    /// Column index of the event time.
    pub fn event_time_index(&self) -> usize {
        self.event_time
    }

    /// Column index of the key.
    pub fn key_index(&self) -> usize {
        self.key
    }

    /// The Arrow schema: declared fields then system columns.
    pub fn arrow(&self) -> &SchemaRef {
        &self.arrow
    }
}

/// The system columns appended after a stream's declared fields.
pub fn system_fields() -> Vec<Field> {
    vec![
        Field::new(INGEST_TIME, timestamp_type(), false),
        Field::new(SOURCE, DataType::Utf8, false),
        Field::new(PARTITION, DataType::Utf8, false),
        Field::new(OFFSET, DataType::Utf8, false),
        Field::new(HOPS, DataType::UInt8, false),
    ]
}

/// The table rejected messages (and rows the loop guard stopped) land in.
pub const DEAD_LETTER_TABLE: &str = "dead_letter";

/// The `dead_letter` table: one row per rejected message, partitioned by ingest time.
pub fn dead_letter_schema() -> SchemaRef {
    let mut fields = system_fields();
    fields.retain(|f| f.name() != HOPS);
    fields.extend([
        Field::new("stream", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("payload", DataType::Binary, false),
        Field::new("payload_size", DataType::UInt64, false),
    ]);
    let metadata = HashMap::from([(EVENT_TIME_META.to_owned(), INGEST_TIME.to_owned())]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// The table of rows a window could no longer take.
pub const LATE_TABLE: &str = "late";

/// The `late` table: one row per event that arrived after every window it belongs to
/// was final (its end + allowed lateness passed by the watermark). Partitioned by
/// ingest time. `row` is the event as a JSON object; `window_start`/`window_end` name
/// the window it missed (for a session window, the one it would have opened).
pub fn late_schema() -> SchemaRef {
    let fields = vec![
        Field::new("window", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("window_start", timestamp_type(), true),
        Field::new("window_end", timestamp_type(), true),
        Field::new("event_time", timestamp_type(), true),
        Field::new("row", DataType::Utf8, false),
        Field::new(INGEST_TIME, timestamp_type(), false),
    ];
    let metadata = HashMap::from([(EVENT_TIME_META.to_owned(), INGEST_TIME.to_owned())]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// The table of alert events.
pub const ALERTS_TABLE: &str = "alerts";

/// The `alerts` table: one row per fire or resolve of a rule for a key (muted ones
/// too, with `notified = false`), and one per storm-cap summary. Partitioned by `at`,
/// the event time of the transition. `alert_id` = `<rule>/<key>/<episode>` is the
/// same for a fire and its resolve; `labels` is a JSON object.
pub fn alerts_schema() -> SchemaRef {
    let fields = vec![
        Field::new("alert_id", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("message", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, false),
        Field::new("notified", DataType::Boolean, false),
        Field::new("window_start", timestamp_type(), true),
        Field::new("window_end", timestamp_type(), true),
        Field::new("fired_at", timestamp_type(), true),
        Field::new("resolved_at", timestamp_type(), true),
        Field::new("at", timestamp_type(), false),
    ];
    let metadata = HashMap::from([
        (EVENT_TIME_META.to_owned(), "at".to_owned()),
        (KEY_META.to_owned(), "key".to_owned()),
    ]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// An alert event on its way to notifiers: the names of the notifiers to use and the
/// JSON object they send (also what topic templates read).
#[derive(Debug, Clone)]
pub struct Notification {
    /// `[notifiers.<name>]` to send it to.
    pub notify: Arc<[String]>,
    /// The event as a JSON object: `alert_id`, `rule`, `key`, `event`, the rule's
    /// `group_by` columns, `severity`, `labels`, `value`, `message`, `at`, `fired_at`,
    /// `resolved_at`, `window_start`, `window_end` (times in epoch ms).
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// The index of the event-time column of a batch's schema, from its metadata.
pub fn event_time_column(schema: &Schema) -> Option<usize> {
    let name = schema.metadata().get(EVENT_TIME_META)?;
    schema.index_of(name).ok()
}

/// A batch of one stream (or table) on its way between components.
#[derive(Debug, Clone)]
pub struct StreamBatch {
    /// The stream or table it belongs to.
    pub stream: Arc<str>,
    /// The rows.
    pub batch: RecordBatch,
    /// For a batch from a replayable source (Kafka, Kinesis): where the source stands
    /// once this batch and every earlier one of the source are processed. The lake task
    /// records it, and the next checkpoint's manifest holds it.
    pub positions: Option<Arc<SourcePositions>>,
}

impl StreamBatch {
    /// A batch without source positions.
    pub fn new(stream: Arc<str>, batch: RecordBatch) -> Self {
        Self {
            stream,
            batch,
            positions: None,
        }
    }
}

/// Every source's positions (source → partition → offset) in the newest durable
/// checkpoint: what sources may acknowledge upstream.
pub type Checkpointed =
    Arc<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>;

/// One source's read positions: per partition (Kafka `topic/partition`, Kinesis shard
/// id), the offset or sequence number of the last record handed on, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourcePositions {
    /// The source's name (`[sources.<name>]`).
    pub source: String,
    /// Partition → last offset handed on.
    pub offsets: std::collections::BTreeMap<String, String>,
    /// For the source of a repartitioned stream: partition → origin → the last
    /// sequence number handed on from that origin in that partition (a record at or
    /// below it is an origin's replay, skipped).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub origins: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Seq>>,
    /// The partitions still to be read to their end, as far as the source knows,
    /// whoever reads them (a Kinesis stream's open shards), each with the partitions
    /// it continues (a child shard's parents, read to their end before it). Not
    /// stored in manifests.
    #[serde(skip)]
    pub open: std::collections::BTreeMap<String, Vec<String>>,
    /// The offsets are one log's series (the MQTT source's write-ahead log, under
    /// `"wal"`), not partitions of the rows: windows with `by_partition` watermarks do
    /// not wait for them. Not stored in manifests.
    #[serde(skip)]
    pub log_series: bool,
}

impl SourcePositions {
    /// The offset of a partition read to its end (a Kinesis shard closed by a split or
    /// merge): it sends no more rows, so windows stop waiting for it.
    pub const END: &'static str = "SHARD_END";

    /// Raises each origin's last sequence number in `into` to the one in `seen`.
    pub fn raise_origins(
        into: &mut std::collections::BTreeMap<String, Seq>,
        seen: &std::collections::BTreeMap<String, Seq>,
    ) {
        for (origin, seq) in seen {
            match into.get_mut(origin) {
                Some(last) if *last >= *seq => {}
                Some(last) => last.clone_from(seq),
                None => {
                    into.insert(origin.clone(), seq.clone());
                }
            }
        }
    }

    /// Orders two positions of one partition: Kafka offsets and Kinesis sequence
    /// numbers are decimal integers without leading zeros (a sequence number has up to
    /// 56 digits, past any integer type), so the longer is the further, then the
    /// greater text. [`END`](Self::END) is past every number.
    pub fn compare(a: &str, b: &str) -> std::cmp::Ordering {
        let end = |p: &str| p == Self::END;
        end(a)
            .cmp(&end(b))
            .then(a.len().cmp(&b.len()))
            .then_with(|| a.cmp(b))
    }
}

/// A repartitioned row's sequence number within its origin (the `sluice-seq` header):
/// an MQTT write-ahead log's number, or a Kinesis sequence number (up to 56 digits,
/// past any integer type), as canonical decimal text ordered by
/// [`SourcePositions::compare`]. [`Seq::end`] follows every number: an origin that
/// said farewell (a Kinesis shard read to its end) sends nothing more.
///
/// A number may also be *resting* (text `~<number>`): its origin said goodbye (a node
/// that stopped cleanly, everything it published checkpointed), so windows do not
/// wait for it until it greets again; the number still recognises replays, and
/// orders as the number.
///
/// Stored as text; manifests written when sequence numbers were integers still read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Seq(String);

impl Seq {
    /// Below every row's number: the mark of an origin known from its greeting only.
    pub fn greeting() -> Self {
        Self("0".into())
    }

    /// Past every number: the origin said farewell.
    pub fn end() -> Self {
        Self(SourcePositions::END.into())
    }

    /// Whether the origin said farewell.
    pub fn is_end(&self) -> bool {
        self.0 == SourcePositions::END
    }

    /// Whether the origin said goodbye and has not greeted since.
    pub fn is_resting(&self) -> bool {
        self.0.starts_with(REST_MARK)
    }

    /// The origin said goodbye: marks the number resting (not a farewell's).
    pub fn rest(&mut self) {
        if !self.is_resting() && !self.is_end() {
            self.0.insert(0, REST_MARK);
        }
    }

    /// The origin greeted again: the number is no longer resting.
    pub fn wake(&mut self) {
        if self.is_resting() {
            self.0.remove(0);
        }
    }

    /// The number itself, without the resting mark.
    fn number(&self) -> &str {
        self.0.strip_prefix(REST_MARK).unwrap_or(&self.0)
    }

    /// The number `text` names (decimal digits, leading zeros dropped, or
    /// [`SourcePositions::END`]), resting if it starts with `~`; `None` for anything
    /// else.
    pub fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix(REST_MARK) {
            Some(number) => {
                let mut seq = Self::from(Self::canonical(number).filter(|n| !n.is_end())?);
                seq.rest();
                Some(seq)
            }
            None => Self::canonical(text).map(Self::from),
        }
    }

    /// As [`Seq::parse`], borrowed: what a record's header says, checked without a
    /// copy (one per record on the repartition topic's reader).
    pub fn canonical(text: &str) -> Option<SeqText<'_>> {
        if text == SourcePositions::END {
            return Some(SeqText(text));
        }
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = text.trim_start_matches('0');
        Some(SeqText(if digits.is_empty() { "0" } else { digits }))
    }

    /// Moves this number on to `to` if that is further (and so wakes it); whether it
    /// did. Reuses this number's buffer.
    pub fn advance(&mut self, to: SeqText<'_>) -> bool {
        let further = SourcePositions::compare(to.0, self.number()).is_gt();
        if further {
            self.0.clear();
            self.0.push_str(to.0);
        }
        further
    }

    /// The text, as a header carries it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The mark of a resting number's text, and a goodbye's header value.
const REST_MARK: char = '~';

/// A sequence number's canonical text, borrowed (from [`Seq::canonical`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqText<'a>(&'a str);

impl<'a> SeqText<'a> {
    /// A goodbye's `sluice-seq` header: the origin stopped cleanly, everything it
    /// published is checkpointed, and it sends nothing until it greets again.
    pub const REST: SeqText<'static> = SeqText("~");

    /// Whether it is a farewell ([`Seq::end`]).
    pub fn is_end(self) -> bool {
        self.0 == SourcePositions::END
    }

    /// The text, as a header carries it.
    pub fn as_str(self) -> &'a str {
        self.0
    }
}

impl From<SeqText<'_>> for Seq {
    fn from(text: SeqText<'_>) -> Self {
        Self(text.0.to_owned())
    }
}

impl From<u64> for Seq {
    fn from(n: u64) -> Self {
        Self(n.to_string())
    }
}

/// By the number, then a resting one after the same number awake: its goodbye came
/// after that number's row (so a takeover keeps the newer news).
impl Ord for Seq {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        SourcePositions::compare(self.number(), other.number())
            .then(self.is_resting().cmp(&other.is_resting()))
    }
}

impl PartialOrd for Seq {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<'de> serde::Deserialize<'de> for Seq {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Number(u64),
            Text(String),
        }
        match Stored::deserialize(d)? {
            Stored::Number(n) => Ok(n.into()),
            Stored::Text(t) => Self::parse(&t)
                .ok_or_else(|| serde::de::Error::custom(format!("{t:?} is not a sequence number"))),
        }
    }
}

/// Keyed state (windows) kept for one source partition: who owned it when, and how far
/// its rows go. A checkpoint lists one per partition whose state it holds; a node
/// taking the partition over restores the state with the furthest position, and of
/// equal positions the newest owner's (the highest fencing epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionState {
    /// The fencing epoch under which the node holding this state owns (or last owned)
    /// the partition.
    pub epoch: u64,
    /// The position of the partition's last row in the state (`None`: no row yet).
    pub position: Option<String>,
}

impl PartitionState {
    /// Whether this state is further along than `other`: its position is further, or
    /// equal under a newer epoch.
    pub fn supersedes(&self, other: &Self) -> bool {
        let position = match (&self.position, &other.position) {
            (Some(a), Some(b)) => SourcePositions::compare(a, b),
            (a, b) => a.is_some().cmp(&b.is_some()),
        };
        position.then(self.epoch.cmp(&other.epoch)).is_gt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_order_past_u64_and_read_stored_integers() {
        let kinesis = "49590338271490256608559692538361571095921575989136588898";
        let big = Seq::parse(kinesis).unwrap();
        assert!(big > Seq::from(u64::MAX));
        assert!(Seq::end() > big);
        assert!(Seq::greeting() < Seq::from(1));
        assert_eq!(Seq::parse("007"), Some(Seq::from(7)));
        let mut last = Seq::from(7);
        assert!(
            !last.advance(Seq::canonical("0007").unwrap()),
            "not further"
        );
        assert!(last.advance(Seq::canonical(kinesis).unwrap()));
        assert_eq!(last, big);
        assert!(last.advance(Seq::canonical(SourcePositions::END).unwrap()));
        assert!(last.is_end());
        assert_eq!(Seq::parse("-1"), None);
        assert_eq!(Seq::parse(""), None);
        let stored: std::collections::BTreeMap<String, Seq> =
            serde_json::from_str(&format!(r#"{{"a": 12, "b": "{kinesis}"}}"#)).unwrap();
        assert_eq!(stored["a"], Seq::from(12));
        assert_eq!(stored["b"], big);
        assert!(serde_json::from_str::<Seq>(r#""x1""#).is_err());
        let mut into = [("a".to_owned(), Seq::from(5))].into();
        SourcePositions::raise_origins(&mut into, &stored);
        assert_eq!(into, stored);
    }

    #[test]
    fn a_resting_number_orders_as_its_number_recognises_replays_and_wakes() {
        let mut seq = Seq::from(12);
        seq.rest();
        assert!(seq.is_resting());
        assert_eq!(serde_json::to_string(&seq).unwrap(), r#""~12""#);
        assert_eq!(serde_json::from_str::<Seq>(r#""~12""#).unwrap(), seq);
        assert!(seq > Seq::from(12), "its goodbye came after 12");
        assert!(seq < Seq::from(13));
        assert!(!seq.advance(Seq::canonical("12").unwrap()), "a replay");
        assert!(seq.is_resting());
        seq.wake();
        assert_eq!(seq, Seq::from(12));
        seq.rest();
        assert!(seq.advance(Seq::canonical("13").unwrap()));
        assert_eq!(seq, Seq::from(13), "a row wakes it");
        let mut end = Seq::end();
        end.rest();
        assert!(end.is_end() && !end.is_resting(), "a farewell is final");
        assert_eq!(Seq::parse("~SHARD_END"), None);
        assert_eq!(Seq::parse("~"), None);
        let mut stored = [("a".to_owned(), Seq::from(5))].into();
        SourcePositions::raise_origins(
            &mut stored,
            &[("a".to_owned(), Seq::parse("~5").unwrap())].into(),
        );
        assert!(stored["a"].is_resting(), "a takeover keeps the goodbye");
    }

    #[test]
    fn positions_order_by_number_and_states_by_position_then_epoch() {
        use std::cmp::Ordering::*;
        assert_eq!(SourcePositions::compare("99", "100"), Less);
        assert_eq!(SourcePositions::compare("100", "100"), Equal);
        assert_eq!(SourcePositions::compare("101", "100"), Greater);
        assert_eq!(
            SourcePositions::compare(
                SourcePositions::END,
                "49590338271490256608559692538361571095921575989136588898"
            ),
            Greater
        );
        let at = |epoch, position: Option<&str>| PartitionState {
            epoch,
            position: position.map(str::to_owned),
        };
        assert!(at(1, Some("100")).supersedes(&at(2, Some("99"))));
        assert!(at(2, Some("100")).supersedes(&at(1, Some("100"))));
        assert!(!at(1, Some("100")).supersedes(&at(1, Some("100"))));
        assert!(at(1, Some("0")).supersedes(&at(5, None)));
    }

    #[test]
    fn builtins_name_their_time_and_key() {
        let t = StreamSchema::builtin("telemetry").expect("telemetry");
        let arrow = t.arrow();
        assert_eq!(arrow.field(t.key_index()).name(), "device_id");
        assert_eq!(event_time_column(arrow), Some(1));
        assert_eq!(arrow.fields().len(), 6 + 5);
        assert!(StreamSchema::builtin("clickstream").is_some());
        assert!(StreamSchema::builtin("nope").is_none());
    }

    #[test]
    fn bad_schemas_are_refused() {
        let f = vec![FieldSpec::new("id", FieldType::Utf8, true)];
        assert_eq!(
            StreamSchema::new(f.clone(), "ts", "id").unwrap_err(),
            SchemaError::EventTime("ts".into())
        );
        let mut g = f.clone();
        g.push(FieldSpec::new("_x", FieldType::Int64, false));
        assert!(matches!(
            StreamSchema::new(g, "ts", "id"),
            Err(SchemaError::Name(_))
        ));
    }

    #[test]
    fn dead_letter_is_partitioned_by_ingest_time() {
        let s = dead_letter_schema();
        assert_eq!(event_time_column(&s), s.index_of(INGEST_TIME).ok());
    }
}
