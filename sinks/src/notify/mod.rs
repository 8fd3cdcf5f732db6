//! Alert notifiers: where the alert rules' fire, resolve and summary events go.
//!
//! [`Notifiers::send`] never blocks the lake task: each notifier has its own queue,
//! bounded in count and in bytes (`sluice_core::bounded`),
//! and a task, which delivers in order. A failed delivery is retried with
//! exponential backoff and jitter until the notifier's retry budget is spent; then the
//! notification is dropped, counted and logged. After `breaker_failures` failures in a
//! row the circuit breaker opens: the task waits `breaker_cooldown` between probes
//! instead of backing off from 100 ms. A full queue drops the newest notification
//! (counted). Every outage is logged once when it starts and once when it ends.
//!
//! Kinds: [`mqtt`] (rumqttc), [`webhook`] (hyper, HMAC-SHA256 signature), `kafka`
//! (rdkafka, feature `kafka`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use sluice_config::{LimitMode, NotifierConfig};
use sluice_core::{BoundedReceiver, BoundedSender, Notification};
use tokio::task::JoinHandle;

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod mqtt;
pub mod webhook;

/// Why a notifier cannot start.
#[derive(Debug, thiserror::Error)]
#[error("notifier {name:?}: {message}")]
pub struct NotifierError {
    /// The notifier's name.
    pub name: String,
    /// What is wrong (the user's to fix).
    pub message: String,
}

use crate::retry::Breaker;
pub use crate::retry::RetryPolicy;

/// One configured destination.
enum Target {
    Mqtt(mqtt::MqttTarget),
    Webhook(Box<webhook::WebhookTarget>),
    #[cfg(feature = "kafka")]
    Kafka(kafka::KafkaTarget),
}

impl Target {
    fn kind(&self) -> &'static str {
        match self {
            Target::Mqtt(_) => "mqtt",
            Target::Webhook(_) => "webhook",
            #[cfg(feature = "kafka")]
            Target::Kafka(_) => "kafka",
        }
    }

    async fn deliver(&mut self, n: &Notification) -> Result<(), String> {
        match self {
            Target::Mqtt(t) => t.deliver(n).await,
            Target::Webhook(t) => t.deliver(n).await,
            #[cfg(feature = "kafka")]
            Target::Kafka(t) => t.deliver(n).await,
        }
    }
}

/// A notifier's queue, its kind, and whether it was full at the last send.
type Queue = (BoundedSender<Arc<Notification>>, &'static str, AtomicBool);

/// The running notifiers, by name.
#[derive(Debug, Default)]
pub struct Notifiers {
    /// A full queue is logged once, not per notification.
    queues: HashMap<String, Queue>,
    tasks: Vec<JoinHandle<()>>,
}

impl Notifiers {
    /// Starts one task per configured notifier, each with a queue of its `queue`
    /// notifications and `queue_bytes` bytes at most. `embedded` is the embedded
    /// broker's address (for `url = "embedded"`). Every problem is returned at once.
    pub fn start(
        configs: &BTreeMap<String, NotifierConfig>,
        embedded: Option<SocketAddr>,
        queue_bytes: usize,
    ) -> Result<Self, Vec<NotifierError>> {
        let mut notifiers = Notifiers::default();
        let mut errors = Vec::new();
        for (name, config) in configs {
            let bad = |message: String| NotifierError {
                name: name.clone(),
                message,
            };
            let built = match config {
                NotifierConfig::Mqtt(c) => mqtt::MqttTarget::start(name, c, embedded)
                    .map(|t| (Target::Mqtt(t), RetryPolicy::default(), c.queue)),
                NotifierConfig::Webhook(c) => webhook::WebhookTarget::new(c).map(|t| {
                    let policy = RetryPolicy {
                        retry_for: c.retry_for.0,
                        breaker_failures: c.breaker_failures,
                        breaker_cooldown: c.breaker_cooldown.0,
                    };
                    (Target::Webhook(Box::new(t)), policy, c.queue)
                }),
                #[cfg(feature = "kafka")]
                NotifierConfig::Kafka(c) => kafka::KafkaTarget::new(name, c)
                    .map(|t| (Target::Kafka(t), RetryPolicy::default(), c.queue)),
                #[cfg(not(feature = "kafka"))]
                NotifierConfig::Kafka(_) => {
                    Err("this binary is built without the `kafka` feature".into())
                }
            };
            match built {
                Ok((target, policy, queue)) => {
                    let (tx, rx) = sluice_core::bounded(queue, queue_bytes);
                    let kind = target.kind();
                    notifiers
                        .queues
                        .insert(name.clone(), (tx, kind, AtomicBool::new(false)));
                    let limit = config.limit().and_then(|l| {
                        let rate = NonZeroU32::new(l.rate?)?;
                        let burst = l.burst.and_then(NonZeroU32::new).unwrap_or(rate);
                        let quota = governor::Quota::per_second(rate).allow_burst(burst);
                        Some((governor::RateLimiter::direct(quota), l.mode))
                    });
                    notifiers.tasks.push(tokio::spawn(run(
                        name.clone(),
                        target,
                        rx,
                        policy,
                        limit,
                    )));
                }
                Err(message) => errors.push(bad(message)),
            }
        }
        if errors.is_empty() {
            Ok(notifiers)
        } else {
            Err(errors)
        }
    }

    /// Queues `n` for each of its notifiers; a full queue drops it for that notifier
    /// (counted, logged once per notifier until it has room again).
    pub fn send(&self, n: Notification) {
        let n = Arc::new(n);
        for name in n.notify.iter() {
            let Some((queue, kind, full)) = self.queues.get(name) else {
                continue;
            };
            let sent = queue.try_send(n.clone());
            metrics::gauge!("sluice_notifier_queue_depth", "notifier" => name.clone())
                .set(queue.len() as f64);
            metrics::gauge!("sluice_notifier_queue_bytes", "notifier" => name.clone())
                .set(queue.queued_bytes() as f64);
            match sent {
                Ok(()) => {
                    if full.swap(false, Ordering::Relaxed) {
                        tracing::info!(notifier = %name, "notification queue has room again");
                    }
                }
                Err(_) => {
                    metrics::counter!("sluice_notifications_total", "notifier" => name.clone(), "kind" => *kind, "outcome" => "dropped_queue_full")
                        .increment(1);
                    if !full.swap(true, Ordering::Relaxed) {
                        tracing::warn!(notifier = %name, "notification queue full; dropping notifications until it has room");
                    }
                }
            }
        }
    }

    /// Closes the queues and waits up to `bound` for what is queued to be delivered.
    pub async fn stop(self, bound: Duration) {
        drop(self.queues);
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!(
                ?bound,
                "notifiers did not deliver everything queued before the stop; the rest is lost"
            );
        }
    }
}

/// Delivers `queue` to `target` in order, with the retry policy.
async fn run(
    name: String,
    mut target: Target,
    mut queue: BoundedReceiver<Arc<Notification>>,
    policy: RetryPolicy,
    limit: Option<(governor::DefaultDirectRateLimiter, LimitMode)>,
) {
    let kind = target.kind();
    let counter = |outcome: &'static str| metrics::counter!("sluice_notifications_total", "notifier" => name.clone(), "kind" => kind, "outcome" => outcome);
    let breaker = metrics::gauge!("sluice_notifier_breaker_open", "notifier" => name.clone());
    let mut state = Breaker::new(policy);
    while let Some(n) = queue.recv().await {
        match &limit {
            Some((limiter, LimitMode::Block)) => limiter.until_ready().await,
            Some((limiter, LimitMode::Shed)) if limiter.check().is_err() => {
                counter("dropped_rate_limited").increment(1);
                continue;
            }
            _ => {}
        }
        let first = tokio::time::Instant::now();
        loop {
            match target.deliver(&n).await {
                Ok(()) => {
                    counter("sent").increment(1);
                    if state.success() {
                        tracing::info!(notifier = %name, kind, "notifications delivered again");
                    }
                    breaker.set(0.0);
                    break;
                }
                Err(error) => {
                    counter("failed_attempt").increment(1);
                    let failed = state.failure();
                    if failed.first {
                        tracing::warn!(notifier = %name, kind, %error, "notification failed; retrying with backoff");
                    }
                    if failed.opened {
                        tracing::warn!(notifier = %name, kind, cooldown = ?policy.breaker_cooldown, "circuit breaker open; probing once per cooldown");
                        breaker.set(1.0);
                    }
                    if first.elapsed() >= policy.retry_for {
                        counter("dropped_retry_budget").increment(1);
                        let alert_id = n.fields.get("alert_id").cloned().unwrap_or_default();
                        tracing::error!(notifier = %name, kind, %alert_id, "notification dropped after its retry budget");
                        break;
                    }
                    let wait = failed.wait;
                    let left = policy.retry_for.saturating_sub(first.elapsed());
                    tokio::time::sleep(wait.min(left.max(Duration::from_millis(1)))).await;
                }
            }
        }
    }
}

/// Fills a topic template: `{name}` takes the notification's field `name` (strings as
/// they are, numbers as written); an unknown name is left as it is.
pub fn render_topic(template: &str, fields: &serde_json::Map<String, Value>) -> String {
    sluice_core::template::fill(template, |name, out| match fields.get(name) {
        // `+`, `#` and `/` in a value would change the topic's shape.
        Some(Value::String(s)) => {
            out.extend(s.chars().map(|c| match c {
                '+' | '#' | '/' => '_',
                c => c,
            }));
            true
        }
        Some(Value::Null) | None => false,
        Some(other) => {
            out.push_str(&other.to_string());
            true
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates_take_fields_and_keep_the_topic_shape() {
        let fields = serde_json::json!({"rule": "hot", "device_id": "a/b+#", "n": 3});
        let fields = fields.as_object().unwrap();
        assert_eq!(
            render_topic("alerts/{rule}/{device_id}/{n}/{missing}", fields),
            "alerts/hot/a_b__/3/{missing}"
        );
        assert_eq!(render_topic("alerts/{rule", fields), "alerts/{rule");
    }
}
