//! HTTP ingest target: messages are batched into NDJSON bodies and POSTed to
//! `/api/ingest/<stream>`, with at most `connections` requests in flight. Every message
//! in a batch is acknowledged by the batch's 2xx response.

use std::sync::Arc;
use std::time::Duration;

use super::TargetOptions;
use super::batch::Batcher;
use crate::stats::Stats;
use crate::workload::Message;
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

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

/// POSTs NDJSON batches to Sluice's HTTP ingest.
#[derive(Debug)]
pub struct HttpTarget {
    client: HttpClient,
    path: String,
    batches: Batcher<Vec<u8>>,
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
            batches: Batcher::new(options.batch, 8 << 20, options.connections, stats),
        })
    }

    /// Adds the message to the current batch; sends the batch when it is due.
    pub async fn send(&mut self, msg: &Message, due_us: u64) -> anyhow::Result<()> {
        if self.batches.would_overflow(msg.payload.len() + 1) {
            self.flush().await?;
        }
        if self
            .batches
            .push(msg.payload.clone(), msg.payload.len() + 1, due_us)
        {
            self.flush().await?;
        }
        Ok(())
    }

    /// POSTs the current batch as one NDJSON body.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let client = self.client.clone();
        let path = self.path.clone();
        self.batches
            .flush(|lines, dues, stats| async move {
                let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
                for line in lines {
                    body.extend_from_slice(&line);
                    body.push(b'\n');
                }
                let result = client
                    .request(hyper::Method::POST, &path, "application/x-ndjson", body.into())
                    .await;
                match result {
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
            })
            .await
    }

    /// Sends the last batch and waits for the responses.
    pub async fn finish(mut self, timeout: Duration) -> anyhow::Result<()> {
        self.flush().await?;
        self.batches.finish(timeout).await;
        Ok(())
    }
}
