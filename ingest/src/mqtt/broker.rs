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

use sluice_config::BrokerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::mqtt::oversized::Trimmer;
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
    /// Where devices connect: the door, on `[broker] listen`.
    pub listen: SocketAddr,
    /// rumqttd itself, on loopback: for Sluice's own clients only.
    pub internal: SocketAddr,
    gate: Gate,
    ledger: Arc<Ledger>,
}

impl EmbeddedBroker {
    /// The handle of a source reading `filters`: it presses the gate and counts what
    /// it receives.
    pub fn presser(&self, filters: &[String]) -> Presser {
        let mut subscribers = lock(&self.ledger.subscribers);
        for f in filters {
            *subscribers.entry(f.clone()).or_default() += 1;
        }
        Presser {
            gate: self.gate.clone(),
            pressed: AtomicBool::new(false),
            ledger: self.ledger.clone(),
        }
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

/// Whether the door reads from devices: not while any source presses, nor while
/// rumqttd holds too much unread, nor after shutdown.
#[derive(Debug, Clone, Copy, Default)]
struct DoorState {
    /// Sources whose queue is full.
    presses: u32,
    /// rumqttd holds more than [`LAG_HIGH`] unread bytes.
    lagging: bool,
    shut: bool,
}

impl DoorState {
    fn open(&self) -> bool {
        self.presses == 0 && !self.lagging && !self.shut
    }
}

/// What rumqttd appended to the logs of the filters the embedded sources read, and
/// what those sources received, in rumqttd's measure (`4 + topic + payload` bytes).
#[derive(Debug, Default)]
struct Ledger {
    /// Bytes appended per filter since the broker started (summed meters).
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

/// One source's hold on the gate: pressing twice counts once. Released on drop.
#[derive(Debug)]
pub struct Presser {
    gate: Gate,
    pressed: AtomicBool,
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
    }
}

/// Starts rumqttd on its own thread on an internal loopback port, and the door on
/// `config.listen`.
///
/// The door's port is bound here first, so a taken port is a clear error before
/// anything starts (rumqttd only logs a bind failure from its own thread).
pub async fn start_embedded_broker(config: &BrokerConfig) -> Result<EmbeddedBroker> {
    let bind_error = |what, addr: String| move |error| Error::Bind { what, addr, error };
    let door = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(bind_error(
            "the embedded MQTT broker",
            config.listen.clone(),
        ))?;
    let listen = door.local_addr().map_err(bind_error(
        "the embedded MQTT broker",
        config.listen.clone(),
    ))?;
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
    let broker_config: rumqttd::Config = toml::from_str(&text).map_err(|e| Error::Config {
        source_name: "broker".into(),
        message: format!("embedded broker settings rejected: {e}"),
    })?;
    let mut broker = rumqttd::Broker::new(broker_config);
    let meters = broker.meters().map_err(|e| Error::Config {
        source_name: "broker".into(),
        message: format!("embedded broker meters: {e}"),
    })?;
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
    let limits = DoorLimits {
        payload: config.max_payload_size.as_usize(),
        per_address: config.max_connections_per_address,
        connect_timeout: config.connect_timeout.0,
    };
    tokio::spawn(open_door(
        door,
        internal,
        gate.clone(),
        ledger.clone(),
        limits,
    ));
    tokio::spawn(watch_holds(gate.0.subscribe()));
    tokio::spawn(count_appends(meters, ledger.clone()));
    tokio::spawn(watch_lag(ledger.clone(), gate.clone()));
    tracing::info!(%listen, %internal, "embedded MQTT broker listening");
    Ok(EmbeddedBroker {
        listen,
        internal,
        gate,
        ledger,
    })
}

/// What the door lets a connection do.
#[derive(Debug, Clone, Copy)]
struct DoorLimits {
    /// `max_payload_size`: longer PUBLISH packets are trimmed.
    payload: usize,
    /// Connections from one IP address at once (0: any number).
    per_address: usize,
    /// How long a connection may take to send its CONNECT.
    connect_timeout: Duration,
}

/// Connections open per IP address, and when each address's refusals were last
/// logged (once a minute per address and reason, not per attempt).
#[derive(Debug, Default)]
struct Addresses {
    open: HashMap<std::net::IpAddr, usize>,
    logged: HashMap<(std::net::IpAddr, &'static str), Instant>,
}

/// How often a refusal of one address, for one reason, is logged.
const REFUSAL_LOGGED_EVERY: Duration = Duration::from_secs(60);

impl Addresses {
    /// Counts and logs (at most once a minute per address and reason) a connection
    /// the door closed.
    fn refused(&mut self, ip: std::net::IpAddr, reason: &'static str, detail: &str) {
        metrics::counter!("sluice_broker_refused_total", "reason" => reason).increment(1);
        let now = Instant::now();
        let last = self
            .logged
            .entry((ip, reason))
            .or_insert(now - REFUSAL_LOGGED_EVERY);
        if now.duration_since(*last) >= REFUSAL_LOGGED_EVERY {
            *last = now;
            tracing::warn!(address = %ip, reason, "embedded broker closed a connection: {detail} (logged once a minute per address)");
        }
        // Forget addresses not heard of for a while, so the map stays small.
        if self.logged.len() > 10_000 {
            self.logged
                .retain(|_, at| now.duration_since(*at) < REFUSAL_LOGGED_EVERY);
        }
    }
}

/// One open connection of an address; counted down when dropped.
struct Admitted {
    ip: std::net::IpAddr,
    addresses: Arc<Mutex<Addresses>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut addresses = lock(&self.addresses);
        if let Some(n) = addresses.open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                addresses.open.remove(&self.ip);
            }
        }
    }
}

/// Accepts devices and relays each to rumqttd, at most `per_address` at once from one
/// IP address.
async fn open_door(
    door: tokio::net::TcpListener,
    internal: SocketAddr,
    gate: Gate,
    ledger: Arc<Ledger>,
    limits: DoorLimits,
) {
    let addresses = Arc::new(Mutex::new(Addresses::default()));
    // Failing since: logged once, and once when accepting works again.
    let mut failing = false;
    loop {
        match door.accept().await {
            Ok((device, peer)) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("embedded broker accepting connections again");
                }
                let ip = peer.ip();
                {
                    let mut book = lock(&addresses);
                    let open = book.open.entry(ip).or_default();
                    if limits.per_address > 0 && *open >= limits.per_address {
                        let detail = format!(
                            "{} connections from it are open ([broker] max_connections_per_address)",
                            limits.per_address
                        );
                        book.refused(ip, "per_address", &detail);
                        continue;
                    }
                    *open += 1;
                }
                let admitted = Admitted {
                    ip,
                    addresses: addresses.clone(),
                };
                let gate = gate.0.subscribe();
                tokio::spawn(relay(
                    device,
                    internal,
                    gate,
                    ledger.clone(),
                    limits,
                    admitted,
                ));
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

/// Copies bytes both ways between a device and rumqttd; device → broker only while
/// the gate is open, counted in the ledger, with PUBLISH packets over the payload limit
/// trimmed (see [`Trimmer`]). Ends (closing both) when either side closes, or when the
/// device has not sent its whole CONNECT within the connect timeout.
async fn relay(
    device: TcpStream,
    internal: SocketAddr,
    mut gate: watch::Receiver<DoorState>,
    ledger: Arc<Ledger>,
    limits: DoorLimits,
    admitted: Admitted,
) {
    let Ok(broker) = TcpStream::connect(internal).await else {
        return;
    };
    let _ = device.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut from_device, mut to_device) = device.into_split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut trimmer = Trimmer::new(limits.payload);
        let mut out = Vec::with_capacity(buf.len());
        let connect_by = tokio::time::Instant::now() + limits.connect_timeout;
        loop {
            if gate.wait_for(DoorState::open).await.is_err() {
                return;
            }
            let read = if trimmer.packets() == 0 {
                match tokio::time::timeout_at(connect_by, from_device.read(&mut buf)).await {
                    Ok(read) => read,
                    Err(_) => {
                        let detail = format!(
                            "no CONNECT within {:?} ([broker] connect_timeout)",
                            limits.connect_timeout
                        );
                        lock(&admitted.addresses).refused(admitted.ip, "connect_timeout", &detail);
                        return;
                    }
                }
            } else {
                from_device.read(&mut buf).await
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    out.clear();
                    let before = trimmer.trimmed();
                    trimmer.feed(&buf[..n], &mut out);
                    if trimmer.trimmed() > before {
                        metrics::counter!("sluice_broker_oversized_total")
                            .increment(trimmer.trimmed() - before);
                    }
                    if to_broker.write_all(&out).await.is_err() {
                        return;
                    }
                    ledger
                        .relayed
                        .fetch_add(out.len() as u64, Ordering::Relaxed);
                }
            }
        }
    };
    let down = tokio::io::copy(&mut from_broker, &mut to_device);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Sums rumqttd's meters (per filter, what was appended since the last report).
async fn count_appends(meters: rumqttd::meters::MetersLink, ledger: Arc<Ledger>) {
    while let Ok(report) = meters.next().await {
        let relayed = ledger.relayed.load(Ordering::Relaxed);
        let mut appended = lock(&ledger.appended);
        for meter in report {
            if let rumqttd::Meter::Subscription(filter, m) = meter {
                *appended.entry(filter).or_default() += m.total_size as u64;
            }
        }
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
                tracing::warn!(
                    "embedded broker holding device publishes: Sluice is behind, so their QoS 1 acknowledgements wait"
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
    use super::*;

    fn gate() -> (Gate, watch::Receiver<DoorState>) {
        let gate = Gate(Arc::new(watch::Sender::new(DoorState::default())));
        let rx = gate.0.subscribe();
        (gate, rx)
    }

    #[test]
    fn the_door_is_open_only_while_no_source_presses_and_not_after_shutdown() {
        let (gate, rx) = gate();
        let broker = EmbeddedBroker {
            listen: "127.0.0.1:1".parse().unwrap(),
            internal: "127.0.0.1:2".parse().unwrap(),
            gate,
            ledger: Arc::default(),
        };
        let topics = ["a/#".to_owned()];
        let (a, b) = (broker.presser(&topics), broker.presser(&topics));
        assert!(rx.borrow().open());
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
