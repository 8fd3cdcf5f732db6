//! The embedded broker's door trims oversized PUBLISH packets.
//!
//! rumqttd disconnects a client whose packet is larger than `max_payload_size`
//! without acknowledging it; the device reconnects, sends the same QoS 1 message
//! again, and loops so for as long as it runs: nothing it publishes after that message
//! ever lands. mosquitto completes the QoS flow and drops such a message. The door
//! relays the bytes from devices to rumqttd, so it cuts each PUBLISH longer than the
//! limit down to one carrying [`OVERSIZED_MARK`], the original payload's size and its
//! first bytes, on the same topic with the same packet id: rumqttd acknowledges it
//! (the device goes on), and the source's decoder dead-letters it as `oversized`
//! (see `crate::decode`). Packets are parsed only as far as their fixed header
//! (MQTT 3.1.1, the embedded broker's protocol); every other byte passes unchanged.

/// Begins the payload of a trimmed message: then the original payload size in
/// decimal, a NUL, and its first bytes.
pub const OVERSIZED_MARK: &[u8] = b"\0sluice:oversized\0";

/// Payload bytes a trimmed message keeps.
const KEPT: usize = 1024;

/// Where the door is in the device's byte stream.
#[derive(Debug)]
enum State {
    /// Reading a fixed header (type byte, then up to 4 bytes of remaining length).
    Header(Vec<u8>),
    /// Passing on the rest of a packet within the limit.
    Pass(usize),
    /// An oversized PUBLISH: reading its topic and packet id (`need`: the variable
    /// header's length once the topic length is known).
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
}

/// Trims the device → broker stream of one connection.
#[derive(Debug)]
pub struct Trimmer {
    limit: usize,
    state: State,
    trimmed: u64,
    packets: u64,
}

impl Trimmer {
    /// A trimmer of packets longer than `limit` bytes (rumqttd's `max_payload_size`,
    /// which it compares with the whole packet).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            state: State::Header(Vec::with_capacity(5)),
            trimmed: 0,
            packets: 0,
        }
    }

    /// Whole packets passed on so far (the first is the CONNECT).
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Messages trimmed so far.
    pub fn trimmed(&self) -> u64 {
        self.trimmed
    }

    /// Appends to `out` what of `input` goes on to the broker.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match &mut self.state {
                State::Header(header) => {
                    header.push(input[0]);
                    input = &input[1..];
                    let Some((remaining, len)) = remaining_length(&header[1..]) else {
                        // A malformed length (a fifth continuation byte): pass it all
                        // on; rumqttd closes the connection.
                        if header.len() == 5 {
                            out.extend_from_slice(header);
                            self.state = State::Pass(usize::MAX);
                        }
                        continue;
                    };
                    let frame = 1 + len + remaining;
                    let first = header[0];
                    if first >> 4 == 3 && frame > self.limit {
                        self.state = State::Head {
                            first,
                            remaining,
                            head: Vec::new(),
                            need: None,
                        };
                    } else {
                        out.extend_from_slice(header);
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
                    self.state = State::Payload {
                        first: *first,
                        head: std::mem::take(head),
                        size,
                        kept: Vec::with_capacity(KEPT.min(size)),
                        left: size,
                    };
                    self.finish_payload(out);
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
    }

    /// After a packet passed on whole: the next fixed header.
    fn next_if_done(&mut self) {
        if matches!(self.state, State::Pass(0)) {
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
        let body = head.len() + OVERSIZED_MARK.len() + size_text.len() + 1 + kept.len();
        out.push(*first);
        encode_remaining_length(body, out);
        out.extend_from_slice(head);
        out.extend_from_slice(OVERSIZED_MARK);
        out.extend_from_slice(size_text);
        out.push(0);
        out.extend_from_slice(kept);
        self.trimmed += 1;
        self.packets += 1;
        self.state = State::Header(Vec::with_capacity(5));
    }
}

/// The remaining length encoded in `bytes` (MQTT's variable byte integer) and how many
/// bytes it took; `None` while incomplete or past 4 bytes.
fn remaining_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn encode_remaining_length(mut n: usize, out: &mut Vec<u8>) {
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
        let mut t = Trimmer::new(limit);
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            t.feed(piece, &mut out);
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
            let mut t = Trimmer::new(64 * 1024);
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                t.feed(piece, &mut out);
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
}
