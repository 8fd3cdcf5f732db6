//! Kafka target (`kafka://HOST:PORT/TOPIC`): an rdkafka producer keyed by device or user
//! id. The ack is the delivery report, taken in the producer's delivery callback with
//! the message's due time as its opaque, so no task or future per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::stats::Stats;
use crate::workload::Message;

/// Routes delivery reports to [`Stats`].
struct Deliveries {
    stats: Arc<Stats>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, due_us: Box<u64>) {
        match result {
            Ok(_) => self.stats.acked(*due_us),
            Err((e, _)) => {
                tracing::warn!(error = %e, "kafka delivery failed");
                self.stats.errors(1);
            }
        }
    }
}

/// Produces to one Kafka topic.
pub struct KafkaTarget {
    producer: ThreadedProducer<Deliveries>,
    topic: String,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for KafkaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTarget")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// `kafka://HOST:PORT[,HOST:PORT…]/TOPIC` → (brokers, topic).
pub fn parse_kafka_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("kafka://")
        .with_context(|| format!("{url:?} does not start with kafka://"))?;
    match rest.split_once('/') {
        Some((brokers, topic)) if !brokers.is_empty() && !topic.is_empty() => {
            Ok((brokers.to_owned(), topic.to_owned()))
        }
        _ => bail!("{url:?}: expected kafka://HOST:PORT/TOPIC"),
    }
}

impl KafkaTarget {
    /// Creates the producer and checks the broker answers and the topic exists (tansu,
    /// like many production clusters, does not create topics on first use).
    pub fn connect(url: &str, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let (brokers, topic) = parse_kafka_url(url)?;
        let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "60000")
            .set("log_level", "3")
            .create_with_context(Deliveries {
                stats: stats.clone(),
            })
            .with_context(|| format!("cannot create a Kafka producer for {url}"))?;
        let metadata = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if !found {
            bail!("{url}: topic {topic:?} does not exist; create it first");
        }
        Ok(Self {
            producer,
            topic,
            stats,
        })
    }

    /// Enqueues the message; waits (backpressure) while the producer's queue is full.
    pub async fn send(&mut self, msg: &Message, due_us: u64) -> anyhow::Result<()> {
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new(due_us))
            .key(msg.key.as_bytes())
            .payload(msg.payload.as_slice());
        let mut waiting: Option<Instant> = None;
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    waiting.get_or_insert_with(Instant::now);
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => {
                    self.stats.errors(1);
                    bail!("kafka produce failed: {e}");
                }
            }
        }
        if let Some(since) = waiting {
            self.stats.backpressure(since.elapsed());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the outstanding delivery reports.
    pub async fn finish(self, timeout: Duration) -> anyhow::Result<()> {
        let producer = self.producer;
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .context("flush task")?
            .map_err(|e| anyhow::anyhow!("kafka flush: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_brokers_and_topic() {
        assert_eq!(
            parse_kafka_url("kafka://127.0.0.1:9092/telemetry").unwrap(),
            ("127.0.0.1:9092".to_owned(), "telemetry".to_owned())
        );
        assert_eq!(
            parse_kafka_url("kafka://a:1,b:2/t").unwrap().0,
            "a:1,b:2".to_owned()
        );
        assert!(parse_kafka_url("kafka://127.0.0.1:9092").is_err());
        assert!(parse_kafka_url("kafka:///t").is_err());
    }
}
