//! What the driver sends: a [`Workload`] yields [`Message`]s with their intended send
//! times. Scenarios ([`crate::scenario`]) and recordings ([`crate::record`]) are both
//! workloads, so one driver, one set of targets and one report serve both.

/// One message to send. The driver reuses one value, so filling it allocates nothing
/// once the buffers have grown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// MQTT topic (also the Kafka topic suffix for templates).
    pub topic: String,
    /// Device or user id: picks the connection (so per-device order holds) and is the
    /// Kafka/Kinesis record key.
    pub key: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// Empties the message, keeping its buffers.
    pub fn clear(&mut self) {
        self.topic.clear();
        self.key.clear();
        self.payload.clear();
    }
}

/// A source of messages, each due at an offset from the start of the run.
pub trait Workload: Send {
    /// Fills `msg` with the next message and returns when it is due, µs from the start
    /// (non-decreasing); `None` when the workload is done.
    fn next(&mut self, msg: &mut Message) -> Option<u64>;

    /// How many messages the workload will yield, when known.
    fn total(&self) -> Option<u64>;

    /// Fills `msg` with a probe event from id `key`, due at `due_us`.
    fn probe(&mut self, key: &str, due_us: u64, msg: &mut Message);

    /// Malformed payloads yielded on purpose so far.
    fn malformed(&self) -> u64 {
        0
    }
}
