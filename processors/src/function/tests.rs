use arrow::datatypes::Float64Type;

use super::*;
use crate::test_support::telemetry;

fn spec(filter: Option<&str>, select: &[&str]) -> FunctionSpec {
    FunctionSpec {
        name: "f".into(),
        filter: filter.map(str::to_owned),
        select: select.iter().map(|s| s.to_string()).collect(),
        routes: Vec::new(),
        limit: None,
        concurrency: 1,
    }
}

#[test]
fn filter_and_computed_columns() {
    let batch = telemetry(&[
        ("a", Some(20.0), "ok"),
        ("b", Some(100.0), "error"),
        ("c", None, "ok"),
    ]);
    let f = Function::compile(
        &spec(
            Some("status <> 'error' AND temperature IS NOT NULL"),
            &[
                "device_id",
                "temperature * 9 / 5 + 32 AS temperature_f",
                "upper(status) AS s",
            ],
        ),
        batch.schema_ref(),
        "functions.f",
    )
    .unwrap();
    let (out, routed) = one_pass(&f, &batch);
    assert!(routed.is_empty());
    assert_eq!(out.num_rows(), 1);
    let names: Vec<&str> = out
        .schema_ref()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(
        names,
        [
            "device_id",
            "temperature_f",
            "s",
            "ts",
            "_ingest_time",
            "_source",
            "_partition",
            "_offset",
            "_hops"
        ]
    );
    let tf = out.column(1).as_primitive::<Float64Type>();
    assert_eq!(tf.value(0), 68.0);
    assert_eq!(out.column(2).as_string::<i32>().value(0), "OK");
    // The output still says where its event time and key are.
    assert_eq!(
        sluice_core::schema::event_time_column(out.schema_ref()),
        Some(3)
    );
}

#[test]
fn routes_take_matching_rows() {
    let batch = telemetry(&[
        ("a", Some(20.0), "ok"),
        ("b", Some(90.0), "ok"),
        ("c", Some(95.0), "ok"),
    ]);
    let mut s = spec(None, &[]);
    s.routes = vec![
        RouteSpec {
            when: "temperature > 80".into(),
            to: "hot".into(),
        },
        RouteSpec {
            when: "temperature < 0".into(),
            to: "frozen".into(),
        },
    ];
    let f = Function::compile(&s, batch.schema_ref(), "functions.f").unwrap();
    let (out, routed) = one_pass(&f, &batch);
    assert_eq!(out.num_rows(), 3, "no select: every column and row kept");
    assert_eq!(routed.len(), 1);
    assert_eq!(&*routed[0].stream, "hot");
    assert_eq!(routed[0].batch.num_rows(), 2);
}

#[test]
fn bad_expressions_name_their_keys_and_quote_datafusion() {
    let batch = telemetry(&[("a", Some(20.0), "ok")]);
    let mut s = spec(
        Some("temprature > 3"),
        &["device_id", "nope(1) AS x", "temperature +", "_source"],
    );
    s.routes = vec![RouteSpec {
        when: "temperature".into(),
        to: "t".into(),
    }];
    let errors = Function::compile(&s, batch.schema_ref(), "functions.f").unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|e| e.starts_with("functions.f.filter:") && e.contains("temprature")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|e| e.starts_with("functions.f.select[1]:") && e.contains("nope")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|e| e.starts_with("functions.f.select[2]:")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|e| e.starts_with("functions.f.select[3]:") && e.contains("already taken")),
        "{text:#?}"
    );
    let filter_not_bool =
        Function::compile(&spec(Some("temperature + 1"), &[]), batch.schema_ref(), "k")
            .unwrap_err();
    assert!(
        filter_not_bool[0].to_string().contains("not a boolean"),
        "{filter_not_bool:?}"
    );
}

#[test]
fn wildcard_keeps_declared_columns() {
    let batch = telemetry(&[("a", Some(20.0), "ok")]);
    let f = Function::compile(
        &spec(None, &["*", "temperature > 10 AS warm"]),
        batch.schema_ref(),
        "k",
    )
    .unwrap();
    let (out, _) = one_pass(&f, &batch);
    assert_eq!(out.num_columns(), batch.num_columns() + 1);
    assert_eq!(out.schema_ref().field(6).name(), "warm");
}

#[test]
fn parallel_slices_give_the_same_rows_in_the_same_order() {
    let devices: Vec<String> = (0..25_000).map(|i| format!("d{}", i % 97)).collect();
    let rows: Vec<(&str, Option<f64>, &str)> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let t = (i % 13 == 0).then_some((i % 120) as f64 - 10.0);
            (d.as_str(), t, if i % 7 == 0 { "error" } else { "ok" })
        })
        .collect();
    let batch = telemetry(&rows);
    let mut s = spec(
        Some("status <> 'error'"),
        &[
            "device_id",
            "upper(device_id) AS loud",
            "temperature * 2 AS t2",
        ],
    );
    s.routes = vec![
        RouteSpec {
            when: "t2 > 150".into(),
            to: "hot".into(),
        },
        RouteSpec {
            when: "t2 < -1000".into(),
            to: "never".into(),
        },
    ];
    let one = Function::compile(&s, batch.schema_ref(), "functions.f").unwrap();
    let (want, want_routed) = one_pass(&one, &batch);
    for (concurrency, slices) in [(2, 2), (3, 3), (6, 6), (64, 6)] {
        s.concurrency = concurrency;
        let many = Function::compile(&s, batch.schema_ref(), "functions.f").unwrap();
        let (outputs, routed) = many.process(&batch).unwrap();
        assert_eq!(outputs.len(), slices, "one output per slice");
        let got = arrow::compute::concat_batches(&want.schema(), &outputs).unwrap();
        assert_eq!(got, want, "concurrency {concurrency}");
        assert!(
            routed.iter().all(|r| &*r.stream == "hot"),
            "only the route that matched"
        );
        let hot: Vec<RecordBatch> = routed.into_iter().map(|r| r.batch).collect();
        let hot = arrow::compute::concat_batches(&want.schema(), &hot).unwrap();
        assert_eq!(hot, want_routed[0].batch);
    }
    // A batch below two slices' worth runs in one pass.
    let small = batch.slice(0, 2 * MIN_SLICE_ROWS - 1);
    let many = Function::compile(&s, batch.schema_ref(), "functions.f").unwrap();
    assert_eq!(one_pass(&many, &small).0, one_pass(&one, &small).0);
}

/// The output of a function over a batch it takes in one pass.
fn one_pass(f: &Function, batch: &RecordBatch) -> (RecordBatch, Vec<StreamBatch>) {
    let (mut outputs, routed) = f.process(batch).unwrap();
    assert_eq!(outputs.len(), 1, "one pass");
    (outputs.pop().unwrap(), routed)
}

/// The config's SQL is parsed with the query gate's recursion limit: an expression
/// whose parse takes time exponential in the depth (`a.b.c[` twelve times took over
/// 20 s at sqlparser's default limit) is refused at once, naming its key, while
/// ordinary nesting still compiles.
#[test]
fn config_sql_past_the_recursion_limit_is_refused_not_stalled() {
    let batch = telemetry(&[("a", Some(20.0), "ok")]);
    let bomb = format!("{}x", "a.b.c[".repeat(12));
    let errors = Function::compile(&spec(Some(&bomb), &[]), batch.schema_ref(), "functions.f")
        .expect_err("refused");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].to_string().starts_with("functions.f.filter:"),
        "{}",
        errors[0]
    );
    let nested = format!("{}temperature{} > 1", "(".repeat(10), ")".repeat(10));
    Function::compile(&spec(Some(&nested), &[]), batch.schema_ref(), "functions.f")
        .expect("ten parentheses compile");
}
