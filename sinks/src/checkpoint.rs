//! Checkpoints: one atomic manifest per checkpoint for the whole pipeline.
//!
//! Between checkpoints the lake stores data files at their final paths inside each
//! table's directory, where no reader sees them: a Delta table is what its log says.
//! A checkpoint ([`Checkpoints::commit`]):
//! 1. (caller) stores every open file and creates the tables it touches, and streams
//!    window and alert state into `_state/<id>/` ([`Checkpoints::create_state`]);
//! 2. fsyncs the data files (a local lake), then puts `_manifests/<id>.json` whole (a
//!    local lake: temporary file renamed into place, then the file and its directory
//!    fsynced): the files per table, the state files, and every source position the
//!    rows cover;
//! 3. appends each table's files to its Delta log in one commit carrying the
//!    transaction marker (`txn`: app id `sluice`, version = checkpoint id).
//!
//! Only after `commit` returns may sources be acknowledged (Kafka offsets committed).
//!
//! [`Checkpoints::recover`] at start redoes step 3 for every kept manifest: a table
//! whose marker is already at or past the manifest's id is skipped, so a crash between
//! two tables' commits is completed, never repeated. It hands back the newest
//! manifest so the caller restores window state and source positions from it. A
//! replayed interval can never duplicate committed rows: files stored after the last
//! manifest are in no log (vacuum deletes them after its grace period).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_core::{PartitionState, SourcePositions};

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::delta::DeltaTables;
use crate::location::LakeLocation;
use crate::parquet::DataFile;
use crate::{Error, Result, io_error, store_error};

/// Where a lake written before Delta tables kept uncommitted files.
pub const LEGACY_STAGING_DIR: &str = "_staging";
const MANIFEST_DIR: &str = "_manifests";
const STATE_DIR: &str = "_state";
/// Where the nodes of a cluster keep their checkpoints, one directory each.
pub const NODES_DIR: &str = "_nodes";

/// Whose checkpoints these are: the lake's one node (`_manifests/`, `_state/`, marker
/// app id `sluice`), or one node of a cluster sharing the lake
/// (`_nodes/<node>/_manifests/`, `_nodes/<node>/_state/`, app id `sluice-<node>`), so
/// that nodes' checkpoint ids and markers never collide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    node: Option<String>,
}

impl Namespace {
    /// The checkpoints of cluster node `id` (see `ClusterConfig::valid_node_id`).
    pub fn node(id: &str) -> Self {
        Self {
            node: Some(id.to_owned()),
        }
    }

    /// The app id of this namespace's Delta transaction markers.
    pub fn app_id(&self) -> String {
        match &self.node {
            None => crate::delta::APP_ID.to_owned(),
            Some(id) => format!("{}-{id}", crate::delta::APP_ID),
        }
    }

    fn dir(&self, leaf: &str) -> String {
        match &self.node {
            None => leaf.to_owned(),
            Some(id) => format!("{NODES_DIR}/{id}/{leaf}"),
        }
    }
}
/// Manifests kept; older ones (and their state) are deleted.
const KEEP: usize = 3;

/// A window or alert state file being written by [`Checkpoints::create_state`]: in
/// place on a local lake, else a local temporary file uploaded by
/// [`StateFile::finish`].
#[derive(Debug)]
pub struct StateFile {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    /// Where it goes on an object store (a lake on S3).
    upload: Option<(Arc<dyn ObjectStore>, ObjectPath)>,
    /// Bytes written so far.
    written: u64,
}

impl StateFile {
    /// Flushes and fsyncs the file (and uploads it, for a lake on S3); the manifest may
    /// name it once this returns. Its size in bytes.
    pub async fn finish(self) -> Result<u64> {
        let (path, written) = (self.path, self.written);
        self.file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(io_error(&path))?;
        let Some((store, target)) = self.upload else {
            return Ok(written);
        };
        // A multipart upload from the file: state can be large, memory holds a part.
        let uploaded = async {
            let mut file = tokio::fs::File::open(&path)
                .await
                .map_err(io_error(&path))?;
            let mut out = object_store::buffered::BufWriter::new(store, target.clone());
            tokio::io::copy(&mut file, &mut out)
                .await
                .map_err(io_error(&path))?;
            tokio::io::AsyncWriteExt::shutdown(&mut out)
                .await
                .map_err(io_error(&path))
        }
        .await;
        let _ = std::fs::remove_file(&path);
        uploaded.map(|()| written)
    }
}

impl Write for StateFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// One checkpoint of the whole pipeline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Increasing checkpoint number.
    pub id: u64,
    /// When it was written (epoch ms).
    pub created_ms: i64,
    /// Data files this checkpoint adds, by table (paths relative to the table).
    #[serde(default)]
    pub tables: BTreeMap<String, Vec<DataFile>>,
    /// A manifest of a lake written before Delta tables: files it moved out of
    /// `_staging`, relative to the lake root (read for the conversion only).
    #[serde(default, rename = "files", skip_serializing)]
    pub legacy_files: Vec<String>,
    /// Window name → its state snapshot (Arrow IPC), relative to the lake root.
    pub state: BTreeMap<String, String>,
    /// Source name → partition → last offset covered. Cumulative: every position
    /// known so far, not just those that moved.
    pub positions: BTreeMap<String, BTreeMap<String, String>>,
    /// Source name → partition → the fencing epoch under which this node read the
    /// records of that partition this checkpoint adds (a node of a cluster; see
    /// `DeltaTables::seal`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epochs: BTreeMap<String, BTreeMap<String, u64>>,
    /// Window state kept per source partition (a node of a cluster):
    /// `<source>/<partition>` → the epoch and position of the state `state` holds for
    /// it (as `<window>@<source>/<partition>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, PartitionState>,
    /// Source name → its [`SourcePositions::origins`] (the source of a repartitioned
    /// stream), cumulative like `positions`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub origins: BTreeMap<String, Origins>,
}

/// Partition → origin → the last sequence number handed on.
pub type Origins = BTreeMap<String, BTreeMap<String, sluice_core::Seq>>;

impl Manifest {
    /// The (fence app id, epoch) of every partition in `epochs`.
    fn fences(&self) -> Vec<(String, u64)> {
        self.epochs
            .iter()
            .flat_map(|(source, partitions)| {
                partitions
                    .iter()
                    .map(|(p, &epoch)| (crate::delta::fence_app_id(source, p), epoch))
            })
            .collect()
    }

    /// The recorded positions of `source` (empty if it has none).
    pub fn positions_of(&self, source: &str) -> SourcePositions {
        SourcePositions {
            source: source.to_owned(),
            offsets: self.positions.get(source).cloned().unwrap_or_default(),
            origins: self.origins.get(source).cloned().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// The checkpoint directories of one lake.
#[derive(Debug)]
pub struct Checkpoints {
    location: LakeLocation,
    namespace: Namespace,
    next_id: u64,
    /// Manifests written but not yet in every table's log; committed first next time.
    unrolled: Vec<Manifest>,
}

impl Checkpoints {
    /// Finishes what a crash interrupted and returns the newest manifest, if any.
    /// `tables` must write the markers of `namespace` (`DeltaTables::with_app_id`).
    pub async fn recover(
        location: &LakeLocation,
        namespace: &Namespace,
        tables: &mut DeltaTables,
    ) -> Result<(Self, Option<Manifest>)> {
        let mut manifests = read_manifests(location, namespace).await?;
        // Only a single node's lake can be in the layout before Delta tables.
        if let Some(root) = location.local_dir().filter(|_| namespace.node.is_none()) {
            crate::convert::convert_legacy(root, &manifests, tables).await?;
        }
        let mut this = Self {
            location: location.clone(),
            namespace: namespace.clone(),
            next_id: manifests.last().map_or(1, |m| m.id + 1),
            unrolled: Vec::new(),
        };
        if namespace.node.is_some() {
            this.seal_or_drop(&mut manifests, tables).await?;
        }
        complete_all(&manifests, tables, false).await?;
        // Checkpoint ids must keep increasing past every table's marker, or a table
        // would skip new checkpoints as done (manifests deleted by hand, say).
        for table in location.tables().await? {
            if let Some(done) = tables.checkpoint_of(&table).await? {
                this.next_id = this.next_id.max(done + 1);
            }
        }
        if namespace.node.is_some() {
            let sealed = tables.sealed(&namespace.app_id()).await?;
            this.next_id = this.next_id.max(sealed + 1);
        }
        let newest = manifests.into_iter().next_back();
        this.remove_state_except(newest.as_ref()).await?;
        Ok((this, newest))
    }

    /// A node of a cluster at start: seals its unsealed manifests in order. The first
    /// one refused as fenced (another node took over a partition it holds records of
    /// while this node was away) is deleted with every later one (their positions
    /// include its records), so the node resumes from the newest sealed checkpoint.
    async fn seal_or_drop(
        &self,
        manifests: &mut Vec<Manifest>,
        tables: &mut DeltaTables,
    ) -> Result<()> {
        for (i, m) in manifests.iter().enumerate() {
            match tables.seal(m.id, &m.fences()).await {
                Ok(()) => {}
                Err(Error::Fenced { app, ours, newer }) => {
                    let dropped: Vec<u64> = manifests[i..].iter().map(|m| m.id).collect();
                    tracing::warn!(
                        ?dropped,
                        fence = %app,
                        ours,
                        newer,
                        "checkpoints of this node were fenced while it was away; dropping them (another node read their records)"
                    );
                    for id in &dropped {
                        let path = self.manifest_path(*id);
                        self.location
                            .store()
                            .delete(&path)
                            .await
                            .map_err(store_error(&path))?;
                    }
                    manifests.truncate(i);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn manifest_path(&self, id: u64) -> ObjectPath {
        ObjectPath::from(format!(
            "{}/{id:020}.json",
            self.namespace.dir(MANIFEST_DIR)
        ))
    }

    /// The id the next checkpoint will have.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Creates the state file of `window` for checkpoint `id`: the snapshot is written
    /// into it as it is made (no copy of the state in memory), and
    /// [`StateFile::finish`] makes it durable. Returns its path relative to the lake
    /// root, for the manifest.
    pub fn create_state(&self, id: u64, window: &str) -> Result<(String, StateFile)> {
        let relative = format!("{}/{id:020}/{window}.arrow", self.namespace.dir(STATE_DIR));
        let (path, upload) = match self.location.local_dir() {
            Some(root) => (root.join(&relative), None),
            None => (
                std::env::temp_dir().join(format!(
                    "sluice-state-{}.arrow",
                    uuid::Uuid::now_v7().simple()
                )),
                Some((
                    self.location.store().clone(),
                    ObjectPath::from(relative.as_str()),
                )),
            ),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        let file = std::fs::File::create(&path).map_err(io_error(&path))?;
        Ok((
            relative,
            StateFile {
                file: std::io::BufWriter::new(file),
                path,
                upload,
                written: 0,
            },
        ))
    }

    /// Opens a state file named by a manifest, to be read as it is restored. For a
    /// lake on S3 the object is first copied, as it arrives, into a temporary file:
    /// the state of a million keys is hundreds of megabytes, which whole in memory
    /// would add that much to the start's peak.
    pub async fn open_state(&self, relative: &str) -> Result<Box<dyn std::io::Read + Send>> {
        let file = match self.location.local_dir() {
            Some(root) => {
                let path = root.join(relative);
                std::fs::File::open(&path).map_err(io_error(&path))?
            }
            None => download(&self.location, relative).await?,
        };
        Ok(Box::new(std::io::BufReader::new(file)))
    }

    /// Puts `bytes` at `path`, durably: a local lake fsyncs the file and its directory
    /// (the store's put renames a complete temporary file into place).
    async fn put_durable(&self, path: &ObjectPath, bytes: Vec<u8>) -> Result<()> {
        self.location
            .store()
            .put(path, PutPayload::from(bytes))
            .await
            .map_err(store_error(path))?;
        if let Some(root) = self.location.local_dir() {
            let file = root.join(path.as_ref());
            std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(io_error(&file))?;
            if let Some(dir) = file.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io_error(dir))?;
            }
        }
        Ok(())
    }

    /// Makes `manifest` durable: steps 2 of the module docs. From here on the manifest
    /// owns its files (a later checkpoint must not name them again); the next
    /// [`Checkpoints::complete`] commits them. Its `id` must be
    /// [`Checkpoints::next_id`], and every table it names must exist
    /// ([`DeltaTables::ensure`]).
    pub async fn write(&mut self, manifest: Manifest) -> Result<()> {
        // On S3 a put is durable when it returns; a local file needs its fsync.
        if let Some(root) = self.location.local_dir() {
            for (table, files) in &manifest.tables {
                for file in files {
                    let path = root.join(table).join(&file.path);
                    std::fs::File::open(&path)
                        .and_then(|f| f.sync_all())
                        .map_err(io_error(&path))?;
                }
            }
        }
        let path = self.manifest_path(manifest.id);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Io {
            path: path.to_string(),
            source: std::io::Error::other(e),
        })?;
        self.put_durable(&path, json).await?;
        self.next_id = manifest.id + 1;
        self.unrolled.push(manifest);
        Ok(())
    }

    /// Commits every written manifest not yet in its tables' logs, oldest first (step
    /// 3; a node of a cluster seals it first), then prunes old manifests and state. An
    /// error leaves the rest for the next call; sources must not be acknowledged until
    /// a call succeeds. [`Error::Fenced`] is final: the node must stop.
    pub async fn complete(&mut self, tables: &mut DeltaTables) -> Result<()> {
        let mut newest = None;
        while let Some(m) = self.unrolled.first() {
            complete(m, tables, self.namespace.node.is_some()).await?;
            newest = Some(self.unrolled.remove(0));
        }
        match newest {
            Some(m) => self.prune(&m).await,
            None => Ok(()),
        }
    }

    /// Writes `manifest` and commits it ([`Checkpoints::write`], then
    /// [`Checkpoints::complete`]).
    pub async fn commit(&mut self, manifest: Manifest, tables: &mut DeltaTables) -> Result<()> {
        self.complete(tables).await?;
        self.write(manifest).await?;
        self.complete(tables).await
    }

    /// Deletes manifests older than the newest [`KEEP`] and every state directory that
    /// `newest` does not use.
    async fn prune(&self, newest: &Manifest) -> Result<()> {
        let mut names = manifest_paths(&self.location, &self.namespace).await?;
        names.sort();
        let excess = names.len().saturating_sub(KEEP);
        for path in names.into_iter().take(excess) {
            self.location
                .store()
                .delete(&path)
                .await
                .map_err(store_error(&path))?;
        }
        self.remove_state_except(Some(newest)).await
    }

    async fn remove_state_except(&self, keep: Option<&Manifest>) -> Result<()> {
        let keep = keep.map(|m| format!("{:020}", m.id));
        let store = self.location.store();
        let dir = ObjectPath::from(self.namespace.dir(STATE_DIR));
        let listed = match store.list_with_delimiter(Some(&dir)).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(store_error(&dir)(e)),
        };
        for state in listed.common_prefixes {
            if state.filename() == keep.as_deref() {
                continue;
            }
            if let Some(root) = self.location.local_dir() {
                // The local store leaves empty directories behind: remove the tree.
                let path = root.join(state.as_ref());
                std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
                continue;
            }
            let files: Vec<_> = store
                .list(Some(&state))
                .map_ok(|m| m.location)
                .try_collect()
                .await
                .map_err(store_error(&state))?;
            for file in files {
                store.delete(&file).await.map_err(store_error(&file))?;
            }
        }
        Ok(())
    }
}

/// The other nodes of a cluster sharing the lake at `location`, seen from the node
/// of `own`: completes every checkpoint each of them wrote (one that was killed may
/// have stopped between its manifest and its tables' commits) and returns each one's
/// newest manifest. A node taking over partitions starts them after the furthest
/// position any of these covers, so nothing another node committed is read again.
///
/// Completing a checkpoint of a node that is still running is safe: both commits
/// carry that node's marker, and the later one is skipped or refused as concurrent
/// (see `DeltaTables::append`). Window and alert state is not read here.
///
/// `tables` keeps each node's `DeltaTables` (by node id) from one call to the next, so
/// that later calls read only the commits since.
pub async fn settle_peers(
    location: &LakeLocation,
    own: &Namespace,
    tables: &mut HashMap<String, DeltaTables>,
) -> Result<Vec<Manifest>> {
    let mut newest = Vec::new();
    for id in node_ids(location).await? {
        if own.node.as_deref() == Some(id.as_str()) {
            continue;
        }
        let namespace = Namespace::node(&id);
        let tables = tables
            .entry(id.clone())
            .or_insert_with(|| DeltaTables::at(location).with_app_id(namespace.app_id()));
        // Only sealed checkpoints count: one written but not sealed is either sealed
        // later by its node (then it holds no partition fenced since) or never.
        let sealed = tables.sealed(&namespace.app_id()).await?;
        let mut manifests = read_manifests(location, &namespace).await?;
        manifests.retain(|m| m.id <= sealed);
        complete_all(&manifests, tables, false).await?;
        newest.extend(manifests.into_iter().next_back());
    }
    Ok(newest)
}

/// The state file at `relative` (a manifest's `state` entry, any node's) in the lake
/// at `location`, whole. A state file that is gone (its node wrote a newer checkpoint
/// since and pruned it) fails with [`Error::Store`] and `NotFound`.
pub async fn read_state(location: &LakeLocation, relative: &str) -> Result<bytes::Bytes> {
    let path = ObjectPath::from(relative);
    async { location.store().get(&path).await?.bytes().await }
        .await
        .map_err(store_error(&path))
}

/// The object at `relative` in the lake at `location`, streamed into a temporary file
/// that is unlinked at once (it is read through the open handle, and nothing is left
/// behind if the process dies), rewound.
async fn download(location: &LakeLocation, relative: &str) -> Result<std::fs::File> {
    let path = ObjectPath::from(relative);
    let mut chunks = location
        .store()
        .get(&path)
        .await
        .map_err(store_error(&path))?
        .into_stream();
    let temporary = std::env::temp_dir().join(format!(
        "sluice-restore-{}.arrow",
        uuid::Uuid::now_v7().simple()
    ));
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&temporary)
        .map_err(io_error(&temporary))?;
    // Unlinked before anything can fail.
    std::fs::remove_file(&temporary).map_err(io_error(&temporary))?;
    while let Some(chunk) = chunks.try_next().await.map_err(store_error(&path))? {
        file.write_all(&chunk).map_err(io_error(&temporary))?;
    }
    std::io::Seek::rewind(&mut file).map_err(io_error(&temporary))?;
    Ok(file)
}

/// The ids of the cluster nodes that left anything under `_nodes/` in the lake.
pub(crate) async fn node_ids(location: &LakeLocation) -> Result<Vec<String>> {
    let dir = ObjectPath::from(NODES_DIR);
    match location.store().list_with_delimiter(Some(&dir)).await {
        Ok(listed) => Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect()),
        Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
        Err(e) => Err(store_error(&dir)(e)),
    }
}

/// Completes `manifests` (oldest first), sealed already.
async fn complete_all(manifests: &[Manifest], tables: &mut DeltaTables, seal: bool) -> Result<()> {
    for m in manifests {
        complete(m, tables, seal).await?;
    }
    Ok(())
}

/// Seals `manifest` first if `seal` (see `DeltaTables::seal`), then appends each
/// table's files with its marker; tables that already hold it (or a later checkpoint)
/// are skipped.
async fn complete(manifest: &Manifest, tables: &mut DeltaTables, seal: bool) -> Result<()> {
    if seal {
        tables.seal(manifest.id, &manifest.fences()).await?;
    }
    for (table, files) in &manifest.tables {
        if !files.is_empty() && tables.append(table, files, Some(manifest.id)).await? {
            tracing::debug!(
                table,
                checkpoint = manifest.id,
                "checkpoint committed to table"
            );
        }
    }
    Ok(())
}

/// The paths of every `_manifests/*.json` of `namespace`.
async fn manifest_paths(location: &LakeLocation, namespace: &Namespace) -> Result<Vec<ObjectPath>> {
    let dir = ObjectPath::from(namespace.dir(MANIFEST_DIR));
    let listed = match location.store().list_with_delimiter(Some(&dir)).await {
        Ok(l) => l,
        Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(store_error(&dir)(e)),
    };
    Ok(listed
        .objects
        .into_iter()
        .map(|m| m.location)
        .filter(|p| p.filename().is_some_and(|n| n.ends_with(".json")))
        .collect())
}

/// Every readable manifest, oldest first. A manifest that does not parse cannot be a
/// committed one (they are put whole), so it is skipped with a warning.
async fn read_manifests(location: &LakeLocation, namespace: &Namespace) -> Result<Vec<Manifest>> {
    let mut manifests = Vec::new();
    for path in manifest_paths(location, namespace).await? {
        let bytes = async { location.store().get(&path).await?.bytes().await }
            .await
            .map_err(store_error(&path))?;
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(m) => manifests.push(m),
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "ignoring an unreadable manifest")
            }
        }
    }
    manifests.sort_by_key(|m| m.id);
    Ok(manifests)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::parquet::Written;

    fn at(root: &Path) -> LakeLocation {
        LakeLocation::local(root).expect("location")
    }

    /// The tables and checkpoints of the lake at `root`, recovered as at a start.
    async fn start(root: &Path) -> (DeltaTables, Checkpoints, Option<Manifest>) {
        let mut tables = DeltaTables::local(root).expect("tables");
        let (ckpt, newest) = Checkpoints::recover(&at(root), &Namespace::default(), &mut tables)
            .await
            .expect("recover");
        (tables, ckpt, newest)
    }

    async fn store(root: &Path, table: &str, rows: i64) -> Written {
        crate::test_support::store(root, table, &(0..rows).collect::<Vec<_>>()).await
    }

    async fn committed(tables: &mut DeltaTables, table: &str) -> (u64, u64) {
        crate::test_support::committed(tables, table).await
    }

    fn manifest(id: u64, files: &[(&str, &Written)]) -> Manifest {
        Manifest {
            id,
            tables: files
                .iter()
                .map(|(t, w)| ((*t).to_owned(), w.files.clone()))
                .collect(),
            positions: BTreeMap::from([(
                "k".into(),
                BTreeMap::from([("topic/0".into(), id.to_string())]),
            )]),
            ..Manifest::default()
        }
    }

    #[tokio::test]
    async fn a_checkpoint_commits_each_table_once_with_its_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (mut tables, mut ckpt, newest) = start(root).await;
        assert!(newest.is_none());
        let a = store(root, "a", 3).await;
        tables.ensure("a", &a.schema).await.expect("ensure");
        let (state, mut file) = ckpt.create_state(1, "w").expect("state");
        file.write_all(b"state").expect("write");
        assert_eq!(file.finish().await.expect("finish"), 5, "its size");
        let mut m = manifest(ckpt.next_id(), &[("a", &a)]);
        m.state.insert("w".into(), state.clone());
        ckpt.commit(m.clone(), &mut tables).await.expect("commit");
        assert_eq!(committed(&mut tables, "a").await.0, 3);
        assert_eq!(tables.checkpoint_of("a").await.expect("txn"), Some(1));
        // A file stored after the checkpoint is in no manifest: a restart never sees it.
        let _late = store(root, "a", 5).await;
        let (mut tables, ckpt, newest) = start(root).await;
        assert_eq!(newest.as_ref().map(|m| m.id), Some(1));
        assert_eq!(committed(&mut tables, "a").await.0, 3);
        let mut read = Vec::new();
        std::io::Read::read_to_end(
            &mut ckpt.open_state(&state).await.expect("state"),
            &mut read,
        )
        .expect("read");
        assert_eq!(read, b"state");
        assert_eq!(ckpt.next_id(), 2);
        assert_eq!(
            m.positions_of("k").offsets["topic/0"],
            "1",
            "positions are kept per source and partition"
        );
    }

    #[tokio::test]
    async fn recover_completes_a_checkpoint_a_crash_interrupted_and_repeats_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (mut tables, mut ckpt, _) = start(root).await;
        let (a, b) = (store(root, "a", 2).await, store(root, "b", 4).await);
        tables.ensure("a", &a.schema).await.expect("ensure");
        tables.ensure("b", &b.schema).await.expect("ensure");
        // The manifest is durable and table a got its commit; then the process died.
        let m = manifest(ckpt.next_id(), &[("a", &a), ("b", &b)]);
        ckpt.write(m.clone()).await.expect("write");
        assert!(
            tables
                .append("a", &a.files, Some(m.id))
                .await
                .expect("append")
        );
        let before_a = committed(&mut tables, "a").await;
        // And a torn temp manifest, which must be ignored.
        std::fs::write(root.join(MANIFEST_DIR).join("x.json.tmp"), b"{").expect("write");
        let (mut tables, ckpt, newest) = start(root).await;
        assert_eq!(newest.map(|m| m.id), Some(1));
        assert_eq!(ckpt.next_id(), 2);
        assert_eq!(
            committed(&mut tables, "a").await,
            before_a,
            "a is not repeated"
        );
        assert_eq!(committed(&mut tables, "b").await.0, 4, "b is completed");
        // Appending a checkpoint the table already holds is a no-op.
        assert!(!tables.append("b", &b.files, Some(1)).await.expect("append"));
        assert_eq!(committed(&mut tables, "b").await.0, 4);
    }

    #[tokio::test]
    async fn checkpoint_ids_stay_past_every_tables_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        let a = store(root, "a", 1).await;
        tables.ensure("a", &a.schema).await.expect("ensure");
        tables
            .append("a", &a.files, Some(41))
            .await
            .expect("append");
        // No manifests (deleted by hand): the next id must still be past 41.
        let (ckpt, newest) = Checkpoints::recover(&at(root), &Namespace::default(), &mut tables)
            .await
            .expect("recover");
        assert!(newest.is_none());
        assert_eq!(ckpt.next_id(), 42);
    }

    #[tokio::test]
    async fn only_the_newest_manifests_and_state_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (mut tables, mut ckpt, _) = start(root).await;
        for _ in 0..5 {
            let id = ckpt.next_id();
            let (state, file) = ckpt.create_state(id, "w").expect("state");
            file.finish().await.expect("finish");
            ckpt.commit(
                Manifest {
                    id,
                    state: BTreeMap::from([("w".into(), state)]),
                    ..Manifest::default()
                },
                &mut tables,
            )
            .await
            .expect("commit");
        }
        assert_eq!(
            manifest_paths(&at(root), &Namespace::default())
                .await
                .expect("names")
                .len(),
            KEEP
        );
        let states: Vec<_> = std::fs::read_dir(root.join(STATE_DIR))
            .expect("state dir")
            .flatten()
            .collect();
        assert_eq!(states.len(), 1, "only the newest checkpoint's state stays");
    }

    #[tokio::test]
    async fn a_lake_of_the_old_layout_is_converted_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // Old layout: one committed file at its final path, one named by the newest
        // manifest but still staged (crash before its rename), one staged that no
        // manifest names (must not appear).
        let committed_file = store(root, "t", 2).await;
        let staged = store(root, "t", 3).await;
        let stray = store(root, "t", 7).await;
        for (w, target) in [
            (&staged, "t/date=1970-01-01/hour=00/part-staged.parquet"),
            (&stray, "t/date=1970-01-01/hour=00/part-stray.parquet"),
        ] {
            let from = root.join("t").join(&w.files[0].path);
            let to = root.join(LEGACY_STAGING_DIR).join(target);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::rename(from, to).expect("stage");
        }
        assert!(root.join("t").join(&committed_file.files[0].path).exists());
        std::fs::create_dir_all(root.join(MANIFEST_DIR)).expect("mkdir");
        let legacy = serde_json::json!({
            "id": 9, "created_ms": 0,
            "files": ["t/date=1970-01-01/hour=00/part-staged.parquet"],
            "state": {}, "positions": {"k": {"topic/0": "99"}},
        });
        std::fs::write(
            root.join(MANIFEST_DIR).join(format!("{:020}.json", 9)),
            legacy.to_string(),
        )
        .expect("write");
        let (mut tables, ckpt, newest) = start(root).await;
        let newest = newest.expect("the legacy manifest");
        assert_eq!(newest.positions_of("k").offsets["topic/0"], "99");
        assert_eq!(
            committed(&mut tables, "t").await.0,
            5,
            "2 committed + 3 staged, not the stray 7"
        );
        assert_eq!(tables.checkpoint_of("t").await.expect("txn"), Some(9));
        assert_eq!(ckpt.next_id(), 10);
        assert!(!root.join(LEGACY_STAGING_DIR).exists());
        // A second start converts nothing again.
        let mut tables = DeltaTables::local(root).expect("tables");
        Checkpoints::recover(&at(root), &Namespace::default(), &mut tables)
            .await
            .expect("recover");
        assert_eq!(committed(&mut tables, "t").await.0, 5);
    }

    #[tokio::test]
    async fn a_takeover_completes_sealed_checkpoints_and_fences_the_rest_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let node = |id: &str| {
            let namespace = Namespace::node(id);
            let tables = DeltaTables::local(root)
                .expect("tables")
                .with_app_id(namespace.app_id());
            (namespace, tables)
        };
        let fence = [crate::delta::fence_app_id("k", "topic/0")];
        let held = |m: Manifest, epoch: u64| Manifest {
            epochs: BTreeMap::from([("k".into(), BTreeMap::from([("topic/0".into(), epoch)]))]),
            ..m
        };
        let (ns_a, mut tables_a) = node("a");
        let (mut ckpt_a, _) = Checkpoints::recover(&at(root), &ns_a, &mut tables_a)
            .await
            .expect("recover");
        assert_eq!(tables_a.fence(&fence).await.expect("fence"), [1]);
        let (one, two, three) = (
            store(root, "t", 2).await,
            store(root, "t", 3).await,
            store(root, "t", 4).await,
        );
        tables_a.ensure("t", &one.schema).await.expect("ensure");
        let m1 = held(manifest(ckpt_a.next_id(), &[("t", &one)]), 1);
        ckpt_a.commit(m1, &mut tables_a).await.expect("commit");
        // Checkpoint 2 is sealed, and a is killed before its table commit; checkpoint
        // 3 is durable but never sealed (a is cut off from then on).
        let m2 = held(manifest(ckpt_a.next_id(), &[("t", &two)]), 1);
        tables_a.seal(2, &m2.fences()).await.expect("seal");
        ckpt_a.write(m2).await.expect("write");
        let m3 = held(manifest(3, &[("t", &three)]), 1);
        ckpt_a.write(m3).await.expect("write");
        assert_eq!(committed(&mut tables_a, "t").await.0, 2);

        // Node b takes topic/0 over: it fences it, then a's sealed checkpoint lands
        // and b starts after its positions; the unsealed one is not a's position.
        let (_, mut tables_b) = node("b");
        assert_eq!(tables_b.fence(&fence).await.expect("fence"), [2]);
        let peers = settle_peers(&at(root), &Namespace::node("b"), &mut HashMap::new())
            .await
            .expect("settle");
        assert_eq!(peers.len(), 1, "node b sees node a only");
        assert_eq!(peers[0].positions_of("k").offsets["topic/0"], "2");
        let mut reader = DeltaTables::local(root).expect("tables");
        assert_eq!(committed(&mut reader, "t").await.0, 5);

        // a's process, back from its pause, cannot commit checkpoint 3: fenced.
        match ckpt_a.complete(&mut tables_a).await {
            Err(Error::Fenced { ours, newer, .. }) => assert_eq!((ours, newer), (1, 2)),
            other => panic!("expected fenced, got {other:?}"),
        }
        // Restarted, a drops checkpoint 3 and resumes from 2; nothing lands twice.
        let (_, mut tables_a) = node("a");
        let (ckpt_a, newest) = Checkpoints::recover(&at(root), &ns_a, &mut tables_a)
            .await
            .expect("recover");
        assert_eq!(newest.map(|m| m.id), Some(2));
        assert_eq!(ckpt_a.next_id(), 4, "the dropped id is not used again");
        assert_eq!(committed(&mut reader, "t").await.0, 5);
        assert!(
            settle_peers(&at(root), &ns_a, &mut HashMap::new())
                .await
                .expect("settle")
                .is_empty(),
            "b never checkpointed"
        );
    }

    #[tokio::test]
    async fn nodes_settling_each_other_while_both_commit_repeat_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut nodes = Vec::new();
        for id in ["a", "b"] {
            let namespace = Namespace::node(id);
            let mut tables = DeltaTables::local(root)
                .expect("tables")
                .with_app_id(namespace.app_id());
            let (ckpt, _) = Checkpoints::recover(&at(root), &namespace, &mut tables)
                .await
                .expect("recover");
            nodes.push((namespace, tables, ckpt));
        }
        let mut peers = HashMap::new();
        let mut rows = 0;
        for round in 0..6 {
            for (namespace, tables, ckpt) in nodes.iter_mut() {
                let w = store(root, "t", 2).await;
                rows += 2;
                tables.ensure("t", &w.schema).await.expect("ensure");
                let m = manifest(ckpt.next_id(), &[("t", &w)]);
                if round % 2 == 0 {
                    ckpt.commit(m, tables).await.expect("commit");
                } else {
                    // Durable, not yet committed: the other node settles it first.
                    ckpt.write(m).await.expect("write");
                }
                settle_peers(&at(root), namespace, &mut peers)
                    .await
                    .expect("settle");
            }
            for (_, tables, ckpt) in nodes.iter_mut() {
                ckpt.complete(tables).await.expect("complete");
            }
            let mut reader = DeltaTables::local(root).expect("tables");
            assert_eq!(committed(&mut reader, "t").await.0, rows, "round {round}");
        }
    }
}
