//! A window's aggregates, written in SQL and compiled once into DataFusion
//! aggregate functions.
//!
//! The select items are planned as `SELECT <group columns>, <items> FROM input GROUP BY
//! <group columns>` by DataFusion's SQL planner and analyzer (type coercion; the
//! optimizer is not run, so nothing is folded away). From the logical plan we take:
//! - each aggregate call as an [`AggregateFunctionExpr`] with its argument, `ORDER BY`
//!   and `FILTER (WHERE …)` expressions over the input schema;
//! - the projection above the aggregate, compiled over the aggregate's output, so items
//!   such as `count(*) FILTER (WHERE kind = 'view') = 1 AS bounced` work.
//!
//! State lives in DataFusion accumulators: the vectorized [`GroupsAccumulator`] where the
//! function has one, else [`GroupsAccumulatorAdapter`] around the row accumulator.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch, UInt8Array};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Accumulator, EmitTo, ExprSchemable, GroupsAccumulator, LogicalPlan,
};
use datafusion::physical_expr::aggregate::{AggregateFunctionExpr, LoweredAggregateBuilder};
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr};
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use crate::{Error, Result};

/// The compiled aggregates of one window.
#[derive(Debug)]
pub(crate) struct Aggregates {
    /// Group-by column indices in the input schema.
    group_columns: Vec<usize>,
    /// The key columns of the open groups: the group-by columns, or, for a window
    /// without `group_by` (one group), a single constant column of our own, as
    /// DataFusion's group values and arrow's row converter need at least one column.
    group_schema: SchemaRef,
    aggregates: Vec<Aggregate>,
    /// Group columns then aggregate results: what the projection reads.
    aggregate_schema: SchemaRef,
    /// Group columns then every aggregate's state columns: what snapshots and panes hold.
    state_schema: SchemaRef,
    projection: Vec<Arc<dyn PhysicalExpr>>,
    /// The fields the projection produces (group columns first).
    projected: Vec<Field>,
}

#[derive(Debug)]
struct Aggregate {
    function: Arc<AggregateFunctionExpr>,
    /// Arguments, then the `ORDER BY` expressions (DataFusion's raw-input convention).
    arguments: Vec<Arc<dyn PhysicalExpr>>,
    filter: Option<Arc<dyn PhysicalExpr>>,
    /// How many state columns it has.
    states: usize,
}

/// Per-batch inputs of the accumulators: the group columns, each aggregate's arguments
/// and filter mask, all over the same rows.
#[derive(Debug, Clone)]
pub(crate) struct Inputs {
    pub(crate) groups: Vec<ArrayRef>,
    pub(crate) arguments: Vec<Vec<ArrayRef>>,
    pub(crate) filters: Vec<Option<BooleanArray>>,
}

impl Inputs {
    /// The same inputs for the rows at `indices`.
    pub(crate) fn take(&self, indices: &arrow::array::UInt32Array) -> Result<Self> {
        let take = |a: &ArrayRef| arrow::compute::take(a.as_ref(), indices, None);
        let internal = |e: arrow::error::ArrowError| internal(e.to_string());
        Ok(Self {
            groups: self
                .groups
                .iter()
                .map(take)
                .collect::<Result<_, _>>()
                .map_err(internal)?,
            arguments: self
                .arguments
                .iter()
                .map(|args| args.iter().map(take).collect::<Result<Vec<_>, _>>())
                .collect::<Result<_, _>>()
                .map_err(internal)?,
            filters: self
                .filters
                .iter()
                .map(|f| {
                    f.as_ref()
                        .map(|f| {
                            arrow::compute::take(f, indices, None).map(|a| a.as_boolean().clone())
                        })
                        .transpose()
                })
                .collect::<Result<_, _>>()
                .map_err(internal)?,
        })
    }
}

impl Aggregates {
    /// Compiles `items` (SQL select items with aggregates) grouped by `group_by` over
    /// `input`. `key` is the window's config path.
    pub(crate) fn compile(
        input: &SchemaRef,
        group_by: &[String],
        items: &[String],
        event_time: &str,
        key: &str,
    ) -> Result<Self, Vec<Error>> {
        let config = |k: &str, message: String| Error::Config {
            key: format!("{key}.{k}"),
            message,
        };
        let mut errors = Vec::new();
        let mut group_columns = Vec::new();
        let mut groups = Vec::new();
        for (i, name) in group_by.iter().enumerate() {
            match input.index_of(name) {
                Ok(c) => {
                    group_columns.push(c);
                    groups.push(name.clone());
                }
                Err(_) => errors.push(config(
                    &format!("group_by[{i}]"),
                    format!("stream has no column {name:?}"),
                )),
            }
        }
        if items.is_empty() {
            errors.push(config(
                "select",
                "a window needs at least one aggregate".into(),
            ));
        }
        // Plan each item on its own first, so that every bad item is reported (over the
        // group columns that exist, so a bad group column does not hide them).
        let plan_of = |items: &[&str]| plan(input, &groups, items);
        for (i, item) in items.iter().enumerate() {
            if let Err(e) = plan_of(&[item]) {
                errors.push(config(&format!("select[{i}]"), format!("{item:?}: {e}")));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let all: Vec<&str> = items.iter().map(String::as_str).collect();
        let planned = plan_of(&all).map_err(|e| vec![config("select", e)])?;
        let (projection_exprs, aggregate) = match &planned {
            LogicalPlan::Projection(p) => match p.input.as_ref() {
                LogicalPlan::Aggregate(a) => (&p.expr, a),
                other => {
                    return Err(vec![config(
                        "select",
                        format!("expected an aggregate, planned {}", other.display()),
                    )]);
                }
            },
            other => {
                return Err(vec![config(
                    "select",
                    format!("expected an aggregate, planned {}", other.display()),
                )]);
            }
        };
        let props = datafusion::execution::context::ExecutionProps::new();
        let planning = PhysicalPlanningContext::default();
        let logical_input = aggregate.input.schema();
        let mut aggregates = Vec::new();
        for expr in &aggregate.aggr_expr {
            let lowered = LoweredAggregateBuilder::new(
                expr,
                logical_input,
                input.as_ref(),
                &props,
                &planning,
            )
            .build()
            .map_err(|e| vec![config("select", e.to_string())])?;
            let function = lowered.aggregate;
            let name = function.fun().name().to_ascii_lowercase();
            if (name == "first_value" || name == "last_value") && function.order_bys().is_empty() {
                errors.push(config(
                    "select",
                    format!(
                        "{}: {name} needs an order, e.g. {name}(x ORDER BY {event_time})",
                        function.name()
                    ),
                ));
            }
            let mut arguments = function.expressions();
            arguments.extend(function.order_bys().iter().map(|s| s.expr.clone()));
            let states = function
                .state_fields()
                .map_err(|e| vec![config("select", e.to_string())])?
                .len();
            aggregates.push(Aggregate {
                function,
                arguments,
                filter: lowered.filter,
                states,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut group_fields: Vec<FieldRef> = group_columns
            .iter()
            .map(|&c| input.fields()[c].clone())
            .collect();
        if group_fields.is_empty() {
            group_fields.push(Arc::new(Field::new(ONE_GROUP, DataType::UInt8, false)));
        }
        let group_schema = Arc::new(Schema::new(group_fields.clone()));
        let aggregate_schema = Arc::new(aggregate.schema.as_arrow().clone());
        let mut state_fields = group_fields.clone();
        for (i, a) in aggregates.iter().enumerate() {
            let fields = a
                .function
                .state_fields()
                .map_err(|e| vec![config("select", e.to_string())])?;
            for (j, f) in fields.iter().enumerate() {
                state_fields.push(Arc::new(Field::new(
                    format!("state_{i}_{j}"),
                    f.data_type().clone(),
                    true,
                )));
            }
        }
        let mut projection = Vec::new();
        let mut projected = Vec::new();
        for expr in projection_exprs {
            let physical = datafusion::physical_expr::create_physical_expr(
                expr,
                &aggregate.schema,
                &props,
                &planning,
            )
            .map_err(|e| vec![config("select", e.to_string())])?;
            let (_, field) = expr
                .to_field(&aggregate.schema)
                .map_err(|e| vec![config("select", e.to_string())])?;
            projected.push(field.as_ref().clone());
            projection.push(physical);
        }
        Ok(Self {
            group_columns,
            group_schema,
            aggregates,
            aggregate_schema,
            state_schema: Arc::new(Schema::new(state_fields)),
            projection,
            projected,
        })
    }

    /// Narrows the input to the columns the aggregates read plus `keep` (indices into
    /// `input`): returns those indices and the narrowed schema, and rebinds every
    /// expression to it. A window then copies only these columns when it filters.
    pub(crate) fn prune(
        &mut self,
        input: &SchemaRef,
        keep: &[usize],
    ) -> Result<(Vec<usize>, SchemaRef)> {
        let mut names: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        for a in &self.aggregates {
            for e in a.arguments.iter().chain(&a.filter) {
                for c in datafusion::physical_expr::utils::collect_columns(e) {
                    if let Some((_, f)) = input.column_with_name(c.name()) {
                        names.insert(f.name().as_str());
                    }
                }
            }
        }
        let mut indices: Vec<usize> = names
            .iter()
            .filter_map(|n| input.index_of(n).ok())
            .chain(self.group_columns.iter().copied())
            .chain(keep.iter().copied())
            .collect();
        indices.sort_unstable();
        indices.dedup();
        let pruned = Arc::new(
            input
                .project(&indices)
                .map_err(|e| internal(e.to_string()))?,
        );
        let rebind = |e: &Arc<dyn PhysicalExpr>| {
            datafusion::physical_expr::utils::reassign_expr_columns(e.clone(), &pruned)
                .map_err(|e| internal(e.to_string()))
        };
        for a in &mut self.aggregates {
            a.arguments = a.arguments.iter().map(rebind).collect::<Result<_>>()?;
            a.filter = a.filter.as_ref().map(rebind).transpose()?;
        }
        for c in &mut self.group_columns {
            *c = indices
                .iter()
                .position(|i| i == c)
                .ok_or_else(|| internal("group column lost in pruning".into()))?;
        }
        Ok((indices, pruned))
    }

    /// Fields of the output, group columns first.
    pub(crate) fn projected(&self) -> &[Field] {
        &self.projected
    }

    /// How many key columns the open groups and their state have (see
    /// [`Self::declared_groups`] for the output's).
    pub(crate) fn group_count(&self) -> usize {
        self.group_schema.fields().len()
    }

    /// How many `group_by` columns the output has (none for one group).
    pub(crate) fn declared_groups(&self) -> usize {
        self.group_columns.len()
    }

    /// Group columns, then state columns.
    pub(crate) fn state_schema(&self) -> &SchemaRef {
        &self.state_schema
    }

    /// Evaluates the group columns, arguments and filters on `batch`.
    pub(crate) fn inputs(&self, batch: &RecordBatch) -> Result<Inputs> {
        let evaluate = |e: &Arc<dyn PhysicalExpr>| {
            e.evaluate(batch)
                .and_then(|v| v.into_array(batch.num_rows()))
                .map_err(|e| internal(e.to_string()))
        };
        let groups = match self.group_columns.is_empty() {
            true => vec![Arc::new(UInt8Array::from_value(0, batch.num_rows())) as ArrayRef],
            false => self
                .group_columns
                .iter()
                .map(|&c| batch.column(c).clone())
                .collect(),
        };
        Ok(Inputs {
            groups,
            arguments: self
                .aggregates
                .iter()
                .map(|a| a.arguments.iter().map(evaluate).collect::<Result<Vec<_>>>())
                .collect::<Result<_>>()?,
            filters: self
                .aggregates
                .iter()
                .map(|a| {
                    a.filter
                        .as_ref()
                        .map(|f| evaluate(f).map(|m| m.as_boolean().clone()))
                        .transpose()
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Fresh state for a set of groups.
    pub(crate) fn new_groups(&self) -> Result<Groups> {
        let values = new_group_values(self.group_schema.clone(), &GroupOrdering::None)
            .map_err(|e| internal(e.to_string()))?;
        let accumulators = self
            .aggregates
            .iter()
            .map(|a| {
                if a.function.groups_accumulator_supported() {
                    a.function.create_groups_accumulator()
                } else {
                    let function = a.function.clone();
                    let adapter =
                        GroupsAccumulatorAdapter::new(move || function.create_accumulator());
                    Ok(Box::new(Buffered::new(Box::new(adapter))) as Box<dyn GroupsAccumulator>)
                }
            })
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(|e| internal(e.to_string()))?;
        Ok(Groups {
            values,
            accumulators,
            ids: Vec::new(),
        })
    }

    /// Fresh row accumulators for one group (session windows).
    pub(crate) fn new_accumulators(&self) -> Result<Vec<Box<dyn Accumulator>>> {
        self.aggregates
            .iter()
            .map(|a| a.function.create_accumulator())
            .collect::<datafusion::error::Result<_>>()
            .map_err(|e| internal(e.to_string()))
    }

    /// Feeds `inputs` into one group's row accumulators.
    pub(crate) fn update_accumulators(
        &self,
        accumulators: &mut [Box<dyn Accumulator>],
        inputs: &Inputs,
    ) -> Result<()> {
        for (i, acc) in accumulators.iter_mut().enumerate() {
            let args = match &inputs.filters[i] {
                Some(mask) => inputs.arguments[i]
                    .iter()
                    .map(|a| arrow::compute::filter(a, mask))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| internal(e.to_string()))?,
                None => inputs.arguments[i].clone(),
            };
            acc.update_batch(&args)
                .map_err(|e| internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Splits a row of state columns (as in [`Self::state_schema`], without the group
    /// columns) per aggregate.
    pub(crate) fn split_states<'a>(&self, states: &'a [ArrayRef]) -> Vec<&'a [ArrayRef]> {
        let mut out = Vec::with_capacity(self.aggregates.len());
        let mut at = 0;
        for a in &self.aggregates {
            out.push(&states[at..at + a.states]);
            at += a.states;
        }
        out
    }

    /// The output of the window: the projection evaluated over group columns and final
    /// aggregate values, with `window` columns (start, end, version) inserted after the
    /// group columns.
    pub(crate) fn finish(
        &self,
        output: &SchemaRef,
        groups: Vec<ArrayRef>,
        values: Vec<ArrayRef>,
        window: [ArrayRef; 3],
    ) -> Result<RecordBatch> {
        let rows = window[0].len();
        // One group's constant key column is ours, not the output's.
        let mut columns = match self.group_columns.is_empty() {
            true => Vec::new(),
            false => groups,
        };
        columns.extend(values);
        let aggregated = RecordBatch::try_new_with_options(
            self.aggregate_schema.clone(),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .map_err(|e| internal(format!("aggregate output: {e}")))?;
        let mut out = Vec::with_capacity(output.fields().len());
        for (i, expr) in self.projection.iter().enumerate() {
            if i == self.group_columns.len() {
                out.extend(window.iter().cloned());
            }
            let value = expr
                .evaluate(&aggregated)
                .and_then(|v| v.into_array(rows))
                .map_err(|e| internal(e.to_string()))?;
            // Casts keep the declared output type when DataFusion widened (e.g. nulls).
            let want = output.field(out.len()).data_type();
            out.push(if value.data_type() == want {
                value
            } else {
                arrow::compute::cast(&value, want).map_err(|e| internal(e.to_string()))?
            });
        }
        if self.projection.len() == self.group_columns.len() {
            out.extend(window);
        }
        RecordBatch::try_new(output.clone(), out)
            .map_err(|e| internal(format!("window output: {e}")))
    }
}

/// The key column of a window without `group_by` (see [`Aggregates::group_count`]).
const ONE_GROUP: &str = "_one_group";

/// Open groups: their key values and vectorized accumulators.
pub(crate) struct Groups {
    values: Box<dyn GroupValues>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    ids: Vec<usize>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("len", &self.values.len())
            .finish()
    }
}

impl Groups {
    /// How many groups.
    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    /// Registers the groups of state rows without adding their values, so that they
    /// get the first group ids (see [`Self::drain_first`]).
    pub(crate) fn seed(&mut self, aggregates: &Aggregates, states: &RecordBatch) -> Result<()> {
        self.values
            .intern(&states.columns()[..aggregates.group_count()], &mut self.ids)
            .map_err(|e| internal(e.to_string()))
    }

    /// Approximate heap bytes.
    pub(crate) fn size(&self) -> usize {
        self.values.size() + self.accumulators.iter().map(|a| a.size()).sum::<usize>()
    }

    /// Adds raw rows.
    pub(crate) fn update(&mut self, inputs: &Inputs) -> Result<()> {
        self.values
            .intern(&inputs.groups, &mut self.ids)
            .map_err(|e| internal(e.to_string()))?;
        let total = self.values.len();
        for (i, acc) in self.accumulators.iter_mut().enumerate() {
            acc.update_batch(
                &inputs.arguments[i],
                &self.ids,
                inputs.filters[i].as_ref(),
                total,
            )
            .map_err(|e| internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Adds state rows (group columns then state columns, as [`Aggregates::state_schema`]).
    pub(crate) fn merge(&mut self, aggregates: &Aggregates, states: &RecordBatch) -> Result<()> {
        let g = aggregates.group_count();
        self.values
            .intern(&states.columns()[..g], &mut self.ids)
            .map_err(|e| internal(e.to_string()))?;
        let total = self.values.len();
        let per_aggregate = aggregates.split_states(&states.columns()[g..]);
        for (acc, values) in self.accumulators.iter_mut().zip(per_aggregate) {
            acc.merge_batch(values, &self.ids, total)
                .map_err(|e| internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Drains every group as state rows; `None` when there are none.
    pub(crate) fn drain_state(&mut self, aggregates: &Aggregates) -> Result<Option<RecordBatch>> {
        if self.values.is_empty() {
            return Ok(None);
        }
        let mut columns = self
            .values
            .emit(EmitTo::All)
            .map_err(|e| internal(e.to_string()))?;
        for acc in &mut self.accumulators {
            columns.extend(
                acc.state(EmitTo::All)
                    .map_err(|e| internal(e.to_string()))?,
            );
        }
        let rows = columns.first().map_or(0, |c| c.len());
        RecordBatch::try_new_with_options(
            aggregates.state_schema.clone(),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .map(Some)
        .map_err(|e| internal(format!("window state: {e}")))
    }

    /// Drains every group: group columns and final values.
    pub(crate) fn drain_values(&mut self) -> Result<(Vec<ArrayRef>, Vec<ArrayRef>)> {
        self.drain(EmitTo::All)
    }

    /// Drains the first `n` groups (by id): group columns and final values.
    pub(crate) fn drain_first(&mut self, n: usize) -> Result<(Vec<ArrayRef>, Vec<ArrayRef>)> {
        if n >= self.values.len() {
            return self.drain(EmitTo::All);
        }
        self.drain(EmitTo::First(n))
    }

    fn drain(&mut self, emit: EmitTo) -> Result<(Vec<ArrayRef>, Vec<ArrayRef>)> {
        let groups = self
            .values
            .emit(emit)
            .map_err(|e| internal(e.to_string()))?;
        let values = self
            .accumulators
            .iter_mut()
            .map(|a| a.evaluate(emit))
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(|e| internal(e.to_string()))?;
        Ok((groups, values))
    }
}

/// Rows a [`Buffered`] accumulator gathers before it hands them on (in tests, a few, so
/// that the property tests hand rows on both when full and before a read).
const BUFFERED_ROWS: usize = if cfg!(test) { 5 } else { 8192 };

/// A row accumulator behind DataFusion's [`GroupsAccumulatorAdapter`], fed in larger
/// batches. The adapter calls each group's accumulator once per batch with that
/// group's rows. A live source hands the window a batch every 10 ms, about 500 rows
/// over 1,000 devices, so most calls carried one value, and some functions pay per
/// call what others pay per row: `approx_percentile_cont` rebuilds its t-digest (100
/// centroids) on every call, which made `TDigest::merge_sorted_f64` the largest user
/// symbol in the service's profile at 50,000 events/s. So rows are held here, up to
/// [`BUFFERED_ROWS`], and handed on in one call before anything reads the state. The
/// values are the same for every function whose update of `a` then `b` equals its
/// update of `a` and `b` together; for approximate ones (the t-digest) the result is
/// within the same error bound.
struct Buffered {
    inner: Box<dyn GroupsAccumulator>,
    /// Argument columns of each held batch.
    values: Vec<Vec<ArrayRef>>,
    /// Each held batch's filter (`None`: every row).
    filters: Vec<Option<BooleanArray>>,
    /// Group ids of every held row, in order.
    ids: Vec<usize>,
    /// The groups there are, as the last held batch said.
    groups: usize,
}

impl Buffered {
    fn new(inner: Box<dyn GroupsAccumulator>) -> Self {
        Self {
            inner,
            values: Vec::new(),
            filters: Vec::new(),
            ids: Vec::new(),
            groups: 0,
        }
    }

    /// Hands the held rows on in one update.
    fn flush(&mut self) -> datafusion::error::Result<()> {
        if self.values.is_empty() {
            return Ok(());
        }
        let values = std::mem::take(&mut self.values);
        let filters = std::mem::take(&mut self.filters);
        let ids = std::mem::take(&mut self.ids);
        // Group ids shift when groups are emitted, which is never while rows are held.
        let groups = std::mem::take(&mut self.groups);
        let columns = (0..values[0].len())
            .map(|c| {
                let parts: Vec<&dyn arrow::array::Array> =
                    values.iter().map(|v| v[c].as_ref()).collect();
                arrow::compute::concat(&parts)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let filter = if filters.iter().all(Option::is_none) {
            None
        } else {
            // A held batch without a filter takes every row; a null keeps none, as in
            // the filter it came with.
            let every: Vec<BooleanArray> = filters
                .iter()
                .zip(&values)
                .map(|(f, v)| {
                    f.clone().unwrap_or_else(|| {
                        let rows = v.first().map_or(0, |c| c.len());
                        BooleanArray::new(arrow::buffer::BooleanBuffer::new_set(rows), None)
                    })
                })
                .collect();
            let parts: Vec<&dyn arrow::array::Array> = every
                .iter()
                .map(|m| m as &dyn arrow::array::Array)
                .collect();
            let mask = arrow::compute::concat(&parts)?.as_boolean().clone();
            Some(mask)
        };
        self.inner
            .update_batch(&columns, &ids, filter.as_ref(), groups)
    }
}

impl GroupsAccumulator for Buffered {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> datafusion::error::Result<()> {
        self.values.push(values.to_vec());
        self.filters.push(opt_filter.cloned());
        self.ids.extend_from_slice(group_indices);
        self.groups = total_num_groups;
        if self.ids.len() >= BUFFERED_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> datafusion::error::Result<ArrayRef> {
        self.flush()?;
        self.inner.evaluate(emit_to)
    }

    fn state(&mut self, emit_to: EmitTo) -> datafusion::error::Result<Vec<ArrayRef>> {
        self.flush()?;
        self.inner.state(emit_to)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> datafusion::error::Result<()> {
        self.flush()?;
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> datafusion::error::Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(values, opt_filter)
    }

    fn size(&self) -> usize {
        let held: usize = self
            .values
            .iter()
            .flatten()
            .map(|c| c.get_array_memory_size())
            .sum();
        self.inner.size() + held + self.ids.capacity() * size_of::<usize>()
    }
}

/// Plans `SELECT <group_by>, <items> FROM input GROUP BY <group_by>` (analyzed, not
/// optimized).
fn plan(input: &SchemaRef, group_by: &[String], items: &[&str]) -> Result<LogicalPlan, String> {
    let ctx = crate::session();
    let table = MemTable::try_new(input.clone(), vec![vec![]]).map_err(|e| e.to_string())?;
    ctx.register_table("input", Arc::new(table))
        .map_err(|e| e.to_string())?;
    let groups: Vec<String> = group_by
        .iter()
        .map(|g| format!("\"{}\"", g.replace('"', "\"\"")))
        .collect();
    let mut select = groups.clone();
    select.extend(items.iter().map(|s| s.to_string()));
    let mut sql = format!("SELECT {} FROM input", select.join(", "));
    if !groups.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
    }
    let state = ctx.state();
    let logical =
        futures::executor::block_on(state.create_logical_plan(&sql)).map_err(|e| e.to_string())?;
    let analyzed = state
        .analyzer()
        .execute_and_check(logical, state.config_options(), |_, _| {})
        .map_err(|e| e.to_string())?;
    // Reject window-less surprises: only a projection over one aggregate over the scan.
    match &analyzed {
        LogicalPlan::Projection(p) if matches!(p.input.as_ref(), LogicalPlan::Aggregate(_)) => {
            Ok(analyzed)
        }
        _ => Err(
            "every select item must be an aggregate or use only aggregates and group columns"
                .into(),
        ),
    }
}

/// `DataType` of a window's time columns: UTC milliseconds.
pub(crate) fn time_type() -> DataType {
    DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()))
}

pub(crate) fn internal(message: String) -> Error {
    Error::Window { message }
}
