//! The `sluice` binary: command line and wiring only. The work lives in the library
//! crates (`runtime/` runs the service; `ingest/`, `processors/`, `sinks/`, `config/`,
//! `core/`); see ARCHITECTURE.md.

mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluice_config::Config;
use sluice_sinks::location::LakeLocation;
use sluice_sinks::query::{Format, QueryEngine};

/// Sluice: self-hosted streaming ingestion from MQTT into a Parquet lake, with SQL.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service. With no --config: an embedded MQTT broker on 127.0.0.1:1883
    /// subscribed to devices/+/telemetry and clicks/+, HTTP on 127.0.0.1:8080, the lake
    /// in ./sluice-data.
    Run(RunArgs),
    /// Run a read-only SQL query over the lake and print the result.
    Query(QueryArgs),
    /// Validate a config file and print every problem, each naming its key.
    Check(CheckArgs),
    /// List the nodes of the cluster sharing the lake and the partitions each owns, as
    /// each last reported itself.
    Status(StatusArgs),
    /// Make a new API token: prints the token once, and the `[[http.tokens]]` entry
    /// (its SHA-256, not the token) to put in the config.
    Token(TokenArgs),
    /// Make a `[broker] passwords_file` line for a device: reads the password from
    /// SLUICE_DEVICE_PASSWORD or the first line of stdin, prints `<device>:<argon2 hash>`.
    Passwd(PasswdArgs),
    /// Watch the rows a running service writes to a stream, a function's output, a
    /// window's table, alerts, late or dead_letter, live, as JSON lines; Ctrl+C ends it.
    /// Costs the service nothing while nobody taps; a reader that falls behind loses
    /// rows (told on stderr) and never slows ingest.
    Tap(TapArgs),
}

/// Flags of `sluice tap`.
#[derive(Debug, clap::Args)]
struct TapArgs {
    /// The stream or table to watch.
    name: String,
    /// Only rows for which this SQL predicate holds, e.g. "temperature > 80".
    #[arg(long, value_name = "SQL")]
    filter: Option<String>,
    /// The fraction of rows to show, in (0, 1]: 0.01 is one in a hundred.
    #[arg(long, value_name = "FRACTION")]
    sample: Option<f64>,
    /// The service's HTTP address. Default: the config's [http] listen with --config,
    /// else 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Read the HTTP address from this config.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// An API token with the `tap` scope (or set SLUICE_TOKEN).
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Flags of `sluice run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Config file (TOML). Without it, the embedded default runs.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Lake directory; overrides [lake] dir. Default ./sluice-data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the embedded MQTT broker; overrides [broker] listen. Default 127.0.0.1:1883.
    #[arg(long, value_name = "ADDR")]
    mqtt_listen: Option<String>,
    /// Address of the HTTP API and dashboard; overrides [http] listen. Default 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// This node's id in a cluster sharing the lake; sets [cluster] node_id (and so
    /// makes this node one of a cluster).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Decode workers of a bounded run; overrides [runtime] workers. Default: the cores
    /// this process may use.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Bounded run: feed STREAM from a JSON-lines file (gzip if it ends in .gz) instead
    /// of the live sources; no broker or HTTP is started. At end of input every open
    /// window is emitted, everything is committed, a `bounded run done` line reports
    /// events/s and events/s per CPU-second, and the process exits 0. Repeatable.
    #[arg(long, value_name = "STREAM=PATH")]
    from_file: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of row objects.
    Json,
}

/// Flags of `sluice query`.
#[derive(Debug, clap::Args)]
struct QueryArgs {
    #[command(flatten)]
    lake: LakeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// The query: one SELECT (or WITH … SELECT). Tables are the lake's directories;
    /// every table also has `date` and `hour` partition columns.
    sql: String,
}

/// Which lake a reading command (`query`, `status`) reads.
#[derive(Debug, clap::Args)]
struct LakeArgs {
    /// The lake: a directory or s3://bucket/prefix. Default: the config's `[lake] dir`,
    /// else ./sluice-data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Read the lake this config names (`[lake] dir` and `[lake.s3]`), as `sluice run`
    /// does.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Flags of `sluice status`.
#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    lake: LakeArgs,
    /// Print the JSON of `/api/cluster` instead of a table.
    #[arg(long)]
    json: bool,
}

/// Flags of `sluice token`.
#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// A name for the token, shown in logs and errors.
    #[arg(long, default_value = "api")]
    name: String,
    /// What it may do (repeatable): query, ingest:<stream>, ingest:*, tap, admin.
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    scopes: Vec<String>,
}

/// Flags of `sluice passwd`.
#[derive(Debug, clap::Args)]
struct PasswdArgs {
    /// The device id: its MQTT user name and client id.
    #[arg(long)]
    device: String,
}

/// Flags of `sluice check`.
#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The config file to validate.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The lake whose tables the config's columns are checked against; overrides
    /// [lake] dir. A local lake that does not exist yet is not checked.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// `println!` for a command's output, which may go to a pipe its reader closed early
/// (`sluice status | head -1`): the rest is dropped instead of panicking.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run(args) => run::main(args),
        Command::Query(args) => query(args),
        Command::Check(args) => check(&args),
        Command::Status(args) => status(args),
        Command::Token(args) => token(&args),
        Command::Passwd(args) => passwd(&args),
        Command::Tap(args) => tap(args),
    }
}

fn tap(args: TapArgs) -> ExitCode {
    let http = match (args.http, &args.config) {
        (Some(http), _) => http,
        (None, Some(path)) => match load_config(path) {
            Ok(config) => config.http.listen.clone(),
            Err(code) => return code,
        },
        (None, None) => "127.0.0.1:8080".to_owned(),
    };
    let request = sluice_runtime::TapRequest {
        http,
        name: args.name,
        filter: args.filter,
        sample: args.sample,
        token: args.token,
    };
    let runtime = match async_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let done = runtime.block_on(async {
        let mut out = std::io::stdout().lock();
        tokio::select! {
            done = sluice_runtime::tap(&request, &mut out) => done,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn passwd(args: &PasswdArgs) -> ExitCode {
    let password = match std::env::var("SLUICE_DEVICE_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("error: cannot read the password from stdin: {e}");
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        eprintln!("error: the password is empty (set SLUICE_DEVICE_PASSWORD or give it on stdin)");
        return ExitCode::FAILURE;
    }
    match sluice_ingest::mqtt::auth::password_line(&args.device, &password) {
        Ok(line) => {
            say!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(args: &TokenArgs) -> ExitCode {
    let (token, sha256) = match sluice_runtime::new_token() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let scopes: Vec<String> = args.scopes.iter().map(|s| format!("{s:?}")).collect();
    say!("token: {token}");
    say!("# Give the token to its user; it is not stored. Add this to the config:");
    say!("[[http.tokens]]");
    say!("name = {:?}", args.name);
    say!("sha256 = \"{sha256}\"");
    say!("scopes = [{}]", scopes.join(", "));
    ExitCode::SUCCESS
}

fn init_logging() {
    // Libraries that log every retry (the AWS SDK's credential and region chains warn
    // once a second while a provider is missing) are kept quiet; our sources log an
    // outage once. The Delta kernel logs a table that does not exist yet as an error
    // (every new table) and each snapshot at info; delta-rs returns its real errors. `SLUICE_LOG` comes last, so naming a target there overrides this.
    const QUIET: &str = "rumqttd=off,rumqttc=warn,datafusion=warn,aws_config=error,aws_smithy_runtime=error,\
         buoyant_kernel=off,deltalake_core=warn";
    let user = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(format!("info,{QUIET},{user}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{QUIET}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Reads and validates a config file; prints every problem on failure.
pub(crate) fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read config {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    Config::from_toml(&text).map_err(|errors| {
        eprintln!("{}: {} problem(s):", path.display(), errors.len());
        for e in &errors {
            eprintln!("  - {e}");
        }
        ExitCode::from(2)
    })
}

fn check(args: &CheckArgs) -> ExitCode {
    let path = &args.config;
    match load_config(path) {
        Ok(mut config) => {
            if let Some(dir) = &args.data_dir {
                config.lake.dir = dir.clone();
            }
            let errors = match sluice_runtime::pipeline::build(
                &config,
                std::sync::Arc::new(sluice_core::SystemClock),
            ) {
                Err(errors) => errors,
                Ok(pipeline) => lake_problems(&config, &pipeline),
            };
            if !errors.is_empty() {
                eprintln!("{}: {} problem(s):", path.display(), errors.len());
                for e in &errors {
                    eprintln!("  - {e}");
                }
                return ExitCode::from(2);
            }
            for w in config.warnings() {
                eprintln!("warning: {w}");
            }
            for note in &config.notes {
                say!("note: {note}");
            }
            say!(
                "{}: ok ({} source(s), {} stream(s), {} function(s), {} window(s))",
                path.display(),
                config.sources.len(),
                config.streams.len(),
                config.functions.len(),
                config.windows.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The config's columns against its lake's tables (those `sluice run` would refuse to
/// start with). A lake that cannot be read within [`LAKE_CHECK_BOUND`] is a warning,
/// not a problem of the config.
fn lake_problems(
    config: &sluice_config::Config,
    pipeline: &sluice_runtime::pipeline::Pipeline,
) -> Vec<String> {
    let checked = async_runtime()
        .map_err(|_| anyhow::anyhow!("no async runtime"))
        .and_then(|runtime| {
            runtime.block_on(async {
                let problems = sluice_runtime::lake_column_problems(config, pipeline);
                tokio::time::timeout(LAKE_CHECK_BOUND, problems)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {LAKE_CHECK_BOUND:?}")))
            })
        });
    match checked {
        Ok(problems) => problems.unwrap_or_default(),
        Err(e) => {
            eprintln!(
                "warning: the lake at {} could not be read, so its tables' columns were not checked: {e:#}",
                config.lake.dir.display()
            );
            Vec::new()
        }
    }
}

/// How long `sluice check` waits for the lake's tables.
const LAKE_CHECK_BOUND: std::time::Duration = std::time::Duration::from_secs(15);

/// The lake `args` names, for a command that only reads it: a lake directory that
/// does not exist is an error, not something to create.
fn read_lake(args: &LakeArgs) -> Result<LakeLocation, ExitCode> {
    let mut config = match &args.config {
        Some(path) => load_config(path)?,
        None => sluice_config::Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.lake.dir = dir.clone();
    }
    if !config.lake.is_s3() && !config.lake.dir.is_dir() {
        eprintln!(
            "error: no lake at {} (`sluice run` creates it; --data-dir or --config names another)",
            config.lake.dir.display()
        );
        return Err(ExitCode::from(2));
    }
    sluice_runtime::lake_location(&config).map_err(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

fn async_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

fn status(args: StatusArgs) -> ExitCode {
    let (runtime, location) = match (async_runtime(), read_lake(&args.lake)) {
        (Ok(r), Ok(l)) => (r, l),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let view = match runtime.block_on(sluice_runtime::cluster_view(&location)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        say!("{view:#}");
        return ExitCode::SUCCESS;
    }
    let nodes = view["nodes"].as_array().cloned().unwrap_or_default();
    if nodes.is_empty() {
        say!(
            "no cluster nodes have reported to this lake ([cluster] node_id, or sluice run --node-id)"
        );
        return ExitCode::SUCCESS;
    }
    say!("{:<20} {:<22} {:>10}  partitions", "node", "http", "silent");
    for node in nodes {
        say!(
            "{:<20} {:<22} {:>8.1} s  {}",
            node["node_id"].as_str().unwrap_or(""),
            node["http"].as_str().unwrap_or(""),
            node["silent_ms"].as_i64().unwrap_or(0) as f64 / 1000.0,
            by_source(&node["partitions"])
        );
    }
    let unowned = by_source(&view["unowned"]);
    if !unowned.is_empty() {
        say!("owned by no live node: {unowned}");
    }
    ExitCode::SUCCESS
}

/// `source: p p; source: p` of a JSON object of source → partitions.
fn by_source(partitions: &serde_json::Value) -> String {
    let listed: Vec<String> = partitions
        .as_object()
        .into_iter()
        .flatten()
        .map(|(source, owned)| {
            let owned: Vec<&str> = owned
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
                .collect();
            format!("{source}: {}", owned.join(" "))
        })
        .collect();
    listed.join("; ")
}

fn query(args: QueryArgs) -> ExitCode {
    let (runtime, location) = match (async_runtime(), read_lake(&args.lake)) {
        (Ok(r), Ok(l)) => (r, l),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let format = match args.format {
        OutputFormat::Table => Format::Table,
        OutputFormat::Csv => Format::Csv,
        OutputFormat::Json => Format::Json,
    };
    let engine = QueryEngine::new(location);
    let result = runtime
        .block_on(engine.query(&args.sql))
        .and_then(|r| r.render(format));
    match result {
        Ok(bytes) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_user_error() { 2 } else { 1 })
        }
    }
}
