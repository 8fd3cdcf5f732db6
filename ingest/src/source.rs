//! One interface for every source kind. [`build`] turns a `[sources.<name>]` section
//! into a [`Source`] that runs until shutdown; it holds the only `match` on the kinds,
//! so a new kind touches its own module, `SourceConfig` and that `match`, not the
//! service that starts sources.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sluice_config::{DecodeConfig, SourceConfig};
use sluice_core::lease::{Lease, LeaseScan};
use sluice_core::{Checkpointed, Clock, PipeSender, Shutdown, SourcePositions, StreamSchema};
use tokio::sync::watch;

use crate::decode::{DecodeLimits, Decoder};
use crate::emit::Emitter;
use crate::mqtt::{EmbeddedBroker, MqttSource};
use crate::{Error, Result};

/// A running source's future: reads until `shutdown`, then drains and flushes.
pub type Running = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// A configured source, ready to run.
pub trait Source: Send {
    /// The kind, for logs and metrics (`mqtt`, `kafka`, `kinesis`).
    fn kind(&self) -> &'static str;
    /// Reads until `shutdown` fires, then drains, flushes and returns.
    fn run(self: Box<Self>, shutdown: Shutdown) -> Running;
}

/// What every source gets from the service.
#[derive(Debug)]
pub struct SourceContext<'a> {
    /// The schema of the stream the source feeds.
    pub schema: StreamSchema,
    /// Decoding limits (`[decode]`, `[limits] max_hops`).
    pub limits: DecodeLimits,
    /// `[decode]`.
    pub decode: &'a DecodeConfig,
    /// Where decoded batches go.
    pub tx: PipeSender,
    /// The service's clock.
    pub clock: Arc<dyn Clock>,
    /// Stops the source's emitter from taking more messages.
    pub shutdown: Shutdown,
    /// This source's positions in the newest checkpoint (where a replay starts).
    pub resume: SourcePositions,
    /// Each checkpoint once durable: sources acknowledge up to its positions.
    pub checkpoints: watch::Receiver<Checkpointed>,
    /// Whether checkpoints run (`[lake] checkpoint_interval` is not zero).
    pub checkpoints_on: bool,
    /// The embedded MQTT broker, if it runs.
    pub embedded: Option<&'a EmbeddedBroker>,
    /// The directory of this source's write-ahead log (MQTT with durable acks).
    pub wal_dir: PathBuf,
    /// `[limits] source_queue_bytes`.
    pub queue_bytes: usize,
    /// This node's `[cluster] node_id`, when it is one of several sharing the lake.
    pub node_id: Option<String>,
    /// The other nodes' checkpoints (a cluster node only).
    pub peers: Option<Arc<dyn Peers>>,
    /// The lake's lease objects (a cluster node only): how Kinesis shards are shared.
    pub leases: Option<Arc<dyn Leases>>,
    /// Where partitioned sources record the partitions they own.
    pub owned: Arc<Owned>,
    /// Asks the lake task for a checkpoint at its next roll tick (a fraction of a
    /// second) instead of at the next interval: a revoke that waits for one to cover
    /// what it read, so that partitions move sooner.
    pub checkpoint_now: Arc<tokio::sync::Notify>,
}

/// The partitions each source of this node owns now (source name → partitions), as
/// the node reports them to the cluster (`sluice status`), and every partition its
/// topics have as far as it knows (Kafka), so that partitions no node owns show.
#[derive(Debug, Default)]
pub struct Owned(
    std::sync::Mutex<BTreeMap<String, Vec<String>>>,
    std::sync::Mutex<BTreeMap<String, Vec<String>>>,
);

impl Owned {
    /// Adds `added` to what `source` owns, after taking `removed` away; `None` for
    /// `removed`: `added` is all it owns now.
    pub fn change(&self, source: &str, added: &[String], removed: Option<&[String]>) {
        let mut owned = match removed {
            None => Vec::new(),
            Some(removed) => self
                .snapshot()
                .remove(source)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| !removed.contains(p))
                .collect(),
        };
        owned.extend(added.iter().cloned());
        self.set(source, owned);
    }

    /// Source `source` owns exactly `partitions` now.
    pub fn set(&self, source: &str, partitions: Vec<String>) {
        put(&self.0, source, partitions);
    }

    /// Every source's partitions.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Source `source`'s topics have exactly `partitions`.
    pub fn set_known(&self, source: &str, partitions: Vec<String>) {
        put(&self.1, source, partitions);
    }

    /// Every partition of each source's topics, where known.
    pub fn known(&self) -> BTreeMap<String, Vec<String>> {
        self.1.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Sets `source`'s entry of `map` to `partitions`, sorted and without repeats.
fn put(
    map: &std::sync::Mutex<BTreeMap<String, Vec<String>>>,
    source: &str,
    mut partitions: Vec<String>,
) {
    partitions.sort();
    partitions.dedup();
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(source.to_owned(), partitions);
}

/// What a cluster node learns from the other nodes' checkpoints in the shared lake.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// Takes `partitions` of source `source` over: fences them first (no node that read
    /// them before can make a checkpoint of them count after this), then completes
    /// every checkpoint the other nodes made count and returns, for each node, the
    /// positions of `source` in its newest one (partition → position). A partition
    /// taken over starts after the furthest of these. Call it before the first record
    /// of the partitions is handed on.
    fn take_over<'a>(
        &'a self,
        source: &'a str,
        partitions: &'a [String],
    ) -> Pin<Box<dyn Future<Output = std::result::Result<Vec<SourcePositions>, String>> + Send + 'a>>;
    /// This node gives `partitions` of `source` up (a revoke), each with the position
    /// of the last record it handed on (`None`: none). Their keyed state stops changing
    /// once that record is processed, so the checkpoint that covers it saves what the
    /// next owner takes over. Call it before waiting for that checkpoint.
    fn give_up(&self, source: &str, partitions: &[(String, Option<String>)]);
}

/// A boxed future of a [`Leases`] call.
pub type LeaseFuture<'a, T> =
    Pin<Box<dyn Future<Output = std::result::Result<T, String>> + Send + 'a>>;

/// A source's lease objects in the lake, shared by the nodes of a cluster.
pub trait Leases: Send + Sync + std::fmt::Debug {
    /// Every shard's newest lease of source `source`, and the live-member tags.
    fn scan<'a>(&'a self, source: &'a str) -> LeaseFuture<'a, LeaseScan>;
    /// Creates lease `epoch` of `shard`; `false` when another node created it first.
    fn create<'a>(
        &'a self,
        source: &'a str,
        shard: &'a str,
        epoch: u64,
        lease: Lease,
    ) -> LeaseFuture<'a, bool>;
    /// Says this node is alive, reading source `source`.
    fn heartbeat<'a>(&'a self, source: &'a str, round: u64) -> LeaseFuture<'a, ()>;
    /// This node stops reading source `source` (a clean stop).
    fn leave<'a>(&'a self, source: &'a str) -> LeaseFuture<'a, ()>;
}

/// Builds the source `[sources.<name>]` describes.
pub async fn build(
    name: &str,
    config: &SourceConfig,
    ctx: SourceContext<'_>,
) -> Result<Box<dyn Source>> {
    let stream = config.stream().unwrap_or_default();
    let emitter = |decoder, kind| {
        Emitter::new(decoder, ctx.tx.clone(), ctx.decode.batch_rows, name, kind)
            .with_limits(config.limit())
            .until(ctx.shutdown.clone())
    };
    match config {
        SourceConfig::Mqtt(mqtt) => {
            let mut decoder = Decoder::new(
                ctx.schema.clone(),
                stream,
                name,
                mqtt.key_from_topic_segment,
                ctx.limits,
            );
            if mqtt.url == "embedded"
                && let Some(acl) = ctx.embedded.and_then(EmbeddedBroker::acl)
            {
                decoder = decoder.check_publisher(acl);
            }
            let source = MqttSource::new(name, mqtt, emitter(decoder, "mqtt"), &ctx)?
                .with_queue_bytes(ctx.queue_bytes);
            Ok(Box::new(source))
        }
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(kafka) => {
            let mut decoder = Decoder::new(ctx.schema.clone(), stream, name, None, ctx.limits);
            if kafka.key == "record_key" {
                decoder = decoder.key_from_whole_topic();
            }
            let emitter = emitter(decoder, "kafka").track_positions(ctx.resume.clone());
            let source = crate::kafka::KafkaSource::new(name, kafka, emitter, &ctx)?;
            Ok(Box::new(source))
        }
        #[cfg(feature = "kinesis")]
        SourceConfig::Kinesis(kinesis) => {
            let decoder = Decoder::new(ctx.schema.clone(), stream, name, None, ctx.limits)
                .key_from_whole_topic();
            let emitter = emitter(decoder, "kinesis").track_positions(ctx.resume.clone());
            let source = crate::kinesis::KinesisSource::new(name, kinesis, emitter, &ctx).await?;
            Ok(Box::new(source))
        }
        #[allow(unreachable_patterns)]
        _ => Err(Error::Config {
            source_name: name.to_owned(),
            message: "this kind of source is not built into this binary".into(),
        }),
    }
}

/// `impl Source` for a source type whose inherent `run(self, Shutdown)` is its loop.
macro_rules! source {
    ($(#[$cfg:meta])* $ty:ty, $kind:literal) => {
        $(#[$cfg])*
        impl Source for $ty {
            fn kind(&self) -> &'static str {
                $kind
            }

            fn run(self: Box<Self>, shutdown: Shutdown) -> Running {
                Box::pin((*self).run(shutdown))
            }
        }
    };
}

source!(MqttSource, "mqtt");
source!(
    #[cfg(feature = "kafka")]
    crate::kafka::KafkaSource,
    "kafka"
);
source!(
    #[cfg(feature = "kinesis")]
    crate::kinesis::KinesisSource,
    "kinesis"
);

/// How long a clean stop waits for the final checkpoint before letting go of what it
/// read (Kafka offsets, Kinesis leases).
#[cfg(any(feature = "kafka", feature = "kinesis"))]
pub(crate) const FINAL_ACK_WAIT: Duration = Duration::from_secs(10);

/// The first wait of a retry (reconnects, reads of the lake).
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between retries.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with ±25% jitter, from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(10).saturating_sub(1))
        .min(BACKOFF_MAX);
    // Jitter from the clock's sub-second nanos: good enough to de-synchronise clients.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = 0.75 + (nanos % 1000) as f64 / 2000.0;
    base.mul_f64(jitter)
}
