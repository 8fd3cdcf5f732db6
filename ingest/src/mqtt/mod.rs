//! MQTT: the subscribing source (rumqttc) and the embedded broker (rumqttd).
//!
//! # Layout
//! - [`source`]: subscribe, decode, hand on; reconnect with backoff, logged once per outage.
//! - [`broker`]: start rumqttd on its own thread behind the door, a relay that holds
//!   devices back while Sluice is behind.
//! - [`v5`]: MQTT 5 devices at the door, translated to and from rumqttd's 3.1.1.
//! - QoS 1 messages are fsynced to the write-ahead log (`crate::wal`) before their PUBACK.

pub mod auth;
pub mod broker;
pub mod inspect;
pub mod source;
pub mod v5;

pub use broker::{EmbeddedBroker, start_embedded_broker};
pub use source::MqttSource;
