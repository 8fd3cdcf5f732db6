//! Alert rules: threshold (consecutive, M-of-N, for a duration, with hysteresis) and
//! missing-data rules over a stream or a window table, with cooldown and a global cap.
//!
//! A rule's SQL (`condition`, `clear`, `value`) is compiled once into DataFusion
//! physical expressions, like a function's, and evaluated per batch with Arrow
//! kernels. One pass over the rows then drives the per-key state machine:
//!
//! ```text
//!            hit (not enough yet)            enough hits (M of the last N, or
//!   ┌────┐ ───────────────────────▶ ┌───────┐  the condition held `for` long)  ┌────────┐
//!   │ ok │                          │pending│ ───────────────────────────────▶ │ firing │
//!   └────┘ ◀─────────────────────── └───────┘                                   └────────┘
//!     ▲      no hit left in the window                                              │
//!     └──────────────────────── clear held `clear_for` times in a row ──────────────┘
//!                                (history restarts: a new fire needs new hits)
//! ```
//!
//! `ok` → `firing` directly when one evaluation is enough. A fire starts an episode
//! (`alert_id` = `<rule>/<key>/<episode>`); its resolve carries the same id. Only
//! transitions produce output: a row of the `alerts` table and, unless muted, a
//! [`Notification`]. An episode is muted when it fires within `cooldown` of the key's
//! last notified fire, or when the global cap refuses its fire; a muted episode's
//! resolve is muted too. Refusals by the cap are counted and summarised by one
//! `suppressed` notification once the cap lets notifications through again.
//!
//! A window rule tags each evaluation with its `window_start`: a window re-emitted by
//! allowed lateness replaces its own evaluation instead of adding one.
//!
//! A key holds state from its first hit. A checkpoint forgets the keys of a rule over
//! raw events that hit but never fired and whose hits have left their history: their
//! next hit starts from the same place either way, so forgetting changes no output
//! (under the state budget), wherever a checkpoint falls or fails. A key that fired
//! keeps its episode count (alert ids must come out the same in a replay), a window
//! rule's keys stay (a late window replaces its own evaluation in the history), and so
//! do the keys of a rule whose explicit `clear` with `clear_for` over 1 counts the
//! hitless history towards a resolve.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Float64Array, Float64Builder,
    StringBuilder, TimestampMillisecondBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::physical_expr::PhysicalExpr;
use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sluice_core::busy::Busy;
use sluice_core::schema::{ALERTS_TABLE, KEY_META, alerts_schema, event_time_column};
use sluice_core::{Clock, Notification, StreamBatch};

use crate::function::{compile_value, predicate};
use crate::{Error, Result};

#[cfg(test)]
mod tests;

/// When a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fire {
    /// `m` of the newest `n` evaluations hold (`m == n`: `m` in a row).
    Count {
        /// Evaluations that must hold.
        m: u32,
        /// Out of this many newest ones (at most 64).
        n: u32,
    },
    /// The condition held without a break for this long in event time.
    Duration {
        /// Milliseconds.
        ms: i64,
    },
}

/// A rule as the config declares it.
#[derive(Debug, Clone)]
pub struct AlertSpec {
    /// The rule's name.
    pub name: String,
    /// Its config path, e.g. `alerts.temperature_high`, for error messages.
    pub key: String,
    /// The stream or window table it reads.
    pub input: String,
    /// Predicate counting toward firing; `None` for a missing-data rule.
    pub condition: Option<String>,
    /// Predicate counting toward resolving; `None`: `NOT condition`.
    pub clear: Option<String>,
    /// Expression reported as `value`.
    pub value: Option<String>,
    /// Key columns; empty: the input's key column.
    pub group_by: Vec<String>,
    /// When to fire.
    pub fire: Fire,
    /// Consecutive clear evaluations that resolve.
    pub clear_for: u32,
    /// Missing data: fire when a key is silent this long (pipeline clock, ms).
    pub missing_after_ms: Option<i64>,
    /// Notification cooldown per key (pipeline clock, ms).
    pub cooldown_ms: i64,
    /// Carried into every event.
    pub severity: String,
    /// Carried into every event.
    pub labels: BTreeMap<String, String>,
    /// Message template (see the config reference).
    pub message: Option<String>,
    /// Notifiers to send to.
    pub notify: Vec<String>,
}

/// The global notification cap.
#[derive(Debug, Clone, Copy)]
pub struct AlertingSpec {
    /// Notifications per second across all rules.
    pub per_second: u32,
    /// Allowed at once above the rate.
    pub burst: u32,
}

/// One evaluation in a key's history.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Eval {
    /// `window_start` for a window rule (a late update replaces its window's entry);
    /// `i64::MIN` for raw events.
    tag: i64,
    hit: bool,
    clear: bool,
}

/// What a rule remembers about one key; it is checkpointed as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct KeyState {
    firing: bool,
    /// Newest last; at most max(n, clear_for) entries.
    history: VecDeque<Eval>,
    /// Duration rules: event time since which the condition has held.
    since: Option<i64>,
    episode: u64,
    fired_at: i64,
    /// The current episode's notifications are suppressed.
    muted: bool,
    /// Pipeline-clock time of the last notified fire.
    last_notified: Option<i64>,
    /// Pipeline-clock time of the last row (missing-data rules).
    last_seen: i64,
}

impl KeyState {
    /// `ok`, `pending` or `firing`.
    fn state(&self) -> &'static str {
        if self.firing {
            "firing"
        } else if self.since.is_some() || self.history.iter().any(|e| e.hit) {
            "pending"
        } else {
            "ok"
        }
    }
}

/// A fire or resolve, before it becomes a row and a notification.
#[derive(Debug)]
struct Transition {
    rule: usize,
    key: String,
    fire: bool,
    episode: u64,
    value: Option<f64>,
    message: String,
    at: i64,
    fired_at: i64,
    window: Option<(i64, i64)>,
    notified: bool,
}

/// A compiled rule and its per-key state.
#[derive(Clone)]
struct Rule {
    name: Arc<str>,
    input: String,
    condition: Option<Arc<dyn PhysicalExpr>>,
    clear: Option<Arc<dyn PhysicalExpr>>,
    value: Option<Arc<dyn PhysicalExpr>>,
    group: Vec<usize>,
    group_names: Vec<String>,
    time: usize,
    window: Option<(usize, usize)>,
    fire: Fire,
    clear_for: u32,
    missing_after_ms: Option<i64>,
    cooldown_ms: i64,
    severity: Arc<str>,
    labels: Value,
    message: String,
    notify: Arc<[String]>,
    keys: HashMap<String, KeyState>,
    /// Heap bytes of the keys' names, kept as keys come and go, so that
    /// [`Alerts::state_size`] need not walk them.
    key_bytes: usize,
    busy: Busy,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// The pipeline's clock, as governor reads time (so tests drive the cap by hand).
#[derive(Clone)]
pub(crate) struct CapClock(pub(crate) Arc<dyn Clock>);

impl GovernorClock for CapClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(
            u64::try_from(self.0.now_ms())
                .unwrap_or(0)
                .saturating_mul(1_000_000),
        )
    }
}

pub(crate) type Cap = RateLimiter<NotKeyed, InMemoryState, CapClock, NoOpMiddleware<Nanos>>;

/// Whether notifications may go out now (the global cap), and how many it refused.
struct Gate {
    cap: Cap,
    suppressed: u64,
}

impl Gate {
    fn allow(&mut self) -> bool {
        let ok = self.cap.check().is_ok();
        if !ok {
            self.suppressed += 1;
        }
        ok
    }
}

/// Every rule of a pipeline, indexed by the stream or window they read.
pub struct Alerts {
    rules: Vec<Rule>,
    readers: HashMap<String, Vec<usize>>,
    /// Shared by every partition's rules (see [`Alerts::fresh_like`]): the cap is one.
    gate: Arc<std::sync::Mutex<Gate>>,
    clock: Arc<dyn Clock>,
    notifications: Vec<Notification>,
    transitions: Vec<Transition>,
    /// Pipeline-clock time of the last missing-data scan.
    last_scan: i64,
    /// Rows the loop guard stopped since the last scan, by stream, and the limit.
    loops: std::collections::BTreeMap<String, u64>,
    max_hops: u8,
    /// The state budget (`[limits] window_state`) is spent: rules keep the keys they
    /// hold and take no new ones (see [`Alerts::set_over_budget`]).
    over_budget: bool,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// How often missing-data rules look for silent keys.
const SCAN_EVERY_MS: i64 = 1_000;

impl Alerts {
    /// Compiles `specs` against the schemas of the streams and window tables (by
    /// name). Returns every problem at once, each naming its config key.
    pub fn build(
        specs: &[AlertSpec],
        schemas: &HashMap<String, SchemaRef>,
        cap: AlertingSpec,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Vec<Error>> {
        let mut rules = Vec::new();
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut errors = Vec::new();
        for spec in specs {
            let Some(schema) = schemas.get(&spec.input) else {
                errors.push(config(
                    &format!("{}.input", spec.key),
                    format!(
                        "{:?} is not a declared stream, a function's output or a window",
                        spec.input
                    ),
                ));
                continue;
            };
            match Rule::compile(spec, schema) {
                Ok(rule) => {
                    readers
                        .entry(spec.input.clone())
                        .or_default()
                        .push(rules.len());
                    rules.push(rule);
                }
                Err(mut more) => errors.append(&mut more),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let per_second = NonZeroU32::new(cap.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cap.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Ok(Self {
            rules,
            readers,
            gate: Arc::new(std::sync::Mutex::new(Gate {
                cap: RateLimiter::direct_with_clock(quota, CapClock(clock.clone())),
                suppressed: 0,
            })),
            clock,
            notifications: Vec::new(),
            transitions: Vec::new(),
            last_scan: i64::MIN,
            loops: Default::default(),
            max_hops: 0,
            over_budget: false,
        })
    }

    /// The same rules with no key state, sharing this one's notification cap: the
    /// rules of one source partition (see `crate::window::Instances`).
    pub fn fresh_like(&self) -> Self {
        let mut rules = self.rules.clone();
        for rule in &mut rules {
            rule.keys.clear();
            rule.key_bytes = 0;
        }
        Self {
            rules,
            readers: self.readers.clone(),
            gate: self.gate.clone(),
            clock: self.clock.clone(),
            notifications: Vec::new(),
            transitions: Vec::new(),
            last_scan: i64::MIN,
            loops: Default::default(),
            max_hops: self.max_hops,
            over_budget: self.over_budget,
        }
    }

    /// Whether any rule reads `input`.
    pub fn reads(&self, input: &str) -> bool {
        self.readers.contains_key(input)
    }

    /// Evaluates the rules reading `input` on `batch`; transitions go to `out` (as an
    /// `alerts` batch) and to the notifications.
    pub fn process(
        &mut self,
        input: &str,
        batch: &RecordBatch,
        out: &mut Vec<StreamBatch>,
    ) -> Result<()> {
        let Some(readers) = self.readers.get(input) else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        let mut result = Ok(());
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        for &i in readers {
            let started = Instant::now();
            let rule = &mut self.rules[i];
            let full = self.over_budget;
            if let Err(e) = rule.evaluate(i, batch, now, full, &mut gate, &mut self.transitions) {
                result = Err(e);
            }
            rule.busy.since(started);
        }
        drop(gate);
        self.emit(out);
        result
    }

    /// Approximate heap bytes of every rule's per-key state: counted with the
    /// windows' against `[limits] window_state`, as a device id is enough to add one.
    /// O(rules), not O(keys): it is measured every 250 ms. A key's history is taken
    /// at the most its deque can hold (it grows by doubling up to the rule's length).
    pub fn state_size(&self) -> usize {
        self.rules
            .iter()
            .map(|r| {
                let history = (r.history_len() + 1).next_power_of_two().max(4);
                r.keys.capacity() * (size_of::<(String, KeyState)>() + 8)
                    + r.key_bytes
                    + r.keys.len() * history * size_of::<Eval>()
            })
            .sum()
    }

    /// Over the state budget, rules take no new keys (a key not yet held is not
    /// evaluated, counted in `sluice_alert_refused_keys_total`); keys held go on.
    pub fn set_over_budget(&mut self, over: bool) {
        self.over_budget = over;
    }

    /// Missing-data rules fire for keys silent too long; a cap that refused
    /// notifications sends its summary once it lets one through.
    pub fn tick(&mut self, out: &mut Vec<StreamBatch>) {
        let now = self.clock.now_ms();
        let scan = now.saturating_sub(self.last_scan) >= SCAN_EVERY_MS;
        if scan {
            self.last_scan = now;
            let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            for (i, rule) in self.rules.iter_mut().enumerate() {
                rule.scan_silent(i, now, &mut gate, &mut self.transitions);
            }
        }
        self.emit(out);
        let suppressed = {
            let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            if gate.suppressed > 0 && gate.cap.check().is_ok() {
                std::mem::take(&mut gate.suppressed)
            } else {
                0
            }
        };
        if suppressed > 0 {
            let n = suppressed;
            metrics::counter!("sluice_alert_notifications_suppressed_total", "reason" => "storm_cap")
                .increment(n);
            let message = format!("{n} alert notifications suppressed by the global cap");
            let event = SystemEvent {
                rule: "_storm",
                key: "",
                event: "suppressed",
                severity: "warning",
                value: n,
                message,
            };
            self.system_event(event, now, out);
        }
        if scan {
            for (stream, n) in std::mem::take(&mut self.loops) {
                let message = format!(
                    "{n} rows bound for stream {stream:?} stopped after limits.max_hops = {} hops: an output feeds back into an input",
                    self.max_hops
                );
                let event = SystemEvent {
                    rule: "_loop",
                    key: &stream,
                    event: "loop_detected",
                    severity: "critical",
                    value: n,
                    message,
                };
                self.system_event(event, now, out);
            }
        }
    }

    /// Records `n` rows bound for `stream` stopped by the loop guard; one
    /// `loop_detected` event per stream goes out at the next scan (at most one a second).
    pub fn loop_detected(&mut self, stream: &str, n: u64, max_hops: u8) {
        self.max_hops = max_hops;
        *self.loops.entry(stream.to_owned()).or_default() += n;
    }

    /// The notifications produced since the last call.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.notifications)
    }

    /// The rule whose snapshot name is `name`.
    fn rule_saved_as(&mut self, name: &str) -> Option<&mut Rule> {
        self.rules
            .iter_mut()
            .find(|r| snapshot_name(&r.name) == name)
    }

    /// Each rule's snapshot name (`alert-<rule>`).
    pub fn snapshot_names(&self) -> impl Iterator<Item = String> + '_ {
        self.rules.iter().map(|r| snapshot_name(&r.name))
    }

    /// Writes the state of the rule whose snapshot name is `name` to `out` as JSON,
    /// after forgetting the keys with nothing to remember; `false` if there is no
    /// such rule.
    pub fn snapshot(&mut self, name: &str, out: &mut dyn std::io::Write) -> Result<bool> {
        let Some(rule) = self.rule_saved_as(name) else {
            return Ok(false);
        };
        rule.forget_idle();
        serde_json::to_writer(out, &rule.keys).map_err(|e| Error::Window {
            message: format!("alert {:?}: snapshot: {e}", rule.name),
        })?;
        Ok(true)
    }

    /// Restores the rule whose snapshot name is `name` from `input`; `false` if there
    /// is none.
    pub fn restore(&mut self, name: &str, input: &mut dyn std::io::Read) -> Result<bool> {
        let Some(rule) = self.rule_saved_as(name) else {
            return Ok(false);
        };
        rule.keys = serde_json::from_reader(input).map_err(|e| Error::Window {
            message: format!("alert {:?}: restore: {e}", rule.name),
        })?;
        rule.key_bytes = rule.keys.keys().map(String::capacity).sum();
        Ok(true)
    }

    /// How many keys each rule holds state for, and how many are firing.
    pub fn gauges(&self) -> impl Iterator<Item = (&str, usize, usize)> {
        self.rules.iter().map(|r| {
            let firing = r.keys.values().filter(|k| k.firing).count();
            (&*r.name, r.keys.len(), firing)
        })
    }

    /// The state (`ok`, `pending`, `firing`) of `key` under `rule`.
    pub fn state_of(&self, rule: &str, key: &str) -> Option<&'static str> {
        let r = self.rules.iter().find(|r| &*r.name == rule)?;
        Some(r.keys.get(key).map_or("ok", KeyState::state))
    }

    /// Turns the pending transitions into an `alerts` batch and notifications.
    fn emit(&mut self, out: &mut Vec<StreamBatch>) {
        if self.transitions.is_empty() {
            return;
        }
        let transitions = std::mem::take(&mut self.transitions);
        let n = transitions.len();
        let mut b = AlertRows::with_capacity(n);
        for t in &transitions {
            let rule = &self.rules[t.rule];
            let alert_id = format!("{}/{}/{}", rule.name, t.key, t.episode);
            let event = if t.fire { "fire" } else { "resolve" };
            let resolved_at = (!t.fire).then_some(t.at);
            b.push(&AlertRow {
                alert_id: &alert_id,
                rule: &rule.name,
                key: &t.key,
                event,
                severity: &rule.severity,
                value: t.value,
                message: &t.message,
                labels: &rule.labels.to_string(),
                notified: t.notified,
                window: t.window,
                fired_at: Some(t.fired_at),
                resolved_at,
                at: t.at,
            });
            metrics::counter!("sluice_alert_events_total", "rule" => rule.name.to_string(), "event" => event)
                .increment(1);
            if !t.notified || rule.notify.is_empty() {
                continue;
            }
            let mut fields = Map::new();
            fields.insert("alert_id".into(), alert_id.into());
            fields.insert("rule".into(), Value::from(&*rule.name));
            fields.insert("key".into(), Value::from(t.key.as_str()));
            fields.insert("event".into(), event.into());
            if rule.group_names.len() == 1 {
                fields.insert(rule.group_names[0].clone(), Value::from(t.key.as_str()));
            } else {
                for (name, part) in rule.group_names.iter().zip(t.key.split('|')) {
                    fields.insert(name.clone(), part.into());
                }
            }
            fields.insert("severity".into(), Value::from(&*rule.severity));
            fields.insert("labels".into(), rule.labels.clone());
            fields.insert("value".into(), t.value.map_or(Value::Null, Value::from));
            fields.insert("message".into(), Value::from(t.message.as_str()));
            fields.insert("at".into(), t.at.into());
            fields.insert("fired_at".into(), t.fired_at.into());
            fields.insert(
                "resolved_at".into(),
                resolved_at.map_or(Value::Null, Value::from),
            );
            let (start, end) = t
                .window
                .map_or((Value::Null, Value::Null), |(s, e)| (s.into(), e.into()));
            fields.insert("window_start".into(), start);
            fields.insert("window_end".into(), end);
            self.notifications.push(Notification {
                notify: rule.notify.clone(),
                fields,
            });
        }
        out.push(StreamBatch::new(ALERTS_TABLE.into(), b.finish()));
    }

    /// An event of Sluice itself (the cap's `suppressed` summary, the loop guard's
    /// `loop_detected`): one `alerts` row, and a notification to every notifier any
    /// rule uses. Not subject to the cap.
    fn system_event(&mut self, e: SystemEvent<'_>, now: i64, out: &mut Vec<StreamBatch>) {
        let SystemEvent {
            rule,
            key,
            event,
            severity,
            value: n,
            message,
        } = e;
        let alert_id = if key.is_empty() {
            format!("{rule}/{now}")
        } else {
            format!("{rule}/{key}/{now}")
        };
        let mut b = AlertRows::with_capacity(1);
        b.push(&AlertRow {
            alert_id: &alert_id,
            rule,
            key,
            event,
            severity,
            value: Some(n as f64),
            message: &message,
            labels: "{}",
            notified: true,
            window: None,
            fired_at: None,
            resolved_at: None,
            at: now,
        });
        out.push(StreamBatch::new(ALERTS_TABLE.into(), b.finish()));
        // Every notifier any rule uses hears of it.
        let mut notify: Vec<String> = self
            .rules
            .iter()
            .flat_map(|r| r.notify.iter().cloned())
            .collect();
        notify.sort();
        notify.dedup();
        let fields = json!({
            "alert_id": alert_id, "rule": rule, "key": key, "event": event,
            "severity": severity, "labels": {}, "value": n, "message": message, "at": now,
            "fired_at": null, "resolved_at": null, "window_start": null, "window_end": null,
        });
        if let (Value::Object(fields), false) = (fields, notify.is_empty()) {
            self.notifications.push(Notification {
                notify: notify.into(),
                fields,
            });
        }
    }
}

/// What [`Alerts::system_event`] records.
struct SystemEvent<'a> {
    rule: &'a str,
    key: &'a str,
    event: &'a str,
    severity: &'a str,
    value: u64,
    message: String,
}

fn snapshot_name(rule: &str) -> String {
    format!("alert-{rule}")
}

fn config(key: &str, message: impl Into<String>) -> Error {
    Error::Config {
        key: key.to_owned(),
        message: message.into(),
    }
}

impl Rule {
    fn compile(spec: &AlertSpec, schema: &SchemaRef) -> Result<Self, Vec<Error>> {
        let mut errors = Vec::new();
        let key = &spec.key;
        let mut compile_pred = |sql: &Option<String>, k: &str| {
            sql.as_deref().and_then(|sql| {
                predicate(sql, schema, &format!("{key}.{k}"))
                    .map_err(|e| errors.push(e))
                    .ok()
            })
        };
        let condition = compile_pred(&spec.condition, "condition");
        let clear = compile_pred(&spec.clear, "clear");
        let value = spec.value.as_deref().and_then(|sql| {
            compile_value(sql, schema, &format!("{key}.value"))
                .map_err(|e| errors.push(e))
                .ok()
        });
        let group_names = if spec.group_by.is_empty() {
            match schema.metadata().get(KEY_META) {
                Some(k) => vec![k.clone()],
                None => {
                    errors.push(config(
                        &format!("{key}.group_by"),
                        format!("{:?} has no key column; name the columns", spec.input),
                    ));
                    Vec::new()
                }
            }
        } else {
            spec.group_by.clone()
        };
        let mut group = Vec::new();
        for name in &group_names {
            match schema.index_of(name) {
                Ok(i) => group.push(i),
                Err(_) => errors.push(config(
                    &format!("{key}.group_by"),
                    format!("{name:?} is not a column of {:?}", spec.input),
                )),
            }
        }
        let time = event_time_column(schema);
        if time.is_none() {
            errors.push(config(
                &format!("{key}.input"),
                format!("{:?} has no event-time column", spec.input),
            ));
        }
        let window = schema
            .index_of("window_start")
            .ok()
            .zip(schema.index_of("window_end").ok());
        if !errors.is_empty() {
            return Err(errors);
        }
        let labels = Value::Object(
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect(),
        );
        Ok(Self {
            name: spec.name.as_str().into(),
            input: spec.input.clone(),
            condition,
            clear,
            value,
            group,
            group_names,
            time: time.unwrap_or(0),
            window,
            fire: spec.fire,
            clear_for: spec.clear_for.max(1),
            missing_after_ms: spec.missing_after_ms,
            cooldown_ms: spec.cooldown_ms,
            severity: spec.severity.as_str().into(),
            labels,
            message: spec
                .message
                .clone()
                .unwrap_or_else(|| "{rule} {event} for {key}".into()),
            notify: spec.notify.clone().into(),
            keys: HashMap::new(),
            key_bytes: 0,
            busy: Busy::stage("alert", &spec.name),
        })
    }

    /// How many evaluations a key keeps.
    fn history_len(&self) -> usize {
        let n = match self.fire {
            Fire::Count { n, .. } => n,
            Fire::Duration { .. } => 1,
        };
        n.max(self.clear_for) as usize
    }

    fn eval_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Window {
            message: format!("alert {:?} on {:?}: {e}", self.name, self.input),
        }
    }

    fn evaluate(
        &mut self,
        index: usize,
        batch: &RecordBatch,
        now: i64,
        full: bool,
        gate: &mut Gate,
        out: &mut Vec<Transition>,
    ) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let bools = |expr: &Option<Arc<dyn PhysicalExpr>>| -> Result<Option<BooleanArray>> {
            let Some(expr) = expr else { return Ok(None) };
            let array = expr
                .evaluate(batch)
                .and_then(|v| v.into_array(rows))
                .map_err(|e| self.eval_err(e))?;
            Ok(Some(array.as_boolean().clone()))
        };
        let condition = bools(&self.condition)?;
        let clear = bools(&self.clear)?;
        let value: Option<Float64Array> = match &self.value {
            Some(expr) => {
                let array = expr
                    .evaluate(batch)
                    .and_then(|v| v.into_array(rows))
                    .map_err(|e| self.eval_err(e))?;
                let array = cast(&array, &DataType::Float64).map_err(|e| self.eval_err(e))?;
                Some(array.as_primitive().clone())
            }
            None => None,
        };
        let times = cast(
            batch.column(self.time),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )
        .map_err(|e| self.eval_err(e))?;
        let times = times.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        let windows = match self.window {
            Some((s, e)) => {
                let ty = DataType::Timestamp(TimeUnit::Millisecond, None);
                let s = cast(batch.column(s), &ty).map_err(|e| self.eval_err(e))?;
                let e = cast(batch.column(e), &ty).map_err(|e| self.eval_err(e))?;
                Some((s, e))
            }
            None => None,
        };
        let keys = KeyWriter::new(batch, &self.group).map_err(|e| self.eval_err(e))?;
        let holds = |a: &Option<BooleanArray>, row: usize| {
            a.as_ref().is_some_and(|a| a.is_valid(row) && a.value(row))
        };
        let cap = self.history_len();
        let events = Events {
            rule: index,
            name: &self.name,
            message: &self.message,
            severity: &self.severity,
            cooldown_ms: self.cooldown_ms,
        };
        let mut buffer = String::new();
        // Counted once per batch: over the budget most rows of a flood are refused.
        let mut refused = 0u64;
        for row in 0..rows {
            let key = keys.key(row, &mut buffer);
            let hit = holds(&condition, row);
            if !self.keys.contains_key(key) {
                if condition.is_some() && !hit {
                    // A key that never hit needs no state: memory follows the keys
                    // that matter, not the fleet.
                    continue;
                }
                if full {
                    refused += 1;
                    continue;
                }
                let key = key.to_owned();
                self.key_bytes += key.capacity();
                self.keys.insert(key, KeyState::default());
            }
            let Some(state) = self.keys.get_mut(key) else {
                continue;
            };
            let at = if times.is_valid(row) {
                times.value(row)
            } else {
                now
            };
            let window = windows.as_ref().map(|(s, e)| {
                let (s, e) = (
                    s.as_primitive::<arrow::datatypes::TimestampMillisecondType>(),
                    e.as_primitive::<arrow::datatypes::TimestampMillisecondType>(),
                );
                (s.value(row), e.value(row))
            });
            let v = value
                .as_ref()
                .and_then(|v| v.is_valid(row).then(|| v.value(row)));
            let when = When {
                at,
                window,
                value: v,
                row: Some((batch, row)),
            };
            let Some(_) = &condition else {
                // Missing-data rule: the key reported.
                state.last_seen = now;
                if state.firing {
                    out.push(events.resolve(key, state, gate, &when));
                }
                continue;
            };
            let cleared = if clear.is_some() {
                holds(&clear, row)
            } else {
                !hit
            };
            let eval = Eval {
                tag: window.map_or(i64::MIN, |w| w.0),
                hit,
                clear: cleared,
            };
            match state
                .history
                .iter_mut()
                .rev()
                .find(|e| e.tag == eval.tag && e.tag != i64::MIN)
            {
                Some(existing) => *existing = eval,
                None => {
                    state.history.push_back(eval);
                    while state.history.len() > cap {
                        state.history.pop_front();
                    }
                }
            }
            if !state.firing {
                let fires = match self.fire {
                    Fire::Count { m, n } => {
                        state
                            .history
                            .iter()
                            .rev()
                            .take(n as usize)
                            .filter(|e| e.hit)
                            .count()
                            >= m as usize
                    }
                    Fire::Duration { ms } => {
                        if hit {
                            let since = *state.since.get_or_insert(at);
                            at - since >= ms
                        } else {
                            state.since = None;
                            false
                        }
                    }
                };
                if fires {
                    out.push(events.fire(key, state, gate, now, &when));
                }
            } else {
                let clear_for = self.clear_for as usize;
                let clears = state.history.len() >= clear_for
                    && state.history.iter().rev().take(clear_for).all(|e| e.clear);
                if clears {
                    out.push(events.resolve(key, state, gate, &when));
                }
            }
        }
        if refused > 0 {
            metrics::counter!("sluice_alert_refused_keys_total", "rule" => self.name.to_string())
                .increment(refused);
        }
        Ok(())
    }

    /// Drops the keys that never fired and have no hit left in their history (nor a
    /// duration running): their next hit starts from the same place with or without
    /// the hitless history, so no output changes, whenever this runs (but over the
    /// state budget, where a forgotten key's next hit counts as a new key). Kept: keys that
    /// fired (their episode count numbers the next `alert_id`, and a replay after a
    /// crash must number it the same), every key of a window rule (a late window
    /// replaces its own evaluation, which a forgotten history could not), and every
    /// key of a missing-data rule (a forgotten key could not be found silent).
    ///
    /// An explicit `clear` that can hold on a hit row, with `clear_for` over 1, makes
    /// the hitless history count towards the resolve: such rules keep their keys too.
    fn forget_idle(&mut self) {
        if self.condition.is_none()
            || self.window.is_some()
            || (self.clear.is_some() && self.clear_for > 1)
        {
            return;
        }
        let key_bytes = &mut self.key_bytes;
        self.keys.retain(|key, s| {
            let idle = s.episode == 0
                && !s.firing
                && s.since.is_none()
                && !s.history.iter().any(|e| e.hit);
            if idle {
                *key_bytes -= key.capacity();
            }
            !idle
        });
        if self.keys.capacity() > 4 * self.keys.len().max(64) {
            self.keys.shrink_to_fit();
        }
    }

    /// Missing-data rules: fires for every key silent for `missing_after`.
    fn scan_silent(&mut self, index: usize, now: i64, gate: &mut Gate, out: &mut Vec<Transition>) {
        let Some(after) = self.missing_after_ms else {
            return;
        };
        let events = Events {
            rule: index,
            name: &self.name,
            message: &self.message,
            severity: &self.severity,
            cooldown_ms: self.cooldown_ms,
        };
        for (key, state) in &mut self.keys {
            if state.firing || now.saturating_sub(state.last_seen) < after {
                continue;
            }
            let when = When {
                at: now,
                window: None,
                value: None,
                row: None,
            };
            out.push(events.fire(key, state, gate, now, &when));
        }
    }
}

/// What a transition needs of its rule, borrowed apart from the rule's key states.
struct Events<'r> {
    rule: usize,
    name: &'r str,
    message: &'r str,
    severity: &'r str,
    cooldown_ms: i64,
}

/// Where a transition happens: event time, window, value, and the row (for the message).
struct When<'b> {
    at: i64,
    window: Option<(i64, i64)>,
    value: Option<f64>,
    row: Option<(&'b RecordBatch, usize)>,
}

impl Events<'_> {
    /// `key` starts an episode. It is muted (no notifications, also not for its
    /// resolve) within `cooldown` of the key's last notified fire, or when the global
    /// cap refuses it.
    fn fire(
        &self,
        key: &str,
        state: &mut KeyState,
        gate: &mut Gate,
        now: i64,
        when: &When<'_>,
    ) -> Transition {
        state.firing = true;
        state.episode = state.episode.saturating_add(1);
        state.fired_at = when.at;
        let cooling = state
            .last_notified
            .is_some_and(|last| now.saturating_sub(last) < self.cooldown_ms);
        if cooling {
            metrics::counter!("sluice_alert_notifications_suppressed_total", "reason" => "cooldown")
                .increment(1);
        }
        state.muted = cooling || !gate.allow();
        if !state.muted {
            state.last_notified = Some(now);
        }
        self.transition(key, state, true, when)
    }

    /// `key`'s episode ends; the history restarts, so a new fire needs new hits.
    fn resolve(
        &self,
        key: &str,
        state: &mut KeyState,
        gate: &mut Gate,
        when: &When<'_>,
    ) -> Transition {
        state.firing = false;
        state.history.clear();
        state.since = None;
        let mut t = self.transition(key, state, false, when);
        t.notified = !state.muted && gate.allow();
        t
    }

    fn transition(&self, key: &str, state: &KeyState, fire: bool, when: &When<'_>) -> Transition {
        let event = if fire { "fire" } else { "resolve" };
        Transition {
            rule: self.rule,
            key: key.to_owned(),
            fire,
            episode: state.episode,
            value: when.value,
            message: render(
                self.message,
                self.name,
                key,
                event,
                when.value,
                self.severity,
                when.row,
            ),
            at: when.at,
            fired_at: state.fired_at,
            window: when.window,
            notified: !state.muted,
        }
    }
}

/// A row's key: the group columns' values, joined by `|`. One text column (the usual
/// `device_id`) is read in place, without formatting or copying.
enum KeyWriter<'a> {
    Text(&'a arrow::array::StringArray),
    Formatted(Vec<ArrayFormatter<'a>>),
}

impl<'a> KeyWriter<'a> {
    fn new(batch: &'a RecordBatch, group: &[usize]) -> Result<Self, arrow::error::ArrowError> {
        if let [i] = group
            && let Some(text) = batch.column(*i).as_string_opt::<i32>()
        {
            return Ok(Self::Text(text));
        }
        let columns = group
            .iter()
            .map(|&i| ArrayFormatter::try_new(batch.column(i).as_ref(), &FORMAT))
            .collect::<Result<_, _>>()?;
        Ok(Self::Formatted(columns))
    }

    fn key<'b>(&'b self, row: usize, buffer: &'b mut String) -> &'b str {
        match self {
            Self::Text(text) if text.is_valid(row) => text.value(row),
            Self::Text(_) => "",
            Self::Formatted(columns) => {
                buffer.clear();
                for (i, c) in columns.iter().enumerate() {
                    if i > 0 {
                        buffer.push('|');
                    }
                    let _ = write!(buffer, "{}", c.value(row));
                }
                buffer
            }
        }
    }
}

static FORMAT: FormatOptions<'static> = FormatOptions::new();

/// Fills a message template: `{column}` from the row, and the built-ins.
fn render(
    template: &str,
    rule: &str,
    key: &str,
    event: &str,
    value: Option<f64>,
    severity: &str,
    row: Option<(&RecordBatch, usize)>,
) -> String {
    sluice_core::template::fill(template, |name, out| {
        match name {
            "rule" => out.push_str(rule),
            "key" => out.push_str(key),
            "event" => out.push_str(event),
            "severity" => out.push_str(severity),
            "value" => {
                if let Some(v) = value {
                    let _ = write!(out, "{v}");
                }
            }
            _ => {
                let Some((column, r)) = row.and_then(|(b, r)| Some((b.column_by_name(name)?, r)))
                else {
                    return false;
                };
                if let Ok(f) = ArrayFormatter::try_new(column.as_ref(), &FORMAT) {
                    let _ = write!(out, "{}", f.value(r));
                }
            }
        }
        true
    })
}

/// One row of the `alerts` table.
struct AlertRow<'a> {
    alert_id: &'a str,
    rule: &'a str,
    key: &'a str,
    event: &'a str,
    severity: &'a str,
    value: Option<f64>,
    message: &'a str,
    labels: &'a str,
    notified: bool,
    window: Option<(i64, i64)>,
    fired_at: Option<i64>,
    resolved_at: Option<i64>,
    at: i64,
}

/// Builders of the `alerts` table.
struct AlertRows {
    text: [StringBuilder; 7],
    value: Float64Builder,
    notified: BooleanBuilder,
    times: [TimestampMillisecondBuilder; 5],
}

impl AlertRows {
    fn with_capacity(n: usize) -> Self {
        Self {
            text: std::array::from_fn(|_| StringBuilder::with_capacity(n, n * 16)),
            value: Float64Builder::with_capacity(n),
            notified: BooleanBuilder::with_capacity(n),
            times: std::array::from_fn(|_| {
                TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC")
            }),
        }
    }

    fn push(&mut self, r: &AlertRow<'_>) {
        for (b, v) in self
            .text
            .iter_mut()
            .take(5)
            .zip([r.alert_id, r.rule, r.key, r.event, r.severity])
        {
            b.append_value(v);
        }
        self.value.append_option(r.value);
        self.text[5].append_value(r.message);
        self.text[6].append_value(r.labels);
        self.notified.append_value(r.notified);
        let [start, end, fired, resolved, at] = &mut self.times;
        start.append_option(r.window.map(|w| w.0));
        end.append_option(r.window.map(|w| w.1));
        fired.append_option(r.fired_at);
        resolved.append_option(r.resolved_at);
        at.append_value(r.at);
    }

    fn finish(mut self) -> RecordBatch {
        let [id, rule, key, event, severity, message, labels] = &mut self.text;
        let [start, end, fired, resolved, at] = &mut self.times;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(rule.finish()),
            Arc::new(key.finish()),
            Arc::new(event.finish()),
            Arc::new(severity.finish()),
            Arc::new(self.value.finish()),
            Arc::new(message.finish()),
            Arc::new(labels.finish()),
            Arc::new(self.notified.finish()),
            Arc::new(start.finish()),
            Arc::new(end.finish()),
            Arc::new(fired.finish()),
            Arc::new(resolved.finish()),
            Arc::new(at.finish()),
        ];
        // The columns are built to the schema's types in its order.
        #[allow(clippy::expect_used)]
        RecordBatch::try_new(alerts_schema(), columns).expect("alerts rows match their schema")
    }
}
