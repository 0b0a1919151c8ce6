//! Auto-encrypt: a client agent given only the CA certificate gets its RPC certificate from the
//! servers, as Consul's `auto_encrypt` does.
//!
//! The first leader creates an auto-encrypt CA and stores it in the replicated state, so every
//! server can sign and every server trusts it for incoming RPC. A client connects without a
//! certificate (it still verifies the server against its CA file), sends a CSR, and gets back a
//! certificate naming `client.<dc>.<domain>`, valid for `CERT_LIFETIME`. It keeps the key and
//! certificate in its data directory, reuses them across restarts, and renews at half-life.
//!
//! Without ACLs there is no token to authorise the request; when gossip encryption is on, the
//! request must be sealed with one of the datacenter's gossip keys, so only agents that may
//! join the pool get a certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::RaftNode;
use crate::membership::Gossip;
use crate::rpc::{self, ErrorCode, Handler, Peer, RpcClient, RpcError, Service};
use crate::state::Table;
use crate::tls::{self, RpcClientVerifier, TlsMaterial};

/// How long a signed client certificate is valid (Consul's auto-encrypt leaves last 72 h).
pub const CERT_LIFETIME: Duration = Duration::from_secs(72 * 3600);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub node: String,
    pub datacenter: String,
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignReply {
    pub cert_pem: String,
}

/// Server side of `Service::AutoEncrypt`.
pub struct SignHandler {
    pub node: RaftNode,
    pub gossip: Gossip,
    pub datacenter: String,
    pub domain: String,
    /// `auto_encrypt.allow_tls`.
    pub allow: bool,
}

impl Handler for SignHandler {
    fn handle(&self, peer: Peer, body: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        let result = self.sign(&peer, &body);
        async move { result }.boxed()
    }
}

impl SignHandler {
    fn sign(&self, peer: &Peer, body: &[u8]) -> Result<Vec<u8>, RpcError> {
        let forbidden = |m: String| RpcError::new(ErrorCode::Forbidden, m);
        // A client agent asks without a certificate, or renews with the one it has; servers
        // and other datacenters have no business here.
        if !matches!(peer.role, crate::rpc::Role::Anonymous | crate::rpc::Role::Client) {
            return Err(crate::rpc::forbidden("an auto-encrypt certificate request", peer));
        }
        if !self.allow {
            return Err(forbidden("auto-encrypt is off on this server (set auto_encrypt.allow_tls = true on the servers)".into()));
        }
        let plain = match self.gossip.keyring() {
            Some(ring) => ring.decrypt(body).map_err(|_| forbidden("auto-encrypt request is not sealed with this datacenter's gossip key".into()))?,
            None => body.to_vec(),
        };
        let req: SignRequest = rpc::decode(&plain)?;
        if req.datacenter != self.datacenter {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                format!("this server is in datacenter {:?}, not {:?}", self.datacenter, req.datacenter),
            ));
        }
        if req.node.is_empty() || req.node.len() > 128 || !req.node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
            return Err(RpcError::new(ErrorCode::BadRequest, format!("invalid node name {:?}", req.node)));
        }
        let ca = self.node.store.read().data().agent_ca.clone();
        let ca = ca.ok_or_else(|| RpcError::new(ErrorCode::NoLeader, "the auto-encrypt CA does not exist yet (no leader has been elected)"))?;
        let cert_pem = tls::sign_client_csr(&ca.cert_pem, &ca.key_pem, &req.csr_der, &req.node, &self.datacenter, &self.domain, CERT_LIFETIME)
            .map_err(|e| RpcError::new(ErrorCode::BadRequest, format!("certificate request rejected: {e}")))?;
        info!(node = %req.node, peer = %peer.addr, "signed an auto-encrypt client certificate");
        rpc::encode(&SignReply { cert_pem })
    }
}

/// Keep a server's RPC verifier trusting the auto-encrypt CA from the replicated state.
pub async fn trust_agent_ca(node: RaftNode, verifier: Arc<RpcClientVerifier>, shutdown: CancellationToken) {
    let mut watch = node.store.read().watch(Table::AgentCa);
    let mut trusted: Option<String> = None;
    loop {
        let current = node.store.read().data().agent_ca.as_ref().map(|c| c.cert_pem.clone());
        if let Some(pem) = current.filter(|p| trusted.as_ref() != Some(p)) {
            match verifier.set_extra_roots(&pem) {
                Ok(()) => trusted = Some(pem),
                Err(e) => warn!(error = %e, "cannot trust the auto-encrypt CA"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = watch.changed() => if r.is_err() { return },
        }
    }
}

/// Client side: obtains, stores and renews the agent's certificate, installing each one in the
/// agent's RPC client.
pub struct CertWorker {
    pub rpc: RpcClient,
    pub ca_pem: String,
    pub gossip: Gossip,
    pub datacenter: String,
    pub node_name: String,
    /// `<data_dir>/auto-encrypt`.
    pub dir: PathBuf,
}

impl CertWorker {
    /// The certificate kept from an earlier run, if it is still good for a while: installed at
    /// once, so a restart does not wait for the servers. Returns its validity window.
    pub fn restore(&self) -> Option<(SystemTime, SystemTime)> {
        let cert_pem = std::fs::read_to_string(self.dir.join(CERT_FILE)).ok()?;
        let key_pem = std::fs::read_to_string(self.dir.join(KEY_FILE)).ok()?;
        let (from, until) = tls::validity(&cert_pem)?;
        if until < SystemTime::now() + Duration::from_secs(60) {
            return None;
        }
        self.install(cert_pem, key_pem).ok()?;
        info!(valid_until = %crate::duration::rfc3339(until), "using the stored auto-encrypt certificate");
        Some((from, until))
    }

    fn install(&self, cert_pem: String, key_pem: String) -> Result<(), tls::TlsError> {
        let material = TlsMaterial { ca_pem: self.ca_pem.clone(), cert_pem, key_pem };
        self.rpc.set_tls(material.client_config()?);
        Ok(())
    }

    pub async fn run(self, mut current: Option<(SystemTime, SystemTime)>, shutdown: CancellationToken) {
        let mut backoff = RETRY_MIN;
        loop {
            // Renew at half-life, as Consul does.
            let wait = current.map_or(Duration::ZERO, |(from, until)| {
                let half = until.duration_since(from).unwrap_or_default() / 2;
                (from + half).duration_since(SystemTime::now()).unwrap_or_default()
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.fetch().await {
                Ok(window) => {
                    current = Some(window);
                    backoff = RETRY_MIN;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "auto-encrypt: no certificate yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Ask the servers gossip knows, one after another, for a certificate; store and install it.
    async fn fetch(&self) -> Result<(SystemTime, SystemTime), String> {
        let servers = crate::agent::ops::alive_servers(&self.gossip, &self.datacenter);
        if servers.is_empty() {
            return Err(format!("no server of {} is known yet (is retry_join set?)", self.datacenter));
        }
        let (csr_der, key_pem) = tls::client_csr(&self.node_name).map_err(|e| e.to_string())?;
        let req = SignRequest { node: self.node_name.clone(), datacenter: self.datacenter.clone(), csr_der };
        let mut body = rpc::encode(&req).map_err(|e| e.to_string())?;
        if let Some(ring) = self.gossip.keyring() {
            body = ring.encrypt(&body).map_err(|e| e.to_string())?;
        }
        let mut last = String::new();
        for addr in servers {
            match self.rpc.call(addr, Service::AutoEncrypt, body.clone(), CALL_TIMEOUT).await.and_then(|b| rpc::decode::<SignReply>(&b)) {
                Ok(reply) => {
                    let window = tls::validity(&reply.cert_pem).ok_or("the server sent an unreadable certificate")?;
                    store(&self.dir, &reply.cert_pem, &key_pem).map_err(|e| format!("storing the certificate in {}: {e}", self.dir.display()))?;
                    self.install(reply.cert_pem, key_pem).map_err(|e| e.to_string())?;
                    info!(server = %addr, valid_until = %crate::duration::rfc3339(window.1), "auto-encrypt certificate installed");
                    return Ok(window);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }
}

/// Write the key (owner-only) and certificate, each through a temporary file and a rename.
fn store(dir: &Path, cert_pem: &str, key_pem: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text, mode) in [(KEY_FILE, key_pem, 0o600), (CERT_FILE, cert_pem, 0o644)] {
        let tmp = dir.join(format!("{name}.tmp"));
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_client_certificate_names_only_the_client_and_verifies() {
        let (ca, ca_key) = tls::create_agent_ca("dc1", "consul").unwrap();
        let (csr, key) = tls::client_csr("c1").unwrap();
        let cert = tls::sign_client_csr(&ca, &ca_key, &csr, "c1", "dc1", "consul", CERT_LIFETIME).unwrap();
        let der = rustls_pemfile::certs(&mut cert.as_bytes()).next().unwrap().unwrap();
        assert_eq!(tls::dns_names(&der), vec!["client.dc1.consul".to_string()]);
        let (from, until) = tls::validity(&cert).unwrap();
        let life = until.duration_since(from).unwrap();
        assert!(life >= CERT_LIFETIME && life <= CERT_LIFETIME + Duration::from_secs(3700), "{life:?}");
        // The key and certificate make a working client identity.
        TlsMaterial { ca_pem: ca, cert_pem: cert, key_pem: key }.client_config().unwrap();
    }

    #[test]
    fn garbage_is_not_a_certificate_request() {
        let (ca, ca_key) = tls::create_agent_ca("dc1", "consul").unwrap();
        assert!(tls::sign_client_csr(&ca, &ca_key, b"not a csr", "c1", "dc1", "consul", CERT_LIFETIME).is_err());
    }

    #[test]
    fn stored_files_are_private_and_complete() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), "CERT", "KEY").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap(), "KEY");
        assert_eq!(std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(dir.path().join(CERT_FILE)).unwrap(), "CERT");
    }
}
