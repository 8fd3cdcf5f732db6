//! The console: the page at `/` (files in `runtime/console/`, embedded in the binary)
//! and what it reads: `GET /api/overview` (the last hour of one-second points, for
//! charts that are full on load) and `GET /api/events` (Server-Sent Events: `metrics`
//! once a second, `alert` and `dead_letter` rows as the lake writes them). See
//! ARCHITECTURE.md, "The console".

mod assets;
mod overview;
mod sample;
pub(crate) mod tap;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use sluice_config::Config;
use sluice_core::schema::{ALERTS_TABLE, DEAD_LETTER_TABLE};
use sluice_core::tap::{Tapped, Taps};
use sluice_core::{Clock, Shutdown, SystemClock};
use tokio::sync::watch;

pub(crate) use assets::{asset, serve as serve_file};
use overview::{Overview, RING_POINTS, Series};
pub(crate) use sample::{Sampler, install};

/// How often the console samples the metrics.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Dead letters sent per written batch (the latest samples; the rest are counted).
const DEAD_LETTER_SAMPLES: usize = 5;
/// Alert rows sent per written batch.
const ALERT_ROWS: usize = 100;
/// A dead letter's payload is cut to this many bytes for the page.
const PAYLOAD_SHOWN: usize = 200;
/// Batches whose events [`Encoded`] keeps: more than the consoles are apart.
const ENCODED_KEPT: usize = 64;

/// The events of each alert and dead-letter batch, encoded once for every open
/// console. Each console encoding every alert for itself cost the service a tenth of
/// its CPU with ten consoles open and 200 alert rows a second
/// (`scripts/bench-console.sh` with `EXCURSIONS=0.002`).
#[derive(Debug, Default)]
struct Encoded(Mutex<std::collections::VecDeque<EncodedBatch>>);

/// A batch's table, its number there, and its events.
type EncodedBatch = (&'static str, u64, Arc<[Event]>);

impl Encoded {
    /// The events of batch `number` of `table` ([`TapReader::last_number`]), encoded
    /// by `encode` if no console did yet. The first console encodes while the others
    /// wait for it on the lock.
    ///
    /// [`TapReader::last_number`]: sluice_core::tap::TapReader::last_number
    fn events(
        &self,
        table: &'static str,
        number: u64,
        encode: impl FnOnce() -> Vec<Event>,
    ) -> Arc<[Event]> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, events)) = kept.iter().find(|(t, n, _)| *t == table && *n == number) {
            return events.clone();
        }
        let events: Arc<[Event]> = encode().into();
        if kept.len() >= ENCODED_KEPT {
            kept.pop_front();
        }
        kept.push_back((table, number, events.clone()));
        events
    }
}

/// The pipeline as configured, for the page's pipeline view.
#[derive(Debug, Serialize)]
struct Shape {
    sources: Vec<serde_json::Value>,
    streams: Vec<String>,
    functions: Vec<serde_json::Value>,
    windows: Vec<serde_json::Value>,
    alerts: Vec<serde_json::Value>,
}

impl Shape {
    fn of(config: &Config) -> Self {
        Shape {
            sources: config
                .sources
                .iter()
                .map(|(name, s)| json!({"name": name, "stream": s.stream()}))
                .collect(),
            streams: config.streams.keys().cloned().collect(),
            functions: config
                .functions
                .iter()
                .map(|(name, f)| json!({"name": name, "input": f.input, "output": f.output}))
                .collect(),
            windows: config
                .windows
                .iter()
                .map(|(name, w)| json!({"name": name, "input": w.input, "kind": w.kind}))
                .collect(),
            alerts: config
                .alerts
                .iter()
                .map(|(name, a)| {
                    json!({"name": name, "input": a.input, "condition": a.condition, "clear": a.clear, "notify": a.notify})
                })
                .collect(),
        }
    }
}

/// What the console's handlers share.
#[derive(Debug)]
pub(crate) struct Console {
    overview: Mutex<Overview>,
    /// The newest point as JSON, encoded once for every open console.
    points: watch::Sender<Option<Arc<str>>>,
    encoded: Arc<Encoded>,
    taps: Arc<Taps>,
    /// What a tap can watch: every table the lake writes, with its schema.
    tables: std::collections::BTreeMap<String, arrow::datatypes::SchemaRef>,
    shape: Shape,
    started_ms: i64,
}

impl Console {
    /// Starts sampling `sampler` once a second until `shutdown`.
    pub(crate) fn start(
        config: &Config,
        sampler: Sampler,
        (taps, tables): (
            Arc<Taps>,
            &std::collections::HashMap<String, arrow::datatypes::SchemaRef>,
        ),
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let console = Arc::new(Console {
            overview: Mutex::new(Overview::new(config.limits.queue_bytes.as_usize())),
            points: watch::Sender::new(None),
            encoded: Arc::default(),
            taps,
            tables: tap::tables(tables),
            shape: Shape::of(config),
            started_ms: SystemClock.now_ms(),
        });
        let sampling = console.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.wait() => return,
                }
                let reading = sampler.read();
                let troubles = sluice_core::status::errors();
                let point = {
                    let mut overview = sampling.overview.lock().unwrap_or_else(|e| e.into_inner());
                    overview
                        .push(SystemClock.now_ms(), reading, &troubles)
                        .and_then(|p| serde_json::to_string(p).ok())
                };
                if let Some(point) = point {
                    sampling.points.send_replace(Some(point.into()));
                }
            }
        });
        console
    }
}

/// `GET /api/overview`'s parameters, as described; read from the raw pairs
/// ([`crate::http::param`]), so a bad or repeated one gets a JSON error.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Only its description is used.
pub(crate) struct Range {
    /// How far back the series go: `5m`, `15m` (the default) or `1h`.
    range: Option<String>,
}

fn range_seconds(range: Option<&str>) -> Result<usize, String> {
    match range {
        None => Ok(15 * 60),
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() && d.as_secs() as usize <= RING_POINTS => {
                Ok(d.as_secs().max(1) as usize)
            }
            _ => Err(format!(
                "range {text:?} is not a duration from 1s to 1h, such as 5m, 15m or 1h"
            )),
        },
    }
}

/// The charts' series for a range, the newest point, and the pipeline's shape (scope
/// `admin`).
#[utoipa::path(get, path = "/api/overview", tag = "service", params(Range),
    responses(
        (status = 200, description = "Series of one-second points, the newest point in full, the pipeline's shape", content_type = "application/json"),
        (status = 400, description = "A range that is not a duration up to 1h", body = crate::http::ErrorBody),
        crate::http::AuthRefusals,
    ))]
pub(crate) async fn overview(
    State(state): State<crate::http::AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let range = match crate::http::param(&params, "range") {
        Ok(range) => range,
        Err(refused) => return *refused,
    };
    let seconds = match range_seconds(range) {
        Ok(s) => s,
        Err(e) => return crate::http::error(axum::http::StatusCode::BAD_REQUEST, e),
    };
    let console = &state.console;
    let (series, latest) = {
        let overview = console.overview.lock().unwrap_or_else(|e| e.into_inner());
        (
            Series::of(overview.since(seconds)),
            overview.latest().cloned(),
        )
    };
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_ms": console.started_ms,
        "now_ms": SystemClock.now_ms(),
        "range_s": seconds,
        "series": series,
        "latest": latest,
        "shape": console.shape,
    }))
    .into_response()
}

/// The rows of a written batch as JSON object texts, at most `max`; a dead letter's
/// payload as text cut to [`PAYLOAD_SHOWN`] bytes. Texts, not `serde_json::Value`s:
/// parsing Arrow's JSON into values only to print them again was half of what five
/// filtered taps of `telemetry` cost (`scripts/bench-console.sh`, perf).
fn row_objects(batch: &RecordBatch, max: usize) -> Vec<String> {
    let Some(text) = json_text::<arrow::json::writer::LineDelimited>(batch, max) else {
        return Vec::new();
    };
    // One object per line; a newline inside a value is escaped.
    text.lines().map(str::to_owned).collect()
}

/// The rows of a written batch as one JSON array's text, at most `max`, shown as
/// [`row_objects`] shows them; `[]` if they cannot be written.
fn row_array(batch: &RecordBatch, max: usize) -> String {
    json_text::<arrow::json::writer::JsonArray>(batch, max).unwrap_or_else(|| "[]".into())
}

/// The first `max` rows of `batch` in Arrow's JSON format `F`, a binary `payload` as
/// text cut to [`PAYLOAD_SHOWN`] bytes.
fn json_text<F: arrow::json::writer::JsonFormat>(
    batch: &RecordBatch,
    max: usize,
) -> Option<String> {
    let batch = batch.slice(0, batch.num_rows().min(max));
    let batch = match batch.schema().index_of("payload") {
        Ok(i) if batch.column(i).data_type() == &DataType::Binary => {
            let shown: StringArray = batch
                .column(i)
                .as_binary::<i32>()
                .iter()
                .map(|p| {
                    p.map(|p| {
                        String::from_utf8_lossy(&p[..p.len().min(PAYLOAD_SHOWN)]).into_owned()
                    })
                })
                .collect();
            let mut fields: Vec<Field> = batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields[i] = Field::new("payload", DataType::Utf8, true);
            let mut columns = batch.columns().to_vec();
            columns[i] = Arc::new(shown);
            RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).ok()?
        }
        _ => batch,
    };
    let mut writer = arrow::json::Writer::<_, F>::new(Vec::new());
    writer.write(&batch).and_then(|()| writer.finish()).ok()?;
    // Arrow writes UTF-8 (a payload's bytes were made text above).
    String::from_utf8(writer.into_inner()).ok()
}

/// What one SSE stream waits on.
struct Watching {
    points: watch::Receiver<Option<Arc<str>>>,
    encoded: Arc<Encoded>,
    alerts: sluice_core::tap::TapReader,
    dead_letters: sluice_core::tap::TapReader,
    shutdown: Shutdown,
    queued: std::collections::VecDeque<Event>,
}

fn event(name: &str, data: &impl Serialize) -> Option<Event> {
    Event::default().event(name).json_data(data).ok()
}

impl Watching {
    /// The next event, or `None` at shutdown.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Some(e);
            }
            tokio::select! {
                () = self.shutdown.wait() => return None,
                changed = self.points.changed() => {
                    changed.ok()?;
                    let point = self.points.borrow_and_update().clone();
                    self.queued.extend(point.map(|p| Event::default().event("metrics").data(&*p)));
                }
                tapped = self.alerts.next() => match tapped? {
                    Tapped::Batch(b) => {
                        let events = self.encoded.events(ALERTS_TABLE, self.alerts.last_number(), || {
                            row_objects(&b, ALERT_ROWS).into_iter().map(|r| Event::default().event("alert").data(r)).collect()
                        });
                        self.queued.extend(events.iter().cloned());
                    }
                    Tapped::Dropped(n) => self.queued.extend(event("dropped", &json!({"table": "alerts", "batches": n}))),
                },
                tapped = self.dead_letters.next() => match tapped? {
                    Tapped::Batch(b) => {
                        let events = self.encoded.events(DEAD_LETTER_TABLE, self.dead_letters.last_number(), || {
                            let latest = b.slice(b.num_rows().saturating_sub(DEAD_LETTER_SAMPLES), b.num_rows().min(DEAD_LETTER_SAMPLES));
                            row_objects(&latest, DEAD_LETTER_SAMPLES).into_iter().map(|r| Event::default().event("dead_letter").data(r)).collect()
                        });
                        self.queued.extend(events.iter().cloned());
                    }
                    Tapped::Dropped(n) => self.queued.extend(event("dropped", &json!({"table": "dead_letter", "batches": n}))),
                },
            }
        }
    }
}

/// Server-Sent Events for one open console (scope `admin`): `metrics` once a second
/// (the newest point), `alert` per alert row written, `dead_letter` for the latest
/// dead letters of each written batch. The stream ends at shutdown.
#[utoipa::path(get, path = "/api/events", tag = "service",
    responses(
        (status = 200, description = "An event stream: `metrics`, `alert`, `dead_letter` (and `dropped` when this reader fell behind)", content_type = "text/event-stream"),
        crate::http::AuthRefusals,
    ))]
pub(crate) async fn events(State(state): State<crate::http::AppState>) -> impl IntoResponse {
    let console = &state.console;
    let mut points = console.points.subscribe();
    // The newest point goes out at once, not a second later.
    points.mark_changed();
    let watching = Watching {
        points,
        alerts: console.taps.subscribe(ALERTS_TABLE),
        dead_letters: console.taps.subscribe(DEAD_LETTER_TABLE),
        encoded: console.encoded.clone(),
        shutdown: state.shutdown.clone(),
        queued: Default::default(),
    };
    let stream = futures::stream::unfold(watching, |mut w| async move {
        let e = w.next().await?;
        Some((Ok::<_, Infallible>(e), w))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, UInt64Array};

    /// Metric names in `text`: string literals (Rust) or bare words (PromQL).
    fn metric_names(text: &str, quoted: bool) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let needle = if quoted { "\"sluice_" } else { "sluice_" };
        let mut rest = text;
        while let Some(at) = rest.find(needle) {
            let start = at + needle.len() - "sluice_".len();
            let name: String = rest[start..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[start + name.len()..];
            let closed = !quoted || rest.starts_with('"');
            if closed && !name.ends_with('_') {
                names.insert(name);
            }
        }
        names
    }

    #[test]
    fn every_metric_is_documented() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let docs = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
        let mut used = std::collections::BTreeSet::new();
        let mut dirs: Vec<_> = [
            "core",
            "config",
            "ingest",
            "processors",
            "sinks",
            "runtime",
            "src",
        ]
        .iter()
        .map(|d| root.join(d))
        .collect();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    used.extend(metric_names(&std::fs::read_to_string(&path).unwrap(), true));
                }
            }
        }
        assert!(used.len() > 60, "found only {used:?}");
        let grafana = std::fs::read_to_string(root.join("docs/grafana/sluice.json")).unwrap();
        let charted = metric_names(&grafana, false);
        assert!(charted.len() > 15, "{charted:?}");
        let documented = |name: &String| {
            // A row may name several metrics: `a`, `b` or a shared stem.
            docs.contains(&format!("`{name}`"))
        };
        let missing: Vec<_> = used
            .iter()
            .chain(&charted)
            .filter(|n| !documented(n))
            .collect();
        assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
        serde_json::from_str::<serde_json::Value>(&grafana).expect("the dashboard is JSON");
    }

    #[test]
    fn each_batch_is_encoded_once_for_every_console() {
        let encoded = Encoded::default();
        let mut encodings = 0;
        let mut events = |table, number| {
            encoded
                .events(table, number, || {
                    encodings += 1;
                    vec![Event::default().data(format!("{table} {number}"))]
                })
                .len()
        };
        assert_eq!(events("alerts", 0), 1);
        assert_eq!(events("alerts", 0), 1);
        assert_eq!(events("dead_letter", 0), 1);
        assert_eq!(events("alerts", 1), 1);
        assert_eq!(encodings, 3, "the second console's alerts 0 was a copy");
        // The oldest batches are forgotten past ENCODED_KEPT.
        for n in 2..(ENCODED_KEPT as u64 + 3) {
            encoded.events("alerts", n, Vec::new);
        }
        let mut again = false;
        encoded.events("alerts", 0, || {
            again = true;
            Vec::new()
        });
        assert!(again);
    }

    #[test]
    fn ranges_are_durations_up_to_an_hour() {
        assert_eq!(range_seconds(None), Ok(900));
        assert_eq!(range_seconds(Some("5m")), Ok(300));
        assert_eq!(range_seconds(Some("1h")), Ok(3_600));
        for bad in ["0s", "2h", "soon", ""] {
            let e = range_seconds(Some(bad)).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn dead_letter_payloads_are_cut_to_readable_text() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("payload", DataType::Binary, false),
            Field::new("payload_size", DataType::UInt64, false),
        ]));
        let long = vec![b'x'; 1_000];
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(BinaryArray::from(vec![&b"{oops \xff"[..], &long[..]])),
                Arc::new(UInt64Array::from(vec![8, 1_000])),
            ],
        )
        .unwrap();
        let rows: Vec<serde_json::Value> = row_objects(&batch, 10)
            .iter()
            .map(|r| serde_json::from_str(r).unwrap())
            .collect();
        assert_eq!(rows[0]["payload"], "{oops \u{fffd}");
        assert_eq!(rows[1]["payload"].as_str().unwrap().len(), PAYLOAD_SHOWN);
        assert_eq!(rows[1]["payload_size"], 1_000);
        assert_eq!(row_objects(&batch, 1).len(), 1);
        // A tap's array shows the same rows.
        let array: Vec<serde_json::Value> = serde_json::from_str(&row_array(&batch, 10)).unwrap();
        assert_eq!(array, rows);
        let one: Vec<serde_json::Value> = serde_json::from_str(&row_array(&batch, 1)).unwrap();
        assert_eq!(one, rows[..1]);
    }
}
