//! The Kinesis Data Streams source (aws-sdk-kinesis): every shard, polled in turn.
//!
//! - **Shards** come from ListShards, re-read every `shard_refresh`, so shards created
//!   by resharding are picked up without a restart.
//! - **Order across resharding:** a shard is read only once each of its parents is
//!   finished (read to `SHARD_END`, here or in an earlier run) or gone from the list
//!   (trimmed). So records of one partition key keep their order across a split or merge.
//! - **Limits:** each shard is polled at most 5 times a second, and after a response of
//!   B bytes not again for B / 2 MB/s. `ProvisionedThroughputExceededException` and
//!   other failures back off per shard, exponentially with jitter; an expired iterator
//!   is re-created from the last sequence number. Trouble is logged once per outage.
//! - **Positions:** each record's `(shard id, sequence number)` goes through the
//!   emitter into the checkpoint manifest; a finished shard is recorded as
//!   [`SHARD_END`]. On start a shard resumes `AFTER_SEQUENCE_NUMBER` of its recorded
//!   position; Kinesis itself is never told anything (there is nothing to ack).
//! - **Cluster:** with `[cluster]`, the nodes lease shards through the lake
//!   ([`crate::lease`]): a node reads only the shards it holds, starts a shard it takes
//!   over after the furthest position any node's checkpoint holds, gives back shards over
//!   its fair share once a checkpoint covers them, and releases its leases on a clean
//!   stop. A shard whose end a checkpoint covers is marked finished for every node.
//! - KPL aggregated records are not de-aggregated: each Kinesis record is one message.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use sluice_config::{KinesisSourceConfig, parse_kinesis_start};
use sluice_core::{Checkpointed, Clock, Shutdown};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::decode::MessageMeta;
use crate::emit::Emitter;
use crate::lease::{Keeper, LeaseLink, Lent, Reading, compare_positions};
use crate::source::{Owned, Peers, SourceContext};
use crate::{Error, Result};

/// The position recorded for a shard read to its end.
pub const SHARD_END: &str = sluice_core::SourcePositions::END;
/// GetRecords calls per shard per second (the service limit).
const MIN_POLL_GAP: Duration = Duration::from_millis(200);
/// Bytes per shard per second GetRecords may return (the service limit).
const BYTES_PER_SECOND: f64 = 2.0 * 1024.0 * 1024.0;
/// Poll gap of a shard that returned nothing and is caught up.
const IDLE_POLL_GAP: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Records per GetRecords call.
const GET_LIMIT: i32 = 10_000;

/// A Kinesis client with the standard credential chain; `endpoint` overrides the
/// service URL (local servers), `region` defaults to the SDK's, else `us-east-1`.
pub async fn kinesis_client(endpoint: Option<&str>, region: Option<&str>) -> Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let config = loader.load().await;
    let region = region
        .map(str::to_owned)
        .or_else(|| config.region().map(|r| r.to_string()))
        .unwrap_or_else(|| "us-east-1".to_owned());
    let config = config
        .into_builder()
        .region(aws_config::Region::new(region))
        .build();
    Client::new(&config)
}

/// One shard's reading state.
#[derive(Debug, Default)]
struct Shard {
    parents: Vec<String>,
    /// Last sequence number handed on (this run or the checkpoint's).
    last: Option<String>,
    iterator: Option<String>,
    finished: bool,
    next_poll: Option<Instant>,
    failures: u32,
    /// This node reads it: always alone, while it holds the lease in a cluster.
    reading: bool,
    /// How far its last read was behind the shard's tip (`MillisBehindLatest`).
    behind_ms: i64,
}

/// A cluster node's leases: what its lease task needs, until [`KinesisSource::run`]
/// starts it.
struct Leasing {
    keeper: Keeper,
    peers: Arc<dyn Peers>,
    checkpoints: watch::Receiver<Checkpointed>,
    checkpoint_now: Arc<Notify>,
    owned: Arc<Owned>,
}

/// A configured Kinesis source, ready to [`run`](KinesisSource::run).
pub struct KinesisSource {
    name: String,
    client: Client,
    stream: String,
    start: Start,
    refresh: Duration,
    emitter: Emitter,
    flush_interval: Duration,
    clock: Arc<dyn Clock>,
    shards: BTreeMap<String, Shard>,
    outage: bool,
    leasing: Option<Leasing>,
    /// The lease task, once running (a cluster node).
    link: Option<LeaseLink>,
    /// Where this node reports the shards it reads (a cluster node).
    owned: Option<Arc<Owned>>,
}

impl std::fmt::Debug for KinesisSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisSource")
            .field("name", &self.name)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
enum Start {
    TrimHorizon,
    Latest,
    At(i64),
}

impl KinesisSource {
    /// Builds the source; `ctx.resume` holds its positions from the checkpoint we start
    /// from. A cluster node (`ctx.leases`) reads only the shards it leases.
    pub async fn new(
        name: &str,
        config: &KinesisSourceConfig,
        emitter: Emitter,
        ctx: &SourceContext<'_>,
    ) -> Result<Self> {
        let resume = &ctx.resume;
        let start = match parse_kinesis_start(&config.start) {
            Ok(Some(ms)) => Start::At(ms),
            Ok(None) if config.start == "latest" => Start::Latest,
            Ok(None) => Start::TrimHorizon,
            Err(message) => {
                return Err(Error::Config {
                    source_name: name.to_owned(),
                    message,
                });
            }
        };
        let client = kinesis_client(config.endpoint.as_deref(), config.region.as_deref()).await;
        let shards = resume
            .offsets
            .iter()
            .map(|(id, position)| {
                let finished = position == SHARD_END;
                let shard = Shard {
                    // "" is a shard announced but not read from yet.
                    last: (!finished && !position.is_empty()).then(|| position.clone()),
                    finished,
                    reading: ctx.leases.is_none(),
                    ..Shard::default()
                };
                (id.clone(), shard)
            })
            .collect();
        let leasing = match (&ctx.leases, &ctx.peers, &ctx.node_id) {
            (Some(leases), Some(peers), Some(node)) => Some(Leasing {
                keeper: Keeper::new(name, node, leases.clone(), config.lease_time.0),
                peers: peers.clone(),
                checkpoints: ctx.checkpoints.clone(),
                checkpoint_now: ctx.checkpoint_now.clone(),
                owned: ctx.owned.clone(),
            }),
            _ => None,
        };
        Ok(Self {
            name: name.to_owned(),
            client,
            stream: config.kinesis_stream.clone(),
            start,
            refresh: config.shard_refresh.0,
            emitter,
            flush_interval: ctx.decode.flush_interval.0,
            clock: ctx.clock.clone(),
            shards,
            outage: false,
            leasing,
            link: None,
            owned: None,
        })
    }

    /// Reads until shutdown, then flushes; a cluster node then waits (bounded) for the
    /// final checkpoint and releases its leases.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<()> {
        let mut flush = tokio::time::interval(self.flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(self.refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(l) = self.leasing.take() {
            self.owned = Some(l.owned);
            self.link = Some(crate::lease::spawn(
                l.keeper,
                l.peers,
                l.checkpoints,
                l.checkpoint_now,
            ));
        }
        loop {
            let next = next_shard(&self.shards, Instant::now(), self.link.is_some());
            let wake = next
                .as_ref()
                .map_or_else(|| Instant::now() + self.refresh, |(_, at)| *at);
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = refresh.tick() => self.list_shards().await,
                lent = lent(&mut self.link) => self.on_lent(lent).await?,
                _ = flush.tick() => self.emitter.flush().await?,
                _ = tokio::time::sleep_until(wake), if next.is_some() => {
                    if let Some((id, _)) = next {
                        self.poll(&id).await;
                        if self.emitter.is_full() {
                            self.emitter.flush().await?;
                        }
                    }
                }
            }
        }
        self.emitter.flush().await?;
        let Self {
            name,
            emitter,
            link,
            owned,
            ..
        } = self;
        // Dropping the emitter lets the lake task finish; its last checkpoint then
        // covers everything read, and only then may another node take the shards:
        // the lease task, its sender dropped, waits for it and releases them.
        drop(emitter);
        if let Some(owned) = owned {
            owned.set(&name, Vec::new());
        }
        if let Some(LeaseLink { tx, task, .. }) = link {
            drop(tx);
            let _ = task.await;
        }
        tracing::info!(component = %name, kind = "kinesis", "source stopped");
        Ok(())
    }

    /// Applies what the lease task decided (a cluster node).
    async fn on_lent(&mut self, lent: Lent) -> Result<()> {
        match lent {
            Lent::Taken { shard: id, after } => {
                let shard = self.shards.entry(id.clone()).or_default();
                let own = shard.last.clone().unwrap_or_default();
                let from = if compare_positions(&after, &own) == Ordering::Greater {
                    after
                } else {
                    own
                };
                if !from.is_empty() {
                    shard.last = Some(from.clone());
                    self.emitter.set_position(&id, &from);
                }
                shard.iterator = None;
                shard.next_poll = None;
                shard.failures = 0;
                shard.reading = true;
                self.emitter.announce(&id);
                tracing::info!(component = %self.name, kind = "kinesis", shard = %id, after = %from, "leased the shard; reading it");
            }
            Lent::Lost(id) => stop_reading(&mut self.shards, &id),
            Lent::Surplus(id) => {
                let last = self.shards.get(&id).and_then(|s| s.last.clone());
                stop_reading(&mut self.shards, &id);
                self.emitter.flush().await?;
                self.tell(Reading::Leaving { shard: id, last });
            }
        }
        self.report();
        Ok(())
    }

    /// Tells the lease task (a cluster node) something.
    fn tell(&self, reading: Reading) {
        if let Some(link) = &self.link {
            let _ = link.tx.send(reading);
        }
    }

    /// Records the shards this node reads, for `sluice status` (a cluster node).
    fn report(&self) {
        if let Some(owned) = &self.owned {
            let reading = self
                .shards
                .iter()
                .filter(|(_, s)| s.reading)
                .map(|(id, _)| id.clone())
                .collect();
            owned.set(&self.name, reading);
        }
    }

    /// Re-reads the shard list; new shards are added, known ones get their parents.
    async fn list_shards(&mut self) {
        let mut token: Option<String> = None;
        loop {
            let request = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.with_stream_list(),
            };
            match request.send().await {
                Ok(out) => {
                    self.recovered();
                    for shard in out.shards() {
                        let parents: Vec<String> =
                            [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
                                .into_iter()
                                .flatten()
                                .map(str::to_owned)
                                .collect();
                        let entry = self.shards.entry(shard.shard_id().to_owned());
                        let alone = self.link.is_none();
                        if matches!(entry, std::collections::btree_map::Entry::Vacant(_)) {
                            tracing::info!(component = %self.name, kind = "kinesis", shard = shard.shard_id(), ?parents, "shard listed");
                        }
                        let known = entry.or_insert_with(|| Shard {
                            reading: alone,
                            ..Shard::default()
                        });
                        known.parents = parents;
                    }
                    token = out.next_token().map(str::to_owned);
                    if token.is_none() {
                        self.announce_readable();
                        let open = self
                            .shards
                            .iter()
                            .filter(|(_, s)| !s.finished)
                            .map(|(id, s)| (id.clone(), s.parents.clone()))
                            .collect();
                        self.emitter.set_open(open);
                        let listed = self
                            .shards
                            .iter()
                            .map(|(id, s)| (id.clone(), (s.parents.clone(), s.finished)))
                            .collect();
                        self.tell(Reading::Listed(listed));
                        return;
                    }
                }
                Err(e) => {
                    self.trouble(&format!("listing shards failed: {}", error_text(&e)));
                    return;
                }
            }
        }
    }

    fn with_stream_list(
        &self,
    ) -> aws_sdk_kinesis::operation::list_shards::builders::ListShardsFluentBuilder {
        let request = self.client.list_shards();
        if self.stream.starts_with("arn:") {
            request.stream_arn(&self.stream)
        } else {
            request.stream_name(&self.stream)
        }
    }

    /// Announces every shard that may be read now (parents done), so windows wait for
    /// all of them; children are announced once their parents finish.
    fn announce_readable(&mut self) {
        if self.link.is_some() {
            // A cluster node announces each shard as it leases it.
            return;
        }
        let Self {
            shards, emitter, ..
        } = self;
        for id in readable(shards) {
            if shards.get(id).is_some_and(|s| s.reading) {
                emitter.announce(id);
            }
        }
    }

    /// One GetRecords call on `id` (getting an iterator first if needed).
    async fn poll(&mut self, id: &str) {
        let has_parents = self.shards.get(id).is_some_and(|s| !s.parents.is_empty());
        let Some(iterator) = self.iterator(id, has_parents).await else {
            return;
        };
        let result = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(GET_LIMIT)
            .send()
            .await;
        let now = Instant::now();
        match result {
            Ok(out) => {
                self.recovered();
                let mut bytes = 0usize;
                let ingest_time_ms = self.clock.now_ms();
                for record in out.records() {
                    let data = record.data().as_ref();
                    bytes += data.len();
                    let meta = MessageMeta {
                        partition: id,
                        offset: record.sequence_number(),
                        ingest_time_ms,
                        hops: 0,
                        origin: None,
                    };
                    self.emitter
                        .push(data, record.partition_key().unwrap_or_default(), &meta);
                }
                let Some(shard) = self.shards.get_mut(id) else {
                    return;
                };
                if let Some(last) = out.records().last() {
                    shard.last = Some(last.sequence_number().to_owned());
                }
                shard.failures = 0;
                shard.behind_ms = out.millis_behind_latest().unwrap_or(0);
                let lag = self
                    .shards
                    .values()
                    .filter(|s| s.reading)
                    .map(|s| s.behind_ms)
                    .max()
                    .unwrap_or(0);
                metrics::gauge!("sluice_source_lag", "component" => self.name.clone(), "kind" => "kinesis", "unit" => "ms")
                    .set(lag as f64);
                let Some(shard) = self.shards.get_mut(id) else {
                    return;
                };
                let gap = if out.records().is_empty() && out.millis_behind_latest() == Some(0) {
                    IDLE_POLL_GAP
                } else {
                    MIN_POLL_GAP.max(Duration::from_secs_f64(bytes as f64 / BYTES_PER_SECOND))
                };
                shard.next_poll = Some(now + gap);
                match out.next_shard_iterator() {
                    Some(next) => shard.iterator = Some(next.to_owned()),
                    None => {
                        shard.iterator = None;
                        shard.finished = true;
                        shard.reading = false;
                        tracing::info!(component = %self.name, kind = "kinesis", shard = id, "shard read to its end");
                        self.emitter.set_position(id, SHARD_END);
                        self.tell(Reading::Ended(id.to_owned()));
                        self.report();
                        self.announce_readable();
                    }
                }
            }
            Err(e) => {
                let expired = e
                    .as_service_error()
                    .is_some_and(|s| s.is_expired_iterator_exception());
                let throttled = e
                    .as_service_error()
                    .is_some_and(|s| s.is_provisioned_throughput_exceeded_exception());
                if let Some(shard) = self.shards.get_mut(id) {
                    shard.iterator = None;
                    if !expired {
                        shard.failures += 1;
                        shard.next_poll = Some(now + backoff(shard.failures));
                    }
                }
                if throttled {
                    metrics::counter!("sluice_source_throttled_total", "component" => self.name.clone(), "kind" => "kinesis").increment(1);
                } else if !expired {
                    self.trouble(&format!("GetRecords on {id} failed: {}", error_text(&e)));
                }
            }
        }
    }

    /// The shard's iterator, asking for one after its last position if it has none.
    async fn iterator(&mut self, id: &str, child: bool) -> Option<String> {
        let shard = self.shards.get(id)?;
        if let Some(it) = &shard.iterator {
            return Some(it.clone());
        }
        let request = self.client.get_shard_iterator().shard_id(id);
        let request = if self.stream.starts_with("arn:") {
            request.stream_arn(&self.stream)
        } else {
            request.stream_name(&self.stream)
        };
        let request = match (&shard.last, self.start) {
            (Some(seq), _) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            // A child of resharding starts at its beginning whatever `start` says:
            // its records are newer than everything its parents held.
            (None, _) if child => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            (None, Start::TrimHorizon) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            (None, Start::Latest) => request.shard_iterator_type(ShardIteratorType::Latest),
            (None, Start::At(ms)) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(ms)),
        };
        match request.send().await {
            Ok(out) => {
                self.recovered();
                let it = out.shard_iterator().map(str::to_owned);
                if let Some(shard) = self.shards.get_mut(id) {
                    shard.iterator = it.clone();
                }
                it
            }
            Err(e) => {
                if let Some(shard) = self.shards.get_mut(id) {
                    shard.failures += 1;
                    shard.next_poll = Some(Instant::now() + backoff(shard.failures));
                }
                self.trouble(&format!(
                    "GetShardIterator on {id} failed: {}",
                    error_text(&e)
                ));
                None
            }
        }
    }

    /// Logs the start of an outage once.
    fn trouble(&mut self, what: &str) {
        metrics::counter!("sluice_source_errors_total", "component" => self.name.clone(), "kind" => "kinesis").increment(1);
        sluice_core::status::set_error(&self.name, what);
        if !self.outage {
            self.outage = true;
            tracing::warn!(component = %self.name, kind = "kinesis", error = what, "kinesis trouble; retrying with backoff");
        }
    }

    fn recovered(&mut self) {
        if self.outage {
            self.outage = false;
            sluice_core::status::clear_error(&self.name);
            tracing::info!(component = %self.name, kind = "kinesis", "kinesis reads recovered");
        }
    }
}

/// Shards that may be read now: not finished, and every parent they name either
/// finished or unknown (trimmed away). Children wait, so per-key order holds.
fn readable(shards: &BTreeMap<String, Shard>) -> impl Iterator<Item = &str> {
    shards
        .iter()
        .filter(|(_, s)| !s.finished && parents_done(shards, s))
        .map(|(id, _)| id.as_str())
}

/// Every parent `shard` names is finished or unknown (trimmed away).
fn parents_done(shards: &BTreeMap<String, Shard>, shard: &Shard) -> bool {
    shard
        .parents
        .iter()
        .all(|p| shards.get(p).is_none_or(|parent| parent.finished))
}

/// The shard this node reads that is due first: a readable one, or with `leased` any
/// it leases (its lease task took it only once its parents were finished, perhaps on
/// another node).
fn next_shard(
    shards: &BTreeMap<String, Shard>,
    now: Instant,
    leased: bool,
) -> Option<(String, Instant)> {
    shards
        .iter()
        .filter(|(_, s)| s.reading && !s.finished && (leased || parents_done(shards, s)))
        .map(|(id, s)| (id, s.next_poll.unwrap_or(now)))
        .min_by_key(|(_, at)| *at)
        .map(|(id, at)| (id.clone(), at))
}

/// This node stops reading shard `id` (lost, given back, or its lease overdue).
fn stop_reading(shards: &mut BTreeMap<String, Shard>, id: &str) {
    if let Some(shard) = shards.get_mut(id) {
        shard.reading = false;
        shard.iterator = None;
    }
}

/// The lease task's next decision; never, alone.
async fn lent(link: &mut Option<LeaseLink>) -> Lent {
    match link {
        Some(link) => match link.rx.recv().await {
            Some(lent) => lent,
            // The task ended (it only does at a stop): nothing more comes.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Exponential backoff with jitter: `BACKOFF_MIN · 2^(n-1)`, capped, times 0.5–1.0.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    // Jitter from the clock's nanoseconds: enough to spread shards apart.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

/// The service's message for an SDK error (the `Display` of `SdkError` is terse).
fn error_text<E: std::error::Error + 'static>(e: &aws_sdk_kinesis::error::SdkError<E>) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(parents: &[&str], finished: bool) -> Shard {
        Shard {
            parents: parents.iter().map(|p| p.to_string()).collect(),
            finished,
            reading: true,
            behind_ms: 0,
            ..Shard::default()
        }
    }

    #[test]
    fn children_wait_for_every_parent() {
        let now = Instant::now();
        // A split: 0 → 1, 2; then a merge: 1 + 2 → 3.
        let mut shards = BTreeMap::from([
            ("0".to_owned(), shard(&[], false)),
            ("1".to_owned(), shard(&["0"], false)),
            ("2".to_owned(), shard(&["0"], false)),
            ("3".to_owned(), shard(&["1", "2"], false)),
        ]);
        assert_eq!(
            next_shard(&shards, now, false).map(|s| s.0),
            Some("0".into())
        );
        shards.get_mut("0").expect("0").finished = true;
        let ready = next_shard(&shards, now, false).map(|s| s.0);
        assert!(matches!(ready.as_deref(), Some("1" | "2")));
        shards.get_mut("1").expect("1").finished = true;
        assert_eq!(
            next_shard(&shards, now, false).map(|s| s.0),
            Some("2".into()),
            "3 waits for 2"
        );
        shards.get_mut("2").expect("2").finished = true;
        assert_eq!(
            next_shard(&shards, now, false).map(|s| s.0),
            Some("3".into())
        );
        shards.get_mut("3").expect("3").finished = true;
        assert_eq!(next_shard(&shards, now, false), None);
    }

    #[test]
    fn a_trimmed_parent_does_not_block() {
        let shards = BTreeMap::from([("5".to_owned(), shard(&["gone"], false))]);
        assert_eq!(
            next_shard(&shards, Instant::now(), false).map(|s| s.0),
            Some("5".into())
        );
    }

    #[test]
    fn the_shard_due_first_is_polled_first() {
        let now = Instant::now();
        let mut later = shard(&[], false);
        later.next_poll = Some(now + Duration::from_secs(1));
        let shards = BTreeMap::from([("a".to_owned(), later), ("b".to_owned(), shard(&[], false))]);
        assert_eq!(
            next_shard(&shards, now, false).map(|s| s.0),
            Some("b".into())
        );
    }

    #[test]
    fn a_leased_child_is_read_though_its_parent_ended_elsewhere() {
        let shards = BTreeMap::from([
            ("0".to_owned(), shard(&[], false)),
            ("1".to_owned(), shard(&["0"], false)),
        ]);
        let mut only_child = shards;
        only_child.get_mut("0").expect("0").reading = false;
        let now = Instant::now();
        assert_eq!(
            next_shard(&only_child, now, false),
            None,
            "alone, 1 waits for 0"
        );
        assert_eq!(
            next_shard(&only_child, now, true).map(|s| s.0),
            Some("1".into())
        );
    }

    #[test]
    fn shards_not_read_here_are_never_polled() {
        let mut other = shard(&[], false);
        other.reading = false;
        let shards = BTreeMap::from([("a".to_owned(), other)]);
        assert_eq!(next_shard(&shards, Instant::now(), false), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= BACKOFF_MIN);
        assert!(backoff(1) >= BACKOFF_MIN / 2);
        assert!(backoff(4) >= BACKOFF_MIN * 4);
        assert!(backoff(40) <= BACKOFF_MAX);
    }
}
