//! HTTP(S) GETs to backends, for health checks and load scrapes: hyper's
//! HTTP/1.1 client connection over a TCP stream, with TLS (rustls, ring)
//! for HTTPS.
//!
//! hyper parses what servers send (repeated equal `Content-Length`s,
//! chunked bodies after other transfer codings, obsolete folded header
//! lines, HTTP/1.0 answers read to the end of the connection); a gzip
//! transfer or content coding of a body is undone by [`Answer::decoded`]. A client either
//! opens a connection per request (`Connection: close`: health checks test
//! that a backend accepts connections) or keeps one open between requests
//! (load scrapes, once a second per node), opening a new one when the
//! server closed it.

use std::{
    collections::HashMap,
    io::Read,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{
    Request,
    body::Bytes,
    client::conn::http1::{self, SendRequest},
    header,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, pki_types::ServerName},
};

use crate::desired::policy::HttpOptions;

/// An answer: its status and body (with the transfer and content codings
/// but chunked still applied: see [`Answer::decoded`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// The body is gzip-coded.
    pub gzip: bool,
}

impl Answer {
    /// The body, gzip decoded if it is coded; at most `max` bytes.
    pub fn decoded(&self, max: usize) -> Result<Vec<u8>, String> {
        if !self.gzip {
            return Ok(self.body.clone());
        }
        self.gunzip(max)
    }

    /// [`Answer::decoded`], without copying a body that is not coded.
    pub fn into_decoded(self, max: usize) -> Result<Vec<u8>, String> {
        if !self.gzip {
            return Ok(self.body);
        }
        self.gunzip(max)
    }

    fn gunzip(&self, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&self.body[..])
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("the gzip body does not decode: {e}"))?;
        if out.len() > max {
            return Err(format!("the body is larger than {max} bytes"));
        }
        Ok(out)
    }
}

/// GETs from one backend endpoint.
pub struct HttpClient {
    addr: SocketAddr,
    /// `http` or `https`, for messages.
    scheme: &'static str,
    host: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    keep_alive: bool,
    conn: Option<SendRequest<Empty<Bytes>>>,
}

impl HttpClient {
    /// A client of `addr` as `opts` say; `keep_alive`: reuse the
    /// connection between requests. Fails (with the reason) when the CA
    /// file cannot be read or names no certificate.
    pub fn new(
        addr: SocketAddr,
        opts: &HttpOptions,
        keep_alive: bool,
    ) -> Result<HttpClient, String> {
        let host = opts.host.clone().unwrap_or_else(|| match addr.ip() {
            IpAddr::V4(a) => format!("{a}:{}", addr.port()),
            IpAddr::V6(a) => format!("[{a}]:{}", addr.port()),
        });
        let tls = if opts.tls {
            let config = tls_config(opts.ca_file.as_ref())?;
            // The name the certificate must carry: the host's name
            // (without a port), else the backend's address.
            let name = match &opts.host {
                Some(h) => host_name(h).to_string(),
                None => addr.ip().to_string(),
            };
            let name = ServerName::try_from(name.clone())
                .map_err(|e| format!("{name:?} is not a TLS server name: {e}"))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(HttpClient {
            addr,
            scheme: if opts.tls { "https" } else { "http" },
            host,
            tls,
            keep_alive,
            conn: None,
        })
    }

    /// `GET path`, all within `timeout`; bodies over `max` bytes are an
    /// error.
    pub async fn get(
        &mut self,
        path: &str,
        timeout: Duration,
        max: usize,
    ) -> Result<Answer, String> {
        let what = format!("{} {}{path}", self.scheme, self.addr);
        match tokio::time::timeout(timeout, self.exchange(path, max)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => {
                self.conn = None;
                Err(format!("{what}: no answer within {timeout:?}"))
            }
        }
    }

    async fn exchange(&mut self, path: &str, max: usize) -> Result<Answer, String> {
        let reused = match self.conn.take() {
            Some(c) if !c.is_closed() => {
                self.conn = Some(c);
                true
            }
            _ => {
                self.conn = Some(self.connect().await?);
                false
            }
        };
        match self.request(path, max).await {
            // The server may close a kept connection at any time: a GET
            // can be sent again on a new one.
            Err(_) if reused => {
                self.conn = Some(self.connect().await?);
                self.request(path, max).await
            }
            r => r,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut builder = http1::Builder::new();
        builder.allow_obsolete_multiline_headers_in_responses(true);
        match &self.tls {
            None => {
                let (sender, conn) = builder
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Ok(sender)
            }
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                let (sender, conn) = builder
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Ok(sender)
            }
        }
    }

    async fn request(&mut self, path: &str, max: usize) -> Result<Answer, String> {
        let sender = self.conn.as_mut().expect("connected");
        let mut req = Request::get(path)
            .header(header::HOST, &self.host)
            .header(
                header::USER_AGENT,
                concat!("lbd/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "text/plain, */*");
        if !self.keep_alive {
            req = req.header(header::CONNECTION, "close");
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let answer = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = answer.status().as_u16();
        let gzip = is_gzip(answer.headers());
        let closes = !self.keep_alive
            || answer
                .headers()
                .get(header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body = Limited::new(answer.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("the body is larger than {max} bytes")
                } else {
                    format!("reading the body: {e}")
                }
            })?
            .to_bytes();
        if closes {
            self.conn = None;
        }
        Ok(Answer {
            status,
            body: body.to_vec(),
            gzip,
        })
    }
}

/// `NAME` of `NAME:PORT`, `[V6]:PORT` or `[V6]`.
pub(crate) fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(n, _)| n)
}

/// Whether the body comes gzip-coded (a transfer coding, e.g. `gzip,
/// chunked`, or the content coding).
fn is_gzip(headers: &header::HeaderMap) -> bool {
    [header::TRANSFER_ENCODING, header::CONTENT_ENCODING]
        .iter()
        .flat_map(|h| headers.get_all(h))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|c| {
            let c = c.trim();
            c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip")
        })
}

/// TLS client settings trusting `ca_file`'s certificates (or the
/// system's), shared by every client with the same file as long as it is
/// unchanged.
fn tls_config(ca_file: Option<&PathBuf>) -> Result<Arc<ClientConfig>, String> {
    type Key = (Option<PathBuf>, Option<SystemTime>);
    static CONFIGS: Mutex<Option<HashMap<Key, Arc<ClientConfig>>>> = Mutex::new(None);
    let modified = ca_file.and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let key = (ca_file.cloned(), modified);
    if let Some(c) = CONFIGS
        .lock()
        .expect("no panics while held")
        .get_or_insert_default()
        .get(&key)
    {
        return Ok(c.clone());
    }
    let roots = crate::control::tls::root_store(ca_file.map(PathBuf::as_path))
        .map_err(|e| e.to_string())?;
    let config = ClientConfig::builder_with_provider(crate::control::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = Arc::new(config);
    CONFIGS
        .lock()
        .expect("no panics while held")
        .get_or_insert_default()
        .insert(key, config.clone());
    Ok(config)
}
