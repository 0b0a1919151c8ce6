//! Mesh TLS for proxies: the current leaf as our identity (swapped in place when it renews, so
//! new connections use it and established ones are untouched), peers verified against the
//! current roots (swapped the same way when they rotate), and identities checked by SPIFFE URI,
//! not by host name: mesh leaves carry no DNS names.

use std::sync::Arc;

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::connect::spiffe::{self, ServiceId};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum MeshTlsError {
    #[error("{0} holds no certificate")]
    NoCert(&'static str),
    #[error("the leaf's private key cannot be used: {0}")]
    Key(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A proxy's identity (its leaf) and trust (the roots), both replaceable at runtime.
#[derive(Debug)]
pub struct MeshTls {
    leaf: RwLock<Option<Arc<CertifiedKey>>>,
    roots: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    /// The roots' trust domain: peers must belong to it.
    trust_domain: RwLock<String>,
}

impl MeshTls {
    pub fn new() -> Arc<MeshTls> {
        Arc::new(MeshTls { leaf: RwLock::new(None), roots: RwLock::new(None), trust_domain: RwLock::new(String::new()) })
    }

    /// Use a new leaf (PEM chain and key) for every connection from now on.
    pub fn set_leaf(&self, cert_pem: &str, key_pem: &str) -> Result<(), MeshTlsError> {
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes()).filter_map(Result::ok).collect();
        if certs.is_empty() {
            return Err(MeshTlsError::NoCert("the leaf"));
        }
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or_else(|| MeshTlsError::Key("no private key in the PEM".into()))?;
        let signing = provider().key_provider.load_private_key(key).map_err(|e| MeshTlsError::Key(e.to_string()))?;
        *self.leaf.write() = Some(Arc::new(CertifiedKey::new(certs, signing)));
        Ok(())
    }

    /// Trust these roots (PEM certificates) from now on.
    pub fn set_roots(&self, roots_pem: &[String], trust_domain: &str) -> Result<(), MeshTlsError> {
        let mut store = rustls::RootCertStore::empty();
        for pem in roots_pem {
            for c in rustls_pemfile::certs(&mut pem.as_bytes()).filter_map(Result::ok) {
                store.add(c)?;
            }
        }
        if store.is_empty() {
            return Err(MeshTlsError::NoCert("the roots"));
        }
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| MeshTlsError::Rustls(rustls::Error::General(e.to_string())))?;
        *self.roots.write() = Some(v);
        *self.trust_domain.write() = trust_domain.to_ascii_lowercase();
        Ok(())
    }

    pub fn trust_domain(&self) -> String {
        self.trust_domain.read().clone()
    }

    pub fn ready(&self) -> bool {
        self.leaf.read().is_some() && self.roots.read().is_some()
    }

    fn verify_chain(&self, end: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Result<ServiceId, rustls::Error> {
        let v = self.roots.read().clone().ok_or_else(|| rustls::Error::General("no mesh roots yet".into()))?;
        // The chain must lead to a current root (the client verifier checks the chain without
        // looking for a host name; mesh leaves are valid for both client and server auth).
        v.verify_client_cert(end, intermediates, now)?;
        let id = spiffe::service_of(end).ok_or_else(|| rustls::Error::General("the peer certificate carries no service SPIFFE ID".into()))?;
        if id.trust_domain != *self.trust_domain.read() {
            return Err(rustls::Error::General(format!("the peer belongs to trust domain {}, not ours", id.trust_domain)));
        }
        Ok(id)
    }

    /// The public listener's configuration: our leaf, and a client certificate required,
    /// chaining to a current root.
    pub fn server_config(self: &Arc<Self>, alpn: Vec<Vec<u8>>) -> Result<Arc<rustls::ServerConfig>, MeshTlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(PeerVerifier(self.clone())))
            .with_cert_resolver(Arc::new(LeafResolver(self.clone())));
        cfg.alpn_protocols = alpn;
        Ok(Arc::new(cfg))
    }

    /// An upstream's configuration: our leaf as the client identity, and the server must be
    /// `expected` (trust domain, datacenter when given, and service name).
    pub fn client_config(self: &Arc<Self>, expected: Expected, alpn: Vec<Vec<u8>>) -> Result<Arc<rustls::ClientConfig>, MeshTlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UpstreamVerifier { tls: self.clone(), expected }))
            .with_client_cert_resolver(Arc::new(LeafResolver(self.clone())));
        cfg.alpn_protocols = alpn;
        cfg.resumption = rustls::client::Resumption::in_memory_sessions(256);
        Ok(Arc::new(cfg))
    }
}

/// The identity an upstream's server must have.
#[derive(Debug, Clone)]
pub struct Expected {
    pub service: String,
    /// Empty: any datacenter (failover targets in other datacenters).
    pub datacenter: String,
}

#[derive(Debug)]
struct LeafResolver(Arc<MeshTls>);

impl rustls::server::ResolvesServerCert for LeafResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.leaf.read().clone()
    }
}

impl rustls::client::ResolvesClientCert for LeafResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.leaf.read().clone()
    }

    fn has_certs(&self) -> bool {
        self.0.leaf.read().is_some()
    }
}

#[derive(Debug)]
struct PeerVerifier(Arc<MeshTls>);

fn schemes() -> Vec<SignatureScheme> {
    provider().signature_verification_algorithms.supported_schemes()
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_chain(end, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

#[derive(Debug)]
struct UpstreamVerifier {
    tls: Arc<MeshTls>,
    expected: Expected,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.tls.verify_chain(end, intermediates, now)?;
        if id.service != self.expected.service {
            return Err(rustls::Error::General(format!("the upstream presented the identity of {:?}, not {:?}", id.service, self.expected.service)));
        }
        if !self.expected.datacenter.is_empty() && !id.datacenter.eq_ignore_ascii_case(&self.expected.datacenter) {
            return Err(rustls::Error::General(format!("the upstream is in datacenter {}, not {}", id.datacenter, self.expected.datacenter)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// The SNI a mesh client sends for `service` in `dc` (Consul's service SNI), which mesh
/// gateways route by.
pub fn service_sni(service: &str, dc: &str, trust_domain: &str) -> String {
    format!("{service}.default.{dc}.internal.{trust_domain}")
}

/// The SPIFFE identity of the peer of an established TLS connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> Option<ServiceId> {
    certs.and_then(|c| c.first()).and_then(spiffe::service_of)
}
