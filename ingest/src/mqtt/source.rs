//! The MQTT source: subscribe with rumqttc, decode each publish into the stream's
//! batch, hand batches on by size or tick.
//!
//! Reconnects use exponential backoff with jitter (100 ms to 10 s). An outage is logged
//! once when it starts and once when it ends, never per attempt. With a persistent
//! session (the default) the broker keeps QoS 1 messages for us while we are away.
//!
//! Messages are acknowledged by rumqttc as they are read; acknowledging only after the
//! lake commit is the guarantees issue's work.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
    Transport,
};
use sluice_config::{DecodeConfig, MqttSourceConfig, parse_mqtt_url};
use sluice_core::{Clock, Shutdown};
use tokio::sync::mpsc;

use crate::decode::MessageMeta;
use crate::emit::Emitter;
use crate::{Error, Result};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// On shutdown, keep reading until the broker has been quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// ... but never longer than this.
const DRAIN_MAX: Duration = Duration::from_secs(3);

/// A configured MQTT source, ready to [`run`](MqttSource::run).
#[derive(Debug)]
pub struct MqttSource {
    name: String,
    options: MqttOptions,
    topics: Vec<String>,
    qos: QoS,
    emitter: Emitter,
    flush_interval: Duration,
    clock: std::sync::Arc<dyn Clock>,
    /// Messages received this run; the `_offset` of each (MQTT packet ids repeat).
    received: u64,
}

impl MqttSource {
    /// Builds the source. `embedded` is the embedded broker's address, used when the
    /// configured URL is `"embedded"`.
    pub fn new(
        name: &str,
        config: &MqttSourceConfig,
        decode: &DecodeConfig,
        embedded: Option<std::net::SocketAddr>,
        emitter: Emitter,
        clock: std::sync::Arc<dyn Clock>,
    ) -> Result<Self> {
        let bad = |message: String| Error::Config {
            source_name: name.to_owned(),
            message,
        };
        let (tls, host, port) = match (config.url.as_str(), embedded) {
            (sluice_config::EMBEDDED_URL, Some(addr)) => {
                (false, addr.ip().to_string(), addr.port())
            }
            (sluice_config::EMBEDDED_URL, None) => {
                return Err(bad("url \"embedded\" but no embedded broker runs".into()));
            }
            (url, _) => parse_mqtt_url(url).map_err(bad)?,
        };
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{name}"));
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(config.keep_alive.0)
            .set_clean_session(!config.persistent_session)
            .set_max_packet_size(
                decode
                    .max_payload_size
                    .as_usize()
                    .saturating_mul(2)
                    .max(1 << 20),
                1 << 20,
            )
            .set_inflight(1000);
        let password = match (&config.password, &config.password_env) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(var)) => Some(
                std::env::var(var).map_err(|_| bad(format!("password_env {var:?} is not set")))?,
            ),
            (None, None) => None,
        };
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), password.unwrap_or_default());
        }
        if tls {
            let tls_config =
                super::tls::client_config(config.ca_file.as_deref()).map_err(|message| {
                    Error::Tls {
                        source_name: name.to_owned(),
                        message,
                    }
                })?;
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls_config),
            ));
        }
        let qos = if config.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        Ok(Self {
            name: name.to_owned(),
            options,
            topics: config.topics.clone(),
            qos,
            emitter,
            flush_interval: decode.flush_interval.0,
            clock,
            received: 0,
        })
    }

    /// Runs until `shutdown`, then drains what the broker still sends and flushes.
    ///
    /// The rumqttc event loop runs in its own task and forwards publishes over a bounded
    /// channel: `EventLoop::poll` must not be cancelled mid-connect (as a `select!` with
    /// a flush tick would do), and a full channel stops it reading the socket, which is
    /// TCP backpressure to the broker.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<()> {
        let (client, events) = AsyncClient::new(self.options.clone(), 1024);
        let (tx, mut publishes) = mpsc::channel(4096);
        let connection = tokio::spawn(drive(
            events,
            client.clone(),
            self.name.clone(),
            self.topics.clone(),
            self.qos,
            tx,
        ));
        let mut tick = tokio::time::interval(self.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                publish = publishes.recv() => match publish {
                    Some(p) => self.receive(&p).await?,
                    None => break,
                },
                _ = tick.tick() => self.emitter.flush().await?,
            }
        }
        // Drain: keep reading until the broker has been quiet for a moment.
        let started = tokio::time::Instant::now();
        while started.elapsed() < DRAIN_MAX {
            match tokio::time::timeout(DRAIN_QUIET, publishes.recv()).await {
                Ok(Some(p)) => self.receive(&p).await?,
                Ok(None) | Err(_) => break,
            }
        }
        self.emitter.flush().await?;
        let _ = client.try_disconnect();
        drop(publishes);
        let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
        tracing::info!(component = %self.name, kind = "mqtt", "source stopped");
        Ok(())
    }

    async fn receive(&mut self, publish: &Publish) -> Result<()> {
        self.received += 1;
        let mut offset = itoa::Buffer::new();
        let meta = MessageMeta {
            partition: &publish.topic,
            offset: offset.format(self.received),
            ingest_time_ms: self.clock.now_ms(),
            hops: 0,
        };
        self.emitter.push(&publish.payload, &publish.topic, &meta);
        if self.emitter.is_full() {
            self.emitter.flush().await?;
        }
        Ok(())
    }
}

/// Polls the event loop: (re)subscribes on every ConnAck, forwards publishes, backs
/// off after errors. Ends when the receiver is dropped or the client disconnects.
async fn drive(
    mut events: rumqttc::EventLoop,
    client: AsyncClient,
    name: String,
    topics: Vec<String>,
    qos: QoS,
    publishes: mpsc::Sender<Publish>,
) {
    let mut state = Connection::default();
    // 1 while the broker has confirmed our subscriptions: operators (and tests) can see
    // that the source is live, not just started.
    let subscribed =
        metrics::gauge!("sluice_source_subscribed", "component" => name.clone(), "kind" => "mqtt");
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publishes.send(publish).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                state.connected(&name);
                // Subscribing again is harmless and covers a broker that lost our session.
                for topic in &topics {
                    if client.subscribe(topic.clone(), qos).await.is_err() {
                        return;
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::error!(component = %name, kind = "mqtt", ?topics, "broker refused the subscription (not authorized?)");
                } else {
                    subscribed.set(1.0);
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(other) => tracing::trace!(component = %name, event = ?other, "mqtt event"),
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(error) => {
                subscribed.set(0.0);
                if publishes.is_closed() {
                    return;
                }
                tokio::time::sleep(state.lost(&name, &error)).await;
            }
        }
    }
}

/// Connection state for logging once per outage and for backoff.
#[derive(Debug, Default)]
struct Connection {
    outage: Option<(std::time::Instant, u32)>,
    ever_connected: bool,
}

impl Connection {
    fn connected(&mut self, name: &str) {
        match self.outage.take() {
            Some((since, attempts)) => tracing::info!(
                component = %name, kind = "mqtt", attempts, down_for = ?since.elapsed(),
                "reconnected to the broker"
            ),
            None if !self.ever_connected => {
                tracing::info!(component = %name, kind = "mqtt", "connected to the broker")
            }
            None => {}
        }
        self.ever_connected = true;
    }

    /// Records a failed poll; logs only the first of an outage. Returns the delay.
    fn lost(&mut self, name: &str, error: &rumqttc::ConnectionError) -> Duration {
        let attempts = match &mut self.outage {
            Some((_, attempts)) => {
                *attempts += 1;
                *attempts
            }
            None => {
                if let rumqttc::ConnectionError::ConnectionRefused(code) = error {
                    let why = match code {
                        ConnectReturnCode::BadUserNamePassword
                        | ConnectReturnCode::NotAuthorized => "check username/password",
                        _ => "broker refused the connection",
                    };
                    tracing::error!(component = %name, kind = "mqtt", ?code, "{why}; retrying with backoff");
                } else {
                    tracing::warn!(component = %name, kind = "mqtt", %error, "broker connection lost; retrying with backoff");
                }
                self.outage = Some((std::time::Instant::now(), 1));
                1
            }
        };
        backoff(attempts)
    }
}

/// Exponential backoff with ±25% jitter, from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].
fn backoff(attempt: u32) -> Duration {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) <= Duration::from_millis(125));
        assert!(backoff(4) >= Duration::from_millis(600));
        assert!(backoff(30) <= Duration::from_millis(12_500));
        assert!(backoff(30) >= Duration::from_millis(7_500));
    }
}
