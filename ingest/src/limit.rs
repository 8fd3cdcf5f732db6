//! Rate limits of a source (`[sources.<name>.limit]`), with governor.
//!
//! - The source limit in `shed` mode is checked per message in [`Emitter::push`]; in
//!   `block` mode the emitter waits for room for a whole batch before handing it on
//!   ([`Emitter::flush`]), so the source stops reading meanwhile: Kafka and Kinesis
//!   poll slower, and an MQTT broker keeps the messages (QoS 1 publishers slow down
//!   once its in-flight window is full).
//! - The per-key limit acts in the decoder, once the message's key is known. In
//!   `shed` mode it drops the key's excess. In `block` mode the event is kept and the
//!   limit's time moves on to when the key has room ([`KeyLimit::take`]); the emitter
//!   then flushes and waits that long before handing the batch on, so the source stops
//!   reading meanwhile, as for the source limit. Every key behind the held event waits
//!   too: a connection or partition is one ordered stream. Nothing is buffered past
//!   the source's position, so replay after a crash stays exactly once.
//! - For HTTP ingest a per-key `block` is checked before the body is queued instead
//!   ([`SharedKeyLimit`]): a body holding a key over its rate is refused with 429.
//!
//! Shed events are counted exactly (`sluice_limit_events_total{outcome="shed"}`), and
//! one in `dead_letter_sample` becomes a dead letter with reason `rate_limited`.
//!
//! [`Emitter::push`]: crate::emit::Emitter::push
//! [`Emitter::flush`]: crate::emit::Emitter::flush

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sluice_config::{LimitConfig, LimitMode};

/// governor's keyed limiter (GCRA, `check_key`, `retain_recent`) over [`KeyStore`]:
/// one decoder owns its limiter, so the per-event check needs no locks or atomics.
type KeyedLimiter = RateLimiter<u64, KeyStore, ReceiveClock, NoOpMiddleware<Nanos>>;

/// The per-key state: each key's theoretical arrival time (ns since the limiter's
/// start), in a plain map by the key's 64-bit hash.
///
/// - governor's own stores (DashMap, a mutex around a HashMap) take a lock and an
///   atomic compare-and-swap per check, so that threads can share them; the decoder
///   that owns this one is never shared.
/// - Keyed by hash, the map is 16 bytes a key with no pointer to chase, so 10,000
///   devices stay in cache; a map of `String`s cost a cache miss or two per event. Two
///   keys share a bucket only if their 64-bit hashes collide: about 1 in 10^7 for a
///   million keys at once.
/// - The hash is foldhash seeded per process, so devices cannot choose keys that
///   collide.
#[derive(Debug, Default)]
struct KeyStore(RefCell<HashMap<u64, u64, foldhash::fast::RandomState>>);

impl StateStore for KeyStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self.0.borrow_mut();
        if let Some(tat) = map.get_mut(key) {
            let (result, next) = f(Some(Nanos::from(*tat)))?;
            *tat = next.as_u64();
            return Ok(result);
        }
        let (result, next) = f(None)?;
        map.insert(*key, next.as_u64());
        Ok(result)
    }
}

impl ShrinkableKeyedStateStore<u64> for KeyStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        self.0.borrow_mut().retain(|_, tat| *tat > drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.borrow_mut().shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.borrow().len()
    }

    fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

/// The keyed limiter's time: the receive time of the message being checked (ms, kept
/// monotonic), which the source has read already. Reading a clock per event was a
/// quarter of the limit's cost; GCRA stays exact on average with ms steps.
#[derive(Debug, Clone, Default)]
struct ReceiveClock(Arc<AtomicU64>);

impl ReceiveClock {
    /// Moves the time on by `by` (a per-key hold, which the source then waits out).
    fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let now = self.0.load(Ordering::Relaxed);
        self.0.store(now.saturating_add(by), Ordering::Relaxed);
    }

    fn set_ms(&self, ms: i64) {
        let nanos = u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000);
        // One writer (the decoder), so a load and a rare store do what `fetch_max` did
        // without a read-modify-write per event.
        if nanos > self.0.load(Ordering::Relaxed) {
            self.0.store(nanos, Ordering::Relaxed);
        }
    }
}

impl Clock for ReceiveClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.0.load(Ordering::Relaxed))
    }
}

/// How often the per-key state forgets keys that are quiet again.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

fn quota(rate: u32, burst: Option<u32>) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
    Quota::per_second(rate).allow_burst(burst)
}

/// governor's answer to a `check_n`: room now, the wait until there is, or `None`
/// when `n` is more than the burst and never fits.
fn room(
    checked: Result<
        Result<(), governor::NotUntil<governor::clock::QuantaInstant>>,
        governor::InsufficientCapacity,
    >,
) -> Result<(), Option<Duration>> {
    match checked {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(Some(
            not_until.wait_time_from(DefaultClock::default().now()),
        )),
        Err(_) => Err(None),
    }
}

/// One rate for everything that passes a point: a source's limit, HTTP ingest's, and
/// the lake's (`[lake] limit`, block mode).
#[derive(Debug)]
pub struct RateLimit {
    limiter: DefaultDirectRateLimiter,
    pub(crate) mode: LimitMode,
    /// The most one wait may ask for (the burst).
    burst: NonZeroU32,
}

impl RateLimit {
    /// The limit of `config`, if it has a rate.
    pub fn new(config: &LimitConfig) -> Option<Self> {
        let rate = config.rate?;
        let quota = quota(rate, config.burst);
        Some(Self {
            limiter: DefaultDirectRateLimiter::direct(quota),
            mode: config.mode,
            burst: quota.burst_size(),
        })
    }

    /// The most events that may pass at once.
    pub(crate) fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// Shed mode: whether one more event may pass now.
    pub(crate) fn admit(&self) -> bool {
        self.limiter.check().is_ok()
    }

    /// Takes room for `n` events now if there is; else how long until there is (`None`:
    /// never, `n` is more than the burst).
    pub(crate) fn try_take(&self, n: u32) -> Result<(), Option<Duration>> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        room(self.limiter.check_n(n))
    }

    /// Block mode: waits until `n` events may pass.
    pub(crate) async fn wait_for(&self, mut n: u32) {
        while n > 0 {
            n -= self.take(n).await;
        }
    }

    /// Waits for room for up to `n` events (at most the burst at once) and takes it;
    /// how many it took. Cancel-safe: governor takes the room only when it is there,
    /// so dropping this while it waits takes nothing.
    pub async fn take(&self, n: u32) -> u32 {
        let chunk = n.min(self.burst.get());
        if let Some(chunk_nz) = NonZeroU32::new(chunk) {
            // `chunk` never exceeds the burst, so this cannot be refused for capacity.
            let _ = self.limiter.until_n_ready(chunk_nz).await;
        }
        chunk
    }
}

/// The per-key limit, applied by the decoder once a message's key is known.
#[derive(Debug)]
pub struct KeyLimit {
    /// `shed`: [`KeyLimit::admit`]; `block`: [`KeyLimit::take`].
    pub mode: LimitMode,
    limiter: KeyedLimiter,
    clock: ReceiveClock,
    /// Hashes keys for the store (seeded per process).
    hasher: foldhash::fast::RandomState,
    pruned: Instant,
}

impl KeyLimit {
    /// The per-key limit of `config`, if it has one.
    pub fn new(config: &LimitConfig) -> Option<Self> {
        let rate = config.per_key_rate?;
        let clock = ReceiveClock::default();
        Some(Self {
            mode: config.per_key_mode,
            limiter: RateLimiter::new(
                quota(rate, config.per_key_burst),
                KeyStore::default(),
                clock.clone(),
            ),
            clock,
            hasher: foldhash::fast::RandomState::default(),
            pruned: Instant::now(),
        })
    }

    /// Whether one more event of `key`, received at `now_ms`, may pass.
    pub fn admit(&mut self, key: &str, now_ms: i64) -> bool {
        self.clock.set_ms(now_ms);
        self.limiter.check_key(&self.hasher.hash_one(key)).is_ok()
    }

    /// Block mode: takes room for one more event of `key`, received at `now_ms`. With
    /// none yet, the limit's time moves on to when there is, and that is returned: the
    /// caller waits it out before handing the event on. Later events are checked at the
    /// moved-on time, so the time never runs ahead of the clock once the wait is over.
    pub fn take(&mut self, key: &str, now_ms: i64) -> Duration {
        self.clock.set_ms(now_ms);
        let key = self.hasher.hash_one(key);
        let mut waited = Duration::ZERO;
        // One event always fits the burst, so the second check passes; the loop only
        // guards against rounding in governor's arithmetic.
        while let Err(not_until) = self.limiter.check_key(&key) {
            let wait = not_until
                .wait_time_from(self.clock.now())
                .max(Duration::from_nanos(1));
            self.clock.advance(wait);
            waited += wait;
        }
        waited
    }

    /// Forgets keys whose bucket is full again (at most every 10 s).
    pub fn prune(&mut self) {
        if self.pruned.elapsed() >= PRUNE_EVERY {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            self.pruned = Instant::now();
        }
    }

    /// Keys currently held.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// The per-key limit of HTTP ingest in block mode (`[http.limit] per_key_mode =
/// "block"`): checked by the request handlers before a body is queued, so they share
/// it (governor's default keyed store, a sharded map; HTTP bodies are not the
/// per-event hot path). Forgets quiet keys every 10 s.
#[derive(Debug)]
pub struct SharedKeyLimit {
    limiter: governor::DefaultKeyedRateLimiter<String>,
    burst: NonZeroU32,
    pruned: std::sync::Mutex<Instant>,
}

impl SharedKeyLimit {
    /// The per-key limit of `config` in block mode, if it has one.
    pub fn new(config: &LimitConfig) -> Option<Self> {
        if config.per_key_mode != LimitMode::Block {
            return None;
        }
        let quota = quota(config.per_key_rate?, config.per_key_burst);
        Some(Self {
            limiter: RateLimiter::keyed(quota),
            burst: quota.burst_size(),
            pruned: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// The most events of one key that may pass at once.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// Takes room for `n` events of `key` now if there is; else how long until there
    /// is (`None`: never, `n` is more than the burst).
    pub fn try_take(&self, key: &str, n: u32) -> Result<(), Option<Duration>> {
        self.prune();
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        room(self.limiter.check_key_n(&key.to_owned(), n))
    }

    fn prune(&self) {
        let Ok(mut pruned) = self.pruned.try_lock() else {
            return;
        };
        if pruned.elapsed() >= PRUNE_EVERY {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            *pruned = Instant::now();
        }
    }
}

/// Keeps one in `every` shed events (the first of each run of `every`).
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    every: u64,
    seen: u64,
}

impl Sampler {
    /// One in `every` (at least 1).
    pub fn new(every: u32) -> Self {
        Self {
            every: u64::from(every.max(1)),
            seen: 0,
        }
    }

    /// Counts one shed event; whether to keep it as a dead letter.
    pub fn keep(&mut self) -> bool {
        let keep = self.seen.is_multiple_of(self.every);
        self.seen += 1;
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rate: Option<u32>, per_key: Option<u32>) -> LimitConfig {
        LimitConfig {
            rate,
            burst: None,
            mode: LimitMode::Shed,
            per_key_rate: per_key,
            per_key_burst: None,
            per_key_mode: LimitMode::Shed,
            dead_letter_sample: 1,
        }
    }

    #[test]
    fn a_key_over_its_burst_is_refused_and_others_are_not() {
        // 1/s with a burst of 1: the second event of a key within a second is refused.
        let mut limit = KeyLimit::new(&config(None, Some(1))).unwrap();
        assert!(limit.admit("noisy", 1_000));
        assert!(!limit.admit("noisy", 1_000));
        assert!(!limit.admit("noisy", 1_999));
        assert!(limit.admit("quiet", 1_999));
        assert!(limit.admit("noisy", 2_000), "a second later");
        assert_eq!(limit.keys(), 2);
    }

    #[test]
    fn a_blocking_key_limit_holds_each_event_until_its_key_has_room() {
        let mut c = config(None, Some(10));
        c.per_key_burst = Some(2);
        c.per_key_mode = LimitMode::Block;
        let mut limit = KeyLimit::new(&c).unwrap();
        assert_eq!(limit.mode, LimitMode::Block);
        // The burst passes; then 100 ms (1/10 s) per event of the same key.
        assert_eq!(limit.take("noisy", 1_000), Duration::ZERO);
        assert_eq!(limit.take("noisy", 1_000), Duration::ZERO);
        assert_eq!(limit.take("noisy", 1_000), Duration::from_millis(100));
        assert_eq!(limit.take("noisy", 1_000), Duration::from_millis(100));
        // The limit's time is now 1.2 s: another key has room, and an event of the
        // noisy key received by then waits only what is left of its interval.
        assert_eq!(limit.take("quiet", 1_000), Duration::ZERO);
        assert_eq!(limit.take("noisy", 1_250), Duration::from_millis(50));
        // Ten events in a row of one key hold for 1 s in all: its rate.
        let held: Duration = (0..10).map(|_| limit.take("flood", 2_000)).sum();
        assert_eq!(held, Duration::from_millis(800), "10 less the burst of 2");
    }

    #[test]
    fn a_million_keys_are_forgotten_once_quiet() {
        // 1,000/s per key: one event's room comes back within a millisecond.
        let mut limit = KeyLimit::new(&config(None, Some(1_000))).unwrap();
        let mut key = String::new();
        for i in 0..1_000_000u32 {
            key.clear();
            key.push_str("dev-");
            key.push_str(itoa::Buffer::new().format(i));
            assert!(limit.admit(&key, 1_000));
        }
        assert_eq!(limit.keys(), 1_000_000);
        // 20 ms later one key is active.
        assert!(limit.admit("dev-0", 1_020));
        limit.pruned = Instant::now() - PRUNE_EVERY;
        limit.prune();
        assert_eq!(limit.keys(), 1, "quiet keys cost nothing");
    }

    #[test]
    fn the_source_limit_sheds_past_its_burst() {
        let limit = RateLimit::new(&config(Some(3), None)).unwrap();
        let passed = (0..10).filter(|_| limit.admit()).count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn try_take_says_how_long_to_wait_or_that_it_never_fits() {
        let mut c = config(Some(1), None);
        c.burst = Some(10);
        let limit = RateLimit::new(&c).unwrap();
        assert_eq!(limit.try_take(10), Ok(()));
        let wait = limit.try_take(5).unwrap_err().expect("fits the burst");
        assert!(wait > Duration::from_secs(3), "{wait:?}");
        assert_eq!(limit.try_take(11), Err(None));
    }

    #[test]
    fn one_in_n_is_sampled() {
        let mut s = Sampler::new(3);
        let kept: Vec<bool> = (0..7).map(|_| s.keep()).collect();
        assert_eq!(kept, [true, false, false, true, false, false, true]);
    }
}
