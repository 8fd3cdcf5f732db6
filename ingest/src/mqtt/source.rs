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
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
    Transport,
};
use sluice_config::{MqttSourceConfig, parse_mqtt_url};
use sluice_core::{BoundedSender, Checkpointed, Clock, Shutdown, TrySendError, Weigh};
use tokio::sync::{mpsc, watch};

use super::broker::Presser;
use crate::decode::MessageMeta;
use crate::emit::Emitter;
use crate::source::backoff;
use crate::wal::{self, Committed, DurableAcks, GroupLog, WAL_PARTITION, checkpointed};
use crate::{Error, Result};

/// Logged messages a redelivery is compared with (by topic and payload hash), and
/// kept in the log past the checkpoint for a restart to compare with. Not packet ids:
/// mosquitto 2.0.11 sends a reconnecting session its whole queue at once, past
/// `max_inflight_messages` and past 65,535 packet ids, so a redelivery can be much
/// older than the newest message with its packet id. About 40 MB of memory.
const REDELIVERY_WINDOW: u64 = 1 << 20;

/// ... and at most this many bytes of them: at 64 KB a message, 2^20 messages would
/// keep 64 GB of log on disk. After a restart, a redelivery of a message older than
/// either bound is logged again (one more copy in the lake). What the checkpoint has
/// not covered is kept whatever its size.
const REDELIVERY_BYTES: u64 = 1 << 30;

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
        // The embedded broker counts what it holds for us itself.
        let store = self.door.is_none().then(|| {
            tokio::spawn(watch_store(
                self.options.clone(),
                self.name.clone(),
                shutdown.clone(),
            ))
        });
        let acker = match &mut self.log {
            Some(log) => {
                // The logged messages past the checkpoint go through the pipeline again.
                for r in std::mem::take(&mut log.replay) {
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
                done = GroupLog::committed(self.log.as_mut().map(|l| &mut l.commits)) => self.logged(done).await?,
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
                log.commits.start_commit();
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
                log.commits.start_commit();
            }
            if self.log.as_ref().is_none_or(|l| l.commits.is_idle()) {
                break;
            }
            let done = GroupLog::committed(self.log.as_mut().map(|l| &mut l.commits)).await;
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
        if let Some(store) = store {
            let _ = tokio::time::timeout(Duration::from_secs(1), store).await;
        }
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
        let Some(logged) = log.commits.finish(done)? else {
            return Ok(());
        };
        let mut acks = Vec::with_capacity(logged.len());
        for entry in logged {
            match entry {
                Logged::Arrived {
                    seq,
                    ingest_ms,
                    publish,
                } => {
                    push(
                        &mut self.emitter,
                        &publish.topic,
                        &publish.payload,
                        seq,
                        ingest_ms,
                    )
                    .await?;
                    acks.push(ack_only(publish));
                }
                Logged::Redelivered(publish) => acks.push(ack_only(publish)),
            }
        }
        log.acknowledge(acks);
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

/// What a group commit of the log hands back: a QoS 1 message now on disk, or a
/// redelivery of one logged before, acknowledged once what came before it is.
#[derive(Debug)]
enum Logged {
    Arrived {
        seq: u64,
        ingest_ms: i64,
        publish: Publish,
    },
    Redelivered(Publish),
}

/// A durable source's log: its group commits, the messages logged lately (to
/// recognise redeliveries), and where acknowledgements go.
#[derive(Debug)]
struct Log {
    name: String,
    commits: GroupLog<Logged>,
    /// Replayed at start: the records past the checkpoint.
    replay: Vec<wal::WalRecord>,
    /// Hashes of the newest logged messages.
    recent: Recent,
    checkpoints: watch::Receiver<Checkpointed>,
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

impl Log {
    fn open(name: &str, durable: DurableAcks) -> Result<Self> {
        let (commits, recovered, covered) = GroupLog::open(name, "mqtt", &durable)?;
        let mut recent = Recent::default();
        let skip = recovered
            .records
            .len()
            .saturating_sub(REDELIVERY_WINDOW as usize);
        for r in &recovered.records[skip..] {
            recent.insert(message_hash(&r.topic, &r.payload));
        }
        let replay = commits.replay(recovered.records, covered);
        Ok(Self {
            name: name.to_owned(),
            commits,
            replay,
            recent,
            checkpoints: durable.checkpoints,
            acks: None,
        })
    }

    /// Takes a QoS 1 message into the next commit, or notes a redelivery.
    fn accept(&mut self, publish: Publish, now_ms: i64) {
        let hash = message_hash(&publish.topic, &publish.payload);
        if publish.dup && self.recent.contains(hash) {
            metrics::counter!("sluice_mqtt_redeliveries_skipped_total", "component" => self.name.clone())
                .increment(1);
            self.commits.wait(Logged::Redelivered(publish));
            return;
        }
        self.recent.insert(hash);
        let seq = self
            .commits
            .write(1, publish.pkid, now_ms, &publish.topic, &publish.payload);
        self.commits.wait(Logged::Arrived {
            seq,
            ingest_ms: now_ms,
            publish,
        });
    }

    /// Queues the PUBACKs of messages now in the log.
    fn acknowledge(&mut self, publishes: Vec<Publish>) {
        if let Some(acks) = &self.acks {
            let _ = acks.send(publishes);
        }
    }

    /// Deletes the log segments checkpoint position `covered` covers, keeping the
    /// newest [`REDELIVERY_WINDOW`] records (at most [`REDELIVERY_BYTES`] of them):
    /// their acknowledgements may not have reached the broker, and a restart needs
    /// them to recognise redeliveries.
    fn trim(&mut self, covered: u64) {
        let by_count = self
            .commits
            .next_seq()
            .saturating_sub(REDELIVERY_WINDOW + 1);
        // Unreadable: the count alone bounds the trim; `trim` reports the directory.
        let by_bytes = wal::Wal::bound_keeping(self.commits.dir(), REDELIVERY_BYTES).unwrap_or(0);
        self.commits
            .trim(covered.min(by_count.max(by_bytes)), |_| Ok(()));
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
    // SUBACKs on this connection (one per topic).
    let mut acknowledged = 0;
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
                acknowledged = 0;
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
                // A refused subscription is counted as answered: it is logged, and
                // the embedded broker's door must not wait for it for ever.
                acknowledged += 1;
                if refused(&ack) {
                    tracing::error!(component = %name, kind = "mqtt", ?topics, "broker refused the subscription (not authorized?)");
                } else if acknowledged >= topics.len() {
                    subscribed.set(1.0);
                }
                if acknowledged >= topics.len()
                    && let Some(door) = &door
                {
                    door.set_subscribed(true);
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(other) => tracing::trace!(component = %name, event = ?other, "mqtt event"),
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(error) => {
                subscribed.set(0.0);
                if let Some(door) = &door {
                    door.set_subscribed(false);
                }
                if publishes.is_closed() {
                    return;
                }
                tokio::time::sleep(state.lost(&name, &error)).await;
            }
        }
    }
}

/// The `$SYS` topic where mosquitto (1.x and 2.x) says how many bytes of messages its
/// store holds: those queued for or in flight to slow and offline clients, and the
/// retained ones (its own `$SYS` values among them, a few hundred bytes).
const STORE_BYTES_TOPIC: &str = "$SYS/broker/store/messages/bytes";

/// An external broker's backlog as the source's lag, `sluice_source_lag{unit="bytes"}`:
/// what mosquitto says its message store holds ([`STORE_BYTES_TOPIC`], published every
/// `sys_interval`, 10 s by default). MQTT has no way to ask a broker how much it holds
/// for one client, so this is the whole broker's, which on a broker that feeds Sluice
/// is mostly what Sluice has not read yet. A connection of its own (clean session, the
/// source's client id plus `-lag`): the source's connection stops reading while the
/// pipeline is full, which is when the figure matters. Brokers that publish no such
/// topic, or refuse it, show no lag, as before; a refusal is logged once.
async fn watch_store(mut options: MqttOptions, name: String, shutdown: Shutdown) {
    let id = format!("{}-lag", options.client_id());
    options
        .set_client_id(id)
        .set_clean_session(true)
        .set_manual_acks(false)
        .set_inflight(16);
    let (client, mut events) = AsyncClient::new(options, 16);
    let lag = metrics::gauge!("sluice_source_lag", "component" => name.clone(), "kind" => "mqtt", "unit" => "bytes");
    let mut failures = 0;
    loop {
        let event = tokio::select! {
            () = shutdown.wait() => break,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                // Not awaited here, as in `drive`: only this loop's polling makes room.
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = client.subscribe(STORE_BYTES_TOPIC, QoS::AtMostOnce).await;
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let bytes = std::str::from_utf8(&publish.payload)
                    .ok()
                    .and_then(|text| text.trim().parse::<f64>().ok());
                if let Some(bytes) = bytes {
                    lag.set(bytes);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) if refused(&ack) => {
                tracing::info!(component = %name, kind = "mqtt", topic = STORE_BYTES_TOPIC, "the broker does not let this source read how much it holds; no lag is shown");
                break;
            }
            Ok(_) => {}
            Err(_) => {
                // The source's own connection logs the outage.
                failures += 1;
                tokio::select! {
                    () = shutdown.wait() => break,
                    () = tokio::time::sleep(backoff(failures)) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

/// Whether the broker refused a filter of a SUBSCRIBE.
fn refused(ack: &rumqttc::SubAck) -> bool {
    ack.return_codes
        .iter()
        .any(|c| matches!(c, SubscribeReasonCode::Failure))
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
