use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, TimestampMillisecondType};

use super::*;

fn telemetry() -> Decoder {
    Decoder::new(
        StreamSchema::builtin("telemetry").expect("builtin"),
        "telemetry",
        "test",
        Some(1),
        DecodeLimits::default(),
    )
}

fn meta() -> MessageMeta<'static> {
    MessageMeta {
        partition: "devices/x/telemetry",
        offset: "7",
        ingest_time_ms: 1_767_225_601_999,
        hops: 0,
    }
}

fn reason_of(payload: &[u8]) -> Option<&'static str> {
    let mut d = telemetry();
    d.push(payload, "devices/dev-9/telemetry", &meta())
        .map(Reason::code)
}

#[test]
fn decodes_design_telemetry() {
    let mut d = telemetry();
    let line = br#"{"device_id":"dev-000123","ts":1767225601721,"temperature":21.47,"humidity":80.59,"battery":3.26,"status":"ok"}"#;
    assert_eq!(d.push(line, "devices/dev-000123/telemetry", &meta()), None);
    let rfc = br#"{"device_id":"dev-2","ts":"2026-01-01T00:00:03.120Z","temperature":20,"extra":{"a":[1,2]}}"#;
    assert_eq!(d.push(rfc, "devices/dev-2/telemetry", &meta()), None);
    let batch = d.flush().rows.expect("rows");
    assert_eq!(batch.num_rows(), 2);
    let ts = batch.column(1).as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.value(0), 1_767_225_601_721);
    assert_eq!(ts.value(1), 1_767_225_603_120);
    let temp = batch.column(2).as_primitive::<Float64Type>();
    assert_eq!(temp.value(1), 20.0);
    assert!(batch.column(3).is_null(1));
    assert_eq!(
        batch
            .column(6)
            .as_primitive::<TimestampMillisecondType>()
            .value(0),
        meta().ingest_time_ms
    );
    assert_eq!(
        batch.column(8).as_string::<i32>().value(0),
        "devices/x/telemetry"
    );
    assert!(d.flush().rows.is_none());
}

#[test]
fn key_comes_from_topic_when_payload_lacks_it() {
    let mut d = telemetry();
    assert_eq!(
        d.push(
            br#"{"ts":5,"temperature":1.5}"#,
            "devices/dev-7/telemetry",
            &meta()
        ),
        None
    );
    let batch = d.flush().rows.expect("rows");
    assert_eq!(batch.column(0).as_string::<i32>().value(0), "dev-7");
}

#[test]
fn escaped_keys_and_strings_decode() {
    let mut d = telemetry();
    let line = br#"{"device\u005fid":"dev\n\u00e9","ts":5}"#;
    assert_eq!(d.push(line, "x", &meta()), None);
    let batch = d.flush().rows.expect("rows");
    assert_eq!(batch.column(0).as_string::<i32>().value(0), "dev\n\u{e9}");
}

#[test]
fn each_kind_of_bad_input_has_its_reason() {
    let deep = format!(
        r#"{{"device_id":"d","ts":1,"x":{}1{}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "invalid_json"),
        (b"".to_vec(), "invalid_json"),
        (
            br#"{"device_id":"d","ts":1} trailing"#.to_vec(),
            "invalid_json",
        ),
        (
            b"{\"device_id\":\"\xff\xfe\",\"ts\":1}".to_vec(),
            "invalid_utf8",
        ),
        (b"[1,2,3]".to_vec(), "not_an_object"),
        (b"42".to_vec(), "not_an_object"),
        (b"\"hello\"".to_vec(), "not_an_object"),
        (b"null".to_vec(), "not_an_object"),
        (br#"{"device_id":"d"}"#.to_vec(), "missing_field"),
        (br#"{"device_id":"d","ts":null}"#.to_vec(), "missing_field"),
        (
            br#"{"device_id":"d","ts":1,"temperature":"hot"}"#.to_vec(),
            "wrong_type",
        ),
        (br#"{"device_id":17,"ts":1}"#.to_vec(), "wrong_type"),
        (
            br#"{"device_id":"d","ts":1,"temperature":{"c":1}}"#.to_vec(),
            "wrong_type",
        ),
        (
            br#"{"device_id":"d","ts":1,"temperature":NaN}"#.to_vec(),
            "non_finite_number",
        ),
        (
            br#"{"device_id":"d","ts":1,"temperature":-Infinity}"#.to_vec(),
            "non_finite_number",
        ),
        (
            br#"{"device_id":"d","ts":1,"temperature":1e999}"#.to_vec(),
            "non_finite_number",
        ),
        (
            br#"{"device_id":"d","ts":"yesterday"}"#.to_vec(),
            "bad_timestamp",
        ),
        (br#"{"device_id":"d","ts":true}"#.to_vec(), "bad_timestamp"),
        (br#"{"device_id":"d","ts":-5}"#.to_vec(), "bad_timestamp"),
        (
            br#"{"device_id":"d","ts":99999999999999999}"#.to_vec(),
            "bad_timestamp",
        ),
        (vec![b' '; 70_000], "oversized"),
        (deep.into_bytes(), "too_deep"),
    ];
    for (payload, want) in cases {
        // The topic has no key segment, so a missing key stays missing.
        let mut d = Decoder::new(
            StreamSchema::builtin("telemetry").expect("builtin"),
            "telemetry",
            "test",
            None,
            DecodeLimits::default(),
        );
        let got = d.push(&payload, "t", &meta()).map(Reason::code);
        assert_eq!(
            got,
            Some(want),
            "payload {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(80)])
        );
    }
    assert_eq!(reason_of(br#"{"ts":1}"#), None, "key from topic segment");
}

#[test]
fn dead_letters_keep_capped_payload_and_position() {
    let limits = DecodeLimits {
        dead_letter_payload_cap: 8,
        ..DecodeLimits::default()
    };
    let schema = StreamSchema::builtin("telemetry").expect("builtin");
    let mut d = Decoder::new(schema, "telemetry", "plant", None, limits);
    d.push(b"{definitely not json}", "t", &meta());
    d.push(br#"{"device_id":"ok","ts":1}"#, "t", &meta());
    let out = d.flush();
    assert_eq!(out.rows.expect("rows").num_rows(), 1);
    let dead = out.dead_letters.expect("dead");
    assert_eq!(dead.num_rows(), 1);
    let col = |name: &str| {
        dead.column(dead.schema().index_of(name).expect("column"))
            .clone()
    };
    assert_eq!(col("reason").as_string::<i32>().value(0), "invalid_json");
    assert_eq!(col("payload").as_binary::<i32>().value(0), b"{definit");
    assert_eq!(
        col("payload_size")
            .as_primitive::<arrow::datatypes::UInt64Type>()
            .value(0),
        21
    );
    assert_eq!(col("_source").as_string::<i32>().value(0), "plant");
    assert_eq!(col("_offset").as_string::<i32>().value(0), "7");
    assert!(!col("detail").as_string::<i32>().value(0).is_empty());
}
