//! The embedded MQTT broker (rumqttd) behind Sluice's door, for `sluice run` with no
//! external broker.
//!
//! rumqttd acknowledges a QoS 1 publish as soon as it is in its log, and a subscriber
//! that falls more than the log (10 × 16 MB per filter) behind loses messages the
//! devices were told had arrived. So devices do not connect to rumqttd: they connect
//! to the **door**, a byte relay on `[broker] listen`, and rumqttd listens on an
//! internal loopback port that only Sluice's own clients use.
//!
//! - The door shuts while rumqttd holds more than [`LAG_HIGH`] bytes the embedded
//!   sources have not read yet, and opens again below [`LAG_LOW`]. rumqttd reports
//!   what it appended to each filter's log once a second (its meters, `4 + topic +
//!   payload` bytes per message); the sources count the same of what they receive.
//!   Between reports the door adds what it relayed since the last one, so a burst
//!   shuts it within its 100 ms check, not at the next report: one device put 60 MB
//!   into rumqttd in 0.6 s, all acknowledged before a report came. This holds the
//!   devices even when rumqttd takes publishes faster than it hands them on, which it
//!   does: the stall test saw a device put 220,000 1 KB messages into it while the
//!   source had read 15,000.
//! - An embedded MQTT source also shuts it while its queue to the decoder is full
//!   (the pipeline is behind) until the queue is down to half ([`Presser`]).
//! - It opens only once the service has built its sources
//!   ([`EmbeddedBroker::open_door`]) and each embedded source has its subscriptions
//!   acknowledged, and shuts while one is resubscribing: rumqttd routes a publish only
//!   to the subscriptions that exist when it arrives, so a message a device sends
//!   before then is acknowledged to it and read by nobody, without a trace in the
//!   meters (they count only subscribed filters).
//! - While the gate is pressed, the relay reads nothing from devices: their bytes wait
//!   in TCP buffers, no more PUBACKs go out, and their in-flight windows fill. That is
//!   the backpressure an external broker gives.
//! - On shutdown the door closes for good before the sources drain, so no device is
//!   acknowledged for a message Sluice will not read; devices resend it on reconnect.
//!   rumqttd keeps its log only in memory, so the sources drain until it holds
//!   nothing unread for them ([`Presser::drained`]); what is left at the end is
//!   logged and counted ([`EmbeddedBroker::report_unread`]).
//!
//! The relay is a plain copy loop (tokio), not MQTT-aware: the gate only has to stop
//! reading, and packet boundaries do not matter for that.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_config::{BrokerConfig, DeviceAuth};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::mqtt::auth::{self, Acl, Authenticator, Passwords};
use crate::mqtt::inspect::{self, Closed, Inspector, Subacks};
use crate::mqtt::v5;
use crate::{Error, Result};

/// A hold of the door longer than this is logged (once, and its end).
const HOLD_LOGGED_AFTER: Duration = Duration::from_secs(1);

/// The door shuts when rumqttd holds this many bytes the sources have not read. Its
/// log drops a filter's oldest messages past 10 × 16 MB; the lag is checked every
/// 100 ms, so at 100 MB/s it overshoots by about 10 MB.
pub const LAG_HIGH: u64 = 32 << 20;
/// ... and opens again below this.
pub const LAG_LOW: u64 = 8 << 20;
/// A lag that does not shrink for this long while every source waits on rumqttd (none
/// has a full queue) is taken as bytes rumqttd will not deliver, and written off.
const LAG_WRITTEN_OFF_AFTER: Duration = Duration::from_secs(5);

/// The running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    /// Where devices connect without TLS: the door, on `[broker] listen` (none when
    /// it is `""`).
    pub listen: Option<SocketAddr>,
    /// Where devices connect with TLS: `[broker.tls] listen`.
    pub tls_listen: Option<SocketAddr>,
    /// rumqttd itself, on loopback: for Sluice's own clients only.
    pub internal: SocketAddr,
    gate: Gate,
    ledger: Arc<Ledger>,
    acl: Option<Arc<Acl>>,
}

impl EmbeddedBroker {
    /// `[broker.acl]`, which tells who published a topic.
    pub fn acl(&self) -> Option<Arc<Acl>> {
        self.acl.clone()
    }

    /// The handle of a source reading `filters`: it presses the gate and counts what
    /// it receives.
    pub fn presser(&self, filters: &[String]) -> Presser {
        let mut subscribers = lock(&self.ledger.subscribers);
        for f in filters {
            *subscribers.entry(f.clone()).or_default() += 1;
        }
        self.gate.0.send_modify(|s| s.unsubscribed += 1);
        Presser {
            gate: self.gate.clone(),
            pressed: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            ledger: self.ledger.clone(),
        }
    }

    /// Lets devices in, once every embedded source has its [`Presser`] (each holds
    /// the door until its subscriptions are acknowledged). Until this, devices can
    /// connect but nothing they publish is read.
    pub fn open_door(&self) {
        self.gate.0.send_modify(|s| s.started = true);
    }

    /// Stops reading from devices for good (shutdown, before the sources drain).
    pub fn close_door(&self) {
        self.gate.0.send_modify(|s| s.shut = true);
    }

    /// After the sources stopped: logs and counts (`sluice_broker_undelivered_bytes_total`)
    /// what rumqttd acknowledged to devices and the sources never read, which is lost
    /// with its in-memory log. Returns the bytes.
    pub fn report_unread(&self) -> u64 {
        let unread = self.ledger.metered_unread();
        if unread > 0 {
            tracing::warn!(
                bytes = unread,
                "embedded broker: devices were acknowledged for this many bytes the sources did not read before the stop; they are lost with rumqttd's in-memory log"
            );
            metrics::counter!("sluice_broker_undelivered_bytes_total").increment(unread);
        }
        unread
    }
}

/// Whether the door reads from devices: not before the sources are built and
/// subscribed, nor while any source presses, nor while rumqttd holds too much unread,
/// nor after shutdown.
#[derive(Debug, Clone, Copy, Default)]
struct DoorState {
    /// The service has built its sources ([`EmbeddedBroker::open_door`]).
    started: bool,
    /// Sources whose subscriptions rumqttd has not acknowledged (yet, or again).
    unsubscribed: u32,
    /// Sources whose queue is full.
    presses: u32,
    /// rumqttd holds more than [`LAG_HIGH`] unread bytes.
    lagging: bool,
    shut: bool,
}

impl DoorState {
    fn open(&self) -> bool {
        self.started && self.unsubscribed == 0 && self.presses == 0 && !self.lagging && !self.shut
    }
}

/// What rumqttd appended to the logs of the filters the embedded sources read, and
/// what those sources received, in rumqttd's measure (`4 + topic + payload` bytes).
#[derive(Debug, Default)]
struct Ledger {
    /// Bytes appended per filter that a source reads since the broker started
    /// (summed meters). Filters no source reads (a device's own subscriptions) are
    /// not kept: a device could name ever-new ones.
    appended: Mutex<HashMap<String, u64>>,
    /// Embedded sources per filter: each reads every message of the filter's log.
    subscribers: Mutex<HashMap<String, u64>>,
    /// Bytes the sources received.
    received: AtomicU64,
    /// Bytes the door relayed from devices to rumqttd, all told ...
    relayed: AtomicU64,
    /// ... and as of rumqttd's last meter report.
    relayed_at_report: AtomicU64,
    /// Meter reports so far.
    reports: AtomicU64,
    /// Bytes written off as undeliverable.
    forgiven: AtomicU64,
}

impl Ledger {
    /// Adds a meter report: what rumqttd appended to each filter's log since the
    /// last one.
    fn add(&self, report: Vec<rumqttd::Meter>) {
        // In `expected`'s order: subscribers, then appended.
        let subscribers = lock(&self.subscribers);
        let mut appended = lock(&self.appended);
        for meter in report {
            if let rumqttd::Meter::Subscription(filter, m) = meter
                && subscribers.contains_key(&filter)
            {
                *appended.entry(filter).or_default() += m.total_size as u64;
            }
        }
    }

    /// Bytes the sources should have received by now.
    fn expected(&self) -> u64 {
        let subscribers = lock(&self.subscribers);
        lock(&self.appended)
            .iter()
            .map(|(filter, bytes)| bytes * subscribers.get(filter).copied().unwrap_or(0))
            .sum()
    }

    /// What rumqttd's meters say it holds for the sources that they have not read.
    fn metered_unread(&self) -> u64 {
        let read = self.received.load(Ordering::Relaxed) + self.forgiven.load(Ordering::Relaxed);
        self.expected().saturating_sub(read)
    }

    /// [`metered_unread`](Self::metered_unread) plus what the door relayed since the
    /// last report, once per source of the most-read filter: appended, not yet
    /// metered. It over-counts by the packets' framing (and by publishes to topics no
    /// source reads) until the next report.
    fn unread(&self) -> u64 {
        let in_transit = self
            .relayed
            .load(Ordering::Relaxed)
            .saturating_sub(self.relayed_at_report.load(Ordering::Relaxed));
        let fanout = lock(&self.subscribers).values().copied().max().unwrap_or(0);
        let read = self.received.load(Ordering::Relaxed) + self.forgiven.load(Ordering::Relaxed);
        (self.expected() + in_transit * fanout).saturating_sub(read)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The door's gate, shared by the relays (readers) and the sources (pressers).
#[derive(Debug, Clone)]
struct Gate(Arc<watch::Sender<DoorState>>);

/// One source's hold on the gate: while it is not subscribed, and while it presses
/// (pressing twice counts once). Released on drop.
#[derive(Debug)]
pub struct Presser {
    gate: Gate,
    pressed: AtomicBool,
    subscribed: AtomicBool,
    ledger: Arc<Ledger>,
}

impl Presser {
    /// Counts a message received from rumqttd.
    pub fn received(&self, topic: usize, payload: usize) {
        self.ledger
            .received
            .fetch_add(4 + (topic + payload) as u64, Ordering::Relaxed);
    }

    /// Holds the devices back (the source's queue is full).
    pub fn press(&self) {
        if !self.pressed.swap(true, Ordering::AcqRel) {
            self.gate.0.send_modify(|s| s.presses += 1);
        }
    }

    /// Lets the devices go on.
    pub fn release(&self) {
        if self.pressed.swap(false, Ordering::AcqRel) {
            self.gate
                .0
                .send_modify(|s| s.presses = s.presses.saturating_sub(1));
        }
    }

    /// Whether rumqttd has acknowledged every subscription of the source's
    /// connection: the door waits for this, and again after the connection is lost.
    pub fn set_subscribed(&self, subscribed: bool) {
        if self.subscribed.swap(subscribed, Ordering::AcqRel) != subscribed {
            self.gate.0.send_modify(|s| {
                s.unsubscribed = if subscribed {
                    s.unsubscribed.saturating_sub(1)
                } else {
                    s.unsubscribed + 1
                }
            });
        }
    }

    /// Whether this source holds the devices back (one relaxed load).
    pub fn is_pressed(&self) -> bool {
        self.pressed.load(Ordering::Relaxed)
    }

    /// On shutdown, `since_stop` after the door closed: whether rumqttd holds nothing
    /// more for the sources. Its meters may report an append up to a second late, so
    /// not before [`METERED_AFTER`].
    pub fn drained(&self, since_stop: Duration) -> bool {
        since_stop >= METERED_AFTER && self.ledger.metered_unread() == 0
    }
}

/// How long after the last append rumqttd's meters surely reported it (they report
/// every second).
const METERED_AFTER: Duration = Duration::from_millis(1_500);

impl Drop for Presser {
    fn drop(&mut self) {
        self.release();
        self.set_subscribed(true);
    }
}

/// Starts rumqttd on its own thread on an internal loopback port, and the door on
/// `config.listen` and `[broker.tls] listen`.
///
/// The door's ports are bound here first, so a taken port is a clear error before
/// anything starts (rumqttd only logs a bind failure from its own thread); so are the
/// TLS certificate and the passwords file read.
pub async fn start_embedded_broker(config: &BrokerConfig) -> Result<EmbeddedBroker> {
    let bind_error = |what, addr: String| move |error| Error::Bind { what, addr, error };
    let config_error = |message: String| Error::Config {
        source_name: "broker".into(),
        message,
    };
    let mut listeners = Vec::new();
    if config.plain_listener() {
        listeners.push((config.listen.clone(), None, config.auth));
    }
    if let Some(tls) = &config.tls {
        let server = crate::tls::server_config(
            &tls.cert_file,
            &tls.key_file,
            tls.client_ca_file.as_deref(),
            Vec::new(),
        )
        .map_err(config_error)?;
        listeners.push((
            tls.listen.clone(),
            Some(tokio_rustls::TlsAcceptor::from(server)),
            tls.auth(),
        ));
    }
    let passwords = match &config.passwords_file {
        Some(path) => Some(Arc::new(Passwords::load(path).map_err(config_error)?)),
        None => None,
    };
    let acl = config.acl.as_ref().map(|a| Arc::new(Acl::new(a)));
    let mut bound = Vec::new();
    for (addr, tls, auth) in listeners {
        let what = if tls.is_some() {
            "the embedded MQTT broker's TLS listener"
        } else {
            "the embedded MQTT broker"
        };
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(bind_error(what, addr.clone()))?;
        let local = listener.local_addr().map_err(bind_error(what, addr))?;
        let entry = Entrance {
            tls,
            auth: Authenticator {
                auth,
                passwords: passwords.clone(),
                acl: acl.clone(),
            },
        };
        bound.push((listener, local, entry));
    }
    // A free loopback port for rumqttd (released just before rumqttd binds it).
    let internal = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(bind_error(
            "the embedded broker's internal port",
            "127.0.0.1:0".into(),
        ))?;
    // rumqttd's Config is built from its documented TOML shape.
    let text = format!(
        r#"
        id = 0
        [router]
        id = 0
        max_connections = {max_connections}
        max_outgoing_packet_count = 1000
        max_segment_size = 16777216
        max_segment_count = 10

        [v4.1]
        name = "sluice-v4"
        listen = "{internal}"
        next_connection_delay_ms = 0
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = {max_payload}
        max_inflight_count = {max_inflight}
        dynamic_filters = true

        # rumqttd's timer thread unwraps both intervals, so both are set; nothing
        # listens for alerts.
        [metrics.meters]
        push_interval = 1
        [metrics.alerts]
        push_interval = 60
        "#,
        max_connections = config.max_connections,
        max_payload = config.max_payload_size.as_usize(),
        max_inflight = config.max_inflight,
    );
    let broker_config: rumqttd::Config = toml::from_str(&text)
        .map_err(|e| config_error(format!("embedded broker settings rejected: {e}")))?;
    let mut broker = rumqttd::Broker::new(broker_config);
    let meters = broker
        .meters()
        .map_err(|e| config_error(format!("embedded broker meters: {e}")))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(bind_error(
            "the embedded MQTT broker thread",
            internal.to_string(),
        ))?;
    // Wait until it accepts connections, so sources do not start with an "outage".
    for _ in 0..100 {
        if TcpStream::connect(internal).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gate = Gate(Arc::new(watch::Sender::new(DoorState::default())));
    let ledger = Arc::new(Ledger::default());
    let door = Arc::new(Door {
        internal,
        gate: gate.clone(),
        ledger: ledger.clone(),
        payload: config.max_payload_size.as_usize(),
        per_address: config.max_connections_per_address,
        connect_timeout: config.connect_timeout.0,
        acl: acl.clone(),
        addresses: Arc::default(),
        password_checks: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ),
    });
    let (mut listen, mut tls_listen) = (None, None);
    for (listener, local, entry) in bound {
        if entry.tls.is_some() {
            tls_listen = Some(local);
        } else {
            listen = Some(local);
        }
        tokio::spawn(open_door(listener, door.clone(), Arc::new(entry)));
    }
    tokio::spawn(watch_holds(gate.0.subscribe()));
    tokio::spawn(count_appends(meters, ledger.clone()));
    tokio::spawn(watch_lag(ledger.clone(), gate.clone()));
    tracing::info!(?listen, ?tls_listen, %internal, "embedded MQTT broker listening");
    Ok(EmbeddedBroker {
        listen,
        tls_listen,
        internal,
        gate,
        ledger,
        acl,
    })
}

/// What every connection through the door shares.
#[derive(Debug)]
struct Door {
    /// rumqttd's internal port.
    internal: SocketAddr,
    gate: Gate,
    ledger: Arc<Ledger>,
    /// `max_payload_size`: longer PUBLISH packets are trimmed.
    payload: usize,
    /// Connections from one IP address at once (0: any number).
    per_address: usize,
    /// How long a connection may take to finish its TLS handshake and send its CONNECT.
    connect_timeout: Duration,
    /// `[broker.acl]`.
    acl: Option<Arc<Acl>>,
    addresses: Arc<Mutex<Addresses>>,
    /// Password checks running at once: one per core. argon2 takes its memory cost
    /// (19 MiB by default) and tens of milliseconds of CPU per check, so CONNECTs with
    /// wrong passwords, unbounded, took a blocking thread and that memory each (512
    /// threads, ~10 GB). Past it a CONNECT waits, within its connect timeout.
    password_checks: tokio::sync::Semaphore,
}

impl Door {
    /// Counts a connection the door closed (`sluice_broker_refused_total{reason}`) and
    /// logs it at most once a minute per `who` (a client id or an address) and reason.
    fn refused(&self, who: &str, reason: &'static str, detail: &str) {
        metrics::counter!("sluice_broker_refused_total", "reason" => reason).increment(1);
        lock(&self.addresses).log_once(who, reason, detail);
    }
}

/// One of the door's listeners: plain or TLS, and how it authenticates devices.
struct Entrance {
    tls: Option<tokio_rustls::TlsAcceptor>,
    auth: Authenticator,
}

/// Connections open per IP address, and when each refusal was last logged (once a
/// minute per client or address and reason, not per attempt).
#[derive(Debug, Default)]
struct Addresses {
    open: HashMap<std::net::IpAddr, usize>,
    logged: HashMap<(String, &'static str), Instant>,
    /// When `logged` was last pruned of refusals over a minute old.
    pruned: Option<Instant>,
    /// When "too many refused clients to log each" was last logged.
    flooded: Option<Instant>,
}

/// How often a refusal of one client or address, for one reason, is logged.
const REFUSAL_LOGGED_EVERY: Duration = Duration::from_secs(60);
/// The most clients whose refusals are remembered for logging: the client id is
/// the device's to choose, and refusals of random ids must not grow the map.
const REFUSALS_REMEMBERED: usize = 10_000;
/// The longest client id a refusal log line shows and remembers, in bytes.
const LOGGED_ID_BYTES: usize = 128;

impl Addresses {
    /// Logs `detail` unless the same `who` and `reason` were logged within a minute.
    /// Past [`REFUSALS_REMEMBERED`] clients in a minute the rest are counted (by the
    /// caller) and not logged one by one; that is logged once a minute instead.
    fn log_once(&mut self, who: &str, reason: &'static str, detail: &str) {
        let now = Instant::now();
        let full = self.logged.len() >= REFUSALS_REMEMBERED;
        // Pruned at most once a second: a full map of recent refusals would otherwise
        // be walked at every refusal.
        if full
            && self
                .pruned
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.logged
                .retain(|_, at| now.duration_since(*at) < REFUSAL_LOGGED_EVERY);
            self.pruned = Some(now);
        }
        let who = crate::decode::clip(who, LOGGED_ID_BYTES);
        let key = (who.into_owned(), reason);
        if !self.logged.contains_key(&key) && self.logged.len() >= REFUSALS_REMEMBERED {
            if self
                .flooded
                .is_none_or(|at| now.duration_since(at) >= REFUSAL_LOGGED_EVERY)
            {
                self.flooded = Some(now);
                tracing::warn!(
                    "embedded broker refused more than {REFUSALS_REMEMBERED} clients within a minute; further refusals are counted in sluice_broker_refused_total and not logged each"
                );
            }
            return;
        }
        let last = self
            .logged
            .entry(key.clone())
            .or_insert(now - REFUSAL_LOGGED_EVERY);
        if now.duration_since(*last) >= REFUSAL_LOGGED_EVERY {
            *last = now;
            tracing::warn!(
                client = key.0,
                reason,
                "embedded broker refused a device: {detail} (logged once a minute per client and reason)"
            );
        }
    }
}

/// One open connection of an address; counted down when dropped.
struct Admitted {
    ip: std::net::IpAddr,
    /// What it counts against: see [`counted_as`].
    counted: std::net::IpAddr,
    addresses: Arc<Mutex<Addresses>>,
}

/// The address whose connections `ip`'s count against: an IPv4 address itself (also
/// when it comes IPv4-mapped), an IPv6 address its /64 network, the least a host is
/// given, so that one host cannot get round the limit with addresses of its own.
fn counted_as(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut addresses = lock(&self.addresses);
        if let Some(n) = addresses.open.get_mut(&self.counted) {
            *n -= 1;
            if *n == 0 {
                addresses.open.remove(&self.counted);
            }
        }
    }
}

/// Accepts devices on one listener and relays each to rumqttd, at most `per_address`
/// at once from one IP address.
async fn open_door(listener: tokio::net::TcpListener, door: Arc<Door>, entrance: Arc<Entrance>) {
    // Failing since: logged once, and once when accepting works again.
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok((device, peer)) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("embedded broker accepting connections again");
                }
                let ip = peer.ip();
                let counted = counted_as(ip);
                {
                    let mut book = lock(&door.addresses);
                    let open = book.open.entry(counted).or_default();
                    if door.per_address > 0 && *open >= door.per_address {
                        drop(book);
                        let detail = format!(
                            "{} connections from it are open ([broker] max_connections_per_address, IPv6 by /64)",
                            door.per_address
                        );
                        let who = match counted {
                            std::net::IpAddr::V6(_) => format!("{counted}/64"),
                            std::net::IpAddr::V4(_) => counted.to_string(),
                        };
                        door.refused(&who, "per_address", &detail);
                        continue;
                    }
                    *open += 1;
                }
                let admitted = Admitted {
                    ip,
                    counted,
                    addresses: door.addresses.clone(),
                };
                tokio::spawn(admit(device, door.clone(), entrance.clone(), admitted));
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "embedded broker cannot accept connections (out of open files?); retrying");
                }
                // Out of file descriptors, most likely: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Takes a device's TLS handshake (on the TLS listener) and its CONNECT within the
/// connect timeout, then relays it.
async fn admit(device: TcpStream, door: Arc<Door>, entrance: Arc<Entrance>, admitted: Admitted) {
    let deadline = tokio::time::Instant::now() + door.connect_timeout;
    let _ = device.set_nodelay(true);
    let ip = admitted.ip.to_string();
    let timed_out = |door: &Door| {
        let detail = format!(
            "no CONNECT within {:?} ([broker] connect_timeout)",
            door.connect_timeout
        );
        door.refused(&ip, "connect_timeout", &detail);
    };
    let Some(acceptor) = &entrance.tls else {
        let (from, to) = device.into_split();
        match serve(from, to, None, deadline, &door, &entrance.auth).await {
            Err(Served::TimedOut) => timed_out(&door),
            Err(Served::Closed) | Ok(()) => {}
        }
        return;
    };
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(device)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            door.refused(&ip, "tls_handshake", &format!("TLS handshake failed: {e}"));
            return;
        }
        Err(_) => return timed_out(&door),
    };
    let name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::tls::common_name(c));
    let (from, to) = tokio::io::split(stream);
    if let Err(Served::TimedOut) = serve(from, to, name, deadline, &door, &entrance.auth).await {
        timed_out(&door);
    }
}

/// How a connection ended early.
enum Served {
    /// No whole CONNECT by the deadline.
    TimedOut,
    /// Refused, or gone.
    Closed,
}

/// Reads the device's CONNECT, identifies it (or answers with the CONNACK that refuses
/// it), then relays it to rumqttd.
async fn serve<R, W>(
    mut from_device: R,
    mut to_device: W,
    certificate_name: Option<String>,
    deadline: tokio::time::Instant,
    door: &Door,
    auth: &Authenticator,
) -> std::result::Result<(), Served>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (connect, pending) =
        match tokio::time::timeout_at(deadline, read_connect(&mut from_device, door.payload)).await
        {
            Err(_) => return Err(Served::TimedOut),
            Ok(Err(())) => return Err(Served::Closed),
            Ok(Ok(read)) => read,
        };
    // An MQTT 5 device's CONNECT goes on to rumqttd as a 3.1.1 one (see `v5`).
    let v5 = v5::is_v5(&connect.1);
    let refuse = |refusal: auth::Refusal| -> Vec<u8> {
        if v5 {
            v5::refusal_connack(refusal.code_v5()).to_vec()
        } else {
            refusal.connack().to_vec()
        }
    };
    let (connect, terms) = if v5 {
        match v5::downgrade_connect(&connect.1, certificate_name.as_deref()) {
            Ok(downgraded) => (downgraded.packet, downgraded.terms),
            Err((refusal, detail)) => {
                door.refused("(MQTT 5 client)", refusal.label(), &detail);
                let _ = to_device.write_all(&refuse(refusal)).await;
                let _ = to_device.shutdown().await;
                return Err(Served::Closed);
            }
        }
    } else {
        let (header, mut body) = connect;
        // rumqttd would keep a retained will for ever, one per topic a device names
        // (the door clears the retain flag of publishes for the same reason).
        auth::clear_will_retain(&mut body);
        ((header, body), v5::Terms::default())
    };
    let parsed = auth::parse_connect(&connect.1);
    let who = parsed
        .as_ref()
        .map(|c| c.client_id.clone())
        .filter(|c| !c.is_empty());
    let identity = if auth.auth == DeviceAuth::Password {
        let permit = tokio::time::timeout_at(deadline, door.password_checks.acquire()).await;
        match permit {
            Ok(Ok(_permit)) => {
                // argon2 takes tens of milliseconds of CPU: not on the async runtime.
                let auth = auth.clone();
                let refused = (
                    auth::Refusal::BadCredentials,
                    "password check failed".to_owned(),
                );
                tokio::task::spawn_blocking(move || auth.identify(parsed.as_ref(), None))
                    .await
                    .unwrap_or(Err(refused))
            }
            _ => Err((
                auth::Refusal::Busy,
                "password checks busy past the connect timeout".to_owned(),
            )),
        }
    } else {
        auth.identify(parsed.as_ref(), certificate_name.as_deref())
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err((refusal, detail)) => {
            let who = who.unwrap_or_else(|| "(no client id)".into());
            door.refused(&who, refusal.label(), &detail);
            let _ = to_device.write_all(&refuse(refusal)).await;
            let _ = to_device.shutdown().await;
            return Err(Served::Closed);
        }
    };
    let Ok(broker) = TcpStream::connect(door.internal).await else {
        return Err(Served::Closed);
    };
    // Only now: a connection that never sends a whole CONNECT holds no relay buffer.
    let mut buf = vec![0u8; 64 << 10];
    let _ = broker.set_nodelay(true);
    let (mut from_broker, mut to_broker) = broker.into_split();
    let mut inspector = Inspector::new(door.payload);
    if let Some(acl) = &door.acl {
        inspector = inspector.with_acl(acl.clone(), identity.clone());
    }
    let mut subacks = door
        .acl
        .is_some()
        .then(|| Subacks::new(inspector.refusals()));
    let mut up5 = v5.then(|| v5::Up::new(door.payload));
    // A v5 device learns which publishes the ACL denied (0x87 in their PUBACK).
    let denials = (v5 && door.acl.is_some()).then(|| inspector.denials());
    let mut down5 = up5.as_ref().map(|up| up.down(terms, denials));
    // Acknowledgements the way down owes rumqttd, sent on the way up.
    let flow = up5.as_ref().map(v5::Up::flow);
    let mut gate = door.gate.0.subscribe();
    let ledger = &door.ledger;
    let up = async {
        let mut out = Vec::with_capacity(buf.len());
        out.extend_from_slice(&connect.0);
        out.extend_from_slice(&connect.1);
        // The CONNECT goes through at once (the device gets its CONNACK); what it sent
        // after it waits for the gate like every read, which is fed from `buf` as it
        // is, no copy per read.
        let mut after_connect: &[u8] = &pending;
        let mut input: &[u8] = &[];
        // An MQTT 5 device's bytes as 3.1.1, before the inspector.
        let mut translated = Vec::new();
        loop {
            let (before_trimmed, before_denied) = (inspector.trimmed(), inspector.denied());
            let before_refused = inspector.refused().0;
            let fed = match &mut up5 {
                Some(up5) => {
                    translated.clear();
                    up5.feed(input, &mut translated)
                        .and_then(|()| inspector.feed(&translated, &mut out))
                }
                None => inspector.feed(input, &mut out),
            };
            match fed {
                Ok(()) => {}
                Err(Closed::BadSubscribe) => {
                    metrics::counter!("sluice_broker_denied_total", "action" => "subscribe")
                        .increment(1);
                    let detail = "unreadable SUBSCRIBE; connection closed";
                    lock(&door.addresses).log_once(&identity, "denied_subscribe", detail);
                    return None;
                }
                Err(Closed::Untranslatable { code, what }) => {
                    metrics::counter!("sluice_broker_refused_total", "reason" => "mqtt5")
                        .increment(1);
                    let detail = format!("MQTT 5 {what} has no MQTT 3.1.1 form; connection closed");
                    lock(&door.addresses).log_once(&identity, "mqtt5", &detail);
                    return Some(code);
                }
            }
            if let (refused, Some(filter)) = inspector.refused()
                && refused > before_refused
            {
                metrics::counter!("sluice_broker_denied_total", "action" => "subscribe")
                    .increment(refused - before_refused);
                let code = if v5 { "0x87" } else { "0x80" };
                let detail = format!(
                    "SUBSCRIBE to {filter:?} is outside its ACL; answered with failure {code}"
                );
                lock(&door.addresses).log_once(&identity, "denied_subscribe", &detail);
            }
            if inspector.trimmed() > before_trimmed {
                metrics::counter!("sluice_broker_oversized_total")
                    .increment(inspector.trimmed() - before_trimmed);
            }
            let denied = inspector.denied() - before_denied;
            if denied > 0 {
                metrics::counter!("sluice_broker_denied_total", "action" => "publish")
                    .increment(denied);
                lock(&door.addresses).log_once(
                    &identity,
                    "denied_publish",
                    "PUBLISH outside its ACL, acknowledged and dropped",
                );
            }
            if !out.is_empty() {
                if to_broker.write_all(&out).await.is_err() {
                    return None;
                }
                ledger
                    .relayed
                    .fetch_add(out.len() as u64, Ordering::Relaxed);
                out.clear();
            }
            if gate.wait_for(DoorState::open).await.is_err() {
                return None;
            }
            if !after_connect.is_empty() {
                input = std::mem::take(&mut after_connect);
                continue;
            }
            // Both are cancel safe: a read cut short by an ack owed loses no byte.
            let read = match &flow {
                Some(flow) => tokio::select! {
                    read = from_device.read(&mut buf) => Some(read),
                    () = flow.owed() => None,
                },
                None => Some(from_device.read(&mut buf).await),
            };
            match read {
                // Up sends what is owed when fed, even nothing.
                None => input = &[],
                Some(Ok(0) | Err(_)) => return None,
                Some(Ok(n)) => input = &buf[..n],
            }
        }
    };
    let down = async {
        if subacks.is_none() && down5.is_none() {
            // Without an ACL nothing is refused: bytes go through as they come.
            let _ = tokio::io::copy(&mut from_broker, &mut to_device).await;
            return;
        }
        let mut buf = vec![0u8; 16 << 10];
        let (mut mid, mut out) = (Vec::new(), Vec::with_capacity(buf.len()));
        loop {
            // Publishes held for a v5 device's Receive Maximum go when it acknowledges
            // one; rumqttd is read meanwhile (both are cancel safe).
            let read = match &down5 {
                Some(down5) if down5.holds() => tokio::select! {
                    read = from_broker.read(&mut buf) => Some(read),
                    () = down5.acked() => None,
                },
                _ => Some(from_broker.read(&mut buf).await),
            };
            let n = match read {
                // Fed nothing, `Down` releases what now fits.
                None => 0,
                Some(Ok(0) | Err(_)) => return,
                Some(Ok(n)) => n,
            };
            let read = match &mut subacks {
                Some(subacks) => {
                    mid.clear();
                    subacks.feed(&buf[..n], &mut mid);
                    &mid[..]
                }
                None => &buf[..n],
            };
            match &mut down5 {
                Some(down5) => {
                    let before = down5.discarded();
                    down5.feed(read, &mut out);
                    if down5.overloaded() {
                        metrics::counter!("sluice_broker_refused_total", "reason" => "receive_max")
                            .increment(1);
                        let detail = format!(
                            "more than {} KB of commands waited for the MQTT 5 device's acknowledgements (its Receive Maximum); connection closed with 0x97, the broker keeps them for its session",
                            down5.held_budget() >> 10
                        );
                        lock(&door.addresses).log_once(&identity, "receive_max", &detail);
                        out.extend_from_slice(&[0xE0, 1, 0x97]);
                        let _ = to_device.write_all(&out).await;
                        return;
                    }
                    let discarded = down5.discarded() - before;
                    if discarded > 0 {
                        metrics::counter!("sluice_broker_undelivered_total", "reason" => "device_max_packet")
                            .increment(discarded);
                        let detail = "a message larger than the MQTT 5 device's Maximum Packet Size was not sent to it (acknowledged to the broker, as MQTT 5 asks)";
                        lock(&door.addresses).log_once(&identity, "device_max_packet", detail);
                    }
                }
                None => out.extend_from_slice(read),
            }
            if to_device.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    };
    let closing = tokio::select! {
        code = up => code,
        _ = down => None,
    };
    if let Some(code) = closing {
        // An MQTT 5 DISCONNECT with its reason code, so the device knows why.
        let _ = to_device.write_all(&[0xE0, 1, code]).await;
    }
    Ok(())
}

/// Reads a whole CONNECT packet: its fixed header, its body, and whatever the device
/// sent after it. Fails on anything that is not a CONNECT of at most `limit` bytes, or
/// on a closed connection.
async fn read_connect<R: AsyncRead + Unpin>(
    from_device: &mut R,
    limit: usize,
) -> std::result::Result<((Vec<u8>, Vec<u8>), Vec<u8>), ()> {
    let mut got = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        if got.len() >= 2 {
            if got[0] != 0x10 {
                return Err(());
            }
            if let Some((remaining, len)) = inspect::remaining_length(&got[1..]) {
                let end = 1 + len + remaining;
                if end > limit {
                    return Err(());
                }
                if got.len() >= end {
                    let rest = got.split_off(end);
                    let body = got.split_off(1 + len);
                    return Ok(((got, body), rest));
                }
            } else if got.len() > 5 {
                return Err(());
            }
        }
        match from_device.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sums rumqttd's meters (per filter, what was appended since the last report).
async fn count_appends(meters: rumqttd::meters::MetersLink, ledger: Arc<Ledger>) {
    while let Ok(report) = meters.next().await {
        let relayed = ledger.relayed.load(Ordering::Relaxed);
        ledger.add(report);
        // What the door relayed up to now is in this report (rumqttd appends a publish
        // as it reads it), not in transit any more.
        ledger
            .relayed_at_report
            .fetch_max(relayed, Ordering::Relaxed);
        ledger.reports.fetch_add(1, Ordering::Relaxed);
    }
}

/// Shuts the door while rumqttd holds more than [`LAG_HIGH`] unread bytes, until it
/// holds less than [`LAG_LOW`]. A lag that stays put for [`LAG_WRITTEN_OFF_AFTER`]
/// while no source has a full queue (they all wait on rumqttd) cannot be read:
/// messages appended before a source subscribed, or a log that overflowed anyway.
/// It is written off (logged, counted), so the door cannot stay shut for good.
async fn watch_lag(ledger: Arc<Ledger>, gate: Gate) {
    let written_off = metrics::counter!("sluice_broker_undelivered_bytes_total");
    let lag_gauge = metrics::gauge!("sluice_broker_lag_bytes");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when the lag has not shrunk with every source idle, and the received
    // count then.
    let mut stuck: Option<(Instant, u64)> = None;
    // The relayed bytes and report count a while ago: bytes relayed that long ago
    // with no report since were for topics no source reads (rumqttd reports only the
    // filters someone subscribed to), so they are no longer taken as in transit.
    let mut earlier = (Instant::now(), 0u64, 0u64);
    loop {
        tick.tick().await;
        let (relayed, reports) = (
            ledger.relayed.load(Ordering::Relaxed),
            ledger.reports.load(Ordering::Relaxed),
        );
        if earlier.0.elapsed() >= METERED_AFTER {
            if reports == earlier.2 {
                ledger
                    .relayed_at_report
                    .fetch_max(earlier.1, Ordering::Relaxed);
            }
            earlier = (Instant::now(), relayed, reports);
        }
        let received = ledger.received.load(Ordering::Relaxed);
        let lag = ledger.unread();
        lag_gauge.set(lag as f64);
        let state = *gate.0.borrow();
        if state.shut {
            return;
        }
        if lag > LAG_HIGH && !state.lagging {
            gate.0.send_modify(|s| s.lagging = true);
        } else if lag < LAG_LOW && state.lagging {
            gate.0.send_modify(|s| s.lagging = false);
        }
        stuck = match stuck {
            _ if lag == 0 || state.presses > 0 => None,
            Some((since, at)) if at == received => {
                if since.elapsed() >= LAG_WRITTEN_OFF_AFTER {
                    tracing::warn!(
                        bytes = lag,
                        "embedded broker: the sources cannot read this many bytes rumqttd counted for them; written off"
                    );
                    written_off.increment(lag);
                    ledger.forgiven.fetch_add(lag, Ordering::Relaxed);
                    None
                } else {
                    stuck
                }
            }
            _ => Some((Instant::now(), received)),
        };
    }
}

/// Metrics and logs of the gate: `sluice_broker_gate_closed` (0/1),
/// `sluice_broker_gate_holds_total`; a hold over a second is logged with its end.
async fn watch_holds(mut gate: watch::Receiver<DoorState>) {
    let closed = metrics::gauge!("sluice_broker_gate_closed");
    let holds = metrics::counter!("sluice_broker_gate_holds_total");
    // Closed until the sources are built and subscribed: a start, not a hold.
    closed.set(1.0);
    if gate
        .wait_for(|s| s.open() || s.shut)
        .await
        .map_or(true, |s| s.shut)
    {
        return;
    }
    closed.set(0.0);
    loop {
        if gate.wait_for(|s| !s.open()).await.is_err() {
            return;
        }
        if gate.borrow().shut {
            closed.set(1.0);
            return;
        }
        closed.set(1.0);
        holds.increment(1);
        let since = std::time::Instant::now();
        let reopened = tokio::time::timeout(HOLD_LOGGED_AFTER, gate.wait_for(DoorState::open))
            .await
            .map(|r| r.is_ok());
        match reopened {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                let reason = if gate.borrow().unsubscribed > 0 {
                    "a source is subscribing again"
                } else {
                    "Sluice is behind"
                };
                tracing::warn!(
                    reason,
                    "embedded broker holding device publishes; their QoS 1 acknowledgements wait"
                );
                let shut = gate
                    .wait_for(|s| s.open() || s.shut)
                    .await
                    .map_or(true, |s| s.shut);
                if shut {
                    return;
                }
                tracing::info!(held = ?since.elapsed(), "embedded broker reading devices again");
            }
        }
        closed.set(0.0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn refusals_of_ever_new_client_ids_are_remembered_up_to_a_bound() {
        let mut addresses = super::Addresses::default();
        for i in 0..(super::REFUSALS_REMEMBERED + 5_000) {
            let id = format!("{i}-{}", "x".repeat(60_000));
            addresses.log_once(&id, "bad_password", "wrong password");
        }
        assert_eq!(addresses.logged.len(), super::REFUSALS_REMEMBERED);
        assert!(
            addresses
                .logged
                .keys()
                .all(|(id, _)| id.len() <= super::LOGGED_ID_BYTES),
            "ids are kept to a prefix"
        );
        assert!(addresses.flooded.is_some(), "the flood is logged once");
    }

    use super::*;

    fn gate() -> (Gate, watch::Receiver<DoorState>) {
        let gate = Gate(Arc::new(watch::Sender::new(DoorState::default())));
        let rx = gate.0.subscribe();
        (gate, rx)
    }

    /// A CONNECT of `client_id`, user `u` and password `p` (MQTT 3.1.1).
    fn connect(client_id: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
        for field in [client_id, "u", "p"] {
            body.extend_from_slice(&(field.len() as u16).to_be_bytes());
            body.extend_from_slice(field.as_bytes());
        }
        let mut packet = vec![0x10];
        inspect::encode_remaining_length(body.len(), &mut packet);
        packet.extend_from_slice(&body);
        packet
    }

    #[tokio::test]
    async fn a_connect_that_waits_past_its_deadline_for_a_password_check_is_refused_as_busy() {
        let door = Door {
            internal: "127.0.0.1:9".parse().expect("address"),
            gate: gate().0,
            ledger: Arc::default(),
            payload: 1 << 16,
            per_address: 0,
            connect_timeout: Duration::from_millis(100),
            acl: None,
            addresses: Arc::default(),
            // Every check taken.
            password_checks: tokio::sync::Semaphore::new(0),
        };
        let auth = Authenticator {
            auth: DeviceAuth::Password,
            passwords: None,
            acl: None,
        };
        let (mut device, door_side) = tokio::io::duplex(1 << 10);
        device.write_all(&connect("d1")).await.expect("write");
        let (from, to) = tokio::io::split(door_side);
        let deadline = tokio::time::Instant::now() + door.connect_timeout;
        let served = serve(from, to, None, deadline, &door, &auth).await;
        assert!(matches!(served, Err(Served::Closed)));
        let mut connack = Vec::new();
        device.read_to_end(&mut connack).await.expect("read");
        assert_eq!(connack, [0x20, 2, 0, 3], "server unavailable");
        let logged = lock(&door.addresses)
            .logged
            .keys()
            .cloned()
            .collect::<Vec<_>>();
        assert_eq!(logged, [("d1".to_owned(), "busy")]);
    }

    #[test]
    fn the_door_is_open_only_once_sources_are_subscribed_while_none_presses_and_not_after_shutdown()
    {
        let (gate, rx) = gate();
        let broker = EmbeddedBroker {
            listen: "127.0.0.1:1".parse().ok(),
            tls_listen: None,
            internal: "127.0.0.1:2".parse().unwrap(),
            gate,
            ledger: Arc::default(),
            acl: None,
        };
        let topics = ["a/#".to_owned()];
        let (a, b) = (broker.presser(&topics), broker.presser(&topics));
        assert!(!rx.borrow().open(), "shut until the sources are built");
        broker.open_door();
        assert!(!rx.borrow().open(), "shut until the sources are subscribed");
        a.set_subscribed(true);
        assert!(!rx.borrow().open(), "b is not subscribed yet");
        b.set_subscribed(true);
        b.set_subscribed(true);
        assert!(rx.borrow().open());
        a.set_subscribed(false);
        assert!(!rx.borrow().open(), "a lost its connection");
        a.set_subscribed(true);
        assert!(rx.borrow().open(), "subscribing twice counts once");
        a.press();
        a.press();
        b.press();
        assert!(!rx.borrow().open());
        a.release();
        assert!(!rx.borrow().open(), "b still presses");
        b.release();
        b.release();
        assert!(rx.borrow().open(), "pressing twice counts once");
        a.press();
        a.set_subscribed(false);
        drop(a);
        assert!(rx.borrow().open(), "a dropped presser lets go");
        broker.close_door();
        assert!(!rx.borrow().open());
    }

    #[test]
    fn each_source_reading_a_filter_should_receive_all_of_its_log() {
        let ledger = Ledger::default();
        lock(&ledger.subscribers).extend([("a/#".to_owned(), 2), ("b".to_owned(), 1)]);
        lock(&ledger.appended).extend([
            ("a/#".to_owned(), 100),
            ("b".to_owned(), 10),
            ("other".to_owned(), 1_000),
        ]);
        assert_eq!(ledger.expected(), 210, "two readers of a/#, none of other");
    }

    #[test]
    fn ipv6_addresses_count_by_their_network() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("address");
        assert_eq!(counted_as(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(counted_as(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(counted_as(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            counted_as(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            counted_as(ip("2001:db8:1:2::9"))
        );
        assert_ne!(counted_as(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(counted_as(ip("::1")), ip("::"));
    }

    #[test]
    fn reports_of_filters_no_source_reads_are_not_kept() {
        let ledger = Ledger::default();
        lock(&ledger.subscribers).insert("a/#".to_owned(), 1);
        let meter = |filter: &str, total_size| {
            // rumqttd does not export the meter's type; its fields are public.
            let mut meter = rumqttd::Meter::Subscription(filter.to_owned(), Default::default());
            if let rumqttd::Meter::Subscription(_, m) = &mut meter {
                m.total_size = total_size;
            }
            meter
        };
        for n in 0..1_000 {
            ledger.add(vec![meter("a/#", 10), meter(&format!("device/{n}"), 10)]);
        }
        assert_eq!(lock(&ledger.appended).len(), 1, "only a/#");
        assert_eq!(ledger.expected(), 10_000);
    }

    #[test]
    fn relayed_bytes_are_unread_until_a_report_covers_them() {
        let ledger = Ledger::default();
        lock(&ledger.subscribers).insert("a/#".to_owned(), 1);
        ledger.relayed.store(1_000, Ordering::Relaxed);
        assert_eq!(ledger.unread(), 1_000, "relayed, not yet reported");
        assert_eq!(ledger.metered_unread(), 0);
        // The report: 990 bytes appended (the rest was framing).
        lock(&ledger.appended).insert("a/#".to_owned(), 990);
        ledger.relayed_at_report.fetch_max(1_000, Ordering::Relaxed);
        assert_eq!(ledger.unread(), 990);
        assert_eq!(ledger.metered_unread(), 990);
        ledger.received.store(990, Ordering::Relaxed);
        assert_eq!(ledger.unread(), 0, "read");
    }
}
