//! The lake's tables as Delta Lake tables (delta-rs).
//!
//! Each table is a Delta table at `<lake>/<table>/`, partitioned by the string columns
//! `date` and `hour`. The lake writer ([`crate::parquet::Lake`]) stores the data files;
//! [`DeltaTables::append`] adds them to the table's log in one commit, optionally with
//! a transaction marker (`txn` action: app id [`APP_ID`], version = checkpoint id) that
//! tells a restart which checkpoints already reached the table.
//!
//! delta-rs retries a commit that loses the race for a log version to another writer
//! (a compaction, another node): it re-reads the winning commits, checks them for
//! conflicts and takes the next version, so the append lands once. delta-rs does not
//! check that transaction versions increase; [`DeltaTables::append`] does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{
    CommitBuilder, CommitProperties, FinalizedCommit, TransactionError,
};
use deltalake::kernel::{Action, Add, MetadataExt, StructField, StructType, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::state::DeltaTableState;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

use crate::parquet::DataFile;
use crate::{Error, Result};

pub mod maintain;

/// The partition columns every table has, in order.
pub const PARTITION_COLUMNS: [&str; 2] = ["date", "hour"];
/// The application id of Sluice's checkpoint transaction markers.
pub const APP_ID: &str = "sluice";
/// The table whose log decides which checkpoints of a cluster's nodes count (see
/// `checkpoint`): commits without files, each carrying one node's checkpoint marker
/// (a seal) or partitions' fencing epochs (a fence). The leading `_` keeps it out of
/// queries and upkeep.
pub const SEALS_TABLE: &str = "_checkpoints";

/// The app id of the fencing epochs of partition `partition` of source `source`.
pub fn fence_app_id(source: &str, partition: &str) -> String {
    format!("{APP_ID}-fence-{source}-{partition}")
}

/// Schema metadata keys are kept in the table's configuration under this prefix.
pub(crate) const META_PREFIX: &str = "sluice.schema.";

/// The Delta tables of one lake, opened as they are first used.
pub struct DeltaTables {
    root: Url,
    options: HashMap<String, String>,
    tables: HashMap<String, DeltaTable>,
    /// Per table, the newest checkpoint marker this process read or committed and the
    /// table version the log was read through, so a checkpoint does not replay the
    /// log's `txn` actions every time (only the commits since are read).
    markers: HashMap<String, Marker>,
    /// Per table, the newest version of every app id asked for through
    /// [`DeltaTables::txn_versions`] (the seals table's).
    txns: HashMap<String, Txns>,
    /// The app id of the markers this writer reads and writes.
    app_id: String,
    /// Per table, the columns last written that the table is known to hold (by
    /// [`DeltaTables::ensure`]), so that only a change of columns reads its schema.
    columns: HashMap<String, Fields>,
}

impl std::fmt::Debug for DeltaTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaTables")
            .field("root", &self.root.as_str())
            .field("open", &self.tables.len())
            .finish()
    }
}

pub(crate) fn delta_error(table: &str) -> impl FnOnce(DeltaTableError) -> Error + '_ {
    move |source| Error::Delta {
        table: table.to_owned(),
        source: Box::new(source),
    }
}

impl DeltaTables {
    /// The tables under `root` (a directory URL ending in `/`), with object-store
    /// options (S3 endpoint, credentials…) for every table.
    pub fn new(root: Url, options: HashMap<String, String>) -> Self {
        Self {
            root,
            options,
            tables: HashMap::new(),
            markers: HashMap::new(),
            txns: HashMap::new(),
            app_id: APP_ID.to_owned(),
            columns: HashMap::new(),
        }
    }

    /// Reads and writes the checkpoint markers of `app_id` (one per cluster node; see
    /// `checkpoint::Namespace`) instead of [`APP_ID`].
    pub fn with_app_id(mut self, app_id: String) -> Self {
        self.app_id = app_id;
        self
    }

    /// The tables of the lake at `location`.
    pub fn at(location: &crate::location::LakeLocation) -> Self {
        Self::new(location.url().clone(), location.options().clone())
    }

    /// A builder for `table` with the lake's storage options (to load an older
    /// version, say).
    pub fn builder(&self, table: &str) -> Result<deltalake::DeltaTableBuilder> {
        let url = self.table_url(table)?;
        Ok(deltalake::DeltaTableBuilder::from_url(url)
            .map_err(delta_error(table))?
            .with_storage_options(self.options.clone()))
    }

    /// Forgets `table` (say, a name a query tried that is no table).
    pub fn forget(&mut self, table: &str) {
        self.tables.remove(table);
    }

    /// The tables of a lake on a local directory (which need not exist yet).
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        let abs = std::path::absolute(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let url = Url::from_directory_path(&abs)
            .map_err(|()| Error::Refused(format!("{} is not a directory path", abs.display())))?;
        Ok(Self::new(url, HashMap::new()))
    }

    /// The URL of `table`'s directory.
    pub fn table_url(&self, table: &str) -> Result<Url> {
        self.root
            .join(&format!("{table}/"))
            .map_err(|e| Error::Refused(format!("table name {table:?}: {e}")))
    }

    /// The table, loaded and refreshed to its newest version (a table not created
    /// yet has no version).
    pub async fn open(&mut self, table: &str) -> Result<&mut DeltaTable> {
        if !self.tables.contains_key(table) {
            let url = self.table_url(table)?;
            let t = match DeltaTable::try_from_url_with_storage_options(
                url.clone(),
                self.options.clone(),
            )
            .await
            {
                Ok(t) => t,
                // No directory there yet: a table to be created (same as an empty one).
                Err(e) if is_missing(&e) => deltalake::DeltaTableBuilder::from_url(url)
                    .and_then(|b| b.with_storage_options(self.options.clone()).build())
                    .map_err(delta_error(table))?,
                Err(e) => return Err(delta_error(table)(e)),
            };
            self.tables.insert(table.to_owned(), t);
        } else if let Some(t) = self.tables.get_mut(table) {
            refresh(t).await.map_err(delta_error(table))?;
        }
        self.tables
            .get_mut(table)
            .ok_or_else(|| Error::Refused(format!("table {table:?} vanished")))
    }

    /// Creates `table` with `schema` (plus the partition columns) unless it exists; an
    /// existing table is made to hold its rows ([`DeltaTables::evolve`]).
    pub async fn ensure(&mut self, table: &str, schema: &Schema) -> Result<()> {
        if self.columns.get(table) == Some(schema.fields()) {
            return Ok(());
        }
        let t = self.open(table).await?;
        if t.version().is_none() {
            self.create(table, schema).await?;
        }
        self.evolve(table, schema).await?;
        self.columns
            .insert(table.to_owned(), schema.fields().clone());
        Ok(())
    }

    /// Creates `table` (opened, with no version yet) with `schema`, or takes the one
    /// another writer created meanwhile.
    async fn create(&mut self, table: &str, schema: &Schema) -> Result<()> {
        let columns = kernel_columns(table, &table_schema(schema))?;
        let configuration: Vec<(String, Option<String>)> = schema
            .metadata()
            .iter()
            .map(|(k, v)| (format!("{META_PREFIX}{k}"), Some(v.clone())))
            .collect();
        let t = self
            .tables
            .get_mut(table)
            .ok_or_else(|| Error::Refused(format!("table {table:?} is not open")))?;
        let created = t
            .create()
            .with_table_name(table)
            .with_columns(columns.fields().cloned())
            .with_partition_columns(PARTITION_COLUMNS)
            .with_configuration(configuration)
            .with_raise_if_key_not_exists(false)
            .with_save_mode(SaveMode::Ignore)
            .await;
        match created {
            Ok(t) => {
                tracing::info!(table, "created Delta table");
                self.tables.insert(table.to_owned(), t);
                Ok(())
            }
            // Another writer created it first: use theirs.
            Err(e) if self.open(table).await.is_ok_and(|t| t.version().is_some()) => {
                tracing::debug!(table, error = %e, "table created concurrently");
                Ok(())
            }
            Err(e) => Err(delta_error(table)(e)),
        }
    }

    /// How the columns of `schema` differ from `table`'s, as of its newest version:
    /// one line per column of another type (none for a table not created yet).
    pub async fn column_conflicts(&mut self, table: &str, schema: &Schema) -> Result<Vec<String>> {
        let t = self.open(table).await?;
        if t.version().is_none() {
            return Ok(Vec::new());
        }
        let state = t.snapshot().map_err(delta_error(table))?;
        Ok(difference(table, &state.schema(), schema)?.conflicts)
    }

    /// Makes `table` (which exists) able to hold the rows of `schema`, in one commit of
    /// a new `metaData` action (Delta's schema evolution): the columns it does not have
    /// are added, nullable (the rows of older files have none), after its columns and
    /// before the partition columns (delta-rs's `ADD COLUMN` appends after them, and the
    /// query engine's scan wants them last); a non-null column the rows may leave null
    /// (a required field made optional or removed) becomes nullable. A column of
    /// another type is an [`Error::Columns`]: the rows of both could not be one column.
    async fn evolve(&mut self, table: &str, schema: &Schema) -> Result<()> {
        for retry in [false, true] {
            let t = self.open(table).await?;
            let state = t.snapshot().map_err(delta_error(table))?;
            let current = state.schema();
            let change = difference(table, &current, schema)?;
            if !change.conflicts.is_empty() {
                return Err(Error::Columns {
                    table: table.to_owned(),
                    conflicts: change.conflicts,
                });
            }
            let relaxed = |f: &StructField| change.relaxed.contains(f.name());
            let operation = match (change.added.first(), current.fields().find(|f| relaxed(f))) {
                (Some(_), _) => DeltaOperation::AddColumn {
                    fields: change.added.clone(),
                },
                (None, Some(column)) => DeltaOperation::DropColumnNotNull {
                    column: column.clone(),
                },
                (None, None) => return Ok(()),
            };
            let (partitions, columns): (Vec<_>, Vec<_>) = current
                .fields()
                .map(|f| StructField {
                    nullable: f.nullable || relaxed(f),
                    ..f.clone()
                })
                .partition(|f| PARTITION_COLUMNS.contains(&f.name().as_str()));
            let evolved = StructType::try_new(
                columns
                    .into_iter()
                    .chain(change.added.iter().cloned())
                    .chain(partitions),
            )
            .map_err(|e| delta_error(table)(e.into()))?;
            let metadata = state
                .metadata()
                .clone()
                .with_schema(&evolved)
                .map_err(|e| delta_error(table)(e.into()))?;
            let done = CommitBuilder::default()
                .with_actions(vec![Action::Metadata(metadata)])
                .build(Some(state), t.log_store(), operation)
                .await;
            match done {
                Ok(done) => {
                    t.state = Some(done.snapshot());
                    let added: Vec<&str> = change.added.iter().map(|f| f.name().as_str()).collect();
                    tracing::info!(table, ?added, nullable = ?change.relaxed, "changed the table's columns");
                    return Ok(());
                }
                // Another writer changed the table first (added the same columns,
                // say): read it again and decide again, once.
                Err(e) if !retry => {
                    tracing::debug!(table, error = %e, "columns changed concurrently");
                }
                Err(e) => return Err(delta_error(table)(e)),
            }
        }
        Ok(())
    }

    /// The newest checkpoint id recorded in `table`'s log (its `txn` version), if any,
    /// as of its newest version.
    pub async fn checkpoint_of(&mut self, table: &str) -> Result<Option<u64>> {
        self.open(table).await?;
        self.marker_as_loaded(table).await
    }

    /// The newest checkpoint id in `table`'s log as far as it is loaded (no refresh).
    ///
    /// A marker's app id is written by one node, except when a node completes the
    /// checkpoints of another that left the cluster (`checkpoint::settle_peers`): so
    /// rather than trusting the cache, the commits since the cached marker are read for
    /// markers of ours, one small object each (none when the last commit was ours).
    async fn marker_as_loaded(&mut self, table: &str) -> Result<Option<u64>> {
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| Error::Refused(format!("table {table:?} is not open")))?;
        let Some(version) = t.version() else {
            return Ok(None);
        };
        let log = t.log_store();
        let mut found = None;
        if let Some(marker) = self.markers.get(table).copied()
            && version.saturating_sub(marker.seen) <= MAX_COMMITS_SCANNED
        {
            let (mut checkpoint, mut all_read) = (marker.checkpoint, true);
            for v in marker.seen + 1..=version {
                match log.read_commit_entry(v).await.map_err(delta_error(table))? {
                    Some(commit) => checkpoint = checkpoint.max(marker_in(&commit, &self.app_id)),
                    // Cleaned up since (log retention): read the marker from the snapshot.
                    None => all_read = false,
                }
            }
            found = all_read.then_some(checkpoint);
        }
        if found.is_none() {
            let state = t.snapshot().map_err(delta_error(table))?;
            found = state
                .transaction_version(log.as_ref(), &self.app_id)
                .await
                .map_err(delta_error(table))?
                .and_then(|v| u64::try_from(v).ok());
        }
        match found {
            Some(checkpoint) => self.markers.insert(
                table.to_owned(),
                Marker {
                    checkpoint,
                    seen: version,
                },
            ),
            None => self.markers.remove(table),
        };
        Ok(found)
    }

    /// Adds `files` to `table` in one commit. With `checkpoint`, the commit carries the
    /// transaction marker of that checkpoint, and is skipped (returns `false`) when the
    /// table already holds that checkpoint or a later one. The table must exist
    /// ([`DeltaTables::ensure`]).
    pub async fn append(
        &mut self,
        table: &str,
        files: &[DataFile],
        checkpoint: Option<u64>,
    ) -> Result<bool> {
        self.open(table).await?;
        if let Some(id) = checkpoint
            && self
                .marker_as_loaded(table)
                .await?
                .is_some_and(|done| done >= id)
        {
            return Ok(false);
        }
        let app_id = self.app_id.clone();
        let t = self
            .tables
            .get_mut(table)
            .ok_or_else(|| Error::Refused(format!("table {table:?} is not open")))?;
        let state = t.snapshot().map_err(delta_error(table))?;
        let markers: Vec<_> = checkpoint.iter().map(|&id| txn(&app_id, id)).collect();
        let done = match commit_files(t, state, files, markers).await {
            Ok(done) => done,
            Err(e) => {
                // Another node may have committed this checkpoint first (completing
                // ours while we were cut off: delta-rs refuses ours as a concurrent
                // transaction). Then it is done; anything else is an error.
                self.markers.remove(table);
                if let Some(id) = checkpoint
                    && self
                        .checkpoint_of(table)
                        .await
                        .is_ok_and(|done| done.is_some_and(|done| done >= id))
                {
                    tracing::debug!(
                        table,
                        checkpoint = id,
                        "checkpoint committed by another node"
                    );
                    return Ok(false);
                }
                return Err(delta_error(table)(e));
            }
        };
        let version = done.version();
        t.state = Some(done.snapshot());
        if let Some(id) = checkpoint {
            // Our commit went through delta-rs's conflict check against every commit
            // since the version we read: none of them carried our app id.
            self.markers.insert(
                table.to_owned(),
                Marker {
                    checkpoint: id,
                    seen: version,
                },
            );
        }
        let rows: u64 = files.iter().map(|f| f.rows).sum();
        tracing::debug!(table, version, files = files.len(), rows, "committed");
        metrics::counter!("sluice_lake_commits_total", "table" => table.to_owned()).increment(1);
        metrics::counter!("sluice_lake_rows_committed_total", "table" => table.to_owned())
            .increment(rows);
        metrics::gauge!("sluice_lake_last_commit_ms", "table" => table.to_owned())
            .set(sluice_core::Clock::now_ms(&sluice_core::SystemClock) as f64);
        metrics::counter!("sluice_lake_files_committed_total", "table" => table.to_owned())
            .increment(files.len() as u64);
        metrics::gauge!("sluice_lake_table_version", "table" => table.to_owned())
            .set(version as f64);
        Ok(true)
    }

    /// The newest version of each of `apps` in `table`'s log as of its newest version
    /// (0: none). The commits since the last call are read one by one (a small object
    /// each); an app id not met before, or a gap past [`MAX_COMMITS_SCANNED`], is read
    /// from the snapshot (a log replay). Versions of every app id must only grow
    /// (checkpoint ids, epochs).
    pub async fn txn_versions(&mut self, table: &str, apps: &[String]) -> Result<Vec<u64>> {
        self.open(table).await?;
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| Error::Refused(format!("table {table:?} is not open")))?;
        let Some(version) = t.version() else {
            return Ok(vec![0; apps.len()]);
        };
        let log = t.log_store();
        let mut cache = self
            .txns
            .remove(table)
            .filter(|c| c.seen <= version && version - c.seen <= MAX_COMMITS_SCANNED);
        if let Some(c) = &mut cache {
            let mut all_read = true;
            for v in c.seen + 1..=version {
                let Some(commit) = log.read_commit_entry(v).await.map_err(delta_error(table))?
                else {
                    // Cleaned up since (log retention): start over from the snapshot.
                    all_read = false;
                    break;
                };
                for (app, found) in txns_in(&commit) {
                    let known = c.versions.entry(app).or_default();
                    *known = (*known).max(found);
                }
            }
            if !all_read {
                cache = None;
            }
        }
        let mut cache = cache.unwrap_or_default();
        cache.seen = version;
        let state = t.snapshot().map_err(delta_error(table))?;
        let mut out = Vec::with_capacity(apps.len());
        for app in apps {
            let found = match cache.versions.get(app) {
                Some(&v) => v,
                None => {
                    let v = state
                        .transaction_version(log.as_ref(), app)
                        .await
                        .map_err(delta_error(table))?
                        .and_then(|v| u64::try_from(v).ok())
                        .unwrap_or(0);
                    cache.versions.insert(app.clone(), v);
                    v
                }
            };
            out.push(found);
        }
        self.txns.insert(table.to_owned(), cache);
        Ok(out)
    }

    /// One commit to `table` without files, carrying `txns` (app id, version); `false`
    /// when a concurrent commit won.
    async fn commit_txns(&mut self, table: &str, txns: &[(String, u64)]) -> Result<bool> {
        let t = self.open(table).await?;
        let state = t.snapshot().map_err(delta_error(table))?;
        let markers = txns.iter().map(|(app, v)| txn(app, *v)).collect();
        match commit_files(t, state, &[], markers).await {
            Ok(done) => {
                t.state = Some(done.snapshot());
                Ok(true)
            }
            // Lost to a concurrent commit: the caller reads the log again.
            Err(DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_),
            }) => Ok(false),
            Err(e) => Err(delta_error(table)(e)),
        }
    }

    /// Creates the seals table unless it exists.
    async fn ensure_seals(&mut self) -> Result<()> {
        let schema = Schema::new(vec![Field::new("checkpoint", DataType::Int64, true)]);
        self.ensure(SEALS_TABLE, &schema).await
    }

    /// Makes checkpoint `id` of this writer's app id count: one commit to
    /// [`SEALS_TABLE`] carrying its marker and `fences`, the (fence app id, epoch) of
    /// every partition it holds records of. Done already when the log holds the marker.
    /// [`Error::Fenced`] when a fence in the log is newer than ours: another node took
    /// the partition over, and this checkpoint must never count. The commit is decided
    /// by delta-rs: a fence committed after the log was read conflicts with ours (the
    /// same app id), and the log is read again.
    pub async fn seal(&mut self, id: u64, fences: &[(String, u64)]) -> Result<()> {
        self.ensure_seals().await?;
        let mut apps = vec![self.app_id.clone()];
        apps.extend(fences.iter().map(|(app, _)| app.clone()));
        let mut txns = vec![(self.app_id.clone(), id)];
        txns.extend(fences.iter().cloned());
        for _ in 0..MARKER_COMMIT_TRIES {
            let versions = self.txn_versions(SEALS_TABLE, &apps).await?;
            if versions[0] >= id {
                return Ok(());
            }
            for ((app, ours), &newer) in fences.iter().zip(&versions[1..]) {
                if newer > *ours {
                    return Err(Error::Fenced {
                        app: app.clone(),
                        ours: *ours,
                        newer,
                    });
                }
            }
            if self.commit_txns(SEALS_TABLE, &txns).await? {
                return Ok(());
            }
        }
        Err(Error::Refused(format!(
            "checkpoint {id} could not be sealed in {MARKER_COMMIT_TRIES} tries"
        )))
    }

    /// Takes over partitions: commits to [`SEALS_TABLE`] the next epoch of each fence
    /// app id in `apps`, so that no checkpoint of a node holding an older epoch can be
    /// sealed after this returns. Returns the epochs, in the order of `apps`.
    pub async fn fence(&mut self, apps: &[String]) -> Result<Vec<u64>> {
        self.ensure_seals().await?;
        for _ in 0..MARKER_COMMIT_TRIES {
            let epochs: Vec<u64> = self
                .txn_versions(SEALS_TABLE, apps)
                .await?
                .into_iter()
                .map(|e| e + 1)
                .collect();
            let txns: Vec<_> = apps.iter().cloned().zip(epochs.iter().copied()).collect();
            if self.commit_txns(SEALS_TABLE, &txns).await? {
                return Ok(epochs);
            }
        }
        Err(Error::Refused(format!(
            "partitions could not be fenced in {MARKER_COMMIT_TRIES} tries"
        )))
    }

    /// The newest checkpoint of `app_id` sealed in [`SEALS_TABLE`] (0: none).
    pub async fn sealed(&mut self, app_id: &str) -> Result<u64> {
        self.ensure_seals().await?;
        Ok(self.txn_versions(SEALS_TABLE, &[app_id.to_owned()]).await?[0])
    }

    /// Puts `table` back in the cache after an operation that consumed it.
    pub fn replace(&mut self, table: &str, t: DeltaTable) {
        self.tables.insert(table.to_owned(), t);
    }

    /// Appends each table's files without a marker (a bounded run, or checkpoints off).
    pub async fn append_all(
        &mut self,
        written: BTreeMap<Arc<str>, crate::parquet::Written>,
    ) -> Result<()> {
        for (table, w) in written {
            self.ensure(&table, &w.schema).await?;
            self.append(&table, &w.files, None).await?;
        }
        Ok(())
    }
}

/// A transaction marker: `app_id` reached `version`.
fn txn(app_id: &str, version: u64) -> Transaction {
    Transaction::new_with_last_update(
        app_id,
        i64::try_from(version).unwrap_or(i64::MAX),
        Some(chrono::Utc::now().timestamp_millis()),
    )
}

/// Appends `files` (possibly none) to `t` in one commit built on `state`, carrying
/// `markers`. delta-rs rebases it over newer commits, and refuses it when one of them
/// carries one of the same app ids.
async fn commit_files(
    t: &DeltaTable,
    state: &DeltaTableState,
    files: &[DataFile],
    markers: Vec<Transaction>,
) -> Result<FinalizedCommit, DeltaTableError> {
    let actions = files.iter().map(add_action).collect();
    let properties = CommitProperties::default().with_application_transactions(markers);
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: Some(PARTITION_COLUMNS.map(String::from).to_vec()),
        predicate: None,
    };
    CommitBuilder::from(properties)
        .with_actions(actions)
        .build(Some(state), t.log_store(), operation)
        .await
}

/// How often a seal or a fence is tried when its commit loses to a concurrent one
/// (each try reads the log again first).
const MARKER_COMMIT_TRIES: usize = 8;

/// A cached checkpoint marker: the checkpoint id, valid through table version `seen`.
#[derive(Debug, Clone, Copy)]
struct Marker {
    checkpoint: u64,
    seen: u64,
}

/// Past this many commits since the cached marker, the marker is read from the
/// snapshot (a log replay) rather than commit by commit.
const MAX_COMMITS_SCANNED: u64 = 64;

/// The newest checkpoint marker of `app_id` in one commit file, or 0.
fn marker_in(commit: &[u8], app_id: &str) -> u64 {
    txns_in(commit)
        .filter(|(app, _)| app == app_id)
        .map(|(_, version)| version)
        .max()
        .unwrap_or(0)
}

/// Every transaction marker (app id, version) in one commit file (newline-delimited
/// JSON actions).
fn txns_in(commit: &[u8]) -> impl Iterator<Item = (String, u64)> + '_ {
    commit
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter_map(|action| {
            let txn = action.get("txn")?;
            Some((
                txn.get("appId")?.as_str()?.to_owned(),
                txn.get("version")?.as_u64()?,
            ))
        })
}

/// The app ids' newest versions in one table, valid through table version `seen`.
#[derive(Debug, Default)]
struct Txns {
    seen: u64,
    /// Only app ids asked for or met in a commit read since: an app id present here
    /// has its true newest version, because versions only grow.
    versions: HashMap<String, u64>,
}

/// Loads the commits made since the table's version (any writer's).
async fn refresh(t: &mut DeltaTable) -> Result<(), DeltaTableError> {
    if t.version().is_some() {
        t.update_incremental(None).await
    } else {
        match t.load().await {
            Err(e) if !is_missing(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Whether `e` says there is no table (yet) at the location: no log, or on a local
/// disk no directory at all.
fn is_missing(e: &DeltaTableError) -> bool {
    match e {
        DeltaTableError::NotATable(_) | DeltaTableError::InvalidTableLocation(_) => true,
        // The kernel's error type is not re-exported by delta-rs; its variant
        // `InvalidTableLocation` prints as below.
        DeltaTableError::KernelError(k) => k.to_string().starts_with("Invalid table location"),
        _ => false,
    }
}

/// `schema` as Delta columns.
fn kernel_columns(table: &str, schema: &Schema) -> Result<StructType> {
    schema
        .try_into_kernel()
        .map_err(|e| delta_error(table)(DeltaTableError::Generic(e.to_string())))
}

/// How the columns of rows about to be written differ from a table's.
#[derive(Debug, Default)]
struct Change {
    /// The columns the table lacks, as nullable columns.
    added: Vec<StructField>,
    /// Non-null columns of the table that the rows may leave null: absent from them,
    /// or nullable in them.
    relaxed: Vec<String>,
    /// One line per column whose type differs.
    conflicts: Vec<String>,
}

/// How `written` differs from `current` (a table's schema; its partition columns are
/// never written).
fn difference(table: &str, current: &StructType, written: &Schema) -> Result<Change> {
    let written = kernel_columns(table, written)?;
    let mut change = Change::default();
    for field in written.fields() {
        match current.field(field.name()) {
            None => change.added.push(StructField::nullable(
                field.name().clone(),
                field.data_type().clone(),
            )),
            Some(had) if had.data_type() != field.data_type() => change.conflicts.push(format!(
                "column {:?} is {} in the table and {} in the rows",
                field.name(),
                had.data_type(),
                field.data_type()
            )),
            Some(_) => {}
        }
    }
    change.relaxed = current
        .fields()
        .filter(|had| !had.is_nullable() && !PARTITION_COLUMNS.contains(&had.name().as_str()))
        .filter(|had| {
            written
                .field(had.name())
                .is_none_or(StructField::is_nullable)
        })
        .map(|had| had.name().clone())
        .collect();
    Ok(change)
}

/// The table's columns: the files' columns, then `date` and `hour`.
fn table_schema(schema: &Schema) -> Schema {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(PARTITION_COLUMNS.map(|c| Field::new(c, DataType::Utf8, true)));
    Schema::new(fields)
}

pub(crate) fn add_action(file: &DataFile) -> Action {
    Action::Add(Add {
        path: file.path.clone(),
        partition_values: HashMap::from([
            ("date".to_owned(), Some(file.date.clone())),
            ("hour".to_owned(), Some(file.hour.clone())),
        ]),
        size: i64::try_from(file.size).unwrap_or(i64::MAX),
        modification_time: file.modified_ms,
        data_change: true,
        stats: Some(file.stats.clone()),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{committed, store, store_batch, widened};

    /// 2026-01-01T00:00:00Z.
    const T0: i64 = 1_767_225_600_000;

    /// Another writer adds a column between this one's read of the table and its
    /// commit: delta-rs refuses the append (the schema changed under it), and the
    /// retry, which reads the table again as the lake task's retry does, lands.
    #[tokio::test]
    async fn an_append_racing_a_column_added_by_another_writer_lands_on_its_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut old_writer = DeltaTables::local(root).expect("tables");
        let first = store(root, "t", &[T0]).await;
        old_writer
            .append_all([(Arc::from("t"), first)].into())
            .await
            .expect("commit");
        let t = old_writer.open("t").await.expect("open").clone();
        let read = t.snapshot().expect("snapshot").clone();
        let mut new_writer = DeltaTables::local(root).expect("tables");
        let new = store_batch(root, "t", &widened(&[T0 + 1, T0 + 2])).await;
        new_writer
            .append_all([(Arc::from("t"), new)].into())
            .await
            .expect("commit");
        let old = store(root, "t", &[T0 + 3]).await;
        let raced = commit_files(&t, &read, &old.files, Vec::new()).await;
        assert!(
            raced.is_err(),
            "an append built on the older schema is refused"
        );
        old_writer
            .append("t", &old.files, None)
            .await
            .expect("the retry lands");
        assert_eq!(committed(&mut old_writer, "t").await.0, 4);
        let t = old_writer.open("t").await.expect("open");
        let schema = t.snapshot().expect("snapshot").schema();
        assert!(schema.field("w").is_some(), "the column stays");
    }

    #[tokio::test]
    async fn a_table_takes_columns_added_later_and_refuses_a_column_of_another_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        let old = store(root, "t", &[T0, T0 + 1]).await;
        tables
            .append_all([(Arc::from("t"), old)].into())
            .await
            .expect("commit");
        let new = store_batch(root, "t", &widened(&[T0 + 2, T0 + 3, T0 + 4])).await;
        tables
            .append_all([(Arc::from("t"), new)].into())
            .await
            .expect("commit");
        // The new column goes before the partition columns, nullable.
        let t = tables.open("t").await.expect("open");
        let schema = t.snapshot().expect("snapshot").schema();
        let names: Vec<&str> = schema.fields().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["ts", "k", "v", "w", "date", "hour"]);
        assert!(schema.field("w").is_some_and(StructField::is_nullable));
        // Queries see it: the older rows have none of it.
        let engine = crate::query::QueryEngine::local(root).expect("engine");
        let result = engine
            .query("SELECT count(*) AS n, count(w) AS w, sum(w) AS s FROM t")
            .await
            .expect("query");
        let csv = result.render(crate::query::Format::Csv).expect("csv");
        assert_eq!(String::from_utf8(csv).expect("utf8"), "n,w,s\n5,3,1.5\n");
        // A column of another type under the same name is refused, naming it.
        let mut fields = widened(&[T0]).schema().fields().to_vec();
        fields[2] = Arc::new(Field::new("v", DataType::Utf8, false));
        let retyped = Schema::new(fields);
        let conflict = r#"column "v" is long in the table and string in the rows"#;
        let mut fresh = DeltaTables::local(root).expect("tables");
        assert_eq!(
            fresh.column_conflicts("t", &retyped).await.expect("read"),
            [conflict]
        );
        match fresh.ensure("t", &retyped).await {
            Err(e @ Error::Columns { .. }) => assert!(e.to_string().contains(conflict), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            fresh
                .column_conflicts("u", &retyped)
                .await
                .expect("read")
                .is_empty(),
            "no table yet: nothing to conflict with"
        );
    }

    #[tokio::test]
    async fn the_log_gets_a_parquet_checkpoint_every_hundred_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        let w = store(root, "t", &[1]).await;
        tables.ensure("t", &w.schema).await.expect("ensure");
        // Version 0 creates the table; 100 appends reach version 100.
        for id in 1..=100 {
            assert!(
                tables
                    .append("t", &w.files, Some(id))
                    .await
                    .expect("append")
            );
        }
        // delta-rs checkpoints after the commit that makes the count a multiple of
        // the interval (100 by default): version 99.
        let log = root.join("t").join("_delta_log");
        assert!(
            log.join(format!("{:020}.checkpoint.parquet", 99)).exists(),
            "a Parquet checkpoint of the log at version 99"
        );
        assert!(log.join("_last_checkpoint").exists());
        // A fresh reader starts from it and sees every commit and the newest marker.
        let mut fresh = DeltaTables::local(root).expect("tables");
        assert_eq!(committed(&mut fresh, "t").await.1, 100);
        assert_eq!(fresh.checkpoint_of("t").await.expect("marker"), Some(100));
    }

    #[tokio::test]
    async fn a_checkpoint_another_node_completed_for_us_is_not_committed_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (w1, w2, w3) = (
            store(root, "t", &[1]).await,
            store(root, "t", &[2]).await,
            store(root, "t", &[3]).await,
        );
        let node = || {
            DeltaTables::local(root)
                .expect("tables")
                .with_app_id("sluice-a".into())
        };
        let mut a = node();
        a.ensure("t", &w1.schema).await.expect("ensure");
        assert!(a.append("t", &w1.files, Some(1)).await.expect("append"));
        // Another node completes checkpoint 2 of node a while a still caches marker 1,
        // and something unrelated commits after it (a compaction, another node).
        let mut other = node();
        assert!(other.append("t", &w2.files, Some(2)).await.expect("append"));
        let mut unrelated = DeltaTables::local(root).expect("tables");
        assert!(
            unrelated
                .append("t", &w3.files, Some(7))
                .await
                .expect("append")
        );
        assert_eq!(a.checkpoint_of("t").await.expect("marker"), Some(2));
        assert!(!a.append("t", &w2.files, Some(2)).await.expect("append"));
        assert_eq!(committed(&mut a, "t").await.0, 3, "three rows, none twice");

        // The same race decided inside delta-rs: a reads the marker, the other node
        // commits checkpoint 3 first, and a's commit is refused as concurrent.
        let w4 = store(root, "t", &[4]).await;
        assert_eq!(a.checkpoint_of("t").await.expect("marker"), Some(2));
        assert!(other.append("t", &w4.files, Some(3)).await.expect("append"));
        let t = a.tables.get_mut("t").expect("open");
        let stale = t.snapshot().expect("snapshot").clone();
        assert!(
            commit_files(t, &stale, &w4.files, vec![txn("sluice-a", 3)])
                .await
                .is_err(),
            "delta-rs refuses a second commit of one marker"
        );
        assert_eq!(committed(&mut a, "t").await.0, 4);
    }
}
