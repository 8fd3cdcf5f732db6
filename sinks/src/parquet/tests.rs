use std::sync::Arc;

use arrow::array::{Int64Array, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sluice_core::ManualClock;
use sluice_core::schema::{EVENT_TIME_META, timestamp_type};

use super::*;
use crate::test_support::lake;

fn batch(times: &[i64]) -> RecordBatch {
    let schema = Schema::new_with_metadata(
        vec![
            Field::new("ts", timestamp_type(), false),
            Field::new("v", DataType::Int64, false),
        ],
        [(EVENT_TIME_META.to_owned(), "ts".to_owned())].into(),
    );
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(TimestampMillisecondArray::from(times.to_vec()).with_timezone("UTC")),
            Arc::new(Int64Array::from_iter_values(0..times.len() as i64)),
        ],
    )
    .expect("batch")
}

fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn rows_land_in_hive_partitions_by_event_hour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(0);
    let mut lake = lake(dir.path(), &clock);
    let table: Arc<str> = "telemetry".into();
    // 2026-01-01T00:59:59.999Z, 01:00:00.000Z, 00:00:00.000Z
    let t0 = 1_767_225_600_000;
    lake.write(&table, &batch(&[t0 + 3_599_999, t0 + 3_600_000, t0]))
        .expect("write");
    assert_eq!(lake.pending_rows(), 3);
    let stats = lake.close_all().await.expect("close");
    assert_eq!(stats.files, 2);
    assert_eq!(stats.rows, 3);
    let files = parquet_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let rel: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(dir.path())
                .expect("prefix")
                .parent()
                .expect("parent")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        rel,
        [
            "telemetry/date=2026-01-01/hour=00",
            "telemetry/date=2026-01-01/hour=01"
        ]
    );
    let rows: usize = files
        .iter()
        .map(|f| {
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).expect("open"))
                    .expect("parquet")
                    .build()
                    .expect("reader");
            reader.map(|b| b.expect("batch").num_rows()).sum::<usize>()
        })
        .sum();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn files_roll_on_time_only_when_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(0);
    let mut lake = lake(dir.path(), &clock);
    let table: Arc<str> = "t".into();
    lake.write(&table, &batch(&[10, 20])).expect("write");
    clock.advance(999);
    assert_eq!(lake.roll_due().await.expect("roll"), CommitStats::default());
    clock.advance(1);
    assert_eq!(lake.roll_due().await.expect("roll").rows, 2);
    assert_eq!(lake.pending_rows(), 0);
    assert_eq!(parquet_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn staging_leftovers_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let part = dir.path().join("t/date=2026-01-01/hour=00");
    std::fs::create_dir_all(&part).expect("mkdir");
    std::fs::write(part.join("part-x.parquet#3"), b"half a file").expect("write");
    std::fs::write(part.join("part-y.parquet"), b"committed").expect("write");
    let _lake = lake(dir.path(), &ManualClock::new(0));
    let left: Vec<String> = parquet_files(dir.path())
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["part-y.parquet"]);
}
