//! HTTP ingest target: messages are batched into NDJSON bodies and POSTed to
//! `/api/ingest/<stream>`, with at most `connections` requests in flight. Every message
//! in a batch is acknowledged by the batch's 2xx response.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{TargetOptions, wait_for_acks};
use crate::stats::Stats;
use crate::workload::Message;

/// A small HTTP/1 client over hyper (already in the tree through axum), shared by the
/// ingest target and the query probes.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl HttpClient {
    /// A client for `base` (`http://HOST:PORT`).
    pub fn new(base: &str) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; returns the status and body.
    pub async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .context("bad request")?;
        let response = self.client.request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Longest a message waits in a batch before the batch goes out, µs.
pub(super) const LINGER_US: u64 = 5_000;

/// POSTs NDJSON batches to Sluice's HTTP ingest.
#[derive(Debug)]
pub struct HttpTarget {
    client: HttpClient,
    path: String,
    batch: usize,
    body: Vec<u8>,
    dues: Vec<u64>,
    permits: Arc<Semaphore>,
    requests: JoinSet<()>,
    stats: Arc<Stats>,
}

impl HttpTarget {
    /// Checks `/health` answers, so an unreachable service fails here.
    pub async fn connect(options: &TargetOptions, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let client = HttpClient::new(&options.url);
        match client
            .request(hyper::Method::GET, "/health", "text/plain", Bytes::new())
            .await
        {
            Ok((200, _)) => {}
            Ok((status, body)) => bail!(
                "{}/health answered {status}: {}",
                client.base(),
                String::from_utf8_lossy(&body)
            ),
            Err(e) => bail!("cannot connect to {}: {e:#}", client.base()),
        }
        Ok(Self {
            client,
            path: format!("/api/ingest/{}", options.stream),
            batch: options.batch.max(1),
            body: Vec::new(),
            dues: Vec::new(),
            permits: Arc::new(Semaphore::new(options.connections.max(1))),
            requests: JoinSet::new(),
            stats,
        })
    }

    /// Adds the message to the current batch; sends the batch when it is full or its
    /// oldest message has waited [`LINGER_US`].
    pub async fn send(&mut self, msg: &Message, due_us: u64) -> anyhow::Result<()> {
        self.body.extend_from_slice(&msg.payload);
        self.body.push(b'\n');
        self.dues.push(due_us);
        if self.dues.len() >= self.batch
            || self.stats.now_us().saturating_sub(self.dues[0]) >= LINGER_US
        {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends the current batch, waiting for a free request slot.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if self.dues.is_empty() {
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
        let body = Bytes::from(std::mem::take(&mut self.body));
        let dues = std::mem::take(&mut self.dues);
        let client = self.client.clone();
        let path = self.path.clone();
        let stats = self.stats.clone();
        self.requests.spawn(async move {
            let _permit = permit;
            match client
                .request(hyper::Method::POST, &path, "application/x-ndjson", body)
                .await
            {
                Ok((status, _)) if (200..300).contains(&status) => {
                    for due in dues {
                        stats.acked(due);
                    }
                }
                Ok((status, body)) => {
                    tracing::warn!(status, body = %String::from_utf8_lossy(&body), "ingest request failed");
                    stats.errors(dues.len() as u64);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ingest request failed");
                    stats.errors(dues.len() as u64);
                }
            }
        });
        // Reap finished requests so the set does not grow over a long run.
        while self.requests.try_join_next().is_some() {}
        Ok(())
    }

    /// Sends the last batch and waits for the responses.
    pub async fn finish(mut self, timeout: Duration) -> anyhow::Result<()> {
        self.flush().await?;
        wait_for_acks(&self.stats, timeout).await;
        self.requests.abort_all();
        Ok(())
    }
}
