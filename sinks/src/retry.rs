//! Retry timing shared by every sink: exponential backoff with jitter, and a circuit
//! breaker that, after `breaker_failures` failures in a row, waits `breaker_cooldown`
//! between single probes (half-open) until one succeeds.
//!
//! Used by the notifiers (per delivery) and the lake (per store attempt).

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
}
