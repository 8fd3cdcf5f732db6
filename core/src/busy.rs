//! Where the pipeline's time goes, stage by stage, as Flink's web UI shows it: the
//! seconds each function, window, alert rule and table writer spent working
//! (`sluice_stage_busy_seconds_total{stage, name}`), and the seconds each source spent
//! waiting for room in the queue to the lake task
//! (`sluice_source_backpressure_seconds_total{component, kind}`). The console turns
//! both into a fraction of each second and a LOW, MEDIUM or HIGH badge per stage.
//!
//! Timed per batch, never per row: one clock read before and one after.

use std::time::Instant;

/// Seconds one stage spent working: a gauge that only grows (metrics counters are
/// integers).
#[derive(Debug, Clone)]
pub struct Busy(metrics::Gauge);

impl Busy {
    /// The busy time of `name` in `stage` (`function`, `window`, `alert` or `lake`).
    pub fn stage(stage: &'static str, name: &str) -> Self {
        Self(
            metrics::gauge!("sluice_stage_busy_seconds_total", "stage" => stage, "name" => name.to_owned()),
        )
    }

    /// The time a source waited for room in the queue to the lake task.
    pub fn backpressure(component: &str, kind: &'static str) -> Self {
        Self(
            metrics::gauge!("sluice_source_backpressure_seconds_total", "component" => component.to_owned(), "kind" => kind),
        )
    }

    /// Adds the time since `start`.
    pub fn since(&self, start: Instant) {
        self.0.increment(start.elapsed().as_secs_f64());
    }

    /// Runs `work` and adds the time it took.
    pub fn time<R>(&self, work: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let result = work();
        self.since(start);
        result
    }
}
