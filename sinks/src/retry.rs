//! Retry timing shared by every sink: exponential backoff with jitter, and a circuit
//! breaker that, after `breaker_failures` failures in a row, waits `breaker_cooldown`
//! between single probes (half-open) until one succeeds.
//!
//! Used by the notifiers (per delivery) and the lake (per store attempt), and
//! [`is_transient`] tells an object store's outage from a refusal.

use std::time::Duration;

/// When to give up on one item, and when to stop hammering a dead endpoint.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// How long one item (a notification) is retried before it is dropped.
    pub retry_for: Duration,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// Wait between probes while the breaker is open.
    pub breaker_cooldown: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retry_for: Duration::from_secs(300),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(10),
        }
    }
}

/// The first backoff after a failure; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest backoff before the breaker opens.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Failures in a row and the current backoff of one sink.
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: RetryPolicy,
    failures: u32,
    backoff: Duration,
}

/// What a failure means for the next try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    /// How long to wait before the next try.
    pub wait: Duration,
    /// The first failure of an outage (log it).
    pub first: bool,
    /// This failure opened the breaker (log it).
    pub opened: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Whether the breaker is open (probing once per cooldown).
    pub fn is_open(&self) -> bool {
        self.failures >= self.policy.breaker_failures
    }

    /// A try succeeded: closes the breaker. True if it ends an outage.
    pub fn success(&mut self) -> bool {
        let outage = self.failures > 0;
        self.failures = 0;
        self.backoff = FIRST_BACKOFF;
        outage
    }

    /// A try failed: how long to wait, and what to log.
    pub fn failure(&mut self) -> Failed {
        self.failures = self.failures.saturating_add(1);
        let opened = self.failures == self.policy.breaker_failures;
        let wait = if self.is_open() {
            self.policy.breaker_cooldown
        } else {
            let wait = jitter(self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            wait
        };
        Failed {
            wait,
            first: self.failures == 1,
            opened,
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.0) ("equal jitter"), so many retrying
/// sinks do not hit a recovering endpoint in step.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Whether `err`, or an error under it, is an object store outage that waiting can
/// end: no connection, a timeout, or an answer of 5xx, 408 or 429 (SeaweedFS answers
/// 500 while its volumes load after a restart). A refusal that only a change can end
/// (no such bucket, access denied, a local directory that cannot be written) is not,
/// nor is anything that did not come from the store.
pub fn is_transient(err: &(dyn std::error::Error + 'static)) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut from_store = false;
    for e in std::iter::successors(Some(err), |e| e.source()) {
        if let Some(e) = e.downcast_ref::<object_store::Error>() {
            // Every other variant names a refusal: not found, permission, precondition…
            if !matches!(e, object_store::Error::Generic { .. }) {
                return false;
            }
            from_store = true;
        } else if let Some(e) = e.downcast_ref::<HttpError>() {
            return matches!(
                e.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            );
        } else if let Some(e) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            return matches!(
                e.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotConnected
                    | ErrorKind::TimedOut
                    | ErrorKind::Interrupted
            );
        } else if from_store && let Some(status) = http_status(e) {
            return status >= 500 || status == 408 || status == 429;
        }
    }
    from_store
}

/// The HTTP status of an object store's answer, read from its message: the error
/// type that carries it (`object_store`'s `RequestError`) is not public.
fn http_status(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let text = e.to_string();
    let rest = text.strip_prefix("Server returned non-2xx status code: ")?;
    rest.get(..3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(1));
            assert!(j >= Duration::from_millis(500) && j < Duration::from_secs(1));
        }
    }

    #[test]
    fn backoff_doubles_then_the_breaker_opens_and_a_success_closes_it() {
        let mut b = Breaker::new(RetryPolicy {
            retry_for: Duration::from_secs(60),
            breaker_failures: 4,
            breaker_cooldown: Duration::from_secs(10),
        });
        let waits: Vec<Failed> = (0..5).map(|_| b.failure()).collect();
        assert!(waits[0].first && !waits[1].first);
        for (i, f) in waits[..3].iter().enumerate() {
            let full = FIRST_BACKOFF * 2u32.pow(i as u32);
            assert!(f.wait >= full / 2 && f.wait < full, "{i}: {:?}", f.wait);
        }
        assert!(waits[3].opened && !waits[4].opened);
        assert_eq!(waits[3].wait, Duration::from_secs(10));
        assert!(b.is_open());
        assert!(b.success());
        assert!(!b.is_open());
        assert!(!b.success(), "no outage to end");
    }

    /// The error an S3 client gets from `endpoint` when it lists a bucket, after no
    /// retry of its own.
    async fn list_error(endpoint: &str) -> object_store::Error {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name("lake")
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .expect("store");
        store
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .expect_err("nothing answers as S3 there")
    }

    /// A server on loopback that answers every request with `status`.
    fn answering(status: &'static str) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn a_store_that_is_away_or_failing_is_transient_and_a_refusal_is_not() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address")
        };
        let refused = list_error(&format!("http://{closed}")).await;
        assert!(is_transient(&refused), "no connection: {refused}");
        for status in [
            "500 Internal Server Error",
            "503 Service Unavailable",
            "429 Too Many Requests",
        ] {
            let e = list_error(&answering(status)).await;
            assert!(is_transient(&e), "{status}: {e}");
        }
        for status in ["403 Forbidden", "404 Not Found", "400 Bad Request"] {
            let e = list_error(&answering(status)).await;
            assert!(!is_transient(&e), "{status}: {e}");
        }
        // Wrapped as the lake wraps it, under a context as the runtime adds one.
        let wrapped = crate::Error::Store {
            path: "lake".into(),
            source: list_error(&answering("500 Internal Server Error")).await,
        };
        assert!(is_transient(&wrapped));
        let local = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
        };
        assert!(
            !is_transient(&local),
            "a local directory refused stays refused"
        );
        let other = std::io::Error::other("a config mistake");
        assert!(!is_transient(&other), "not from a store");
    }
}
