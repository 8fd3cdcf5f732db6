//! `sluice run`: the command line's overrides on the config, then the service (or a
//! bounded run over `--from-file` inputs) of `sluice_runtime` until SIGINT/SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use sluice_config::Config;

use crate::RunArgs;

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
    if let Some(id) = args.node_id {
        config.cluster.get_or_insert_with(Default::default).node_id = Some(id);
    }
    if let Some(n) = args.workers {
        config.runtime.workers = Some(n);
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
        runtime.block_on(async {
            // Registered before anything is reachable from outside: a quick SIGTERM
            // must not kill the process the default way (no drain, no commit).
            let mut signals = Signals::register()?;
            sluice_runtime::serve(config, async move { signals.recv().await }).await
        })
    } else {
        runtime.block_on(sluice_runtime::run_files(config, files))
    };
    match outcome {
        Ok(()) => {
            // The service has drained and committed within its own bound; what is
            // left on blocking threads (a Kafka consumer still leaving its group) must
            // not keep the process.
            runtime.shutdown_timeout(RUNTIME_LEFTOVERS);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            // Not shut down: work the service gave up on (a commit retrying a store
            // that went away, on a blocking thread) would panic on a runtime shutting
            // down under it. It ends with the process; the next start recovers from
            // the last commit.
            std::mem::forget(runtime);
            ExitCode::FAILURE
        }
    }
}

/// How long the process waits, after the service stopped, for blocking work it left.
const RUNTIME_LEFTOVERS: std::time::Duration = std::time::Duration::from_secs(5);

/// SIGINT and SIGTERM, registered when created.
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
