//! Pipeline benchmarks over the real code: [`decode_write`] runs the decoder, the
//! batcher and the Parquet lake exactly as `sluice run` does, minus the network.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use sluice_core::{StreamSchema, SystemClock};
use sluice_ingest::decode::{DecodeLimits, Decoder, MessageMeta};
use sluice_sinks::location::LakeLocation;
use sluice_sinks::parquet::{Lake, LakeOptions};

/// What a benchmark run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Input lines.
    pub events: u64,
    /// Rows that reached the lake.
    pub rows: u64,
    /// Lines dead-lettered.
    pub dead_letters: u64,
    /// Parquet files committed.
    pub files: u64,
    /// Input bytes.
    pub bytes_in: u64,
    /// Parquet bytes written.
    pub bytes_out: u64,
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// CPU seconds (user + system) used by the run.
    pub cpu_s: f64,
    /// Per-batch decode + encode time, microseconds.
    pub batch_us: Histogram<u64>,
}

impl Report {
    /// Events per wall-clock second.
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.wall_s.max(1e-9)
    }

    /// Events per CPU second: the per-core rate.
    pub fn events_per_core_s(&self) -> f64 {
        self.events as f64 / self.cpu_s.max(1e-9)
    }

    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let q = |p: f64| self.batch_us.value_at_quantile(p);
        format!(
            "events           {events}\nrows written     {rows}\ndead letters     {dead}\nfiles committed  {files}\n\
             input            {mb_in:.1} MB\nparquet          {mb_out:.1} MB\nwall             {wall:.3} s\ncpu              {cpu:.3} s\n\
             events/s         {eps:.0}\nevents/s/core    {epc:.0}\ninput MB/s       {mbps:.1}\n\
             batch µs         p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}\n",
            events = self.events,
            rows = self.rows,
            dead = self.dead_letters,
            files = self.files,
            mb_in = self.bytes_in as f64 / 1e6,
            mb_out = self.bytes_out as f64 / 1e6,
            wall = self.wall_s,
            cpu = self.cpu_s,
            eps = self.events_per_s(),
            epc = self.events_per_core_s(),
            mbps = self.bytes_in as f64 / 1e6 / self.wall_s.max(1e-9),
            p50 = q(0.5),
            p90 = q(0.9),
            p99 = q(0.99),
            p999 = q(0.999),
            max = self.batch_us.max(),
        )
    }
}

/// Knobs of [`decode_write`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Rows per batch.
    pub batch_rows: usize,
    /// zstd level of the Parquet files.
    pub zstd_level: i32,
    /// Decode only; skip the Parquet write, to see how the time splits.
    pub decode_only: bool,
    /// A per-key (per-device) rate limit, events/s, as `limit.per_key_rate` would set
    /// (to measure what checking it costs).
    pub per_key_rate: Option<u32>,
    /// That limit in block mode.
    pub per_key_block: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            batch_rows: 8192,
            zstd_level: 1,
            decode_only: false,
            per_key_rate: None,
            per_key_block: false,
        }
    }
}

/// Decodes every line of `input` as telemetry in batches of `batch_rows`, writes the
/// batches to a lake at `lake_dir` and commits it; measures the whole run.
pub fn decode_write(
    input: &[u8],
    lake_dir: &Path,
    options: &BenchOptions,
) -> anyhow::Result<Report> {
    let batch_rows = options.batch_rows;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let schema =
        StreamSchema::builtin("telemetry").ok_or_else(|| anyhow::anyhow!("no telemetry schema"))?;
    let mut decoder = Decoder::new(schema, "telemetry", "bench", None, DecodeLimits::default());
    let limit = sluice_config::LimitConfig {
        per_key_rate: options.per_key_rate,
        per_key_mode: if options.per_key_block {
            sluice_config::LimitMode::Block
        } else {
            sluice_config::LimitMode::Shed
        },
        ..Default::default()
    };
    if let Some(key_limit) = sluice_ingest::limit::KeyLimit::new(&limit) {
        decoder.set_key_limit(key_limit, 1);
    }
    let mut lake = Lake::open(
        LakeOptions {
            roll_size: 128 << 20,
            roll_interval_ms: i64::MAX,
            row_group_rows: 128 * 1024,
            zstd_level: options.zstd_level,
        },
        &LakeLocation::local(lake_dir)?,
        Arc::new(SystemClock),
    )?;
    let table: Arc<str> = "telemetry".into();
    let dead_table: Arc<str> = "dead_letter".into();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut report_rows = 0u64;
    let mut dead = 0u64;
    let mut events = 0u64;
    let mut offset = itoa::Buffer::new();
    let cpu_start = crate::cpu_seconds();
    let started = Instant::now();
    let mut batch_started = Instant::now();
    let mut start = 0usize;
    let mut flush = |decoder: &mut Decoder,
                     lake: &mut Lake,
                     batch_started: &mut Instant|
     -> anyhow::Result<()> {
        let out = decoder.flush();
        if let Some(rows) = out.rows {
            report_rows += rows.num_rows() as u64;
            if !options.decode_only {
                lake.write(&table, &rows)?;
            }
        }
        if let Some(d) = out.dead_letters {
            dead += d.num_rows() as u64;
            lake.write(&dead_table, &d)?;
        }
        histogram.saturating_record(batch_started.elapsed().as_micros() as u64);
        *batch_started = Instant::now();
        Ok(())
    };
    let now_ms = sluice_core::Clock::now_ms(&SystemClock);
    for end in memchr::memchr_iter(b'\n', input).chain(std::iter::once(input.len())) {
        let line = &input[start..end];
        start = end + 1;
        if line.is_empty() {
            continue;
        }
        events += 1;
        let meta = MessageMeta {
            partition: "file",
            offset: offset.format(events),
            ingest_time_ms: now_ms,
            hops: 0,
            origin: None,
        };
        decoder.push(line, "", &meta);
        if decoder.rows() + decoder.dead_rows() >= batch_rows {
            flush(&mut decoder, &mut lake, &mut batch_started)?;
        }
    }
    flush(&mut decoder, &mut lake, &mut batch_started)?;
    let stats = runtime.block_on(lake.close_all())?;
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = crate::cpu_seconds() - cpu_start;
    Ok(Report {
        events,
        rows: report_rows,
        dead_letters: dead,
        files: stats.files,
        bytes_in: input.len() as u64,
        bytes_out: stats.bytes,
        wall_s,
        cpu_s,
        batch_us: histogram,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{GenerateSpec, write_workload};

    #[test]
    fn every_event_is_accounted_for() {
        let mut spec = GenerateSpec::w1();
        spec.events = 20_000;
        spec.scenario.fleet = 100;
        let mut input = Vec::new();
        write_workload(&spec, &mut input).unwrap();
        input.extend_from_slice(b"not json\n");
        let dir = tempfile::tempdir().unwrap();
        let options = BenchOptions {
            batch_rows: 4096,
            ..BenchOptions::default()
        };
        let report = decode_write(&input, dir.path(), &options).unwrap();
        assert_eq!(report.events, 20_001);
        assert_eq!(report.rows, 20_000);
        assert_eq!(report.dead_letters, 1);
        assert!(report.files >= 2, "telemetry and dead_letter");
        assert!(report.summary().contains("events/s/core"));
    }
}
