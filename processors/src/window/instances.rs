//! Window state kept per source partition, so that it can move with the partition.
//!
//! A node of a cluster reads some partitions of a source; another node may read them
//! next. [`Instances`] keeps, for the sources named by
//! [`Instances::keep_by_partition`], one set of the pipeline's windows per partition
//! (`<source>/<partition>`), fed only that partition's rows, with a watermark of its
//! own. A keyed producer puts each key in one partition, so each (key, window) is in
//! one instance, and the union of the instances' output is what one set of windows
//! over every row gives. Everything else (rows of other sources, derived rows without
//! positions) goes to the shared set, as on a single node.
//!
//! An instance is saved in a checkpoint as one state per window, named
//! `<window>@<source>/<partition>`, with its [`PartitionState`] (epoch and position).
//! A node giving a partition up freezes its instance once it has processed the
//! partition's last row: frozen, it emits nothing on ticks and is saved unchanged, so
//! whichever of its checkpoints the next owner reads holds the same state. A node
//! taking a partition over replaces its instance with the newest owner's saved state
//! ([`Instances::take`]), or keeps its own ([`Instances::thaw`]) when that is newer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, UInt32Array};
use arrow::datatypes::SchemaRef;
use sluice_core::schema::PARTITION;
use sluice_core::{PartitionState, SourcePositions, StreamBatch};

use super::{WatermarkSpec, Window, WindowSpec, window_error};
use crate::Result;
use crate::alert::Alerts;

/// Separates a window's name from the partition in a state name.
const AT: char = '@';

/// A window as compiled, to compile it again for a new partition.
#[derive(Debug, Clone)]
struct Decl {
    spec: WindowSpec,
    input: SchemaRef,
    watermark: WatermarkSpec,
}

/// One partition's windows and alert rules.
#[derive(Debug)]
struct Instance {
    windows: Vec<Window>,
    alerts: Option<Alerts>,
    frozen: bool,
    state: PartitionState,
}

/// The windows of a pipeline: one shared set, and one set per partition of the
/// sources kept by partition.
#[derive(Debug, Default)]
pub struct Instances {
    decls: Vec<Decl>,
    shared: Vec<Window>,
    /// The alert rules with no state, for each new partition.
    alerts: Option<Alerts>,
    sources: HashSet<String>,
    partitions: BTreeMap<String, Instance>,
    /// The partition whose rows are being processed (`None`: the shared set).
    current: Option<String>,
}

impl Instances {
    /// Adds a compiled window; `spec`, `input` and `watermark` compile it again for
    /// each partition.
    pub(crate) fn push(
        &mut self,
        window: Window,
        spec: &WindowSpec,
        input: &SchemaRef,
        watermark: WatermarkSpec,
    ) {
        self.shared.push(window);
        self.decls.push(Decl {
            spec: spec.clone(),
            input: input.clone(),
            watermark,
        });
    }

    /// Gives each partition the rules of `alerts` (with no state, sharing its
    /// notification cap): a rule over a window table or a stream sees only its
    /// partition's rows, so its keys' state moves with the partition too.
    pub(crate) fn set_alerts(&mut self, alerts: &Alerts) {
        self.alerts = Some(alerts.fresh_like());
    }

    /// Keeps window and alert state per partition for rows of `sources` (a node of a
    /// cluster: their partitions move between nodes). No effect without windows.
    pub fn keep_by_partition(&mut self, sources: HashSet<String>) {
        if !self.decls.is_empty() {
            self.sources = sources;
        }
    }

    /// The shared windows (also the names and schemas of every instance's).
    pub fn shared(&self) -> &[Window] {
        &self.shared
    }

    /// The windows rows go to now: the current partition's, or the shared ones.
    pub(crate) fn current(&mut self) -> &mut [Window] {
        match self
            .current
            .as_ref()
            .and_then(|k| self.partitions.get_mut(k))
        {
            Some(instance) => &mut instance.windows,
            None => &mut self.shared,
        }
    }

    /// The alert rules of the current partition (`None`: the shared ones apply).
    pub(crate) fn current_alerts(&mut self) -> Option<&mut Alerts> {
        let key = self.current.as_ref()?;
        self.partitions.get_mut(key)?.alerts.as_mut()
    }

    /// The alert rules of every partition; `live`: only of those not frozen.
    pub(crate) fn partition_alerts(&mut self, live: bool) -> impl Iterator<Item = &mut Alerts> {
        self.partitions
            .values_mut()
            .filter(move |i| !live || !i.frozen)
            .filter_map(|i| i.alerts.as_mut())
    }

    /// Every window that emits on ticks: the shared ones and those of partitions not
    /// frozen.
    pub(crate) fn live(&mut self) -> impl Iterator<Item = &mut Window> {
        self.shared.iter_mut().chain(
            self.partitions
                .values_mut()
                .filter(|i| !i.frozen)
                .flat_map(|i| i.windows.iter_mut()),
        )
    }

    /// Per window (in the order of [`shared`](Self::shared)): its name, the lowest
    /// watermark among the sets that take ticks (shared, and partitions not frozen),
    /// and the state bytes of every set.
    pub fn gauges(&self) -> Vec<(&str, Option<i64>, usize)> {
        self.shared
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let sets = std::iter::once((&self.shared, false))
                    .chain(self.partitions.values().map(|p| (&p.windows, p.frozen)));
                let (mut mark, mut bytes) = (None::<i64>, 0);
                for (windows, frozen) in sets {
                    bytes += windows[i].state_size();
                    if let Some(m) = windows[i].watermark().filter(|_| !frozen) {
                        mark = Some(mark.map_or(m, |low| low.min(m)));
                    }
                }
                (w.name(), mark, bytes)
            })
            .collect()
    }

    /// Every window of every instance.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Window> {
        self.shared
            .iter()
            .chain(self.partitions.values().flat_map(|i| i.windows.iter()))
    }

    /// `batch` split by partition when its source is kept by partition: one batch per
    /// `_partition` value (in order of first row), each with the positions of its own
    /// partition only (its windows wait for no other). `None`: the shared windows
    /// take it whole.
    pub(crate) fn split(&self, batch: &StreamBatch) -> Option<Vec<(String, StreamBatch)>> {
        let positions = batch.positions.as_ref()?;
        if !self.sources.contains(&positions.source) {
            return None;
        }
        let column = batch
            .batch
            .column_by_name(PARTITION)?
            .as_string_opt::<i32>()?;
        let mut order: Vec<&str> = Vec::new();
        let mut rows: HashMap<&str, Vec<u32>> = HashMap::new();
        for i in 0..column.len() {
            let p = if column.is_valid(i) {
                column.value(i)
            } else {
                ""
            };
            rows.entry(p)
                .or_insert_with(|| {
                    order.push(p);
                    Vec::new()
                })
                .push(i as u32);
        }
        // The entry of partition `p` alone.
        fn only<V: Clone>(map: &BTreeMap<String, V>, p: &str) -> BTreeMap<String, V> {
            map.get_key_value(p)
                .map(|(k, v)| (k.clone(), v.clone()))
                .into_iter()
                .collect()
        }
        let narrow = |p: &str| {
            Arc::new(SourcePositions {
                source: positions.source.clone(),
                offsets: only(&positions.offsets, p),
                origins: only(&positions.origins, p),
                open: only(&positions.open, p),
                log_series: positions.log_series,
            })
        };
        let whole = order.len() == 1;
        order
            .into_iter()
            .map(|p| {
                let part = if whole {
                    batch.batch.clone()
                } else {
                    let indices = UInt32Array::from(rows.remove(p).unwrap_or_default());
                    match arrow::compute::take_record_batch(&batch.batch, &indices) {
                        Ok(b) => b,
                        // Cannot fail: the indices are rows of the batch.
                        Err(_) => return None,
                    }
                };
                Some((
                    format!("{}/{p}", positions.source),
                    StreamBatch {
                        stream: batch.stream.clone(),
                        batch: part,
                        positions: Some(narrow(p)),
                    },
                ))
            })
            .collect()
    }

    /// Rows of partition `key` come next (created empty if new); `None`: the shared
    /// windows.
    pub(crate) fn enter(&mut self, key: Option<String>) -> Result<()> {
        if let Some(key) = &key
            && !self.partitions.contains_key(key)
        {
            let instance = self.fresh(PartitionState::default())?;
            self.partitions.insert(key.clone(), instance);
        }
        self.current = key;
        Ok(())
    }

    fn fresh(&self, state: PartitionState) -> Result<Instance> {
        let windows = self
            .decls
            .iter()
            .map(|d| Window::compile(&d.spec, &d.input, d.watermark))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|errors| {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                window_error(&errors.join("; "))
            })?;
        Ok(Instance {
            windows,
            alerts: self.alerts.as_ref().map(Alerts::fresh_like),
            frozen: false,
            state,
        })
    }

    /// The names of the window states a checkpoint saves: each shared window's, and
    /// `<window>@<partition>` for each partition's.
    pub(crate) fn state_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shared.iter().map(|w| w.name().to_owned()).collect();
        for (key, instance) in &self.partitions {
            let windows = instance.windows.iter().map(|w| w.name().to_owned());
            let alerts = instance.alerts.iter().flat_map(Alerts::snapshot_names);
            names.extend(windows.chain(alerts).map(|n| format!("{n}{AT}{key}")));
        }
        names
    }

    /// The alert rules a partition's state name names (`alert-<rule>@<partition>`),
    /// and the name the rules know the state by; see
    /// [`by_state_name`](Self::by_state_name).
    pub(crate) fn alerts_by_state_name<'a>(
        &mut self,
        name: &'a str,
        create: bool,
    ) -> Result<Option<(&mut Alerts, &'a str)>> {
        let Some((base, key)) = name.split_once(AT) else {
            return Ok(None);
        };
        if !self.ensure_saved(key, create)? {
            return Ok(None);
        }
        Ok(self
            .partitions
            .get_mut(key)
            .and_then(|i| i.alerts.as_mut())
            .map(|a| (a, base)))
    }

    /// Whether partition `key` is kept; with `create`, a partition of a kept source
    /// that is not is created frozen (a restart restores it before its source takes
    /// the partition over).
    fn ensure_saved(&mut self, key: &str, create: bool) -> Result<bool> {
        if self.partitions.contains_key(key) {
            return Ok(true);
        }
        let kept = key
            .split_once('/')
            .is_some_and(|(source, _)| self.sources.contains(source));
        if !create || !kept {
            return Ok(false);
        }
        let mut instance = self.fresh(PartitionState::default())?;
        instance.frozen = true;
        self.partitions.insert(key.to_owned(), instance);
        Ok(true)
    }

    /// The window a state name names (see [`state_names`](Self::state_names)); with
    /// `create`, a partition not kept yet is created frozen (see `ensure_saved`).
    pub(crate) fn by_state_name(
        &mut self,
        name: &str,
        create: bool,
    ) -> Result<Option<&mut Window>> {
        let (window, instance) = match name.split_once(AT) {
            Some((window, key)) => {
                if !self.ensure_saved(key, create)? {
                    return Ok(None);
                }
                let instance = self.partitions.get_mut(key).map(|i| &mut i.windows);
                (window, instance)
            }
            None => (name, Some(&mut self.shared)),
        };
        Ok(instance.and_then(|ws| ws.iter_mut().find(|w| w.name() == window)))
    }

    /// Every partition kept, with its state's epoch and position.
    pub fn partition_states(&self) -> BTreeMap<String, PartitionState> {
        self.partitions
            .iter()
            .map(|(k, i)| (k.clone(), i.state.clone()))
            .collect()
    }

    /// Partition `key`'s state, if this node keeps one.
    pub fn partition_state(&self, key: &str) -> Option<&PartitionState> {
        self.partitions.get(key).map(|i| &i.state)
    }

    /// Sets what a restored partition's state holds (its checkpoint's entry).
    pub fn set_partition_state(&mut self, key: &str, state: PartitionState) {
        if let Some(i) = self.partitions.get_mut(key) {
            i.state = state;
        }
    }

    /// Records that partition `key`'s rows reached `position` (its state then holds
    /// them).
    pub(crate) fn advance(&mut self, key: &str, position: Option<&String>) {
        if let (Some(i), Some(p)) = (self.partitions.get_mut(key), position) {
            i.state.position = Some(p.clone());
        }
    }

    /// Partition `key` was given up and its last row processed: its state stops
    /// changing (no emission on ticks) and is saved as it is.
    pub fn freeze(&mut self, key: &str) {
        if let Some(i) = self.partitions.get_mut(key) {
            i.frozen = true;
        }
    }

    /// This node owns partition `key` again, under `epoch`, and its own state is the
    /// newest: it goes on from there (an empty one if it has none).
    pub fn thaw(&mut self, key: &str, epoch: u64) -> Result<()> {
        if !self.partitions.contains_key(key) {
            let instance = self.fresh(PartitionState::default())?;
            self.partitions.insert(key.to_owned(), instance);
        }
        if let Some(i) = self.partitions.get_mut(key) {
            i.frozen = false;
            i.state.epoch = epoch;
        }
        Ok(())
    }

    /// This node owns partition `key` under `epoch`, and another node's saved state
    /// `snapshots` (window or `alert-<rule>` → snapshot) at `position` is the newest:
    /// it replaces this node's.
    pub fn take(
        &mut self,
        key: &str,
        epoch: u64,
        position: Option<String>,
        snapshots: &[(String, Vec<u8>)],
    ) -> Result<()> {
        let mut instance = self.fresh(PartitionState { epoch, position })?;
        for (name, bytes) in snapshots {
            let restored = match instance.windows.iter_mut().find(|w| w.name() == name) {
                Some(w) => w.restore(&mut bytes.as_slice()).map(|()| true)?,
                None => match &mut instance.alerts {
                    Some(alerts) => alerts.restore(name, &mut bytes.as_slice())?,
                    None => false,
                },
            };
            if !restored {
                tracing::warn!(state = %name, partition = %key, "state of a window or alert rule no longer configured is ignored");
            }
        }
        self.partitions.insert(key.to_owned(), instance);
        Ok(())
    }
}

/// The partition of a state name (`<window>@<source>/<partition>`), if it has one.
pub fn state_partition(name: &str) -> Option<(&str, &str)> {
    name.split_once(AT)
}
