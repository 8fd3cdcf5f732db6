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
        origin: None,
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
fn a_key_naming_another_device_than_the_publisher_is_an_identity_mismatch() {
    let acl = Arc::new(Acl::new(&sluice_config::AclConfig {
        publish: vec!["devices/{client_id}/#".into(), "shared/#".into()],
        subscribe: vec![],
    }));
    let mut d = telemetry().check_publisher(acl);
    let topic = "devices/dev-7/telemetry";
    assert_eq!(
        d.push(br#"{"device_id":"dev-7","ts":5}"#, topic, &meta()),
        None
    );
    assert_eq!(
        d.push(br#"{"ts":6}"#, topic, &meta()),
        None,
        "key from the topic"
    );
    let forged = br#"{"device_id":"dev-8","ts":7}"#;
    assert_eq!(
        d.push(forged, topic, &meta()),
        Some(Reason::IdentityMismatch)
    );
    let escaped = br#"{"device_id":"dev\u002d8","ts":7}"#;
    assert_eq!(
        d.push(escaped, topic, &meta()),
        Some(Reason::IdentityMismatch)
    );
    assert_eq!(
        d.push(forged, "shared/x", &meta()),
        None,
        "no {{client_id}} in the topic's pattern: no identity to compare"
    );
    let out = d.flush();
    assert_eq!(out.rows.expect("rows").num_rows(), 3);
    let dead = out.dead_letters.expect("dead letters");
    let reasons = dead
        .column_by_name("reason")
        .expect("reason")
        .as_string::<i32>();
    assert_eq!(reasons.value(0), "identity_mismatch");
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

/// A device clock far ahead would open an hour partition per row: an event time
/// more than `max_ahead_ms` after the row's arrival is a `bad_timestamp` dead letter,
/// on both decode paths (a number, and RFC 3339 text). The past is bounded only when
/// asked to.
#[test]
fn an_event_time_too_far_ahead_of_its_arrival_is_a_bad_timestamp() {
    // meta(): arrived 2026-01-01T00:00:01.999Z.
    let ahead = DecodeLimits {
        max_ahead_ms: Some(86_400_000),
        ..DecodeLimits::default()
    };
    let details = time_bound_details(
        ahead,
        &[
            (br#"{"device_id":"a","ts":1767312000000}"#, None), // 24 h later
            (
                br#"{"device_id":"a","ts":1767312002000}"#,
                Some(Reason::BadTimestamp),
            ),
            (br#"{"device_id":"a","ts":"2026-01-01T23:00:00Z"}"#, None),
            (
                br#"{"device_id":"a","ts":"2031-01-01T00:00:00Z"}"#,
                Some(Reason::BadTimestamp),
            ),
            (br#"{"device_id":"a","ts":1000}"#, None), // the past is not bounded
        ],
    );
    assert!(
        details[1].contains("2031-01-01T00:00:00.000Z") && details[1].contains("1day"),
        "{details:?}"
    );
    let behind = DecodeLimits {
        max_behind_ms: Some(3_600_000),
        ..DecodeLimits::default()
    };
    let details = time_bound_details(
        behind,
        &[
            (br#"{"device_id":"a","ts":1767222001999}"#, None), // 1 h before
            (
                br#"{"device_id":"a","ts":1767222001998}"#,
                Some(Reason::BadTimestamp),
            ),
            (
                br#"{"device_id":"a","ts":"1970-01-01T00:00:00Z"}"#,
                Some(Reason::BadTimestamp),
            ),
            (br#"{"device_id":"a","ts":"2099-01-01T00:00:00Z"}"#, None),
        ],
    );
    assert!(
        details[1].contains("1970-01-01T00:00:00.000Z")
            && details[1].contains("behind")
            && details[1].contains("max_event_time_behind"),
        "{details:?}"
    );
}

/// Pushes each payload (arrived at `meta()`) through a telemetry decoder with
/// `limits`, checking what each push returns; the dead letters' details.
fn time_bound_details(limits: DecodeLimits, cases: &[(&[u8], Option<Reason>)]) -> Vec<String> {
    let schema = StreamSchema::builtin("telemetry").expect("builtin");
    let mut d = Decoder::new(schema, "telemetry", "plant", None, limits);
    for (payload, want) in cases {
        assert_eq!(
            d.push(payload, "t", &meta()),
            *want,
            "{}",
            String::from_utf8_lossy(payload)
        );
    }
    let out = d.flush();
    let kept = cases.iter().filter(|(_, want)| want.is_none()).count();
    assert_eq!(out.rows.expect("rows").num_rows(), kept);
    let dead = out.dead_letters.expect("dead");
    let details = dead
        .column(dead.schema().index_of("detail").expect("detail"))
        .as_string::<i32>();
    details
        .iter()
        .map(|d| d.unwrap_or_default().to_owned())
        .collect()
}

/// A detail quotes the bad value; a device sending a 60 KB timestamp of characters
/// that print six bytes each must not get a 360 KB detail per message (8,192 of them
/// would pass Arrow's 2 GiB for one column).
#[test]
fn a_dead_letters_detail_is_kept_to_a_prefix() {
    let ts = "\u{7f}".repeat(60_000);
    let payload = format!(r#"{{"device_id":"d","ts":"{ts}"}}"#);
    let mut d = telemetry();
    assert_eq!(
        d.push(payload.as_bytes(), "devices/d/telemetry", &meta()),
        Some(Reason::BadTimestamp)
    );
    assert!(d.buffered_bytes() >= payload.len());
    let dead = d.flush().dead_letters.expect("dead");
    let detail = dead
        .column(dead.schema().index_of("detail").expect("detail"))
        .as_string::<i32>()
        .value(0)
        .to_owned();
    assert!(detail.len() <= DETAIL_CAP, "{} bytes", detail.len());
    assert!(detail.starts_with("field \"ts\""), "{detail}");
    assert!(detail.ends_with('…'));
    assert_eq!(d.buffered_bytes(), 0, "a flush starts the count again");
    assert_eq!(clip("héllo", 5), "h…", "cut at a character boundary");
    assert_eq!(clip("short", 10), "short");
}

mod fast_path {
    use proptest::prelude::*;

    use super::*;

    /// Checks the fast path against the full one on `text`.
    fn agree(text: &str) -> Result<(), TestCaseError> {
        paths_agree(text).map_err(TestCaseError::fail)
    }

    #[test]
    fn handpicked_cases_agree() {
        for text in [
            r#"{"device_id":"d","ts":1,"temperature":21.47,"humidity":80,"battery":-0.0,"status":"ok"}"#,
            r#" { "ts" : "2026-01-01T00:00:03.120Z" , "device_id" : "x" } "#,
            r#"{"device_id":"d","ts":1,"x":1e999}"#,
            r#"{"device_id":"d","ts":1,"temperature":1e308,"humidity":2.5E-3}"#,
            r#"{"device_id":"d","ts":01}"#,
            r#"{"device_id":"d","ts":1,}"#,
            r#"{"device_id":"d","ts":1}{"#,
            r#"{"device_id":"d","ts":1,"status":null,"x":true,"y":false,"z":"q"}"#,
            r#"{"device_id":"d","device_id":"e","ts":2}"#,
            r#"{"device_id":"d","ts":-1}"#,
            r#"{"device_id":"d","ts":1.5}"#,
            r#"{"device_id":"d","ts":1,"temperature":"1"}"#,
            r#"{"device_id":"d\"q","ts":1}"#,
            r#"{"device_id":"ü€😀","ts":1}"#,
            r#"{"device_id":"d","ts":1,"temperature":nul}"#,
            r#"{"device_id":"d","ts":1,"temperature":-}"#,
            r#"{"device_id":"d","ts":1,"temperature":1.}"#,
            r#"{"device_id":"d","ts":1,"temperature":.5}"#,
            r#"{}"#,
            "{\"device_id\":\"a\tb\",\"ts\":1}",
        ] {
            agree(text).unwrap();
        }
    }

    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9 _-]{0,8}".prop_map(|s| format!("\"{s}\"")),
            r#"[a-z"\\/\u{e9}]{0,6}"#.prop_map(|s| serde_json::to_string(&s).unwrap()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f}")),
            any::<f64>().prop_map(|f| format!("{f:e}")),
            (any::<i64>(), 0u32..30).prop_map(|(m, k)| format!("{m}e-{k}")),
            (any::<u32>(), 0u32..12).prop_map(|(m, k)| {
                let digits = m.to_string();
                let k = (k as usize).min(digits.len().saturating_sub(1));
                if k == 0 {
                    digits
                } else {
                    format!(
                        "{}.{}",
                        &digits[..digits.len() - k],
                        &digits[digits.len() - k..]
                    )
                }
            }),
            "-?[0-9]{1,25}(\\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?",
            (0i64..=253_402_300_799_999).prop_map(|n| n.to_string()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("null".to_owned()),
            Just("\"2026-01-01T00:00:03.120Z\"".to_owned()),
            Just("\"2026-01-01T00:00:03+02:00\"".to_owned()),
            Just("[1,{\"a\":2}]".to_owned()),
            Just("{\"n\":{\"m\":[]}}".to_owned()),
        ]
    }

    fn object() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("device_id"),
            Just("ts"),
            Just("temperature"),
            Just("humidity"),
            Just("battery"),
            Just("status"),
            Just("extra"),
            Just("device\\u005fid"),
        ];
        let ws = prop_oneof![Just(""), Just(" "), Just("\n\t ")];
        prop::collection::vec((key, scalar(), ws), 0..8).prop_map(|members| {
            let body: Vec<String> = members
                .iter()
                .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}"))
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the fast path accepts, serde_json accepts with the same values.
        #[test]
        fn fast_path_agrees_with_serde(text in object()) {
            agree(&text)?;
        }

        /// ... also for corrupted messages.
        #[test]
        fn fast_path_agrees_on_corrupted_input(text in object(), at in any::<prop::sample::Index>(), byte in prop_oneof![Just(b'"'), Just(b','), Just(b'}'), Just(b'1'), Just(b'e'), Just(b' '), Just(b'-')], delete in any::<bool>()) {
            let mut bytes = text.into_bytes();
            let i = at.index(bytes.len());
            if delete { bytes.remove(i); } else { bytes.insert(i, byte); }
            if let Ok(text) = String::from_utf8(bytes) {
                agree(&text)?;
            }
        }
    }
}

#[test]
fn hops_come_from_the_payload_or_the_header_and_too_many_are_a_loop() {
    let limits = DecodeLimits {
        max_hops: 3,
        ..DecodeLimits::default()
    };
    let schema = StreamSchema::builtin("telemetry").expect("builtin");
    let mut d = Decoder::new(schema, "telemetry", "plant", None, limits);
    let header = |hops| MessageMeta { hops, ..meta() };
    // Fast path, full parser (nested value elsewhere), header only, header larger.
    assert_eq!(
        d.push(br#"{"device_id":"a","ts":1,"_hops":2}"#, "t", &meta()),
        None
    );
    assert_eq!(
        d.push(
            br#"{"device_id":"b","ts":1,"_hops":3,"x":{"y":1}}"#,
            "t",
            &meta()
        ),
        None
    );
    assert_eq!(
        d.push(br#"{"device_id":"c","ts":1}"#, "t", &header(1)),
        None
    );
    assert_eq!(
        d.push(br#"{"device_id":"d","ts":1,"_hops":1}"#, "t", &header(2)),
        None
    );
    let loop_ = Some(Reason::LoopDetected);
    assert_eq!(
        d.push(br#"{"device_id":"e","ts":1,"_hops":4}"#, "t", &meta()),
        loop_
    );
    assert_eq!(
        d.push(br#"{"device_id":"f","ts":1,"_hops":900}"#, "t", &meta()),
        loop_
    );
    assert_eq!(
        d.push(br#"{"device_id":"g","ts":1}"#, "t", &header(4)),
        loop_
    );
    assert_eq!(
        d.push(br#"{"device_id":"h","ts":1,"_hops":"x"}"#, "t", &meta()),
        Some(Reason::WrongType)
    );
    let out = d.flush();
    let rows = out.rows.expect("rows");
    let hops = rows
        .column_by_name("_hops")
        .expect("_hops")
        .as_any()
        .downcast_ref::<arrow::array::UInt8Array>()
        .expect("u8");
    assert_eq!(hops.values().to_vec(), vec![2, 3, 1, 2]);
    let dead = out.dead_letters.expect("dead");
    let reasons = dead
        .column_by_name("reason")
        .expect("reason")
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .expect("utf8");
    let reasons: Vec<&str> = reasons.iter().map(Option::unwrap_or_default).collect();
    assert_eq!(
        reasons,
        [
            "loop_detected",
            "loop_detected",
            "loop_detected",
            "wrong_type"
        ]
    );
}
