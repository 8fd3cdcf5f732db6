//! The functions and windows of a config, wired by stream name.
//!
//! [`Pipeline::process`] takes one batch of stream S and returns it together with
//! everything derived from it: the output of every function reading S, and what
//! their routes took, recursively (a function may read another's output), and what
//! every window reading any of those emitted. Each function output is one hop further
//! (`_hops` + 1, see [`crate::guard`]); rows past `max_hops` are dead-lettered as
//! `loop_detected`, so a cycle in the config, or through a topic, cannot loop forever.
//! Windows are timed by the pipeline's [`Clock`] (idle sources); they also emit on
//! [`Pipeline::tick`] and, at end of input, on [`Pipeline::finish`]. Rows of streams
//! named by `[publish]` become notifications ([`Pipeline::take_notifications`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use sluice_core::busy::Busy;
use sluice_core::schema::DEAD_LETTER_TABLE;
use sluice_core::{Clock, StreamBatch};

use crate::alert::{AlertSpec, AlertingSpec, Alerts};
use crate::function::{Function, FunctionSpec};
use crate::guard::{LimitOf, LoopGuard, PublishDecl, Publisher, RowLimit, loops_in};
use crate::window::{Instances, WatermarkSpec, Window, WindowSpec};
use crate::{Error, Result};

/// A function as the config declares it.
#[derive(Debug, Clone)]
pub struct FunctionDecl {
    /// Config path, e.g. `functions.clean`, for error messages.
    pub key: String,
    /// The stream it reads.
    pub input: String,
    /// The stream its output lands in, if any.
    pub output: Option<String>,
    /// Filter, select and routes.
    pub spec: FunctionSpec,
}

/// A declared stream.
#[derive(Debug, Clone)]
pub struct StreamDecl {
    /// Its columns.
    pub schema: SchemaRef,
    /// How its windows' watermark is computed (derived streams inherit it).
    pub watermark: WatermarkSpec,
    /// Whether its own rows land in the lake.
    pub store: bool,
}

/// A window as the config declares it.
#[derive(Debug, Clone)]
pub struct WindowDecl {
    /// The stream it reads.
    pub input: String,
    /// Everything else.
    pub spec: WindowSpec,
}

#[derive(Debug)]
struct Node {
    function: Function,
    output: Option<Arc<str>>,
    limit: Option<RowLimit>,
    /// `sluice_function_rows_total{function, direction="in"|"out"}`: rows taken
    /// (past its limit) and rows put out (its output and routes).
    rows_in: metrics::Counter,
    rows_out: metrics::Counter,
    busy: Busy,
}

/// Compiled functions and windows, indexed by the stream they read.
#[derive(Debug)]
pub struct Pipeline {
    readers: HashMap<String, Vec<usize>>,
    nodes: Vec<Node>,
    window_readers: HashMap<String, Vec<usize>>,
    windows: Instances,
    /// Each window's busy time, by its index in every instance.
    window_busy: Vec<Busy>,
    schemas: HashMap<String, SchemaRef>,
    not_stored: HashSet<String>,
    clock: Arc<dyn Clock>,
    alerts: Option<Alerts>,
    guard: LoopGuard,
    publisher: Publisher,
    /// The window-state budget in bytes, and whether the last measure was over it.
    window_budget: Option<usize>,
    over_budget: bool,
    /// Sources whose batches are only stored, not processed (see [`Role`]).
    roles: HashMap<String, Role>,
}

/// What the pipeline does with a source's batches, when not everything: a stream
/// repartitioned through Kafka (`[cluster.repartition]`) is stored where it arrives
/// and processed where its key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Stored only: the rows are processed from the repartition topic.
    StoreOnly,
    /// Processed only (functions, windows, alert rules, `[publish]`): the rows were
    /// stored by the node that received them.
    ProcessOnly,
}

impl Pipeline {
    /// Compiles `functions` against the declared `streams` (name → schema). A
    /// function may read another function's output or route; the schemas of every
    /// derived stream are found by compiling in dependency order. Returns every
    /// problem at once.
    pub fn build(
        functions: &[FunctionDecl],
        windows: &[WindowDecl],
        streams: &HashMap<String, StreamDecl>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Vec<Error>> {
        Self::build_with_alerts(functions, windows, &[], None, streams, clock)
    }

    /// As [`Pipeline::build`], with alert rules, which may read any stream or window
    /// table. Rules over a window that does not compile are not checked (that window's
    /// errors are reported).
    pub fn build_with_alerts(
        functions: &[FunctionDecl],
        windows: &[WindowDecl],
        alerts: &[AlertSpec],
        cap: Option<AlertingSpec>,
        streams: &HashMap<String, StreamDecl>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Vec<Error>> {
        let mut schemas: HashMap<String, SchemaRef> = streams
            .iter()
            .map(|(k, s)| (k.clone(), s.schema.clone()))
            .collect();
        let mut watermarks: HashMap<String, WatermarkSpec> = streams
            .iter()
            .map(|(k, s)| (k.clone(), s.watermark))
            .collect();
        let mut nodes: Vec<Option<Node>> = functions.iter().map(|_| None).collect();
        let mut handled = vec![false; functions.len()];
        let mut errors = Vec::new();
        // Each round compiles every function whose input schema is known; stops when
        // a round makes no progress (the rest read unknown streams or form a cycle).
        loop {
            let mut progress = false;
            for (i, decl) in functions.iter().enumerate() {
                if handled[i] {
                    continue;
                }
                let Some(input) = schemas.get(&decl.input).cloned() else {
                    continue;
                };
                progress = true;
                handled[i] = true;
                match Function::compile(&decl.spec, &input, &decl.key) {
                    Ok(function) => {
                        let produced = decl
                            .output
                            .iter()
                            .map(|o| (o.clone(), format!("{}.output", decl.key)))
                            .chain(decl.spec.routes.iter().enumerate().map(|(r, route)| {
                                (route.to.clone(), format!("{}.routes[{r}].to", decl.key))
                            }));
                        for (stream, key) in produced {
                            if let Some(existing) = schemas.get(&stream) {
                                if existing.fields() != function.output_schema().fields() {
                                    errors.push(Error::Config {
                                        key,
                                        message: format!(
                                            "stream {stream:?} already exists with other columns"
                                        ),
                                    });
                                }
                            } else {
                                if let Some(&w) = watermarks.get(&decl.input) {
                                    watermarks.insert(stream.clone(), w);
                                }
                                schemas.insert(stream, function.output_schema().clone());
                            }
                        }
                        let rows = |direction: &'static str| metrics::counter!("sluice_function_rows_total", "function" => decl.spec.name.clone(), "direction" => direction);
                        nodes[i] = Some(Node {
                            rows_in: rows("in"),
                            rows_out: rows("out"),
                            busy: Busy::stage("function", &decl.spec.name),
                            function,
                            output: decl.output.as_deref().map(Arc::from),
                            limit: decl.spec.limit.map(|l| {
                                let of = LimitOf::Function(decl.spec.name.clone());
                                RowLimit::new(of, l, clock.clone())
                            }),
                        });
                    }
                    Err(mut more) => errors.append(&mut more),
                }
            }
            if !progress {
                break;
            }
        }
        for (i, decl) in functions.iter().enumerate() {
            if !handled[i] {
                errors.push(Error::Config {
                    key: format!("{}.input", decl.key),
                    message: format!(
                        "stream {:?} is not declared and no function produces it",
                        decl.input
                    ),
                });
            }
        }
        let mut compiled = Instances::default();
        let mut window_readers: HashMap<String, Vec<usize>> = HashMap::new();
        for decl in windows {
            let (Some(input), Some(&watermark)) =
                (schemas.get(&decl.input), watermarks.get(&decl.input))
            else {
                errors.push(Error::Config {
                    key: format!("{}.input", decl.spec.key),
                    message: format!(
                        "stream {:?} is not declared and no function produces it",
                        decl.input
                    ),
                });
                continue;
            };
            match Window::compile(&decl.spec, input, watermark) {
                Ok(w) => {
                    window_readers
                        .entry(decl.input.clone())
                        .or_default()
                        .push(compiled.shared().len());
                    compiled.push(w, &decl.spec, input, watermark);
                }
                Err(mut more) => errors.append(&mut more),
            }
        }
        for w in compiled.shared() {
            schemas.insert(w.name().to_owned(), w.output_schema().clone());
        }
        let checkable: Vec<AlertSpec> = alerts
            .iter()
            .filter(|a| {
                schemas.contains_key(&a.input) || !windows.iter().any(|w| w.spec.name == a.input)
            })
            .cloned()
            .collect();
        // With a cap (a running service) the rules exist even when there are none: the
        // loop guard raises its events through them.
        let alerts = match cap {
            Some(cap) => match Alerts::build(&checkable, &schemas, cap, clock.clone()) {
                Ok(a) => Some(a),
                Err(mut more) => {
                    errors.append(&mut more);
                    None
                }
            },
            None => None,
        };
        if let Some(alerts) = &alerts {
            compiled.set_alerts(alerts);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, decl) in functions.iter().enumerate() {
            readers.entry(decl.input.clone()).or_default().push(i);
        }
        Ok(Self {
            readers,
            nodes: nodes.into_iter().flatten().collect(),
            window_readers,
            window_busy: compiled
                .shared()
                .iter()
                .map(|w| Busy::stage("window", w.name()))
                .collect(),
            windows: compiled,
            schemas,
            roles: HashMap::new(),
            not_stored: streams
                .iter()
                .filter(|(_, s)| !s.store)
                .map(|(k, _)| k.clone())
                .collect(),
            clock,
            alerts,
            guard: LoopGuard::default(),
            publisher: Publisher::default(),
            window_budget: None,
            over_budget: false,
        })
    }

    /// Sets the loop guard's `max_hops` and the `[publish]` entries (their inputs
    /// checked against every stream and window table). Every problem at once.
    pub fn guard(&mut self, max_hops: u8, publish: &[PublishDecl]) -> Result<(), Vec<Error>> {
        self.guard = LoopGuard::new(max_hops);
        self.publisher = Publisher::new(publish, &self.schemas)?;
        Ok(())
    }

    /// Caps the memory of all window state together. It is measured on every
    /// [`Pipeline::tick`]; while it is over `bytes`, windows take no rows (they go to
    /// `dead_letter` as `state_budget`) but still close and emit, which frees state.
    pub fn set_window_budget(&mut self, bytes: Option<usize>) {
        self.window_budget = bytes;
    }

    /// Counts rows bound for `stream` that the loop guard (here or in a decoder)
    /// stopped, and raises the alert event.
    fn loop_stopped(&mut self, stream: &str, n: u64) {
        metrics::counter!("sluice_loop_detected_total", "stream" => stream.to_owned()).increment(n);
        if let Some(alerts) = &mut self.alerts {
            alerts.loop_detected(stream, n, self.guard.max_hops());
        }
    }

    /// The shared alert rules, if any (a cluster node's rules over a Kafka source
    /// keep their state per partition: see [`Instances`]).
    pub fn alerts(&self) -> Option<&Alerts> {
        self.alerts.as_ref()
    }

    /// The rules rows go to now: the current partition's, or the shared ones.
    fn alerts_here(&mut self) -> Option<&mut Alerts> {
        match self.windows.current_alerts() {
            Some(alerts) => Some(alerts),
            None => self.alerts.as_mut(),
        }
    }

    /// Per rule: its name, the keys it holds state for and how many fire, over the
    /// shared rules and every partition's.
    pub fn alert_gauges(&mut self) -> Vec<(String, usize, usize)> {
        let mut totals: Vec<(String, usize, usize)> = Vec::new();
        let partitions = self.windows.partition_alerts(false);
        for alerts in self.alerts.iter_mut().chain(partitions) {
            for (i, (rule, keys, firing)) in alerts.gauges().enumerate() {
                match totals.get_mut(i) {
                    Some(total) => {
                        total.1 += keys;
                        total.2 += firing;
                    }
                    None => totals.push((rule.to_owned(), keys, firing)),
                }
            }
        }
        totals
    }

    /// Alert notifications and published rows produced since the last call, in order.
    pub fn take_notifications(&mut self) -> Vec<sluice_core::Notification> {
        let partitions = self.windows.partition_alerts(false);
        let mut all: Vec<sluice_core::Notification> = self
            .alerts
            .iter_mut()
            .chain(partitions)
            .flat_map(Alerts::take_notifications)
            .collect();
        all.extend(self.publisher.take());
        all
    }

    /// Runs the alert rules and `[publish]` over the window tables emitted into
    /// `out[first..]`.
    fn alert_on_windows(
        &mut self,
        out: &mut Vec<StreamBatch>,
        first: usize,
        errors: &mut Vec<Error>,
    ) {
        let end = out.len();
        for i in first..end {
            let stream = out[i].stream.clone();
            if !self.windows.shared().iter().any(|w| w.name() == &*stream) {
                continue;
            }
            if let Err(e) = self.publisher.publish(&out[i]) {
                errors.push(e);
            }
            if let Some(alerts) = self.alerts_here()
                && alerts.reads(&stream)
            {
                let batch = out[i].batch.clone();
                if let Err(e) = alerts.process(&stream, &batch, out) {
                    errors.push(e);
                }
            }
        }
    }

    /// The schema of every stream and window table: declared and derived.
    pub fn schemas(&self) -> &HashMap<String, SchemaRef> {
        &self.schemas
    }

    /// The streams and window tables whose rows land in the lake, with their columns.
    pub fn stored(&self) -> impl Iterator<Item = (&str, &SchemaRef)> {
        self.schemas
            .iter()
            .filter(|(name, _)| !self.not_stored.contains(*name))
            .map(|(name, schema)| (name.as_str(), schema))
    }

    /// The compiled windows (the shared set: see [`Instances`]).
    pub fn windows(&self) -> &[Window] {
        self.windows.shared()
    }

    /// Per window: its name, lowest watermark and state bytes over every partition's
    /// set (see [`Instances::gauges`]).
    pub fn window_gauges(&self) -> Vec<(&str, Option<i64>, usize)> {
        self.windows.gauges()
    }

    /// Sets what is done with the batches of `source` (by their positions' source).
    pub fn set_role(&mut self, source: &str, role: Role) {
        self.roles.insert(source.to_owned(), role);
    }

    /// The windows of every partition (a node of a cluster keeps them per partition).
    pub fn instances(&mut self) -> &mut Instances {
        &mut self.windows
    }

    /// `batch` (unless its stream is not stored) plus every batch derived from it, in
    /// order. A function or window that fails on a batch is reported in the error list
    /// and its outputs for that batch are skipped; the rest goes on.
    pub fn process(
        &mut self,
        batch: StreamBatch,
        out: &mut Vec<StreamBatch>,
        errors: &mut Vec<Error>,
    ) {
        let role = batch
            .positions
            .as_ref()
            .and_then(|p| self.roles.get(&p.source))
            .copied();
        let store = match role {
            Some(Role::StoreOnly) => {
                if !self.not_stored.contains(&*batch.stream) {
                    out.push(batch);
                }
                return;
            }
            Some(Role::ProcessOnly) => false,
            None => true,
        };
        let Some(parts) = self.windows.split(&batch) else {
            return self.process_in(batch, store, out, errors);
        };
        for (key, part) in parts {
            if let Err(e) = self.windows.enter(Some(key.clone())) {
                errors.push(e);
                continue;
            }
            let position = part
                .positions
                .as_ref()
                .and_then(|p| p.offsets.values().next().cloned());
            self.process_in(part, store, out, errors);
            self.windows.advance(&key, position.as_ref());
        }
        // Cannot fail: the shared windows exist.
        let _ = self.windows.enter(None);
    }

    /// [`process`](Self::process) with the windows of one partition, or the shared
    /// ones; `store`: whether `batch` itself goes to its table (what it derives does).
    fn process_in(
        &mut self,
        batch: StreamBatch,
        store: bool,
        out: &mut Vec<StreamBatch>,
        errors: &mut Vec<Error>,
    ) {
        let now = self.clock.now_ms();
        let first = out.len();
        let mut pending = vec![batch];
        let mut input = true;
        while let Some(batch) = pending.pop() {
            let stored = store || !std::mem::take(&mut input);
            if &*batch.stream == DEAD_LETTER_TABLE {
                for (stream, n) in loops_in(&batch.batch) {
                    self.loop_stopped(&stream, n);
                }
            }
            if let Err(e) = self.publisher.publish(&batch) {
                errors.push(e);
            }
            if let Some(alerts) = self.alerts_here()
                && alerts.reads(&batch.stream)
                && let Err(e) = alerts.process(&batch.stream, &batch.batch, out)
            {
                errors.push(e);
            }
            if let Some(readers) = self.window_readers.get(&*batch.stream) {
                let windows = self.windows.current();
                for &i in readers {
                    let started = Instant::now();
                    let window = &mut windows[i];
                    if let Some(positions) = &batch.positions {
                        window.announce(positions, now);
                    }
                    let done = if self.over_budget {
                        let detail = "window state is over [limits] window_state; rows are refused until windows close";
                        window.refuse(&batch.batch, detail, now, out).map(|n| {
                            metrics::counter!("sluice_window_refused_rows_total", "window" => window.name().to_owned())
                                .increment(n as u64);
                        })
                    } else {
                        window.process(&batch.batch, now, out)
                    };
                    if let Err(e) = done {
                        errors.push(e);
                    }
                    self.window_busy[i].since(started);
                }
            }
            let mut derived = Vec::new();
            if let Some(readers) = self.readers.get(&*batch.stream) {
                for &i in readers {
                    let node = &mut self.nodes[i];
                    let admitted = match &mut node.limit {
                        Some(limit) => match limit.admit(&batch.stream, &batch.batch) {
                            Ok((rows, dead)) => {
                                if let Some(dead) = dead {
                                    out.push(StreamBatch::new(DEAD_LETTER_TABLE.into(), dead));
                                }
                                rows
                            }
                            Err(e) => {
                                errors.push(e);
                                continue;
                            }
                        },
                        None => batch.batch.clone(),
                    };
                    if admitted.num_rows() == 0 {
                        continue;
                    }
                    node.rows_in.increment(admitted.num_rows() as u64);
                    let processed = node.busy.time(|| node.function.process(&admitted));
                    match processed {
                        Ok((outputs, routed)) => {
                            let kept = match node.output {
                                Some(_) => outputs.iter().map(|o| o.num_rows()).sum(),
                                None => 0,
                            };
                            let put_out =
                                kept + routed.iter().map(|b| b.batch.num_rows()).sum::<usize>();
                            node.rows_out.increment(put_out as u64);
                            if let Some(stream) = &node.output {
                                for output in outputs.into_iter().filter(|o| o.num_rows() > 0) {
                                    // Derived rows keep their source's positions, so
                                    // windows over them know its partitions too.
                                    let mut b = StreamBatch::new(stream.clone(), output);
                                    b.positions = batch.positions.clone();
                                    derived.push(b);
                                }
                            }
                            derived.extend(routed);
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
            for b in derived {
                self.hop(b, &mut pending, out, errors);
            }
            if stored && !self.not_stored.contains(&*batch.stream) {
                out.push(batch);
            }
        }
        self.alert_on_windows(out, first, errors);
    }

    /// One function hop for `derived`: the rows under the limit go on to `pending`,
    /// the rest to `out` as `loop_detected` dead letters.
    fn hop(
        &mut self,
        derived: StreamBatch,
        pending: &mut Vec<StreamBatch>,
        out: &mut Vec<StreamBatch>,
        errors: &mut Vec<Error>,
    ) {
        let StreamBatch {
            stream,
            batch,
            positions,
        } = derived;
        match self.guard.advance(&stream, batch) {
            Ok((kept, stopped)) => {
                if let Some(stopped) = stopped {
                    self.loop_stopped(&stream, stopped.num_rows() as u64);
                    out.push(StreamBatch::new(DEAD_LETTER_TABLE.into(), stopped));
                }
                if kept.num_rows() > 0 {
                    pending.push(StreamBatch {
                        stream,
                        batch: kept,
                        positions,
                    });
                }
            }
            Err(e) => errors.push(e),
        }
    }

    /// Lets windows emit what the wall clock alone closes (idle sources).
    pub fn tick(&mut self, out: &mut Vec<StreamBatch>, errors: &mut Vec<Error>) {
        let now = self.clock.now_ms();
        let first = out.len();
        for w in self.windows.live() {
            if let Err(e) = w.tick(now, out) {
                errors.push(e);
            }
        }
        self.alert_on_windows(out, first, errors);
        let partitions = self.windows.partition_alerts(true);
        for alerts in self.alerts.iter_mut().chain(partitions) {
            alerts.tick(out);
        }
        if let Some(budget) = self.window_budget {
            let alerts: usize = self
                .alerts
                .iter()
                .chain(self.windows.partition_alerts(false).map(|a| &*a))
                .map(Alerts::state_size)
                .sum();
            let used = self.windows.all().map(Window::state_size).sum::<usize>() + alerts;
            let over = used > budget;
            let partitions = self.windows.partition_alerts(false);
            for a in self.alerts.iter_mut().chain(partitions) {
                a.set_over_budget(over);
            }
            if over != self.over_budget {
                if over {
                    tracing::warn!(
                        state_bytes = used,
                        budget,
                        "window and alert state over its budget ([limits] window_state); windows refuse rows of new keys (dead_letter, state_budget) until they close, and alert rules take no new keys"
                    );
                } else {
                    tracing::info!(
                        state_bytes = used,
                        budget,
                        "window and alert state back under its budget"
                    );
                }
                self.over_budget = over;
            }
            metrics::gauge!("sluice_window_state_budget_bytes").set(budget as f64);
            metrics::gauge!("sluice_window_state_over_budget").set(f64::from(u8::from(over)));
        }
    }

    /// End of input: every window emits everything it holds.
    pub fn finish(&mut self, out: &mut Vec<StreamBatch>, errors: &mut Vec<Error>) {
        let first = out.len();
        for w in self.windows.live() {
            if let Err(e) = w.finish(out) {
                errors.push(e);
            }
        }
        self.alert_on_windows(out, first, errors);
    }

    /// Each block-mode function limit's rows taken since the last call (nonzero only),
    /// by function name: the caller waits for the rate to pay for them before it hands
    /// the pipeline another batch (see [`crate::guard::RowLimit`]).
    pub fn take_owed(&mut self) -> Vec<(String, u64)> {
        self.nodes
            .iter_mut()
            .filter_map(|n| n.limit.as_mut())
            .filter_map(|l| {
                let owed = l.take_owed();
                (owed > 0).then(|| (l.name().to_owned(), owed))
            })
            .collect()
    }

    /// The names of the states a checkpoint saves: each window's name (with
    /// `@<source>/<partition>` for a partition's: see [`Instances`]), and each alert
    /// rule's as `alert-<rule>`.
    pub fn state_names(&self) -> Vec<String> {
        let mut names = self.windows.state_names();
        if let Some(alerts) = &self.alerts {
            names.extend(alerts.snapshot_names());
        }
        names
    }

    /// Writes the state called `name` (see [`state_names`](Self::state_names)) to
    /// `out`, streamed: see [`Window::snapshot`].
    pub fn snapshot(&mut self, name: &str, out: &mut dyn std::io::Write) -> Result<()> {
        if let Some(w) = self.windows.by_state_name(name, false)? {
            return w.snapshot(out);
        }
        if let Some((alerts, base)) = self.windows.alerts_by_state_name(name, false)?
            && alerts.snapshot(base, out)?
        {
            return Ok(());
        }
        if let Some(alerts) = &mut self.alerts
            && alerts.snapshot(name, out)?
        {
            return Ok(());
        }
        Err(Error::Window {
            message: format!("no window or alert rule has the state {name:?}"),
        })
    }

    /// Restores the window or alert rule called `name` from a snapshot read from
    /// `input`; `false` if there is none. A partition's window is restored frozen (see
    /// [`Instances`]): its source thaws it, or replaces it, when it takes the partition
    /// over.
    pub fn restore(&mut self, name: &str, input: &mut dyn std::io::Read) -> Result<bool> {
        if let Some(w) = self.windows.by_state_name(name, true)? {
            return w.restore(input).map(|()| true);
        }
        if let Some((alerts, base)) = self.windows.alerts_by_state_name(name, true)? {
            return alerts.restore(base, input);
        }
        match &mut self.alerts {
            Some(alerts) => alerts.restore(name, input),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::StreamSchema;

    use super::*;
    use crate::function::RouteSpec;

    fn decl(name: &str, input: &str, output: Option<&str>, filter: &str) -> FunctionDecl {
        FunctionDecl {
            key: format!("functions.{name}"),
            input: input.into(),
            output: output.map(str::to_owned),
            spec: FunctionSpec {
                name: name.into(),
                filter: Some(filter.into()),
                ..FunctionSpec::default()
            },
        }
    }

    fn streams() -> HashMap<String, StreamDecl> {
        HashMap::from([(
            "telemetry".to_owned(),
            StreamDecl {
                schema: StreamSchema::builtin("telemetry").unwrap().arrow().clone(),
                watermark: WatermarkSpec {
                    max_out_of_orderness_ms: 0,
                    idle_timeout_ms: None,
                    by_partition: false,
                    row_sources: false,
                },
                store: true,
            },
        )])
    }

    /// `per_minute`: a count per device and minute of `telemetry`.
    fn per_minute() -> WindowDecl {
        WindowDecl {
            input: "telemetry".into(),
            spec: WindowSpec {
                name: "per_minute".into(),
                key: "windows.per_minute".into(),
                kind: crate::window::WindowKind::Tumbling { size_ms: 60_000 },
                group_by: vec!["device_id".into()],
                filter: None,
                select: vec!["count(*) AS n".into()],
                allowed_lateness_ms: 0,
            },
        }
    }

    fn build(functions: &[FunctionDecl]) -> Result<Pipeline, Vec<Error>> {
        Pipeline::build(
            functions,
            &[],
            &streams(),
            Arc::new(sluice_core::ManualClock::new(0)),
        )
    }

    /// Rows `(device, ms, partition)` of source `k`, with the positions of every
    /// partition they name (the offset: the row's index).
    fn keyed(rows: &[(&str, i64, &str)], first: usize) -> StreamBatch {
        let data: Vec<(&str, i64, Option<f64>, &str)> =
            rows.iter().map(|r| (r.0, r.1, Some(1.0), "ok")).collect();
        let mut batch = crate::test_support::telemetry_at(&data, "k");
        let column = batch
            .schema()
            .index_of(sluice_core::schema::PARTITION)
            .unwrap();
        let mut columns = batch.columns().to_vec();
        columns[column] = Arc::new(arrow::array::StringArray::from_iter_values(
            rows.iter().map(|r| r.2),
        ));
        batch = arrow::array::RecordBatch::try_new(batch.schema(), columns).unwrap();
        let offsets = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.2.to_owned(), (first + i).to_string()))
            .collect();
        let mut b = StreamBatch::new("telemetry".into(), batch);
        b.positions = Some(Arc::new(sluice_core::SourcePositions {
            source: "k".into(),
            offsets,
            ..Default::default()
        }));
        b
    }

    /// `per_minute` rows among `out` as (device, window start, count).
    fn minutes(out: &[StreamBatch]) -> Vec<(String, i64, i64)> {
        use arrow::array::AsArray;
        let mut rows = Vec::new();
        for b in out.iter().filter(|b| &*b.stream == "per_minute") {
            let device = b.batch.column(0).as_string::<i32>();
            let start = b
                .batch
                .column(1)
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            let n = b
                .batch
                .column_by_name("n")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..b.batch.num_rows() {
                rows.push((device.value(i).to_owned(), start.value(i), n.value(i)));
            }
        }
        rows.sort();
        rows
    }

    /// `alerts` rows among `out` as (key, event), in order.
    fn alert_events(out: &[StreamBatch]) -> Vec<(String, String)> {
        use arrow::array::AsArray;
        let mut rows = Vec::new();
        for b in out.iter().filter(|b| &*b.stream == "alerts") {
            let key = b.batch.column_by_name("key").unwrap().as_string::<i32>();
            let event = b.batch.column_by_name("event").unwrap().as_string::<i32>();
            for i in 0..b.batch.num_rows() {
                rows.push((key.value(i).to_owned(), event.value(i).to_owned()));
            }
        }
        rows
    }

    /// A node reads partitions t/0 and t/1 of source `k`, then gives t/0 up mid-minute
    /// to a second node, which takes its saved state over and reads on. The two nodes'
    /// windows together give what one pipeline over every row gives, each (device,
    /// minute) once; the frozen state the first node keeps emits nothing. An alert rule
    /// that fires on a device's second window in a row fires for `a`, whose first
    /// window closed on the first node and second on the other: its state moved too.
    #[test]
    fn window_state_by_partition_moves_with_its_partition_to_another_pipeline() {
        let clock = Arc::new(sluice_core::ManualClock::new(0));
        let mut streams = streams();
        if let Some(s) = streams.get_mut("telemetry") {
            s.store = false;
        }
        let rule = AlertSpec {
            name: "busy".into(),
            key: "alerts.busy".into(),
            input: "per_minute".into(),
            condition: Some("n >= 1".into()),
            clear: None,
            value: Some("n".into()),
            group_by: vec!["device_id".into()],
            fire: crate::alert::Fire::Count { m: 2, n: 2 },
            clear_for: 1,
            missing_after_ms: None,
            cooldown_ms: 0,
            severity: "warning".into(),
            labels: Default::default(),
            message: None,
            notify: Vec::new(),
        };
        let cap = AlertingSpec {
            per_second: 1_000,
            burst: 1_000,
        };
        let node = || {
            let rules = std::slice::from_ref(&rule);
            let mut p = Pipeline::build_with_alerts(
                &[],
                &[per_minute()],
                rules,
                Some(cap),
                &streams,
                clock.clone(),
            )
            .unwrap();
            p.instances()
                .keep_by_partition(HashSet::from(["k".to_owned()]));
            p
        };
        let t0 = 1_767_225_600_000;
        let first = keyed(
            &[
                ("a", t0, "t/0"),
                ("c", t0 + 1_000, "t/1"),
                ("a", t0 + 61_000, "t/0"),
                ("b", t0 + 62_000, "t/0"),
                ("c", t0 + 63_000, "t/1"),
            ],
            0,
        );
        let t0_rest = keyed(
            &[
                ("a", t0 + 64_000, "t/0"),
                ("b", t0 + 65_000, "t/0"),
                ("z", t0 + 300_000, "t/0"),
            ],
            5,
        );
        let t1_rest = keyed(&[("c", t0 + 66_000, "t/1"), ("c", t0 + 300_000, "t/1")], 8);
        let (mut out, mut errors) = (Vec::new(), Vec::new());

        // The batch computation: count per device and minute.
        let minute = |m: i64| t0 + m * 60_000;
        let expected: Vec<(String, i64, i64)> = [
            ("a", 0, 1),
            ("a", 1, 2),
            ("b", 1, 2),
            ("c", 0, 1),
            ("c", 1, 2),
            ("c", 5, 1),
            ("z", 5, 1),
        ]
        .iter()
        .map(|&(d, m, n)| (d.to_owned(), minute(m), n))
        .collect();

        let mut a = node();
        a.process(first.clone(), &mut out, &mut errors);
        let names: Vec<String> = a
            .state_names()
            .into_iter()
            .filter(|n| n.ends_with("@k/t/0"))
            .collect();
        assert_eq!(names, ["per_minute@k/t/0", "alert-busy@k/t/0"]);
        let mut saved = Vec::new();
        for name in &names {
            let mut bytes = Vec::new();
            a.snapshot(name, &mut bytes).unwrap();
            let base = crate::window::state_partition(name).unwrap().0;
            saved.push((base.to_owned(), bytes));
        }
        let state = a.instances().partition_state("k/t/0").cloned().unwrap();
        assert_eq!(
            state.position.as_deref(),
            Some("3"),
            "t/0's last row in the state"
        );
        a.instances().freeze("k/t/0");

        let mut b = node();
        b.instances()
            .take("k/t/0", 2, state.position.clone(), &saved)
            .unwrap();
        b.process(t0_rest, &mut out, &mut errors);
        a.process(t1_rest, &mut out, &mut errors);
        a.tick(&mut out, &mut errors);
        a.finish(&mut out, &mut errors);
        b.finish(&mut out, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        // One set of windows over every row would call c's row at 1:06 late: a's 5:00
        // had moved the shared watermark past it. Each partition has its own.
        assert_eq!(minutes(&out), expected);
        // a's two windows closed on two nodes: its first evaluation moved with t/0. b
        // and z had one window each.
        let fired = |d: &str| (d.to_owned(), "fire".to_owned());
        assert_eq!(alert_events(&out), [fired("a"), fired("c")]);
        assert_eq!(
            b.instances().partition_state("k/t/0").map(|s| s.epoch),
            Some(2)
        );
    }

    #[test]
    fn chains_compile_in_dependency_order_and_unknown_inputs_are_named() {
        // `hot` reads `clean`'s output although it is declared first.
        let functions = vec![
            decl("hot", "clean", Some("hot"), "temperature > 80"),
            decl("clean", "telemetry", Some("clean"), "status <> 'error'"),
        ];
        let p = build(&functions).unwrap();
        assert!(p.schemas().contains_key("clean") && p.schemas().contains_key("hot"));

        let errors = build(&[decl("x", "nowhere", None, "true")]).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "functions.x.input: stream \"nowhere\" is not declared and no function produces it"
        );
    }

    /// A source that goes quiet holds windows back until `idle_timeout` passes on the
    /// pipeline's clock; then the other source's progress closes them.
    #[test]
    fn an_idle_source_stops_holding_windows_back() {
        use crate::test_support::telemetry_at;
        let clock = Arc::new(sluice_core::ManualClock::new(1_000_000));
        let mut streams = streams();
        if let Some(s) = streams.get_mut("telemetry") {
            s.watermark.idle_timeout_ms = Some(10_000);
            s.store = false;
        }
        let window = per_minute();
        let mut p = Pipeline::build(&[], &[window], &streams, clock.clone()).unwrap();
        let t0 = 1_767_225_600_000;
        let mut out = Vec::new();
        let mut errors = Vec::new();
        let mut send = |p: &mut Pipeline, source: &str, t: i64, out: &mut Vec<StreamBatch>| {
            let batch = telemetry_at(&[("d", t, Some(1.0), "ok")], source);
            let stream = "telemetry".into();
            p.process(StreamBatch::new(stream, batch), out, &mut errors);
        };
        for (source, t) in [("a", t0), ("b", t0 + 1_000), ("a", t0 + 120_000)] {
            send(&mut p, source, t, &mut out);
        }
        assert!(out.is_empty(), "b (at t0 + 1 s) holds the watermark back");
        clock.advance(9_999);
        // a keeps sending; b has been quiet for 9.999 s.
        send(&mut p, "a", t0 + 121_000, &mut out);
        assert!(errors.is_empty(), "{errors:?}");
        p.tick(&mut out, &mut errors);
        assert!(out.is_empty(), "b is not idle yet");
        clock.advance(1);
        p.tick(&mut out, &mut errors);
        assert_eq!(out.len(), 1, "b idle: the first minute closes");
        assert_eq!(&*out[0].stream, "per_minute");
        assert_eq!(out[0].batch.num_rows(), 1);
    }

    #[test]
    fn a_cycle_stops_at_max_hops_with_dead_letters_an_alert_event_and_published_rows() {
        use arrow::array::AsArray;
        let mut f = decl("loop", "telemetry", None, "true");
        f.spec.routes = vec![RouteSpec {
            when: "true".into(),
            to: "telemetry".into(),
        }];
        let clock = Arc::new(sluice_core::ManualClock::new(1_767_225_600_000));
        let cap = AlertingSpec {
            per_second: 100,
            burst: 100,
        };
        let mut p =
            Pipeline::build_with_alerts(&[f], &[], &[], Some(cap), &streams(), clock.clone())
                .unwrap();
        let publish = PublishDecl {
            key: "publish.back".into(),
            input: "telemetry".into(),
            notifier: "back".into(),
        };
        p.guard(3, &[publish]).unwrap();
        let batch = crate::test_support::telemetry(&[("a", Some(1.0), "ok")]);
        let mut out = Vec::new();
        let mut errors = Vec::new();
        p.process(
            StreamBatch::new("telemetry".into(), batch),
            &mut out,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let hops = |b: &StreamBatch| {
            b.batch
                .column_by_name("_hops")
                .map(|c| c.as_primitive::<arrow::datatypes::UInt8Type>().value(0))
        };
        let streams: Vec<(&str, Option<u8>)> = out.iter().map(|b| (&*b.stream, hops(b))).collect();
        // The input and three hops land; the fourth hop is stopped.
        assert_eq!(
            streams,
            [
                ("telemetry", Some(0)),
                ("telemetry", Some(1)),
                ("telemetry", Some(2)),
                ("dead_letter", None),
                ("telemetry", Some(3)),
            ]
        );
        let dead = &out[3].batch;
        assert_eq!(
            dead.column_by_name("reason")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "loop_detected"
        );
        let payload = dead
            .column_by_name("payload")
            .unwrap()
            .as_binary::<i32>()
            .value(0);
        let row: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(row["_hops"], 4);
        assert_eq!(row["device_id"], "a");
        // Every landed row was published, with its hops and no other system column.
        let published = p.take_notifications();
        let hops: Vec<&serde_json::Value> = published.iter().map(|n| &n.fields["_hops"]).collect();
        assert_eq!(hops, [0, 1, 2, 3]);
        assert!(
            published
                .iter()
                .all(|n| !n.fields.contains_key("_source") && *n.notify == ["back".to_owned()])
        );
        // The alert event comes with the next scan.
        out.clear();
        p.tick(&mut out, &mut errors);
        assert_eq!(out.len(), 1);
        let alert = &out[0].batch;
        let text = |c: &str| {
            alert
                .column_by_name(c)
                .unwrap()
                .as_string::<i32>()
                .value(0)
                .to_owned()
        };
        assert_eq!(
            (text("rule"), text("key"), text("event")),
            ("_loop".into(), "telemetry".into(), "loop_detected".into())
        );
    }

    #[test]
    fn over_the_window_budget_new_keys_are_refused_as_dead_letters_and_windows_still_close() {
        use arrow::array::AsArray;

        use crate::test_support::telemetry_at;
        let clock = Arc::new(sluice_core::ManualClock::new(1_000_000));
        let window = per_minute();
        let mut p = Pipeline::build(&[], &[window], &streams(), clock).unwrap();
        p.set_window_budget(Some(1));
        let t0 = 1_767_225_600_000;
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let send = |p: &mut Pipeline,
                    rows: &[(&str, i64)],
                    out: &mut Vec<StreamBatch>,
                    errors: &mut Vec<Error>| {
            let rows: Vec<_> = rows.iter().map(|&(d, t)| (d, t, Some(1.0), "ok")).collect();
            let batch = telemetry_at(&rows, "src");
            p.process(StreamBatch::new("telemetry".into(), batch), out, errors);
        };
        // Under budget (not measured yet): taken.
        send(&mut p, &[("a", t0), ("b", t0 + 1)], &mut out, &mut errors);
        p.tick(&mut out, &mut errors);
        out.clear();
        // Over: a key the minute holds is taken; a new key in it, and a known key in
        // a new minute, are refused, but their event time still closes the first minute.
        send(
            &mut p,
            &[("c", t0 + 2), ("a", t0 + 3), ("a", t0 + 61_000)],
            &mut out,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let by_stream = |out: &[StreamBatch], s: &str| -> Vec<RecordBatchRef> {
            out.iter()
                .filter(|b| &*b.stream == s)
                .map(|b| b.batch.clone())
                .collect()
        };
        type RecordBatchRef = arrow::record_batch::RecordBatch;
        let dead = by_stream(&out, "dead_letter");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].num_rows(), 2);
        let reasons = dead[0].column_by_name("reason").unwrap().as_string::<i32>();
        assert!(reasons.iter().all(|r| r == Some("state_budget")));
        let streams = dead[0].column_by_name("stream").unwrap().as_string::<i32>();
        assert_eq!(streams.value(0), "per_minute");
        let emitted = by_stream(&out, "per_minute");
        assert_eq!(emitted.len(), 1, "the first minute closed");
        assert_eq!(emitted[0].num_rows(), 2, "a and b, not c");
        let devices = emitted[0]
            .column_by_name("device_id")
            .unwrap()
            .as_string::<i32>();
        let counts = emitted[0]
            .column_by_name("n")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        let count_of = |d: &str| {
            (0..arrow::array::Array::len(devices))
                .find(|&i| devices.value(i) == d)
                .map(|i| counts.value(i))
        };
        assert_eq!(
            (count_of("a"), count_of("b")),
            (Some(2), Some(1)),
            "a's second row was taken"
        );
        assert_eq!(
            by_stream(&out, "telemetry").len(),
            1,
            "the raw rows still land"
        );
        // State freed: back under budget after the next measure, rows are taken again.
        p.tick(&mut out, &mut errors);
        out.clear();
        p.set_window_budget(Some(1 << 30));
        p.tick(&mut out, &mut errors);
        send(&mut p, &[("d", t0 + 62_000)], &mut out, &mut errors);
        assert!(by_stream(&out, "dead_letter").is_empty());
    }

    #[test]
    fn a_function_limit_sheds_the_excess_with_sampled_dead_letters() {
        use crate::guard::RateSpec;
        let mut f = decl("slow", "telemetry", Some("out"), "true");
        f.spec.limit = Some(RateSpec {
            rate: 2,
            burst: 2,
            sample: 2,
            block: false,
        });
        let clock = Arc::new(sluice_core::ManualClock::new(1_767_225_600_000));
        let mut p = Pipeline::build(&[f], &[], &streams(), clock.clone()).unwrap();
        let rows: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|d| (*d, Some(1.0), "ok"))
            .collect();
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let mut send = |p: &mut Pipeline, out: &mut Vec<StreamBatch>| {
            let batch = crate::test_support::telemetry(&rows);
            p.process(
                StreamBatch::new("telemetry".into(), batch),
                out,
                &mut errors,
            );
        };
        let rows_of = |out: &[StreamBatch], s: &str| -> usize {
            out.iter()
                .filter(|b| &*b.stream == s)
                .map(|b| b.batch.num_rows())
                .sum()
        };
        send(&mut p, &mut out);
        assert_eq!(rows_of(&out, "out"), 2, "the burst passes");
        assert_eq!(
            rows_of(&out, "telemetry"),
            5,
            "the input itself is not limited"
        );
        assert_eq!(rows_of(&out, "dead_letter"), 2, "3 shed, 1 in 2 kept");
        out.clear();
        send(&mut p, &mut out);
        assert_eq!(rows_of(&out, "out"), 0, "no room until time passes");
        out.clear();
        clock.advance(1_000);
        send(&mut p, &mut out);
        assert_eq!(rows_of(&out, "out"), 2, "2 a second");
    }

    #[test]
    fn a_blocking_function_limit_takes_every_row_and_counts_it_owed() {
        use crate::guard::RateSpec;
        let mut f = decl("paced", "telemetry", Some("out"), "true");
        f.spec.limit = Some(RateSpec {
            rate: 2,
            burst: 2,
            sample: 1,
            block: true,
        });
        let mut free = decl("free", "telemetry", Some("other"), "true");
        free.spec.limit = None;
        let clock = Arc::new(sluice_core::ManualClock::new(1_767_225_600_000));
        let mut p = Pipeline::build(&[f, free], &[], &streams(), clock).unwrap();
        let rows: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|d| (*d, Some(1.0), "ok"))
            .collect();
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let batch = crate::test_support::telemetry(&rows);
            p.process(
                StreamBatch::new("telemetry".into(), batch),
                &mut out,
                &mut errors,
            );
        }
        assert!(errors.is_empty(), "{errors:?}");
        let out_rows: usize = out
            .iter()
            .filter(|b| &*b.stream == "out")
            .map(|b| b.batch.num_rows())
            .sum();
        assert_eq!(out_rows, 10, "nothing is shed");
        assert!(out.iter().all(|b| &*b.stream != "dead_letter"));
        assert_eq!(p.take_owed(), [("paced".to_owned(), 10)]);
        assert!(p.take_owed().is_empty(), "owed once");
    }
}
