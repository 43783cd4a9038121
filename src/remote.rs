//! Databases isoenv does not run: the development VM (through a tunnel) and production. isoenv
//! only connects to them, with TLS as configured, runs a read-only query and reports what it
//! found. Failures are sorted into kinds so that each gets its own explanation and fix.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;

use crate::config::{ConfigSource, DatabaseConfig, SslMode};

/// What a successful check saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerReport {
    /// `SHOW server_version`, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub version: String,
    /// The session's TLS as the server reports it (`pg_stat_ssl`); `None`: plaintext.
    pub tls: Option<TlsSession>,
    /// How the server's certificate was checked.
    pub ssl_mode: SslMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsSession {
    pub protocol: String,
    pub cipher: String,
}

impl fmt::Display for ServerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL {}, ", self.version)?;
        match &self.tls {
            Some(t) => write!(
                f,
                "TLS {} ({}), certificate {}",
                t.protocol,
                t.cipher,
                match self.ssl_mode {
                    SslMode::VerifyFull => "verified against the CA, host name checked",
                    SslMode::VerifyCa => "verified against the CA (host name not checked)",
                    _ => "not verified (sslmode require/prefer)",
                }
            ),
            None => f.write_str("no TLS"),
        }
    }
}

/// Why a check failed, sorted so that each kind gets its own advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Nothing answered at the address (refused, timed out, unresolvable).
    Unreachable,
    /// The connection opened and was closed before the server spoke (e.g. a tunnel whose far
    /// end cannot connect).
    Closed,
    /// The server refuses connections without TLS (`hostssl` only).
    TlsRequiredByServer,
    /// TLS was required but the server does not offer it.
    TlsUnavailable,
    /// The server's certificate failed verification.
    Certificate,
    /// The server rejected the user or password.
    Authentication,
    /// The configuration cannot be used (e.g. an unreadable CA file).
    Configuration,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct CheckError {
    pub kind: FailureKind,
    pub detail: String,
}

impl CheckError {
    fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        CheckError {
            kind,
            detail: detail.into(),
        }
    }

    /// One sentence on how to fix it, for the configuration variables with `prefix`.
    pub fn advice(&self, prefix: &str) -> String {
        match self.kind {
            FailureKind::Unreachable => format!("check {prefix}HOST and {prefix}PORT, and that the server is running and accepts TCP connections"),
            FailureKind::Closed => "the connection was closed before the database answered: the far end of the tunnel cannot reach the database".into(),
            FailureKind::TlsRequiredByServer => format!("the server accepts only TLS connections; set {prefix}SSL_MODE=require (or verify-full with {prefix}SSL_ROOT_CERT)"),
            FailureKind::TlsUnavailable => format!("the server does not offer TLS; enable ssl on the server, or (outside production) set {prefix}SSL_MODE=prefer"),
            FailureKind::Certificate => format!("the server's certificate did not verify; check that {prefix}SSL_ROOT_CERT is the CA that signed it and that {prefix}HOST is a name in the certificate"),
            FailureKind::Authentication => format!("check {prefix}USER and {prefix}PASSWORD (and that the server allows this user from this address)"),
            FailureKind::Configuration => format!("fix the {prefix}SSL_* settings"),
            FailureKind::Other => "see the server's log".into(),
        }
    }
}

/// [`check`], the error saying what to fix in terms of the variables the database came from.
pub fn verify(db: &DatabaseConfig, host: &str, port: u16) -> crate::Result<ServerReport> {
    check(db, host, port).map_err(|source| crate::Error::Database {
        target: db.redacted_url(),
        advice: source.advice(match &db.source {
            ConfigSource::Variables { prefix } => prefix,
            ConfigSource::Active { .. } | ConfigSource::Default { .. } => "DB_",
        }),
        cause: source,
    })
}

/// Connects to `db` at `host:port` (the configured address, or a tunnel's local end), with TLS
/// per its `ssl_mode`, and reads the server version and TLS state. Changes nothing.
pub fn check(db: &DatabaseConfig, host: &str, port: u16) -> Result<ServerReport, CheckError> {
    let mut config = postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(&db.user)
        .password(db.password.expose())
        .dbname(&db.name)
        .application_name("isoenv")
        .connect_timeout(Duration::from_secs(5))
        .ssl_mode(match db.ssl_mode {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                postgres::config::SslMode::Require
            }
        });
    let tls = connector(db.ssl_mode, db.ssl_root_cert.as_deref())?;
    let mut client = config.connect(tls).map_err(|e| classify(&e))?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), s.ssl, s.version, s.cipher \
             FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
            &[],
        )
        .map_err(|e| classify(&e))?;
    let tls = row.get::<_, bool>(1).then(|| TlsSession {
        protocol: row.get::<_, Option<String>>(2).unwrap_or_default(),
        cipher: row.get::<_, Option<String>>(3).unwrap_or_default(),
    });
    Ok(ServerReport {
        version: row.get(0),
        tls,
        ssl_mode: db.ssl_mode,
    })
}

/// Sorts a connection error by walking its sources: TLS and I/O causes come wrapped.
fn classify(e: &postgres::Error) -> CheckError {
    use postgres::error::SqlState;
    if let Some(db) = e.as_db_error() {
        let kind = match db.code() {
            c if *c == SqlState::INVALID_PASSWORD => FailureKind::Authentication,
            c if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                && db.message().contains("no encryption") =>
            {
                FailureKind::TlsRequiredByServer
            }
            c if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => FailureKind::Authentication,
            _ => FailureKind::Other,
        };
        return CheckError::new(kind, format!("the server said: {}", db.message()));
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    let mut kind = None;
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                kind.get_or_insert(tls_kind(tls));
            } else {
                kind.get_or_insert(io_kind(io.kind()));
            }
        }
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            kind.get_or_insert(tls_kind(tls));
        }
        source = s.source();
    }
    let kind = kind.unwrap_or(if text.contains("server does not support TLS") {
        FailureKind::TlsUnavailable
    } else if text.contains("unexpected EOF") || text.contains("connection closed") {
        FailureKind::Closed
    } else {
        FailureKind::Other
    });
    CheckError::new(kind, text)
}

fn io_kind(kind: std::io::ErrorKind) -> FailureKind {
    use std::io::ErrorKind::*;
    match kind {
        ConnectionRefused | TimedOut | NotFound | AddrNotAvailable => FailureKind::Unreachable,
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => FailureKind::Closed,
        _ => FailureKind::Other,
    }
}

fn tls_kind(e: &rustls::Error) -> FailureKind {
    match e {
        rustls::Error::InvalidCertificate(_) => FailureKind::Certificate,
        _ => FailureKind::Other,
    }
}

fn connector(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, CheckError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let path = root_cert.ok_or_else(|| {
                CheckError::new(
                    FailureKind::Configuration,
                    format!("sslmode {mode} needs a CA certificate"),
                )
            })?;
            let roots = Arc::new(load_roots(path)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| CheckError::new(FailureKind::Configuration, e.to_string()))?;
            Arc::new(CaVerifier {
                webpki,
                check_name: mode == SslMode::VerifyFull,
            })
        }
        // libpq's require and prefer encrypt without checking who answers.
        _ => Arc::new(Unverified(provider.clone())),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CheckError::new(FailureKind::Configuration, e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, CheckError> {
    let bad = |e: String| {
        CheckError::new(
            FailureKind::Configuration,
            format!("cannot read CA certificates from {}: {e}", path.display()),
        )
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(roots)
}

/// verify-ca and verify-full: the chain must lead to the configured CA; verify-full also
/// checks the host name (libpq's semantics).
#[derive(Debug)]
struct CaVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// require and prefer: encrypted, any certificate (the handshake signatures are still checked).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_sorted() {
        use std::io::ErrorKind;
        assert_eq!(
            io_kind(ErrorKind::ConnectionRefused),
            FailureKind::Unreachable
        );
        assert_eq!(io_kind(ErrorKind::UnexpectedEof), FailureKind::Closed);
        assert_eq!(io_kind(ErrorKind::ConnectionReset), FailureKind::Closed);
    }

    #[test]
    fn certificate_errors_are_sorted() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(tls_kind(&e), FailureKind::Certificate);
    }

    #[test]
    fn verify_modes_need_a_readable_ca() {
        let err = connector(SslMode::VerifyFull, None).err().unwrap();
        assert_eq!(err.kind, FailureKind::Configuration);
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let err = connector(SslMode::VerifyCa, Some(&empty)).err().unwrap();
        assert_eq!(err.kind, FailureKind::Configuration);
        assert!(err.detail.contains("no PEM certificate"), "{}", err.detail);
        assert!(connector(SslMode::Require, None).is_ok());
    }

    #[test]
    fn advice_names_the_variables() {
        let e = CheckError::new(FailureKind::TlsRequiredByServer, "x");
        assert!(e.advice("DB_PROD_").contains("DB_PROD_SSL_MODE=require"));
    }
}
