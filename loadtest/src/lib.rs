//! The Sluice load tester: generate workloads and measure the pipeline.
//!
//! # Layout
//! - [`generate`]: DESIGN.md telemetry as JSON lines (W1 and friends), deterministic
//!   from a seed.
//! - [`bench`]: run the real decode → batch → Parquet commit code over a file and report
//!   events/s, events/s per core (from CPU time) and per-batch latency percentiles.
//! - `src/main.rs`: the `sluice-loadtest` command line.

pub mod bench;
pub mod generate;

/// CPU time (user + system) this process has used so far, in seconds.
pub fn cpu_seconds() -> f64 {
    sluice_core::usage::usage().cpu_seconds
}
