//! Tumbling and hopping windows, as slide-sized panes.
//!
//! Each row is added to exactly one pane (`floor(t / slide) * slide`). A window
//! `[s, s + size)` is the merge of the `size / slide` panes it covers: the panes' live
//! accumulators are drained into state rows ([`Groups::drain_state`]) and merged into
//! fresh accumulators. A tumbling window that is final when first emitted (no allowed
//! lateness) is evaluated from its single pane directly, without the state round trip.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use arrow::array::{
    Array, BooleanArray, MutableArrayData, RecordBatch, TimestampMillisecondArray, UInt32Array,
    make_array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use super::aggregate::{Aggregates, Groups, Inputs};
use super::keys::{KeyHashes, KeySet};
use super::{arrow_error, window_columns};
use crate::Result;

/// Rows no window can take (a mask over the batch) and, for each, the window it missed.
pub(crate) type Missed = (BooleanArray, Vec<(i64, i64)>);

#[derive(Debug)]
struct Pane {
    live: Groups,
    /// Earlier contents, drained from `live` when a window covering the pane was emitted.
    states: Vec<RecordBatch>,
    /// The hashes of the group keys the pane holds, once the window tracks them (see
    /// [`Panes::track_keys`]): over the window-state budget, only rows of these keys
    /// are taken.
    keys: Option<KeySet>,
}

impl Pane {
    fn new(aggregates: &Aggregates, track_keys: bool) -> Result<Self> {
        Ok(Self {
            live: aggregates.new_groups()?,
            states: Vec::new(),
            keys: track_keys.then(KeySet::default),
        })
    }

    /// Starts tracking the pane's keys: its live groups move to a state batch (as a
    /// snapshot moves them) and the keys of every state batch are hashed.
    fn track_keys(&mut self, aggregates: &Aggregates, hasher: &KeyHashes) -> Result<()> {
        if self.keys.is_some() {
            return Ok(());
        }
        if let Some(state) = self.live.drain_state(aggregates)? {
            self.states.push(state);
        }
        let mut keys = KeySet::default();
        for state in &self.states {
            let groups = &state.columns()[..aggregates.group_count()];
            keys.extend(hasher.hash(groups, state.num_rows())?);
        }
        self.keys = Some(keys);
        Ok(())
    }
}

/// Pane state of one tumbling or hopping window.
#[derive(Debug)]
pub(crate) struct Panes {
    size: i64,
    slide: i64,
    panes: BTreeMap<i64, Pane>,
    /// Windows starting before this were emitted or had no rows.
    emitted_upto: i64,
    /// Emitted windows that may still be re-emitted: start → last version.
    versions: BTreeMap<i64, u32>,
    /// Windows to emit again (or for the first time, after a late row).
    dirty: BTreeSet<i64>,
    /// Whether panes keep the hashes of their keys. Only the window-state budget asks
    /// which keys a pane holds, so that set (a hash and an insert per row, and 19 MB
    /// for 1,000,000 keys) is built the first time the budget asks, and kept from
    /// then on (until a restart).
    track_keys: bool,
}

/// What a snapshot keeps besides the pane rows.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PanesMeta {
    emitted_upto: i64,
    versions: Vec<(i64, u32)>,
}

impl Panes {
    pub(crate) fn new(size: i64, slide: i64) -> Self {
        Self {
            size,
            slide,
            panes: BTreeMap::new(),
            emitted_upto: i64::MIN,
            versions: BTreeMap::new(),
            dirty: BTreeSet::new(),
            track_keys: false,
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.panes
            .values()
            .map(|p| {
                p.live.size()
                    + p.keys.as_ref().map_or(0, KeySet::size)
                    + p.states
                        .iter()
                        .map(RecordBatch::get_array_memory_size)
                        .sum::<usize>()
            })
            .sum()
    }

    fn pane_of(&self, t: i64) -> i64 {
        t.div_euclid(self.slide).saturating_mul(self.slide)
    }

    /// Whether every window covering the pane starting at `pane` is final.
    fn closed(&self, pane: i64, watermark: i64, lateness: i64) -> bool {
        pane.saturating_add(self.size).saturating_add(lateness) <= watermark
    }

    /// Rows that no window can take any more, and for each the last window it missed.
    pub(crate) fn missed(
        &self,
        times: &TimestampMillisecondArray,
        watermark: i64,
        lateness: i64,
    ) -> Option<Missed> {
        let min = arrow::compute::min(times)?;
        if !self.closed(self.pane_of(min), watermark, lateness) {
            return None;
        }
        let mask: BooleanArray = times
            .values()
            .iter()
            .map(|&t| Some(self.closed(self.pane_of(t), watermark, lateness)))
            .collect();
        let windows = times
            .values()
            .iter()
            .filter(|&&t| self.closed(self.pane_of(t), watermark, lateness))
            .map(|&t| {
                let p = self.pane_of(t);
                (p, p.saturating_add(self.size))
            })
            .collect();
        Some((mask, windows))
    }

    /// Whether each row's group key is already in the pane its event time falls in
    /// (`false` for a row without an event time). The first call starts tracking keys.
    pub(crate) fn known(
        &mut self,
        aggregates: &Aggregates,
        hasher: &KeyHashes,
        groups: &[arrow::array::ArrayRef],
        times: &TimestampMillisecondArray,
    ) -> Result<BooleanArray> {
        if !self.track_keys {
            for pane in self.panes.values_mut() {
                pane.track_keys(aggregates, hasher)?;
            }
            self.track_keys = true;
        }
        let hashes = hasher.hash(groups, times.len())?;
        Ok((0..times.len())
            .map(|i| {
                Some(
                    times.is_valid(i)
                        && self
                            .panes
                            .get(&self.pane_of(times.value(i)))
                            .and_then(|p| p.keys.as_ref())
                            .is_some_and(|k| k.contains(hashes[i])),
                )
            })
            .collect())
    }

    /// Adds rows (none of them closed: [`Self::missed`] took those) to their panes;
    /// `watermark` is the one before this batch. Returns no late rows; the signature
    /// matches the session engine's.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn update(
        &mut self,
        aggregates: &Aggregates,
        hasher: &KeyHashes,
        inputs: Inputs,
        times: &TimestampMillisecondArray,
        watermark: i64,
        lateness: i64,
    ) -> Result<Option<Missed>> {
        let (Some(min), Some(max)) = (arrow::compute::min(times), arrow::compute::max(times))
        else {
            return Ok(None);
        };
        let (first, last) = (self.pane_of(min), self.pane_of(max));
        let hashes = if self.track_keys {
            hasher.hash(&inputs.groups, times.len())?
        } else {
            Vec::new()
        };
        if first == last {
            let pane = self.pane(aggregates, first, watermark, lateness)?;
            pane.live.update(&inputs)?;
            if let Some(keys) = &mut pane.keys {
                keys.extend(hashes.iter().copied());
            }
            return Ok(None);
        }
        let mut by_pane: HashMap<i64, Vec<u32>> = HashMap::new();
        for (i, &t) in times.values().iter().enumerate() {
            by_pane.entry(self.pane_of(t)).or_default().push(i as u32);
        }
        let mut by_pane: Vec<_> = by_pane.into_iter().collect();
        by_pane.sort_unstable_by_key(|(p, _)| *p);
        for (pane, rows) in by_pane {
            let taken = inputs.take(&UInt32Array::from(rows.clone()))?;
            let pane = self.pane(aggregates, pane, watermark, lateness)?;
            pane.live.update(&taken)?;
            if let Some(keys) = &mut pane.keys {
                keys.extend(rows.iter().map(|&i| hashes[i as usize]));
            }
        }
        Ok(None)
    }

    /// The pane at `start`, created if new; windows over it that were already emitted
    /// (and are not final) are marked for emission.
    fn pane(
        &mut self,
        aggregates: &Aggregates,
        start: i64,
        watermark: i64,
        lateness: i64,
    ) -> Result<&mut Pane> {
        let first_window = start.saturating_sub(self.size - self.slide);
        if first_window < self.emitted_upto {
            let mut s = first_window;
            while s <= start && s < self.emitted_upto {
                if s.saturating_add(self.size).saturating_add(lateness) > watermark {
                    self.dirty.insert(s);
                }
                s = s.saturating_add(self.slide);
            }
        }
        Ok(match self.panes.entry(start) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Pane::new(aggregates, self.track_keys)?)
            }
        })
    }

    /// Emits the windows the watermark passed, then the dirty ones; drops what is final.
    pub(crate) fn emit(
        &mut self,
        aggregates: &Aggregates,
        output: &SchemaRef,
        watermark: i64,
        lateness: i64,
    ) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        // What late rows added to the panes of emitted windows (their live parts) is
        // drained before anything fires: a re-emitted window shows only the groups
        // those rows touched, and a first firing below may share those panes.
        let dirty = std::mem::take(&mut self.dirty);
        let mut touched: BTreeMap<i64, Vec<RecordBatch>> = BTreeMap::new();
        for &s in &dirty {
            for (&p, pane) in self.panes.range_mut(s..s.saturating_add(self.size)) {
                if let Some(state) = pane.live.drain_state(aggregates)? {
                    touched.entry(p).or_default().push(state.clone());
                    pane.states.push(state);
                }
            }
        }
        // First firings, in window order, of every window the watermark passed:
        // starts below `stop`.
        let stop = i128::from(watermark) - i128::from(self.size);
        let stop = stop.div_euclid(i128::from(self.slide)) * i128::from(self.slide)
            + i128::from(self.slide);
        let stop = i64::try_from(stop.max(i128::from(i64::MIN))).unwrap_or(i64::MAX);
        if let Some(&first) = self.panes.keys().next() {
            let mut s = self
                .emitted_upto
                .max(first.saturating_sub(self.size - self.slide));
            while s < stop {
                // Skip windows over no pane.
                match self.panes.range(s..).next().map(|(&p, _)| p) {
                    None => {
                        s = stop;
                        break;
                    }
                    Some(p) if p >= s.saturating_add(self.size) => {
                        s = p.saturating_sub(self.size - self.slide).min(stop);
                        continue;
                    }
                    Some(_) => {}
                }
                self.dirty.remove(&s);
                out.extend(self.fire(aggregates, output, s, 1, None, watermark, lateness)?);
                s = s.saturating_add(self.slide);
            }
            self.emitted_upto = self.emitted_upto.max(s);
        }
        // Late firings.
        for s in dirty {
            let version = self.versions.get(&s).copied().unwrap_or(0) + 1;
            let seeds = (version > 1).then_some(&touched);
            out.extend(self.fire(aggregates, output, s, version, seeds, watermark, lateness)?);
        }
        // Forget what is final.
        self.versions
            .retain(|&s, _| s.saturating_add(self.size).saturating_add(lateness) > watermark);
        let (size, emitted_upto) = (self.size, self.emitted_upto);
        self.panes.retain(|&p, _| {
            p.saturating_add(size).saturating_add(lateness) > watermark || p >= emitted_upto
        });
        Ok(out)
    }

    /// One window's rows; with `seeds`, only the groups in the seed states of its panes
    /// (`None` if there are none).
    #[allow(clippy::too_many_arguments)]
    fn fire(
        &mut self,
        aggregates: &Aggregates,
        output: &SchemaRef,
        start: i64,
        version: u32,
        seeds: Option<&BTreeMap<i64, Vec<RecordBatch>>>,
        watermark: i64,
        lateness: i64,
    ) -> Result<Option<RecordBatch>> {
        let end = start.saturating_add(self.size);
        let is_final = end.saturating_add(lateness) <= watermark;
        if !is_final {
            self.versions.insert(start, version);
        }
        let direct = is_final
            && self.size == self.slide
            && self.panes.get(&start).is_some_and(|p| p.states.is_empty());
        let (groups, values) = if direct {
            let pane = self.panes.get_mut(&start).expect("checked above");
            pane.live.drain_values()?
        } else {
            let mut merged = aggregates.new_groups()?;
            for state in seeds
                .iter()
                .flat_map(|s| s.range(start..end))
                .flat_map(|(_, b)| b)
            {
                merged.seed(aggregates, state)?;
            }
            let touched = merged.len();
            if seeds.is_some() && touched == 0 {
                return Ok(None);
            }
            for (_, pane) in self.panes.range_mut(start..end) {
                if let Some(state) = pane.live.drain_state(aggregates)? {
                    pane.states.push(state);
                }
                for state in &pane.states {
                    merged.merge(aggregates, state)?;
                }
            }
            if seeds.is_some() {
                merged.drain_first(touched)?
            } else {
                merged.drain_values()?
            }
        };
        let n = groups.first().or(values.first()).map_or(0, |a| a.len());
        aggregates
            .finish(
                output,
                groups,
                values,
                window_columns(vec![start; n], vec![end; n], vec![version; n]),
            )
            .map(Some)
    }

    /// Every pane's state rows with a leading `_pane` column, a batch per pane part
    /// (the snapshot writes them one by one, so all state is not copied once more).
    pub(crate) fn snapshot(
        &mut self,
        aggregates: &Aggregates,
    ) -> Result<(SchemaRef, Vec<RecordBatch>, PanesMeta)> {
        let schema = snapshot_schema(aggregates);
        let mut batches = Vec::new();
        for (&start, pane) in &mut self.panes {
            if let Some(state) = pane.live.drain_state(aggregates)? {
                pane.states.push(state);
            }
            for state in &pane.states {
                let mut columns = vec![std::sync::Arc::new(arrow::array::Int64Array::from(vec![
                        start;
                        state.num_rows()
                    ])) as _];
                columns.extend(state.columns().iter().cloned());
                batches.push(RecordBatch::try_new(schema.clone(), columns).map_err(arrow_error)?);
            }
        }
        Ok((
            schema,
            batches,
            PanesMeta {
                emitted_upto: self.emitted_upto,
                versions: self.versions.iter().map(|(&s, &v)| (s, v)).collect(),
            },
        ))
    }

    /// Forgets every pane and takes the snapshot's bookkeeping, before a restore adds
    /// the panes' rows.
    pub(crate) fn reset(&mut self, meta: PanesMeta) {
        self.panes.clear();
        self.dirty.clear();
        self.track_keys = false;
        self.emitted_upto = meta.emitted_upto;
        self.versions = meta.versions.into_iter().collect();
    }

    /// Adds one snapshot batch's rows (after [`reset`](Self::reset)); a pane split
    /// across batches gets a state batch from each.
    pub(crate) fn restore(&mut self, aggregates: &Aggregates, rows: &RecordBatch) -> Result<()> {
        if rows.num_columns() == 0 {
            return Err(super::window_error("snapshot has no _pane column"));
        }
        let starts = rows
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .ok_or_else(|| super::window_error("snapshot has no _pane column"))?;
        let state = RecordBatch::try_new(
            aggregates.state_schema().clone(),
            rows.columns()[1..].to_vec(),
        )
        .map_err(arrow_error)?;
        let mut i = 0;
        while i < starts.len() {
            let start = starts.value(i);
            let mut j = i;
            while j < starts.len() && starts.value(j) == start {
                j += 1;
            }
            let pane = match self.panes.entry(start) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(Pane::new(aggregates, false)?)
                }
            };
            pane.states.push(owned(&state.slice(i, j - i))?);
            i = j;
        }
        Ok(())
    }
}

/// `batch`'s rows copied into buffers of their own. A batch read from a snapshot
/// shares one buffer (the IPC message's body) among its columns, and a pane's slice
/// shares its batch's, while [`RecordBatch::get_array_memory_size`] counts the whole
/// buffer for each column of each slice: restored state measured several times its
/// size (400,000 keys: 331 MB for 60), which the window-state budget would take for
/// real and refuse new keys. The copy also lets the snapshot's buffers go.
fn owned(batch: &RecordBatch) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .map(|column| {
            let data = column.to_data();
            let mut copy = MutableArrayData::new(vec![&data], false, data.len());
            copy.try_extend(0, 0, data.len()).map_err(arrow_error)?;
            Ok(make_array(copy.freeze()))
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(batch.schema(), columns).map_err(arrow_error)
}

fn snapshot_schema(aggregates: &Aggregates) -> SchemaRef {
    let mut fields = vec![std::sync::Arc::new(Field::new(
        "_pane",
        DataType::Int64,
        false,
    ))];
    fields.extend(aggregates.state_schema().fields().iter().cloned());
    std::sync::Arc::new(Schema::new(fields))
}
