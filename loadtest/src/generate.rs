//! Telemetry workloads as JSON lines, in the DESIGN.md format.

use std::io::Write;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What to generate.
#[derive(Debug, Clone)]
pub struct TelemetrySpec {
    /// Number of events.
    pub events: u64,
    /// Number of devices (`dev-000000` …).
    pub devices: u64,
    /// First event time, epoch ms.
    pub start_ms: i64,
    /// Simulated span of event time, ms; events are spread evenly over it.
    pub span_ms: i64,
    /// Each event's time is moved by up to ± this many ms (out-of-order arrival).
    pub disorder_ms: i64,
    /// Fraction of events with `"status":"error"`.
    pub error_fraction: f64,
    /// RNG seed, so a workload can be regenerated exactly.
    pub seed: u64,
}

impl TelemetrySpec {
    /// W1: 10M events, 10k devices, 1 simulated hour, ±2 s disorder, 1% errors.
    pub fn w1() -> Self {
        Self {
            events: 10_000_000,
            devices: 10_000,
            start_ms: 1_767_225_600_000,
            span_ms: 3_600_000,
            disorder_ms: 2_000,
            error_fraction: 0.01,
            seed: 1,
        }
    }
}

/// Writes the workload to `out`, one JSON object per line; returns bytes written.
pub fn write_telemetry(spec: &TelemetrySpec, out: &mut impl Write) -> std::io::Result<u64> {
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let mut line = Vec::with_capacity(160);
    let mut bytes = 0u64;
    let step = spec.span_ms as f64 / spec.events.max(1) as f64;
    for i in 0..spec.events {
        let device = i % spec.devices.max(1);
        let jitter = if spec.disorder_ms > 0 {
            rng.random_range(-spec.disorder_ms..=spec.disorder_ms)
        } else {
            0
        };
        let ts = (spec.start_ms + (i as f64 * step) as i64 + jitter).max(0);
        let temperature = 20.0 + rng.random_range(-5.0..15.0f64);
        let humidity = rng.random_range(30.0..95.0f64);
        let battery = rng.random_range(3.0..4.2f64);
        let status = if rng.random_bool(spec.error_fraction.clamp(0.0, 1.0)) {
            "error"
        } else {
            "ok"
        };
        line.clear();
        writeln!(
            line,
            r#"{{"device_id":"dev-{device:06}","ts":{ts},"temperature":{temperature:.2},"humidity":{humidity:.2},"battery":{battery:.2},"status":"{status}"}}"#
        )?;
        out.write_all(&line)?;
        bytes += line.len() as u64;
    }
    out.flush()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_deterministic_and_decodable() {
        let spec = TelemetrySpec {
            events: 1000,
            devices: 10,
            ..TelemetrySpec::w1()
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_telemetry(&spec, &mut a).unwrap();
        write_telemetry(&spec, &mut b).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        assert_eq!(text.lines().count(), 1000);
        let errors = text
            .lines()
            .filter(|l| l.contains(r#""status":"error""#))
            .count();
        assert!(errors < 40, "about 1% errors, got {errors}");
        assert!(text.starts_with(r#"{"device_id":"dev-000000","ts":"#));
    }
}
