//! Helpers for the crate's unit tests: real files in real Delta tables on a temp dir.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use sluice_core::ManualClock;
use sluice_core::schema::{EVENT_TIME_META, KEY_META, timestamp_type};

#[cfg(feature = "delta")]
use crate::delta::DeltaTables;
use crate::parquet::{Lake, LakeOptions, Written};

/// A batch with event times `times` (ms), key `k<i % 3>` and value `i`.
pub(crate) fn batch(times: &[i64]) -> RecordBatch {
    let schema = Schema::new_with_metadata(
        vec![
            Field::new("ts", timestamp_type(), false),
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ],
        [
            (EVENT_TIME_META.to_owned(), "ts".to_owned()),
            (KEY_META.to_owned(), "k".to_owned()),
        ]
        .into(),
    );
    let n = times.len() as i64;
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(TimestampMillisecondArray::from(times.to_vec()).with_timezone("UTC")),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("k{}", i % 3)),
            )),
            Arc::new(Int64Array::from_iter_values(0..n)),
        ],
    )
    .expect("batch")
}

/// [`batch`] with one more column, `w` (a float: half of `v`), as a stream gains a
/// field.
pub(crate) fn widened(times: &[i64]) -> RecordBatch {
    let batch = batch(times);
    let mut fields = batch.schema().fields().to_vec();
    fields.push(Arc::new(Field::new("w", DataType::Float64, false)));
    let schema = Schema::new_with_metadata(fields, batch.schema().metadata().clone());
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(Float64Array::from_iter_values(
        (0..times.len()).map(|i| i as f64 / 2.0),
    )));
    RecordBatch::try_new(Arc::new(schema), columns).expect("batch")
}

/// A lake writer on the local directory `root` (files roll after 1 s of `clock`).
pub(crate) fn lake(root: &Path, clock: &ManualClock) -> Lake {
    let options = LakeOptions {
        roll_size: 1 << 30,
        roll_interval_ms: 1_000,
        row_group_rows: 1024,
        zstd_level: 1,
    };
    let location = crate::location::LakeLocation::local(root).expect("location");
    Lake::open(options, &location, Arc::new(clock.clone())).expect("lake")
}

/// Stores rows with event times `times` into `table` with a real lake writer (one
/// file per hour they span); returns what it wrote.
pub(crate) async fn store(root: &Path, table: &str, times: &[i64]) -> Written {
    store_batch(root, table, &batch(times)).await
}

/// As [`store`], of the rows of `batch`.
pub(crate) async fn store_batch(root: &Path, table: &str, batch: &RecordBatch) -> Written {
    let mut lake = lake(root, &ManualClock::new(0));
    let name: Arc<str> = table.into();
    lake.write(&name, batch).expect("write");
    lake.close_all().await.expect("store");
    lake.take_written().remove(&name).expect("written")
}

/// Rows in `table`'s current version (from the log's statistics), and the version.
#[cfg(feature = "delta")]
pub(crate) async fn committed(tables: &mut DeltaTables, table: &str) -> (u64, u64) {
    let t = tables.open(table).await.expect("open");
    let rows = t
        .snapshot()
        .expect("snapshot")
        .log_data()
        .iter()
        .map(|f| f.num_records().unwrap_or(0) as u64)
        .sum();
    (rows, t.version().expect("version"))
}
