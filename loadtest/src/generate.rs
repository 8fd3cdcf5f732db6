//! Workloads written to a file as fast as possible (W1 and friends), with the same
//! generators as the paced runs: event times are spread over a simulated span instead
//! of the wall clock.

use std::io::Write;
use std::time::Duration;

use crate::scenario::{Kind, Scenario, ScenarioWorkload};
use crate::workload::{Message, Workload};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    /// Telemetry or clicks.
    pub kind: Kind,
    /// Number of events.
    pub events: u64,
    /// First event time, epoch ms.
    pub start_ms: i64,
    /// Simulated span of event time, ms; events are spread evenly over it.
    pub span_ms: i64,
    /// The fleet and its behaviour (rate and duration are derived from the above).
    pub scenario: Scenario,
}

impl GenerateSpec {
    /// W1: 10M telemetry events, 10k devices, 1 simulated hour, event times up to 2 s
    /// behind arrival order, 1% status=error.
    pub fn w1() -> Self {
        let mut scenario = Scenario {
            fleet: 10_000,
            seed: 1,
            ..Scenario::default()
        };
        scenario.telemetry.disorder_ms = 2_000;
        scenario.telemetry.error_fraction = 0.01;
        Self {
            kind: Kind::Telemetry,
            events: 10_000_000,
            start_ms: 1_767_225_600_000,
            span_ms: 3_600_000,
            scenario,
        }
    }
}

/// Writes the workload to `out`, one payload per line; returns bytes written.
pub fn write_workload(spec: &GenerateSpec, out: &mut impl Write) -> anyhow::Result<u64> {
    let span = Duration::from_millis(spec.span_ms.max(1) as u64);
    let scenario = Scenario {
        kind: Some(spec.kind),
        rate: spec.events as f64 / span.as_secs_f64(),
        per_entity_rate: None,
        duration: span,
        phases: Vec::new(),
        ..spec.scenario.clone()
    };
    scenario.validate()?;
    let mut workload = ScenarioWorkload::new(spec.kind, &scenario, spec.start_ms)?;
    let mut msg = Message::default();
    let mut bytes = 0u64;
    while workload.next(&mut msg).is_some() {
        out.write_all(&msg.payload)?;
        out.write_all(b"\n")?;
        bytes += msg.payload.len() as u64 + 1;
    }
    out.flush()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_deterministic_and_decodable() {
        let mut spec = GenerateSpec::w1();
        spec.events = 1000;
        spec.scenario.fleet = 10;
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_workload(&spec, &mut a).unwrap();
        write_workload(&spec, &mut b).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        assert_eq!(text.lines().count(), 1000);
        let errors = text
            .lines()
            .filter(|l| l.contains(r#""status":"error""#))
            .count();
        assert!(errors < 40, "about 1% errors, got {errors}");
        assert!(text.starts_with(r#"{"device_id":"dev-000000","ts":"#));
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let ts = last["ts"].as_i64().unwrap();
        assert!(ts > spec.start_ms + spec.span_ms - 10_000, "{ts}");
        assert!(ts > spec.start_ms + spec.span_ms - 10_000 && ts < spec.start_ms + spec.span_ms);
    }
}
