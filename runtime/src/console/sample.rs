//! The console's view of the metrics: a second recorder, beside Prometheus's, that
//! keeps every counter and gauge in a `metrics-util` registry the console can read.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// A recorder whose counters and gauges can be read back ([`Sampler::read`]).
/// Histograms are not kept (the console reads none).
#[derive(Clone)]
pub(crate) struct Sampler {
    registry: Arc<Registry<Key, AtomicStorage>>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").finish_non_exhaustive()
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            registry: Arc::new(Registry::atomic()),
        }
    }
}

/// Every counter and gauge at one instant.
#[derive(Debug, Default, Clone)]
pub(crate) struct Reading {
    pub(crate) counters: HashMap<Key, u64>,
    pub(crate) gauges: HashMap<Key, f64>,
}

impl Sampler {
    /// The values of every counter and gauge now.
    pub(crate) fn read(&self) -> Reading {
        let mut reading = Reading::default();
        self.registry.visit_counters(|key, counter| {
            reading
                .counters
                .insert(key.clone(), counter.load(Ordering::Relaxed));
        });
        self.registry.visit_gauges(|key, gauge| {
            reading
                .gauges
                .insert(key.clone(), f64::from_bits(gauge.load(Ordering::Relaxed)));
        });
        reading
    }
}

impl Recorder for Sampler {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Installs the global recorder: Prometheus's (for `/metrics`) and a [`Sampler`] (for
/// the console), both fed by every `metrics::counter!`/`gauge!` through one fan-out.
pub(crate) fn install() -> anyhow::Result<(metrics_exporter_prometheus::PrometheusHandle, Sampler)>
{
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = prometheus.handle();
    let sampler = Sampler::default();
    let fanout = metrics_util::layers::FanoutBuilder::default()
        .add_recorder(prometheus)
        .add_recorder(sampler.clone())
        .build();
    metrics::set_global_recorder(fanout)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    Ok((handle, sampler))
}
