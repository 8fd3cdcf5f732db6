//! The lake as Delta tables, through a running `sluice run`: compaction, retention and
//! vacuum beside ingest; time travel; DuckDB (its `delta` extension) and Python
//! `deltalake` agreeing with `sluice query` row for row.

use std::path::Path;

use crate::support::*;

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Ten telemetry lines at `ts`; each temperature is unique (`tag` + i / 100), so a
/// sorted list of (device, temperature) names every row.
fn lines(ts: i64, tag: f64) -> String {
    (0..10)
        .map(|i| {
            format!(
                r#"{{"device_id":"d{}","ts":{},"temperature":{:.2}}}"#,
                i % 4,
                ts + i,
                tag + f64::from(i as u8) / 100.0
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ingest(service: &Service, body: &str) {
    let answer = http_request(&service.http, "POST", "/api/ingest/telemetry", body);
    assert_eq!(answer.map(|(code, _)| code), Some(200), "ingest accepted");
}

fn count(dir: &Path, sql: &str) -> u64 {
    query_json(dir, sql)[0]["n"].as_u64().expect("n")
}

/// `(device_id, temperature)` of every row, sorted, as DuckDB and Python deltalake
/// read the table through its log, and as `sluice query` does: all three must agree.
fn rows_three_ways(dir: &Path, table: &str) -> Vec<(String, String)> {
    let out = run_python(&format!(
        r#"{DUCKDB_DELTA}
import deltalake, json
path = {path:?}
duck_rows = sorted((d, round(t, 2)) for d, t in duck().execute(f"SELECT device_id, temperature FROM delta_scan('{{path}}')").fetchall())
t = deltalake.DeltaTable(path).to_pyarrow_table()
py_rows = sorted(zip(t.column("device_id").to_pylist(), [round(x, 2) for x in t.column("temperature").to_pylist()]))
assert duck_rows == py_rows, (len(duck_rows), len(py_rows))
print(json.dumps(duck_rows))
"#,
        path = dir.join(table).to_string_lossy(),
    ));
    let theirs: Vec<(String, f64)> = serde_json::from_str(out.trim()).expect("rows");
    let ours: Vec<(String, f64)> = query_json(
        dir,
        &format!("SELECT device_id, temperature FROM {table} ORDER BY device_id, temperature"),
    )
    .iter()
    .map(|r| {
        (
            r["device_id"].as_str().unwrap_or("").to_owned(),
            r["temperature"].as_f64().unwrap_or(f64::NAN),
        )
    })
    .collect();
    let text = |rows: Vec<(String, f64)>| -> Vec<(String, String)> {
        let mut rows: Vec<_> = rows
            .into_iter()
            .map(|(d, t)| (d, format!("{t:.2}")))
            .collect();
        rows.sort();
        rows
    };
    let (theirs, ours) = (text(theirs), text(ours));
    assert_eq!(
        ours, theirs,
        "sluice query agrees with DuckDB and deltalake"
    );
    ours
}

/// 40 days of readings arrive in three rounds (so each day's partition has three
/// small files), with `retain = 30d`: retention removes the oldest ten days,
/// compaction merges each remaining partition into one file, vacuum (grace 0) deletes
/// what the log no longer names, and every reader agrees on what is left.
#[test]
fn compaction_retention_and_vacuum_keep_a_table_of_40_days() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "lake.toml",
        r#"
[lake]
roll_interval = "100ms"
checkpoint_interval = "200ms"
retain = { telemetry = "30d" }
[lake.maintenance]
interval = "1s"
closed_after = "0s"
vacuum_grace = "0s"
vacuum_interval = "1s"
read_rate = "1GB"
[streams.telemetry]
schema = "telemetry"
"#,
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    // Two hours back from each day, so a partition is never the one the cut-off falls in.
    let now = now_ms();
    for round in 0..3 {
        for day in 0..40 {
            let ts = now - day * DAY_MS - 2 * 3_600_000 + round;
            ingest(&service, &lines(ts, (day * 3 + round) as f64));
        }
        let files = (round as f64 + 1.0) * 40.0;
        service.wait_until("the round's files to be committed", || {
            service.metric_sum(
                "sluice_lake_files_committed_total",
                &["table=\"telemetry\""],
            ) >= files
        });
    }
    let table = dir.join("telemetry");
    service.wait_until("retention, compaction and vacuum", || {
        count(&dir, "SELECT count(*) AS n FROM telemetry") == 900
            && crate_parquet_files(&table) == 30
            && delta_files(&table) == 30
    });
    let rows = rows_three_ways(&dir, "telemetry");
    assert_eq!(rows.len(), 900);
    assert!(
        service.metric_sum(
            "sluice_lake_compaction_runs_total",
            &["table=\"telemetry\""]
        ) >= 1.0
    );
    assert!(
        service.metric_sum("sluice_lake_expired_files_total", &["table=\"telemetry\""]) >= 10.0
    );
    assert!(service.metric_sum("sluice_lake_table_files", &["table=\"telemetry\""]) >= 1.0);
    service.stop();
}

/// Parquet files in a table's directory, referenced or not.
fn crate_parquet_files(table: &Path) -> usize {
    files_under(table)
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
        .count()
}

/// Files the table's current version names (Python deltalake).
fn delta_files(table: &Path) -> usize {
    run_python(&format!(
        "import deltalake\nprint(len(deltalake.DeltaTable({:?}).file_uris()))",
        table.to_string_lossy()
    ))
    .trim()
    .parse()
    .expect("file count")
}

/// `"table@version"` and `"table@time"` read the table as it was.
#[test]
fn time_travel_reads_a_version_and_a_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "travel.toml",
        r#"
[lake]
roll_interval = "100ms"
checkpoint_interval = "200ms"
[streams.telemetry]
schema = "telemetry"
"#,
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    let ts = now_ms();
    ingest(&service, &lines(ts, 1.0));
    service.wait_until("the first rows", || {
        has_table(&dir, "telemetry") && count(&dir, "SELECT count(*) AS n FROM telemetry") == 10
    });
    let version = std::fs::read_dir(dir.join("telemetry").join("_delta_log"))
        .expect("log")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json")?.parse::<u64>().ok()
        })
        .max()
        .expect("a version");
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let between = rfc3339(now_ms());
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    ingest(&service, &lines(ts, 2.0));
    service.wait_until("the second rows", || {
        count(&dir, "SELECT count(*) AS n FROM telemetry") == 20
    });
    assert_eq!(
        count(
            &dir,
            &format!(r#"SELECT count(*) AS n FROM "telemetry@{version}""#)
        ),
        10
    );
    assert_eq!(
        count(
            &dir,
            &format!(r#"SELECT count(*) AS n FROM "telemetry@{between}""#)
        ),
        10
    );
    let out = sluice(&[
        "query",
        "--data-dir",
        dir.to_str().expect("utf8"),
        r#"SELECT count(*) FROM "telemetry@yesterday""#,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RFC 3339"),
        "a bad version says what to give"
    );
    service.stop();
}

/// Epoch ms as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
fn rfc3339(ms: i64) -> String {
    let out = run_python(&format!(
        "import datetime\nprint(datetime.datetime.fromtimestamp({ms} / 1000, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'))"
    ));
    out.trim().to_owned()
}

/// Two writers append to one table on S3 (SeaweedFS) at once, 20 commits each: the
/// store's conditional put gives each log version to one of them, the loser retries on
/// the next, and every file lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_appending_to_one_s3_table_at_once_each_land_once() {
    use std::sync::Arc;

    use arrow::array::{Int64Array, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use sluice_core::schema::{EVENT_TIME_META, timestamp_type};
    use sluice_sinks::delta::DeltaTables;
    use sluice_sinks::parquet::{Lake, LakeOptions};

    let (location, bucket, opts) = s3_lake("race");
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("ts", timestamp_type(), false),
            Field::new("id", DataType::Int64, false),
        ],
        [(EVENT_TIME_META.to_owned(), "ts".to_owned())].into(),
    ));
    let table: Arc<str> = "t".into();
    // Each writer's 20 files, one row each, stored by a real lake writer.
    let mut files = Vec::new();
    for writer in 0..2i64 {
        let mut lake = Lake::open(
            LakeOptions {
                roll_size: 1 << 30,
                roll_interval_ms: 1_000,
                row_group_rows: 1024,
                zstd_level: 1,
            },
            &location,
            Arc::new(sluice_core::SystemClock),
        )
        .expect("lake");
        let mut mine = Vec::new();
        for i in 0..20 {
            let id = writer * 100 + i;
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(
                        TimestampMillisecondArray::from(vec![1_767_225_600_000])
                            .with_timezone("UTC"),
                    ),
                    Arc::new(Int64Array::from(vec![id])),
                ],
            )
            .expect("batch");
            lake.write(&table, &batch).expect("write");
            lake.close_all().await.expect("store");
            mine.extend(lake.take_written().remove(&table).expect("written").files);
        }
        files.push(mine);
    }
    let mut a = DeltaTables::at(&location);
    let mut b = DeltaTables::at(&location);
    a.ensure("t", &schema).await.expect("create");
    let (files_a, files_b) = (files[0].clone(), files[1].clone());
    tokio::join!(append_each(&mut a, files_a), append_each(&mut b, files_b));
    let out = run_python(&format!(
        r#"import deltalake
t = deltalake.DeltaTable("s3://{bucket}/lake/t", storage_options={opts})
ids = t.to_pyarrow_table().column("id").to_pylist()
print(t.version(), len(ids), len(set(ids)))
"#
    ));
    let seen: Vec<u64> = out
        .split_whitespace()
        .map(|n| n.parse().expect("number"))
        .collect();
    assert_eq!(
        seen,
        [40, 40, 40],
        "version 0 creates; 40 appends, 40 rows, each once"
    );
}

/// Appends `files` to table `t`, one commit each.
async fn append_each(
    tables: &mut sluice_sinks::delta::DeltaTables,
    files: Vec<sluice_sinks::parquet::DataFile>,
) {
    for file in files {
        tables
            .append("t", &[file], None)
            .await
            .expect("append lands");
    }
}

/// Compaction on S3 (SeaweedFS) of an hour whose merged file is larger than one
/// upload part (8 MB): the file goes out a row group at a time, as the sort makes it,
/// in a multipart upload, and memory never holds it whole. deltalake (Python) then
/// reads one file holding every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_on_s3_uploads_a_file_larger_than_a_part_in_parts_and_keeps_every_row() {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use sluice_core::schema::{EVENT_TIME_META, KEY_META, timestamp_type};
    use sluice_sinks::delta::DeltaTables;
    use sluice_sinks::delta::maintain::{MaintainOptions, Maintenance};
    use sluice_sinks::parquet::{Lake, LakeOptions};

    let (location, bucket, opts) = s3_lake("compact");
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("ts", timestamp_type(), false),
            Field::new("k", DataType::Utf8, false),
            Field::new("id", DataType::Int64, false),
        ],
        [
            (EVENT_TIME_META.to_owned(), "ts".to_owned()),
            (KEY_META.to_owned(), "k".to_owned()),
        ]
        .into(),
    ));
    // Three files of 150,000 rows in one hour, each keyed by 64 random hex digits
    // (xorshift: zstd cannot shrink them much), about 15 MB merged.
    let t0 = 1_767_225_600_000i64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut lake = Lake::open(
        LakeOptions {
            roll_size: 1 << 30,
            roll_interval_ms: 1_000,
            row_group_rows: 65_536,
            zstd_level: 1,
        },
        &location,
        Arc::new(sluice_core::SystemClock),
    )
    .expect("lake");
    let table: Arc<str> = "t".into();
    let (files, rows) = (3i64, 150_000i64);
    let mut written = Vec::new();
    for f in 0..files {
        let ids: Vec<i64> = (f * rows..(f + 1) * rows).collect();
        let keys: Vec<String> = ids
            .iter()
            .map(|_| {
                format!(
                    "{:016x}{:016x}{:016x}{:016x}",
                    random(),
                    random(),
                    random(),
                    random()
                )
            })
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(
                    TimestampMillisecondArray::from_iter_values(ids.iter().map(|i| t0 + i * 7))
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(keys)),
                Arc::new(Int64Array::from(ids)),
            ],
        )
        .expect("batch");
        lake.write(&table, &batch).expect("write");
        lake.close_all().await.expect("store");
        written.extend(lake.take_written().remove(&table).expect("written").files);
    }
    let mut tables = DeltaTables::at(&location);
    tables.ensure("t", &schema).await.expect("create");
    tables.append("t", &written, None).await.expect("append");
    let mut upkeep = Maintenance::new(
        DeltaTables::at(&location),
        location.store().clone(),
        MaintainOptions {
            target_size: 128 << 20,
            closed_after: std::time::Duration::from_secs(600),
            open_min_files: 50,
            read_rate: 0,
            zstd_level: 1,
            row_group_rows: 65_536,
            memory: 64 << 20,
            retain: Default::default(),
            vacuum_grace: std::time::Duration::from_secs(7 * 86_400),
            vacuum_interval: std::time::Duration::from_secs(86_400),
        },
        Arc::new(sluice_core::ManualClock::new(t0 + 3 * 3_600_000)),
    );
    let done = upkeep.compact("t").await.expect("compaction");
    assert_eq!(
        (done.compacted_files, done.written_files),
        (3, 1),
        "{done:?}"
    );
    let out = run_python(&format!(
        r#"import deltalake, pyarrow
t = deltalake.DeltaTable("s3://{bucket}/lake/t", storage_options={opts})
ids = t.to_pyarrow_table().column("id").to_pylist()
adds = pyarrow.table(t.get_add_actions(flatten=True)).to_pydict()
print(len(ids), len(set(ids)), len(adds["path"]), adds["size_bytes"][0])
"#
    ));
    let seen: Vec<u64> = out
        .split_whitespace()
        .map(|n| n.parse().expect("number"))
        .collect();
    let total = (files * rows) as u64;
    assert_eq!(seen[..3], [total, total, 1], "every row once, in one file");
    assert!(
        seen[3] > 8 << 20,
        "larger than one 8 MB part, so uploaded in parts: {} bytes",
        seen[3]
    );
    eprintln!("compacted file: {} bytes", seen[3]);
}

/// A lake at `s3://<a new bucket named after name>/lake` on the test S3 server, with
/// its credentials in the environment for the AWS chain (nextest runs each test in a
/// process of its own); the bucket, and Python deltalake's `storage_options` for it.
fn s3_lake(name: &str) -> (sluice_sinks::location::LakeLocation, String, String) {
    use sluice_sinks::location::{LakeLocation, S3Options};

    let (endpoint, key, secret) = s3();
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", &key);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", &secret);
    }
    let bucket = create_bucket(name);
    let options = S3Options {
        endpoint: Some(endpoint.clone()),
        path_style: true,
        allow_http: true,
        region: None,
    };
    let location = LakeLocation::open(Path::new(&format!("s3://{bucket}/lake")), &options)
        .expect("the S3 lake");
    let opts = format!(
        r#"{{"AWS_ENDPOINT_URL": {endpoint:?}, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": {key:?}, "AWS_SECRET_ACCESS_KEY": {secret:?}, "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false"}}"#
    );
    (location, bucket, opts)
}
