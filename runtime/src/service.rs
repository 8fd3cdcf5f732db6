//! `sluice run` as a service ([`serve`]) or a bounded run over files ([`run_files`]):
//! the HTTP listener, the embedded broker, the lake task, the sources, HTTP ingest and
//! lake upkeep, started in that order and stopped in reverse. On the stop signal: no
//! device is acknowledged any more, sources drain and flush, the lake task runs a last
//! checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use sluice_config::{Config, http_source};
use sluice_core::{Clock, Shutdown, StreamSchema, SystemClock};
use sluice_ingest::decode::{DecodeLimits, Decoder};
use sluice_ingest::emit::Emitter;
use sluice_ingest::http::{HttpIngest, HttpIngestOptions};
use sluice_ingest::mqtt::start_embedded_broker;
use sluice_ingest::source::{Owned, SourceContext};
use sluice_ingest::wal::DurableAcks;
use sluice_sinks::checkpoint::NODES_DIR;
use sluice_sinks::cluster::{
    NodeStatus, checker, node_status, node_statuses, remove_status, unowned, write_status,
};
use sluice_sinks::delta::DeltaTables;
use sluice_sinks::delta::maintain::{MaintainOptions, Maintenance, Upkeep};
use sluice_sinks::location::{LakeLocation, S3Options};
use sluice_sinks::notify::Notifiers;
use sluice_sinks::query::{QueryEngine, QueryLimits};
use tracing::Instrument;

use crate::lake::{End, LakeHandle, start_lake, start_notifiers};

/// The longest a shutdown may take before we give up and exit non-zero.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(30);

/// How long the HTTP server waits after the stop for its connections to finish. A
/// client that stopped reading (a tap, an event stream, a large query result) keeps
/// its connection's last writes blocked; it must not hold the stop.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// Waits for the HTTP server's graceful end for at most [`HTTP_DRAIN`], then drops it:
/// connections still open then end with the runtime.
async fn close_http(mut server: tokio::task::JoinHandle<std::io::Result<()>>) {
    if tokio::time::timeout(HTTP_DRAIN, &mut server).await.is_err() {
        server.abort();
        tracing::warn!(
            "closed the HTTP connections whose clients were not reading {HTTP_DRAIN:?} after the stop"
        );
    }
}

fn stream_schemas(config: &Config) -> BTreeMap<String, StreamSchema> {
    config
        .streams
        .iter()
        .filter_map(|(name, s)| Some((name.clone(), s.build_schema().ok()?)))
        .collect()
}

/// Where source `name` keeps its write-ahead log: `<local>/_wal/<source>`, or on a
/// node of a cluster `<local>/_nodes/<node>/_wal/<source>` (nodes may share a
/// directory, never a log).
fn wal_dir(config: &Config, name: &str) -> std::path::PathBuf {
    let local = config.lake.local_dir();
    match config.node_id() {
        Some(node) => local.join(NODES_DIR).join(node).join("_wal").join(name),
        None => local.join("_wal").join(name),
    }
}

fn decode_limits(config: &Config) -> DecodeLimits {
    DecodeLimits {
        max_payload: config.decode.max_payload_size.as_usize(),
        max_depth: config.decode.max_depth,
        max_hops: config.limits.max_hops,
        dead_letter_payload_cap: config.decode.dead_letter_payload_cap.as_usize(),
        max_ahead_ms: bound_ms(config.decode.max_event_time_ahead),
        max_behind_ms: bound_ms(config.decode.max_event_time_behind),
    }
}

/// A bound in milliseconds; `None` for `"0s"` (no bound).
fn bound_ms(bound: sluice_config::Duration) -> Option<i64> {
    Some(bound.0)
        .filter(|d| !d.is_zero())
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `--from-file`: feed each named stream from its file, commit, return.
/// Ends with one summary line (events, wall and CPU seconds, events/s, events/s per
/// CPU-second, peak RSS): the figures the W1 benchmark reports.
pub async fn run_files(
    config: Config,
    files: Vec<(String, std::path::PathBuf)>,
) -> anyhow::Result<()> {
    keep_large_blocks_mapped();
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
        let shown = path.display().to_string();
        let workers = (0..config.workers())
            .map(|_| {
                let decoder = Decoder::new(schema.clone(), &stream, &shown, None, limits);
                let component = format!("file:{stream}");
                Emitter::new(
                    decoder,
                    tx.clone(),
                    config.decode.batch_rows,
                    &component,
                    "file",
                )
            })
            .collect();
        let feed = sluice_ingest::file::feed_file(path, workers, tx.clone(), clock.clone());
        readers.push((shown, tokio::spawn(feed)));
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

/// Keeps every allocation of 1 MiB or more in a mapping of its own; for bounded runs.
/// glibc starts with that rule (at 128 KiB) but raises its threshold to as much as
/// 32 MiB once a large block is freed, and from then on large vectors come from the
/// heap, where each doubling copies and leaves the old block behind. A million keys'
/// window state grows by doubling, so that raised the peak: the 1,000,000-device run
/// peaked at 260-262 MB against 279-281 with one worker, 296 against 307-314 with two,
/// with W1's events per CPU-second unchanged (README, "W1"). Not in the service: in
/// the query storm (`scripts/bench-queries.sh`) it lowered the peak (1,404 MB against
/// 1,469) but every kind of query took longer (a fresh mapping is zeroed page by page
/// on first touch, where a reused heap block is not). An operator's own
/// `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES` is left alone.
fn keep_large_blocks_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
        && std::env::var_os("GLIBC_TUNABLES").is_none()
    {
        // SAFETY: mallopt only changes the allocator's threshold for later requests.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

/// Runs the service until `stop` completes, then shuts it down in order (see the
/// module docs); an error names what could not start or stop.
pub async fn serve(config: Config, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    for w in config.warnings() {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    for note in &config.notes {
        tracing::info!("{note}");
    }
    let (metrics, sampler) = crate::console::install()?;
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

    // The listener answers from here on: "starting" (503) until the service is built.
    let front = crate::http::Front::default();
    let server_shutdown = shutdown.clone();
    let app = front.router();
    let server = match &config.http.tls {
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { server_shutdown.wait().await })
                .await
        }),
        Some(tls) => {
            let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let server_config =
                sluice_ingest::tls::server_config(&tls.cert_file, &tls.key_file, None, alpn)
                    .map_err(|e| anyhow!("[http.tls]: {e}"))?;
            let listener = crate::https::TlsListener::new(
                listener,
                tokio_rustls::TlsAcceptor::from(server_config),
            )?;
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { server_shutdown.wait().await })
                    .await
            })
        }
    };

    // A stop signal while the lake starts (recovery, or a retried wait for Kafka)
    // ends the start: what it left is what a crash there would leave, which recovery
    // completes on the next start.
    tokio::pin!(stop);
    let started = start_lake(
        &config,
        &clock,
        End::Restart,
        start_notifiers(&config, embedded.as_ref().map(|b| b.internal))?,
    );
    let LakeHandle {
        task: lake_task,
        tx,
        recovered,
        checkpoints,
        peers,
        leases,
        checkpoint_now,
        fatal,
        taps,
        schemas: tables,
    } = tokio::select! {
        started = started => started?,
        () = &mut stop => {
            shutdown.trigger();
            close_http(server).await;
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    let schemas = stream_schemas(&config);
    let limits = decode_limits(&config);

    let owned = Arc::new(Owned::default());
    let mut source_tasks = Vec::new();
    let checkpoints_on = !config.lake.checkpoint_interval.0.is_zero();
    for (name, source) in &config.sources {
        let stream = source.stream().unwrap_or_default();
        let schema = schemas
            .get(stream)
            .cloned()
            .ok_or_else(|| anyhow!("source {name:?}: stream {stream:?} is not declared"))?;
        let context = SourceContext {
            schema,
            limits,
            decode: &config.decode,
            tx: tx.clone(),
            clock: clock.clone(),
            shutdown: shutdown.clone(),
            resume: recovered.positions_of(name),
            checkpoints: checkpoints.clone(),
            checkpoints_on,
            embedded: embedded.as_ref(),
            wal_dir: wal_dir(&config, name),
            queue_bytes: config.limits.source_queue_bytes.as_usize(),
            node_id: config.node_id(),
            peers: peers.clone(),
            leases: leases.clone(),
            owned: owned.clone(),
            checkpoint_now: checkpoint_now.clone(),
        };
        let source = sluice_ingest::source::build(name, source, context).await?;
        let span = tracing::info_span!("source", component = %name, kind = source.kind());
        source_tasks.push(tokio::spawn(source.run(shutdown.clone()).instrument(span)));
    }
    // Devices' publishes are read from here on, once each embedded source has
    // subscribed: before, rumqttd would acknowledge them to nobody.
    if let Some(broker) = &embedded {
        broker.open_door();
    }

    // HTTP ingest is logged before it answers (`[http] durable_acks`), always into a
    // stream keyed through the repartition topic: the line numbers let the topic's
    // readers recognise a replay after a crash.
    let logs = config
        .logged_http_streams()
        .into_iter()
        .map(|stream| {
            let name = http_source(&stream);
            let durable = DurableAcks {
                dir: wal_dir(&config, &name),
                resume: recovered.positions_of(&name),
                checkpoints: checkpoints.clone(),
            };
            (stream, durable)
        })
        .collect();
    let (ingest, ingest_tasks) = HttpIngest::spawn(
        schemas.into_iter().collect(),
        &HttpIngestOptions {
            limits,
            batch_rows: config.decode.batch_rows,
            flush_interval: config.decode.flush_interval.0,
            limit: config.http.limit.clone(),
            queue_bytes: config.limits.source_queue_bytes.as_usize(),
            idempotency_ttl: config.http.idempotency_ttl.0,
            idempotency_keys: usize::try_from(config.http.idempotency_keys).unwrap_or(usize::MAX),
            partition: match config.node_id() {
                Some(node) => format!("http@{node}"),
                None => "http".into(),
            },
        },
        logs,
        tx.clone(),
        clock.clone(),
        shutdown.clone(),
    )?;
    drop(tx);

    let upkeep = start_maintenance(&config, &clock)?;
    let location = lake_location(&config)?;
    let status = config.node_id().map(|node_id| {
        let status = NodeStatus {
            node_id,
            http: config.http.listen.clone(),
            ..NodeStatus::default()
        };
        tokio::spawn(report_status(
            location.clone(),
            status,
            owned.clone(),
            shutdown.clone(),
        ))
    });
    let http = &config.http;
    let limits = QueryLimits {
        memory: Some(http.query_memory.as_usize()).filter(|&b| b > 0),
        max_rows: usize::try_from(http.query_max_rows).ok().filter(|&n| n > 0),
        max_bytes: Some(http.query_max_bytes.as_usize()).filter(|&b| b > 0),
        max_join_pairs: Some(http.query_max_join_pairs).filter(|&n| n > 0),
    };
    let state = crate::http::AppState {
        ingest,
        query: QueryEngine::new(location).with_limits(limits),
        query_runtime: Arc::new(
            crate::queries::QueryRuntime::new(
                std::thread::available_parallelism().map_or(1, usize::from),
                Some(http.query_rss_limit.0).filter(|&b| b > 0),
            )
            .map_err(|e| anyhow!("cannot start the query threads: {e}"))?,
        ),
        metrics,
        console: crate::console::Console::start(
            &config,
            sampler,
            (taps, &tables),
            shutdown.clone(),
        ),
        query_timeout: Some(http.query_timeout.0).filter(|t| !t.is_zero()),
        shutdown: shutdown.clone(),
        tokens: Arc::new(
            crate::tokens::Tokens::new(
                &http.tokens,
                http.tokens_file.as_deref(),
                http.jwt.as_ref(),
            )
            .map_err(|e| anyhow!("[http]: {e}"))?,
        ),
        queries: (http.query_concurrency > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(http.query_concurrency as usize))),
    };
    front.set(crate::http::router(
        state,
        config.http.max_body_size.as_usize(),
    ));
    tracing::info!(
        http = %config.http.listen,
        mqtt = ?embedded.as_ref().map(|b| b.listen),
        lake = %config.lake.dir.display(),
        "sluice is running"
    );

    tokio::select! {
        () = &mut stop => {}
        () = fatal.notified() => tracing::error!("the lake task cannot go on; stopping"),
    }
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
        close_http(server).await;
        if let Some(status) = status {
            let _ = status.await;
        }
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

/// The cluster as the lake shows it (`/api/cluster`, `sluice status`): each node's
/// newest status and how long it has been silent (`silent_ms`; a node that stopped
/// cleanly removed its status, one that was killed stays with a growing silence),
/// and the partitions no live node owns (`unowned`).
pub async fn cluster_view(location: &LakeLocation) -> anyhow::Result<serde_json::Value> {
    let now = SystemClock.now_ms();
    let statuses = node_statuses(location).await?;
    let unowned = unowned(&statuses, now, LIVE_MS);
    let nodes: Vec<serde_json::Value> = statuses
        .into_iter()
        .map(|n| {
            serde_json::json!({
                "node_id": n.node_id,
                "http": n.http,
                "updated_ms": n.updated_ms,
                "silent_ms": now.saturating_sub(n.updated_ms).max(0),
                "partitions": n.partitions,
            })
        })
        .collect();
    Ok(serde_json::json!({ "nodes": nodes, "unowned": unowned }))
}

/// How often a node of a cluster rewrites its status in the lake.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// A node whose status is older than this (three rounds) counts as gone.
const LIVE_MS: i64 = 15_000;
/// How often a node with Kafka sources looks for partitions no live node owns: the
/// checker (`sluice_sinks::cluster::checker`) lists and reads every node's status,
/// the others read the checker's.
const UNOWNED_CHECK: Duration = Duration::from_secs(30);
/// Partitions unowned this long are logged: a killed node's stay unowned for its
/// session timeout (librdkafka's default 45 s) and a rebalance, no more.
const UNOWNED_WARN: Duration = Duration::from_secs(120);

/// Watches for partitions that some node knows and no live node owns: their records
/// are read by nobody. On the cluster's checker only (the others watch that it is
/// live), sets `sluice_cluster_unowned_partitions` per source, and logs once when
/// some stay unowned for [`UNOWNED_WARN`], and once when none are left.
#[derive(Default)]
struct Orphans {
    last_check: Option<tokio::time::Instant>,
    /// The checker as of the last full read (this node's own id when it is).
    checker: Option<String>,
    since: Option<tokio::time::Instant>,
    warned: bool,
    gauged: std::collections::BTreeSet<String>,
}

impl Orphans {
    /// Checks, at most every [`UNOWNED_CHECK`], with this node's own status as it is
    /// now (`own`) rather than as last written.
    async fn check(&mut self, location: &LakeLocation, own: &NodeStatus) {
        let now = tokio::time::Instant::now();
        if self.last_check.is_some_and(|at| now - at < UNOWNED_CHECK) {
            return;
        }
        self.last_check = Some(now);
        match self.look(location, own).await {
            Some(Look::Checked(found)) => self.report(&found, now),
            // Another node checks: this one says nothing (its gauges go to 0).
            Some(Look::Other) => {
                self.warned = false;
                self.report(&BTreeMap::new(), now);
            }
            None => {}
        }
    }

    /// What this node sees: as the checker, the unowned partitions. A node that is
    /// not the checker reads only the checker's status, and reads them all (and may
    /// become the checker) when that one is silent or gone. `None`: the lake could
    /// not be read.
    async fn look(&mut self, location: &LakeLocation, own: &NodeStatus) -> Option<Look> {
        if let Some(other) = self.checker.as_ref().filter(|c| **c != own.node_id) {
            // Still the checker on its own: live, and knowing partitions.
            let status = node_status(location, other).await.ok()?;
            if status.is_some_and(|s| checker(&[s], SystemClock.now_ms(), LIVE_MS).is_some()) {
                return Some(Look::Other);
            }
        }
        let mut statuses = node_statuses(location).await.ok()?;
        statuses.retain(|s| s.node_id != own.node_id);
        statuses.push(own.clone());
        let now_ms = SystemClock.now_ms();
        self.checker = checker(&statuses, now_ms, LIVE_MS).map(str::to_owned);
        Some(if self.checker.as_deref() == Some(own.node_id.as_str()) {
            Look::Checked(unowned(&statuses, now_ms, LIVE_MS))
        } else {
            Look::Other
        })
    }

    /// Sets the gauges to what was `found` at `now`; logs once when partitions have
    /// stayed unowned for [`UNOWNED_WARN`], and once when none are left.
    fn report(&mut self, found: &BTreeMap<String, Vec<String>>, now: tokio::time::Instant) {
        for source in std::mem::take(&mut self.gauged) {
            if !found.contains_key(&source) {
                metrics::gauge!("sluice_cluster_unowned_partitions", "component" => source)
                    .set(0.0);
            }
        }
        for (source, partitions) in found {
            metrics::gauge!("sluice_cluster_unowned_partitions", "component" => source.clone())
                .set(partitions.len() as f64);
            self.gauged.insert(source.clone());
        }
        if found.is_empty() {
            if std::mem::take(&mut self.warned) {
                tracing::info!("every partition has an owner again");
            }
            self.since = None;
            return;
        }
        let since = *self.since.get_or_insert(now);
        if !self.warned && now - since >= UNOWNED_WARN {
            self.warned = true;
            tracing::warn!(unowned = ?found, seconds = (now - since).as_secs(),
                "partitions owned by no live node of the cluster: nobody reads them (a consumer group that did not finish a rebalance?)");
        }
    }
}

/// What [`Orphans::look`] saw.
#[derive(Debug, PartialEq)]
enum Look {
    /// This node is the checker; the unowned partitions by source.
    Checked(BTreeMap<String, Vec<String>>),
    /// Another node is.
    Other,
}

/// Rewrites this node's status (`sluice_sinks::cluster`) every [`STATUS_INTERVAL`]
/// with the partitions its sources own, until shutdown; then removes it, as the node
/// owns nothing any more. A lake that refuses the write is logged once.
async fn report_status(
    location: LakeLocation,
    mut status: NodeStatus,
    owned: Arc<Owned>,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let mut failing = false;
    let mut orphans = Orphans::default();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        status.updated_ms = SystemClock.now_ms();
        status.partitions = owned.snapshot();
        status.known = owned.known();
        match write_status(&location, &status).await {
            Ok(()) if failing => {
                tracing::info!("node status written again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot write this node's status to the lake; retrying");
                failing = true;
            }
            Err(_) => {}
        }
        // After the write, so that a slow store delays the check, not this status.
        if !status.known.is_empty() {
            orphans.check(&location, &status).await;
        }
    }
    if let Err(e) = remove_status(&location, &status.node_id).await {
        tracing::debug!(error = %e, "cannot remove this node's status");
    }
}

/// The lake `[lake]` names: a local directory (created) or an S3 bucket and prefix.
pub fn lake_location(config: &Config) -> anyhow::Result<LakeLocation> {
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
        memory: settings.memory.as_usize(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_node_looks_for_unowned_partitions_until_it_falls_silent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = LakeLocation::local(dir.path()).expect("location");
        let known = BTreeMap::from([("k".to_owned(), vec!["t/0".into(), "t/1".into()])]);
        let status = |id: &str, owns: &str, updated_ms| NodeStatus {
            node_id: id.into(),
            updated_ms,
            partitions: BTreeMap::from([("k".to_owned(), vec![owns.to_owned()])]),
            known: known.clone(),
            ..NodeStatus::default()
        };
        let now = SystemClock.now_ms();
        write_status(&location, &status("a", "t/0", now))
            .await
            .expect("write");
        let b = status("b", "t/1", now);
        let mut orphans = Orphans::default();
        assert_eq!(orphans.look(&location, &b).await, Some(Look::Other));
        assert_eq!(orphans.checker.as_deref(), Some("a"));
        // While a is live, b reads only a's status: a node that appeared since (with
        // a smaller id) is not even seen.
        write_status(&location, &status("0", "t/1", now))
            .await
            .expect("write");
        assert_eq!(orphans.look(&location, &b).await, Some(Look::Other));
        assert_eq!(orphans.checker.as_deref(), Some("a"));
        remove_status(&location, "0").await.expect("remove");
        // a falls silent: b reads every status, checks, and sees a's partition unowned.
        write_status(&location, &status("a", "t/0", now - LIVE_MS))
            .await
            .expect("write");
        let unowned = BTreeMap::from([("k".to_owned(), vec!["t/0".to_owned()])]);
        assert_eq!(
            orphans.look(&location, &b).await,
            Some(Look::Checked(unowned.clone()))
        );
        assert_eq!(orphans.checker.as_deref(), Some("b"));
        assert_eq!(
            orphans.look(&location, &b).await,
            Some(Look::Checked(unowned))
        );
        // a is back: the smaller id checks again.
        write_status(&location, &status("a", "t/0", now))
            .await
            .expect("write");
        assert_eq!(orphans.look(&location, &b).await, Some(Look::Other));
    }
}
