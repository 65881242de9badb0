//! TLS for the gRPC ports (rustls through tonic): PEM files are read and checked once at start,
//! so a missing or malformed file is named before anything listens or dials; server and client
//! configurations are built from what was read.
//!
//! The scheme of a URL decides whether a client uses TLS: `https://` does, `http://` does not.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("{what} {}: {error}", path.display())]
    Read {
        /// What the file should hold (e.g. `TLS certificate`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause (in the message, not as a source, so it is printed once).
        error: std::io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{what} {}: {reason}", path.display())]
    Parse {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate without its key, or a key without its certificate.
    #[error("{0}")]
    Incomplete(String),
    /// The certificate and key were refused together (e.g. they do not match).
    #[error("TLS certificate {} with key {}: {reason}", cert.display(), key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
    /// A URL to dial is malformed, or needs TLS settings that are missing.
    #[error("{url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// A PEM file's contents, read and checked once. `Debug` shows the path only.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    path: PathBuf,
    pem: Vec<u8>,
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PemFile").field(&self.path).finish()
    }
}

impl PemFile {
    fn read(what: &'static str, path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path).map_err(|error| TlsError::Read {
            what,
            path: path.to_path_buf(),
            error,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            pem,
        })
    }

    fn parse_error(&self, what: &'static str, reason: String) -> TlsError {
        TlsError::Parse {
            what,
            path: self.path.clone(),
            reason,
        }
    }

    /// Reads one or more PEM `CERTIFICATE` blocks (a certificate chain, or CA certificates).
    pub fn certificates(what: &'static str, path: &Path) -> Result<Self, TlsError> {
        let file = Self::read(what, path)?;
        let certs = CertificateDer::pem_slice_iter(&file.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file.parse_error(what, format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(file.parse_error(what, "no PEM CERTIFICATE block in it".into()));
        }
        Ok(file)
    }

    /// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn private_key(what: &'static str, path: &Path) -> Result<Self, TlsError> {
        let file = Self::read(what, path)?;
        PrivateKeyDer::from_pem_slice(&file.pem).map_err(|e| {
            file.parse_error(
                what,
                format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"),
            )
        })?;
        Ok(file)
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn certificate(&self) -> Certificate {
        Certificate::from_pem(&self.pem)
    }
}

/// A certificate chain and its private key: what a server presents, and a client when the
/// server asks for a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPair {
    /// The certificate chain, leaf first.
    pub cert: PemFile,
    /// Its private key.
    pub key: PemFile,
}

impl KeyPair {
    /// Reads both files, or neither when both are `None`; `cert_name` and `key_name` name the
    /// settings in the error for one without the other.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        cert_name: &str,
        key_name: &str,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: PemFile::certificates("TLS certificate", cert)?,
                key: PemFile::private_key("TLS private key", key)?,
            })),
            (Some(_), None) => Err(TlsError::Incomplete(format!(
                "{cert_name} is set but {key_name} is not: give both or neither"
            ))),
            (None, Some(_)) => Err(TlsError::Incomplete(format!(
                "{key_name} is set but {cert_name} is not: give both or neither"
            ))),
        }
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert.pem, &self.key.pem)
    }

    fn refused(&self, error: &dyn std::error::Error) -> TlsError {
        TlsError::Identity {
            cert: self.cert.path.clone(),
            key: self.key.path.clone(),
            reason: error_chain(error),
        }
    }
}

/// `server` serving TLS with `identity`; with `client_ca`, every client must present a
/// certificate it signed (mutual TLS), otherwise the handshake fails.
pub fn serve_tls<L>(
    server: Server<L>,
    identity: &KeyPair,
    client_ca: Option<&PemFile>,
) -> Result<Server<L>, TlsError> {
    let mut config = ServerTlsConfig::new()
        .identity(identity.identity())
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(ca.certificate());
    }
    server.tls_config(config).map_err(|e| identity.refused(&e))
}

/// A process's TLS material: the CA it trusts to have signed the servers it dials, and its own
/// certificate, served on its port where it has one and presented to servers that ask for a
/// client certificate. Without a CA it can dial `http://` URLs only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// The CA certificate(s) that server certificates must chain to.
    pub ca: Option<PemFile>,
    /// This process's certificate and key.
    pub identity: Option<KeyPair>,
}

impl TlsSettings {
    /// Reads the files given; `names` are the settings (flags) of the certificate and the key,
    /// for the error when one comes without the other.
    pub fn load(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        names: [&str; 2],
    ) -> Result<Self, TlsError> {
        let ca = match ca {
            Some(path) => Some(PemFile::certificates("TLS CA certificate", path)?),
            None => None,
        };
        let identity = KeyPair::load(cert, key, names[0], names[1])?;
        Ok(Self { ca, identity })
    }

    /// Whether any TLS material is configured.
    pub fn is_configured(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// An endpoint for `url`, with TLS when its scheme is `https`. An `https` URL needs a CA.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let bad = |reason: String| TlsError::Url {
            url: url.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad(format!("not a valid URL: {}", error_chain(&e))))?;
        if endpoint.uri().scheme_str() != Some("https") {
            return Ok(endpoint);
        }
        let Some(ca) = &self.ca else {
            return Err(bad(
                "is an https:// URL but no CA certificate was given to verify the server".into(),
            ));
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(ca.certificate())
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(identity) = &self.identity {
            config = config.identity(identity.identity());
        }
        endpoint.tls_config(config).map_err(|e| {
            let reason = format!("TLS with CA {}: {}", ca.path.display(), error_chain(&e));
            bad(reason)
        })
    }
}

/// `error` followed by its sources (tonic's transport errors say little at the top).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A status's message and, when a broken connection caused it (a TLS alert, a reset), what
/// broke it.
pub fn status_text(status: &tonic::Status) -> String {
    let message = status.message();
    match std::error::Error::source(status).map(error_chain) {
        Some(chain) if chain.starts_with(message) => chain,
        Some(chain) => format!("{message}: {chain}"),
        None => message.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spin-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn unreadable_and_malformed_files_are_named() {
        let dir = dir("bad");
        let missing = dir.join("missing.pem");
        let err = PemFile::certificates("TLS CA certificate", &missing).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("missing.pem") && text.contains("CA"),
            "{text}"
        );

        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let text = PemFile::certificates("TLS certificate", &junk)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("junk.pem") && text.contains("CERTIFICATE"),
            "{text}"
        );
        let text = PemFile::private_key("TLS private key", &junk)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("junk.pem") && text.contains("private key"),
            "{text}"
        );
    }

    #[test]
    fn a_certificate_needs_its_key() {
        let err = KeyPair::load(Some(Path::new("c.pem")), None, "--tls-cert", "--tls-key")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-key"), "{err}");
        let none = KeyPair::load(None, None, "a", "b").unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn https_needs_a_ca_and_http_needs_nothing() {
        let plain = TlsSettings::default();
        assert!(plain.endpoint("http://127.0.0.1:1").is_ok());
        let err = plain
            .endpoint("https://127.0.0.1:1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("https://127.0.0.1:1") && err.contains("CA"),
            "{err}"
        );
        let err = plain.endpoint("not a url").unwrap_err().to_string();
        assert!(err.contains("not a url"), "{err}");
    }
}
