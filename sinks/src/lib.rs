//! Where Sluice's batches end up, and how they are read back.
//!
//! # Layout
//! - [`parquet`]: the lake writer. One table per stream, hive-partitioned by event date
//!   and hour, zstd-compressed, rolled by size and time; files with Delta statistics.
//! - [`location`]: where the lake lives (a local directory or `s3://bucket/prefix`).
//! - [`delta`]: each table a Delta Lake table; appends with checkpoint markers, and
//!   compaction, retention and vacuum (`delta::maintain`).
//! - [`convert`]: turns a lake of the layout before Delta into Delta tables in place.
//! - [`checkpoint`]: manifests that commit stored files, window state and source
//!   positions together (exactly-once into the lake).
//! - [`cluster`]: what each node of a cluster reports of itself, through the lake.
//! - [`lease`]: leases on a source's shards, arbitrated by the lake's object store.
//! - [`query`]: read-only SQL over the lake with DataFusion, and the output formats.
//! - [`notify`]: alert notifiers (MQTT, webhook, Kafka) with retries and a breaker.
//! - [`retry`]: the backoff and circuit breaker every sink shares.
//!
//! One [`Error`] for the crate; [`Error::is_user_error`] tells a refused query from a
//! failure of ours.

#[cfg(feature = "delta")]
pub mod checkpoint;
#[cfg(feature = "delta")]
pub mod cluster;
#[cfg(feature = "delta")]
pub mod convert;
#[cfg(feature = "delta")]
pub mod delta;
#[cfg(feature = "delta")]
pub mod lease;
pub mod location;
pub mod notify;
pub mod parquet;
#[cfg(feature = "query")]
pub mod query;
#[cfg(feature = "kafka")]
pub mod repartition;
pub mod retry;
#[cfg(test)]
mod test_support;

/// Everything that can go wrong writing or reading the lake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Encoding Parquet failed (a bug, or memory).
    #[error("parquet encoding for table {table:?} failed: {source}")]
    Parquet {
        /// The table being written.
        table: String,
        /// The cause.
        source: ::parquet::errors::ParquetError,
    },
    /// The store refused a write or list; retry once the disk or bucket is fixed.
    #[error("lake storage at {path}: {source}")]
    Store {
        /// The object path concerned.
        path: String,
        /// The cause.
        source: object_store::Error,
    },
    /// A Delta table could not be read or committed to.
    #[cfg(feature = "delta")]
    #[error("Delta table {table:?}: {source}")]
    Delta {
        /// The table concerned.
        table: String,
        /// The cause.
        source: Box<deltalake::DeltaTableError>,
    },
    /// Another node of the cluster took over a partition this node's checkpoint holds
    /// records of (it committed a newer fencing epoch): the checkpoint can never count,
    /// and the node must stop (see `DeltaTables::seal`).
    #[error(
        "fenced: another node took over {app} (its epoch {newer}, ours {ours}); this node's uncommitted records of it will be read again there"
    )]
    Fenced {
        /// The fence's app id (`sluice-fence-<source>-<partition>`).
        app: String,
        /// The epoch this node held.
        ours: u64,
        /// The epoch in the log.
        newer: u64,
    },
    /// A table holds columns of the same names as the rows written into it now, but of
    /// other types (a stream's or window's columns changed since the table was made).
    #[error(
        "table {table:?} cannot take the rows written now: {}; give the changed column a new name, or the stream or window another table",
        conflicts.join("; ")
    )]
    Columns {
        /// The table concerned.
        table: String,
        /// One line per column: its name, its type in the table and in the rows.
        conflicts: Vec<String>,
    },
    /// Local file-system trouble (creating or cleaning the lake directory).
    #[error("lake directory {path}: {source}")]
    Io {
        /// The path concerned.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The query was refused as not read-only or malformed: the user's to fix.
    #[error("query refused: {0}")]
    Refused(String),
    /// The query's result went over a configured cap (rows or bytes).
    #[error("query stopped: {0}")]
    TooLarge(String),
    /// DataFusion could not plan or run the query.
    #[cfg(feature = "query")]
    #[error("query failed: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    /// Formatting results failed.
    #[error("formatting results failed: {0}")]
    Format(#[from] arrow::error::ArrowError),
}

impl Error {
    /// Whether the caller (not Sluice) must change something: a refused or invalid query.
    pub fn is_user_error(&self) -> bool {
        #[cfg(feature = "query")]
        if matches!(self, Error::Query(_)) {
            return true;
        }
        matches!(self, Error::Refused(_))
    }

    /// Whether a query went over a limit: its result's cap, or the memory every query
    /// shares (DataFusion's memory pool).
    pub fn is_over_limit(&self) -> bool {
        #[cfg(feature = "query")]
        if let Error::Query(e) = self
            && matches!(
                e.find_root(),
                datafusion::error::DataFusionError::ResourcesExhausted(_)
            )
        {
            return true;
        }
        matches!(self, Error::TooLarge(_))
    }

    /// Whether an object the store was asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }
}

/// Maps an I/O error on `path` to [`Error::Io`] (for `map_err`).
#[cfg(feature = "delta")]
pub(crate) fn io_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Maps an object-store error on `path` to [`Error::Store`] (for `map_err`).
#[cfg(feature = "delta")]
pub(crate) fn store_error(
    path: &object_store::path::Path,
) -> impl FnOnce(object_store::Error) -> Error + '_ {
    move |source| Error::Store {
        path: path.to_string(),
        source,
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
