//! Exactly-once into the lake: a million events through a real broker while `sluice`
//! is killed with SIGKILL at random moments, then every event is in the raw table
//! exactly once and the window table equals the batch computation.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Events each crash test produces.
const EVENTS: u64 = 1_000_000;
/// SIGKILLs per crash test.
const KILLS: usize = 10;
/// Event time of the first event; event `i` is at `T0 + 2 i` ms (2000 s in all).
const T0: u64 = 1_767_225_600_000;
/// Event time of the sentinels sent last, one per partition, to close every window.
const SENTINEL: u64 = T0 + 3_000_000;

/// The stream (with a unique `id` per event) and a per-device minute window.
const PIPELINE: &str = r#"
[lake]
roll_interval = "500ms"
checkpoint_interval = "1s"
[streams.events]
fields = [
  { name = "device_id", type = "string", required = true },
  { name = "ts", type = "timestamp", required = true },
  { name = "id", type = "int", required = true },
  { name = "temperature", type = "float" },
]
key = "device_id"
# A partition silent this long stops holding the watermark back. tansu (SQLite storage,
# after a restart) can serve one partition's records tens of seconds after the others;
# the default 30 s would then rightly call it idle and its rows late.
idle_timeout = "5m"
[windows.device_minute]
input = "events"
kind = "tumbling"
size = "1m"
group_by = ["device_id"]
select = ["count(*) AS n", "sum(id) AS id_sum", "max(temperature) AS t_max"]
"#;

/// A small xorshift, seeded from the clock and printed, so a failing run can be told
/// apart from another; the test needs no statistical quality.
struct Moments(u64);

impl Moments {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("kill moments seed {seed}");
        Self(seed)
    }

    /// A delay between `min` and `max` milliseconds.
    fn next_ms(&mut self, min: u64, max: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(min + self.0 % (max - min))
    }
}

/// Starts the service, SIGKILLs it `KILLS` times at random moments between
/// `min_ms` and `max_ms` after it is up (restarting each time), then lets it run until
/// `done` holds and stops it cleanly.
fn crash_loop(dir: &Path, config: &Path, (min_ms, max_ms): (u64, u64), done: impl FnMut() -> bool) {
    let mut moments = Moments::new();
    let args = ["--config", config.to_str().expect("utf8")];
    // moto takes any credentials; the SDK's chain needs some.
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    for round in 0..KILLS {
        let mut service = Service::start_with_env(dir, &args, &env);
        std::thread::sleep(moments.next_ms(min_ms, max_ms));
        service.kill9();
        eprintln!("kill -9 #{} done", round + 1);
    }
    let mut service = Service::start_with_env(dir, &args, &env);
    wait_long(&service, "the lake to catch up", done);
    service.stop();
}

fn count(dir: &Path, sql: &str) -> u64 {
    query_json(dir, sql)[0]["n"].as_u64().expect("n")
}

/// `(rows, distinct ids)` in the raw table (0 before it exists).
fn raw_counts(dir: &Path) -> (u64, u64) {
    if !has_table(dir, "events") {
        return (0, 0);
    }
    counts_of(query_json(dir, RAW_COUNTS).first())
}

/// The query behind [`raw_counts`].
const RAW_COUNTS: &str = "SELECT count(*) AS n, count(DISTINCT id) AS d FROM events";

/// `(n, d)` of a [`RAW_COUNTS`] row; `(0, 0)` without one.
fn counts_of(row: Option<&serde_json::Map<String, serde_json::Value>>) -> (u64, u64) {
    row.map_or((0, 0), |row| {
        (
            row["n"].as_u64().unwrap_or(0),
            row["d"].as_u64().unwrap_or(0),
        )
    })
}

/// Rows where the window table and the batch computation disagree (either side
/// missing, a value off, or a re-emitted version); 0 when they are equal.
fn window_mismatches(dir: &Path) -> u64 {
    count(dir, WINDOW_MISMATCHES)
}

/// The query behind [`window_mismatches`].
const WINDOW_MISMATCHES: &str = "WITH b AS (
        SELECT device_id, date_bin(INTERVAL '1 minute', ts) AS ws, count(*) AS n,
               sum(id) AS id_sum, max(temperature) AS t_max
        FROM events WHERE device_id NOT LIKE 'zz-%' GROUP BY 1, 2),
     w AS (SELECT * FROM device_minute WHERE device_id NOT LIKE 'zz-%')
     SELECT count(*) AS n FROM b FULL OUTER JOIN w
       ON b.device_id = w.device_id AND b.ws = w.window_start
     WHERE b.device_id IS NULL OR w.device_id IS NULL OR w.version <> 1
        OR b.n <> w.n OR b.id_sum <> w.id_sum OR b.t_max <> w.t_max";

/// Event `i` as JSON: 500 devices, unique ids.
fn event_py() -> String {
    format!(
        r#"('{{"id":%d,"device_id":"d%03d","ts":%d,"temperature":%d}}' % (i, i % 500, {T0} + 2 * i, i % 97)).encode()"#
    )
}

/// A Python producer of `events` telemetry events with unique ids (500 devices, keyed
/// by device), then one sentinel per partition far ahead in event time.
fn spawn_kafka_producer(broker: &str, topic: &str, partitions: u32, events: u64) -> Child {
    spawn_kafka_producer_with(broker, topic, partitions, events, ONE_RECORD_BATCHES)
}

/// Producer settings for the shared tansu: one record per record batch. Its memory
/// storage engine answers a fetch from an offset inside a batch with the *next*
/// batch, skipping the rest (seen when a restart resumes at a checkpointed offset), so
/// multi-record batches would lose records in the broker.
const ONE_RECORD_BATCHES: &str = r#""linger.ms": 0, "batch.num.messages": 1"#;

/// Producer settings for a tansu on SQLite ([`OwnServer::tansu`]), which serves a fetch
/// from inside a batch: batches of many records, tens of times faster to produce, and
/// idempotent, so a request retried after a timeout is not written twice.
const IDEMPOTENT_BATCHES: &str = r#""linger.ms": 5, "enable.idempotence": True"#;

/// Batches of many records for a tansu on SQLite, not idempotent: across a broker
/// restart a retried request may be written twice, which the lake must then hold once
/// per record (an idempotent producer's sequence state may not survive the restart).
/// One request in flight, so that a retry cannot overtake the batch after it: with
/// librdkafka's default of many, a CI run saw 166 events of a key at offsets out of
/// their produced order, which is the producer's doing, not the lake's.
const BATCHES: &str = r#""linger.ms": 5, "max.in.flight.requests.per.connection": 1"#;

/// As [`spawn_kafka_producer`], with `settings` (Python dict entries) for librdkafka.
fn spawn_kafka_producer_with(
    broker: &str,
    topic: &str,
    partitions: u32,
    events: u64,
    settings: &str,
) -> Child {
    let code = format!(
        r#"
from confluent_kafka import Producer
# No delivery deadline: a million single-record batches keep tansu busy for minutes,
# and librdkafka's default of 300 s timed records out.
p = Producer({{"bootstrap.servers": "{broker}", {settings}, "message.timeout.ms": 0}})
def send(**kw):
    while True:
        try:
            p.produce("{topic}", **kw)
            return
        except BufferError:
            p.poll(0.05)
for i in range({events}):
    d = i % 500
    send(value={event}, key=("d%03d" % d).encode())
    if i % 10000 == 0:
        p.poll(0)
for part in range({partitions}):
    send(value=('{{"id":%d,"device_id":"zz-%d","ts":{SENTINEL}}}' % ({events} + part, part)).encode(),
         partition=part)
assert p.flush(1800) == 0
"#,
        event = event_py()
    );
    Command::new(python())
        .arg("-c")
        .arg(code)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the producer")
}

/// After the crash loop: every produced event exactly once, windows as in batch.
fn assert_exactly_once(dir: &Path, events: u64, expected: u64) {
    assert_log_landed_once(dir, events, expected, expected);
}

/// As [`assert_exactly_once`] for a source log of `records` records holding `expected`
/// distinct ids: more records than ids when a producer's retry across a broker restart
/// wrote an event twice (at two offsets). The lake must hold each record once.
fn assert_log_landed_once(dir: &Path, events: u64, expected: u64, records: u64) {
    assert_raw_once(dir, expected, records);
    assert_eq!(
        window_mismatches(dir),
        0,
        "window table = batch computation"
    );
    // Each of the 500 devices sends every second, so it has a window in each minute.
    let minutes = (events * 2).div_ceil(60_000);
    assert_eq!(
        count(
            dir,
            "SELECT count(*) AS n FROM device_minute WHERE device_id NOT LIKE 'zz-%'"
        ),
        500 * minutes,
        "every minute of every device was emitted once"
    );
}

/// The raw table holds each of the source log's `records` records once (`expected`
/// distinct ids), each device's events in the order they were produced.
fn assert_raw_once(dir: &Path, expected: u64, records: u64) {
    let row = &query_json(
        dir,
        "SELECT count(*) AS n, count(DISTINCT id) AS d,
                count(DISTINCT concat(_partition, '@', _offset)) AS p FROM events",
    )[0];
    let field = |k: &str| row[k].as_u64().expect("count");
    let (rows, ids, positions) = (field("n"), field("d"), field("p"));
    if (rows, ids, positions) != (records, expected, records) {
        // Where the repeats came from: the same (partition, offset) twice is ours; the
        // same id at two offsets was written twice into the source by the producer.
        let repeats = query_json(
            dir,
            "SELECT id, _partition, _offset, _ingest_time FROM events WHERE id IN
               (SELECT id FROM events GROUP BY id HAVING count(*) > 1) ORDER BY id LIMIT 20",
        );
        panic!(
            "rows, distinct ids, distinct (partition, offset) are {:?}; expected \
             {records} records with {expected} ids; repeated ids: {repeats:?}",
            (rows, ids, positions)
        );
    }
    // Per key, the lake holds each device's events in the order they were produced:
    // within a partition or shard `_offset` grows with `id`.
    assert_per_key_order(dir);
}

/// Offsets are decimal text; Kinesis sequence numbers have 56 digits, past any
/// decimal type, so they are compared as text padded to one width. HTTP ingest on a
/// node of a cluster numbers lines per node (`_partition` `http@<node>`), so its rows
/// are in order per node. An event a producer's retry wrote twice counts at its first
/// offset: its second copy follows later events of its key in the source itself.
fn assert_per_key_order(dir: &Path) {
    let disorder = count(
        dir,
        "SELECT count(*) AS n FROM (
           SELECT id, lag(id) OVER (PARTITION BY device_id, part ORDER BY first) AS prev
           FROM (SELECT id, device_id,
                        CASE WHEN _source = 'http' THEN _partition END AS part,
                        min(lpad(_offset, 64, '0')) AS first
                 FROM events WHERE device_id NOT LIKE 'zz-%'
                 GROUP BY id, device_id, part)) WHERE prev > id",
    );
    assert_eq!(disorder, 0, "per-key order by offset");
}

/// A config reading `topic` (as consumer group `topic`) into the pipeline.
fn kafka_config(dir: &Path, broker: &str, topic: &str) -> std::path::PathBuf {
    kafka_config_with(dir, broker, topic, "")
}

/// Compaction far more often than by default: every 2 s, of the open hour too.
const EAGER_COMPACTION: &str = r#"
[lake.maintenance]
interval = "2s"
open_min_files = 2
read_rate = "1GB"
"#;

/// Delta commits of `table` that compaction made (`OPTIMIZE`).
fn compactions(dir: &Path, table: &str) -> usize {
    if lakes_on_s3() {
        let (endpoint, key, secret) = s3();
        let out = run_python(&format!(
            r#"import deltalake
opts = {{"AWS_ENDPOINT_URL": {endpoint:?}, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": {key:?}, "AWS_SECRET_ACCESS_KEY": {secret:?}, "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false"}}
t = deltalake.DeltaTable("{}/{table}", storage_options=opts)
print(sum(1 for c in t.history() if c.get("operation") == "OPTIMIZE"))
"#,
            lake_url(dir)
        ));
        return out.trim().parse().expect("count");
    }
    std::fs::read_dir(dir.join(table).join("_delta_log"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path())
                        .is_ok_and(|text| text.contains(r#""operation":"OPTIMIZE""#))
                })
                .count()
        })
        .unwrap_or(0)
}

fn kafka_config_with(dir: &Path, broker: &str, topic: &str, extra: &str) -> std::path::PathBuf {
    let source = kafka_source(broker, topic, "");
    write_config(dir, "kafka.toml", format!("{PIPELINE}{extra}{source}"))
}

/// The `orders` source feeding `events` from `topic` (as group `topic`), with
/// `options` (lines of the source's keys) added.
fn kafka_source(broker: &str, topic: &str, options: &str) -> String {
    format!(
        r#"
[sources.orders]
type = "kafka"
brokers = "{broker}"
topics = ["{topic}"]
group_id = "{topic}"
stream = "events"
{options}"#
    )
}

#[test]
fn kafka_kill_9_ten_times_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A tansu of its own on SQLite, which serves fetches from inside a record batch,
    // so the producer sends many records a batch (see `IDEMPOTENT_BATCHES`) and every
    // restart resumes inside one.
    let server = OwnServer::tansu(tmp.path(), false);
    let broker = server.address();
    let topic = format!("eo-kafka-{}", std::process::id());
    let partitions = 3;
    create_kafka_topic(&broker, &topic, partitions);
    // Compaction runs beside ingest all along, so kills land in it too.
    let config = kafka_config_with(tmp.path(), &broker, &topic, EAGER_COMPACTION);
    let dir = tmp.path().join("lake");
    let mut producer =
        spawn_kafka_producer_with(&broker, &topic, partitions, EVENTS, IDEMPOTENT_BATCHES);
    let expected = EVENTS + u64::from(partitions);
    // tansu takes a few seconds to hand a rejoining member its partitions, so most
    // kills land after reading has started, some before.
    crash_loop(&dir, &config, (2_000, 10_000), || {
        raw_counts(&dir).0 >= expected && window_mismatches(&dir) == 0
    });
    assert!(producer.wait().expect("producer").success(), "producer");
    assert_exactly_once(&dir, EVENTS, expected);
    let compacted = compactions(&dir, "events");
    eprintln!("compaction commits to events during the crash runs: {compacted}");
    assert!(compacted > 0, "compaction ran during the crash runs");
}

/// Events the Kinesis resharding test produces (the kill test produces `EVENTS`).
const RESHARD_EVENTS: u64 = 200_000;

/// A boto3 Kinesis client `c` against `endpoint`, as Python.
fn kinesis_client_py(endpoint: &str) -> String {
    format!(
        r#"
import boto3, time
c = boto3.client("kinesis", endpoint_url="{endpoint}", region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test")
"#
    )
}

/// Creates a 2-shard stream and spawns a producer of `events` events in PutRecords
/// batches of 500, then one sentinel per open shard; it prints how many sentinels it
/// took. With `reshard`, shard 0 is split in two halfway. A call that fails (the server
/// restarting) is retried, so a batch whose answer was lost may be in the stream twice.
fn spawn_kinesis_producer(endpoint: &str, stream: &str, events: u64, reshard: bool) -> Child {
    spawn_kinesis_producer_of(endpoint, stream, (2, events, 0), reshard)
}

/// As [`spawn_kinesis_producer`], into a stream of `shards` shards, with at least
/// `sentinels` sentinels (one device each).
fn spawn_kinesis_producer_of(
    endpoint: &str,
    stream: &str,
    (shards, events, sentinels): (u32, u64, u64),
    reshard: bool,
) -> Child {
    let client = kinesis_client_py(endpoint);
    run_python(&format!(
        r#"{client}
c.create_stream(StreamName="{stream}", ShardCount={shards})
c.get_waiter("stream_exists").wait(StreamName="{stream}", WaiterConfig={{"Delay": 0.2}})
"#
    ));
    let code = format!(
        r#"{client}
def retry(call, **kw):
    while True:
        try:
            return call(StreamName="{stream}", **kw)
        except Exception:
            time.sleep(0.2)
n = {events}
for start in range(0, n, 500):
    if {reshard} and start == n // 2:
        parent = retry(c.list_shards)["Shards"][0]
        r = parent["HashKeyRange"]
        middle = (int(r["StartingHashKey"]) + int(r["EndingHashKey"])) // 2 + 1
        retry(c.split_shard, ShardToSplit=parent["ShardId"], NewStartingHashKey=str(middle))
        c.get_waiter("stream_exists").wait(StreamName="{stream}", WaiterConfig={{"Delay": 0.2}})
    recs = [{{"Data": {event}, "PartitionKey": "d%03d" % (i % 500)}} for i in range(start, min(n, start + 500))]
    while recs:
        r = retry(c.put_records, Records=recs)
        recs = [rec for rec, out in zip(recs, r["Records"]) if "ErrorCode" in out]
open_shards = {{s["ShardId"] for s in retry(c.list_shards)["Shards"]
               if "EndingSequenceNumber" not in s["SequenceNumberRange"]}}
shards, k = set(), 0
while (shards != open_shards or k < {sentinels}) and k < 1000:
    r = retry(c.put_record, PartitionKey="zz-%d" % k,
              Data=('{{"id":%d,"device_id":"zz-%d","ts":{SENTINEL}}}' % (n + k, k)).encode())
    shards.add(r["ShardId"])
    k += 1
print(k)
"#,
        reshard = if reshard { "True" } else { "False" },
        event = event_py(),
    );
    Command::new(python())
        .arg("-c")
        .arg(code)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the producer")
}

/// Waits for a producer from [`spawn_kinesis_producer`]; the sentinels it sent.
fn kinesis_sentinels(producer: Child) -> u64 {
    let out = producer.wait_with_output().expect("producer");
    assert!(out.status.success(), "producer");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("count")
}

/// The records in every shard of `stream`, read back from the server.
fn kinesis_records(endpoint: &str, stream: &str) -> u64 {
    let client = kinesis_client_py(endpoint);
    run_python(&format!(
        r#"{client}
n = 0
for s in c.list_shards(StreamName="{stream}")["Shards"]:
    it = c.get_shard_iterator(StreamName="{stream}", ShardId=s["ShardId"],
                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    while it:
        out = c.get_records(ShardIterator=it, Limit=10000)
        n += len(out["Records"])
        if not out["Records"] and out.get("MillisBehindLatest", 0) == 0:
            break
        it = out.get("NextShardIterator")
print(n)
"#
    ))
    .trim()
    .parse()
    .expect("count")
}

/// A config reading `stream` from the Kinesis server at `endpoint` into the pipeline.
fn kinesis_config(dir: &Path, endpoint: &str, stream: &str) -> std::path::PathBuf {
    let source = kinesis_source(endpoint, stream, "");
    write_config(dir, "kinesis.toml", format!("{PIPELINE}{source}"))
}

/// The `shards` source feeding `events` from Kinesis stream `stream`, with `options`
/// (lines of the source's keys) added.
fn kinesis_source(endpoint: &str, stream: &str, options: &str) -> String {
    format!(
        r#"
[sources.shards]
type = "kinesis"
kinesis_stream = "{stream}"
endpoint = "{endpoint}"
region = "us-east-1"
shard_refresh = "1s"
stream = "events"
{options}"#
    )
}

/// The test pipeline without its windows: window state does not move between the
/// nodes of a cluster yet.
fn raw_pipeline() -> &'static str {
    PIPELINE
        .split("[windows.device_minute]")
        .next()
        .expect("pipeline")
}

fn kinesis_crash_test(name: &str, events: u64, reshard: bool) -> tempfile::TempDir {
    let endpoint = kinesis_endpoint();
    let stream = format!("eo-{name}-{}", std::process::id());
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = kinesis_config(tmp.path(), &endpoint, &stream);
    let dir = tmp.path().join("lake");
    let producer = spawn_kinesis_producer(&endpoint, &stream, events, reshard);
    let sentinels = std::sync::OnceLock::new();
    let waiter = std::thread::spawn(move || kinesis_sentinels(producer));
    let mut waiter = Some(waiter);
    crash_loop(&dir, &config, (500, 4_000), || {
        if sentinels.get().is_none() && waiter.as_ref().is_some_and(|w| w.is_finished()) {
            let k = waiter.take().expect("waiter").join().expect("join");
            let _ = sentinels.set(k);
        }
        sentinels
            .get()
            .is_some_and(|k| raw_counts(&dir).0 >= events + k)
            && window_mismatches(&dir) == 0
    });
    let expected = events + sentinels.get().expect("producer finished");
    assert_exactly_once(&dir, events, expected);
    tmp
}

#[test]
fn kinesis_kill_9_ten_times_loses_and_duplicates_nothing() {
    kinesis_crash_test("kinesis", EVENTS, false);
}

/// Shard 0 split in two mid-stream: nothing lost, per-key order kept, and no record of
/// a child shard landed before the last of its parent (every batch is stamped with
/// `_ingest_time` when read, and a replay after a kill re-stamps it).
#[test]
fn kinesis_resharding_mid_stream_keeps_everything_in_order() {
    let tmp = kinesis_crash_test("reshard", RESHARD_EVENTS, true);
    assert_children_after_parent(
        &tmp.path().join("lake"),
        "shardId-000000000000",
        &["shardId-000000000002", "shardId-000000000003"],
    );
}

/// No record of the `children` of shard `parent` landed before the parent's last one
/// (every batch is stamped with `_ingest_time` when read), and each child has rows.
fn assert_children_after_parent(dir: &Path, parent: &str, children: &[&str]) {
    let shards = query_json(
        dir,
        "SELECT _partition AS shard, count(*) AS n,
                CAST(min(_ingest_time) AS BIGINT) AS first,
                CAST(max(_ingest_time) AS BIGINT) AS last FROM events GROUP BY 1 ORDER BY 1",
    );
    let shard = |id: &str| {
        shards
            .iter()
            .find(|s| s["shard"] == id)
            .unwrap_or_else(|| panic!("rows from {id}: {shards:?}"))
    };
    let parent = shard(parent);
    for child in children {
        let child = shard(child);
        assert!(
            parent["last"].as_u64() <= child["first"].as_u64(),
            "a child shard landed before its parent ended: {shards:?}"
        );
        assert!(child["n"].as_u64() > Some(0), "{shards:?}");
    }
}

/// The Kinesis server killed and restarted twice mid-stream (and `sluice` killed with
/// it once): the outage is logged once, and every record of the stream lands once.
#[test]
fn kinesis_broker_restarted_mid_stream_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut server = OwnServer::kinesalite(tmp.path());
    let endpoint = format!("http://{}", server.address());
    let stream = "restarts";
    let events = EVENTS;
    let config = kinesis_config(tmp.path(), &endpoint, stream);
    let dir = tmp.path().join("lake");
    let args = ["--config", config.to_str().expect("utf8")];
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let producer = spawn_kinesis_producer(&endpoint, stream, events, false);
    let mut service = Service::start_with_env(&dir, &args, &env);
    wait_long(&service, "rows to land", || raw_counts(&dir).0 > 0);
    server.stop();
    let before = raw_counts(&dir).0;
    std::thread::sleep(Duration::from_secs(3));
    server.restart();
    wait_long(&service, "more rows after the restart", || {
        raw_counts(&dir).0 > before
    });
    let log = service.log_text();
    assert_eq!(
        log.matches("kinesis trouble").count(),
        1,
        "the outage is logged once:\n{log}"
    );
    // Again, with a crash of ours while the server is away.
    server.stop();
    service.kill9();
    std::thread::sleep(Duration::from_secs(2));
    server.restart();
    let service = Service::start_with_env(&dir, &args, &env);
    let expected = events + kinesis_sentinels(producer);
    let records = kinesis_records(&endpoint, stream);
    finish_after_outages(
        service,
        &dir,
        events,
        (expected, records),
        "kinesis trouble",
    );
}

/// Another member joins the consumer group mid-stream, reads for a while without
/// committing, and leaves: `sluice` gives partitions up and gets them back after
/// records it handed on but has not committed, and every record lands exactly once.
#[test]
fn kafka_rebalance_mid_stream_loses_and_duplicates_nothing() {
    let broker = kafka();
    let topic = format!("rebalance-{}", std::process::id());
    let partitions = 3;
    let events = 20_000;
    create_kafka_topic(&broker, &topic, partitions);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = kafka_config(tmp.path(), &broker, &topic);
    // Read at 1,000 a second, so the rebalance comes mid-stream, with records handed
    // on past the last checkpoint.
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replacen(
        "stream = \"events\"\n",
        "stream = \"events\"\nlimit = { rate = 1000, burst = 500 }\n",
        1,
    );
    std::fs::write(&config, text).expect("config");
    let dir = tmp.path().join("lake");
    let mut producer = spawn_kafka_producer(&broker, &topic, partitions, events);
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    wait_long(&service, "rows to land", || raw_counts(&dir).0 > 0);
    let read = run_python(&format!(
        r#"
import time
from confluent_kafka import Consumer
c = Consumer({{"bootstrap.servers": "{broker}", "group.id": "{topic}",
               "enable.auto.commit": False, "auto.offset.reset": "earliest"}})
c.subscribe(["{topic}"])
n, deadline = 0, time.time() + 10
while time.time() < deadline:
    if (m := c.poll(0.2)) is not None and not m.error():
        n += 1
c.close()
print(n)
"#
    ));
    eprintln!("the other member read {} records", read.trim());
    // Assigned on start, then (after the member left, at once or after a round with
    // fewer partitions while it was there) every partition again.
    wait_long(&service, "every partition back", || {
        let log = service.log_text();
        let assigned: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("partitions assigned"))
            .collect();
        assigned.len() >= 2
            && assigned
                .last()
                .is_some_and(|l| (0..partitions).all(|p| l.contains(&format!("{topic}/{p}"))))
    });
    assert!(producer.wait().expect("producer").success(), "producer");
    let expected = events + u64::from(partitions);
    wait_long(&service, "every event", || {
        raw_counts(&dir).0 >= expected && window_mismatches(&dir) == 0
    });
    let replayed = service.metric_sum("sluice_source_replayed_skipped_total", &[]);
    eprintln!("records handed on before the rebalance, read again and skipped: {replayed}");
    service.stop();
    assert_exactly_once(&dir, events, expected);
    // A partition given back starts after what was handed on as of the last flush
    // (before, at the last commit: 8,192 records fetched again and skipped here); only
    // the few handed on since that flush come again.
    assert!(
        replayed < 1_000.0,
        "given-back partitions start after what was handed on: {replayed} fetched again"
    );
}

/// Nodes of one cluster over a 12-partition topic (or a Kinesis stream) that a
/// producer fills while they run: the same config (the raw stream only: window state
/// does not move with a partition yet), each node with its own `--node-id` and log file.
struct Cluster {
    tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    producer: Option<Producer>,
    /// Rows the raw table must end with (events plus one malformed line a partition),
    /// besides the sentinels a producer prints the number of.
    expected: u64,
    /// Whether the pipeline has the `device_minute` window, which must end equal to
    /// the batch computation, and the `first_minute` alert rule over it.
    windows: bool,
    /// The cluster's own broker and its directory, if it has one (stopped on drop).
    broker: Option<(OwnServer, tempfile::TempDir)>,
}

/// Why a Kafka cluster on tansu 0.6 can leave partitions unowned. A static member
/// (`group.instance.id`, the default in a cluster) that rejoins with changed metadata
/// is only "soft-updated" by tansu's coordinator (`administrator.rs`, `join`): no new
/// generation, so no rebalance. Cooperative-sticky relies on exactly that rejoin (a
/// member that revoked partitions rejoins listing fewer) for the second round that
/// hands the revoked partitions to their new owner; Kafka rebalances on it. Seen about
/// once in ten runs of the join-and-restarts test under load: two partitions assigned
/// to no node, never read.
const ORPHANS: &str = "tansu 0.6 starts no rebalance when a static member rejoins with new metadata, which cooperative-sticky's second round needs";

/// An alert rule over `device_minute` that fires for each device at its first minute
/// and resolves at its second: each fire and resolve must land once, though the
/// device's partition may move between the two.
const FIRST_MINUTE_ALERT: &str = r#"
[alerts.first_minute]
input = "device_minute"
condition = "window_start < '2026-01-01T00:01:00Z'"
group_by = ["device_id"]
"#;

/// Rule `first_minute`'s (device, event) pairs that are not in the `alerts` table
/// exactly once, of the 500 devices' fire and resolve.
fn alert_mismatches(dir: &Path) -> u64 {
    count(
        dir,
        "WITH d AS (SELECT DISTINCT device_id AS key FROM events WHERE device_id NOT LIKE 'zz-%'),
              e AS (SELECT * FROM (VALUES ('fire'), ('resolve')) AS v(event)),
              a AS (SELECT key, event, count(*) AS c FROM alerts WHERE rule = 'first_minute' GROUP BY 1, 2)
         SELECT count(*) AS n FROM (SELECT d.key, e.event FROM d CROSS JOIN e) x
           FULL OUTER JOIN a ON x.key = a.key AND x.event = a.event
         WHERE x.key IS NULL OR a.key IS NULL OR a.c <> 1",
    )
}

/// What fills a cluster's source.
enum Producer {
    /// A Python producer; it prints how many sentinels it sent besides, if any.
    Process(Child),
    /// An MQTT publisher; it returns how many publishes the broker acknowledged.
    Thread(std::thread::JoinHandle<u64>, u64),
}

impl Producer {
    /// Waits for it; the rows it sent beyond the cluster's `expected`.
    fn wait(self) -> u64 {
        match self {
            Producer::Process(child) => {
                let out = child.wait_with_output().expect("producer");
                assert!(out.status.success(), "producer");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            }
            Producer::Thread(thread, sent) => {
                assert_eq!(
                    thread.join().expect("producer"),
                    sent,
                    "every publish acknowledged"
                );
                0
            }
        }
    }
}

/// A failed cluster test keeps its directory (the nodes' logs) for a look; so does any
/// with `SLUICE_TEST_KEEP=1`.
impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SLUICE_TEST_KEEP").is_some() {
            self.tmp.disable_cleanup(true);
            eprintln!("kept {} (node logs)", self.tmp.path().display());
        }
    }
}

impl Cluster {
    /// Creates the topic and starts the producer; `source` is extra source settings.
    /// The pipeline has the `device_minute` window and an alert rule over it: their
    /// state is kept per partition and moves with it.
    fn start(name: &str, events: u64, source: &str) -> Self {
        Self::start_on(&kafka(), ONE_RECORD_BATCHES, name, events, source)
    }

    /// As [`Cluster::start`], on a tansu of its own that stores on SQLite, produced
    /// to in batches: the shared tansu (memory storage, one record per batch) slows to
    /// a few dozen records a second under a million records and three nodes.
    fn start_on_own_broker(name: &str, events: u64, source: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = OwnServer::tansu(dir.path(), false);
        let mut cluster =
            Self::start_on(&broker.address(), IDEMPOTENT_BATCHES, name, events, source);
        cluster.broker = Some((broker, dir));
        cluster
    }

    /// The cluster of [`Cluster::start`] on `broker`, its producer set with `settings`.
    fn start_on(broker: &str, settings: &str, name: &str, events: u64, source: &str) -> Self {
        let topic = format!("{name}-{}", std::process::id());
        let partitions = 12;
        create_kafka_topic(broker, &topic, partitions);
        let producer = spawn_kafka_producer_with(broker, &topic, partitions, events, settings);
        Self::of(
            &format!("{PIPELINE}{FIRST_MINUTE_ALERT}"),
            &kafka_source(broker, &topic, source),
            Some(Producer::Process(producer)),
            events + u64::from(partitions),
        )
    }

    /// A cluster of `pipeline` and `source`, fed by `producer` (or one set later).
    fn of(pipeline: &str, source: &str, producer: Option<Producer>, expected: u64) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = write_config(tmp.path(), "cluster.toml", format!("{pipeline}{source}"));
        Self {
            dir: tmp.path().join("lake"),
            producer,
            expected,
            windows: pipeline.contains("[windows."),
            tmp,
            config,
            broker: None,
        }
    }

    /// Two nodes' worth of a Kinesis stream of 4 shards, shard 0 split halfway, read
    /// with `lease_time` leases and 2,000 records a second per node.
    fn kinesis(name: &str, events: u64, lease_time: &str) -> Self {
        // Raw only: keyed work over Kinesis in a cluster goes through the repartition
        // topic (see `kinesis_cluster_repartitions_…`).
        Self::kinesis_of(raw_pipeline(), name, (events, 0), lease_time)
    }

    /// As [`Cluster::kinesis`], of `pipeline`, with at least `sentinels` sentinels.
    fn kinesis_of(
        pipeline: &str,
        name: &str,
        (events, sentinels): (u64, u64),
        lease_time: &str,
    ) -> Self {
        let endpoint = kinesis_endpoint();
        let stream = format!("{name}-{}", std::process::id());
        let options =
            format!("lease_time = \"{lease_time}\"\nlimit = {{ rate = 2000, burst = 500 }}\n");
        let producer = spawn_kinesis_producer_of(&endpoint, &stream, (4, events, sentinels), true);
        Self::of(
            pipeline,
            &kinesis_source(&endpoint, &stream, &options),
            Some(Producer::Process(producer)),
            events,
        )
    }

    fn node(&self, id: &str) -> Service {
        self.node_with(id, &self.config)
    }

    /// As [`Cluster::node`], with a config of its own.
    fn node_with(&self, id: &str, config: &Path) -> Service {
        let node = self.spawn_node(id, config);
        node.wait_until("health", || node.healthy());
        node
    }

    /// Node `id` of `config`, started but perhaps not up yet. The log of its last
    /// run, if any, is kept in [`Cluster::history_path`].
    fn spawn_node(&self, id: &str, config: &Path) -> Service {
        let args = ["--config", config.to_str().expect("utf8"), "--node-id", id];
        // kinesalite takes any credentials; the SDK's chain needs some. librdkafka's
        // group protocol at debug level, for the report of a stalled cluster.
        let env = [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("SLUICE_LOG", "info,librdkafka=debug"),
        ];
        if let Ok(last) = std::fs::read(self.log_path(id)) {
            let mut history = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.history_path(id))
                .expect("history");
            std::io::Write::write_all(&mut history, &last).expect("history");
        }
        Service::spawn_logged(&self.dir, self.log_path(id), &args, &env)
    }

    /// The logs of node `id`'s earlier runs.
    fn history_path(&self, id: &str) -> std::path::PathBuf {
        self.tmp.path().join(format!("{id}.history.log"))
    }

    fn log_path(&self, id: &str) -> std::path::PathBuf {
        self.tmp.path().join(format!("{id}.log"))
    }

    /// What `/api/cluster` of `node` says: node id → (ms silent, partitions owned).
    fn view(node: &Service) -> BTreeMap<String, (i64, Vec<String>)> {
        let body = http_get(&node.http, "/api/cluster").unwrap_or_default();
        let view: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        view["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let partitions = n["partitions"]
                    .as_object()
                    .into_iter()
                    .flat_map(|sources| sources.values())
                    .flat_map(|p| p.as_array().cloned().unwrap_or_default())
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect();
                let id = n["node_id"].as_str().unwrap_or_default().to_owned();
                (id, (n["silent_ms"].as_i64().unwrap_or(0), partitions))
            })
            .collect()
    }

    /// Whether, by `node`'s `/api/cluster`, the nodes reporting (silent for less than
    /// three 5 s rounds) are exactly `ids` and own the topic's 12 partitions between
    /// them, each once.
    fn own_every_partition(node: &Service, ids: &[&str]) -> bool {
        let view = Self::view(node);
        let live: Vec<&String> = view
            .iter()
            .filter(|(_, (silent, _))| *silent < 15_000)
            .map(|(id, _)| id)
            .collect();
        let mut owned: Vec<&String> = live.iter().flat_map(|id| &view[id.as_str()].1).collect();
        owned.sort();
        let total = owned.len();
        owned.dedup();
        live.len() == ids.len()
            && live.iter().all(|id| ids.contains(&id.as_str()))
            && total == 12
            && owned.len() == 12
    }

    /// How often `line` appears in the logs of nodes `ids`.
    fn count_in_logs(&self, ids: &[&str], line: &str) -> usize {
        ids.iter()
            .map(|id| {
                std::fs::read_to_string(self.log_path(id))
                    .unwrap_or_default()
                    .matches(line)
                    .count()
            })
            .sum()
    }

    /// As [`wait_long`], and on a timeout a report of what the lake holds of each
    /// partition, what each node says it owns, and how partitions moved. A cluster
    /// whose `/api/cluster` lists partitions no live node owns for two minutes fails
    /// then, with the same report (see [`ORPHANS`]).
    fn wait(&self, nodes: &[(&str, Service)], what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut orphaned_since = None;
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {}",
                self.report(nodes)
            );
            let unowned = Self::unowned(&nodes[0].1);
            if unowned.is_empty() {
                orphaned_since = None;
            } else {
                let since = *orphaned_since.get_or_insert_with(Instant::now);
                assert!(
                    since.elapsed() < Duration::from_secs(120),
                    "waiting for {what}, partitions {unowned:?} have had no owner for two minutes ({ORPHANS}): {}",
                    self.report(nodes)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The partitions `node`'s `/api/cluster` says no live node owns.
    fn unowned(node: &Service) -> Vec<String> {
        let body = http_get(&node.http, "/api/cluster").unwrap_or_default();
        let view: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        view["unowned"]
            .as_object()
            .into_iter()
            .flat_map(|sources| sources.values())
            .flat_map(|p| p.as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect()
    }

    /// What the lake holds of each partition, what each node says it owns, how
    /// partitions moved in each of its runs (librdkafka's group protocol at debug
    /// level where the test asks for it), and the end of each node's log.
    fn report(&self, nodes: &[(&str, Service)]) -> String {
        let partitions = if has_table(&self.dir, "events") {
            query_json(
                &self.dir,
                "SELECT _partition, count(*) AS n, count(DISTINCT id) AS d, \
                 max(CAST(_offset AS BIGINT)) AS last FROM events GROUP BY 1 ORDER BY 1",
            )
        } else {
            Vec::new()
        };
        let mut report = format!(
            "{} of {} rows; per partition: {partitions:?}\n",
            raw_counts(&self.dir).0,
            self.expected
        );
        for (id, node) in nodes {
            let cluster = http_get(&node.http, "/api/cluster").unwrap_or_default();
            let history = std::fs::read_to_string(self.history_path(id));
            let log = history.unwrap_or_default() + &node.log_text();
            let moves: Vec<&str> = log
                .lines()
                .filter(|l| {
                    [
                        "assign",
                        "revoke",
                        "fenced",
                        "rejoin",
                        "JoinGroup",
                        "SyncGroup",
                    ]
                    .iter()
                    .any(|w| l.contains(w))
                })
                .collect();
            let moves = moves[moves.len().saturating_sub(200)..].join("\n");
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("librdkafka")).collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            report += &format!(
                "--- node {id}: /api/cluster {cluster}\n{moves}\n--- end of its log:\n{tail}\n"
            );
        }
        report
    }

    /// Waits for the producer and for every record, stops `nodes` with SIGTERM and
    /// checks the raw table holds each record exactly once, and the window table what
    /// the batch computation gives (each partition's sentinel closes its windows).
    fn finish(mut self, nodes: &mut [(&str, Service)]) -> Self {
        self.expected += self.producer.take().expect("one producer").wait();
        self.wait(nodes, "every record", || {
            raw_counts(&self.dir).0 >= self.expected
        });
        if self.windows {
            // Windows fed through a repartition topic may trail the raw table.
            self.wait(nodes, "every window", || {
                has_table(&self.dir, "device_minute") && window_mismatches(&self.dir) == 0
            });
        }
        for (_, n) in nodes.iter_mut() {
            n.stop();
        }
        assert_raw_once(&self.dir, self.expected, self.expected);
        if self.windows {
            assert_eq!(
                window_mismatches(&self.dir),
                0,
                "device_minute = batch computation, though partitions moved between nodes"
            );
            assert_eq!(
                alert_mismatches(&self.dir),
                0,
                "each device's alert fired once and resolved once"
            );
        }
        self
    }
}

/// Dynamic members (`group_instance_id = ""`) leave the group on SIGTERM, so a stopped
/// node's partitions move at once rather than after its session timeout (issue 21's
/// target: within 5 s). Prints the time from b's SIGTERM until a logs the partitions
/// assigned to it; nothing lost or doubled. (b joins second, so a leads the group:
/// tansu keeps a departed *leader* leading, see ARCHITECTURE "When partitions move".)
#[test]
fn kafka_dynamic_member_stopped_with_sigterm_hands_its_partitions_over() {
    let cluster = Cluster::start_on_own_broker(
        "dynamic",
        60_000,
        "group_instance_id = \"\"\nlimit = { rate = 2000, burst = 500 }\nproperties = { \"session.timeout.ms\" = \"30000\" }\n",
    );
    let dir = cluster.dir.clone();
    let mut nodes = vec![("a", cluster.node("a"))];
    wait_long(&nodes[0].1, "rows to land", || raw_counts(&dir).0 > 0);
    nodes.push(("b", cluster.node("b")));
    wait_long(&nodes[1].1, "b to read", || {
        nodes[1].1.log_text().contains("partitions assigned")
            && nodes[1].1.metric_sum("sluice_lake_rows_written_total", &[]) > 0.0
    });
    let assigned = |node: &Service| node.log_text().matches("partitions assigned").count();
    let before = assigned(&nodes[0].1);
    let stopped = Instant::now();
    nodes[1].1.signal("TERM");
    wait_long(&nodes[0].1, "a to be assigned b's partitions", || {
        assigned(&nodes[0].1) > before
    });
    let moved = stopped.elapsed();
    assert!(
        nodes[1].1.wait_exit(Duration::from_secs(60)).success(),
        "b: clean stop"
    );
    eprintln!(
        "b's partitions assigned to a {:.2} s after b's SIGTERM (session timeout 30 s)",
        moved.as_secs_f64()
    );
    nodes.remove(1);
    wait_long(&nodes[0].1, "/api/cluster: a owns every partition", || {
        Cluster::own_every_partition(&nodes[0].1, &["a"])
    });
    cluster.finish(&mut nodes);
}

/// Nodes of a cluster share one topic (12 partitions) and one lake through one
/// consumer group: two nodes read, a third joins mid-stream (a rebalance takes
/// partitions from the first two, which checkpoint and commit what they read of them
/// before letting go), then each node in turn is stopped with SIGTERM and started
/// again. Every record lands in the raw table exactly once, and each node's
/// checkpoints stay under its own `_nodes/<id>/`.
///
/// On tansu 0.6 a join can leave partitions unowned (see [`ORPHANS`]): the wait then
/// fails after two minutes with its report, and nextest runs the test once more.
#[test]
fn kafka_nodes_of_a_cluster_share_a_topic_and_a_lake_exactly_once_across_a_join_and_restarts() {
    // 2,000 records a second per node, so the join and the restarts come mid-stream.
    // librdkafka's group protocol in the logs, for `Cluster::wait`'s report.
    let cluster = Cluster::start_on_own_broker(
        "cluster",
        120_000,
        "limit = { rate = 2000, burst = 500 }\nproperties = { \"debug\" = \"cgrp\" }\n",
    );
    let dir = cluster.dir.clone();
    let mut nodes = vec![("a", cluster.node("a")), ("b", cluster.node("b"))];
    wait_long(&nodes[0].1, "rows to land", || raw_counts(&dir).0 > 0);
    nodes.push(("c", cluster.node("c")));
    wait_long(&nodes[2].1, "the new node to read", || {
        nodes[2].1.log_text().contains("partitions assigned")
    });
    wait_long(&nodes[0].1, "a revoke on a node that was reading", || {
        nodes[..2]
            .iter()
            .any(|(_, n)| n.log_text().contains("partitions revoked"))
    });
    // Each node reports what it owns to the lake; any node lists them all.
    cluster.wait(
        &nodes,
        "/api/cluster: a, b and c own every partition once",
        || Cluster::own_every_partition(&nodes[0].1, &["a", "b", "c"]),
    );
    // Cooperative-sticky: a and b each owned 6 partitions when c joined, and gave up
    // only what c took (an eager rebalance revokes all 12, then all 6).
    let revokes: Vec<usize> = nodes[..2]
        .iter()
        .flat_map(|(_, n)| {
            n.log_text()
                .lines()
                .filter(|l| l.contains("partitions revoked"))
                .filter_map(|l| {
                    let field = l
                        .split_whitespace()
                        .find(|f| f.starts_with("partitions="))?;
                    Some(field.split(',').count())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!("partitions revoked per rebalance on a and b: {revokes:?}");
    assert!(
        revokes.iter().any(|&n| n < 6),
        "the join moved only some partitions: {revokes:?}"
    );
    let out = sluice(&[
        "status",
        "--config",
        cluster.config.to_str().expect("utf8"),
        "--data-dir",
        &lake_url(&dir),
    ]);
    assert_ran(&out, "sluice status");
    let table = String::from_utf8_lossy(&out.stdout);
    for id in ["a", "b", "c"] {
        assert!(
            table.lines().any(|l| l.starts_with(&format!("{id} "))),
            "sluice status lists node {id}:\n{table}"
        );
    }
    for (id, node) in nodes.iter_mut() {
        let before = raw_counts(&dir).0;
        node.stop();
        *node = cluster.node(id);
        eprintln!("node {id} restarted with {before} rows in the lake");
    }
    let cluster = cluster.finish(&mut nodes);
    let revokes = cluster.count_in_logs(&["a", "b", "c"], "partitions revoked");
    eprintln!("partitions revoked {revokes} times across the nodes");
    if lakes_on_s3() {
        return;
    }
    for id in ["a", "b", "c"] {
        let manifests = dir.join("_nodes").join(id).join("_manifests");
        assert!(
            std::fs::read_dir(&manifests).is_ok_and(|mut d| d.next().is_some()),
            "node {id} keeps its checkpoints in {}",
            manifests.display()
        );
    }
    assert!(
        !dir.join("_manifests").exists(),
        "no single-node checkpoints"
    );
}

/// Three nodes share a topic; one is killed with SIGKILL mid-stream (it may die
/// between its manifest and its commits, and its last offsets never reach Kafka).
/// Its partitions go to the others and a fourth node that joins; each new owner
/// completes the dead node's checkpoint first and starts after the furthest position
/// any checkpoint covers. Every record lands exactly once, and the dead node stays
/// listed in `/api/cluster`, silent.
///
/// tansu 0.6 expires a dead static member only when the group next forms (a join),
/// not on its session timeout alone, so the fourth node joins once b's session has
/// run out: that join is what hands b's partitions over here. Against Kafka the
/// session timeout alone would.
///
/// 120,000 records by default; `SLUICE_TEST_NODE_LOSS_EVENTS` sets another count (the
/// issue's 1,000,000 passes in about 3.5 minutes on this 2-core machine). The cluster
/// has a tansu of its own on SQLite: on the shared one (memory storage, one record per
/// batch) a million records did not finish within 20 minutes.
#[test]
fn kafka_cluster_node_killed_mid_stream_its_partitions_move_and_nothing_is_lost_or_doubled() {
    let session_ms = 10_000;
    let events = std::env::var("SLUICE_TEST_NODE_LOSS_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(120_000);
    let cluster = Cluster::start_on_own_broker(
        "node-loss",
        events,
        &format!(
            "limit = {{ rate = 2000, burst = 500 }}\nproperties = {{ \"session.timeout.ms\" = \"{session_ms}\" }}\n"
        ),
    );
    let dir = cluster.dir.clone();
    let mut nodes = vec![
        ("a", cluster.node("a")),
        ("b", cluster.node("b")),
        ("c", cluster.node("c")),
    ];
    wait_long(&nodes[0].1, "every node reading", || {
        nodes
            .iter()
            .all(|(_, n)| n.metric_sum("sluice_lake_rows_written_total", &[]) > 0.0)
    });
    wait_long(&nodes[0].1, "a quarter of the records written", || {
        let written: f64 = nodes
            .iter()
            .map(|(_, n)| n.metric_sum("sluice_lake_rows_written_total", &[]))
            .sum();
        written >= events as f64 / 4.0
    });
    let before = raw_counts(&dir).0;
    nodes[1].1.kill9();
    eprintln!("node b killed with {before} rows in the lake");
    nodes.remove(1);
    // b's status falls silent; once its session is over a fourth node joins.
    wait_long(&nodes[0].1, "b silent past its session timeout", || {
        Cluster::view(&nodes[0].1)
            .get("b")
            .is_some_and(|(silent, _)| *silent > session_ms + 2_000)
    });
    // Until then nobody reads what b owned (tansu hands it over only on a join), and
    // `/api/cluster` says so once b's status is three rounds old.
    let mut b_owned = Cluster::view(&nodes[0].1)["b"].1.clone();
    b_owned.sort();
    wait_long(&nodes[0].1, "b's partitions listed as unowned", || {
        let mut unowned = Cluster::unowned(&nodes[0].1);
        unowned.sort();
        unowned == b_owned
    });
    nodes.push(("d", cluster.node("d")));
    cluster.wait(
        &nodes,
        "/api/cluster: a, c and d own every partition once",
        || Cluster::own_every_partition(&nodes[0].1, &["a", "c", "d"]),
    );
    assert!(
        Cluster::view(&nodes[0].1).contains_key("b"),
        "a killed node stays listed, silent"
    );
    let cluster = cluster.finish(&mut nodes);
    eprintln!(
        "records fetched again and skipped after a takeover: see sluice_source_replayed_skipped_total; revokes: {}",
        cluster.count_in_logs(&["a", "c", "d"], "partitions revoked")
    );
}

/// The shards a node's log says it reads now: leased and not since lost, given back
/// or read to their end.
fn reading_by_log(log: &Path) -> Vec<String> {
    let mut reading = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let Some(shard) = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("shard="))
        else {
            continue;
        };
        let shard = shard.trim_matches('"').to_owned();
        if line.contains("leased the shard; reading it") {
            reading.insert(shard);
        } else if [
            "given back",
            "lost the shard's lease",
            "not renewed",
            "read to its end",
        ]
        .iter()
        .any(|event| line.contains(event))
        {
            reading.remove(&shard);
        }
    }
    reading.into_iter().collect()
}

/// Waits until `log` holds, after its first `from` bytes, a line with `event` for each
/// of `shards`; how long that took from `since`. A shard that ended meanwhile is never
/// leased again, so after a minute one of them is enough.
fn logged_for_each(
    log: &Path,
    from: usize,
    event: &str,
    shards: &[String],
    since: Instant,
) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let new = text.get(from..).unwrap_or_default();
        let seen = |id: &String| {
            new.lines()
                .any(|l| l.contains(event) && l.contains(&format!("shard={id}")))
        };
        if shards.iter().all(seen) {
            return since.elapsed();
        }
        if Instant::now() > deadline {
            assert!(
                shards.iter().any(seen),
                "no {event:?} for any of {shards:?} in {}:\n{new}",
                log.display()
            );
            eprintln!("only some of {shards:?} were leased again (the others ended)");
            return since.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for node `to` (log `log`) to lease and read again every shard in `shards`
/// after `from` bytes of its log, and prints how long each step took from `since`.
/// Waits until `/api/cluster` of `a` shows nodes a and b each reading shards; the
/// shards b reads (by its log) and the length of a's log then, to read a's takeover
/// from.
fn both_reading(a: &Service, a_log: &Path, b_log: &Path) -> (Vec<String>, usize) {
    wait_long(a, "/api/cluster: a and b each read shards", || {
        let view = Cluster::view(a);
        ["a", "b"]
            .iter()
            .all(|id| view.get(*id).is_some_and(|(_, shards)| !shards.is_empty()))
    });
    let from = std::fs::metadata(a_log).map_or(0, |m| m.len() as usize);
    (reading_by_log(b_log), from)
}

fn report_move(what: &str, log: &Path, from: usize, shards: &[String], since: Instant) {
    let won = logged_for_each(log, from, "won the shard's lease", shards, since);
    let read = logged_for_each(log, from, "leased the shard; reading it", shards, since);
    eprintln!(
        "{what}: {shards:?} leased again after {:.1} s, read again after {:.1} s",
        won.as_secs_f64(),
        read.as_secs_f64()
    );
}

/// Two nodes share a 4-shard Kinesis stream through leases in the lake, and shard 0 is
/// split halfway. b is killed with SIGKILL mid-stream: once its leases have gone 3 s
/// unrenewed, a takes its shards, each after the furthest position any checkpoint
/// holds (b's half-done checkpoint completed first). b comes back and the shards are
/// shared again; then a stops with SIGTERM and releases its leases to b. Every record
/// lands once, per-key order holds, and no child shard's record landed before the
/// parent's last. The times to move are printed (SIGKILL: lease time plus a round;
/// SIGTERM: the final checkpoint plus a round), and `/api/cluster` lists who reads what.
#[test]
fn kinesis_nodes_share_shards_by_lease_and_a_killed_node_s_shards_move_exactly_once() {
    let cluster = Cluster::kinesis("lease", 80_000, "3s");
    let dir = cluster.dir.clone();
    let (a_log, b_log) = (cluster.log_path("a"), cluster.log_path("b"));
    let mut nodes = vec![("a", cluster.node("a")), ("b", cluster.node("b"))];
    let (taken_from_b, from) = both_reading(&nodes[0].1, &a_log, &b_log);
    nodes[1].1.kill9();
    let killed = Instant::now();
    nodes.remove(1);
    report_move(
        "SIGKILL of b (lease_time 3 s)",
        &a_log,
        from,
        &taken_from_b,
        killed,
    );
    nodes.push(("b", cluster.node("b")));
    wait_long(&nodes[0].1, "a and b to share the shards again", || {
        reading_by_log(&a_log).len() >= 2 && reading_by_log(&b_log).len() >= 2
    });
    let taken_from_a = reading_by_log(&a_log);
    let from = std::fs::metadata(&b_log).map_or(0, |m| m.len() as usize);
    let (_, mut a) = nodes.remove(0);
    let stopping = Instant::now();
    a.stop();
    eprintln!("a took {:.1} s to stop", stopping.elapsed().as_secs_f64());
    report_move("SIGTERM of a", &b_log, from, &taken_from_a, stopping);
    let _cluster = cluster.finish(&mut nodes);
    assert_children_after_parent(
        &dir,
        "shardId-000000000000",
        &["shardId-000000000004", "shardId-000000000005"],
    );
}

/// Windows and alert rules over Kinesis in a cluster go through the repartition topic
/// (4 partitions): two nodes share a 4-shard stream by lease, shard 0 is split halfway,
/// and each node publishes the rows of the shards it reads, keyed by device, with the
/// shard as their origin and its sequence numbers. b is killed with SIGKILL mid-stream:
/// a takes its shards once the leases lapse and reads them again from b's checkpoint,
/// publishing rows b had published already, which the topic's readers skip. b comes
/// back. The raw table holds every record once, `device_minute` equals the batch
/// computation (no row late: each shard's origin held the windows back while it moved,
/// and the split parent until its children were greeted), and each device's alert fired
/// and resolved once.
#[test]
fn kinesis_cluster_repartitions_by_device_and_windows_equal_the_batch_computation() {
    let prefix = format!("eo-kin-repart-{}", std::process::id());
    let repartition = format!(
        "[cluster.repartition]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}-\"\npartitions = 4\n",
        kafka()
    );
    // 300 sentinels, one device each, so that each shard's origin sends one to each
    // partition of the topic and closes its windows there.
    let cluster = Cluster::kinesis_of(
        &format!("{PIPELINE}{FIRST_MINUTE_ALERT}{repartition}"),
        "krepart",
        (80_000, 300),
        "3s",
    );
    let (a_log, b_log) = (cluster.log_path("a"), cluster.log_path("b"));
    let mut nodes = vec![("a", cluster.node("a")), ("b", cluster.node("b"))];
    let (taken_from_b, from) = both_reading(&nodes[0].1, &a_log, &b_log);
    // Two seconds of b's reading. What it published past its last checkpoint, a
    // publishes again; tansu is slow enough that most of it may still sit in b's
    // producer when b dies, so the replays skipped are printed, not required.
    wait_long(&nodes[0].1, "b to publish 4,000 rows", || {
        nodes[1]
            .1
            .metric_sum("sluice_repartition_records_total", &[])
            >= 4_000.0
    });
    nodes[1].1.kill9();
    let killed = Instant::now();
    report_move("SIGKILL of b", &a_log, from, &taken_from_b, killed);
    nodes[1].1 = cluster.node("b");
    let replays = || {
        nodes
            .iter()
            .map(|(_, n)| n.metric_sum("sluice_repartition_replays_skipped_total", &[]))
            .sum::<f64>()
    };
    wait_long(&nodes[0].1, "every record", || {
        raw_counts(&cluster.dir).0 >= cluster.expected + 300
    });
    eprintln!(
        "records published again and skipped (a, and b since its restart): {}",
        replays()
    );
    let cluster = cluster.finish(&mut nodes);
    if has_table(&cluster.dir, "late") {
        assert_eq!(
            count(&cluster.dir, "SELECT count(*) AS n FROM late"),
            0,
            "late rows"
        );
    }
}

/// Three nodes share a 12-partition topic; b is paused (SIGSTOP) mid-stream, past its
/// 10 s session, with records read and not yet checkpointed. Its partitions move when
/// a fourth node joins (tansu reassigns a dead member's partitions at the next join),
/// and their new owners fence them before reading. Resumed (SIGCONT), b cannot make
/// its checkpoint count: it stops with an error, and its records land once, from the
/// new owners.
#[test]
fn kafka_node_paused_past_its_session_is_fenced_and_nothing_lands_twice() {
    let session_ms = 10_000;
    let cluster = Cluster::start(
        "pause",
        60_000,
        &format!(
            "limit = {{ rate = 2000, burst = 500 }}\nproperties = {{ \"session.timeout.ms\" = \"{session_ms}\" }}\n"
        ),
    );
    let mut nodes = vec![
        ("a", cluster.node("a")),
        ("b", cluster.node("b")),
        ("c", cluster.node("c")),
    ];
    wait_long(&nodes[0].1, "every node reading", || {
        nodes
            .iter()
            .all(|(_, n)| n.metric_sum("sluice_lake_rows_written_total", &[]) > 0.0)
    });
    let (_, mut b) = nodes.remove(1);
    b.signal("STOP");
    let paused = Instant::now();
    wait_long(&nodes[0].1, "b silent past its session timeout", || {
        Cluster::view(&nodes[0].1)
            .get("b")
            .is_some_and(|(silent, _)| *silent > session_ms + 2_000)
    });
    nodes.push(("d", cluster.node("d")));
    cluster.wait(
        &nodes,
        "/api/cluster: a, c and d own every partition once",
        || Cluster::own_every_partition(&nodes[0].1, &["a", "c", "d"]),
    );
    b.signal("CONT");
    eprintln!("b paused for {:.1} s", paused.elapsed().as_secs_f64());
    let status = b.wait_exit(Duration::from_secs(120));
    let log = b.log_text();
    assert!(
        !status.success() && log.contains("this node was fenced"),
        "b stops with an error once its checkpoint is refused ({status}); log:\n{log}"
    );
    let _cluster = cluster.finish(&mut nodes);
}

/// Two nodes share a 4-shard Kinesis stream and a lake on S3; b reaches Kinesis and S3
/// through relays, which are cut mid-stream as a network partition would, for longer
/// than the 3 s lease. a takes b's shards over: it fences them in the lake's
/// `_checkpoints` log before reading, so when the network heals, b's checkpoint of the
/// records it read before the cut is refused, and b stops with an error instead of
/// committing them (a read them again). Restarted, b drops that checkpoint and joins
/// again. Every record lands exactly once: none committed by both nodes.
#[test]
fn kinesis_node_cut_off_from_kinesis_and_s3_is_fenced_and_nothing_lands_twice() {
    let mut cluster = Cluster::kinesis("fence", 60_000, "3s");
    cluster.dir = std::path::PathBuf::from(format!("s3://{}/lake", create_bucket("fence")));
    put_lake_on_s3(&cluster.config);
    let (kinesis, s3_endpoint) = (kinesis_endpoint(), s3().0);
    let host_port = |url: &str| url.trim_start_matches("http://").to_owned();
    let (kinesis_relay, s3_relay) = (
        Relay::start(&host_port(&kinesis)),
        Relay::start(&host_port(&s3_endpoint)),
    );
    let text = std::fs::read_to_string(&cluster.config).expect("config");
    let cut_off = text
        .replace(
            &format!("\"{kinesis}\""),
            &format!("\"{}\"", kinesis_relay.url()),
        )
        .replace(
            &format!("\"{s3_endpoint}\""),
            &format!("\"{}\"", s3_relay.url()),
        );
    assert_ne!(cut_off, text, "b's endpoints go through the relays");
    let b_config = write_config(cluster.tmp.path(), "b.toml", cut_off);
    let (a_log, b_log) = (cluster.log_path("a"), cluster.log_path("b"));
    let mut nodes = vec![
        ("a", cluster.node("a")),
        ("b", cluster.node_with("b", &b_config)),
    ];
    let (taken_from_b, from) = both_reading(&nodes[0].1, &a_log, &b_log);
    kinesis_relay.cut();
    s3_relay.cut();
    let cut = Instant::now();
    report_move(
        "b cut off from Kinesis and S3 (lease_time 3 s)",
        &a_log,
        from,
        &taken_from_b,
        cut,
    );
    let fenced = std::fs::read_to_string(&a_log).unwrap_or_default()[from..]
        .contains("fenced the partitions taken over");
    assert!(fenced, "a fenced b's shards before reading them");
    std::thread::sleep(Duration::from_secs(2));
    kinesis_relay.heal();
    s3_relay.heal();
    let healed = Instant::now();
    let (_, mut b) = nodes.remove(1);
    let status = b.wait_exit(Duration::from_secs(120));
    let log = b.log_text();
    assert!(
        !status.success() && log.contains("this node was fenced"),
        "b stops with an error once its checkpoint is refused ({status}); log:\n{log}"
    );
    eprintln!(
        "b was cut off for {:.1} s and stopped {:.1} s after the heal",
        (healed - cut).as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
    std::fs::rename(&b_log, cluster.tmp.path().join("b-fenced.log")).expect("keep b's log");
    nodes.push(("b", cluster.node("b")));
    let restarted = &nodes[1].1;
    restarted.wait_until("b drops its fenced checkpoint", || {
        restarted.log_text().contains("fenced while it was away")
    });
    let _cluster = cluster.finish(&mut nodes);
}

/// Three nodes read one mosquitto through an MQTT shared subscription
/// (`$share/sluice-plant/<prefix>/#`), each with its own session and write-ahead log,
/// while 300,000 QoS 1 messages arrive; b is killed with SIGKILL mid-stream and started
/// again. The broker hands each message to one node; b's log replays what it had
/// acknowledged but not committed, and its session redelivers what it had not
/// acknowledged. Every message lands in the raw table exactly once.
#[test]
fn mqtt_nodes_share_a_subscription_and_a_killed_node_loses_and_doubles_nothing() {
    let prefix = format!("eo-share-{}", std::process::id());
    mqtt_cluster_with_b_killed(
        raw_pipeline(),
        &prefix,
        0,
        "sluice_lake_rows_written_total",
        |_| {},
    );
}

/// Three nodes share one mosquitto subscription, as above, and key their windows and
/// alert rules through the repartition topic (`[cluster.repartition]`, real tansu, 12
/// partitions), 300,000 QoS 1 messages: each node stores what it received and
/// publishes it keyed by device; each device's windows live on the node owning its
/// partition. b is killed with SIGKILL mid-stream and started again, so its
/// write-ahead log replays rows it had already published. The raw table holds every
/// message once, `device_minute` equals the batch computation, and each device's
/// alert fired and resolved once.
#[test]
fn mqtt_cluster_repartitions_by_device_and_windows_equal_the_batch_computation() {
    let prefix = format!("eo-repart-{}", std::process::id());
    let repartition = format!(
        "[cluster.repartition]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}-\"\n",
        kafka()
    );
    // 200 far-future sentinels, one device each: keyed like the rest, they reach every
    // partition of the topic and close every window.
    mqtt_cluster_with_b_killed(
        &format!("{PIPELINE}{FIRST_MINUTE_ALERT}{repartition}"),
        &prefix,
        200,
        "sluice_repartition_records_total",
        |_| {},
    );
}

/// Two nodes take a stream over HTTP alone and key it through the repartition topic
/// (real tansu, 4 partitions), with `idle_timeout = "1h"`. Bodies go to a and b in
/// turn; halfway b is stopped with SIGTERM: its last checkpoint covers every row it
/// published, and then its HTTP origin says goodbye to every partition of the topic,
/// so the windows stop waiting for it at once. The rest and the sentinels go to a:
/// a's watermark moves on past where it stood (without the goodbye, b's origin would
/// hold it for the hour), and every window closes, equal to the batch computation,
/// with b still stopped. Then b starts again and everything has landed once.
#[test]
fn http_cluster_node_stopped_cleanly_does_not_hold_the_windows_back() {
    let prefix = format!("eo-rest-{}", std::process::id());
    let repartition = format!(
        "[cluster.repartition]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}-\"\npartitions = 4\n",
        kafka()
    );
    let pipeline = format!("{PIPELINE}{FIRST_MINUTE_ALERT}{repartition}")
        .replace("idle_timeout = \"5m\"", "idle_timeout = \"1h\"");
    assert!(pipeline.contains("idle_timeout = \"1h\""));
    // 120 s of event time, then 40 sentinels, one device each, to close every window.
    let (events, sentinels) = (60_000u64, 40u64);
    let total = events + sentinels;
    let mut cluster = Cluster::of(&pipeline, "", None, total);
    let mut nodes = vec![("a", cluster.node("a")), ("b", cluster.node("b"))];
    let body = |ids: std::ops::Range<u64>| -> String {
        ids.map(|id| {
            format!(
                "{{\"id\":{id},\"device_id\":\"d{:03}\",\"ts\":{},\"temperature\":{}}}\n",
                id % 500,
                T0 + 2 * id,
                id % 97
            )
        })
        .collect()
    };
    let post = |node: &Service, body: &str| loop {
        // 503 while a node starts or its queue is full: the body was not taken.
        match http_request(&node.http, "POST", "/api/ingest/events", body) {
            Some((200, _)) => return,
            Some((503, _)) => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("POST: {other:?}"),
        }
    };
    let half = events / 2;
    for (k, start) in (0..half).step_by(500).enumerate() {
        post(&nodes[k % 2].1, &body(start..start + 500));
    }
    let watermark = |node: &Service| node.metric_sum("sluice_window_watermark_ms", &[]);
    wait_long(&nodes[0].1, "the first half on both nodes' windows", || {
        raw_counts(&cluster.dir).0 >= half && nodes.iter().all(|(_, n)| watermark(n) > 0.0)
    });
    let (_, mut b) = nodes.remove(1);
    b.stop();
    assert!(
        b.log_text().contains("origins are at rest"),
        "b said goodbye:\n{}",
        b.log_text()
    );
    let stood = watermark(&nodes[0].1);
    assert!(
        stood < (T0 + 2 * half) as f64,
        "{stood}: held by the first half"
    );
    eprintln!("b stopped with a's watermark at {stood}");
    for start in (half..events).step_by(500) {
        post(&nodes[0].1, &body(start..start + 500));
    }
    let sentinel: String = (events..total)
        .map(|id| format!("{{\"id\":{id},\"device_id\":\"zz-{id}\",\"ts\":{SENTINEL}}}\n"))
        .collect();
    post(&nodes[0].1, &sentinel);
    // Past the last event's time: only the sentinels take it there.
    wait_long(&nodes[0].1, "a's watermark to move past the events", || {
        watermark(&nodes[0].1) > (T0 + 2 * events + 60_000) as f64
    });
    wait_long(&nodes[0].1, "every window with b stopped", || {
        raw_counts(&cluster.dir).0 >= total
            && has_table(&cluster.dir, "device_minute")
            && window_mismatches(&cluster.dir) == 0
    });
    nodes.insert(1, ("b", cluster.node("b")));
    // Everything was posted above.
    cluster.producer = Some(Producer::Thread(std::thread::spawn(|| 0), 0));
    let _cluster = cluster.finish(&mut nodes);
}

/// Two nodes take a stream over HTTP alone (`POST /api/ingest/events`, bodies of 500
/// lines sent to a and b in turn, so each device's rows arrive at both) and key it
/// through the repartition topic (real tansu, 4 partitions). Each body is answered
/// once it is in the node's write-ahead log. Halfway, b is killed with SIGKILL straight
/// after its last answer and started again: its log replays what its lake had not
/// committed, under the same line numbers, publishing those rows again, and the
/// topic's readers skip what they had. The raw table holds every line once,
/// `device_minute` equals the batch computation, each alert fired and resolved once,
/// and no row is late.
#[test]
fn http_ingest_into_a_repartitioned_stream_is_logged_and_a_killed_node_loses_and_doubles_nothing() {
    let prefix = format!("eo-http-repart-{}", std::process::id());
    let repartition = format!(
        "[cluster.repartition]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}-\"\npartitions = 4\n",
        kafka()
    );
    // 200 s of event time, then 40 sentinels to each node, one device each, so that
    // both origins reach every partition of the topic and close every window.
    let (events, per_node) = (100_000u64, 40u64);
    let total = events + 2 * per_node;
    let mut cluster = Cluster::of(
        &format!("{PIPELINE}{FIRST_MINUTE_ALERT}{repartition}"),
        "",
        None,
        total,
    );
    let mut nodes = vec![("a", cluster.node("a")), ("b", cluster.node("b"))];
    let line = |id: u64| {
        format!(
            "{{\"id\":{id},\"device_id\":\"d{:03}\",\"ts\":{},\"temperature\":{}}}\n",
            id % 500,
            T0 + 2 * id,
            id % 97
        )
    };
    let sentinel =
        |id: u64| format!("{{\"id\":{id},\"device_id\":\"zz-{id}\",\"ts\":{SENTINEL}}}\n");
    let (halfway_tx, halfway) = std::sync::mpsc::channel::<()>();
    let (restarted, restarted_rx) = std::sync::mpsc::channel::<String>();
    let (a, b) = (nodes[0].1.http.clone(), nodes[1].1.http.clone());
    let producer = std::thread::spawn(move || {
        let mut targets = [a, b];
        let post = |node: &str, body: &str| loop {
            // 503 while a node starts or its queue is full: the body was not taken.
            match http_request(node, "POST", "/api/ingest/events", body) {
                Some((200, _)) => return,
                Some((503, _)) => std::thread::sleep(Duration::from_millis(100)),
                other => panic!("POST to {node}: {other:?}"),
            }
        };
        let bodies = events / 500;
        for k in 0..bodies {
            if k == bodies / 2 {
                // b has answered its last body: the test kills it now.
                halfway_tx.send(()).expect("halfway");
                targets[1] = restarted_rx.recv().expect("b restarted");
            }
            let body: String = (k * 500..(k + 1) * 500).map(line).collect();
            post(&targets[(k % 2) as usize], &body);
            // About 10 s in all, so that b has checkpointed some of its bodies and
            // published rows past its last checkpoint when it dies.
            std::thread::sleep(Duration::from_millis(50));
        }
        for (n, node) in targets.iter().enumerate() {
            let first = events + n as u64 * per_node;
            let body: String = (first..first + per_node).map(sentinel).collect();
            post(node, &body);
        }
        total
    });
    cluster.producer = Some(Producer::Thread(producer, total));
    halfway.recv().expect("halfway");
    nodes[1].1.kill9();
    eprintln!(
        "node b killed with {} rows in the lake",
        raw_counts(&cluster.dir).0
    );
    std::thread::sleep(Duration::from_secs(2));
    nodes[1].1 = cluster.node("b");
    let b = &nodes[1].1;
    b.wait_until("b healthy", || b.healthy());
    restarted.send(b.http.clone()).expect("resume");
    let replayed = b.metric_sum("sluice_wal_replayed_total", &[]);
    wait_long(&nodes[0].1, "every record", || {
        raw_counts(&cluster.dir).0 >= total
    });
    let skipped: f64 = nodes
        .iter()
        .map(|(_, n)| n.metric_sum("sluice_repartition_replays_skipped_total", &[]))
        .sum();
    eprintln!(
        "b replayed {replayed} logged bodies; the topic's readers skipped {skipped} rows published again"
    );
    let cluster = cluster.finish(&mut nodes);
    if has_table(&cluster.dir, "late") {
        assert_eq!(
            count(&cluster.dir, "SELECT count(*) AS n FROM late"),
            0,
            "late rows"
        );
    }
}

/// A node of a repartitioned MQTT stream started while the topic's Kafka is away (its
/// address refuses connections) waits for it, retrying with backoff and saying so
/// once, and reads nothing meanwhile; once the broker is back it starts, and 40,000
/// messages land once, their windows equal to the batch computation and each alert
/// fired and resolved once.
#[test]
fn a_node_started_with_the_repartition_brokers_away_waits_for_them_and_loses_nothing() {
    let prefix = format!("eo-repart-late-{}", std::process::id());
    let (_, _, port) = mosquitto_address();
    // The brokers' address is a front that is away at first; clients learn the broker
    // itself from it once it is there.
    let mut broker = OwnServer::tcp_proxy(kafka());
    broker.stop();
    let repartition = format!(
        "[cluster.repartition]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}-\"\npartitions = 3\n",
        broker.address()
    );
    // 80 s of event time (each device's second minute resolves its alert), and
    // sentinels, one device each, for every partition of the topic.
    let (events, sentinels) = (40_000, 30);
    let mut cluster = Cluster::of(
        &format!("{PIPELINE}{FIRST_MINUTE_ALERT}{repartition}"),
        &mqtt_source(port, &prefix),
        None,
        events + sentinels,
    );
    let mut nodes = vec![("a", cluster.spawn_node("a", &cluster.config))];
    let said = "cannot reach the repartition topic";
    nodes[0].1.wait_until("the outage logged", || {
        cluster.count_in_logs(&["a"], said) > 0
    });
    // Several retries later: still running, logged once, reading nothing.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        nodes[0]
            .1
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None))),
        "still running"
    );
    assert_eq!(cluster.count_in_logs(&["a"], said), 1, "logged once");
    // Alive, not ready: every request is answered 503 "starting" meanwhile.
    let answer = http_request(&nodes[0].1.http, "GET", "/health", "");
    let (status, body) = answer.expect("an answer while waiting");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    broker.restart();
    nodes[0].1.wait_until("health", || nodes[0].1.healthy());
    nodes[0]
        .1
        .wait_until("node a subscribed", || nodes[0].1.subscribed("plant"));
    assert_eq!(
        cluster.count_in_logs(&["a"], "the repartition topic is reachable again"),
        1
    );
    let producer = spawn_mqtt_producer(port, &prefix, 0..events, sentinels);
    cluster.producer = Some(Producer::Thread(producer, events + sentinels));
    let _cluster = cluster.finish(&mut nodes);
}

/// Nodes a, b and c of `pipeline` share the mosquitto subscription `<prefix>/#` while
/// 300,000 QoS 1 messages and `sentinels` arrive; once each node's `progress` metric
/// has moved, b is killed with SIGKILL and started again 2 s later; `check` looks at
/// node a. Then [`Cluster::finish`] checks the lake.
fn mqtt_cluster_with_b_killed(
    pipeline: &str,
    prefix: &str,
    sentinels: u64,
    progress: &str,
    check: impl Fn(&Service),
) {
    let (_, _, port) = mosquitto_address();
    let events = 300_000;
    let mut cluster = Cluster::of(
        pipeline,
        &mqtt_source(port, prefix),
        None,
        events + sentinels,
    );
    let mut nodes = vec![
        ("a", cluster.node("a")),
        ("b", cluster.node("b")),
        ("c", cluster.node("c")),
    ];
    for (id, node) in &nodes {
        node.wait_until(&format!("node {id} subscribed"), || {
            node.subscribed("plant")
        });
    }
    let dir = cluster.dir.clone();
    let producer = spawn_mqtt_producer(port, prefix, 0..events, sentinels);
    cluster.producer = Some(Producer::Thread(producer, events + sentinels));
    wait_long(&nodes[0].1, &format!("{progress} on every node"), || {
        nodes.iter().all(|(_, n)| n.metric_sum(progress, &[]) > 0.0)
    });
    nodes[1].1.kill9();
    eprintln!("node b killed with {} rows in the lake", raw_counts(&dir).0);
    std::thread::sleep(Duration::from_secs(2));
    nodes[1].1 = cluster.node("b");
    check(&nodes[0].1);
    let _cluster = cluster.finish(&mut nodes);
}

/// The consumer group's committed offsets of `topic`'s partitions, summed.
fn committed_offsets(broker: &str, topic: &str, partitions: u32) -> i64 {
    let out = run_python(&format!(
        r#"
from confluent_kafka import Consumer, TopicPartition
c = Consumer({{"bootstrap.servers": "{broker}", "group.id": "{topic}"}})
tps = c.committed([TopicPartition("{topic}", p) for p in range({partitions})], timeout=30)
print(sum(max(tp.offset, 0) for tp in tps))
c.close()
"#
    ));
    out.trim().parse().expect("offset sum")
}

/// How many records the topic holds (the sum of its partitions' high watermarks).
fn high_watermarks(broker: &str, topic: &str, partitions: u32) -> u64 {
    let out = run_python(&format!(
        r#"
from confluent_kafka import Consumer, TopicPartition
c = Consumer({{"bootstrap.servers": "{broker}", "group.id": "watermarks"}})
print(sum(c.get_watermark_offsets(TopicPartition("{topic}", p), timeout=30)[1]
          for p in range({partitions})))
c.close()
"#
    ));
    out.trim().parse().expect("watermark sum")
}

/// A lake that cannot take checkpoints (its manifest directory replaced by a file):
/// a clear error logged once, Kafka offsets not committed while it lasts, and once it
/// is fixed everything lands exactly once; a kill -9 during the outage changes nothing.
#[test]
fn kafka_unwritable_lake_holds_acknowledgements_and_recovers() {
    if lakes_on_s3() {
        eprintln!(
            "a local lake's failure; on S3: s3_server_stopped_for_30_s_mid_stream_holds_the_source_and_loses_nothing"
        );
        return;
    }
    let broker = kafka();
    let topic = format!("eo-disk-{}", std::process::id());
    let partitions = 3;
    let events = 200_000;
    create_kafka_topic(&broker, &topic, partitions);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = kafka_config(tmp.path(), &broker, &topic);
    let dir = tmp.path().join("lake");
    let args = ["--config", config.to_str().expect("utf8")];
    let mut service = Service::start(&dir, &args);
    let manifests = dir.join("_manifests");
    service.wait_until("the first checkpoint", || {
        std::fs::read_dir(&manifests).is_ok_and(|mut d| d.next().is_some())
    });

    // Break the lake (the manifest directory becomes a file), then produce.
    let aside = dir.join("manifests-aside");
    std::fs::rename(&manifests, &aside).expect("move manifests aside");
    std::fs::write(&manifests, b"not a directory").expect("plant a file");
    let mut producer = spawn_kafka_producer(&broker, &topic, partitions, events);
    service.wait_until("a failed checkpoint", || {
        service.metric_sum("sluice_checkpoint_failures_total", &[]) >= 2.0
    });
    let held = committed_offsets(&broker, &topic, partitions);
    let received = service.received("orders");
    service.wait_until("more records read during the outage", || {
        service.received("orders") > received
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        (committed_offsets(&broker, &topic, partitions), held),
        (0, 0),
        "no offset is committed while checkpoints fail"
    );
    assert_eq!(raw_counts(&dir), (0, 0), "no file is committed either");
    let log = service.log_text();
    assert_eq!(
        log.matches("checkpoint failed").count(),
        1,
        "the outage is logged once:\n{log}"
    );
    assert!(
        log.contains("_manifests"),
        "the error names the path:\n{log}"
    );

    // A crash during the outage, then the disk comes back.
    service.kill9();
    std::fs::remove_file(&manifests).expect("remove the file");
    std::fs::rename(&aside, &manifests).expect("restore manifests");
    assert!(producer.wait().expect("producer").success(), "producer");
    let expected = events + u64::from(partitions);
    let mut service = Service::start(&dir, &args);
    service.wait_until("every event", || {
        raw_counts(&dir).0 >= expected && window_mismatches(&dir) == 0
    });
    service.stop();
    assert_exactly_once(&dir, events, expected);
    assert!(
        committed_offsets(&broker, &topic, partitions) >= expected as i64,
        "every offset committed in the end"
    );
}

/// The broker killed and restarted twice mid-stream (and `sluice` killed with it once):
/// the outage is logged once, and every record of the topic lands exactly once.
#[test]
fn kafka_broker_restarted_mid_stream_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut broker = OwnServer::tansu(tmp.path(), false);
    let address = broker.address();
    let topic = "restarts";
    let partitions = 3;
    let events = EVENTS;
    create_kafka_topic(&address, topic, partitions);
    let config = kafka_config(tmp.path(), &address, topic);
    let dir = tmp.path().join("lake");
    let args = ["--config", config.to_str().expect("utf8")];
    let mut service = Service::start(&dir, &args);
    let mut producer = spawn_kafka_producer_with(&address, topic, partitions, events, BATCHES);
    wait_long(&service, "rows to land", || raw_counts(&dir).0 > 0);
    broker.stop();
    let before = raw_counts(&dir).0;
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    wait_long(&service, "more rows after the restart", || {
        raw_counts(&dir).0 > before
    });
    // Again, with a crash of ours while the broker is away.
    broker.stop();
    service.kill9();
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    let service = Service::start(&dir, &args);
    assert!(producer.wait().expect("producer").success(), "producer");
    let expected = events + u64::from(partitions);
    // The producer is not idempotent: a send whose acknowledgement died with the
    // broker is retried, and the topic then holds that event twice (seen: id 35,957
    // at offsets 11,724 and 11,725). The lake must hold every record of the topic once.
    let records = high_watermarks(&address, topic, partitions);
    finish_after_outages(service, &dir, events, (expected, records), "kafka trouble");
}

/// The end of a broker-restart test: waits for every event, stops cleanly, checks
/// exactly once, and that the outages were logged once (`outage` is the log line).
fn finish_after_outages(
    mut service: Service,
    dir: &Path,
    events: u64,
    (expected, records): (u64, u64),
    outage: &str,
) {
    wait_long(&service, "every event", || {
        raw_counts(dir).0 >= records && window_mismatches(dir) == 0
    });
    service.stop();
    assert_log_landed_once(dir, events, expected, records);
    let log = service.log_text();
    assert!(
        log.matches(outage).count() <= 1,
        "an outage is logged once:\n{log}"
    );
}

/// As `Service::wait_until`, for the minutes a million events take in a debug build.
fn wait_long(service: &Service, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A config with a `telemetry` stream fed by Kafka source `source` reading `topic`
/// (as group `{source}-{topic}`) in batches of 5 rows, with `options` added to the source.
fn kafka_telemetry_config(source: &str, broker: &str, topic: &str, options: &str) -> String {
    format!(
        r#"
[lake]
roll_interval = "200ms"
checkpoint_interval = "200ms"
[decode]
batch_rows = 5
[streams.telemetry]
schema = "telemetry"
[sources.{source}]
type = "kafka"
brokers = "{broker}"
topics = ["{topic}"]
group_id = "{source}-{topic}"
stream = "telemetry"
{options}
"#
    )
}

/// Rows in the `telemetry` table (0 before it exists).
fn telemetry_rows(dir: &Path) -> u64 {
    if has_table(dir, "telemetry") {
        count(dir, "SELECT count(*) AS n FROM telemetry")
    } else {
        0
    }
}

/// Kafka source options against the broker: the record key fills a missing device id
/// and the `sluice-hops` header lands in `_hops`.
#[test]
fn kafka_record_key_and_hops_header() {
    let broker = kafka();
    let topic = format!("opts-{}", std::process::id());
    create_kafka_topic(&broker, &topic, 1);
    run_python(&format!(
        r#"
from confluent_kafka import Producer
p = Producer({{"bootstrap.servers": "{broker}"}})
old, new = 1767225600000, 1780272000000  # 2026-01-01, 2026-06-01
for i in range(20):
    p.produce("{topic}", value=('{{"ts":%d,"temperature":%d}}' % (old + i, i)).encode(),
              key=b"dev-%d" % (i % 4), timestamp=old if i < 10 else new,
              headers=[("sluice-hops", b"3")])
assert p.flush(30) == 0
"#
    ));
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = kafka_telemetry_config("opts", &broker, &topic, r#"key = "record_key""#);
    let config = write_config(tmp.path(), "opts.toml", text);
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    service.wait_until("the records", || telemetry_rows(&dir) >= 20);
    service.stop();
    let rows = query_json(
        &dir,
        "SELECT count(*) AS n, min(temperature) AS lo, count(DISTINCT device_id) AS devices,
                min(device_id) AS first, min(_hops) AS hops_lo, max(_hops) AS hops_hi,
                min(_partition) AS part
         FROM telemetry",
    );
    let r = &rows[0];
    assert_eq!(r["n"], 20, "{r:?}");
    assert_eq!(r["lo"], 0.0, "{r:?}");
    assert_eq!(
        (r["devices"].as_u64(), r["first"].as_str()),
        (Some(4), Some("dev-0"))
    );
    assert_eq!(
        (r["hops_lo"].as_u64(), r["hops_hi"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(r["part"].as_str(), Some(format!("{topic}/0").as_str()));
}

/// Kinesis `start` against the server: a time starts each shard at the first record
/// that arrived at or after it, `"latest"` skips the backlog; a record without a
/// device id takes its partition key.
#[test]
fn kinesis_start_positions_and_partition_key() {
    let endpoint = kinesis_endpoint();
    let stream = format!("start-{}", std::process::id());
    let client = kinesis_client_py(&endpoint);
    // Ten records per batch, temperature = i, partition key dev-(i % 4), no device id.
    let put = |from: u32| {
        format!(
            r#"
c.put_records(StreamName="{stream}", Records=[
    {{"Data": ('{{"ts":1767225600000,"temperature":%d}}' % i).encode(), "PartitionKey": "dev-%d" % (i % 4)}}
    for i in range({from}, {from} + 10)])
"#
        )
    };
    // The time printed lies between the old batch's arrival and the new one's.
    let between = run_python(&format!(
        r#"{client}
import datetime
c.create_stream(StreamName="{stream}", ShardCount=2)
c.get_waiter("stream_exists").wait(StreamName="{stream}", WaiterConfig={{"Delay": 0.2}})
{old}
time.sleep(1.5)
print(datetime.datetime.now(datetime.timezone.utc).isoformat())
time.sleep(1.5)
{new}
"#,
        old = put(0),
        new = put(10),
    ));
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "start.toml",
        format!(
            r#"
[lake]
roll_interval = "200ms"
[streams.telemetry]
schema = "telemetry"
[sources.at]
type = "kinesis"
kinesis_stream = "{stream}"
endpoint = "{endpoint}"
start = "{between}"
stream = "telemetry"
[sources.now]
type = "kinesis"
kinesis_stream = "{stream}"
endpoint = "{endpoint}"
start = "latest"
stream = "telemetry"
"#,
            between = between.trim()
        ),
    );
    let dir = tmp.path().join("lake");
    let args = ["--config", config.to_str().expect("utf8")];
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let mut service = Service::start_with_env(&dir, &args, &env);
    let landed = |source: &str| {
        if !has_table(&dir, "telemetry") {
            return 0;
        }
        count(
            &dir,
            &format!("SELECT count(*) AS n FROM telemetry WHERE _source = '{source}'"),
        )
    };
    service.wait_until("the records after the time", || landed("at") >= 10);
    // Both sources hold their shard iterators by now (they poll at once); what is
    // put from here on is after `latest`.
    std::thread::sleep(Duration::from_secs(1));
    run_python(&format!("{client}{}", put(20)));
    service.wait_until("the records put after the start", || {
        landed("at") >= 20 && landed("now") >= 10
    });
    service.stop();
    let rows = query_json(
        &dir,
        "SELECT _source AS source, count(*) AS n, min(temperature) AS lo,
                max(temperature) AS hi, count(DISTINCT device_id) AS devices,
                min(device_id) AS first
         FROM telemetry GROUP BY 1 ORDER BY 1",
    );
    let summary: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap_or_default().to_owned(),
                r["n"].as_u64(),
                r["lo"].as_f64(),
                r["hi"].as_f64(),
                r["devices"].as_u64(),
                r["first"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "at".to_owned(),
                Some(20),
                Some(10.0),
                Some(29.0),
                Some(4),
                "dev-0".to_owned()
            ),
            (
                "now".to_owned(),
                Some(10),
                Some(20.0),
                Some(29.0),
                Some(4),
                "dev-0".to_owned()
            ),
        ]
    );
}

/// Produces records `ids` to partition 0 of `topic` as one record batch, record `i`
/// stamped `T0` + `i` seconds (its event time `ts` is `T0` + `i` ms).
fn produce_one_batch(broker: &str, topic: &str, ids: std::ops::Range<u64>) {
    run_python(&format!(
        r#"
from confluent_kafka import Producer
p = Producer({{"bootstrap.servers": "{broker}", "linger.ms": 2000, "batch.num.messages": 10000}})
for i in range({start}, {end}):
    p.produce("{topic}", value=('{{"device_id":"g%d","ts":%d,"temperature":%d}}' % (i % 3, {T0} + i, i)).encode(), partition=0, timestamp={T0} + i * 1000)
assert p.flush(30) == 0
"#,
        start = ids.start,
        end = ids.end
    ));
}

/// SASL (SCRAM-SHA-256) against a tansu that requires it: with the right password
/// (read from `sasl_password_env`) every record lands; with a wrong one nothing does,
/// the trouble is logged once, and the service still stops cleanly.
#[test]
fn kafka_sasl_scram_reads_with_the_right_password_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let topic = "secured";
    // Users and topics are made while the broker is open, then it restarts closed.
    let broker = seeded_tansu(tmp.path(), topic);
    let bin = std::env::var("SLUICE_TEST_TANSU_BIN").expect("tansu");
    let created = Command::new(bin)
        .args(["user", "create", "--broker"])
        .arg(format!("tcp://{}", broker.address()))
        .args(["--mechanism", "scram256", "alice", "s3cret"])
        .output()
        .expect("tansu user create");
    assert_ran(&created, "tansu user create");
    drop(broker);
    let broker = OwnServer::tansu(tmp.path(), true);
    let options = r#"security_protocol = "sasl_plaintext"
sasl_mechanism = "SCRAM-SHA-256"
sasl_username = "alice"
sasl_password_env = "SLUICE_TEST_KAFKA_PASSWORD""#;
    let password = |p| [("SLUICE_TEST_KAFKA_PASSWORD", p)];
    reads_all_or_nothing(
        tmp.path(),
        &broker.address(),
        topic,
        (options, &password("s3cret")),
        (options, &password("nope")),
        "SASL SCRAM authentication failed",
    );
}

/// TLS (`security_protocol = "ssl"`) through a TLS front with a self-signed
/// certificate: with that certificate as `ssl_ca_file` every record lands; without it
/// (the system's roots do not know it) the handshake fails, nothing lands, and the
/// trouble is logged once.
#[test]
fn kafka_tls_reads_only_when_the_broker_certificate_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let topic = "encrypted";
    drop(seeded_tansu(tmp.path(), topic));
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/test.sh installs it)");
    assert_ran(&made, "openssl req");
    // Clients learn the broker's address from its metadata, so tansu advertises the
    // TLS front's port and every connection goes through it.
    let front = free_port();
    let broker = OwnServer::tansu_advertising(tmp.path(), false, Some(front));
    let tls = OwnServer::tls_proxy(front, broker.address(), &cert, &key);
    let verified = format!(
        "security_protocol = \"ssl\"\nssl_ca_file = \"{}\"",
        cert.display()
    );
    reads_all_or_nothing(
        tmp.path(),
        &tls.address(),
        topic,
        (&verified, &[]),
        (r#"security_protocol = "ssl""#, &[]),
        "certificate verify failed",
    );
}

/// `start` as a time, for a group with no offsets: the broker's ListOffsets finds the
/// first record stamped at or after it, and reading starts there. (tansu answers time
/// lookups from its SQLite storage; its in-memory storage answers 0 to every one.)
#[test]
fn kafka_start_at_a_time_skips_the_records_before_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let topic = "timed";
    let broker = seeded_tansu(tmp.path(), topic);
    // Record i is stamped T0 + i s, and T0 is 2026-01-01T00:00:00Z.
    let options = r#"start = "2026-01-01T00:00:10Z""#;
    let text = kafka_telemetry_config("timed", &broker.address(), topic, options);
    let config = write_config(tmp.path(), "timed.toml", text);
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    service.wait_until("the records from the start", || telemetry_rows(&dir) >= 10);
    service.stop();
    let rows = &query_json(
        &dir,
        "SELECT count(*) AS n, min(temperature) AS lo FROM telemetry",
    )[0];
    assert_eq!(rows["n"].as_u64(), Some(10), "records 10..20: {rows:?}");
    assert_eq!(rows["lo"].as_f64(), Some(10.0), "from record 10: {rows:?}");
}

/// An open tansu with SQLite storage in `dir` and `topic` holding 20 telemetry records.
fn seeded_tansu(dir: &Path, topic: &str) -> OwnServer {
    let broker = OwnServer::tansu(dir, false);
    create_kafka_topic(&broker.address(), topic, 1);
    produce_one_batch(&broker.address(), topic, 0..20);
    broker
}

/// Reads the 20 records of `topic` at `broker` twice, each time as a new group with the
/// given source options and environment: `right` must land all of them; with `wrong`
/// nothing may land, the trouble is logged once and says `why`, and the service still
/// stops cleanly.
fn reads_all_or_nothing(
    tmp: &Path,
    broker: &str,
    topic: &str,
    right: (&str, &[(&str, &str)]),
    wrong: (&str, &[(&str, &str)]),
    why: &str,
) {
    let run = |name: &str, (options, env): (&str, &[(&str, &str)])| {
        let text = kafka_telemetry_config(name, broker, topic, options);
        let config = write_config(tmp, &format!("{name}.toml"), text);
        let dir = tmp.join(name);
        let args = ["--config", config.to_str().expect("utf8")];
        (Service::start_with_env(&dir, &args, env), dir)
    };
    let (mut service, dir) = run("right", right);
    service.wait_until("every record", || telemetry_rows(&dir) >= 20);
    service.stop();
    assert_eq!(telemetry_rows(&dir), 20);
    let (mut service, dir) = run("wrong", wrong);
    service.wait_until("the refusal logged", || {
        service.log_text().contains("kafka trouble")
    });
    std::thread::sleep(Duration::from_secs(2));
    let received = service.received("wrong");
    let log = service.log_text();
    assert_eq!(
        log.matches(why).count(),
        1,
        "the log says why ({why}), once:\n{log}"
    );
    service.stop();
    assert_eq!(received, 0.0, "nothing read");
    assert_eq!(telemetry_rows(&dir), 0);
    assert_eq!(
        log.matches("kafka trouble").count(),
        1,
        "logged once, not per retry:\n{log}"
    );
}

/// `start = "latest"` for a group with no offsets: the backlog is skipped and what is
/// produced after the assignment lands. (librdkafka looks the end up on its first
/// fetch, so batches are produced until one lands; none of the backlog may.)
#[test]
fn kafka_start_latest_skips_the_backlog() {
    let broker = kafka();
    let topic = format!("latest-{}", std::process::id());
    create_kafka_topic(&broker, &topic, 1);
    produce_one_batch(&broker, &topic, 0..50);
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = kafka_telemetry_config("latest", &broker, &topic, r#"start = "latest""#);
    let config = write_config(tmp.path(), "latest.toml", text);
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    service.wait_until("the assignment", || {
        service.log_text().contains("partitions assigned")
    });
    let landed = || service.received("latest") as u64;
    let mut next = 50;
    while landed() == 0 {
        assert!(next < 1_000, "nothing produced after the start landed");
        produce_one_batch(&broker, &topic, next..next + 10);
        next += 10;
        let deadline = Instant::now() + Duration::from_secs(3);
        while landed() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    service.wait_until("the last batch", || telemetry_rows(&dir) >= 10);
    service.stop();
    let rows = &query_json(
        &dir,
        "SELECT count(*) AS n, min(temperature) AS lo FROM telemetry",
    )[0];
    assert!(
        rows["lo"].as_f64() >= Some(50.0),
        "nothing of the backlog (temperatures 0..50) lands: {rows:?}"
    );
    assert!(rows["n"].as_u64() <= Some(next - 50), "{rows:?}");
}

/// A restart that resumes inside a record batch: tansu 0.6 answers with the next
/// batch, so the records after the checkpointed one never arrive. The source counts
/// them (`sluice_source_gap_records_total`) and logs it, so what landed plus what is
/// reported missing is exactly what was produced.
#[test]
fn kafka_records_the_broker_skips_after_a_resume_are_counted_as_a_gap() {
    let broker = kafka();
    let topic = format!("gap-{}", std::process::id());
    create_kafka_topic(&broker, &topic, 1);
    produce_one_batch(&broker, &topic, 0..100);
    let tmp = tempfile::tempdir().expect("tempdir");
    // Both runs are source "gaps", so the second resumes from the first's manifest.
    let config = |name: &str, limit: &str| {
        let text = kafka_telemetry_config("gaps", &broker, &topic, limit);
        write_config(tmp.path(), &format!("{name}.toml"), text)
    };
    let dir = tmp.path().join("lake");
    let rows = telemetry_rows;
    // First run: 20 records a second, stopped part-way through the batch.
    let slow = config(
        "slow",
        r#"limit = { rate = 20, burst = 5, mode = "block" }"#,
    );
    let mut service = Service::start(&dir, &["--config", slow.to_str().expect("utf8")]);
    service.wait_until("some of the batch", || rows(&dir) >= 20);
    service.stop();
    let first = rows(&dir);
    assert!(
        (20..100).contains(&first),
        "the first run stops inside the batch: {first}"
    );
    // A second batch, then a run without a limit.
    produce_one_batch(&broker, &topic, 100..200);
    let fast = config("fast", "");
    let mut service = Service::start(&dir, &["--config", fast.to_str().expect("utf8")]);
    let gap = || service.metric_sum("sluice_source_gap_records_total", &[]) as u64;
    service.wait_until("every record landed or counted missing", || {
        rows(&dir) + gap() >= 200
    });
    let missing = gap();
    service.stop();
    let landed = rows(&dir);
    eprintln!("gap: {first} read before the restart, {landed} landed, {missing} reported missing");
    assert_eq!(landed + missing, 200, "landed + missing = produced");
    assert!(
        missing > 0,
        "tansu 0.6 skips the rest of a batch on a resume inside it; if this fails, the broker no longer does"
    );
}

/// A per-key limit in block mode on a Kafka source: three devices' backlog of 100
/// records each, at 50/s per device with a burst of 10. The records over the rate wait
/// (the source polls no more meanwhile) instead of being shed, and every one lands.
#[test]
fn kafka_a_blocking_per_key_limit_holds_records_and_sheds_none() {
    let broker = kafka();
    let topic = format!("keyblock-{}", std::process::id());
    create_kafka_topic(&broker, &topic, 1);
    produce_one_batch(&broker, &topic, 0..300);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "keyblock.toml",
        kafka_telemetry_config(
            "keyblock",
            &broker,
            &topic,
            r#"limit = { per_key_rate = 50, per_key_burst = 10, per_key_mode = "block" }"#,
        ),
    );
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    service.wait_until("every record landed", || telemetry_rows(&dir) >= 300);
    let (blocked, shed) = (
        service.limit_events("per_key", "blocked"),
        service.limit_events("per_key", "shed"),
    );
    let waited = service.metric_sum("sluice_limit_blocked_seconds_total", &[]);
    service.stop();
    eprintln!("kafka per-key block: {blocked} records held, {waited:.2} s in all");
    assert!(blocked > 0, "records over their device's rate waited");
    assert_eq!(shed, 0);
    assert_eq!(
        count(&dir, "SELECT count(DISTINCT ts) AS n FROM telemetry"),
        300
    );
    assert_eq!(telemetry_rows(&dir), 300, "each once");
    assert!(!has_table(&dir, "dead_letter"), "nothing shed");
}

/// Publishes telemetry events `ids` (500 devices, one topic each under `prefix`) at
/// QoS 1 from a thread, and then `sentinels` far ahead in event time, with ids from
/// `ids.end` on (device and topic `zz<k>` each: on a cluster `_partition` is the topic
/// and `_offset` a node's own sequence number, so rows of one topic on two nodes could
/// share both). Returns how many publishes the broker acknowledged.
fn spawn_mqtt_producer(
    port: u16,
    prefix: &str,
    ids: std::ops::Range<u64>,
    sentinels: u64,
) -> std::thread::JoinHandle<u64> {
    let (devices, zz) = (prefix.to_owned(), prefix.to_owned());
    let (events, ids_len) = (ids.end, ids.end - ids.start);
    let messages = ids
        .map(move |i| {
            let payload = format!(
                r#"{{"id":{i},"device_id":"d{:03}","ts":{},"temperature":{}}}"#,
                i % 500,
                T0 + 2 * i,
                i % 97
            );
            (format!("{devices}/d{:03}", i % 500), payload)
        })
        .chain((0..sentinels).map(move |k| {
            let id = events + k;
            let payload = format!(r#"{{"id":{id},"device_id":"zz-{k}","ts":{SENTINEL}}}"#);
            (format!("{zz}/zz{k}"), payload)
        }));
    let expected = ids_len + sentinels;
    spawn_mqtt_publisher(port, &format!("{prefix}-producer"), expected, messages)
}

/// A config reading `<prefix>/#` from the mosquitto on `port` at QoS 1 (durable
/// acknowledgements are the default for an external broker).
fn mqtt_config(dir: &Path, port: u16, prefix: &str) -> std::path::PathBuf {
    let source = mqtt_source(port, prefix);
    write_config(dir, "mqtt.toml", format!("{PIPELINE}{source}"))
}

/// The `plant` source feeding `events` from `<prefix>/#` on the mosquitto on `port`.
fn mqtt_source(port: u16, prefix: &str) -> String {
    format!(
        r#"
[sources.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
topics = ["{prefix}/#"]
client_id = "{prefix}-sluice"
stream = "events"
"#
    )
}

/// Subscribes once with the service's persistent session, so that the broker queues
/// for it from the first event even while the service is down.
fn create_mqtt_session(port: u16, prefix: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = mqtt_config(tmp.path(), port, prefix);
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    service.wait_until("the subscription", || service.subscribed("plant"));
    service.stop();
}

#[test]
fn mqtt_qos1_kill_9_ten_times_loses_and_duplicates_nothing() {
    let (_, _, port) = mosquitto_address();
    let prefix = format!("eo-mqtt-{}", std::process::id());
    create_mqtt_session(port, &prefix);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = mqtt_config(tmp.path(), port, &prefix);
    let dir = tmp.path().join("lake");
    let producer = spawn_mqtt_producer(port, &prefix, 0..EVENTS, 1);
    let expected = EVENTS + 1;
    let mut last = (0, 0);
    crash_loop(&dir, &config, (2_000, 10_000), || {
        let counts = raw_counts(&dir);
        if counts != last {
            eprintln!("rows, distinct ids: {counts:?}");
            last = counts;
        }
        counts.0 >= expected && window_mismatches(&dir) == 0
    });
    assert_eq!(
        producer.join().expect("producer"),
        expected,
        "every publish acknowledged"
    );
    assert_exactly_once(&dir, EVENTS, expected);
}

/// mosquitto (with persistence) stopped and restarted twice while Sluice is reading a
/// backlog, once while `sluice` is killed too: the broker's saved session redelivers
/// what Sluice had not acknowledged, and every event lands exactly once. The producer
/// is idle across the restarts (its own QoS 1 retries would be duplicates before
/// Sluice: MQTT publishing is at least once).
///
/// This once stalled for good after a restart early in the backlog: the source's poll
/// loop awaited room in rumqttc's request queue to re-subscribe while the queue was
/// full of acknowledgements that only that loop's polling could send.
#[test]
fn mqtt_broker_restarted_mid_stream_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = tmp.path().join("mosquitto");
    std::fs::create_dir_all(&store).expect("mkdir");
    let mut broker = OwnServer::mosquitto(
        tmp.path(),
        0,
        &format!(
            "allow_anonymous true\npersistence true\npersistence_location {}/",
            store.display()
        ),
    );
    let port = broker.port;
    let prefix = "restarts";
    create_mqtt_session(port, prefix);
    let events = EVENTS;
    let config = mqtt_config(tmp.path(), port, prefix);
    let dir = tmp.path().join("lake");
    let args = ["--config", config.to_str().expect("utf8")];
    // Most of the events are queued in the broker before Sluice starts, so Sluice is
    // still reading them when the broker stops.
    let queued = events * 3 / 4;
    let first = spawn_mqtt_producer(port, prefix, 0..queued, 0);
    assert_eq!(
        first.join().expect("producer"),
        queued,
        "backlog acknowledged"
    );
    let mut service = Service::start(&dir, &args);
    wait_long(&service, "reading to start", || {
        service.received("plant") > 0.0
    });
    broker.terminate();
    // What Sluice had buffered is counted by now; nothing arrives while it is down.
    std::thread::sleep(Duration::from_secs(3));
    let read = service.received("plant");
    eprintln!("broker stopped after {read} of {queued} messages were read");
    broker.restart();
    wait_long(&service, "more messages after the restart", || {
        service.received("plant") > read
    });
    broker.terminate();
    service.kill9();
    eprintln!(
        "broker stopped and sluice killed with {:?} rows, ids in the lake",
        raw_counts(&dir)
    );
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    let service = Service::start(&dir, &args);
    let rest = spawn_mqtt_producer(port, prefix, queued..events, 1);
    let expected = events + 1;
    assert_eq!(
        rest.join().expect("producer"),
        events - queued + 1,
        "the rest acknowledged"
    );
    finish_after_outages(
        service,
        &dir,
        events,
        (expected, expected),
        "broker connection lost",
    );
}

/// Events of the S3 crash test.
const S3_EVENTS: u64 = 100_000;

/// As [`raw_counts`], for a lake on S3 (`(0, 0)` while the query fails).
fn s3_raw_counts(config: &Path, lake: &str) -> (u64, u64) {
    counts_of(
        s3_query(config, lake, RAW_COUNTS)
            .as_ref()
            .and_then(|rows| rows.first()),
    )
}

/// The lake on S3 (SeaweedFS, which arbitrates Delta commits with `If-None-Match`):
/// `sluice` killed with -9 three times at random moments (`config` reads a source that
/// holds `expected` records with distinct ids), then run until every record is in the
/// lake: every record lands once, the windows equal the batch computation, and DuckDB
/// (delta + httpfs) and Python deltalake read the same rows from the bucket.
fn s3_crash_test(tmp: &Path, lake: &str, config: &Path, expected: u64) {
    let (endpoint, key, secret) = s3();
    let start = || Service::start_on_s3(lake, tmp.join("sluice.log"), config);
    let mut moments = Moments::new();
    for round in 0..3 {
        let mut service = start();
        std::thread::sleep(moments.next_ms(3_000, 8_000));
        service.kill9();
        eprintln!("kill -9 #{} done", round + 1);
    }
    let windows_equal = || {
        s3_query(config, lake, WINDOW_MISMATCHES)
            .and_then(|rows| rows.into_iter().next())
            .and_then(|row| row["n"].as_u64())
            == Some(0)
    };
    let mut service = start();
    wait_long(&service, "every event in the S3 lake", || {
        s3_raw_counts(config, lake).0 >= expected && windows_equal()
    });
    service.stop();
    assert_eq!(
        s3_raw_counts(config, lake),
        (expected, expected),
        "every record once"
    );
    // Other engines read the bucket through the Delta log.
    let out = run_python(&format!(
        r#"{DUCKDB_DELTA}
import deltalake, os, duckdb_extension_httpfs
opts = {{"AWS_ENDPOINT_URL": {endpoint:?}, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": {key:?}, "AWS_SECRET_ACCESS_KEY": {secret:?}, "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false"}}
t = deltalake.DeltaTable("{lake}/events", storage_options=opts).to_pyarrow_table()
con = duck()
con.load_extension(os.path.join(os.path.dirname(duckdb_extension_httpfs.__file__), "extensions", "v" + duckdb.__version__, "httpfs.duckdb_extension"))
con.execute("CREATE SECRET s3 (TYPE S3, KEY_ID '{key}', SECRET '{secret}', REGION 'us-east-1', ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)")
n, d = con.execute("SELECT count(*), count(DISTINCT id) FROM delta_scan('{lake}/events')").fetchall()[0]
print(t.num_rows, len(set(t.column("id").to_pylist())), n, d)
"#,
        host = endpoint.trim_start_matches("http://"),
    ));
    let seen: Vec<u64> = out
        .split_whitespace()
        .map(|n| n.parse().expect("count"))
        .collect();
    assert_eq!(
        seen, [expected; 4],
        "Python deltalake and DuckDB read every record once"
    );
}

/// [`s3_crash_test`] reading a Kafka topic.
#[test]
fn kafka_into_an_s3_lake_exactly_once_across_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lake = format!("s3://{}/lake", create_bucket("eo-s3"));
    let broker = kafka();
    let topic = format!("eo-s3-{}", std::process::id());
    let partitions = 3;
    create_kafka_topic(&broker, &topic, partitions);
    let config = kafka_config_with(tmp.path(), &broker, &topic, &s3_lake_section());
    let mut producer = spawn_kafka_producer(&broker, &topic, partitions, S3_EVENTS);
    s3_crash_test(
        tmp.path(),
        &lake,
        &config,
        S3_EVENTS + u64::from(partitions),
    );
    assert!(producer.wait().expect("producer").success(), "producer");
}

/// [`s3_crash_test`] reading mosquitto at QoS 1: the write-ahead log of acknowledged
/// messages stays on the local disk (`./sluice-local`) while the lake is on S3.
#[test]
fn mqtt_into_an_s3_lake_exactly_once_across_kill_9() {
    let (_, _, port) = mosquitto_address();
    let prefix = format!("eo-mqtt-s3-{}", std::process::id());
    create_mqtt_session(port, &prefix);
    let tmp = tempfile::tempdir().expect("tempdir");
    let lake = format!("s3://{}/lake", create_bucket("eo-mqtt-s3"));
    let config = mqtt_config(tmp.path(), port, &prefix);
    put_lake_on_s3(&config);
    let producer = spawn_mqtt_producer(port, &prefix, 0..S3_EVENTS, 1);
    s3_crash_test(tmp.path(), &lake, &config, S3_EVENTS + 1);
    assert_eq!(
        producer.join().expect("producer"),
        S3_EVENTS + 1,
        "every publish acknowledged"
    );
}

/// [`s3_crash_test`] reading a Kinesis stream.
#[test]
fn kinesis_into_an_s3_lake_exactly_once_across_kill_9() {
    let endpoint = kinesis_endpoint();
    let stream = format!("eo-kinesis-s3-{}", std::process::id());
    let tmp = tempfile::tempdir().expect("tempdir");
    let lake = format!("s3://{}/lake", create_bucket("eo-kinesis-s3"));
    let config = kinesis_config(tmp.path(), &endpoint, &stream);
    put_lake_on_s3(&config);
    let producer = spawn_kinesis_producer(&endpoint, &stream, S3_EVENTS, false);
    let sentinels = kinesis_sentinels(producer);
    s3_crash_test(tmp.path(), &lake, &config, S3_EVENTS + sentinels);
}

/// Adds the `[lake.s3]` section of the test S3 server to the config at `path` (unless
/// it has one: [`write_config`] adds it with `SLUICE_TEST_LAKE=s3`).
fn put_lake_on_s3(path: &Path) {
    let mut config = std::fs::read_to_string(path).expect("read config");
    if !config.contains("[lake.s3]") {
        config.push_str(&s3_lake_section());
        std::fs::write(path, config).expect("write config");
    }
}

/// A service reading a fresh Kafka topic (3 partitions, [`S3_EVENTS`] events being
/// produced) into a lake on an S3 server of the test's own, once rows are in the lake.
struct S3Outage {
    s3_server: OwnServer,
    lake: String,
    broker: String,
    topic: String,
    partitions: u32,
    config: std::path::PathBuf,
    service: Service,
    producer: Child,
}

impl S3Outage {
    /// Starts it in `dir`; `name` names the bucket and the topic.
    fn start(dir: &Path, name: &str) -> Self {
        let s3_server = OwnServer::seaweedfs(dir);
        let endpoint = s3_server.url();
        let bucket = create_bucket_at(&endpoint, name);
        let lake = format!("s3://{bucket}/lake");
        let broker = kafka();
        let topic = format!("eo-s3-{name}-{}", std::process::id());
        let partitions = 3;
        create_kafka_topic(&broker, &topic, partitions);
        let config = kafka_config_with(dir, &broker, &topic, &s3_section(&endpoint));
        let service = Service::start_on_s3(&lake, dir.join(format!("{name}.log")), &config);
        let producer = spawn_kafka_producer(&broker, &topic, partitions, S3_EVENTS);
        wait_long(&service, "rows in the S3 lake", || {
            s3_raw_counts(&config, &lake).0 > 0
        });
        Self {
            s3_server,
            lake,
            broker,
            topic,
            partitions,
            config,
            service,
            producer,
        }
    }
}

/// The S3 server of the lake killed for 30 s mid-stream: no Kafka offset is committed
/// while it is away (the source is held), the outage is logged once, and once it is back
/// the same process (no restart) lands every record exactly once.
#[test]
fn s3_server_stopped_for_30_s_mid_stream_holds_the_source_and_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let S3Outage {
        mut s3_server,
        lake,
        broker,
        topic,
        partitions,
        config,
        mut service,
        mut producer,
    } = S3Outage::start(tmp.path(), "outage");

    s3_server.stop();
    let stopped = Instant::now();
    // A checkpoint that was already past its S3 writes may still commit its offsets.
    std::thread::sleep(Duration::from_secs(5));
    let held = committed_offsets(&broker, &topic, partitions);
    let received = service.received("orders");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    assert_eq!(
        committed_offsets(&broker, &topic, partitions),
        held,
        "no offset is committed while S3 is away"
    );
    eprintln!(
        "during the outage: {} records read, offsets held at {held}",
        service.received("orders") - received
    );
    s3_server.restart();

    let expected = S3_EVENTS + u64::from(partitions);
    wait_long(&service, "every event after S3 came back", || {
        s3_raw_counts(&config, &lake).0 >= expected
    });
    assert!(producer.wait().expect("producer").success(), "producer");
    service.stop();
    assert_eq!(
        s3_raw_counts(&config, &lake),
        (expected, expected),
        "every record once"
    );
    assert!(
        committed_offsets(&broker, &topic, partitions) >= expected as i64,
        "every offset committed in the end"
    );
    let log = service.log_text();
    assert!(
        log.matches("checkpoint failed").count() <= 1,
        "the outage is logged once:\n{log}"
    );
}

/// SIGTERM while the S3 server is away: the last commit cannot be made, so the stop
/// gives up after its bound and exits with an error, saying so, without a panic (a
/// commit still retrying on a blocking thread used to panic as the runtime shut down
/// under it). Started again while S3 is still away, the service waits for the lake
/// (logged once, `/health` 503 "starting"); once S3 is back it reads on from the last
/// commit and the lake holds every record once.
#[test]
fn a_stop_while_s3_is_away_gives_up_cleanly_and_the_next_start_waits_and_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let S3Outage {
        mut s3_server,
        lake,
        partitions,
        config,
        mut service,
        mut producer,
        ..
    } = S3Outage::start(tmp.path(), "stop");
    s3_server.stop();
    service.signal("TERM");
    let status = service.wait_exit(Duration::from_secs(90));
    let log = service.log_text();
    assert!(!status.success(), "the stop could not commit:\n{log}");
    assert!(log.contains("shutdown took longer"), "{log}");
    assert!(!log.contains("panicked"), "no panic on the way out:\n{log}");

    assert!(producer.wait().expect("producer").success(), "producer");

    // Started again while the S3 server is still away: the start waits for the lake,
    // says so once, and answers "starting" meanwhile.
    let mut service = Service::spawn_on_s3(&lake, tmp.path().join("second.log"), &config);
    const WAITING: &str = "cannot read the lake at start";
    service.wait_until("the wait for the lake, logged", || {
        service.log_text().contains(WAITING)
    });
    // Long enough for the breaker to open (five attempts, each after the store
    // client's own retries).
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(
        http_request(&service.http, "GET", "/health", "").map(|(status, _)| status),
        Some(503),
        "starting"
    );
    assert_eq!(
        service.log_text().matches(WAITING).count(),
        1,
        "logged once"
    );
    // SeaweedFS answers 500 for a few seconds after its restart while its volumes
    // load: that too is waited out.
    s3_server.restart();
    wait_long(&service, "health after the S3 server is back", || {
        service.healthy()
    });
    assert!(service.log_text().contains("the lake answers again"));
    let expected = S3_EVENTS + u64::from(partitions);
    wait_long(&service, "every event after the restart", || {
        s3_raw_counts(&config, &lake).0 >= expected
    });
    service.stop();
    assert_eq!(
        s3_raw_counts(&config, &lake),
        (expected, expected),
        "every record once"
    );
}

/// A Kafka source held back by its rate limit falls behind the topic: its consumer lag
/// (librdkafka's statistics) shows in `/metrics` and the console's overview, in records.
#[test]
fn kafka_consumer_lag_shows_in_records() {
    let broker = kafka();
    let topic = format!("lag-{}", std::process::id());
    create_kafka_topic(&broker, &topic, 1);
    let mut producer = spawn_kafka_producer(&broker, &topic, 1, 20_000);
    assert!(producer.wait().expect("producer").success(), "producer");
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = kafka_source(&broker, &topic, "limit = { rate = 500 }");
    let config = write_config(tmp.path(), "kafka.toml", format!("{PIPELINE}{source}"));
    let mut service = Service::start(
        &tmp.path().join("lake"),
        &["--config", config.to_str().expect("utf8")],
    );
    service.wait_until("a lag in records", || {
        service.metric_sum("sluice_source_lag", &["kind=\"kafka\"", "unit=\"records\""]) > 1_000.0
    });
    service.wait_until("the console shows it", || {
        http_get(&service.http, "/api/overview?range=5m")
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|o| {
                let s = &o["latest"]["sources"]["orders"];
                s["lag_unit"] == "records" && s["lag"].as_f64() > Some(1_000.0)
            })
    });
    service.stop();
}

/// `Idempotency-Key` through the API (keys in memory, no log): a body sent again
/// under its key gets the first report with `"duplicate":true` and lands once; the
/// key with another body gets 422, a malformed key 400; both outcomes are counted.
#[test]
fn http_ingest_takes_a_body_once_per_idempotency_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(tmp.path(), "http.toml", PIPELINE);
    let dir = tmp.path().join("lake");
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    let body: String = (0..10)
        .map(|i| format!("{{\"id\":{i},\"device_id\":\"d1\",\"ts\":{}}}\n", T0 + i))
        .chain(["not json\n".to_owned()])
        .collect();
    let post = |key: &str, body: &str| {
        let header = format!("Idempotency-Key: {key}\r\n");
        http_exchange_with(&service.http, "POST", "/api/ingest/events", &header, body)
            .map(|(status, _, answer)| (status, answer))
            .expect("an answer")
    };
    let first = post("order-7", &body);
    assert_eq!(first.0, 200, "{first:?}");
    let report: serde_json::Value = serde_json::from_str(&first.1).expect("json");
    assert_eq!(
        (
            report["accepted"].as_u64(),
            report["dead_lettered"].as_u64()
        ),
        (Some(10), Some(1))
    );
    assert!(report.get("duplicate").is_none(), "{report}");
    let again = post("order-7", &body);
    let mut duplicate: serde_json::Value = serde_json::from_str(&again.1).expect("json");
    assert_eq!(
        (again.0, duplicate["duplicate"].as_bool()),
        (200, Some(true)),
        "{again:?}"
    );
    duplicate
        .as_object_mut()
        .expect("object")
        .remove("duplicate");
    assert_eq!(duplicate, report, "the first answer's report");
    let reused = post("order-7", "{\"id\":99,\"device_id\":\"d1\",\"ts\":1}\n");
    assert_eq!(reused.0, 422, "{reused:?}");
    assert!(reused.1.contains("another body"), "{reused:?}");
    let bad = post("two words", &body);
    assert_eq!(bad.0, 400, "{bad:?}");
    assert!(bad.1.contains("Idempotency-Key"), "{bad:?}");
    let outcome = |o: &str| {
        service.metric_sum(
            "sluice_http_ingest_keys_total",
            &[&format!("outcome=\"{o}\"")],
        )
    };
    assert_eq!((outcome("duplicate"), outcome("reused")), (1.0, 1.0));
    service.wait_until("the body's rows", || {
        has_table(&dir, "events") && raw_counts(&dir).0 >= 10
    });
    service.stop();
    assert_eq!(raw_counts(&dir).0, 10, "taken once");
}

/// HTTP ingest with its write-ahead log (`[http] durable_acks = true`): a
/// writer posts bodies of 1,000 numbered lines while the service is killed with
/// SIGKILL three times mid-stream and started again. Every line of a body answered
/// 200 is in the raw table exactly once (the log replays what the last checkpoint did
/// not cover); a body whose request died with the service is in it once or not at all
/// (it is not sent again); no line is there twice; and `device_minute` equals the
/// batch computation, each window emitted once. With `durable_acks = false` (the
/// default) it fails: answered lines are lost.
#[test]
fn http_ingest_answers_once_logged_and_a_kill_9_loses_no_answered_line() {
    kill_http_writer(false);
}

/// As above, but the writer sends each body under an `Idempotency-Key` and sends a
/// body that got no answer again, under the same key, until it is answered (across
/// the restarts). Then every line is in the raw table exactly once: a body that was
/// logged before its answer died is recognised by its key, from the log, after the
/// restart. Without keys the same run doubles such bodies.
#[test]
fn http_ingest_retried_under_idempotency_keys_across_kill_9_lands_every_line_once() {
    kill_http_writer(true);
}

/// The writer and three kills of the two tests above; `retry`: with keys, sending
/// unanswered bodies again.
fn kill_http_writer(retry: bool) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        "http.toml",
        format!("{PIPELINE}[http]\ndurable_acks = true\n"),
    );
    let dir = tmp.path().join("lake");
    let answered = Arc::new(Mutex::new(Vec::<std::ops::Range<u64>>::new()));
    let mut next = 0u64;
    let body = |ids: std::ops::Range<u64>| -> String {
        ids.map(|i| {
            format!(
                "{{\"id\":{i},\"device_id\":\"d{:03}\",\"ts\":{},\"temperature\":{}}}\n",
                i % 500,
                T0 + 2 * i,
                i % 97
            )
        })
        .collect()
    };
    // A body sent and not answered yet, sent again (with `retry`) until it is.
    let mut unanswered: Option<std::ops::Range<u64>> = None;
    let duplicates = Arc::new(AtomicU64::new(0));
    let post = move |http: &str, ids: &std::ops::Range<u64>| {
        let key = format!("Idempotency-Key: body-{}\r\n", ids.start);
        let headers = if retry { key.as_str() } else { "" };
        http_exchange_with(
            http,
            "POST",
            "/api/ingest/events",
            headers,
            &body(ids.clone()),
        )
        .map(|(status, _, answer)| (status, answer))
    };
    for round in 0..3u64 {
        let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, answered, http) = (stop.clone(), answered.clone(), service.http.clone());
            let duplicates = duplicates.clone();
            let mut pending = unanswered.take();
            std::thread::spawn(move || {
                let mut next = next;
                while !stop.load(Ordering::Relaxed) {
                    let ids = pending.take().unwrap_or_else(|| {
                        next += 1_000;
                        next - 1_000..next
                    });
                    match post(&http, &ids) {
                        Some((200, answer)) => {
                            if answer.contains("\"duplicate\":true") {
                                duplicates.fetch_add(1, Ordering::Relaxed);
                            }
                            answered.lock().expect("answered").push(ids)
                        }
                        // Died with the service, or refused: sent again only with keys.
                        _ => {
                            pending = retry.then_some(ids);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                (next, pending)
            })
        };
        service.wait_until("a checkpoint or two", || {
            service.metric_sum("sluice_lake_files_committed_total", &[]) >= 2.0
        });
        std::thread::sleep(Duration::from_millis(200 + 150 * round));
        service.kill9();
        stop.store(true, Ordering::Relaxed);
        (next, unanswered) = writer.join().expect("writer");
    }
    // The last start replays the log; a far-future sentinel closes every window.
    let mut service = Service::start(&dir, &["--config", config.to_str().expect("utf8")]);
    if let Some(ids) = unanswered {
        let answer = post(&service.http, &ids);
        assert_eq!(
            answer.as_ref().map(|(status, _)| *status),
            Some(200),
            "{answer:?}"
        );
        if answer.is_some_and(|(_, a)| a.contains("\"duplicate\":true")) {
            duplicates.fetch_add(1, Ordering::Relaxed);
        }
        answered.lock().expect("answered").push(ids);
    }
    let sentinel = format!("{{\"id\":{next},\"device_id\":\"zz-0\",\"ts\":{SENTINEL}}}\n");
    let answer = http_request(&service.http, "POST", "/api/ingest/events", &sentinel);
    assert_eq!(answer.map(|(status, _)| status), Some(200));
    let answered = std::mem::take(&mut *answered.lock().expect("answered"));
    let lines: u64 = answered.iter().map(|r| r.end - r.start).sum();
    let landed = || {
        let rows = query_json(
            &dir,
            "SELECT id FROM events WHERE device_id NOT LIKE 'zz-%'",
        );
        rows.iter()
            .filter_map(|r| r["id"].as_u64())
            .collect::<Vec<u64>>()
    };
    service.wait_until("every answered line", || {
        let ids: std::collections::HashSet<u64> = landed().into_iter().collect();
        answered
            .iter()
            .flat_map(|r| r.clone())
            .all(|i| ids.contains(&i))
    });
    service.wait_until("every window", || {
        has_table(&dir, "device_minute") && window_mismatches(&dir) == 0
    });
    service.stop();
    let ids = landed();
    let distinct: std::collections::HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), distinct.len(), "no line twice");
    assert!(
        answered
            .iter()
            .flat_map(|r| r.clone())
            .all(|i| distinct.contains(&i)),
        "every answered line"
    );
    if retry {
        assert_eq!(distinct.len() as u64, next, "every line sent, each once");
    }
    assert_eq!(
        window_mismatches(&dir),
        0,
        "device_minute = batch computation"
    );
    eprintln!(
        "{lines} answered lines in {} bodies ({} answered as duplicates); {} rows landed, {} of them from bodies whose answer died with the service",
        answered.len(),
        duplicates.load(Ordering::Relaxed),
        ids.len(),
        ids.len() as u64 - lines
    );
}
