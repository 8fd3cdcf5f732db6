//! Alert notifiers: where the alert rules' fire, resolve and summary events go.
//!
//! [`Notifiers::send`] never blocks the lake task: each notifier has its own queue,
//! bounded in count and in bytes (`sluice_core::bounded`), and a task, which delivers
//! in order, or with `concurrency` deliveries in flight at once (each its own task,
//! sharing the breaker; they may then complete out of order). A failed delivery is retried with
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

    async fn deliver(&self, n: &Notification) -> Result<(), String> {
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
                        Delivery {
                            name: name.clone(),
                            target: Arc::new(target),
                            policy,
                            breaker: Arc::new(std::sync::Mutex::new(Breaker::new(policy))),
                        },
                        rx,
                        limit,
                        config.concurrency().max(1),
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

/// What one delivery needs: the target, its name, the retry policy and the breaker
/// the notifier's deliveries share.
#[derive(Clone)]
struct Delivery {
    name: String,
    target: Arc<Target>,
    policy: RetryPolicy,
    breaker: Arc<std::sync::Mutex<Breaker>>,
}

/// Delivers `queue` with up to `concurrency` deliveries in flight (1: in order), each
/// with the retry policy; at the end waits for those in flight.
async fn run(
    delivery: Delivery,
    mut queue: BoundedReceiver<Arc<Notification>>,
    limit: Option<(governor::DefaultDirectRateLimiter, LimitMode)>,
    concurrency: usize,
) {
    let mut inflight = tokio::task::JoinSet::new();
    while let Some(n) = queue.recv().await {
        match &limit {
            Some((limiter, LimitMode::Block)) => limiter.until_ready().await,
            Some((limiter, LimitMode::Shed)) if limiter.check().is_err() => {
                delivery.counter("dropped_rate_limited").increment(1);
                continue;
            }
            _ => {}
        }
        while inflight.len() >= concurrency {
            inflight.join_next().await;
        }
        inflight.spawn(delivery.clone().deliver(n));
    }
    while inflight.join_next().await.is_some() {}
}

impl Delivery {
    fn counter(&self, outcome: &'static str) -> metrics::Counter {
        metrics::counter!("sluice_notifications_total", "notifier" => self.name.clone(), "kind" => self.target.kind(), "outcome" => outcome)
    }

    /// Runs `f` on the shared breaker.
    fn breaker<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> T {
        f(&mut self.breaker.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Delivers `n`, retrying with backoff until the retry budget is spent.
    async fn deliver(self, n: Arc<Notification>) {
        let (name, kind, policy) = (&self.name, self.target.kind(), self.policy);
        let open = metrics::gauge!("sluice_notifier_breaker_open", "notifier" => name.clone());
        let first = tokio::time::Instant::now();
        loop {
            match self.target.deliver(&n).await {
                Ok(()) => {
                    self.counter("sent").increment(1);
                    if self.breaker(Breaker::success) {
                        tracing::info!(notifier = %name, kind, "notifications delivered again");
                    }
                    open.set(0.0);
                    return;
                }
                Err(error) => {
                    self.counter("failed_attempt").increment(1);
                    let failed = self.breaker(Breaker::failure);
                    if failed.first {
                        tracing::warn!(notifier = %name, kind, %error, "notification failed; retrying with backoff");
                    }
                    if failed.opened {
                        tracing::warn!(notifier = %name, kind, cooldown = ?policy.breaker_cooldown, "circuit breaker open; probing once per cooldown");
                        open.set(1.0);
                    }
                    if first.elapsed() >= policy.retry_for {
                        self.counter("dropped_retry_budget").increment(1);
                        let alert_id = n.fields.get("alert_id").cloned().unwrap_or_default();
                        tracing::error!(notifier = %name, kind, %alert_id, "notification dropped after its retry budget");
                        return;
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

    /// A webhook receiver that holds each request `hold` and records how many it held
    /// at once at most; every answer is 200. Returns its URL, the peak and the count.
    async fn slow_receiver(
        hold: Duration,
    ) -> (
        String,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::AtomicUsize;
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (active, peak, served) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (p, n) = (peak.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (active, peak, served) = (active.clone(), p.clone(), n.clone());
                tokio::spawn(async move {
                    let mut socket = BufReader::new(socket);
                    loop {
                        // Headers, then a body of content-length bytes.
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let lower = line.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        if socket.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(hold).await;
                        active.fetch_sub(1, Ordering::SeqCst);
                        served.fetch_add(1, Ordering::SeqCst);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if socket.get_mut().write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, peak, served)
    }

    #[tokio::test]
    async fn a_webhook_notifier_has_up_to_its_concurrency_in_flight() {
        for concurrency in [1, 4] {
            let (url, peak, served) = slow_receiver(Duration::from_millis(100)).await;
            let config: sluice_config::WebhookNotifierConfig =
                serde_json::from_value(serde_json::json!({"url": url, "concurrency": concurrency}))
                    .unwrap();
            let configs = BTreeMap::from([("hook".to_owned(), NotifierConfig::Webhook(config))]);
            let notifiers = Notifiers::start(&configs, None, 1 << 20).unwrap();
            for i in 0..12 {
                let fields = serde_json::json!({"alert_id": format!("a{i}"), "event": "fire"});
                notifiers.send(Notification {
                    notify: Arc::from(vec!["hook".to_owned()]),
                    fields: fields.as_object().unwrap().clone(),
                });
            }
            notifiers.stop(Duration::from_secs(30)).await;
            assert_eq!(served.load(Ordering::SeqCst), 12, "every one delivered");
            assert_eq!(
                peak.load(Ordering::SeqCst),
                concurrency,
                "at most {concurrency} in flight, and that many when queued"
            );
        }
    }
}
