//! The queue from the sources to the lake task, bounded in batches *and* in bytes.
//!
//! A tokio `mpsc` channel bounds the number of batches; a semaphore of byte permits
//! bounds their Arrow memory (`RecordBatch::get_array_memory_size`). A sender waits
//! for both, so a slow lake task (a stalled disk, a backlog of files) stops the
//! sources instead of letting memory grow. A batch larger than the whole budget takes
//! all of it and goes alone. The permits are given back when the lake task receives
//! the batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::StreamBatch;

/// The receiving end is gone (the lake task stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the pipeline is closed")]
pub struct Closed;

struct Queued {
    batch: StreamBatch,
    _bytes: OwnedSemaphorePermit,
}

/// What both ends share: the byte budget and how much of it is queued.
struct Budget {
    permits: Arc<Semaphore>,
    max: u32,
    queued_bytes: AtomicUsize,
}

/// The sources' end; cheap to clone.
#[derive(Clone)]
pub struct PipeSender {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Budget>,
}

impl std::fmt::Debug for PipeSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeSender")
            .field("max_bytes", &self.budget.max)
            .finish_non_exhaustive()
    }
}

/// The lake task's end.
pub struct PipeReceiver {
    rx: mpsc::Receiver<Queued>,
    budget: Arc<Budget>,
}

impl std::fmt::Debug for PipeReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeReceiver")
            .field("queued_batches", &self.queued_batches())
            .field("queued_bytes", &self.queued_bytes())
            .finish()
    }
}

/// A queue of at most `batches` batches and `bytes` bytes of Arrow memory (at most
/// `u32::MAX`).
pub fn pipe(batches: usize, bytes: usize) -> (PipeSender, PipeReceiver) {
    let max = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
    let budget = Arc::new(Budget {
        permits: Arc::new(Semaphore::new(max as usize)),
        max,
        queued_bytes: AtomicUsize::new(0),
    });
    let (tx, rx) = mpsc::channel(batches.max(1));
    (
        PipeSender {
            tx,
            budget: budget.clone(),
        },
        PipeReceiver { rx, budget },
    )
}

impl PipeSender {
    /// Queues `batch`, waiting for room in batches and bytes.
    pub async fn send(&self, batch: StreamBatch) -> Result<(), Closed> {
        let size = batch.batch.get_array_memory_size();
        let want = u32::try_from(size)
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget.max);
        let permit = self
            .budget
            .permits
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| Closed)?;
        self.budget.queued_bytes.fetch_add(size, Ordering::Relaxed);
        self.tx
            .send(Queued {
                batch,
                _bytes: permit,
            })
            .await
            .map_err(|_| {
                self.budget.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                Closed
            })
    }
}

impl PipeReceiver {
    /// The next batch; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<StreamBatch> {
        let queued = self.rx.recv().await?;
        let size = queued.batch.batch.get_array_memory_size();
        self.budget.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        Some(queued.batch)
    }

    /// Batches waiting.
    pub fn queued_batches(&self) -> usize {
        self.rx.len()
    }

    /// Arrow bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        self.budget.queued_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arrow::array::{ArrayRef, Int64Array};
    use arrow::record_batch::RecordBatch;

    use super::*;

    fn batch(rows: usize) -> StreamBatch {
        let column: ArrayRef = Arc::new(Int64Array::from(vec![1i64; rows]));
        let batch = RecordBatch::try_from_iter([("x", column)]).expect("batch");
        StreamBatch::new("s".into(), batch)
    }

    #[tokio::test]
    async fn a_sender_waits_for_bytes_then_goes_on_when_the_receiver_takes() {
        let one = batch(1_000).batch.get_array_memory_size();
        // Room for many batches by count, two by bytes.
        let (tx, mut rx) = pipe(100, 2 * one + one / 2);
        tx.send(batch(1_000)).await.expect("first");
        tx.send(batch(1_000)).await.expect("second");
        assert_eq!(rx.queued_bytes(), 2 * one);
        let third = tokio::time::timeout(Duration::from_millis(100), tx.send(batch(1_000))).await;
        assert!(third.is_err(), "the third waits for bytes");
        assert_eq!(rx.recv().await.expect("batch").batch.num_rows(), 1_000);
        tokio::time::timeout(Duration::from_secs(5), tx.send(batch(1_000)))
            .await
            .expect("room again")
            .expect("sent");
        assert_eq!(rx.queued_batches(), 2);
        // A batch larger than the whole budget still goes, alone.
        let (tx, mut rx) = pipe(100, one / 2);
        tx.send(batch(1_000)).await.expect("oversized batch");
        assert_eq!(rx.recv().await.expect("batch").batch.num_rows(), 1_000);
        drop(tx);
        assert!(rx.recv().await.is_none());
    }
}
