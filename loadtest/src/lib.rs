//! The Sluice load tester: device and user fleets, record and replay, open-loop pacing,
//! latency percentiles, and pipeline benchmarks.
//!
//! # Layout
//! - [`scenario`]: telemetry fleets and clickstream users from flags or a TOML spec;
//!   deterministic from a seed.
//! - [`record`]: record MQTT, Kafka or Kinesis traffic ([`feed`]) to Parquet or JSON
//!   lines; replay it at N×.
//! - [`workload`]: the [`workload::Workload`] trait both of them implement.
//! - [`drive`]: the open-loop driver, probes and progress bar.
//! - [`target`]: MQTT, HTTP ingest and file targets.
//! - [`stats`]: hdrhistograms, the JSON report, the `.hgrm` file; [`plot`]: the PNG.
//! - [`generate`]: workloads such as W1 written to a file as fast as possible.
//! - [`bench`]: the real decode → batch → Parquet commit code over a file: events/s,
//!   events/s per core (from CPU time) and per-batch latency percentiles.
//! - `src/main.rs`: the `sluice-loadtest` command line.

pub mod bench;
pub mod drive;
pub mod feed;
pub mod generate;
pub mod plot;
pub mod record;
pub mod scenario;
pub mod stats;
pub mod target;
pub mod workload;

/// CPU time (user + system) this process has used so far, in seconds.
pub fn cpu_seconds() -> f64 {
    sluice_core::usage::usage().cpu_seconds
}
