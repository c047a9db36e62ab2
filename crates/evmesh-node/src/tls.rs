//! TLS on the node's gRPC listener: rustls with the ring provider (the only one
//! compiled in), a certificate chain and key from PEM files, and, for mTLS, a CA
//! that every client certificate must chain to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use tokio_rustls::rustls::ServerConfig;

/// Where the node's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With it, mTLS: a client must present a certificate this CA signed and that
    /// has not expired, or the handshake fails.
    pub client_ca: Option<PathBuf>,
}

/// A TLS file the node cannot use, named with its flag.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {}: {message}", .path.display())]
pub struct TlsError {
    pub flag: &'static str,
    pub path: PathBuf,
    pub message: String,
}

const CERT: &str = "--tls-cert";
const KEY: &str = "--tls-key";
const CLIENT_CA: &str = "--tls-client-ca";

fn error(flag: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError {
        flag,
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The crypto provider the node and its clients use: ring, as the rest of the
/// dependency tree.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default provider, for the TLS clients that do not take
/// one explicitly (tonic's). Call once at start; later calls do nothing.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error(flag, path, pem_error(&e)))?;
    if certs.is_empty() {
        return Err(error(
            flag,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => "holds no PEM item of the kind needed".into(),
        other => format!("is not valid PEM: {other:?}"),
    }
}

/// The server's TLS configuration from `files`, each problem naming its file.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certificates(CERT, &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        let message = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (-----BEGIN PRIVATE KEY-----)".into()
            }
            e => pem_error(&e),
        };
        error(KEY, &files.key, message)
    })?;
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(CERT, &files.cert, e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(CLIENT_CA, ca)? {
                roots.add(cert).map_err(|e| {
                    error(
                        CLIENT_CA,
                        ca,
                        format!("is not a usable CA certificate: {e}"),
                    )
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| error(CLIENT_CA, ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        error(
            KEY,
            &files.key,
            format!("does not make a TLS server with {CERT}: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
