//! `sluice-loadtest`: generate workloads and benchmark the pipeline.

use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_loadtest::bench;
use sluice_loadtest::generate::{TelemetrySpec, write_telemetry};

/// Sluice load tester.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a telemetry workload as JSON lines (defaults: W1 = 10M events, 10k devices,
    /// 1 simulated hour, ±2 s disorder, 1% status=error).
    Generate {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Number of events.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Number of devices.
        #[arg(long, default_value_t = 10_000)]
        devices: u64,
        /// Simulated span of event time, seconds.
        #[arg(long, default_value_t = 3600)]
        span_secs: i64,
        /// Maximum event-time disorder, milliseconds (±).
        #[arg(long, default_value_t = 2000)]
        disorder_ms: i64,
        /// Fraction of events with status "error".
        #[arg(long, default_value_t = 0.01)]
        error_fraction: f64,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run decode → batch → Parquet commit over a JSON-lines file on one thread, and
    /// report events/s, events/s per core (CPU time) and batch latency percentiles.
    Bench {
        /// Input JSON lines (e.g. from `generate`).
        #[arg(long)]
        input: PathBuf,
        /// Rows per batch.
        #[arg(long, default_value_t = 8192)]
        batch_rows: usize,
        /// Lake directory to write (default: a temporary directory, removed after).
        #[arg(long)]
        lake: Option<PathBuf>,
        /// zstd level of the Parquet files (the service's default is 1).
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Decode only, skipping the Parquet write, to see how the time splits.
        #[arg(long)]
        decode_only: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate {
            out,
            events,
            devices,
            span_secs,
            disorder_ms,
            error_fraction,
            seed,
        } => {
            let spec = TelemetrySpec {
                events,
                devices,
                span_ms: span_secs * 1000,
                disorder_ms,
                error_fraction,
                seed,
                ..TelemetrySpec::w1()
            };
            let file = std::fs::File::create(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let bytes = write_telemetry(&spec, &mut BufWriter::with_capacity(1 << 20, file))?;
            eprintln!(
                "wrote {events} events ({:.1} MB) to {}",
                bytes as f64 / 1e6,
                out.display()
            );
        }
        Command::Bench {
            input,
            batch_rows,
            lake,
            zstd_level,
            decode_only,
        } => {
            let data = std::fs::read(&input)
                .with_context(|| format!("cannot read {}", input.display()))?;
            let tmp = tempfile::tempdir()?;
            let dir = lake.unwrap_or_else(|| tmp.path().join("lake"));
            let options = bench::BenchOptions {
                batch_rows,
                zstd_level,
                decode_only,
            };
            let report = bench::decode_write(&data, &dir, &options)?;
            print!("{}", report.summary());
        }
    }
    Ok(())
}
