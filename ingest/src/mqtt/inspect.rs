//! The embedded broker's door reads the device → broker byte stream packet by packet:
//! it trims oversized PUBLISH packets and holds each device to its topic ACL.
//!
//! - **Oversized.** rumqttd disconnects a client whose packet is larger than
//!   `max_payload_size` without acknowledging it; the device reconnects, sends the same
//!   QoS 1 message again, and loops so for as long as it runs: nothing it publishes
//!   after that message ever lands. mosquitto completes the QoS flow and drops such a
//!   message. The door cuts each PUBLISH longer than the limit down to one carrying
//!   [`OVERSIZED_MARK`], the original payload's size and its first bytes, on the same
//!   topic with the same packet id: rumqttd acknowledges it (the device goes on), and
//!   the source's decoder dead-letters it as `oversized` (see `crate::decode`).
//! - **ACL** (`[broker.acl]`, see [`Acl`]). A PUBLISH to a topic the device may not
//!   use becomes an empty one on [`DENIED_TOPIC`] with the same packet id: rumqttd
//!   acknowledges it (MQTT 3.1.1 has no way to refuse a publish; mosquitto also
//!   acknowledges and drops), and no source reads it (a `$` topic matches no
//!   wildcard filter). In a SUBSCRIBE, each filter the device may not use becomes
//!   [`REFUSED_FILTER`] (nothing is published there), and [`Subacks`], reading the broker →
//!   device stream, turns that filter's return code in the SUBACK into 0x80 (failure),
//!   so the device learns which subscriptions failed and stays connected: a device
//!   whose connection closed on a denied SUBSCRIBE reconnected and sent it again,
//!   for as long as it ran.
//!
//! Packets are parsed only as far as these need (MQTT 3.1.1, the embedded broker's
//! protocol; an MQTT 5 device's packets arrive here translated, see `crate::mqtt::v5`);
//! every other byte passes unchanged. The CONNECT is read before the relay
//! starts (see `crate::mqtt::broker`), so the stream fed here begins after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::mqtt::auth::{Acl, subscribe_filters};

/// Begins the payload of a trimmed message: then the original payload size in
/// decimal, a NUL, and its first bytes.
pub const OVERSIZED_MARK: &[u8] = b"\0sluice:oversized\0";

/// Payload bytes a trimmed message keeps.
const KEPT: usize = 1024;

/// Where a publish the ACL denies goes instead, empty.
pub const DENIED_TOPIC: &str = "$sluice/denied";

/// The retain flag of a PUBLISH's first byte.
const RETAIN: u8 = 0x01;

/// What a SUBSCRIBE asks for instead of a filter the ACL denies: `$sluice/refused`,
/// a topic no device may publish to (the door turns such publishes into
/// [`DENIED_TOPIC`] ones), as a shared subscription because rumqttd disconnects a
/// client subscribing to any other `$` filter.
pub const REFUSED_FILTER: &str = "$share/sluice-refused/$sluice/refused";

/// SUBSCRIBE packet id → the positions of its filters the ACL refused: written by the
/// [`Inspector`] before the SUBSCRIBE goes on, read by [`Subacks`] when its SUBACK
/// comes back.
pub type Refusals = Arc<Mutex<HashMap<u16, Vec<usize>>>>;

/// Packet ids of QoS 1 publishes the ACL denied, while their PUBACK is on its way:
/// written by the [`Inspector`] when asked to ([`Inspector::denials`]), read by the
/// MQTT 5 translator, which answers them with reason 0x87 (not authorized) where
/// 3.1.1 can only say success.
pub type Denials = Arc<Mutex<std::collections::HashSet<u16>>>;

/// Where the door is in the device's byte stream.
#[derive(Debug)]
enum State {
    /// Reading a fixed header (type byte, then up to 4 bytes of remaining length).
    Header(Vec<u8>),
    /// Passing on the rest of a packet within the limit.
    Pass(usize),
    /// A PUBLISH that is oversized or must pass the ACL: reading its topic and packet
    /// id (`need`: the variable header's length once the topic length is known).
    Head {
        first: u8,
        remaining: usize,
        head: Vec<u8>,
        need: Option<usize>,
    },
    /// An oversized PUBLISH's payload: keeping its first bytes, then dropping the rest
    /// (`left`: payload bytes still to come).
    Payload {
        first: u8,
        head: Vec<u8>,
        size: usize,
        kept: Vec<u8>,
        left: usize,
    },
    /// Dropping the rest of a packet.
    Skip(usize),
    /// A SUBSCRIBE under the ACL: reading it whole (`left`: bytes still to come).
    Subscribe {
        packet: Vec<u8>,
        body_at: usize,
        left: usize,
    },
}

/// Why the door ends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A SUBSCRIBE the door cannot read (or larger than the payload limit).
    BadSubscribe,
    /// An MQTT 5 packet the door cannot put into MQTT 3.1.1 (see `crate::mqtt::v5`).
    Untranslatable {
        /// The DISCONNECT reason code to close with.
        code: u8,
        /// What the packet was.
        what: String,
    },
}

/// Reads the device → broker stream of one connection.
#[derive(Debug)]
pub struct Inspector {
    limit: usize,
    state: State,
    trimmed: u64,
    denied: u64,
    packets: u64,
    /// The ACL and the device's identity.
    acl: Option<(Arc<Acl>, String)>,
    /// Subscriptions refused so far, and the last filter refused.
    refused: u64,
    last_refused: Option<String>,
    refusals: Refusals,
    denials: Option<Denials>,
}

impl Inspector {
    /// An inspector that trims packets longer than `limit` bytes (rumqttd's
    /// `max_payload_size`, which it compares with the whole packet).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            state: State::Header(Vec::with_capacity(5)),
            trimmed: 0,
            denied: 0,
            packets: 0,
            acl: None,
            refused: 0,
            last_refused: None,
            refusals: Refusals::default(),
            denials: None,
        }
    }

    /// ... and holds device `identity` to `acl`.
    pub fn with_acl(mut self, acl: Arc<Acl>, identity: String) -> Self {
        self.acl = Some((acl, identity));
        self
    }

    /// From now on, records the packet ids of QoS 1 publishes the ACL denies, in the
    /// set returned (for an MQTT 5 connection's translator).
    pub fn denials(&mut self) -> Denials {
        self.denials.get_or_insert_with(Denials::default).clone()
    }

    /// The refusals to hand to the [`Subacks`] of the same connection.
    pub fn refusals(&self) -> Refusals {
        self.refusals.clone()
    }

    /// Subscriptions (filters) the ACL refused so far, and the last one.
    pub fn refused(&self) -> (u64, Option<&str>) {
        (self.refused, self.last_refused.as_deref())
    }

    /// Publishes the ACL denied so far.
    pub fn denied(&self) -> u64 {
        self.denied
    }

    /// Whole packets passed on so far (the first is the CONNECT).
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Messages trimmed so far.
    pub fn trimmed(&self) -> u64 {
        self.trimmed
    }

    /// Appends to `out` what of `input` goes on to the broker; an error when the
    /// connection must end.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Closed> {
        while !input.is_empty() {
            match &mut self.state {
                State::Header(header) => {
                    let (remaining, len) = match header_byte(header, &mut input) {
                        FixedHeader::Whole { remaining, len } => (remaining, len),
                        FixedHeader::More => continue,
                        // Pass it all on; rumqttd closes the connection.
                        FixedHeader::Malformed => {
                            out.extend_from_slice(header);
                            self.state = State::Pass(usize::MAX);
                            continue;
                        }
                    };
                    let frame = 1 + len + remaining;
                    let first = header[0];
                    if first >> 4 == 8 && self.acl.is_some() {
                        if frame > self.limit {
                            return Err(Closed::BadSubscribe);
                        }
                        let mut packet = Vec::with_capacity(frame);
                        packet.extend_from_slice(header);
                        self.state = State::Subscribe {
                            body_at: packet.len(),
                            packet,
                            left: remaining,
                        };
                        self.finish_subscribe(out)?;
                    } else if first >> 4 == 3
                        && remaining >= 2
                        && (frame > self.limit || self.acl.is_some())
                    {
                        // (A PUBLISH too short to hold its topic length is malformed:
                        // passed on as it is, below, for rumqttd to refuse. Reading its
                        // topic would run into the next packet; the fuzzer found that.)
                        self.state = State::Head {
                            first,
                            remaining,
                            head: Vec::new(),
                            need: None,
                        };
                    } else {
                        if first >> 4 == 3 {
                            // A PUBLISH passing whole: without its retain flag (below).
                            out.push(first & !RETAIN);
                            out.extend_from_slice(&header[1..]);
                        } else {
                            out.extend_from_slice(header);
                        }
                        self.state = State::Pass(remaining);
                        self.next_if_done();
                    }
                }
                State::Pass(left) => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    self.next_if_done();
                }
                State::Head {
                    first,
                    remaining,
                    head,
                    need,
                } => {
                    let want = need.unwrap_or(2);
                    let n = (want - head.len()).min(input.len());
                    head.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if head.len() < want {
                        continue;
                    }
                    if need.is_none() {
                        let topic = usize::from(u16::from_be_bytes([head[0], head[1]]));
                        let id = if (*first >> 1) & 3 > 0 { 2 } else { 0 };
                        if 2 + topic + id > *remaining {
                            // Malformed (the topic runs past the packet): passed on as
                            // it is, for rumqttd to refuse.
                            out.push(*first);
                            encode_remaining_length(*remaining, out);
                            out.extend_from_slice(head);
                            self.state = State::Pass(*remaining - head.len());
                            self.next_if_done();
                            continue;
                        }
                        *need = Some(2 + topic + id);
                        continue;
                    }
                    let size = remaining.saturating_sub(head.len());
                    let topic = &head[2..head.len() - if (*first >> 1) & 3 > 0 { 2 } else { 0 }];
                    let allowed = self.acl.as_ref().is_none_or(|(acl, identity)| {
                        std::str::from_utf8(topic).is_ok_and(|t| acl.may_publish(identity, t))
                    });
                    if allowed {
                        // Sluice reads devices' messages as they come; a retained one
                        // would be kept by rumqttd for ever, one per topic a device
                        // names, so the door drops the flag.
                        *first &= !RETAIN;
                    }
                    if !allowed {
                        let id = &head[2 + topic.len()..];
                        denied_publish(*first, id, out);
                        self.denied += 1;
                        if let (Some(denials), [a, b]) = (&self.denials, id)
                            && (*first >> 1) & 3 == 1
                        {
                            let mut denials = denials.lock().unwrap_or_else(|e| e.into_inner());
                            denials.insert(u16::from_be_bytes([*a, *b]));
                        }
                        self.state = State::Skip(size);
                        self.next_if_done();
                    } else if 1 + remaining_length_len(*remaining) + *remaining <= self.limit {
                        out.push(*first);
                        encode_remaining_length(*remaining, out);
                        out.extend_from_slice(head);
                        self.state = State::Pass(size);
                        self.next_if_done();
                    } else {
                        self.state = State::Payload {
                            first: *first,
                            head: std::mem::take(head),
                            size,
                            kept: Vec::with_capacity(KEPT.min(size)),
                            left: size,
                        };
                        self.finish_payload(out);
                    }
                }
                State::Skip(left) => {
                    let n = (*left).min(input.len());
                    input = &input[n..];
                    *left -= n;
                    self.next_if_done();
                }
                State::Subscribe { packet, left, .. } => {
                    let n = (*left).min(input.len());
                    packet.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    self.finish_subscribe(out)?;
                }
                State::Payload { kept, left, .. } => {
                    let n = (*left).min(input.len());
                    let keep = n.min(KEPT - kept.len().min(KEPT));
                    kept.extend_from_slice(&input[..keep]);
                    input = &input[n..];
                    *left -= n;
                    self.finish_payload(out);
                }
            }
        }
        Ok(())
    }

    /// Once a SUBSCRIBE is read whole: passed on, each filter the ACL refuses replaced
    /// by [`REFUSED_FILTER`] and noted in the refusals.
    fn finish_subscribe(&mut self, out: &mut Vec<u8>) -> Result<(), Closed> {
        let State::Subscribe {
            packet,
            body_at,
            left: 0,
        } = &self.state
        else {
            return Ok(());
        };
        let Some((acl, identity)) = &self.acl else {
            return Ok(());
        };
        let body = &packet[*body_at..];
        let filters = subscribe_filters(body).ok_or(Closed::BadSubscribe)?;
        let refused: Vec<usize> = (0..filters.len())
            .filter(|&i| !acl.may_subscribe(identity, &filters[i]))
            .collect();
        // A mask, not `refused.contains`: a SUBSCRIBE of 85,000 empty filters made
        // that quadratic (seconds of a runtime thread).
        let mut is_refused = vec![false; filters.len()];
        for &i in &refused {
            is_refused[i] = true;
        }
        if refused.is_empty() {
            out.extend_from_slice(packet);
        } else {
            // The same packet id and options; refused filters swapped.
            let mut rewritten = body[..2].to_vec();
            let mut at = 2;
            for (i, filter) in filters.iter().enumerate() {
                let name = if is_refused[i] {
                    REFUSED_FILTER
                } else {
                    filter.as_str()
                };
                rewritten.extend_from_slice(&(name.len() as u16).to_be_bytes());
                rewritten.extend_from_slice(name.as_bytes());
                at += 2 + filter.len();
                rewritten.push(body[at]);
                at += 1;
            }
            out.push(packet[0]);
            encode_remaining_length(rewritten.len(), out);
            out.extend_from_slice(&rewritten);
            self.refused += refused.len() as u64;
            self.last_refused = refused.last().map(|&i| filters[i].clone());
            let id = u16::from_be_bytes([body[0], body[1]]);
            let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            refusals.insert(id, refused);
        }
        self.packets += 1;
        self.state = State::Header(Vec::with_capacity(5));
        Ok(())
    }

    /// After a packet passed on whole: the next fixed header.
    fn next_if_done(&mut self) {
        if matches!(self.state, State::Pass(0) | State::Skip(0)) {
            self.packets += 1;
            self.state = State::Header(Vec::with_capacity(5));
        }
    }

    /// Once an oversized payload has been read: the trimmed packet goes out.
    fn finish_payload(&mut self, out: &mut Vec<u8>) {
        let State::Payload {
            first,
            head,
            size,
            kept,
            left: 0,
        } = &self.state
        else {
            return;
        };
        let mut size_text = itoa::Buffer::new();
        let size_text = size_text.format(*size).as_bytes();
        let fixed = head.len() + OVERSIZED_MARK.len() + size_text.len() + 1;
        // The trimmed packet must pass rumqttd itself (it refuses a remaining length
        // over the limit; the door counts the whole frame, up to 5 bytes more).
        let room = self.limit.saturating_sub(5);
        if fixed > room {
            // Its topic alone is too long for the limit: nothing of it can be kept, but
            // the QoS flow completes, as for a publish the ACL denies.
            let id_len = if (*first >> 1) & 3 > 0 { 2 } else { 0 };
            denied_publish(*first, &head[head.len() - id_len..], out);
        } else {
            let kept = &kept[..kept.len().min(room - fixed)];
            out.push(*first);
            encode_remaining_length(fixed + kept.len(), out);
            out.extend_from_slice(head);
            out.extend_from_slice(OVERSIZED_MARK);
            out.extend_from_slice(size_text);
            out.push(0);
            out.extend_from_slice(kept);
        }
        self.trimmed += 1;
        self.packets += 1;
        self.state = State::Header(Vec::with_capacity(5));
    }
}

/// An empty PUBLISH on [`DENIED_TOPIC`] in place of one whose first byte is `first`
/// and whose packet id (empty at QoS 0) is `id`: the same QoS and packet id, no retain
/// flag, so rumqttd acknowledges it and no source reads it.
fn denied_publish(first: u8, id: &[u8], out: &mut Vec<u8>) {
    out.push(first & 0xf6);
    encode_remaining_length(2 + DENIED_TOPIC.len() + id.len(), out);
    out.extend_from_slice(&(DENIED_TOPIC.len() as u16).to_be_bytes());
    out.extend_from_slice(DENIED_TOPIC.as_bytes());
    out.extend_from_slice(id);
}

/// Reads the broker → device stream of one connection: a SUBACK answering a SUBSCRIBE
/// whose filters the [`Inspector`] refused gets 0x80 (failure) for those filters.
/// Everything else passes unchanged.
#[derive(Debug)]
pub struct Subacks {
    refusals: Refusals,
    state: Down,
}

/// Where [`Subacks`] is in the broker's byte stream.
#[derive(Debug)]
enum Down {
    Header(Vec<u8>),
    Pass(usize),
    /// A SUBACK: read whole (`header`: its fixed header's length).
    Suback {
        packet: Vec<u8>,
        header: usize,
        left: usize,
    },
}

impl Subacks {
    /// For the connection whose [`Inspector::refusals`] these are.
    pub fn new(refusals: Refusals) -> Self {
        Self {
            refusals,
            state: Down::Header(Vec::with_capacity(5)),
        }
    }

    /// Appends to `out` what of `input` goes on to the device.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match &mut self.state {
                Down::Header(header) => {
                    match header_byte(header, &mut input) {
                        FixedHeader::Whole { remaining, .. } if header[0] >> 4 == 9 => {
                            let header = std::mem::take(header);
                            self.state = Down::Suback {
                                header: header.len(),
                                packet: header,
                                left: remaining,
                            };
                            self.finish_suback(out);
                        }
                        FixedHeader::Whole { remaining, .. } => {
                            out.extend_from_slice(header);
                            self.state = Down::Pass(remaining);
                            self.next_if_done();
                        }
                        // Malformed (rumqttd sends none): passed on from here.
                        FixedHeader::Malformed => {
                            out.extend_from_slice(header);
                            self.state = Down::Pass(usize::MAX);
                        }
                        FixedHeader::More => {}
                    }
                }
                Down::Pass(left) => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    self.next_if_done();
                }
                Down::Suback { packet, left, .. } => {
                    let n = (*left).min(input.len());
                    packet.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    self.finish_suback(out);
                }
            }
        }
    }

    fn next_if_done(&mut self) {
        if matches!(self.state, Down::Pass(0)) {
            self.state = Down::Header(Vec::with_capacity(5));
        }
    }

    fn finish_suback(&mut self, out: &mut Vec<u8>) {
        let Down::Suback {
            packet,
            header,
            left: 0,
        } = &mut self.state
        else {
            return;
        };
        if let Some(id) = packet.get(*header..*header + 2) {
            let id = u16::from_be_bytes([id[0], id[1]]);
            let refused = self
                .refusals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            for i in refused.into_iter().flatten() {
                if let Some(code) = packet.get_mut(*header + 2 + i) {
                    *code = 0x80;
                }
            }
        }
        out.extend_from_slice(packet);
        self.state = Down::Header(Vec::with_capacity(5));
    }
}

/// What one more byte makes of a fixed header being read.
pub(crate) enum FixedHeader {
    /// More bytes to come.
    More,
    /// Whole: the packet's remaining length, and the bytes that length took.
    Whole { remaining: usize, len: usize },
    /// A fifth length byte: not MQTT.
    Malformed,
}

/// Moves the next byte of `input` (not empty) into `header`, a fixed header being read.
pub(crate) fn header_byte(header: &mut Vec<u8>, input: &mut &[u8]) -> FixedHeader {
    header.push(input[0]);
    *input = &input[1..];
    match remaining_length(&header[1..]) {
        Some((remaining, len)) => FixedHeader::Whole { remaining, len },
        None if header.len() == 5 => FixedHeader::Malformed,
        None => FixedHeader::More,
    }
}

/// The remaining length encoded in `bytes` (MQTT's variable byte integer) and how many
/// bytes it took; `None` while incomplete or past 4 bytes.
pub(crate) fn remaining_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Bytes the remaining length `n` takes encoded.
fn remaining_length_len(n: usize) -> usize {
    match n {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    }
}

pub(crate) fn encode_remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

/// A trimmed message's payload: the original size and the bytes kept.
pub fn parse_trimmed(payload: &[u8]) -> Option<(u64, &[u8])> {
    let rest = payload.strip_prefix(OVERSIZED_MARK)?;
    let end = rest.iter().position(|&b| b == 0)?;
    let size = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    Some((size, &rest[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: u8, topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut packet = vec![0x30 | (qos << 1)];
        encode_remaining_length(body.len(), &mut packet);
        packet.extend_from_slice(&body);
        packet
    }

    /// Feeds `stream` in pieces of `step` bytes.
    fn trim(limit: usize, stream: &[u8], step: usize) -> (Vec<u8>, u64) {
        let mut t = Inspector::new(limit);
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            t.feed(piece, &mut out).unwrap();
        }
        (out, t.trimmed())
    }

    #[test]
    fn an_oversized_publish_becomes_a_trimmed_one_and_everything_else_passes_unchanged() {
        let connect = [0x10, 0x02, 0xaa, 0xbb];
        let small = publish(1, "devices/a/telemetry", 7, br#"{"device_id":"a"}"#);
        let big_payload: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let big = publish(1, "devices/a/telemetry", 8, &big_payload);
        let after = publish(0, "devices/a/telemetry", 0, br#"{"device_id":"a","n":2}"#);
        let stream = [&connect[..], &small, &big, &after].concat();
        for step in [1, 3, 1000, 1 << 20] {
            let mut t = Inspector::new(64 * 1024);
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                t.feed(piece, &mut out).unwrap();
            }
            assert_eq!(t.packets(), 4, "step {step}");
            let trimmed = t.trimmed();
            assert_eq!(trimmed, 1, "step {step}");
            let expected_big = publish(
                1,
                "devices/a/telemetry",
                8,
                &[OVERSIZED_MARK, b"300000\0", &big_payload[..KEPT]].concat(),
            );
            let expected = [&connect[..], &small, &expected_big, &after].concat();
            assert_eq!(out, expected, "step {step}");
        }
        let trimmed = [OVERSIZED_MARK, b"300000\0abc"].concat();
        let (size, kept) = parse_trimmed(&trimmed).unwrap();
        assert_eq!((size, kept), (300_000, &b"abc"[..]));
        assert_eq!(parse_trimmed(b"{\"a\":1}"), None);
    }

    #[test]
    fn a_trimmed_publish_fits_a_small_limit_and_one_whose_topic_cannot_is_denied() {
        let limit = 600;
        let payload = [b'x'; 2_000];
        let (out, trimmed) = trim(limit, &publish(1, "devices/a/telemetry", 9, &payload), 7);
        assert_eq!(trimmed, 1);
        let (remaining, len) = remaining_length(&out[1..]).expect("length");
        assert_eq!(1 + len + remaining, out.len());
        assert!(1 + len + remaining <= limit, "{} bytes", out.len());
        let body = &out[1 + len + 2 + "devices/a/telemetry".len() + 2..];
        let (size, kept) = parse_trimmed(body).expect("trimmed");
        assert_eq!(size, 2_000);
        assert!(!kept.is_empty() && kept.iter().all(|&b| b == b'x'));
        // A topic longer than the limit: the QoS flow completes, nothing is kept.
        let topic = format!("devices/a/{}", "t".repeat(700));
        let (out, trimmed) = trim(limit, &publish(1, &topic, 9, &payload), 7);
        assert_eq!(trimmed, 1);
        assert_eq!(out, publish(1, DENIED_TOPIC, 9, &[]));
    }

    #[test]
    fn packets_within_the_limit_and_other_kinds_pass_whole() {
        let subscribe_big = {
            let mut p = vec![0x82];
            encode_remaining_length(100_000, &mut p);
            p.extend(std::iter::repeat_n(0u8, 100_000));
            p
        };
        let qos0 = publish(0, "t", 0, &[b'x'; 60_000]);
        let stream = [&subscribe_big[..], &qos0].concat();
        let (out, trimmed) = trim(64 * 1024, &stream, 4096);
        assert_eq!(trimmed, 0);
        assert_eq!(out, stream);
    }

    fn subscribe(id: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        for f in filters {
            body.extend_from_slice(&(f.len() as u16).to_be_bytes());
            body.extend_from_slice(f.as_bytes());
            body.push(1);
        }
        let mut packet = vec![0x82];
        encode_remaining_length(body.len(), &mut packet);
        packet.extend_from_slice(&body);
        packet
    }

    fn acl() -> Arc<Acl> {
        Arc::new(Acl::new(&sluice_config::AclConfig {
            publish: vec!["devices/{client_id}/#".into()],
            subscribe: vec!["commands/{client_id}".into()],
        }))
    }

    #[test]
    fn a_devices_retained_publish_passes_without_its_retain_flag() {
        let plain = publish(1, "devices/d1/state", 7, b"on");
        let mut retained = plain.clone();
        retained[0] |= RETAIN;
        for acl in [None, Some(acl())] {
            let mut t = Inspector::new(64 * 1024);
            if let Some(acl) = acl {
                t = t.with_acl(acl, "d1".into());
            }
            let mut out = Vec::new();
            t.feed(&retained, &mut out).unwrap();
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn a_publish_outside_the_acl_is_emptied_onto_the_denied_topic_with_its_packet_id() {
        let own = publish(1, "devices/d1/telemetry", 7, br#"{"device_id":"d1"}"#);
        let other = publish(1, "devices/d2/telemetry", 8, br#"{"device_id":"d2"}"#);
        let mut retained_other = publish(0, "devices/d2/x", 0, b"y");
        retained_other[0] |= 1;
        let big_own = publish(1, "devices/d1/telemetry", 9, &[b'x'; 100_000]);
        let ok_sub = subscribe(3, &["commands/d1"]);
        let stream = [&own[..], &other, &retained_other, &big_own, &ok_sub].concat();
        for step in [1, 5, 1 << 20] {
            let mut t = Inspector::new(64 * 1024).with_acl(acl(), "d1".into());
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                t.feed(piece, &mut out).unwrap();
            }
            let denied = [0x32, 18, 0, 14]
                .iter()
                .copied()
                .chain(DENIED_TOPIC.bytes())
                .chain([0, 8])
                .collect::<Vec<u8>>();
            let denied_qos0 = [0x30, 16, 0, 14]
                .iter()
                .copied()
                .chain(DENIED_TOPIC.bytes())
                .collect::<Vec<u8>>();
            let trimmed = publish(
                1,
                "devices/d1/telemetry",
                9,
                &[OVERSIZED_MARK, b"100000\0", &[b'x'; KEPT]].concat(),
            );
            let expected = [&own[..], &denied, &denied_qos0, &trimmed, &ok_sub].concat();
            assert_eq!(out, expected, "step {step}");
            assert_eq!((t.denied(), t.trimmed(), t.packets()), (2, 1, 5));
        }
        // A PUBLISH too short for a topic length passes as it is (rumqttd refuses it),
        // and the packet after it is read as a packet of its own.
        let mut t = Inspector::new(64 * 1024).with_acl(acl(), "d1".into());
        let stream = [&[0x30, 0x00][..], &other].concat();
        let mut out = Vec::new();
        for piece in stream.chunks(1) {
            t.feed(piece, &mut out).unwrap();
        }
        assert_eq!(&out[..2], &[0x30, 0x00]);
        assert_eq!((t.denied(), t.packets()), (1, 2));
    }

    #[test]
    fn a_refused_filter_is_swapped_and_its_suback_code_becomes_a_failure() {
        let mixed = subscribe(4, &["commands/d1", "commands/+", "commands/d1/x"]);
        let own = subscribe(5, &["commands/d1"]);
        let stream = [&mixed[..], &own].concat();
        for step in [1, 3, 1 << 20] {
            let mut t = Inspector::new(64 * 1024).with_acl(acl(), "d1".into());
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                t.feed(piece, &mut out).unwrap();
            }
            let swapped = subscribe(4, &["commands/d1", REFUSED_FILTER, REFUSED_FILTER]);
            assert_eq!(out, [&swapped[..], &own].concat(), "step {step}");
            assert_eq!(t.refused(), (2, Some("commands/d1/x")));
            // rumqttd grants all three, then the next SUBACK and a PUBLISH.
            let subacks = [
                &[0x90, 5, 0, 4, 1, 1, 1][..],
                &[0x90, 3, 0, 5, 1],
                &publish(1, "commands/d1", 9, b"on"),
            ]
            .concat();
            let mut down = Subacks::new(t.refusals());
            let mut out = Vec::new();
            for piece in subacks.chunks(step) {
                down.feed(piece, &mut out);
            }
            let expected = [
                &[0x90, 5, 0, 4, 1, 0x80, 0x80][..],
                &[0x90, 3, 0, 5, 1],
                &publish(1, "commands/d1", 9, b"on"),
            ]
            .concat();
            assert_eq!(out, expected, "step {step}");
            assert!(t.refusals().lock().unwrap().is_empty(), "answered once");
        }
    }
}
