//! The lake task: takes the sources' batches, runs the functions, windows and alert
//! rules ([`Pipeline::process`]), encodes every table's rows into open Parquet files,
//! rolls them and commits them with checkpoints: a manifest of files, window and alert
//! state and source positions, then one Delta commit per table with a transaction
//! marker (see `sluice_sinks::checkpoint`). Limits in block mode are paid here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use sluice_config::Config;
use sluice_core::lease::{Lease, LeaseScan};
use sluice_core::tap::Taps;
use sluice_core::{
    Checkpointed, Clock, PartitionState, PipeReceiver, PipeSender, SourcePositions, StreamBatch,
    SystemClock,
};
use sluice_ingest::limit::RateLimit;
use sluice_ingest::source::{LeaseFuture, Leases, Peers};
use sluice_processors::guard::{LimitOf, RowLimit};
use sluice_processors::pipeline::Pipeline;
use sluice_processors::window::state_partition;
use sluice_sinks::checkpoint::StateFile;
use sluice_sinks::checkpoint::{
    Checkpoints, Manifest, Namespace, Origins, read_state, settle_peers,
};
use sluice_sinks::delta::{DeltaTables, fence_app_id};
use sluice_sinks::lease::LeaseBook;
use sluice_sinks::location::LakeLocation;
use sluice_sinks::notify::Notifiers;
use sluice_sinks::parquet::{FileStore, Lake, LakeOptions, SealedFiles, Written};
#[cfg(feature = "kafka")]
use sluice_sinks::repartition::{RepartitionError, Repartitioner};
use sluice_sinks::retry::{Breaker, RetryPolicy};
use tokio::sync::watch;
use tracing::Instrument;

use crate::lake_location;

/// Without Kafka nothing is repartitioned: [`repartitioner`] refuses the config.
#[cfg(not(feature = "kafka"))]
#[derive(Debug)]
enum Repartitioner {}

#[cfg(not(feature = "kafka"))]
impl Repartitioner {
    async fn publish(&self, _: &StreamBatch) -> anyhow::Result<()> {
        match *self {}
    }
    async fn flush(&self) -> anyhow::Result<()> {
        match *self {}
    }
    async fn rest(&self) -> anyhow::Result<()> {
        match *self {}
    }
}

/// The producer of `[cluster.repartition]`, when this node publishes any stream.
async fn repartitioner(config: &Config) -> anyhow::Result<Option<Arc<Repartitioner>>> {
    let streams = config.repartitioned_streams();
    let repartition = config.cluster.as_ref().and_then(|c| c.repartition.as_ref());
    let (Some(node), Some(repartition)) = (config.node_id(), repartition) else {
        return Ok(None);
    };
    if streams.is_empty() {
        return Ok(None);
    }
    // Kafka away at start is an outage like any other: retried with backoff and
    // logged once, while nothing is read (the sources start after the lake task).
    // A stop signal meanwhile ends the wait (see `serve`).
    #[cfg(feature = "kafka")]
    {
        // A Kinesis shard's rows are its own origin, whichever node reads it.
        let per_partition = config
            .sources
            .iter()
            .filter(|(_, s)| matches!(s, sluice_config::SourceConfig::Kinesis(_)))
            .map(|(name, _)| name.clone())
            .collect();
        let mut breaker = Breaker::new(RetryPolicy::default());
        loop {
            match Repartitioner::new(repartition, &node, &streams, &per_partition).await {
                Ok(producer) => {
                    if breaker.success() {
                        tracing::info!(
                            brokers = %repartition.brokers,
                            "the repartition topic is reachable again"
                        );
                    }
                    return Ok(Some(Arc::new(producer)));
                }
                Err(e) => {
                    let failed = breaker.failure();
                    if failed.first {
                        tracing::warn!(
                            error = %e,
                            "cannot reach the repartition topic of [cluster.repartition]; retrying with backoff, and reading no source until it is reachable"
                        );
                    }
                    tokio::time::sleep(failed.wait).await;
                }
            }
        }
    }
    #[cfg(not(feature = "kafka"))]
    {
        let _ = (node, repartition);
        anyhow::bail!("[cluster.repartition] needs Kafka, which this binary was built without")
    }
}

/// While the lake's store is failing, one attempt per this long once the breaker opened.
const STORE_COOLDOWN: Duration = Duration::from_secs(5);
/// How long the lake backlog must stay full before the hold is logged.
const HOLD_LOGGED_AFTER: Duration = Duration::from_secs(1);
/// How often the lake checks for files due to roll.
const ROLL_TICK: Duration = Duration::from_millis(250);

/// The lake task fed by a fresh pipeline channel; the sender is for the sources.
pub(crate) type LakeTask = tokio::task::JoinHandle<anyhow::Result<()>>;

/// What the sources get from the lake task.
pub(crate) struct LakeHandle {
    pub(crate) task: LakeTask,
    pub(crate) tx: PipeSender,
    /// The newest checkpoint at start: where replayable sources resume.
    pub(crate) recovered: Manifest,
    /// Each checkpoint once durable: sources acknowledge up to its positions.
    pub(crate) checkpoints: watch::Receiver<Checkpointed>,
    /// The other nodes' checkpoints, for a node of a cluster.
    pub(crate) peers: Option<Arc<dyn Peers>>,
    /// The lake's shard leases, for a node of a cluster.
    pub(crate) leases: Option<Arc<dyn Leases>>,
    /// Asks for a checkpoint at the next roll tick (see `SourceContext`).
    pub(crate) checkpoint_now: Arc<tokio::sync::Notify>,
    /// Notified when the lake task ended on an error no retry can fix (this node was
    /// fenced): the service must stop.
    pub(crate) fatal: Arc<tokio::sync::Notify>,
    /// Live readers of the batches the lake writes (the console, `sluice tap`).
    pub(crate) taps: Arc<Taps>,
    /// The schema of every stream and derived table of the pipeline.
    pub(crate) schemas: HashMap<String, arrow::datatypes::SchemaRef>,
}

/// The fencing epoch of every partition this node took over, by source (set by the
/// sources' takeovers, read by the checkpoints).
type Epochs = Arc<std::sync::Mutex<BTreeMap<String, BTreeMap<String, u64>>>>;

/// Partitions changing hands, whose window state the lake task freezes or takes over
/// between two batches (see `sluice_processors::window::Instances`); set by the
/// sources through [`Peers`].
#[derive(Debug, Default)]
struct Handoffs {
    /// The sources whose window state is kept per partition.
    sources: HashSet<String>,
    pending: std::sync::Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Partitions taken over, before their first batch.
    taken: Vec<Taken>,
    /// Partitions given up: `<source>/<partition>` → (source, partition, the position
    /// of the last record handed on).
    given: BTreeMap<String, (String, String, Option<String>)>,
}

/// A partition this node took over, under `epoch`, with the newest window state
/// another node saved for it.
#[derive(Debug)]
struct Taken {
    key: String,
    epoch: u64,
    saved: Option<Saved>,
}

/// A partition's window state in another node's checkpoint.
#[derive(Debug)]
struct Saved {
    checkpoint: u64,
    /// The checkpoint's entry for the partition.
    state: PartitionState,
    /// Window name → snapshot.
    snapshots: Vec<(String, Vec<u8>)>,
}

/// How often a takeover reads the other nodes' checkpoints again when a state file it
/// was about to read was pruned meanwhile (its node checkpointed again).
const STATE_READ_ATTEMPTS: usize = 5;

/// The other nodes of a cluster, seen through their checkpoints in the shared lake.
#[derive(Debug)]
struct LakePeers {
    location: LakeLocation,
    own: Namespace,
    /// Each other node's tables, kept so that a later rebalance reads only new commits.
    tables: tokio::sync::Mutex<HashMap<String, DeltaTables>>,
    /// The seals table, for fencing.
    fencing: tokio::sync::Mutex<DeltaTables>,
    epochs: Epochs,
    handoffs: Arc<Handoffs>,
}

impl LakePeers {
    /// For each of `partitions` (fenced at `epochs`), the newest window state any of
    /// the `newest` checkpoints saved for it, read whole.
    async fn saved_states(
        &self,
        source: &str,
        partitions: &[String],
        epochs: &[u64],
        newest: &[Manifest],
    ) -> sluice_sinks::Result<Vec<Taken>> {
        let mut taken = Vec::new();
        for (partition, &epoch) in partitions.iter().zip(epochs) {
            let key = format!("{source}/{partition}");
            let best = newest
                .iter()
                .filter_map(|m| m.partitions.get(&key).map(|state| (m, state)))
                .reduce(|best, next| {
                    if next.1.supersedes(best.1) {
                        next
                    } else {
                        best
                    }
                });
            let saved = match best {
                Some((manifest, state)) => {
                    let mut snapshots = Vec::new();
                    for (name, path) in &manifest.state {
                        if let Some((window, of)) = state_partition(name)
                            && of == key
                        {
                            let bytes = read_state(&self.location, path).await?;
                            snapshots.push((window.to_owned(), bytes.to_vec()));
                        }
                    }
                    Some(Saved {
                        checkpoint: manifest.id,
                        state: state.clone(),
                        snapshots,
                    })
                }
                None => None,
            };
            taken.push(Taken { key, epoch, saved });
        }
        Ok(taken)
    }
}

impl Peers for LakePeers {
    fn take_over<'a>(
        &'a self,
        source: &'a str,
        partitions: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<SourcePositions>, String>> + Send + 'a>> {
        Box::pin(async move {
            let epochs = if !partitions.is_empty() {
                let apps: Vec<String> =
                    partitions.iter().map(|p| fence_app_id(source, p)).collect();
                let epochs = self
                    .fencing
                    .lock()
                    .await
                    .fence(&apps)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(component = %source, ?partitions, ?epochs, "fenced the partitions taken over");
                let mut held = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
                let held = held.entry(source.to_owned()).or_default();
                held.extend(partitions.iter().cloned().zip(epochs.iter().copied()));
                epochs
            } else {
                Vec::new()
            };
            let mut tables = self.tables.lock().await;
            let mut attempts = 0;
            loop {
                let newest = settle_peers(&self.location, &self.own, &mut tables)
                    .await
                    .map_err(|e| e.to_string())?;
                if self.handoffs.sources.contains(source) {
                    match self
                        .saved_states(source, partitions, &epochs, &newest)
                        .await
                    {
                        Ok(taken) => {
                            let mut pending = self
                                .handoffs
                                .pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner());
                            pending.taken.extend(taken);
                        }
                        // Pruned since: that node checkpointed again; read its newest.
                        Err(e) if e.is_not_found() && attempts < STATE_READ_ATTEMPTS => {
                            attempts += 1;
                            continue;
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                return Ok(newest.iter().map(|m| m.positions_of(source)).collect());
            }
        })
    }

    fn give_up(&self, source: &str, partitions: &[(String, Option<String>)]) {
        if !self.handoffs.sources.contains(source) {
            return;
        }
        let mut pending = self
            .handoffs
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (partition, last) in partitions {
            pending.given.insert(
                format!("{source}/{partition}"),
                (source.to_owned(), partition.clone(), last.clone()),
            );
        }
    }
}

/// This node's shard leases in the shared lake, one [`LeaseBook`] per source.
#[derive(Debug)]
struct LakeLeases {
    location: LakeLocation,
    node: String,
    books: std::sync::Mutex<HashMap<String, Arc<LeaseBook>>>,
}

impl LakeLeases {
    fn book(&self, source: &str) -> Arc<LeaseBook> {
        self.books
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(source.to_owned())
            .or_insert_with(|| Arc::new(LeaseBook::new(&self.location, source)))
            .clone()
    }
}

impl Leases for LakeLeases {
    fn scan<'a>(&'a self, source: &'a str) -> LeaseFuture<'a, LeaseScan> {
        Box::pin(async move { self.book(source).scan().await.map_err(|e| e.to_string()) })
    }

    fn create<'a>(
        &'a self,
        source: &'a str,
        shard: &'a str,
        epoch: u64,
        lease: Lease,
    ) -> LeaseFuture<'a, bool> {
        Box::pin(async move {
            let book = self.book(source);
            book.create(shard, epoch, &lease)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn heartbeat<'a>(&'a self, source: &'a str, round: u64) -> LeaseFuture<'a, ()> {
        Box::pin(async move {
            let book = self.book(source);
            book.heartbeat(&self.node, round)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn leave<'a>(&'a self, source: &'a str) -> LeaseFuture<'a, ()> {
        Box::pin(async move {
            let book = self.book(source);
            book.leave(&self.node).await.map_err(|e| e.to_string())
        })
    }
}

/// How long a stop waits for queued alert notifications to go out.
const NOTIFY_DRAIN: Duration = Duration::from_secs(5);

pub(crate) async fn start_lake(
    config: &Config,
    clock: &Arc<dyn Clock>,
    end: End,
    notifiers: Notifiers,
) -> anyhow::Result<LakeHandle> {
    let location = lake_location(config)?;
    let epochs = config.node_id().map(|_| Epochs::default());
    let handoffs = config.node_id().map(|_| {
        Arc::new(Handoffs {
            sources: crate::pipeline::partitioned_sources(config),
            pending: Default::default(),
        })
    });
    let (namespace, peers, leases) = match (config.node_id(), &epochs, &handoffs) {
        (Some(node), Some(epochs), Some(handoffs)) => {
            let own = Namespace::node(&node);
            let peers: Arc<dyn Peers> = Arc::new(LakePeers {
                location: location.clone(),
                own: own.clone(),
                tables: Default::default(),
                fencing: tokio::sync::Mutex::new(DeltaTables::at(&location)),
                epochs: epochs.clone(),
                handoffs: handoffs.clone(),
            });
            let leases: Arc<dyn Leases> = Arc::new(LakeLeases {
                location: location.clone(),
                node,
                books: Default::default(),
            });
            (own, Some(peers), Some(leases))
        }
        _ => (Namespace::default(), None, None),
    };
    let Recovery {
        checkpoints,
        recovered,
        tables,
        pipeline,
    } = recover(config, clock, end, &location, &namespace).await?;
    if recovered.id > 0 && end == End::Restart {
        tracing::info!(checkpoint = recovered.id, "resuming from checkpoint");
    }
    let interval = config.lake.checkpoint_interval.0;
    let interval = (end == End::Restart && !interval.is_zero()).then_some(interval);
    let lake = Lake::open(
        LakeOptions {
            roll_size: config.lake.roll_size.as_usize(),
            roll_interval_ms: config.lake.roll_interval.0.as_millis() as i64,
            row_group_rows: config.lake.row_group_rows,
            zstd_level: config.lake.zstd_level,
        },
        &location,
        clock.clone(),
    )?;
    let repartition = repartitioner(config).await?;
    let (ack, acks) = watch::channel(Arc::new(recovered.positions.clone()));
    let fatal = Arc::new(tokio::sync::Notify::new());
    let checkpointing = Checkpointing {
        epochs,
        handoffs,
        held: BTreeMap::new(),
        fatal: fatal.clone(),
        committer: Some(Committer {
            checkpoints,
            tables,
            files: lake.file_store(),
            sealed: SealedFiles::default(),
            pending: BTreeMap::new(),
            ack,
            plain: interval.is_none(),
        }),
        interval,
        positions: recovered.positions.clone(),
        origins: recovered.origins.clone(),
        failing: false,
        repartition,
    };
    // A bounded run's file waits for the lake at no cost, so a deep queue only holds
    // decoded batches in memory: 64 of them were ~60 MB of a 1M-device run's peak.
    let queue_batches = match end {
        End::OfInput => config.limits.queue_batches.min(BOUNDED_QUEUE_BATCHES),
        End::Restart => config.limits.queue_batches,
    };
    let (tx, rx) = sluice_core::pipe(queue_batches, config.limits.queue_bytes.as_usize());
    let limits = LakeLimits {
        max_backlog: config.limits.lake_backlog.as_usize(),
        debts: Debts::of(config),
        shed: config
            .lake
            .limit
            .as_ref()
            .and_then(crate::pipeline::rate_spec)
            .filter(|spec| !spec.block)
            .map(|spec| RowLimit::new(LimitOf::Lake, spec, clock.clone())),
    };
    let taps = Taps::new();
    let schemas = pipeline.schemas().clone();
    let span = tracing::info_span!("lake", component = "lake", kind = "parquet");
    let checkpoint_now = Arc::new(tokio::sync::Notify::new());
    let requests = checkpoint_now.clone();
    Ok(LakeHandle {
        task: tokio::spawn(
            lake_loop(
                lake,
                pipeline,
                rx,
                end,
                (checkpointing, requests),
                (notifiers, taps.clone()),
                limits,
            )
            .instrument(span),
        ),
        tx,
        recovered,
        checkpoints: acks,
        peers,
        leases,
        checkpoint_now,
        fatal,
        taps,
        schemas,
    })
}

/// What the lake holds at start, read by [`recover`].
struct Recovery {
    checkpoints: Checkpoints,
    /// The newest checkpoint's manifest (empty for a new lake).
    recovered: Manifest,
    /// The Delta tables, as recovery left them.
    tables: DeltaTables,
    /// The pipeline, its windows' and alerts' state restored (on a restart).
    pipeline: Pipeline,
}

/// Completes what the last run left in the lake, checks the tables' columns against
/// the config, and restores the windows' state. An outage of the store (no
/// connection, a 5xx answer: [`sluice_sinks::retry::is_transient`]) is waited out
/// like the repartition topic's brokers: retried with backoff and logged once, while
/// `/health` answers "starting" and no source reads (they start after the lake task).
/// Recovery is written to be run again after a crash at any point, so an attempt cut
/// short by the store is simply made again. Anything else (a refusal such as access
/// denied, a changed column type, a pipeline that does not compile) ends the start.
async fn recover(
    config: &Config,
    clock: &Arc<dyn Clock>,
    end: End,
    location: &LakeLocation,
    namespace: &Namespace,
) -> anyhow::Result<Recovery> {
    let attempt = || async {
        let mut tables = DeltaTables::at(location).with_app_id(namespace.app_id());
        let (checkpoints, recovered) = Checkpoints::recover(location, namespace, &mut tables)
            .await
            .with_context(|| format!("cannot recover the lake at {}", location.url()))?;
        let recovered = recovered.unwrap_or_default();
        let mut pipeline = crate::pipeline::build(config, clock.clone()).map_err(|errors| {
            anyhow!(
                "the functions and windows do not compile:\n  - {}",
                errors.join("\n  - ")
            )
        })?;
        check_columns(config, &pipeline, &mut tables).await?;
        if end == End::Restart {
            restore_windows(&checkpoints, &recovered, &mut pipeline).await?;
        }
        anyhow::Ok(Recovery {
            checkpoints,
            recovered,
            tables,
            pipeline,
        })
    };
    let mut breaker = Breaker::new(RetryPolicy::default());
    loop {
        match attempt().await {
            Ok(recovery) => {
                if breaker.success() {
                    tracing::info!(lake = %location.url(), "the lake answers again; recovered");
                }
                return Ok(recovery);
            }
            Err(e) if sluice_sinks::retry::is_transient(e.as_ref()) => {
                let failed = breaker.failure();
                if failed.first {
                    tracing::warn!(
                        lake = %location.url(),
                        error = format!("{e:#}"),
                        "cannot read the lake at start; retrying with backoff, and reading no source until it answers"
                    );
                }
                tokio::time::sleep(failed.wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Refuses to start when a table already in the lake has a column of the same name as
/// a stream's or window's but of another type, listing every such column with the
/// config key it comes from: its rows could not be committed. New columns are added to
/// the tables at their first commit ([`DeltaTables::ensure`]).
async fn check_columns(
    config: &Config,
    pipeline: &Pipeline,
    tables: &mut DeltaTables,
) -> anyhow::Result<()> {
    let problems = column_problems(config, pipeline, tables).await?;
    if problems.is_empty() {
        return Ok(());
    }
    Err(anyhow!(
        "the lake's tables cannot take the config's columns (give a changed column a new \
         name, or the stream or window another table):\n  - {}",
        problems.join("\n  - ")
    ))
}

/// Each column of a stored stream or window whose type differs from its table's in
/// the lake, as `<config key>: table "<t>": <what differs>`, sorted.
async fn column_problems(
    config: &Config,
    pipeline: &Pipeline,
    tables: &mut DeltaTables,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for (table, schema) in pipeline.stored() {
        let key = if config.streams.contains_key(table) {
            format!("streams.{table}")
        } else if config.windows.contains_key(table) {
            format!("windows.{table}.select")
        } else {
            format!("the functions writing {table:?}")
        };
        for conflict in tables.column_conflicts(table, schema).await? {
            problems.push(format!("{key}: table {table:?}: {conflict}"));
        }
    }
    problems.sort();
    Ok(problems)
}

/// For `sluice check`: the config's columns against the lake's tables, as
/// [`column_problems`]; `None` when the config's local lake directory does not exist
/// yet (nothing to check). An error when the lake cannot be read.
pub async fn lake_column_problems(
    config: &Config,
    pipeline: &Pipeline,
) -> anyhow::Result<Option<Vec<String>>> {
    if !config.lake.is_s3() && !config.lake.dir.is_dir() {
        return Ok(None);
    }
    let location = crate::lake_location(config)?;
    let mut tables = DeltaTables::at(&location);
    column_problems(config, pipeline, &mut tables)
        .await
        .map(Some)
}

/// What happens to open windows when the input ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// A bounded run: the watermark goes to +∞ and every window is emitted.
    OfInput,
    /// A service stop: a last checkpoint saves window state for the next start.
    Restart,
}

/// Batches waiting for the lake task in a bounded run, at most (fewer when
/// `[limits] queue_batches` says so). Enough to keep the task busy while the file
/// source's sequencer takes the next chunk's batches; more only costs memory.
const BOUNDED_QUEUE_BATCHES: usize = 4;

/// Restores each window from the checkpoint's state snapshot.
async fn restore_windows(
    checkpoints: &Checkpoints,
    manifest: &Manifest,
    pipeline: &mut Pipeline,
) -> anyhow::Result<()> {
    for (name, path) in &manifest.state {
        let mut input = checkpoints.open_state(path).await?;
        match pipeline.restore(name, &mut input) {
            // A partition's: frozen until its source takes the partition over.
            Ok(true) if state_partition(name).is_some() => {
                tracing::debug!(state = %name, "window state of a partition restored")
            }
            Ok(true) => tracing::info!(state = %name, "window or alert state restored"),
            Ok(false) => {
                tracing::warn!(window = %name, "checkpointed state of a window no longer configured is ignored")
            }
            Err(e) => {
                tracing::error!(window = %name, error = %e, "checkpointed window state does not fit the window (changed config?); starting it empty")
            }
        }
    }
    for (key, state) in &manifest.partitions {
        pipeline.instances().set_partition_state(key, state.clone());
    }
    Ok(())
}

/// The lake task's commit and checkpoint bookkeeping (see `sluice_sinks::checkpoint`).
///
/// A commit has two halves. The cut runs on the lake task: it seals the files due
/// (every open file, for a checkpoint) and, for a checkpoint, writes each window's
/// and alert rule's state and fixes the manifest's positions. The rest (finishing
/// the files' encoding, storing them, fsyncs, the manifest, the Delta commits, the
/// sources' acknowledgement) is done by a job on a blocking thread of its own ([`Checkpointing::start`]) while
/// the lake task takes the next batches: alerts are not held up by the store. One job
/// runs at a time; its files count in the lake's backlog until they are stored.
struct Checkpointing {
    /// `None` while a commit job runs (the job owns it).
    committer: Option<Committer>,
    /// `None`: checkpoints off; stored files are committed as they roll, without a
    /// marker, and only a service stop writes a checkpoint (window state).
    interval: Option<Duration>,
    /// Every source position the processed batches cover.
    positions: BTreeMap<String, BTreeMap<String, String>>,
    /// The repartition sources' last sequence numbers per origin (see
    /// `SourcePositions::origins`), as far as the processed batches go.
    origins: BTreeMap<String, Origins>,
    failing: bool,
    /// A node of a cluster: the epochs of the partitions it took over.
    epochs: Option<Epochs>,
    /// Per source and partition whose records were handed on since the last cut, the
    /// lowest epoch they were handed on under (for the next manifest's `epochs`:
    /// records of an epoch fenced since must not count, even if this node took the
    /// partition again).
    held: BTreeMap<String, BTreeMap<String, u64>>,
    /// Notified when this node was fenced.
    fatal: Arc<tokio::sync::Notify>,
    /// A node of a cluster: partitions changing hands.
    handoffs: Option<Arc<Handoffs>>,
    /// Publishes the rows of repartitioned streams (`[cluster.repartition]`); every
    /// record is delivered before a checkpoint covers its row.
    repartition: Option<Arc<Repartitioner>>,
}

/// What stores sealed files and commits them: the lake task's between commits, a
/// commit job's while one runs.
struct Committer {
    checkpoints: Checkpoints,
    tables: DeltaTables,
    files: FileStore,
    /// Sealed files not stored yet (kept across a failed commit).
    sealed: SealedFiles,
    /// Stored files no manifest owns yet (kept across a failed commit).
    pending: BTreeMap<Arc<str>, Written>,
    ack: watch::Sender<Checkpointed>,
    /// Checkpoints off: stored files are committed without a marker.
    plain: bool,
}

/// A checkpoint's cut, taken on the lake task: the state files (written, not yet
/// durable) and the manifest without its files (the job adds what it stored).
struct Cut {
    state: Vec<StateFile>,
    manifest: Manifest,
    started: std::time::Instant,
}

/// A commit job running off the lake task.
struct Job {
    handle: tokio::task::JoinHandle<(Committer, anyhow::Result<()>)>,
    /// A checkpoint (else a plain commit of rolled files).
    checkpoint: bool,
    /// Encoded bytes the job holds (part of the lake's backlog).
    bytes: usize,
    /// The time before which every row handed to the lake is in this commit.
    fresh_until: tokio::time::Instant,
    /// The cut's `held` epochs: merged back if the checkpoint fails.
    held: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Committer {
    /// Stores the sealed files and commits them: plainly (`cut` is `None`), or with
    /// the checkpoint `cut`, after which the sources are acknowledged. What fails
    /// stays here for the next call (see `sluice_sinks::checkpoint`).
    async fn commit(&mut self, cut: Option<Cut>) -> anyhow::Result<()> {
        self.checkpoints.complete(&mut self.tables).await?;
        self.files
            .store(&mut self.sealed, &mut self.pending)
            .await?;
        let Some(Cut {
            state,
            mut manifest,
            started,
        }) = cut
        else {
            // With checkpoints on, a commit without a cut only stores (a retry after a
            // failed put); the next checkpoint commits the files.
            return match self.plain {
                true => self.commit_plain().await,
                false => Ok(()),
            };
        };
        if self.plain {
            // Checkpoints off: the files go in as they would have; the stop's
            // checkpoint saves state only.
            self.commit_plain().await?;
        }
        for (table, written) in &self.pending {
            self.tables.ensure(table, &written.schema).await?;
        }
        let mut state_bytes = 0;
        for file in state {
            state_bytes += file.finish().await?;
        }
        manifest.tables = self
            .pending
            .iter()
            .map(|(t, w)| (t.to_string(), w.files.clone()))
            .collect();
        let positions = manifest.positions.clone();
        self.checkpoints.write(manifest).await?;
        self.pending.clear();
        self.checkpoints.complete(&mut self.tables).await?;
        self.ack.send_replace(Arc::new(positions));
        metrics::counter!("sluice_checkpoints_total").increment(1);
        let took = started.elapsed().as_secs_f64();
        metrics::histogram!("sluice_checkpoint_seconds").record(took);
        // The console shows the last checkpoint (a histogram keeps no "last").
        metrics::gauge!("sluice_checkpoint_last_seconds").set(took);
        metrics::gauge!("sluice_checkpoint_last_state_bytes").set(state_bytes as f64);
        metrics::gauge!("sluice_checkpoint_last_ms")
            .set(sluice_core::Clock::now_ms(&sluice_core::SystemClock) as f64);
        Ok(())
    }

    /// Commits the stored files to their tables, no marker.
    async fn commit_plain(&mut self) -> anyhow::Result<()> {
        while let Some((table, written)) = self.pending.pop_first() {
            let done = async {
                self.tables.ensure(&table, &written.schema).await?;
                self.tables.append(&table, &written.files, None).await
            }
            .await;
            if let Err(e) = done {
                self.pending.insert(table, written);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Whether files wait to be stored or committed.
    fn has_pending(&self) -> bool {
        !self.sealed.is_empty() || !self.pending.is_empty()
    }
}

impl Checkpointing {
    /// Applies the partitions that changed hands to the window state (see
    /// [`Handoffs`]). A partition taken over goes on from the newest saved state: this
    /// node's own (kept frozen since it gave the partition up, or restored at start),
    /// or the one another node saved, whichever is further. A partition given up is
    /// frozen once its last record handed on is processed. Called before every batch,
    /// tick and checkpoint.
    fn hand_over(&mut self, pipeline: &mut Pipeline) {
        let Some(handoffs) = &self.handoffs else {
            return;
        };
        let mut pending = handoffs.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.taken.is_empty() && pending.given.is_empty() {
            return;
        }
        let instances = pipeline.instances();
        for Taken { key, epoch, saved } in std::mem::take(&mut pending.taken) {
            // Taken back before its last record was processed: it stays live.
            pending.given.remove(&key);
            let own = instances.partition_state(&key).cloned();
            let taken = match saved {
                Some(Saved {
                    checkpoint,
                    state,
                    snapshots,
                }) if own.as_ref().is_none_or(|own| state.supersedes(own)) => {
                    tracing::info!(partition = %key, checkpoint, epoch = state.epoch, position = ?state.position, "window state of a partition taken over from the node that read it last");
                    instances
                        .take(&key, epoch, state.position.clone(), &snapshots)
                        .map_err(|e| (e, state.position))
                }
                _ => instances.thaw(&key, epoch).map_err(|e| (e, None)),
            };
            if let Err((e, position)) = taken {
                tracing::error!(partition = %key, error = %e, "the saved window state of a partition taken over does not fit its windows (changed config?); starting it empty");
                let _ = instances.take(&key, epoch, position, &[]);
            }
        }
        let positions = &self.positions;
        pending.given.retain(|key, (source, partition, last)| {
            let processed = last.as_ref().is_none_or(|last| {
                positions
                    .get(source.as_str())
                    .and_then(|p| p.get(partition.as_str()))
                    .is_some_and(|at| SourcePositions::compare(at, last).is_ge())
            });
            if processed {
                instances.freeze(key);
            }
            !processed
        });
    }

    fn record(&mut self, batch: &StreamBatch) {
        let Some(p) = &batch.positions else {
            return;
        };
        if let Some(epochs) = &self.epochs {
            let epochs = epochs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(epochs) = epochs.get(&p.source) {
                let before = self.positions.get(&p.source);
                for (partition, position) in &p.offsets {
                    let Some(&epoch) = epochs.get(partition) else {
                        continue;
                    };
                    // "" is a partition announced, nothing of it handed on: a Kinesis
                    // shard leased and given back before its first record must not
                    // fence this node's next checkpoint once another node took it.
                    if !position.is_empty()
                        && before.and_then(|b| b.get(partition)) != Some(position)
                    {
                        let held = self.held.entry(p.source.clone()).or_default();
                        let held = held.entry(partition.clone()).or_insert(epoch);
                        *held = (*held).min(epoch);
                    }
                }
            }
        }
        self.positions.insert(p.source.clone(), p.offsets.clone());
        if !p.origins.is_empty() {
            self.origins.insert(p.source.clone(), p.origins.clone());
        }
    }

    /// Whether a commit has files to store or commit: sealed by the lake, or left by
    /// a failed commit.
    fn has_pending(&self, lake: &Lake) -> bool {
        lake.has_sealed() || self.committer.as_ref().is_some_and(Committer::has_pending)
    }

    /// Starts a commit job, unless one runs (`None`): a checkpoint (every open file
    /// sealed, the state written and the positions fixed at this batch boundary), or a
    /// plain commit of the files sealed so far. The job runs on a blocking thread of
    /// its own (fsyncs and a local store's puts block), driving its async I/O through
    /// this runtime.
    async fn start(
        &mut self,
        lake: &mut Lake,
        pipeline: &mut Pipeline,
        checkpoint: bool,
    ) -> anyhow::Result<Option<Job>> {
        let started = std::time::Instant::now();
        if self.committer.is_none() {
            return Ok(None);
        }
        if checkpoint {
            if let Some(r) = &self.repartition {
                r.flush().await?;
            }
            self.hand_over(pipeline);
        }
        let Some(committer) = self.committer.as_mut() else {
            return Ok(None);
        };
        let (cut, fresh_until, held) = if checkpoint {
            let fresh_until = Freshness::now();
            lake.seal_all();
            let id = committer.checkpoints.next_id();
            let (mut files, mut state) = (Vec::new(), BTreeMap::new());
            // Each state is streamed into its file: memory holds no copy of it.
            for name in pipeline.state_names() {
                let (path, mut file) = committer.checkpoints.create_state(id, &name)?;
                pipeline.snapshot(&name, &mut file)?;
                files.push(file);
                state.insert(name, path);
            }
            let held = std::mem::take(&mut self.held);
            let manifest = Manifest {
                id,
                created_ms: SystemClock.now_ms(),
                tables: BTreeMap::new(),
                legacy_files: Vec::new(),
                state,
                positions: self.positions.clone(),
                epochs: held.clone(),
                partitions: pipeline.instances().partition_states(),
                origins: self.origins.clone(),
            };
            let cut = Cut {
                state: files,
                manifest,
                started,
            };
            (Some(cut), fresh_until, held)
        } else {
            // Rows still in open files are not in this commit.
            let open = lake.oldest_open_age().unwrap_or_default();
            (None, Freshness::now() - open, BTreeMap::new())
        };
        let Some(mut committer) = self.committer.take() else {
            return Ok(None);
        };
        if checkpoint {
            metrics::histogram!("sluice_checkpoint_cut_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        committer.sealed.append(lake.take_sealed());
        let bytes = committer.sealed.bytes();
        let (runtime, span) = (tokio::runtime::Handle::current(), tracing::Span::current());
        let handle = tokio::task::spawn_blocking(move || {
            let done = span.in_scope(|| runtime.block_on(committer.commit(cut)));
            (committer, done)
        });
        Ok(Some(Job {
            handle,
            checkpoint,
            bytes,
            fresh_until,
            held,
        }))
    }

    /// Takes the committer back from a finished `job`; returns the job's outcome. A
    /// failed checkpoint's epochs go back into `held` for the next one.
    fn ended(
        &mut self,
        job: Job,
        joined: Result<(Committer, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let (committer, done) =
            joined.map_err(|e| anyhow!("the lake's commit job did not finish: {e}"))?;
        self.committer = Some(committer);
        if done.is_err() {
            for (source, partitions) in job.held {
                let held = self.held.entry(source).or_default();
                for (partition, epoch) in partitions {
                    let e = held.entry(partition).or_insert(epoch);
                    *e = (*e).min(epoch);
                }
            }
        }
        done
    }

    /// A failed commit (or cut): counted, logged once per outage, retried after the
    /// breaker's wait (returned). A fenced node, repartition records lost, or a job
    /// that did not come back (it panicked: its committer is gone) ends the lake task
    /// (the error).
    fn failed(
        &mut self,
        e: anyhow::Error,
        checkpoint: bool,
        store: &mut Breaker,
    ) -> anyhow::Result<Duration> {
        if self.committer.is_none() {
            tracing::error!(error = %e, "the lake's commit job did not come back; stopping");
            self.fatal.notify_one();
            return Err(e);
        }
        if is_fenced(&e) {
            tracing::error!(error = %e, "this node was fenced: another node took over partitions it read; stopping without committing them");
            self.fatal.notify_one();
            return Err(e);
        }
        if is_lost(&e) {
            tracing::error!(error = %e, "records to the repartition topic were lost; stopping");
            self.fatal.notify_one();
            return Err(e);
        }
        if checkpoint {
            metrics::counter!("sluice_checkpoint_failures_total").increment(1);
        }
        let failed = store.failure();
        if checkpoint && !self.failing {
            tracing::error!(error = %e, "checkpoint failed; sources are not acknowledged, retrying with backoff");
            self.failing = true;
        } else if !checkpoint && failed.first {
            tracing::error!(error = %e, "lake commit failed; holding the data and retrying with backoff");
        }
        if failed.opened {
            tracing::warn!(cooldown = ?STORE_COOLDOWN, "lake store breaker open; one attempt per cooldown");
            metrics::gauge!("sluice_lake_breaker_open").set(1.0);
        }
        Ok(failed.wait)
    }

    /// Commits now and waits for it (the lake task's last commit): a checkpoint, or a
    /// plain commit of every file.
    async fn commit_now(
        &mut self,
        lake: &mut Lake,
        pipeline: &mut Pipeline,
        checkpoint: bool,
    ) -> anyhow::Result<()> {
        if !checkpoint {
            lake.seal_all();
        }
        let Some(mut job) = self.start(lake, pipeline, checkpoint).await? else {
            // Only a commit job that never came back leaves no committer.
            return Err(anyhow!(
                "the lake's commit job was lost; nothing more can be committed"
            ));
        };
        let joined = (&mut job.handle).await;
        self.ended(job, joined)
    }

    /// Whether a failed commit left sealed files it could not store.
    fn has_unstored(&self) -> bool {
        self.committer
            .as_ref()
            .is_some_and(|c| !c.sealed.is_empty())
    }

    /// Rows sealed and not stored yet (left by a failed commit).
    fn unstored_rows(&self) -> u64 {
        self.committer.as_ref().map_or(0, |c| c.sealed.rows())
    }

    /// A commit succeeded: an outage, if there was one, is over.
    fn succeeded(&mut self, checkpoint: bool, store: &mut Breaker) {
        if store.success() {
            tracing::info!("lake writes recovered");
            metrics::gauge!("sluice_lake_breaker_open").set(0.0);
        }
        if checkpoint && self.failing {
            tracing::info!("checkpoints recovered");
            self.failing = false;
        }
    }
}

/// Whether `e` says another node fenced this one (no retry can make it commit).
fn is_fenced(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<sluice_sinks::Error>(),
        Some(sluice_sinks::Error::Fenced { .. })
    )
}

/// Whether `e` says records to the repartition topic were lost (only a replay of the
/// write-ahead log, after a restart, publishes their rows again).
fn is_lost(e: &anyhow::Error) -> bool {
    #[cfg(feature = "kafka")]
    return matches!(
        e.downcast_ref::<RepartitionError>(),
        Some(RepartitionError::Lost { .. })
    );
    #[cfg(not(feature = "kafka"))]
    {
        let _ = e;
        false
    }
}

/// What holds the lake task back from taking more batches.
struct LakeLimits {
    /// Unstored Parquet bytes, at most (`[limits] lake_backlog`).
    max_backlog: usize,
    /// The block-mode rates inside the lake task.
    debts: Debts,
    /// `[lake] limit` in shed mode.
    shed: Option<RowLimit>,
}

/// Receives batches, runs the functions and windows, encodes everything; rolls files
/// on the roll tick and commits them with a checkpoint (at once after a roll, else every
/// `checkpoint_interval`). At the end it emits (bounded run) or checkpoints (service
/// stop) the open windows.
async fn lake_loop(
    mut lake: Lake,
    mut pipeline: Pipeline,
    mut batches: PipeReceiver,
    end: End,
    (mut ckpt, requests): (Checkpointing, Arc<tokio::sync::Notify>),
    (notifiers, taps): (Notifiers, Arc<Taps>),
    limits: LakeLimits,
) -> anyhow::Result<()> {
    let LakeLimits {
        max_backlog,
        mut debts,
        mut shed,
    } = limits;
    let mut derived = Vec::new();
    let mut failures = Vec::new();
    let mut freshness = Freshness::default();
    let mut tick = tokio::time::interval(ROLL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_checkpoint = tokio::time::Instant::now();
    // A source asked for a checkpoint (a revoke waiting to let partitions go).
    let mut requested = false;
    // Store attempts back off while the store fails; after 5 failures in a row the
    // breaker opens and one attempt is made per cooldown. The data waits in the lake
    // (bounded by the backlog, which holds the sources).
    let mut store = Breaker::new(RetryPolicy {
        retry_for: Duration::MAX,
        breaker_failures: 5,
        breaker_cooldown: STORE_COOLDOWN,
    });
    let mut next_store = tokio::time::Instant::now();
    // The commit job running, if one is.
    let mut job: Option<Job> = None;
    // Since when the backlog has been full, and whether that was logged (only a hold
    // of a second or more is: a busy lake touches the limit briefly and often).
    let mut held: Option<(tokio::time::Instant, bool)> = None;
    loop {
        // Past the backlog the lake takes no batch until the store takes files: the
        // queue fills and the sources wait.
        let room = backlog(&lake, &ckpt, job.as_ref()) < max_backlog;
        match (&mut held, room) {
            (None, false) => held = Some((tokio::time::Instant::now(), false)),
            (Some((since, logged @ false)), false) if since.elapsed() >= HOLD_LOGGED_AFTER => {
                *logged = true;
                tracing::warn!(
                    backlog_bytes = backlog(&lake, &ckpt, job.as_ref()),
                    max_backlog,
                    "lake backlog full; holding the sources until files are stored"
                );
            }
            (Some((_, logged)), true) => {
                if *logged {
                    tracing::info!("lake backlog has room again");
                }
                held = None;
            }
            _ => {}
        }
        let due = debts.due();
        tokio::select! {
            // Once the sources are gone (a stop), what they queued is written without
            // pacing, so the final checkpoint is not held up by the rate.
            batch = batches.recv(), if room && (due.is_none() || batches.is_closed()) => match batch {
                Some(b) => {
                    if let Some(r) = &ckpt.repartition {
                        r.publish(&b).await?;
                    }
                    ckpt.hand_over(&mut pipeline);
                    ckpt.record(&b);
                    pipeline.process(b, &mut derived, &mut failures);
                    notify(&mut pipeline, &notifiers);
                    freshness.wrote();
                    let rows = write_all(&mut lake, &taps, &mut derived, &mut failures, shed.as_mut());
                    debts.owe(&mut pipeline, rows);
                }
                None => break,
            },
            paid = pay(due.clone()), if due.is_some() => debts.paid(paid),
            _ = requests.notified() => requested = true,
            joined = async {
                match job.as_mut() {
                    Some(j) => (&mut j.handle).await,
                    None => std::future::pending().await,
                }
            }, if job.is_some() => {
                let Some(ended) = job.take() else { continue };
                let checkpoint = ended.checkpoint;
                let fresh_until = ended.fresh_until;
                match ckpt.ended(ended, joined) {
                    Ok(()) => {
                        freshness.committed(fresh_until);
                        ckpt.succeeded(checkpoint, &mut store);
                    }
                    Err(e) => {
                        next_store = tokio::time::Instant::now() + ckpt.failed(e, checkpoint, &mut store)?;
                    }
                }
            }
            _ = tick.tick() => {
                ckpt.hand_over(&mut pipeline);
                pipeline.tick(&mut derived, &mut failures);
                notify(&mut pipeline, &notifiers);
                let rows = write_all(&mut lake, &taps, &mut derived, &mut failures, shed.as_mut());
                debts.owe(&mut pipeline, rows);
                taps.deliver();
                window_gauges(&mut pipeline);
                metrics::gauge!("sluice_pipeline_queue_batches").set(batches.len() as f64);
                metrics::gauge!("sluice_pipeline_queue_bytes").set(batches.queued_bytes() as f64);
                metrics::gauge!("sluice_lake_backlog_bytes").set(backlog(&lake, &ckpt, job.as_ref()) as f64);
                metrics::gauge!("sluice_lake_backlog_held").set(f64::from(u8::from(held.is_some())));
                metrics::gauge!("sluice_lake_freshness_seconds").set(freshness.age_seconds());
                if job.is_some() || tokio::time::Instant::now() < next_store {
                    continue;
                }
                // Files a failed commit could not store are stored first, alone: while
                // they cannot be, nothing more is sealed and no checkpoint is cut (it
                // would only add files and state that cannot be stored either).
                let retry = ckpt.has_unstored();
                if !retry {
                    lake.seal_due();
                }
                let checkpoint = ckpt.interval.is_some() && !retry;
                let interval_due = ckpt
                    .interval
                    .is_some_and(|i| requested || last_checkpoint.elapsed() >= i);
                let due = ckpt.has_pending(&lake) || (checkpoint && interval_due);
                if !due {
                    continue;
                }
                if checkpoint {
                    last_checkpoint = tokio::time::Instant::now();
                    requested = false;
                }
                match ckpt.start(&mut lake, &mut pipeline, checkpoint).await {
                    Ok(started) => job = started,
                    Err(e) => {
                        next_store = tokio::time::Instant::now() + ckpt.failed(e, checkpoint, &mut store)?;
                    }
                }
            }
        }
    }
    if let Some(mut running) = job.take() {
        let joined = (&mut running.handle).await;
        if let Err(e) = ckpt.ended(running, joined) {
            tracing::warn!(error = %e, "the last commit before the stop failed; the final commit retries it");
        }
    }
    if end == End::OfInput {
        pipeline.finish(&mut derived, &mut failures);
        notify(&mut pipeline, &notifiers);
        write_all(&mut lake, &taps, &mut derived, &mut failures, shed.as_mut());
    }
    notifiers.stop(NOTIFY_DRAIN).await;
    // Final commit (a checkpoint for a service stop); retry for a while if the store
    // is failing.
    let mut last = None;
    for _ in 0..20 {
        let done = ckpt
            .commit_now(&mut lake, &mut pipeline, end == End::Restart)
            .await;
        match done {
            Ok(()) => {
                tracing::info!("final commit done");
                if end == End::Restart {
                    say_goodbye(ckpt.repartition.as_deref()).await;
                }
                return Ok(());
            }
            Err(e) if is_fenced(&e) => {
                tracing::error!(error = %e, "this node was fenced: its last checkpoint does not count");
                return Err(e);
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(anyhow!(
        "final commit failed; {} rows were not written: {}",
        lake.pending_rows() + ckpt.unstored_rows(),
        last.map(|e| format!("{e:#}")).unwrap_or_default()
    ))
}

/// After a clean stop's last checkpoint: tells the repartition topics' readers that
/// this node's origins are at rest, so their windows stop waiting for them (see
/// [`Repartitioner::rest`]). If it cannot, they wait `idle_timeout`, as after a crash.
async fn say_goodbye(repartition: Option<&Repartitioner>) {
    if let Some(r) = repartition {
        match r.rest().await {
            Ok(()) => tracing::info!("told the repartition topics this node's origins are at rest"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell the repartition topics this node's origins are at rest; their windows wait idle_timeout for them")
            }
        }
    }
}

/// The lake's backlog: what it holds encoded, and the sealed files not stored yet
/// (held by the running commit job, or left by a failed one).
fn backlog(lake: &Lake, ckpt: &Checkpointing, job: Option<&Job>) -> usize {
    let unstored = match job {
        Some(j) => j.bytes,
        None => ckpt.committer.as_ref().map_or(0, |c| c.sealed.bytes()),
    };
    lake.backlog_bytes() + unstored
}

/// Lake freshness: the age of the oldest row handed to the lake and not yet in a
/// commit (what Firehose calls DataFreshness), for `sluice_lake_freshness_seconds`.
/// Keeps the time of each write, at most one per [`Freshness::GRAIN`]; a commit
/// drops those before its cut.
#[derive(Debug, Default)]
struct Freshness {
    writes: std::collections::VecDeque<tokio::time::Instant>,
}

impl Freshness {
    const GRAIN: Duration = Duration::from_millis(100);

    fn now() -> tokio::time::Instant {
        tokio::time::Instant::now()
    }

    /// Rows were handed to the lake now.
    fn wrote(&mut self) {
        let now = Self::now();
        if self
            .writes
            .back()
            .is_none_or(|&last| now - last >= Self::GRAIN)
        {
            self.writes.push_back(now);
        }
    }

    /// A commit holds every row written before `cut`.
    fn committed(&mut self, cut: tokio::time::Instant) {
        while self.writes.front().is_some_and(|&t| t <= cut) {
            self.writes.pop_front();
        }
    }

    /// Seconds since the oldest uncommitted write; 0 with none.
    fn age_seconds(&self) -> f64 {
        self.writes
            .front()
            .map_or(0.0, |&t| (Self::now() - t).as_secs_f64())
    }
}

/// Hands the alert rules' notifications to the notifiers (never blocks).
fn notify(pipeline: &mut Pipeline, notifiers: &Notifiers) {
    for n in pipeline.take_notifications() {
        notifiers.send(n);
    }
}

/// The configured notifiers, started; every problem as one error.
pub(crate) fn start_notifiers(
    config: &Config,
    embedded: Option<std::net::SocketAddr>,
) -> anyhow::Result<Notifiers> {
    Notifiers::start(
        &config.notifiers,
        embedded,
        config.limits.notifier_queue_bytes.as_usize(),
    )
    .map_err(|errors| {
        anyhow!(
            "the notifiers cannot start:\n  - {}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  - ")
        )
    })
}

/// Per window: its watermark (ms since the epoch) and approximate state size; per
/// alert rule: keys held and keys firing.
fn window_gauges(pipeline: &mut Pipeline) {
    for (rule, keys, firing) in pipeline.alert_gauges() {
        metrics::gauge!("sluice_alert_keys", "rule" => rule.clone()).set(keys as f64);
        metrics::gauge!("sluice_alert_firing", "rule" => rule).set(firing as f64);
    }
    for (name, mark, bytes) in pipeline.window_gauges() {
        let name = name.to_owned();
        if let Some(mark) = mark.filter(|&m| m != i64::MAX) {
            metrics::gauge!("sluice_window_watermark_ms", "window" => name.clone())
                .set(mark as f64);
        }
        metrics::gauge!("sluice_window_state_bytes", "window" => name).set(bytes as f64);
    }
}

/// Logs pipeline failures and encodes every derived batch into the lake, past `shed`
/// (`[lake] limit` in shed mode) if set; the rows written outside `dead_letter` (what
/// `[lake] limit` counts).
fn write_all(
    lake: &mut Lake,
    taps: &Taps,
    derived: &mut Vec<StreamBatch>,
    failures: &mut Vec<sluice_processors::Error>,
    mut shed: Option<&mut RowLimit>,
) -> u32 {
    for e in failures.drain(..) {
        tracing::error!(error = %e, "a function or window failed on a batch; its output for that batch is skipped");
    }
    const DEAD_LETTER: &str = sluice_core::schema::DEAD_LETTER_TABLE;
    let mut rows = 0usize;
    let mut write = |lake: &mut Lake,
                     stream: &Arc<str>,
                     batch: &arrow::record_batch::RecordBatch| {
        if batch.num_rows() == 0 {
            return;
        }
        if let Err(e) = lake.write(stream, batch) {
            tracing::error!(table = %stream, rows = batch.num_rows(), error = %e, "rows could not be encoded and are lost");
            return;
        }
        taps.offer(stream, batch);
        if &**stream != DEAD_LETTER {
            rows += batch.num_rows();
        }
    };
    for b in derived.drain(..) {
        match shed.as_deref_mut().filter(|_| &*b.stream != DEAD_LETTER) {
            Some(limit) => match limit.admit(&b.stream, &b.batch) {
                Ok((kept, dead)) => {
                    write(lake, &b.stream, &kept);
                    if let Some(dead) = dead {
                        write(lake, &Arc::from(DEAD_LETTER), &dead);
                    }
                }
                Err(e) => {
                    tracing::error!(table = %b.stream, error = %e, "the lake's limit failed on a batch; it is written whole");
                    write(lake, &b.stream, &b.batch);
                }
            },
            None => write(lake, &b.stream, &b.batch),
        }
    }
    u32::try_from(rows).unwrap_or(u32::MAX)
}

/// The block-mode rates inside the lake task: `[lake] limit` in block mode (rows written) and each
/// function's `limit` in block mode (rows the function took). Each holds the rows
/// taken but not yet paid for; no batch is taken until every one is paid, a burst at a
/// time, so the roll tick keeps running meanwhile and the sources wait.
struct Debts(Vec<Debt>);

struct Debt {
    rate: Arc<RateLimit>,
    owed: u32,
    of: LimitOf,
}

impl Debt {
    fn owe(&mut self, rows: u32) {
        self.owed = self.owed.saturating_add(rows);
        self.of.counter("allowed").increment(u64::from(rows));
    }
}

/// A debt due now: its index, its rate and the rows owed.
type Due = Option<(usize, Arc<RateLimit>, u32)>;

impl Debts {
    /// The lake's limit and every function limit in block mode.
    fn of(config: &Config) -> Self {
        let debt = |l: &sluice_config::LimitConfig, of: LimitOf| {
            RateLimit::new(l).map(|rate| Debt {
                rate: Arc::new(rate),
                owed: 0,
                of,
            })
        };
        let lake = config
            .lake
            .limit
            .as_ref()
            .filter(|l| l.mode == sluice_config::LimitMode::Block)
            .and_then(|l| debt(l, LimitOf::Lake));
        let functions = config.functions.iter().filter_map(|(name, f)| {
            f.limit
                .as_ref()
                .filter(|l| l.mode == sluice_config::LimitMode::Block)
                .and_then(|l| debt(l, LimitOf::Function(name.clone())))
        });
        Self(lake.into_iter().chain(functions).collect())
    }

    /// Adds what the last batch cost: `written` rows to the lake's limit, and the rows
    /// each blocking function took (from the pipeline).
    fn owe(&mut self, pipeline: &mut Pipeline, written: u32) {
        let owed = pipeline.take_owed();
        for debt in &mut self.0 {
            match &debt.of {
                LimitOf::Lake => debt.owe(written),
                LimitOf::Function(name) => {
                    if let Some((_, rows)) = owed.iter().find(|(f, _)| f == name) {
                        debt.owe(u32::try_from(*rows).unwrap_or(u32::MAX));
                    }
                }
            }
        }
    }

    /// The first debt with rows owed.
    fn due(&self) -> Due {
        self.0
            .iter()
            .enumerate()
            .find(|(_, d)| d.owed > 0)
            .map(|(i, d)| (i, d.rate.clone(), d.owed))
    }

    fn paid(&mut self, paid: Paid) {
        let debt = &mut self.0[paid.debt];
        debt.owed -= paid.rows;
        if paid.waited {
            debt.of.counter("blocked").increment(u64::from(paid.rows));
        }
    }
}

/// Rows of one debt paid, and whether that meant waiting.
struct Paid {
    debt: usize,
    rows: u32,
    waited: bool,
}

/// Pays up to a burst of the debt due. Cancel-safe (see [`RateLimit::take`]), so the
/// roll tick can interrupt it. Only polled with a debt due.
async fn pay(due: Due) -> Paid {
    let Some((debt, rate, owed)) = due else {
        return std::future::pending().await;
    };
    let started = tokio::time::Instant::now();
    let rows = rate.take(owed).await;
    Paid {
        debt,
        rows,
        waited: started.elapsed() >= Duration::from_millis(1),
    }
}
