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
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
