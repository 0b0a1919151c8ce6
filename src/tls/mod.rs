//! Agent TLS: the CA and certificates that `trellis tls ...` and dev mode create, and the rustls
//! configurations for internal RPC (mTLS only: both sides present a certificate from the CA).
//!
//! Server certificates carry the DNS name `server.<dc>.<domain>`, which RPC clients send as
//! SNI and verify; the same name lets a server tell a server peer from a client peer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// File names as `trellis tls` writes them (Consul's, with our product name).
pub const CA_CERT_FILE: &str = "trellis-agent-ca.pem";
pub const CA_KEY_FILE: &str = "trellis-agent-ca-key.pem";
/// CA certificates last five years, like Consul's; leaf certificates one year.
const CA_VALID_YEARS: i32 = 5;
const CERT_VALID_YEARS: i32 = 1;
/// ALPN name of the internal RPC protocol, so that nothing else is mistaken for it.
pub const RPC_ALPN: &[u8] = b"trellis-rpc/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("writing {path}: {error}")]
    Write { path: PathBuf, error: std::io::Error },
    #[error("{path} holds no {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The PEM text of a CA certificate, this agent's certificate and its key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    Server,
    Client,
}

/// The DNS name every server certificate of `dc` carries and every RPC client expects.
pub fn server_name(dc: &str, domain: &str) -> String {
    format!("server.{dc}.{domain}")
}

/// Today's date (UTC) as (year, month, day), for certificate validity windows.
fn today() -> (i32, u8, u8) {
    let stamp = crate::duration::rfc3339(std::time::SystemTime::now());
    let part = |r: std::ops::Range<usize>| stamp.get(r).and_then(|s| s.parse().ok()).unwrap_or(1);
    (part(0..4), part(5..7) as u8, part(8..10) as u8)
}

fn set_validity(params: &mut CertificateParams, years: i32) {
    let (y, m, d) = today();
    // Start a day early so that small clock skew between agents does not matter; day 28 is
    // valid in every month.
    params.not_before = rcgen::date_time_ymd(y - i32::from(m == 1 && d == 1), m, d.clamp(1, 28));
    params.not_after = rcgen::date_time_ymd(y + years, m, d.clamp(1, 28));
}

/// Create a self-signed CA: (certificate PEM, key PEM).
pub fn create_ca(domain: &str) -> Result<(String, String), TlsError> {
    self_signed_ca(format!("Trellis Agent CA {domain}"))
}

/// Create the auto-encrypt CA that servers of `dc` sign client agents' certificates with. It
/// carries a name constraint, so that even its own key cannot make a certificate for any name
/// but `client.<dc>.<domain>` that verifies.
pub fn create_agent_ca(dc: &str, domain: &str) -> Result<(String, String), TlsError> {
    let constraints = rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName(format!("client.{dc}.{domain}"))],
        excluded_subtrees: Vec::new(),
    };
    self_signed_ca_with(format!("Trellis Auto-Encrypt CA {dc}.{domain}"), Some(constraints))
}

fn self_signed_ca(common_name: String) -> Result<(String, String), TlsError> {
    self_signed_ca_with(common_name, None)
}

fn self_signed_ca_with(common_name: String, constraints: Option<rcgen::NameConstraints>) -> Result<(String, String), TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.name_constraints = constraints;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_VALID_YEARS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A client agent's key and certificate signing request for auto-encrypt: (CSR DER, key PEM).
pub fn client_csr(node: &str) -> Result<(Vec<u8>, String), TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, node);
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

/// Sign a client agent's CSR with the auto-encrypt CA. Only the CSR's public key is used: the
/// certificate always names `client.<dc>.<domain>` (never a server name, whatever the CSR asks
/// for), carries the node name as its common name, and is valid for `lifetime` from an hour ago.
pub fn sign_client_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    csr_der: &[u8],
    node: &str,
    dc: &str,
    domain: &str,
    lifetime: std::time::Duration,
) -> Result<String, TlsError> {
    let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, KeyPair::from_pem(ca_key_pem)?)?;
    let mut params = CertificateParams::new(vec![format!("client.{dc}.{domain}")])?;
    params.distinguished_name.push(DnType::CommonName, node);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::try_from(lifetime).map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(params.signed_by(&csr.public_key, &issuer)?.pem())
}

/// The validity window of the first certificate in `pem`.
pub fn validity(pem: &str) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let der = TlsMaterial::certs(pem, "certificate").ok()?.into_iter().next()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        (secs >= 0).then(|| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
    };
    Some((at(parsed.validity().not_before)?, at(parsed.validity().not_after)?))
}

/// Create a certificate signed by the CA: (certificate PEM, key PEM). Server certificates name
/// `server.<dc>.<domain>` and `localhost`; client certificates `client.<dc>.<domain>`. Both may
/// authenticate as TLS client and server, as Consul's do.
pub fn create_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    kind: CertKind,
    dc: &str,
    domain: &str,
    extra_dns: &[String],
) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let primary = match kind {
        CertKind::Server => server_name(dc, domain),
        CertKind::Client => format!("client.{dc}.{domain}"),
    };
    let mut names = vec![primary.clone()];
    if kind == CertKind::Server {
        names.push("localhost".into());
    }
    names.extend(extra_dns.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    if kind == CertKind::Server {
        params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    }
    params.distinguished_name.push(DnType::CommonName, primary);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, CERT_VALID_YEARS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

pub fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|error| TlsError::Read { path: path.to_path_buf(), error })
}

pub fn write(path: &Path, text: &str) -> Result<(), TlsError> {
    std::fs::write(path, text).map_err(|error| TlsError::Write { path: path.to_path_buf(), error })
}

/// Write `text` to the first `<prefix>-N<suffix>` that does not exist yet and return its N.
pub fn write_numbered(dir: &Path, prefix: &str, cert: &str, key: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    for n in 0.. {
        let cert_path = dir.join(format!("{prefix}-{n}.pem"));
        let key_path = dir.join(format!("{prefix}-{n}-key.pem"));
        if cert_path.exists() || key_path.exists() {
            continue;
        }
        write(&cert_path, cert)?;
        write(&key_path, key)?;
        return Ok((cert_path, key_path));
    }
    unreachable!("an unbounded range always yields a free number")
}

impl TlsMaterial {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }

    fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes()).filter_map(Result::ok).collect();
        if certs.is_empty() {
            return Err(TlsError::Missing { path: PathBuf::from(what), what: "certificate" });
        }
        Ok(certs)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in Self::certs(&self.ca_pem, "ca_file")? {
            roots.add(c)?;
        }
        Ok(roots)
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or(TlsError::Missing { path: PathBuf::from("key_file"), what: "private key" })?;
        Ok((Self::certs(&self.cert_pem, "cert_file")?, key))
    }

    /// RPC server side: peers present a certificate from our CA, or from the auto-encrypt CA
    /// once it is added to `verifier`. With `verifier` allowing anonymous peers, a peer may
    /// also come in without one; the RPC layer then lets it ask only for a certificate.
    pub fn server_config(&self, verifier: Arc<RpcClientVerifier>) -> Result<Arc<ServerConfig>, TlsError> {
        let (certs, key) = self.identity()?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![RPC_ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The client-certificate verifier for `server_config`, trusting our CA.
    pub fn client_verifier(&self, allow_anonymous: bool) -> Result<Arc<RpcClientVerifier>, TlsError> {
        RpcClientVerifier::new(Self::certs(&self.ca_pem, "ca_file")?, allow_anonymous)
    }

    /// RPC client side: verifies the server's `server.<dc>.<domain>` name and presents our own.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let (certs, key) = self.identity()?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)?;
        cfg.alpn_protocols = vec![RPC_ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// RPC client side with no certificate of our own: what a client agent uses to ask the servers
/// for one (auto-encrypt). It still verifies the server against `ca_pem`.
pub fn anonymous_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in TlsMaterial::certs(ca_pem, "ca_file")? {
        roots.add(c)?;
    }
    let mut cfg =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?.with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![RPC_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Verifies RPC peers' certificates against a set of roots that can grow at runtime (the
/// auto-encrypt CA appears when the first leader creates it), optionally letting peers with
/// no certificate complete the handshake.
#[derive(Debug)]
pub struct RpcClientVerifier {
    base: Vec<CertificateDer<'static>>,
    allow_anonymous: bool,
    inner: parking_lot::RwLock<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    /// The operator's CA alone: tells its certificates from the auto-encrypt CA's.
    operator: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl RpcClientVerifier {
    fn new(base: Vec<CertificateDer<'static>>, allow_anonymous: bool) -> Result<Arc<RpcClientVerifier>, TlsError> {
        let inner = Self::build(&base, &[], allow_anonymous)?;
        let operator = Self::build(&base, &[], false)?;
        Ok(Arc::new(RpcClientVerifier { base, allow_anonymous, inner: parking_lot::RwLock::new(inner), operator }))
    }

    /// Whether `chain` (the peer's certificate first) verifies against the operator's CA
    /// (`ca_file`) alone; a certificate the handshake accepted that does not was signed by the
    /// auto-encrypt CA.
    pub fn issued_by_operator_ca(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((end, intermediates)) = chain.split_first() else { return false };
        self.operator.verify_client_cert(end, intermediates, rustls::pki_types::UnixTime::now()).is_ok()
    }

    fn build(
        base: &[CertificateDer<'static>],
        extra: &[CertificateDer<'static>],
        allow_anonymous: bool,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in base.iter().chain(extra) {
            roots.add(c.clone())?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let builder = if allow_anonymous { builder.allow_unauthenticated() } else { builder };
        builder.build().map_err(|e| TlsError::Verifier(e.to_string()))
    }

    /// Trust the base CA plus the CA certificates in `extra_pem`.
    pub fn set_extra_roots(&self, extra_pem: &str) -> Result<(), TlsError> {
        let extra = TlsMaterial::certs(extra_pem, "auto-encrypt CA")?;
        let inner = Self::build(&self.base, &extra, self.allow_anonymous)?;
        *self.inner.write() = inner;
        Ok(())
    }

    fn current(&self) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
        self.inner.read().clone()
    }
}

impl rustls::server::danger::ClientCertVerifier for RpcClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.allow_anonymous
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Hints are optional; our clients carry exactly one certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.current().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SNI to send to (any) server of `dc`.
pub fn rpc_server_name(dc: &str, domain: &str) -> ServerName<'static> {
    ServerName::try_from(server_name(dc, domain)).unwrap_or_else(|_| ServerName::try_from("localhost").expect("static name"))
}

/// DNS names in a peer certificate's SANs.
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cert_names_its_datacenter_and_verifies_against_the_ca() {
        let (ca, ca_key) = create_ca("consul").unwrap();
        let (cert, key) = create_cert(&ca, &ca_key, CertKind::Server, "dc1", "consul", &[]).unwrap();
        let m = TlsMaterial { ca_pem: ca, cert_pem: cert.clone(), key_pem: key };
        m.server_config(m.client_verifier(false).unwrap()).unwrap();
        m.client_config().unwrap();
        let der = TlsMaterial::certs(&cert, "cert").unwrap();
        assert!(dns_names(&der[0]).contains(&"server.dc1.consul".to_string()));
    }

    #[test]
    fn today_is_a_plausible_date() {
        let (y, m, d) = today();
        assert!(y >= 2024 && (1..=12).contains(&m) && (1..=31).contains(&d));
    }
}
