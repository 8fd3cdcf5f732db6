//! The MQTT source: subscribe with rumqttc, decode each publish into the stream's
//! batch, hand batches on by size or tick.
//!
//! Reconnects use exponential backoff with jitter (100 ms to 10 s). An outage is logged
//! once when it starts and once when it ends, never per attempt. With a persistent
//! session (the default) the broker keeps QoS 1 messages for us while we are away.
//!
//! # Acknowledgements
//! With [`DurableAcks`] (QoS 1 from an external broker, see
//! `MqttSourceConfig::uses_wal`) a message is PUBACKed only once it is fsynced to the
//! [write-ahead log](super::wal). The log is group-committed: while one fsync runs on a
//! blocking thread the next batch gathers, so the broker's in-flight window is held for
//! one fsync, never for a lake checkpoint. Messages enter the pipeline after their
//! fsync, with the log's sequence number as `_offset` and as the checkpoint position;
//! a restart replays the log past the checkpoint, and a redelivery (DUP set, and the
//! topic and payload of one of the newest [`REDELIVERY_WINDOW`] logged messages) is
//! acknowledged without being logged twice. Otherwise rumqttc acknowledges on receipt
//! and a crash loses what was received but not yet checkpointed (QoS 0 is always
//! best-effort).
//!
//! # The embedded broker
//! A source of `url = "embedded"` connects to rumqttd's internal port, counts what it
//! receives for the broker's [door](super::broker) (which shuts while rumqttd holds
//! too much unread), and holds the door shut itself while its queue to the decoder is
//! full, until the queue is down to half: the devices wait instead of rumqttd's log
//! overflowing.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
    Transport,
};
use sluice_config::{MqttSourceConfig, parse_mqtt_url};
use sluice_core::{
    BoundedSender, Checkpointed, Clock, Shutdown, SourcePositions, TrySendError, Weigh,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::broker::Presser;
use super::wal::{self, Wal};
use crate::decode::MessageMeta;
use crate::emit::Emitter;
use crate::source::backoff;
use crate::{Error, Result};

/// Logged messages a redelivery is compared with (by topic and payload hash), and
/// kept in the log past the checkpoint for a restart to compare with. Not packet ids:
/// mosquitto 2.0.11 sends a reconnecting session its whole queue at once, past
/// `max_inflight_messages` and past 65,535 packet ids, so a redelivery can be much
/// older than the newest message with its packet id. About 40 MB of memory.
const REDELIVERY_WINDOW: u64 = 1 << 20;

/// The partition under which a durable source's checkpoint position (its log's
/// sequence number) is recorded.
pub const WAL_PARTITION: &str = "wal";

/// On shutdown, keep reading until the broker has been quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// ... but never longer than this.
const DRAIN_MAX: Duration = Duration::from_secs(3);
/// From the embedded broker, until it holds nothing unread (its log is only in
/// memory), but never longer than this (the whole stop has 30 s).
const EMBEDDED_DRAIN_MAX: Duration = Duration::from_secs(20);

/// A configured MQTT source, ready to [`run`](MqttSource::run).
#[derive(Debug)]
pub struct MqttSource {
    name: String,
    options: MqttOptions,
    topics: Vec<String>,
    qos: QoS,
    emitter: Emitter,
    flush_interval: Duration,
    clock: std::sync::Arc<dyn Clock>,
    /// Messages received this run; the `_offset` of each not logged (packet ids repeat).
    received: u64,
    /// The write-ahead log, when acknowledgements wait for it.
    log: Option<Log>,
    /// Payload bytes the queue from the connection to the decoder holds, at most.
    queue_bytes: usize,
    /// With the embedded broker: holds the devices back while the queue is full.
    door: Option<std::sync::Arc<Presser>>,
}

/// Messages the queue from the connection to the decoder holds, at most.
const QUEUE_MESSAGES: usize = 4096;

/// A message on its way from the connection task to the decoder.
struct Received(Publish);

impl Weigh for Received {
    /// The payload and topic, plus the packet's own fields.
    fn weigh(&self) -> usize {
        self.0.payload.len() + self.0.topic.len() + std::mem::size_of::<Publish>()
    }
}

/// Where a durable source keeps its log and how it learns of checkpoints.
#[derive(Debug)]
pub struct DurableAcks {
    /// The log's directory (`<lake>/_wal/<source>`).
    pub dir: PathBuf,
    /// This source's positions in the newest checkpoint (where replay starts).
    pub resume: SourcePositions,
    /// Each checkpoint once durable: the log segments it covers are deleted.
    pub checkpoints: watch::Receiver<Checkpointed>,
}

impl MqttSource {
    /// Builds the source. `ctx.embedded` is the embedded broker, used when the
    /// configured URL is `"embedded"`. With durable acknowledgements
    /// ([`MqttSourceConfig::uses_wal`]), QoS 1 messages are acknowledged once in the
    /// write-ahead log. A node of a cluster reads an external broker through a shared
    /// subscription.
    pub fn new(
        name: &str,
        config: &MqttSourceConfig,
        mut emitter: Emitter,
        ctx: &crate::source::SourceContext<'_>,
    ) -> Result<Self> {
        let (decode, embedded, clock) = (ctx.decode, ctx.embedded, ctx.clock.clone());
        let durable = config.uses_wal(ctx.checkpoints_on).then(|| DurableAcks {
            dir: ctx.wal_dir.clone(),
            resume: ctx.resume.clone(),
            checkpoints: ctx.checkpoints.clone(),
        });
        let node_id = ctx.node_id.as_deref();
        let bad = |message: String| Error::Config {
            source_name: name.to_owned(),
            message,
        };
        let mut door = None;
        let (tls, host, port) = match (config.url.as_str(), embedded) {
            (sluice_config::EMBEDDED_URL, Some(broker)) => {
                door = Some(std::sync::Arc::new(broker.presser(&config.topics)));
                let addr = broker.internal;
                (false, addr.ip().to_string(), addr.port())
            }
            (sluice_config::EMBEDDED_URL, None) => {
                return Err(bad("url \"embedded\" but no embedded broker runs".into()));
            }
            (url, _) => parse_mqtt_url(url).map_err(bad)?,
        };
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{name}"));
        // Nodes of a cluster share an external broker's messages through one shared
        // subscription, each with its own session.
        let shared = node_id.filter(|_| door.is_none());
        let client_id = match shared {
            Some(node) => format!("{client_id}-{node}"),
            None => client_id,
        };
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(config.keep_alive.0)
            .set_clean_session(!config.persistent_session)
            .set_max_packet_size(
                decode
                    .max_payload_size
                    .as_usize()
                    .saturating_mul(2)
                    .max(1 << 20),
                1 << 20,
            )
            .set_inflight(1000);
        let password = match (&config.password, &config.password_env) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(var)) => Some(
                std::env::var(var).map_err(|_| bad(format!("password_env {var:?} is not set")))?,
            ),
            (None, None) => None,
        };
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), password.unwrap_or_default());
        }
        if tls {
            let tls_config =
                crate::tls::client_config(config.ca_file.as_deref(), None).map_err(|message| {
                    Error::Tls {
                        source_name: name.to_owned(),
                        message,
                    }
                })?;
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls_config),
            ));
        }
        let qos = if config.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let log = match durable {
            Some(durable) => {
                options.set_manual_acks(true);
                emitter = emitter.track_positions_as(durable.resume.clone(), WAL_PARTITION);
                Some(Log::open(name, durable)?)
            }
            None => None,
        };
        Ok(Self {
            name: name.to_owned(),
            options,
            topics: match shared {
                Some(_) => shared_filters(name, config),
                None => config.topics.clone(),
            },
            qos,
            emitter,
            flush_interval: decode.flush_interval.0,
            clock,
            received: 0,
            log,
            queue_bytes: 64 << 20,
            door,
        })
    }

    /// Bounds the queue from the connection to the decoder to `bytes` of messages
    /// (`[limits] source_queue_bytes`; default 64 MB), besides its 4,096 messages.
    pub fn with_queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }

    /// Runs until `shutdown`, then drains what the broker still sends and flushes.
    ///
    /// The rumqttc event loop runs in its own task and forwards publishes over a queue
    /// bounded in messages and bytes: `EventLoop::poll` must not be cancelled
    /// mid-connect (as a `select!` with a flush tick would do), and a full queue stops
    /// it reading the socket, which is TCP backpressure to the broker.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<()> {
        let (client, events) = AsyncClient::new(self.options.clone(), 1024);
        let (tx, mut publishes) = sluice_core::bounded(QUEUE_MESSAGES, self.queue_bytes);
        let connection = tokio::spawn(drive(
            events,
            client.clone(),
            self.name.clone(),
            self.topics.clone(),
            self.qos,
            tx,
            self.door.clone(),
        ));
        let acker = match &mut self.log {
            Some(log) => {
                // The logged messages past the checkpoint go through the pipeline again.
                for r in log.take_replay() {
                    push(&mut self.emitter, &r.topic, &r.payload, r.seq, r.ingest_ms).await?;
                }
                let (acks, rx) = mpsc::unbounded_channel();
                log.acks = Some(acks);
                Some(tokio::spawn(ack(client.clone(), rx)))
            }
            None => None,
        };
        let mut checkpoints = self.log.as_ref().map(|l| l.checkpoints.clone());
        let mut tick = tokio::time::interval(self.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                done = Log::committed(&mut self.log) => self.logged(done).await?,
                publish = publishes.recv() => match publish {
                    Some(Received(p)) => {
                        self.receive(p).await?;
                        self.reopen_door(&publishes);
                    }
                    None => break,
                },
                covered = checkpointed(&mut checkpoints, &self.name) => {
                    if let Some(log) = &mut self.log {
                        log.trim(covered);
                    }
                }
                _ = tick.tick() => {
                    metrics::gauge!("sluice_source_queue_depth", "component" => self.name.clone())
                        .set(publishes.len() as f64);
                    metrics::gauge!("sluice_source_queue_bytes", "component" => self.name.clone())
                        .set(publishes.queued_bytes() as f64);
                    self.emitter.flush().await?
                }
            }
            if let Some(log) = &mut self.log {
                log.start_commit();
            }
        }
        // Drain: keep reading until the broker has been quiet for a moment (and the
        // embedded one holds nothing unread).
        let started = std::time::Instant::now();
        let most = if self.door.is_some() {
            EMBEDDED_DRAIN_MAX
        } else {
            DRAIN_MAX
        };
        while started.elapsed() < most {
            match tokio::time::timeout(DRAIN_QUIET, publishes.recv()).await {
                Ok(Some(Received(p))) => self.receive(p).await?,
                Ok(None) => break,
                Err(_) => {
                    if self
                        .door
                        .as_ref()
                        .is_none_or(|door| door.drained(started.elapsed()))
                    {
                        break;
                    }
                }
            }
        }
        // Log and acknowledge what was drained (no retry after a failure: the broker
        // redelivers what was not acknowledged).
        loop {
            if let Some(log) = &mut self.log {
                log.start_commit();
            }
            if self.log.as_ref().is_none_or(|l| l.inflight.is_none()) {
                break;
            }
            let done = Log::committed(&mut self.log).await;
            self.logged(done).await?;
        }
        self.emitter.flush().await?;
        if let Some(acker) = acker {
            if let Some(log) = &mut self.log {
                log.acks = None;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), acker).await;
        }
        let _ = client.try_disconnect();
        drop(publishes);
        let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
        tracing::info!(component = %self.name, kind = "mqtt", "source stopped");
        Ok(())
    }

    /// Lets the devices go on once a full queue is down to half.
    fn reopen_door(&self, queue: &sluice_core::BoundedReceiver<Received>) {
        if let Some(door) = &self.door
            && door.is_pressed()
            && queue.len() <= QUEUE_MESSAGES / 2
            && queue.queued_bytes() <= self.queue_bytes / 2
        {
            door.release();
        }
    }

    async fn receive(&mut self, publish: Publish) -> Result<()> {
        if publish.qos == QoS::AtLeastOnce
            && let Some(log) = &mut self.log
        {
            log.accept(publish, self.clock.now_ms());
            return Ok(());
        }
        self.received += 1;
        let now = self.clock.now_ms();
        push(
            &mut self.emitter,
            &publish.topic,
            &publish.payload,
            self.received,
            now,
        )
        .await
    }

    /// A group commit ended: on success its messages go to the pipeline and their
    /// acknowledgements to the broker.
    async fn logged(&mut self, done: Committed) -> Result<()> {
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        let Some(records) = log.finish(done)? else {
            return Ok(());
        };
        for r in &records {
            push(
                &mut self.emitter,
                &r.publish.topic,
                &r.publish.payload,
                r.seq,
                r.ingest_ms,
            )
            .await?;
        }
        log.acknowledge(records);
        Ok(())
    }
}

/// Decodes one message into the emitter (flushing a full batch).
async fn push(
    emitter: &mut Emitter,
    topic: &str,
    payload: &[u8],
    offset: u64,
    ingest_time_ms: i64,
) -> Result<()> {
    let mut buffer = itoa::Buffer::new();
    let meta = MessageMeta {
        partition: topic,
        offset: buffer.format(offset),
        ingest_time_ms,
        hops: 0,
        origin: None,
    };
    emitter.push(payload, topic, &meta);
    if emitter.is_full() {
        emitter.flush().await?;
    }
    Ok(())
}

/// What a PUBACK needs of a message (its packet id and QoS): the payload and topic are
/// dropped, so the acknowledgement queue (unbounded; the broker's in-flight window
/// bounds it) holds a few bytes per message, not the messages.
fn ack_only(publish: Publish) -> Publish {
    Publish {
        topic: String::new(),
        payload: bytes::Bytes::new(),
        ..publish
    }
}

/// Sends PUBACKs in log order. A task of its own: `AsyncClient::ack` waits when the
/// request queue is full, and the loop that fills it must keep reading meanwhile.
async fn ack(client: AsyncClient, mut batches: mpsc::UnboundedReceiver<Vec<Publish>>) {
    while let Some(batch) = batches.recv().await {
        for publish in &batch {
            if client.ack(publish).await.is_err() {
                return;
            }
        }
    }
}

/// A QoS 1 message waiting for (or past) its fsync.
#[derive(Debug)]
struct Arrived {
    seq: u64,
    ingest_ms: i64,
    publish: Publish,
}

/// What a group commit's blocking task hands back.
type Committed =
    std::result::Result<(Wal, Vec<u8>, std::io::Result<()>, Duration), tokio::task::JoinError>;

/// A group commit on a blocking thread and the messages it covers.
#[derive(Debug)]
struct InFlight {
    task: JoinHandle<(Wal, Vec<u8>, std::io::Result<()>, Duration)>,
    records: Vec<Arrived>,
    /// Redeliveries of logged messages, acknowledged with this commit.
    redelivered: Vec<Publish>,
}

/// A durable source's log: the batch gathering for the next fsync, the one in flight,
/// and the messages logged lately, to recognise redeliveries.
#[derive(Debug)]
struct Log {
    name: String,
    dir: PathBuf,
    /// `None` while a commit has it.
    wal: Option<Wal>,
    /// Replayed at start: the records past the checkpoint.
    replay: Vec<wal::WalRecord>,
    next_seq: u64,
    buffer: Vec<u8>,
    pending: Vec<Arrived>,
    redelivered: Vec<Publish>,
    inflight: Option<InFlight>,
    /// Hashes of the newest logged messages.
    recent: Recent,
    checkpoints: watch::Receiver<Checkpointed>,
    /// The log is trimmed up to here.
    covered: u64,
    /// While writes fail: when to try again, and how many tries so far.
    failing: Option<(Instant, u32)>,
    acks: Option<mpsc::UnboundedSender<Vec<Publish>>>,
}

/// A multiset of the newest [`REDELIVERY_WINDOW`] message hashes.
#[derive(Debug, Default)]
struct Recent {
    counts: HashMap<u64, u32>,
    order: std::collections::VecDeque<u64>,
}

impl Recent {
    fn insert(&mut self, hash: u64) {
        if self.order.len() as u64 >= REDELIVERY_WINDOW
            && let Some(old) = self.order.pop_front()
            && let std::collections::hash_map::Entry::Occupied(mut e) = self.counts.entry(old)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.order.push_back(hash);
        *self.counts.entry(hash).or_default() += 1;
    }

    fn contains(&self, hash: u64) -> bool {
        self.counts.contains_key(&hash)
    }
}

fn message_hash(topic: &str, payload: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

/// Waits for the next checkpoint (forever without a log); the sequence number it
/// covers for source `name`.
async fn checkpointed(checkpoints: &mut Option<watch::Receiver<Checkpointed>>, name: &str) -> u64 {
    let Some(rx) = checkpoints else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    rx.borrow_and_update().get(name).map_or(0, covered_by)
}

/// The sequence number a checkpoint's positions give this source (0: none).
fn covered_by(positions: &std::collections::BTreeMap<String, String>) -> u64 {
    positions
        .get(WAL_PARTITION)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Log {
    fn open(name: &str, durable: DurableAcks) -> Result<Self> {
        let (wal, recovered) = Wal::open(&durable.dir).map_err(|error| Error::Wal {
            source_name: name.to_owned(),
            path: durable.dir.display().to_string(),
            error,
        })?;
        let covered = covered_by(&durable.resume.offsets);
        if recovered.torn_segments > 0 {
            tracing::warn!(component = %name, kind = "mqtt", segments = recovered.torn_segments,
                "write-ahead log ended in a torn record (a crash mid-write); its messages were not acknowledged and the broker redelivers them");
        }
        let mut recent = Recent::default();
        let skip = recovered
            .records
            .len()
            .saturating_sub(REDELIVERY_WINDOW as usize);
        for r in &recovered.records[skip..] {
            recent.insert(message_hash(&r.topic, &r.payload));
        }
        let last = recovered.records.last().map_or(0, |r| r.seq);
        let replay: Vec<_> = recovered
            .records
            .into_iter()
            .filter(|r| r.seq > covered)
            .collect();
        tracing::info!(component = %name, kind = "mqtt", dir = %durable.dir.display(), covered,
            replay = replay.len(), "QoS 1 messages are acknowledged once in the write-ahead log");
        Ok(Self {
            name: name.to_owned(),
            dir: durable.dir,
            wal: Some(wal),
            replay,
            next_seq: last.max(covered) + 1,
            buffer: Vec::new(),
            pending: Vec::new(),
            redelivered: Vec::new(),
            inflight: None,
            recent,
            checkpoints: durable.checkpoints,
            covered,
            failing: None,
            acks: None,
        })
    }

    /// The logged messages past the checkpoint, to go through the pipeline again.
    fn take_replay(&mut self) -> Vec<wal::WalRecord> {
        let records = std::mem::take(&mut self.replay);
        metrics::counter!("sluice_wal_replayed_total", "component" => self.name.clone())
            .increment(records.len() as u64);
        records
    }

    /// Takes a QoS 1 message into the next commit, or notes a redelivery.
    fn accept(&mut self, publish: Publish, now_ms: i64) {
        let hash = message_hash(&publish.topic, &publish.payload);
        if publish.dup && self.recent.contains(hash) {
            metrics::counter!("sluice_mqtt_redeliveries_skipped_total", "component" => self.name.clone())
                .increment(1);
            self.redelivered.push(publish);
            return;
        }
        self.recent.insert(hash);
        let seq = self.next_seq;
        self.next_seq += 1;
        wal::encode(
            &mut self.buffer,
            seq,
            publish.pkid,
            now_ms,
            &publish.topic,
            &publish.payload,
        );
        self.pending.push(Arrived {
            seq,
            ingest_ms: now_ms,
            publish,
        });
    }

    /// Starts a group commit of everything gathered, unless one is running or writes
    /// are failing and the backoff has not passed.
    fn start_commit(&mut self) {
        if self.inflight.is_some()
            || (self.pending.is_empty() && self.redelivered.is_empty())
            || self.failing.is_some_and(|(at, _)| Instant::now() < at)
        {
            return;
        }
        let Some(mut wal) = self.wal.take() else {
            return;
        };
        let buf = std::mem::take(&mut self.buffer);
        let first = self.pending.first().map_or(0, |r| r.seq);
        let task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = wal.append(&buf, first);
            (wal, buf, result, started.elapsed())
        });
        self.inflight = Some(InFlight {
            task,
            records: std::mem::take(&mut self.pending),
            redelivered: std::mem::take(&mut self.redelivered),
        });
    }

    /// Waits for the running commit (forever if none).
    async fn committed(log: &mut Option<Self>) -> Committed {
        match log.as_mut().and_then(|l| l.inflight.as_mut()) {
            Some(inflight) => (&mut inflight.task).await,
            None => std::future::pending().await,
        }
    }

    /// Ends the running commit: its messages when it succeeded; otherwise they wait
    /// for the next try, with backoff, and the failure is logged once.
    fn finish(&mut self, done: Committed) -> Result<Option<Vec<Arrived>>> {
        let inflight = self.inflight.take();
        let (wal, mut buf, result, took) = done.map_err(|e| Error::Wal {
            source_name: self.name.clone(),
            path: self.dir.display().to_string(),
            error: std::io::Error::other(e.to_string()),
        })?;
        self.wal = Some(wal);
        let Some(InFlight {
            mut records,
            mut redelivered,
            ..
        }) = inflight
        else {
            return Ok(None);
        };
        match result {
            Ok(()) => {
                metrics::histogram!("sluice_wal_commit_seconds", "component" => self.name.clone())
                    .record(took.as_secs_f64());
                metrics::counter!("sluice_wal_bytes_total", "component" => self.name.clone())
                    .increment(buf.len() as u64);
                if let Some((_, tries)) = self.failing.take() {
                    tracing::info!(component = %self.name, kind = "mqtt", tries, "write-ahead log writable again");
                }
                if self.buffer.is_empty() {
                    buf.clear();
                    self.buffer = buf;
                }
                if let Some(acks) = &self.acks {
                    let _ = acks.send(redelivered.into_iter().map(ack_only).collect());
                }
                Ok(Some(records))
            }
            Err(error) => {
                metrics::counter!("sluice_wal_failures_total", "component" => self.name.clone())
                    .increment(1);
                let tries = match self.failing {
                    Some((_, tries)) => tries + 1,
                    None => {
                        tracing::error!(component = %self.name, kind = "mqtt", dir = %self.dir.display(), %error,
                            "cannot write the write-ahead log; messages are not acknowledged (the broker keeps them), retrying");
                        1
                    }
                };
                self.failing = Some((Instant::now() + backoff(tries), tries));
                buf.append(&mut self.buffer);
                self.buffer = buf;
                records.append(&mut self.pending);
                self.pending = records;
                redelivered.append(&mut self.redelivered);
                self.redelivered = redelivered;
                Ok(None)
            }
        }
    }

    /// Queues the PUBACKs of messages now in the log.
    fn acknowledge(&mut self, records: Vec<Arrived>) {
        if let Some(acks) = &self.acks {
            let _ = acks.send(records.into_iter().map(|r| ack_only(r.publish)).collect());
        }
    }

    /// Deletes the log segments checkpoint position `covered` covers, keeping the
    /// newest [`REDELIVERY_WINDOW`] records: their acknowledgements may not have
    /// reached the broker, and a restart needs them to recognise redeliveries.
    fn trim(&mut self, covered: u64) {
        let bound = covered.min(self.next_seq.saturating_sub(REDELIVERY_WINDOW + 1));
        if bound <= self.covered {
            return;
        }
        self.covered = bound;
        match Wal::trim(&self.dir, bound) {
            Ok(n) if n > 0 => {
                metrics::counter!("sluice_wal_segments_deleted_total", "component" => self.name.clone())
                    .increment(n as u64);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(component = %self.name, kind = "mqtt", %error, "cannot delete checkpointed write-ahead log segments")
            }
        }
    }
}

/// Polls the event loop: (re)subscribes on every ConnAck, forwards publishes, backs
/// off after errors. Ends when the receiver is dropped or the client disconnects.
async fn drive(
    mut events: rumqttc::EventLoop,
    client: AsyncClient,
    name: String,
    topics: Vec<String>,
    qos: QoS,
    publishes: BoundedSender<Received>,
    door: Option<std::sync::Arc<Presser>>,
) {
    let mut state = Connection::default();
    // 1 while the broker has confirmed our subscriptions: operators (and tests) can see
    // that the source is live, not just started.
    let subscribed =
        metrics::gauge!("sluice_source_subscribed", "component" => name.clone(), "kind" => "mqtt");
    let queue_bytes = metrics::gauge!("sluice_source_queue_bytes", "component" => name.clone());
    let queue_depth = metrics::gauge!("sluice_source_queue_depth", "component" => name.clone());
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if let Some(door) = &door {
                    door.received(publish.topic.len(), publish.payload.len());
                }
                let item = match publishes.try_send(Received(publish)) {
                    Ok(()) => continue,
                    Err(TrySendError::Closed(_)) => return,
                    Err(TrySendError::Full(item)) => item,
                };
                // Full: the decoder side is waiting (on the pipeline, most likely) and
                // sets no gauges meanwhile, so say here how full the queue is.
                queue_bytes.set(publishes.queued_bytes() as f64);
                queue_depth.set(publishes.len() as f64);
                if let Some(door) = &door {
                    door.press();
                }
                if publishes.send(item).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                state.connected(&name);
                // Subscribing again is harmless and covers a broker that lost our session.
                // Not awaited here: after an outage the request queue can be full of
                // acknowledgements that only this loop's polling sends, so waiting
                // here for room in it would stall the connection for good.
                let (client, topics) = (client.clone(), topics.clone());
                tokio::spawn(async move {
                    for topic in topics {
                        if client.subscribe(topic, qos).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::error!(component = %name, kind = "mqtt", ?topics, "broker refused the subscription (not authorized?)");
                } else {
                    subscribed.set(1.0);
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(other) => tracing::trace!(component = %name, event = ?other, "mqtt event"),
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(error) => {
                subscribed.set(0.0);
                if publishes.is_closed() {
                    return;
                }
                tokio::time::sleep(state.lost(&name, &error)).await;
            }
        }
    }
}

/// Connection state for logging once per outage and for backoff.
#[derive(Debug, Default)]
struct Connection {
    outage: Option<(std::time::Instant, u32)>,
    ever_connected: bool,
}

impl Connection {
    fn connected(&mut self, name: &str) {
        sluice_core::status::clear_error(name);
        match self.outage.take() {
            Some((since, attempts)) => tracing::info!(
                component = %name, kind = "mqtt", attempts, down_for = ?since.elapsed(),
                "reconnected to the broker"
            ),
            None if !self.ever_connected => {
                tracing::info!(component = %name, kind = "mqtt", "connected to the broker")
            }
            None => {}
        }
        self.ever_connected = true;
    }

    /// Records a failed poll; logs only the first of an outage. Returns the delay.
    fn lost(&mut self, name: &str, error: &rumqttc::ConnectionError) -> Duration {
        sluice_core::status::set_error(name, error);
        let attempts = match &mut self.outage {
            Some((_, attempts)) => {
                *attempts += 1;
                *attempts
            }
            None => {
                if let rumqttc::ConnectionError::ConnectionRefused(code) = error {
                    let why = match code {
                        ConnectReturnCode::BadUserNamePassword
                        | ConnectReturnCode::NotAuthorized => "check username/password",
                        _ => "broker refused the connection",
                    };
                    tracing::error!(component = %name, kind = "mqtt", ?code, "{why}; retrying with backoff");
                } else {
                    tracing::warn!(component = %name, kind = "mqtt", %error, "broker connection lost; retrying with backoff");
                }
                self.outage = Some((std::time::Instant::now(), 1));
                1
            }
        };
        backoff(attempts)
    }
}

/// The topic filters of a cluster node: each of the source's filters as an MQTT shared
/// subscription (`$share/<group>/<filter>`), so that the broker hands each message to
/// one node of the group. The group is `share_group`, else `sluice-<source>`.
fn shared_filters(name: &str, config: &MqttSourceConfig) -> Vec<String> {
    let group = config
        .share_group
        .clone()
        .unwrap_or_else(|| format!("sluice-{name}"));
    config
        .topics
        .iter()
        .map(|filter| format!("$share/{group}/{filter}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_counts_repeats_and_forgets_the_oldest() {
        let mut recent = Recent::default();
        recent.insert(7);
        recent.insert(7);
        for h in 100..100 + REDELIVERY_WINDOW - 1 {
            recent.insert(h);
        }
        // The window is full: the first 7 is gone, the second still counts.
        assert!(recent.contains(7));
        recent.insert(1);
        assert!(!recent.contains(7));
        assert!(recent.contains(100));
        assert_eq!(recent.order.len() as u64, REDELIVERY_WINDOW);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) <= Duration::from_millis(125));
        assert!(backoff(4) >= Duration::from_millis(600));
        assert!(backoff(30) <= Duration::from_millis(12_500));
        assert!(backoff(30) >= Duration::from_millis(7_500));
    }
}
