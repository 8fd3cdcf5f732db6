//! Table upkeep beside ingest: compaction, retention and vacuum.
//!
//! - **Compaction** merges the small files of a partition (`date`, `hour`) into files
//!   of about `target_size`, rows sorted by the key and the event time, so that a
//!   device's rows sit together and row groups prune well. While the hour is open, once
//!   it holds `open_min_files` files under three quarters of the target, runs of them
//!   are merged into files of about the target. Once it is closed (its hour ended
//!   `closed_after` ago), its files under the target are packed into as few as the
//!   target allows, rows split evenly across them (a file may give its first rows to
//!   one output and the rest to the next), so the hour ends with one file per
//!   `target_size`. The new files are added and the old
//!   ones removed in one Delta commit (`OPTIMIZE`, no data change). Delta's conflict
//!   rules let it commit past concurrent appends (snapshot isolation for no-data-change
//!   commits), and let appends commit past it, so ingest never waits for it.
//! - **Retention** removes whole partitions whose hour ended more than `retain` ago,
//!   by event time, in one commit (`DELETE` by partition: nothing is rewritten).
//! - **Vacuum** deletes files that no version newer than `vacuum_grace` references,
//!   so readers of recent versions (time travel included) are safe. With a grace of a
//!   day or more it also deletes files no commit ever referenced (left by a crash
//!   between a store and its checkpoint); a shorter grace could race the live lake's
//!   files that wait for their checkpoint, so then only removed files go.
//!
//! One [`Maintenance`] runs one thing at a time, and paces what it reads to
//! `read_rate` bytes per second, so it takes about one core at most and bounded I/O.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use arrow::compute::SortOptions;
use arrow::datatypes::{FieldRef, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::record_batch::RecordBatchReader;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_expr::expressions::col;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::SessionConfig;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, LogicalFileView, Transaction};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::DeltaOperation;
use deltalake::table::state::DeltaTableState;
use futures::StreamExt;
use futures::future::BoxFuture;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::arrow_reader::{
    ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use parquet::arrow::async_writer::AsyncFileWriter;
use sluice_core::Clock;
use sluice_core::schema::{EVENT_TIME_META, KEY_META};
use sluice_core::usage::lower_thread_priority;
use tokio::io::AsyncWriteExt;

use super::{DeltaTables, add_action, delta_error};
use crate::parquet::{DataFile, delta_stats, writer_properties};
use crate::{Error, Result, store_error};

const HOUR_MS: i64 = 3_600_000;
/// A compacted file smaller than this is stored with one put; a larger one is
/// uploaded in parts of this size.
const UPLOAD_PART: usize = 8 << 20;
const DAY: Duration = Duration::from_secs(86_400);

/// How tables are kept.
#[derive(Debug, Clone)]
pub struct MaintainOptions {
    /// Compaction writes files of about this many bytes (see the module docs).
    pub target_size: u64,
    /// A partition is closed this long after its hour ended.
    pub closed_after: Duration,
    /// An open partition is compacted once it holds this many files under three
    /// quarters of the target.
    pub open_min_files: usize,
    /// Bytes read per second, at most.
    pub read_rate: u64,
    /// zstd level of compacted files.
    pub zstd_level: i32,
    /// Rows per row group of compacted files.
    pub row_group_rows: usize,
    /// Memory one compaction's sort may hold; past it, sorted runs spill to the
    /// system's temporary directory.
    pub memory: usize,
    /// Per table (`"*"`: every other table): partitions whose hour ended longer ago
    /// than this are removed.
    pub retain: BTreeMap<String, Duration>,
    /// Files unreferenced for this long are deleted by vacuum.
    pub vacuum_grace: Duration,
    /// Vacuum a table at most this often (it lists the table's directory).
    pub vacuum_interval: Duration,
}

/// What one round did to one table; also emitted as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Upkeep {
    /// Files merged away by compaction.
    pub compacted_files: u64,
    /// Files compaction wrote.
    pub written_files: u64,
    /// Bytes compaction read and rewrote.
    pub rewritten_bytes: u64,
    /// Sorted runs compaction spilled to disk (its sort was over `memory`).
    pub spilled_runs: u64,
    /// Files removed by retention.
    pub expired_files: u64,
    /// Files deleted by vacuum.
    pub vacuumed_files: u64,
}

/// Compaction, retention and vacuum over a lake's tables (see the module docs).
pub struct Maintenance {
    tables: DeltaTables,
    store: Arc<dyn ObjectStore>,
    options: MaintainOptions,
    clock: Arc<dyn Clock>,
    /// When each table was last vacuumed (epoch ms).
    vacuumed_at: BTreeMap<String, i64>,
    /// Per table, bytes written for appended files and their bytes read by merges so
    /// far. Sorting by the key usually compresses better (128 MB in, about 85 MB out),
    /// so an appended file is expected to come out at `size * out / in`.
    merged_bytes: BTreeMap<String, (u64, u64)>,
    /// A compacted file up to this size is stored with one put; a larger one is
    /// uploaded in parts of this size ([`UPLOAD_PART`]; smaller in tests).
    upload_part: usize,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("tables", &self.tables)
            .field("options", &self.options)
            .finish()
    }
}

/// An hour partition's files.
struct Partition {
    date: String,
    hour: String,
    /// The hour's end (epoch ms), if the values parse.
    end_ms: Option<i64>,
    files: Vec<LogicalFileView>,
}

impl Maintenance {
    /// Upkeep for `tables`, whose data files `store` (rooted at the lake) holds.
    pub fn new(
        tables: DeltaTables,
        store: Arc<dyn ObjectStore>,
        options: MaintainOptions,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            tables,
            store,
            options,
            clock,
            vacuumed_at: BTreeMap::new(),
            merged_bytes: BTreeMap::new(),
            upload_part: UPLOAD_PART,
        }
    }

    /// Retention, compaction and vacuum of `table`, in that order (vacuum at most once
    /// per `vacuum_interval`).
    pub async fn run(&mut self, table: &str) -> Result<Upkeep> {
        let mut upkeep = Upkeep {
            expired_files: self.expire(table).await?,
            ..Upkeep::default()
        };
        let compacted = self.compact(table).await?;
        upkeep.compacted_files = compacted.compacted_files;
        upkeep.written_files = compacted.written_files;
        upkeep.rewritten_bytes = compacted.rewritten_bytes;
        let now = self.clock.now_ms();
        let every = self.options.vacuum_interval.as_millis() as i64;
        if self
            .vacuumed_at
            .get(table)
            .is_none_or(|at| now - at >= every)
        {
            upkeep.vacuumed_files = self.vacuum(table).await?;
            self.vacuumed_at.insert(table.to_owned(), now);
        }
        self.gauges(table).await?;
        let labels = [("table", table.to_owned())];
        if upkeep.written_files > 0 {
            metrics::counter!("sluice_lake_compaction_runs_total", &labels).increment(1);
        }
        metrics::counter!("sluice_lake_compacted_files_total", &labels)
            .increment(upkeep.compacted_files);
        metrics::counter!("sluice_lake_compaction_rewritten_bytes_total", &labels)
            .increment(upkeep.rewritten_bytes);
        metrics::counter!("sluice_lake_compaction_spilled_runs_total", &labels)
            .increment(upkeep.spilled_runs);
        metrics::counter!("sluice_lake_expired_files_total", &labels)
            .increment(upkeep.expired_files);
        metrics::counter!("sluice_lake_vacuumed_files_total", &labels)
            .increment(upkeep.vacuumed_files);
        Ok(upkeep)
    }

    /// Files, bytes and the version of `table`, as gauges.
    async fn gauges(&mut self, table: &str) -> Result<()> {
        let t = self.tables.open(table).await?;
        let Some(version) = t.version() else {
            return Ok(());
        };
        let state = t.snapshot().map_err(delta_error(table))?;
        let (files, bytes) = state
            .log_data()
            .iter()
            .fold((0u64, 0i64), |(n, b), f| (n + 1, b + f.size()));
        let labels = [("table", table.to_owned())];
        metrics::gauge!("sluice_lake_table_files", &labels).set(files as f64);
        metrics::gauge!("sluice_lake_table_bytes", &labels).set(bytes as f64);
        metrics::gauge!("sluice_lake_table_version", &labels).set(version as f64);
        Ok(())
    }

    /// The table's active files by partition.
    async fn partitions(
        &mut self,
        table: &str,
    ) -> Result<Option<(DeltaTableState, Vec<Partition>)>> {
        let t = self.tables.open(table).await?;
        if t.version().is_none() {
            return Ok(None);
        }
        let state = t.snapshot().map_err(delta_error(table))?.clone();
        let mut by: BTreeMap<(String, String), Vec<LogicalFileView>> = BTreeMap::new();
        for file in state.log_data().iter() {
            let values = file.partition_values_map();
            let value = |k: &str| values.get(k).cloned().flatten().unwrap_or_default();
            by.entry((value("date"), value("hour")))
                .or_default()
                .push(file);
        }
        let partitions = by
            .into_iter()
            .map(|((date, hour), files)| Partition {
                end_ms: hour_end_ms(&date, &hour),
                date,
                hour,
                files,
            })
            .collect();
        Ok(Some((state, partitions)))
    }

    /// Removes the partitions older than the table's `retain`; returns the files removed.
    pub async fn expire(&mut self, table: &str) -> Result<u64> {
        let retain = self
            .options
            .retain
            .get(table)
            .or_else(|| self.options.retain.get("*"));
        let Some(retain) = retain.copied() else {
            return Ok(0);
        };
        let cutoff = self.clock.now_ms() - retain.as_millis() as i64;
        let Some((read, partitions)) = self.partitions(table).await? else {
            return Ok(0);
        };
        let old: Vec<Partition> = partitions
            .into_iter()
            .filter(|p| p.end_ms.is_some_and(|end| end <= cutoff))
            .collect();
        let removes: Vec<Action> = old
            .iter()
            .flat_map(|p| &p.files)
            .map(|f| Action::Remove(f.remove_action(true)))
            .collect();
        if removes.is_empty() {
            return Ok(0);
        }
        let n = removes.len() as u64;
        let newest = old.iter().filter_map(|p| p.end_ms).max().unwrap_or(cutoff);
        let predicate = format!("partitions ending at or before {newest} ms (retain {retain:?})");
        self.commit(
            table,
            &read,
            removes,
            DeltaOperation::Delete {
                predicate: Some(predicate),
            },
            CommitProperties::default(),
        )
        .await?;
        tracing::info!(
            table,
            files = n,
            partitions = old.len(),
            "retention removed old partitions"
        );
        Ok(n)
    }

    /// Compacts every partition that qualifies (see the module docs).
    pub async fn compact(&mut self, table: &str) -> Result<Upkeep> {
        let now = self.clock.now_ms();
        let closed_after = self.options.closed_after.as_millis() as i64;
        let mut done = Upkeep::default();
        let Some((read, partitions)) = self.partitions(table).await? else {
            return Ok(done);
        };
        // Sorting by the key usually compresses better than the appended files (128 MB
        // in, about 85 MB out); files compaction wrote are already sorted.
        let ratio = match self.merged_bytes.get(table) {
            Some(&(out, into)) if into > 0 => (out as f64 / into as f64).clamp(0.5, 2.0),
            _ => 1.0,
        };
        for partition in partitions {
            let closed = partition
                .end_ms
                .is_some_and(|end| end + closed_after <= now);
            let mut files = partition.files;
            files.sort_by_key(|f| f.modification_time());
            let plan = if closed {
                self.pack(files, ratio)
            } else {
                self.top_up(files, ratio)
            };
            let Some(plan) = plan else {
                continue;
            };
            let merged = self
                .merge(table, &read, &partition.date, &partition.hour, plan)
                .await?;
            done.compacted_files += merged.compacted_files;
            done.written_files += merged.written_files;
            done.rewritten_bytes += merged.rewritten_bytes;
            done.spilled_runs += merged.spilled_runs;
        }
        Ok(done)
    }

    /// The plan for a closed partition: the files under the target are packed into as
    /// few files as the target allows (rows split across outputs where needed), so the
    /// partition ends with one file per `target_size`. `None` when it has that already.
    fn pack(&self, files: Vec<LogicalFileView>, ratio: f64) -> Option<Plan> {
        let target = self.options.target_size;
        let files: Vec<LogicalFileView> = files
            .into_iter()
            .filter(|f| (f.size() as u64) < target)
            .collect();
        let out_bytes: f64 = files.iter().map(|f| out_size(f, ratio)).sum();
        let outputs = ((out_bytes / target as f64).ceil() as usize).max(1);
        if files.len() <= outputs {
            return None;
        }
        let rows: Option<Vec<usize>> = files.iter().map(LogicalFileView::num_records).collect();
        let outputs = match rows {
            Some(rows) => split_rows(&rows, outputs),
            // Without row counts in the log (files not written by Sluice), whole files.
            None => group_whole(&files, target as f64, ratio),
        };
        Some(Plan { files, outputs })
    }

    /// The plan for an open partition, once it holds `open_min_files` small files
    /// (under three quarters of the target): each run of them that should come out at
    /// about the target becomes one file.
    fn top_up(&self, files: Vec<LogicalFileView>, ratio: f64) -> Option<Plan> {
        let target = self.options.target_size;
        let files: Vec<LogicalFileView> = files
            .into_iter()
            .filter(|f| (f.size() as u64) < target / 4 * 3)
            .collect();
        if files.len() < self.options.open_min_files.max(2) {
            return None;
        }
        let outputs = group_whole(&files, target as f64, ratio);
        Some(Plan { files, outputs })
    }

    /// Carries out `plan` (one partition): writes each output as one sorted file, then
    /// commits the swap of every input for every output in one commit.
    async fn merge(
        &mut self,
        table: &str,
        read: &DeltaTableState,
        date: &str,
        hour: &str,
        plan: Plan,
    ) -> Result<Upkeep> {
        let roles = self.column_roles(table).await?;
        let columns = file_columns(read);
        let mut written: Vec<DataFile> = Vec::new();
        let mut spilled_runs = 0;
        let mut inputs_used = vec![false; plan.files.len()];
        for output in &plan.outputs {
            let file = self
                .write_output(table, (date, hour), &plan.files, output, (&roles, &columns))
                .await;
            match file {
                Ok(Some((file, spills))) => {
                    written.push(file);
                    spilled_runs += spills;
                }
                Ok(None) => {}
                Err(e) => {
                    self.delete(table, &written).await;
                    return Err(e);
                }
            }
            for (i, _) in output {
                inputs_used[*i] = true;
            }
        }
        if written.is_empty() {
            return Ok(Upkeep::default());
        }
        let inputs: Vec<&LogicalFileView> = plan
            .files
            .iter()
            .zip(&inputs_used)
            .filter_map(|(f, used)| used.then_some(f))
            .collect();
        // Sizes are the log's (anyone who can write the lake can edit them): the sums
        // saturate rather than overflow.
        let sum = |sizes: &mut dyn Iterator<Item = u64>| sizes.fold(0u64, u64::saturating_add);
        let input_bytes = sum(&mut inputs.iter().map(|f| f.size() as u64));
        // The ratio is that of appended files: compacted inputs count as their size.
        let sorted_bytes = sum(&mut inputs
            .iter()
            .filter(|f| f.path().ends_with(COMPACTED_SUFFIX))
            .map(|f| f.size() as u64));
        let output_bytes = sum(&mut written.iter().map(|f| f.size));
        let merged = self.merged_bytes.entry(table.to_owned()).or_default();
        merged.0 = merged
            .0
            .saturating_add(output_bytes.saturating_sub(sorted_bytes));
        merged.1 = merged
            .1
            .saturating_add(input_bytes.saturating_sub(sorted_bytes));
        let mut actions: Vec<Action> = inputs
            .iter()
            .map(|f| Action::Remove(f.remove_action(false)))
            .collect();
        for file in &written {
            let Action::Add(mut add) = add_action(file) else {
                return Err(Error::Refused("an add action was expected".into()));
            };
            add.data_change = false;
            actions.push(Action::Add(add));
        }
        let operation = DeltaOperation::Optimize {
            predicate: Some(format!("date = '{date}' AND hour = '{hour}'")),
            target_size: i64::try_from(self.options.target_size).unwrap_or(i64::MAX),
        };
        // delta-rs does not count two commits removing the same files as a conflict
        // when the removes are not data changes (compactions). So each compaction of a
        // partition carries a marker of its own; two compactions of one partition
        // racing for the log conflict on it (`ConcurrentTransaction`), and the loser
        // deletes its files. With `read` being the snapshot the inputs came from, every
        // compaction committed since is checked.
        let now = self.clock.now_ms();
        let marker = Transaction::new_with_last_update(
            format!("sluice-compaction-{date}-{hour}"),
            now,
            Some(now),
        );
        let properties = CommitProperties::default().with_application_transaction(marker);
        let rows: u64 = written.iter().map(|f| f.rows).sum();
        let (compacted_files, written_files) = (inputs.len() as u64, written.len() as u64);
        if let Err(e) = self
            .commit(table, read, actions, operation, properties)
            .await
        {
            // Another writer removed an input first: our files are in no log; vacuum
            // deletes them. Try to now, so they do not wait for the grace period.
            self.delete(table, &written).await;
            return Err(e);
        }
        tracing::debug!(
            table,
            date,
            hour,
            files = compacted_files,
            written = written_files,
            rows,
            "compacted"
        );
        Ok(Upkeep {
            compacted_files,
            written_files,
            rewritten_bytes: input_bytes,
            spilled_runs,
            ..Upkeep::default()
        })
    }

    /// Writes one output of a plan (the listed rows of `files`, sorted) as one file;
    /// `None` if they hold no rows, else the file and the sorted runs its sort spilled.
    /// The inputs are read here, paced, one at a time, and handed to [`rewrite`] on a
    /// thread of its own.
    async fn write_output(
        &mut self,
        table: &str,
        (date, hour): (&str, &str),
        files: &[LogicalFileView],
        output: &[(usize, Option<Range<usize>>)],
        (roles, columns): (&[(&'static str, String)], &SchemaRef),
    ) -> Result<Option<(DataFile, u64)>> {
        let (inputs, from_store) = tokio::sync::mpsc::channel(1);
        let (to_upload, mut parts) = tokio::sync::mpsc::channel(1);
        let (done, encoded) = tokio::sync::oneshot::channel();
        let options = RewriteOptions {
            table: table.to_owned(),
            roles: roles.to_vec(),
            columns: columns.clone(),
            zstd_level: self.options.zstd_level,
            row_group_rows: self.options.row_group_rows,
            memory: self.options.memory,
        };
        std::thread::Builder::new()
            .name("sluice-compact".into())
            .spawn(move || {
                // Sorting is CPU work of seconds: below ingest's priority, on a
                // runtime of its own, so that no task of the service waits behind it.
                lower_thread_priority();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let result = match runtime {
                    Ok(runtime) => {
                        runtime.block_on(rewrite(&options, from_store, Parts(to_upload)))
                    }
                    Err(e) => Err(Error::Refused(format!("compaction thread: {e}"))),
                };
                let _ = done.send(result);
            })
            .map_err(|e| Error::Refused(format!("compaction thread: {e}")))?;
        let path = format!(
            "date={date}/hour={hour}/part-{}{COMPACTED_SUFFIX}",
            uuid::Uuid::now_v7().simple()
        );
        let target = ObjectPath::from(format!("{table}/{path}"));
        let feed = async {
            for (i, rows) in output {
                let path = ObjectPath::from(format!("{table}/{}", files[*i].path()));
                let bytes = async { self.store.get(&path).await?.bytes().await }
                    .await
                    .map_err(store_error(&path));
                let len = bytes.as_ref().map_or(0, |b| b.len() as u64);
                let failed = bytes.is_err();
                if inputs.send(bytes.map(|b| (b, rows.clone()))).await.is_err() || failed {
                    // The rewrite ended early (with its error), or this read failed.
                    break;
                }
                // Pace the reads: the budget is bytes per second.
                if self.options.read_rate > 0 {
                    let secs = len as f64 / self.options.read_rate as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
            }
            drop(inputs);
        };
        // The file goes out a flushed row group at a time, as the rewrite makes it,
        // here on the service's runtime (the store's connections live on it): one put
        // if it is small, else a multipart upload with two parts in flight at most.
        let upload = async {
            let (mut out, mut size, mut failed) = (None::<BufWriter>, 0u64, None);
            while let Some(part) = parts.recv().await {
                size += part.len() as u64;
                let out = out.get_or_insert_with(|| {
                    BufWriter::with_capacity(self.store.clone(), target.clone(), self.upload_part)
                        .with_max_concurrency(2)
                });
                if let Err(e) = out.write_all(&part).await {
                    // Dropping `parts` ends the rewrite too.
                    failed = Some(e);
                    break;
                }
            }
            (out, failed.map_or(Ok(size), Err))
        };
        let ((out, uploaded), ()) = tokio::join!(upload, feed);
        let encoded = encoded
            .await
            .map_err(|_| Error::Refused(format!("compaction thread of {table:?} failed")))
            .and_then(|encoded| encoded);
        let upload_failed = |e: std::io::Error| Error::Refused(format!("upload of {target}: {e}"));
        let (encoded, size) = match (encoded, uploaded) {
            (Ok(Some(encoded)), Ok(size)) => (encoded, size),
            (result, uploaded) => {
                if let Some(mut out) = out {
                    let _ = out.abort().await;
                }
                // The rewrite's error says more than the upload's end it caused.
                return match (result, uploaded) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(upload_failed(e)),
                    (Ok(_), Ok(_)) => Ok(None),
                };
            }
        };
        let Some(mut out) = out else {
            return Err(Error::Refused(format!(
                "compaction of {table:?} made rows but no bytes"
            )));
        };
        if let Err(e) = out.shutdown().await {
            let _ = out.abort().await;
            return Err(upload_failed(e));
        }
        let Encoded {
            schema,
            metadata,
            spilled_runs,
        } = encoded;
        let file = DataFile {
            path,
            size,
            rows: u64::try_from(metadata.file_metadata().num_rows()).unwrap_or(0),
            date: date.to_owned(),
            hour: hour.to_owned(),
            stats: delta_stats(&schema, &metadata),
            modified_ms: self.clock.now_ms(),
        };
        Ok(Some((file, spilled_runs)))
    }

    /// Deletes `files` of `table` that no commit references, as far as the store lets
    /// it (vacuum deletes what is left over).
    async fn delete(&self, table: &str, files: &[DataFile]) {
        for file in files {
            let path = ObjectPath::from(format!("{table}/{}", file.path));
            let _ = self.store.delete(&path).await;
        }
    }

    /// The key and event-time columns of `table`, as its creator recorded them in the
    /// table's configuration (the Parquet files' own schema metadata is not read back).
    async fn column_roles(&mut self, table: &str) -> Result<Vec<(&'static str, String)>> {
        let t = self.tables.open(table).await?;
        let state = t.snapshot().map_err(delta_error(table))?;
        let config = state.metadata().configuration();
        Ok([KEY_META, EVENT_TIME_META]
            .into_iter()
            .filter_map(|k| {
                Some((
                    k,
                    config.get(&format!("{}{k}", super::META_PREFIX))?.clone(),
                ))
            })
            .collect())
    }

    /// Commits `actions` built on `read`, the snapshot their files were chosen from
    /// (not a newer one), so that delta-rs checks them against every commit since:
    /// another node's compaction of the same files committed meanwhile must make this
    /// one fail, or both merged files would stay and every row be there twice.
    async fn commit(
        &mut self,
        table: &str,
        read: &DeltaTableState,
        actions: Vec<Action>,
        operation: DeltaOperation,
        properties: CommitProperties,
    ) -> Result<()> {
        let t = self.tables.open(table).await?;
        let done = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(read), t.log_store(), operation)
            .await
            .map_err(delta_error(table))?;
        t.state = Some(done.snapshot());
        Ok(())
    }

    /// Deletes what no version within the grace period references; returns how many.
    pub async fn vacuum(&mut self, table: &str) -> Result<u64> {
        let grace = self.options.vacuum_grace;
        let t = self.tables.open(table).await?;
        if t.version().is_none() {
            return Ok(0);
        }
        let full = grace >= DAY;
        let retention = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let vacuum = |t: deltalake::DeltaTable, dry_run: bool| {
            t.vacuum()
                .with_retention_period(retention)
                .with_enforce_retention_duration(false)
                .with_mode(if full {
                    VacuumMode::Full
                } else {
                    VacuumMode::Lite
                })
                .with_dry_run(dry_run)
        };
        // delta-rs lists a removed file again at every vacuum until log cleanup drops
        // its tombstone; count (and run) only for files still there.
        let (_, planned) = vacuum(t.clone(), true).await.map_err(delta_error(table))?;
        let mut present = 0u64;
        for file in &planned.files_deleted {
            let path = ObjectPath::from(format!("{table}/{file}"));
            if self.store.head(&path).await.is_ok() {
                present += 1;
            }
        }
        if present == 0 {
            return Ok(0);
        }
        let (vacuumed, _) = vacuum(t.clone(), false).await.map_err(delta_error(table))?;
        let deleted = present;
        self.tables.replace(table, vacuumed);
        Ok(deleted)
    }
}

/// The name ending of files compaction writes.
const COMPACTED_SUFFIX: &str = "-c.parquet";

/// What one compaction of a partition reads and writes: each output is the listed
/// rows (all, or a range) of some of `files`.
struct Plan {
    files: Vec<LogicalFileView>,
    outputs: Vec<Vec<(usize, Option<Range<usize>>)>>,
}

/// The bytes `file` should come to once compacted: files compaction wrote are sorted
/// already; others shrink (or grow) by the table's `ratio` so far.
fn out_size(file: &LogicalFileView, ratio: f64) -> f64 {
    if file.path().ends_with(COMPACTED_SUFFIX) {
        file.size() as f64
    } else {
        file.size() as f64 * ratio
    }
}

/// Whole files, in order, grouped so that each group should come out at about
/// `target` bytes; a last group of one file is left alone.
fn group_whole(
    files: &[LogicalFileView],
    target: f64,
    ratio: f64,
) -> Vec<Vec<(usize, Option<Range<usize>>)>> {
    let mut groups = Vec::new();
    let mut group = Vec::new();
    let mut bytes = 0.0;
    for (i, f) in files.iter().enumerate() {
        bytes += out_size(f, ratio);
        group.push((i, None));
        if bytes >= target {
            groups.push(std::mem::take(&mut group));
            bytes = 0.0;
        }
    }
    if group.len() >= 2 {
        groups.push(group);
    }
    groups
}

/// Files of `rows` rows each, in order, split into `outputs` runs of equal row counts
/// (within one); a file that straddles two runs gives each a range of its rows.
/// The counts come from the Delta log, which anyone with write access to the lake can
/// edit: sums saturate rather than overflow.
fn split_rows(rows: &[usize], outputs: usize) -> Vec<Vec<(usize, Option<Range<usize>>)>> {
    let total = rows.iter().fold(0usize, |sum, &n| sum.saturating_add(n));
    let outputs = outputs.clamp(1, total.max(1));
    let mut plan = vec![Vec::new(); outputs];
    // Output k takes the rows [total * k / outputs, total * (k + 1) / outputs) of the
    // files laid end to end (in u128: no product overflows).
    let share = |k: usize| (total as u128 * k as u128 / outputs as u128) as usize;
    let mut start = 0usize;
    for (i, &n) in rows.iter().enumerate() {
        let end = start.saturating_add(n);
        for (k, output) in plan.iter_mut().enumerate() {
            let (from, to) = (share(k), share(k + 1));
            let (a, b) = (start.max(from), end.min(to));
            if a < b {
                let range = a - start..b - start;
                output.push((i, (range != (0..n)).then_some(range)));
            }
        }
        start = end;
    }
    plan.retain(|o| !o.is_empty());
    plan
}

/// The end of a `date`/`hour` partition (epoch ms).
fn hour_end_ms(date: &str, hour: &str) -> Option<i64> {
    let day = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let hour: u32 = hour.parse().ok()?;
    let start = day.and_hms_opt(hour, 0, 0)?.and_utc().timestamp_millis();
    Some(start + HOUR_MS)
}

/// What [`rewrite`] needs besides its inputs.
struct RewriteOptions {
    table: String,
    /// The table's key and event-time columns (`KEY_META`, `EVENT_TIME_META`), as its
    /// Delta configuration names them: rows are sorted by them, in that order.
    roles: Vec<(&'static str, String)>,
    /// The table's columns (its schema without the partition columns), for inputs
    /// written before a column was added ([`output_schema`]).
    columns: SchemaRef,
    zstd_level: i32,
    row_group_rows: usize,
    memory: usize,
}

/// One input of [`rewrite`]: a Parquet file's bytes, and the range of its rows to take
/// (`None`: all of them).
type Input = Result<(bytes::Bytes, Option<Range<usize>>)>;

/// What [`rewrite`] made: a Parquet file (its bytes went to [`Parts`]), and how.
struct Encoded {
    schema: SchemaRef,
    metadata: parquet::file::metadata::ParquetMetaData,
    /// Sorted runs the sort spilled to disk to stay within its memory.
    spilled_runs: u64,
}

/// Decodes `inputs` (each whole, or the given range of its rows) as they come, sorts
/// the rows by the table's key and event-time columns, and encodes one file; `None`
/// when the inputs hold no rows.
///
/// The sort is DataFusion's external sort under a memory pool of `memory` bytes: past
/// it, sorted runs spill to the system's temporary directory and are merged from
/// there. An output of the 128 MB target holds a gigabyte or more of Arrow; sorted in
/// memory (three copies of it: the decoded batches, their concatenation, the sorted
/// take) it took a service at 50,000 events/s from 1 GB to 2.9 GB.
async fn rewrite(
    options: &RewriteOptions,
    mut inputs: tokio::sync::mpsc::Receiver<Input>,
    parts: Parts,
) -> Result<Option<Encoded>> {
    let table = options.table.as_str();
    let bad = {
        let table = options.table.clone();
        move |source| Error::Parquet {
            table: table.clone(),
            source,
        }
    };
    let failed = |e: DataFusionError| Error::Refused(format!("compaction of {table:?}: {e}"));
    // The first input gives the schema; its batches lead the stream. Each input is
    // decoded a batch at a time, as the sort asks for rows.
    let Some(input) = inputs.recv().await else {
        return Ok(None);
    };
    let first = decode(input?).map_err(&bad)?;
    let schema = output_schema(&first.schema(), &options.columns);
    let batches_of = {
        let bad = bad.clone();
        move |reader: Result<ParquetRecordBatchReader>| match reader {
            Ok(reader) => {
                let bad = bad.clone();
                futures::stream::iter(reader.map(move |b| b.map_err(|e| bad(e.into())))).boxed()
            }
            Err(e) => futures::stream::once(std::future::ready(Err(e))).boxed(),
        }
    };
    let rest = {
        let (bad, batches_of) = (bad.clone(), batches_of.clone());
        futures::stream::unfold(inputs, |mut inputs| async move {
            let input = inputs.recv().await?;
            Some((input, inputs))
        })
        .flat_map(move |input| {
            batches_of(input.and_then(|input| decode(input).map_err(bad.clone())))
        })
    };
    let same_schema = schema.clone();
    let batches = batches_of(Ok(first)).chain(rest).map(move |batch| {
        let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
        conform(&batch, &same_schema).map_err(DataFusionError::from)
    });
    let source: SendableRecordBatchStream =
        Box::pin(RecordBatchStreamAdapter::new(schema.clone(), batches));
    let keys: Vec<PhysicalSortExpr> = options
        .roles
        .iter()
        .filter_map(|(_, name)| col(name, &schema).ok())
        .map(|expr| PhysicalSortExpr::new(expr, SortOptions::default()))
        .collect();
    let mut sort = None;
    let mut sorted = match LexOrdering::new(keys) {
        None => source,
        Some(order) => {
            let pool = Arc::new(FairSpillPool::new(options.memory));
            let runtime = RuntimeEnvBuilder::new()
                .with_memory_pool(pool)
                .build_arc()
                .map_err(failed)?;
            // What the sort sets aside to merge its spilled runs: an eighth of the
            // budget (DataFusion's default, 10 MB, is most of a small one).
            let config = SessionConfig::new().with_sort_spill_reservation_bytes(options.memory / 8);
            let task = TaskContext::default()
                .with_session_config(config)
                .with_runtime(runtime);
            let input = Arc::new(
                StreamingTableExec::try_new(
                    schema.clone(),
                    vec![Arc::new(OneStream::new(source))],
                    None,
                    [],
                    false,
                    None,
                )
                .map_err(failed)?,
            );
            let exec = Arc::new(SortExec::new(order, input));
            sort = Some(exec.clone());
            exec.execute(0, Arc::new(task)).map_err(failed)?
        }
    };
    // Parquet files do not keep the stream schema's metadata; the writer's settings
    // (no dictionary for the event time) need it back.
    let mut described = schema.as_ref().clone();
    described.metadata.extend(
        options
            .roles
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone())),
    );
    let properties = writer_properties(options.zstd_level, options.row_group_rows, &described);
    let mut writer =
        AsyncArrowWriter::try_new(parts, schema.clone(), Some(properties)).map_err(&bad)?;
    let mut rows = 0;
    while let Some(batch) = sorted.next().await {
        let batch = batch.map_err(|e| match e {
            DataFusionError::External(e) => match e.downcast::<Error>() {
                Ok(e) => *e,
                Err(e) => failed(DataFusionError::External(e)),
            },
            e => failed(e),
        })?;
        rows += batch.num_rows();
        writer.write(&batch).await.map_err(&bad)?;
    }
    if rows == 0 {
        return Ok(None);
    }
    let metadata = writer.finish().await.map_err(&bad)?;
    let spilled_runs = sort
        .and_then(|s| s.metrics())
        .and_then(|m| m.spill_count())
        .unwrap_or(0);
    Ok(Some(Encoded {
        schema,
        metadata,
        spilled_runs: spilled_runs as u64,
    }))
}

/// The columns of a table's Delta schema, without the partition columns.
fn file_columns(read: &DeltaTableState) -> SchemaRef {
    let table = read.snapshot().arrow_schema();
    let fields: Vec<FieldRef> = table
        .fields()
        .iter()
        .filter(|f| !super::PARTITION_COLUMNS.contains(&f.name().as_str()))
        .cloned()
        .collect();
    Arc::new(Schema::new(fields))
}

/// The schema of a compacted file whose first input has the schema `first`: its
/// columns, then those of the table (`columns`) it lacks, added since it was written.
/// A column the table has as nullable is nullable (an input written before it was
/// added has none of it), whatever a newer input's own schema says.
fn output_schema(first: &SchemaRef, columns: &Schema) -> SchemaRef {
    let nullable = |name: &str| columns.field_with_name(name).is_ok_and(|f| f.is_nullable());
    let mut fields: Vec<FieldRef> = first
        .fields()
        .iter()
        .map(|f| match !f.is_nullable() && nullable(f.name()) {
            true => Arc::new(f.as_ref().clone().with_nullable(true)),
            false => f.clone(),
        })
        .collect();
    let missing = columns
        .fields()
        .iter()
        .filter(|c| first.field_with_name(c.name()).is_err())
        .map(|c| Arc::new(c.as_ref().clone().with_nullable(true)));
    fields.extend(missing);
    if fields.iter().zip(first.fields()).all(|(a, b)| a == b)
        && fields.len() == first.fields().len()
    {
        return first.clone();
    }
    Arc::new(Schema::new_with_metadata(fields, first.metadata().clone()))
}

/// `batch` with `schema`'s columns: by name, cast where the types differ (a time
/// column the table records in microseconds), nulls where `batch` has none of it.
/// Files of one table usually share their columns and only the schema object differs
/// (metadata); then the columns are taken as they are.
fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> std::result::Result<RecordBatch, ArrowError> {
    let same = batch.num_columns() == schema.fields().len()
        && batch
            .schema()
            .fields()
            .iter()
            .zip(schema.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
    if same {
        return RecordBatch::try_new(schema.clone(), batch.columns().to_vec());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast(c, field.data_type()),
            None => Ok(arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(schema.clone(), columns, &options)
}

/// Where [`rewrite`] writes the file: each flushed row group goes to the upload on
/// the service's runtime, so that memory holds a row group or two, not the file.
struct Parts(tokio::sync::mpsc::Sender<bytes::Bytes>);

impl AsyncFileWriter for Parts {
    fn write(&mut self, bytes: bytes::Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            if bytes.is_empty() {
                return Ok(());
            }
            self.0.send(bytes).await.map_err(|_| {
                parquet::errors::ParquetError::General("the upload of the file ended".into())
            })
        })
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        // The upload completes once the rewrite has succeeded (see `write_output`).
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A reader of `input`'s rows (all, or the given range).
fn decode(
    (input, rows): (bytes::Bytes, Option<Range<usize>>),
) -> parquet::errors::Result<ParquetRecordBatchReader> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(input)?;
    match rows {
        Some(rows) => builder.with_row_selection(RowSelection::from(vec![
            RowSelector::skip(rows.start),
            RowSelector::select(rows.len()),
        ])),
        None => builder,
    }
    .build()
}

/// A stream DataFusion's sort can take as its input (once).
struct OneStream {
    schema: SchemaRef,
    stream: std::sync::Mutex<Option<SendableRecordBatchStream>>,
}

impl OneStream {
    fn new(stream: SendableRecordBatchStream) -> Self {
        Self {
            schema: stream.schema(),
            stream: std::sync::Mutex::new(Some(stream)),
        }
    }
}

impl std::fmt::Debug for OneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneStream")
            .field("schema", &self.schema)
            .finish()
    }
}

impl PartitionStream for OneStream {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _: Arc<TaskContext>) -> SendableRecordBatchStream {
        let taken = self
            .stream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        taken.unwrap_or_else(|| {
            Box::pin(RecordBatchStreamAdapter::new(
                self.schema.clone(),
                futures::stream::once(async {
                    Err(DataFusionError::Internal(
                        "the input was read already".into(),
                    ))
                }),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::ManualClock;

    use super::*;
    use crate::test_support::{committed, store, store_batch};

    const DAY_MS: i64 = 86_400_000;
    /// 2026-01-01T00:00:00Z.
    const T0: i64 = 1_767_225_600_000;

    fn options() -> MaintainOptions {
        MaintainOptions {
            target_size: 128 << 20,
            closed_after: Duration::from_secs(3600),
            open_min_files: 50,
            read_rate: 0,
            zstd_level: 1,
            row_group_rows: 1024,
            memory: 256 << 20,
            retain: BTreeMap::new(),
            vacuum_grace: Duration::ZERO,
            vacuum_interval: Duration::ZERO,
        }
    }

    fn maintenance(root: &std::path::Path, options: MaintainOptions, now: i64) -> Maintenance {
        let store = object_store::local::LocalFileSystem::new_with_prefix(root).expect("store");
        Maintenance::new(
            DeltaTables::local(root).expect("tables"),
            Arc::new(store),
            options,
            Arc::new(ManualClock::new(now)),
        )
    }

    /// Appends one file per call of rows at `times` to `table`.
    async fn append(root: &std::path::Path, tables: &mut DeltaTables, table: &str, times: &[i64]) {
        let w = store(root, table, times).await;
        tables.ensure(table, &w.schema).await.expect("ensure");
        tables.append(table, &w.files, None).await.expect("append");
    }

    /// The snapshot `m` reads table `t` from, and the files of its first partition.
    async fn first_partition(m: &mut Maintenance) -> (DeltaTableState, Vec<LogicalFileView>) {
        let (read, partitions) = m
            .partitions("t")
            .await
            .expect("partitions")
            .expect("a table");
        let files = partitions.into_iter().next().expect("a partition").files;
        (read, files)
    }

    /// One output of every row of `files`.
    fn whole(files: Vec<LogicalFileView>) -> Plan {
        let outputs = vec![(0..files.len()).map(|i| (i, None)).collect()];
        Plan { files, outputs }
    }

    async fn rows_in_order(root: &std::path::Path, table: &str) -> Vec<(String, i64)> {
        let engine = crate::query::QueryEngine::local(root).expect("engine");
        let out = engine
            .query(&format!("SELECT k, v FROM {table} ORDER BY k, ts, v"))
            .await
            .expect("query");
        let json = out.render(crate::query::Format::Json).expect("json");
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&json).expect("rows");
        rows.iter()
            .map(|r| {
                (
                    r["k"].as_str().unwrap_or("").to_owned(),
                    r["v"].as_i64().unwrap_or(-1),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_closed_partition_is_merged_into_one_sorted_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        for i in 0..5 {
            append(root, &mut tables, "t", &[T0 + 10 * i, T0 + 5 * i, T0 + 1]).await;
        }
        let before = rows_in_order(root, "t").await;
        // The hour is not closed yet: nothing happens.
        let mut m = maintenance(root, options(), T0 + 30 * 60_000);
        assert_eq!(m.compact("t").await.expect("compact"), Upkeep::default());
        let mut m = maintenance(root, options(), T0 + 2 * 3_600_000);
        let done = m.compact("t").await.expect("compact");
        assert_eq!((done.compacted_files, done.written_files), (5, 1));
        let t = tables.open("t").await.expect("open");
        let files: Vec<LogicalFileView> = t.snapshot().expect("state").log_data().iter().collect();
        assert_eq!(files.len(), 1);
        assert_eq!(committed(&mut tables, "t").await.0, 15);
        assert_eq!(rows_in_order(root, "t").await, before, "same rows");
        // The file itself is sorted by key, then event time.
        let rows = file_rows(root, &files[0]);
        assert_eq!(rows.len(), 15);
        assert!(rows.is_sorted(), "{rows:?}");
        // Written with the lake writer's settings: no dictionary for the event time.
        let bytes = std::fs::read(root.join("t").join(files[0].path().as_ref())).expect("read");
        let file =
            ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).expect("file");
        let ts = file.metadata().row_group(0).column(0);
        assert_eq!(ts.column_path().string(), "ts");
        let encodings: Vec<_> = ts.encodings().collect();
        assert!(ts.dictionary_page_offset().is_none(), "{encodings:?}");
    }

    #[tokio::test]
    async fn files_written_before_and_after_a_column_was_added_compact_into_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        let (old, new) = ([T0 + 5, T0 + 1], [T0 + 4, T0 + 2, T0 + 3]);
        // Either order in the log: the first input may have the column or not. `u`
        // is made with `w` required, then gets rows without it (a required field
        // removed): the table's column becomes nullable.
        for (table, first_new) in [("t", false), ("u", true)] {
            for widened in [first_new, !first_new] {
                let w = match widened {
                    true => store_batch(root, table, &crate::test_support::widened(&new)).await,
                    false => store(root, table, &old).await,
                };
                tables
                    .append_all([(Arc::from(table), w)].into())
                    .await
                    .expect("commit");
            }
        }
        let sql = "SELECT k, v, w FROM {t} ORDER BY ts";
        let query = |t: &'static str| async move {
            let engine = crate::query::QueryEngine::local(root).expect("engine");
            let out = engine.query(&sql.replace("{t}", t)).await.expect("query");
            String::from_utf8(out.render(crate::query::Format::Csv).expect("csv")).expect("utf8")
        };
        for table in ["t", "u"] {
            let before = query(table).await;
            let mut m = maintenance(root, options(), T0 + 2 * 3_600_000);
            let done = m.compact(table).await.expect("compact");
            assert_eq!(
                (done.compacted_files, done.written_files),
                (2, 1),
                "{table}"
            );
            assert_eq!(query(table).await, before, "{table}: same rows");
            assert!(before.contains("k1,1,0.5"), "{before}");
            assert_eq!(
                before.matches(",\n").count(),
                2,
                "old rows have no w: {before}"
            );
        }
    }

    #[tokio::test]
    async fn a_sort_over_its_memory_spills_and_uploads_in_parts_keeping_every_row_once_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        // 240,000 rows (about 6 MB of Arrow) against a 2 MB budget.
        for i in 0..12 {
            let times: Vec<i64> = (0..20_000)
                .map(|j| T0 + (j * 7 + i * 13) % 3_000_000)
                .collect();
            append(root, &mut tables, "t", &times).await;
        }
        let before = rows_in_order(root, "t").await;
        let options = MaintainOptions {
            memory: 2 << 20,
            row_group_rows: 1 << 20,
            ..options()
        };
        let mut m = maintenance(root, options, T0 + 2 * 3_600_000);
        // The file goes out in parts as the sort makes it (a multipart upload).
        m.upload_part = 64 << 10;
        let done = m.compact("t").await.expect("compact");
        assert_eq!((done.compacted_files, done.written_files), (12, 1));
        assert!(done.spilled_runs >= 2, "it spilled: {done:?}");
        assert_eq!(committed(&mut tables, "t").await.0, 240_000);
        assert_eq!(rows_in_order(root, "t").await, before, "same rows");
        // The file is sorted by key, then event time, across the spilled runs.
        let t = tables.open("t").await.expect("open");
        let files: Vec<LogicalFileView> = t.snapshot().expect("state").log_data().iter().collect();
        let rows = file_rows(root, &files[0]);
        assert_eq!(rows.len(), 240_000);
        assert!(rows.is_sorted(), "sorted by key, then event time");
        let on_disk = std::fs::metadata(root.join("t").join(files[0].path().as_ref()))
            .expect("the file")
            .len();
        assert!(on_disk > 4 * (64 << 10), "several parts: {on_disk} bytes");
        assert_eq!(
            files[0].size() as u64,
            on_disk,
            "the log's size is the file's"
        );
    }

    /// The (key, event time) of every row of `file` of table `t`, in file order.
    fn file_rows(root: &std::path::Path, file: &LogicalFileView) -> Vec<(String, i64)> {
        let bytes = std::fs::read(root.join("t").join(file.path().as_ref())).expect("read");
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .and_then(|b| b.build())
            .expect("reader");
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch.expect("batch");
            let ts = batch
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                .expect("ts");
            let keys = batch
                .column(1)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .expect("keys");
            rows.extend(
                keys.iter()
                    .flatten()
                    .map(str::to_owned)
                    .zip(ts.values().iter().copied()),
            );
        }
        rows
    }

    #[test]
    fn files_split_into_runs_of_equal_rows_give_each_row_to_one_output() {
        assert_eq!(
            split_rows(&[10, 10, 10, 10], 3),
            vec![
                vec![(0, None), (1, Some(0..3))],
                vec![(1, Some(3..10)), (2, Some(0..6))],
                vec![(2, Some(6..10)), (3, None)],
            ]
        );
        assert_eq!(split_rows(&[5, 7], 1), vec![vec![(0, None), (1, None)]]);
        // Counts from an edited log: no overflow.
        let huge = split_rows(&[usize::MAX / 2, usize::MAX / 2, 10], 3);
        assert_eq!(huge.len(), 3);
        assert_eq!(
            split_rows(&[2], 5),
            vec![vec![(0, Some(0..1))], vec![(0, Some(1..2))]]
        );
    }

    async fn file_sizes(tables: &mut DeltaTables, table: &str) -> Vec<u64> {
        let t = tables.open(table).await.expect("open");
        let state = t.snapshot().expect("state");
        state.log_data().iter().map(|f| f.size() as u64).collect()
    }

    #[tokio::test]
    async fn a_closed_partition_ends_with_one_file_per_target_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        for i in 0..5 {
            let times: Vec<i64> = (0..600).map(|j| T0 + i * 1000 + j).collect();
            append(root, &mut tables, "t", &times).await;
        }
        let before = rows_in_order(root, "t").await;
        let total: u64 = file_sizes(&mut tables, "t").await.iter().sum();
        // Five files of about 0.76 of the target each (3.8 targets in all), such as
        // merges of the open hour leave: four outputs, rows split across them.
        let target = total * 100 / 380;
        let mut options = options();
        options.target_size = target;
        let mut m = maintenance(root, options, T0 + 2 * 3_600_000);
        let done = m.compact("t").await.expect("compact");
        assert_eq!((done.compacted_files, done.written_files), (5, 4));
        assert_eq!(file_sizes(&mut tables, "t").await.len(), 4);
        assert_eq!(committed(&mut tables, "t").await.0, 3000);
        assert_eq!(rows_in_order(root, "t").await, before, "same rows");
        // Sorted files compress better, so later rounds may pack them tighter still;
        // once a round has nothing to do, there is one file per target size.
        for _ in 0..3 {
            if m.compact("t").await.expect("compact").written_files == 0 {
                break;
            }
        }
        let left = file_sizes(&mut tables, "t").await;
        let fewest = left.iter().sum::<u64>().div_ceil(target) as usize;
        assert_eq!(left.len(), fewest, "{left:?} with a target of {target}");
        assert_eq!(rows_in_order(root, "t").await, before, "same rows");
    }

    #[tokio::test]
    async fn compaction_and_appends_racing_for_the_log_both_land_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        for i in 0..4 {
            append(root, &mut tables, "t", &[T0 + i]).await;
        }
        // The compactor reads its snapshot, then an append wins the next version.
        let mut m = maintenance(root, options(), T0 + 2 * 3_600_000);
        let (read, files) = first_partition(&mut m).await;
        let mut other = DeltaTables::local(root).expect("tables");
        append(root, &mut other, "t", &[T0 + 100]).await;
        let done = m
            .merge("t", &read, "2026-01-01", "00", whole(files))
            .await
            .expect("merge");
        assert_eq!(done.compacted_files, 4);
        assert_eq!(
            committed(&mut tables, "t").await.0,
            5,
            "the append and the merge"
        );
        // And the other way round: an appender on an old snapshot after a compaction.
        let mut stale = DeltaTables::local(root).expect("tables");
        stale.open("t").await.expect("open");
        for i in 0..3 {
            append(root, &mut tables, "t", &[T0 + 200 + i]).await;
        }
        m.compact("t").await.expect("compact");
        let w = store(root, "t", &[T0 + 300]).await;
        // `append` refreshes first; commit on the stale state directly to force the race.
        let t = stale.tables.get_mut("t").expect("cached");
        let state = t.snapshot().expect("state");
        super::super::commit_files(t, state, &w.files, Vec::new())
            .await
            .expect("the stale append lands");
        assert_eq!(committed(&mut tables, "t").await.0, 9);
        assert_eq!(rows_in_order(root, "t").await.len(), 9);
    }

    #[tokio::test]
    async fn two_nodes_compacting_the_same_files_leave_one_merged_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        for i in 0..4 {
            append(root, &mut tables, "t", &[T0 + i, T0 + 10 + i]).await;
        }
        // Node a picks its files; node b compacts them all first; then a commits.
        let now = T0 + 2 * 3_600_000;
        let mut a = maintenance(root, options(), now);
        let (read, files) = first_partition(&mut a).await;
        let mut b = maintenance(root, options(), now);
        assert_eq!(b.compact("t").await.expect("compact").written_files, 1);
        assert!(
            a.merge("t", &read, "2026-01-01", "00", whole(files))
                .await
                .is_err(),
            "a's inputs are gone: its merge is refused"
        );
        assert_eq!(committed(&mut tables, "t").await.0, 8, "no row twice");
        let t = tables.open("t").await.expect("open");
        assert_eq!(t.snapshot().expect("state").log_data().num_files(), 1);
    }

    #[tokio::test]
    async fn retention_drops_old_partitions_and_vacuum_deletes_their_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        // One file a day for 40 days.
        for day in 0..40 {
            append(root, &mut tables, "t", &[T0 + day * DAY_MS + 1]).await;
        }
        let now = T0 + 40 * DAY_MS;
        let mut opts = options();
        opts.retain
            .insert("t".into(), Duration::from_secs(30 * 86_400));
        let mut m = maintenance(root, opts, now);
        let on_disk = || crate::convert::parquet_count(&root.join("t"));
        assert_eq!(on_disk(), 40);
        let done = m.run("t").await.expect("run");
        // Days 0..=9 ended 30 days or more before `now`.
        assert_eq!(done.expired_files, 10);
        assert_eq!(committed(&mut tables, "t").await.0, 30);
        assert_eq!(
            done.vacuumed_files, 10,
            "grace 0: the removed files go at once"
        );
        assert_eq!(on_disk(), 30);
        let left = rows_in_order(root, "t").await.len();
        assert_eq!(left, 30);
        // Time travel still names the old version, whose files are gone now; the
        // current version reads fine.
        let again = m.run("t").await.expect("run");
        assert_eq!(again, Upkeep::default());
    }
}
