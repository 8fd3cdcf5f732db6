//! Golden tests: each rule kind driven by hand-made rows and a manual clock, with the
//! exact sequence of `alerts` rows and notifications it must produce.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use sluice_core::schema::{EVENT_TIME_META, KEY_META, timestamp_type};
use sluice_core::{ManualClock, StreamBatch, StreamSchema};

use super::*;
use crate::test_support::telemetry_at;

const T0: i64 = 1_767_225_600_000;

fn spec(condition: &str) -> AlertSpec {
    AlertSpec {
        name: "hot".into(),
        key: "alerts.hot".into(),
        input: "telemetry".into(),
        condition: Some(condition.into()),
        clear: None,
        value: Some("temperature".into()),
        group_by: Vec::new(),
        fire: Fire::Count { m: 1, n: 1 },
        clear_for: 1,
        missing_after_ms: None,
        cooldown_ms: 0,
        severity: "critical".into(),
        labels: BTreeMap::from([("team".into(), "plant".into())]),
        message: Some("{device_id} at {temperature} ({event})".into()),
        notify: vec!["ops".into()],
    }
}

const OPEN: AlertingSpec = AlertingSpec {
    per_second: 1_000,
    burst: 1_000,
};

fn schemas() -> HashMap<String, SchemaRef> {
    let telemetry = StreamSchema::builtin("telemetry").unwrap().arrow().clone();
    HashMap::from([
        ("telemetry".to_owned(), telemetry),
        ("per_minute".to_owned(), window_schema()),
    ])
}

fn build(specs: &[AlertSpec], cap: AlertingSpec, clock: &Arc<ManualClock>) -> Alerts {
    Alerts::build(specs, &schemas(), cap, clock.clone()).unwrap()
}

/// Feeds `temps` of device `dev`, one per second from T0 + `start` s, one batch per
/// row; returns the `alerts` rows as `"<event> <key> @<second> <notified?>"`.
fn feed(alerts: &mut Alerts, dev: &str, start: i64, temps: &[f64]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, &t) in temps.iter().enumerate() {
        let at = T0 + (start + i as i64) * 1000;
        let batch = telemetry_at(&[(dev, at, Some(t), "ok")], "src");
        alerts.process("telemetry", &batch, &mut out).unwrap();
    }
    rows(&out)
}

fn rows(out: &[StreamBatch]) -> Vec<String> {
    let mut lines = Vec::new();
    for b in out {
        assert_eq!(&*b.stream, "alerts");
        let col = |name: &str| b.batch.column_by_name(name).unwrap().clone();
        let (event, key, at, notified) = (col("event"), col("key"), col("at"), col("notified"));
        for r in 0..b.batch.num_rows() {
            let at = at
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
                .value(r);
            lines.push(format!(
                "{} {} @{}{}",
                event.as_string::<i32>().value(r),
                key.as_string::<i32>().value(r),
                (at - T0) / 1000,
                if notified.as_boolean().value(r) {
                    ""
                } else {
                    " muted"
                }
            ));
        }
    }
    lines
}

#[test]
fn consecutive_fires_on_the_third_in_a_row_and_resolves_on_the_first_clear() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("temperature > 80");
    s.fire = Fire::Count { m: 3, n: 3 };
    let mut alerts = build(&[s], OPEN, &clock);
    let got = feed(&mut alerts, "d1", 0, &[81.0, 82.0, 79.0, 81.0, 82.0]);
    assert!(got.is_empty(), "two in a row then a break: {got:?}");
    assert_eq!(alerts.state_of("hot", "d1"), Some("pending"));
    assert_eq!(feed(&mut alerts, "d1", 5, &[83.0, 84.0]), ["fire d1 @5"]);
    assert_eq!(alerts.state_of("hot", "d1"), Some("firing"));
    assert_eq!(feed(&mut alerts, "d1", 7, &[70.0, 71.0]), ["resolve d1 @7"]);
    assert_eq!(alerts.state_of("hot", "d1"), Some("ok"));
    // Another key is independent.
    assert!(feed(&mut alerts, "d2", 9, &[90.0, 90.0]).is_empty());
    // A key that never hit holds no state.
    assert!(feed(&mut alerts, "d3", 11, &[20.0, 21.0]).is_empty());
    let (_, keys, firing) = alerts.gauges().next().unwrap();
    assert_eq!((keys, firing), (2, 0), "d1 and d2 only");
}

#[test]
fn m_of_n_fires_on_the_second_hit_within_four() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("temperature > 80");
    s.fire = Fire::Count { m: 2, n: 4 };
    let mut alerts = build(&[s], OPEN, &clock);
    // 81, then three below: the hit slides out of the last four.
    assert!(feed(&mut alerts, "d1", 0, &[81.0, 70.0, 70.0, 70.0, 81.0]).is_empty());
    // The second hit within the newest four (81 @4, 82 @7) fires.
    assert_eq!(
        feed(&mut alerts, "d1", 5, &[70.0, 70.0, 82.0]),
        ["fire d1 @7"]
    );
}

#[test]
fn hysteresis_fires_above_80_and_clears_only_below_75_three_times() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("temperature > 80");
    s.fire = Fire::Count { m: 3, n: 3 };
    s.clear = Some("temperature < 75".into());
    s.clear_for = 3;
    let mut alerts = build(&[s], OPEN, &clock);
    let temps = [81.0, 82.0, 83.0, 78.0, 74.0, 73.0, 79.0, 74.0, 73.0, 72.0];
    assert_eq!(
        feed(&mut alerts, "d1", 0, &temps),
        ["fire d1 @2", "resolve d1 @9"],
        "78 and 79 are neither: the clear run restarts"
    );
}

#[test]
fn for_a_duration_of_event_time() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("temperature > 80");
    s.fire = Fire::Duration { ms: 2_000 };
    let mut alerts = build(&[s], OPEN, &clock);
    // Held 0..1 s, broken at 2 s, held again 3..5 s: fires at 5 s.
    let got = feed(&mut alerts, "d1", 0, &[81.0, 81.0, 70.0, 81.0, 81.0, 81.0]);
    assert_eq!(got, ["fire d1 @5"]);
}

#[test]
fn missing_data_fires_for_a_silent_key_and_resolves_when_it_reports() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("true");
    s.condition = None;
    s.value = None;
    s.name = "silent".into();
    s.missing_after_ms = Some(30_000);
    let mut alerts = build(&[s], OPEN, &clock);
    assert!(feed(&mut alerts, "d1", 0, &[20.0]).is_empty());
    clock.advance(10_000);
    assert!(feed(&mut alerts, "d2", 10, &[20.0]).is_empty());
    let mut out = Vec::new();
    clock.advance(19_999);
    alerts.tick(&mut out);
    assert!(out.is_empty(), "d1 silent for 29.999 s");
    clock.advance(1_001);
    alerts.tick(&mut out);
    assert_eq!(rows(&out), ["fire d1 @31"], "d1 silent 31 s; d2 only 21 s");
    out.clear();
    clock.advance(500);
    alerts.tick(&mut out);
    assert!(out.is_empty(), "no repeat while firing");
    assert_eq!(feed(&mut alerts, "d1", 40, &[20.0]), ["resolve d1 @40"]);
    let notes = alerts.take_notifications();
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[0].fields["alert_id"], "silent/d1/1");
    assert_eq!(notes[1].fields["event"], "resolve");
}

#[test]
fn cooldown_mutes_an_episode_that_fires_too_soon() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("temperature > 80");
    s.cooldown_ms = 60_000;
    let mut alerts = build(&[s], OPEN, &clock);
    assert_eq!(
        feed(&mut alerts, "d1", 0, &[81.0, 70.0]),
        ["fire d1 @0", "resolve d1 @1"]
    );
    clock.advance(59_999);
    assert_eq!(
        feed(&mut alerts, "d1", 2, &[81.0, 70.0]),
        ["fire d1 @2 muted", "resolve d1 @3 muted"],
        "the table records the episode; no notification"
    );
    clock.advance(1);
    assert_eq!(feed(&mut alerts, "d1", 4, &[81.0]), ["fire d1 @4"]);
    let ids: Vec<_> = alerts
        .take_notifications()
        .iter()
        .map(|n| format!("{} {}", n.fields["alert_id"], n.fields["event"]))
        .collect();
    assert_eq!(
        ids,
        [
            "\"hot/d1/1\" \"fire\"",
            "\"hot/d1/1\" \"resolve\"",
            "\"hot/d1/3\" \"fire\""
        ]
    );
}

#[test]
fn the_global_cap_mutes_a_storm_and_sends_one_summary() {
    let clock = Arc::new(ManualClock::new(T0));
    let cap = AlertingSpec {
        per_second: 1,
        burst: 2,
    };
    let mut alerts = build(&[spec("temperature > 80")], cap, &clock);
    let rows_in: Vec<(String, i64, Option<f64>, &str)> = (0..5)
        .map(|i| (format!("d{i}"), T0, Some(90.0), "ok"))
        .collect();
    let refs: Vec<_> = rows_in
        .iter()
        .map(|r| (r.0.as_str(), r.1, r.2, r.3))
        .collect();
    let mut out = Vec::new();
    alerts
        .process("telemetry", &telemetry_at(&refs, "src"), &mut out)
        .unwrap();
    assert_eq!(
        rows(&out),
        [
            "fire d0 @0",
            "fire d1 @0",
            "fire d2 @0 muted",
            "fire d3 @0 muted",
            "fire d4 @0 muted"
        ]
    );
    assert_eq!(alerts.take_notifications().len(), 2);
    out.clear();
    alerts.tick(&mut out);
    assert!(out.is_empty(), "the cap is still closed");
    clock.advance(1_000);
    alerts.tick(&mut out);
    let notes = alerts.take_notifications();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].fields["event"], "suppressed");
    assert_eq!(notes[0].fields["value"], 3);
    assert_eq!(
        notes[0].fields["message"],
        "3 alert notifications suppressed by the global cap"
    );
    assert_eq!(out.len(), 1, "the summary is in the alerts table too");
}

fn window_schema() -> SchemaRef {
    let fields = vec![
        Field::new("device_id", DataType::Utf8, true),
        Field::new("window_start", timestamp_type(), false),
        Field::new("window_end", timestamp_type(), false),
        Field::new("t_max", DataType::Float64, true),
    ];
    let metadata = std::collections::HashMap::from([
        (EVENT_TIME_META.to_owned(), "window_start".to_owned()),
        (KEY_META.to_owned(), "device_id".to_owned()),
    ]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

fn window_rows(rows: &[(&str, i64, f64)]) -> RecordBatch {
    let start = |r: &(&str, i64, f64)| T0 + r.1 * 60_000;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(start))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| start(r) + 60_000))
                .with_timezone("UTC"),
        ),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
    ];
    RecordBatch::try_new(window_schema(), columns).unwrap()
}

#[test]
fn a_late_window_update_replaces_its_own_evaluation() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("t_max > 80");
    s.input = "per_minute".into();
    s.value = Some("t_max".into());
    s.message = None;
    s.fire = Fire::Count { m: 2, n: 2 };
    let mut alerts = build(&[s], OPEN, &clock);
    let mut out = Vec::new();
    // Minute 0 hot, minute 1 cool.
    alerts
        .process(
            "per_minute",
            &window_rows(&[("d1", 0, 85.0), ("d1", 1, 70.0)]),
            &mut out,
        )
        .unwrap();
    assert!(out.is_empty());
    // A late row re-emits minute 1, now hot: it replaces minute 1's evaluation (two
    // hot windows in a row), rather than counting as a third window.
    alerts
        .process("per_minute", &window_rows(&[("d1", 1, 82.0)]), &mut out)
        .unwrap();
    let b = &out[0].batch;
    assert_eq!(rows(&out), ["fire d1 @60"]);
    let start = b.column_by_name("window_start").unwrap();
    assert_eq!(
        start
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
            .value(0),
        T0 + 60_000
    );
    assert_eq!(
        b.column_by_name("message")
            .unwrap()
            .as_string::<i32>()
            .value(0),
        "hot fire for d1"
    );
    // Re-emitting minute 0 cool again changes nothing while firing (clear needs the
    // newest evaluation).
    out.clear();
    alerts
        .process("per_minute", &window_rows(&[("d1", 2, 70.0)]), &mut out)
        .unwrap();
    assert_eq!(rows(&out), ["resolve d1 @120"]);
}

#[test]
fn state_survives_a_snapshot_no_refire_and_the_resolve_still_comes() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("temperature > 80");
    s.fire = Fire::Count { m: 3, n: 3 };
    let mut alerts = build(std::slice::from_ref(&s), OPEN, &clock);
    assert_eq!(
        feed(&mut alerts, "d1", 0, &[81.0, 82.0, 83.0]),
        ["fire d1 @2"]
    );
    assert_eq!(alerts.snapshot_names().collect::<Vec<_>>(), ["alert-hot"]);
    let mut snapshot = Vec::new();
    assert!(alerts.snapshot("alert-hot", &mut snapshot).unwrap());
    assert!(!alerts.snapshot("alert-other", &mut Vec::new()).unwrap());
    let mut restarted = build(&[s], OPEN, &clock);
    assert!(
        restarted
            .restore("alert-hot", &mut snapshot.as_slice())
            .unwrap()
    );
    assert!(!restarted.restore("alert-other", &mut &b"{}"[..]).unwrap());
    assert!(
        feed(&mut restarted, "d1", 3, &[84.0]).is_empty(),
        "no second fire"
    );
    assert_eq!(feed(&mut restarted, "d1", 4, &[70.0]), ["resolve d1 @4"]);
    let notes = restarted.take_notifications();
    assert_eq!(notes[0].fields["alert_id"], "hot/d1/1", "the same episode");
    assert_eq!(notes[0].fields["message"], "d1 at 70.0 (resolve)");
    assert_eq!(notes[0].fields["device_id"], "d1");
    assert_eq!(notes[0].fields["labels"]["team"], "plant");
    assert_eq!(notes[0].fields["value"], 70.0);
}

/// A checkpoint forgets the keys of a raw-event rule that hit but never fired and
/// whose hits have left their history, and only those: not a pending key, not a key
/// that fired (its episode count), not a window rule's or a missing-data rule's keys.
/// A forgotten key fires later exactly as a kept one would.
#[test]
fn a_checkpoint_forgets_keys_whose_hits_came_to_nothing() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut s = spec("temperature > 80");
    s.fire = Fire::Count { m: 2, n: 3 };
    let mut silent = spec("true");
    (silent.name, silent.condition, silent.value) = ("silent".into(), None, None);
    silent.missing_after_ms = Some(600_000);
    let mut windowed = spec("t_max > 80");
    (windowed.name, windowed.input) = ("hot_minute".into(), "per_minute".into());
    (windowed.value, windowed.message) = (Some("t_max".into()), None);
    windowed.fire = Fire::Count { m: 2, n: 2 };
    // An explicit clear over three evaluations counts a hitless history's clears.
    let mut cleared = s.clone();
    (cleared.name, cleared.clear, cleared.clear_for) =
        ("hot_clear".into(), Some("temperature < 85".into()), 3);
    let mut alerts = build(&[s.clone(), silent, windowed], OPEN, &clock);
    let mut kept = build(&[s], OPEN, &clock);
    let mut out = Vec::new();
    for a in [&mut alerts, &mut kept] {
        // d1 hits once, then its hit leaves the last three evaluations.
        assert!(feed(a, "d1", 0, &[81.0, 70.0, 70.0, 70.0]).is_empty());
        assert_eq!(
            feed(a, "d2", 4, &[81.0, 82.0, 70.0]),
            ["fire d2 @5", "resolve d2 @6"]
        );
        assert!(feed(a, "d3", 7, &[81.0]).is_empty());
    }
    alerts
        .process(
            "per_minute",
            &window_rows(&[("d1", 0, 85.0), ("d1", 1, 70.0), ("d1", 2, 70.0)]),
            &mut out,
        )
        .unwrap();
    let keys = |a: &Alerts| a.gauges().map(|(_, keys, _)| keys).collect::<Vec<_>>();
    assert_eq!(keys(&alerts), [3, 3, 1]);
    let size = alerts.state_size();
    let mut saved = Vec::new();
    for name in alerts.snapshot_names().collect::<Vec<_>>() {
        saved.clear();
        assert!(alerts.snapshot(&name, &mut saved).unwrap());
    }
    assert_eq!(
        keys(&alerts),
        [2, 3, 1],
        "d1 is forgotten; d2 fired, d3 is pending; the other rules keep theirs"
    );
    let mut clearing = build(&[cleared], OPEN, &clock);
    assert!(feed(&mut clearing, "d1", 0, &[81.0, 70.0, 70.0, 70.0]).is_empty());
    assert!(
        clearing
            .snapshot("alert-hot_clear", &mut Vec::new())
            .unwrap()
    );
    assert_eq!(keys(&clearing), [1], "its clears count towards a resolve");
    assert!(alerts.state_size() < size, "the budget sees it");
    // The size is kept as keys come and go; it covers what a walk of them finds.
    for rule in &alerts.rules {
        let names: usize = rule.keys.keys().map(String::capacity).sum();
        assert_eq!(rule.key_bytes, names);
        let histories: usize = rule.keys.values().map(|s| s.history.capacity()).sum();
        assert!(alerts.state_size() >= names + histories * size_of::<Eval>());
    }
    for a in [&mut alerts, &mut kept] {
        assert_eq!(feed(a, "d1", 8, &[90.0, 70.0, 91.0]), ["fire d1 @10"]);
        assert_eq!(feed(a, "d2", 11, &[81.0, 82.0]), ["fire d2 @12"]);
    }
    let ids = |a: &mut Alerts| {
        a.take_notifications()
            .into_iter()
            .map(|n| n.fields["alert_id"].clone())
            .collect::<Vec<_>>()
    };
    let forgot = ids(&mut alerts);
    assert_eq!(forgot, ids(&mut kept), "the same alerts, forgotten or not");
    assert!(forgot.iter().any(|id| id == "hot/d2/2"));
}

#[test]
fn every_config_problem_is_named() {
    let clock: Arc<dyn sluice_core::Clock> = Arc::new(ManualClock::new(T0));
    let mut bad = spec("temperatur > 80");
    bad.group_by = vec!["nope".into()];
    let mut missing = spec("true");
    missing.name = "other".into();
    missing.key = "alerts.other".into();
    missing.input = "nowhere".into();
    let errors = Alerts::build(&[bad, missing], &schemas(), OPEN, clock).unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text[0].starts_with("alerts.hot.condition:"), "{text:?}");
    assert!(
        text[1].starts_with("alerts.hot.group_by: \"nope\""),
        "{text:?}"
    );
    assert!(
        text[2].starts_with("alerts.other.input: \"nowhere\""),
        "{text:?}"
    );
}

/// Over the state budget a rule takes no new keys: a flood of ever-new device ids
/// that hit the condition once cannot grow it, while a key it holds still resolves.
#[test]
fn over_the_state_budget_a_rule_keeps_its_keys_and_takes_no_new_ones() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut alerts = build(&[spec("temperature > 80")], OPEN, &clock);
    assert_eq!(feed(&mut alerts, "held", 0, &[90.0]), ["fire held @0"]);
    let held = alerts.state_size();
    assert!(held > 0);
    alerts.set_over_budget(true);
    for i in 0..1_000 {
        assert!(feed(&mut alerts, &format!("new-{i}"), 1, &[95.0]).is_empty());
    }
    assert_eq!(alerts.state_size(), held, "no key was added");
    assert_eq!(feed(&mut alerts, "held", 2, &[20.0]), ["resolve held @2"]);
    alerts.set_over_budget(false);
    assert_eq!(feed(&mut alerts, "new-0", 3, &[95.0]), ["fire new-0 @3"]);
}
