//! The hand-off every source shares: decode into a [`Decoder`], flush by size or tick
//! into the pipeline channel, and count what happened once per batch.

use std::sync::Arc;

use sluice_core::{SourcePositions, StreamBatch};
use tokio::sync::mpsc;

use crate::decode::{Decoder, MessageMeta, Reason};
use crate::{Error, Result};

/// The table rejected messages land in.
pub const DEAD_LETTER_TABLE: &str = "dead_letter";

const REASONS: [Reason; 9] = [
    Reason::Oversized,
    Reason::InvalidUtf8,
    Reason::InvalidJson,
    Reason::NotAnObject,
    Reason::MissingField,
    Reason::WrongType,
    Reason::NonFiniteNumber,
    Reason::BadTimestamp,
    Reason::TooDeep,
];

/// A source's decoder plus its outlet.
#[derive(Debug)]
pub struct Emitter {
    decoder: Decoder,
    out: mpsc::Sender<StreamBatch>,
    batch_rows: usize,
    component: String,
    kind: &'static str,
    dead_letter: Arc<str>,
    dead_by_reason: [u64; REASONS.len()],
    /// For replayable sources: the last offset pushed per partition.
    positions: Option<SourcePositions>,
    /// Set: every offset is recorded under this one partition, whatever the message's.
    position_key: Option<String>,
}

impl Emitter {
    /// An emitter for source `component` of `kind` (`"mqtt"`, `"http"`, …).
    pub fn new(
        decoder: Decoder,
        out: mpsc::Sender<StreamBatch>,
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
            dead_by_reason: [0; REASONS.len()],
            positions: None,
            position_key: None,
        }
    }

    /// Records each message's (partition, offset) and attaches the positions to the
    /// batches of every flush, so the lake's checkpoint knows how far this source's
    /// input is covered (Kafka, Kinesis). `start` seeds the map (restored positions).
    /// The positions ride on every batch of a flush (an `Arc`, not a copy).
    pub fn track_positions(mut self, start: SourcePositions) -> Self {
        self.positions = Some(SourcePositions {
            source: self.component.clone(),
            offsets: start.offsets,
        });
        self
    }

    /// Like [`track_positions`](Self::track_positions), but every offset is recorded
    /// under partition `key`: the MQTT source's write-ahead-log sequence numbers are
    /// one series across all topics.
    pub fn track_positions_as(mut self, start: SourcePositions, key: &str) -> Self {
        self.position_key = Some(key.to_owned());
        self.track_positions(start)
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
        let failed = self.decoder.push(payload, topic, meta);
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
        if let Some(reason) = failed
            && let Some(i) = REASONS.iter().position(|r| *r == reason)
        {
            self.dead_by_reason[i] += 1;
        }
        failed
    }

    /// Whether a batch is full and should be flushed now.
    pub fn is_full(&self) -> bool {
        self.decoder.rows() + self.decoder.dead_rows() >= self.batch_rows
    }

    /// Whether anything is buffered.
    pub fn is_empty(&self) -> bool {
        self.decoder.rows() + self.decoder.dead_rows() == 0
    }

    /// Hands buffered rows and dead letters to the pipeline (waiting if it is full).
    pub async fn flush(&mut self) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let decoded = self.decoder.flush();
        let labels = [
            ("component", self.component.clone()),
            ("kind", self.kind.to_owned()),
        ];
        let rows = decoded.rows.as_ref().map_or(0, |b| b.num_rows()) as u64;
        let dead = decoded.dead_letters.as_ref().map_or(0, |b| b.num_rows()) as u64;
        metrics::counter!("sluice_source_events_received_total", &labels).increment(rows + dead);
        metrics::counter!("sluice_source_events_decoded_total", &labels).increment(rows);
        for (reason, count) in REASONS.iter().zip(&mut self.dead_by_reason) {
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
        for batch in batches {
            self.out
                .send(batch)
                .await
                .map_err(|_| Error::PipelineClosed)?;
        }
        Ok(())
    }
}
