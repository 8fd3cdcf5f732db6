//! Golden tests per window kind, snapshot round trips, and a property test against a
//! batch computation in DataFusion SQL.
//!
//! Golden files live in `processors/golden/`; `SLUICE_UPDATE_GOLDEN=1 cargo test -p
//! sluice-processors` rewrites them.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType, UInt32Type};
use arrow::util::pretty::pretty_format_batches;
use proptest::prelude::*;
use sluice_core::StreamSchema;

use super::*;
use crate::test_support::telemetry_at;

const S: i64 = 1_000;
/// 2026-01-01T00:00:00Z, a minute boundary.
const T0: i64 = 1_767_225_600_000;

fn spec(kind: WindowKind, lateness_s: i64, select: &[&str]) -> WindowSpec {
    WindowSpec {
        name: "w".into(),
        key: "windows.w".into(),
        kind,
        group_by: vec!["device_id".into()],
        filter: Some("status <> 'error'".into()),
        select: select.iter().map(|s| s.to_string()).collect(),
        allowed_lateness_ms: lateness_s * S,
    }
}

fn window(kind: WindowKind, lateness_s: i64, select: &[&str]) -> Window {
    let input = StreamSchema::builtin("telemetry").unwrap().arrow().clone();
    Window::compile(
        &spec(kind, lateness_s, select),
        &input,
        WatermarkSpec {
            max_out_of_orderness_ms: 5 * S,
            idle_timeout_ms: None,
            by_partition: false,
            row_sources: false,
        },
    )
    .unwrap()
}

const AGGREGATES: &[&str] = &[
    "count(*) AS events",
    "min(temperature) AS t_min",
    "max(temperature) AS t_max",
    "avg(temperature) AS t_avg",
    "first_value(temperature ORDER BY ts) AS t_first",
    "last_value(temperature ORDER BY ts) AS t_last",
    "stddev(temperature) AS t_stddev",
    "approx_percentile_cont(temperature, 0.5) AS t_p50",
    "approx_distinct(status) AS statuses",
];

/// Feeds each step (one batch, seconds after T0) and records what came out.
fn run(w: &mut Window, steps: &[&[(&str, i64, f64)]]) -> String {
    let mut log = String::new();
    let mut record = |label: String, out: &mut Vec<StreamBatch>| {
        for b in out.drain(..) {
            let mut batch = b.batch;
            if &*b.stream == LATE_TABLE {
                // The ingest time is the test's wall clock; drop it from the golden text.
                batch = batch.project(&[0, 1, 2, 3, 4, 5]).unwrap();
            }
            log.push_str(&format!(
                "{label} -> {}\n{}\n",
                b.stream,
                pretty_format_batches(&[batch]).unwrap()
            ));
        }
    };
    let mut out = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let rows: Vec<_> = step
            .iter()
            .map(|&(d, t, v)| (d, T0 + t * S, Some(v), "ok"))
            .collect();
        w.process(&telemetry_at(&rows, "src"), 0, &mut out).unwrap();
        record(
            format!(
                "step {i} {:?}",
                step.iter().map(|r| r.1).collect::<Vec<_>>()
            ),
            &mut out,
        );
    }
    w.finish(&mut out).unwrap();
    record("end of input".into(), &mut out);
    log
}

fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("SLUICE_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing; run with SLUICE_UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{name} differs from {}; rerun with SLUICE_UPDATE_GOLDEN=1 if intended",
        path.display()
    );
}

#[test]
fn tumbling_with_lateness_golden() {
    let mut w = window(WindowKind::Tumbling { size_ms: 60 * S }, 30, AGGREGATES);
    let log = run(
        &mut w,
        &[
            &[("a", 0, 1.0), ("b", 10, 2.0), ("a", 59, 3.0)],
            &[("a", 61, 4.0), ("a", 66, 5.0)], // watermark 61: [0, 60) fires, version 1
            &[("a", 30, 6.0)],                 // late but within 30 s: version 2
            &[("b", 100, 7.0)],                // watermark 95 ≥ 60 + 30: [0, 60) is final
            &[("a", 20, 8.0)],                 // too late: to `late`
        ],
    );
    golden("tumbling_lateness", &log);
}

#[test]
fn hopping_golden() {
    let mut w = window(
        WindowKind::Hopping {
            size_ms: 30 * S,
            slide_ms: 10 * S,
        },
        0,
        &["count(*) AS events", "sum(temperature) AS t_sum"],
    );
    let log = run(
        &mut w,
        &[
            &[("a", 1, 1.0), ("a", 12, 2.0), ("b", 15, 3.0)],
            &[("a", 25, 4.0), ("a", 41, 5.0)], // watermark 36: windows starting -20..0 fire
            &[("a", 33, 6.0)], // on time (watermark 36 < its pane's last window end)
            &[("a", 70, 7.0)],
        ],
    );
    golden("hopping", &log);
}

#[test]
fn session_merge_golden() {
    let mut w = window(
        WindowKind::Session { gap_ms: 10 * S },
        120,
        &[
            "count(*) AS events",
            "max(temperature) AS t_max",
            "(CAST(max(ts) AS BIGINT) - CAST(min(ts) AS BIGINT)) / 1000.0 AS duration_s",
        ],
    );
    let log = run(
        &mut w,
        &[
            &[("a", 0, 1.0), ("a", 5, 2.0), ("a", 22, 3.0)], // two sessions: [0, 15), [22, 32)
            &[("b", 100, 4.0)],                              // watermark 95: both fire
            &[("a", 13, 5.0)],                               // bridges them: one session, version 2
            &[("b", 400, 6.0)],                              // all final
            &[("a", 50, 7.0)],                               // too late: to `late`
        ],
    );
    golden("session_merge", &log);
}

#[test]
fn bad_windows_name_their_keys() {
    let input = StreamSchema::builtin("telemetry").unwrap().arrow().clone();
    let mut s = spec(
        WindowKind::Hopping {
            size_ms: 60 * S,
            slide_ms: 7 * S,
        },
        0,
        &[
            "count(*) AS n",
            "sum(nope) AS x",
            "first_value(temperature) AS f",
        ],
    );
    s.group_by.push("missing".into());
    let compile_errors = |s: &WindowSpec| -> Vec<String> {
        let watermark = WatermarkSpec {
            max_out_of_orderness_ms: 0,
            idle_timeout_ms: None,
            by_partition: false,
            row_sources: false,
        };
        let errors = Window::compile(s, &input, watermark).unwrap_err();
        errors.iter().map(ToString::to_string).collect()
    };
    let errors = compile_errors(&s);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("windows.w.slide: size (60000 ms) must be a multiple")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("windows.w.group_by[1]: stream has no column \"missing\"")),
        "{errors:?}"
    );

    let errors = compile_errors(&spec(
        WindowKind::Tumbling { size_ms: 60 * S },
        0,
        &["count(*) AS n", "sum(nope) AS x", "temperature AS t"],
    ));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("windows.w.select[1]: \"sum(nope) AS x\""),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("windows.w.select[2]: \"temperature AS t\""),
        "{errors:?}"
    );

    let errors = compile_errors(&spec(
        WindowKind::Tumbling { size_ms: 60 * S },
        0,
        &["first_value(temperature) AS f"],
    ));
    assert!(
        errors[0].contains("first_value(x ORDER BY ts)"),
        "{errors:?}"
    );
}

fn build(spec: &WindowSpec) -> Window {
    let input = StreamSchema::builtin("telemetry").unwrap().arrow().clone();
    let watermark = WatermarkSpec {
        max_out_of_orderness_ms: 5 * S,
        idle_timeout_ms: None,
        by_partition: false,
        row_sources: false,
    };
    Window::compile(spec, &input, watermark).unwrap()
}

/// Feeds events (device, seconds, value) in arrival order, cut into batches of the
/// `cuts` sizes in turn; after batch `snapshot_at` the window is replaced by one
/// restored from its snapshot. Returns every output batch (window and late rows).
fn feed(
    spec: &WindowSpec,
    events: &[(String, i64, f64)],
    cuts: &[usize],
    snapshot_at: Option<usize>,
) -> Vec<StreamBatch> {
    let mut w = build(spec);
    let mut out = Vec::new();
    let mut at = 0;
    let mut cut = cuts.iter().cycle();
    let mut batches = 0;
    while at < events.len() {
        let n = (*cut.next().unwrap()).max(1).min(events.len() - at);
        let rows: Vec<_> = events[at..at + n]
            .iter()
            .map(|(d, t, v)| (d.as_str(), T0 + t * S, Some(*v), "ok"))
            .collect();
        w.process(&telemetry_at(&rows, "src"), 0, &mut out).unwrap();
        at += n;
        batches += 1;
        if snapshot_at == Some(batches) {
            let mut bytes = Vec::new();
            w.snapshot(&mut bytes).unwrap();
            w = build(spec);
            w.restore(&mut bytes.as_slice()).unwrap();
        }
    }
    w.finish(&mut out).unwrap();
    out
}

const PROPERTY_AGGREGATES: &[&str] = &[
    "count(*) AS events",
    "sum(temperature) AS t_sum",
    "min(temperature) AS t_min",
    "max(temperature) AS t_max",
    // A function without a vectorized accumulator: DataFusion's row accumulator behind
    // the adapter, fed through `aggregate::Buffered` (with a filter: its masks too).
    "count(DISTINCT temperature) FILTER (WHERE temperature > 0) AS t_distinct",
];

/// The last version of every window: (device, start) → (end, count, sum, min, max,
/// distinct values above 0).
type Results = BTreeMap<(String, i64), (i64, i64, f64, f64, f64, i64)>;

///
/// A session merged after it was emitted is written again, with its new start and a
/// higher version; the rows of the sessions it absorbed (within it, lower version)
/// are dropped here, as a reader of the table does.
fn latest(batches: &[RecordBatch]) -> Results {
    let mut versions: BTreeMap<(String, i64), u32> = BTreeMap::new();
    let mut out = Results::new();
    for b in batches {
        let device = b.column(0).as_string::<i32>();
        let start = b.column(1).as_primitive::<TimestampMillisecondType>();
        let end = b.column(2).as_primitive::<TimestampMillisecondType>();
        let version = b.column(3).as_primitive::<UInt32Type>();
        let count = b.column(4).as_primitive::<Int64Type>();
        let f = |c: usize| b.column(c).as_primitive::<Float64Type>().clone();
        let (sum, min, max) = (f(5), f(6), f(7));
        let distinct = b.column(8).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let key = (device.value(i).to_owned(), start.value(i));
            if versions.get(&key).is_none_or(|&v| v < version.value(i)) {
                versions.insert(key.clone(), version.value(i));
                out.insert(
                    key,
                    (
                        end.value(i),
                        count.value(i),
                        sum.value(i),
                        min.value(i),
                        max.value(i),
                        distinct.value(i),
                    ),
                );
            }
        }
    }
    let superseded: Vec<(String, i64)> = out
        .iter()
        .filter(|((d, s), (e, ..))| {
            out.iter().any(|((d2, s2), (e2, ..))| {
                d2 == d
                    && (s2, e2) != (s, e)
                    && s2 <= s
                    && e2 >= e
                    && versions[&(d2.clone(), *s2)] > versions[&(d.clone(), *s)]
            })
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in superseded {
        out.remove(&k);
    }
    out
}

/// The same aggregates over all events at once, by DataFusion SQL over a MemTable.
fn batch_results(kind: WindowKind, events: &[(String, i64, f64)]) -> Results {
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;
    let rows: Vec<_> = events
        .iter()
        .map(|(d, t, v)| (d.as_str(), T0 + t * S, Some(*v), "ok"))
        .collect();
    let batch = telemetry_at(&rows, "src");
    let ctx = SessionContext::new();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let aggs = "count(*), sum(temperature), min(temperature), max(temperature), \
                count(DISTINCT temperature) FILTER (WHERE temperature > 0)";
    // Times as integer milliseconds, so the SQL does not depend on interval arithmetic.
    let sql = match kind {
        WindowKind::Tumbling { size_ms } => format!(
            "SELECT device_id, CAST(ts AS BIGINT) / {size_ms} * {size_ms} AS s,
                    CAST(ts AS BIGINT) / {size_ms} * {size_ms} + {size_ms}, {aggs}
             FROM t GROUP BY 1, 2, 3"
        ),
        WindowKind::Hopping { size_ms, slide_ms } => format!(
            "SELECT device_id, s, s + {size_ms}, {aggs} FROM (
                SELECT *, CAST(ts AS BIGINT) / {slide_ms} * {slide_ms} - k * {slide_ms} AS s
                FROM t CROSS JOIN (SELECT unnest(range(0, {})) AS k)
             ) GROUP BY 1, 2, 3",
            size_ms / slide_ms
        ),
        WindowKind::Session { gap_ms } => format!(
            "WITH o AS (
                SELECT *, CASE WHEN CAST(ts AS BIGINT) - lag(CAST(ts AS BIGINT)) OVER (PARTITION BY device_id ORDER BY ts) < {gap_ms}
                               THEN 0 ELSE 1 END AS new_session FROM t),
             n AS (SELECT *, sum(new_session) OVER (PARTITION BY device_id ORDER BY ts ROWS UNBOUNDED PRECEDING) AS sid FROM o)
             SELECT device_id, min(CAST(ts AS BIGINT)), max(CAST(ts AS BIGINT)) + {gap_ms}, {aggs}
             FROM n GROUP BY device_id, sid"
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let batches = runtime.block_on(async { ctx.sql(&sql).await.unwrap().collect().await.unwrap() });
    let mut out = Results::new();
    for b in &batches {
        let b = b.clone();
        for i in 0..b.num_rows() {
            let ts = |c: usize| b.column(c).as_primitive::<Int64Type>().value(i);
            let f = |c: usize| b.column(c).as_primitive::<Float64Type>().value(i);
            out.insert(
                (b.column(0).as_string::<i32>().value(i).to_owned(), ts(1)),
                (
                    ts(2),
                    b.column(3).as_primitive::<Int64Type>().value(i),
                    f(4),
                    f(5),
                    f(6),
                    b.column(7).as_primitive::<Int64Type>().value(i),
                ),
            );
        }
    }
    out
}

/// Events in time order, then shuffled so each arrives at most `max_delay_s` after
/// any later event.
fn events_strategy(max_delay_s: i64) -> impl Strategy<Value = Vec<(String, i64, f64)>> {
    let events = (0u8..4, 0i64..600, -50i64..50, 0i64..=max_delay_s);
    prop::collection::vec(events, 1..300).prop_map(|raw| {
        let mut arrival: Vec<_> = raw
            .into_iter()
            .map(|(d, t, v, delay)| (t + delay, (format!("d{d}"), t, v as f64)))
            .collect();
        arrival.sort_by_key(|(at, _)| *at);
        arrival.into_iter().map(|(_, e)| e).collect()
    })
}

fn kinds() -> impl Strategy<Value = WindowKind> {
    prop_oneof![
        Just(WindowKind::Tumbling { size_ms: 60 * S }),
        Just(WindowKind::Hopping {
            size_ms: 60 * S,
            slide_ms: 20 * S
        }),
        Just(WindowKind::Session { gap_ms: 30 * S }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Disorder within the out-of-orderness (5 s): every window is emitted once, right.
    #[test]
    fn streaming_equals_batch(
        kind in kinds(),
        events in events_strategy(5),
        cuts in prop::collection::vec(1usize..40, 1..8),
        snapshot_at in prop::option::of(1usize..10),
    ) {
        streaming_equals_batch_with(kind, 0, &events, &cuts, snapshot_at)?;
    }

    /// Disorder up to out-of-orderness + allowed lateness (5 s + 20 s): windows are
    /// emitted early and again with higher versions; the latest versions are right.
    #[test]
    fn late_firings_converge_to_batch(
        kind in kinds(),
        events in events_strategy(25),
        cuts in prop::collection::vec(1usize..40, 1..8),
        snapshot_at in prop::option::of(1usize..10),
    ) {
        streaming_equals_batch_with(kind, 20, &events, &cuts, snapshot_at)?;
    }
}

fn streaming_equals_batch_with(
    kind: WindowKind,
    lateness_s: i64,
    events: &[(String, i64, f64)],
    cuts: &[usize],
    snapshot_at: Option<usize>,
) -> Result<(), TestCaseError> {
    {
        let s = WindowSpec {
            filter: None,
            ..spec(kind, lateness_s, PROPERTY_AGGREGATES)
        };
        let out = feed(&s, events, cuts, snapshot_at);
        let late: Vec<_> = out.iter().filter(|b| &*b.stream == LATE_TABLE).collect();
        prop_assert!(late.is_empty(), "no row may be late: {:?}", late);
        let batches: Vec<_> = out.into_iter().map(|b| b.batch).collect();
        let streamed = latest(&batches);
        prop_assert_eq!(streamed, batch_results(kind, events));
    }
    Ok(())
}

/// One window of each kind: a minute, a minute sliding by 20 s, a 30 s gap.
fn every_kind() -> [WindowKind; 3] {
    [
        WindowKind::Tumbling { size_ms: 60 * S },
        WindowKind::Hopping {
            size_ms: 60 * S,
            slide_ms: 20 * S,
        },
        WindowKind::Session { gap_ms: 30 * S },
    ]
}

#[test]
fn snapshot_restore_gives_identical_results() {
    for kind in every_kind() {
        let s = spec(kind, 30, AGGREGATES);
        let events: Vec<(String, i64, f64)> = (0..400)
            .map(|i| {
                (
                    format!("d{}", i % 7),
                    (i * 37) % 900 + i / 3,
                    (i % 13) as f64,
                )
            })
            .collect();
        let cuts = [17, 5, 31];
        let shown = |out: Vec<StreamBatch>| {
            out.into_iter()
                .map(|b| {
                    let batch = if &*b.stream == LATE_TABLE {
                        b.batch.project(&[0, 1, 2, 3, 4, 5]).unwrap()
                    } else {
                        b.batch
                    };
                    pretty_format_batches(&[batch]).unwrap().to_string()
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let plain = shown(feed(&s, &events, &cuts, None));
        assert!(
            plain.contains("| 2       |"),
            "the data should cause late firings"
        );
        for at in [1, 3, 9, 20] {
            assert_eq!(
                shown(feed(&s, &events, &cuts, Some(at))),
                plain,
                "{kind:?}, snapshot after batch {at}"
            );
        }
    }
}

/// A window without `group_by` has one group (once panicked: DataFusion's group
/// values and arrow's row converter need a column): over one device's rows it gives
/// what the same window grouped by device gives, less the device column, also
/// through a snapshot and restore.
#[test]
fn a_window_without_group_by_is_one_group() {
    for kind in every_kind() {
        let grouped = spec(kind, 30, AGGREGATES);
        let one = WindowSpec {
            group_by: Vec::new(),
            ..grouped.clone()
        };
        let events: Vec<(String, i64, f64)> = (0..300)
            .map(|i| ("d0".to_owned(), (i * 37) % 900 + i / 3, (i % 13) as f64))
            .collect();
        let cuts = [17, 5, 31];
        let windows = |out: Vec<StreamBatch>, key: bool| {
            let batches: Vec<RecordBatch> = out
                .into_iter()
                .filter(|b| &*b.stream == "w")
                .map(|b| match key {
                    true => {
                        let rest: Vec<usize> = (1..b.batch.num_columns()).collect();
                        b.batch.project(&rest).unwrap()
                    }
                    false => b.batch,
                })
                .collect();
            pretty_format_batches(&batches).unwrap().to_string()
        };
        let expected = windows(feed(&grouped, &events, &cuts, None), true);
        assert!(expected.contains("window_start"), "{kind:?}: {expected}");
        assert_eq!(
            windows(feed(&one, &events, &cuts, None), false),
            expected,
            "{kind:?}"
        );
        // Against the grouped window restored at the same point: a restore merges
        // pane states in another order, which may move a float's last bit.
        assert_eq!(
            windows(feed(&one, &events, &cuts, Some(4)), false),
            windows(feed(&grouped, &events, &cuts, Some(4)), true),
            "{kind:?}, restored"
        );
    }
}

/// State saved under another config (an aggregate added, an aggregate's type
/// changed) is refused with an error, which the runtime reports as "changed config?"
/// before starting the window empty, never read as what it is not (that once
/// panicked for session windows, at every start).
#[test]
fn a_snapshot_of_other_aggregates_is_refused_not_misread() {
    for kind in [
        WindowKind::Tumbling { size_ms: 60 * S },
        WindowKind::Session { gap_ms: 30 * S },
    ] {
        let events: Vec<(String, i64, f64)> = (0..50)
            .map(|i| (format!("d{}", i % 3), i * 7, i as f64))
            .collect();
        let old = spec(kind, 30, &["count(*) AS events"]);
        let mut w = build(&old);
        let rows: Vec<_> = events
            .iter()
            .map(|(d, t, v)| (d.as_str(), T0 + t * S, Some(*v), "ok"))
            .collect();
        w.process(&telemetry_at(&rows, "src"), 0, &mut Vec::new())
            .unwrap();
        let mut bytes = Vec::new();
        w.snapshot(&mut bytes).unwrap();
        for select in [
            &["count(*) AS events", "sum(temperature) AS t_sum"][..],
            &["sum(temperature) AS events"][..],
        ] {
            let mut changed = build(&spec(kind, 30, select));
            assert!(
                changed.restore(&mut bytes.as_slice()).is_err(),
                "{kind:?} {select:?}"
            );
        }
    }
}

/// The MQTT source's write-ahead-log positions (one series under `"wal"`) are no
/// partition of its rows: a `by_partition` window must not wait for them.
#[test]
fn a_log_series_position_does_not_hold_a_partitioned_watermark_back() {
    for (log_series, want) in [(false, None), (true, Some(T0 + 5 * S))] {
        let mut w = partitioned_minute_count(false);
        let positions = sluice_core::SourcePositions {
            source: "src".into(),
            offsets: [("wal".to_owned(), "7".to_owned())].into(),
            log_series,
            ..Default::default()
        };
        w.announce(&positions, 0);
        let rows = telemetry_at(&[("a", T0 + 10 * S, Some(1.0), "ok")], "src");
        w.process(&rows, 0, &mut Vec::new()).unwrap();
        assert_eq!(w.watermark(), want, "log_series = {log_series}");
    }
}

/// A repartitioned stream's batches mix origins (each row's `_source`): each origin
/// holds the watermark back, so the rows of one that fell behind (a node that was
/// down) are not late when they come, and the window equals the batch computation.
#[test]
fn with_row_sources_an_origin_that_fell_behind_holds_the_watermark_back() {
    let input = StreamSchema::builtin("telemetry").unwrap().arrow().clone();
    for (row_sources, late) in [(true, 0), (false, 1)] {
        let mut w = partitioned_minute_count(row_sources);
        let mixed = arrow::compute::concat_batches(
            &input,
            &[
                telemetry_at(&[("d1", T0 + 10 * S, Some(1.0), "ok")], "a/plant"),
                telemetry_at(&[("d1", T0 + 11 * S, Some(1.0), "ok")], "b/plant"),
            ],
        )
        .unwrap();
        let mut out = Vec::new();
        w.process(&mixed, 0, &mut out).unwrap();
        // Origin a runs two minutes ahead while b is away…
        let ahead = telemetry_at(&[("d1", T0 + 150 * S, Some(1.0), "ok")], "a/plant");
        w.process(&ahead, 0, &mut out).unwrap();
        let held = if row_sources {
            T0 + 6 * S
        } else {
            T0 + 145 * S
        };
        assert_eq!(w.watermark(), Some(held), "row_sources = {row_sources}");
        // …then b's rows of the first minute arrive.
        let behind = telemetry_at(&[("d1", T0 + 30 * S, Some(1.0), "ok")], "b/plant");
        w.process(&behind, 0, &mut out).unwrap();
        let late_rows: usize = out
            .iter()
            .filter(|b| &*b.stream != "w")
            .map(|b| b.batch.num_rows())
            .sum();
        assert_eq!(late_rows, late, "row_sources = {row_sources}: {out:?}");
    }
}

/// An origin that greeted a partition (in the positions' `origins`, sequence 0) holds
/// its watermark back before its first row.
#[test]
fn with_row_sources_a_greeted_origin_holds_the_watermark_back_before_its_first_row() {
    let mut w = partitioned_minute_count(true);
    let positions = sluice_core::SourcePositions {
        source: "repartition-telemetry".into(),
        offsets: [("t/0".to_owned(), "3".to_owned())].into(),
        origins: [(
            "topic".to_owned(),
            [
                ("a/plant".to_owned(), sluice_core::Seq::from(7)),
                ("b/plant".to_owned(), sluice_core::Seq::greeting()),
            ]
            .into(),
        )]
        .into(),
        ..Default::default()
    };
    w.announce(&positions, 0);
    let rows = telemetry_at(&[("d1", T0 + 10 * S, Some(1.0), "ok")], "a/plant");
    w.process(&rows, 0, &mut Vec::new()).unwrap();
    assert_eq!(w.watermark(), None, "b has not sent yet");
    let rows = telemetry_at(&[("d1", T0 + 20 * S, Some(1.0), "ok")], "b/plant");
    w.process(&rows, 0, &mut Vec::new()).unwrap();
    assert_eq!(w.watermark(), Some(T0 + 5 * S));
}

/// An origin that said farewell (sequence number END: a Kinesis shard read to its end)
/// stops holding the watermark back at once, not after `idle_timeout`.
#[test]
fn with_row_sources_an_origin_that_said_farewell_stops_holding_the_watermark_back() {
    let mut w = partitioned_minute_count(true);
    let origins = |b: sluice_core::Seq| sluice_core::SourcePositions {
        source: "repartition-telemetry".into(),
        offsets: [("t/0".to_owned(), "3".to_owned())].into(),
        origins: [(
            "topic".to_owned(),
            [
                ("a/plant".to_owned(), sluice_core::Seq::from(7)),
                ("b/plant".to_owned(), b),
            ]
            .into(),
        )]
        .into(),
        ..Default::default()
    };
    w.announce(&origins(sluice_core::Seq::greeting()), 0);
    let rows = telemetry_at(&[("d1", T0 + 10 * S, Some(1.0), "ok")], "a/plant");
    w.process(&rows, 0, &mut Vec::new()).unwrap();
    assert_eq!(w.watermark(), None, "b is greeted and has not sent yet");
    w.announce(&origins(sluice_core::Seq::end()), 0);
    let rows = telemetry_at(&[("d1", T0 + 20 * S, Some(1.0), "ok")], "a/plant");
    w.process(&rows, 0, &mut Vec::new()).unwrap();
    assert_eq!(w.watermark(), Some(T0 + 15 * S), "b said farewell");
}

/// An origin that said goodbye (its node stopped cleanly) stops holding the watermark
/// back until it greets again; then it holds it until it sends.
#[test]
fn with_row_sources_an_origin_at_rest_does_not_hold_the_watermark_until_it_greets() {
    let mut w = partitioned_minute_count(true);
    let origins = |b: &str| sluice_core::SourcePositions {
        source: "repartition-telemetry".into(),
        offsets: [("t/0".to_owned(), "3".to_owned())].into(),
        origins: [(
            "topic".to_owned(),
            [
                ("a/plant".to_owned(), sluice_core::Seq::from(7)),
                ("b/plant".to_owned(), sluice_core::Seq::parse(b).unwrap()),
            ]
            .into(),
        )]
        .into(),
        ..Default::default()
    };
    let from_a = |w: &mut Window, seconds: i64| {
        let rows = telemetry_at(&[("d1", T0 + seconds * S, Some(1.0), "ok")], "a/plant");
        w.process(&rows, 0, &mut Vec::new()).unwrap();
        w.watermark()
    };
    w.announce(&origins("4"), 0);
    assert_eq!(from_a(&mut w, 10), None, "b holds it");
    w.announce(&origins("~4"), 0);
    assert_eq!(from_a(&mut w, 20), Some(T0 + 15 * S), "b said goodbye");
    w.announce(&origins("4"), 0);
    assert_eq!(from_a(&mut w, 30), Some(T0 + 15 * S), "b greeted again");
    let rows = telemetry_at(&[("d2", T0 + 25 * S, Some(1.0), "ok")], "b/plant");
    w.process(&rows, 0, &mut Vec::new()).unwrap();
    assert_eq!(w.watermark(), Some(T0 + 20 * S));
}

/// A one-minute count with `by_partition` watermarks (5 s out of order, no idling).
fn partitioned_minute_count(row_sources: bool) -> Window {
    let input = StreamSchema::builtin("telemetry").unwrap().arrow().clone();
    let spec = spec(
        WindowKind::Tumbling { size_ms: 60 * S },
        0,
        &["count(*) AS n"],
    );
    let watermark = WatermarkSpec {
        max_out_of_orderness_ms: 5 * S,
        idle_timeout_ms: None,
        by_partition: true,
        row_sources,
    };
    Window::compile(&spec, &input, watermark).unwrap()
}

/// Over the budget, a session window takes rows of keys with an open session and
/// refuses new keys.
#[test]
fn over_budget_a_session_window_takes_held_keys_and_refuses_new_ones() {
    let mut w = window(
        WindowKind::Session { gap_ms: 10 * S },
        0,
        &["count(*) AS n"],
    );
    let mut out = Vec::new();
    let first = telemetry_at(&[("a", T0, Some(1.0), "ok")], "src");
    w.process(&first, 0, &mut out).unwrap();
    let over = telemetry_at(
        &[
            ("a", T0 + S, Some(2.0), "ok"),
            ("b", T0 + S, Some(3.0), "ok"),
        ],
        "src",
    );
    assert_eq!(w.refuse(&over, "over", 0, &mut out).unwrap(), 1, "b is new");
    let dead: Vec<_> = out
        .iter()
        .filter(|b| &*b.stream == DEAD_LETTER_TABLE)
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].batch.num_rows(), 1);
    out.clear();
    w.finish(&mut out).unwrap();
    let sessions: Vec<_> = out.iter().filter(|b| &*b.stream == "w").collect();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0].batch;
    assert_eq!(s.num_rows(), 1, "only a's session");
    assert_eq!(
        s.column_by_name("n")
            .unwrap()
            .as_primitive::<Int64Type>()
            .value(0),
        2,
        "a's second row was taken"
    );
}

/// A restored window knows the keys its panes held, so the budget's new-key test
/// gives the same answer after a restart.
#[test]
fn a_restored_window_still_knows_its_keys() {
    let select = ["count(*) AS n"];
    let mut w = window(WindowKind::Tumbling { size_ms: 60 * S }, 0, &select);
    let mut out = Vec::new();
    let rows = telemetry_at(
        &[("a", T0, Some(1.0), "ok"), ("b", T0, Some(1.0), "ok")],
        "src",
    );
    w.process(&rows, 0, &mut out).unwrap();
    let mut bytes = Vec::new();
    w.snapshot(&mut bytes).unwrap();
    let mut restored = window(WindowKind::Tumbling { size_ms: 60 * S }, 0, &select);
    restored.restore(&mut bytes.as_slice()).unwrap();
    let over = telemetry_at(
        &[
            ("a", T0 + S, Some(1.0), "ok"),
            ("c", T0 + S, Some(1.0), "ok"),
        ],
        "src",
    );
    assert_eq!(
        restored.refuse(&over, "over", 0, &mut out).unwrap(),
        1,
        "only c is new"
    );
}

/// Restored pane state is measured at its size, not once per column and pane at the
/// size of the snapshot message it was read from (what the window-state budget and
/// the state gauge read).
#[test]
fn restored_pane_state_is_measured_at_its_size() {
    let select = [
        "count(*) AS n",
        "avg(temperature) AS t",
        "max(temperature) AS m",
    ];
    let kind = WindowKind::Hopping {
        size_ms: 180 * S,
        slide_ms: 60 * S,
    };
    let mut w = window(kind, 0, &select);
    let devices: Vec<String> = (0..2_000).map(|d| format!("device-{d}")).collect();
    let rows: Vec<(&str, i64, Option<f64>, &str)> = devices
        .iter()
        .enumerate()
        .flat_map(|(d, id)| {
            (0..3).map(move |m| (id.as_str(), T0 + m * 60 * S + d as i64, Some(1.0), "ok"))
        })
        .collect();
    let mut out = Vec::new();
    w.process(&telemetry_at(&rows, "src"), 0, &mut out).unwrap();
    let mut bytes = Vec::new();
    w.snapshot(&mut bytes).unwrap();
    let mut restored = window(kind, 0, &select);
    restored.restore(&mut bytes.as_slice()).unwrap();
    let size = restored.state_size();
    assert!(
        size > bytes.len() / 4 && size < bytes.len() * 2,
        "restored state measured {size} bytes from a snapshot of {}",
        bytes.len()
    );
}

/// Over the budget, a tumbling or hopping window knows the keys it took before the
/// budget first asked (it starts tracking keys then) and those it took since, and the
/// windows it emits count every row it took.
#[test]
fn over_budget_a_pane_window_knows_keys_taken_before_and_since_it_tracks_them() {
    for (kind, windows_per_row) in [
        (WindowKind::Tumbling { size_ms: 60 * S }, 1),
        (
            WindowKind::Hopping {
                size_ms: 120 * S,
                slide_ms: 60 * S,
            },
            2,
        ),
    ] {
        let mut w = window(kind, 0, &["count(*) AS n"]);
        let mut out = Vec::new();
        let at = |device, secs| (device, T0 + secs * S, Some(1.0), "ok");
        w.process(&telemetry_at(&[at("a", 0), at("b", 0)], "src"), 0, &mut out)
            .unwrap();
        let over = telemetry_at(&[at("a", 1), at("c", 1)], "src");
        assert_eq!(w.refuse(&over, "over", 0, &mut out).unwrap(), 1, "c is new");
        w.process(&telemetry_at(&[at("d", 2)], "src"), 0, &mut out)
            .unwrap();
        let over = telemetry_at(&[at("d", 3), at("e", 3)], "src");
        assert_eq!(
            w.refuse(&over, "over", 0, &mut out).unwrap(),
            1,
            "e is new; d came after keys were tracked"
        );
        out.clear();
        w.finish(&mut out).unwrap();
        let mut counts = BTreeMap::new();
        for b in out.iter().filter(|b| &*b.stream == "w") {
            let devices = arrow::compute::cast(
                b.batch.column_by_name("device_id").unwrap(),
                &arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            let n = b
                .batch
                .column_by_name("n")
                .unwrap()
                .as_primitive::<Int64Type>();
            for i in 0..b.batch.num_rows() {
                *counts
                    .entry(devices.as_string::<i32>().value(i).to_owned())
                    .or_insert(0) += n.value(i);
            }
        }
        let expected: BTreeMap<String, i64> = [("a", 2), ("b", 1), ("d", 2)]
            .into_iter()
            .map(|(d, n)| (d.to_owned(), n * windows_per_row))
            .collect();
        assert_eq!(counts, expected);
    }
}
