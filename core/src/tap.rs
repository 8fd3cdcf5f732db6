//! Taps: watch the record batches the lake writes to a table, live, without ever
//! slowing the lake.
//!
//! Per table, a [`tokio::sync::broadcast`] channel is created when its first reader
//! subscribes. The lake offers every batch it writes ([`Taps::offer`]); with no reader
//! anywhere that costs one atomic load. A reader that falls behind loses the oldest
//! batches (the channel's `Lagged`), which it counts; the lake never waits for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use arrow::record_batch::RecordBatch;
use tokio::sync::broadcast;

/// How many batches a tap buffers per table before its slowest reader loses some.
pub const TAP_BUFFER: usize = 64;

/// The taps of one service, shared by the lake (which offers) and the readers.
#[derive(Debug, Default)]
pub struct Taps {
    tables: RwLock<HashMap<String, broadcast::Sender<RecordBatch>>>,
    /// Readers alive across all tables: zero means [`Taps::offer`] does nothing.
    readers: AtomicUsize,
}

/// One reader of one table's batches; dropping it unsubscribes.
#[derive(Debug)]
pub struct TapReader {
    table: String,
    rx: broadcast::Receiver<RecordBatch>,
    taps: Arc<Taps>,
}

impl Taps {
    /// No taps yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Offers a batch written to `table` to its readers, if any; never blocks.
    pub fn offer(&self, table: &str, batch: &RecordBatch) {
        if self.readers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tables.get(table) {
            // An error means no receiver is left on this table: nothing to do.
            let _ = tx.send(batch.clone());
        }
    }

    /// Subscribes to the batches written to `table` from now on.
    pub fn subscribe(self: &Arc<Self>, table: &str) -> TapReader {
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let rx = match tables.get(table) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(TAP_BUFFER);
                tables.insert(table.to_owned(), tx);
                rx
            }
        };
        let readers = self.readers.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("sluice_tap_readers").set(readers as f64);
        TapReader {
            table: table.to_owned(),
            rx,
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
        match self.rx.recv().await {
            Ok(batch) => Some(Tapped::Batch(batch)),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                metrics::counter!("sluice_tap_dropped_batches_total").increment(n);
                Some(Tapped::Dropped(n))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
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
            .is_some_and(|tx| tx.receiver_count() <= 1)
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
    async fn readers_get_their_tables_batches_and_a_slow_one_loses_the_oldest() {
        let taps = Taps::new();
        taps.offer("t", &batch(0)); // nobody taps: nothing kept
        let mut a = taps.subscribe("t");
        let mut other = taps.subscribe("u");
        assert_eq!(taps.readers(), 2);
        for v in 1..=(TAP_BUFFER as i64 + 3) {
            taps.offer("t", &batch(v));
        }
        taps.offer("u", &batch(100));
        // The first 3 were overwritten: the reader is told, then reads on from the 4th.
        assert_eq!(value(a.next().await.unwrap()), -3);
        assert_eq!(value(a.next().await.unwrap()), 4);
        assert_eq!(value(other.next().await.unwrap()), 100);
        drop(a);
        drop(other);
        assert_eq!(taps.readers(), 0);
        assert!(taps.tables.read().unwrap().is_empty());
    }
}
