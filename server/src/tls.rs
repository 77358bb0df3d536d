//! TLS with rustls: the certificate chain and key from PEM files, HTTP/2 and HTTP/1.1
//! offered by ALPN.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_rustls::rustls;

/// A TLS acceptor for the certificate chain and key in `cert` and `key`.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = {
        let pem = std::fs::read(cert)
            .with_context(|| format!("reading TLS certificate {}", cert.display()))?;
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing TLS certificate {}", cert.display()))?
    };
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert.display());
    }
    let key = {
        let pem =
            std::fs::read(key).with_context(|| format!("reading TLS key {}", key.display()))?;
        rustls_pemfile::private_key(&mut pem.as_slice())
            .with_context(|| format!("parsing TLS key {}", key.display()))?
            .with_context(|| format!("{} holds no PEM private key", key.display()))?
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS key does not match the certificate, or is not supported")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
