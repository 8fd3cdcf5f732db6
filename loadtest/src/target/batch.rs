//! Batching shared by the request/response targets (HTTP ingest, Kinesis PutRecords):
//! a batch goes out when it is full (items or bytes) or its oldest message has waited
//! [`LINGER_US`], as a task holding one of `in_flight` request slots. Waiting for a
//! slot is backpressure.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::wait_for_acks;
use crate::stats::Stats;

/// Longest a message waits in a batch before the batch goes out, µs.
pub(super) const LINGER_US: u64 = 5_000;

/// Pending items with their due times, and the requests in flight.
#[derive(Debug)]
pub(super) struct Batcher<T> {
    items: Vec<T>,
    dues: Vec<u64>,
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
    permits: Arc<Semaphore>,
    requests: JoinSet<()>,
    stats: Arc<Stats>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Batches of at most `max_items` and `max_bytes`, `in_flight` requests at a time.
    pub(super) fn new(
        max_items: usize,
        max_bytes: usize,
        in_flight: usize,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            items: Vec::new(),
            dues: Vec::new(),
            bytes: 0,
            max_items: max_items.max(1),
            max_bytes,
            permits: Arc::new(Semaphore::new(in_flight.max(1))),
            requests: JoinSet::new(),
            stats,
        }
    }

    /// Whether adding `bytes` would overflow the batch (flush first).
    pub(super) fn would_overflow(&self, bytes: usize) -> bool {
        !self.items.is_empty() && self.bytes + bytes > self.max_bytes
    }

    /// Adds an item; true when the batch should go out now.
    pub(super) fn push(&mut self, item: T, bytes: usize, due_us: u64) -> bool {
        self.items.push(item);
        self.dues.push(due_us);
        self.bytes += bytes;
        self.items.len() >= self.max_items
            || self.stats.now_us().saturating_sub(self.dues[0]) >= LINGER_US
    }

    /// Hands the batch to `send` in a task once a request slot is free.
    pub(super) async fn flush<F, Fut>(&mut self, send: F) -> anyhow::Result<()>
    where
        F: FnOnce(Vec<T>, Vec<u64>, Arc<Stats>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.items.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .context("request slots closed")?;
        let waited = start.elapsed();
        if waited > Duration::from_micros(100) {
            self.stats.backpressure(waited);
        }
        self.bytes = 0;
        let request = send(
            std::mem::take(&mut self.items),
            std::mem::take(&mut self.dues),
            self.stats.clone(),
        );
        self.requests.spawn(async move {
            let _permit = permit;
            request.await;
        });
        // Reap finished requests so the set does not grow over a long run.
        while self.requests.try_join_next().is_some() {}
        Ok(())
    }

    /// Waits up to `timeout` for every response (call after the last flush).
    pub(super) async fn finish(mut self, timeout: Duration) {
        wait_for_acks(&self.stats, timeout).await;
        self.requests.abort_all();
    }
}
