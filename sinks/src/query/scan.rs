//! A table provider that reads one Delta snapshot's files with DataFusion's own Parquet
//! scan, for the tables Sluice writes.
//!
//! delta-rs's `DeltaScanNext` runs every batch through the Delta kernel's expression
//! evaluator to add the partition columns, building `date` and `hour` row by row. Our
//! tables never need that machinery (no column mapping, no deletion vectors: reader
//! version 1), so this provider hands the snapshot's file list to DataFusion's
//! `ParquetSource` with each file's partition values as constants, which DataFusion
//! materialises as repeated arrays. Files are pruned here, before the scan, from the
//! snapshot's log statistics (partition values, and per-file min/max of every column)
//! with DataFusion's `PruningPredicate`; the Parquet reader then prunes row groups and
//! pages with the same predicate. Tables that need more than reader version 1 go
//! through `DeltaScanNext` (see [`SnapshotScan::try_new`]).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::stats::Precision;
use datafusion::common::{DFSchema, ScalarValue, Statistics};
use datafusion::datasource::TableProvider;
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchemaBuilder;
use datafusion::error::Result as DfResult;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, PhysicalExpr};
use deltalake::kernel::EagerSnapshot;
use object_store::ObjectMeta;

/// One Delta snapshot of a table Sluice wrote, as a DataFusion table.
#[derive(Debug)]
pub(super) struct SnapshotScan {
    snapshot: EagerSnapshot,
    /// Where DataFusion finds the table's object store: registered per session, rooted
    /// at the table directory, so file paths are the log's relative paths.
    store: ObjectStoreUrl,
    /// The file columns, then the partition columns.
    schema: SchemaRef,
    file_schema: SchemaRef,
    partition_fields: Vec<FieldRef>,
}

impl SnapshotScan {
    /// A scan of `snapshot`, or `None` when the table needs what only delta-rs reads
    /// (reader version above 1: column mapping, deletion vectors, …) or its partition
    /// columns are not string columns at the end of the schema.
    pub(super) fn try_new(snapshot: &EagerSnapshot, store: ObjectStoreUrl) -> Option<Self> {
        if snapshot.protocol().min_reader_version() > 1 {
            return None;
        }
        let table = snapshot.arrow_schema();
        let partitions = snapshot.metadata().partition_columns();
        let files = table.fields().len().checked_sub(partitions.len())?;
        let (file_fields, partition_fields) = table.fields().split_at(files);
        let names_match = partition_fields
            .iter()
            .zip(partitions)
            .all(|(field, name)| field.name() == name && field.data_type() == &DataType::Utf8);
        if !names_match {
            return None;
        }
        let file_schema = Arc::new(Schema::new(file_fields.to_vec()));
        let partition_fields: Vec<FieldRef> = partition_fields
            .iter()
            .map(|f| Arc::new(Field::new(f.name(), DataType::Utf8, true)))
            .collect();
        let mut fields = file_schema.fields().to_vec();
        fields.extend(partition_fields.iter().cloned());
        Some(Self {
            snapshot: snapshot.clone(),
            store,
            schema: Arc::new(Schema::new(fields)),
            file_schema,
            partition_fields,
        })
    }

    /// For each file of the snapshot, whether `predicate` may hold on some of its rows,
    /// judged from the log's partition values and column statistics (all files when
    /// there is no predicate or it cannot be judged).
    fn files_to_read(&self, predicate: Option<&Arc<dyn PhysicalExpr>>) -> Vec<bool> {
        let all = vec![true; self.snapshot.log_data().num_files()];
        let Some(pruning) = predicate.and_then(|p| {
            PruningPredicateBuilder::new()
                .with_file_schema(self.schema.clone())
                .build(p.clone())
        }) else {
            return all;
        };
        pruning.prune(&self.snapshot).unwrap_or(all)
    }
}

#[async_trait]
impl TableProvider for SnapshotScan {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Pruning is by file and row group: rows are still filtered above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let predicate = match conjunction(filters.iter().cloned()) {
            Some(filter) => {
                let schema = DFSchema::try_from(self.schema.clone())?;
                Some(state.create_physical_expr(filter, &schema)?)
            }
            None => None,
        };
        let keep = self.files_to_read(predicate.as_ref());
        let mut files = Vec::new();
        let mut rows = Some(0usize);
        let mut bytes = 0usize;
        for (file, keep) in self.snapshot.log_data().iter().zip(keep) {
            if !keep {
                continue;
            }
            let values = file.partition_values_map();
            let partition_values = self
                .partition_fields
                .iter()
                .map(|field| ScalarValue::Utf8(values.get(field.name()).cloned().flatten()))
                .collect();
            let meta = ObjectMeta::try_from(&file)?;
            // Sizes and counts are the log's: they saturate rather than overflow.
            bytes = bytes.saturating_add(meta.size as usize);
            let mut scan_file =
                PartitionedFile::new_from_meta(meta).with_partition_values(partition_values);
            match file.num_records() {
                Some(n) => {
                    rows = rows.map(|total| total.saturating_add(n));
                    let stats = Statistics {
                        num_rows: Precision::Exact(n),
                        total_byte_size: Precision::Inexact(file.size() as usize),
                        column_statistics: Statistics::unknown_column(&self.file_schema),
                    };
                    scan_file = scan_file.with_statistics(Arc::new(stats));
                }
                None => rows = None,
            }
            files.push(scan_file);
        }
        if files.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }

        // Files of one partition (date and hour) in one group when there are at least as
        // many partitions as threads: the scan then declares hash partitioning on the
        // partition columns, and `GROUP BY date, hour` needs no repartition. Fewer
        // partitions than threads: split evenly so every thread reads.
        let threads = state.config().target_partitions().max(1);
        let partitions = files
            .iter()
            .map(|f| &f.partition_values)
            .collect::<HashSet<_>>()
            .len();
        let (groups, partitioning) = if partitions >= threads {
            let groups = FileGroup::new(files).group_by_partition_values(threads);
            let columns = self
                .partition_fields
                .iter()
                .map(|f| {
                    Ok(Arc::new(Column::new_with_schema(f.name(), &self.schema)?)
                        as Arc<dyn PhysicalExpr>)
                })
                .collect::<DfResult<Vec<_>>>()?;
            let n = groups.len();
            (groups, Some(Partitioning::Hash(columns, n)))
        } else {
            (FileGroup::new(files).split_files(threads), None)
        };

        let mut statistics = Statistics::new_unknown(&self.schema);
        statistics.num_rows = rows.map_or(Precision::Absent, Precision::Exact);
        statistics.total_byte_size = Precision::Inexact(bytes);

        let table_schema = TableSchemaBuilder::new(self.file_schema.clone())
            .with_table_partition_cols(self.partition_fields.clone())
            .build();
        let mut source = ParquetSource::new(table_schema);
        if let Some(predicate) = predicate {
            source = source.with_predicate(predicate);
        }
        let config = FileScanConfigBuilder::new(self.store.clone(), Arc::new(source))
            .with_file_groups(groups)
            .with_statistics(statistics)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .with_output_partitioning(partitioning)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}
