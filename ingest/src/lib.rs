//! Sources for Sluice and the decoder they share.
//!
//! Every source turns what it receives into Arrow `RecordBatch`es at its boundary,
//! through one [`decode::Decoder`] per stream, and sends them on as
//! [`sluice_core::StreamBatch`]es. Malformed messages become rows of the `dead_letter`
//! table, never errors that stop the source.
//!
//! # Layout
//! - [`decode`]: JSON → Arrow with per-message dead-lettering.
//! - [`emit`]: flush-by-size-or-tick into the pipeline channel, with metrics.
//! - [`mqtt`]: the MQTT source (rumqttc) and the embedded broker (rumqttd).
//! - [`http`]: `POST /api/ingest/<stream>` bodies, decoded by one task per stream.
//! - `kafka` (feature `kafka`): a consumer-group source whose offsets follow the
//!   lake's checkpoints.
//! - `kinesis` (feature `kinesis`): every shard of a stream, children after parents,
//!   positions in the checkpoint manifest.
//! - `lease` (feature `kinesis`): which shards a node of a cluster leases, in rounds.
//! - [`limit`]: source and per-key rate limits (governor), block or shed.
//! - [`file`]: JSON-lines files (optionally gzip) for bounded runs (`--from-file`).
//! - [`tls`]: rustls settings for MQTT clients, the broker's TLS listener and HTTPS.
//! - `fuzz`: what the fuzz targets in `fuzz/` run (and the corpus replay test).

pub mod decode;
pub mod emit;
pub mod file;
#[doc(hidden)]
pub mod fuzz;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kinesis")]
pub mod kinesis;
#[cfg(feature = "kinesis")]
pub mod lease;
pub mod limit;
pub mod mqtt;
pub mod source;
pub mod tls;
pub mod wal;

/// What can stop a source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline stopped taking batches (shutdown or a failed sink).
    #[error("the pipeline is no longer accepting batches")]
    PipelineClosed,
    /// TLS settings could not be loaded; the user must fix the file or path.
    #[error("mqtt source {source_name:?}: TLS setup failed: {message}")]
    Tls {
        /// The source.
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// A listen address is taken or cannot be bound.
    #[error("cannot listen on {addr} for {what}: {error}")]
    Bind {
        /// What wanted the port.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause (not a `#[source]`: the message already says it).
        error: std::io::Error,
    },
    /// An input file cannot be read.
    #[error("cannot read {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        error: std::io::Error,
    },
    /// The MQTT source's write-ahead log cannot be opened or read.
    #[error("mqtt source {source_name:?}: write-ahead log {path}: {error}")]
    Wal {
        /// The source.
        source_name: String,
        /// The log's directory.
        path: String,
        /// The cause.
        error: std::io::Error,
    },
    /// The source's configuration cannot be used.
    #[error("source {source_name:?}: {message}")]
    Config {
        /// The source.
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
