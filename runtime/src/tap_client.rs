//! `sluice tap`: reads `GET /api/tap/{name}` of a running service and writes each row
//! as one JSON line.

use std::io::Write;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What to tap, and where.
#[derive(Debug, Clone)]
pub struct TapRequest {
    /// The service's HTTP address (`host:port`) or base URL (`http://host:port`).
    pub http: String,
    /// A stream, a function's output, a window, `alerts`, `late` or `dead_letter`.
    pub name: String,
    /// A SQL predicate over the table's columns.
    pub filter: Option<String>,
    /// The fraction of rows sent, in (0, 1].
    pub sample: Option<f64>,
    /// An API token with the `tap` scope, when the service wants one.
    pub token: Option<String>,
}

impl TapRequest {
    fn url(&self) -> String {
        let base = if self.http.contains("://") {
            self.http.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", self.http)
        };
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(filter) = &self.filter {
            query.append_pair("filter", filter);
        }
        if let Some(sample) = self.sample {
            query.append_pair("sample", &sample.to_string());
        }
        let name: String = url::form_urlencoded::byte_serialize(self.name.as_bytes()).collect();
        format!("{base}/api/tap/{name}?{}", query.finish())
    }
}

/// One server-sent event's name and data, from a block of `field: value` lines.
fn parse_event(block: &str) -> Option<(&str, String)> {
    let mut name = "message";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    (!data.is_empty()).then_some((name, data))
}

/// Taps until the service ends the stream (it stops) or the connection drops; rows go
/// to `out` as JSON lines, notes (rows lost by falling behind, filter errors) to stderr.
pub async fn tap(request: &TapRequest, out: &mut impl Write) -> anyhow::Result<()> {
    let url = request.url();
    let mut builder = hyper::Request::get(&url).header("accept", "text/event-stream");
    if let Some(token) = &request.token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let http_request = builder
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("bad tap URL {url}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(http_request)
        .await
        .with_context(|| format!("cannot reach the service at {}", request.http))?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let error = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{status}: {error}");
    }
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow!("the tap's connection failed: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let Some((name, data)) = parse_event(&block) else {
                continue;
            };
            match name {
                "rows" => {
                    let rows: Vec<serde_json::Value> = serde_json::from_str(&data)?;
                    for row in rows {
                        writeln!(out, "{row}")?;
                    }
                    out.flush()?;
                }
                "dropped" => eprintln!("tap: fell behind and lost rows: {data}"),
                "error" => eprintln!("tap: {data}"),
                _ => {}
            }
        }
    }
    eprintln!("tap: the service ended the stream");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_filter_and_sample_encoded() {
        let r = TapRequest {
            http: "127.0.0.1:8080".into(),
            name: "telemetry".into(),
            filter: Some("temperature > 80 AND status = 'ok'".into()),
            sample: Some(0.5),
            token: None,
        };
        assert_eq!(
            r.url(),
            "http://127.0.0.1:8080/api/tap/telemetry?filter=temperature+%3E+80+AND+status+%3D+%27ok%27&sample=0.5"
        );
    }

    #[test]
    fn events_are_parsed_from_their_lines() {
        assert_eq!(
            parse_event("event: rows\ndata: [{\"a\":1}]\n\n"),
            Some(("rows", "[{\"a\":1}]".to_owned()))
        );
        assert_eq!(parse_event(": keep-alive\n\n"), None);
    }
}
