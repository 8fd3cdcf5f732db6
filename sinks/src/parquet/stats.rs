//! Delta file statistics from a Parquet footer.
//!
//! A Delta `add` action carries `numRecords` and, per column, `minValues`, `maxValues`
//! and `nullCount` as JSON; readers (delta-rs, DuckDB, Spark) skip files with them. The
//! Parquet writer has already computed every column's min, max and null count per row
//! group, so this folds the footer's row-group statistics instead of scanning the data
//! again. delta-rs has the same fold (`writer::stats`), but it is crate-private, and
//! this one must also build without delta-rs (the load tester links the lake writer).
//!
//! Only flat schemas get column statistics (every Sluice table is flat). Columns whose
//! values Delta cannot compare in JSON (binary, booleans, non-finite floats) or whose
//! statistics the writer leaves off (`_offset`) get a null count only.

use arrow::datatypes::{DataType, Schema, TimeUnit};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::statistics::Statistics;
use serde_json::{Map, Value, json};

/// One column's extremes over the row groups seen so far.
#[derive(Default)]
struct Fold {
    min: Option<Value>,
    max: Option<Value>,
    nulls: u64,
    /// A row group had no min/max: the file-level bounds are unknown.
    unknown: bool,
}

/// The Delta `stats` JSON of a file with `metadata`, written from `schema`.
pub fn delta_stats(schema: &Schema, metadata: &ParquetMetaData) -> String {
    let rows = metadata.file_metadata().num_rows();
    let leaves = metadata.file_metadata().schema_descr().num_columns();
    let mut out = Map::new();
    out.insert("numRecords".into(), json!(rows));
    if leaves != schema.fields().len() {
        return Value::Object(out).to_string();
    }
    let (mut mins, mut maxs, mut nulls) = (Map::new(), Map::new(), Map::new());
    for (i, field) in schema.fields().iter().enumerate() {
        let mut fold = Fold::default();
        for rg in metadata.row_groups() {
            let Some(stats) = rg.column(i).statistics() else {
                fold.unknown = true;
                continue;
            };
            fold.nulls += stats.null_count_opt().unwrap_or(0);
            match bounds(field.data_type(), stats) {
                Some((lo, hi)) => {
                    fold.min = Some(match fold.min.take() {
                        Some(m) if !less(&lo, &m) => m,
                        _ => lo,
                    });
                    fold.max = Some(match fold.max.take() {
                        Some(m) if !less(&m, &hi) => m,
                        _ => hi,
                    });
                }
                None => fold.unknown = true,
            }
        }
        let name = field.name().clone();
        nulls.insert(name.clone(), json!(fold.nulls));
        if let (false, Some(lo), Some(hi)) = (fold.unknown, fold.min, fold.max) {
            mins.insert(name.clone(), lo);
            maxs.insert(name, hi);
        }
    }
    out.insert("minValues".into(), Value::Object(mins));
    out.insert("maxValues".into(), Value::Object(maxs));
    out.insert("nullCount".into(), Value::Object(nulls));
    Value::Object(out).to_string()
}

/// `a < b` for two bounds of one column (numbers or strings).
fn less(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x < y,
            _ => x.as_f64().unwrap_or(f64::NAN) < y.as_f64().unwrap_or(f64::NAN),
        },
        (Value::String(x), Value::String(y)) => x < y,
        _ => false,
    }
}

/// A row group's (min, max) of a column as Delta JSON values, if Delta can use them.
fn bounds(ty: &DataType, stats: &Statistics) -> Option<(Value, Value)> {
    let pair = |lo: Value, hi: Value| Some((lo, hi));
    match (ty, stats) {
        (DataType::Timestamp(unit, _), Statistics::Int64(s)) => {
            let to_text = |v: i64| {
                let micros = match unit {
                    TimeUnit::Second => v.checked_mul(1_000_000)?,
                    TimeUnit::Millisecond => v.checked_mul(1_000)?,
                    TimeUnit::Microsecond => v,
                    TimeUnit::Nanosecond => v.div_euclid(1_000),
                };
                let t = chrono::DateTime::from_timestamp_micros(micros)?;
                Some(Value::String(
                    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                ))
            };
            // Sub-millisecond units are rounded outward, so the bounds still hold.
            pair(to_text(*s.min_opt()?)?, to_text(*s.max_opt()?)?)
        }
        (DataType::UInt64, Statistics::Int64(s)) => {
            pair(json!(*s.min_opt()? as u64), json!(*s.max_opt()? as u64))
        }
        (
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64,
            Statistics::Int32(s),
        ) => pair(json!(*s.min_opt()?), json!(*s.max_opt()?)),
        (DataType::UInt8 | DataType::UInt16 | DataType::UInt32, Statistics::Int32(s)) => {
            pair(json!(*s.min_opt()? as u32), json!(*s.max_opt()? as u32))
        }
        (DataType::Int64, Statistics::Int64(s)) => pair(json!(*s.min_opt()?), json!(*s.max_opt()?)),
        (DataType::Float64, Statistics::Double(s)) => {
            let (lo, hi) = (*s.min_opt()?, *s.max_opt()?);
            (lo.is_finite() && hi.is_finite()).then(|| (json!(lo), json!(hi)))
        }
        (DataType::Float32, Statistics::Float(s)) => {
            let (lo, hi) = (*s.min_opt()?, *s.max_opt()?);
            (lo.is_finite() && hi.is_finite()).then(|| (json!(lo), json!(hi)))
        }
        (DataType::Utf8 | DataType::LargeUtf8, Statistics::ByteArray(s)) => {
            // A truncated bound stays a bound (the writer rounds the max up).
            let text = |b: &parquet::data_type::ByteArray| {
                std::str::from_utf8(b.data())
                    .ok()
                    .map(|t| Value::String(t.to_owned()))
            };
            pair(text(s.min_opt()?)?, text(s.max_opt()?)?)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::Field;
    use arrow::record_batch::RecordBatch;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;

    #[test]
    fn stats_fold_every_row_group() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", sluice_core::schema::timestamp_type(), false),
            Field::new("v", DataType::Float64, true),
            Field::new("k", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(
                    TimestampMillisecondArray::from(vec![
                        1_767_225_601_721,
                        1_767_225_600_000,
                        1_767_229_199_999,
                    ])
                    .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from(vec![Some(2.5), None, Some(-1.0)])),
                Arc::new(StringArray::from(vec!["b", "a", "c"])),
            ],
        )
        .expect("batch");
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(2))
            .build();
        let mut writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props)).expect("w");
        writer.write(&batch).expect("write");
        let metadata = writer.finish().expect("finish");
        assert_eq!(metadata.num_row_groups(), 2);
        let stats: Value = serde_json::from_str(&delta_stats(&schema, &metadata)).expect("json");
        assert_eq!(
            stats,
            json!({
                "numRecords": 3,
                "minValues": {"ts": "2026-01-01T00:00:00.000000Z", "v": -1.0, "k": "a"},
                "maxValues": {"ts": "2026-01-01T00:59:59.999000Z", "v": 2.5, "k": "c"},
                "nullCount": {"ts": 0, "v": 1, "k": 0},
            })
        );
    }
}
