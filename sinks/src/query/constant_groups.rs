//! Aggregation by partition columns, one accumulator per batch instead of one hash
//! lookup per row.
//!
//! `GROUP BY date, hour` over a lake table groups by columns that are constant within
//! every file, and so within every batch the Parquet scan returns. DataFusion's hash
//! aggregation still hashes and compares both strings for each of millions of rows;
//! here each batch is checked to hold one key (a vectorised comparison with its first
//! row) and fed whole to that key's accumulators. A batch that does hold several keys
//! (the rule is chosen from the plan's shape, the check makes it safe) is split by key
//! first, so the result never depends on how files were batched.
//!
//! The rule only replaces raw-input stages (`Partial`, `Single`, `SinglePartitioned`)
//! of plain `GROUP BY` whose keys are columns named like the scan's partition columns,
//! with no `FILTER`, ordered aggregates, group limit or output ordering, and whose
//! input is the file scan itself (through round-robin repartitions and projections,
//! which pass batches on whole). The replacement keeps the stage's schema and plan
//! properties, so the plan above it is unchanged.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::kernels::cmp::not_distinct;
use arrow::compute::{concat, take};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{
    AccumulatorItem, AggregateExec, AggregateMode, aggregate_expressions, create_accumulators,
    evaluate_many, finalize_aggregation,
};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::udaf::AggregateFunctionExpr;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PhysicalExpr, PlanProperties,
};
use futures::StreamExt;

/// The physical optimizer rule that puts [`ConstantGroupsExec`] in place of hash
/// aggregation by partition columns.
#[derive(Debug, Default)]
pub(super) struct AggregateByPartition;

impl PhysicalOptimizerRule for AggregateByPartition {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|plan| {
            let Some(aggregate) = plan.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(plan));
            };
            match ConstantGroupsExec::try_new(aggregate) {
                Some(exec) => Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>)),
                None => Ok(Transformed::no(plan)),
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "aggregate_by_partition"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A raw-input aggregation whose group keys are constant within (almost) every batch.
#[derive(Debug)]
pub(super) struct ConstantGroupsExec {
    input: Arc<dyn ExecutionPlan>,
    mode: AggregateMode,
    keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    /// The replaced stage's properties: same schema, partitioning and emission.
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ConstantGroupsExec {
    /// The replacement for `aggregate`, or `None` when it is not a plain grouping by the
    /// partition columns of the file scan directly below it.
    fn try_new(aggregate: &AggregateExec) -> Option<Self> {
        let mode = *aggregate.mode();
        let raw = matches!(
            mode,
            AggregateMode::Partial | AggregateMode::Single | AggregateMode::SinglePartitioned
        );
        let group_by = aggregate.group_expr();
        let plain = raw
            && group_by.is_single()
            && !group_by.expr().is_empty()
            && aggregate.filter_expr().iter().all(Option::is_none)
            && aggregate
                .aggr_expr()
                .iter()
                .all(|a| a.order_bys().is_empty())
            && aggregate.limit_options().is_none()
            && aggregate.dynamic_expressions_produced().is_empty()
            && aggregate.properties().output_ordering().is_none();
        if !plain {
            return None;
        }
        let partition_columns = scan_partition_columns(aggregate.input())?;
        let input_schema = aggregate.input().schema();
        let by_partition = group_by.expr().iter().all(|(expr, _)| {
            expr.downcast_ref::<Column>().is_some_and(|c| {
                input_schema
                    .fields()
                    .get(c.index())
                    .is_some_and(|f| partition_columns.contains(f.name()) && f.name() == c.name())
            })
        });
        by_partition.then(|| Self::replacing(aggregate))
    }

    /// The replacement for `aggregate`, unchecked.
    fn replacing(aggregate: &AggregateExec) -> Self {
        Self {
            input: aggregate.input().clone(),
            mode: *aggregate.mode(),
            keys: aggregate.group_expr().expr().to_vec(),
            aggregates: aggregate.aggr_expr().to_vec(),
            properties: aggregate.properties().clone(),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

/// The partition column names of the file scan at the bottom of `plan`, when every node
/// on the way passes the scan's batches on whole (so each still comes from one file).
fn scan_partition_columns(plan: &Arc<dyn ExecutionPlan>) -> Option<Vec<String>> {
    if let Some(scan) = plan.downcast_ref::<DataSourceExec>() {
        let config = scan.data_source().downcast_ref::<FileScanConfig>()?;
        let names: Vec<String> = config
            .table_partition_cols()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        return (!names.is_empty()).then_some(names);
    }
    if let Some(repartition) = plan.downcast_ref::<RepartitionExec>()
        && matches!(repartition.partitioning(), Partitioning::RoundRobinBatch(_))
        && !repartition.preserve_order()
    {
        return scan_partition_columns(repartition.input());
    }
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        let all_columns = projection
            .expr()
            .iter()
            .all(|p| p.expr.downcast_ref::<Column>().is_some());
        if all_columns {
            return scan_partition_columns(projection.input());
        }
    }
    None
}

impl DisplayAs for ConstantGroupsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let keys: Vec<&str> = self.keys.iter().map(|(_, name)| name.as_str()).collect();
        let aggregates: Vec<&str> = self.aggregates.iter().map(|a| a.name()).collect();
        write!(
            f,
            "ConstantGroupsExec: mode={:?}, gby=[{}], aggr=[{}]",
            self.mode,
            keys.join(", "),
            aggregates.join(", ")
        )
    }
}

impl ExecutionPlan for ConstantGroupsExec {
    fn name(&self) -> &str {
        "ConstantGroupsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for (expr, _) in &self.keys {
            if f(expr)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Children are only swapped for equivalent ones after this rule (it runs last),
        // so the stage's properties still hold.
        let input = children.swap_remove(0);
        Ok(Arc::new(Self {
            input,
            mode: self.mode,
            keys: self.keys.clone(),
            aggregates: self.aggregates.clone(),
            properties: self.properties.clone(),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let mut groups = Groups {
            mode: self.mode,
            keys: self.keys.iter().map(|(e, _)| e.clone()).collect(),
            arguments: aggregate_expressions(&self.aggregates, &self.mode, 0)?,
            aggregates: self.aggregates.clone(),
            schema: self.schema(),
            index: HashMap::new(),
            groups: Vec::new(),
        };
        let schema = self.schema();
        let output = futures::stream::once(async move {
            let mut input = input;
            while let Some(batch) = input.next().await {
                let batch = batch?;
                let _timer = metrics.elapsed_compute().timer();
                groups.update(&batch)?;
            }
            let _timer = metrics.elapsed_compute().timer();
            let batch = groups.finish()?;
            metrics.record_output(batch.num_rows());
            Ok(batch)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, output)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// The accumulators of every key seen so far, in order of first appearance.
struct Groups {
    mode: AggregateMode,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    arguments: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    schema: SchemaRef,
    index: HashMap<Vec<ScalarValue>, usize>,
    groups: Vec<(Vec<ScalarValue>, Vec<AccumulatorItem>)>,
}

impl Groups {
    fn update(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let keys = self
            .keys
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(batch.num_rows()))
            .collect::<Result<Vec<ArrayRef>>>()?;
        if keys.iter().all(|k| is_constant(k).unwrap_or(false)) {
            return self.accumulate(&keys, 0, batch);
        }
        // Several keys in one batch: split it by key (row-encoded), then accumulate
        // each part as a batch of its own.
        let converter = RowConverter::new(
            keys.iter()
                .map(|k| SortField::new(k.data_type().clone()))
                .collect(),
        )?;
        let rows = converter.convert_columns(&keys)?;
        let mut parts: HashMap<&[u8], Vec<u32>> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            parts.entry(row.data()).or_default().push(i as u32);
        }
        for indices in parts.into_values() {
            let indices = UInt32Array::from(indices);
            let columns = batch
                .columns()
                .iter()
                .map(|c| take(c, &indices, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let part = RecordBatch::try_new(batch.schema(), columns)?;
            let first = indices.value(0) as usize;
            self.accumulate(&keys, first, &part)?;
        }
        Ok(())
    }

    /// Feeds all of `batch` to the accumulators of the key at row `row` of `keys`.
    fn accumulate(&mut self, keys: &[ArrayRef], row: usize, batch: &RecordBatch) -> Result<()> {
        let key = keys
            .iter()
            .map(|k| ScalarValue::try_from_array(k, row))
            .collect::<Result<Vec<_>>>()?;
        let group = match self.index.get(&key) {
            Some(&group) => group,
            None => {
                let group = self.groups.len();
                self.groups
                    .push((key.clone(), create_accumulators(&self.aggregates)?));
                self.index.insert(key, group);
                group
            }
        };
        let values = evaluate_many(&self.arguments, batch)?;
        let accumulators = &mut self.groups[group].1;
        for (accumulator, values) in accumulators.iter_mut().zip(&values) {
            accumulator.update_batch(values)?;
        }
        Ok(())
    }

    /// One row per key: the key columns, then each aggregate's state (partial stages)
    /// or value (single stages), as the replaced stage would have written them.
    fn finish(&mut self) -> Result<RecordBatch> {
        let mut columns: Vec<Vec<ArrayRef>> = vec![Vec::new(); self.schema.fields().len()];
        for (key, accumulators) in &mut self.groups {
            let values = finalize_aggregation(accumulators, &self.mode)?;
            let row = key
                .iter()
                .map(|k| k.to_array())
                .chain(values.into_iter().map(Ok));
            for (column, value) in columns.iter_mut().zip(row) {
                column.push(value?);
            }
        }
        if self.groups.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        let columns = columns
            .iter()
            .map(|parts| {
                let parts: Vec<&dyn arrow::array::Array> =
                    parts.iter().map(|a| a.as_ref()).collect();
                concat(&parts)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// Whether every row of `array` equals its first (nulls equal to nulls).
fn is_constant(array: &ArrayRef) -> std::result::Result<bool, arrow::error::ArrowError> {
    if array.len() <= 1 {
        return Ok(true);
    }
    let first = arrow::array::Scalar::new(array.slice(0, 1));
    let same = not_distinct(array, &first)?;
    Ok(same.true_count() == array.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_plan::aggregates::PhysicalGroupBy;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::SessionContext;

    fn batch(schema: &SchemaRef, hours: &[&str], values: &[f64]) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(hours.to_vec())),
                Arc::new(Float64Array::from(values.to_vec())),
            ],
        )
        .expect("batch")
    }

    /// Sorted text rows of `batches`, for comparing results whatever their order.
    fn rows(batches: &[RecordBatch]) -> Vec<String> {
        let text = arrow::util::pretty::pretty_format_batches(batches)
            .expect("format")
            .to_string();
        let mut rows: Vec<String> = text.lines().map(str::to_owned).collect();
        rows.sort();
        rows
    }

    #[tokio::test]
    async fn batches_of_one_key_or_of_several_give_what_hash_aggregation_gives() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("hour", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
        ]));
        let batches = vec![
            batch(&schema, &["00", "00", "00"], &[1.0, 2.0, 3.0]),
            batch(
                &schema,
                &["01", "00", "01", "02"],
                &[10.0, 20.0, 30.0, 40.0],
            ),
            batch(&schema, &["02"], &[100.0]),
            batch(&schema, &[], &[]),
        ];
        let input =
            MemorySourceConfig::try_new_exec(&[batches], schema.clone(), None).expect("input");
        let hour: Arc<dyn PhysicalExpr> = Arc::new(Column::new("hour", 0));
        let v: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 1));
        let aggregates = vec![
            AggregateExprBuilder::new(count_udaf(), vec![v.clone()])
                .schema(schema.clone())
                .alias("n")
                .build()
                .map(Arc::new)
                .expect("count"),
            AggregateExprBuilder::new(sum_udaf(), vec![v])
                .schema(schema.clone())
                .alias("s")
                .build()
                .map(Arc::new)
                .expect("sum"),
        ];
        let aggregate = Arc::new(
            AggregateExec::try_new(
                AggregateMode::Single,
                PhysicalGroupBy::new_single(vec![(hour, "hour".into())]),
                aggregates,
                vec![None, None],
                input,
                schema,
            )
            .expect("aggregate"),
        );
        let task = SessionContext::new().task_ctx();
        let expected = collect(aggregate.clone(), task.clone())
            .await
            .expect("hash aggregation");
        let exec = ConstantGroupsExec::replacing(&aggregate);
        let got = collect(Arc::new(exec), task)
            .await
            .expect("constant groups");
        assert_eq!(rows(&got), rows(&expected));
        assert_eq!(got.iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
    }
}
