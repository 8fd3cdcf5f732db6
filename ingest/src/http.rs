//! HTTP ingest: `POST /api/ingest/<stream>` with one JSON object per line.
//!
//! The axum handler lives with the rest of the HTTP API in the binary; it hands each
//! body to [`HttpIngest::ingest`]. Each stream has one task that owns its [`Emitter`],
//! so request handlers never share a decoder, and batches flush by size or tick like
//! every other source. The same decode and dead-letter rules apply as for MQTT.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use sluice_core::{Clock, Shutdown, StreamBatch, StreamSchema};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::Result;
use crate::decode::{DecodeLimits, Decoder, MessageMeta};
use crate::emit::Emitter;

/// What became of one request's lines.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct IngestReport {
    /// Lines decoded into the stream.
    pub accepted: u64,
    /// Lines sent to `dead_letter`.
    pub dead_lettered: u64,
    /// Dead-letter counts by reason.
    pub reasons: BTreeMap<&'static str, u64>,
}

/// Why a body was not taken at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    /// No such stream is declared.
    #[error("unknown stream {0:?}")]
    UnknownStream(String),
    /// The service is shutting down.
    #[error("the service is shutting down")]
    Closed,
}

struct Request {
    body: Bytes,
    reply: oneshot::Sender<IngestReport>,
}

/// Handle for feeding HTTP bodies into streams.
#[derive(Debug, Clone, Default)]
pub struct HttpIngest {
    streams: Arc<HashMap<String, mpsc::Sender<Request>>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("bytes", &self.body.len())
            .finish()
    }
}

/// Settings shared by every HTTP stream task.
#[derive(Debug, Clone)]
pub struct HttpIngestOptions {
    /// Decode limits.
    pub limits: DecodeLimits,
    /// Rows per batch.
    pub batch_rows: usize,
    /// Flush tick.
    pub flush_interval: Duration,
}

impl HttpIngest {
    /// Starts one task per stream; they stop at `shutdown` after flushing.
    pub fn spawn(
        streams: Vec<(String, StreamSchema)>,
        options: &HttpIngestOptions,
        out: mpsc::Sender<StreamBatch>,
        clock: Arc<dyn Clock>,
        shutdown: Shutdown,
    ) -> (Self, Vec<JoinHandle<Result<()>>>) {
        let mut senders = HashMap::new();
        let mut tasks = Vec::new();
        for (stream, schema) in streams {
            let (tx, rx) = mpsc::channel(64);
            let decoder = Decoder::new(schema, &stream, "http", None, options.limits);
            let emitter = Emitter::new(
                decoder,
                out.clone(),
                options.batch_rows,
                &format!("http:{stream}"),
                "http",
            );
            tasks.push(tokio::spawn(run(
                emitter,
                rx,
                options.flush_interval,
                clock.clone(),
                shutdown.clone(),
            )));
            senders.insert(stream, tx);
        }
        (
            Self {
                streams: Arc::new(senders),
            },
            tasks,
        )
    }

    /// Decodes `body` (JSON lines) into `stream`.
    pub async fn ingest(&self, stream: &str, body: Bytes) -> Result<IngestReport, IngestError> {
        let sender = self
            .streams
            .get(stream)
            .ok_or_else(|| IngestError::UnknownStream(stream.to_owned()))?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(Request { body, reply })
            .await
            .map_err(|_| IngestError::Closed)?;
        answer.await.map_err(|_| IngestError::Closed)
    }
}

async fn run(
    mut emitter: Emitter,
    mut requests: mpsc::Receiver<Request>,
    flush_interval: Duration,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
) -> Result<()> {
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence: u64 = 0;
    let mut offset = itoa::Buffer::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = tick.tick() => emitter.flush().await?,
            request = requests.recv() => {
                let Some(Request { body, reply }) = request else { break };
                let mut report = IngestReport::default();
                let now = clock.now_ms();
                for line in body.split(|b| *b == b'\n') {
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    sequence += 1;
                    let meta = MessageMeta { partition: "http", offset: offset.format(sequence), ingest_time_ms: now, hops: 0 };
                    match emitter.push(line, "", &meta) {
                        None => report.accepted += 1,
                        Some(reason) => {
                            report.dead_lettered += 1;
                            *report.reasons.entry(reason.code()).or_default() += 1;
                        }
                    }
                    if emitter.is_full() {
                        emitter.flush().await?;
                    }
                }
                // The client may have gone; its rows are kept either way.
                let _ = reply.send(report);
            }
        }
    }
    emitter.flush().await
}
