//! Session windows: per group, events closer than `gap` belong to one session.
//!
//! A session is `[first event, last event + gap)`. An event joins every session of its
//! group it is within `gap` of; when it touches two, they merge (their accumulator
//! states are combined) and the result is emitted again with a version above both.
//! Sessions are assigned row by row (which session an event joins depends on the ones
//! before it), but the aggregate inputs are evaluated per batch and fed per session.
//!
//! Each session has its own row [`Accumulator`]s: merging two sessions needs one
//! group's state without draining the others, which `GroupsAccumulator` cannot do.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, TimestampMillisecondArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;

use super::aggregate::{Aggregates, Inputs};
use super::panes::Missed;
use super::{arrow_error, window_columns, window_error};
use crate::Result;

struct Session {
    key: Box<[u8]>,
    start: i64,
    last: i64,
    accumulators: Vec<Box<dyn Accumulator>>,
    /// Last emitted version; 0 before the first emission.
    version: u32,
    /// Timer key: end while not emitted, end + lateness after.
    deadline: i64,
}

/// Open sessions of one window.
pub(crate) struct Sessions {
    gap: i64,
    converter: RowConverter,
    sessions: HashMap<u64, Session>,
    by_key: HashMap<Box<[u8]>, Vec<u64>>,
    timers: BTreeSet<(i64, u64)>,
    dirty: BTreeSet<u64>,
    next_id: u64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("gap", &self.gap)
            .field("open", &self.sessions.len())
            .finish()
    }
}

impl Sessions {
    pub(crate) fn new(gap: i64, aggregates: &Aggregates) -> Result<Self> {
        let fields = aggregates.state_schema().fields()[..aggregates.group_count()]
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        Ok(Self {
            gap,
            converter: RowConverter::new(fields).map_err(arrow_error)?,
            sessions: HashMap::new(),
            by_key: HashMap::new(),
            timers: BTreeSet::new(),
            dirty: BTreeSet::new(),
            next_id: 0,
        })
    }

    pub(crate) fn size(&self) -> usize {
        self.sessions
            .values()
            .map(|s| s.key.len() + 64 + s.accumulators.iter().map(|a| a.size()).sum::<usize>())
            .sum()
    }

    /// Assigns rows to sessions; returns the rows no session can take any more (with
    /// the window each would have opened).
    /// Whether each of `n` rows' group key has a session open.
    pub(crate) fn known(
        &self,
        groups: &[arrow::array::ArrayRef],
        n: usize,
    ) -> Result<BooleanArray> {
        if groups.is_empty() {
            return Ok(vec![Some(!self.by_key.is_empty()); n].into());
        }
        let rows = self
            .converter
            .convert_columns(groups)
            .map_err(arrow_error)?;
        Ok((0..rows.num_rows())
            .map(|i| Some(self.by_key.contains_key(rows.row(i).as_ref())))
            .collect())
    }

    pub(crate) fn update(
        &mut self,
        aggregates: &Aggregates,
        inputs: Inputs,
        times: &TimestampMillisecondArray,
        watermark: i64,
        lateness: i64,
    ) -> Result<Option<Missed>> {
        let rows = self
            .converter
            .convert_columns(&inputs.groups)
            .map_err(arrow_error)?;
        let mut pending: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut late = Vec::new();
        let mut late_windows = Vec::new();
        let gap = self.gap;
        // Reused for every row: the sessions of the row's key it falls within.
        let mut touching: Vec<u64> = Vec::new();
        for (i, &t) in times.values().iter().enumerate() {
            let key = rows.row(i);
            touching.clear();
            if let Some(ids) = self.by_key.get(key.as_ref()) {
                touching.extend(ids.iter().copied().filter(|id| {
                    let s = &self.sessions[id];
                    t > s.start.saturating_sub(gap) && t < s.last.saturating_add(gap)
                }));
            }
            if touching.is_empty() {
                if t.saturating_add(gap).saturating_add(lateness) <= watermark {
                    late.push(i);
                    late_windows.push((t, t.saturating_add(gap)));
                    continue;
                }
                let id = self.next_id;
                self.next_id += 1;
                let owned: Box<[u8]> = key.as_ref().into();
                self.by_key.entry(owned.clone()).or_default().push(id);
                self.sessions.insert(
                    id,
                    Session {
                        key: owned,
                        start: t,
                        last: t,
                        accumulators: aggregates.new_accumulators()?,
                        version: 0,
                        deadline: t.saturating_add(gap),
                    },
                );
                self.timers.insert((t.saturating_add(gap), id));
                pending.entry(id).or_default().push(i as u32);
                continue;
            }
            touching.sort_by_key(|id| self.sessions[id].start);
            let target = touching[0];
            for other in touching.drain(1..) {
                self.merge(aggregates, target, other)?;
                if let Some(rows) = pending.remove(&other) {
                    pending.entry(target).or_default().extend(rows);
                }
            }
            let s = self.sessions.get_mut(&target).expect("touching ids exist");
            s.start = s.start.min(t);
            s.last = s.last.max(t);
            pending.entry(target).or_default().push(i as u32);
        }
        for (id, rows) in pending {
            let taken = inputs.take(&UInt32Array::from(rows))?;
            let s = self.sessions.get_mut(&id).expect("pending ids exist");
            aggregates.update_accumulators(&mut s.accumulators, &taken)?;
            if s.version > 0 {
                self.dirty.insert(id);
            }
            self.reschedule(id, lateness);
        }
        if late.is_empty() {
            return Ok(None);
        }
        let mut mask = vec![false; times.len()];
        for i in late {
            mask[i] = true;
        }
        Ok(Some((BooleanArray::from(mask), late_windows)))
    }

    /// Folds session `other` into `target`.
    fn merge(&mut self, aggregates: &Aggregates, target: u64, other: u64) -> Result<()> {
        let Some(mut absorbed) = self.sessions.remove(&other) else {
            return Ok(());
        };
        self.timers.remove(&(absorbed.deadline, other));
        self.dirty.remove(&other);
        if let Some(ids) = self.by_key.get_mut(&absorbed.key) {
            ids.retain(|&id| id != other);
        }
        let states = state_arrays(&mut absorbed.accumulators)?;
        let s = self.sessions.get_mut(&target).expect("target exists");
        for (acc, values) in s
            .accumulators
            .iter_mut()
            .zip(aggregates.split_states(&states))
        {
            acc.merge_batch(values)
                .map_err(|e| window_error(&e.to_string()))?;
        }
        s.start = s.start.min(absorbed.start);
        s.last = s.last.max(absorbed.last);
        s.version = s.version.max(absorbed.version);
        if s.version > 0 {
            self.dirty.insert(target);
        }
        Ok(())
    }

    fn reschedule(&mut self, id: u64, lateness: i64) {
        let s = self.sessions.get_mut(&id).expect("session exists");
        let end = s.last.saturating_add(self.gap);
        let deadline = if s.version == 0 {
            end
        } else {
            end.saturating_add(lateness)
        };
        self.timers.remove(&(s.deadline, id));
        s.deadline = deadline;
        self.timers.insert((deadline, id));
    }

    /// Emits sessions the watermark closed and the dirty ones; drops the final ones.
    pub(crate) fn emit(
        &mut self,
        aggregates: &Aggregates,
        output: &SchemaRef,
        watermark: i64,
        lateness: i64,
    ) -> Result<Vec<RecordBatch>> {
        let mut fire = std::mem::take(&mut self.dirty);
        let mut finished = Vec::new();
        while let Some(&(deadline, id)) = self.timers.first() {
            if deadline > watermark {
                break;
            }
            self.timers.pop_first();
            let s = &self.sessions[&id];
            if s.version == 0 {
                fire.insert(id);
            }
            let end = s.last.saturating_add(self.gap);
            if end.saturating_add(lateness) <= watermark {
                finished.push(id);
            } else {
                self.timers.insert((end.saturating_add(lateness), id));
                self.sessions.get_mut(&id).expect("exists").deadline = end.saturating_add(lateness);
            }
        }
        let mut out = Vec::new();
        if !fire.is_empty() {
            let ids: Vec<u64> = fire.into_iter().collect();
            out.push(self.fire(aggregates, output, &ids)?);
        }
        for id in finished {
            if let Some(s) = self.sessions.remove(&id)
                && let Some(ids) = self.by_key.get_mut(&s.key)
            {
                ids.retain(|&x| x != id);
                if ids.is_empty() {
                    self.by_key.remove(&s.key);
                }
            }
        }
        Ok(out)
    }

    fn fire(
        &mut self,
        aggregates: &Aggregates,
        output: &SchemaRef,
        ids: &[u64],
    ) -> Result<RecordBatch> {
        let mut starts = Vec::with_capacity(ids.len());
        let mut ends = Vec::with_capacity(ids.len());
        let mut versions = Vec::with_capacity(ids.len());
        let mut per_aggregate: Vec<Vec<ScalarValue>> = Vec::new();
        for &id in ids {
            let s = self.sessions.get_mut(&id).expect("fired sessions exist");
            s.version = s.version.saturating_add(1);
            starts.push(s.start);
            ends.push(s.last.saturating_add(self.gap));
            versions.push(s.version);
            for (i, acc) in s.accumulators.iter_mut().enumerate() {
                if per_aggregate.len() <= i {
                    per_aggregate.push(Vec::with_capacity(ids.len()));
                }
                per_aggregate[i].push(acc.evaluate().map_err(|e| window_error(&e.to_string()))?);
            }
        }
        let parser = self.converter.parser();
        let groups = self
            .converter
            .convert_rows(ids.iter().map(|id| parser.parse(&self.sessions[id].key)))
            .map_err(arrow_error)?;
        let values = per_aggregate
            .into_iter()
            .map(|v| ScalarValue::iter_to_array(v).map_err(|e| window_error(&e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        aggregates.finish(
            output,
            groups,
            values,
            window_columns(starts, ends, versions),
        )
    }

    /// Every session as one row: `_start`, `_last`, `_version`, group and state columns.
    pub(crate) fn snapshot(&mut self, aggregates: &Aggregates) -> Result<RecordBatch> {
        let schema = snapshot_schema(aggregates);
        let mut ids: Vec<u64> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        let mut states: Vec<Vec<ScalarValue>> = Vec::new();
        for id in &ids {
            let s = self.sessions.get_mut(id).expect("listed");
            let mut at = 0;
            for acc in &mut s.accumulators {
                for v in acc.state().map_err(|e| window_error(&e.to_string()))? {
                    if states.len() <= at {
                        states.push(Vec::new());
                    }
                    states[at].push(v);
                    at += 1;
                }
            }
        }
        let get = |f: fn(&Session) -> i64| {
            Int64Array::from_iter_values(ids.iter().map(|id| f(&self.sessions[id])))
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(get(|s| s.start)),
            Arc::new(get(|s| s.last)),
            Arc::new(UInt32Array::from_iter_values(
                ids.iter().map(|id| self.sessions[id].version),
            )),
        ];
        let parser = self.converter.parser();
        columns.extend(
            self.converter
                .convert_rows(ids.iter().map(|id| parser.parse(&self.sessions[id].key)))
                .map_err(arrow_error)?,
        );
        for (i, field) in aggregates.state_schema().fields()[aggregates.group_count()..]
            .iter()
            .enumerate()
        {
            let values = states.get(i).cloned().unwrap_or_default();
            columns.push(if values.is_empty() {
                arrow::array::new_empty_array(field.data_type())
            } else {
                ScalarValue::iter_to_array(values).map_err(|e| window_error(&e.to_string()))?
            });
        }
        RecordBatch::try_new_with_options(
            schema,
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(ids.len())),
        )
        .map_err(arrow_error)
    }

    /// Forgets every session, before a restore adds the snapshot's.
    pub(crate) fn clear(&mut self) {
        self.sessions.clear();
        self.by_key.clear();
        self.timers.clear();
        self.dirty.clear();
    }

    /// Adds the sessions of one snapshot batch (after [`clear`](Self::clear)).
    pub(crate) fn restore(
        &mut self,
        aggregates: &Aggregates,
        rows: &RecordBatch,
        lateness: i64,
    ) -> Result<()> {
        // A snapshot of another config (an aggregate added, or of another type) or a
        // damaged file: refused whole, before any column is read as what it is not.
        if rows.num_columns() < 3 {
            return Err(window_error("bad session snapshot"));
        }
        let state = RecordBatch::try_new_with_options(
            aggregates.state_schema().clone(),
            rows.columns()[3..].to_vec(),
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.num_rows())),
        )
        .map_err(arrow_error)?;
        let int = |i: usize| {
            rows.column(i)
                .as_any()
                .downcast_ref::<Int64Array>()
                .cloned()
                .ok_or_else(|| window_error("bad session snapshot"))
        };
        let (starts, lasts) = (int(0)?, int(1)?);
        let versions = rows
            .column(2)
            .as_any()
            .downcast_ref::<UInt32Array>()
            .cloned()
            .ok_or_else(|| window_error("bad session snapshot"))?;
        let groups = aggregates.group_count();
        let keys = self
            .converter
            .convert_columns(&state.columns()[..groups])
            .map_err(arrow_error)?;
        let states = &state.columns()[groups..];
        for i in 0..rows.num_rows() {
            let mut accumulators = aggregates.new_accumulators()?;
            let row: Vec<ArrayRef> = states.iter().map(|a| a.slice(i, 1)).collect();
            for (acc, values) in accumulators.iter_mut().zip(aggregates.split_states(&row)) {
                acc.merge_batch(values)
                    .map_err(|e| window_error(&e.to_string()))?;
            }
            let id = self.next_id;
            self.next_id += 1;
            let key: Box<[u8]> = keys.row(i).as_ref().into();
            self.by_key.entry(key.clone()).or_default().push(id);
            let (start, last, version) = (starts.value(i), lasts.value(i), versions.value(i));
            let end = last.saturating_add(self.gap);
            let deadline = if version == 0 {
                end
            } else {
                end.saturating_add(lateness)
            };
            self.sessions.insert(
                id,
                Session {
                    key,
                    start,
                    last,
                    accumulators,
                    version,
                    deadline,
                },
            );
            self.timers.insert((deadline, id));
        }
        Ok(())
    }
}

/// The accumulators' state as one-row arrays, in [`Aggregates::state_schema`] order.
fn state_arrays(accumulators: &mut [Box<dyn Accumulator>]) -> Result<Vec<ArrayRef>> {
    let mut out = Vec::new();
    for acc in accumulators {
        for v in acc.state().map_err(|e| window_error(&e.to_string()))? {
            out.push(v.to_array().map_err(|e| window_error(&e.to_string()))?);
        }
    }
    Ok(out)
}

fn snapshot_schema(aggregates: &Aggregates) -> SchemaRef {
    let mut fields = vec![
        Arc::new(Field::new("_start", DataType::Int64, false)),
        Arc::new(Field::new("_last", DataType::Int64, false)),
        Arc::new(Field::new("_version", DataType::UInt32, false)),
    ];
    fields.extend(aggregates.state_schema().fields().iter().cloned());
    Arc::new(Schema::new(fields))
}
