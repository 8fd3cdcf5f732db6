//! Taps: watch the record batches the lake writes to a table, live, without ever
//! slowing the lake.
//!
//! Per table, a [`tokio::sync::broadcast`] channel is created when its first reader
//! subscribes. The lake offers every batch it writes ([`Taps::offer`]); with no reader
//! anywhere that costs one atomic load. It hands what a table got to its readers once
//! per tick ([`Taps::deliver`], every 250 ms), not per batch: a source hands on a
//! batch every 10 ms, and waking every reader's task for each was most of what a tap
//! cost. A reader that falls behind loses the oldest deliveries (the channel's
//! `Lagged`), which it counts; the lake never waits for it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arrow::record_batch::RecordBatch;
use tokio::sync::broadcast;

/// How many deliveries (a tick's batches each) a tap buffers per table before its
/// slowest reader loses some: about a second of the table's rows.
pub const TAP_BUFFER: usize = 4;

/// The batches one table got in one tick, and how many the table was handed before
/// them (so a reader that lost deliveries knows how many batches it lost).
type Delivery = (u64, Arc<[RecordBatch]>);

/// A tapped table.
#[derive(Debug)]
struct Table {
    tx: broadcast::Sender<Delivery>,
    /// Batches delivered so far.
    delivered: AtomicU64,
}

/// The taps of one service, shared by the lake (which offers) and the readers.
#[derive(Debug, Default)]
pub struct Taps {
    tables: RwLock<HashMap<String, Table>>,
    /// Readers alive across all tables: zero means [`Taps::offer`] does nothing.
    readers: AtomicUsize,
    /// Batches offered since the last delivery, by table (only the lake task takes
    /// this lock, so it is never contended).
    pending: Mutex<HashMap<String, Vec<RecordBatch>>>,
    /// Batches delivered so far, all tables together: a table tapped again numbers its
    /// batches on from here, so a number never names two batches of one table.
    numbered: AtomicU64,
}

/// One reader of one table's batches; dropping it unsubscribes.
#[derive(Debug)]
pub struct TapReader {
    table: String,
    rx: broadcast::Receiver<Delivery>,
    /// The rest of the last delivery.
    queued: VecDeque<RecordBatch>,
    /// The number the next batch should have (a gap is what this reader lost).
    expected: u64,
    taps: Arc<Taps>,
}

impl Taps {
    /// No taps yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Offers a batch written to `table` to its readers, if any, with the next
    /// [`deliver`](Self::deliver); never blocks.
    pub fn offer(&self, table: &str, batch: &RecordBatch) {
        if self.readers.load(Ordering::Relaxed) == 0 {
            return;
        }
        if !self
            .tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(table)
        {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get_mut(table) {
            Some(batches) => batches.push(batch.clone()),
            None => {
                pending.insert(table.to_owned(), vec![batch.clone()]);
            }
        }
    }

    /// Hands each table's readers the batches offered since the last call.
    pub fn deliver(&self) {
        if self.readers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return;
        }
        let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
        for (table, batches) in pending {
            if let Some(t) = tables.get(&table) {
                let first = t
                    .delivered
                    .fetch_add(batches.len() as u64, Ordering::Relaxed);
                self.numbered
                    .fetch_add(batches.len() as u64, Ordering::Relaxed);
                // An error means no receiver is left on this table: nothing to do.
                let _ = t.tx.send((first, batches.into()));
            }
        }
    }

    /// Subscribes to the batches written to `table` from now on.
    pub fn subscribe(self: &Arc<Self>, table: &str) -> TapReader {
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let (rx, expected) = match tables.get(table) {
            Some(t) => (t.tx.subscribe(), t.delivered.load(Ordering::Relaxed)),
            None => {
                let (tx, rx) = broadcast::channel(TAP_BUFFER);
                let first = self.numbered.load(Ordering::Relaxed);
                let delivered = AtomicU64::new(first);
                tables.insert(table.to_owned(), Table { tx, delivered });
                (rx, first)
            }
        };
        let readers = self.readers.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("sluice_tap_readers").set(readers as f64);
        TapReader {
            table: table.to_owned(),
            rx,
            queued: VecDeque::new(),
            expected,
            taps: self.clone(),
        }
    }

    /// Readers alive across all tables.
    pub fn readers(&self) -> usize {
        self.readers.load(Ordering::Relaxed)
    }
}

/// What [`TapReader::next`] returns.
#[derive(Debug)]
pub enum Tapped {
    /// The next batch written to the table.
    Batch(RecordBatch),
    /// This reader fell behind and lost this many batches.
    Dropped(u64),
}

impl TapReader {
    /// The next batch, or how many were lost; `None` once the taps are gone.
    pub async fn next(&mut self) -> Option<Tapped> {
        loop {
            if let Some(batch) = self.queued.pop_front() {
                return Some(Tapped::Batch(batch));
            }
            match self.rx.recv().await {
                Ok((first, batches)) => {
                    let lost = first.saturating_sub(self.expected);
                    self.expected = first + batches.len() as u64;
                    self.queued.extend(batches.iter().cloned());
                    if lost > 0 {
                        metrics::counter!("sluice_tap_dropped_batches_total").increment(lost);
                        return Some(Tapped::Dropped(lost));
                    }
                }
                // The next delivery tells how many batches were lost.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The number of the batch [`next`](Self::next) returned last. Every reader of a
    /// table sees a batch under the same number, and no other batch of that table ever
    /// has it, so readers can share what they make of a batch.
    pub fn last_number(&self) -> u64 {
        self.expected.saturating_sub(self.queued.len() as u64 + 1)
    }
}

impl Drop for TapReader {
    fn drop(&mut self) {
        let readers = self.taps.readers.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("sluice_tap_readers").set(readers as f64);
        let mut tables = self.taps.tables.write().unwrap_or_else(|e| e.into_inner());
        // Forget the table once its last reader goes (this one still counts itself:
        // its receiver is dropped after this).
        if tables
            .get(&self.table)
            .is_some_and(|t| t.tx.receiver_count() <= 1)
        {
            tables.remove(&self.table);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(v: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
    }

    fn value(t: Tapped) -> i64 {
        match t {
            Tapped::Batch(b) => b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0),
            Tapped::Dropped(n) => -(n as i64),
        }
    }

    #[tokio::test]
    async fn readers_get_their_tables_batches_per_delivery_and_a_slow_one_loses_the_oldest() {
        let taps = Taps::new();
        taps.offer("t", &batch(0)); // nobody taps: nothing kept
        taps.deliver();
        let mut a = taps.subscribe("t");
        let mut other = taps.subscribe("u");
        assert_eq!(taps.readers(), 2);
        // Two batches a delivery; three deliveries more than the buffer holds.
        for d in 0..(TAP_BUFFER as i64 + 3) {
            taps.offer("t", &batch(2 * d + 1));
            taps.offer("t", &batch(2 * d + 2));
            taps.deliver();
        }
        taps.offer("u", &batch(100));
        taps.offer("x", &batch(200)); // nobody taps x
        taps.deliver();
        // The first 3 deliveries (6 batches) were overwritten: the reader is told,
        // then reads on from the 4th delivery's first batch, in order.
        assert_eq!(value(a.next().await.unwrap()), -6);
        assert_eq!(value(a.next().await.unwrap()), 7);
        assert_eq!(value(a.next().await.unwrap()), 8);
        assert_eq!(value(a.next().await.unwrap()), 9);
        assert_eq!(value(other.next().await.unwrap()), 100);
        // A reader that joins later loses nothing it never had.
        let mut late = taps.subscribe("t");
        taps.offer("t", &batch(50));
        taps.deliver();
        assert_eq!(value(late.next().await.unwrap()), 50);
        drop(late);
        drop(a);
        drop(other);
        assert_eq!(taps.readers(), 0);
        assert!(taps.tables.read().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_batch_has_one_number_for_every_reader_and_never_shares_it() {
        let taps = Taps::new();
        let (mut a, mut b) = (taps.subscribe("t"), taps.subscribe("t"));
        taps.offer("t", &batch(1));
        taps.offer("t", &batch(2));
        taps.deliver();
        let mut numbers = Vec::new();
        for reader in [&mut a, &mut b] {
            for _ in 0..2 {
                let v = value(reader.next().await.unwrap());
                numbers.push((v, reader.last_number()));
            }
        }
        assert_eq!(numbers, [(1, 0), (2, 1), (1, 0), (2, 1)]);
        // Tapped again after every reader left, the table numbers on.
        drop((a, b));
        let mut again = taps.subscribe("t");
        taps.offer("t", &batch(3));
        taps.deliver();
        assert_eq!(value(again.next().await.unwrap()), 3);
        assert_eq!(again.last_number(), 2);
    }
}
