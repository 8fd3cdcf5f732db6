//! `GET /api/tap/{name}` and `sluice tap`: watch the rows the lake writes to a stream,
//! a function's output, a window's table, `alerts`, `late` or `dead_letter`, live,
//! through an optional SQL filter and a sample rate, the way `vector tap` does.
//!
//! The rows come from the lake's [`Taps`](sluice_core::tap::Taps): nothing is kept or
//! encoded while nobody taps, and a reader that falls behind loses batches (reported
//! as a `dropped` event and counted) rather than holding the lake.

use std::convert::Infallible;
use std::sync::Arc;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_core::Shutdown;
use sluice_core::tap::{TapReader, Tapped};
use sluice_processors::function::RowFilter;

use super::row_array;

/// Rows per `rows` event: a large batch goes out as several events.
const ROWS_PER_EVENT: usize = 500;

/// `GET /api/tap/{name}`'s parameters, as described; read from the raw pairs
/// ([`crate::http::param`]), so a bad or repeated one gets a JSON error.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Only its description is used.
pub(crate) struct TapParams {
    /// A SQL predicate over the table's columns; only rows it holds for are sent.
    filter: Option<String>,
    /// The fraction of rows sent, in (0, 1]: `0.01` is one row in a hundred. Default 1.
    sample: Option<f64>,
}

/// Keeps a steady fraction of the rows it sees: row n is kept when `n * rate` crosses
/// an integer, so 0.25 keeps exactly every fourth row, whatever the batches' sizes.
#[derive(Debug)]
struct Sampler {
    rate: f64,
    seen: u64,
}

impl Sampler {
    fn mask(&mut self, rows: usize) -> Option<BooleanArray> {
        if self.rate >= 1.0 {
            return None;
        }
        let mask = (0..rows as u64)
            .map(|i| {
                let n = self.seen + i;
                Some(((n + 1) as f64 * self.rate).floor() > (n as f64 * self.rate).floor())
            })
            .collect();
        self.seen += rows as u64;
        Some(mask)
    }
}

/// One tap reader and what it applies to each batch.
struct Tapping {
    reader: TapReader,
    shutdown: Shutdown,
    filter: Option<(String, SchemaRef, RowFilter)>,
    sampler: Sampler,
    queued: std::collections::VecDeque<Event>,
}

impl Tapping {
    /// The rows of `batch` to send, or an error event's text.
    fn select(&mut self, batch: RecordBatch) -> Result<RecordBatch, String> {
        let batch = match &mut self.filter {
            Some((sql, schema, filter)) => {
                // A table's batches may differ in schema (a stream's evolves): the
                // filter is compiled again for a new one.
                let same = Arc::ptr_eq(&batch.schema(), schema) || batch.schema() == *schema;
                if !same {
                    *filter =
                        RowFilter::compile(sql, &batch.schema()).map_err(|e| e.to_string())?;
                    *schema = batch.schema();
                }
                filter.apply(&batch).map_err(|e| e.to_string())?
            }
            None => batch,
        };
        match self.sampler.mask(batch.num_rows()) {
            Some(mask) => {
                arrow::compute::filter_record_batch(&batch, &mask).map_err(|e| e.to_string())
            }
            None => Ok(batch),
        }
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Some(e);
            }
            let tapped = tokio::select! {
                () = self.shutdown.wait() => return None,
                tapped = self.reader.next() => tapped?,
            };
            match tapped {
                Tapped::Batch(batch) => match self.select(batch) {
                    Ok(rows) => {
                        let mut at = 0;
                        while at < rows.num_rows() {
                            let part = rows.slice(at, ROWS_PER_EVENT.min(rows.num_rows() - at));
                            at += part.num_rows();
                            let data = row_array(&part, ROWS_PER_EVENT);
                            self.queued
                                .push_back(Event::default().event("rows").data(data));
                        }
                    }
                    Err(e) => self
                        .queued
                        .extend(super::event("error", &json!({"error": e}))),
                },
                Tapped::Dropped(n) => self
                    .queued
                    .extend(super::event("dropped", &json!({"batches": n}))),
            }
        }
    }
}

/// Watches the rows written to a table (scope `tap`).
#[utoipa::path(get, path = "/api/tap/{name}", tag = "service",
    params(("name" = String, Path, description = "A stream, a function's output, a window, alerts, late or dead_letter", example = "telemetry"), TapParams),
    responses(
        (status = 200, description = "An event stream: `rows` (a JSON array of row objects, at most 500), `dropped` (batches this reader lost by falling behind), `error` (the filter failed on a batch)", content_type = "text/event-stream"),
        (status = 400, description = "A filter that does not compile over the table, or a sample rate outside (0, 1]", body = crate::http::ErrorBody),
        crate::http::AuthRefusals,
        (status = 404, description = "No such stream or table in this pipeline", body = crate::http::ErrorBody),
    ))]
pub(crate) async fn tap(
    State(state): State<crate::http::AppState>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let console = &state.console;
    let Some(schema) = console.tables.get(&name) else {
        let known: Vec<&str> = console.tables.keys().map(String::as_str).collect();
        return crate::http::error(
            StatusCode::NOT_FOUND,
            format!(
                "no stream or table {name:?} in this pipeline; it has: {}",
                known.join(", ")
            ),
        );
    };
    let (sample, filter) = match (
        crate::http::param(&params, "sample"),
        crate::http::param(&params, "filter"),
    ) {
        (Ok(sample), Ok(filter)) => (sample, filter.map(str::to_owned)),
        (Err(refused), _) | (_, Err(refused)) => return *refused,
    };
    let rate = match sample.map(str::parse::<f64>) {
        None => 1.0,
        Some(Ok(rate)) if rate > 0.0 && rate <= 1.0 => rate,
        Some(_) => {
            return crate::http::error(
                StatusCode::BAD_REQUEST,
                format!(
                    "sample {:?} is not a fraction in (0, 1], such as 0.01",
                    sample.unwrap_or_default()
                ),
            );
        }
    };
    let filter = match filter {
        Some(sql) => match RowFilter::compile(&sql, schema) {
            Ok(filter) => Some((sql, schema.clone(), filter)),
            Err(e) => {
                return crate::http::error(StatusCode::BAD_REQUEST, format!("filter: {e}"));
            }
        },
        None => None,
    };
    let tapping = Tapping {
        reader: console.taps.subscribe(&name),
        shutdown: state.shutdown.clone(),
        filter,
        sampler: Sampler { rate, seen: 0 },
        queued: Default::default(),
    };
    let stream = futures::stream::unfold(tapping, |mut t| async move {
        let e = t.next().await?;
        Some((Ok::<_, Infallible>(e), t))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The tables a tap can watch, with their schemas: the pipeline's streams and derived
/// tables, and the service's own.
pub(crate) fn tables(
    pipeline: &std::collections::HashMap<String, SchemaRef>,
) -> std::collections::BTreeMap<String, SchemaRef> {
    use sluice_core::schema::*;
    let mut tables: std::collections::BTreeMap<String, SchemaRef> = pipeline
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tables.insert(DEAD_LETTER_TABLE.to_owned(), dead_letter_schema());
    tables.insert(LATE_TABLE.to_owned(), late_schema());
    tables.insert(ALERTS_TABLE.to_owned(), alerts_schema());
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_keeps_a_steady_fraction_across_batches() {
        let mut s = Sampler {
            rate: 0.25,
            seen: 0,
        };
        let mut kept = Vec::new();
        for rows in [3, 1, 7, 5] {
            let mask = s.mask(rows).unwrap();
            kept.extend(mask.iter().map(|m| m.unwrap()));
        }
        let positions: Vec<usize> = kept
            .iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(positions, [3, 7, 11, 15]);
        assert!(Sampler { rate: 1.0, seen: 0 }.mask(10).is_none());
    }
}
