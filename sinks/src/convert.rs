//! Converting a lake written before Delta tables, in place.
//!
//! The old layout: `<table>/date=…/hour=…/part-….parquet` files that a checkpoint had
//! renamed out of `_staging/` were committed; whatever was still in `_staging/` was
//! not. Conversion finishes the renames the newest manifests name (as the old recovery
//! did), deletes `_staging/`, and makes each table directory that has no `_delta_log`
//! a Delta table whose first data commit adds every committed file, with statistics
//! from its footer and the newest manifest's id as the checkpoint marker. Nothing is
//! rewritten or moved, so nothing committed is lost or doubled; a crash during the
//! conversion is finished by the next start (a table's commit is one log entry).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parquet::file::metadata::ParquetMetaDataReader;

use crate::checkpoint::{LEGACY_STAGING_DIR, Manifest};
use crate::delta::DeltaTables;
use crate::parquet::{DataFile, delta_stats};
use crate::{Error, Result, io_error};

/// The table directories under a local lake `root` (names not starting with `_`),
/// with whether each has a Delta log.
fn table_dirs(root: &Path) -> Result<Vec<(String, bool)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(root)(e)),
    };
    let mut out: Vec<(String, bool)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| !n.starts_with('_') && !n.starts_with('.'))
        .map(|n| {
            let delta = root.join(&n).join("_delta_log").is_dir();
            (n, delta)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The Delta tables of a local lake.
pub fn local_tables(root: &Path) -> Result<Vec<String>> {
    Ok(table_dirs(root)?
        .into_iter()
        .filter_map(|(n, delta)| delta.then_some(n))
        .collect())
}

/// Converts what is left of the old layout under `root` (see the module docs).
pub async fn convert_legacy(
    root: &Path,
    manifests: &[Manifest],
    tables: &mut DeltaTables,
) -> Result<()> {
    let staging = root.join(LEGACY_STAGING_DIR);
    for m in manifests {
        for file in &m.legacy_files {
            let staged = staging.join(file);
            if !staged.exists() {
                continue;
            }
            let fin = root.join(file);
            if let Some(dir) = fin.parent() {
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            }
            std::fs::rename(&staged, &fin).map_err(io_error(&fin))?;
        }
    }
    match std::fs::remove_dir_all(&staging) {
        Ok(()) => {
            tracing::info!(dir = %staging.display(), "deleted staged files no checkpoint covers")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&staging)(e)),
    }
    let marker = manifests.last().map(|m| m.id);
    for (table, delta) in table_dirs(root)? {
        if delta {
            continue;
        }
        let dir = root.join(&table);
        let files = parquet_files(&dir)?;
        if files.is_empty() {
            continue;
        }
        let mut schema = None;
        let mut adds = Vec::with_capacity(files.len());
        for (relative, path) in &files {
            let (file, file_schema) = describe(&dir, relative, path)?;
            schema = Some(file_schema);
            adds.push(file);
        }
        let Some(schema) = schema else { continue };
        tables.ensure(&table, &schema).await?;
        tables.append(&table, &adds, marker).await?;
        let rows: u64 = adds.iter().map(|f| f.rows).sum();
        tracing::info!(
            table,
            files = adds.len(),
            rows,
            "converted a table of the old layout to Delta"
        );
    }
    Ok(())
}

/// How many Parquet files lie under `dir` (referenced or not).
pub fn parquet_count(dir: &Path) -> usize {
    parquet_files(dir).map_or(0, |f| f.len())
}

/// `date=…/hour=…/*.parquet` under a table directory: (path relative to it, full path),
/// oldest name first (v7 uuids sort by time).
fn parquet_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_error(&d))?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('_') {
                    dirs.push(path);
                }
            } else if name.ends_with(".parquet")
                && let Ok(relative) = path.strip_prefix(dir)
            {
                out.push((relative.to_string_lossy().into_owned(), path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A committed file of the old layout as a Delta `add`, and its Arrow schema.
fn describe(
    dir: &Path,
    relative: &str,
    path: &Path,
) -> Result<(DataFile, arrow::datatypes::SchemaRef)> {
    let bad = |e: parquet::errors::ParquetError| Error::Parquet {
        table: dir.display().to_string(),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let size = file.metadata().map_err(io_error(path))?.len();
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&file)
        .map_err(bad)?;
    let meta = metadata.file_metadata();
    let schema =
        parquet::arrow::parquet_to_arrow_schema(meta.schema_descr(), meta.key_value_metadata())
            .map_err(bad)?;
    let partitions: BTreeMap<&str, &str> = relative
        .split('/')
        .filter_map(|part| part.split_once('='))
        .collect();
    let value = |key: &str| {
        partitions
            .get(key)
            .map(|v| (*v).to_owned())
            .unwrap_or_default()
    };
    let modified_ms = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64);
    Ok((
        DataFile {
            path: relative.to_owned(),
            size,
            rows: u64::try_from(meta.num_rows()).unwrap_or(0),
            date: value("date"),
            hour: value("hour"),
            stats: delta_stats(&schema, &metadata),
            modified_ms,
        },
        std::sync::Arc::new(schema),
    ))
}
