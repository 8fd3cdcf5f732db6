//! Checkpoints: one atomic manifest per checkpoint for the whole pipeline.
//!
//! Between checkpoints the lake rolls files into `<lake>/_staging/<final path>`, where
//! readers never look. A checkpoint ([`Checkpoints::commit`]) then, in order:
//! 1. fsyncs the staged files and the window state written under `_state/<id>/`;
//! 2. writes `_manifests/<id>.json` (temp file, fsync, rename, fsync of the directory):
//!    the staged files' final paths, the state files, and every source position the
//!    staged rows cover;
//! 3. renames each staged file to its final path (idempotent: a file already moved is
//!    skipped).
//!
//! Only after `commit` returns may sources be acknowledged (Kafka offsets committed).
//!
//! [`Checkpoints::recover`] at start: redo step 3 for the newest manifests, delete
//! everything left in `_staging` (rows of an interval no manifest covers: the sources
//! will deliver them again from the recorded positions), and hand back the newest
//! manifest so the caller restores window state and source positions from it. So a
//! replayed interval can never duplicate committed rows: its first attempt never left
//! `_staging`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_core::SourcePositions;

use crate::{Error, Result};

/// Where staged files wait for their checkpoint, relative to the lake root.
pub const STAGING_DIR: &str = "_staging";
const MANIFEST_DIR: &str = "_manifests";
const STATE_DIR: &str = "_state";
/// Manifests kept; older ones (and their state) are deleted.
const KEEP: usize = 3;

/// A window or alert state file being written by [`Checkpoints::create_state`].
#[derive(Debug)]
pub struct StateFile {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl StateFile {
    /// Flushes and fsyncs the file; the manifest may name it once this returns.
    pub fn finish(self) -> Result<()> {
        let path = self.path;
        self.file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(io_error(&path))
    }
}

impl Write for StateFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
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
    /// Data files this checkpoint committed, relative to the lake root.
    pub files: Vec<String>,
    /// Window name → its state snapshot (Arrow IPC), relative to the lake root.
    pub state: BTreeMap<String, String>,
    /// Source name → partition → last offset covered. Cumulative: every position
    /// known so far, not just those that moved.
    pub positions: BTreeMap<String, BTreeMap<String, String>>,
}

impl Manifest {
    /// The recorded positions of `source` (empty if it has none).
    pub fn positions_of(&self, source: &str) -> SourcePositions {
        SourcePositions {
            source: source.to_owned(),
            offsets: self.positions.get(source).cloned().unwrap_or_default(),
            log_series: false,
        }
    }
}

/// The checkpoint directories of one lake.
#[derive(Debug)]
pub struct Checkpoints {
    root: PathBuf,
    next_id: u64,
    /// Manifests whose renames failed (disk trouble); retried before the next commit.
    unrolled: Vec<Manifest>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Checkpoints {
    /// Finishes what a crash interrupted and returns the newest manifest, if any.
    pub fn recover(root: &Path) -> Result<(Self, Option<Manifest>)> {
        let manifests = read_manifests(root)?;
        let this = Self {
            root: root.to_path_buf(),
            next_id: manifests.last().map_or(1, |m| m.id + 1),
            unrolled: Vec::new(),
        };
        for m in &manifests {
            this.roll_forward(m)?;
        }
        let staging = root.join(STAGING_DIR);
        match std::fs::remove_dir_all(&staging) {
            Ok(()) => {
                tracing::info!(dir = %staging.display(), "deleted staged files no checkpoint covers")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&staging)(e)),
        }
        let newest = manifests.into_iter().next_back();
        this.remove_state_except(newest.as_ref())?;
        Ok((this, newest))
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
        let relative = format!("{STATE_DIR}/{id:020}/{window}.arrow");
        let path = self.root.join(&relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        let file = std::fs::File::create(&path).map_err(io_error(&path))?;
        Ok((
            relative,
            StateFile {
                file: std::io::BufWriter::new(file),
                path,
            },
        ))
    }

    /// Opens a state file named by a manifest, to be read as it is restored.
    pub fn open_state(&self, relative: &str) -> Result<std::io::BufReader<std::fs::File>> {
        let path = self.root.join(relative);
        std::fs::File::open(&path)
            .map(std::io::BufReader::new)
            .map_err(io_error(&path))
    }

    /// Makes `manifest` the newest checkpoint (see the module docs for the steps). Its
    /// `id` must be [`Checkpoints::next_id`].
    pub fn commit(&mut self, manifest: Manifest) -> Result<()> {
        for m in std::mem::take(&mut self.unrolled) {
            if let Err(e) = self.roll_forward(&m) {
                self.unrolled.push(m);
                return Err(e);
            }
        }
        for file in &manifest.files {
            let path = self.root.join(STAGING_DIR).join(file);
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_error(&path))?;
        }
        let dir = self.root.join(MANIFEST_DIR);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let name = format!("{:020}.json", manifest.id);
        let path = dir.join(&name);
        let tmp = dir.join(format!("{name}.tmp"));
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&json)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::File::open(&dir)?.sync_all())
            .map_err(io_error(&path))?;
        self.next_id = manifest.id + 1;
        if let Err(e) = self.roll_forward(&manifest) {
            self.unrolled.push(manifest);
            return Err(e);
        }
        self.prune(&manifest)?;
        Ok(())
    }

    /// Moves the manifest's staged files to their final paths; skips those already moved.
    fn roll_forward(&self, manifest: &Manifest) -> Result<()> {
        for file in &manifest.files {
            let staged = self.root.join(STAGING_DIR).join(file);
            let fin = self.root.join(file);
            if !staged.exists() {
                continue;
            }
            if let Some(dir) = fin.parent() {
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            }
            std::fs::rename(&staged, &fin).map_err(io_error(&fin))?;
        }
        Ok(())
    }

    /// Deletes manifests older than the newest [`KEEP`] and every state directory that
    /// `newest` does not use.
    fn prune(&self, newest: &Manifest) -> Result<()> {
        let dir = self.root.join(MANIFEST_DIR);
        let mut names = manifest_names(&dir)?;
        names.sort();
        let excess = names.len().saturating_sub(KEEP);
        for name in names.into_iter().take(excess) {
            let path = dir.join(name);
            std::fs::remove_file(&path).map_err(io_error(&path))?;
        }
        self.remove_state_except(Some(newest))
    }

    fn remove_state_except(&self, keep: Option<&Manifest>) -> Result<()> {
        let dir = self.root.join(STATE_DIR);
        let keep = keep.map(|m| format!("{:020}", m.id));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if Some(name.to_string_lossy().as_ref()) != keep.as_deref() {
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(io_error(&path))?;
            }
        }
        Ok(())
    }
}

fn manifest_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir)(e)),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".json"))
        .collect())
}

/// Every readable manifest, oldest first. A manifest that does not parse cannot be a
/// committed one (they are renamed into place whole), so it is skipped with a warning.
fn read_manifests(root: &Path) -> Result<Vec<Manifest>> {
    let dir = root.join(MANIFEST_DIR);
    let mut manifests = Vec::new();
    for name in manifest_names(&dir)? {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(m) => manifests.push(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable manifest")
            }
        }
    }
    manifests.sort_by_key(|m| m.id);
    Ok(manifests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(root: &Path, file: &str) {
        let path = root.join(STAGING_DIR).join(file);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, file).expect("write");
    }

    /// Window `w`'s state file for checkpoint `id`, holding `bytes`.
    fn write_state(ckpt: &Checkpoints, id: u64, bytes: &[u8]) -> String {
        let (path, mut file) = ckpt.create_state(id, "w").expect("create");
        file.write_all(bytes).expect("write");
        file.finish().expect("finish");
        path
    }

    #[test]
    fn commit_moves_staged_files_and_recover_drops_uncovered_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (mut ckpt, newest) = Checkpoints::recover(root).expect("recover");
        assert!(newest.is_none());
        stage(root, "t/date=2026-01-01/hour=00/part-a.parquet");
        let state = write_state(&ckpt, 1, b"state");
        let manifest = Manifest {
            id: ckpt.next_id(),
            created_ms: 1,
            files: vec!["t/date=2026-01-01/hour=00/part-a.parquet".into()],
            state: BTreeMap::from([("w".into(), state.clone())]),
            positions: BTreeMap::from([(
                "k".into(),
                BTreeMap::from([("topic/0".into(), "41".into())]),
            )]),
        };
        ckpt.commit(manifest.clone()).expect("commit");
        assert!(
            root.join("t/date=2026-01-01/hour=00/part-a.parquet")
                .exists()
        );
        // A file staged after the checkpoint is not covered: a crash drops it.
        stage(root, "t/date=2026-01-01/hour=00/part-b.parquet");
        let (ckpt, newest) = Checkpoints::recover(root).expect("recover");
        assert_eq!(newest.as_ref(), Some(&manifest));
        assert!(!root.join(STAGING_DIR).exists());
        assert!(
            !root
                .join("t/date=2026-01-01/hour=00/part-b.parquet")
                .exists()
        );
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut ckpt.open_state(&state).expect("state"), &mut read)
            .expect("read");
        assert_eq!(read, b"state");
        assert_eq!(ckpt.next_id(), 2);
        assert_eq!(
            manifest.positions_of("k").offsets["topic/0"],
            "41",
            "positions are kept per source and partition"
        );
    }

    #[test]
    fn recover_redoes_renames_a_crash_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // A manifest durable on disk whose files were never moved.
        stage(root, "t/x.parquet");
        let manifest = Manifest {
            id: 7,
            files: vec!["t/x.parquet".into()],
            ..Manifest::default()
        };
        std::fs::create_dir_all(root.join(MANIFEST_DIR)).expect("mkdir");
        std::fs::write(
            root.join(MANIFEST_DIR).join(format!("{:020}.json", 7)),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .expect("write");
        // And a torn temp file, which must be ignored.
        std::fs::write(root.join(MANIFEST_DIR).join("x.json.tmp"), b"{").expect("write");
        let (ckpt, newest) = Checkpoints::recover(root).expect("recover");
        assert_eq!(newest.map(|m| m.id), Some(7));
        assert_eq!(ckpt.next_id(), 8);
        assert!(root.join("t/x.parquet").exists());
    }

    #[test]
    fn only_the_newest_manifests_and_state_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (mut ckpt, _) = Checkpoints::recover(root).expect("recover");
        for _ in 0..5 {
            let id = ckpt.next_id();
            let state = write_state(&ckpt, id, b"s");
            ckpt.commit(Manifest {
                id,
                state: BTreeMap::from([("w".into(), state)]),
                ..Manifest::default()
            })
            .expect("commit");
        }
        assert_eq!(
            manifest_names(&root.join(MANIFEST_DIR))
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
}
