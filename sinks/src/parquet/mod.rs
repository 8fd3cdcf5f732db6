//! The Parquet lake writer.
//!
//! `root/<table>/date=YYYY-MM-DD/hour=HH/part-<uuid v7>.parquet`, by each row's event
//! time (the column named in the schema metadata). Rows are encoded as they arrive into
//! one open in-memory file per (table, hour); a file is committed when it reaches
//! `roll_size` or has been open for `roll_interval`, and on [`Lake::close_all`].
//!
//! # Atomic commit
//! A commit is a single `put` to the object store. On a local directory
//! `object_store::local` writes a staging file (`<name>#<n>`) and renames it into place,
//! so a reader never sees a partial file; readers list only `*.parquet`. Staging files
//! left by a kill -9 are deleted by [`Lake::open`]. (A rename is atomic for process
//! crashes; it is not fsynced, so power loss is out of scope here.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::TimestampMillisecondType;
use arrow::record_batch::RecordBatch;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sluice_core::Clock;
use sluice_core::schema::{HOPS, INGEST_TIME, OFFSET, event_time_column};

use crate::checkpoint::STAGING_DIR;
use crate::{Error, Result};

const HOUR_MS: i64 = 3_600_000;

/// How the lake writes.
#[derive(Debug, Clone)]
pub struct LakeOptions {
    /// Root directory.
    pub root: PathBuf,
    /// Commit a file once its encoded size reaches this many bytes.
    pub roll_size: usize,
    /// Commit a file this many milliseconds after its first row.
    pub roll_interval_ms: i64,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// zstd level.
    pub zstd_level: i32,
    /// Roll files into `_staging/` for a checkpoint to commit
    /// ([`crate::checkpoint`]) instead of straight to their final paths.
    pub staged: bool,
}

/// What a round of commits did; also emitted as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    /// Files committed.
    pub files: u64,
    /// Rows in them.
    pub rows: u64,
    /// Bytes in them.
    pub bytes: u64,
}

struct OpenFile {
    writer: ArrowWriter<Vec<u8>>,
    opened_ms: i64,
    rows: u64,
}

/// A finished file waiting for its `put`; kept until the put succeeds.
struct Sealed {
    table: Arc<str>,
    /// Final path, relative to the root.
    path: String,
    bytes: bytes::Bytes,
    rows: u64,
}

/// The lake: open files per (table, hour) and the store they commit to.
pub struct Lake {
    options: LakeOptions,
    compression: Compression,
    store: Arc<dyn ObjectStore>,
    clock: Arc<dyn Clock>,
    open: HashMap<Arc<str>, BTreeMap<i64, OpenFile>>,
    /// Files encoded but not yet stored (a failed put is retried from here).
    sealed: Vec<Sealed>,
    /// Final paths of files stored in `_staging/` since the last [`Lake::take_staged`].
    staged: Vec<String>,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake")
            .field("root", &self.options.root)
            .field("open_tables", &self.open.len())
            .finish()
    }
}

impl Lake {
    /// Opens (creating) the lake at `options.root` and deletes staging leftovers.
    pub fn open(options: LakeOptions, clock: Arc<dyn Clock>) -> Result<Self> {
        let io = |source| Error::Io {
            path: options.root.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&options.root).map_err(io)?;
        let removed = remove_staging_files(&options.root).map_err(io)?;
        if removed > 0 {
            tracing::info!(removed, root = %options.root.display(), "deleted uncommitted staging files left by a crash");
        }
        let store =
            LocalFileSystem::new_with_prefix(&options.root).map_err(|source| Error::Store {
                path: options.root.display().to_string(),
                source,
            })?;
        let level = ZstdLevel::try_new(options.zstd_level).unwrap_or_default();
        let compression = Compression::ZSTD(level);
        Ok(Self {
            options,
            compression,
            store: Arc::new(store),
            clock,
            open: HashMap::new(),
            sealed: Vec::new(),
            staged: Vec::new(),
        })
    }

    /// The lake's root directory.
    pub fn root(&self) -> &Path {
        &self.options.root
    }

    /// Encodes `batch` into the table's open file(s), split by event hour.
    pub fn write(&mut self, table: &Arc<str>, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        for (hour, part) in split_by_hour(batch) {
            let now = self.clock.now_ms();
            let (compression, row_groups) = (self.compression, self.options.row_group_rows);
            let files = self.open.entry(table.clone()).or_default();
            let file = match files.entry(hour) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let writer = ArrowWriter::try_new(
                        Vec::new(),
                        part.schema(),
                        Some(Self::properties(compression, row_groups, &part)),
                    )
                    .map_err(|source| Error::Parquet {
                        table: table.to_string(),
                        source,
                    })?;
                    v.insert(OpenFile {
                        writer,
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

    /// Writer settings for a file of `batch`'s schema. Dictionary encoding is off for
    /// the event time and `_offset`: they are nearly unique per row, so interning them
    /// costs a hash and compare per value for nothing (the writer falls back to plain).
    /// `_offset` has no statistics either: string min/max cost two compares per row and
    /// offsets are compared as numbers, not text, so they could not prune anyway.
    /// Other columns keep it: 2-decimal readings compress ~25% better with it.
    fn properties(
        compression: Compression,
        row_group_rows: usize,
        batch: &RecordBatch,
    ) -> WriterProperties {
        let mut builder = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(row_group_rows.max(1)))
            .set_column_dictionary_enabled(ColumnPath::from(OFFSET), false)
            .set_column_statistics_enabled(ColumnPath::from(OFFSET), EnabledStatistics::None)
            .set_column_dictionary_enabled(ColumnPath::from(INGEST_TIME), false)
            .set_column_dictionary_enabled(ColumnPath::from(HOPS), false);
        if let Some(i) = event_time_column(batch.schema_ref()) {
            let name = batch.schema_ref().field(i).name().clone();
            builder = builder.set_column_dictionary_enabled(ColumnPath::from(name), false);
        }
        builder.build()
    }

    /// Rows encoded but not yet committed.
    pub fn pending_rows(&self) -> u64 {
        let open: u64 = self
            .open
            .values()
            .flat_map(|f| f.values())
            .map(|f| f.rows)
            .sum();
        open + self.sealed.iter().map(|s| s.rows).sum::<u64>()
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
        open + self.sealed.iter().map(|s| s.bytes.len()).sum::<usize>()
    }

    /// Commits every file that is old or large enough.
    pub async fn roll_due(&mut self) -> Result<CommitStats> {
        let now = self.clock.now_ms();
        let (interval, size) = (self.options.roll_interval_ms, self.options.roll_size);
        self.commit_where(|f| {
            now - f.opened_ms >= interval
                || f.writer.memory_size() + f.writer.bytes_written() >= size
        })
        .await
    }

    /// Commits every open file (shutdown, checkpoints).
    pub async fn close_all(&mut self) -> Result<CommitStats> {
        self.commit_where(|_| true).await
    }

    /// The final paths of the files staged since the last call (staged mode): what
    /// the next checkpoint's manifest commits.
    pub fn take_staged(&mut self) -> Vec<String> {
        std::mem::take(&mut self.staged)
    }

    /// Whether files were staged since the last [`Lake::take_staged`].
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Stores the files sealed earlier, then seals the due files and stores them, in
    /// order. A store failure (disk full, bucket gone) keeps the failed file and those
    /// after it for the next call, so nothing encoded is lost while the store is away;
    /// and while earlier files cannot be stored no more are sealed, so the backlog
    /// stays as it is (sealing frees the writers' buffers, which would let more in).
    async fn commit_where(&mut self, due: impl Fn(&OpenFile) -> bool) -> Result<CommitStats> {
        let mut stats = self.store_sealed().await?;
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
                let rows = file.rows;
                let bytes = file.writer.into_inner().map_err(|source| Error::Parquet {
                    table: table.to_string(),
                    source,
                })?;
                self.sealed.push(Sealed {
                    table: table.clone(),
                    path: file_path(table, hour),
                    bytes: bytes.into(),
                    rows,
                });
            }
        }
        self.open.retain(|_, files| !files.is_empty());
        let more = self.store_sealed().await?;
        stats.files += more.files;
        stats.rows += more.rows;
        stats.bytes += more.bytes;
        Ok(stats)
    }

    /// Stores every sealed file in order, up to the first failure.
    async fn store_sealed(&mut self) -> Result<CommitStats> {
        let mut stats = CommitStats::default();
        while let Some(file) = self.sealed.first() {
            let len = file.bytes.len() as u64;
            let target = if self.options.staged {
                ObjectPath::from(format!("{STAGING_DIR}/{}", file.path))
            } else {
                ObjectPath::from(file.path.as_str())
            };
            self.store
                .put(&target, PutPayload::from(file.bytes.clone()))
                .await
                .map_err(|source| Error::Store {
                    path: target.to_string(),
                    source,
                })?;
            if self.options.staged {
                self.staged.push(file.path.clone());
            }
            let table = file.table.to_string();
            metrics::counter!("sluice_lake_files_committed_total", "table" => table.clone())
                .increment(1);
            metrics::counter!("sluice_lake_rows_written_total", "table" => table.clone())
                .increment(file.rows);
            metrics::counter!("sluice_lake_bytes_written_total", "table" => table).increment(len);
            tracing::debug!(table = %file.table, path = %file.path, rows = file.rows, bytes = len, "committed");
            stats.files += 1;
            stats.rows += file.rows;
            stats.bytes += len;
            self.sealed.remove(0);
        }
        Ok(stats)
    }
}

/// `table/date=YYYY-MM-DD/hour=HH/part-<uuid v7>.parquet` for an hour bucket.
fn file_path(table: &str, hour: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(hour * HOUR_MS).unwrap_or_default();
    format!(
        "{table}/date={}/hour={}/part-{}.parquet",
        t.format("%Y-%m-%d"),
        t.format("%H"),
        uuid::Uuid::now_v7().simple()
    )
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
