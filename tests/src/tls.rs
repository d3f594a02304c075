//! HTTPS for tests: a test CA (rcgen) that signs server certificates, and
//! an HTTPS server that answers every request with 200, inside a network
//! namespace or on loopback.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

use crate::netns::Netns;

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ok(TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// Writes the CA's certificate (PEM) to `dir/NAME.pem`; returns the path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.issuer.pem())?;
        Ok(path)
    }

    /// Writes a server certificate for `names` (DNS names or IP addresses)
    /// and its key, signed by this CA, to `dir/NAME.pem` and
    /// `dir/NAME.key`; returns both paths.
    pub fn write_server_cert(
        &self,
        dir: &Path,
        name: &str,
        names: &[&str],
    ) -> Result<(PathBuf, PathBuf)> {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        self.write_signed(dir, name, params)
    }

    /// Writes a client certificate with subject `CN=cn` (and `O=org`),
    /// signed by this CA, valid now or `expired` (2020 only), to
    /// `dir/NAME.pem` and `dir/NAME.key`; returns both paths.
    pub fn write_client_cert(
        &self,
        dir: &Path,
        name: &str,
        cn: &str,
        org: Option<&str>,
        expired: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some(org) = org {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, org);
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        self.write_signed(dir, name, params)
    }

    fn write_signed(
        &self,
        dir: &Path,
        name: &str,
        params: CertificateParams,
    ) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    /// A server certificate for `names` (DNS names or IP addresses) and
    /// its key, signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Result<Arc<ServerConfig>> {
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from(cert.der().to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )?;
        Ok(Arc::new(config))
    }
}

/// An HTTPS server answering `200 ok` to every request; stops when dropped.
pub struct HttpsServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpsServer {
    /// Serves on `ip:port` (port 0: any) inside `ns` (or this thread's
    /// namespace when `None`).
    pub fn start(
        ns: Option<&Netns>,
        ip: IpAddr,
        port: u16,
        config: Arc<ServerConfig>,
    ) -> Result<HttpsServer> {
        let listener = {
            let _inside = ns.map(|n| n.enter()).transpose()?;
            let l = std::net::TcpListener::bind((ip, port)).context("binding the HTTPS port")?;
            l.set_nonblocking(true)?;
            l
        };
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                let acceptor = TlsAcceptor::from(config);
                loop {
                    let conn = tokio::select! {
                        _ = &mut stopped => return,
                        c = listener.accept() => c,
                    };
                    let Ok((tcp, _)) = conn else { continue };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = tls
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                            .await;
                        let _ = tls.shutdown().await;
                    });
                }
            })
        });
        Ok(HttpsServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
