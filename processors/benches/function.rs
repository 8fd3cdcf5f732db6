//! `Function::process` on W1-like telemetry batches, with `concurrency` 1 and 2:
//! what splitting a batch into parallel slices buys for an expensive function (the
//! select of `config/examples/w1-function.toml`) and costs for a cheap one.
//!
//! `cargo bench -p sluice-processors --bench function`

use std::hint::black_box;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, StringArray, TimestampMillisecondArray, UInt8Array};
use arrow::record_batch::RecordBatch;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_main};
use sluice_core::StreamSchema;
use sluice_processors::function::{Function, FunctionSpec};

/// `rows` telemetry rows from 10,000 devices, 1% with status "error".
fn telemetry(rows: usize) -> RecordBatch {
    let schema = StreamSchema::builtin("telemetry")
        .expect("telemetry")
        .arrow()
        .clone();
    let ts = TimestampMillisecondArray::from_iter_values(
        (0..rows).map(|i| 1_767_225_600_000 + i as i64),
    );
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("dev-{:06}", i % 10_000)),
        )),
        Arc::new(ts.clone().with_timezone("UTC")),
        Arc::new(Float64Array::from_iter_values(
            (0..rows).map(|i| 15.0 + (i % 200) as f64 * 0.1),
        )),
        Arc::new(Float64Array::from(vec![55.0; rows])),
        Arc::new(Float64Array::from(vec![3.6; rows])),
        Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| if i % 100 == 0 { "error" } else { "ok" }),
        )),
        Arc::new(ts.with_timezone("UTC")),
        Arc::new(StringArray::from(vec!["bench"; rows])),
        Arc::new(StringArray::from(vec!["file"; rows])),
        Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| i.to_string()),
        )),
        Arc::new(UInt8Array::from(vec![0; rows])),
    ];
    RecordBatch::try_new(schema, columns).expect("a telemetry batch")
}

fn functions(c: &mut Criterion) {
    let batch = telemetry(8_192);
    let expensive = [
        "device_id",
        "sha256(concat(device_id, ':', status, ':', CAST(temperature AS VARCHAR))) AS digest",
        "regexp_replace(device_id, '[0-9]', '#', 'g') AS device_shape",
        "upper(concat(device_id, '/', status)) AS tag",
        "temperature * 9 / 5 + 32 AS temperature_f",
    ];
    let cheap = ["device_id", "temperature * 9 / 5 + 32 AS temperature_f"];
    let mut group = c.benchmark_group("function_8192_rows");
    group.throughput(Throughput::Elements(batch.num_rows() as u64));
    for (name, select) in [("expensive", &expensive[..]), ("cheap", &cheap[..])] {
        for concurrency in [1, 2] {
            let spec = FunctionSpec {
                name: "f".into(),
                filter: Some("status <> 'error'".into()),
                select: select.iter().map(|s| s.to_string()).collect(),
                concurrency,
                ..FunctionSpec::default()
            };
            let f = Function::compile(&spec, batch.schema_ref(), "functions.f").expect("compiles");
            group.bench_with_input(
                BenchmarkId::new(name, format!("concurrency={concurrency}")),
                &batch,
                |b, batch| b.iter(|| black_box(f.process(batch).expect("runs"))),
            );
        }
    }
    group.finish();
}

#[allow(missing_docs)] // criterion_group! defines an undocumented function.
mod group {
    criterion::criterion_group!(benches, super::functions);
}
use group::benches;
criterion_main!(benches);
