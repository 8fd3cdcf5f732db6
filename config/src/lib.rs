//! Sluice's typed configuration: what a TOML file may say, the embedded default, and
//! validation that reports every problem at once, each naming its key.
//!
//! # Layout
//! - [`model`]: the config structs; every field documents its meaning, unit and default.
//! - [`load`]: TOML text → [`Config`], collecting *all* problems ([`ConfigError`]).
//! - [`units`]: `"5s"` durations and `"128MB"` sizes.
//! - [`guard`]: `[limits]`, `[publish]`, and the warning for outputs wired back into
//!   inputs ([`Config::warnings`]).
//!
//! Loading is in two passes. The first deserializes each section on its own, so one
//! section's mistake does not hide another's, and keeps going past unknown keys and
//! wrongly typed values. The second ([`Config::validate`]) checks what types cannot:
//! references between sections, addresses, URLs and ranges.

pub mod guard;
pub mod load;
pub mod model;
pub mod units;

pub use guard::{LimitsConfig, PublishConfig};
pub use load::ConfigError;
pub use model::*;
pub use units::{ByteSize, Duration};

/// The longest queue a setting takes, in items (batches, notifications): a bound
/// channel of more cannot be made (tokio's limit is `usize::MAX >> 3`), and memory
/// runs out long before.
pub const MAX_QUEUE: usize = 1 << 20;
