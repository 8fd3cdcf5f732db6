//! Event-time windows: tumbling, hopping and session aggregates with watermarks and
//! allowed lateness.
//!
//! A [`Window`] reads one stream. For each batch it
//! 1. applies its optional filter (a compiled [`Function`]);
//! 2. sends rows whose windows are all final to the `late` table (see
//!    [`sluice_core::schema::late_schema`]), with the reason and the window they missed;
//! 3. adds the rest to per-group accumulators (see [`aggregate`]);
//! 4. advances the [`watermark`] and emits every window whose end it passed.
//!
//! Emission: a window is emitted with `version = 1` when the watermark passes its
//! end. Until the watermark passes end + `allowed_lateness` its state is kept; a late
//! row updates it and the window is emitted again with the next version (as Flink's
//! late firings). After that, rows for it go to `late`.
//!
//! Tumbling and hopping windows share one engine, [`panes`]: state is kept per
//! slide-sized pane and a window is the merge of its panes, so a 1-hour window sliding
//! by 1 minute touches each event once. Session windows ([`session`]) keep per-key
//! sessions and merge them when an event bridges two.
//!
//! State can be written to bytes and read back ([`Window::snapshot`],
//! [`Window::restore`]): Arrow IPC, one stream per window.

mod aggregate;
mod instances;
mod keys;
mod panes;
mod session;
mod watermark;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType};
use datafusion::physical_expr::PhysicalExpr;
use serde::{Deserialize, Serialize};
use sluice_core::StreamBatch;
use sluice_core::schema::{
    DEAD_LETTER_TABLE, EVENT_TIME_META, KEY_META, LATE_TABLE, PARTITION, SOURCE, late_schema,
};

use crate::function::predicate;
use crate::{Error, Result};
pub use instances::{Instances, state_partition};
pub use watermark::WatermarkSpec;

use aggregate::Aggregates;
use watermark::{Watermark, WatermarkState};

/// The shape of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size_ms`.
    Tumbling {
        /// Window length.
        size_ms: i64,
    },
    /// Windows of `size_ms` starting every `slide_ms` (`size_ms` a multiple of it).
    Hopping {
        /// Window length.
        size_ms: i64,
        /// Distance between window starts.
        slide_ms: i64,
    },
    /// Per group, events closer than `gap_ms` form one session.
    Session {
        /// Inactivity that closes a session.
        gap_ms: i64,
    },
}

/// What the config says about a window.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    /// Output table name.
    pub name: String,
    /// Config path, e.g. `windows.device_minute`, for error messages.
    pub key: String,
    /// The kind and its sizes.
    pub kind: WindowKind,
    /// Group-by columns of the input.
    pub group_by: Vec<String>,
    /// Only rows for which this SQL predicate holds are aggregated.
    pub filter: Option<String>,
    /// SQL select items with aggregates, e.g. `"max(temperature) AS temperature_max"`.
    pub select: Vec<String>,
    /// How long after the watermark passed a window's end it still accepts rows.
    pub allowed_lateness_ms: i64,
}

/// A compiled window with its state.
#[derive(Debug)]
pub struct Window {
    name: Arc<str>,
    /// Over the whole input batch.
    filter: Option<Arc<dyn PhysicalExpr>>,
    aggregates: Aggregates,
    /// The input columns the window reads; `event_time` indexes into them.
    columns: Vec<usize>,
    event_time: usize,
    event_time_name: String,
    /// `_source` in the input: a batch comes from one source, so its first row
    /// names the watermark partition (the column is not copied), unless
    /// `row_sources`.
    source: Option<usize>,
    /// With `by_partition` watermarks: `_partition` in the input.
    partitioned: Option<usize>,
    /// The event time in the input (for `by_partition` and `row_sources`).
    input_time: Option<usize>,
    /// Whether each row's `_source` names its watermark partition
    /// ([`WatermarkSpec::row_sources`]).
    row_sources: bool,
    output: SchemaRef,
    watermark: Watermark,
    lateness: i64,
    state: State,
    /// Hashes group keys for the panes' key sets.
    keys: keys::KeyHashes,
}

#[derive(Debug)]
enum State {
    Panes(panes::Panes),
    Sessions(session::Sessions),
}

/// What a snapshot keeps besides the state rows.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotMeta {
    watermark: WatermarkState,
    panes: Option<panes::PanesMeta>,
}

const SNAPSHOT_META: &str = "sluice.window";

/// Rows of one batch that the window state takes, with their event times.
struct Rows {
    batch: RecordBatch,
    times: TimestampMillisecondArray,
}

impl Window {
    /// Compiles `spec` over the input stream's schema. Every problem is returned, each
    /// naming its config key.
    pub fn compile(
        spec: &WindowSpec,
        input: &SchemaRef,
        watermark: WatermarkSpec,
    ) -> Result<Self, Vec<Error>> {
        let key = &spec.key;
        let config = |k: &str, message: String| Error::Config {
            key: format!("{key}.{k}"),
            message,
        };
        let mut errors = Vec::new();
        let event_time = input
            .metadata()
            .get(EVENT_TIME_META)
            .and_then(|name| input.index_of(name).ok().map(|i| (name.clone(), i)));
        let Some((event_time_name, event_time)) = event_time else {
            return Err(vec![config(
                "input",
                "the stream has no event-time column".into(),
            )]);
        };
        if !matches!(
            input.field(event_time).data_type(),
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, _)
        ) {
            errors.push(config(
                "input",
                format!("event-time column {event_time_name:?} is not a millisecond timestamp"),
            ));
        }
        match spec.kind {
            WindowKind::Tumbling { size_ms } if size_ms <= 0 => {
                errors.push(config("size", "must be positive".into()))
            }
            WindowKind::Hopping { size_ms, slide_ms } => {
                if size_ms <= 0 || slide_ms <= 0 {
                    errors.push(config("slide", "size and slide must be positive".into()));
                } else if size_ms % slide_ms != 0 {
                    errors.push(config(
                        "slide",
                        format!("size ({size_ms} ms) must be a multiple of slide ({slide_ms} ms)"),
                    ));
                }
            }
            WindowKind::Session { gap_ms } if gap_ms <= 0 => {
                errors.push(config("gap", "must be positive".into()))
            }
            _ => {}
        }
        if spec.allowed_lateness_ms < 0 {
            errors.push(config("allowed_lateness", "must not be negative".into()));
        }
        let filter = spec.filter.as_ref().and_then(|sql| {
            predicate(sql, input, &format!("{key}.filter"))
                .map_err(|e| errors.push(e))
                .ok()
        });
        let aggregates =
            match Aggregates::compile(input, &spec.group_by, &spec.select, &event_time_name, key) {
                Ok(a) => Some(a),
                Err(mut e) => {
                    errors.append(&mut e);
                    None
                }
            };
        let Some(mut aggregates) = aggregates.filter(|_| errors.is_empty()) else {
            return Err(errors);
        };
        let keep = [event_time];
        let (columns, pruned) = aggregates.prune(input, &keep).map_err(|e| vec![e])?;
        let position = |name: &str| pruned.index_of(name).ok();
        let output = output_schema(&aggregates, &spec.group_by);
        let state = match spec.kind {
            WindowKind::Tumbling { size_ms } => State::Panes(panes::Panes::new(size_ms, size_ms)),
            WindowKind::Hopping { size_ms, slide_ms } => {
                State::Panes(panes::Panes::new(size_ms, slide_ms))
            }
            WindowKind::Session { gap_ms } => {
                State::Sessions(session::Sessions::new(gap_ms, &aggregates).map_err(|e| vec![e])?)
            }
        };
        Ok(Self {
            name: Arc::from(spec.name.as_str()),
            filter,
            aggregates,
            columns,
            event_time: position(&event_time_name).unwrap_or(0),
            partitioned: watermark
                .by_partition
                .then(|| input.index_of(PARTITION).ok())
                .flatten(),
            input_time: input.index_of(&event_time_name).ok(),
            row_sources: watermark.row_sources,
            event_time_name,
            source: input.index_of(SOURCE).ok(),
            output,
            watermark: Watermark::new(watermark),
            lateness: spec.allowed_lateness_ms,
            state,
            keys: keys::KeyHashes::new(),
        })
    }

    /// The output table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The output table's schema: group columns, `window_start`, `window_end`,
    /// `version`, then the aggregates.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output
    }

    /// The current watermark (ms since the epoch), if any event was seen.
    pub fn watermark(&self) -> Option<i64> {
        Some(self.watermark.current()).filter(|&w| w != i64::MIN)
    }

    /// Approximate bytes of window state.
    pub fn state_size(&self) -> usize {
        match &self.state {
            State::Panes(p) => p.size(),
            State::Sessions(s) => s.size(),
        }
    }

    /// Takes one input batch at wall time `now_ms`; pushes emitted windows and late
    /// rows to `out`.
    pub fn process(
        &mut self,
        batch: &RecordBatch,
        now_ms: i64,
        out: &mut Vec<StreamBatch>,
    ) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        // Only the columns the window reads are copied when rows are filtered out.
        let all = batch.project(&self.columns).map_err(arrow_error)?;
        let (narrow, kept) = match &self.filter {
            Some(predicate) => {
                let mask = predicate
                    .evaluate(batch)
                    .and_then(|v| v.into_array(batch.num_rows()))
                    .map_err(|e| window_error(&e.to_string()))?;
                let mask = mask.as_boolean().clone();
                let narrow =
                    arrow::compute::filter_record_batch(&all, &mask).map_err(arrow_error)?;
                (narrow, Some(mask))
            }
            None => (all, None),
        };
        // Late rows are reported whole: `full` recovers the input rows behind `narrow`
        // (while `aligned`, i.e. no rows were dropped since the filter).
        let full =
            |narrow: &RecordBatch, aligned: bool, mask: &BooleanArray| -> Result<RecordBatch> {
                let rows = match (&kept, aligned) {
                    (_, false) => narrow.clone(),
                    (Some(k), true) => {
                        arrow::compute::filter_record_batch(batch, k).map_err(arrow_error)?
                    }
                    (None, true) => batch.clone(),
                };
                arrow::compute::filter_record_batch(&rows, mask).map_err(arrow_error)
            };
        let times = narrow
            .column(self.event_time)
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| window_error("event time is not a millisecond timestamp"))?
            .clone();
        let (narrow, times, aligned) = if times.null_count() > 0 {
            let valid = arrow::compute::is_not_null(&times).map_err(arrow_error)?;
            let missing = arrow::compute::not(&valid).map_err(arrow_error)?;
            out.push(self.late(&full(&narrow, true, &missing)?, "no_event_time", None)?);
            let narrow =
                arrow::compute::filter_record_batch(&narrow, &valid).map_err(arrow_error)?;
            let times = narrow
                .column(self.event_time)
                .as_primitive::<TimestampMillisecondType>()
                .clone();
            (narrow, times, false)
        } else {
            (narrow, times, true)
        };
        if narrow.num_rows() == 0 {
            return Ok(());
        }
        let watermark = self.watermark.current();
        let missed = match &self.state {
            State::Panes(p) => p.missed(&times, watermark, self.lateness),
            State::Sessions(_) => None,
        };
        let (rows, aligned) = match missed {
            Some((mask, windows)) => {
                out.push(self.late(
                    &full(&narrow, aligned, &mask)?,
                    "window_closed",
                    Some(&windows),
                )?);
                let keep = arrow::compute::not(&mask).map_err(arrow_error)?;
                let kept =
                    arrow::compute::filter_record_batch(&narrow, &keep).map_err(arrow_error)?;
                let times = kept
                    .column(self.event_time)
                    .as_primitive::<TimestampMillisecondType>()
                    .clone();
                (Rows { batch: kept, times }, false)
            }
            None => (
                Rows {
                    batch: narrow,
                    times,
                },
                aligned,
            ),
        };
        self.observe(batch, &rows.times, now_ms);
        let inputs = self.aggregates.inputs(&rows.batch)?;
        let (aggregates, times, lateness) = (&self.aggregates, &rows.times, self.lateness);
        let late_rows = match &mut self.state {
            State::Panes(p) => {
                p.update(aggregates, &self.keys, inputs, times, watermark, lateness)?
            }
            State::Sessions(s) => s.update(aggregates, inputs, times, watermark, lateness)?,
        };
        if let Some((mask, windows)) = late_rows {
            let rows = full(&rows.batch, aligned, &mask)?;
            out.push(self.late(&rows, "window_closed", Some(&windows))?);
        }
        self.emit(now_ms, out)
    }

    /// Advances the watermark by `batch`'s rows (event times `times`).
    fn observe(&mut self, batch: &RecordBatch, times: &TimestampMillisecondArray, now_ms: i64) {
        if self.partitioned.is_some() || self.row_sources {
            self.observe_rows(batch, now_ms);
        } else if let Some(max) = arrow::compute::max(times) {
            let partition = self
                .source
                .and_then(|c| batch.column(c).as_string_opt::<i32>())
                .filter(|s| !s.is_empty() && s.is_valid(0))
                .map_or("", |s| s.value(0))
                .to_owned();
            self.watermark.observe(&partition, max, now_ms);
        }
    }

    /// Over the window-state budget: of `batch`'s rows (those the filter keeps), the
    /// ones whose group key the window already holds (in the pane of their event
    /// time; for sessions, an open session) are taken as usual. The rest, new keys,
    /// are refused: they advance the watermark, so windows still close and free
    /// state, but are not aggregated; they go to `dead_letter` with reason
    /// `state_budget` and `detail`. Returns how many were refused.
    pub fn refuse(
        &mut self,
        batch: &RecordBatch,
        detail: &str,
        now_ms: i64,
        out: &mut Vec<StreamBatch>,
    ) -> Result<usize> {
        let rows = match &self.filter {
            Some(predicate) => {
                let mask = predicate
                    .evaluate(batch)
                    .and_then(|v| v.into_array(batch.num_rows()))
                    .map_err(|e| window_error(&e.to_string()))?;
                arrow::compute::filter_record_batch(batch, mask.as_boolean())
                    .map_err(arrow_error)?
            }
            None => batch.clone(),
        };
        if rows.num_rows() == 0 {
            return Ok(0);
        }
        let narrow = rows.project(&self.columns).map_err(arrow_error)?;
        let groups = self.aggregates.inputs(&narrow)?.groups;
        let times = narrow
            .column(self.event_time)
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| window_error("event time is not a millisecond timestamp"))?
            .clone();
        let known = match &mut self.state {
            State::Panes(p) => p.known(&self.aggregates, &self.keys, &groups, &times)?,
            State::Sessions(s) => s.known(&groups, rows.num_rows())?,
        };
        let refused = arrow::compute::filter_record_batch(
            &rows,
            &arrow::compute::not(&known).map_err(arrow_error)?,
        )
        .map_err(arrow_error)?;
        if known.true_count() > 0 {
            let taken = arrow::compute::filter_record_batch(&rows, &known).map_err(arrow_error)?;
            self.process(&taken, now_ms, out)?;
        }
        if refused.num_rows() == 0 {
            return Ok(0);
        }
        if let Some(times) = refused
            .column_by_name(&self.event_time_name)
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
        {
            let times = times.clone();
            self.observe(&refused, &times, now_ms);
        }
        out.push(StreamBatch::new(
            DEAD_LETTER_TABLE.into(),
            crate::dead_letter_rows(&self.name, &refused, STATE_BUDGET, |_| detail.to_owned())?,
        ));
        self.emit(now_ms, out)?;
        Ok(refused.num_rows())
    }

    /// `by_partition`: registers a source's partitions (from its positions) before their
    /// first rows, so a partition read later than the others cannot find its rows late;
    /// retires those read to their end ([`SourcePositions::END`]), so a closed Kinesis
    /// shard does not hold the watermark until `idle_timeout`; with `row_sources`,
    /// rests the origins that said goodbye (a node stopped cleanly) until they greet
    /// again.
    ///
    /// [`SourcePositions::END`]: sluice_core::SourcePositions::END
    pub fn announce(&mut self, positions: &sluice_core::SourcePositions, now_ms: i64) {
        if self.row_sources {
            // The origins each partition has met hold it back (they greet every
            // partition before their first row), until they say farewell, or goodbye
            // until they greet again.
            for (partition, origins) in &positions.origins {
                for (origin, seq) in origins {
                    let key = match self.partitioned {
                        Some(_) => format!("{origin}/{partition}"),
                        None => origin.clone(),
                    };
                    if seq.is_end() {
                        self.watermark.retire(&key);
                    } else if seq.is_resting() {
                        self.watermark.rest(&key);
                    } else {
                        self.watermark.announce(&key, now_ms);
                    }
                }
            }
            return;
        }
        if self.partitioned.is_none() || positions.log_series {
            return;
        }
        for (partition, offset) in &positions.offsets {
            let key = format!("{}/{partition}", positions.source);
            if offset == sluice_core::SourcePositions::END {
                self.watermark.retire(&key);
            } else {
                self.watermark.announce(&key, now_ms);
            }
        }
    }

    /// `by_partition`: the newest event time of each `_partition` in the batch, under
    /// `<_source>/<_partition>`; `row_sources`: of each row's `_source` (with its
    /// `_partition` if both). Read from the whole input batch (rows the window's
    /// filter drops still show how far their partition has got).
    fn observe_rows(&mut self, batch: &RecordBatch, now_ms: i64) {
        let Some(times) = self.input_time.and_then(|t| {
            batch
                .column(t)
                .as_primitive_opt::<TimestampMillisecondType>()
        }) else {
            return;
        };
        let partitions = match self.partitioned {
            Some(p) => match batch.column(p).as_string_opt::<i32>() {
                Some(p) => Some(p),
                None => return,
            },
            None => None,
        };
        let sources = self
            .source
            .and_then(|c| batch.column(c).as_string_opt::<i32>())
            .filter(|s| !s.is_empty());
        let row_sources = self.row_sources;
        let source_of = |i: usize| match sources {
            Some(s) if row_sources && s.is_valid(i) => s.value(i),
            Some(s) if !row_sources && s.is_valid(0) => s.value(0),
            _ => "",
        };
        let mut newest: HashMap<(&str, &str), i64> = HashMap::new();
        for i in 0..batch.num_rows() {
            let partition = match partitions {
                Some(p) if p.is_valid(i) => p.value(i),
                Some(_) => continue,
                None => "",
            };
            if times.is_valid(i) {
                let t = times.value(i);
                newest
                    .entry((source_of(i), partition))
                    .and_modify(|m| *m = (*m).max(t))
                    .or_insert(t);
            }
        }
        for ((source, partition), max) in newest {
            let key = match partitions {
                Some(_) => format!("{source}/{partition}"),
                None => source.to_owned(),
            };
            self.watermark.observe(&key, max, now_ms);
        }
    }

    /// Advances the watermark by wall time alone (idle partitions) and emits what it
    /// closes.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<StreamBatch>) -> Result<()> {
        self.emit(now_ms, out)
    }

    /// End of input: the watermark goes to +∞ and every open window is emitted.
    pub fn finish(&mut self, out: &mut Vec<StreamBatch>) -> Result<()> {
        self.watermark.finish();
        self.emit_at(i64::MAX, out)
    }

    fn emit(&mut self, now_ms: i64, out: &mut Vec<StreamBatch>) -> Result<()> {
        let watermark = self.watermark.advance(now_ms);
        self.emit_at(watermark, out)
    }

    fn emit_at(&mut self, watermark: i64, out: &mut Vec<StreamBatch>) -> Result<()> {
        let emitted = match &mut self.state {
            State::Panes(p) => p.emit(&self.aggregates, &self.output, watermark, self.lateness)?,
            State::Sessions(s) => {
                s.emit(&self.aggregates, &self.output, watermark, self.lateness)?
            }
        };
        out.extend(
            emitted
                .into_iter()
                .filter(|b| b.num_rows() > 0)
                .map(|batch| StreamBatch::new(self.name.clone(), batch)),
        );
        Ok(())
    }

    /// Writes the window state to `out` (an Arrow IPC stream), batch by batch, so no
    /// second copy of the state is built in memory. Emits nothing and changes no result.
    pub fn snapshot(&mut self, out: &mut dyn std::io::Write) -> Result<()> {
        let (schema, batches, panes) = match &mut self.state {
            State::Panes(p) => {
                let (schema, batches, meta) = p.snapshot(&self.aggregates)?;
                (schema, batches, Some(meta))
            }
            State::Sessions(s) => {
                let rows = s.snapshot(&self.aggregates)?;
                (rows.schema(), vec![rows], None)
            }
        };
        let meta = SnapshotMeta {
            watermark: self.watermark.state(),
            panes,
        };
        let json = serde_json::to_string(&meta).map_err(|e| window_error(&e.to_string()))?;
        let schema = Arc::new(
            schema
                .as_ref()
                .clone()
                .with_metadata([(SNAPSHOT_META.to_owned(), json)].into()),
        );
        let mut writer =
            arrow::ipc::writer::StreamWriter::try_new(out, &schema).map_err(arrow_error)?;
        for rows in batches {
            let rows = rows.with_schema(schema.clone()).map_err(arrow_error)?;
            writer.write(&rows).map_err(arrow_error)?;
        }
        writer.finish().map_err(arrow_error)
    }

    /// Replaces the state with a snapshot taken from a window of the same spec, read
    /// from `input` batch by batch. On an error the window may hold part of it: the
    /// caller starts it afresh.
    pub fn restore(&mut self, input: &mut dyn std::io::Read) -> Result<()> {
        let reader = arrow::ipc::reader::StreamReader::try_new(input, None).map_err(arrow_error)?;
        let meta: SnapshotMeta = reader
            .schema()
            .metadata()
            .get(SNAPSHOT_META)
            .ok_or_else(|| window_error("not a window snapshot"))
            .and_then(|j| serde_json::from_str(j).map_err(|e| window_error(&e.to_string())))?;
        match (&mut self.state, meta.panes) {
            (State::Panes(p), Some(m)) => p.reset(m),
            (State::Sessions(s), None) => s.clear(),
            _ => return Err(window_error("snapshot of another kind of window")),
        }
        for rows in reader {
            let rows = rows.map_err(arrow_error)?;
            match &mut self.state {
                State::Panes(p) => p.restore(&self.aggregates, &rows)?,
                State::Sessions(s) => s.restore(&self.aggregates, &rows, self.lateness)?,
            }
        }
        self.watermark.restore(meta.watermark);
        Ok(())
    }

    /// `rows` as `late` rows; `windows` (one per row) are the windows they missed.
    fn late(
        &self,
        rows: &RecordBatch,
        reason: &str,
        windows: Option<&[(i64, i64)]>,
    ) -> Result<StreamBatch> {
        let n = rows.num_rows();
        let lines = crate::json_lines(rows)?;
        let times = rows
            .column_by_name(&self.event_time_name)
            .cloned()
            .ok_or_else(|| window_error("late rows lack the event time"))?;
        let (starts, ends): (Vec<Option<i64>>, Vec<Option<i64>>) = match windows {
            Some(w) => w.iter().map(|&(s, e)| (Some(s), Some(e))).unzip(),
            None => (vec![None; n], vec![None; n]),
        };
        let ingest = rows
            .column_by_name("_ingest_time")
            .cloned()
            .unwrap_or_else(|| times.clone());
        let ts = |v: Vec<Option<i64>>| -> ArrayRef {
            Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![self.name.as_ref(); n])),
            Arc::new(StringArray::from(vec![reason; n])),
            ts(starts),
            ts(ends),
            arrow::compute::cast(&times, &aggregate::time_type()).map_err(arrow_error)?,
            Arc::new(StringArray::from(lines)),
            arrow::compute::cast(&ingest, &aggregate::time_type()).map_err(arrow_error)?,
        ];
        let batch = RecordBatch::try_new(late_schema(), columns).map_err(arrow_error)?;
        Ok(StreamBatch::new(Arc::from(LATE_TABLE), batch))
    }
}

/// Group columns, `window_start`, `window_end`, `version`, then the aggregates; event
/// time is `window_start`, the key the first group column.
fn output_schema(aggregates: &Aggregates, group_by: &[String]) -> SchemaRef {
    let projected = aggregates.projected();
    let groups = aggregates.declared_groups();
    let mut fields: Vec<Field> = projected[..groups].to_vec();
    fields.push(Field::new("window_start", aggregate::time_type(), false));
    fields.push(Field::new("window_end", aggregate::time_type(), false));
    fields.push(Field::new("version", DataType::UInt32, false));
    fields.extend(projected[groups..].iter().cloned());
    let mut metadata =
        std::collections::HashMap::from([(EVENT_TIME_META.to_owned(), "window_start".to_owned())]);
    if let Some(key) = group_by.first() {
        metadata.insert(KEY_META.to_owned(), key.clone());
    }
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// `window_start`, `window_end` and `version` columns.
fn window_columns(starts: Vec<i64>, ends: Vec<i64>, versions: Vec<u32>) -> [ArrayRef; 3] {
    [
        Arc::new(TimestampMillisecondArray::from(starts).with_timezone("UTC")),
        Arc::new(TimestampMillisecondArray::from(ends).with_timezone("UTC")),
        Arc::new(UInt32Array::from(versions)),
    ]
}

/// The `dead_letter` reason of rows refused over the window-state budget.
pub const STATE_BUDGET: &str = "state_budget";

fn window_error(message: &str) -> Error {
    Error::Window {
        message: message.to_owned(),
    }
}

fn arrow_error(e: arrow::error::ArrowError) -> Error {
    window_error(&e.to_string())
}

#[cfg(test)]
mod tests;
