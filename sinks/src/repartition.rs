//! The repartition topic's producer (`[cluster.repartition]`; see ARCHITECTURE.md,
//! "The repartition topic").
//!
//! A shared MQTT subscription spreads a device's messages over the nodes, and Kinesis
//! shards move between nodes and split, which moves keys between shards. Each node
//! stores the rows it received and publishes them here, one Kafka record per row keyed
//! by the stream's key, so that Kafka's partitioner puts each device in one partition
//! and the node owning that partition holds the device's windows and alert state.
//!
//! A record's payload is the row's declared fields as a JSON object (what the
//! stream's decoder reads back); its headers name the origin, the row's sequence
//! number within it and its hop count. An MQTT source's origin is `<node>/<source>`,
//! numbered by its write-ahead log, and so is HTTP ingest's (`<node>/http:<stream>`,
//! a number per line); a Kinesis shard's is `<source>/<shard>`, numbered by Kinesis,
//! whichever node reads it. Records reach the broker at least once:
//! [`Repartitioner::flush`] runs before every checkpoint, so a checkpoint never covers
//! a row whose record is not delivered, and a crash replays the log (or re-reads the
//! shard) past the checkpoint, publishing those rows again. The consuming source
//! recognises the replays by origin and sequence number.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, UInt8Type};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use sluice_config::{RepartitionConfig, http_source};
use sluice_core::schema::{
    HOPS, HOPS_HEADER, INGEST_TIME, KEY_META, OFFSET, ORIGIN_HEADER, PARTITION, SEQ_HEADER, SOURCE,
};
use sluice_core::{SeqText, SourcePositions, StreamBatch};

/// How long [`Repartitioner::flush`] waits for the broker before the checkpoint fails
/// (and is retried).
const FLUSH_WAIT: Duration = Duration::from_secs(30);

/// What went wrong publishing to the repartition topic.
#[derive(Debug, thiserror::Error)]
pub enum RepartitionError {
    /// The topic could not be created or found.
    #[error("cannot create the repartition topic {topic:?} on {brokers}: {reason}")]
    Topic {
        /// The topic.
        topic: String,
        /// The brokers.
        brokers: String,
        /// The broker's or client's reason.
        reason: String,
    },
    /// The producer could not be built, or a batch could not be encoded.
    #[error("repartition: {0}")]
    Client(String),
    /// Records not yet delivered when a checkpoint wanted them (the broker is slow or
    /// away); the checkpoint waits for the next attempt.
    #[error("{0} records to the repartition topic not yet delivered after {FLUSH_WAIT:?}")]
    Undelivered(u64),
    /// Records the producer gave up on: their rows are in no record, and only a replay
    /// of the write-ahead log publishes them again, so the node must stop.
    #[error(
        "{count} records to the repartition topic were lost ({first}); stopping so that the write-ahead log replays them"
    )]
    Lost {
        /// How many.
        count: u64,
        /// The first failure's reason.
        first: String,
    },
}

/// Counts the records the producer gave up on.
#[derive(Default)]
struct Deliveries {
    lost: AtomicU64,
    first: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.lost.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// One source's partitions greeted, and those whose farewell was said.
type Met = (HashSet<String>, HashSet<String>);

/// Publishes the origin sources' rows to their streams' repartition topics.
pub struct Repartitioner {
    producer: ThreadedProducer<Deliveries>,
    /// Stream → topic and its partition count.
    topics: HashMap<String, (String, i32)>,
    /// Origin source → its `sluice-origin` header: `<node>/<source>` (MQTT), or `None`
    /// when each row's origin is its partition's (`<source>/<shard>`: Kinesis).
    origins: HashMap<String, Option<String>>,
    /// Per source, the partitions (origins `<source>/<partition>`) this process
    /// greeted, and those whose farewell it said; looked up by name on every batch,
    /// so an origin's text is made only when it is sent.
    met: Mutex<HashMap<String, Met>>,
    /// HTTP ingest's origins, and whether each has greeted yet: they greet before
    /// their first row, not at start, since they may never be used and a greeted
    /// origin holds the windows back until it sends or `idle_timeout` passes.
    greet_later: HashMap<String, AtomicBool>,
    /// Stream → its origin sources.
    streams: BTreeMap<String, Vec<String>>,
}

impl std::fmt::Debug for Repartitioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repartitioner")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl Repartitioner {
    /// A producer for `streams` (stream → its origin sources) of node `node`; the
    /// sources in `per_partition` (Kinesis) name each row's origin by its partition.
    /// Creates each stream's topic with `config.partitions` unless it exists.
    pub async fn new(
        config: &RepartitionConfig,
        node: &str,
        streams: &BTreeMap<String, Vec<String>>,
        per_partition: &HashSet<String>,
    ) -> Result<Self, RepartitionError> {
        let origins = streams
            .values()
            .flatten()
            .map(|source| {
                let origin = (!per_partition.contains(source)).then(|| format!("{node}/{source}"));
                (source.clone(), origin)
            })
            .collect();
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &config.brokers);
        let mut topics = HashMap::new();
        for stream in streams.keys() {
            let topic = format!("{}{stream}", config.topic_prefix);
            create_topic(&client, &topic, config).await?;
            topics.insert(stream.clone(), (topic, 0));
        }
        let producer = client
            .clone()
            .set("client.id", format!("sluice-repartition-{node}"))
            // In order and without duplicates within this producer's life, whatever
            // the retries; a replay after a crash is recognised downstream.
            .set("enable.idempotence", "true")
            // Retried until delivered: the checkpoint waits instead (see `flush`).
            .set("message.timeout.ms", "0")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create_with_context(Deliveries::default())
            .map_err(|e| RepartitionError::Client(format!("cannot create the producer: {e}")))?;
        let greet_later = streams
            .keys()
            .map(|stream| (http_source(stream), AtomicBool::new(false)))
            .collect();
        let mut repartitioner = Self {
            producer,
            topics,
            origins,
            met: Mutex::default(),
            greet_later,
            streams: streams.clone(),
        };
        repartitioner.count_partitions()?;
        for (stream, sources) in streams {
            for origin in sources
                .iter()
                .filter(|s| !repartitioner.greet_later.contains_key(*s))
                .filter_map(|s| repartitioner.origins[s].as_ref())
            {
                repartitioner.greet(stream, origin, None)?;
            }
        }
        Ok(repartitioner)
    }

    /// Learns each topic's partition count from the broker.
    fn count_partitions(&mut self) -> Result<(), RepartitionError> {
        for (topic, partitions) in self.topics.values_mut() {
            let metadata = self
                .producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(30))
                .map_err(|e| RepartitionError::Client(format!("no metadata of {topic:?}: {e}")))?;
            *partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len() as i32);
        }
        Ok(())
    }

    /// Sends `origin`'s greeting (a record with its `sluice-origin` header, no
    /// sequence number, no payload), or with `said` its farewell (sequence number
    /// [`Seq::end`]) or goodbye ([`SeqText::REST`]), to every partition of `stream`'s
    /// topic.
    ///
    /// A greeting comes before the origin's first row in each partition, so the
    /// windows there wait for its rows from the start: a node that crashes and replays
    /// its log, or a shard whose reader died, later finds them held back, not closed.
    /// A farewell comes after its last row (a Kinesis shard read to its end), and a
    /// goodbye after a node's last checkpoint at a clean stop ([`rest`](Self::rest)),
    /// so the windows stop waiting for it at once rather than after `idle_timeout`.
    fn greet(
        &self,
        stream: &str,
        origin: &str,
        said: Option<&str>,
    ) -> Result<(), RepartitionError> {
        let (topic, partitions) = &self.topics[stream];
        for partition in 0..*partitions {
            let mut headers = OwnedHeaders::new_with_capacity(2).insert(Header {
                key: ORIGIN_HEADER,
                value: Some(origin),
            });
            if let Some(said) = said {
                headers = headers.insert(Header {
                    key: SEQ_HEADER,
                    value: Some(said),
                });
            }
            let record = BaseRecord::<(), [u8]>::to(topic)
                .partition(partition)
                .payload(&[])
                .headers(headers);
            self.producer.send(record).map_err(|(e, _)| {
                RepartitionError::Client(format!("cannot greet {topic:?}: {e}"))
            })?;
        }
        Ok(())
    }

    /// Before a batch's rows: greets each partition origin of `positions` that this
    /// process has not greeted: every open shard the source listed, whoever reads it,
    /// so that none of them can find its first rows late, and every shard this node
    /// leased. After them: says the farewell of the parents of the shards this node
    /// leased (a split or merged shard is read to its end, and its rows delivered,
    /// before a child is leased), so the windows wait for a parent until its child
    /// holds them back instead, never for neither.
    fn meet(
        &self,
        stream: &str,
        positions: &SourcePositions,
        after_rows: bool,
    ) -> Result<(), RepartitionError> {
        let origin = |partition: &str| format!("{}/{partition}", positions.source);
        let mut met = self.met.lock().unwrap_or_else(|e| e.into_inner());
        let (greeted, gone) = match met.get_mut(&positions.source) {
            Some(met) => met,
            None => met.entry(positions.source.clone()).or_default(),
        };
        let leased = positions
            .offsets
            .iter()
            .filter(|(_, offset)| *offset != SourcePositions::END)
            .map(|(partition, _)| partition);
        if after_rows {
            for parent in leased.filter_map(|p| positions.open.get(p)).flatten() {
                if !gone.contains(parent) {
                    self.greet(stream, &origin(parent), Some(SourcePositions::END))?;
                    gone.insert(parent.clone());
                }
            }
            return Ok(());
        }
        for partition in positions.open.keys().chain(leased) {
            if !greeted.contains(partition) {
                self.greet(stream, &origin(partition), None)?;
                greeted.insert(partition.clone());
            }
        }
        Ok(())
    }

    /// Whether rows of `source` are published (it is an origin).
    pub fn is_origin(&self, source: &str) -> bool {
        self.origins.contains_key(source)
    }

    /// Queues one record per row of `batch` (of an origin source, in a repartitioned
    /// stream; other batches are ignored). Waits while the producer's queue is full.
    pub async fn publish(&self, batch: &StreamBatch) -> Result<(), RepartitionError> {
        let Some((topic, _)) = self.topics.get(&*batch.stream) else {
            return Ok(());
        };
        let Some((positions, origin)) = batch
            .positions
            .as_ref()
            .and_then(|p| Some((p, self.origins.get(&p.source)?)))
        else {
            return Ok(());
        };
        match origin {
            None => self.meet(&batch.stream, positions, false)?,
            Some(origin) => {
                if let Some(greeted) = self.greet_later.get(&positions.source)
                    && !greeted.swap(true, Ordering::Relaxed)
                {
                    self.greet(&batch.stream, origin, None)?;
                }
            }
        }
        let rows = Rows::of(&batch.batch)?;
        let mut hops = itoa::Buffer::new();
        // `<source>/<partition>` per row, made once per partition.
        let mut by_partition: HashMap<&str, String> = HashMap::new();
        for (i, payload) in rows.payloads().enumerate() {
            let hops = hops.format(rows.hops.value(i));
            let origin = match origin {
                Some(origin) => origin.as_str(),
                None => {
                    let partition = rows.partition.value(i);
                    by_partition
                        .entry(partition)
                        .or_insert_with(|| format!("{}/{partition}", positions.source))
                        .as_str()
                }
            };
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: ORIGIN_HEADER,
                    value: Some(origin),
                })
                .insert(Header {
                    key: SEQ_HEADER,
                    value: Some(rows.seq.value(i)),
                })
                .insert(Header {
                    key: HOPS_HEADER,
                    value: Some(hops),
                });
            let mut record = BaseRecord::to(topic).payload(payload).headers(headers);
            if let Some(key) = rows.key(i) {
                record = record.key(key);
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        return Err(RepartitionError::Client(format!(
                            "cannot queue a record for {topic:?}: {e}"
                        )));
                    }
                }
            }
        }
        if origin.is_none() {
            self.meet(&batch.stream, positions, true)?;
        }
        metrics::counter!("sluice_repartition_records_total").increment(rows.len() as u64);
        Ok(())
    }

    /// Says goodbye for this node's HTTP ingest origins that greeted to every
    /// partition of their topics, and waits until it is delivered. Only after the
    /// stop's last checkpoint, which covers every row they published: an origin at
    /// rest must have nothing to replay, since windows no longer wait for it and its
    /// replayed rows could be late.
    ///
    /// MQTT origins say nothing: a broker keeps handing a stopped node's persistent
    /// session its share of the shared subscription (mosquitto 2 does), and those
    /// messages reach the windows only when the node is back, as rows of its origin
    /// with old event times; they are on time only if the origin held the windows
    /// meanwhile (up to `idle_timeout`).
    pub async fn rest(&self) -> Result<(), RepartitionError> {
        for (stream, sources) in &self.streams {
            for source in sources {
                let (Some(greeted), Some(Some(origin))) =
                    (self.greet_later.get(source), self.origins.get(source))
                else {
                    continue;
                };
                if greeted.load(Ordering::Relaxed) {
                    self.greet(stream, origin, Some(SeqText::REST.as_str()))?;
                }
            }
        }
        self.flush().await
    }

    /// Waits until every record queued so far is delivered (before a checkpoint).
    pub async fn flush(&self) -> Result<(), RepartitionError> {
        let deadline = tokio::time::Instant::now() + FLUSH_WAIT;
        loop {
            let lost = self.producer.context().lost.load(Ordering::Relaxed);
            if lost > 0 {
                let first = self.producer.context().first.lock();
                let first = first.unwrap_or_else(|e| e.into_inner()).clone();
                return Err(RepartitionError::Lost {
                    count: lost,
                    first: first.unwrap_or_default(),
                });
            }
            let in_flight = self.producer.in_flight_count();
            if in_flight <= 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RepartitionError::Undelivered(in_flight as u64));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Creates `topic` unless it exists.
async fn create_topic(
    client: &ClientConfig,
    topic: &str,
    config: &RepartitionConfig,
) -> Result<(), RepartitionError> {
    let failed = |reason: String| RepartitionError::Topic {
        topic: topic.to_owned(),
        brokers: config.brokers.clone(),
        reason,
    };
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| failed(e.to_string()))?;
    let new = NewTopic::new(topic, config.partitions as i32, TopicReplication::Fixed(1));
    // Bounded, so that brokers away are noticed (and retried) within seconds; a slow
    // creation that times out finds the topic there on the next try.
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|e| failed(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(failed(code.to_string())),
        }
    }
    Ok(())
}

/// A batch's rows as records: payloads, keys, sequence numbers and hop counts.
struct Rows {
    json: Vec<u8>,
    /// `None`: the stream has no key (records are spread by the producer).
    keys: Option<arrow::array::ArrayRef>,
    seq: arrow::array::StringArray,
    partition: arrow::array::StringArray,
    hops: arrow::array::PrimitiveArray<UInt8Type>,
}

impl Rows {
    fn of(batch: &RecordBatch) -> Result<Self, RepartitionError> {
        let schema = batch.schema();
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| RepartitionError::Client(format!("the batch has no {name} column")))
        };
        let declared: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                ![INGEST_TIME, SOURCE, PARTITION, OFFSET, HOPS].contains(&f.name().as_str())
            })
            .map(|(i, _)| i)
            .collect();
        let fields = batch
            .project(&declared)
            .map_err(|e| RepartitionError::Client(e.to_string()))?;
        // arrow's JSON writer turns a batch into one object per line, the columnar
        // way; the records are its lines.
        let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
        writer
            .write(&fields)
            .and_then(|()| writer.finish())
            .map_err(|e| RepartitionError::Client(e.to_string()))?;
        let json = writer.into_inner();
        let keys = match schema.metadata().get(KEY_META) {
            Some(key) => Some(
                arrow::compute::cast(column(key)?, &DataType::Utf8)
                    .map_err(|e| RepartitionError::Client(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Self {
            json,
            keys,
            seq: column(OFFSET)?.as_string::<i32>().clone(),
            partition: column(PARTITION)?.as_string::<i32>().clone(),
            hops: column(HOPS)?.as_primitive::<UInt8Type>().clone(),
        })
    }

    fn len(&self) -> usize {
        self.seq.len()
    }

    fn payloads(&self) -> impl Iterator<Item = &[u8]> {
        self.json.split(|&b| b == b'\n').take(self.len())
    }

    fn key(&self, i: usize) -> Option<&str> {
        let keys = self.keys.as_ref()?.as_string::<i32>();
        Some(if keys.is_null(i) { "" } else { keys.value(i) })
    }
}
