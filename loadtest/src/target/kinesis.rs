//! Kinesis target (`kinesis://STREAM?endpoint=URL&region=REGION`): PutRecords in
//! batches of up to 500 records (and under the 5 MB request limit), partition key = the
//! device or user id. Records the service rejects inside a successful response
//! (throttling, internal errors) are retried with backoff, up to a budget; the ack is
//! the PutRecords response that accepted the record.

use std::sync::Arc;
use std::time::Duration;

use super::batch::Batcher;
use crate::stats::Stats;
use crate::workload::Message;
use anyhow::{Context, bail};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

/// Records per PutRecords call (the API's limit).
const MAX_RECORDS: usize = 500;
/// Bytes per PutRecords call, under the API's 5 MB limit.
const MAX_BYTES: usize = 4 << 20;
/// Attempts per record before it counts as an error.
const ATTEMPTS: u32 = 8;

/// Where a `kinesis://` URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisUrl {
    /// Stream name or ARN.
    pub stream: String,
    /// Endpoint override (local servers).
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`, or the SDK's from the environment).
    pub region: Option<String>,
}

/// Parses `kinesis://STREAM[?endpoint=URL][&region=R]`.
pub fn parse_kinesis_url(url: &str) -> anyhow::Result<KinesisUrl> {
    let rest = url
        .strip_prefix("kinesis://")
        .with_context(|| format!("{url:?} does not start with kinesis://"))?;
    let (stream, query) = rest.split_once('?').unwrap_or((rest, ""));
    if stream.is_empty() {
        bail!("{url:?}: expected kinesis://STREAM?endpoint=URL");
    }
    let mut parsed = KinesisUrl {
        stream: stream.to_owned(),
        endpoint: None,
        region: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("endpoint", v)) => parsed.endpoint = Some(v.to_owned()),
            Some(("region", v)) => parsed.region = Some(v.to_owned()),
            _ => bail!("{url:?}: unknown parameter {pair:?} (expected endpoint=, region=)"),
        }
    }
    Ok(parsed)
}

/// A Kinesis client for `target` (the same construction as the Kinesis source's).
pub async fn kinesis_client(target: &KinesisUrl) -> Client {
    sluice_ingest::kinesis::kinesis_client(target.endpoint.as_deref(), target.region.as_deref())
        .await
}

/// Batches records into PutRecords calls.
#[derive(Debug)]
pub struct KinesisTarget {
    client: Client,
    url: KinesisUrl,
    batches: Batcher<PutRecordsRequestEntry>,
}

impl KinesisTarget {
    /// Checks the stream exists and is reachable.
    pub async fn connect(url: &str, connections: usize, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let parsed = parse_kinesis_url(url)?;
        let client = kinesis_client(&parsed).await;
        let describe = client.describe_stream_summary();
        let describe = if parsed.stream.starts_with("arn:") {
            describe.stream_arn(&parsed.stream)
        } else {
            describe.stream_name(&parsed.stream)
        };
        match tokio::time::timeout(Duration::from_secs(15), describe.send()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!(
                "cannot connect to {url}: {}",
                aws_sdk_kinesis::error::DisplayErrorContext(e)
            ),
            Err(_) => bail!("cannot connect to {url}: no answer within 15 s"),
        }
        Ok(Self {
            client,
            url: parsed,
            batches: Batcher::new(MAX_RECORDS, MAX_BYTES, connections, stats),
        })
    }

    /// Adds the record to the batch; sends the batch when it is due.
    pub async fn send(&mut self, msg: &Message, due_us: u64) -> anyhow::Result<()> {
        let key = if msg.key.is_empty() {
            "-"
        } else {
            msg.key.as_str()
        };
        let bytes = msg.payload.len() + key.len();
        let entry = PutRecordsRequestEntry::builder()
            .data(Blob::new(msg.payload.clone()))
            .partition_key(key)
            .build()
            .context("kinesis record")?;
        if self.batches.would_overflow(bytes) {
            self.flush().await?;
        }
        if self.batches.push(entry, bytes, due_us) {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends the current batch as one PutRecords call (plus retries).
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let client = self.client.clone();
        let url = self.url.clone();
        self.batches
            .flush(|entries, dues, stats| async move {
                let batch = entries.into_iter().zip(dues).collect();
                put_with_retries(&client, &url, batch, &stats).await;
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

/// PutRecords, then again for the records that failed, with exponential backoff and
/// jitter, until all are in or the attempts run out.
async fn put_with_retries(
    client: &Client,
    url: &KinesisUrl,
    mut batch: Vec<(PutRecordsRequestEntry, u64)>,
    stats: &Stats,
) {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=ATTEMPTS {
        let request = client
            .put_records()
            .set_records(Some(batch.iter().map(|(e, _)| e.clone()).collect()));
        let request = if url.stream.starts_with("arn:") {
            request.stream_arn(&url.stream)
        } else {
            request.stream_name(&url.stream)
        };
        match request.send().await {
            Ok(output) => {
                let mut failed = Vec::new();
                for ((entry, due), result) in batch.into_iter().zip(output.records()) {
                    if result.error_code().is_some() {
                        failed.push((entry, due));
                    } else {
                        stats.acked(due);
                    }
                }
                if failed.is_empty() {
                    return;
                }
                batch = failed;
            }
            Err(e) => {
                if attempt == 1 {
                    tracing::warn!(error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "PutRecords failed; retrying");
                }
            }
        }
        // Jitter from the clock's nanoseconds: enough to spread retries apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = backoff.mul_f64(f64::from(nanos) / 1e9);
        tokio::time::sleep(backoff / 2 + jitter / 2).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    tracing::warn!(
        records = batch.len(),
        "PutRecords gave up after {ATTEMPTS} attempts"
    );
    stats.errors(batch.len() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_stream_endpoint_and_region() {
        assert_eq!(
            parse_kinesis_url(
                "kinesis://telemetry?endpoint=http://127.0.0.1:4567&region=eu-west-1"
            )
            .unwrap(),
            KinesisUrl {
                stream: "telemetry".into(),
                endpoint: Some("http://127.0.0.1:4567".into()),
                region: Some("eu-west-1".into()),
            }
        );
        assert_eq!(parse_kinesis_url("kinesis://s").unwrap().endpoint, None);
        assert!(parse_kinesis_url("kinesis://").is_err());
        assert!(parse_kinesis_url("kinesis://s?x=1").is_err());
    }
}
