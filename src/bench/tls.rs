//! The client's TLS, for `--tls` and `wss://` URLs: rustls on the ring provider, as the
//! server's, with the buffered `ClientConnection` (the client's memory does not matter, and
//! its copies cost little beside the cipher).
//!
//! It behaves as a browser would where that sets the server's cost: TLS 1.3 (or 1.2), the
//! cipher suites in Chrome's order (AES-128-GCM first: the server follows the client's
//! order), X25519 for the key exchange, ALPN `http/1.1`. Every connection makes a full
//! handshake: session resumption is off, so `connect` measures what a server pays when all its
//! clients arrive at once after a restart, when no session can be resumed anyway.
//!
//! `--insecure` accepts any certificate and skips the check of the server's handshake
//! signature: that check is the client's cost, not the server's (the server signs either way),
//! and the client must stay cheaper than what it measures. Without it, the server's chain is
//! verified against the system's roots (`SSL_CERT_FILE`, or Debian's bundle).

use super::BenchError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

/// Where the system's trusted roots are when `SSL_CERT_FILE` does not say.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What every TLS connection of a run shares.
#[derive(Clone, Debug)]
pub struct Client {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Client {
    /// The client for a server at `host` (a name or an address).
    pub fn new(host: &str, insecure: bool) -> Result<Client, BenchError> {
        let provider = Arc::new(browser_provider());
        let bad = |why: String| BenchError::Tls(why);
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| bad(e.to_string()))?;
        let mut config = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            builder
                .with_root_certificates(system_roots()?)
                .with_no_client_auth()
        };
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| bad(format!("{host} is no server name: {e}")))?;
        Ok(Client {
            config: Arc::new(config),
            name,
        })
    }

    /// A new connection's TLS state; its ClientHello waits to be written.
    pub fn connect(&self) -> Result<ClientConnection, rustls::Error> {
        let mut conn = ClientConnection::new(self.config.clone(), self.name.clone())?;
        // A closed loop bounds what is queued; rustls's default cap (64 KiB) would make a deep
        // echo's writes partial.
        conn.set_buffer_limit(None);
        Ok(conn)
    }
}

/// What a connection agreed on, as the report shows it: `TLSv1_3 TLS13_AES_128_GCM_SHA256`.
pub fn describe(conn: &ClientConnection) -> String {
    let version = conn
        .protocol_version()
        .map_or_else(|| "?".into(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "?".into(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or_else(|| "?".into(), |g| format!("{:?}", g.name()));
    format!("{version} {suite} {group}")
}

/// ring's suites in the order Chrome offers them (AES-128-GCM, AES-256-GCM, ChaCha20), and
/// X25519 first.
/// (ring's provider is deprecated for its lack of post-quantum key exchange; the server's is
/// ring too, and browsers fall back to X25519 with it.)
#[allow(deprecated)]
fn browser_provider() -> CryptoProvider {
    use ring::cipher_suite::*;
    use ring::default_provider;
    use ring::kx_group;
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        // ring's own order puts P-384 first; browsers send an X25519 key share.
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..default_provider()
    }
}

/// The roots in `SSL_CERT_FILE`, or in the system's bundle.
fn system_roots() -> Result<rustls::RootCertStore, BenchError> {
    let path = std::env::var("SSL_CERT_FILE").unwrap_or_else(|_| SYSTEM_ROOTS.into());
    let why =
        |e: String| BenchError::Tls(format!("trusted roots from {path}: {e} (or --insecure)"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path).map_err(|e| why(e.to_string()))? {
        let cert = cert.map_err(|e| why(e.to_string()))?;
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(why("no certificate in it".into()));
    }
    Ok(roots)
}

/// `--insecure`: every certificate and handshake signature is taken as it is.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
