//! `sluice-loadtest`: device and user fleets, record and replay, workload files and
//! pipeline benchmarks. `sluice-loadtest --help` documents every subcommand.

use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sluice_loadtest::bench;
use sluice_loadtest::drive::{AlertOptions, DriveOptions, ProbeOptions, drive};
use sluice_loadtest::generate::{GenerateSpec, write_workload};
use sluice_loadtest::record::{
    RecordOptions, ReplayOptions, ReplayWorkload, epoch_us, read_recording, record,
};
use sluice_loadtest::scenario::{Flood, Kind, Scenario, ScenarioWorkload};
use sluice_loadtest::stats::{RunInfo, Stats, write_hgrm};
use sluice_loadtest::target::{Target, TargetOptions};
use sluice_loadtest::workload::Workload;

/// Sluice load tester: publish telemetry and clickstream fleets at a paced rate, record
/// and replay real traffic at N×, and report latency percentiles measured from each
/// message's intended send time (open loop: a stalled target shows up as latency).
///
/// Targets: mqtt://HOST:PORT, http://HOST:PORT (Sluice HTTP ingest),
/// kafka://HOST:PORT/TOPIC, kinesis://STREAM?endpoint=URL&region=R (the standard AWS
/// credential chain), file:PATH.
/// Exit status: 0 when the run completed (its losses are in the report), 1 when the
/// target cannot be reached or the arguments are wrong.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish DESIGN.md telemetry from N devices to `devices/<id>/telemetry`.
    Telemetry(RunArgs),
    /// Publish DESIGN.md clickstream events from N users to `clicks/<id>`.
    Clicks(RunArgs),
    /// Send a recording (from `record`) at original speed, N× or as fast as possible.
    Replay(ReplayArgs),
    /// Record MQTT, Kafka or Kinesis traffic with arrival times to Parquet (*.parquet)
    /// or JSON lines.
    Record(RecordArgs),
    /// Write a workload as JSON lines, as fast as possible (default: W1 = 10M telemetry
    /// events, 10k devices, 1 simulated hour, event times up to 2 s behind, 1% errors).
    Generate(GenerateArgs),
    /// Run decode → batch → Parquet commit over a JSON-lines file on one thread, and
    /// report events/s, events/s per core (CPU time) and batch latency percentiles.
    Bench {
        /// Input JSON lines (e.g. from `generate`).
        #[arg(long)]
        input: PathBuf,
        /// Rows per batch.
        #[arg(long, default_value_t = 8192)]
        batch_rows: usize,
        /// Lake directory to write (default: a temporary directory, removed after).
        #[arg(long)]
        lake: Option<PathBuf>,
        /// zstd level of the Parquet files (the service's default is 1).
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Decode only, skipping the Parquet write, to see how the time splits.
        #[arg(long)]
        decode_only: bool,
        /// Check a per-device rate limit of this many events/s on every event (what
        /// `limit.per_key_rate` costs; set it high to keep it from binding).
        #[arg(long)]
        per_key_rate: Option<u32>,
        /// The per-device limit in block mode (`limit.per_key_mode = "block"`): what
        /// the check costs (a hold is not waited out: keep the rate from binding).
        #[arg(long, requires = "per_key_rate")]
        per_key_block: bool,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Where to send.
#[derive(Debug, Args)]
struct TargetArgs {
    /// mqtt://HOST:PORT, http://HOST:PORT, kafka://HOST:PORT/TOPIC,
    /// kinesis://STREAM?endpoint=URL&region=R, or file:PATH.
    #[arg(long)]
    target: String,
    /// MQTT QoS: 1 waits for each PUBACK (the ack latency), 0 is fire and forget.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// MQTT client connections (devices are spread over them by id), or concurrent HTTP
    /// requests / Kinesis PutRecords calls.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Sluice stream for HTTP ingest (default: telemetry or clicks).
    #[arg(long)]
    stream: Option<String>,
    /// Events per HTTP request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// MQTT client id prefix (connection i is `<prefix>-<i>`).
    #[arg(long)]
    client_id: Option<String>,
    /// mqtts://: PEM CA of the broker's certificate (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// mqtts:// with client certificates: connection `<id>` presents `DIR/<id>.pem`
    /// and `DIR/<id>.key`.
    #[arg(long, value_name = "DIR")]
    cert_dir: Option<std::path::PathBuf>,
}

/// The fleet. Flags override the --spec file; the README lists the spec keys.
#[derive(Debug, Args)]
struct ScenarioArgs {
    /// TOML scenario (see loadtest/scenarios/: steady, burst, flood).
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Devices (telemetry) or users (clicks).
    #[arg(long, visible_alias = "users")]
    devices: Option<u64>,
    /// Total events per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Events per second per device or user (total = fleet × this).
    #[arg(long, visible_alias = "per-user-rate")]
    per_device_rate: Option<f64>,
    /// How long to send (e.g. 5s, 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// RNG seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Topic template; {id} is the device or user id.
    #[arg(long)]
    topic: Option<String>,
    /// Extra string fields per telemetry payload.
    #[arg(long)]
    extra_fields: Option<u32>,
    /// Bytes per extra field value.
    #[arg(long)]
    extra_field_bytes: Option<u32>,
    /// Event times lag the send time by up to this many ms.
    #[arg(long)]
    disorder_ms: Option<u64>,
    /// Fraction of malformed payloads (0..1).
    #[arg(long)]
    malformed_fraction: Option<f64>,
    /// Chance per reading that a device starts a temperature excursion (alerts fire).
    #[arg(long)]
    excursion_probability: Option<f64>,
    /// Fraction of devices that go silent after --churn-after.
    #[arg(long)]
    churn_fraction: Option<f64>,
    /// When churned devices go silent.
    #[arg(long, value_parser = humantime::parse_duration)]
    churn_after: Option<Duration>,
    /// Index of one device that floods at --flood-factor × the others' rate.
    #[arg(long)]
    flood_device: Option<u64>,
    /// The flooding device's rate multiple.
    #[arg(long, default_value_t = 100)]
    flood_factor: u64,
    /// Clicks: distinct pages.
    #[arg(long)]
    pages: Option<u64>,
    /// Clicks: mean think time between a user's events, ms.
    #[arg(long)]
    think_time_ms: Option<f64>,
    /// Clicks: chance a session is a single page view.
    #[arg(long)]
    bounce_probability: Option<f64>,
    /// Clicks: chance a session converts (add_to_cart + purchase).
    #[arg(long)]
    conversion_probability: Option<f64>,
}

/// What to write and measure.
#[derive(Debug, Args)]
struct OutputArgs {
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the ack-latency percentile distribution (.hgrm, ms) here.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write a PNG of latency over time and by percentile here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Sluice's HTTP address (http://HOST:PORT): inject probe events and measure
    /// publish → queryable latency by polling /api/query.
    #[arg(long)]
    query_url: Option<String>,
    /// One probe per this interval.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    probe_every: Duration,
    /// How often to poll /api/query for probes.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    probe_poll: Duration,
    /// Lake table the probes land in (default: telemetry or clicks).
    #[arg(long)]
    probe_table: Option<String>,
    /// Subscribe to this MQTT topic filter (e.g. `alerts/#`) and measure publish →
    /// alert latency for every `fire` alert: from the intended send time of the reading
    /// that fired it (the alert's `at`) to its arrival.
    #[arg(long)]
    alert_topic: Option<String>,
    /// The broker the alerts come from (mqtt://HOST:PORT). Default: --target.
    #[arg(long)]
    alert_broker: Option<String>,
    /// Window rules: time their alerts from `window_end` plus this (the stream's
    /// max_out_of_orderness: the earliest the window can close).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    alert_window_delay: Duration,
    /// How long to wait after the last send for acks and probes.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Recording from `record` (*.parquet or JSON lines).
    #[arg(long)]
    input: PathBuf,
    /// Speed-up of the recorded gaps (1 = original speed, 10 = ten times faster).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Send as fast as possible, ignoring the recorded gaps.
    #[arg(long)]
    max_speed: bool,
    /// Play the recording this many times.
    #[arg(long, default_value_t = 1)]
    loops: u32,
    /// Multiply the fleet: each message also goes out as copies 1..K-1 with the id
    /// rewritten to `<id>~<copy>` in payload, topic and key.
    #[arg(long, default_value_t = 1)]
    multiply: u32,
    /// Payload field holding the device or user id (default: device_id, else user_id).
    #[arg(long)]
    id_field: Option<String>,
    /// Kind of the traffic, for probe events: telemetry or clicks.
    #[arg(long, default_value = "telemetry", value_parser = parse_kind)]
    kind: Kind,
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct RecordArgs {
    /// mqtt://HOST:PORT, kafka://HOST:PORT[/TOPIC] or kinesis://STREAM?endpoint=URL.
    #[arg(long)]
    source: String,
    /// MQTT topic filters or Kafka topics (repeatable).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Kafka and Kinesis: start at the oldest retained record instead of now.
    #[arg(long)]
    from_beginning: bool,
    /// Subscription QoS.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Output file: *.parquet for Parquet, anything else for JSON lines.
    #[arg(long, required_unless_present = "discard")]
    out: Option<PathBuf>,
    /// Count and discard (a bare subscriber, for the broker's own limit).
    #[arg(long, conflicts_with = "out")]
    discard: bool,
    /// Stop after this many messages.
    #[arg(long)]
    limit: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop when nothing arrived for this long (after the first message).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Also print the summary as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// telemetry or clicks.
    #[arg(long, default_value = "telemetry", value_parser = parse_kind)]
    kind: Kind,
    /// Number of events.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Number of devices (or users).
    #[arg(long, default_value_t = 10_000)]
    devices: u64,
    /// Simulated span of event time, seconds.
    #[arg(long, default_value_t = 3600)]
    span_secs: i64,
    /// Event times lag arrival order by up to this many ms.
    #[arg(long, default_value_t = 2000)]
    disorder_ms: u64,
    /// Fraction of events with status "error".
    #[arg(long, default_value_t = 0.01)]
    error_fraction: f64,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    match s {
        "telemetry" => Ok(Kind::Telemetry),
        "clicks" => Ok(Kind::Clicks),
        other => Err(format!("{other:?} is not telemetry or clicks")),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    match Cli::parse().command {
        Command::Telemetry(args) => runtime()?.block_on(run_scenario(Kind::Telemetry, args)),
        Command::Clicks(args) => runtime()?.block_on(run_scenario(Kind::Clicks, args)),
        Command::Replay(args) => runtime()?.block_on(run_replay(args)),
        Command::Record(args) => runtime()?.block_on(run_record(args)),
        Command::Generate(args) => generate(args),
        Command::Bench {
            input,
            batch_rows,
            lake,
            zstd_level,
            decode_only,
            per_key_rate,
            per_key_block,
        } => {
            let data = std::fs::read(&input)
                .with_context(|| format!("cannot read {}", input.display()))?;
            let tmp = tempfile::tempdir()?;
            let dir = lake.unwrap_or_else(|| tmp.path().join("lake"));
            let options = bench::BenchOptions {
                batch_rows,
                zstd_level,
                decode_only,
                per_key_rate,
                per_key_block,
            };
            let report = bench::decode_write(&data, &dir, &options)?;
            print!("{}", report.summary());
            Ok(())
        }
    }
}

fn build_scenario(kind: Kind, a: &ScenarioArgs) -> anyhow::Result<Scenario> {
    let mut s = match &a.spec {
        Some(path) => Scenario::from_file(path)?,
        None => Scenario::default(),
    };
    s.kind = Some(kind);
    if let Some(v) = a.devices {
        s.fleet = v;
    }
    if let Some(v) = a.rate {
        s.rate = v;
        s.per_entity_rate = None;
        s.phases.clear();
    }
    if let Some(v) = a.per_device_rate {
        s.per_entity_rate = Some(v);
        s.phases.clear();
    }
    if let Some(v) = a.duration {
        s.duration = v;
        s.phases.clear();
    }
    macro_rules! set {
        ($($flag:ident => $($field:ident).+),* $(,)?) => {
            $(if let Some(v) = a.$flag.clone() { s.$($field).+ = v; })*
        };
    }
    set!(
        seed => seed,
        extra_fields => telemetry.extra_fields,
        extra_field_bytes => telemetry.extra_field_bytes,
        disorder_ms => telemetry.disorder_ms,
        malformed_fraction => telemetry.malformed_fraction,
        excursion_probability => telemetry.excursion_probability,
        churn_fraction => telemetry.churn_fraction,
        churn_after => telemetry.churn_after,
        pages => clicks.pages,
        think_time_ms => clicks.think_time_ms,
        bounce_probability => clicks.bounce_probability,
        conversion_probability => clicks.conversion_probability,
    );
    if let Some(t) = &a.topic {
        s.topic = Some(t.clone());
    }
    if let Some(entity) = a.flood_device {
        s.flood = Some(Flood {
            entity,
            factor: a.flood_factor,
        });
    }
    s.validate()?;
    Ok(s)
}

fn target_options(kind: Kind, a: &TargetArgs) -> TargetOptions {
    TargetOptions {
        url: a.target.clone(),
        qos: a.qos,
        connections: a.connections,
        stream: a
            .stream
            .clone()
            .unwrap_or_else(|| kind.default_stream().to_owned()),
        batch: a.batch,
        client_id: a
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-loadtest-{}", std::process::id())),
        tls: sluice_loadtest::target::MqttTls {
            ca_file: a.ca_file.clone(),
            cert_dir: a.cert_dir.clone(),
        },
    }
}

fn drive_options(kind: Kind, o: &OutputArgs, target: &str, epoch_ms: i64) -> DriveOptions {
    DriveOptions {
        alerts: o.alert_topic.as_ref().map(|filter| AlertOptions {
            broker: o.alert_broker.clone().unwrap_or_else(|| target.to_owned()),
            filter: filter.clone(),
            epoch_ms,
            window_delay_ms: o.alert_window_delay.as_millis() as i64,
        }),
        probes: o.query_url.as_ref().map(|url| ProbeOptions {
            query_url: url.clone(),
            table: o
                .probe_table
                .clone()
                .unwrap_or_else(|| kind.default_stream().to_owned()),
            key_column: kind.id_field().to_owned(),
            key: format!("probe-{}-{}", std::process::id(), epoch_us() / 1000),
            every: o.probe_every,
            poll: o.probe_poll,
        }),
        max_speed: false,
        drain: o.drain,
        progress: !o.no_progress,
    }
}

async fn run_scenario(kind: Kind, args: RunArgs) -> anyhow::Result<()> {
    let scenario = build_scenario(kind, &args.scenario)?;
    let options = target_options(kind, &args.target);
    let stats = Arc::new(Stats::new());
    let target = Target::connect(&options, stats.clone()).await?;
    let schedule = scenario.schedule();
    stats.begin();
    let epoch_ms = epoch_us() / 1000;
    let mut workload = ScenarioWorkload::new(kind, &scenario, epoch_ms)?;
    let drive_options = drive_options(kind, &args.output, &options.url, epoch_ms);
    let send_s = drive(&mut workload, target, stats.clone(), &drive_options).await?;
    let command = match kind {
        Kind::Telemetry => "telemetry",
        Kind::Clicks => "clicks",
    };
    let info = RunInfo {
        command: command.to_owned(),
        target: options.url.clone(),
        qos: options.qos,
        connections: options.connections,
        target_rate: Some(schedule.total() as f64 / schedule.span().as_secs_f64().max(1e-9)),
        scheduled: schedule.total(),
        scheduled_s: schedule.span().as_secs_f64(),
        malformed: workload.malformed(),
    };
    write_outputs(&stats, info, send_s, &args.output)
}

async fn run_replay(args: ReplayArgs) -> anyhow::Result<()> {
    let records = read_recording(&args.input)?;
    if args.speed <= 0.0 {
        anyhow::bail!("--speed must be > 0, got {}", args.speed);
    }
    let options = target_options(args.kind, &args.target);
    let stats = Arc::new(Stats::new());
    let target = Target::connect(&options, stats.clone()).await?;
    let span_s = match (records.first(), records.last()) {
        (Some(a), Some(b)) => (b.arrival_us - a.arrival_us) as f64 / 1e6 / args.speed,
        _ => 0.0,
    };
    stats.begin();
    let epoch_ms = epoch_us() / 1000;
    let mut workload = ReplayWorkload::new(
        records,
        ReplayOptions {
            speed: args.speed,
            loops: args.loops,
            multiply: args.multiply,
            id_field: args.id_field.clone(),
            kind: args.kind,
            probe_topic: args.kind.default_topic().to_owned(),
            epoch_ms,
        },
    );
    let scheduled = workload.total().unwrap_or(0);
    let mut drive_options = drive_options(args.kind, &args.output, &options.url, epoch_ms);
    drive_options.max_speed = args.max_speed;
    let send_s = drive(&mut workload, target, stats.clone(), &drive_options).await?;
    let scheduled_s = span_s * f64::from(args.loops.max(1));
    let info = RunInfo {
        command: "replay".to_owned(),
        target: options.url.clone(),
        qos: options.qos,
        connections: options.connections,
        target_rate: (!args.max_speed && scheduled_s > 0.0).then(|| scheduled as f64 / scheduled_s),
        scheduled,
        scheduled_s,
        malformed: 0,
    };
    write_outputs(&stats, info, send_s, &args.output)
}

fn write_outputs(stats: &Stats, info: RunInfo, send_s: f64, o: &OutputArgs) -> anyhow::Result<()> {
    let title = format!("{} → {}", info.command, info.target);
    let report = stats.report(info, send_s);
    print!("{}", report.summary());
    if let Some(path) = &o.report {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        serde_json::to_writer_pretty(BufWriter::new(file), &report)?;
    }
    let histogram = stats.ack_histogram();
    if let Some(path) = &o.hgrm {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        write_hgrm(&histogram, &mut BufWriter::new(file))?;
    }
    if let Some(path) = &o.plot {
        sluice_loadtest::plot::write_png(path, &title, &report.timeline, &histogram)?;
    }
    Ok(())
}

async fn run_record(args: RecordArgs) -> anyhow::Result<()> {
    let options = RecordOptions {
        source: args.source,
        topics: args.topics,
        qos: args.qos,
        out: if args.discard { None } else { args.out },
        limit: args.limit,
        duration: args.duration,
        idle: args.idle,
        from_beginning: args.from_beginning,
    };
    let summary = record(&options).await?;
    println!(
        "recorded {} messages ({:.1} MB) over {:.2} s: {:.0} msg/s",
        summary.messages,
        summary.bytes as f64 / 1e6,
        summary.span_s,
        summary.rate
    );
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let mut spec = GenerateSpec::w1();
    spec.kind = a.kind;
    spec.events = a.events;
    spec.span_ms = a.span_secs * 1000;
    spec.scenario.fleet = a.devices;
    spec.scenario.seed = a.seed;
    spec.scenario.telemetry.disorder_ms = a.disorder_ms;
    spec.scenario.telemetry.error_fraction = a.error_fraction;
    let file = std::fs::File::create(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let bytes = write_workload(&spec, &mut BufWriter::with_capacity(1 << 20, file))?;
    eprintln!(
        "wrote {} events ({:.1} MB) to {}",
        a.events,
        bytes as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}
