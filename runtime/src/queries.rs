//! Where analysts' queries run: a tokio runtime of their own, on threads the kernel
//! schedules below ingest.
//!
//! DataFusion spreads a query over as many tasks as there are cores. On the service's
//! runtime, four heavy queries took most of the two cores of a small box from the
//! sources, decoders and the lake, and 50,000 events/s of MQTT fell behind
//! (`scripts/bench-queries.sh`). Here each query, its result's encoding included, runs
//! on a runtime of one thread per core whose threads have a nice value 10 above the
//! process's: CFS then gives a busy ingest about nine tenths of the CPU when both
//! want it, and an idle service all of it to the queries. The same separation as
//! InfluxDB IOx's `DedicatedExecutor`, with the priority added.

use std::future::Future;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// How much lower than the process query threads run (nice levels; 10 is about a
/// tenth of the CPU weight).
const NICER_BY: i32 = 10;

/// The queries' runtime; shut down (without waiting) when dropped.
#[derive(Debug)]
pub(crate) struct QueryRuntime {
    handle: Handle,
    /// Taken by `drop`.
    runtime: Option<Runtime>,
}

impl QueryRuntime {
    /// A runtime of `threads` threads at lower priority.
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("sluice-query")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Runs `work` on the queries' runtime. Dropping the returned future (a client
    /// gone, a time limit, shutdown) aborts it there.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        AbortOnDrop(self.handle.spawn(work)).wait().await
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks end, which may not happen inside
        // the service's runtime; a query still running is abandoned instead.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A spawned task that is aborted when this is dropped before it ends.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// The task's output; `None` if it panicked or was aborted.
    async fn wait(mut self) -> Option<T> {
        (&mut self.0).await.ok()
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Raises the calling thread's nice value by [`NICER_BY`]. On Linux the nice value is
/// per thread, and `setpriority(PRIO_PROCESS, 0, ..)` sets the calling thread's
/// (see setpriority(2), "BUGS"). Failing that, the thread runs at normal priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: getpriority and setpriority read and set the calling thread's nice
    // value; they touch no memory of ours.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if libc::setpriority(libc::PRIO_PROCESS, 0, (current + NICER_BY).min(19)) != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "query thread keeps its priority"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_nicer_threads_and_ends_when_its_caller_goes() {
        let queries = QueryRuntime::new(1).unwrap();
        let name = queries
            .run(async { std::thread::current().name().map(str::to_owned) })
            .await
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
            assert_eq!(theirs, (ours + NICER_BY).min(19));
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
}
