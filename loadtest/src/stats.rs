//! What a run measured: hdrhistograms of acknowledgement latency (from the *intended*
//! send time, so a stall shows up as latency instead of hiding as a slower rate), of how
//! far the generator fell behind its own schedule, and of probe latencies; counters; and
//! a per-second timeline for the plot.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Histograms hold µs from 1 µs to 10 minutes at 3 significant figures.
fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)] // constant, valid bounds
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Shared by the driver, the target's acknowledgement tasks, the probes and the
/// progress bar. One mutex: at the rates one client machine produces (≤ a few 100k/s)
/// an uncontended lock per event is far below the cost of the send itself.
#[derive(Debug)]
pub struct Stats {
    /// Fixed at creation; the run starts `begin_us` after it.
    origin: Instant,
    begin_us: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    ack: Histogram<u64>,
    lag: Histogram<u64>,
    queryable: Histogram<u64>,
    alert: Histogram<u64>,
    second: Histogram<u64>,
    second_acked: u64,
    timeline: Vec<Second>,
    sent: u64,
    acked: u64,
    errors: u64,
    backpressure_us: u64,
    probes_sent: u64,
    probes_seen: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since the start (end of this interval).
    pub t_s: u64,
    /// Messages acknowledged during the second.
    pub acked: u64,
    /// Median acknowledgement latency, µs.
    pub p50_us: u64,
    /// 99th percentile acknowledgement latency, µs.
    pub p99_us: u64,
    /// Highest acknowledgement latency, µs.
    pub max_us: u64,
}

/// A latency distribution in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Median, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p99_9_us: u64,
    /// Highest, µs.
    pub max_us: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| Self {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p99_9_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
    }
}

/// The numbers the progress bar shows.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    /// Messages handed to the target.
    pub sent: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Errors so far.
    pub errors: u64,
    /// p99 acknowledgement latency over the run so far, µs.
    pub p99_us: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Starts the clock.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            begin_us: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                ack: histogram(),
                lag: histogram(),
                queryable: histogram(),
                alert: histogram(),
                second: histogram(),
                second_acked: 0,
                timeline: Vec::new(),
                sent: 0,
                acked: 0,
                errors: 0,
                backpressure_us: 0,
                probes_sent: 0,
                probes_seen: 0,
            }),
        }
    }

    /// Restarts the clock: the schedule begins now (after connecting).
    pub fn begin(&self) {
        let us = self.origin.elapsed().as_micros() as u64;
        self.begin_us.store(us, Ordering::Relaxed);
    }

    /// The instant offsets are measured from.
    pub fn start(&self) -> Instant {
        self.origin + Duration::from_micros(self.begin_us.load(Ordering::Relaxed))
    }

    /// µs since the start.
    pub fn now_us(&self) -> u64 {
        (self.origin.elapsed().as_micros() as u64)
            .saturating_sub(self.begin_us.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters inconsistent in a
        // way that matters for a report, so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message was handed to the target `lag_us` after it was due.
    pub fn sent(&self, lag_us: u64) {
        let mut s = self.lock();
        s.sent += 1;
        let _ = s.lag.record(lag_us.max(1));
    }

    /// The target acknowledged a message due at `due_us`.
    pub fn acked(&self, due_us: u64) {
        let latency = self.now_us().saturating_sub(due_us).max(1);
        let mut s = self.lock();
        s.acked += 1;
        s.second_acked += 1;
        let _ = s.ack.record(latency);
        let _ = s.second.record(latency);
    }

    /// `n` messages failed.
    pub fn errors(&self, n: u64) {
        self.lock().errors += n;
    }

    /// The target made the driver wait this long (a full queue or connection pool).
    pub fn backpressure(&self, waited: Duration) {
        self.lock().backpressure_us += waited.as_micros() as u64;
    }

    /// An alert fired by a reading due at `due_us` arrived now.
    pub fn alert(&self, due_us: u64) {
        let latency = self.now_us().saturating_sub(due_us).max(1);
        let _ = self.lock().alert.record(latency);
    }

    /// A probe was sent.
    pub fn probe_sent(&self) {
        self.lock().probes_sent += 1;
    }

    /// A probe sent at `due_us` became queryable now.
    pub fn probe_queryable(&self, due_us: u64) {
        let latency = self.now_us().saturating_sub(due_us).max(1);
        let mut s = self.lock();
        s.probes_seen += 1;
        let _ = s.queryable.record(latency);
    }

    /// Closes the current second of the timeline.
    pub fn tick_second(&self) {
        let t_s = self.start().elapsed().as_secs_f64().round() as u64;
        let mut s = self.lock();
        let second = Second {
            t_s,
            acked: s.second_acked,
            p50_us: s.second.value_at_quantile(0.5),
            p99_us: s.second.value_at_quantile(0.99),
            max_us: s.second.max(),
        };
        s.timeline.push(second);
        s.second.reset();
        s.second_acked = 0;
    }

    /// Counters for the progress bar.
    pub fn live(&self) -> Live {
        let s = self.lock();
        Live {
            sent: s.sent,
            acked: s.acked,
            errors: s.errors,
            p99_us: s.ack.value_at_quantile(0.99),
        }
    }

    /// Messages sent and acknowledged so far.
    pub fn sent_acked(&self) -> (u64, u64) {
        let s = self.lock();
        (s.sent, s.acked)
    }

    /// The acknowledgement-latency histogram (for the `.hgrm` file).
    pub fn ack_histogram(&self) -> Histogram<u64> {
        self.lock().ack.clone()
    }

    /// Builds the report.
    pub fn report(&self, run: RunInfo, send_s: f64) -> Report {
        let s = self.lock();
        let total_s = self.start().elapsed().as_secs_f64();
        Report {
            tool: "sluice-loadtest",
            version: env!("CARGO_PKG_VERSION"),
            run,
            send_s,
            total_s,
            sent: s.sent,
            acked: s.acked,
            unacked: s.sent.saturating_sub(s.acked + s.errors),
            errors: s.errors,
            achieved_rate: s.sent as f64 / send_s.max(1e-9),
            acked_rate: s.acked as f64 / send_s.max(1e-9),
            backpressure_s: s.backpressure_us as f64 / 1e6,
            schedule_lag: Percentiles::of(&s.lag),
            ack_latency: Percentiles::of(&s.ack),
            probes_sent: s.probes_sent,
            probes_seen: s.probes_seen,
            queryable_latency: Percentiles::of(&s.queryable),
            alert_latency: Percentiles::of(&s.alert),
            timeline: s.timeline.clone(),
        }
    }
}

/// Facts about the run that the stats do not know (flattened into the report).
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Subcommand (`telemetry`, `clicks`, `replay`).
    pub command: String,
    /// Target URL.
    pub target: String,
    /// MQTT QoS (0 or 1); 1 for targets that always confirm.
    pub qos: u8,
    /// Connections to the target.
    pub connections: usize,
    /// Intended events per second (`None`: as fast as possible).
    pub target_rate: Option<f64>,
    /// Events the schedule held.
    pub scheduled: u64,
    /// Seconds the schedule spanned.
    pub scheduled_s: f64,
    /// Malformed payloads sent on purpose.
    pub malformed: u64,
}

/// The JSON report (`--report`). The README documents every field.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always `sluice-loadtest`.
    pub tool: &'static str,
    /// Tool version.
    pub version: &'static str,
    /// Command, target, QoS, connections, target rate, schedule, malformed count.
    #[serde(flatten)]
    pub run: RunInfo,
    /// Seconds from start until the last message was handed to the target.
    pub send_s: f64,
    /// Seconds from start until the end (acks and probes drained).
    pub total_s: f64,
    /// Messages handed to the target.
    pub sent: u64,
    /// Messages the target acknowledged (PUBACK; written for QoS 0; 2xx for HTTP).
    pub acked: u64,
    /// Sent but neither acknowledged nor failed when the drain timeout ended.
    pub unacked: u64,
    /// Messages that failed (connection lost, HTTP error, …).
    pub errors: u64,
    /// `sent / send_s`.
    pub achieved_rate: f64,
    /// `acked / send_s`.
    pub acked_rate: f64,
    /// Seconds the driver waited on a full client queue or connection pool.
    pub backpressure_s: f64,
    /// How late the generator handed messages over, against their schedule.
    pub schedule_lag: Option<Percentiles>,
    /// Intended send time → acknowledgement.
    pub ack_latency: Option<Percentiles>,
    /// Probe events sent.
    pub probes_sent: u64,
    /// Probe events seen by a query on the lake.
    pub probes_seen: u64,
    /// Intended send time → visible to `/api/query`.
    pub queryable_latency: Option<Percentiles>,
    /// Intended send time of the reading that fired an alert → the alert's arrival on
    /// the alert topic (`--alert-topic`; ms resolution on the event time, so up to 1 ms
    /// high).
    pub alert_latency: Option<Percentiles>,
    /// Per-second acknowledgements and latency.
    pub timeline: Vec<Second>,
}

impl Report {
    /// The text summary printed at the end of a run.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let rate = self
            .run
            .target_rate
            .map_or("max".to_owned(), |r| format!("{r:.0}/s"));
        let _ = writeln!(
            out,
            "{} → {}  (qos {}, {} connection(s))",
            self.run.command, self.run.target, self.run.qos, self.run.connections
        );
        let _ = writeln!(
            out,
            "sent        {} of {} scheduled in {:.2} s  ({:.0}/s, target {rate})",
            self.sent, self.run.scheduled, self.send_s, self.achieved_rate
        );
        let _ = writeln!(
            out,
            "acked       {}  ({:.0}/s)   unacked {}   errors {}   malformed sent {}",
            self.acked, self.acked_rate, self.unacked, self.errors, self.run.malformed
        );
        let _ = writeln!(out, "backpressure {:.3} s", self.backpressure_s);
        for (name, p) in [
            ("behind schedule", &self.schedule_lag),
            ("ack latency", &self.ack_latency),
            ("→ queryable", &self.queryable_latency),
            ("→ alert", &self.alert_latency),
        ] {
            if let Some(p) = p {
                let _ = writeln!(
                    out,
                    "{name:<16} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
                    ms(p.p50_us),
                    ms(p.p90_us),
                    ms(p.p99_us),
                    ms(p.p99_9_us),
                    ms(p.max_us),
                    p.count
                );
            }
        }
        if self.probes_sent > 0 {
            let _ = writeln!(
                out,
                "probes      {} sent, {} queryable",
                self.probes_sent, self.probes_seen
            );
        }
        out
    }
}

/// µs as a short millisecond string.
pub fn ms(us: u64) -> String {
    format!("{:.3}ms", us as f64 / 1000.0)
}

/// Writes `h` (µs) in HdrHistogram's percentile-distribution text format (`.hgrm`,
/// values in ms), which HdrHistogram's plotter and wrk2 read. The hdrhistogram crate
/// serializes only the binary V2 format, so the text layout is written here; it walks
/// the crate's own quantile iterator (5 ticks per half distance, as the Java tool).
pub fn write_hgrm(h: &Histogram<u64>, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
        if q < 1.0 {
            writeln!(
                out,
                "{value:>12.3} {q:>14.12} {total:>10} {:>14.2}",
                1.0 / (1.0 - q)
            )?;
        } else {
            writeln!(out, "{value:>12.3} {q:>14.12} {total:>10}")?;
        }
    }
    writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    )?;
    writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        h.distinct_values()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_lists_increasing_percentiles_up_to_the_max() {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<(f64, f64, u64)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.contains("Value"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect();
        assert!(rows.len() > 20);
        assert!(
            rows.windows(2)
                .all(|w| w[0].1 <= w[1].1 && w[0].2 <= w[1].2)
        );
        let last = rows.last().unwrap();
        assert_eq!(last.1, 1.0);
        assert_eq!(last.2, 10_000);
        assert!((last.0 - 100.0).abs() < 0.1, "max ≈ 100 ms, got {}", last.0);
        assert!(text.contains("#[Max     =      100.031, Total count    =        10000]"));
    }

    #[test]
    fn timeline_and_report_count_what_happened() {
        let stats = Stats::new();
        for _ in 0..10 {
            stats.sent(5);
            stats.acked(0);
        }
        stats.errors(2);
        stats.tick_second();
        let r = stats.report(
            RunInfo {
                command: "telemetry".into(),
                target: "mqtt://x:1".into(),
                qos: 1,
                connections: 1,
                target_rate: Some(10.0),
                scheduled: 12,
                scheduled_s: 1.0,
                malformed: 0,
            },
            1.0,
        );
        assert_eq!((r.sent, r.acked, r.errors, r.unacked), (10, 10, 2, 0));
        assert_eq!(r.timeline.len(), 1);
        assert_eq!(r.timeline[0].acked, 10);
        assert_eq!(r.schedule_lag.unwrap().max_us, 5);
        assert!(r.queryable_latency.is_none());
    }
}
