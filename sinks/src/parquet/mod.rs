//! The Parquet lake writer.
//!
//! `<lake>/<table>/date=YYYY-MM-DD/hour=HH/part-<uuid v7>.parquet` (a local directory or
//! an object store, [`LakeLocation`]), by each row's event
//! time (the column named in the schema metadata). Rows are encoded as they arrive into
//! one open in-memory file per (table, hour); a file is sealed (encoded whole, footer
//! and all, still in memory) when it reaches `roll_size` or has been open for
//! `roll_interval` ([`Lake::seal_due`]), and on [`Lake::seal_all`]. A [`FileStore`]
//! stores sealed files ([`Lake::take_sealed`]) on whatever task the caller likes, so
//! the puts need not hold up the encoding; [`Lake::roll_due`] and [`Lake::close_all`]
//! seal and store in one call.
//!
//! # Stored is not committed
//! A stored file is invisible to readers until a Delta commit adds it to its table's
//! log (`crate::delta`). Each stored file comes with its partition values and Delta
//! statistics ([`Written`]), for the caller to commit: at once (a bounded run) or with
//! a checkpoint (`crate::checkpoint`). A file
//! stored by a run that crashed before its commit stays unreferenced, and vacuum
//! deletes it after the grace period.
//!
//! On a local directory `object_store::local` writes a temporary file (`<name>#<n>`)
//! and renames it into place; temporaries left by a kill -9 are deleted by
//! [`Lake::open`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Schema, SchemaRef, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sluice_core::Clock;
use sluice_core::busy::Busy;
use sluice_core::schema::{HOPS, INGEST_TIME, OFFSET, event_time_column};

use crate::location::LakeLocation;
use crate::{Error, Result};

mod stats;
pub use stats::delta_stats;

const HOUR_MS: i64 = 3_600_000;

/// How the lake writes.
#[derive(Debug, Clone)]
pub struct LakeOptions {
    /// Commit a file once its encoded size reaches this many bytes.
    pub roll_size: usize,
    /// Commit a file this many milliseconds after its first row.
    pub roll_interval_ms: i64,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// zstd level.
    pub zstd_level: i32,
}

/// A stored data file, ready for its table's Delta log (an `add` action).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataFile {
    /// Path relative to the table's directory (`date=…/hour=…/part-….parquet`).
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Rows.
    pub rows: u64,
    /// The `date` partition value (`YYYY-MM-DD`).
    pub date: String,
    /// The `hour` partition value (`HH`).
    pub hour: String,
    /// Delta statistics (JSON: `numRecords`, `minValues`, `maxValues`, `nullCount`).
    pub stats: String,
    /// When it was stored (epoch ms).
    pub modified_ms: i64,
}

/// The files stored for one table since the last [`Lake::take_written`].
#[derive(Debug, Clone)]
pub struct Written {
    /// The table's Arrow schema (of its newest file).
    pub schema: SchemaRef,
    /// The files, in the order they were stored.
    pub files: Vec<DataFile>,
}

/// What a round of stores did; also emitted as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    /// Files stored.
    pub files: u64,
    /// Rows in them.
    pub rows: u64,
    /// Bytes in them.
    pub bytes: u64,
}

struct OpenFile {
    writer: ArrowWriter<Vec<u8>>,
    schema: SchemaRef,
    opened_ms: i64,
    rows: u64,
}

/// A file sealed (no row goes into it any more) waiting for its `put`; kept until the
/// put succeeds. Its writer is finished (the last row group encoded, the footer
/// written) by [`FileStore::store`], so that this CPU work too is done off the task
/// that seals.
struct Sealed {
    table: Arc<str>,
    schema: SchemaRef,
    /// `size` and `stats` are filled in when the writer is finished.
    file: DataFile,
    body: Body,
}

enum Body {
    Open(Box<ArrowWriter<Vec<u8>>>),
    Finished(bytes::Bytes),
}

impl Sealed {
    /// Encoded bytes held in memory (written and buffered, while still open).
    fn bytes(&self) -> usize {
        match &self.body {
            Body::Open(w) => w.memory_size() + w.bytes_written(),
            Body::Finished(b) => b.len(),
        }
    }

    /// Finishes the writer (once): the whole file, its size and Delta statistics.
    fn finish(&mut self) -> Result<bytes::Bytes> {
        let writer = match &mut self.body {
            Body::Finished(bytes) => return Ok(bytes.clone()),
            Body::Open(writer) => writer,
        };
        let metadata = writer.finish().map_err(|source| Error::Parquet {
            table: self.table.to_string(),
            source,
        })?;
        // The footer is written: the buffer is the whole file.
        let bytes = bytes::Bytes::from(std::mem::take(writer.inner_mut()));
        self.file.size = bytes.len() as u64;
        self.file.stats = delta_stats(&self.schema, &metadata);
        self.body = Body::Finished(bytes.clone());
        Ok(bytes)
    }
}

/// Files sealed and not yet stored, in the order they were sealed
/// ([`Lake::take_sealed`]); a failed put keeps the file and those after it here.
#[derive(Default)]
pub struct SealedFiles(std::collections::VecDeque<Sealed>);

impl SealedFiles {
    /// Whether no file waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Encoded bytes held.
    pub fn bytes(&self) -> usize {
        self.0.iter().map(Sealed::bytes).sum()
    }

    /// Rows in the files.
    pub fn rows(&self) -> u64 {
        self.0.iter().map(|s| s.file.rows).sum()
    }

    /// Queues `later` behind these files.
    pub fn append(&mut self, mut later: SealedFiles) {
        self.0.append(&mut later.0);
    }
}

impl std::fmt::Debug for SealedFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedFiles")
            .field("files", &self.0.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Puts sealed files at their final paths in the lake's store. Separate from the
/// [`Lake`] so that the puts can run on another task while the lake encodes on.
#[derive(Clone)]
pub struct FileStore {
    store: Arc<dyn ObjectStore>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore").finish_non_exhaustive()
    }
}

/// The lake: open files per (table, hour) and the store they commit to.
pub struct Lake {
    options: LakeOptions,
    files: FileStore,
    /// The lake's URL, for logs.
    location: String,
    clock: Arc<dyn Clock>,
    open: HashMap<Arc<str>, BTreeMap<i64, OpenFile>>,
    /// Files encoded but not yet stored (a failed put is retried from here).
    sealed: SealedFiles,
    /// Files stored since the last [`Lake::take_written`], by table.
    written: BTreeMap<Arc<str>, Written>,
    /// Each table's encoding time (`sluice_stage_busy_seconds_total{stage="lake"}`).
    busy: HashMap<Arc<str>, Busy>,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake")
            .field("location", &self.location)
            .field("open_tables", &self.open.len())
            .finish()
    }
}

impl Lake {
    /// Opens the lake at `location`; on a local directory, deletes the temporary files
    /// a kill -9 left inside a `put`.
    pub fn open(
        options: LakeOptions,
        location: &LakeLocation,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        if let Some(root) = location.local_dir() {
            let removed = remove_staging_files(root).map_err(|source| Error::Io {
                path: root.display().to_string(),
                source,
            })?;
            if removed > 0 {
                tracing::info!(removed, root = %root.display(), "deleted partial files left by a crash");
            }
        }
        Ok(Self {
            options,
            files: FileStore {
                store: location.store().clone(),
                clock: clock.clone(),
            },
            location: location.url().to_string(),
            clock,
            open: HashMap::new(),
            sealed: SealedFiles::default(),
            written: BTreeMap::new(),
            busy: HashMap::new(),
        })
    }

    /// Encodes `batch` into the table's open file(s), split by event hour; the time it
    /// takes is the table's busy time in the console.
    pub fn write(&mut self, table: &Arc<str>, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let written = self.encode(table, batch);
        let busy = match self.busy.get(table) {
            Some(busy) => busy,
            None => self
                .busy
                .entry(table.clone())
                .or_insert_with(|| Busy::stage("lake", table)),
        };
        busy.since(started);
        written
    }

    fn encode(&mut self, table: &Arc<str>, batch: &RecordBatch) -> Result<()> {
        for (hour, part) in split_by_hour(batch) {
            let now = self.clock.now_ms();
            let (level, row_groups) = (self.options.zstd_level, self.options.row_group_rows);
            let files = self.open.entry(table.clone()).or_default();
            let file = match files.entry(hour) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let writer = ArrowWriter::try_new(
                        Vec::new(),
                        part.schema(),
                        Some(writer_properties(level, row_groups, part.schema_ref())),
                    )
                    .map_err(|source| Error::Parquet {
                        table: table.to_string(),
                        source,
                    })?;
                    v.insert(OpenFile {
                        writer,
                        schema: part.schema(),
                        opened_ms: now,
                        rows: 0,
                    })
                }
            };
            file.writer.write(&part).map_err(|source| Error::Parquet {
                table: table.to_string(),
                source,
            })?;
            file.rows += part.num_rows() as u64;
        }
        Ok(())
    }

    /// Rows encoded but not yet committed.
    pub fn pending_rows(&self) -> u64 {
        let open: u64 = self
            .open
            .values()
            .flat_map(|f| f.values())
            .map(|f| f.rows)
            .sum();
        open + self.sealed.rows()
    }

    /// How long ago the oldest open file was opened (its rows are in no commit yet).
    pub fn oldest_open_age(&self) -> Option<std::time::Duration> {
        let oldest = self
            .open
            .values()
            .flat_map(|f| f.values())
            .map(|f| f.opened_ms)
            .min()?;
        let age = self.clock.now_ms().saturating_sub(oldest).max(0);
        Some(std::time::Duration::from_millis(age as u64))
    }

    /// Encoded bytes held in memory: open files (written and buffered) and sealed
    /// files not yet stored.
    pub fn backlog_bytes(&self) -> usize {
        let open: usize = self
            .open
            .values()
            .flat_map(|f| f.values())
            .map(|f| f.writer.memory_size() + f.writer.bytes_written())
            .sum();
        open + self.sealed.bytes()
    }

    /// Stores every file that is old or large enough.
    pub async fn roll_due(&mut self) -> Result<CommitStats> {
        self.store_after(Self::seal_due).await
    }

    /// Stores every open file (shutdown, checkpoints).
    pub async fn close_all(&mut self) -> Result<CommitStats> {
        self.store_after(Self::seal_all).await
    }

    /// The files stored since the last call, by table: what the next commit adds.
    pub fn take_written(&mut self) -> BTreeMap<Arc<str>, Written> {
        std::mem::take(&mut self.written)
    }

    /// Whether files were stored since the last [`Lake::take_written`].
    pub fn has_written(&self) -> bool {
        !self.written.is_empty()
    }

    /// Seals every file that is old or large enough (no row goes into it any more),
    /// for [`Lake::take_sealed`]. Stores nothing.
    pub fn seal_due(&mut self) {
        let now = self.clock.now_ms();
        let (interval, size) = (self.options.roll_interval_ms, self.options.roll_size);
        self.seal_where(|f| {
            now - f.opened_ms >= interval
                || f.writer.memory_size() + f.writer.bytes_written() >= size
        });
    }

    /// Seals every open file (a checkpoint's cut, shutdown). Stores nothing.
    pub fn seal_all(&mut self) {
        self.seal_where(|_| true);
    }

    /// Whether sealed files wait for [`Lake::take_sealed`].
    pub fn has_sealed(&self) -> bool {
        !self.sealed.is_empty()
    }

    /// The files sealed and not yet stored, in order, for [`FileStore::store`].
    pub fn take_sealed(&mut self) -> SealedFiles {
        std::mem::take(&mut self.sealed)
    }

    /// What puts sealed files into this lake's store.
    pub fn file_store(&self) -> FileStore {
        self.files.clone()
    }

    /// Stores the files sealed earlier, then seals (`seal`) and stores more, in order.
    /// A store failure (disk full, bucket gone) keeps the failed file and those after
    /// it for the next call, so nothing encoded is lost while the store is away; and
    /// while earlier files cannot be stored no more are sealed or finished, so the
    /// backlog stays as it is (finishing a file frees its writer's buffers, which
    /// would let more in).
    async fn store_after(&mut self, seal: fn(&mut Self)) -> Result<CommitStats> {
        let mut stats = self
            .files
            .store(&mut self.sealed, &mut self.written)
            .await?;
        seal(self);
        let more = self
            .files
            .store(&mut self.sealed, &mut self.written)
            .await?;
        stats.files += more.files;
        stats.rows += more.rows;
        stats.bytes += more.bytes;
        Ok(stats)
    }

    fn seal_where(&mut self, due: impl Fn(&OpenFile) -> bool) {
        for (table, files) in &mut self.open {
            let hours: Vec<i64> = files
                .iter()
                .filter(|(_, f)| due(f))
                .map(|(h, _)| *h)
                .collect();
            for hour in hours {
                let Some(file) = files.remove(&hour) else {
                    continue;
                };
                let (date, hour_text) = partition_values(hour);
                self.sealed.0.push_back(Sealed {
                    table: table.clone(),
                    file: DataFile {
                        path: format!(
                            "date={date}/hour={hour_text}/part-{}.parquet",
                            uuid::Uuid::now_v7().simple()
                        ),
                        size: 0,
                        rows: file.rows,
                        date,
                        hour: hour_text,
                        stats: String::new(),
                        modified_ms: 0,
                    },
                    schema: file.schema,
                    body: Body::Open(Box::new(file.writer)),
                });
            }
        }
        self.open.retain(|_, files| !files.is_empty());
    }
}

impl FileStore {
    /// Stores `sealed` in order, each file at its final path, adding what was stored
    /// to `written` (by table); stops at the first failure, which keeps that file and
    /// those after it in `sealed`.
    pub async fn store(
        &self,
        sealed: &mut SealedFiles,
        written: &mut BTreeMap<Arc<str>, Written>,
    ) -> Result<CommitStats> {
        let mut stats = CommitStats::default();
        while let Some(next) = sealed.0.front_mut() {
            let bytes = next.finish()?;
            let len = bytes.len() as u64;
            let target = ObjectPath::from(format!("{}/{}", next.table, next.file.path));
            self.store
                .put(&target, PutPayload::from(bytes))
                .await
                .map_err(|source| Error::Store {
                    path: target.to_string(),
                    source,
                })?;
            let Some(stored) = sealed.0.pop_front() else {
                break;
            };
            let table = stored.table.to_string();
            let rows = stored.file.rows;
            metrics::counter!("sluice_lake_files_written_total", "table" => table.clone())
                .increment(1);
            metrics::counter!("sluice_lake_rows_written_total", "table" => table.clone())
                .increment(rows);
            metrics::counter!("sluice_lake_bytes_written_total", "table" => table).increment(len);
            tracing::debug!(table = %stored.table, path = %stored.file.path, rows, bytes = len, "stored");
            stats.files += 1;
            stats.rows += rows;
            stats.bytes += len;
            let mut file = stored.file;
            file.modified_ms = self.clock.now_ms();
            match written.entry(stored.table) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Written {
                        schema: stored.schema,
                        files: vec![file],
                    });
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    let w = o.get_mut();
                    w.schema = stored.schema;
                    w.files.push(file);
                }
            }
        }
        Ok(stats)
    }
}

/// Writer settings for a file of `schema`, zstd at `zstd_level`. Dictionary encoding is
/// off for the event time and `_offset`: they are nearly unique per row, so interning
/// them costs a hash and compare per value for nothing (the writer falls back to plain).
/// Delta encoding (`DELTA_BINARY_PACKED`) for the event time was tried: 12.2 bits a row
/// against 14.7 and 4 % fewer CPU-seconds in a release build, but parquet's delta
/// encoder reserves a 1 MiB buffer per column chunk, which every open file would add to
/// the lake's backlog (`memory_size`): small backlogs filled with no rows to store.
/// `_offset` has no statistics either: string min/max cost two compares per row and
/// offsets are compared as numbers, not text, so they could not prune anyway. Other
/// columns keep it: 2-decimal readings compress ~25% better with it.
pub fn writer_properties(
    zstd_level: i32,
    row_group_rows: usize,
    schema: &Schema,
) -> WriterProperties {
    let level = ZstdLevel::try_new(zstd_level).unwrap_or_default();
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .set_column_dictionary_enabled(ColumnPath::from(OFFSET), false)
        .set_column_statistics_enabled(ColumnPath::from(OFFSET), EnabledStatistics::None)
        .set_column_dictionary_enabled(ColumnPath::from(INGEST_TIME), false)
        .set_column_dictionary_enabled(ColumnPath::from(HOPS), false);
    if let Some(i) = event_time_column(schema) {
        let name = schema.field(i).name().clone();
        builder = builder.set_column_dictionary_enabled(ColumnPath::from(name), false);
    }
    builder.build()
}

/// The `date` and `hour` partition values of an hour bucket (hours since the epoch).
pub fn partition_values(hour: i64) -> (String, String) {
    let t = chrono::DateTime::from_timestamp_millis(hour * HOUR_MS).unwrap_or_default();
    (t.format("%Y-%m-%d").to_string(), t.format("%H").to_string())
}

/// Splits a batch by the hour of its event time; one slice (no copy) in the common case.
fn split_by_hour(batch: &RecordBatch) -> Vec<(i64, RecordBatch)> {
    let column = event_time_column(batch.schema_ref())
        .map(|i| batch.column(i))
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>());
    let Some(times) = column else {
        return vec![(0, batch.clone())];
    };
    let hour = |i: usize| {
        if times.is_null(i) {
            0
        } else {
            times.value(i).div_euclid(HOUR_MS)
        }
    };
    let first = hour(0);
    if (1..times.len()).all(|i| hour(i) == first) {
        return vec![(first, batch.clone())];
    }
    let mut groups: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for i in 0..times.len() {
        groups.entry(hour(i)).or_default().push(i as u32);
    }
    groups
        .into_iter()
        .filter_map(|(h, rows)| {
            // `take` cannot fail on in-range indices of the batch's own rows.
            take_record_batch(batch, &UInt32Array::from(rows))
                .ok()
                .map(|b| (h, b))
        })
        .collect()
}

/// Deletes `object_store` staging files (`name#n`) under `root`; returns how many.
fn remove_staging_files(root: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains('#'))
            {
                std::fs::remove_file(&path)?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
