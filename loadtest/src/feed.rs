//! Where `record` reads from: an MQTT subscription, a Kafka consumer, or Kinesis shard
//! iterators. Each yields [`Recorded`] messages; the recording loop (limits, idle stop,
//! Ctrl-C, the file) is the same for all three.
//!
//! Arrival times: MQTT messages are stamped when they reach the recorder; Kafka records
//! carry their record timestamp (producer create time or broker append time) and Kinesis
//! records their `ApproximateArrivalTimestamp`, which keep the original gaps better
//! than the poll loop would.

use std::time::Duration;

use anyhow::bail;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};

use crate::record::{Recorded, epoch_us};
use crate::target::connect_client;

/// A subscription being recorded.
pub enum Feed {
    /// MQTT topics.
    Mqtt {
        /// The client (for re-subscribing).
        client: AsyncClient,
        /// Its event loop (boxed: it is large).
        events: Box<EventLoop>,
        /// Topic filters.
        topics: Vec<String>,
        /// Subscription QoS.
        qos: QoS,
        /// SUBACKs seen since the last (re)connect.
        subacks: usize,
    },
    /// Kafka topics through a consumer group of its own.
    #[cfg(feature = "kafka")]
    Kafka(Box<rdkafka::consumer::StreamConsumer>),
    /// Kinesis shards.
    #[cfg(feature = "kinesis")]
    Kinesis(Box<kinesis::Shards>),
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Feed")
    }
}

impl Feed {
    /// Connects and subscribes. `from_beginning` reads Kafka and Kinesis from the
    /// oldest retained record instead of from now.
    pub async fn open(
        source: &str,
        topics: &[String],
        qos: u8,
        from_beginning: bool,
    ) -> anyhow::Result<Self> {
        let _ = from_beginning;
        if source.starts_with("mqtt://") {
            let qos = if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let id = format!("sluice-loadtest-record-{}", std::process::id());
            let (client, events) =
                connect_client(source, id, 1000, 64, &Default::default()).await?;
            for topic in topics {
                client.subscribe(topic.clone(), qos).await?;
            }
            return Ok(Self::Mqtt {
                client,
                events: Box::new(events),
                topics: topics.to_vec(),
                qos,
                subacks: 0,
            });
        }
        #[cfg(feature = "kafka")]
        if source.starts_with("kafka://") {
            return kafka::open(source, topics, from_beginning).map(|c| Self::Kafka(Box::new(c)));
        }
        #[cfg(feature = "kinesis")]
        if source.starts_with("kinesis://") {
            return kinesis::Shards::open(source, from_beginning)
                .await
                .map(|s| Self::Kinesis(Box::new(s)));
        }
        bail!(
            "--source {source:?}: expected mqtt://HOST:PORT, kafka://HOST:PORT[/TOPIC] or \
             kinesis://STREAM?endpoint=URL (Kafka and Kinesis need their cargo features)"
        )
    }

    /// The next message; `None` after an event that was not one.
    pub async fn next(&mut self) -> anyhow::Result<Option<Recorded>> {
        match self {
            Self::Mqtt {
                client,
                events,
                topics,
                qos,
                subacks,
            } => match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => Ok(Some(Recorded {
                    arrival_us: epoch_us(),
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                })),
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    *subacks += 1;
                    if *subacks == topics.len() {
                        ready(&topics.join(", "));
                    }
                    Ok(None)
                }
                Ok(_) => Ok(None),
                Err(e) => {
                    *subacks = 0;
                    tracing::warn!(error = %e, "lost the broker; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    for topic in topics.iter() {
                        client.subscribe(topic.clone(), *qos).await?;
                    }
                    Ok(None)
                }
            },
            #[cfg(feature = "kafka")]
            Self::Kafka(consumer) => kafka::next(consumer).await,
            #[cfg(feature = "kinesis")]
            Self::Kinesis(shards) => shards.next().await,
        }
    }

    /// Runs the feed in its own task and hands messages over a channel, so the caller
    /// can time out and stop without cancelling a read halfway (neither rumqttc's poll
    /// nor a round of Kinesis GetRecords is cancellation-safe). Dropping the receiver
    /// stops the task; MQTT then disconnects cleanly.
    pub fn spawn(mut self) -> tokio::sync::mpsc::Receiver<anyhow::Result<Recorded>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let mqtt = match &self {
            Self::Mqtt { client, .. } => Some(client.clone()),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = tx.closed() => break,
                    next = self.next() => next,
                };
                let stop = next.is_err();
                match next {
                    Ok(None) => continue,
                    Ok(Some(r)) => {
                        if tx.send(Ok(r)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                    }
                }
                if stop {
                    break;
                }
            }
            if let Some(client) = mqtt {
                let _ = client.disconnect().await;
                // Let the event loop write the DISCONNECT.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.next()).await;
            }
        });
        rx
    }
}

/// Scripts (and the tests) wait for this line before publishing.
fn ready(what: &str) {
    eprintln!("recording: subscribed to {what}");
}

#[cfg(feature = "kafka")]
mod kafka {
    use anyhow::Context;
    use rdkafka::Message as _;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};

    use super::ready;
    use crate::record::{Recorded, epoch_us};

    /// `kafka://HOST:PORT[/TOPIC]`: the topic in the URL, or the `--topic`s.
    pub(super) fn open(
        source: &str,
        topics: &[String],
        from_beginning: bool,
    ) -> anyhow::Result<StreamConsumer> {
        let rest = source.trim_start_matches("kafka://");
        let (brokers, topics) = match rest.split_once('/') {
            Some((b, t)) if !t.is_empty() => (b, vec![t.to_owned()]),
            _ => (rest.trim_end_matches('/'), topics.to_vec()),
        };
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("sluice-loadtest-record-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set(
                "auto.offset.reset",
                if from_beginning { "earliest" } else { "latest" },
            )
            .set("log_level", "3")
            .create()
            .with_context(|| format!("cannot create a Kafka consumer for {source}"))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .with_context(|| format!("cannot subscribe to {topics:?} on {source}"))?;
        ready(&topics.join(", "));
        Ok(consumer)
    }

    pub(super) async fn next(consumer: &StreamConsumer) -> anyhow::Result<Option<Recorded>> {
        let m = consumer.recv().await.context("kafka consumer")?;
        Ok(Some(Recorded {
            arrival_us: m
                .timestamp()
                .to_millis()
                .map_or_else(epoch_us, |ms| ms * 1000),
            topic: m.topic().to_owned(),
            payload: m.payload().unwrap_or_default().to_vec(),
        }))
    }
}

#[cfg(feature = "kinesis")]
mod kinesis {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use aws_sdk_kinesis::Client;
    use aws_sdk_kinesis::types::ShardIteratorType;

    use super::ready;
    use crate::record::{Recorded, epoch_us};
    use crate::target::{KinesisUrl, kinesis_client, parse_kinesis_url};

    /// Every open shard's iterator, polled in turn at most 5 times a second per shard
    /// (the GetRecords limit). Shards created later by resharding are not followed.
    #[derive(Debug)]
    pub struct Shards {
        client: Client,
        url: KinesisUrl,
        iterators: Vec<String>,
        buffer: VecDeque<Recorded>,
        last_round: Option<Instant>,
    }

    impl Shards {
        pub(super) async fn open(source: &str, from_beginning: bool) -> anyhow::Result<Self> {
            let url = parse_kinesis_url(source)?;
            let client = kinesis_client(&url).await;
            let shards = client
                .list_shards()
                .stream_name(&url.stream)
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot connect to {source}: {}",
                        aws_sdk_kinesis::error::DisplayErrorContext(e)
                    )
                })?;
            let kind = if from_beginning {
                ShardIteratorType::TrimHorizon
            } else {
                ShardIteratorType::Latest
            };
            let mut iterators = Vec::new();
            for shard in shards.shards() {
                let it = client
                    .get_shard_iterator()
                    .stream_name(&url.stream)
                    .shard_id(shard.shard_id())
                    .shard_iterator_type(kind.clone())
                    .send()
                    .await
                    .context("GetShardIterator")?;
                if let Some(it) = it.shard_iterator() {
                    iterators.push(it.to_owned());
                }
            }
            ready(&url.stream);
            Ok(Self {
                client,
                url,
                iterators,
                buffer: VecDeque::new(),
                last_round: None,
            })
        }

        pub(super) async fn next(&mut self) -> anyhow::Result<Option<Recorded>> {
            if let Some(r) = self.buffer.pop_front() {
                return Ok(Some(r));
            }
            if let Some(last) = self.last_round {
                tokio::time::sleep_until((last + Duration::from_millis(200)).into()).await;
            }
            self.last_round = Some(Instant::now());
            let mut next_iterators = Vec::new();
            for it in std::mem::take(&mut self.iterators) {
                let out = match self
                    .client
                    .get_records()
                    .shard_iterator(&it)
                    .limit(10_000)
                    .send()
                    .await
                {
                    Ok(out) => out,
                    Err(e) => {
                        // Throttled or a hiccup: keep the iterator and try next round.
                        tracing::warn!(error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "GetRecords failed");
                        next_iterators.push(it);
                        continue;
                    }
                };
                for r in out.records() {
                    self.buffer.push_back(Recorded {
                        arrival_us: r
                            .approximate_arrival_timestamp()
                            .and_then(|t| t.to_millis().ok())
                            .map_or_else(epoch_us, |ms| ms * 1000),
                        topic: self.url.stream.clone(),
                        payload: r.data().as_ref().to_vec(),
                    });
                }
                // A closed shard (after resharding) has no next iterator.
                if let Some(next) = out.next_shard_iterator() {
                    next_iterators.push(next.to_owned());
                }
            }
            self.iterators = next_iterators;
            Ok(self.buffer.pop_front())
        }
    }
}
