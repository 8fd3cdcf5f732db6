//! Event-time progress of one window's input.
//!
//! The watermark is the minimum, over source partitions, of (the largest event time
//! seen − `max_out_of_orderness`). A partition that has sent nothing for `idle_timeout`
//! (by the [`Clock`](sluice_core::Clock) the caller reads `now_ms` from) stops holding it
//! back; when every partition is idle the furthest one counts. The watermark never goes
//! back. A partition is the `_source` column's value: one per MQTT source, one for HTTP
//! ingest, one per file; with [`WatermarkSpec::by_partition`] it is the `_source` and
//! `_partition` values together (a Kafka partition, a Kinesis shard). With
//! [`WatermarkSpec::row_sources`] each row's `_source` counts, not the batch's first
//! (a repartitioned stream's rows name their origins). A partition read
//! to its end (a Kinesis parent shard after a split or merge) is retired: it stops
//! holding the watermark back at once, not after `idle_timeout`; one at rest (an
//! origin whose node stopped cleanly) stops too, until its rows come again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How a stream's event time may lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkSpec {
    /// How far behind the newest event an event may arrive and still be on time.
    pub max_out_of_orderness_ms: i64,
    /// After this long without events a partition stops holding the watermark back.
    pub idle_timeout_ms: Option<i64>,
    /// Track each (`_source`, `_partition`) apart: for streams fed by Kafka or Kinesis,
    /// whose partitions are read at different speeds. Otherwise `_source` alone (an
    /// MQTT source's `_partition` is the topic: one per device).
    pub by_partition: bool,
    /// `_source` names each row's origin, not the batch's source: a repartitioned
    /// stream (`[cluster.repartition]`), where each node that received rows counts as
    /// a partition of its own, so that a node that stopped publishing (a crash) holds
    /// the watermark back until it is back or idle, and its rows are not late.
    pub row_sources: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Partition {
    max_event_ms: i64,
    last_seen_ms: i64,
}

/// The watermark tracker.
#[derive(Debug, Clone)]
pub(crate) struct Watermark {
    spec: WatermarkSpec,
    partitions: HashMap<Arc<str>, Partition>,
    /// Partitions read to their end. Not in snapshots: every batch's positions name
    /// them again, and the window retires them before it observes the batch.
    ended: HashSet<Arc<str>>,
    current: i64,
    /// Restored from a checkpoint: the time the service was down is not idleness,
    /// so the next `advance` starts every partition's idle clock afresh.
    restarted: bool,
}

/// What a snapshot keeps of the tracker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WatermarkState {
    partitions: Vec<(String, i64, i64)>,
    current: i64,
}

impl Watermark {
    pub(crate) fn new(spec: WatermarkSpec) -> Self {
        Self {
            spec,
            partitions: HashMap::new(),
            ended: HashSet::new(),
            current: i64::MIN,
            restarted: false,
        }
    }

    /// The current watermark; `i64::MIN` before any event.
    pub(crate) fn current(&self) -> i64 {
        self.current
    }

    /// Records that `partition` sent events up to `max_event_ms` at `now_ms`.
    pub(crate) fn observe(&mut self, partition: &str, max_event_ms: i64, now_ms: i64) {
        if !self.ended.is_empty() && self.ended.contains(partition) {
            return;
        }
        match self.partitions.get_mut(partition) {
            Some(p) => {
                p.max_event_ms = p.max_event_ms.max(max_event_ms);
                p.last_seen_ms = now_ms;
            }
            None => {
                self.partitions.insert(
                    Arc::from(partition),
                    Partition {
                        max_event_ms,
                        last_seen_ms: now_ms,
                    },
                );
            }
        }
    }

    /// Makes `partition` known before its first event, so it holds the watermark back
    /// (until it sends, or idles out) instead of being ignored while unseen.
    pub(crate) fn announce(&mut self, partition: &str, now_ms: i64) {
        if !self.partitions.contains_key(partition) && !self.ended.contains(partition) {
            self.partitions.insert(
                Arc::from(partition),
                Partition {
                    max_event_ms: i64::MIN,
                    last_seen_ms: now_ms,
                },
            );
        }
    }

    /// `partition` was read to its end: it no longer holds the watermark back, and its
    /// rows still to come (in the batch that ended it) do not bring it back.
    pub(crate) fn retire(&mut self, partition: &str) {
        if !self.ended.contains(partition) {
            self.partitions.remove(partition);
            self.ended.insert(Arc::from(partition));
        }
    }

    /// `partition` is away and has nothing more to send until it comes back (an
    /// origin that said goodbye): it stops holding the watermark back, and its next
    /// rows count it again.
    pub(crate) fn rest(&mut self, partition: &str) {
        self.partitions.remove(partition);
    }

    /// Recomputes the watermark at `now_ms`; returns it.
    pub(crate) fn advance(&mut self, now_ms: i64) -> i64 {
        if std::mem::take(&mut self.restarted) {
            for p in self.partitions.values_mut() {
                p.last_seen_ms = now_ms;
            }
        }
        let idle = |p: &Partition| {
            self.spec
                .idle_timeout_ms
                .is_some_and(|t| now_ms.saturating_sub(p.last_seen_ms) >= t)
        };
        let active = self
            .partitions
            .values()
            .filter(|p| !idle(p))
            .map(|p| p.max_event_ms)
            .min();
        let candidate = active.or_else(|| self.partitions.values().map(|p| p.max_event_ms).max());
        if let Some(max) = candidate {
            let mark = max.saturating_sub(self.spec.max_out_of_orderness_ms);
            self.current = self.current.max(mark);
        }
        self.current
    }

    /// End of input: everything is on time no more.
    pub(crate) fn finish(&mut self) {
        self.current = i64::MAX;
    }

    pub(crate) fn state(&self) -> WatermarkState {
        let mut partitions: Vec<_> = self
            .partitions
            .iter()
            .map(|(k, p)| (k.to_string(), p.max_event_ms, p.last_seen_ms))
            .collect();
        partitions.sort();
        WatermarkState {
            partitions,
            current: self.current,
        }
    }

    pub(crate) fn restore(&mut self, state: WatermarkState) {
        self.current = state.current;
        self.restarted = true;
        self.partitions = state
            .partitions
            .into_iter()
            .map(|(k, max_event_ms, last_seen_ms)| {
                (
                    Arc::from(k),
                    Partition {
                        max_event_ms,
                        last_seen_ms,
                    },
                )
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slowest_partition_holds_back_until_idle() {
        let mut w = Watermark::new(WatermarkSpec {
            max_out_of_orderness_ms: 5,
            idle_timeout_ms: Some(100),
            by_partition: false,
            row_sources: false,
        });
        assert_eq!(w.advance(0), i64::MIN);
        w.observe("a", 1_000, 0);
        w.observe("b", 400, 0);
        assert_eq!(w.advance(10), 395);
        w.observe("a", 2_000, 150);
        // b has been idle for 150 ms ≥ 100: only a counts.
        assert_eq!(w.advance(150), 1_995);
        // b comes back behind: the watermark does not go back.
        w.observe("b", 500, 160);
        assert_eq!(w.advance(160), 1_995);
        w.finish();
        assert_eq!(w.current(), i64::MAX);
    }

    #[test]
    fn a_partition_read_to_its_end_stops_holding_back_at_once() {
        let mut w = Watermark::new(WatermarkSpec {
            max_out_of_orderness_ms: 0,
            idle_timeout_ms: Some(1_000_000),
            by_partition: true,
            row_sources: false,
        });
        w.observe("k/parent", 1_000, 0);
        w.observe("k/other", 5_000, 0);
        assert_eq!(w.advance(10), 1_000);
        // The split: the parent ends, its children are announced in its place.
        w.retire("k/parent");
        w.announce("k/child", 10);
        assert_eq!(
            w.advance(20),
            1_000,
            "the child holds back before its first row"
        );
        // The parent's last rows come in the batch that ended it: they do not bring it
        // back, nor does a later announcement.
        w.observe("k/parent", 1_100, 20);
        w.announce("k/parent", 20);
        w.observe("k/child", 4_000, 30);
        assert_eq!(w.advance(30), 4_000);
    }

    #[test]
    fn downtime_is_not_idleness() {
        let spec = WatermarkSpec {
            max_out_of_orderness_ms: 0,
            idle_timeout_ms: Some(100),
            by_partition: true,
            row_sources: false,
        };
        let mut w = Watermark::new(spec);
        w.observe("a", 1_000, 0);
        w.observe("b", 500, 0);
        let mut restored = Watermark::new(spec);
        restored.restore(w.state());
        // Restarted long after both last sent: b still holds the watermark back.
        restored.observe("a", 2_000, 10_000);
        assert_eq!(restored.advance(10_000), 500);
        assert_eq!(restored.advance(10_200), 2_000, "then b idles out as usual");
    }

    #[test]
    fn an_announced_partition_holds_back_before_its_first_event() {
        let mut w = Watermark::new(WatermarkSpec {
            max_out_of_orderness_ms: 5,
            idle_timeout_ms: Some(100),
            by_partition: true,
            row_sources: false,
        });
        w.announce("k/1", 0);
        w.observe("k/0", 1_000, 0);
        assert_eq!(w.advance(10), i64::MIN, "k/1 has not sent yet");
        w.observe("k/1", 600, 20);
        w.announce("k/1", 30);
        assert_eq!(
            w.advance(30),
            595,
            "announcing a known partition changes nothing"
        );
    }
}
