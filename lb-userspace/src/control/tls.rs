//! TLS for lbd's TCP listeners (the control API's `tcp_listen` and
//! `/metrics`) and for `lbctl`, with rustls (ring): certificates and keys
//! from PEM files, optional or required client certificates, and one
//! listener type for both TLS and plain TCP that axum serves.
//!
//! Handshakes run on tasks of their own (at most [`HANDSHAKE_TIMEOUT`]), so
//! a slow or silent client holds up nobody. A failed handshake is logged
//! with the peer and the reason (an unknown CA, an expired or missing
//! client certificate, ...); the client sees the TLS alert. A client that
//! speaks plain HTTP to a TLS port gets a plain `400` saying so, and the
//! log says the same.

use std::{io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ClientConfig, RootCertStore, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
};

use crate::{
    control::access::CertificateCaller,
    desired::config::{TlsSettings, Transport},
};

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {message}")]
    File {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("{0}")]
    Rustls(String),
}

fn file_error(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The crypto lbd uses everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file (at least one).
pub fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("the private key", path, e))
}

/// The CAs of `ca_file`, or the system's trust store without one.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in certificates("the CA file", path)? {
                roots
                    .add(c)
                    .map_err(|e| file_error("the CA file", path, e))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(TlsError::Rustls(
                    "the system's trust store has no certificate: give a CA file".into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// The server side of `settings`: its certificate and key, and the client
/// certificate check it asks for.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates("the certificate", &settings.cert)?;
    let key = private_key(&settings.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(Some(ca))?),
                provider(),
            );
            let verifier = if settings.client_cert_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| file_error("the client CA file", ca, e))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Rustls(format!("the certificate and key do not go together: {e}"))
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side, for `lbctl`: trusting `ca` (or the system's store),
/// presenting `cert` and `key` if given.
pub fn client_config(
    ca: Option<&Path>,
    cert_and_key: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(root_store(ca)?);
    let config = match cert_and_key {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates("the client certificate", cert)?,
                private_key(key)?,
            )
            .map_err(|e| {
                TlsError::Rustls(format!(
                    "the client certificate and key do not go together: {e}"
                ))
            })?,
    };
    Ok(Arc::new(config))
}

/// A connection's peer: its address and, over TLS, the client
/// certificate it presented (verified against the client CA).
#[derive(Clone, Debug)]
pub struct TcpPeer {
    pub addr: SocketAddr,
    pub certificate: Option<CertificateCaller>,
}

/// A connection, TLS or plain.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A bound TCP listener that hands axum connections whose handshake is
/// done (TLS) or that were just accepted (plain TCP).
pub struct Listener {
    local: SocketAddr,
    ready: mpsc::Receiver<(Box<dyn Io>, TcpPeer)>,
}

impl Listener {
    /// Binds `listen` and starts accepting, with TLS when `transport`
    /// says so. `what` names the listener in the log (`the API`,
    /// `/metrics`). Certificate, key and CA files are read here: a bad one
    /// fails the start.
    pub async fn bind(
        listen: SocketAddr,
        transport: &Transport,
        what: &'static str,
    ) -> io::Result<Listener> {
        let acceptor = match transport {
            Transport::Tls(settings) => Some(TlsAcceptor::from(
                server_config(settings).map_err(io::Error::other)?,
            )),
            Transport::Plain { .. } => None,
        };
        let tcp = tokio::net::TcpListener::bind(listen).await?;
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, acceptor, tx, what));
        Ok(Listener { local, ready })
    }
}

async fn accept_loop(
    tcp: tokio::net::TcpListener,
    acceptor: Option<TlsAcceptor>,
    tx: mpsc::Sender<(Box<dyn Io>, TcpPeer)>,
    what: &'static str,
) {
    loop {
        let (stream, addr) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "{what}: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = acceptor.clone() else {
            let peer = TcpPeer {
                addr,
                certificate: None,
            };
            if tx.send((Box::new(stream), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, stream, addr)).await
            {
                Ok(Ok(conn)) => {
                    let _ = tx.send(conn).await;
                }
                Ok(Err(e)) => tracing::warn!(peer = %addr, "{what}: TLS connection refused: {e}"),
                Err(_) => tracing::warn!(
                    peer = %addr,
                    "{what}: TLS connection refused: no handshake within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            }
        });
    }
}

/// A TLS record of a handshake starts with this byte; an HTTP request
/// starts with a letter.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn handshake(
    acceptor: &TlsAcceptor,
    mut stream: TcpStream,
    addr: SocketAddr,
) -> Result<(Box<dyn Io>, TcpPeer), String> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("closed before the handshake".into());
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        let body =
            r#"{"error": "this port speaks TLS: use https:// (lbctl --url https://HOST:PORT)"}"#;
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        return Err("the client spoke plain TCP (no TLS handshake); answered 400".into());
    }
    let tls = acceptor
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let certificate = match tls.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => Some(CertificateCaller::from_der(leaf)?),
        _ => None,
    };
    Ok((Box::new(tls), TcpPeer { addr, certificate }))
}

impl axum::serve::Listener for Listener {
    type Io = Box<dyn Io>;
    type Addr = TcpPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ends only with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<TcpPeer> {
        Ok(TcpPeer {
            addr: self.local,
            certificate: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for TcpPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> TcpPeer {
        stream.remote_addr().clone()
    }
}

/// Logs how a listener speaks: TLS (and whether it checks client
/// certificates), plain TCP on loopback (info), or plain TCP the config
/// asked for (a warning at every start).
pub fn log_transport(what: &str, listen: SocketAddr, transport: &Transport) {
    match transport {
        Transport::Tls(t) => tracing::info!(
            %listen,
            cert = %t.cert.display(),
            client_certificates = match (&t.client_ca, t.client_cert_required) {
                (None, _) => "none",
                (Some(_), true) => "required",
                (Some(_), false) => "optional",
            },
            "{what} over TLS"
        ),
        Transport::Plain { explicit: true } => tracing::warn!(
            %listen,
            "{what} over PLAIN TCP (plaintext = true): tokens and answers cross the network \
             unencrypted; configure TLS"
        ),
        Transport::Plain { explicit: false } => {
            tracing::info!(%listen, "{what} over plain TCP on a loopback address")
        }
    }
}
