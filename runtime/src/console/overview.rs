//! One second of the service in numbers ([`Point`]), computed from two readings of
//! the metrics, and the ring of the last hour of them that the console's charts draw.

use std::collections::{BTreeMap, HashMap, VecDeque};

use metrics::Key;
use serde::Serialize;

use super::sample::Reading;

/// Points kept: one hour at one a second.
pub(crate) const RING_POINTS: usize = 3_600;

/// Seconds a table's `rows_avg` averages over.
pub(crate) const SMOOTHING: usize = 10;

/// A source's lag as its kind measures it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Lag {
    pub(crate) source: String,
    pub(crate) value: f64,
    /// `bytes` (MQTT: unread at the embedded broker, or held in an external
    /// mosquitto's message store), `records` (Kafka: behind the high watermark) or `ms`
    /// (Kinesis: behind the shard's tip).
    pub(crate) unit: &'static str,
}

/// One source in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct SourcePoint {
    pub(crate) kind: String,
    /// Messages received per second (kept, dead-lettered or shed).
    pub(crate) events: f64,
    /// Their payload bytes per second.
    pub(crate) bytes: f64,
    pub(crate) dead_letters: f64,
    /// Shed, refused or held by a limit, per second.
    pub(crate) limited: f64,
    /// Errors talking to its server, per second (each retried with backoff).
    pub(crate) errors: f64,
    /// Bytes decoded but not yet taken by the pipeline.
    pub(crate) queue_bytes: f64,
    /// Seconds per second it waited for room in the pipeline's queue: its decode
    /// stage's backpressure.
    pub(crate) backpressure: f64,
    pub(crate) lag: Option<f64>,
    pub(crate) lag_unit: Option<&'static str>,
    /// Subscribed to its broker (MQTT); `None` for kinds that do not say.
    pub(crate) connected: Option<bool>,
    /// Its current trouble, as logged (retried with backoff meanwhile).
    pub(crate) error: Option<String>,
    /// Since when it is in trouble (unix ms).
    pub(crate) error_since_ms: Option<i64>,
    /// Unix ms of the last second in which it received anything.
    pub(crate) last_event_ms: Option<i64>,
}

/// One table of the lake in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct TablePoint {
    /// Rows committed per second in this second.
    pub(crate) rows: f64,
    /// Rows committed per second over the last [`SMOOTHING`] seconds: commits come
    /// every few seconds (the checkpoint interval), so a second's rate jumps between
    /// zero and a burst.
    pub(crate) rows_avg: f64,
    pub(crate) files: Option<f64>,
    pub(crate) bytes: Option<f64>,
    pub(crate) version: Option<f64>,
    pub(crate) last_commit_ms: Option<f64>,
}

/// One window in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct WindowPoint {
    pub(crate) watermark_ms: Option<f64>,
    /// How far the watermark is behind the wall clock.
    pub(crate) watermark_lag_s: Option<f64>,
    pub(crate) state_bytes: f64,
    /// Rows refused per second (over the state budget).
    pub(crate) refused: f64,
}

/// One function in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct FunctionPoint {
    /// Rows taken per second (past its limit).
    pub(crate) rows_in: f64,
    /// Rows put out per second (its output and routes).
    pub(crate) rows_out: f64,
}

/// One notifier in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct NotifierPoint {
    pub(crate) sent: f64,
    /// Failed attempts (retried) and notifications dropped, per second.
    pub(crate) failed: f64,
    pub(crate) dropped: f64,
    pub(crate) queue_depth: f64,
    pub(crate) breaker_open: bool,
}

/// The queue between the sources and the lake task, and the lake's backlog.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct PipelinePoint {
    pub(crate) queue_batches: f64,
    pub(crate) queue_bytes: f64,
    /// `queue_bytes` over `[limits] queue_bytes`: the backpressure badge.
    pub(crate) queue_fill: f64,
    pub(crate) backlog_bytes: f64,
    /// The lake's backlog is full and holds the sources.
    pub(crate) held: bool,
    /// Seconds per second that limits in block mode held their callers.
    pub(crate) limit_hold: f64,
    /// Late rows per second (to the `late` table).
    pub(crate) late_rows: f64,
}

/// The last checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct CheckpointPoint {
    pub(crate) last_seconds: Option<f64>,
    /// The window and alert state the last checkpoint wrote.
    pub(crate) last_state_bytes: Option<f64>,
    pub(crate) last_ms: Option<f64>,
    pub(crate) total: u64,
    pub(crate) failures: u64,
}

/// The service in one second: rates over the second before `t`, levels at `t`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Point {
    /// Unix ms.
    pub(crate) t: i64,
    pub(crate) events_in: f64,
    pub(crate) rows_committed: f64,
    pub(crate) dead_letters: f64,
    /// Shed, refused or held by a limit, per second.
    pub(crate) limited: f64,
    /// The largest source lag.
    pub(crate) lag: Option<Lag>,
    /// Age of the oldest row not yet committed.
    pub(crate) freshness_s: f64,
    /// Alerts firing (keys, over every rule).
    pub(crate) firing: u64,
    pub(crate) sources: BTreeMap<String, SourcePoint>,
    pub(crate) tables: BTreeMap<String, TablePoint>,
    pub(crate) windows: BTreeMap<String, WindowPoint>,
    pub(crate) functions: BTreeMap<String, FunctionPoint>,
    pub(crate) notifiers: BTreeMap<String, NotifierPoint>,
    /// Keys firing per rule.
    pub(crate) alerts: BTreeMap<String, u64>,
    /// Seconds per second each stage worked, by `<stage>:<name>` (`function`,
    /// `window`, `alert` or `lake`, which is the encoding of a table's rows).
    pub(crate) busy: BTreeMap<String, f64>,
    /// Dead letters per second by reason.
    pub(crate) dead_letter_reasons: BTreeMap<String, f64>,
    /// Dead letters by reason since the service started.
    pub(crate) dead_letter_totals: BTreeMap<String, u64>,
    pub(crate) pipeline: PipelinePoint,
    pub(crate) checkpoint: CheckpointPoint,
}

fn label<'a>(key: &'a Key, name: &str) -> Option<&'a str> {
    key.labels().find(|l| l.key() == name).map(|l| l.value())
}

/// Per-second rates between two readings.
struct Rates<'a> {
    before: &'a Reading,
    now: &'a Reading,
    seconds: f64,
}

impl Rates<'_> {
    /// Every counter called `name` with its rate; one that first appears in `now`
    /// started at 0 since the last reading.
    fn each<'k>(&'k self, name: &'k str) -> impl Iterator<Item = (&'k Key, f64)> + 'k {
        self.now
            .counters
            .iter()
            .filter(move |(k, _)| k.name() == name)
            .map(|(k, &v)| {
                let before = self.before.counters.get(k).copied().unwrap_or(0);
                (k, v.saturating_sub(before) as f64 / self.seconds)
            })
    }

    fn total(&self, name: &str) -> f64 {
        // Not `sum()`: an empty f64 sum is -0.0, which the page would show as "-0".
        self.each(name).fold(0.0, |total, (_, r)| total + r)
    }

    /// Rates of `name` summed by the value of label `by`.
    fn by(&self, name: &str, by: &str, into: &mut BTreeMap<String, f64>) {
        for (k, r) in self.each(name) {
            if let Some(v) = label(k, by) {
                *into.entry(v.to_owned()).or_default() += r;
            }
        }
    }

    /// Every gauge called `name` that only grows (seconds spent, kept as a gauge
    /// because metrics counters are integers) with its rate.
    fn grown<'k>(&'k self, name: &'k str) -> impl Iterator<Item = (&'k Key, f64)> + 'k {
        gauges(self.now, name).map(|(k, v)| {
            let before = self.before.gauges.get(k).copied().unwrap_or(0.0);
            (k, ((v - before) / self.seconds).max(0.0))
        })
    }
}

fn gauges<'a>(reading: &'a Reading, name: &'a str) -> impl Iterator<Item = (&'a Key, f64)> + 'a {
    reading
        .gauges
        .iter()
        .filter(move |(k, _)| k.name() == name)
        .map(|(k, &v)| (k, v))
}

fn gauge(reading: &Reading, name: &str) -> Option<f64> {
    gauges(reading, name).map(|(_, v)| v).reduce(f64::max)
}

fn counter(reading: &Reading, name: &str) -> u64 {
    reading
        .counters
        .iter()
        .filter(|(k, _)| k.name() == name)
        .map(|(_, &v)| v)
        .sum()
}

/// Turns readings into points and keeps the last hour of them.
#[derive(Debug)]
pub(crate) struct Overview {
    /// `[limits] queue_bytes`, for the queue's fill.
    queue_capacity: f64,
    last: Option<(i64, Reading)>,
    /// When each source last received something.
    last_event: HashMap<String, i64>,
    ring: VecDeque<Point>,
}

impl Overview {
    pub(crate) fn new(queue_capacity_bytes: usize) -> Self {
        Self {
            queue_capacity: queue_capacity_bytes.max(1) as f64,
            last: None,
            last_event: HashMap::new(),
            ring: VecDeque::with_capacity(RING_POINTS),
        }
    }

    /// Takes the reading made at `t` (unix ms); returns the point it makes with the
    /// reading before (the first reading only sets the baseline).
    /// `troubles` are the components' current errors (`sluice_core::status`).
    pub(crate) fn push(
        &mut self,
        t: i64,
        now: Reading,
        troubles: &BTreeMap<String, sluice_core::status::Trouble>,
    ) -> Option<&Point> {
        let before = self.last.take();
        let point = before.map(|(t0, before)| {
            let rates = Rates {
                before: &before,
                now: &now,
                seconds: ((t - t0) as f64 / 1e3).max(1e-3),
            };
            self.point(t, &rates, troubles)
        });
        self.last = Some((t, now));
        let point = point?;
        if self.ring.len() == RING_POINTS {
            self.ring.pop_front();
        }
        self.ring.push_back(point);
        self.ring.back()
    }

    fn point(
        &mut self,
        t: i64,
        rates: &Rates<'_>,
        troubles: &BTreeMap<String, sluice_core::status::Trouble>,
    ) -> Point {
        let now = rates.now;
        let mut p = Point {
            t,
            events_in: rates.total("sluice_source_events_received_total"),
            rows_committed: rates.total("sluice_lake_rows_committed_total"),
            dead_letters: rates.total("sluice_source_events_dead_lettered_total"),
            freshness_s: gauge(now, "sluice_lake_freshness_seconds").unwrap_or(0.0),
            ..Point::default()
        };
        rates.by(
            "sluice_source_events_dead_lettered_total",
            "reason",
            &mut p.dead_letter_reasons,
        );
        for (k, &v) in &now.counters {
            if k.name() == "sluice_source_events_dead_lettered_total"
                && let Some(reason) = label(k, "reason")
            {
                *p.dead_letter_totals.entry(reason.to_owned()).or_default() += v;
            }
        }
        // Sources: every component a source counter names.
        let mut events = BTreeMap::new();
        rates.by(
            "sluice_source_events_received_total",
            "component",
            &mut events,
        );
        let mut received_bytes = BTreeMap::new();
        rates.by(
            "sluice_source_bytes_received_total",
            "component",
            &mut received_bytes,
        );
        let mut dead = BTreeMap::new();
        rates.by(
            "sluice_source_events_dead_lettered_total",
            "component",
            &mut dead,
        );
        let mut errors = BTreeMap::new();
        rates.by("sluice_source_errors_total", "component", &mut errors);
        let mut limited = BTreeMap::new();
        for (k, r) in rates.each("sluice_limit_events_total") {
            if label(k, "outcome") != Some("allowed") {
                p.limited += r;
                if let Some(c) = label(k, "component") {
                    *limited.entry(c.to_owned()).or_insert(0.0) += r;
                }
            }
        }
        for k in now.counters.keys().chain(now.gauges.keys()) {
            let (Some(component), Some(kind)) = (label(k, "component"), label(k, "kind")) else {
                continue;
            };
            if k.name().starts_with("sluice_source_") && !p.sources.contains_key(component) {
                p.sources.insert(
                    component.to_owned(),
                    SourcePoint {
                        kind: kind.to_owned(),
                        ..SourcePoint::default()
                    },
                );
            }
        }
        let broker_lag = gauge(now, "sluice_broker_lag_bytes");
        let mut backpressure = BTreeMap::new();
        for (k, r) in rates.grown("sluice_source_backpressure_seconds_total") {
            if let Some(c) = label(k, "component") {
                *backpressure.entry(c.to_owned()).or_insert(0.0) += r;
            }
        }
        for (name, s) in &mut p.sources {
            s.events = events.get(name).copied().unwrap_or(0.0);
            s.bytes = received_bytes.get(name).copied().unwrap_or(0.0);
            s.dead_letters = dead.get(name).copied().unwrap_or(0.0);
            s.errors = errors.get(name).copied().unwrap_or(0.0);
            s.limited = limited.get(name).copied().unwrap_or(0.0);
            s.backpressure = backpressure.get(name).copied().unwrap_or(0.0);
            s.queue_bytes = gauges(now, "sluice_source_queue_bytes")
                .filter(|(k, _)| label(k, "component") == Some(name))
                .map(|(_, v)| v)
                .sum();
            s.connected = gauges(now, "sluice_source_subscribed")
                .find(|(k, _)| label(k, "component") == Some(name))
                .map(|(_, v)| v > 0.0);
            if s.kind == "mqtt" {
                s.lag = broker_lag;
                s.lag_unit = broker_lag.map(|_| "bytes");
            }
            if let Some((k, lag)) =
                gauges(now, "sluice_source_lag").find(|(k, _)| label(k, "component") == Some(name))
            {
                s.lag = Some(lag);
                s.lag_unit = Some(match label(k, "unit") {
                    Some("records") => "records",
                    Some("ms") => "ms",
                    Some("bytes") => "bytes",
                    _ => "",
                });
            }
            if let Some(trouble) = troubles.get(name) {
                s.error = Some(trouble.error.clone());
                s.error_since_ms = Some(trouble.since_ms);
            }
            if s.events > 0.0 {
                self.last_event.insert(name.clone(), t);
            }
            s.last_event_ms = self.last_event.get(name).copied();
        }
        p.lag = p
            .sources
            .iter()
            .filter_map(|(name, s)| {
                Some(Lag {
                    source: name.clone(),
                    value: s.lag?,
                    unit: s.lag_unit?,
                })
            })
            .max_by(|a, b| a.value.total_cmp(&b.value));
        // Tables.
        let mut committed = BTreeMap::new();
        rates.by("sluice_lake_rows_committed_total", "table", &mut committed);
        let table_gauge = |name: &str, table: &str| {
            gauges(now, name)
                .find(|(k, _)| label(k, "table") == Some(table))
                .map(|(_, v)| v)
        };
        let mut tables: Vec<String> = committed.keys().cloned().collect();
        for (k, _) in gauges(now, "sluice_lake_table_version") {
            tables.extend(label(k, "table").map(str::to_owned));
        }
        for table in tables {
            let rows = committed.get(&table).copied().unwrap_or(0.0);
            let earlier: f64 = self
                .ring
                .iter()
                .rev()
                .take(SMOOTHING - 1)
                .map(|p| p.tables.get(&table).map_or(0.0, |t| t.rows))
                .sum();
            let seconds = (self.ring.len().min(SMOOTHING - 1) + 1) as f64;
            let point = TablePoint {
                rows,
                rows_avg: (rows + earlier) / seconds,
                files: table_gauge("sluice_lake_table_files", &table),
                bytes: table_gauge("sluice_lake_table_bytes", &table),
                version: table_gauge("sluice_lake_table_version", &table),
                last_commit_ms: table_gauge("sluice_lake_last_commit_ms", &table),
            };
            p.tables.insert(table, point);
        }
        // Windows.
        let mut refused = BTreeMap::new();
        rates.by("sluice_window_refused_rows_total", "window", &mut refused);
        for (k, bytes) in gauges(now, "sluice_window_state_bytes") {
            let Some(window) = label(k, "window") else {
                continue;
            };
            let mark = gauges(now, "sluice_window_watermark_ms")
                .find(|(k, _)| label(k, "window") == Some(window))
                .map(|(_, v)| v);
            p.windows.insert(
                window.to_owned(),
                WindowPoint {
                    watermark_ms: mark,
                    watermark_lag_s: mark.map(|m| ((t as f64 - m) / 1e3).max(0.0)),
                    state_bytes: bytes,
                    refused: refused.get(window).copied().unwrap_or(0.0),
                },
            );
        }
        // Functions and notifiers.
        for (k, r) in rates.each("sluice_function_rows_total") {
            let Some(function) = label(k, "function") else {
                continue;
            };
            let f = p.functions.entry(function.to_owned()).or_default();
            match label(k, "direction") {
                Some("in") => f.rows_in += r,
                Some("out") => f.rows_out += r,
                _ => {}
            }
        }
        for (k, r) in rates.each("sluice_notifications_total") {
            let Some(notifier) = label(k, "notifier") else {
                continue;
            };
            let n = p.notifiers.entry(notifier.to_owned()).or_default();
            match label(k, "outcome") {
                Some("sent") => n.sent += r,
                Some("failed_attempt") => n.failed += r,
                Some(_) => n.dropped += r,
                None => {}
            }
        }
        for (k, v) in gauges(now, "sluice_notifier_queue_depth") {
            if let Some(notifier) = label(k, "notifier") {
                p.notifiers
                    .entry(notifier.to_owned())
                    .or_default()
                    .queue_depth = v;
            }
        }
        for (k, v) in gauges(now, "sluice_notifier_breaker_open") {
            if let Some(notifier) = label(k, "notifier") {
                p.notifiers
                    .entry(notifier.to_owned())
                    .or_default()
                    .breaker_open = v > 0.0;
            }
        }
        // Alerts.
        for (k, firing) in gauges(now, "sluice_alert_firing") {
            if let Some(rule) = label(k, "rule") {
                let firing = firing.max(0.0) as u64;
                p.alerts.insert(rule.to_owned(), firing);
                p.firing += firing;
            }
        }
        for (k, r) in rates.grown("sluice_stage_busy_seconds_total") {
            if let (Some(stage), Some(name)) = (label(k, "stage"), label(k, "name")) {
                *p.busy.entry(format!("{stage}:{name}")).or_insert(0.0) += r;
            }
        }
        // The pipeline and checkpoints.
        let queue_bytes = gauge(now, "sluice_pipeline_queue_bytes").unwrap_or(0.0);
        let limit_hold = rates
            .grown("sluice_limit_blocked_seconds_total")
            .fold(0.0, |total, (_, r)| total + r);
        p.pipeline = PipelinePoint {
            queue_batches: gauge(now, "sluice_pipeline_queue_batches").unwrap_or(0.0),
            queue_bytes,
            queue_fill: (queue_bytes / self.queue_capacity).clamp(0.0, 1.0),
            backlog_bytes: gauge(now, "sluice_lake_backlog_bytes").unwrap_or(0.0),
            held: gauge(now, "sluice_lake_backlog_held").unwrap_or(0.0) > 0.0,
            limit_hold,
            late_rows: committed
                .get(sluice_core::schema::LATE_TABLE)
                .copied()
                .unwrap_or(0.0),
        };
        p.checkpoint = CheckpointPoint {
            last_seconds: gauge(now, "sluice_checkpoint_last_seconds"),
            last_state_bytes: gauge(now, "sluice_checkpoint_last_state_bytes"),
            last_ms: gauge(now, "sluice_checkpoint_last_ms"),
            total: counter(now, "sluice_checkpoints_total"),
            failures: counter(now, "sluice_checkpoint_failures_total"),
        };
        p
    }

    /// The points of the last `seconds`, oldest first.
    pub(crate) fn since(&self, seconds: usize) -> impl Iterator<Item = &Point> {
        self.ring
            .iter()
            .skip(self.ring.len().saturating_sub(seconds))
    }

    /// The newest point.
    pub(crate) fn latest(&self) -> Option<&Point> {
        self.ring.back()
    }
}

/// The charts' data for a range: one array per series, columns as uPlot takes them.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Series {
    /// Unix seconds.
    pub(crate) t: Vec<f64>,
    pub(crate) events_in: Vec<f64>,
    pub(crate) rows_committed: Vec<f64>,
    pub(crate) dead_letters: Vec<f64>,
    pub(crate) limited: Vec<f64>,
    pub(crate) lag: Vec<Option<f64>>,
    pub(crate) freshness_s: Vec<f64>,
    pub(crate) firing: Vec<f64>,
    /// Events per second of each source (0 before it appeared).
    pub(crate) sources: BTreeMap<String, Vec<f64>>,
}

impl Series {
    pub(crate) fn of<'a>(points: impl Iterator<Item = &'a Point>) -> Self {
        let mut s = Series::default();
        for (i, p) in points.enumerate() {
            s.t.push(p.t as f64 / 1e3);
            s.events_in.push(p.events_in);
            s.rows_committed.push(p.rows_committed);
            s.dead_letters.push(p.dead_letters);
            s.limited.push(p.limited);
            s.lag.push(p.lag.as_ref().map(|l| l.value));
            s.freshness_s.push(p.freshness_s);
            s.firing.push(p.firing as f64);
            for (name, source) in &p.sources {
                s.sources
                    .entry(name.clone())
                    .or_insert_with(|| vec![0.0; i])
                    .push(source.events);
            }
            for column in s.sources.values_mut() {
                column.resize(i + 1, 0.0);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Label;

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
        Key::from_parts(name, labels)
    }

    fn reading(counters: &[(Key, u64)], gauges: &[(Key, f64)]) -> Reading {
        Reading {
            counters: counters.iter().cloned().collect(),
            gauges: gauges.iter().cloned().collect(),
        }
    }

    const RECEIVED: &str = "sluice_source_events_received_total";

    #[test]
    fn busy_and_backpressure_are_seconds_per_second_of_gauges_that_grow() {
        let busy = |stage, name| {
            key(
                "sluice_stage_busy_seconds_total",
                &[("stage", stage), ("name", name)],
            )
        };
        let waited = key(
            "sluice_source_backpressure_seconds_total",
            &[("component", "devices"), ("kind", "mqtt")],
        );
        let received = key(RECEIVED, &[("component", "devices"), ("kind", "mqtt")]);
        let none = BTreeMap::new();
        let mut o = Overview::new(1000);
        let first = [
            (busy("window", "device_minute"), 3.0),
            (busy("lake", "telemetry"), 1.0),
            (waited.clone(), 10.0),
        ];
        assert!(
            o.push(0, reading(&[(received.clone(), 0)], &first), &none)
                .is_none()
        );
        // Two seconds later; the alert rule's gauge appears (it started at 0).
        let p = o
            .push(
                2_000,
                reading(
                    &[(received, 10)],
                    &[
                        (busy("window", "device_minute"), 4.0),
                        (busy("lake", "telemetry"), 1.5),
                        (busy("alert", "temperature_high"), 0.2),
                        (waited, 11.6),
                    ],
                ),
                &none,
            )
            .unwrap()
            .clone();
        assert_eq!(p.busy["window:device_minute"], 0.5);
        assert_eq!(p.busy["lake:telemetry"], 0.25);
        assert_eq!(p.busy["alert:temperature_high"], 0.1);
        assert!((p.sources["devices"].backpressure - 0.8).abs() < 1e-9);
    }

    #[test]
    fn rates_are_per_second_over_the_readings_interval() {
        let mqtt = key(RECEIVED, &[("component", "devices"), ("kind", "mqtt")]);
        let mqtt_bytes = key(
            "sluice_source_bytes_received_total",
            &[("component", "devices"), ("kind", "mqtt")],
        );
        let kafka = key(RECEIVED, &[("component", "clicks"), ("kind", "kafka")]);
        let dead = key(
            "sluice_source_events_dead_lettered_total",
            &[
                ("component", "devices"),
                ("kind", "mqtt"),
                ("reason", "invalid_json"),
            ],
        );
        let committed = key(
            "sluice_lake_rows_committed_total",
            &[("table", "telemetry")],
        );
        let fn_in = key(
            "sluice_function_rows_total",
            &[("function", "hot"), ("direction", "in")],
        );
        let fn_out = key(
            "sluice_function_rows_total",
            &[("function", "hot"), ("direction", "out")],
        );
        let none = BTreeMap::new();
        let mut o = Overview::new(1000);
        assert!(
            o.push(0, reading(&[(mqtt.clone(), 100)], &[]), &none)
                .is_none()
        );
        // Two seconds later; kafka's counter appears (it started at 0 meanwhile).
        let p = o
            .push(
                2_000,
                reading(
                    &[
                        (mqtt.clone(), 1_100),
                        (kafka.clone(), 300),
                        (dead.clone(), 10),
                        (committed.clone(), 4_000),
                        (fn_in, 1_000),
                        (mqtt_bytes, 300_000),
                        (fn_out, 100),
                    ],
                    &[
                        (key("sluice_broker_lag_bytes", &[]), 512.0),
                        (key("sluice_pipeline_queue_bytes", &[]), 250.0),
                        (key("sluice_alert_firing", &[("rule", "hot")]), 2.0),
                    ],
                ),
                &none,
            )
            .unwrap()
            .clone();
        assert_eq!(p.events_in, 650.0);
        assert_eq!(p.sources["devices"].events, 500.0);
        assert_eq!(p.sources["clicks"].events, 150.0);
        assert_eq!(p.sources["devices"].bytes, 150_000.0);
        assert_eq!(p.sources["clicks"].kind, "kafka");
        assert_eq!(p.dead_letters, 5.0);
        assert_eq!(p.dead_letter_reasons["invalid_json"], 5.0);
        assert_eq!(p.dead_letter_totals["invalid_json"], 10);
        assert_eq!(p.sources["devices"].dead_letters, 5.0);
        assert_eq!(p.rows_committed, 2_000.0);
        assert_eq!(p.tables["telemetry"].rows, 2_000.0);
        assert_eq!(p.tables["telemetry"].rows_avg, 2_000.0);
        assert_eq!(p.firing, 2);
        assert_eq!(
            p.functions["hot"],
            FunctionPoint {
                rows_in: 500.0,
                rows_out: 50.0
            }
        );
        assert_eq!(p.pipeline.queue_fill, 0.25);
        let lag = p.lag.unwrap();
        assert_eq!(
            (lag.source.as_str(), lag.value, lag.unit),
            ("devices", 512.0, "bytes")
        );
        assert_eq!(p.sources["devices"].last_event_ms, Some(2_000));
        // A quiet second: rates fall to 0, the last event's time stays. Kafka reports
        // its lag in records, and it is in trouble.
        let lag = key(
            "sluice_source_lag",
            &[
                ("component", "clicks"),
                ("kind", "kafka"),
                ("unit", "records"),
            ],
        );
        let troubles = BTreeMap::from([(
            "clicks".to_owned(),
            sluice_core::status::Trouble {
                error: "broker down".into(),
                since_ms: 2_500,
            },
        )]);
        let p = o
            .push(
                3_000,
                reading(&[(mqtt, 1_100), (kafka, 300)], &[(lag, 70_000.0)]),
                &troubles,
            )
            .unwrap();
        assert_eq!(p.events_in, 0.0);
        assert_eq!(p.sources["devices"].last_event_ms, Some(2_000));
        let clicks = &p.sources["clicks"];
        assert_eq!(
            (clicks.lag, clicks.lag_unit),
            (Some(70_000.0), Some("records"))
        );
        assert_eq!(clicks.error.as_deref(), Some("broker down"));
        assert_eq!(clicks.error_since_ms, Some(2_500));
        let largest = p.lag.as_ref().unwrap();
        assert_eq!(
            (largest.source.as_str(), largest.unit),
            ("clicks", "records")
        );
    }

    #[test]
    fn the_ring_keeps_the_last_hour_and_series_line_up() {
        let devices = key(RECEIVED, &[("component", "devices"), ("kind", "mqtt")]);
        let late = key(RECEIVED, &[("component", "late"), ("kind", "http")]);
        let mut o = Overview::new(1);
        let mut n = 0;
        for s in 0..(RING_POINTS as u64 + 10) {
            let mut counters = vec![(devices.clone(), s * 10)];
            if s >= RING_POINTS as u64 + 5 {
                n += 1;
                counters.push((late.clone(), n));
            }
            o.push(s as i64 * 1_000, reading(&counters, &[]), &BTreeMap::new());
        }
        assert_eq!(o.since(usize::MAX).count(), RING_POINTS);
        assert_eq!(o.latest().unwrap().t, (RING_POINTS as i64 + 9) * 1_000);
        let series = Series::of(o.since(60));
        assert_eq!(series.t.len(), 60);
        assert_eq!(series.t[59], (RING_POINTS as f64 + 9.0));
        assert!(series.events_in[..55].iter().all(|&r| r == 10.0));
        // A source that appeared late has zeros before it, and a column as long.
        assert_eq!(series.sources["late"].len(), 60);
        assert_eq!(series.sources["late"][..55], [0.0; 55]);
        assert_eq!(series.sources["late"][59], 1.0);
    }
}
