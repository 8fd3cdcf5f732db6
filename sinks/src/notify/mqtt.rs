//! MQTT notifier: publishes each notification's JSON to a topic template.
//!
//! A rumqttc client with its own event-loop task. The broker going away is retried
//! by that task (backoff, logged once); publishes meanwhile wait in rumqttc's request
//! queue, and once that is full, in the notifier's queue.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sluice_config::{EMBEDDED_URL, MqttNotifierConfig, parse_mqtt_url};
use sluice_core::Notification;

use super::render_topic;

/// Publishes requests rumqttc holds before `publish` waits.
const REQUEST_QUEUE: usize = 1_000;

/// A connected (or reconnecting) MQTT notifier.
pub(crate) struct MqttTarget {
    client: AsyncClient,
    topic: String,
    qos: QoS,
}

impl MqttTarget {
    /// Connects in the background; `embedded` is the embedded broker's address.
    pub(crate) fn start(
        name: &str,
        config: &MqttNotifierConfig,
        embedded: Option<SocketAddr>,
    ) -> Result<Self, String> {
        let (host, port) = match (config.url.as_str(), embedded) {
            (EMBEDDED_URL, Some(addr)) => (addr.ip().to_string(), addr.port()),
            (EMBEDDED_URL, None) => {
                return Err("url \"embedded\" but no embedded broker runs".into());
            }
            (url, _) => match parse_mqtt_url(url)? {
                (true, _, _) => {
                    return Err(format!(
                        "url {url:?}: mqtts:// notifiers are not supported yet; use mqtt:// or a webhook"
                    ));
                }
                (false, host, port) => (host, port),
            },
        };
        let mut options = MqttOptions::new(format!("sluice-notify-{name}"), host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true);
        let (client, mut events) = AsyncClient::new(options, REQUEST_QUEUE);
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut down = false;
            let mut backoff = Duration::from_millis(100);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(100);
                        if down {
                            tracing::info!(notifier = %name, kind = "mqtt", "notifier reconnected");
                            down = false;
                        }
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => break,
                    Err(error) => {
                        if !down {
                            tracing::warn!(notifier = %name, kind = "mqtt", %error, "notifier lost its broker; reconnecting with backoff");
                            down = true;
                        }
                        tokio::time::sleep(crate::retry::jitter(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(Self {
            client,
            topic: config.topic.clone(),
            qos: if config.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
        })
    }

    pub(crate) async fn deliver(&self, n: &Notification) -> Result<(), String> {
        let topic = render_topic(&self.topic, &n.fields);
        let payload = serde_json::to_vec(&n.fields).map_err(|e| e.to_string())?;
        self.client
            .publish(topic, self.qos, false, payload)
            .await
            .map_err(|e| e.to_string())
    }
}
