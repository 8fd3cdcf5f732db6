//! MQTT target: one rumqttc client per connection, each with its event loop in a task.
//!
//! Acknowledgement latency: the driver queues each message's due time before handing
//! the message to the client; the event loop pops it when the publish goes out
//! (`Outgoing::Publish(pkid)`, in request order) and, for QoS 1, keeps it by packet id
//! until the broker's PUBACK. QoS 0 has no broker ack, so its "ack" is the socket write.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinHandle;

use super::{TargetOptions, wait_for_acks};
use crate::stats::Stats;
use crate::workload::Message;

/// Due times of messages handed to a client and not yet written.
type Pending = Arc<Mutex<VecDeque<u64>>>;

/// Publishes to an MQTT broker over one or more connections.
#[derive(Debug)]
pub struct MqttTarget {
    clients: Vec<(AsyncClient, Pending)>,
    loops: Vec<JoinHandle<()>>,
    qos: QoS,
    stats: Arc<Stats>,
}

/// TLS settings for `mqtts://`.
#[derive(Debug, Clone, Default)]
pub struct MqttTls {
    /// PEM CA the broker's certificate is checked against (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// With it, each connection presents a client certificate (mTLS):
    /// `<dir>/<client id>.pem` and `<dir>/<client id>.key`.
    pub cert_dir: Option<PathBuf>,
}

/// Opens `options` as an MQTT client and waits for the broker's CONNACK, so a refused
/// or unreachable broker is an error here rather than a silent retry loop.
pub async fn connect_client(
    url: &str,
    client_id: String,
    inflight: u16,
    capacity: usize,
    tls_settings: &MqttTls,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (tls, host, port) =
        sluice_config::parse_mqtt_url(url).map_err(|e| anyhow::anyhow!("target {url:?}: {e}"))?;
    let mut options = MqttOptions::new(client_id.clone(), host, port);
    if tls {
        let files = tls_settings.cert_dir.as_ref().map(|dir| {
            (
                dir.join(format!("{client_id}.pem")),
                dir.join(format!("{client_id}.key")),
            )
        });
        let identity = files.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let config = sluice_ingest::tls::client_config(tls_settings.ca_file.as_deref(), identity)
            .map_err(|e| anyhow::anyhow!("target {url}: {e}"))?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
    }
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(16 << 20, 16 << 20)
        .set_inflight(inflight);
    let (client, mut events) = AsyncClient::new(options, capacity);
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => Ok((client, events)),
        Ok(Err(e)) => Err(anyhow::anyhow!("cannot connect to {url}: {e}")),
        Err(_) => bail!("cannot connect to {url}: no CONNACK within 10 s"),
    }
}

impl MqttTarget {
    /// Connects every client; fails if any cannot connect.
    pub async fn connect(options: &TargetOptions, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let qos = match options.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            q => bail!("--qos {q}: the load tester sends QoS 0 or 1"),
        };
        let mut clients = Vec::new();
        let mut loops = Vec::new();
        // All at once, as a fleet reconnecting after an outage does; the time until the
        // last CONNACK is the broker's handshake rate.
        let started = Instant::now();
        let mut connecting = tokio::task::JoinSet::new();
        let n = options.connections.max(1);
        for i in 0..n {
            let id = format!("{}-{i}", options.client_id);
            let (url, tls) = (options.url.clone(), options.tls.clone());
            connecting.spawn(async move {
                let connected = connect_client(&url, id, 1000, 4096, &tls).await;
                (i, connected.with_context(|| format!("connection {i}")))
            });
        }
        let mut connected: Vec<_> = connecting.join_all().await;
        connected.sort_by_key(|(i, _)| *i);
        let took = started.elapsed().as_secs_f64();
        eprintln!(
            "connected {n} MQTT clients in {took:.2} s ({:.0} connections/s)",
            n as f64 / took
        );
        for (_, connected) in connected {
            let (client, events) = connected?;
            let pending = Pending::default();
            loops.push(tokio::spawn(drive(
                events,
                pending.clone(),
                qos,
                stats.clone(),
                options.url.clone(),
            )));
            clients.push((client, pending));
        }
        Ok(Self {
            clients,
            loops,
            qos,
            stats,
        })
    }

    /// Publishes on the connection that owns the message's key.
    pub async fn send(&mut self, msg: &Message, due_us: u64) -> anyhow::Result<()> {
        let (client, pending) = &self.clients[connection_of(&msg.key, self.clients.len())];
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(due_us);
        let start = Instant::now();
        client
            .publish(msg.topic.clone(), self.qos, false, msg.payload.clone())
            .await
            .context("the MQTT client stopped")?;
        let waited = start.elapsed();
        if waited > Duration::from_micros(100) {
            self.stats.backpressure(waited);
        }
        Ok(())
    }

    /// Waits for outstanding PUBACKs, then disconnects.
    pub async fn finish(self, timeout: Duration) -> anyhow::Result<()> {
        wait_for_acks(&self.stats, timeout).await;
        for (client, _) in &self.clients {
            let _ = client.disconnect().await;
        }
        for handle in self.loops {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
        }
        Ok(())
    }
}

/// Which connection carries `key`: stable, so one device's messages stay in order.
fn connection_of(key: &str, connections: usize) -> usize {
    // FNV-1a: tiny and stable across runs (std's hasher is randomly seeded).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % connections.max(1) as u64) as usize
}

/// Polls one client's event loop: matches writes and PUBACKs to due times, and
/// reconnects with backoff (logged once per outage) if the broker goes away.
async fn drive(mut events: EventLoop, pending: Pending, qos: QoS, stats: Arc<Stats>, url: String) {
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut outage: Option<(Instant, Duration)> = None;
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if qos == QoS::AtLeastOnce && in_flight.contains_key(&pkid) {
                    continue; // a retransmission after a reconnect
                }
                let due = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                if let Some(due) = due {
                    if qos == QoS::AtMostOnce {
                        stats.acked(due);
                    } else {
                        in_flight.insert(pkid, due);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(due) = in_flight.remove(&ack.pkid) {
                    stats.acked(due);
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some((since, _)) = outage.take() {
                    tracing::info!(%url, down_for = ?since.elapsed(), "reconnected");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                let backoff = match &mut outage {
                    None => {
                        tracing::warn!(%url, error = %e, "lost the broker; retrying with backoff");
                        outage = Some((Instant::now(), Duration::from_millis(100)));
                        Duration::from_millis(100)
                    }
                    Some((_, b)) => {
                        *b = (*b * 2).min(Duration::from_secs(2));
                        *b
                    }
                };
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_stable_connections() {
        assert_eq!(connection_of("dev-000001", 1), 0);
        let a: Vec<usize> = (0..100)
            .map(|i| connection_of(&format!("dev-{i:06}"), 4))
            .collect();
        let b: Vec<usize> = (0..100)
            .map(|i| connection_of(&format!("dev-{i:06}"), 4))
            .collect();
        assert_eq!(a, b);
        for c in 0..4 {
            assert!(a.iter().filter(|&&x| x == c).count() > 10);
        }
    }
}
