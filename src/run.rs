//! `sluice run`: wire sources, the lake and the HTTP API together, and shut down cleanly.
//!
//! Data flow: sources (MQTT, Kafka, Kinesis, HTTP ingest) decode into `StreamBatch`es
//! and send them on one bounded channel to the lake task, which encodes them into open
//! Parquet files, rolls those into `_staging/` and commits them with a checkpoint
//! (manifest of files, window state and source positions; see
//! `sluice_sinks::checkpoint`). On SIGINT/SIGTERM: stop accepting, let sources drain and
//! flush, close the channel, run a last checkpoint, exit 0.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use sluice_config::{Config, SourceConfig};
use sluice_core::{
    Checkpointed, Clock, PipeReceiver, PipeSender, Shutdown, StreamBatch, StreamSchema, SystemClock,
};
use sluice_ingest::decode::{DecodeLimits, Decoder};
use sluice_ingest::emit::Emitter;
use sluice_ingest::http::{HttpIngest, HttpIngestOptions};
use sluice_ingest::limit::RateLimit;
use sluice_ingest::mqtt::source::DurableAcks;
use sluice_ingest::mqtt::{MqttSource, start_embedded_broker};
use sluice_processors::guard::{LimitOf, RowLimit};
use sluice_processors::pipeline::Pipeline;
use sluice_sinks::checkpoint::{Checkpoints, Manifest};
use sluice_sinks::delta::DeltaTables;
use sluice_sinks::delta::maintain::{MaintainOptions, Maintenance, Upkeep};
use sluice_sinks::location::{LakeLocation, S3Options};
use sluice_sinks::notify::Notifiers;
use sluice_sinks::parquet::{Lake, LakeOptions, Written};
use sluice_sinks::query::QueryEngine;
use sluice_sinks::retry::{Breaker, RetryPolicy};
use tokio::sync::watch;
use tracing::Instrument;

use crate::RunArgs;

/// While the lake's store is failing, one attempt per this long once the breaker opened.
const STORE_COOLDOWN: Duration = Duration::from_secs(5);
/// How long the lake backlog must stay full before the hold is logged.
const HOLD_LOGGED_AFTER: Duration = Duration::from_secs(1);
/// How often the lake checks for files due to roll.
const ROLL_TICK: Duration = Duration::from_millis(250);
/// The longest a shutdown may take before we give up and exit non-zero.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(30);

pub(crate) fn main(args: RunArgs) -> ExitCode {
    let mut config = match &args.config {
        Some(path) => match crate::load_config(path) {
            Ok(c) => c,
            Err(code) => return code,
        },
        None => Config::embedded_default(),
    };
    if let Some(dir) = args.data_dir {
        config.lake.dir = dir;
    }
    if let Some(addr) = args.mqtt_listen {
        config.broker.listen = addr;
    }
    if let Some(addr) = args.http_listen {
        config.http.listen = addr;
    }
    if let Err(errors) = config.validate() {
        for e in errors {
            eprintln!("error: {e}");
        }
        return ExitCode::from(2);
    }
    let mut files = Vec::new();
    for spec in &args.from_file {
        match spec.split_once('=') {
            Some((stream, path)) if config.streams.contains_key(stream) => {
                files.push((stream.to_owned(), std::path::PathBuf::from(path)))
            }
            Some((stream, _)) => {
                eprintln!("error: --from-file {spec}: stream {stream:?} is not declared");
                return ExitCode::from(2);
            }
            None => {
                eprintln!("error: --from-file {spec}: expected STREAM=PATH");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = if files.is_empty() {
        runtime.block_on(serve(config))
    } else {
        runtime.block_on(run_files(config, files))
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The lake task fed by a fresh pipeline channel; the sender is for the sources.
type LakeTask = tokio::task::JoinHandle<anyhow::Result<()>>;

/// What the sources get from the lake task.
struct LakeHandle {
    task: LakeTask,
    tx: PipeSender,
    /// The newest checkpoint at start: where replayable sources resume.
    recovered: Manifest,
    /// Each checkpoint once durable: sources acknowledge up to its positions.
    checkpoints: watch::Receiver<Checkpointed>,
}

/// How long a stop waits for queued alert notifications to go out.
const NOTIFY_DRAIN: Duration = Duration::from_secs(5);

async fn start_lake(
    config: &Config,
    clock: &Arc<dyn Clock>,
    end: End,
    notifiers: Notifiers,
) -> anyhow::Result<LakeHandle> {
    let location = lake_location(config)?;
    let mut tables = DeltaTables::at(&location);
    let (checkpoints, recovered) = Checkpoints::recover(&location, &mut tables)
        .await
        .with_context(|| format!("cannot recover the lake at {}", location.url()))?;
    let recovered = recovered.unwrap_or_default();
    let interval = config.lake.checkpoint_interval.0;
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
    let mut pipeline = crate::pipeline::build(config, clock.clone()).map_err(|errors| {
        anyhow!(
            "the functions and windows do not compile:\n  - {}",
            errors.join("\n  - ")
        )
    })?;
    if end == End::Restart {
        restore_windows(&checkpoints, &recovered, &mut pipeline).await?;
        if recovered.id > 0 {
            tracing::info!(checkpoint = recovered.id, "resuming from checkpoint");
        }
    }
    let (ack, acks) = watch::channel(Arc::new(recovered.positions.clone()));
    let checkpointing = Checkpointing {
        checkpoints,
        tables,
        interval: (end == End::Restart && !interval.is_zero()).then_some(interval),
        positions: recovered.positions.clone(),
        pending: BTreeMap::new(),
        ack,
        failing: false,
    };
    let (tx, rx) = sluice_core::pipe(
        config.limits.queue_batches,
        config.limits.queue_bytes.as_usize(),
    );
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
    let span = tracing::info_span!("lake", component = "lake", kind = "parquet");
    Ok(LakeHandle {
        task: tokio::spawn(
            lake_loop(lake, pipeline, rx, end, checkpointing, notifiers, limits).instrument(span),
        ),
        tx,
        recovered,
        checkpoints: acks,
    })
}

/// What happens to open windows when the input ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A bounded run: the watermark goes to +∞ and every window is emitted.
    OfInput,
    /// A service stop: a last checkpoint saves window state for the next start.
    Restart,
}

/// Restores each window from the checkpoint's state snapshot.
async fn restore_windows(
    checkpoints: &Checkpoints,
    manifest: &Manifest,
    pipeline: &mut Pipeline,
) -> anyhow::Result<()> {
    for (name, path) in &manifest.state {
        let mut input = checkpoints.open_state(path).await?;
        match pipeline.restore(name, &mut input) {
            Ok(true) => tracing::info!(state = %name, "window or alert state restored"),
            Ok(false) => {
                tracing::warn!(window = %name, "checkpointed state of a window no longer configured is ignored")
            }
            Err(e) => {
                tracing::error!(window = %name, error = %e, "checkpointed window state does not fit the window (changed config?); starting it empty")
            }
        }
    }
    Ok(())
}

/// The lake task's commit and checkpoint bookkeeping (see `sluice_sinks::checkpoint`).
struct Checkpointing {
    checkpoints: Checkpoints,
    tables: DeltaTables,
    /// `None`: checkpoints off; stored files are committed as they roll, without a
    /// marker, and only a service stop writes a checkpoint (window state).
    interval: Option<Duration>,
    /// Every source position the processed batches cover.
    positions: BTreeMap<String, BTreeMap<String, String>>,
    /// Stored files no manifest owns yet (kept across a failed checkpoint).
    pending: BTreeMap<Arc<str>, Written>,
    ack: watch::Sender<Checkpointed>,
    failing: bool,
}

impl Checkpointing {
    fn record(&mut self, batch: &StreamBatch) {
        if let Some(p) = &batch.positions {
            self.positions.insert(p.source.clone(), p.offsets.clone());
        }
    }

    /// Moves what the lake stored into `pending`.
    fn take(&mut self, lake: &mut Lake) {
        for (table, written) in lake.take_written() {
            match self.pending.entry(table) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(written);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    let pending = o.get_mut();
                    pending.schema = written.schema;
                    pending.files.extend(written.files);
                }
            }
        }
    }

    /// Whether stored files wait for a commit.
    fn has_pending(&self, lake: &Lake) -> bool {
        !self.pending.is_empty() || lake.has_written()
    }

    /// Checkpoints off: commits the stored files to their tables, no marker.
    async fn commit_plain(&mut self, lake: &mut Lake) -> anyhow::Result<()> {
        self.take(lake);
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

    /// Stores every open file, snapshots the windows, writes the manifest, commits
    /// each table, then tells the sources. On failure what no manifest owns stays
    /// pending for the next try, and a written manifest is committed first then.
    async fn run(&mut self, lake: &mut Lake, pipeline: &mut Pipeline) -> anyhow::Result<()> {
        if self.interval.is_none() {
            self.commit_plain(lake).await?;
        }
        let started = std::time::Instant::now();
        self.checkpoints.complete(&mut self.tables).await?;
        lake.close_all().await?;
        self.take(lake);
        for (table, written) in &self.pending {
            self.tables.ensure(table, &written.schema).await?;
        }
        let id = self.checkpoints.next_id();
        let mut state = BTreeMap::new();
        // Each state is streamed into its file: memory holds no copy of it.
        for name in pipeline.state_names() {
            let (path, mut file) = self.checkpoints.create_state(id, &name)?;
            pipeline.snapshot(&name, &mut file)?;
            file.finish().await?;
            state.insert(name, path);
        }
        let manifest = Manifest {
            id,
            created_ms: SystemClock.now_ms(),
            tables: self
                .pending
                .iter()
                .map(|(t, w)| (t.to_string(), w.files.clone()))
                .collect(),
            legacy_files: Vec::new(),
            state,
            positions: self.positions.clone(),
        };
        self.checkpoints.write(manifest).await?;
        self.pending.clear();
        self.checkpoints.complete(&mut self.tables).await?;
        self.ack.send_replace(Arc::new(self.positions.clone()));
        metrics::counter!("sluice_checkpoints_total").increment(1);
        metrics::histogram!("sluice_checkpoint_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// A periodic or roll-triggered checkpoint: failures are logged once and retried.
    async fn attempt(&mut self, lake: &mut Lake, pipeline: &mut Pipeline) {
        match self.run(lake, pipeline).await {
            Ok(()) if self.failing => {
                tracing::info!("checkpoints recovered");
                self.failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                metrics::counter!("sluice_checkpoint_failures_total").increment(1);
                if !self.failing {
                    tracing::error!(error = %e, pending_rows = lake.pending_rows(), "checkpoint failed; sources are not acknowledged, retrying");
                    self.failing = true;
                }
            }
        }
    }
}

fn stream_schemas(config: &Config) -> BTreeMap<String, StreamSchema> {
    config
        .streams
        .iter()
        .filter_map(|(name, s)| Some((name.clone(), s.build_schema().ok()?)))
        .collect()
}

fn decode_limits(config: &Config) -> DecodeLimits {
    DecodeLimits {
        max_payload: config.decode.max_payload_size.as_usize(),
        max_depth: config.decode.max_depth,
        max_hops: config.limits.max_hops,
        dead_letter_payload_cap: config.decode.dead_letter_payload_cap.as_usize(),
    }
}

/// `--from-file`: feed each named stream from its file, commit, return.
/// Ends with one summary line (events, wall and CPU seconds, events/s, events/s per
/// CPU-second, peak RSS): the figures the W1 benchmark reports.
async fn run_files(config: Config, files: Vec<(String, std::path::PathBuf)>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let cpu_before = sluice_core::usage::usage().cpu_seconds;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let LakeHandle {
        task: lake_task,
        tx,
        ..
    // A bounded run writes the `alerts` table but sends no notifications.
    } = start_lake(&config, &clock, End::OfInput, Notifiers::default()).await?;
    let schemas = stream_schemas(&config);
    let limits = decode_limits(&config);
    let mut readers = Vec::new();
    for (stream, path) in files {
        let schema = schemas
            .get(&stream)
            .cloned()
            .ok_or_else(|| anyhow!("stream {stream:?} has no built-in schema"))?;
        // The file is the watermark partition (`_source`) of its rows.
        let decoder = Decoder::new(schema, &stream, &path.display().to_string(), None, limits);
        let emitter = Emitter::new(
            decoder,
            tx.clone(),
            config.decode.batch_rows,
            &format!("file:{stream}"),
            "file",
        );
        let shown = path.display().to_string();
        readers.push((
            shown,
            tokio::spawn(sluice_ingest::file::feed_file(path, emitter, clock.clone())),
        ));
    }
    drop(tx);
    let mut events = 0;
    for (path, reader) in readers {
        let lines = reader
            .await
            .map_err(|e| anyhow!("reader of {path} failed: {e}"))??;
        tracing::info!(%path, lines, "file read");
        events += lines;
    }
    lake_task
        .await
        .map_err(|e| anyhow!("the lake task failed: {e}"))??;
    let wall = started.elapsed().as_secs_f64();
    let usage = sluice_core::usage::usage();
    let cpu = usage.cpu_seconds - cpu_before;
    tracing::info!(
        events,
        wall_s = format!("{wall:.2}"),
        cpu_s = format!("{cpu:.2}"),
        events_per_s = (events as f64 / wall) as u64,
        events_per_cpu_s = (events as f64 / cpu.max(1e-9)) as u64,
        max_rss_mb = usage.max_rss_bytes / (1 << 20),
        "bounded run done"
    );
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    for w in config.warnings() {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    let mut signals = Signals::register()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let shutdown = Shutdown::new();

    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .map_err(|e| anyhow!("cannot listen for HTTP on {}: {e}", config.http.listen))?;
    let embedded = if config.broker.enabled {
        // Each device holds two sockets (the door's and rumqttd's); 1,024 are left for
        // the lake's files and the other connections.
        let open_files = sluice_core::usage::raise_open_files_limit().unwrap_or(0);
        let devices = open_files.saturating_sub(1024) / 2;
        if devices < config.broker.max_connections as u64 {
            tracing::info!(
                open_files,
                devices,
                max_connections = config.broker.max_connections,
                "the open-files limit allows fewer device connections than [broker] max_connections (two sockets each); raise it with ulimit -n for more"
            );
        }
        Some(start_embedded_broker(&config.broker).await?)
    } else {
        None
    };

    let LakeHandle {
        task: lake_task,
        tx,
        recovered,
        checkpoints,
    } = start_lake(
        &config,
        &clock,
        End::Restart,
        start_notifiers(&config, embedded.as_ref().map(|b| b.internal))?,
    )
    .await?;
    let schemas = stream_schemas(&config);
    let limits = decode_limits(&config);

    let mut source_tasks = Vec::new();
    for (name, source) in &config.sources {
        let stream = source.stream().unwrap_or_default();
        let schema = schemas
            .get(stream)
            .cloned()
            .ok_or_else(|| anyhow!("source {name:?}: stream {stream:?} is not declared"))?;
        let emitter = |decoder, kind| {
            Emitter::new(decoder, tx.clone(), config.decode.batch_rows, name, kind)
                .with_limits(source.limit())
                .until(shutdown.clone())
        };
        let task = match source {
            SourceConfig::Mqtt(mqtt) => {
                let decoder =
                    Decoder::new(schema, stream, name, mqtt.key_from_topic_segment, limits);
                let checkpoints_on = !config.lake.checkpoint_interval.0.is_zero();
                let durable = mqtt.uses_wal(checkpoints_on).then(|| DurableAcks {
                    dir: config.lake.local_dir().join("_wal").join(name),
                    resume: recovered.positions_of(name),
                    checkpoints: checkpoints.clone(),
                });
                let source = MqttSource::new(
                    name,
                    mqtt,
                    &config.decode,
                    embedded.as_ref(),
                    emitter(decoder, "mqtt"),
                    clock.clone(),
                    durable,
                )?
                .with_queue_bytes(config.limits.source_queue_bytes.as_usize());
                let span = tracing::info_span!("source", component = %name, kind = "mqtt");
                tokio::spawn(source.run(shutdown.clone()).instrument(span))
            }
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(kafka) => {
                let mut decoder = Decoder::new(schema, stream, name, None, limits);
                if kafka.key == "record_key" {
                    decoder = decoder.key_from_whole_topic();
                }
                let resume = recovered.positions_of(name);
                let emitter = emitter(decoder, "kafka").track_positions(resume.clone());
                let source = sluice_ingest::kafka::KafkaSource::new(
                    name,
                    kafka,
                    config.decode.flush_interval.0,
                    emitter,
                    clock.clone(),
                    &resume,
                    checkpoints.clone(),
                )?;
                let span = tracing::info_span!("source", component = %name, kind = "kafka");
                tokio::spawn(source.run(shutdown.clone()).instrument(span))
            }
            #[cfg(feature = "kinesis")]
            SourceConfig::Kinesis(kinesis) => {
                let decoder =
                    Decoder::new(schema, stream, name, None, limits).key_from_whole_topic();
                let resume = recovered.positions_of(name);
                let emitter = emitter(decoder, "kinesis").track_positions(resume.clone());
                let source = sluice_ingest::kinesis::KinesisSource::new(
                    name,
                    kinesis,
                    config.decode.flush_interval.0,
                    emitter,
                    clock.clone(),
                    &resume,
                )
                .await?;
                let span = tracing::info_span!("source", component = %name, kind = "kinesis");
                tokio::spawn(source.run(shutdown.clone()).instrument(span))
            }
            #[allow(unreachable_patterns)]
            _ => {
                return Err(anyhow!(
                    "source {name:?}: this kind of source is not built into this binary"
                ));
            }
        };
        source_tasks.push(task);
    }

    let (ingest, ingest_tasks) = HttpIngest::spawn(
        schemas.into_iter().collect(),
        &HttpIngestOptions {
            limits,
            batch_rows: config.decode.batch_rows,
            flush_interval: config.decode.flush_interval.0,
            limit: config.http.limit.clone(),
            queue_bytes: config.limits.source_queue_bytes.as_usize(),
        },
        tx.clone(),
        clock.clone(),
        shutdown.clone(),
    );
    drop(tx);

    let upkeep = start_maintenance(&config, &clock)?;
    let state = crate::http::AppState {
        ingest,
        query: QueryEngine::new(lake_location(&config)?),
        metrics,
    };
    let app = crate::http::router(state, config.http.max_body_size.as_usize());
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_shutdown.wait().await })
            .await
    });
    tracing::info!(
        http = %config.http.listen,
        mqtt = ?embedded.as_ref().map(|b| b.listen),
        lake = %config.lake.dir.display(),
        "sluice is running"
    );

    signals.recv().await;
    tracing::info!("shutting down: draining sources and committing open files");
    // No device is acknowledged for a message after this: the sources stop reading.
    if let Some(broker) = &embedded {
        broker.close_door();
    }
    shutdown.trigger();
    // A compaction cut short leaves at most a file no commit names (vacuum's).
    if let Some(task) = &upkeep {
        task.abort();
    }

    let drained = tokio::time::timeout(SHUTDOWN_BOUND, async {
        for task in source_tasks.into_iter().chain(ingest_tasks) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "source stopped with an error"),
                Err(e) => tracing::error!(error = %e, "source task failed"),
            }
        }
        if let Some(broker) = &embedded {
            broker.report_unread();
        }
        let lake_result = lake_task.await;
        let _ = server.await;
        lake_result
    })
    .await;
    match drained {
        Ok(Ok(Ok(()))) => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(e)) => Err(anyhow!("the lake task failed: {e}")),
        Err(_) => Err(anyhow!(
            "shutdown took longer than {SHUTDOWN_BOUND:?}; open files may not be committed"
        )),
    }
}

/// The lake `[lake]` names: a local directory (created) or an S3 bucket and prefix.
pub(crate) fn lake_location(config: &Config) -> anyhow::Result<LakeLocation> {
    let s3 = &config.lake.s3;
    let options = S3Options {
        region: s3.region.clone(),
        endpoint: s3.endpoint.clone(),
        path_style: s3.path_style,
        allow_http: s3.allow_http,
    };
    LakeLocation::open(&config.lake.dir, &options)
        .with_context(|| format!("cannot open the lake at {}", config.lake.dir.display()))
}

/// Compaction, retention and vacuum of every table, one at a time, round after round
/// (`[lake.maintenance]`); `None` when turned off. Failures are logged once per table
/// until it recovers.
fn start_maintenance(
    config: &Config,
    clock: &Arc<dyn Clock>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let settings = &config.lake.maintenance;
    if !settings.enabled {
        return Ok(None);
    }
    let location = lake_location(config)?;
    let options = MaintainOptions {
        target_size: settings.target_size.0,
        closed_after: settings.closed_after.0,
        open_min_files: settings.open_min_files,
        read_rate: settings.read_rate.0,
        zstd_level: config.lake.zstd_level,
        row_group_rows: config.lake.row_group_rows,
        retain: config
            .lake
            .retain
            .iter()
            .map(|(t, d)| (t.clone(), d.0))
            .collect(),
        vacuum_grace: settings.vacuum_grace.0,
        vacuum_interval: settings.vacuum_interval.0,
    };
    let mut upkeep = Maintenance::new(
        DeltaTables::at(&location),
        location.store().clone(),
        options,
        clock.clone(),
    );
    let interval = settings.interval.0;
    let span = tracing::info_span!("maintenance", component = "lake", kind = "delta");
    Ok(Some(tokio::spawn(
        async move {
            let mut failing = std::collections::BTreeSet::new();
            loop {
                tokio::time::sleep(interval).await;
                for table in location.tables().await.unwrap_or_default() {
                    match upkeep.run(&table).await {
                        Ok(done) => {
                            if failing.remove(&table) {
                                tracing::info!(table, "lake upkeep recovered");
                            }
                            if done != Upkeep::default() {
                                tracing::info!(table, ?done, "lake upkeep");
                            }
                        }
                        Err(e) => {
                            if failing.insert(table.clone()) {
                                tracing::warn!(table, error = %e, "lake upkeep failed; retrying next round");
                            }
                        }
                    }
                }
            }
        }
        .instrument(span),
    )))
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
    mut ckpt: Checkpointing,
    notifiers: Notifiers,
    limits: LakeLimits,
) -> anyhow::Result<()> {
    let LakeLimits {
        max_backlog,
        mut debts,
        mut shed,
    } = limits;
    let mut derived = Vec::new();
    let mut failures = Vec::new();
    let mut tick = tokio::time::interval(ROLL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_checkpoint = tokio::time::Instant::now();
    // Store attempts back off while the store fails; after 5 failures in a row the
    // breaker opens and one attempt is made per cooldown. The data waits in the lake
    // (bounded by the backlog, which holds the sources).
    let mut store = Breaker::new(RetryPolicy {
        retry_for: Duration::MAX,
        breaker_failures: 5,
        breaker_cooldown: STORE_COOLDOWN,
    });
    let mut next_store = tokio::time::Instant::now();
    // Since when the backlog has been full, and whether that was logged (only a hold
    // of a second or more is: a busy lake touches the limit briefly and often).
    let mut held: Option<(tokio::time::Instant, bool)> = None;
    loop {
        // Past the backlog the lake takes no batch until the store takes files: the
        // queue fills and the sources wait.
        let room = lake.backlog_bytes() < max_backlog;
        match (&mut held, room) {
            (None, false) => held = Some((tokio::time::Instant::now(), false)),
            (Some((since, logged @ false)), false) if since.elapsed() >= HOLD_LOGGED_AFTER => {
                *logged = true;
                tracing::warn!(
                    backlog_bytes = lake.backlog_bytes(),
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
                    ckpt.record(&b);
                    pipeline.process(b, &mut derived, &mut failures);
                    notify(&mut pipeline, &notifiers);
                    let rows = write_all(&mut lake, &mut derived, &mut failures, shed.as_mut());
                    debts.owe(&mut pipeline, rows);
                }
                None => break,
            },
            paid = pay(due.clone()), if due.is_some() => debts.paid(paid),
            _ = tick.tick() => {
                pipeline.tick(&mut derived, &mut failures);
                notify(&mut pipeline, &notifiers);
                let rows = write_all(&mut lake, &mut derived, &mut failures, shed.as_mut());
                debts.owe(&mut pipeline, rows);
                window_gauges(&pipeline);
                metrics::gauge!("sluice_pipeline_queue_batches").set(batches.len() as f64);
                metrics::gauge!("sluice_pipeline_queue_bytes").set(batches.queued_bytes() as f64);
                metrics::gauge!("sluice_lake_backlog_bytes").set(lake.backlog_bytes() as f64);
                metrics::gauge!("sluice_lake_backlog_held").set(f64::from(u8::from(held.is_some())));
                if tokio::time::Instant::now() < next_store {
                    continue;
                }
                match lake.roll_due().await {
                    Ok(_) => {
                        if store.success() {
                            tracing::info!("lake writes recovered");
                            metrics::gauge!("sluice_lake_breaker_open").set(0.0);
                        }
                    }
                    Err(e) => {
                        let failed = store.failure();
                        next_store = tokio::time::Instant::now() + failed.wait;
                        if failed.first {
                            tracing::error!(error = %e, pending_rows = lake.pending_rows(), "lake commit failed; holding the data and retrying with backoff");
                        }
                        if failed.opened {
                            tracing::warn!(cooldown = ?STORE_COOLDOWN, "lake store breaker open; one attempt per cooldown");
                            metrics::gauge!("sluice_lake_breaker_open").set(1.0);
                        }
                        continue;
                    }
                }
                match ckpt.interval {
                    Some(interval)
                        if ckpt.has_pending(&lake) || last_checkpoint.elapsed() >= interval =>
                    {
                        ckpt.attempt(&mut lake, &mut pipeline).await;
                        last_checkpoint = tokio::time::Instant::now();
                    }
                    Some(_) => {}
                    None if ckpt.has_pending(&lake) => {
                        if let Err(e) = ckpt.commit_plain(&mut lake).await {
                            let failed = store.failure();
                            next_store = tokio::time::Instant::now() + failed.wait;
                            if failed.first {
                                tracing::error!(error = %e, "lake commit failed; holding the files and retrying with backoff");
                            }
                        }
                    }
                    None => {}
                }
            }
        }
    }
    if end == End::OfInput {
        pipeline.finish(&mut derived, &mut failures);
        notify(&mut pipeline, &notifiers);
        write_all(&mut lake, &mut derived, &mut failures, shed.as_mut());
    }
    notifiers.stop(NOTIFY_DRAIN).await;
    // Final commit (a checkpoint for a service stop); retry for a while if the store
    // is failing.
    let mut last = None;
    for _ in 0..20 {
        let done = match end {
            End::OfInput => match lake.close_all().await {
                Ok(_) => ckpt.commit_plain(&mut lake).await,
                Err(e) => Err(e.into()),
            },
            End::Restart => ckpt.run(&mut lake, &mut pipeline).await,
        };
        match done {
            Ok(()) => {
                tracing::info!("final commit done");
                return Ok(());
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(anyhow!(
        "final commit failed; {} rows were not written: {}",
        lake.pending_rows(),
        last.map(|e| format!("{e:#}")).unwrap_or_default()
    ))
}

/// Hands the alert rules' notifications to the notifiers (never blocks).
fn notify(pipeline: &mut Pipeline, notifiers: &Notifiers) {
    for n in pipeline.take_notifications() {
        notifiers.send(n);
    }
}

/// The configured notifiers, started; every problem as one error.
fn start_notifiers(
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
fn window_gauges(pipeline: &Pipeline) {
    if let Some(alerts) = pipeline.alerts() {
        for (rule, keys, firing) in alerts.gauges() {
            metrics::gauge!("sluice_alert_keys", "rule" => rule.to_owned()).set(keys as f64);
            metrics::gauge!("sluice_alert_firing", "rule" => rule.to_owned()).set(firing as f64);
        }
    }
    for w in pipeline.windows() {
        let name = w.name().to_owned();
        if let Some(mark) = w.watermark().filter(|&m| m != i64::MAX) {
            metrics::gauge!("sluice_window_watermark_ms", "window" => name.clone())
                .set(mark as f64);
        }
        metrics::gauge!("sluice_window_state_bytes", "window" => name).set(w.state_size() as f64);
    }
}

/// Logs pipeline failures and encodes every derived batch into the lake, past `shed`
/// (`[lake] limit` in shed mode) if set; the rows written outside `dead_letter` (what
/// `[lake] limit` counts).
fn write_all(
    lake: &mut Lake,
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
        } else if &**stream != DEAD_LETTER {
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

/// SIGINT and SIGTERM, registered when created: build it before anything can be
/// reached from outside, or a quick SIGTERM would still kill the process the default
/// way (no drain, no commit).
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
