//! MQTT 5 devices at the embedded broker's door.
//!
//! rumqttd speaks MQTT 3.1.1 (its MQTT 5 server is incomplete:
//! bytebeamio/rumqtt#1016), so the door translates a v5 device's connection: its
//! packets go on to rumqttd as 3.1.1 ones ([`Up`], before the [`Inspector`] that holds
//! them to the ACL and the size limit), and rumqttd's answers come back as v5 ones
//! ([`Down`]). The CONNECT is read by the door's own reader ([`downgrade_connect`]);
//! rumqttc's codecs for both versions read and write the other control packets; a
//! PUBLISH, which may be far larger than anything worth holding, is rewritten as it
//! streams: only its variable header changes.
//!
//! What 3.1.1 cannot carry is dropped on the way in: a publish's properties (user
//! properties, message expiry, content type, response topic), subscription options
//! other than the QoS (no local, retain handling), the reason codes of
//! acknowledgements, and a will sent by `DISCONNECT` with reason 0x04. The CONNACK
//! tells the device what it must keep to: the maximum packet size (the door's limit),
//! no retained messages (the door clears the flag), no topic aliases, and the session
//! expiry in force ([`Terms`]). A QoS 1 publish and a subscription the ACL denied
//! are answered with reason 0x87, not authorized. A publish larger than the device's
//! own Maximum Packet Size is not sent, and rumqttd gets its acknowledgement from the
//! door; no more publishes than the device's Receive Maximum are in flight to it
//! ([`Flow`]). Enhanced authentication is refused; a packet with no 3.1.1 form
//! ends the connection with a DISCONNECT giving the reason.
//!
//! [`Inspector`]: crate::mqtt::inspect::Inspector

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rumqttc::mqttbytes::{self as mqtt4, v4};
use rumqttc::v5::mqttbytes::{self as mqtt5, v5};

use crate::mqtt::auth::{Reader, Refusal};
use crate::mqtt::inspect::{Closed, Denials, FixedHeader, encode_remaining_length, header_byte};

/// UNSUBSCRIBE packet id → how many filters it named: a v5 UNSUBACK has a reason code
/// for each, a 3.1.1 one none. Written by [`Up`], read by [`Down`].
type Unsubscribes = Arc<Mutex<HashMap<u16, usize>>>;

/// The acknowledgements between a v5 device and rumqttd, for a device that gave a
/// Maximum Packet Size or a Receive Maximum (nothing is tracked for others).
///
/// - **Owed.** The door does not send a device a publish larger than its Maximum
///   Packet Size, nor the PUBREL of such a QoS 2 one. MQTT 5 (3.1.2.11.4) has the
///   server discard such a packet "and then behave as if it had completed sending"
///   it; rumqttd would wait for the device's acknowledgement instead, and with its
///   in-flight window full send the device nothing more. So the door owes rumqttd
///   those acknowledgements: noted by [`Down`], sent by [`Up`] at the device stream's
///   packet boundaries, in the order rumqttd waits for them ([`Awaited`]).
/// - **In flight.** The QoS 1 and 2 publishes the device was sent and has not
///   finished acknowledging (PUBACK, or PUBCOMP): at its Receive Maximum, [`Down`]
///   holds the next one until the device acknowledges one (rumqttd keeps up to 100 in
///   flight whatever the device said, and a strict client disconnects past its own
///   maximum).
#[derive(Debug, Default)]
pub struct Flow {
    /// Whether anything is tracked.
    active: AtomicBool,
    tracked: Mutex<Tracked>,
    /// Acknowledgements owed since the last wait.
    owed: tokio::sync::Notify,
    /// The device finished acknowledging a publish since the last wait.
    acked: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Tracked {
    /// What rumqttd awaits: publishes (a PUBACK or PUBREC each), and PUBRELs (a
    /// PUBCOMP each).
    publishes: Awaited,
    pubrels: Awaited,
    /// QoS 1 and 2 publishes the device was sent and has not finished acknowledging.
    /// By packet id, with its QoS: what finishes it is a PUBACK (1) or PUBCOMP (2).
    in_flight: HashMap<u16, u8>,
}

impl Flow {
    /// Returns once acknowledgements are owed (at once if some were since the last
    /// call): the relay then feeds [`Up`] nothing, and it sends those due.
    pub async fn owed(&self) {
        self.owed.notified().await;
    }

    /// Returns once the device finished acknowledging a publish (at once if it did
    /// since the last call): the relay then feeds [`Down`] what it held back.
    pub async fn acked(&self) {
        self.acked.notified().await;
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> usize {
        lock(&self.tracked).in_flight.len()
    }

    /// Down: `id`, of a PUBLISH (`pubrel` false) or a PUBREL, went on to the device,
    /// or (`owed` = the packet type to answer with) did not.
    fn passed(&self, pubrel: bool, id: u16, owed: Option<u8>) {
        let mut tracked = lock(&self.tracked);
        if pubrel {
            tracked.pubrels.0.push_back((id, owed));
        } else {
            tracked.publishes.0.push_back((id, owed));
        }
        if owed.is_some() {
            drop(tracked);
            self.owed.notify_one();
        }
    }

    /// Down: a QoS 1 or 2 publish went to the device.
    fn sent(&self, id: u16, qos: u8) {
        lock(&self.tracked).in_flight.insert(id, qos);
    }

    /// Up: appends to `out` the acknowledgements now due, after the device's own
    /// (`acked`: its packet type and id) if it just sent one.
    fn due(&self, acked: Option<(u8, u16)>, out: &mut Vec<u8>) {
        let mut tracked = lock(&self.tracked);
        let mut finished = false;
        if let Some((kind, id)) = acked {
            let matched = match kind {
                PUBCOMP => tracked.pubrels.acked(id),
                _ => tracked.publishes.acked(id),
            };
            // A QoS 1 publish ends with its PUBACK, a QoS 2 one with its PUBCOMP (a
            // PUBREL rumqttd sent again from a resumed session was not counted).
            let ends = match kind {
                PUBACK => 1,
                PUBCOMP => 2,
                _ => 0,
            };
            if matched && tracked.in_flight.get(&id) == Some(&ends) {
                tracked.in_flight.remove(&id);
                finished = true;
            }
        }
        tracked.publishes.due(out);
        tracked.pubrels.due(out);
        drop(tracked);
        if finished {
            self.acked.notify_one();
        }
    }
}

/// rumqttd takes acknowledgements only in the order it sent what they acknowledge (its
/// in-flight list and its PUBRELs awaiting PUBCOMP are queues; another order
/// disconnects the device), so one the door owes waits its turn: packet ids in
/// rumqttd's order, each with the packet type the door owes for it, or `None` for one
/// the device got and acknowledges itself. At most rumqttd's in-flight window long.
#[derive(Debug, Default)]
struct Awaited(VecDeque<(u16, Option<u8>)>);

impl Awaited {
    /// The device acknowledged `id`; whether it was awaited from the device.
    fn acked(&mut self, id: u16) -> bool {
        let found = self
            .0
            .iter()
            .position(|&(x, owed)| x == id && owed.is_none());
        if let Some(i) = found {
            self.0.remove(i);
        }
        found.is_some()
    }

    /// Appends the owed acknowledgements at the front to `out`.
    fn due(&mut self, out: &mut Vec<u8>) {
        while let Some(&(id, Some(kind))) = self.0.front() {
            let [hi, lo] = id.to_be_bytes();
            out.extend_from_slice(&[kind << 4, 2, hi, lo]);
            self.0.pop_front();
        }
    }
}

/// What a connection may hold of publishes waiting for a v5 device's acknowledgements
/// (its Receive Maximum), unless two packets of the largest size are more.
const HELD_BYTES: usize = 1 << 20;

/// Packet types.
const PUBLISH: u8 = 3;
const CONNACK: u8 = 2;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBACK: u8 = 9;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// Whether a CONNECT's body (after the fixed header) asks for MQTT 5.
pub fn is_v5(connect_body: &[u8]) -> bool {
    connect_body.get(..7) == Some(&[0, 4, b'M', b'Q', b'T', b'T', 5][..])
}

/// What the door keeps of a v5 device's CONNECT for the broker → device half: what
/// its CONNACK tells the device beyond rumqttd's answer, and the device's own limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terms {
    /// The client id the door assigned (the device sent none).
    pub assigned: Option<String>,
    /// The session expiry interval in force, where it is not the one asked for: a
    /// 3.1.1 session ends with its connection (clean) or never.
    pub session_expiry: Option<u32>,
    /// The largest packet the device takes (its Maximum Packet Size), if it said.
    pub device_max_packet: Option<u32>,
    /// How many QoS 1 and 2 publishes the device takes unacknowledged (its Receive
    /// Maximum), if it said.
    pub device_receive_max: Option<u16>,
}

/// A v5 CONNECT as rumqttd takes it.
#[derive(Debug)]
pub struct Downgraded {
    /// The 3.1.1 CONNECT: fixed header, body.
    pub packet: (Vec<u8>, Vec<u8>),
    /// For the broker → device half.
    pub terms: Terms,
}

/// A v5 CONNECT's body (after the fixed header) as the 3.1.1 CONNECT rumqttd takes,
/// or why it is refused. Read with the door's own reader rather than rumqttc's codec,
/// which takes a password for text (MQTT's is binary) and an empty one for none.
/// `name`: the device's certificate common name, if any, for a device that sends no
/// client id (its user name comes first; else a random one).
pub fn downgrade_connect(body: &[u8], name: Option<&str>) -> Result<Downgraded, (Refusal, String)> {
    let malformed = |what: &str| {
        (
            Refusal::Protocol,
            format!("malformed MQTT 5 CONNECT: {what}"),
        )
    };
    let mut r = Reader(body);
    if r.binary() != Some(&b"MQTT"[..]) || r.byte() != Some(5) {
        return Err(malformed("not MQTT 5"));
    }
    let flags = r.byte().ok_or_else(|| malformed("no flags"))?;
    let keep_alive = r.take(2).ok_or_else(|| malformed("no keep alive"))?;
    let properties = r
        .varint()
        .and_then(|n| r.take(n))
        .ok_or_else(|| malformed("properties"))?;
    let (expiry, auth_method, (device_max_packet, device_receive_max)) =
        connect_properties(properties).ok_or_else(|| malformed("properties"))?;
    if auth_method {
        let detail = "MQTT 5 enhanced authentication (an authentication method) is not supported";
        return Err((Refusal::AuthMethod, detail.into()));
    }
    let client_id = r.string().ok_or_else(|| malformed("client id"))?;
    let will = if flags & 0x04 != 0 {
        r.varint()
            .and_then(|n| r.take(n))
            .ok_or_else(|| malformed("will properties"))?;
        let topic = r.binary().ok_or_else(|| malformed("will topic"))?;
        let payload = r.binary().ok_or_else(|| malformed("will payload"))?;
        Some((topic, payload))
    } else {
        None
    };
    let user = match flags & 0x80 {
        0 => None,
        _ => Some(r.binary().ok_or_else(|| malformed("user name"))?),
    };
    let password = match flags & 0x40 {
        0 => None,
        _ => Some(r.binary().ok_or_else(|| malformed("password"))?),
    };
    if password.is_some() && user.is_none() {
        let detail = "a password without a user name (MQTT 3.1.1 cannot carry one)";
        return Err((Refusal::BadCredentials, detail.into()));
    }
    let assigned = client_id.is_empty().then(|| {
        let user = user.and_then(|u| std::str::from_utf8(u).ok());
        match user.or(name).filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => {
                // A random id without a dependency: std's hasher keys are random per
                // process and per `RandomState`.
                let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
                hasher.write_u64(0);
                format!("sluice-{:016x}", hasher.finish())
            }
        }
    });
    // 3.1.1 keeps the flags' meaning: its clean session is v5's clean start (the
    // CONNACK says how long the session then lasts). The will's retain flag is
    // cleared: rumqttd would keep a retained will for ever, and the CONNACK says no
    // retain.
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, flags & !0x20]);
    out.extend_from_slice(keep_alive);
    let id = assigned.as_deref().unwrap_or(client_id);
    let fields = std::iter::once(id.as_bytes())
        .chain(will.into_iter().flat_map(|(t, p)| [t, p]))
        .chain(user)
        .chain(password);
    for field in fields {
        out.extend_from_slice(&(field.len() as u16).to_be_bytes());
        out.extend_from_slice(field);
    }
    let mut header = vec![0x10];
    encode_remaining_length(out.len(), &mut header);
    let lasts = if flags & 0x02 != 0 { 0 } else { u32::MAX };
    Ok(Downgraded {
        packet: (header, out),
        terms: Terms {
            assigned,
            session_expiry: (lasts != expiry).then_some(lasts),
            device_max_packet,
            device_receive_max,
        },
    })
}

/// A CONNECT's properties: its session expiry interval (0 if absent), whether it
/// names an authentication method, and its maximum packet size and receive maximum.
/// `None` if malformed (either of those 0 is).
type ConnectProperties = (u32, bool, (Option<u32>, Option<u16>));

fn connect_properties(bytes: &[u8]) -> Option<ConnectProperties> {
    let mut r = Reader(bytes);
    let (mut expiry, mut auth_method, mut max_packet, mut receive_max) = (0, false, None, None);
    while !r.0.is_empty() {
        let id = r.byte()?;
        match id {
            0x11 => {
                let v = r.take(4)?;
                expiry = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            }
            0x15 => {
                r.string()?;
                auth_method = true;
            }
            0x21 => {
                let v = r.take(2)?;
                receive_max = Some(u16::from_be_bytes([v[0], v[1]])).filter(|&n| n > 0);
                receive_max?;
            }
            // Topic alias maximum.
            0x22 => drop(r.take(2)?),
            0x27 => {
                let v = r.take(4)?;
                max_packet = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])).filter(|&n| n > 0);
                max_packet?;
            }
            // Request response / problem information.
            0x17 | 0x19 => drop(r.byte()?),
            // Authentication data.
            0x16 => drop(r.binary()?),
            // A user property: two strings.
            0x26 => {
                r.string()?;
                r.string()?;
            }
            _ => return None,
        }
    }
    Some((expiry, auth_method, (max_packet, receive_max)))
}

/// The CONNACK refusing a v5 device with reason code `code`.
pub fn refusal_connack(code: u8) -> [u8; 5] {
    [0x20, 0x03, 0x00, code, 0x00]
}

/// The size of a whole packet whose remaining length is `remaining`.
fn packet_size(remaining: usize) -> usize {
    let length_bytes = match remaining {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

fn qos(q: mqtt5::QoS) -> mqtt4::QoS {
    match q {
        mqtt5::QoS::AtMostOnce => mqtt4::QoS::AtMostOnce,
        mqtt5::QoS::AtLeastOnce => mqtt4::QoS::AtLeastOnce,
        mqtt5::QoS::ExactlyOnce => mqtt4::QoS::ExactlyOnce,
    }
}

fn qos5(q: mqtt4::QoS) -> mqtt5::QoS {
    match q {
        mqtt4::QoS::AtMostOnce => mqtt5::QoS::AtMostOnce,
        mqtt4::QoS::AtLeastOnce => mqtt5::QoS::AtLeastOnce,
        mqtt4::QoS::ExactlyOnce => mqtt5::QoS::ExactlyOnce,
    }
}

/// Where a translator is in its byte stream.
#[derive(Debug)]
enum State {
    /// Reading a fixed header.
    Header(Vec<u8>),
    /// A PUBLISH: reading its variable header (`head`), up to where it changes; `need`:
    /// how long `head` must be before it is worth reading again.
    Publish {
        first: u8,
        remaining: usize,
        head: Vec<u8>,
        need: usize,
    },
    /// Another packet, read whole (`left`: bytes still to come).
    Whole { packet: Vec<u8>, left: usize },
    /// A publish read whole to be sent later, its head already translated.
    Held {
        packet: Vec<u8>,
        left: usize,
        id: u16,
        qos: u8,
    },
    /// Passing on the rest of a packet.
    Pass(usize),
    /// Dropping the rest of a packet.
    Skip(usize),
}

impl State {
    fn header() -> Self {
        Self::Header(Vec::with_capacity(5))
    }

    /// A PUBLISH of `remaining` bytes after its fixed header `first`, its head unread.
    fn publish(first: u8, remaining: usize) -> Self {
        Self::Publish {
            first,
            remaining,
            head: Vec::new(),
            need: 2,
        }
    }

    /// A PUBLISH's head is next worth reading at `n` bytes.
    fn need(&mut self, n: usize) {
        if let Self::Publish { need, .. } = self {
            *need = n;
        }
    }

    /// Takes of `input` what this state reads (a PUBLISH's head up to what it needs,
    /// the rest of a whole packet, bytes passed on to `out`; a passed packet's end is
    /// the next header). A fixed header is the translator's own to read.
    fn take(&mut self, input: &mut &[u8], out: &mut Vec<u8>) {
        match self {
            Self::Header(_) => {}
            Self::Publish { head, need, .. } => {
                let n = need.saturating_sub(head.len()).clamp(1, input.len());
                head.extend_from_slice(&input[..n]);
                *input = &input[n..];
            }
            Self::Whole { packet, left } | Self::Held { packet, left, .. } => {
                let n = (*left).min(input.len());
                packet.extend_from_slice(&input[..n]);
                *input = &input[n..];
                *left -= n;
            }
            Self::Pass(left) | Self::Skip(left) => {
                let n = (*left).min(input.len());
                *left -= n;
                let done = *left == 0;
                if matches!(self, Self::Pass(_)) {
                    out.extend_from_slice(&input[..n]);
                }
                *input = &input[n..];
                if done {
                    *self = Self::header();
                }
            }
        }
    }
}

/// How much of a PUBLISH's variable header has been read.
enum Head {
    /// `n` bytes of it are needed in all.
    Need(usize),
    /// The topic and packet id are `head[..kept]`; a v5 one's properties end at `end`.
    Done { kept: usize, end: usize },
    /// Its properties' length is not a variable byte integer.
    Malformed,
}

/// Where a PUBLISH's variable header ends, given its first `head` bytes; `v5`: with
/// properties after the packet id.
fn publish_head(head: &[u8], first: u8, v5: bool) -> Head {
    let Some(len) = head.get(..2) else {
        return Head::Need(2);
    };
    let id = if (first >> 1) & 3 > 0 { 2 } else { 0 };
    let kept = 2 + usize::from(u16::from_be_bytes([len[0], len[1]])) + id;
    if !v5 {
        return if head.len() < kept {
            Head::Need(kept)
        } else {
            Head::Done { kept, end: kept }
        };
    }
    let mut properties = 0usize;
    for i in 0..4 {
        let Some(&b) = head.get(kept + i) else {
            return Head::Need(kept + i + 1);
        };
        properties |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let end = kept + i + 1 + properties;
            return if head.len() < end {
                Head::Need(end)
            } else {
                Head::Done { kept, end }
            };
        }
    }
    Head::Malformed
}

/// MQTT 5 DISCONNECT reason codes the door closes with.
const MALFORMED: u8 = 0x81;
const PROTOCOL_ERROR: u8 = 0x82;
const TOO_LARGE: u8 = 0x95;
const TOPIC_ALIAS_INVALID: u8 = 0x94;

fn untranslatable(code: u8, what: impl Into<String>) -> Closed {
    Closed::Untranslatable {
        code,
        what: what.into(),
    }
}

/// The device → broker stream of a v5 connection, after its CONNECT: what goes on to
/// rumqttd as MQTT 3.1.1.
#[derive(Debug)]
pub struct Up {
    limit: usize,
    state: State,
    unsubscribes: Unsubscribes,
    flow: Arc<Flow>,
}

impl Up {
    /// Packets other than PUBLISH may be at most `limit` bytes (rumqttd's
    /// `max_payload_size`, which the door's CONNACK gives as the maximum packet size).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            state: State::header(),
            unsubscribes: Unsubscribes::default(),
            flow: Arc::default(),
        }
    }

    /// The acknowledgements of this connection, for the relay to wait on: see
    /// [`Flow::owed`].
    pub fn flow(&self) -> Arc<Flow> {
        self.flow.clone()
    }

    /// The [`Down`] of the same connection, which says in the CONNACK what the
    /// `terms` grant, keeps to the device's maximum packet size, and answers the QoS 1
    /// publishes in `denials` (the inspector's: see [`Inspector::denials`]) with 0x87,
    /// not authorized.
    ///
    /// [`Inspector::denials`]: crate::mqtt::inspect::Inspector::denials
    pub fn down(&self, terms: Terms, denials: Option<Denials>) -> Down {
        if terms.device_max_packet.is_some() || terms.device_receive_max.is_some() {
            self.flow.active.store(true, Ordering::Relaxed);
        }
        Down {
            limit: self.limit,
            terms,
            state: State::header(),
            unsubscribes: self.unsubscribes.clone(),
            denials,
            flow: self.flow.clone(),
            skipped_qos2: HashSet::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            discarded: 0,
        }
    }

    /// Appends to `out` the 3.1.1 form of what of `input` makes whole packets; an
    /// error when the connection must end.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Closed> {
        while !input.is_empty() {
            match &mut self.state {
                State::Header(header) => {
                    let remaining = match header_byte(header, &mut input) {
                        FixedHeader::Whole { remaining, .. } => remaining,
                        FixedHeader::More => continue,
                        FixedHeader::Malformed => {
                            return Err(untranslatable(MALFORMED, "malformed remaining length"));
                        }
                    };
                    let first = header[0];
                    self.state = match first >> 4 {
                        PUBLISH => State::publish(first, remaining),
                        _ if remaining > self.limit => {
                            return Err(untranslatable(
                                TOO_LARGE,
                                format!(
                                    "a packet of {remaining} bytes, over the maximum packet size"
                                ),
                            ));
                        }
                        _ => State::Whole {
                            packet: std::mem::take(header),
                            left: remaining,
                        },
                    };
                    self.finish(out)?;
                }
                state => {
                    state.take(&mut input, out);
                    self.finish(out)?;
                }
            }
            self.owed_due(out);
        }
        self.owed_due(out);
        Ok(())
    }

    /// Between two of the device's packets: what the door owes rumqttd and is due.
    fn owed_due(&self, out: &mut Vec<u8>) {
        if self.flow.active() && matches!(&self.state, State::Header(h) if h.is_empty()) {
            self.flow.due(None, out);
        }
    }

    /// Moves on once the current state has what it needs.
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Closed> {
        match &self.state {
            State::Publish {
                first,
                remaining,
                head,
                ..
            } => {
                let (first, remaining) = (*first, *remaining);
                let (kept, end) = match publish_head(head, first, true) {
                    Head::Need(n) if n <= remaining && n <= self.limit => {
                        self.state.need(n);
                        return Ok(());
                    }
                    Head::Done { kept, end } if end <= remaining => (kept, end),
                    Head::Need(_) => {
                        let what =
                            "PUBLISH whose header runs past the packet or the maximum packet size";
                        return Err(untranslatable(MALFORMED, what));
                    }
                    _ => return Err(untranslatable(MALFORMED, "malformed PUBLISH")),
                };
                if kept == 2 + if (first >> 1) & 3 > 0 { 2 } else { 0 } {
                    // An empty topic names a topic alias, which the CONNACK allowed
                    // none of.
                    return Err(untranslatable(
                        TOPIC_ALIAS_INVALID,
                        "PUBLISH with a topic alias",
                    ));
                }
                out.push(first);
                encode_remaining_length(remaining - (end - kept), out);
                out.extend_from_slice(&head[..kept]);
                self.state = match remaining - end {
                    0 => State::header(),
                    left => State::Pass(left),
                };
            }
            State::Whole { left: 0, .. } => {
                if let State::Whole { packet, .. } =
                    std::mem::replace(&mut self.state, State::header())
                {
                    self.translate(&packet, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// One whole packet other than PUBLISH, in its 3.1.1 form.
    fn translate(&mut self, packet: &[u8], out: &mut Vec<u8>) -> Result<(), Closed> {
        match packet[0] >> 4 {
            // Written here: the codec wants a payload for DISCONNECT (v5 allows none),
            // and both have nothing to translate.
            PINGREQ | DISCONNECT => {
                out.extend_from_slice(&[packet[0] & 0xF0, 0]);
                return Ok(());
            }
            AUTH => {
                let what = "AUTH packet (enhanced authentication)";
                return Err(untranslatable(PROTOCOL_ERROR, what));
            }
            _ => {}
        }
        let mut stream = BytesMut::from(packet);
        let read = v5::Packet::read(&mut stream, None)
            .map_err(|e| untranslatable(MALFORMED, format!("malformed MQTT 5 packet: {e:?}")))?;
        let mut buf = BytesMut::new();
        let acked = match &read {
            v5::Packet::PubAck(a) => Some((PUBACK, a.pkid)),
            v5::Packet::PubRec(a) => Some((PUBREC, a.pkid)),
            v5::Packet::PubComp(a) => Some((PUBCOMP, a.pkid)),
            _ => None,
        };
        let written = match read {
            v5::Packet::PubAck(a) => v4::PubAck { pkid: a.pkid }.write(&mut buf),
            v5::Packet::PubRec(a) => v4::PubRec { pkid: a.pkid }.write(&mut buf),
            v5::Packet::PubRel(a) => v4::PubRel { pkid: a.pkid }.write(&mut buf),
            v5::Packet::PubComp(a) => v4::PubComp { pkid: a.pkid }.write(&mut buf),
            v5::Packet::Subscribe(s) => v4::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| v4::SubscribeFilter {
                        path: f.path,
                        qos: qos(f.qos),
                    })
                    .collect(),
            }
            .write(&mut buf),
            v5::Packet::Unsubscribe(u) => {
                lock(&self.unsubscribes).insert(u.pkid, u.filters.len());
                v4::Unsubscribe {
                    pkid: u.pkid,
                    topics: u.filters,
                }
                .write(&mut buf)
            }
            // A second CONNECT, or a packet only a server sends.
            _ => {
                let what = format!("packet of type {} from a client", packet[0] >> 4);
                return Err(untranslatable(PROTOCOL_ERROR, what));
            }
        };
        written.map_err(|e| {
            untranslatable(
                PROTOCOL_ERROR,
                format!("cannot write the 3.1.1 packet: {e:?}"),
            )
        })?;
        out.extend_from_slice(&buf);
        if self.flow.active() && acked.is_some() {
            self.flow.due(acked, out);
        }
        Ok(())
    }
}

/// The broker → device stream of a v5 connection: rumqttd's 3.1.1 packets as v5 ones.
#[derive(Debug)]
pub struct Down {
    limit: usize,
    terms: Terms,
    state: State,
    unsubscribes: Unsubscribes,
    denials: Option<Denials>,
    flow: Arc<Flow>,
    /// QoS 2 publishes not sent, whose PUBREL is not sent either.
    skipped_qos2: HashSet<u16>,
    /// QoS 1 and 2 publishes (id, QoS, packet), whole and translated, waiting for the
    /// device to have fewer than its Receive Maximum in flight (at most rumqttd's
    /// in-flight window), and their bytes: see [`overloaded`](Self::overloaded).
    held: VecDeque<(u16, u8, Vec<u8>)>,
    held_bytes: usize,
    discarded: u64,
}

impl Down {
    /// Publishes dropped so far for being larger than the device takes.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Whether the publishes held for the device's acknowledgements take more than
    /// [`HELD_BYTES`] (or two packets of the largest size): the connection then ends
    /// (DISCONNECT 0x97, quota exceeded). rumqttd keeps them in its session for the
    /// next connection; the door does not hold them for a device that does not
    /// acknowledge.
    pub fn overloaded(&self) -> bool {
        self.held_bytes > self.held_budget()
    }

    /// The bytes of held publishes past which the connection ends.
    pub fn held_budget(&self) -> usize {
        HELD_BYTES.max(2 * self.limit)
    }

    /// Whether publishes wait for the device's acknowledgements: the relay then feeds
    /// nothing when [`acked`](Self::acked) returns, and what fits is released.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Returns once the device finished acknowledging a publish: see [`Flow::acked`].
    pub async fn acked(&self) {
        self.flow.acked().await;
    }

    /// Appends to `out` the held publishes the device now has room for, unless `out`
    /// ends inside a packet (they then go at the next packet boundary).
    pub fn release(&mut self, out: &mut Vec<u8>) {
        if matches!(&self.state, State::Pass(_)) {
            return;
        }
        while !self.held.is_empty() && !self.at_receive_max() {
            if let Some((id, qos, packet)) = self.held.pop_front() {
                self.held_bytes -= packet.len();
                self.flow.sent(id, qos);
                out.extend_from_slice(&packet);
            }
        }
    }

    /// Whether the device has its Receive Maximum of publishes in flight.
    fn at_receive_max(&self) -> bool {
        self.terms
            .device_receive_max
            .is_some_and(|max| self.flow.in_flight() >= usize::from(max))
    }

    /// Appends to `out` the v5 form of what of `input` goes on to the device. A QoS 1
    /// or 2 publish waits while the device has its Receive Maximum in flight (see
    /// [`holds`](Self::holds)); everything else goes on (MQTT orders publishes per
    /// topic and QoS only).
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if matches!(&self.state, State::Header(h) if h.is_empty()) {
                self.release(out);
            }
            match &mut self.state {
                State::Header(header) => {
                    let remaining = match header_byte(header, &mut input) {
                        FixedHeader::Whole { remaining, .. } => remaining,
                        FixedHeader::More => continue,
                        // Malformed (rumqttd sends none): passed on from here.
                        FixedHeader::Malformed => {
                            out.extend_from_slice(header);
                            self.state = State::Pass(usize::MAX);
                            continue;
                        }
                    };
                    let first = header[0];
                    self.state = match first >> 4 {
                        PUBLISH => State::publish(first, remaining),
                        CONNACK | SUBACK | UNSUBACK => State::Whole {
                            packet: std::mem::take(header),
                            left: remaining,
                        },
                        PUBACK if self.denials.is_some() && remaining == 2 => State::Whole {
                            packet: std::mem::take(header),
                            left: remaining,
                        },
                        PUBREL if self.flow.active() && remaining == 2 => State::Whole {
                            packet: std::mem::take(header),
                            left: remaining,
                        },
                        // PUBACK, PUBREC, PUBREL, PUBCOMP (a packet id alone is a
                        // v5 success) and PINGRESP are the same in v5.
                        _ => {
                            out.extend_from_slice(header);
                            State::Pass(remaining)
                        }
                    };
                    self.finish(out);
                }
                state => {
                    state.take(&mut input, out);
                    self.finish(out);
                }
            }
        }
        if matches!(&self.state, State::Header(h) if h.is_empty()) {
            self.release(out);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        match &self.state {
            State::Publish {
                first,
                remaining,
                head,
                ..
            } => {
                let (first, remaining) = (*first, *remaining);
                let kept = match publish_head(head, first, false) {
                    Head::Need(n) if n <= remaining => return self.state.need(n),
                    Head::Done { kept, .. } => kept,
                    // Malformed (the topic runs past the packet): passed on as it is.
                    _ => {
                        out.push(first);
                        encode_remaining_length(remaining, out);
                        out.extend_from_slice(head);
                        self.state = State::Pass(remaining - head.len());
                        return self.finish(out);
                    }
                };
                let max = self
                    .terms
                    .device_max_packet
                    .map_or(usize::MAX, |m| m as usize);
                let qos = (first >> 1) & 3;
                let id = (qos > 0).then(|| u16::from_be_bytes([head[kept - 2], head[kept - 1]]));
                let skip = packet_size(remaining + 1) > max;
                if let Some(id) = id.filter(|_| self.flow.active()) {
                    // In rumqttd's order; one not sent is acknowledged to rumqttd as if
                    // it had been (see [`Flow`]).
                    let owed = skip.then_some(if qos == 1 { PUBACK } else { PUBREC });
                    if skip && qos > 1 {
                        self.skipped_qos2.insert(id);
                    }
                    self.flow.passed(false, id, owed);
                }
                if skip {
                    self.discarded += 1;
                    self.state = State::Skip(remaining - kept);
                    return self.finish(out);
                }
                // The same topic and packet id, then no properties.
                let v5_head = |out: &mut Vec<u8>| {
                    out.push(first);
                    encode_remaining_length(remaining + 1, out);
                    out.extend_from_slice(&head[..kept]);
                    out.push(0);
                };
                if let Some(id) = id.filter(|_| self.holds() || self.at_receive_max()) {
                    let mut packet = Vec::new();
                    v5_head(&mut packet);
                    self.state = State::Held {
                        packet,
                        left: remaining - kept,
                        id,
                        qos,
                    };
                    return self.finish(out);
                }
                v5_head(out);
                if let Some(id) = id.filter(|_| self.flow.active()) {
                    self.flow.sent(id, qos);
                }
                self.state = State::Pass(remaining - kept);
                self.finish(out);
            }
            State::Held { left: 0, .. } => {
                if let State::Held {
                    packet, id, qos, ..
                } = std::mem::replace(&mut self.state, State::header())
                {
                    self.held_bytes += packet.len();
                    self.held.push_back((id, qos, packet));
                }
            }
            State::Whole { left: 0, .. } => {
                if let State::Whole { packet, .. } =
                    std::mem::replace(&mut self.state, State::header())
                {
                    self.translate(&packet, out);
                }
            }
            State::Pass(0) | State::Skip(0) => self.state = State::header(),
            _ => {}
        }
    }

    /// A whole CONNACK, SUBACK, UNSUBACK, PUBACK or PUBREL in its v5 form (as it came if it
    /// cannot be read: rumqttd sends none such).
    fn translate(&mut self, packet: &[u8], out: &mut Vec<u8>) {
        if packet[0] >> 4 == PUBREL {
            let id = u16::from_be_bytes([packet[2], packet[3]]);
            let skipped = self.skipped_qos2.remove(&id);
            self.flow.passed(true, id, skipped.then_some(PUBCOMP));
            if !skipped {
                out.extend_from_slice(packet);
            }
            return;
        }
        if packet[0] >> 4 == PUBACK {
            let id = u16::from_be_bytes([packet[2], packet[3]]);
            let denied = self.denials.as_ref().is_some_and(|d| lock(d).remove(&id));
            if denied {
                // Packet id, reason code, no properties.
                return out.extend_from_slice(&[0x40, 3, packet[2], packet[3], 0x87]);
            }
            return out.extend_from_slice(packet);
        }
        let mut stream = BytesMut::from(packet);
        let mut buf = BytesMut::new();
        let written = match v4::Packet::read(&mut stream, usize::MAX) {
            Ok(v4::Packet::ConnAck(ack)) => self.connack(ack).write(&mut buf),
            Ok(v4::Packet::SubAck(ack)) => v5::SubAck {
                pkid: ack.pkid,
                return_codes: ack
                    .return_codes
                    .into_iter()
                    .map(|code| match code {
                        v4::SubscribeReasonCode::Success(q) => {
                            v5::SubscribeReasonCode::Success(qos5(q))
                        }
                        // rumqttd fails no filter (it disconnects on an invalid
                        // one): a failure is the door's, a filter outside the ACL.
                        v4::SubscribeReasonCode::Failure => v5::SubscribeReasonCode::NotAuthorized,
                    })
                    .collect(),
                properties: None,
            }
            .write(&mut buf),
            Ok(v4::Packet::UnsubAck(ack)) => {
                let n = lock(&self.unsubscribes).remove(&ack.pkid).unwrap_or(1);
                v5::UnsubAck {
                    pkid: ack.pkid,
                    reasons: vec![v5::UnsubAckReason::Success; n],
                    properties: None,
                }
                .write(&mut buf)
            }
            _ => return out.extend_from_slice(packet),
        };
        match written {
            Ok(_) => out.extend_from_slice(&buf),
            Err(_) => out.extend_from_slice(packet),
        }
    }

    /// rumqttd's CONNACK as a v5 one, with the limits the device must keep to.
    fn connack(&mut self, ack: v4::ConnAck) -> v5::ConnAck {
        use v4::ConnectReturnCode as Old;
        use v5::ConnectReturnCode as New;
        let code = match ack.code {
            Old::Success => New::Success,
            Old::RefusedProtocolVersion => New::UnsupportedProtocolVersion,
            Old::BadClientId => New::ClientIdentifierNotValid,
            Old::ServiceUnavailable => New::ServerUnavailable,
            Old::BadUserNamePassword => New::BadUserNamePassword,
            Old::NotAuthorized => New::NotAuthorized,
        };
        v5::ConnAck {
            session_present: ack.session_present,
            code,
            properties: Some(v5::ConnAckProperties {
                session_expiry_interval: self.terms.session_expiry,
                receive_max: None,
                max_qos: None,
                // The door clears the retain flag of devices' publishes.
                retain_available: Some(0),
                max_packet_size: u32::try_from(self.limit).ok(),
                assigned_client_identifier: self.terms.assigned.take(),
                // Absent: no topic aliases.
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: Some(0),
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::mqtt::auth::parse_connect;
    use crate::mqtt::inspect::remaining_length;

    fn v5_bytes(packet: v5::Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, None).expect("write");
        buf.to_vec()
    }

    fn v4_bytes(packet: v4::Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, usize::MAX).expect("write");
        buf.to_vec()
    }

    fn connect(client_id: &str, clean_start: bool, expiry: Option<u32>) -> Vec<u8> {
        let mut properties = v5::ConnectProperties::new();
        properties.session_expiry_interval = expiry;
        properties.user_properties = vec![("k".into(), "v".into())];
        properties.max_packet_size = Some(10_000);
        let will = v5::LastWill::new(
            "devices/d/status",
            "gone",
            mqtt5::QoS::AtLeastOnce,
            true,
            None,
        );
        v5_bytes(v5::Packet::Connect(
            v5::Connect {
                keep_alive: 30,
                client_id: client_id.into(),
                clean_start,
                properties: Some(properties),
            },
            Some(will),
            Some(v5::Login::new("user", "secret")),
        ))
    }

    /// `packet`'s body (after its fixed header).
    fn body(packet: &[u8]) -> &[u8] {
        let (_, len) = remaining_length(&packet[1..]).expect("length");
        &packet[1 + len..]
    }

    #[test]
    fn a_v5_connect_goes_on_as_a_311_one() {
        let packet = connect("d1", true, None);
        assert!(is_v5(body(&packet)));
        let Downgraded {
            packet: (header, v4),
            terms,
        } = downgrade_connect(body(&packet), None).expect("downgraded");
        let device_max_packet = Some(10_000);
        assert_eq!(
            terms,
            Terms {
                device_max_packet,
                ..Terms::default()
            }
        );
        let (remaining, _) = remaining_length(&header[1..]).expect("length");
        assert_eq!((header[0], remaining), (0x10, v4.len()));
        assert!(!is_v5(&v4));
        // What rumqttc's 3.1.1 codec writes for the same, with the will's retain flag
        // cleared.
        let expected = v4::Connect {
            protocol: mqtt4::Protocol::V4,
            keep_alive: 30,
            client_id: "d1".into(),
            clean_session: true,
            last_will: Some(v4::LastWill::new(
                "devices/d/status",
                "gone",
                mqtt4::QoS::AtLeastOnce,
                false,
            )),
            login: Some(v4::Login::new("user", "secret")),
        };
        let mut written = BytesMut::new();
        expected.write(&mut written).expect("write");
        assert_eq!([&header[..], &v4].concat(), written.to_vec());
        let parsed = parse_connect(&v4).expect("a 3.1.1 CONNECT");
        assert_eq!(parsed.password.as_deref(), Some(&b"secret"[..]));
        // A session that outlives the connection is a 3.1.1 persistent one, which
        // never expires; a clean one ends with the connection: the CONNACK says so.
        let lasts = |c: Vec<u8>| {
            let d = downgrade_connect(body(&c), None).expect("ok");
            (d.packet.1[7] & 0x02 != 0, d.terms.session_expiry)
        };
        assert_eq!(lasts(connect("d1", true, Some(3600))), (true, Some(0)));
        assert_eq!(lasts(connect("d1", false, None)), (false, Some(u32::MAX)));
        assert_eq!(lasts(connect("d1", false, Some(u32::MAX))), (false, None));
        // No client id: the user name, else the certificate's name, else a random one.
        let given = downgrade_connect(body(&connect("", true, None)), Some("cn")).expect("ok");
        assert_eq!(given.terms.assigned.as_deref(), Some("user"));
        assert_eq!(
            parse_connect(&given.packet.1).expect("parsed").client_id,
            "user"
        );
        let anonymous = |name| {
            let c = v5_bytes(v5::Packet::Connect(
                v5::Connect {
                    keep_alive: 30,
                    client_id: String::new(),
                    clean_start: true,
                    properties: None,
                },
                None,
                None,
            ));
            downgrade_connect(body(&c), name)
                .expect("ok")
                .terms
                .assigned
        };
        assert_eq!(anonymous(Some("cn")).as_deref(), Some("cn"));
        let random = anonymous(None).expect("assigned");
        assert!(random.starts_with("sluice-"), "{random}");
        assert_ne!(anonymous(None), Some(random));
        // A binary password goes through as it is.
        let mut binary = body(&connect("d1", true, None)).to_vec();
        let at = binary.len() - b"secret".len();
        binary[at] = 0xff;
        let d = downgrade_connect(&binary, None).expect("binary password");
        let parsed = parse_connect(&d.packet.1).expect("parsed");
        assert_eq!(parsed.password.as_deref(), Some(&b"\xffecret"[..]));
        // Enhanced authentication, a password without a user name, and a malformed
        // CONNECT are refused, each with its reason.
        let mut properties = v5::ConnectProperties::new();
        properties.authentication_method = Some("SCRAM-SHA-1".into());
        let scram = v5_bytes(v5::Packet::Connect(
            v5::Connect {
                keep_alive: 30,
                client_id: "d1".into(),
                clean_start: true,
                properties: Some(properties),
            },
            None,
            None,
        ));
        let refused = |b: &[u8]| downgrade_connect(b, None).expect_err("refused").0;
        assert_eq!(refused(body(&scram)), Refusal::AuthMethod);
        let mut no_user = body(&connect("d1", true, None)).to_vec();
        no_user[7] &= !0x80;
        let user_at = no_user.len() - (2 + 6) - (2 + 4);
        no_user.drain(user_at..user_at + 2 + 4);
        assert_eq!(refused(&no_user), Refusal::BadCredentials);
        let whole = body(&packet);
        assert_eq!(refused(&whole[..whole.len() - 3]), Refusal::Protocol);
    }

    /// Feeds `stream` to `feed` in pieces of `step` bytes.
    fn pieces(stream: &[u8], step: usize, mut feed: impl FnMut(&[u8], &mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            feed(piece, &mut out);
        }
        out
    }

    fn publish5(topic: &str, qos: mqtt5::QoS, pkid: u16, payload: Vec<u8>) -> v5::Packet {
        let properties = v5::PublishProperties {
            message_expiry_interval: Some(60),
            user_properties: vec![("trace".into(), "x".repeat(300))],
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        let mut p = v5::Publish::new(topic, qos, payload, Some(properties));
        p.pkid = pkid;
        v5::Packet::Publish(p)
    }

    fn publish4(topic: &str, qos: mqtt4::QoS, pkid: u16, payload: Vec<u8>) -> v4::Packet {
        v4::Packet::Publish(v4::Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            pkid,
            payload: Bytes::from(payload),
        })
    }

    #[test]
    fn a_v5_devices_packets_go_on_as_311_ones_however_they_arrive() {
        let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut filter = v5::Filter::new("commands/d1", mqtt5::QoS::AtLeastOnce);
        filter.nolocal = true;
        filter.retain_forward_rule = v5::RetainForwardRule::Never;
        let subscribe = v5::Subscribe::new_many(
            [
                filter,
                v5::Filter::new("commands/+", mqtt5::QoS::AtMostOnce),
            ],
            None,
        );
        let mut unsubscribe = v5::Unsubscribe::new("commands/d1", None);
        unsubscribe.filters.push("commands/+".into());
        unsubscribe.pkid = 9;
        let mut puback = v5::PubAck::new(3, None);
        puback.reason = v5::PubAckReason::NoMatchingSubscribers;
        let stream = [
            v5_bytes(publish5(
                "devices/d1/telemetry",
                mqtt5::QoS::AtLeastOnce,
                7,
                br#"{"t":1}"#.to_vec(),
            )),
            v5_bytes(publish5(
                "devices/d1/telemetry",
                mqtt5::QoS::AtMostOnce,
                0,
                big.clone(),
            )),
            v5_bytes(v5::Packet::Subscribe(subscribe)),
            v5_bytes(v5::Packet::Unsubscribe(unsubscribe)),
            v5_bytes(v5::Packet::PubAck(puback)),
            v5_bytes(v5::Packet::PingReq(v5::PingReq)),
            v5_bytes(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::DisconnectWithWillMessage,
            ))),
        ]
        .concat();
        let expected = [
            v4_bytes(publish4(
                "devices/d1/telemetry",
                mqtt4::QoS::AtLeastOnce,
                7,
                br#"{"t":1}"#.to_vec(),
            )),
            v4_bytes(publish4(
                "devices/d1/telemetry",
                mqtt4::QoS::AtMostOnce,
                0,
                big,
            )),
            v4_bytes(v4::Packet::Subscribe(v4::Subscribe {
                pkid: 0,
                filters: vec![
                    v4::SubscribeFilter::new("commands/d1".into(), mqtt4::QoS::AtLeastOnce),
                    v4::SubscribeFilter::new("commands/+".into(), mqtt4::QoS::AtMostOnce),
                ],
            })),
            v4_bytes(v4::Packet::Unsubscribe(v4::Unsubscribe {
                pkid: 9,
                topics: vec!["commands/d1".into(), "commands/+".into()],
            })),
            v4_bytes(v4::Packet::PubAck(v4::PubAck { pkid: 3 })),
            vec![0xC0, 0],
            vec![0xE0, 0],
        ]
        .concat();
        for step in [1, 2, 7, 1000, stream.len()] {
            let mut up = Up::new(64 * 1024);
            let out = pieces(&stream, step, |p, out| up.feed(p, out).expect("translated"));
            assert!(
                out == expected,
                "step {step}: {} bytes, expected {}",
                out.len(),
                expected.len()
            );
            assert_eq!(lock(&up.unsubscribes).get(&9), Some(&2));
        }
    }

    #[test]
    fn what_311_cannot_carry_ends_the_connection() {
        // Continue authentication, no properties.
        let auth = vec![0xF0, 2, 0x18, 0];
        let mut alias = v5::Publish::new("", mqtt5::QoS::AtLeastOnce, "x", None);
        alias.pkid = 1;
        alias.properties = Some(v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        });
        let alias = v5_bytes(v5::Packet::Publish(alias));
        let huge = v5_bytes(v5::Packet::Subscribe(v5::Subscribe::new(
            v5::Filter::new("x".repeat(2_000), mqtt5::QoS::AtMostOnce),
            None,
        )));
        for (stream, what) in [
            (auth, "AUTH"),
            (alias, "alias"),
            (huge, "maximum packet size"),
        ] {
            let mut up = Up::new(1_000);
            let err = up.feed(&stream, &mut Vec::new()).expect_err(what);
            let Closed::Untranslatable { what: detail, .. } = err else {
                panic!("{err:?}");
            };
            assert!(detail.contains(what), "{detail}");
        }
    }

    #[test]
    fn rumqttds_answers_reach_a_v5_device_as_v5_ones_however_they_arrive() {
        let mut up = Up::new(4_096);
        let mut unsubscribe = v5::Unsubscribe::new("a", None);
        unsubscribe.filters.push("b".into());
        unsubscribe.pkid = 9;
        up.feed(
            &v5_bytes(v5::Packet::Unsubscribe(unsubscribe)),
            &mut Vec::new(),
        )
        .expect("translated");
        let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let stream = [
            v4_bytes(v4::Packet::ConnAck(v4::ConnAck::new(
                v4::ConnectReturnCode::Success,
                false,
            ))),
            v4_bytes(v4::Packet::SubAck(v4::SubAck::new(
                4,
                vec![
                    v4::SubscribeReasonCode::Success(mqtt4::QoS::AtLeastOnce),
                    v4::SubscribeReasonCode::Failure,
                ],
            ))),
            v4_bytes(v4::Packet::UnsubAck(v4::UnsubAck::new(9))),
            v4_bytes(publish4(
                "commands/d1",
                mqtt4::QoS::AtLeastOnce,
                5,
                payload.clone(),
            )),
            v4_bytes(v4::Packet::PubAck(v4::PubAck::new(6))),
            v4_bytes(v4::Packet::PubAck(v4::PubAck::new(8))),
            v4_bytes(v4::Packet::PingResp),
        ]
        .concat();
        for step in [1, 3, 100, stream.len()] {
            let denials = Denials::default();
            lock(&denials).insert(6);
            let terms = Terms {
                assigned: Some("sluice-1".into()),
                session_expiry: Some(0),
                device_max_packet: None,
                device_receive_max: None,
            };
            let mut down = up.down(terms, Some(denials.clone()));
            lock(&up.unsubscribes).insert(9, 2);
            let out = pieces(&stream, step, |p, out| down.feed(p, out));
            let mut read = BytesMut::from(&out[..]);
            let mut packets = Vec::new();
            while !read.is_empty() {
                packets.push(v5::Packet::read(&mut read, None).expect("a v5 packet"));
            }
            let [
                v5::Packet::ConnAck(connack),
                v5::Packet::SubAck(suback),
                v5::Packet::UnsubAck(unsuback),
                v5::Packet::Publish(publish),
                v5::Packet::PubAck(denied),
                v5::Packet::PubAck(puback),
                v5::Packet::PingResp(_),
            ] = &packets[..]
            else {
                panic!("step {step}: {packets:?}");
            };
            assert_eq!(connack.code, v5::ConnectReturnCode::Success);
            let properties = connack.properties.as_ref().expect("properties");
            assert_eq!(properties.max_packet_size, Some(4_096));
            assert_eq!(properties.session_expiry_interval, Some(0));
            assert_eq!(properties.retain_available, Some(0));
            assert_eq!(properties.topic_alias_max, None);
            assert_eq!(
                properties.assigned_client_identifier.as_deref(),
                Some("sluice-1")
            );
            assert_eq!(
                suback.return_codes,
                [
                    v5::SubscribeReasonCode::Success(mqtt5::QoS::AtLeastOnce),
                    v5::SubscribeReasonCode::NotAuthorized
                ]
            );
            assert_eq!(unsuback.reasons, [v5::UnsubAckReason::Success; 2]);
            assert_eq!((&publish.topic[..], publish.pkid), (&b"commands/d1"[..], 5));
            assert!(publish.payload == payload, "step {step}");
            // The ACL denied publish 6: 3.1.1 could only say success.
            assert_eq!(
                (denied.pkid, denied.reason),
                (6, v5::PubAckReason::NotAuthorized)
            );
            assert!(lock(&denials).is_empty());
            assert_eq!((puback.pkid, puback.reason), (8, v5::PubAckReason::Success));
        }
    }

    /// A device that takes packets of at most 200 bytes: rumqttd's publishes over that
    /// are not sent, and each QoS 1 or 2 one is acknowledged to rumqttd by the door
    /// (the PUBREL of a QoS 2 one too), in rumqttd's order: after the device's own
    /// acknowledgements of what it was sent before, and never inside one of the
    /// device's packets. The others reach the device whole.
    #[test]
    fn a_publish_larger_than_the_device_takes_is_not_sent_and_rumqttd_gets_its_ack_in_turn() {
        let over = vec![b'x'; 300];
        let small = |id| {
            v4_bytes(publish4(
                "commands/d1",
                mqtt4::QoS::AtLeastOnce,
                id,
                vec![b'y'; 150],
            ))
        };
        let stream = [
            small(1),
            v4_bytes(publish4(
                "commands/d1",
                mqtt4::QoS::AtLeastOnce,
                2,
                over.clone(),
            )),
            v4_bytes(publish4(
                "commands/d1",
                mqtt4::QoS::AtMostOnce,
                0,
                over.clone(),
            )),
            v4_bytes(publish4("commands/d1", mqtt4::QoS::ExactlyOnce, 3, over)),
            small(4),
        ]
        .concat();
        let ack = |kind: u8, id: u8| vec![kind << 4, 2, 0, id];
        let device_ack = |id| v5_bytes(v5::Packet::PubAck(v5::PubAck::new(id, None)));
        let telemetry = v5_bytes(publish5(
            "devices/d1/telemetry",
            mqtt5::QoS::AtMostOnce,
            0,
            b"{}".to_vec(),
        ));
        for step in [1, 7, stream.len()] {
            let mut up = Up::new(4_096);
            let terms = Terms {
                device_max_packet: Some(200),
                ..Terms::default()
            };
            let mut down = up.down(terms, None);
            let out = pieces(&stream, step, |p, out| down.feed(p, out));
            let mut read = BytesMut::from(&out[..]);
            for id in [1, 4] {
                let Ok(v5::Packet::Publish(p)) = v5::Packet::read(&mut read, None) else {
                    panic!("step {step}: not a publish");
                };
                assert_eq!((p.pkid, p.payload.len()), (id, 150), "step {step}");
            }
            assert!(read.is_empty(), "step {step}: only those that fit");
            assert_eq!(down.discarded(), 3);
            // Owed, but rumqttd waits for the device's PUBACK of 1 first.
            let mut sent = Vec::new();
            up.feed(&[], &mut sent).expect("up");
            assert!(sent.is_empty(), "step {step}");
            // Then the device's own publish, in two pieces, its PUBACK after it.
            let (first, rest) = telemetry.split_at(5);
            up.feed(first, &mut sent).expect("up");
            assert!(sent.is_empty(), "step {step}");
            up.feed(&[rest, &device_ack(1)].concat(), &mut sent)
                .expect("up");
            let (publish, acks) = sent.split_at(sent.len() - 12);
            assert_eq!(publish[0] >> 4, PUBLISH, "step {step}");
            assert_eq!(
                acks,
                [ack(PUBACK, 1), ack(PUBACK, 2), ack(PUBREC, 3)].concat()
            );
            // rumqttd's PUBREL of 3 is not sent either: the door owes its PUBCOMP.
            let mut out = Vec::new();
            down.feed(&[PUBREL << 4 | 2, 2, 0, 3], &mut out);
            assert!(out.is_empty(), "step {step}");
            sent.clear();
            up.feed(&[], &mut sent).expect("up");
            assert_eq!(sent, ack(PUBCOMP, 3), "step {step}");
            sent.clear();
            up.feed(&device_ack(4), &mut sent).expect("up");
            assert_eq!(sent, ack(PUBACK, 4), "step {step}: owed once");
        }
    }

    /// A device that takes 2 QoS 1 or 2 publishes unacknowledged: the third waits
    /// until the device finished acknowledging one (a PUBREC does not finish a QoS 2
    /// one), while everything else goes on: a QoS 0 publish, a PINGRESP and the PUBREL
    /// the device needs to finish the QoS 2 one.
    #[test]
    fn at_its_receive_maximum_a_device_is_sent_no_more_publishes_until_it_acknowledges() {
        let publish = |qos, id| v4_bytes(publish4("commands/d1", qos, id, b"{}".to_vec()));
        let stream = [
            // Sent again from a resumed session: not one of this connection's.
            vec![PUBREL << 4 | 2, 2, 0, 7],
            publish(mqtt4::QoS::AtLeastOnce, 1),
            publish(mqtt4::QoS::ExactlyOnce, 2),
            publish(mqtt4::QoS::AtLeastOnce, 3),
            publish(mqtt4::QoS::AtMostOnce, 0),
            v4_bytes(v4::Packet::PingResp),
            vec![PUBREL << 4 | 2, 2, 0, 2],
        ]
        .concat();
        // Publishes by id; PINGRESP is 100, PUBREL 200 + its id.
        let ids = |out: &[u8]| {
            let mut read = BytesMut::from(out);
            let mut ids = Vec::new();
            while let Ok(packet) = v5::Packet::read(&mut read, None) {
                ids.push(match packet {
                    v5::Packet::Publish(p) => p.pkid,
                    v5::Packet::PingResp(_) => 100,
                    v5::Packet::PubRel(r) => 200 + r.pkid,
                    _ => u16::MAX,
                });
            }
            assert!(read.is_empty());
            ids
        };
        let device = |kind, id| {
            v5_bytes(match kind {
                PUBREC => v5::Packet::PubRec(v5::PubRec::new(id, None)),
                PUBCOMP => v5::Packet::PubComp(v5::PubComp::new(id, None)),
                _ => v5::Packet::PubAck(v5::PubAck::new(id, None)),
            })
        };
        for step in [1, 5, stream.len()] {
            let mut up = Up::new(4_096);
            let terms = Terms {
                device_receive_max: Some(2),
                ..Terms::default()
            };
            let mut down = up.down(terms, None);
            let out = pieces(&stream, step, |p, out| down.feed(p, out));
            assert_eq!(ids(&out), [207, 1, 2, 0, 100, 202], "step {step}");
            assert!(down.holds());
            let (mut sent, mut out) = (Vec::new(), Vec::new());
            for (kind, id) in [(PUBCOMP, 7), (PUBREC, 2), (PUBACK, 2)] {
                up.feed(&device(kind, id), &mut sent).expect("up");
                down.release(&mut out);
                assert!(out.is_empty(), "step {step}: {kind} {id} finishes nothing");
            }
            up.feed(&device(PUBACK, 1), &mut sent).expect("up");
            down.release(&mut out);
            assert_eq!(ids(&out), [3], "step {step}");
            assert!(!down.holds());
            up.feed(&device(PUBCOMP, 2), &mut sent).expect("up");
            assert_eq!(down.flow.in_flight(), 1, "step {step}: 3 alone");
            // The device's acknowledgements go on to rumqttd as they came.
            let acks = [(7, 7), (5, 2), (4, 2), (4, 1), (7, 2)];
            let acks: Vec<u8> = acks
                .iter()
                .flat_map(|&(t, id)| [t << 4, 2, 0, id])
                .collect();
            assert_eq!(sent, acks, "step {step}");
        }
    }

    /// A device that acknowledges nothing, with more commands waiting than the door
    /// holds for it: the connection is to end (the broker keeps them).
    #[test]
    fn a_device_that_acknowledges_nothing_overloads_its_connection() {
        let up = Up::new(4_096);
        let terms = Terms {
            device_receive_max: Some(1),
            ..Terms::default()
        };
        let mut down = up.down(terms, None);
        assert_eq!(down.held_budget(), HELD_BYTES);
        let mut out = Vec::new();
        for id in 1..=20 {
            let p = publish4(
                "commands/d1",
                mqtt4::QoS::AtLeastOnce,
                id,
                vec![b'x'; 60_000],
            );
            down.feed(&v4_bytes(p), &mut out);
            // The first is sent; 17 held fit in 1 MiB, the 18th does not.
            assert_eq!(down.overloaded(), id > 18, "{id}");
        }
    }
}
