//! Scenarios: who sends what, when. A [`Scenario`] comes from a TOML spec file and/or
//! command-line flags; [`ScenarioWorkload`] turns it into a stream of messages, each with
//! its intended send time, deterministic from the seed.
//!
//! Telemetry devices follow a bounded random walk, with optional threshold excursions
//! (so alert rules fire), event-time disorder, a fraction of malformed payloads, and
//! churn (devices that go silent). Clickstream users run sessions: a Zipf-distributed
//! landing page, think time between events, geometric session length, bounces and
//! conversions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use serde::Deserialize;

use crate::workload::{Message, Workload};

/// What kind of traffic a scenario sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// DESIGN.md telemetry from a device fleet.
    Telemetry,
    /// DESIGN.md clickstream from web users.
    Clicks,
}

impl Kind {
    /// The default topic template (`{id}` is the device or user id).
    pub fn default_topic(self) -> &'static str {
        match self {
            Kind::Telemetry => "devices/{id}/telemetry",
            Kind::Clicks => "clicks/{id}",
        }
    }

    /// The default Sluice stream (and lake table) the traffic lands in.
    pub fn default_stream(self) -> &'static str {
        match self {
            Kind::Telemetry => "telemetry",
            Kind::Clicks => "clicks",
        }
    }

    /// The payload field holding the device or user id.
    pub fn id_field(self) -> &'static str {
        match self {
            Kind::Telemetry => "device_id",
            Kind::Clicks => "user_id",
        }
    }
}

/// A load scenario. Every field has a default; a TOML spec sets any of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Telemetry or clicks (the subcommand sets it).
    #[serde(skip)]
    pub kind: Option<Kind>,
    /// Devices (telemetry) or users (clicks).
    pub fleet: u64,
    /// Total events per second. Ignored when `per_entity_rate` is set.
    pub rate: f64,
    /// Events per second per device or user; the total is `fleet × per_entity_rate`.
    pub per_entity_rate: Option<f64>,
    /// How long to send.
    #[serde(with = "humantime_serde_compat")]
    pub duration: Duration,
    /// Optional rate phases (a burst: 10 s at 1k/s, 5 s at 20k/s, …). When present they
    /// replace `rate` and `duration`.
    pub phases: Vec<Phase>,
    /// RNG seed: the same seed sends the same payloads in the same order.
    pub seed: u64,
    /// Topic template; `{id}` is the device or user id.
    pub topic: Option<String>,
    /// Telemetry knobs.
    pub telemetry: TelemetryKnobs,
    /// Clickstream knobs.
    pub clicks: ClickKnobs,
    /// One device or user sending `factor` × the rate of each other one.
    pub flood: Option<Flood>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            kind: None,
            fleet: 1000,
            rate: 1000.0,
            per_entity_rate: None,
            duration: Duration::from_secs(10),
            phases: Vec::new(),
            seed: 1,
            topic: None,
            telemetry: TelemetryKnobs::default(),
            clicks: ClickKnobs::default(),
            flood: None,
        }
    }
}

/// A stretch of time at one rate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// How long the phase lasts.
    #[serde(with = "humantime_serde_compat")]
    pub duration: Duration,
    /// Total events per second during the phase.
    pub rate: f64,
}

/// One entity flooding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flood {
    /// Index of the flooding device or user (0-based).
    #[serde(default)]
    pub entity: u64,
    /// Its rate as a multiple of a normal entity's.
    pub factor: u64,
}

/// Telemetry payload and behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryKnobs {
    /// Extra string fields (`x0`, `x1`, …) added to each payload.
    pub extra_fields: u32,
    /// Length of each extra field's value, bytes.
    pub extra_field_bytes: u32,
    /// Standard step of the temperature random walk per reading.
    pub walk_step: f64,
    /// Chance per reading that a device starts a threshold excursion.
    pub excursion_probability: f64,
    /// Readings an excursion lasts.
    pub excursion_readings: u32,
    /// Temperature during an excursion (above a typical alert threshold of 80).
    pub excursion_temperature: f64,
    /// Event times lag the send time by up to this many ms (out-of-order arrival).
    pub disorder_ms: u64,
    /// Fraction of payloads that are malformed (truncated JSON, wrong types).
    pub malformed_fraction: f64,
    /// Fraction of status values that are `"error"`.
    pub error_fraction: f64,
    /// Fraction of devices that go silent …
    pub churn_fraction: f64,
    /// … after this long.
    #[serde(with = "humantime_serde_compat")]
    pub churn_after: Duration,
}

impl Default for TelemetryKnobs {
    fn default() -> Self {
        Self {
            extra_fields: 0,
            extra_field_bytes: 16,
            walk_step: 0.3,
            excursion_probability: 0.0,
            excursion_readings: 5,
            excursion_temperature: 85.0,
            disorder_ms: 0,
            malformed_fraction: 0.0,
            error_fraction: 0.01,
            churn_fraction: 0.0,
            churn_after: Duration::from_secs(30),
        }
    }
}

/// Clickstream sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickKnobs {
    /// Distinct pages (`/product/<n>` …).
    pub pages: u64,
    /// Zipf exponent of page popularity.
    pub zipf_exponent: f64,
    /// Mean think time between a user's events, ms (exponentially distributed).
    pub think_time_ms: f64,
    /// Mean events per (non-bounced) session.
    pub session_events: f64,
    /// Chance a session is one page view only.
    pub bounce_probability: f64,
    /// Chance a session ends in add_to_cart + purchase.
    pub conversion_probability: f64,
}

impl Default for ClickKnobs {
    fn default() -> Self {
        Self {
            pages: 1000,
            zipf_exponent: 1.1,
            think_time_ms: 2000.0,
            session_events: 8.0,
            bounce_probability: 0.4,
            conversion_probability: 0.03,
        }
    }
}

/// `duration = "10s"` in TOML, through humantime.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

impl Scenario {
    /// Reads a TOML spec file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("bad scenario {}", path.display()))
    }

    /// Every problem with the scenario, each naming its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.fleet == 0 {
            problems.push("fleet: must be at least 1".to_owned());
        }
        if self.phases.is_empty() && self.per_entity_rate.is_none() && !positive(self.rate) {
            problems.push(format!("rate: must be > 0, got {}", self.rate));
        }
        if let Some(r) = self.per_entity_rate
            && !positive(r)
        {
            problems.push(format!("per_entity_rate: must be > 0, got {r}"));
        }
        for (i, p) in self.phases.iter().enumerate() {
            if p.rate.is_nan() || p.rate < 0.0 {
                problems.push(format!("phases[{i}].rate: must be >= 0, got {}", p.rate));
            }
        }
        let t = &self.telemetry;
        for (key, v) in [
            ("telemetry.malformed_fraction", t.malformed_fraction),
            ("telemetry.error_fraction", t.error_fraction),
            ("telemetry.churn_fraction", t.churn_fraction),
            ("telemetry.excursion_probability", t.excursion_probability),
            ("clicks.bounce_probability", self.clicks.bounce_probability),
            (
                "clicks.conversion_probability",
                self.clicks.conversion_probability,
            ),
        ] {
            if !(0.0..=1.0).contains(&v) {
                problems.push(format!("{key}: must be between 0 and 1, got {v}"));
            }
        }
        if !positive(self.clicks.zipf_exponent) {
            problems.push("clicks.zipf_exponent: must be > 0".to_owned());
        }
        if self.clicks.pages == 0 {
            problems.push("clicks.pages: must be at least 1".to_owned());
        }
        if let Some(f) = &self.flood {
            if f.entity >= self.fleet {
                problems.push(format!(
                    "flood.entity: {} is outside the fleet of {}",
                    f.entity, self.fleet
                ));
            }
            if f.factor == 0 {
                problems.push("flood.factor: must be at least 1".to_owned());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("bad scenario:\n  {}", problems.join("\n  "))
        }
    }

    /// The rate phases this scenario runs.
    pub fn schedule(&self) -> Schedule {
        let phases = if self.phases.is_empty() {
            let rate = match self.per_entity_rate {
                Some(r) => r * self.fleet as f64,
                None => self.rate,
            };
            vec![Phase {
                duration: self.duration,
                rate,
            }]
        } else {
            self.phases.clone()
        };
        Schedule::new(&phases)
    }

    /// The topic template in effect.
    pub fn topic_template(&self) -> String {
        let kind = self.kind.unwrap_or(Kind::Telemetry);
        self.topic
            .clone()
            .unwrap_or_else(|| kind.default_topic().to_owned())
    }
}

/// `v > 0`, false for NaN.
fn positive(v: f64) -> bool {
    v > 0.0
}

/// Open-loop send times: event `i` is due at a fixed offset from the start, whatever
/// happened to earlier sends, so a stalled target cannot slow the schedule down.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Per phase: (first event index, start µs, events per second).
    phases: Vec<(u64, f64, f64)>,
    total: u64,
    span_us: f64,
}

impl Schedule {
    /// A schedule from rate phases.
    pub fn new(phases: &[Phase]) -> Self {
        let mut out = Vec::with_capacity(phases.len());
        let mut first = 0u64;
        let mut start_us = 0.0;
        for p in phases {
            let us = p.duration.as_secs_f64() * 1e6;
            out.push((first, start_us, p.rate));
            first += (p.rate * p.duration.as_secs_f64()).round() as u64;
            start_us += us;
        }
        Self {
            phases: out,
            total: first,
            span_us: start_us,
        }
    }

    /// Events in the whole schedule.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Length of the schedule.
    pub fn span(&self) -> Duration {
        Duration::from_micros(self.span_us as u64)
    }

    /// When event `i` is due, µs from the start.
    pub fn due_us(&self, i: u64) -> u64 {
        let idx = self.phases.partition_point(|(first, _, _)| *first <= i);
        let (first, start, rate) = self.phases[idx.saturating_sub(1)];
        if rate <= 0.0 {
            return start as u64;
        }
        (start + (i - first) as f64 * 1e6 / rate).round() as u64
    }
}

/// Per-device telemetry state.
#[derive(Debug, Clone)]
struct Device {
    temperature: f64,
    humidity: f64,
    battery: f64,
    excursion_left: u32,
}

/// Per-user clickstream state.
#[derive(Debug, Clone, Default)]
struct User {
    /// Events left in the current session (0: start a new one).
    left: u32,
    converting: bool,
    page: u64,
}

/// Fills telemetry or click payloads; shared by the paced runs and `generate`.
#[derive(Debug)]
pub struct Generator {
    kind: Kind,
    scenario: Scenario,
    rng: SmallRng,
    topic: String,
    devices: Vec<Device>,
    users: Vec<User>,
    /// Users by the time they are ready for their next event (think time).
    ready: BinaryHeap<Reverse<(u64, u64)>>,
    zipf: Zipf<f64>,
    think: Exp<f64>,
    /// Telemetry: position in the weighted round robin.
    turn: u64,
    /// Devices that go silent at `churn_after`.
    churned: u64,
    extra: Vec<u8>,
    /// Malformed payloads produced.
    pub malformed: u64,
}

impl Generator {
    /// A generator for `scenario`.
    pub fn new(kind: Kind, scenario: &Scenario) -> anyhow::Result<Self> {
        let mut rng = SmallRng::seed_from_u64(scenario.seed);
        let fleet = scenario.fleet.max(1);
        let (devices, users, ready) = match kind {
            Kind::Telemetry => {
                let devices = (0..fleet)
                    .map(|_| Device {
                        temperature: rng.random_range(18.0..30.0),
                        humidity: rng.random_range(30.0..90.0),
                        battery: rng.random_range(3.3..4.2),
                        excursion_left: 0,
                    })
                    .collect();
                (devices, Vec::new(), BinaryHeap::new())
            }
            Kind::Clicks => {
                let users = vec![User::default(); fleet as usize];
                let ready = (0..fleet).map(|u| Reverse((0, u))).collect();
                (Vec::new(), users, ready)
            }
        };
        let c = &scenario.clicks;
        Ok(Self {
            kind,
            rng,
            topic: scenario.topic_template(),
            devices,
            users,
            ready,
            zipf: Zipf::new(c.pages.max(1) as f64, c.zipf_exponent)
                .context("clicks.zipf_exponent")?,
            think: Exp::new(1.0 / c.think_time_ms.max(1.0)).context("clicks.think_time_ms")?,
            turn: 0,
            churned: (scenario.telemetry.churn_fraction * fleet as f64).round() as u64,
            extra: vec![b'x'; scenario.telemetry.extra_field_bytes as usize],
            malformed: 0,
            scenario: scenario.clone(),
        })
    }

    /// The next event: picks the device or user and writes topic, key and payload.
    /// `elapsed` is the time since the run started (for churn and think time);
    /// `event_ms` is the event's wall-clock (or simulated) time.
    pub fn fill(&mut self, elapsed: Duration, event_ms: i64, msg: &mut Message) {
        match self.kind {
            Kind::Telemetry => {
                let device = self.next_device(elapsed);
                self.telemetry(device, event_ms, msg);
            }
            Kind::Clicks => {
                let user = self.next_user(elapsed);
                self.click(user, event_ms, msg);
            }
        }
    }

    /// A probe: a well-formed event from the reserved id `probe_key`, with event time
    /// `event_ms`.
    pub fn probe(&mut self, probe_key: &str, event_ms: i64, msg: &mut Message) {
        probe_payload(self.kind, &self.topic, probe_key, event_ms, msg);
    }

    /// Weighted round robin over the devices still talking; the flooding device takes
    /// `factor` turns per round.
    fn next_device(&mut self, elapsed: Duration) -> u64 {
        let fleet = self.devices.len() as u64;
        let silent = if elapsed >= self.scenario.telemetry.churn_after {
            self.churned.min(fleet - 1)
        } else {
            0
        };
        let talking = fleet - silent;
        let extra_turns = self
            .scenario
            .flood
            .as_ref()
            .map_or(0, |f| f.factor.saturating_sub(1));
        let round = talking + extra_turns;
        let slot = self.turn % round;
        self.turn += 1;
        if slot < extra_turns {
            // The flood's extra turns; a churned flooder keeps flooding.
            return self.scenario.flood.as_ref().map_or(0, |f| f.entity);
        }
        // The silent devices are the first `silent` ones.
        silent + (slot - extra_turns)
    }

    fn write_topic(&self, msg: &mut Message) {
        write_topic(&self.topic, msg);
    }

    fn telemetry(&mut self, device: u64, event_ms: i64, msg: &mut Message) {
        msg.clear();
        let _ = write!(msg.key, "dev-{device:06}");
        self.write_topic(msg);
        let knobs = &self.scenario.telemetry;
        let rng = &mut self.rng;
        let d = &mut self.devices[device as usize];
        let lag = if knobs.disorder_ms > 0 {
            rng.random_range(0..=knobs.disorder_ms) as i64
        } else {
            0
        };
        let ts = event_ms - lag;
        let temperature = if d.excursion_left > 0 {
            d.excursion_left -= 1;
            knobs.excursion_temperature + rng.random_range(0.0..2.0)
        } else {
            if knobs.excursion_probability > 0.0 && rng.random_bool(knobs.excursion_probability) {
                d.excursion_left = knobs.excursion_readings;
            }
            d.temperature =
                (d.temperature + rng.random_range(-1.0..1.0) * knobs.walk_step).clamp(10.0, 40.0);
            d.temperature
        };
        d.humidity = (d.humidity + rng.random_range(-0.5..0.5)).clamp(5.0, 99.0);
        d.battery = (d.battery - rng.random_range(0.0..0.0005)).max(2.9);
        let status = if rng.random_bool(knobs.error_fraction) {
            "error"
        } else {
            "ok"
        };
        let malformed = knobs.malformed_fraction > 0.0 && rng.random_bool(knobs.malformed_fraction);
        let key = &msg.key;
        let p = &mut msg.payload;
        if malformed {
            self.malformed += 1;
            // Two kinds a real fleet produces: a wrong type and a cut-off message.
            let _ = if rng.random_bool(0.5) {
                write!(
                    p,
                    r#"{{"device_id":"{key}","ts":{ts},"temperature":"hot","status":"{status}"}}"#
                )
            } else {
                write!(p, r#"{{"device_id":"{key}","ts":{ts},"tempera"#)
            };
            return;
        }
        let _ = write!(
            p,
            r#"{{"device_id":"{key}","ts":{ts},"temperature":{temperature:.2},"humidity":{:.2},"battery":{:.2},"status":"{status}""#,
            d.humidity, d.battery
        );
        for i in 0..knobs.extra_fields {
            let _ = write!(p, r#","x{i}":""#);
            p.extend_from_slice(&self.extra);
            p.push(b'"');
        }
        p.push(b'}');
    }

    /// The user whose think time ran out first.
    fn next_user(&mut self, elapsed: Duration) -> u64 {
        let now_ms = elapsed.as_millis() as u64;
        let Some(Reverse((_, user))) = self.ready.pop() else {
            return 0;
        };
        let think = self.think.sample(&mut self.rng) as u64;
        let u = &self.users[user as usize];
        // Between sessions a user is away ten times as long.
        let gap = if u.left <= 1 { think * 10 } else { think };
        self.ready.push(Reverse((now_ms + gap, user)));
        user
    }

    fn click(&mut self, user: u64, event_ms: i64, msg: &mut Message) {
        msg.clear();
        let _ = write!(msg.key, "u-{user}");
        self.write_topic(msg);
        let knobs = &self.scenario.clicks;
        let rng = &mut self.rng;
        let u = &mut self.users[user as usize];
        let referrer = u.page;
        let (event, page) = if u.left == 0 {
            // A new session: a landing page by popularity.
            u.left = if rng.random_bool(knobs.bounce_probability) {
                1
            } else {
                // Geometric with the configured mean, at least 2 events.
                let p = 1.0 / knobs.session_events.max(2.0);
                let mut n = 2;
                while !rng.random_bool(p) && n < 500 {
                    n += 1;
                }
                n
            };
            u.converting = u.left > 2 && rng.random_bool(knobs.conversion_probability);
            ("page_view", self.zipf.sample(rng) as u64)
        } else if u.converting && u.left == 2 {
            ("add_to_cart", u.page)
        } else if u.converting && u.left == 1 {
            ("purchase", u.page)
        } else if rng.random_bool(0.3) {
            ("click", u.page)
        } else {
            ("page_view", self.zipf.sample(rng) as u64)
        };
        u.left -= 1;
        u.page = page;
        let p = &mut msg.payload;
        let _ = write!(
            p,
            r#"{{"user_id":"u-{user}","session_hint":null,"ts":{event_ms},"event":"{event}","page":"/product/{page}","referrer":"#
        );
        let _ = if referrer == 0 {
            write!(p, r#""/""#)
        } else {
            write!(p, r#""/product/{referrer}""#)
        };
        p.extend_from_slice(br#","ua":"Mozilla/5.0 (X11; Linux x86_64) sluice-loadtest"}"#);
    }
}

/// Expands the topic template with the message's key.
fn write_topic(template: &str, msg: &mut Message) {
    for (i, part) in template.split("{id}").enumerate() {
        if i > 0 {
            msg.topic.push_str(&msg.key);
        }
        msg.topic.push_str(part);
    }
}

/// A probe event: well-formed, from the reserved id `key`, with event time `event_ms`,
/// so a query for that id finds exactly the probes.
pub fn probe_payload(kind: Kind, topic: &str, key: &str, event_ms: i64, msg: &mut Message) {
    msg.clear();
    msg.key.push_str(key);
    write_topic(topic, msg);
    let p = &mut msg.payload;
    let _ = match kind {
        Kind::Telemetry => write!(
            p,
            r#"{{"device_id":"{key}","ts":{event_ms},"temperature":20.0,"humidity":50.0,"battery":4.0,"status":"ok"}}"#
        ),
        Kind::Clicks => write!(
            p,
            r#"{{"user_id":"{key}","session_hint":null,"ts":{event_ms},"event":"page_view","page":"/","referrer":null,"ua":"sluice-loadtest"}}"#
        ),
    };
}

/// A scenario as a paced [`Workload`]: event `i` is due at [`Schedule::due_us`].
#[derive(Debug)]
pub struct ScenarioWorkload {
    generator: Generator,
    schedule: Schedule,
    next: u64,
    /// Event time of offset 0, epoch ms.
    epoch_ms: i64,
}

impl ScenarioWorkload {
    /// A workload whose event times start at `epoch_ms`.
    pub fn new(kind: Kind, scenario: &Scenario, epoch_ms: i64) -> anyhow::Result<Self> {
        Ok(Self {
            generator: Generator::new(kind, scenario)?,
            schedule: scenario.schedule(),
            next: 0,
            epoch_ms,
        })
    }

    /// Malformed payloads produced so far.
    pub fn malformed(&self) -> u64 {
        self.generator.malformed
    }
}

impl Workload for ScenarioWorkload {
    fn next(&mut self, msg: &mut Message) -> Option<u64> {
        if self.next >= self.schedule.total() {
            return None;
        }
        let due = self.schedule.due_us(self.next);
        self.next += 1;
        let event_ms = self.epoch_ms + (due / 1000) as i64;
        self.generator
            .fill(Duration::from_micros(due), event_ms, msg);
        Some(due)
    }

    fn total(&self) -> Option<u64> {
        Some(self.schedule.total())
    }

    fn probe(&mut self, key: &str, due_us: u64, msg: &mut Message) {
        let event_ms = self.epoch_ms + (due_us / 1000) as i64;
        self.generator.probe(key, event_ms, msg);
    }

    fn malformed(&self) -> u64 {
        self.generator.malformed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(kind: Kind) -> Scenario {
        Scenario {
            kind: Some(kind),
            fleet: 10,
            rate: 1000.0,
            duration: Duration::from_secs(2),
            ..Scenario::default()
        }
    }

    fn drain(w: &mut dyn Workload) -> Vec<(u64, Message)> {
        let mut out = Vec::new();
        let mut msg = Message::default();
        while let Some(due) = w.next(&mut msg) {
            out.push((due, msg.clone()));
        }
        out
    }

    #[test]
    fn schedule_spreads_events_over_phases() {
        let s = Schedule::new(&[
            Phase {
                duration: Duration::from_secs(1),
                rate: 10.0,
            },
            Phase {
                duration: Duration::from_secs(1),
                rate: 100.0,
            },
        ]);
        assert_eq!(s.total(), 110);
        assert_eq!(s.due_us(0), 0);
        assert_eq!(s.due_us(9), 900_000);
        assert_eq!(s.due_us(10), 1_000_000);
        assert_eq!(s.due_us(109), 1_990_000);
        assert_eq!(s.span(), Duration::from_secs(2));
    }

    #[test]
    fn telemetry_is_deterministic_valid_json_and_round_robin() {
        let sc = scenario(Kind::Telemetry);
        let a = drain(&mut ScenarioWorkload::new(Kind::Telemetry, &sc, 1_000).unwrap());
        let b = drain(&mut ScenarioWorkload::new(Kind::Telemetry, &sc, 1_000).unwrap());
        assert_eq!(a.len(), 2000);
        assert_eq!(
            a.iter().map(|(_, m)| &m.payload).collect::<Vec<_>>(),
            b.iter().map(|(_, m)| &m.payload).collect::<Vec<_>>()
        );
        for (i, (due, m)) in a.iter().enumerate() {
            assert_eq!(*due, i as u64 * 1000);
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let id = format!("dev-{:06}", i % 10);
            assert_eq!(v["device_id"], id.as_str());
            assert_eq!(m.topic, format!("devices/{id}/telemetry"));
            assert_eq!(v["ts"], 1_000 + i as i64);
        }
    }

    #[test]
    fn flood_churn_malformed_and_excursions() {
        let mut sc = scenario(Kind::Telemetry);
        sc.flood = Some(Flood {
            entity: 3,
            factor: 100,
        });
        sc.telemetry.malformed_fraction = 0.1;
        sc.telemetry.excursion_probability = 0.05;
        sc.telemetry.churn_fraction = 0.5;
        sc.telemetry.churn_after = Duration::from_secs(1);
        let mut w = ScenarioWorkload::new(Kind::Telemetry, &sc, 0).unwrap();
        let events = drain(&mut w);
        let count = |id: &str, from: u64, to: u64| {
            events
                .iter()
                .filter(|(d, m)| m.key == id && (from..to).contains(d))
                .count()
        };
        // First second: 1000 events, 109 turns per round, device 3 takes 100 of them
        // (99 extra turns first, then its own): 9 rounds, then 19 extra turns.
        assert_eq!(count("dev-000003", 0, 1_000_000), 9 * 100 + 19);
        assert!(count("dev-000000", 0, 1_000_000) > 5);
        // After churn_after the first half (devices 0..5) is silent, but not the flooder.
        assert_eq!(count("dev-000000", 1_000_000, 2_000_000), 0);
        assert!(count("dev-000003", 1_000_000, 2_000_000) > 900);
        assert!(count("dev-000007", 1_000_000, 2_000_000) > 5);
        let bad = events
            .iter()
            .filter(|(_, m)| serde_json::from_slice::<serde_json::Value>(&m.payload).is_err())
            .count() as u64;
        let wrong_type = events
            .iter()
            .filter(|(_, m)| m.payload.windows(5).any(|w| w == b"\"hot\""))
            .count() as u64;
        assert_eq!(bad + wrong_type, w.malformed());
        assert!(w.malformed() > 100, "{}", w.malformed());
        let hot = events
            .iter()
            .filter_map(|(_, m)| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
            .filter(|v| v["temperature"].as_f64().is_some_and(|t| t > 80.0))
            .count();
        assert!(hot > 50, "excursions above 80: {hot}");
    }

    #[test]
    fn clicks_follow_sessions_and_zipf() {
        let mut sc = scenario(Kind::Clicks);
        sc.fleet = 200;
        sc.rate = 5000.0;
        sc.clicks.conversion_probability = 0.5;
        let events = drain(&mut ScenarioWorkload::new(Kind::Clicks, &sc, 0).unwrap());
        let mut kinds = std::collections::HashMap::<String, u64>::new();
        let mut pages = std::collections::HashMap::<String, u64>::new();
        for (_, m) in &events {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert!(m.topic.starts_with("clicks/u-"));
            *kinds
                .entry(v["event"].as_str().unwrap().to_owned())
                .or_default() += 1;
            *pages
                .entry(v["page"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        for k in ["page_view", "click", "add_to_cart", "purchase"] {
            assert!(kinds.get(k).copied().unwrap_or(0) > 0, "{k}: {kinds:?}");
        }
        // Zipf: the most popular page is far ahead of the median one.
        let mut counts: Vec<u64> = pages.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        assert!(
            counts[0] > 10 * counts[counts.len() / 2],
            "{:?}",
            &counts[..5]
        );
    }

    #[test]
    fn shipped_scenarios_parse_and_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let sc = Scenario::from_file(&path).unwrap();
            sc.validate().unwrap();
            assert!(sc.schedule().total() > 0, "{}", path.display());
            n += 1;
        }
        assert!(n >= 4);
        let flood = Scenario::from_file(&dir.join("flood.toml")).unwrap();
        // 999 normal devices at 5/s and the flooder at 500/s.
        assert_eq!(flood.schedule().total(), 5495 * 60);
        let burst = Scenario::from_file(&dir.join("burst.toml")).unwrap();
        assert_eq!(burst.schedule().total(), 40_000 + 400_000 + 60_000);
    }

    #[test]
    fn validation_names_every_bad_key() {
        let sc: Scenario = toml::from_str(
            "fleet = 0\nrate = -1\n[telemetry]\nmalformed_fraction = 2.0\n[flood]\nentity = 5\nfactor = 0\n",
        )
        .unwrap();
        let err = sc.validate().unwrap_err().to_string();
        for key in [
            "fleet:",
            "rate:",
            "telemetry.malformed_fraction",
            "flood.entity",
            "flood.factor",
        ] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
        assert!(toml::from_str::<Scenario>("fleat = 3").is_err());
    }
}
