//! The certificate a `wss://` group serves: read from its PEM files and checked when the
//! config is read (`wsd check`, `start`, `reload`), so a bad file is refused with its name and
//! the reason before anything changes; then built into the rustls `ServerConfig` that every
//! connection of the group shares.
//!
//! The private key never appears in a log line, `status` or an error: [`Identity`]'s `Debug`
//! shows the certificate's serial and expiry only.

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `wsd check` and `start` warn of a certificate that expires sooner than this.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// Why a group's certificate or key cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The certificate file holds no `CERTIFICATE` block, or a block that is not PEM.
    #[error("{}: no PEM certificate in it ({reason})", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        reason: String,
    },
    /// The first certificate is not a valid X.509 certificate.
    #[error("{}: not a valid X.509 certificate: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The key file holds no private key (PKCS#8, PKCS#1 or SEC1), or one that is not PEM.
    #[error("{}: no PEM private key in it ({reason})", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        reason: String,
    },
    /// The key is of a kind the TLS stack cannot sign with.
    #[error("{}: unsupported private key: {reason}", path.display())]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("{}: the private key does not match the certificate {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate and key were given in PEM text (a reload handing them to a worker) and
    /// are not usable.
    #[error("certificate or key not usable: {0}")]
    Pem(String),
}

/// A certificate chain and its key, checked, and the rustls configuration serving them.
#[derive(Clone)]
pub struct Identity {
    config: Arc<ServerConfig>,
    /// The files as read, PEM: what a reload hands to running workers, and what tells whether
    /// a reload changed the certificate.
    pem: Arc<Pem>,
    not_after: SystemTime,
    serial: String,
}

#[derive(PartialEq, Eq)]
struct Pem {
    chain: String,
    key: String,
}

impl PartialEq for Identity {
    fn eq(&self, other: &Identity) -> bool {
        self.pem == other.pem
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads and checks `cert` (a PEM chain, the server's certificate first) and `key`.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let pem = Pem {
            chain: read(cert)?,
            key: read(key)?,
        };
        Identity::build(pem, cert, key)
    }

    /// The same identity from PEM text, as a reload hands it to a running worker.
    pub fn from_pem(chain: &str, key: &str) -> Result<Identity, TlsError> {
        let pem = Pem {
            chain: chain.to_string(),
            key: key.to_string(),
        };
        let here = Path::new("(certificate handed over)");
        Identity::build(pem, here, here)
    }

    fn build(pem: Pem, cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
        let no_cert = |reason: String| TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(pem.chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| no_cert(e.to_string()))?;
        let Some(leaf) = chain.first() else {
            return Err(no_cert("the file has no CERTIFICATE block".into()));
        };
        let (not_after, serial) = validity(leaf).map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let key =
            PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| TlsError::NoKey {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            })?;
        // ring: built from C and assembly with the crate's own build script (no cmake), and
        // as fast as the alternative at AES-GCM, ChaCha20 and ECDSA. It offers no
        // post-quantum key exchange; browsers fall back to X25519.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth();
        let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            },
            e => TlsError::UnsupportedKey {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            },
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Identity {
            config: Arc::new(config),
            pem: Arc::new(pem),
            not_after,
            serial,
        })
    }

    /// The rustls configuration every connection of the group shares.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// The PEM text of the chain and of the key, to hand to a running worker.
    pub fn pem(&self) -> (&str, &str) {
        (&self.pem.chain, &self.pem.key)
    }

    /// When the server's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The server's certificate's serial number, in hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// How long until the certificate expires; `None` if it has.
    pub fn remaining(&self) -> Option<Duration> {
        self.not_after.duration_since(SystemTime::now()).ok()
    }

    /// A warning for the operator if the certificate expires within [`EXPIRY_WARNING`] or
    /// has expired.
    pub fn expiry_warning(&self) -> Option<String> {
        match self.remaining() {
            Some(left) if left >= EXPIRY_WARNING => None,
            Some(left) => {
                let days = left.as_secs() / 86_400;
                let when = match days {
                    0 => "within a day".to_string(),
                    1 => "in 1 day".to_string(),
                    n => format!("in {n} days"),
                };
                Some(format!(
                    "certificate (serial {}) expires {when}",
                    self.serial
                ))
            }
            None => Some(format!("certificate (serial {}) has expired", self.serial)),
        }
    }
}

/// The leaf certificate's expiry and serial.
fn validity(
    leaf: &CertificateDer<'_>,
) -> Result<(SystemTime, String), x509_parser::nom::Err<x509_parser::error::X509Error>> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)?;
    let secs = cert.validity().not_after.timestamp();
    let not_after = match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    };
    let serial = cert.tbs_certificate.raw_serial_as_string().replace(':', "");
    Ok((not_after, serial))
}
