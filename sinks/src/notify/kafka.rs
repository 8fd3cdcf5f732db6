//! Kafka notifier: produces each notification's JSON to a topic, keyed by the alert
//! key (so one key's fire and resolve stay in order on one partition). A published
//! row's `_hops` also goes in the `sluice-hops` header, which Kafka sources read.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_config::KafkaNotifierConfig;
use sluice_core::Notification;
use sluice_core::schema::{HOPS, HOPS_HEADER};

/// How long librdkafka tries one record before reporting failure to the retry loop.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A Kafka producer for one topic.
pub(crate) struct KafkaTarget {
    producer: FutureProducer,
    topic: String,
}

impl KafkaTarget {
    pub(crate) fn new(name: &str, config: &KafkaNotifierConfig) -> Result<Self, String> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", format!("sluice-notify-{name}"))
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create()
            .map_err(|e| format!("cannot create the producer: {e}"))?;
        Ok(Self {
            producer,
            topic: config.topic.clone(),
        })
    }

    pub(crate) async fn deliver(&self, n: &Notification) -> Result<(), String> {
        let payload = serde_json::to_vec(&n.fields).map_err(|e| e.to_string())?;
        let key = n
            .fields
            .get("key")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        let mut record = FutureRecord::to(&self.topic).key(key).payload(&payload);
        if let Some(hops) = n.fields.get(HOPS).and_then(|h| h.as_u64()) {
            let hops = hops.to_string();
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: HOPS_HEADER,
                value: Some(&hops),
            }));
        }
        self.producer
            .send(record, DELIVERY_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }
}
