//! rustls settings: the client's for `mqtts://` sources, and the server's for the
//! embedded broker's TLS listener and the HTTPS API, with a certificate re-read when
//! its files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use sluice_core::reload::Reloading;

/// A client config trusting `ca_file` (PEM) or, without one, the system's roots; with
/// `identity` (certificate chain and key files), presenting that client certificate.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| format!("ca_file {} is not PEM: {e}", path.display()))?;
                roots.add(cert).map_err(|e| {
                    format!("ca_file {} holds a bad certificate: {e}", path.display())
                })?;
            }
            if roots.is_empty() {
                return Err(format!("ca_file {} holds no certificates", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let certs = read_certs(cert_file)?;
            let key = read_key(key_file)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("{}: {e}", cert_file.display()))?
        }
    };
    Ok(Arc::new(config))
}

/// A TLS server config: the certificate and key of `cert_file` and `key_file`, re-read
/// when they change (see [`ReloadingCert`]); with a `client_ca`, client certificates
/// required and checked against it; `alpn` the protocols offered (`h2`, `http/1.1`).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(ReloadingCert::load(cert_file, key_file, provider.clone())?);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "client_ca_file {} holds a bad certificate: {e}",
                        ca.display()
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificates", path.display()));
    }
    Ok(certs)
}

/// The server's certificate and key, re-read when either file changes (checked on a
/// handshake, at most once a second; see [`Reloading`]). Open connections keep the
/// certificate they were made with: only new handshakes see the new one.
#[derive(Debug)]
pub struct ReloadingCert(Reloading<CertifiedKey>);

impl ReloadingCert {
    fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, String> {
        let load =
            Box::new(move |files: &[PathBuf]| certified_key(&files[0], &files[1], &provider));
        let files = vec![cert_file.to_owned(), key_file.to_owned()];
        Reloading::new("the TLS certificate", files, load).map(Self)
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let certs = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| format!("{} and {}: {e}", cert_file.display(), key_file.display()))
}

fn read_key(key_file: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    let pem =
        std::fs::read(key_file).map_err(|e| format!("cannot read {}: {e}", key_file.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{} is not PEM: {e}", key_file.display()))?
        .ok_or_else(|| format!("{} holds no private key", key_file.display()))
}

/// The common name of a DER client certificate's subject.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}
