//! Record live traffic and replay it.
//!
//! [`record`] reads a [`Feed`] (MQTT, Kafka or Kinesis). A recording is a sequence of `(arrival_us, topic, payload)`: arrival as epoch µs,
//! payload as the exact bytes. Two formats, chosen by the file name:
//! - `*.parquet`: columns `arrival_us` (Int64), `topic` (Utf8), `payload` (Binary);
//! - anything else: JSON lines `{"arrival_us":…,"topic":"…","payload":"…"}`, with
//!   `payload_b64` (standard base64) instead of `payload` when the bytes are not UTF-8.
//!
//! [`ReplayWorkload`] sends a recording with its inter-arrival gaps divided by the
//! speed-up, optionally looping and multiplying the fleet by rewriting device ids.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{
    Array, BinaryArray, BinaryBuilder, Int64Array, Int64Builder, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::feed::Feed;
use crate::scenario::{Kind, probe_payload};
use crate::workload::{Message, Workload};

/// One recorded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Arrival time, epoch µs.
    pub arrival_us: i64,
    /// Topic it arrived on.
    pub topic: String,
    /// Exact payload bytes.
    pub payload: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct JsonLine {
    arrival_us: i64,
    topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("arrival_us", DataType::Int64, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("payload", DataType::Binary, false),
    ]))
}

/// Writes a recording in the format its file name asks for.
#[derive(Debug)]
pub enum RecordingWriter {
    /// JSON lines.
    Json(BufWriter<File>),
    /// Parquet, buffered into batches of 8192 rows.
    Parquet {
        /// The file writer.
        writer: Box<ArrowWriter<File>>,
        /// Pending rows.
        rows: Vec<Recorded>,
    },
    /// Count only (a bare subscriber that discards messages).
    Discard,
}

impl RecordingWriter {
    /// Creates the file (`None`: discard).
    pub fn create(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::Discard);
        };
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        if is_parquet(path) {
            let writer = ArrowWriter::try_new(file, schema(), None)?;
            Ok(Self::Parquet {
                writer: Box::new(writer),
                rows: Vec::new(),
            })
        } else {
            Ok(Self::Json(BufWriter::new(file)))
        }
    }

    /// Appends one message.
    pub fn write(&mut self, rec: Recorded) -> anyhow::Result<()> {
        match self {
            Self::Json(out) => {
                let (payload, payload_b64) = match String::from_utf8(rec.payload) {
                    Ok(text) => (Some(text), None),
                    Err(e) => (None, Some(BASE64.encode(e.as_bytes()))),
                };
                serde_json::to_writer(
                    &mut *out,
                    &JsonLine {
                        arrival_us: rec.arrival_us,
                        topic: rec.topic,
                        payload,
                        payload_b64,
                    },
                )?;
                out.write_all(b"\n")?;
            }
            Self::Parquet { writer, rows } => {
                rows.push(rec);
                if rows.len() >= 8192 {
                    write_rows(writer, rows)?;
                }
            }
            Self::Discard => {}
        }
        Ok(())
    }

    /// Flushes and closes the file.
    pub fn finish(self) -> anyhow::Result<()> {
        match self {
            Self::Json(mut out) => out.flush()?,
            Self::Parquet {
                mut writer,
                mut rows,
            } => {
                write_rows(&mut writer, &mut rows)?;
                writer.close()?;
            }
            Self::Discard => {}
        }
        Ok(())
    }
}

fn write_rows(writer: &mut ArrowWriter<File>, rows: &mut Vec<Recorded>) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut at = Int64Builder::with_capacity(rows.len());
    let mut topic = StringBuilder::new();
    let mut payload = BinaryBuilder::new();
    for r in rows.drain(..) {
        at.append_value(r.arrival_us);
        topic.append_value(&r.topic);
        payload.append_value(&r.payload);
    }
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(at.finish()),
            Arc::new(topic.finish()),
            Arc::new(payload.finish()),
        ],
    )?;
    writer.write(&batch)?;
    Ok(())
}

fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

/// Reads a whole recording.
pub fn read_recording(path: &Path) -> anyhow::Result<Vec<Recorded>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    if is_parquet(path) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
        for batch in reader {
            let batch = batch?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .with_context(|| format!("{}: no column {name}", path.display()))
            };
            let at = column("arrival_us")?
                .as_any()
                .downcast_ref::<Int64Array>()
                .context("arrival_us is not Int64")?;
            let topic = column("topic")?
                .as_any()
                .downcast_ref::<StringArray>()
                .context("topic is not Utf8")?;
            let payload = column("payload")?
                .as_any()
                .downcast_ref::<BinaryArray>()
                .context("payload is not Binary")?;
            for i in 0..batch.num_rows() {
                if at.is_null(i) || topic.is_null(i) || payload.is_null(i) {
                    bail!("{}: row {} has nulls", path.display(), out.len());
                }
                out.push(Recorded {
                    arrival_us: at.value(i),
                    topic: topic.value(i).to_owned(),
                    payload: payload.value(i).to_vec(),
                });
            }
        }
    } else {
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let bad = || format!("{} line {}", path.display(), n + 1);
            let j: JsonLine = serde_json::from_str(&line).with_context(bad)?;
            let payload = match (j.payload, j.payload_b64) {
                (Some(text), None) => text.into_bytes(),
                (None, Some(b64)) => BASE64.decode(b64).with_context(bad)?,
                _ => bail!("{}: needs exactly one of payload, payload_b64", bad()),
            };
            out.push(Recorded {
                arrival_us: j.arrival_us,
                topic: j.topic,
                payload,
            });
        }
    }
    Ok(out)
}

/// What to record.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// `mqtt://HOST:PORT`, `kafka://HOST:PORT[/TOPIC]` or `kinesis://STREAM?endpoint=URL`.
    pub source: String,
    /// Topic filters.
    pub topics: Vec<String>,
    /// Subscription QoS.
    pub qos: u8,
    /// Output file; `None` discards (counts only).
    pub out: Option<PathBuf>,
    /// Stop after this many messages.
    pub limit: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Stop after no message arrived for this long (once at least one did).
    pub idle: Option<Duration>,
    /// Kafka and Kinesis: start at the oldest retained record instead of now.
    pub from_beginning: bool,
}

/// What a recording run saw.
#[derive(Debug, Clone, Serialize)]
pub struct RecordSummary {
    /// Messages recorded.
    pub messages: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Seconds from the first to the last message.
    pub span_s: f64,
    /// Messages per second over that span.
    pub rate: f64,
}

/// Subscribes and records until the limit, the duration, idleness or Ctrl-C.
pub async fn record(options: &RecordOptions) -> anyhow::Result<RecordSummary> {
    let mut feed = Feed::open(
        &options.source,
        &options.topics,
        options.qos,
        options.from_beginning,
    )
    .await?
    .spawn();
    let mut writer = RecordingWriter::create(options.out.as_deref())?;
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut messages = 0u64;
    let mut bytes = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if options.limit.is_some_and(|l| messages >= l)
            || options.duration.is_some_and(|d| start.elapsed() >= d)
        {
            break;
        }
        let wait = match (options.idle, first) {
            (Some(idle), Some(_)) => idle.saturating_sub(last.elapsed()),
            _ => Duration::from_millis(200),
        };
        let next = tokio::select! {
            _ = &mut ctrl_c => break,
            e = tokio::time::timeout(wait, feed.recv()) => e,
        };
        match next {
            Err(_) => {
                if options.idle.is_some() && first.is_some() {
                    break;
                }
            }
            Ok(Some(Ok(rec))) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                messages += 1;
                bytes += rec.payload.len() as u64;
                writer.write(rec)?;
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => bail!("the {} feed stopped", options.source),
        }
    }
    drop(feed);
    writer.finish()?;
    let span_s = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(RecordSummary {
        messages,
        bytes,
        span_s,
        rate: if span_s > 0.0 {
            messages as f64 / span_s
        } else {
            0.0
        },
    })
}

/// Now, epoch µs.
pub fn epoch_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Speed-up of the recorded gaps (10 = ten times faster). Ignored at max speed.
    pub speed: f64,
    /// Times to play the recording.
    pub loops: u32,
    /// Send each message this many times; copies 1.. get rewritten ids (`dev-1` →
    /// `dev-1~1`), multiplying the fleet.
    pub multiply: u32,
    /// Payload field with the device or user id (`device_id`, else `user_id`).
    pub id_field: Option<String>,
    /// Kind of probe events to inject.
    pub kind: Kind,
    /// Topic template for probes.
    pub probe_topic: String,
    /// Event time of offset 0, epoch ms (for probes).
    pub epoch_ms: i64,
}

/// A recording as a [`Workload`].
#[derive(Debug)]
pub struct ReplayWorkload {
    records: Vec<Recorded>,
    options: ReplayOptions,
    /// µs between loop starts (the recording's span plus one mean gap).
    period_us: i64,
    index: usize,
    copy: u32,
    round: u32,
}

impl ReplayWorkload {
    /// Replays `records`.
    pub fn new(records: Vec<Recorded>, options: ReplayOptions) -> Self {
        let span = match (records.first(), records.last()) {
            (Some(a), Some(b)) => (b.arrival_us - a.arrival_us).max(0),
            _ => 0,
        };
        let gap = span / (records.len() as i64).max(1);
        Self {
            records,
            period_us: span + gap.max(1),
            options,
            index: 0,
            copy: 0,
            round: 0,
        }
    }
}

impl Workload for ReplayWorkload {
    fn next(&mut self, msg: &mut Message) -> Option<u64> {
        if self.index >= self.records.len() {
            self.index = 0;
            self.round += 1;
        }
        if self.round >= self.options.loops.max(1) || self.records.is_empty() {
            return None;
        }
        let first = self.records[0].arrival_us;
        let rec = &self.records[self.index];
        let offset = (rec.arrival_us - first).max(0) + i64::from(self.round) * self.period_us;
        let due = (offset as f64 / self.options.speed.max(1e-9)) as u64;
        msg.clear();
        msg.topic.push_str(&rec.topic);
        msg.payload.extend_from_slice(&rec.payload);
        let id = find_id(&rec.payload, self.options.id_field.as_deref());
        match id {
            Some((start, end)) => {
                let id = String::from_utf8_lossy(&rec.payload[start..end]).into_owned();
                msg.key.push_str(&id);
                if self.copy > 0 {
                    rewrite_id(msg, &id, start, end, self.copy);
                }
            }
            None => msg.key.push_str(&rec.topic),
        }
        self.copy += 1;
        if self.copy >= self.options.multiply.max(1) {
            self.copy = 0;
            self.index += 1;
        }
        Some(due)
    }

    fn total(&self) -> Option<u64> {
        Some(
            self.records.len() as u64
                * u64::from(self.options.loops.max(1))
                * u64::from(self.options.multiply.max(1)),
        )
    }

    fn probe(&mut self, key: &str, due_us: u64, msg: &mut Message) {
        let event_ms = self.options.epoch_ms + (due_us / 1000) as i64;
        probe_payload(
            self.options.kind,
            &self.options.probe_topic,
            key,
            event_ms,
            msg,
        );
    }
}

/// Byte range of the id's value in `"field":"value"`.
fn find_id(payload: &[u8], field: Option<&str>) -> Option<(usize, usize)> {
    let fields: &[&str] = match field {
        Some(f) => &[f][..],
        None => &["device_id", "user_id"],
    };
    fields.iter().find_map(|f| {
        let needle = format!("\"{f}\":\"");
        let at = memchr::memmem::find(payload, needle.as_bytes())? + needle.len();
        let len = memchr::memchr(b'"', &payload[at..])?;
        Some((at, at + len))
    })
}

/// Copy `copy` of a device: its id becomes `<id>~<copy>` in the payload, the key and
/// any topic level equal to the id.
fn rewrite_id(msg: &mut Message, id: &str, start: usize, end: usize, copy: u32) {
    let new_id = format!("{id}~{copy}");
    msg.payload.splice(start..end, new_id.bytes());
    let topic: Vec<&str> = msg
        .topic
        .split('/')
        .map(|level| if level == id { new_id.as_str() } else { level })
        .collect();
    msg.topic = topic.join("/");
    msg.key.clear();
    msg.key.push_str(&new_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Recorded> {
        vec![
            Recorded {
                arrival_us: 1_000_000,
                topic: "devices/dev-1/telemetry".into(),
                payload: br#"{"device_id":"dev-1","ts":1}"#.to_vec(),
            },
            Recorded {
                arrival_us: 1_500_000,
                topic: "raw/bin".into(),
                payload: vec![0xff, 0x00, b'\n', 0xc3],
            },
            Recorded {
                arrival_us: 3_000_000,
                topic: "devices/dev-2/telemetry".into(),
                payload: br#"{"device_id":"dev-2","ts":2}"#.to_vec(),
            },
        ]
    }

    #[test]
    fn both_formats_round_trip_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["rec.jsonl", "rec.parquet"] {
            let path = dir.path().join(name);
            let mut w = RecordingWriter::create(Some(&path)).unwrap();
            for r in sample() {
                w.write(r).unwrap();
            }
            w.finish().unwrap();
            assert_eq!(read_recording(&path).unwrap(), sample(), "{name}");
        }
    }

    #[test]
    fn replay_scales_gaps_loops_and_multiplies_the_fleet() {
        let mut w = ReplayWorkload::new(
            sample(),
            ReplayOptions {
                speed: 2.0,
                loops: 2,
                multiply: 2,
                id_field: None,
                kind: Kind::Telemetry,
                probe_topic: "devices/{id}/telemetry".into(),
                epoch_ms: 0,
            },
        );
        assert_eq!(w.total(), Some(12));
        let mut msg = Message::default();
        let mut out = Vec::new();
        while let Some(due) = w.next(&mut msg) {
            out.push((due, msg.clone()));
        }
        assert_eq!(out.len(), 12);
        let dues: Vec<u64> = out.iter().map(|(d, _)| *d).collect();
        // Gaps halved; the second loop starts one mean gap (2 s / 3) after the end.
        let period = 2_000_000 + 666_666;
        assert_eq!(
            dues,
            vec![
                0,
                0,
                250_000,
                250_000,
                1_000_000,
                1_000_000,
                period / 2,
                period / 2,
                (period + 500_000) / 2,
                (period + 500_000) / 2,
                (period + 2_000_000) / 2,
                (period + 2_000_000) / 2
            ]
        );
        assert_eq!(out[0].1.payload, sample()[0].payload);
        assert_eq!(out[1].1.topic, "devices/dev-1~1/telemetry");
        assert_eq!(out[1].1.payload, br#"{"device_id":"dev-1~1","ts":1}"#);
        assert_eq!(out[1].1.key, "dev-1~1");
        // No id in a binary payload: sent unchanged, keyed by topic.
        assert_eq!(out[3].1.payload, sample()[1].payload);
        assert_eq!(out[3].1.key, "raw/bin");
    }
}
