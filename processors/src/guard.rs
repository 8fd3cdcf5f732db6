//! The loop guard and `[publish]`.
//!
//! Every row carries `_hops`: 0 from a device, the `_hops` payload field or Kafka
//! header of a message Sluice (or another pipeline) published, and one more for each
//! function it passes through ([`LoopGuard::advance`]). A function output over
//! `max_hops` is stopped: those rows become `dead_letter` rows with reason
//! `loop_detected` (the row as JSON in `payload`), are counted
//! (`sluice_loop_detected_total{stream}`), and the pipeline raises a `loop_detected`
//! event in the `alerts` table. Decoders stop arriving messages over `max_hops` the
//! same way, so a function → topic → function loop ends after `max_hops` turns
//! whichever side sees it.
//!
//! [`RowLimit`] is a function's rate (`limit` of `[functions.<name>]`), or the lake's
//! in shed mode. In shed mode it sheds the rows above the rate: counted, one in
//! `dead_letter_sample` kept as a `rate_limited` dead letter. In block mode the
//! function takes every row and the limit only counts them
//! ([`Pipeline::take_owed`](crate::Pipeline::take_owed)): the caller, which owns the
//! pipeline's input, waits until the rate has paid for them before it takes more.
//!
//! [`Publisher`] turns the rows of the streams named by `[publish.<name>]` into
//! notifications, one JSON object per row, keeping `_hops` and no other system column.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{AsArray, UInt8Array};
use arrow::compute::{filter_record_batch, not};
use arrow::datatypes::UInt8Type;
use arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_core::schema::{HOPS, INGEST_TIME, OFFSET, PARTITION, SOURCE};
use sluice_core::{Notification, StreamBatch};

use crate::Result;
use crate::alert::{Cap, CapClock};

/// A rate limit of a processor: rows per second, burst, and 1 in `sample` shed rows
/// kept as dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// Rows per second.
    pub rate: u32,
    /// Rows at once above the rate.
    pub burst: u32,
    /// One in this many shed rows becomes a dead letter.
    pub sample: u32,
    /// Block mode: take every row and count it as owed, for the caller to wait for.
    pub block: bool,
}

/// Whose rate a [`RowLimit`] is: its metric labels and its dead letters' detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitOf {
    /// `limit` of `[functions.<name>]`: the rows the function takes.
    Function(String),
    /// `[lake] limit`: the rows written to the lake's tables.
    Lake,
}

/// A rate over rows, on the pipeline's clock (so tests drive it by hand): a function's
/// `limit` or, in shed mode, the lake's.
pub struct RowLimit {
    of: LimitOf,
    mode: RowMode,
}

enum RowMode {
    /// Rows over the rate are dropped; one in `sample` is kept as a dead letter.
    Shed {
        limiter: Cap,
        clock: Arc<dyn sluice_core::Clock>,
        sample: u64,
        /// Rows shed so far (for the sampling).
        shed: u64,
    },
    /// Every row is taken and counted; the caller waits for the rate to pay for them.
    Block { owed: u64 },
}

impl LimitOf {
    /// `sluice_limit_events_total` of this limit and `outcome` (for the block-mode
    /// debts paid outside the pipeline too).
    pub fn counter(&self, outcome: &'static str) -> metrics::Counter {
        match self {
            LimitOf::Function(name) => {
                metrics::counter!("sluice_limit_events_total", "component" => name.clone(), "kind" => "function", "limit" => "function", "outcome" => outcome)
            }
            LimitOf::Lake => {
                metrics::counter!("sluice_limit_events_total", "component" => "lake", "kind" => "lake", "limit" => "sink", "outcome" => outcome)
            }
        }
    }
}

impl std::fmt::Debug for RowLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowLimit")
            .field("of", &self.of)
            .finish_non_exhaustive()
    }
}

impl RowLimit {
    /// The limit `spec` of `of`.
    pub fn new(of: LimitOf, spec: RateSpec, clock: Arc<dyn sluice_core::Clock>) -> Self {
        let mode = if spec.block {
            RowMode::Block { owed: 0 }
        } else {
            let rate = std::num::NonZeroU32::new(spec.rate).unwrap_or(std::num::NonZeroU32::MIN);
            let burst = std::num::NonZeroU32::new(spec.burst).unwrap_or(rate);
            let quota = governor::Quota::per_second(rate).allow_burst(burst);
            RowMode::Shed {
                limiter: governor::RateLimiter::direct_with_clock(quota, CapClock(clock.clone())),
                clock,
                sample: u64::from(spec.sample.max(1)),
                shed: 0,
            }
        };
        Self { of, mode }
    }

    /// The function's name, or `lake`.
    pub fn name(&self) -> &str {
        match &self.of {
            LimitOf::Function(name) => name,
            LimitOf::Lake => "lake",
        }
    }

    /// `sluice_limit_events_total` of this limit and `outcome`.
    fn counter(&self, outcome: &'static str) -> metrics::Counter {
        self.of.counter(outcome)
    }

    /// Block mode: the rows taken since the last call, for the caller to pay for.
    pub fn take_owed(&mut self) -> u64 {
        match &mut self.mode {
            RowMode::Block { owed } => std::mem::take(owed),
            RowMode::Shed { .. } => 0,
        }
    }

    /// The rows of `batch` (of stream `stream`) that may go on now, and the sampled
    /// dead letters of the rest. Shed mode: rows pass in order until the first one over
    /// the rate; the rest of the batch is shed. Block mode: every row, owed.
    pub fn admit(
        &mut self,
        stream: &str,
        batch: &RecordBatch,
    ) -> Result<(RecordBatch, Option<RecordBatch>)> {
        let rows = batch.num_rows();
        let (limiter, clock, sample, shed_so_far) = match &mut self.mode {
            RowMode::Block { owed } => {
                *owed += rows as u64;
                return Ok((batch.clone(), None));
            }
            RowMode::Shed {
                limiter,
                clock,
                sample,
                shed,
            } => (limiter, clock, *sample, shed),
        };
        // One check for a batch that fits (the usual case: a limit that does not
        // bind); else row by row, up to the first over the rate.
        let fits = u32::try_from(rows)
            .ok()
            .and_then(std::num::NonZeroU32::new)
            .is_some_and(|n| matches!(limiter.check_n(n), Ok(Ok(()))));
        let mut taken = if fits { rows } else { 0 };
        while taken < rows && limiter.check().is_ok() {
            taken += 1;
        }
        let now_ms = clock.now_ms();
        let shed = rows - taken;
        // Keep the shed rows whose running number is a multiple of `sample`.
        let first = *shed_so_far;
        *shed_so_far += shed as u64;
        self.counter("allowed").increment(taken as u64);
        if shed == 0 {
            return Ok((batch.clone(), None));
        }
        self.counter("shed").increment(shed as u64);
        let keep: arrow::array::BooleanArray = (0..shed as u64)
            .map(|i| Some((first + i).is_multiple_of(sample)))
            .collect();
        let kept = filter_record_batch(&batch.slice(taken, shed), &keep)?;
        let dead = if kept.num_rows() > 0 {
            let what = match &self.of {
                LimitOf::Function(name) => format!("functions.{name}.limit"),
                LimitOf::Lake => "lake.limit".to_owned(),
            };
            let detail = format!("over {what}; 1 in {sample} shed rows is kept");
            Some(crate::dead_letter_rows_at(
                stream,
                &kept,
                "rate_limited",
                |_| detail.clone(),
                now_ms,
            )?)
        } else {
            None
        };
        Ok((batch.slice(0, taken), dead))
    }
}

/// The `reason` of a row the loop guard stopped.
pub const LOOP_DETECTED: &str = "loop_detected";

/// Counts hops and stops rows that made too many.
#[derive(Debug, Clone, Copy)]
pub struct LoopGuard {
    max_hops: u8,
}

impl Default for LoopGuard {
    fn default() -> Self {
        Self { max_hops: 16 }
    }
}

impl LoopGuard {
    /// A guard stopping rows past `max_hops` function hops.
    pub fn new(max_hops: u8) -> Self {
        Self { max_hops }
    }

    /// The limit.
    pub fn max_hops(&self) -> u8 {
        self.max_hops
    }

    /// One function hop for `batch`, a function's output bound for `stream`: `_hops`
    /// + 1 on every row (a vectorized kernel), then the rows over the limit split off
    ///   as `dead_letter` rows. Returns (rows that go on, dead letters).
    pub fn advance(
        &self,
        stream: &str,
        batch: RecordBatch,
    ) -> Result<(RecordBatch, Option<RecordBatch>)> {
        let Ok(index) = batch.schema().index_of(HOPS) else {
            return Ok((batch, None));
        };
        let Some(hops) = batch.column(index).as_primitive_opt::<UInt8Type>() else {
            return Ok((batch, None));
        };
        let next: UInt8Array = arrow::compute::kernels::arity::unary(hops, |h| h.saturating_add(1));
        let over = arrow::compute::kernels::cmp::gt(&next, &UInt8Array::new_scalar(self.max_hops))?;
        let mut columns = batch.columns().to_vec();
        columns[index] = Arc::new(next);
        let batch = RecordBatch::try_new(batch.schema(), columns)?;
        if over.true_count() == 0 {
            return Ok((batch, None));
        }
        let stopped = filter_record_batch(&batch, &over)?;
        let kept = filter_record_batch(&batch, &not(&over)?)?;
        Ok((kept, Some(self.dead_letters(stream, &stopped)?)))
    }

    /// `rows` (bound for `stream`) as `dead_letter` rows with reason `loop_detected`.
    fn dead_letters(&self, stream: &str, rows: &RecordBatch) -> Result<RecordBatch> {
        let hops = rows
            .column_by_name(HOPS)
            .and_then(|c| c.as_primitive_opt::<UInt8Type>())
            .cloned();
        crate::dead_letter_rows(stream, rows, LOOP_DETECTED, |i| {
            let h = hops.as_ref().map_or(0, |h| h.value(i));
            format!(
                "made {h} function hops, over limits.max_hops = {}: an output feeds back into its own input",
                self.max_hops
            )
        })
    }
}

/// Rows of a `dead_letter` batch stopped as loops, by the stream they were bound for.
pub fn loops_in(dead_letters: &RecordBatch) -> Vec<(String, u64)> {
    let (Some(reasons), Some(streams)) = (
        dead_letters
            .column_by_name("reason")
            .and_then(|c| c.as_string_opt::<i32>()),
        dead_letters
            .column_by_name("stream")
            .and_then(|c| c.as_string_opt::<i32>()),
    ) else {
        return Vec::new();
    };
    let mut counts: Vec<(String, u64)> = Vec::new();
    for (reason, stream) in reasons.iter().zip(streams.iter()) {
        if reason != Some(LOOP_DETECTED) {
            continue;
        }
        let stream = stream.unwrap_or_default();
        match counts.iter_mut().find(|(s, _)| s == stream) {
            Some((_, n)) => *n += 1,
            None => counts.push((stream.to_owned(), 1)),
        }
    }
    counts
}

/// `[publish.<name>]` as the pipeline takes it.
#[derive(Debug, Clone)]
pub struct PublishDecl {
    /// Config key, e.g. `publish.back`, for error messages.
    pub key: String,
    /// The stream or window table whose rows go out.
    pub input: String,
    /// The notifier they go through.
    pub notifier: String,
}

/// The streams with `[publish]` entries, and the notifications made from their rows.
#[derive(Debug, Default)]
pub struct Publisher {
    by_stream: HashMap<String, Arc<[String]>>,
    notifications: Vec<Notification>,
}

impl Publisher {
    /// Publishers for `decls`, each input checked against the known `streams`.
    pub fn new(
        decls: &[PublishDecl],
        streams: &HashMap<String, arrow::datatypes::SchemaRef>,
    ) -> std::result::Result<Self, Vec<crate::Error>> {
        let mut by_stream: HashMap<String, Vec<String>> = HashMap::new();
        let mut errors = Vec::new();
        for decl in decls {
            if streams.contains_key(&decl.input) {
                by_stream
                    .entry(decl.input.clone())
                    .or_default()
                    .push(decl.notifier.clone());
            } else {
                errors.push(crate::Error::Config {
                    key: format!("{}.input", decl.key),
                    message: format!(
                        "{:?} is not a declared stream, a function's output or a window",
                        decl.input
                    ),
                });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            by_stream: by_stream.into_iter().map(|(k, v)| (k, v.into())).collect(),
            notifications: Vec::new(),
        })
    }

    /// Queues one notification per row of `batch` if its stream is published.
    pub fn publish(&mut self, batch: &StreamBatch) -> Result<()> {
        let Some(notify) = self.by_stream.get(&*batch.stream) else {
            return Ok(());
        };
        let schema = batch.batch.schema();
        let keep: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| {
                let name = schema.field(i).name();
                !matches!(name.as_str(), INGEST_TIME | SOURCE | PARTITION | OFFSET)
            })
            .collect();
        let rows = batch.batch.project(&keep)?;
        for line in crate::json_lines(&rows)? {
            // The JSON writer writes one object per row; nothing else can come back.
            if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&line) {
                self.notifications.push(Notification {
                    notify: notify.clone(),
                    fields,
                });
            }
        }
        Ok(())
    }

    /// The notifications made since the last call.
    pub fn take(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.notifications)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use sluice_core::schema::{INGEST_TIME, SOURCE};

    use super::*;

    #[test]
    fn a_shedding_lake_limit_keeps_sampled_dead_letters_of_rows_without_system_columns() {
        // A window's output: no system columns.
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c", "d", "e"])),
                Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5])),
            ],
        )
        .unwrap();
        let now = 1_767_225_600_000;
        let clock = Arc::new(sluice_core::ManualClock::new(now));
        let spec = RateSpec {
            rate: 2,
            burst: 2,
            sample: 2,
            block: false,
        };
        let mut limit = RowLimit::new(LimitOf::Lake, spec, clock);
        assert_eq!(limit.take_owed(), 0, "shed mode owes nothing");
        let (kept, dead) = limit.admit("device_minute", &rows).unwrap();
        assert_eq!(kept.num_rows(), 2, "the burst passes");
        let dead = dead.expect("dead letters");
        assert_eq!(dead.num_rows(), 2, "3 shed, 1 in 2 kept (the 1st and 3rd)");
        let column = |name: &str| dead.column_by_name(name).unwrap().clone();
        assert_eq!(column("reason").as_string::<i32>().value(0), "rate_limited");
        assert!(
            column("detail")
                .as_string::<i32>()
                .value(0)
                .starts_with("over lake.limit")
        );
        assert_eq!(column(SOURCE).as_string::<i32>().value(0), "device_minute");
        let at = column(INGEST_TIME);
        let at = at.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        assert_eq!(at.value(1), now);
        let payload = column("payload");
        let payloads: Vec<&[u8]> = payload.as_binary::<i32>().iter().flatten().collect();
        assert!(
            payloads[0].starts_with(br#"{"device_id":"c","n":3"#),
            "{payloads:?}"
        );
        assert!(
            payloads[1].starts_with(br#"{"device_id":"e","n":5"#),
            "{payloads:?}"
        );
    }
}
