//! Where analysts' queries run: a tokio runtime of their own, on threads the kernel
//! schedules below ingest, watched for the process's memory.
//!
//! DataFusion spreads a query over as many tasks as there are cores. On the service's
//! runtime, four heavy queries took most of the two cores of a small box from the
//! sources, decoders and the lake, and 50,000 events/s of MQTT fell behind
//! (`scripts/bench-queries.sh`). Here each query, its result's encoding included, runs
//! on a runtime of one thread per core whose threads have a nice value 10 above the
//! process's: CFS then gives a busy ingest about nine tenths of the CPU when both
//! want it, and an idle service all of it to the queries. The same separation as
//! InfluxDB IOx's `DedicatedExecutor`, with the priority added.
//!
//! DataFusion's memory pool bounds what its operators account, not all a query
//! holds: under the same soak, two `GROUP BY` over every row and two regex scans
//! took the process to 4.5 GB against a 512 MB pool. So a watchdog thread reads the process's resident
//! memory every 100 ms. Past `[http] query_rss_limit` it first hands the allocator's
//! free pages back (`malloc_trim`: glibc kept 1 GB a cancelled query had freed); if
//! that is not enough it cancels the oldest running query, gives it half a second to
//! go, and looks again. While over, new queries are refused.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::usage::lower_thread_priority;
use tokio::runtime::{Handle, Runtime};
use tokio::task::{AbortHandle, JoinHandle};

/// How often the watchdog reads the process's memory.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// How long after a cancellation the watchdog lets memory be freed before it looks
/// again (and may cancel the next query).
const SETTLE: Duration = Duration::from_millis(500);

/// Megabytes as the config writes them (`"1536MB"` is 1,536,000,000 bytes).
const MB: u64 = 1_000_000;

/// Why a query did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// It panicked.
    Failed,
    /// The process's memory was over the limit: it was cancelled (or not started).
    OverMemory { rss: u64, limit: u64 },
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Failed => f.write_str("the query failed unexpectedly"),
            Stopped::OverMemory { rss, limit } => write!(
                f,
                "the service's memory ({} MB) is over [http] query_rss_limit ({} MB), so \
                 queries are cancelled, the oldest first; retry later, or ask for less \
                 (fewer rows, fewer groups, a join on equal keys)",
                rss / MB,
                limit / MB
            ),
        }
    }
}

/// The queries running now, by start order.
#[derive(Debug, Default)]
struct Running {
    next: AtomicU64,
    queries: Mutex<BTreeMap<u64, Watched>>,
    /// The memory the watchdog last found over the limit (0: under it).
    over_at: AtomicU64,
}

#[derive(Debug)]
struct Watched {
    abort: AbortHandle,
    /// The memory it was cancelled at (0: not cancelled).
    cancelled_at: Arc<AtomicU64>,
}

/// The queries' runtime; shut down (without waiting) when dropped.
#[derive(Debug)]
pub(crate) struct QueryRuntime {
    handle: Handle,
    /// Taken by `drop`.
    runtime: Option<Runtime>,
    running: Arc<Running>,
    /// `[http] query_rss_limit`.
    limit: Option<u64>,
    /// Ends the watchdog.
    stop: Arc<AtomicBool>,
}

impl QueryRuntime {
    /// A runtime of `threads` threads at lower priority; with `rss_limit`, watched.
    pub(crate) fn new(threads: usize, rss_limit: Option<u64>) -> std::io::Result<Self> {
        Self::watched_by(threads, rss_limit, sluice_core::usage::rss_bytes)
    }

    /// [`new`](Self::new), with `rss` in place of the process's resident memory.
    fn watched_by(
        threads: usize,
        rss_limit: Option<u64>,
        rss: fn() -> Option<u64>,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("sluice-query")
            .on_thread_start(lower_thread_priority)
            .enable_all()
            .build()?;
        let running = Arc::new(Running::default());
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(limit) = rss_limit {
            let (running, stop) = (running.clone(), stop.clone());
            std::thread::Builder::new()
                .name("sluice-query-watch".into())
                .spawn(move || watch(&running, limit, rss, &stop))?;
        }
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            running,
            limit: rss_limit,
            stop,
        })
    }

    /// Runs `work` on the queries' runtime. Dropping the returned future (a client
    /// gone, a time limit, shutdown) aborts it there; so does the watchdog.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, Stopped> {
        let over_at = self.running.over_at.load(Ordering::Relaxed);
        if let Some(limit) = self.limit
            && over_at > 0
        {
            metrics::counter!("sluice_queries_refused_total", "reason" => "memory").increment(1);
            return Err(Stopped::OverMemory {
                rss: over_at,
                limit,
            });
        }
        let task = self.handle.spawn(work);
        let id = self.running.next.fetch_add(1, Ordering::Relaxed);
        let cancelled_at = Arc::new(AtomicU64::new(0));
        let watched = Watched {
            abort: task.abort_handle(),
            cancelled_at: cancelled_at.clone(),
        };
        lock(&self.running.queries).insert(id, watched);
        let outcome = AbortOnDrop(task, &self.running, id).wait().await;
        match (outcome, cancelled_at.load(Ordering::Relaxed)) {
            (Some(out), _) => Ok(out),
            (None, 0) => Err(Stopped::Failed),
            (None, rss) => Err(Stopped::OverMemory {
                rss,
                limit: self.limit.unwrap_or(0),
            }),
        }
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping a runtime blocks until its tasks end, which may not happen inside
        // the service's runtime; a query still running is abandoned instead.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The watchdog: past `limit`, trims the heap; still past it, cancels the oldest
/// running query and lets the memory settle before it looks again.
fn watch(running: &Running, limit: u64, rss: fn() -> Option<u64>, stop: &AtomicBool) {
    let over = |now: &u64| *now > limit;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(WATCH_EVERY);
        let now = match rss().filter(over) {
            Some(_) => {
                trim_heap();
                rss().filter(over)
            }
            None => None,
        };
        running.over_at.store(now.unwrap_or(0), Ordering::Relaxed);
        let Some(now) = now else {
            continue;
        };
        let Some((_, oldest)) = lock(&running.queries).pop_first() else {
            std::thread::sleep(SETTLE);
            continue;
        };
        oldest.cancelled_at.store(now, Ordering::Relaxed);
        oldest.abort.abort();
        metrics::counter!("sluice_queries_cancelled_total", "reason" => "memory").increment(1);
        tracing::warn!(
            rss_mb = now / MB,
            limit_mb = limit / MB,
            "memory over [http] query_rss_limit; cancelled the oldest running query"
        );
        std::thread::sleep(SETTLE);
    }
}

/// Hands the allocator's free pages back to the kernel, so that the memory a
/// cancelled query freed shows in the resident size (glibc keeps it otherwise).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A spawned query that is aborted when this is dropped before it ends, and leaves
/// the watched set either way.
struct AbortOnDrop<'a, T>(JoinHandle<T>, &'a Running, u64);

impl<T> AbortOnDrop<'_, T> {
    /// The task's output; `None` if it panicked or was aborted.
    async fn wait(mut self) -> Option<T> {
        (&mut self.0).await.ok()
    }
}

impl<T> Drop for AbortOnDrop<'_, T> {
    fn drop(&mut self) {
        self.0.abort();
        lock(&self.1.queries).remove(&self.2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_nicer_threads_and_ends_when_its_caller_goes() {
        let queries = QueryRuntime::new(1, None).unwrap();
        let name = queries
            .run(async { std::thread::current().name().map(str::to_owned) })
            .await
            .ok()
            .flatten();
        assert_eq!(name.as_deref(), Some("sluice-query"));
        #[cfg(target_os = "linux")]
        {
            // SAFETY: reads the calling thread's nice value.
            let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            let theirs = queries
                .run(async { unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } })
                .await
                .unwrap();
            assert_eq!(theirs, (ours + sluice_core::usage::NICER_BY).min(19));
        }
        // A caller that stops waiting aborts the work.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = queries.run(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(tokio::time::timeout(std::time::Duration::from_millis(10), waiting).await);
        assert!(rx.await.is_err(), "the work was dropped with its caller");
    }

    /// The memory the fake reader reports, in MB.
    static FAKE_RSS_MB: AtomicU64 = AtomicU64::new(100);

    fn fake_rss() -> Option<u64> {
        Some(FAKE_RSS_MB.load(Ordering::Relaxed) * MB)
    }

    /// Past the limit the oldest query is cancelled first, the next one only if the
    /// memory stays over, and new ones are refused until it is back under.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_the_memory_limit_the_oldest_query_is_cancelled_first() {
        let queries = Arc::new(QueryRuntime::watched_by(1, Some(1000 * MB), fake_rss).unwrap());
        let start = |queries: &Arc<QueryRuntime>| {
            let queries = queries.clone();
            tokio::spawn(async move { queries.run(std::future::pending::<()>()).await })
        };
        let older = start(&queries);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let newer = start(&queries);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            !older.is_finished() && !newer.is_finished(),
            "under the limit"
        );
        FAKE_RSS_MB.store(1500, Ordering::Relaxed);
        let stopped = older.await.unwrap().unwrap_err();
        assert_eq!(
            stopped,
            Stopped::OverMemory {
                rss: 1500 * MB,
                limit: 1000 * MB
            }
        );
        assert!(
            !newer.is_finished(),
            "one query at a time, the oldest first"
        );
        assert!(stopped.to_string().contains("query_rss_limit (1000 MB)"));
        // Refused while over; the newer one goes too if the memory stays over.
        let refused = queries.run(async {}).await.unwrap_err();
        assert!(matches!(refused, Stopped::OverMemory { .. }), "{refused:?}");
        assert!(newer.await.unwrap().is_err());
        FAKE_RSS_MB.store(100, Ordering::Relaxed);
        // Admitted again once the watchdog has seen the memory under the limit.
        let mut outcome = queries.run(async { 7 }).await;
        for _ in 0..100 {
            if outcome.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            outcome = queries.run(async { 7 }).await;
        }
        assert_eq!(outcome, Ok(7));
    }
}
