//! The write-ahead log of the MQTT source and of HTTP ingest: QoS 1 messages (and
//! request bodies) are appended here and fsynced, a group commit at a time
//! ([`GroupLog`]), before their PUBACK (or the HTTP answer), so a message the broker
//! (or the client) has let go of is on our disk. The lake checkpoint records the WAL
//! sequence number it covers; on start the records past it are replayed, and segments
//! wholly below it are deleted.
//!
//! A segment is `<first seq, 20 digits>.wal`, a run of records:
//!
//! ```text
//! u32 LE body length | u32 LE CRC-32 of body | body
//! body = u64 LE seq | u16 LE packet id | i64 LE arrival ms | u16 LE topic length | topic | payload
//! ```
//!
//! A torn or corrupt record ends its segment (a crash mid-write); a later segment
//! starts afresh. Records whose sequence number does not grow (a batch rewritten after
//! a failed write) are skipped when reading.
//!
//! Hand-written rather than a WAL crate: the format is twenty lines, the group commit
//! is driven by the source's own loop, and trimming follows our checkpoint manifest.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sluice_core::{Checkpointed, SourcePositions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::source::backoff;

/// Past this many bytes gathered for the next group commit, a writer that can wait
/// (HTTP ingest, whose requests queue) takes no more until the running fsync ends: a
/// client that sends a body and goes away holds nothing, so only this bounds what
/// a slow disk makes the log hold.
pub const GATHER_MAX: usize = 64 << 20;

/// A segment is closed and a new one started once it reaches this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Length and CRC before each record's body.
const HEADER: usize = 8;
/// seq, packet id, arrival ms and topic length.
const FIXED: usize = 8 + 2 + 8 + 2;

/// One message as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    /// Its place in the log; the MQTT source's `_offset` and checkpoint position.
    pub seq: u64,
    /// The MQTT packet id it arrived with (to recognise a redelivery).
    pub pkid: u16,
    /// When it arrived (epoch ms), kept so a replay decodes it identically.
    pub ingest_ms: i64,
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
}

/// Appends one record to `buf` (the next group commit's bytes).
pub fn encode(buf: &mut Vec<u8>, seq: u64, pkid: u16, ingest_ms: i64, topic: &str, payload: &[u8]) {
    // A topic is at most 65,535 bytes by the MQTT spec, so the u16 cannot truncate one
    // that a broker delivered; clamp rather than panic on anything else.
    let topic = &topic.as_bytes()[..topic.len().min(usize::from(u16::MAX))];
    let body_len = FIXED + topic.len() + payload.len();
    let start = buf.len();
    buf.reserve(HEADER + body_len);
    buf.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&pkid.to_le_bytes());
    buf.extend_from_slice(&ingest_ms.to_le_bytes());
    buf.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    buf.extend_from_slice(topic);
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the records of one segment, stopping at the first torn or corrupt one.
fn decode_segment(bytes: &Bytes, out: &mut Vec<WalRecord>) -> bool {
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let len = word(at) as usize;
        let crc = word(at + 4);
        let body_start = at + HEADER;
        if len < FIXED || bytes.len() - body_start < len {
            return false;
        }
        let body = &bytes[body_start..body_start + len];
        if crc32fast::hash(body) != crc {
            return false;
        }
        let u64_at = |i: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&body[i..i + 8]);
            b
        };
        let seq = u64::from_le_bytes(u64_at(0));
        let pkid = u16::from_le_bytes([body[8], body[9]]);
        let ingest_ms = i64::from_le_bytes(u64_at(10));
        let topic_len = usize::from(u16::from_le_bytes([body[18], body[19]]));
        if FIXED + topic_len > len {
            return false;
        }
        let topic = String::from_utf8_lossy(&body[FIXED..FIXED + topic_len]).into_owned();
        let payload = bytes.slice(body_start + FIXED + topic_len..body_start + len);
        out.push(WalRecord {
            seq,
            pkid,
            ingest_ms,
            topic,
            payload,
        });
        at = body_start + len;
    }
    at == bytes.len()
}

/// The segments of `dir`, oldest first, with their first sequence numbers.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wal")
            && let Some(first) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The log's appending end. Not shared: the source moves it into a blocking task for
/// each group commit and gets it back.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    /// The open segment and its size; `None` until the next append opens one.
    file: Option<(File, u64)>,
}

/// What [`Wal::open`] found on disk.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every readable record, in sequence order.
    pub records: Vec<WalRecord>,
    /// Segments that ended in a torn or corrupt record.
    pub torn_segments: usize,
}

impl Wal {
    /// Opens (creating) the log in `dir` and reads back what it holds. Appends go to a
    /// new segment, never after a possibly torn tail.
    pub fn open(dir: &Path) -> io::Result<(Self, Recovered)> {
        fs::create_dir_all(dir)?;
        let mut recovered = Recovered::default();
        let mut raw = Vec::new();
        for (_, path) in segments(dir)? {
            let bytes = Bytes::from(fs::read(&path)?);
            if !decode_segment(&bytes, &mut raw) {
                recovered.torn_segments += 1;
            }
        }
        let mut last = None;
        for record in raw {
            if last.is_none_or(|l| record.seq > l) {
                last = Some(record.seq);
                recovered.records.push(record);
            }
        }
        let wal = Self {
            dir: dir.to_owned(),
            file: None,
        };
        Ok((wal, recovered))
    }

    /// Writes `buf` (records from `first_seq` on) and fsyncs it. After a failure the
    /// next append starts a new segment, so a half-written batch is never followed by
    /// good records in the same file.
    pub fn append(&mut self, buf: &[u8], first_seq: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let result = self.try_append(buf, first_seq);
        if result.is_err() {
            self.file = None;
        }
        result
    }

    fn try_append(&mut self, buf: &[u8], first_seq: u64) -> io::Result<()> {
        if self
            .file
            .as_ref()
            .is_none_or(|(_, size)| *size >= SEGMENT_BYTES)
        {
            let path = self.dir.join(format!("{first_seq:020}.wal"));
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)?;
            // The new name must survive a crash too.
            File::open(&self.dir)?.sync_all()?;
            self.file = Some((file, 0));
        }
        if let Some((file, size)) = &mut self.file {
            file.write_all(buf)?;
            file.sync_data()?;
            *size += buf.len() as u64;
        }
        Ok(())
    }

    /// Deletes the segments whose every record is at or below `covered` (in a lake
    /// checkpoint). The newest segment is always kept. If any is to go, `keep` runs
    /// first, to save what must outlive them; when it fails, none is deleted. Returns
    /// how many were deleted.
    pub fn trim(
        dir: &Path,
        covered: u64,
        keep: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<usize> {
        let segments = segments(dir)?;
        let doomed: Vec<&PathBuf> = segments
            .windows(2)
            .filter(|pair| pair[1].0.saturating_sub(1) <= covered)
            .map(|pair| &pair[0].1)
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        keep()?;
        for path in &doomed {
            fs::remove_file(path)?;
        }
        Ok(doomed.len())
    }

    /// The highest bound for [`Wal::trim`] that leaves the newest segments of `dir`
    /// holding at most `max_bytes` (the newest segment is kept whatever its size); 0
    /// when they all fit.
    pub fn bound_keeping(dir: &Path, max_bytes: u64) -> io::Result<u64> {
        let segments = segments(dir)?;
        let mut kept = 0u64;
        for (i, (_, path)) in segments.iter().enumerate().rev() {
            kept = kept.saturating_add(fs::metadata(path)?.len());
            if kept > max_bytes && i + 1 < segments.len() {
                return Ok(segments[i + 1].0.saturating_sub(1));
            }
        }
        Ok(0)
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The partition under which a logged source's checkpoint position (its log's
/// sequence number) is recorded.
pub const WAL_PARTITION: &str = "wal";

/// Where a logged source keeps its log and how it learns of checkpoints.
#[derive(Debug)]
pub struct DurableAcks {
    /// The log's directory (`<lake>/_wal/<source>`).
    pub dir: PathBuf,
    /// This source's positions in the newest checkpoint (where replay starts).
    pub resume: SourcePositions,
    /// Each checkpoint once durable: the log segments it covers are deleted.
    pub checkpoints: watch::Receiver<Checkpointed>,
}

/// The sequence number a checkpoint's positions give a logged source (0: none).
pub fn covered_by(positions: &std::collections::BTreeMap<String, String>) -> u64 {
    positions
        .get(WAL_PARTITION)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Waits for the next checkpoint (forever without one to wait for); the sequence
/// number it covers for source `name`.
pub async fn checkpointed(
    checkpoints: &mut Option<watch::Receiver<Checkpointed>>,
    name: &str,
) -> u64 {
    let Some(rx) = checkpoints else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    rx.borrow_and_update().get(name).map_or(0, covered_by)
}

/// What a group commit's blocking task hands back.
pub type Committed =
    std::result::Result<(Wal, Vec<u8>, io::Result<()>, Duration), tokio::task::JoinError>;

/// A group commit on a blocking thread and the items it covers.
#[derive(Debug)]
struct InFlight<T> {
    task: JoinHandle<(Wal, Vec<u8>, io::Result<()>, Duration)>,
    items: Vec<T>,
    /// The number of its first record, if it writes any (restored on failure).
    first: Option<u64>,
}

/// A log written a group commit at a time: what arrives while one fsync runs gathers
/// for the next, and each item (a message to acknowledge, a request to answer) is
/// handed back once its records are on disk. A failed write keeps its items and bytes
/// for the next try, with backoff, logged once per outage.
#[derive(Debug)]
pub struct GroupLog<T> {
    name: String,
    kind: &'static str,
    dir: PathBuf,
    /// `None` while a commit has it.
    wal: Option<Wal>,
    next_seq: u64,
    buffer: Vec<u8>,
    /// The number of the first record in `buffer`.
    first: Option<u64>,
    pending: Vec<T>,
    inflight: Option<InFlight<T>>,
    /// The log is trimmed up to here.
    covered: u64,
    /// While writes fail: when to try again, and how many tries so far.
    failing: Option<(Instant, u32)>,
}

impl<T: Send + 'static> GroupLog<T> {
    /// Opens source `name`'s log (of `kind`, for logs and metrics); also what it holds
    /// and the sequence number the newest checkpoint covers.
    pub fn open(
        name: &str,
        kind: &'static str,
        durable: &DurableAcks,
    ) -> crate::Result<(Self, Recovered, u64)> {
        let (wal, recovered) = Wal::open(&durable.dir).map_err(|error| crate::Error::Wal {
            source_name: name.to_owned(),
            path: durable.dir.display().to_string(),
            error,
        })?;
        let covered = covered_by(&durable.resume.offsets);
        if recovered.torn_segments > 0 {
            tracing::warn!(component = %name, kind, segments = recovered.torn_segments,
                "write-ahead log ended in a torn record (a crash mid-write); what it held was not acknowledged");
        }
        let last = recovered.records.last().map_or(0, |r| r.seq);
        let log = Self {
            name: name.to_owned(),
            kind,
            dir: durable.dir.clone(),
            wal: Some(wal),
            next_seq: last.max(covered) + 1,
            buffer: Vec::new(),
            first: None,
            pending: Vec::new(),
            inflight: None,
            covered,
            failing: None,
        };
        Ok((log, recovered, covered))
    }

    /// The records of `recovered` past `covered`, to go through the pipeline again.
    pub fn replay(&self, recovered: Vec<WalRecord>, covered: u64) -> Vec<WalRecord> {
        let records: Vec<_> = recovered.into_iter().filter(|r| r.seq > covered).collect();
        metrics::counter!("sluice_wal_replayed_total", "component" => self.name.clone())
            .increment(records.len() as u64);
        tracing::info!(component = %self.name, kind = self.kind, dir = %self.dir.display(), covered,
            replay = records.len(), "acknowledged once in the write-ahead log");
        records
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes a record into the next commit, spanning `seqs` numbers from
    /// [`next_seq`](Self::next_seq) (at least one: the lines of an HTTP body). The
    /// record carries the last of them, so that a record's number says how far it
    /// reaches (replay, trimming). Returns the first.
    pub fn write(
        &mut self,
        seqs: u64,
        pkid: u16,
        ingest_ms: i64,
        topic: &str,
        payload: &[u8],
    ) -> u64 {
        let first = self.next_seq;
        self.next_seq += seqs.max(1);
        let last = self.next_seq - 1;
        encode(&mut self.buffer, last, pkid, ingest_ms, topic, payload);
        self.first.get_or_insert(last);
        first
    }

    /// Whether the next commit holds [`GATHER_MAX`] bytes or more.
    pub fn is_gathering_full(&self) -> bool {
        self.buffer.len() >= GATHER_MAX
    }

    /// Hands `item` back with the next commit, once what was written before it is on
    /// disk.
    pub fn wait(&mut self, item: T) {
        self.pending.push(item);
    }

    /// Whether no commit is running.
    pub fn is_idle(&self) -> bool {
        self.inflight.is_none()
    }

    /// Whether writes are failing (the items wait for the next try).
    pub fn is_failing(&self) -> bool {
        self.failing.is_some()
    }

    /// Starts a group commit of everything gathered, unless one is running or writes
    /// are failing and the backoff has not passed.
    pub fn start_commit(&mut self) {
        if self.inflight.is_some()
            || self.pending.is_empty()
            || self.failing.is_some_and(|(at, _)| Instant::now() < at)
        {
            return;
        }
        let Some(mut wal) = self.wal.take() else {
            return;
        };
        let buf = std::mem::take(&mut self.buffer);
        let first = self.first.take();
        let task = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = wal.append(&buf, first.unwrap_or(0));
            (wal, buf, result, started.elapsed())
        });
        self.inflight = Some(InFlight {
            task,
            items: std::mem::take(&mut self.pending),
            first,
        });
    }

    /// Waits for the running commit (forever if none, or without a log).
    pub async fn committed(log: Option<&mut Self>) -> Committed {
        match log.and_then(|l| l.inflight.as_mut()) {
            Some(inflight) => (&mut inflight.task).await,
            None => std::future::pending().await,
        }
    }

    /// Ends the running commit: its items when it succeeded; otherwise they wait for
    /// the next try, with backoff, and the failure is logged once.
    pub fn finish(&mut self, done: Committed) -> crate::Result<Option<Vec<T>>> {
        let inflight = self.inflight.take();
        let (wal, mut buf, result, took) = done.map_err(|e| crate::Error::Wal {
            source_name: self.name.clone(),
            path: self.dir.display().to_string(),
            error: io::Error::other(e.to_string()),
        })?;
        self.wal = Some(wal);
        let Some(InFlight {
            mut items, first, ..
        }) = inflight
        else {
            return Ok(None);
        };
        match result {
            Ok(()) => {
                metrics::histogram!("sluice_wal_commit_seconds", "component" => self.name.clone())
                    .record(took.as_secs_f64());
                metrics::counter!("sluice_wal_bytes_total", "component" => self.name.clone())
                    .increment(buf.len() as u64);
                if let Some((_, tries)) = self.failing.take() {
                    tracing::info!(component = %self.name, kind = self.kind, tries, "write-ahead log writable again");
                }
                if self.buffer.is_empty() {
                    buf.clear();
                    self.buffer = buf;
                }
                Ok(Some(items))
            }
            Err(error) => {
                metrics::counter!("sluice_wal_failures_total", "component" => self.name.clone())
                    .increment(1);
                let tries = match self.failing {
                    Some((_, tries)) => tries + 1,
                    None => {
                        tracing::error!(component = %self.name, kind = self.kind, dir = %self.dir.display(), %error,
                            "cannot write the write-ahead log; nothing written since is acknowledged (it waits), retrying");
                        1
                    }
                };
                self.failing = Some((Instant::now() + backoff(tries), tries));
                // The failed bytes go first again, under their own numbers (a reader
                // skips records whose number does not grow).
                buf.append(&mut self.buffer);
                self.buffer = buf;
                if first.is_some() {
                    self.first = first;
                }
                items.append(&mut self.pending);
                self.pending = items;
                Ok(None)
            }
        }
    }

    /// Deletes the log segments wholly at or below `bound` (a checkpoint's position,
    /// or less), after `keep` saved in the log's directory what must outlive them.
    pub fn trim(&mut self, bound: u64, keep: impl FnOnce(&Path) -> io::Result<()>) {
        if bound <= self.covered {
            return;
        }
        self.covered = bound;
        match Wal::trim(&self.dir, bound, || keep(&self.dir)) {
            Ok(n) if n > 0 => {
                metrics::counter!("sluice_wal_segments_deleted_total", "component" => self.name.clone())
                    .increment(n as u64);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(component = %self.name, kind = self.kind, %error, "cannot trim the write-ahead log (its checkpointed segments are kept for now)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seqs: std::ops::Range<u64>) -> Vec<u8> {
        let mut buf = Vec::new();
        for seq in seqs {
            let payload = format!("{{\"n\":{seq}}}");
            encode(
                &mut buf,
                seq,
                seq as u16,
                1000 + seq as i64,
                "devices/d1/telemetry",
                payload.as_bytes(),
            );
        }
        buf
    }

    fn seqs(r: &Recovered) -> Vec<u64> {
        r.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn records_round_trip_across_segments_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, r) = Wal::open(dir.path()).expect("open");
        assert!(r.records.is_empty());
        wal.append(&batch(1..4), 1).expect("append");
        wal.append(&batch(4..6), 4).expect("append");
        drop(wal);
        let (mut wal, r) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&r), vec![1, 2, 3, 4, 5]);
        let first = &r.records[0];
        assert_eq!(first.pkid, 1);
        assert_eq!(first.ingest_ms, 1001);
        assert_eq!(first.topic, "devices/d1/telemetry");
        assert_eq!(&first.payload[..], b"{\"n\":1}");
        // A reopened log appends to a new segment.
        wal.append(&batch(6..7), 6).expect("append");
        let (_, r) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&r), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(segments(dir.path()).expect("list").len(), 2);
    }

    #[test]
    fn a_torn_tail_ends_its_segment_and_later_segments_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        wal.append(&batch(1..4), 1).expect("append");
        drop(wal);
        // Tear the last record, as a crash in the middle of a write would.
        let path = &segments(dir.path()).expect("list")[0].1;
        let len = fs::metadata(path).expect("meta").len();
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(len - 3))
            .expect("truncate");
        let (mut wal, r) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&r), vec![1, 2]);
        assert_eq!(r.torn_segments, 1);
        // The unacknowledged record 3 comes again from the broker, as seq 3.
        wal.append(&batch(3..5), 3).expect("append");
        let (_, r) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_corrupt_record_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        let mut buf = batch(1..3);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        wal.append(&buf, 1).expect("append");
        let (_, r) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&r), vec![1]);
    }

    #[test]
    fn a_rewritten_batch_is_read_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        wal.append(&batch(1..3), 1).expect("append");
        // As after a failed write: the batch again, in a new segment.
        wal.file = None;
        wal.append(&batch(2..4), 2).expect("append");
        let (_, r) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&r), vec![1, 2, 3]);
    }

    #[test]
    fn trim_deletes_only_covered_segments_and_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        for first in [1u64, 11, 21] {
            wal.file = None;
            wal.append(&batch(first..first + 10), first)
                .expect("append");
        }
        let nothing = || -> io::Result<()> { panic!("nothing is to be deleted") };
        assert_eq!(Wal::trim(dir.path(), 5, nothing).expect("trim"), 0);
        // What must outlive the segments cannot be saved: they stay.
        assert!(Wal::trim(dir.path(), 15, || Err(io::Error::other("disk full"))).is_err());
        assert_eq!(seqs(&Wal::open(dir.path()).expect("open").1)[0], 1);
        assert_eq!(Wal::trim(dir.path(), 15, || Ok(())).expect("trim"), 1);
        assert_eq!(seqs(&Wal::open(dir.path()).expect("open").1)[0], 11);
        assert_eq!(Wal::trim(dir.path(), 1_000, || Ok(())).expect("trim"), 1);
        let (_, r) = Wal::open(dir.path()).expect("open");
        assert_eq!(seqs(&r), (21..31).collect::<Vec<_>>());
    }

    #[test]
    fn a_byte_bound_keeps_the_newest_segments_that_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path()).expect("open");
        let mut sizes = Vec::new();
        for first in [1u64, 11, 21, 31] {
            wal.file = None;
            let records = batch(first..first + 10);
            sizes.push(records.len() as u64);
            wal.append(&records, first).expect("append");
        }
        let newest_two = sizes[2] + sizes[3];
        assert_eq!(Wal::bound_keeping(dir.path(), u64::MAX).expect("bound"), 0);
        assert_eq!(
            Wal::bound_keeping(dir.path(), newest_two).expect("bound"),
            20
        );
        assert_eq!(
            Wal::bound_keeping(dir.path(), newest_two - 1).expect("bound"),
            30
        );
        // The newest segment stays even when it alone is over the bound.
        assert_eq!(Wal::bound_keeping(dir.path(), 0).expect("bound"), 30);
        let bound = Wal::bound_keeping(dir.path(), newest_two).expect("bound");
        assert_eq!(Wal::trim(dir.path(), bound, || Ok(())).expect("trim"), 2);
        let (_, r) = Wal::open(dir.path()).expect("open");
        assert_eq!(seqs(&r), (21..41).collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    /// A log in `dir` with no checkpoint yet.
    fn open(dir: &Path) -> GroupLog<&'static str> {
        let (_checkpoints, rx) = watch::channel(Checkpointed::default());
        let durable = DurableAcks {
            dir: dir.to_owned(),
            resume: SourcePositions::default(),
            checkpoints: rx,
        };
        GroupLog::open("failing-test", "mqtt", &durable)
            .expect("open")
            .0
    }

    async fn commit(log: &mut GroupLog<&'static str>) -> Option<Vec<&'static str>> {
        log.start_commit();
        let done = GroupLog::committed(Some(&mut *log)).await;
        log.finish(done).expect("the commit task ran")
    }

    /// What gathers behind a running commit is bounded for writers that can wait:
    /// past [`GATHER_MAX`] bytes the log says so, until the next commit takes them.
    #[tokio::test]
    async fn what_gathers_behind_a_running_commit_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = open(dir.path());
        log.write(1, 1, 1_000, "devices/d1/telemetry", b"{\"n\":1}");
        log.wait("first");
        log.start_commit();
        let payload = vec![b'x'; 1 << 20];
        let mut bodies = 0;
        while !log.is_gathering_full() {
            log.write(1, 0, 1_001, "", &payload);
            bodies += 1;
        }
        log.wait("rest");
        assert_eq!(bodies, 64, "64 MiB and their headers");
        let done = GroupLog::committed(Some(&mut log)).await;
        assert_eq!(log.finish(done).expect("ran"), Some(vec!["first"]));
        assert!(
            log.is_gathering_full(),
            "gathered until its own commit starts"
        );
        assert_eq!(commit(&mut log).await, Some(vec!["rest"]));
        assert!(!log.is_gathering_full());
    }

    /// A write that fails (the segment is `/dev/full`, so every write gets ENOSPC, even
    /// as root) hands nothing back to be acknowledged; what waited, and what came
    /// after, goes out in order once the log is writable again, and is on disk once.
    #[tokio::test]
    async fn a_failed_write_acknowledges_nothing_and_the_retry_writes_everything_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = open(dir.path());
        // The first record is number 1, so the first segment is named after it.
        let segment = dir.path().join(format!("{:020}.wal", 1));
        std::os::unix::fs::symlink("/dev/full", &segment).expect("symlink");

        log.write(1, 1, 1_000, "devices/d1/telemetry", b"{\"n\":1}");
        log.wait("first");
        assert_eq!(commit(&mut log).await, None, "nothing is acknowledged");
        assert!(log.is_failing());
        // More arrives while it fails; it waits behind the first.
        log.write(1, 2, 1_001, "devices/d1/telemetry", b"{\"n\":2}");
        log.wait("second");
        // Within the backoff no commit starts.
        log.start_commit();
        assert!(log.is_idle(), "no retry before the backoff");

        std::fs::remove_file(&segment).expect("the disk has room again");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(commit(&mut log).await, Some(vec!["first", "second"]));
        assert!(!log.is_failing());

        let (_, recovered) = Wal::open(dir.path()).expect("reopen");
        let read: Vec<(u64, &[u8])> = recovered
            .records
            .iter()
            .map(|r| (r.seq, &r.payload[..]))
            .collect();
        assert_eq!(
            read,
            vec![(1, &b"{\"n\":1}"[..]), (2, &b"{\"n\":2}"[..])],
            "each record once, in order"
        );
    }
}
