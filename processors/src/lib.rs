//! Stream processors: stateless functions (filter, project, route) and, next,
//! event-time windows, all over Arrow `RecordBatch`es.
//!
//! # Layout
//! - [`function`]: a function declared in SQL text, compiled once into DataFusion
//!   physical expressions and evaluated on each batch.
//! - [`pipeline`]: the config's functions wired by stream name; `sluice run` passes
//!   every batch through it before the lake.
//! - [`window`]: tumbling, hopping and session windows over event time, with
//!   watermarks, allowed lateness and snapshots.
//! - [`alert`]: threshold and missing-data rules over streams and windows, their
//!   per-key state machine, cooldown and the global notification cap.
//! - [`guard`]: the loop guard (`_hops` per function hop, `loop_detected` dead
//!   letters) and `[publish]` (rows sent out through notifiers).

pub mod alert;
pub mod function;
pub mod guard;
pub mod pipeline;
pub mod window;

/// A DataFusion session to compile the config's SQL in. Its parser recurses no deeper
/// than the query gate's ([`sluice_sqlgate::RECURSION_LIMIT`]): sqlparser takes time
/// exponential in the depth on some inputs, and a config line like that would stall
/// `sluice check` and `sluice run` the way a query stalled a core.
pub(crate) fn session() -> datafusion::prelude::SessionContext {
    let config = datafusion::prelude::SessionConfig::new().set_usize(
        "datafusion.sql_parser.recursion_limit",
        sluice_sqlgate::RECURSION_LIMIT,
    );
    datafusion::prelude::SessionContext::new_with_config(config)
}

/// Why a function or window cannot be built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A SQL expression in the config does not parse or does not fit the input
    /// schema; the message quotes DataFusion. The user's to fix.
    #[error("{key}: {message}")]
    Config {
        /// Dotted config key of the expression.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Evaluating a compiled expression failed on a batch (a bug or an overflow).
    #[error("function {function:?}: {source}")]
    Eval {
        /// The function.
        function: String,
        /// The cause.
        source: datafusion::error::DataFusionError,
    },
    /// A window could not take a batch or emit (a bug, or a snapshot that does not fit).
    #[error("window: {message}")]
    Window {
        /// What went wrong.
        message: String,
    },
    /// An Arrow kernel failed on a batch (a bug: the batches are built off schemas).
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Rows of a stream that a processor stopped (bound for `stream`) as `dead_letter`
/// rows: their system columns, `reason`, `detail(row)`, and the row as JSON in
/// `payload`. `rows` must carry the system columns (a stream's rows do).
pub(crate) fn dead_letter_rows(
    stream: &str,
    rows: &arrow::record_batch::RecordBatch,
    reason: &str,
    detail: impl Fn(usize) -> String,
) -> Result<arrow::record_batch::RecordBatch> {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, BinaryArray, StringArray, UInt64Array};
    use sluice_core::schema::{INGEST_TIME, OFFSET, PARTITION, SOURCE, dead_letter_schema};

    let n = rows.num_rows();
    let column = |name: &str| -> Result<ArrayRef> {
        rows.column_by_name(name)
            .cloned()
            .ok_or_else(|| Error::Window {
                message: format!("rows of {stream:?} lack the system column {name}"),
            })
    };
    let payloads = json_lines(rows)?;
    let sizes = UInt64Array::from_iter_values(payloads.iter().map(|p| p.len() as u64));
    let details: StringArray = (0..n).map(|i| Some(detail(i))).collect();
    let columns: Vec<ArrayRef> = vec![
        column(INGEST_TIME)?,
        column(SOURCE)?,
        column(PARTITION)?,
        column(OFFSET)?,
        Arc::new(StringArray::from(vec![stream; n])),
        Arc::new(StringArray::from(vec![reason; n])),
        Arc::new(details),
        Arc::new(BinaryArray::from_iter_values(
            payloads.iter().map(String::as_bytes),
        )),
        Arc::new(sizes),
    ];
    Ok(arrow::record_batch::RecordBatch::try_new(
        dead_letter_schema(),
        columns,
    )?)
}

/// As [`dead_letter_rows`], for rows that may lack the system columns (a window's or a
/// function's output reaching the lake): a missing `_ingest_time` is `now_ms`, a
/// missing `_source` is `stream`, and a missing `_partition` or `_offset` is empty.
pub(crate) fn dead_letter_rows_at(
    stream: &str,
    rows: &arrow::record_batch::RecordBatch,
    reason: &str,
    detail: impl Fn(usize) -> String,
    now_ms: i64,
) -> Result<arrow::record_batch::RecordBatch> {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use sluice_core::schema::{INGEST_TIME, OFFSET, PARTITION, SOURCE, system_fields};

    let n = rows.num_rows();
    let mut fields: Vec<Arc<Field>> = rows.schema().fields().iter().cloned().collect();
    let mut columns = rows.columns().to_vec();
    for field in system_fields() {
        if rows.column_by_name(field.name()).is_some() {
            continue;
        }
        let column: ArrayRef = match field.name().as_str() {
            INGEST_TIME => match field.data_type() {
                DataType::Timestamp(_, tz) => Arc::new(
                    TimestampMillisecondArray::from(vec![now_ms; n]).with_timezone_opt(tz.clone()),
                ),
                _ => continue,
            },
            SOURCE => Arc::new(StringArray::from(vec![stream; n])),
            PARTITION | OFFSET => Arc::new(StringArray::from(vec![""; n])),
            _ => continue,
        };
        fields.push(Arc::new(field));
        columns.push(column);
    }
    let rows = arrow::record_batch::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    dead_letter_rows(stream, &rows, reason, detail)
}

/// Each row of `rows` as one JSON object, via arrow's JSON writer (vectorized per
/// column); nulls are left out of the objects.
pub(crate) fn json_lines(rows: &arrow::record_batch::RecordBatch) -> Result<Vec<String>> {
    let mut json = Vec::new();
    {
        let mut writer = arrow::json::LineDelimitedWriter::new(&mut json);
        writer.write(rows)?;
        writer.finish()?;
    }
    let text = String::from_utf8(json).map_err(|e| Error::Window {
        message: format!("arrow's JSON writer wrote invalid UTF-8: {e}"),
    })?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.resize(rows.num_rows(), String::new());
    Ok(lines)
}

#[cfg(test)]
mod test_support {
    use std::sync::Arc;

    use arrow::array::{
        ArrayRef, Float64Array, StringArray, TimestampMillisecondArray, UInt8Array,
    };
    use arrow::record_batch::RecordBatch;
    use sluice_core::StreamSchema;

    /// Telemetry rows: (device, temperature, status), one millisecond apart.
    pub(crate) fn telemetry(rows: &[(&str, Option<f64>, &str)]) -> RecordBatch {
        let timed: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.0, 1_767_225_600_000 + i as i64, r.1, r.2))
            .collect();
        telemetry_at(&timed, "src")
    }

    /// Telemetry rows: (device, event time in ms, temperature, status) from `source`.
    pub(crate) fn telemetry_at(
        rows: &[(&str, i64, Option<f64>, &str)],
        source: &str,
    ) -> RecordBatch {
        let schema = StreamSchema::builtin("telemetry").unwrap().arrow().clone();
        let n = rows.len();
        let ts = TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(ts.clone().with_timezone("UTC")),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
            Arc::new(Float64Array::from(vec![Some(50.0); n])),
            Arc::new(Float64Array::from(vec![Some(3.3); n])),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(ts.with_timezone("UTC")),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                source, n,
            ))),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                "topic", n,
            ))),
            Arc::new(StringArray::from_iter_values((0..n).map(|i| i.to_string()))),
            Arc::new(UInt8Array::from(vec![0; n])),
        ];
        RecordBatch::try_new(schema, columns).unwrap()
    }
}
