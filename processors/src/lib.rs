//! Stream processors: stateless functions (filter, project, route) and, next,
//! event-time windows, all over Arrow `RecordBatch`es.
//!
//! # Layout
//! - [`function`]: a function declared in SQL text, compiled once into DataFusion
//!   physical expressions and evaluated on each batch.
//! - `window/` (issue 3, next): tumbling, hopping and session windows.
//!
//! Nothing here is wired into `sluice run` yet: streams still land unchanged in the
//! table of the same name (see ARCHITECTURE.md, "Next: functions and windows").

pub mod function;

/// Why a function or window cannot be built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A SQL expression in the config does not parse or does not fit the input
    /// schema; the message quotes DataFusion. The user's to fix.
    #[error("{key}: {message}")]
    Config {
        /// Dotted config key of the expression.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Evaluating a compiled expression failed on a batch (a bug or an overflow).
    #[error("function {function:?}: {source}")]
    Eval {
        /// The function.
        function: String,
        /// The cause.
        source: datafusion::error::DataFusionError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
