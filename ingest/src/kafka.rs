//! The Kafka source: a consumer-group member (rdkafka) whose offsets follow the lake.
//!
//! - Auto-commit is off. Offsets are committed to Kafka only when a checkpoint that
//!   covers them is durable (the `checkpoints` watch), so the group offset never runs
//!   ahead of the lake.
//! - Each record's `(topic/partition, offset)` goes into the emitter's positions, and
//!   from there into the checkpoint manifest.
//! - On assign, a partition resumes after its manifest position if the manifest has one
//!   (it can be ahead of the group offset when we crashed between the manifest and the
//!   commit); otherwise from the group offset, else from `start`. Records at or before
//!   the manifest position are also skipped as they arrive, so a replay can never
//!   repeat a committed row.
//! - On revoke, the offsets of the last checkpoint are committed synchronously for the
//!   revoked partitions before they are released. Rows read since then are in staged
//!   files no manifest covers yet; the next owner re-reads them from that commit.
//! - The `sluice-hops` header carries the loop-guard hop count.
//! - Broker trouble is retried by librdkafka; it is logged once when it starts and once
//!   when records flow again (librdkafka's own per-reconnect `FAIL` lines go to debug).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message};
use sluice_config::{KafkaSourceConfig, parse_kafka_start};
use sluice_core::{Checkpointed, Clock, Seq, SeqText, Shutdown, SourcePositions};
use tokio::sync::watch;

use crate::decode::MessageMeta;
use crate::emit::Emitter;
use crate::source::{Owned, Peers};
use crate::{Error, Result};

pub use sluice_core::schema::HOPS_HEADER;
use sluice_core::schema::{ORIGIN_HEADER, SEQ_HEADER};

/// A configured Kafka source, ready to [`run`](KafkaSource::run).
pub struct KafkaSource {
    name: String,
    consumer: StreamConsumer<Context>,
    emitter: Emitter,
    flush_interval: Duration,
    clock: Arc<dyn Clock>,
    key_from_record: bool,
    /// The source of a repartitioned stream: skips origins' replays (see
    /// [`Emitter::replayed_by_origin`]).
    repartition: bool,
    /// Whether checkpoints run: a revoke then waits for one covering what was read.
    checkpoints_on: bool,
    checkpoints: watch::Receiver<Checkpointed>,
    /// The other nodes' checkpoints (a cluster node).
    peers: Option<Arc<dyn Peers>>,
    /// Asks the lake task for a checkpoint soon (a revoke waiting for one).
    checkpoint_now: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Callbacks: rebalances, and errors logged once per outage.
struct Context {
    name: String,
    /// Partition (`topic/n`) → last offset in the manifest we started from; in a
    /// cluster, raised to the furthest offset another node's checkpoint covers when
    /// partitions move here ([`peer_floors`]).
    resume: std::sync::Mutex<HashMap<String, i64>>,
    /// Partition → last offset this process handed on, as of the read loop's last
    /// flush: a partition given back by a rebalance starts after it.
    handed_on: std::sync::Mutex<HashMap<String, i64>>,
    /// `start` as epoch ms when it is a time.
    start_ms: Option<i64>,
    /// Whether this node is one of a cluster (`[cluster]`): other nodes may have read
    /// and committed a partition since this node's manifest.
    cluster: bool,
    /// Partition → last offset covered by the newest durable checkpoint.
    acked: std::sync::Mutex<BTreeMap<String, i64>>,
    outage: AtomicBool,
    /// What this node owns, for its status: updated on every assign and revoke.
    owned: Arc<Owned>,
    /// Partitions of the latest assignment, taken by the read loop to announce them.
    assigned: std::sync::Mutex<Option<Vec<String>>>,
    /// Set with `assigned`, so the read loop checks one atomic per record, not a lock.
    newly_assigned: AtomicBool,
    /// Partitions a rebalance takes away, handed to the read loop (see
    /// [`give_back`]); librdkafka holds the rebalance until it unassigns.
    revoking: std::sync::Mutex<Option<TopicPartitionList>>,
    /// Wakes the read loop when `revoking` is set.
    revoke: tokio::sync::Notify,
    /// Whether the read loop runs. A single node, or a node whose read loop has
    /// stopped (closing), commits the last checkpoint's offsets on a revoke and lets go
    /// at once, in the callback (partitions it gets back skip what it handed on).
    reading: AtomicBool,
}

impl ClientContext for Context {
    /// librdkafka's own log lines. A broker that cannot be reached (or refuses our
    /// credentials or certificate) logs a `FAIL` line at error level on every
    /// reconnect; `error` below already reports the outage once, so those go to debug.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error if facility != "FAIL" => {
                tracing::error!(target: "librdkafka", component = %self.name, "librdkafka: {facility} {message}")
            }
            L::Warning => {
                tracing::warn!(target: "librdkafka", component = %self.name, "librdkafka: {facility} {message}")
            }
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", component = %self.name, "librdkafka: {facility} {message}")
            }
            _ => {
                tracing::debug!(target: "librdkafka", component = %self.name, "librdkafka: {facility} {message}")
            }
        }
    }

    /// The consumer lag, in records, over the partitions this consumer owns: each
    /// partition's high watermark less its position (librdkafka's `consumer_lag`; -1,
    /// not known yet, counts as none).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0)
            .map(|p| p.consumer_lag.max(0))
            .sum();
        metrics::gauge!("sluice_source_lag", "component" => self.name.clone(), "kind" => "kafka", "unit" => "records")
            .set(lag as f64);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        sluice_core::status::set_error(&self.name, format!("{error}: {reason}"));
        if !self.outage.swap(true, Ordering::Relaxed) {
            tracing::warn!(component = %self.name, kind = "kafka", %error, reason, "kafka trouble; librdkafka keeps retrying");
        }
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.set_start_offsets(consumer, tpl);
                let partitions = describe(tpl);
                let keys: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| partition_key(e.topic(), e.partition()))
                    .collect();
                let cooperative = is_cooperative(consumer);
                self.owned
                    .change(&self.name, &keys, cooperative.then_some(&[][..]));
                if !keys.is_empty() {
                    // Merged: two cooperative assigns may come before the read loop looks.
                    self.assigned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_default()
                        .extend(keys);
                    self.newly_assigned.store(true, Ordering::Release);
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                let protocol = if cooperative { "cooperative" } else { "eager" };
                if self.cluster {
                    self.learn_partitions(consumer);
                }
                match assigned {
                    Ok(()) => {
                        tracing::info!(component = %self.name, kind = "kafka", %partitions, protocol, "partitions assigned")
                    }
                    Err(e) => {
                        tracing::error!(component = %self.name, kind = "kafka", error = %e, "assigning partitions failed")
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                if self.cluster && self.reading.load(Ordering::Acquire) =>
            {
                // In a cluster the next owner is another node. The read loop flushes, waits for a checkpoint covering what it read of
                // these partitions, commits their offsets and only then lets them go,
                // so the next owner starts exactly after what this node committed.
                *self.revoking.lock().unwrap_or_else(|e| e.into_inner()) = Some(tpl.clone());
                self.revoke.notify_one();
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let commit = self.acked_offsets(Some(tpl));
                if commit.count() > 0
                    && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
                {
                    tracing::warn!(component = %self.name, kind = "kafka", error = %e, "committing checkpointed offsets on revoke failed");
                }
                tracing::info!(component = %self.name, kind = "kafka", partitions = %describe(tpl), "partitions revoked");
                release(&self.name, consumer, tpl);
            }
            other => {
                tracing::error!(component = %self.name, kind = "kafka", error = ?other, "rebalance failed")
            }
        }
    }
}

impl Context {
    /// Records every partition of the subscribed topics (broker metadata), so that the
    /// cluster can see partitions no node owns. Called on each assign, in the callback
    /// as `committed_offsets` is (it blocks the consumer's task: a short timeout). A
    /// topic whose metadata cannot be read leaves what was known; a regex subscription
    /// finds no partitions, so nothing shows as unowned for it.
    fn learn_partitions(&self, consumer: &BaseConsumer<Self>) {
        let Ok(subscription) = consumer.subscription() else {
            return;
        };
        let topics: std::collections::BTreeSet<String> = subscription
            .elements()
            .iter()
            .map(|e| e.topic().to_owned())
            .collect();
        let mut known = Vec::new();
        for topic in &topics {
            match consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
                Ok(metadata) => {
                    for t in metadata.topics() {
                        known.extend(
                            t.partitions()
                                .iter()
                                .map(|p| partition_key(t.name(), p.id())),
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!(component = %self.name, kind = "kafka", topic, error = %e, "cannot read the topic's partitions");
                    return;
                }
            }
        }
        self.owned.set_known(&self.name, known);
    }

    /// Sets each assigned partition's start ([`start_at`]), after the later of its
    /// manifest position and what this process handed on before (a rebalance inside
    /// the process), so records already in the pipeline are not fetched again; a time
    /// is resolved by the broker (ListOffsets), and where that fails
    /// `auto.offset.reset` applies.
    fn set_start_offsets(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let mut floors = self
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (key, &offset) in self
            .handed_on
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            raise_floor(&mut floors, key, offset);
        }
        // The group's offsets are committed only once a checkpoint covers them, by
        // whichever node owned the partition: past this node's own manifest position
        // when another node read the partition since (a cluster, or another member).
        // A single node (no `[cluster]`) asks only when it needs to (a time `start`).
        let committed = (self.cluster || self.start_ms.is_some())
            .then(|| {
                consumer
                    .committed_offsets(tpl.clone(), Duration::from_secs(10))
                    .ok()
            })
            .flatten();
        if let Some(committed) = &committed {
            for elem in committed.elements() {
                if let Offset::Offset(next) = elem.offset() {
                    let key = partition_key(elem.topic(), elem.partition());
                    if let Some(floor) = floors.get_mut(&key) {
                        *floor = (*floor).max(next - 1);
                    }
                }
            }
        }
        let mut from_manifest = Vec::new();
        let mut times = TopicPartitionList::new();
        for elem in tpl.elements() {
            let (topic, partition) = (elem.topic(), elem.partition());
            let has_group_offset = || {
                committed.as_ref().is_none_or(|c| {
                    c.find_partition(topic, partition)
                        .is_some_and(|e| matches!(e.offset(), Offset::Offset(_)))
                })
            };
            let key = partition_key(topic, partition);
            match start_at(&key, &floors, self.start_ms, has_group_offset) {
                StartAt::Offset(offset) => {
                    from_manifest.push((topic.to_owned(), partition, offset))
                }
                StartAt::Time(ms) => {
                    let _ = times.add_partition_offset(topic, partition, Offset::Offset(ms));
                }
                StartAt::Group => {}
            }
        }
        for (topic, partition, offset) in from_manifest {
            let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(offset));
        }
        if times.count() == 0 {
            return;
        }
        match consumer.offsets_for_times(times, Duration::from_secs(10)) {
            Ok(resolved) => {
                for elem in resolved.elements() {
                    let _ = tpl.set_partition_offset(elem.topic(), elem.partition(), elem.offset());
                }
            }
            Err(e) => {
                tracing::warn!(component = %self.name, kind = "kafka", error = %e, "resolving the start time failed; using auto.offset.reset")
            }
        }
    }

    /// The last checkpoint's offsets (+1, as Kafka commits the next offset to read),
    /// limited to `only`'s partitions if given.
    fn acked_offsets(&self, only: Option<&TopicPartitionList>) -> TopicPartitionList {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let mut tpl = TopicPartitionList::new();
        for (key, &offset) in acked.iter() {
            let Some((topic, partition)) = split_partition_key(key) else {
                continue;
            };
            if only.is_some_and(|o| o.find_partition(topic, partition).is_none()) {
                continue;
            }
            let _ = tpl.add_partition_offset(
                topic,
                partition,
                Offset::Offset(offset.saturating_add(1)),
            );
        }
        tpl
    }
}

/// Whether the group rebalances cooperatively (incremental assigns and revokes).
fn is_cooperative<C: Consumer<Context>>(consumer: &C) -> bool {
    matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    )
}

/// Lets the revoked partitions `tpl` go: only those (cooperative), or all (eager).
fn release<C: Consumer<Context>>(name: &str, consumer: &C, tpl: &TopicPartitionList) {
    let context = consumer.context();
    let keys: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| partition_key(e.topic(), e.partition()))
        .collect();
    let released = if is_cooperative(consumer) {
        context.owned.change(name, &[], Some(&keys));
        consumer.incremental_unassign(tpl)
    } else {
        context.owned.set(name, Vec::new());
        consumer.unassign()
    };
    if let Err(e) = released {
        tracing::error!(component = %name, kind = "kafka", error = %e, "releasing partitions failed");
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| partition_key(e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `topic/partition`: the `_partition` column and the manifest key of a record.
fn partition_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

fn split_partition_key(key: &str) -> Option<(&str, i32)> {
    let (topic, partition) = key.rsplit_once('/')?;
    Some((topic, partition.parse().ok()?))
}

/// Sets `key`'s floor in `floors` to `offset` unless it is already past it.
fn raise_floor(floors: &mut HashMap<String, i64>, key: &str, offset: i64) {
    match floors.get_mut(key) {
        Some(at) => *at = (*at).max(offset),
        None => {
            floors.insert(key.to_owned(), offset);
        }
    }
}

fn parse_offsets(positions: &SourcePositions) -> HashMap<String, i64> {
    positions
        .offsets
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
        .collect()
}

impl KafkaSource {
    /// Builds the consumer and subscribes. `resume` holds this source's positions from
    /// the checkpoint we start from; `checkpoints` announces each durable checkpoint.
    pub fn new(
        name: &str,
        config: &KafkaSourceConfig,
        emitter: Emitter,
        ctx: &crate::source::SourceContext<'_>,
    ) -> Result<Self> {
        let resume = &ctx.resume;
        let bad = |message: String| Error::Config {
            source_name: name.to_owned(),
            message,
        };
        let start_ms = parse_kafka_start(&config.start).map_err(bad)?;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set(
                "group.id",
                config
                    .group_id
                    .clone()
                    .unwrap_or_else(|| format!("sluice-{name}")),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                if config.start == "latest" {
                    "latest"
                } else {
                    "earliest"
                },
            )
            .set("client.id", format!("sluice-{name}"))
            // librdkafka's statistics once a second: the consumer lag (`stats` below).
            .set("statistics.interval.ms", "1000");
        // Static membership: a node that restarts within the session timeout gets its
        // partitions back without a rebalance. Nodes of a cluster differ by node id.
        // (Static members never leave the group in librdkafka, so a node stopped for
        // good holds its partitions for a session timeout. Dynamic members were tried
        // for clusters: tansu 0.6 keeps a killed dynamic leader as the leader of the
        // next generation and the group livelocks, so they stay static; see
        // ARCHITECTURE.md, "When partitions move".)
        let instance = match (&config.group_instance_id, &ctx.node_id) {
            (Some(id), _) => id.clone(),
            (None, Some(node)) => format!("{name}@{node}"),
            (None, None) => format!("{name}@{}", sluice_config::hostname()),
        };
        if !instance.is_empty() {
            client.set("group.instance.id", instance);
        }
        // Nodes of a cluster rebalance cooperatively: a join or a loss moves only the
        // partitions that change owner; the others are read on throughout (each one
        // moved costs a checkpoint on its old owner and a fence on its new one).
        if ctx.node_id.is_some() {
            client.set("partition.assignment.strategy", "cooperative-sticky");
        }
        if let Some(p) = &config.security_protocol {
            client.set("security.protocol", p);
        }
        if let Some(m) = &config.sasl_mechanism {
            client.set("sasl.mechanism", m);
        }
        if let Some(u) = &config.sasl_username {
            client.set("sasl.username", u);
        }
        if let Some(var) = &config.sasl_password_env {
            let password = std::env::var(var)
                .map_err(|_| bad(format!("sasl_password_env: ${var} is not set")))?;
            client.set("sasl.password", password);
        }
        if let Some(ca) = &config.ssl_ca_file {
            client.set("ssl.ca.location", ca.display().to_string());
        }
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        let context = Context {
            name: name.to_owned(),
            resume: std::sync::Mutex::new(parse_offsets(resume)),
            handed_on: std::sync::Mutex::new(HashMap::new()),
            start_ms,
            cluster: ctx.node_id.is_some(),
            acked: std::sync::Mutex::new(BTreeMap::new()),
            outage: AtomicBool::new(false),
            owned: ctx.owned.clone(),
            assigned: std::sync::Mutex::new(None),
            newly_assigned: AtomicBool::new(false),
            revoking: std::sync::Mutex::new(None),
            revoke: tokio::sync::Notify::new(),
            reading: AtomicBool::new(true),
        };
        let consumer: StreamConsumer<Context> = client
            .create_with_context(context)
            .map_err(|e| bad(format!("cannot create the consumer: {e}")))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| bad(format!("cannot subscribe to {topics:?}: {e}")))?;
        Ok(Self {
            name: name.to_owned(),
            consumer,
            emitter,
            flush_interval: ctx.decode.flush_interval.0,
            clock: ctx.clock.clone(),
            key_from_record: config.key == "record_key",
            repartition: config.repartition,
            checkpoints: ctx.checkpoints.clone(),
            checkpoints_on: ctx.checkpoints_on,
            peers: ctx.peers.clone(),
            checkpoint_now: ctx.checkpoint_now.clone(),
        })
    }

    /// Reads until shutdown; then flushes, and waits (bounded) for the final checkpoint
    /// so its offsets are committed before the consumer leaves the group.
    pub async fn run(self, shutdown: Shutdown) -> Result<()> {
        let Self {
            name,
            consumer,
            mut emitter,
            flush_interval,
            clock,
            key_from_record,
            repartition,
            mut checkpoints,
            checkpoints_on,
            peers,
            checkpoint_now,
        } = self;
        let mut tick = tokio::time::interval(flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut current = CurrentPartition::default();
        let skipped = metrics::counter!("sluice_source_replayed_skipped_total", "component" => name.clone(), "kind" => "kafka");
        let gap_records = metrics::counter!("sluice_source_gap_records_total", "component" => name.clone(), "kind" => "kafka");
        let origin_replays = metrics::counter!("sluice_repartition_replays_skipped_total", "component" => name.clone());
        let mut gaps = ResumeGaps::default();
        let context = consumer.context();
        let mut resume = context
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                changed = checkpoints.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    commit(&name, &consumer, &checkpoints, CommitMode::Async);
                }
                _ = context.revoke.notified() => {
                    current.publish(&context.handed_on);
                    emitter.flush().await?;
                    let wait = checkpoints_on.then_some(checkpoint_now.as_ref());
                    give_back(&name, &consumer, &mut checkpoints, wait, peers.as_deref()).await;
                }
                message = consumer.recv() => match message {
                    Ok(m) => {
                        // Partitions just assigned hold windows back until they send.
                        if context.newly_assigned.swap(false, Ordering::Acquire) {
                            let assigned = context.assigned.lock().unwrap_or_else(|e| e.into_inner()).take();
                            // A partition another node read (and may have been killed
                            // reading) starts after the furthest any checkpoint covers.
                            if let Some(peers) = &peers {
                                let assigned = assigned.as_deref().unwrap_or_default();
                                let Some((floors, origins)) = peer_floors(&name, peers.as_ref(), assigned, &shutdown).await else {
                                    break;
                                };
                                let mut shared = context.resume.lock().unwrap_or_else(|e| e.into_inner());
                                for (key, floor) in floors {
                                    raise_floor(&mut resume, &key, floor);
                                    raise_floor(&mut shared, &key, floor);
                                    current.raise(&key, floor);
                                }
                                for (partition, seen) in origins.iter().filter(|(p, _)| assigned.contains(p)) {
                                    emitter.raise_origins(partition, seen);
                                }
                            }
                            for partition in assigned.iter().flatten() {
                                emitter.announce(partition);
                            }
                            gaps.expect(assigned.iter().flatten(), |p| current.floor_of(p, &resume));
                        }
                        if context.outage.swap(false, Ordering::Relaxed) {
                            sluice_core::status::clear_error(&name);
                            tracing::info!(component = %name, kind = "kafka", "kafka reads recovered");
                        }
                        current.switch(m.topic(), m.partition(), &resume);
                        if current.replayed(m.offset()) {
                            skipped.increment(1);
                            continue;
                        }
                        current.handed_on(m.offset());
                        if let Some(missing) = gaps.first_record(&current.key, m.offset()) {
                            tracing::warn!(component = %name, kind = "kafka", partition = %current.key, first = m.offset(), missing, "the first record after resuming is past the checkpointed position: records in between never arrived (compaction or transaction markers, or a broker that skips the rest of a record batch, as tansu 0.6 does)");
                            gap_records.increment(missing);
                        }
                        let mut offset = itoa::Buffer::new();
                        let origin = if repartition { origin_of(&m) } else { None };
                        let skip = match origin {
                            Some((origin, None)) => {
                                emitter.meet_origin(&current.key, origin);
                                true
                            }
                            Some((origin, Some(seq))) if seq.is_end() => {
                                // Its farewell: windows stop waiting for it.
                                emitter.replayed_by_origin(&current.key, origin, seq);
                                true
                            }
                            Some((origin, Some(SeqText::REST))) => {
                                // Its goodbye: windows stop waiting for it until it
                                // greets again.
                                emitter.rest_origin(&current.key, origin);
                                true
                            }
                            Some((origin, Some(seq))) => {
                                let replayed = emitter.replayed_by_origin(&current.key, origin, seq);
                                if replayed {
                                    origin_replays.increment(1);
                                }
                                replayed
                            }
                            None => false,
                        };
                        if skip {
                            // Its offset still counts as read, so that a revoke's
                            // checkpoint covers it.
                            emitter.set_position(&current.key, offset.format(m.offset()));
                            continue;
                        }
                        let meta = MessageMeta {
                            partition: &current.key,
                            offset: offset.format(m.offset()),
                            ingest_time_ms: clock.now_ms(),
                            hops: hops(&m),
                            origin: origin.map(|(origin, _)| origin),
                        };
                        let key = if key_from_record {
                            m.key().and_then(|k| std::str::from_utf8(k).ok()).unwrap_or("")
                        } else {
                            ""
                        };
                        emitter.push(m.payload().unwrap_or_default(), key, &meta);
                        drop(m);
                        if emitter.is_full() {
                            current.publish(&context.handed_on);
                            emitter.flush().await?;
                        }
                    }
                    Err(e) => {
                        sluice_core::status::set_error(&name, &e);
                        if !context.outage.swap(true, Ordering::Relaxed) {
                            tracing::warn!(component = %name, kind = "kafka", error = %e, "kafka read failed; retrying");
                        }
                    }
                },
                _ = tick.tick() => {
                    current.publish(&context.handed_on);
                    emitter.flush().await?
                }
            }
        }
        context.reading.store(false, Ordering::Release);
        emitter.flush().await?;
        // Dropping the emitter lets the lake task finish; its last checkpoint then
        // covers everything read, and we commit that before leaving the group.
        drop(emitter);
        if tokio::time::timeout(crate::source::FINAL_ACK_WAIT, checkpoints.changed())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            commit(&name, &consumer, &checkpoints, CommitMode::Sync);
        }
        tracing::info!(component = %name, kind = "kafka", "source stopped");
        // Closing the consumer leaves the group, which waits on the coordinator: a
        // member of a tansu group leaving while another's rebalance was under way
        // waited more than 30 s. What was read is committed by now, so the stop does
        // not wait: the consumer closes on a blocking thread (the process does not
        // wait for it either, see `sluice run`), and should the broker never answer,
        // the member's session times out there.
        tokio::task::spawn_blocking(move || drop(consumer));
        Ok(())
    }
}

/// The hop count a record's header carries (0 without one).
fn hops(m: &BorrowedMessage<'_>) -> u8 {
    m.headers()
        .and_then(|h| h.iter().find(|h| h.key == HOPS_HEADER))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |h| h.min(255) as u8)
}

/// A repartition record's origin and sequence number (its headers); an origin without
/// a sequence number is its greeting (no row).
fn origin_of<'a>(m: &'a BorrowedMessage<'_>) -> Option<(&'a str, Option<SeqText<'a>>)> {
    let headers = m.headers()?;
    let value = |key: &str| {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let origin = value(ORIGIN_HEADER)?;
    match value(SEQ_HEADER) {
        Some(seq) if seq == SeqText::REST.as_str() => Some((origin, Some(SeqText::REST))),
        Some(seq) => Some((origin, Some(Seq::canonical(seq)?))),
        None => Some((origin, None)),
    }
}

/// Takes the `assigned` partitions over ([`Peers::take_over`]: fenced, then the other
/// nodes' checkpoints completed) and returns the furthest offset per partition that
/// any other node's newest checkpoint covers, with the greatest sequence number of
/// each origin per partition (a repartitioned stream's source). Retried with backoff
/// while the lake does not answer, logged once; `None` on shutdown.
async fn peer_floors(
    name: &str,
    peers: &dyn Peers,
    assigned: &[String],
    shutdown: &Shutdown,
) -> Option<(HashMap<String, i64>, Origins)> {
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.wait() => return None,
            r = peers.take_over(name, assigned) => r,
        };
        match attempt {
            Ok(positions) => {
                if failures > 0 {
                    tracing::info!(component = %name, kind = "kafka", "read the other nodes' checkpoints");
                }
                let mut floors: HashMap<String, i64> = HashMap::new();
                for (key, offset) in positions.iter().flat_map(parse_offsets) {
                    raise_floor(&mut floors, &key, offset);
                }
                let mut origins = Origins::new();
                for (partition, seen) in positions.iter().flat_map(|p| &p.origins) {
                    let greatest = origins.entry(partition.clone()).or_default();
                    SourcePositions::raise_origins(greatest, seen);
                }
                return Some((floors, origins));
            }
            Err(error) => {
                if failures == 0 {
                    tracing::warn!(component = %name, kind = "kafka", %error, "cannot read the other nodes' checkpoints; holding new partitions and retrying");
                }
                failures += 1;
                tokio::select! {
                    _ = shutdown.wait() => return None,
                    _ = tokio::time::sleep(crate::source::backoff(failures)) => {}
                }
            }
        }
    }
}

/// Partition → origin → the greatest sequence number.
type Origins = BTreeMap<String, BTreeMap<String, Seq>>;

/// How long a revoke waits for a checkpoint that covers what was read of the revoked
/// partitions (one checkpoint interval, normally).
const REVOKE_WAIT: Duration = Duration::from_secs(60);

/// Records the newest checkpoint's positions of source `name` as acknowledged.
fn record_acked(name: &str, context: &Context, checkpoints: &watch::Receiver<Checkpointed>) {
    let positions = checkpoints.borrow().get(name).cloned().unwrap_or_default();
    let mut acked = context.acked.lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in positions {
        if let Ok(offset) = v.parse() {
            acked.insert(k, offset);
        }
    }
}

/// Lets go of the partitions a rebalance revoked (`Context::revoking`): waits until a
/// checkpoint covers every record handed on from them (flushed by the caller), commits
/// their offsets, and unassigns, which lets the rebalance go on. The next owner starts
/// after this node's last committed record, and this node commits nothing of them
/// later. Should no checkpoint come within [`REVOKE_WAIT`] (the lake is failing), the
/// partitions go anyway: the next owner re-reads from the last commit, and records this
/// node still holds may then land twice (logged). `wait` is `None` with checkpoints
/// off; else it asks the lake task for a checkpoint at once rather than at the next
/// interval. A node of a cluster tells `peers` first, so that the partitions' window
/// state stops changing once their last record is processed.
async fn give_back(
    name: &str,
    consumer: &StreamConsumer<Context>,
    checkpoints: &mut watch::Receiver<Checkpointed>,
    wait: Option<&tokio::sync::Notify>,
    peers: Option<&dyn Peers>,
) {
    let context = consumer.context();
    let Some(tpl) = context
        .revoking
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    let handed: HashMap<String, i64> = {
        let handed = context.handed_on.lock().unwrap_or_else(|e| e.into_inner());
        tpl.elements()
            .iter()
            .map(|e| partition_key(e.topic(), e.partition()))
            .filter_map(|k| handed.get(&k).map(|&o| (k, o)))
            .collect()
    };
    if let Some(peers) = peers {
        let given: Vec<(String, Option<String>)> = tpl
            .elements()
            .iter()
            .map(|e| {
                let key = partition_key(e.topic(), e.partition());
                let last = handed.get(&key).map(ToString::to_string);
                (key, last)
            })
            .collect();
        peers.give_up(name, &given);
    }
    let deadline = tokio::time::Instant::now() + REVOKE_WAIT;
    if let Some(checkpoint_now) = wait {
        loop {
            record_acked(name, context, checkpoints);
            let covered = {
                let acked = context.acked.lock().unwrap_or_else(|e| e.into_inner());
                let resume = context.resume.lock().unwrap_or_else(|e| e.into_inner());
                // A floor no higher than the manifest position we started from is no
                // record read here (the floor starts there).
                handed.iter().all(|(k, &o)| {
                    acked.get(k).is_some_and(|&a| a >= o) || resume.get(k).is_some_and(|&r| r >= o)
                })
            };
            if covered {
                break;
            }
            // Asked again after each checkpoint that came too early for what we flushed.
            checkpoint_now.notify_one();
            if !matches!(
                tokio::time::timeout_at(deadline, checkpoints.changed()).await,
                Ok(Ok(()))
            ) {
                tracing::warn!(component = %name, kind = "kafka", partitions = %describe(&tpl), "no checkpoint covered the revoked partitions in time; letting them go (their next owner fences them and re-reads what this node read since: this node's next checkpoint is refused and it stops)");
                break;
            }
        }
    }
    let commit = context.acked_offsets(Some(&tpl));
    if commit.count() > 0
        && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
    {
        tracing::warn!(component = %name, kind = "kafka", error = %e, "committing checkpointed offsets on revoke failed");
    }
    tracing::info!(component = %name, kind = "kafka", partitions = %describe(&tpl), "partitions revoked");
    release(name, consumer, &tpl);
}

/// Records the checkpoint's positions of source `name` and commits those of the
/// partitions we still own.
fn commit(
    name: &str,
    consumer: &StreamConsumer<Context>,
    checkpoints: &watch::Receiver<Checkpointed>,
    mode: CommitMode,
) {
    let context = consumer.context();
    record_acked(name, context, checkpoints);
    let owned = consumer.assignment().unwrap_or_default();
    let tpl = context.acked_offsets(Some(&owned));
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => metrics::counter!("sluice_source_offset_commits_total", "component" => name.to_owned(), "kind" => "kafka").increment(1),
        Err(e) => {
            tracing::debug!(component = %name, kind = "kafka", error = %e, "offset commit failed; the next checkpoint retries")
        }
    }
}

/// The partition of the previous record, so a run of records from one partition
/// builds its `topic/n` key once, and each partition's replay floor: records at or
/// below it were handed on already and are skipped.
///
/// The floor is the later of the manifest position we started from and the last
/// offset this process handed on. The second matters after a rebalance inside the
/// process (another member joins the group and leaves, or the coordinator restarts):
/// a partition given back starts again at the start position the assignment set (the
/// manifest's, or the group offset), behind records already in the pipeline, and
/// those must not be written twice.
#[derive(Default)]
struct CurrentPartition {
    topic: String,
    partition: i32,
    key: String,
    floor: Option<i64>,
    /// The floors of the partitions switched away from, by key.
    floors: HashMap<String, i64>,
}

impl CurrentPartition {
    fn switch(&mut self, topic: &str, partition: i32, resume: &HashMap<String, i64>) {
        if self.key.is_empty() || self.partition != partition || self.topic != topic {
            if let Some(floor) = self.floor {
                self.floors.insert(std::mem::take(&mut self.key), floor);
            }
            self.topic.clear();
            self.topic.push_str(topic);
            self.partition = partition;
            self.key = partition_key(topic, partition);
            self.floor = resume
                .get(&self.key)
                .copied()
                .max(self.floors.get(&self.key).copied());
        }
    }

    /// Raises the floor of `partition` to `floor` if this process read it before (a
    /// partition it did not read takes its floor from `resume` when it switches to it).
    fn raise(&mut self, partition: &str, floor: i64) {
        if self.key == partition {
            self.floor = self.floor.max(Some(floor));
        } else if let Some(at) = self.floors.get_mut(partition) {
            *at = (*at).max(floor);
        }
    }

    /// The floor of `partition` (`topic/n`), current or not.
    fn floor_of(&self, partition: &str, resume: &HashMap<String, i64>) -> Option<i64> {
        let read = if self.key == partition {
            self.floor
        } else {
            self.floors.get(partition).copied()
        };
        resume.get(partition).copied().max(read)
    }

    /// Whether the record at `offset` of the current partition was handed on before.
    fn replayed(&self, offset: i64) -> bool {
        self.floor.is_some_and(|f| offset <= f)
    }

    /// The record at `offset` of the current partition was handed on.
    fn handed_on(&mut self, offset: i64) {
        self.floor = Some(offset);
    }

    /// Copies the floors read in this process to `shared` (for the rebalance
    /// callback); once per flush, not per record.
    fn publish(&self, shared: &std::sync::Mutex<HashMap<String, i64>>) {
        let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.floor.map(|f| (&self.key, f));
        for (key, floor) in self.floors.iter().map(|(k, &f)| (k, f)).chain(current) {
            match shared.get_mut(key) {
                Some(at) => *at = floor,
                None => {
                    shared.insert(key.clone(), floor);
                }
            }
        }
    }
}

/// Offsets a resumed partition's first record should have: the manifest position + 1.
/// A first record past it means the records in between never came: counted and
/// logged, not fatal (compacted topics and transaction markers leave such gaps too).
#[derive(Debug, Default)]
struct ResumeGaps {
    expected: HashMap<String, i64>,
}

impl ResumeGaps {
    /// A new assignment: its partitions with a floor (a manifest position, or records
    /// read before in this process: [`CurrentPartition::floor_of`]) are checked once.
    fn expect<'a>(
        &mut self,
        partitions: impl Iterator<Item = &'a String>,
        floor: impl Fn(&str) -> Option<i64>,
    ) {
        self.expected.clear();
        for partition in partitions {
            if let Some(at) = floor(partition) {
                self.expected
                    .insert(partition.clone(), at.saturating_add(1));
            }
        }
    }

    /// Records missing before `offset`, the first record read from `partition` since
    /// the assignment (past the replayed ones), if any are.
    fn first_record(&mut self, partition: &str, offset: i64) -> Option<u64> {
        if self.expected.is_empty() {
            return None;
        }
        let want = self.expected.remove(partition)?;
        u64::try_from(offset.saturating_sub(want))
            .ok()
            .filter(|&n| n > 0)
    }
}

/// Where an assigned partition starts reading.
#[derive(Debug, PartialEq, Eq)]
enum StartAt {
    /// This offset: the one after the manifest's position.
    Offset(i64),
    /// The first offset at or after this time (epoch ms), looked up on the broker.
    Time(i64),
    /// The group's committed offset, else `auto.offset.reset` (`start` earliest/latest).
    Group,
}

/// The start of `partition` (`topic/n`): after its manifest position where we have one
/// (exactly once outranks everything); else the group offset where the group has one
/// (the group has read this far); else, for a time `start`, the time; else the
/// group's reset policy. `has_group_offset` is asked only when it decides.
fn start_at(
    partition: &str,
    resume: &HashMap<String, i64>,
    start_ms: Option<i64>,
    has_group_offset: impl FnOnce() -> bool,
) -> StartAt {
    match (resume.get(partition), start_ms) {
        (Some(&offset), _) => StartAt::Offset(offset + 1),
        (None, Some(ms)) if !has_group_offset() => StartAt::Time(ms),
        _ => StartAt::Group,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_partition_whose_first_record_skips_ahead_is_a_gap() {
        let resume = HashMap::from([("t/0".to_owned(), 41), ("t/1".to_owned(), 9)]);
        let assigned = ["t/0".to_owned(), "t/1".to_owned(), "t/2".to_owned()];
        let mut gaps = ResumeGaps::default();
        gaps.expect(assigned.iter(), |p| resume.get(p).copied());
        assert_eq!(
            gaps.first_record("t/0", 42),
            None,
            "the next offset: no gap"
        );
        assert_eq!(gaps.first_record("t/1", 15), Some(5), "10..=14 never came");
        assert_eq!(
            gaps.first_record("t/1", 30),
            None,
            "checked once per assignment"
        );
        assert_eq!(
            gaps.first_record("t/2", 1_000),
            None,
            "no manifest position"
        );
        gaps.expect(assigned[..1].iter(), |p| resume.get(p).copied());
        assert_eq!(
            gaps.first_record("t/0", 50),
            Some(8),
            "a new assignment checks again"
        );
    }

    #[test]
    fn a_partition_starts_from_the_manifest_then_the_group_then_the_time() {
        let resume = HashMap::from([("t/0".to_owned(), 41)]);
        let time = Some(1_767_225_600_000);
        let asked = |answer: bool| move || answer;
        let never = || -> bool { panic!("the group offset is not needed") };
        assert_eq!(start_at("t/0", &resume, time, never), StartAt::Offset(42));
        assert_eq!(start_at("t/0", &resume, None, never), StartAt::Offset(42));
        assert_eq!(start_at("t/1", &resume, time, asked(true)), StartAt::Group);
        assert_eq!(
            start_at("t/1", &resume, time, asked(false)),
            StartAt::Time(1_767_225_600_000)
        );
        assert_eq!(start_at("t/1", &resume, None, never), StartAt::Group);
    }

    #[test]
    fn partition_keys_round_trip() {
        let key = partition_key("telemetry.v1", 12);
        assert_eq!(key, "telemetry.v1/12");
        assert_eq!(split_partition_key(&key), Some(("telemetry.v1", 12)));
        assert_eq!(split_partition_key("no-partition"), None);
    }

    #[test]
    fn current_partition_looks_up_resume_once_per_switch() {
        let resume = HashMap::from([("t/0".to_owned(), 41)]);
        let mut c = CurrentPartition::default();
        c.switch("t", 0, &resume);
        assert_eq!((c.key.as_str(), c.floor), ("t/0", Some(41)));
        c.switch("t", 1, &resume);
        assert_eq!((c.key.as_str(), c.floor), ("t/1", None));
    }

    #[test]
    fn records_handed_on_before_a_rebalance_are_replays_after_it() {
        let resume = HashMap::from([("t/0".to_owned(), 41)]);
        let mut c = CurrentPartition::default();
        c.switch("t", 0, &resume);
        assert!(c.replayed(41), "at the manifest position");
        for offset in 42..=60 {
            assert!(!c.replayed(offset));
            c.handed_on(offset);
        }
        c.switch("t", 1, &resume);
        c.handed_on(7);
        // t/0 is revoked and given back: the assignment starts it at 42 again.
        c.switch("t", 0, &resume);
        assert!(
            c.replayed(42) && c.replayed(60),
            "read before the rebalance"
        );
        assert!(!c.replayed(61));
        // The same for a partition given back while it is still the current one.
        c.handed_on(61);
        assert!(c.replayed(50));
        c.switch("t", 1, &resume);
        assert!(
            c.replayed(7) && !c.replayed(8),
            "no manifest position: the floor read"
        );
        // What the rebalance callback sees: every partition's floor, the current too.
        let shared = std::sync::Mutex::new(HashMap::new());
        c.publish(&shared);
        assert_eq!(
            shared.into_inner().unwrap(),
            HashMap::from([("t/0".to_owned(), 61), ("t/1".to_owned(), 7)])
        );
    }
}
