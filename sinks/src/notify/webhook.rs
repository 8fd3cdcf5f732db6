//! Webhook notifier: HTTP POST of each notification's JSON.
//!
//! Headers: `Content-Type: application/json`, `X-Sluice-Alert-Id`, and with a secret
//! `X-Sluice-Signature: sha256=<hex HMAC-SHA256(secret, body)>` so the receiver can
//! check the body came from us. Any 2xx is a delivery; anything else, a timeout or a
//! connection error is a failure for the retry loop.

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use sluice_config::WebhookNotifierConfig;
use sluice_core::Notification;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-sluice-signature";

/// A webhook endpoint.
pub(crate) struct WebhookTarget {
    client: Client<Https, Full<Bytes>>,
    url: hyper::Uri,
    secret: Option<Vec<u8>>,
    timeout: Duration,
}

impl WebhookTarget {
    pub(crate) fn new(config: &WebhookNotifierConfig) -> Result<Self, String> {
        let url: hyper::Uri = config
            .url
            .parse()
            .map_err(|e| format!("url {:?}: {e}", config.url))?;
        let secret = match &config.secret_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| format!("secret_env: ${var} is not set"))?
                    .into_bytes(),
            ),
            None => None,
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            url,
            secret,
            timeout: config.timeout.0,
        })
    }

    pub(crate) async fn deliver(&self, n: &Notification) -> Result<(), String> {
        let body = serde_json::to_vec(&n.fields).map_err(|e| e.to_string())?;
        let mut request = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(serde_json::Value::String(id)) = n.fields.get("alert_id") {
            request = request.header("x-sluice-alert-id", id.as_str());
        }
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, &body));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("HTTP {}", response.status())),
        }
    }
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2.
    #[test]
    fn signature_matches_rfc_4231() {
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
