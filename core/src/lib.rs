//! Shared building blocks of Sluice: the system columns every batch carries, the
//! [`StreamBatch`] that flows between components, the [`Shutdown`] signal and the
//! [`Clock`] that time-driven code reads.
//!
//! # Layout
//! - [`schema`]: system column names, the built-in stream schemas and where the event
//!   time and key live in a batch.
//! - [`shutdown`]: one cloneable signal that every task watches.
//! - [`pipe`]: the sources → lake queue, bounded in batches and in bytes.
//! - [`clock`]: wall time behind a trait, so tests can drive time by hand.
//! - [`template`]: `{name}` placeholders (alert messages, notification topics).
//! - [`lease`]: a source's leases in the lake, as the nodes of a cluster share them.
//! - [`usage`]: CPU time and peak memory of the process (for per-core figures).
//! - [`reload`]: a value read from files and read again when they change.
//! - [`tap`]: live readers of the batches the lake writes to a table.
//! - [`status`]: each component's current error, for the console.
//! - [`busy`]: the time each stage of the pipeline works, and each source waits.

pub mod busy;
pub mod clock;
pub mod lease;
pub mod pipe;
pub mod reload;
pub mod schema;
pub mod shutdown;
pub mod status;
pub mod tap;
pub mod template;
pub mod usage;

pub use clock::{Clock, ManualClock, SystemClock};
pub use pipe::{
    BoundedReceiver, BoundedSender, PipeReceiver, PipeSender, TrySendError, Weigh, bounded, pipe,
};
pub use schema::{
    Checkpointed, Notification, PartitionState, Seq, SeqText, SourcePositions, StreamBatch,
    StreamSchema,
};
pub use shutdown::Shutdown;
