//! Queues between components, bounded in items *and* in bytes.
//!
//! A tokio `mpsc` channel bounds the number of items; a semaphore of byte permits
//! bounds their memory ([`Weigh`]: a batch's Arrow memory, a message's payload). A
//! sender waits for both (or, with [`BoundedSender::try_send`], gives up at once), so a
//! slow consumer (a stalled disk, a backlog of files, a slow webhook) stops the
//! producer instead of letting memory grow. An item larger than the whole budget takes
//! all of it and goes alone. The permits are given back when the item is received.
//!
//! Used for the sources → lake task queue ([`PipeSender`]), an MQTT source's queue
//! from its connection to its decoder, each HTTP ingest stream's request queue, and
//! each notifier's queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::StreamBatch;

/// The receiving end is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the pipeline is closed")]
pub struct Closed;

/// Why [`BoundedSender::try_send`] did not queue an item, with the item.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError<T> {
    /// No room now, in items or in bytes.
    #[error("the queue is full")]
    Full(T),
    /// The receiving end is gone.
    #[error("the queue is closed")]
    Closed(T),
}

impl<T> std::fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full(_) => "Full(..)",
            Self::Closed(_) => "Closed(..)",
        })
    }
}

/// The memory an item holds while queued, in bytes.
pub trait Weigh {
    /// Bytes this item holds.
    fn weigh(&self) -> usize;
}

impl Weigh for StreamBatch {
    fn weigh(&self) -> usize {
        self.batch.get_array_memory_size()
    }
}

/// A notification's fields, approximately: text lengths plus a fixed cost per value
/// (a `serde_json::Value` and a map entry are a few dozen bytes each).
impl Weigh for crate::Notification {
    fn weigh(&self) -> usize {
        fn value(v: &serde_json::Value) -> usize {
            const SLOT: usize = 32;
            SLOT + match v {
                serde_json::Value::String(s) => s.len(),
                serde_json::Value::Array(a) => a.iter().map(value).sum(),
                serde_json::Value::Object(o) => o.iter().map(|(k, v)| k.len() + value(v)).sum(),
                _ => 0,
            }
        }
        self.fields
            .iter()
            .map(|(k, v)| k.len() + value(v))
            .sum::<usize>()
            + self.notify.iter().map(String::len).sum::<usize>()
    }
}

impl<T: Weigh> Weigh for Arc<T> {
    fn weigh(&self) -> usize {
        (**self).weigh()
    }
}

struct Queued<T> {
    item: T,
    size: usize,
    _bytes: OwnedSemaphorePermit,
}

/// What both ends share: the byte budget and how much of it is queued.
struct Budget {
    permits: Arc<Semaphore>,
    max: u32,
    queued_bytes: AtomicUsize,
}

impl Budget {
    /// Permits for `size` bytes, clamped to the whole budget.
    fn want(&self, size: usize) -> u32 {
        u32::try_from(size).unwrap_or(u32::MAX).clamp(1, self.max)
    }
}

/// The producing end; cheap to clone.
pub struct BoundedSender<T> {
    tx: mpsc::Sender<Queued<T>>,
    budget: Arc<Budget>,
}

impl<T> Clone for BoundedSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            budget: self.budget.clone(),
        }
    }
}

impl<T> std::fmt::Debug for BoundedSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedSender")
            .field("max_bytes", &self.budget.max)
            .finish_non_exhaustive()
    }
}

/// The consuming end.
pub struct BoundedReceiver<T> {
    rx: mpsc::Receiver<Queued<T>>,
    budget: Arc<Budget>,
}

impl<T> std::fmt::Debug for BoundedReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedReceiver")
            .field("queued", &self.len())
            .field("queued_bytes", &self.queued_bytes())
            .finish()
    }
}

/// How often [`BoundedSender::send_timed`] counts a wait that goes on.
pub const WAIT_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// The sources' end of the queue to the lake task.
pub type PipeSender = BoundedSender<StreamBatch>;
/// The lake task's end.
pub type PipeReceiver = BoundedReceiver<StreamBatch>;

/// A queue of at most `items` items and `bytes` bytes (at most `u32::MAX`).
pub fn bounded<T>(items: usize, bytes: usize) -> (BoundedSender<T>, BoundedReceiver<T>) {
    let max = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
    let budget = Arc::new(Budget {
        permits: Arc::new(Semaphore::new(max as usize)),
        max,
        queued_bytes: AtomicUsize::new(0),
    });
    let (tx, rx) = mpsc::channel(items.max(1));
    (
        BoundedSender {
            tx,
            budget: budget.clone(),
        },
        BoundedReceiver { rx, budget },
    )
}

/// The sources → lake task queue: at most `batches` batches and `bytes` bytes of
/// Arrow memory.
pub fn pipe(batches: usize, bytes: usize) -> (PipeSender, PipeReceiver) {
    bounded(batches, bytes)
}

impl<T: Weigh> BoundedSender<T> {
    /// Queues `item`, waiting for room in items and bytes.
    pub async fn send(&self, item: T) -> Result<(), Closed> {
        let size = item.weigh();
        let permit = self
            .budget
            .permits
            .clone()
            .acquire_many_owned(self.budget.want(size))
            .await
            .map_err(|_| Closed)?;
        self.budget.queued_bytes.fetch_add(size, Ordering::Relaxed);
        self.tx
            .send(Queued {
                item,
                size,
                _bytes: permit,
            })
            .await
            .map_err(|_| {
                self.budget.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                Closed
            })
    }

    /// [`send`](Self::send), adding the time it waits for room to `waited`, also while
    /// it still waits (every [`WAIT_TICK`]), so a source held for minutes shows as
    /// held during them, not once they are over.
    pub async fn send_timed(&self, item: T, waited: &crate::busy::Busy) -> Result<(), Closed> {
        let send = self.send(item);
        tokio::pin!(send);
        let mut since = std::time::Instant::now();
        loop {
            // Biased: with room the send is ready on its first poll and the timer is
            // never registered.
            tokio::select! {
                biased;
                sent = &mut send => {
                    waited.since(since);
                    return sent;
                }
                () = tokio::time::sleep(WAIT_TICK) => {
                    waited.since(since);
                    since = std::time::Instant::now();
                }
            }
        }
    }

    /// Queues `item` if there is room now, in items and in bytes.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.tx.is_closed() {
            return Err(TrySendError::Closed(item));
        }
        let size = item.weigh();
        let Ok(permit) = self
            .budget
            .permits
            .clone()
            .try_acquire_many_owned(self.budget.want(size))
        else {
            return Err(TrySendError::Full(item));
        };
        self.budget.queued_bytes.fetch_add(size, Ordering::Relaxed);
        self.tx
            .try_send(Queued {
                item,
                size,
                _bytes: permit,
            })
            .map_err(|e| {
                self.budget.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(q) => TrySendError::Full(q.item),
                    mpsc::error::TrySendError::Closed(q) => TrySendError::Closed(q.item),
                }
            })
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        self.budget.queued_bytes.load(Ordering::Relaxed)
    }

    /// Whether the receiving end is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<T> BoundedReceiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let queued = self.rx.recv().await?;
        self.budget
            .queued_bytes
            .fetch_sub(queued.size, Ordering::Relaxed);
        Some(queued.item)
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        self.budget.queued_bytes.load(Ordering::Relaxed)
    }

    /// Whether every sender is gone (what is queued can still be received).
    pub fn is_closed(&self) -> bool {
        self.rx.is_closed()
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
        assert_eq!(rx.len(), 2);
        // A batch larger than the whole budget still goes, alone.
        let (tx, mut rx) = pipe(100, one / 2);
        tx.send(batch(1_000)).await.expect("oversized batch");
        assert_eq!(rx.recv().await.expect("batch").batch.num_rows(), 1_000);
        drop(tx);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn try_send_refuses_when_items_or_bytes_are_full() {
        let one = batch(1_000).batch.get_array_memory_size();
        // By bytes: room for two.
        let (tx, mut rx) = pipe(100, 2 * one + one / 2);
        assert!(tx.try_send(batch(1_000)).is_ok());
        assert!(tx.try_send(batch(1_000)).is_ok());
        match tx.try_send(batch(1_000)) {
            Err(TrySendError::Full(back)) => assert_eq!(back.batch.num_rows(), 1_000),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!((tx.len(), rx.queued_bytes()), (2, 2 * one));
        rx.recv().await.expect("batch");
        assert!(tx.try_send(batch(1_000)).is_ok());
        // By items: room for one.
        let (tx, rx) = pipe(1, usize::MAX);
        assert!(tx.try_send(batch(1)).is_ok());
        assert!(matches!(tx.try_send(batch(1)), Err(TrySendError::Full(_))));
        assert_eq!(
            rx.queued_bytes(),
            batch(1).weigh(),
            "a refused item holds no bytes"
        );
        drop(rx);
        assert!(matches!(
            tx.try_send(batch(1)),
            Err(TrySendError::Closed(_))
        ));
    }
}
