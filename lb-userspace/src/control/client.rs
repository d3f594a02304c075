//! A small client of the control API (what `lbctl` and the tests use):
//! one HTTP/1.1 request per connection, over the Unix socket, TLS or plain
//! TCP.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio_rustls::rustls::{
    self, AlertDescription, CertificateError, ClientConfig, ClientConnection, StreamOwned,
    pki_types::ServerName,
};

/// Where the API is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// The Unix socket (lbd's `api.socket`).
    Unix(PathBuf),
    /// The TCP API at `HOST:PORT` in plain TCP, with a bearer token.
    Tcp { addr: String, token: String },
    /// The TCP API at `HOST:PORT` over TLS (`config`: the CAs trusted and
    /// the client certificate, if any; see
    /// [`crate::control::tls::client_config`]), with a bearer token or not.
    Tls {
        addr: String,
        token: Option<String>,
        config: Arc<ClientConfig>,
    },
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach lbd at {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    /// TLS with lbd failed: lbd's certificate was not trusted, or lbd
    /// refused ours, or one side does not speak TLS.
    #[error("TLS with lbd at {endpoint} failed: {message}")]
    Tls { endpoint: String, message: String },
    #[error("lbd's answer was not HTTP: {0}")]
    Protocol(String),
}

/// What a TLS failure means for the operator.
fn tls_hint(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "lbd's certificate is not signed by a CA lbctl trusts (--ca, LBCTL_CA)"
        }
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "lbd's certificate has expired",
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "lbd's certificate is not for the host in --url",
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "lbd requires a client certificate (--cert and --key)"
        }
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate,
        ) => "lbd refused lbctl's client certificate (see lbd's log)",
        E::InvalidMessage(_) => {
            "lbd does not speak TLS there? (a plain-TCP API needs --url http://HOST:PORT)"
        }
        _ => "see lbd's log",
    }
}

/// An answer.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The revision of an `ETag: "N"`.
    pub fn revision(&self) -> Option<u64> {
        self.header("etag")?.trim_matches('"').parse().ok()
    }

    /// The `error` of an error body, or the body as text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Endpoint {
    fn describe(&self) -> String {
        match self {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp { addr, .. } | Endpoint::Tls { addr, .. } => addr.clone(),
        }
    }

    fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        let timeout = Some(Duration::from_secs(30));
        Ok(match self {
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(timeout)?;
                Box::new(s)
            }
            Endpoint::Tcp { addr, .. } => {
                let s = std::net::TcpStream::connect(addr)?;
                s.set_read_timeout(timeout)?;
                Box::new(s)
            }
            Endpoint::Tls { addr, config, .. } => {
                let host = crate::steering::http::host_name(addr);
                let name = ServerName::try_from(host.to_string()).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{host:?} is not a host name or address"),
                    )
                })?;
                let conn =
                    ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
                let s = std::net::TcpStream::connect(addr)?;
                s.set_read_timeout(timeout)?;
                Box::new(StreamOwned::new(conn, s))
            }
        })
    }

    fn token(&self) -> Option<&str> {
        match self {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp { token, .. } => Some(token),
            Endpoint::Tls { token, .. } => token.as_deref(),
        }
    }

    /// Sends `method path` with an optional JSON body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        self.request_with(method, path, body, &[])
    }

    /// Sends `method path` with an optional body and extra headers (a
    /// `Content-Type` there replaces `application/json`).
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Response, ClientError> {
        let unreachable = |source: std::io::Error| {
            let tls = source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>());
            match tls {
                Some(e) => ClientError::Tls {
                    endpoint: self.describe(),
                    message: format!("{e}: {}", tls_hint(e)),
                },
                None => ClientError::Unreachable {
                    endpoint: self.describe(),
                    source,
                },
            }
        };
        let mut s = self.connect().map_err(unreachable)?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n");
        if let Some(token) = self.token() {
            head += &format!("Authorization: Bearer {token}\r\n");
        }
        let body = body.unwrap_or_default();
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            head += "Content-Type: application/json\r\n";
        }
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        head += &format!("Content-Length: {}\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).map_err(unreachable)?;
        // lbd may answer (413) and close before the whole body is sent:
        // read its answer all the same.
        let sent = s.write_all(body);
        let mut raw = Vec::new();
        let read = s.read_to_end(&mut raw);
        // lbd closes without TLS close_notify after `Connection: close`
        // answers, and may close before reading a body it refuses: an
        // answer read is complete all the same. Without one, the read's
        // error first (a refused TLS handshake shows there, as the alert).
        if raw.is_empty() {
            read.map_err(unreachable)?;
            sent.map_err(unreachable)?;
        }
        parse_response(&raw)
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, ClientError> {
    let bad = |what: &str| ClientError::Protocol(what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("header is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{}"[..]));
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"garbage").is_err());
    }
}
