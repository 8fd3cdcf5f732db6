//! The hand-off every source shares: decode into a [`Decoder`], flush by size or tick
//! into the pipeline channel, and count what happened once per batch.

use std::sync::Arc;

use sluice_config::{LimitConfig, LimitMode};
use sluice_core::busy::Busy;
use sluice_core::{PipeSender, Seq, SeqText, Shutdown, SourcePositions, StreamBatch};

use crate::decode::{Decoder, Failure, MessageMeta, Reason};
use crate::limit::{KeyLimit, RateLimit, Sampler};
use crate::{Error, Result};

/// The most message bytes a batch holds before it is handed on (see
/// [`Decoder::buffered_bytes`]): far under Arrow's 2 GiB per text column, and the
/// pipe's byte bound counts whole batches. Rows of a few hundred bytes fill
/// `batch_rows` long before this.
pub const BATCH_BYTES: usize = 64 << 20;

pub use sluice_core::schema::DEAD_LETTER_TABLE;

/// A source's decoder plus its outlet.
#[derive(Debug)]
pub struct Emitter {
    decoder: Decoder,
    out: PipeSender,
    batch_rows: usize,
    component: String,
    kind: &'static str,
    dead_letter: Arc<str>,
    dead_by_reason: [u64; Reason::ALL.len()],
    /// For replayable sources: the last offset pushed per partition.
    positions: Option<SourcePositions>,
    /// Set: every offset is recorded under this one partition, whatever the message's.
    position_key: Option<String>,
    /// The source-wide rate limit, with the sampling of what it sheds.
    source_limit: Option<(RateLimit, Sampler)>,
    /// Shed by the source limit since the last flush, and how many became dead letters.
    source_shed: (u64, u64),
    /// Once this fires, block-mode limits stop holding batches back.
    stop: Option<Shutdown>,
    /// Payload bytes pushed since the last flush (`sluice_source_bytes_received_total`).
    bytes: u64,
    /// Time spent waiting for room in the pipeline's queue; made at the first batch,
    /// so that a source shows in the console once it has received something, as
    /// before.
    backpressure: Option<Busy>,
}

impl Emitter {
    /// An emitter for source `component` of `kind` (`"mqtt"`, `"http"`, …).
    pub fn new(
        decoder: Decoder,
        out: PipeSender,
        batch_rows: usize,
        component: &str,
        kind: &'static str,
    ) -> Self {
        Self {
            decoder,
            out,
            batch_rows: batch_rows.max(1),
            component: component.to_owned(),
            kind,
            dead_letter: DEAD_LETTER_TABLE.into(),
            dead_by_reason: [0; Reason::ALL.len()],
            positions: None,
            position_key: None,
            source_limit: None,
            source_shed: (0, 0),
            stop: None,
            bytes: 0,
            backpressure: None,
        }
    }

    /// Block-mode limits stop holding batches back once `shutdown` fires: what the
    /// source reads while it stops is handed on at once, so a stop never waits for a
    /// limit (the lake's limit does the same).
    pub fn until(mut self, shutdown: Shutdown) -> Self {
        self.stop = Some(shutdown);
        self
    }

    /// Applies the source's rate limits (see [`crate::limit`]).
    pub fn with_limits(mut self, config: &LimitConfig) -> Self {
        self.source_limit =
            RateLimit::new(config).map(|limit| (limit, Sampler::new(config.dead_letter_sample)));
        if let Some(limit) = KeyLimit::new(config) {
            self.decoder.set_key_limit(limit, config.dead_letter_sample);
        }
        self
    }

    /// Records each message's (partition, offset) and attaches the positions to the
    /// batches of every flush, so the lake's checkpoint knows how far this source's
    /// input is covered (Kafka, Kinesis). `start` seeds the map (restored positions).
    /// The positions ride on every batch of a flush (an `Arc`, not a copy).
    pub fn track_positions(mut self, start: SourcePositions) -> Self {
        self.positions = Some(SourcePositions {
            source: self.component.clone(),
            offsets: start.offsets,
            origins: start.origins,
            open: Default::default(),
            log_series: false,
        });
        self
    }

    /// Like [`track_positions`](Self::track_positions), but every offset is recorded
    /// under partition `key`: the MQTT source's write-ahead-log sequence numbers are
    /// one series across all topics.
    pub fn track_positions_as(mut self, start: SourcePositions, key: &str) -> Self {
        self.position_key = Some(key.to_owned());
        let mut tracked = self.track_positions(start);
        if let Some(positions) = &mut tracked.positions {
            positions.log_series = true;
        }
        tracked
    }

    /// Sets the partitions still to be read to their end, whoever reads them, with
    /// their parents ([`SourcePositions::open`]): the repartition topic's readers
    /// wait for each from the start, and for a parent until a child is read.
    pub fn set_open(&mut self, open: std::collections::BTreeMap<String, Vec<String>>) {
        if let Some(positions) = &mut self.positions {
            positions.open = open;
        }
    }

    /// Makes a partition known (position `""`) before its first message: it is then in
    /// every batch's positions, and windows hold their watermark back for it.
    pub fn announce(&mut self, partition: &str) {
        if let Some(positions) = &mut self.positions
            && !positions.offsets.contains_key(partition)
        {
            positions
                .offsets
                .insert(partition.to_owned(), String::new());
        }
    }

    /// Whether the record of `partition` numbered `seq` by `origin` was handed on
    /// before (an origin's replay: its sequence number is not above the last one of
    /// that origin in that partition); if not, it is recorded as the last one.
    pub fn replayed_by_origin(&mut self, partition: &str, origin: &str, seq: SeqText<'_>) -> bool {
        let Some(positions) = &mut self.positions else {
            return false;
        };
        let origins = match positions.origins.get_mut(partition) {
            Some(o) => o,
            None => positions.origins.entry(partition.to_owned()).or_default(),
        };
        match origins.get_mut(origin) {
            Some(last) => !last.advance(seq),
            None => {
                origins.insert(origin.to_owned(), seq.into());
                false
            }
        }
    }

    /// Makes `origin` known in `partition` (its greeting, before its first row), or
    /// wakes it after a goodbye, so that windows hold their watermark back for it from
    /// then on.
    pub fn meet_origin(&mut self, partition: &str, origin: &str) {
        if let Some(positions) = &mut self.positions {
            let origins = positions.origins.entry(partition.to_owned()).or_default();
            match origins.get_mut(origin) {
                Some(seq) => seq.wake(),
                None => {
                    origins.insert(origin.to_owned(), Seq::greeting());
                }
            }
        }
    }

    /// `origin` said goodbye in `partition` (it stopped cleanly, everything it sent
    /// checkpointed): windows stop waiting for it until it greets again.
    pub fn rest_origin(&mut self, partition: &str, origin: &str) {
        if let Some(positions) = &mut self.positions {
            let origins = positions.origins.entry(partition.to_owned()).or_default();
            origins
                .entry(origin.to_owned())
                .or_insert_with(Seq::greeting)
                .rest();
        }
    }

    /// Raises the last sequence numbers of `partition`'s origins to `seen` (another
    /// node's checkpoint, taking the partition over).
    pub fn raise_origins(
        &mut self,
        partition: &str,
        seen: &std::collections::BTreeMap<String, Seq>,
    ) {
        if let Some(positions) = &mut self.positions {
            let origins = positions.origins.entry(partition.to_owned()).or_default();
            SourcePositions::raise_origins(origins, seen);
        }
    }

    /// Sets a partition's position without a message (a Kinesis shard read to its end).
    pub fn set_position(&mut self, partition: &str, offset: &str) {
        if let Some(positions) = &mut self.positions {
            positions
                .offsets
                .insert(partition.to_owned(), offset.to_owned());
        }
    }

    /// Decodes one message; the failure reason, if it was dead-lettered.
    pub fn push(&mut self, payload: &[u8], topic: &str, meta: &MessageMeta<'_>) -> Option<Reason> {
        self.bytes += payload.len() as u64;
        let failed = match &mut self.source_limit {
            Some((limit, sampler)) if limit.mode == LimitMode::Shed && !limit.admit() => {
                self.source_shed.0 += 1;
                if sampler.keep() {
                    self.source_shed.1 += 1;
                    let failure = Failure::new(Reason::RateLimited, "over the source's rate limit");
                    self.decoder.dead_letter(payload, meta, failure);
                }
                Some(Reason::RateLimited)
            }
            _ => self.decoder.push(payload, topic, meta),
        };
        if let Some(positions) = &mut self.positions {
            let partition = self.position_key.as_deref().unwrap_or(meta.partition);
            match positions.offsets.get_mut(partition) {
                Some(offset) => {
                    offset.clear();
                    offset.push_str(meta.offset);
                }
                None => {
                    positions
                        .offsets
                        .insert(partition.to_owned(), meta.offset.to_owned());
                }
            }
        }
        // Shed rows (`rate_limited`) are counted as shed, by limit.
        if let Some(reason) = failed
            && reason != Reason::RateLimited
            && let Some(i) = Reason::ALL.iter().position(|r| *r == reason)
        {
            self.dead_by_reason[i] += 1;
        }
        failed
    }

    /// `sluice_limit_events_total` of one limit and outcome.
    fn limit_counter(&self, limit: &'static str, outcome: &'static str) -> metrics::Counter {
        metrics::counter!(
            "sluice_limit_events_total",
            "component" => self.component.clone(),
            "kind" => self.kind,
            "limit" => limit,
            "outcome" => outcome
        )
    }

    /// Per configured limit: what it let through and what it shed in this flush, of
    /// `total` messages of which `rows` were decoded.
    fn count_limits(&self, key_shed: u64, source_shed: u64, total: u64, rows: u64) {
        if let Some((limit, _)) = &self.source_limit {
            if limit.mode == LimitMode::Shed {
                self.limit_counter("source", "shed").increment(source_shed);
            }
            self.limit_counter("source", "allowed")
                .increment(total - source_shed);
        }
        if self.decoder.has_key_limit() {
            self.limit_counter("per_key", "shed").increment(key_shed);
            self.limit_counter("per_key", "allowed").increment(rows);
        }
    }

    /// A wait of a block-mode limit: `rows` held for `waited`.
    fn count_blocked(&self, limit: &'static str, waited: std::time::Duration, rows: u64) {
        if waited.is_zero() {
            return;
        }
        self.limit_counter(limit, "blocked").increment(rows);
        // A gauge that only grows: metrics counters are integers.
        metrics::gauge!("sluice_limit_blocked_seconds_total", "component" => self.component.clone(), "kind" => self.kind)
            .increment(waited.as_secs_f64());
    }

    /// Whether a batch should be flushed now:
    /// - it is full: `batch_rows` rows, or [`BATCH_BYTES`] of messages;
    /// - a row waits for its key's room (the wait then holds the rows before it by at
    ///   most one interval of its key, and the source stops reading until it is over);
    /// - a source limit in block mode has a burst's worth to wait for: rows are handed
    ///   on as the rate pays for them, not a whole batch after a wait of `batch_rows /
    ///   rate` (which at 10/s would hold 8,192 rows for 14 minutes, and a Kafka source
    ///   away from its poll past `max.poll.interval.ms`).
    pub fn is_full(&self) -> bool {
        let buffered = self.decoder.rows() + self.decoder.dead_rows();
        buffered >= self.batch_rows
            || self.decoder.buffered_bytes() >= BATCH_BYTES
            || self.decoder.is_held()
            || self.source_limit.as_ref().is_some_and(|(limit, _)| {
                limit.mode == LimitMode::Block && buffered >= limit.burst() as usize
            })
    }

    /// Whether anything is buffered.
    pub fn is_empty(&self) -> bool {
        self.decoder.rows() + self.decoder.dead_rows() == 0
    }

    /// Hands buffered rows and dead letters to the pipeline (waiting if it is full).
    pub async fn flush(&mut self) -> Result<()> {
        for batch in self.take().await {
            let waited = self
                .backpressure
                .get_or_insert_with(|| Busy::backpressure(&self.component, self.kind));
            self.out
                .send_timed(batch, waited)
                .await
                .map_err(|_| Error::PipelineClosed)?;
        }
        Ok(())
    }

    /// What [`flush`](Self::flush) would hand on (after any limit's wait), counted,
    /// but for the caller to send: the file source's decode workers hand theirs to a
    /// sequencer that keeps the file's order.
    pub async fn take(&mut self) -> Vec<StreamBatch> {
        let key_shed = self.decoder.take_shed();
        let source_shed = std::mem::take(&mut self.source_shed);
        let shed = key_shed.0 + source_shed.0;
        let shed_kept = key_shed.1 + source_shed.1;
        if self.is_empty() && shed == 0 {
            return Vec::new();
        }
        let decoded = self.decoder.flush();
        let labels = [
            ("component", self.component.clone()),
            ("kind", self.kind.to_owned()),
        ];
        let rows = decoded.rows.as_ref().map_or(0, |b| b.num_rows()) as u64;
        let dead = decoded.dead_letters.as_ref().map_or(0, |b| b.num_rows()) as u64;
        // Received: every message, including those shed and not kept.
        let total = rows + dead + shed - shed_kept;
        metrics::counter!("sluice_source_events_received_total", &labels).increment(total);
        metrics::counter!("sluice_source_bytes_received_total", &labels)
            .increment(std::mem::take(&mut self.bytes));
        self.count_limits(key_shed.0, source_shed.0, total, rows);
        if shed_kept > 0 {
            metrics::counter!(
                "sluice_source_events_dead_lettered_total",
                "component" => self.component.clone(),
                "kind" => self.kind,
                "reason" => Reason::RateLimited.code()
            )
            .increment(shed_kept);
        }
        if let Some((limit, _)) = &self.source_limit
            && limit.mode == LimitMode::Block
        {
            let n = u32::try_from(rows + dead).unwrap_or(u32::MAX);
            let started = std::time::Instant::now();
            unless_stopped(self.stop.as_ref(), limit.wait_for(n)).await;
            self.count_blocked("source", started.elapsed(), rows + dead);
        }
        let (held, held_rows) = self.decoder.take_held();
        if !held.is_zero() {
            let started = std::time::Instant::now();
            unless_stopped(self.stop.as_ref(), tokio::time::sleep(held)).await;
            self.count_blocked("per_key", started.elapsed(), held_rows);
        }
        metrics::counter!("sluice_source_events_decoded_total", &labels).increment(rows);
        for (reason, count) in Reason::ALL.iter().zip(&mut self.dead_by_reason) {
            if *count > 0 {
                metrics::counter!(
                    "sluice_source_events_dead_lettered_total",
                    "component" => self.component.clone(),
                    "kind" => self.kind,
                    "reason" => reason.code()
                )
                .increment(*count);
                *count = 0;
            }
        }
        let mut batches: Vec<StreamBatch> = [
            decoded
                .rows
                .map(|b| StreamBatch::new(self.decoder.stream().clone(), b)),
            decoded
                .dead_letters
                .map(|b| StreamBatch::new(self.dead_letter.clone(), b)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let Some(positions) = &self.positions {
            let positions = Arc::new(positions.clone());
            for batch in &mut batches {
                batch.positions = Some(positions.clone());
            }
        }
        batches
    }
}

/// `wait`, unless `stop` fires first.
async fn unless_stopped(stop: Option<&Shutdown>, wait: impl std::future::Future) {
    match stop {
        Some(stop) => {
            tokio::select! {
                biased;
                _ = stop.wait() => {}
                _ = wait => {}
            }
        }
        None => {
            wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_core::StreamSchema;

    use super::*;
    use crate::decode::DecodeLimits;

    fn emitter(limit: &str) -> (Emitter, sluice_core::PipeReceiver) {
        let (tx, rx) = sluice_core::pipe(64, 64 << 20);
        let decoder = Decoder::new(
            StreamSchema::builtin("telemetry").expect("builtin"),
            "telemetry",
            "test",
            None,
            DecodeLimits::default(),
        );
        let config: LimitConfig = toml::from_str(limit).expect("limit");
        let emitter = Emitter::new(decoder, tx, 1_000, "test", "mqtt").with_limits(&config);
        (emitter, rx)
    }

    fn push(emitter: &mut Emitter, device: &str) {
        let payload = format!(r#"{{"device_id":"{device}","ts":1767225600000,"temperature":1}}"#);
        let meta = MessageMeta {
            partition: "p",
            offset: "1",
            ingest_time_ms: 1_767_225_600_000,
            hops: 0,
            origin: None,
        };
        assert_eq!(emitter.push(payload.as_bytes(), "t", &meta), None);
    }

    #[test]
    fn a_batch_of_large_messages_is_full_at_its_byte_bound() {
        let (tx, _rx) = sluice_core::pipe(64, 64 << 20);
        let limits = DecodeLimits {
            max_payload: 2 << 20,
            ..DecodeLimits::default()
        };
        let schema = StreamSchema::builtin("telemetry").expect("builtin");
        let decoder = Decoder::new(schema, "telemetry", "test", None, limits);
        let mut e = Emitter::new(decoder, tx, 8_192, "test", "mqtt");
        // Messages of just over 1 MiB, each a valid row: 64 of them pass the bound.
        let device = "d".repeat(1 << 20);
        let mut pushed = 0;
        while !e.is_full() {
            push(&mut e, &device);
            pushed += 1;
            assert!(pushed <= 64, "full by 64 MiB");
        }
        assert_eq!(pushed, 64);
    }

    #[tokio::test]
    async fn a_blocking_source_limit_flushes_a_burst_at_a_time() {
        let (mut e, _rx) = emitter("rate = 1000\nburst = 3\nmode = \"block\"");
        for _ in 0..2 {
            push(&mut e, "a");
        }
        assert!(!e.is_full());
        push(&mut e, "b");
        assert!(e.is_full(), "a burst's worth");
        e.flush().await.expect("flush");
        assert!(e.is_empty());
    }

    #[tokio::test]
    async fn a_held_key_flushes_at_once_and_a_stop_ends_the_wait() {
        // 1 a second with a burst of 1: each event of a key after its first waits 1 s.
        let (e, mut rx) = emitter("per_key_rate = 1\nper_key_burst = 1\nper_key_mode = \"block\"");
        let stop = Shutdown::new();
        let mut e = e.until(stop.clone());
        push(&mut e, "a");
        push(&mut e, "b");
        assert!(!e.is_full(), "each key within its burst");
        push(&mut e, "a");
        assert!(e.is_full(), "a held row flushes at once");
        // 60 more: a minute's hold, which the stop must cut short.
        for _ in 0..60 {
            push(&mut e, "a");
        }
        let flush = tokio::spawn(async move {
            e.flush().await.expect("flush");
            e
        });
        tokio::task::yield_now().await;
        assert!(rx.is_empty(), "the batch waits for a's room");
        stop.trigger();
        let e = tokio::time::timeout(Duration::from_secs(20), flush)
            .await
            .expect("the stop ends the hold")
            .expect("flush task");
        assert!(e.is_empty());
        let batch = rx.recv().await.expect("the batch, handed on at the stop");
        assert_eq!(batch.batch.num_rows(), 63, "nothing shed");
    }

    /// The repartition topic's dedup per (partition, origin): a record not above the
    /// origin's last is a replay; Kinesis sequence numbers (past `u64`) order as
    /// numbers; a greeting does not count as a row; after a farewell nothing is new.
    #[test]
    fn replays_by_origin_are_recognised_past_u64_and_after_a_farewell() {
        let (e, _rx) = emitter("");
        let mut e = e.track_positions(SourcePositions::default());
        let seq = |s: &'static str| Seq::canonical(s).expect("a number");
        let (p, shard) = ("topic/0", "shards/shardId-000000000002");
        e.meet_origin(p, shard);
        let first = "49680873879431658369070889506337667535040979873755562018";
        let second = "49680873879431658369070889506337667535040979873755562100";
        assert!(
            !e.replayed_by_origin(p, shard, seq(first)),
            "after its greeting"
        );
        assert!(!e.replayed_by_origin(p, shard, seq(second)));
        assert!(e.replayed_by_origin(p, shard, seq(first)), "a replay");
        assert!(e.replayed_by_origin(p, shard, seq(second)), "a replay");
        assert!(
            !e.replayed_by_origin("topic/1", shard, seq(first)),
            "another partition"
        );
        e.meet_origin(p, shard);
        let end = seq(SourcePositions::END);
        assert!(!e.replayed_by_origin(p, shard, end), "its farewell");
        let tail = "49680873879431658369070889506337667535040979873755562200";
        assert!(
            e.replayed_by_origin(p, shard, seq(tail)),
            "nothing after a farewell"
        );
        assert!(
            !e.replayed_by_origin(p, "a/plant", seq("1")),
            "origins apart"
        );
    }

    /// A goodbye rests an origin (known or not) without losing its number; a greeting
    /// or a row wakes it; a farewell stays final.
    #[test]
    fn a_goodbye_rests_an_origin_until_it_greets_or_sends() {
        let (e, _rx) = emitter("");
        let mut e = e.track_positions(SourcePositions::default());
        let seq = |s: &'static str| Seq::canonical(s).expect("a number");
        let p = "topic/0";
        let last =
            |e: &Emitter, origin: &str| e.positions.as_ref().unwrap().origins[p][origin].clone();
        e.meet_origin(p, "a/plant");
        assert!(!e.replayed_by_origin(p, "a/plant", seq("5")));
        e.rest_origin(p, "a/plant");
        assert!(last(&e, "a/plant").is_resting());
        assert!(
            e.replayed_by_origin(p, "a/plant", seq("5")),
            "still a replay"
        );
        e.meet_origin(p, "a/plant");
        assert_eq!(last(&e, "a/plant"), Seq::from(5), "greeted again");
        e.rest_origin(p, "a/plant");
        assert!(!e.replayed_by_origin(p, "a/plant", seq("6")));
        assert_eq!(last(&e, "a/plant"), Seq::from(6), "a row wakes it");
        e.rest_origin(p, "b/plant");
        assert!(last(&e, "b/plant").is_resting(), "never met, resting");
        e.rest_origin(p, "a/plant");
        e.replayed_by_origin(p, "a/plant", seq(SourcePositions::END));
        e.rest_origin(p, "a/plant");
        assert!(last(&e, "a/plant").is_end());
    }
}
