//! Where messages go. A target takes messages in schedule order, sends them, and reports
//! each acknowledgement to [`Stats`] against the message's due time.
//!
//! - `mqtt://HOST:PORT`: rumqttc clients, QoS 0 or 1, messages spread over connections
//!   by key so each device's order holds; the ack is the PUBACK (QoS 1) or the write to
//!   the socket (QoS 0).
//! - `http://HOST:PORT`: NDJSON batches POSTed to `/api/ingest/<stream>`; the ack is
//!   the 2xx response.
//! - `kafka://HOST:PORT/TOPIC` (feature `kafka`): rdkafka producer keyed by id; the ack
//!   is the delivery report.
//! - `kinesis://STREAM?endpoint=URL` (feature `kinesis`): PutRecords batches of up to
//!   500, failed records retried; the ack is the response that accepted the record.
//! - `file:PATH`: JSON lines; the ack is the write.

mod batch;
mod file;
mod http;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "kinesis")]
mod kinesis;
pub(crate) mod mqtt;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::stats::Stats;
use crate::workload::Message;

pub use file::FileTarget;
pub use http::HttpClient;
pub use http::HttpTarget;
#[cfg(feature = "kafka")]
pub use kafka::{KafkaTarget, parse_kafka_url};
#[cfg(feature = "kinesis")]
pub use kinesis::{KinesisTarget, KinesisUrl, kinesis_client, parse_kinesis_url};
pub use mqtt::{MqttTarget, MqttTls, connect_client};

/// How to reach the target.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// `mqtt://HOST:PORT`, `http://HOST:PORT`, `kafka://HOST:PORT/TOPIC`,
    /// `kinesis://STREAM?endpoint=URL`, or `file:PATH`.
    pub url: String,
    /// MQTT QoS, 0 or 1.
    pub qos: u8,
    /// Client connections (MQTT) or concurrent requests (HTTP).
    pub connections: usize,
    /// Sluice stream for HTTP ingest (`/api/ingest/<stream>`).
    pub stream: String,
    /// Events per HTTP request.
    pub batch: usize,
    /// MQTT client id prefix.
    pub client_id: String,
    /// MQTT over TLS: the CA and the client certificates.
    pub tls: MqttTls,
}

/// A connected target.
#[derive(Debug)]
pub enum Target {
    /// MQTT broker.
    Mqtt(MqttTarget),
    /// Sluice HTTP ingest (boxed, like Kinesis: the clients are large).
    Http(Box<HttpTarget>),
    /// JSON-lines file.
    File(FileTarget),
    /// Kafka topic.
    #[cfg(feature = "kafka")]
    Kafka(KafkaTarget),
    /// Kinesis data stream.
    #[cfg(feature = "kinesis")]
    Kinesis(Box<KinesisTarget>),
}

impl Target {
    /// Connects; fails with a clear message when the target cannot be reached.
    pub async fn connect(options: &TargetOptions, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let url = options.url.as_str();
        if url.starts_with("mqtt://") || url.starts_with("mqtts://") {
            Ok(Self::Mqtt(MqttTarget::connect(options, stats).await?))
        } else if url.starts_with("http://") {
            Ok(Self::Http(Box::new(
                HttpTarget::connect(options, stats).await?,
            )))
        } else if let Some(path) = url.strip_prefix("file:") {
            Ok(Self::File(FileTarget::create(
                path.trim_start_matches("//"),
                stats,
            )?))
        } else if url.starts_with("kafka://") {
            #[cfg(feature = "kafka")]
            return Ok(Self::Kafka(KafkaTarget::connect(url, stats)?));
            #[cfg(not(feature = "kafka"))]
            bail!("target {url}: this build has no Kafka support (cargo feature `kafka`)")
        } else if url.starts_with("kinesis://") {
            #[cfg(feature = "kinesis")]
            return Ok(Self::Kinesis(Box::new(
                KinesisTarget::connect(url, options.connections, stats).await?,
            )));
            #[cfg(not(feature = "kinesis"))]
            bail!("target {url}: this build has no Kinesis support (cargo feature `kinesis`)")
        } else {
            bail!(
                "target {url:?}: expected mqtt://HOST:PORT, http://HOST:PORT, \
                 kafka://HOST:PORT/TOPIC, kinesis://STREAM?endpoint=URL or file:PATH"
            )
        }
    }

    /// Sends one message due at `due_us`. Waits when the target is saturated (the wait
    /// is counted as backpressure).
    pub async fn send(&mut self, msg: &Message, due_us: u64) -> anyhow::Result<()> {
        match self {
            Self::Mqtt(t) => t.send(msg, due_us).await,
            Self::Http(t) => t.send(msg, due_us).await,
            Self::File(t) => t.send(msg, due_us),
            #[cfg(feature = "kafka")]
            Self::Kafka(t) => t.send(msg, due_us).await,
            #[cfg(feature = "kinesis")]
            Self::Kinesis(t) => t.send(msg, due_us).await,
        }
    }

    /// Sends anything buffered (called before the driver sleeps).
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Mqtt(_) => Ok(()),
            #[cfg(feature = "kafka")]
            Self::Kafka(_) => Ok(()),
            Self::Http(t) => t.flush().await,
            Self::File(t) => t.flush(),
            #[cfg(feature = "kinesis")]
            Self::Kinesis(t) => t.flush().await,
        }
    }

    /// Waits up to `timeout` for outstanding acknowledgements, then disconnects.
    pub async fn finish(self, timeout: Duration) -> anyhow::Result<()> {
        match self {
            Self::Mqtt(t) => t.finish(timeout).await,
            Self::Http(t) => (*t).finish(timeout).await,
            Self::File(t) => t.finish(),
            #[cfg(feature = "kafka")]
            Self::Kafka(t) => t.finish(timeout).await,
            #[cfg(feature = "kinesis")]
            Self::Kinesis(t) => (*t).finish(timeout).await,
        }
    }
}

/// Waits until every sent message is acknowledged or failed, or `timeout` passes.
async fn wait_for_acks(stats: &Stats, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let live = stats.live();
        if live.acked + live.errors >= live.sent || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
