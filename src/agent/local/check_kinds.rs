//! Probes of the interval-driven check kinds (HTTP, TCP, UDP, gRPC, H2PING, script), one
//! probe per call, each reporting Consul's status and output for its kind. Sibling of
//! `checks.rs`, which schedules the probes and applies the thresholds.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::{CheckKind, CheckTls, Status, TlsSettings, format_go_duration, split_host_port};

/// Sent as `User-Agent` unless the check sets one (Consul's value), so services treat our probes
/// like Consul's in their logs and filters.
const USER_AGENT: &str = "Consul Health Check";

/// Sent as `Accept` unless the check sets one (Consul's value): health endpoints answer text.
const ACCEPT: &str = "text/plain, text/*, */*";

/// Redirects an HTTP check follows before failing (Go's `http.Client` default, which Consul
/// uses): enough for any sane chain, and a loop still ends.
const MAX_REDIRECTS: usize = 10;

/// Largest gRPC health response read: the real one is a few bytes, so anything near this is a
/// misbehaving server and must not make the agent buffer without bound.
const MAX_GRPC_RESPONSE: usize = 64 * 1024;

/// How long a finished (or killed) script's output pipes may stay open: a background child that
/// inherited stdout must not keep the check from reporting.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(1);

/// The probe of one check, built once per runner.
pub(super) struct Prober {
    probe: Probe,
}

enum Probe {
    Http(Box<HttpProbe>),
    Tcp {
        addr: String,
        tls: Option<Result<TlsTarget, String>>,
        timeout: Duration,
    },
    Udp {
        addr: String,
        timeout: Duration,
    },
    Grpc {
        target: String,
        addr: String,
        service: String,
        tls: Option<Result<TlsTarget, String>>,
        timeout: Duration,
    },
    H2Ping {
        addr: String,
        tls: Option<Result<TlsTarget, String>>,
        timeout: Duration,
    },
    Script {
        args: Vec<String>,
        timeout: Duration,
        output_max: usize,
    },
    /// TTL and alias checks have no probe; never built by the runner.
    None,
}

impl Prober {
    pub(super) fn new(kind: &CheckKind, tls: &CheckTls, output_max: usize) -> Prober {
        let probe = match kind {
            CheckKind::Http { .. } => HttpProbe::new(kind, tls, output_max).map_or(Probe::None, |http| Probe::Http(Box::new(http))),
            CheckKind::Tcp { addr, use_tls, tls: settings, timeout, .. } => {
                Probe::Tcp { addr: addr.clone(), tls: use_tls.then(|| TlsTarget::new(addr, tls, settings, &[])), timeout: *timeout }
            }
            CheckKind::Udp { addr, timeout, .. } => Probe::Udp { addr: addr.clone(), timeout: *timeout },
            CheckKind::Grpc { addr, service, use_tls, tls: settings, timeout, .. } => Probe::Grpc {
                target: if service.is_empty() { addr.clone() } else { format!("{addr}/{service}") },
                addr: addr.clone(),
                service: service.clone(),
                tls: use_tls.then(|| TlsTarget::new(addr, tls, settings, &[b"h2"])),
                timeout: *timeout,
            },
            CheckKind::H2Ping { addr, use_tls, tls: settings, timeout, .. } => {
                Probe::H2Ping { addr: addr.clone(), tls: use_tls.then(|| TlsTarget::new(addr, tls, settings, &[b"h2"])), timeout: *timeout }
            }
            CheckKind::Script { args, timeout, .. } => Probe::Script { args: args.clone(), timeout: *timeout, output_max },
            CheckKind::Ttl { .. } | CheckKind::Alias { .. } => Probe::None,
        };
        Prober { probe }
    }

    /// Run the probe once.
    pub(super) async fn probe(&self) -> (Status, String) {
        match &self.probe {
            Probe::Http(http) => http.probe().await,
            Probe::Tcp { addr, tls, timeout } => probe_tcp(addr, tls.as_ref(), *timeout).await,
            Probe::Udp { addr, timeout } => probe_udp(addr, *timeout).await,
            Probe::Grpc { target, addr, service, tls, timeout } => probe_grpc(target, addr, service, tls.as_ref(), *timeout).await,
            Probe::H2Ping { addr, tls, timeout } => probe_h2ping(addr, tls.as_ref(), *timeout).await,
            Probe::Script { args, timeout, output_max } => probe_script(args, *timeout, *output_max).await,
            Probe::None => (Status::Critical, "this kind of check has no probe".to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// CA bundles tried in turn, as Go's `crypto/x509` does on Linux and the BSDs.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Directories of single certificates, read when no bundle is found (as Go does).
const SYSTEM_CA_DIRS: &[&str] = &["/etc/ssl/certs", "/etc/pki/tls/certs"];

/// The system's CA certificates: `SSL_CERT_FILE` or the first bundle found, else every
/// certificate in `SSL_CERT_DIR` or the usual directories.
fn system_roots() -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::pem::PemObject;
    fn add_file(roots: &mut rustls::RootCertStore, path: &std::path::Path) {
        if let Ok(certs) = CertificateDer::pem_file_iter(path) {
            roots.add_parsable_certificates(certs.filter_map(Result::ok));
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    let files: Vec<std::path::PathBuf> = match std::env::var_os("SSL_CERT_FILE") {
        Some(file) => vec![file.into()],
        None => SYSTEM_CA_FILES.iter().map(Into::into).collect(),
    };
    for file in files {
        add_file(&mut roots, &file);
        if !roots.is_empty() {
            return Ok(roots);
        }
    }
    let dirs: Vec<std::path::PathBuf> = match std::env::var_os("SSL_CERT_DIR") {
        Some(dirs) => std::env::split_paths(&dirs).collect(),
        None => SYSTEM_CA_DIRS.iter().map(Into::into).collect(),
    };
    for dir in dirs {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            add_file(&mut roots, &entry.path());
        }
    }
    if roots.is_empty() { Err("no CA certificates found on this system (set SSL_CERT_FILE or SSL_CERT_DIR)".into()) } else { Ok(roots) }
}

/// A verifier over the system's roots, loaded once per process (as Go does).
fn system_verifier() -> Arc<dyn ServerCertVerifier> {
    static VERIFIER: OnceLock<Arc<dyn ServerCertVerifier>> = OnceLock::new();
    VERIFIER
        .get_or_init(|| {
            let verifier = system_roots()
                .and_then(|roots| WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crypto_provider()).build().map_err(|e| e.to_string()));
            match verifier {
                Ok(verifier) => verifier,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS health checks cannot verify servers");
                    Arc::new(Unverifiable(format!("cannot verify the server's certificate: {e}")))
                }
            }
        })
        .clone()
}

/// A rustls client config for one check.
fn client_config(tls: &CheckTls, settings: &TlsSettings, alpn: &[&[u8]]) -> Result<ClientConfig, String> {
    let provider = crypto_provider();
    let verifier: Arc<dyn ServerCertVerifier> = if settings.skip_verify {
        Arc::new(SkipVerify(provider.signature_verification_algorithms))
    } else {
        let base: Arc<dyn ServerCertVerifier> = match &tls.roots {
            Some(roots) => {
                WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build().map_err(|e| format!("check TLS roots: {e}"))?
            }
            None => system_verifier(),
        };
        match &settings.server_name {
            Some(name) => Arc::new(VerifyAs { inner: base, name: server_name(name)? }),
            None => base,
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client_cert {
        Some(key) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(key.clone()))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_string()).map_err(|_| format!("{name:?} is not a valid TLS server name"))
}

/// Where a TLS-speaking probe connects: its config and the name it verifies and sends as SNI.
struct TlsTarget {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsTarget {
    fn new(addr: &str, tls: &CheckTls, settings: &TlsSettings, alpn: &[&[u8]]) -> Result<TlsTarget, String> {
        let name = match &settings.server_name {
            Some(name) => name.clone(),
            None => split_host_port(addr).map(|(host, _)| host.to_string()).ok_or_else(|| format!("{addr:?} is not host:port"))?,
        };
        Ok(TlsTarget { config: Arc::new(client_config(tls, settings, alpn)?), server_name: server_name(&name)? })
    }
}

/// `TLSSkipVerify`: accept any certificate, but still check that the server holds its key.
#[derive(Debug)]
struct SkipVerify(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for SkipVerify {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `TLSServerName`: verify the certificate against the configured name, whatever the URL says.
#[derive(Debug)]
struct VerifyAs {
    inner: Arc<dyn ServerCertVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for VerifyAs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Used when the system roots cannot be loaded: every verification fails, saying why.
#[derive(Debug)]
struct Unverifiable(String);

impl ServerCertVerifier for Unverifiable {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(self.0.clone()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(self.0.clone()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(self.0.clone()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crypto_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

/// A byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Aborts the task when dropped (connection drivers, output readers).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn dial(addr: &str, tls: Option<&TlsTarget>) -> Result<Box<dyn Io>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("dial tcp {addr}: {e}"))?;
    match tls {
        None => Ok(Box::new(tcp)),
        Some(tls) => {
            let stream = TlsConnector::from(tls.config.clone())
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("tls handshake with {addr}: {e}"))?;
            Ok(Box::new(stream))
        }
    }
}

/// `None` for plain connections, the TLS target or its setup error otherwise.
fn tls_target(tls: Option<&Result<TlsTarget, String>>) -> Result<Option<&TlsTarget>, String> {
    tls.map(|t| t.as_ref().map_err(Clone::clone)).transpose()
}

/// An HTTP/2 client connection whose driver task lives as long as the returned guard.
async fn h2_connect(io: Box<dyn Io>) -> Result<(h2::client::SendRequest<Bytes>, h2::PingPong, AbortOnDrop), String> {
    let (sender, mut conn) = h2::client::handshake(io).await.map_err(|e| e.to_string())?;
    let ping = conn.ping_pong().ok_or_else(|| "HTTP/2 ping handle unavailable".to_string())?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "health-check HTTP/2 connection ended");
        }
    });
    Ok((sender, ping, AbortOnDrop(driver)))
}

/// An error and its sources, joined like Go's wrapped errors.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let msg = e.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        next = e.source();
    }
    parts.join(": ")
}

// ---------------------------------------------------------------------------------------------
// Output

/// Keeps the last `cap` bytes written, and how many were written in all (Consul's circbuf).
pub(super) struct TailBuffer {
    buf: VecDeque<u8>,
    cap: usize,
    total: u64,
}

impl TailBuffer {
    pub(super) fn new(cap: usize) -> TailBuffer {
        TailBuffer { buf: VecDeque::new(), cap: cap.max(1), total: 0 }
    }

    pub(super) fn write(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.cap)..];
        self.buf.extend(data);
        let excess = self.buf.len().saturating_sub(self.cap);
        self.buf.drain(..excess);
    }

    /// The kept bytes as text.
    pub(super) fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The kept bytes, prefixed by "Captured N of M bytes\n...\n" when some were dropped (the
    /// script-check format).
    pub(super) fn text_with_capture_note(&self) -> String {
        let kept = self.buf.len() as u64;
        if self.total > kept { format!("Captured {kept} of {} bytes\n...\n{}", self.total, self.text()) } else { self.text() }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct HttpProbe {
    url: String,
    method: hyper::Method,
    headers: hyper::HeaderMap,
    body: Bytes,
    disable_redirects: bool,
    /// Client config for `https` URLs (the first one or one redirected to).
    tls: Result<Arc<ClientConfig>, String>,
    server_name: Option<String>,
    timeout: Duration,
    output_max: usize,
}

/// A response, its headers and the connection its body still arrives on.
struct Response {
    status: hyper::StatusCode,
    headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    _connection: AbortOnDrop,
}

impl HttpProbe {
    fn new(kind: &CheckKind, tls: &CheckTls, output_max: usize) -> Option<HttpProbe> {
        use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
        let CheckKind::Http { url, method, header, body, disable_redirects, tls: settings, timeout, .. } = kind else {
            return None;
        };
        let mut headers = HeaderMap::new();
        for (name, values) in header {
            // Validated by `CheckDefinition::kind`; anything odd is skipped rather than fatal.
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            for value in values {
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.append(name.clone(), value);
                }
            }
        }
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        }
        if !headers.contains_key(header::ACCEPT) {
            headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
        }
        Some(HttpProbe {
            url: url.clone(),
            method: hyper::Method::from_bytes(method.as_bytes()).unwrap_or(hyper::Method::GET),
            headers,
            body: Bytes::from(body.clone()),
            disable_redirects: *disable_redirects,
            tls: client_config(tls, settings, &[b"http/1.1"]).map(Arc::new),
            server_name: settings.server_name.clone(),
            timeout: *timeout,
            output_max,
        })
    }

    /// One request (following redirects unless disabled), judged by Consul's rule: 2xx passing,
    /// 429 warning, anything else or no answer critical.
    async fn probe(&self) -> (Status, String) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut response = match tokio::time::timeout_at(deadline, self.exchange()).await {
            Err(_) => return (Status::Critical, self.describe(&format!("timed out after {}", format_go_duration(self.timeout)))),
            Ok(Err(e)) => return (Status::Critical, self.describe(&e)),
            Ok(Ok(response)) => response,
        };
        // Consul keeps the tail of the body; a body cut short by an error or the timeout still
        // counts, with what arrived of it.
        let mut output = TailBuffer::new(self.output_max);
        loop {
            match tokio::time::timeout_at(deadline, response.body.frame()).await {
                Ok(None) => break,
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        output.write(data);
                    }
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(url = %self.url, error = %error_chain(&e), "error reading a health-check response body");
                    break;
                }
                Err(_) => {
                    tracing::warn!(url = %self.url, "timed out reading a health-check response body");
                    break;
                }
            }
        }
        let code = response.status;
        let status_line = match code.canonical_reason() {
            Some(reason) => format!("{} {reason}", code.as_u16()),
            None => code.as_u16().to_string(),
        };
        let result = format!("HTTP {} {}: {status_line} Output: {}", self.method, self.url, output.text());
        let status = if code.is_success() {
            Status::Passing
        } else if code == hyper::StatusCode::TOO_MANY_REQUESTS {
            Status::Warning
        } else {
            Status::Critical
        };
        (status, result)
    }

    /// Send the request, following redirects the way Go's `http.Client` does.
    async fn exchange(&self) -> Result<Response, String> {
        let mut url = reqwest::Url::parse(&self.url).map_err(|e| e.to_string())?;
        let mut method = self.method.clone();
        let mut body = self.body.clone();
        let mut headers = self.headers.clone();
        let first_host = url.host_str().map(str::to_owned);
        let mut redirects = 0;
        loop {
            let response = self.send(&url, &method, &headers, &body).await?;
            if self.disable_redirects || !response.status.is_redirection() {
                return Ok(response);
            }
            let Some(location) = response.headers.get(hyper::header::LOCATION) else {
                return Ok(response);
            };
            match response.status.as_u16() {
                301..=303 => {
                    if method != hyper::Method::GET && method != hyper::Method::HEAD {
                        method = hyper::Method::GET;
                    }
                    body = Bytes::new();
                    headers.remove(hyper::header::CONTENT_TYPE);
                }
                307 | 308 => {}
                _ => return Ok(response),
            }
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(format!("stopped after {MAX_REDIRECTS} redirects"));
            }
            let location = location.to_str().map_err(|_| "redirect with an unreadable Location header".to_string())?;
            url = url.join(location).map_err(|e| format!("failed to parse Location header {location:?}: {e}"))?;
            if url.host_str() != first_host.as_deref() {
                // Credentials and a Host override were meant for the first host only.
                for name in [hyper::header::AUTHORIZATION, hyper::header::COOKIE, hyper::header::HOST] {
                    headers.remove(name);
                }
            }
        }
    }

    /// One request on a fresh connection (Consul disables keep-alives for checks).
    async fn send(&self, url: &reqwest::Url, method: &hyper::Method, headers: &hyper::HeaderMap, body: &Bytes) -> Result<Response, String> {
        let https = match url.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(format!("unsupported protocol scheme {other:?}")),
        };
        let host = url.host_str().ok_or("URL has no host")?;
        let port = url.port_or_known_default().ok_or("URL has no port")?;
        let addr = format!("{host}:{port}");
        let tcp = TcpStream::connect(&addr).await.map_err(|e| format!("dial tcp {addr}: {e}"))?;
        let io: Box<dyn Io> = if https {
            let config = self.tls.as_ref().map_err(Clone::clone)?;
            let name = server_name(self.server_name.as_deref().unwrap_or(host))?;
            let stream = TlsConnector::from(config.clone()).connect(name, tcp).await.map_err(|e| format!("tls handshake with {addr}: {e}"))?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(|e| error_chain(&e))?;
        let connection = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "health-check HTTP connection ended");
            }
        }));
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        };
        let mut request =
            hyper::Request::builder().method(method.clone()).uri(target).body(http_body_util::Full::new(body.clone())).map_err(|e| e.to_string())?;
        *request.headers_mut() = headers.clone();
        if !request.headers().contains_key(hyper::header::HOST) {
            let authority = match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            };
            let value = hyper::header::HeaderValue::from_str(&authority).map_err(|e| e.to_string())?;
            request.headers_mut().insert(hyper::header::HOST, value);
        }
        let response = sender.send_request(request).await.map_err(|e| error_chain(&e))?;
        let (parts, body) = response.into_parts();
        Ok(Response { status: parts.status, headers: parts.headers, body, _connection: connection })
    }

    /// Go's `url.Error` form: `Get "http://...": <cause>`.
    fn describe(&self, cause: &str) -> String {
        let mut method = self.method.as_str().to_ascii_lowercase();
        if let Some(first) = method.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        format!("{method} {:?}: {cause}", self.url)
    }
}

// ---------------------------------------------------------------------------------------------
// TCP and UDP

async fn probe_tcp(addr: &str, tls: Option<&Result<TlsTarget, String>>, timeout: Duration) -> (Status, String) {
    let tls = match tls_target(tls) {
        Ok(tls) => tls,
        Err(e) => return (Status::Critical, e),
    };
    match tokio::time::timeout(timeout, dial(addr, tls)).await {
        Err(_) => (Status::Critical, format!("dial tcp {addr}: i/o timeout")),
        Ok(Err(e)) => (Status::Critical, e),
        Ok(Ok(_conn)) => {
            let what = if tls.is_some() { "TCP+TLS" } else { "TCP" };
            (Status::Passing, format!("{what} connect {addr}: Success"))
        }
    }
}

/// Consul's UDP rule: send a datagram; an error reading the answer (an ICMP port unreachable
/// surfaces as "connection refused") is critical, while an answer or silence until the timeout
/// is passing.
async fn probe_udp(addr: &str, timeout: Duration) -> (Status, String) {
    let deadline = tokio::time::Instant::now() + timeout;
    let target = match tokio::time::timeout_at(deadline, tokio::net::lookup_host(addr)).await {
        Err(_) => return (Status::Critical, format!("dial udp {addr}: i/o timeout")),
        Ok(Err(e)) => return (Status::Critical, format!("dial udp {addr}: {e}")),
        Ok(Ok(mut addrs)) => match addrs.next() {
            Some(target) => target,
            None => return (Status::Critical, format!("dial udp {addr}: no addresses")),
        },
    };
    let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = match UdpSocket::bind(local).await {
        Ok(socket) => socket,
        Err(e) => return (Status::Critical, format!("dial udp {addr}: {e}")),
    };
    if let Err(e) = socket.connect(target).await {
        return (Status::Critical, format!("dial udp {addr}: {e}"));
    }
    let local = socket.local_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    if let Err(e) = socket.send(&[]).await {
        return (Status::Critical, format!("write udp {local}->{target}: {e}"));
    }
    let mut buf = [0u8; 1];
    match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
        Err(_) | Ok(Ok(_)) => (Status::Passing, format!("UDP connect {addr}: Success")),
        Ok(Err(e)) => (Status::Critical, format!("read udp {local}->{target}: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC health (grpc.health.v1.Health/Check over HTTP/2)

const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// grpc-go's error text: `rpc error: code = NotFound desc = unknown service`.
fn rpc_error(code: u32, desc: &str) -> String {
    let name = GRPC_CODES.get(code as usize).map_or_else(|| format!("Code({code})"), |n| n.to_string());
    format!("rpc error: code = {name} desc = {desc}")
}

fn unavailable(e: impl std::fmt::Display) -> String {
    rpc_error(14, &format!("connection error: {e}"))
}

fn serving_status_name(status: u64) -> String {
    match status {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => n.to_string(),
    }
}

async fn probe_grpc(target: &str, addr: &str, service: &str, tls: Option<&Result<TlsTarget, String>>, timeout: Duration) -> (Status, String) {
    let tls = match tls_target(tls) {
        Ok(tls) => tls,
        Err(e) => return (Status::Critical, e),
    };
    match tokio::time::timeout(timeout, grpc_health(addr, service, tls)).await {
        Err(_) => (Status::Critical, rpc_error(4, "context deadline exceeded")),
        Ok(Err(e)) => (Status::Critical, e),
        Ok(Ok(1)) => (Status::Passing, format!("gRPC check {target}: success")),
        Ok(Ok(status)) => (Status::Critical, format!("gRPC {target} serving status: {}", serving_status_name(status))),
    }
}

/// The serving status the server reports (1 is SERVING).
async fn grpc_health(addr: &str, service: &str, tls: Option<&TlsTarget>) -> Result<u64, String> {
    let io = dial(addr, tls).await.map_err(unavailable)?;
    let (sender, _ping, _driver) = h2_connect(io).await.map_err(unavailable)?;
    let mut sender = sender.ready().await.map_err(unavailable)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let request = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(format!("{scheme}://{addr}/grpc.health.v1.Health/Check"))
        .header(hyper::header::CONTENT_TYPE, "application/grpc")
        .header(hyper::header::TE, "trailers")
        .header(hyper::header::USER_AGENT, USER_AGENT)
        .body(())
        .map_err(|e| rpc_error(13, &e.to_string()))?;
    let (response, mut stream) = sender.send_request(request, false).map_err(unavailable)?;
    stream.send_data(grpc_frame(&encode_health_request(service)), true).map_err(unavailable)?;
    let response = response.await.map_err(unavailable)?;
    let (parts, mut body) = response.into_parts();
    if parts.status != hyper::StatusCode::OK {
        let code = match parts.status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502..=504 => 14,
            _ => 2,
        };
        return Err(rpc_error(code, &format!("unexpected HTTP status code received from server: {}", parts.status)));
    }
    // A "trailers-only" answer carries the gRPC status in its headers and has no body.
    let mut status = grpc_status(&parts.headers);
    if let Some((code, message)) = &status
        && *code != 0
    {
        return Err(rpc_error(*code, message));
    }
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(unavailable)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
        if data.len() > MAX_GRPC_RESPONSE {
            return Err(rpc_error(8, "health response too large"));
        }
    }
    if let Some(trailers) = body.trailers().await.map_err(unavailable)? {
        status = grpc_status(&trailers).or(status);
    }
    match status {
        None => Err(rpc_error(13, "server closed the stream without sending trailers")),
        Some((0, _)) => decode_health_response(&data).map_err(|e| rpc_error(13, &e)),
        Some((code, message)) => Err(rpc_error(code, &message)),
    }
}

fn grpc_status(headers: &hyper::HeaderMap) -> Option<(u32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).map(percent_decode).unwrap_or_default();
    Some((code, message))
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One length-prefixed, uncompressed gRPC message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

fn encode_varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn decode_varint(data: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

/// `HealthCheckRequest { string service = 1; }`
fn encode_health_request(service: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if !service.is_empty() {
        out.push(0x0a);
        encode_varint(service.len() as u64, &mut out);
        out.extend_from_slice(service.as_bytes());
    }
    out
}

/// The `status` (field 1) of a framed `HealthCheckResponse`; 0 (UNKNOWN) when absent.
fn decode_health_response(data: &[u8]) -> Result<u64, String> {
    if data.len() < 5 {
        return Err("missing health response message".into());
    }
    if data[0] != 0 {
        return Err("compressed health responses are not supported".into());
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    let message = data.get(5..5 + len).ok_or("truncated health response message")?;
    let mut pos = 0;
    let mut status = 0;
    while pos < message.len() {
        let key = decode_varint(message, &mut pos)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = decode_varint(message, &mut pos)?,
            (_, 0) => {
                decode_varint(message, &mut pos)?;
            }
            (_, 1) => pos += 8,
            (_, 2) => {
                let len = decode_varint(message, &mut pos)?;
                pos = pos.saturating_add(usize::try_from(len).map_err(|_| "bad length")?);
            }
            (_, 5) => pos += 4,
            (_, wire) => return Err(format!("unsupported protobuf wire type {wire}")),
        }
    }
    if pos > message.len() {
        return Err("truncated health response message".into());
    }
    Ok(status)
}

// ---------------------------------------------------------------------------------------------
// H2PING

async fn probe_h2ping(addr: &str, tls: Option<&Result<TlsTarget, String>>, timeout: Duration) -> (Status, String) {
    let tls = match tls_target(tls) {
        Ok(tls) => tls,
        Err(e) => return (Status::Critical, format!("Failed to dial to {addr}: {e}")),
    };
    let ping = async {
        let io = dial(addr, tls).await.map_err(|e| format!("Failed to dial to {addr}: {e}"))?;
        let (_sender, mut ping, _driver) = h2_connect(io).await.map_err(|e| format!("Failed to create client connection {e}"))?;
        ping.ping(h2::Ping::opaque()).await.map_err(|e| format!("HTTP2 ping failed: {e}"))
    };
    match tokio::time::timeout(timeout, ping).await {
        Err(_) => (Status::Critical, "HTTP2 ping failed: context deadline exceeded".to_string()),
        Ok(Err(e)) => (Status::Critical, e),
        Ok(Ok(_)) => (Status::Passing, "HTTP2 ping was successful".to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Scripts

async fn probe_script(args: &[String], timeout: Duration, output_max: usize) -> (Status, String) {
    let mut command = tokio::process::Command::new(&args[0]);
    command.args(&args[1..]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // Its own process group, so that a timeout can kill whatever the script started.
    #[cfg(unix)]
    command.process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return (Status::Critical, format!("Failed to run check {:?}: {e}", args[0]));
        }
    };
    let output = Arc::new(Mutex::new(TailBuffer::new(output_max)));
    let mut readers = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(AbortOnDrop(tokio::spawn(pump(stdout, output.clone()))));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(AbortOnDrop(tokio::spawn(pump(stderr, output.clone()))));
    }
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    if waited.is_err() {
        kill_process_group(&mut child).await;
        let _ = child.wait().await;
    }
    let _ = tokio::time::timeout(OUTPUT_DRAIN_GRACE, async {
        for reader in &mut readers {
            let _ = (&mut reader.0).await;
        }
    })
    .await;
    drop(readers);
    let captured = output.lock().text_with_capture_note();
    match waited {
        Err(_) => {
            let mut msg = format!("Timed out ({}) running check", format_go_duration(timeout));
            if !captured.is_empty() {
                msg.push_str("\n\n");
                msg.push_str(&captured);
            }
            (Status::Critical, msg)
        }
        Ok(Err(e)) => (Status::Critical, format!("Failed to wait for check {:?}: {e}", args[0])),
        Ok(Ok(exit)) => match exit.code() {
            Some(0) => (Status::Passing, captured),
            Some(1) => (Status::Warning, captured),
            _ => (Status::Critical, captured),
        },
    }
}

async fn pump(mut from: impl AsyncRead + Unpin, into: Arc<Mutex<TailBuffer>>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                into.lock().write(&buf[..n]);
            }
        }
    }
}

async fn kill_process_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // No libc here: `kill -KILL -- -PGID` reaches the script's whole process group.
        let _ = tokio::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    let _ = child.start_kill();
}

#[cfg(test)]
#[path = "check_kinds_tests.rs"]
mod tests;
