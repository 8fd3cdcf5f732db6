//! The open-loop driver: sends each message at its due time, whatever happened to the
//! ones before, and measures everything against the due time.
//!
//! Pacing is a sleep until the next message's due time (tokio's timer wheel, 1 ms
//! resolution); everything due by then goes out back to back. governor would only
//! re-derive the same due times from a rate, and cannot express recorded gaps for replay.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};

use crate::stats::{Stats, ms};
use crate::target::{HttpClient, Target};
use crate::workload::{Message, Workload};

/// Publish → queryable probes: tagged events from a reserved id, counted through the
/// service's `/api/query` until each is visible.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// The service's HTTP base (`http://127.0.0.1:8080`).
    pub query_url: String,
    /// Lake table the probes land in.
    pub table: String,
    /// Column holding the probe id.
    pub key_column: String,
    /// The probe id (unique per run).
    pub key: String,
    /// One probe per this interval.
    pub every: Duration,
    /// How often to poll the query API.
    pub poll: Duration,
}

/// Publish → alert latency: an MQTT subscription to the alert topics. Each `fire`
/// alert's `at` (the event time of the reading that fired it, which the generator set
/// to that reading's intended send time, in ms) is mapped back onto the run's clock;
/// for a window rule, its `window_end` plus the out-of-orderness bound.
#[derive(Debug, Clone)]
pub struct AlertOptions {
    /// The broker the alerts are published on (`mqtt://HOST:PORT`).
    pub broker: String,
    /// Topic filter, e.g. `alerts/#`.
    pub filter: String,
    /// Epoch ms of the run's start (event time of due time 0).
    pub epoch_ms: i64,
    /// Window rules: an alert's reference time is its `window_end` plus this (the
    /// stream's out-of-orderness bound, ms), the earliest the window can close.
    pub window_delay_ms: i64,
}

/// How to drive.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Probes, if any.
    pub probes: Option<ProbeOptions>,
    /// Alert subscription, if any.
    pub alerts: Option<AlertOptions>,
    /// Send as fast as possible, ignoring due times.
    pub max_speed: bool,
    /// How long to wait for outstanding acks and probes after the last send.
    pub drain: Duration,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

/// Runs `workload` into `target`; returns the seconds spent sending.
pub async fn drive(
    workload: &mut dyn Workload,
    mut target: Target,
    stats: Arc<Stats>,
    options: &DriveOptions,
) -> anyhow::Result<f64> {
    let start = tokio::time::Instant::from_std(stats.start());
    let alerts = match &options.alerts {
        Some(a) => Some(subscribe_alerts(a.clone(), stats.clone()).await?),
        None => None,
    };
    let bar = progress_bar(workload.total(), options.progress);
    let ticker = tokio::spawn(tick(stats.clone(), bar.clone()));
    let probe_dues: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (probe_done_tx, probe_done) = tokio::sync::watch::channel(false);
    let poller = options.probes.clone().map(|p| {
        tokio::spawn(poll_probes(
            p,
            stats.clone(),
            probe_dues.clone(),
            probe_done,
            options.drain,
        ))
    });
    let probe_every = options
        .probes
        .as_ref()
        .map(|p| p.every.as_micros().max(1) as u64);
    let mut next_probe = 0u64;
    let mut msg = Message::default();
    let mut probe = Message::default();
    while let Some(mut due) = workload.next(&mut msg) {
        if options.max_speed {
            due = stats.now_us();
        }
        if let (Some(every), Some(p)) = (probe_every, &options.probes) {
            while next_probe <= due {
                workload.probe(&p.key, next_probe, &mut probe);
                pace(&mut target, &stats, start, next_probe).await?;
                probe_dues
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(next_probe);
                stats.probe_sent();
                target.send(&probe, next_probe).await?;
                next_probe += every;
            }
        }
        pace(&mut target, &stats, start, due).await?;
        target.send(&msg, due).await?;
    }
    target.flush().await?;
    let send_s = stats.now_us() as f64 / 1e6;
    target.finish(options.drain).await?;
    let _ = probe_done_tx.send(true);
    if let Some(poller) = poller {
        let _ = poller.await;
    }
    if let Some(alerts) = alerts {
        // Alerts fired by the last readings are on their way.
        tokio::time::sleep(Duration::from_secs(1)).await;
        alerts.abort();
    }
    ticker.abort();
    stats.tick_second();
    bar.finish_and_clear();
    Ok(send_s)
}

/// Subscribes to the alert topics (waiting for the SUBACK, so no alert of the run is
/// missed) and records the latency of every `fire` alert until aborted.
async fn subscribe_alerts(
    options: AlertOptions,
    stats: Arc<Stats>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use rumqttc::{Event, Packet, QoS};
    let id = format!("sluice-loadtest-alerts-{}", std::process::id());
    let (client, mut events) =
        crate::target::mqtt::connect_client(&options.broker, id, 100, 1000, &Default::default())
            .await?;
    client
        .subscribe(options.filter.clone(), QoS::AtMostOnce)
        .await
        .map_err(|e| anyhow::anyhow!("subscribe to {:?}: {e}", options.filter))?;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => anyhow::bail!("alert broker {}: {e}", options.broker),
        }
    }
    Ok(tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = events.poll().await {
            let Event::Incoming(Packet::Publish(p)) = event else {
                continue;
            };
            let Ok(alert) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                continue;
            };
            let reference = match alert["window_end"].as_i64() {
                Some(end) => Some(end + options.window_delay_ms),
                None => alert["at"].as_i64(),
            };
            if alert["event"] == "fire"
                && let Some(at) = reference
            {
                let due_us = (at - options.epoch_ms).max(0) as u64 * 1000;
                stats.alert(due_us);
            }
        }
    }))
}

/// Waits until `due_us` (never sending early), first flushing the target's batch if the
/// wait is long enough to matter; records how late the hand-over is.
async fn pace(
    target: &mut Target,
    stats: &Stats,
    start: tokio::time::Instant,
    due_us: u64,
) -> anyhow::Result<()> {
    let now = stats.now_us();
    if due_us > now {
        if due_us > now + 2000 {
            target.flush().await?;
        }
        tokio::time::sleep_until(start + Duration::from_micros(due_us)).await;
    }
    stats.sent(stats.now_us().saturating_sub(due_us));
    Ok(())
}

fn progress_bar(total: Option<u64>, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total.unwrap_or(0));
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Closes a timeline second every second and refreshes the progress bar 5× a second
/// with the current rate and p99.
async fn tick(stats: Arc<Stats>, bar: ProgressBar) {
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    let mut n = 0u64;
    let mut last_acked = 0u64;
    let mut rate = 0u64;
    loop {
        interval.tick().await;
        n += 1;
        let live = stats.live();
        if n.is_multiple_of(5) {
            stats.tick_second();
            rate = live.acked - last_acked;
            last_acked = live.acked;
        }
        bar.set_position(live.sent);
        bar.set_message(format!(
            "{rate}/s acked  p99 {}  errors {}",
            ms(live.p99_us),
            live.errors
        ));
    }
}

/// Polls `SELECT count(*)` for the probe id; probe `j` is queryable once the count
/// exceeds `j` (probes go out in order over one connection, and the lake commits in
/// order). Latency is therefore quantized to the poll interval.
async fn poll_probes(
    p: ProbeOptions,
    stats: Arc<Stats>,
    dues: Arc<Mutex<Vec<u64>>>,
    done: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let client = HttpClient::new(&p.query_url);
    let sql = format!(
        "SELECT count(*) AS n FROM {} WHERE {} = '{}'",
        p.table,
        p.key_column,
        p.key.replace('\'', "''")
    );
    let body = Bytes::from(serde_json::json!({ "sql": sql }).to_string());
    let mut seen = 0usize;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut warned = false;
    loop {
        tokio::time::sleep(p.poll).await;
        let count = match client
            .request(
                hyper::Method::POST,
                "/api/query",
                "application/json",
                body.clone(),
            )
            .await
        {
            Ok((200, rows)) => first_number(&rows),
            Ok((status, text)) => {
                // Before the first commit the table does not exist yet.
                if !warned && status != 400 {
                    tracing::warn!(status, body = %String::from_utf8_lossy(&text), "probe query failed");
                    warned = true;
                }
                None
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "probe query failed");
                    warned = true;
                }
                None
            }
        };
        let sent: Vec<u64> = dues.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(n) = count {
            let n = (n as usize).min(sent.len());
            for &due in &sent[seen.min(n)..n] {
                stats.probe_queryable(due);
            }
            seen = seen.max(n);
        }
        if *done.borrow() {
            if seen >= sent.len() {
                return;
            }
            let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain);
            if tokio::time::Instant::now() >= d {
                return;
            }
        }
    }
}

/// The first number in a JSON query result such as `[{"n":3}]`.
fn first_number(body: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let row = value.as_array()?.first()?;
    row.as_object()?
        .values()
        .find_map(serde_json::Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_count_from_a_query_result() {
        assert_eq!(first_number(br#"[{"n":3}]"#), Some(3));
        assert_eq!(first_number(br#"[]"#), None);
        assert_eq!(first_number(br#"{"error":"x"}"#), None);
    }
}
