//! A client's connection, for every engine: `ClientStream` (plain or TLS: rustls, no
//! OpenSSL), the acceptor built from `[tls]` with its channel-binding data, and
//! `goodbye` (a last message, then a close that does not lose it). How a client asks
//! for TLS is its engine's (`pg::tls::negotiate`, MySQL's SSL request).
//!
//! Writers must `flush()` after each batch of writes: for a TLS stream the last records
//! can stay in rustls' buffer otherwise (a no-op on a plain socket).

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// ALPN protocol name PostgreSQL 17 clients send (required for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// What a session needs of the TLS configuration: the acceptor, and the channel
/// binding data of its certificate (SCRAM-SHA-256-PLUS). Taken together once per
/// connection, so a reload between handshake and authentication cannot mix them.
#[derive(Clone)]
pub struct TlsSetup {
    pub acceptor: TlsAcceptor,
    /// `tls-server-end-point` (RFC 5929): a hash of the certificate clients see.
    pub end_point: Arc<[u8]>,
}

/// Build the acceptor from the certificate, key and optional client CA files. The
/// error names the file at fault.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsSetup, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| format!("tls.cert_file {}: {e}", cfg.cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file {}: {e}", cfg.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {}: no certificate in it",
            cfg.cert_file.display()
        ));
    }
    let end_point: Arc<[u8]> = tls_server_end_point(&certs[0]).into();
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| format!("tls.key_file {}: {e}", cfg.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| format!("tls.client_ca_file {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("tls.client_ca_file {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("tls.client_ca_file {}: {e}", ca.display()))?;
            }
            // A client certificate is checked when presented; password authentication
            // still applies either way.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("tls.client_ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.key_file {}: {e}", cfg.key_file.display()))?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(TlsSetup {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        end_point,
    })
}

/// RFC 5929 `tls-server-end-point`: the certificate hashed with the hash of its own
/// signature algorithm, SHA-256 when that is MD5 or SHA-1 (or not recognised), as
/// PostgreSQL computes it. Hand-written: only the signature algorithm's OID is needed,
/// which a few steps into the DER give without an X.509 parser.
pub fn tls_server_end_point(cert: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    match signature_oid(cert).as_deref() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        Some([0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c])
        | Some([0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]) => sha2::Sha384::digest(cert).to_vec(),
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        Some([0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d])
        | Some([0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04]) => sha2::Sha512::digest(cert).to_vec(),
        _ => sha2::Sha256::digest(cert).to_vec(),
    }
}

/// The OID bytes of Certificate.signatureAlgorithm: SEQUENCE { tbsCertificate,
/// SEQUENCE { OID, ... }, BIT STRING }.
fn signature_oid(der: &[u8]) -> Option<Vec<u8>> {
    /// (tag, content start, content end) of the element at `at`.
    fn element(der: &[u8], at: usize) -> Option<(u8, usize, usize)> {
        let tag = *der.get(at)?;
        let first = *der.get(at + 1)?;
        let (len, start) = if first < 0x80 {
            (first as usize, at + 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *der.get(at + 2 + i)? as usize;
            }
            (len, at + 2 + n)
        };
        let end = start.checked_add(len)?;
        (end <= der.len()).then_some((tag, start, end))
    }
    let (0x30, cert_start, _) = element(der, 0)? else {
        return None;
    };
    let (0x30, _, tbs_end) = element(der, cert_start)? else {
        return None;
    };
    let (0x30, alg_start, _) = element(der, tbs_end)? else {
        return None;
    };
    let (0x06, oid_start, oid_end) = element(der, alg_start)? else {
        return None;
    };
    Some(der[oid_start..oid_end].to_vec())
}

/// A client's connection, plain or TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The two directions, usable at once (the session-mode relay).
    pub fn split(&mut self) -> (ClientRead<'_>, ClientWrite<'_>) {
        match self {
            ClientStream::Plain(s) => {
                let (r, w) = s.split();
                (ClientRead::Plain(r), ClientWrite::Plain(w))
            }
            ClientStream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ClientRead::Tls(r), ClientWrite::Tls(w))
            }
        }
    }
}

pub enum ClientRead<'a> {
    Plain(tokio::net::tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

pub enum ClientWrite<'a> {
    Plain(tokio::net::tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

pub use crate::tls::write_flush;

/// Send a last message (an engine's error: a FATAL ErrorResponse, an ERR packet), bounded in time, then close without
/// losing it.
pub async fn goodbye(stream: &mut ClientStream, last: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(last).await?;
        stream.flush().await
    })
    .await;
    linger(stream).await;
}

/// Close after an error without losing it: unread input at close time makes the kernel
/// send a reset, which can discard the error the client has not read yet. So: FIN, then
/// drain (briefly) whatever the client still sends.
pub async fn linger(stream: &mut ClientStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(250), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

crate::tls::delegate_read!(ClientStream, Plain, Tls);
crate::tls::delegate_write!(ClientStream, Plain, Tls);
crate::tls::delegate_read!(ClientRead<'_>, Plain, Tls);
crate::tls::delegate_write!(ClientWrite<'_>, Plain, Tls);
crate::tls::read_some!(ClientStream, s => s);
crate::tls::read_some!(ClientRead<'_>, s => s.as_ref());
crate::tls::send!(ClientStream);
