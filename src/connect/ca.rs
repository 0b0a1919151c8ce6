//! The built-in CA (Consul's `consul` provider): EC P-256 (or the configured type) roots with
//! the trust domain's SPIFFE URI, leaf certificates signed from agents' CSRs, cross-signing
//! when the root rotates, and intermediates for secondary datacenters.
//!
//! Roots: CN `pri-<random>.consul.ca.<cluster-id prefix>.consul`, URI SAN
//! `spiffe://<trust-domain>`, CA with path length unconstrained, valid `RootCertTTL`.
//! Leaves: no subject, exactly one URI SAN (the service's SPIFFE ID, critical), client and
//! server auth, valid `LeafCertTTL` from a minute ago, a random 128-bit serial.

use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

use super::spiffe;
use crate::state::mesh::{CaConfig, CaRoot, ConnectCa};

/// How long a cross-signed certificate bridges an old root to a new one (Consul's 7 days).
const CROSS_SIGN_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Certificates start a minute in the past, for clock skew between agents.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("CA has not finished initializing")]
    NotInitialized,
}

fn colon_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

fn now_offset(d: Duration, past: bool) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    let d = time::Duration::try_from(d).unwrap_or(time::Duration::MAX);
    if past { now.saturating_sub(d) } else { now.saturating_add(d) }
}

fn ttl(key: &str, v: &str) -> Result<Duration, CaError> {
    crate::duration::parse(v).ok_or_else(|| CaError::Invalid(format!("{key}: {v:?} is not a duration like \"72h\"")))
}

/// Check a CA configuration with Consul's rules and messages.
pub fn validate_config(c: &CaConfig) -> Result<(), CaError> {
    if c.provider != "consul" {
        return Err(CaError::Invalid(format!(
            "could not initialize provider: unknown CA provider {:?} (Trellis has the built-in \"consul\" provider)",
            c.provider
        )));
    }
    let leaf = ttl("LeafCertTTL", &c.leaf_cert_ttl)?;
    let inter = ttl("IntermediateCertTTL", &c.intermediate_cert_ttl)?;
    let root = ttl("RootCertTTL", &c.root_cert_ttl)?;
    let hour = Duration::from_secs(3600);
    if leaf < hour {
        return Err(CaError::Invalid("error configuring provider: leaf cert TTL must be greater or equal than 1h0m0s".into()));
    }
    if leaf >= 8760 * hour {
        return Err(CaError::Invalid("error configuring provider: leaf cert TTL must be less than 8760h0m0s".into()));
    }
    if inter < 3 * hour {
        return Err(CaError::Invalid("error configuring provider: Intermediate Cert TTL must be greater or equal than 3h".into()));
    }
    if inter < leaf * 3 {
        return Err(CaError::Invalid(format!(
            "error configuring provider: Intermediate Cert TTL must be greater or equal than 3 * LeafCertTTL (>={}).",
            crate::duration::format(leaf * 3)
        )));
    }
    if root <= inter {
        return Err(CaError::Invalid(format!(
            "error configuring provider: root cert TTL is set and is not greater than intermediate cert ttl. root cert ttl: {}, intermediate cert ttl: {}",
            crate::duration::format(root),
            crate::duration::format(inter)
        )));
    }
    match (c.private_key_type.as_str(), c.private_key_bits) {
        ("ec", 256 | 384) => {}
        ("ec", _) => return Err(CaError::Invalid("error configuring provider: EC key length must be one of (256, 384) bits".into())),
        ("rsa", _) => {
            return Err(CaError::Invalid("error configuring provider: RSA keys are not supported by this CA; use PrivateKeyType \"ec\"".into()));
        }
        _ => return Err(CaError::Invalid("error configuring provider: private key type must be either 'ec' or 'rsa'".into())),
    }
    if !(c.csr_max_per_second >= 0.0 && c.csr_max_per_second.is_finite()) {
        return Err(CaError::Invalid("error configuring provider: CSRMaxPerSecond must be a non-negative number".into()));
    }
    Ok(())
}

fn key_for(c: &CaConfig) -> Result<KeyPair, CaError> {
    let alg = match c.private_key_bits {
        384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        _ => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    Ok(KeyPair::generate_for(alg)?)
}

fn random_label() -> String {
    use rand::RngExt;
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..8).map(|_| A[rng.random_range(0..A.len())] as char).collect()
}

fn random_serial() -> rcgen::SerialNumber {
    use rand::RngExt;
    let mut b: [u8; 16] = rand::rng().random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and never short
    rcgen::SerialNumber::from(b.to_vec())
}

/// The parameters of a CA certificate for `trust_domain`: the same for a root and for the
/// cross-signed copy of it, so that both carry one subject and one key identifier.
fn ca_params(common_name: &str, trust_domain: &str, validity: Duration) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.subject_alt_names = vec![SanType::URI(spiffe::signing_uri(trust_domain).try_into()?)];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = now_offset(BACKDATE, true);
    p.not_after = now_offset(validity, false);
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Facts read back from a certificate.
pub struct CertInfo {
    pub fingerprint: String,
    pub key_id: String,
    pub authority_key_id: String,
    pub serial: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub fn cert_info(pem: &str) -> Option<CertInfo> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| std::time::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    let mut key_id = String::new();
    let mut authority_key_id = String::new();
    for ext in c.extensions() {
        match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => key_id = colon_hex(k.0),
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                authority_key_id = a.key_identifier.as_ref().map(|k| colon_hex(k.0)).unwrap_or_default()
            }
            _ => {}
        }
    }
    Some(CertInfo {
        fingerprint: colon_hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der.as_ref()).as_ref()),
        key_id,
        authority_key_id,
        serial: c.raw_serial().to_vec(),
        not_before: at(c.validity().not_before),
        not_after: at(c.validity().not_after),
    })
}

/// A new self-signed root for the cluster, active, signing leaves itself.
pub fn generate_root(cluster_id: &str, config: &CaConfig) -> Result<(CaRoot, KeyPair), CaError> {
    validate_config(config)?;
    let td = format!("{}.consul", cluster_id.to_ascii_lowercase());
    let cn = format!("pri-{}.consul.ca.{}.consul", random_label(), cluster_id.get(..8).unwrap_or(cluster_id));
    let params = ca_params(&cn, &td, ttl("RootCertTTL", &config.root_cert_ttl)?)?;
    let key = key_for(config)?;
    let cert = params.self_signed(&key)?;
    let pem = cert.pem();
    let info = cert_info(&pem).ok_or_else(|| CaError::Invalid("generated root does not parse".into()))?;
    let root = CaRoot {
        id: info.fingerprint,
        name: "Consul CA Primary Cert".into(),
        serial_number: info.serial.iter().rev().take(8).rev().fold(0u64, |a, b| (a << 8) | u64::from(*b)),
        signing_key_id: info.key_id,
        external_trust_domain: cluster_id.to_string(),
        not_before: crate::duration::rfc3339(info.not_before),
        not_after: crate::duration::rfc3339(info.not_after),
        root_cert: pem.clone(),
        intermediate_certs: Vec::new(),
        active: true,
        private_key_type: config.private_key_type.clone(),
        private_key_bits: config.private_key_bits,
        rotated_out_at_ms: 0,
        signing_cert: pem,
        signing_key: key.serialize_pem(),
        create_index: 0,
        modify_index: 0,
    };
    Ok((root, key))
}

/// Rotate `ca` to a freshly generated root: the old active root signs the new one (so leaves
/// of either verify against the other's holders while they renew) and stays listed, inactive,
/// until it is pruned.
pub fn rotate(ca: &ConnectCa, config: &CaConfig, now_ms: u64) -> Result<ConnectCa, CaError> {
    let (mut new_root, new_key) = generate_root(&ca.cluster_id, config)?;
    let mut next = ca.clone();
    next.config = config.clone();
    if let Some(old) = ca.active_root() {
        let params = {
            let cn = cert_common_name(&new_root.root_cert).unwrap_or_default();
            let mut p = ca_params(&cn, &ca.trust_domain(), CROSS_SIGN_VALIDITY)?;
            // The same key identifier as the new root (from the same key), a new serial.
            p.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(hex_bytes(&new_root.signing_key_id));
            p
        };
        let issuer = Issuer::from_ca_cert_pem(&old.signing_cert, KeyPair::from_pem(&old.signing_key)?)?;
        let cross = params.signed_by(&new_key, &issuer)?;
        new_root.intermediate_certs.insert(0, cross.pem());
    } else if !config.force_without_cross_signing && !ca.roots.is_empty() {
        return Err(CaError::Invalid("no active root to cross-sign the new one with".into()));
    }
    for r in &mut next.roots {
        if r.active {
            r.active = false;
            r.rotated_out_at_ms = now_ms;
        }
    }
    next.roots.push(new_root);
    Ok(next)
}

fn hex_bytes(colon_hex: &str) -> Vec<u8> {
    colon_hex.split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect()
}

fn cert_common_name(pem: &str) -> Option<String> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    c.subject().iter_common_name().next()?.as_str().ok().map(str::to_string)
}

/// Drop roots rotated out more than twice the leaf lifetime ago: no valid leaf needs them.
pub fn prune(ca: &ConnectCa, now_ms: u64) -> Option<ConnectCa> {
    let leaf_ms = crate::duration::parse(&ca.config.leaf_cert_ttl).unwrap_or(Duration::from_secs(72 * 3600)).as_millis() as u64;
    let keep: Vec<CaRoot> = ca
        .roots
        .iter()
        .filter(|r| r.active || r.rotated_out_at_ms == 0 || now_ms.saturating_sub(r.rotated_out_at_ms) <= 2 * leaf_ms)
        .cloned()
        .collect();
    (keep.len() != ca.roots.len()).then(|| ConnectCa { roots: keep, ..ca.clone() })
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// The leaf followed by the active root's intermediates.
    pub cert_pem: String,
    pub serial: String,
    pub service_uri: String,
    pub valid_after: SystemTime,
    pub valid_before: SystemTime,
}

/// Sign a service's CSR with this datacenter's signing certificate. The CSR must ask for
/// exactly one URI SAN, a service identity in this trust domain and datacenter (Consul's rules
/// and messages); the certificate carries that and nothing else of the request.
pub fn sign_leaf(ca: &ConnectCa, datacenter: &str, csr_der: &[u8]) -> Result<IssuedLeaf, CaError> {
    let root = ca.active_root().ok_or(CaError::NotInitialized)?;
    if root.signing_key.is_empty() {
        return Err(CaError::NotInitialized);
    }
    let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
        .map_err(|e| CaError::Invalid(format!("invalid certificate signing request: {e}")))?;
    let uris: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    if csr.params.subject_alt_names.iter().any(|s| matches!(s, SanType::Rfc822Name(_))) {
        return Err(CaError::Invalid("CSR SAN does not allow specifying email addresses".into()));
    }
    let [uri] = uris.as_slice() else {
        return Err(CaError::Invalid(format!("CSR SAN contains an invalid number of URIs: {}", uris.len())));
    };
    let id = spiffe::parse_service(uri).map_err(|e| CaError::Invalid(e.to_string()))?;
    if !id.datacenter.eq_ignore_ascii_case(datacenter) {
        return Err(CaError::Invalid(format!("SPIFFE ID in CSR from a different datacenter: {}, we are {datacenter}", id.datacenter)));
    }
    if id.trust_domain != ca.trust_domain() {
        return Err(CaError::Invalid(format!("SPIFFE ID in CSR from a different trust domain: {}, we are {}", id.trust_domain, ca.trust_domain())));
    }
    let leaf_ttl = ttl("LeafCertTTL", &ca.config.leaf_cert_ttl)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
    // Consul names leaves after their service; identity is the URI, the CN is for people.
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, id.service.clone());
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages =
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::DataEncipherment, KeyUsagePurpose::KeyAgreement];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = now_offset(BACKDATE, true);
    p.not_after = p.not_before.saturating_add(time::Duration::try_from(leaf_ttl).unwrap_or(time::Duration::MAX));
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_pem(&root.signing_cert, KeyPair::from_pem(&root.signing_key)?)?;
    let cert = p.signed_by(&csr.public_key, &issuer)?;
    let mut cert_pem = cert.pem();
    for i in &root.intermediate_certs {
        cert_pem.push_str(i);
        if !i.ends_with('\n') {
            cert_pem.push('\n');
        }
    }
    let info = cert_info(&cert_pem).ok_or_else(|| CaError::Invalid("signed leaf does not parse".into()))?;
    Ok(IssuedLeaf { cert_pem, serial: colon_hex(&info.serial), service_uri: id.uri(), valid_after: info.not_before, valid_before: info.not_after })
}

/// A key and a CSR asking for `uri` (what an agent sends to have a leaf signed).
pub fn leaf_csr(uri: &str) -> Result<(Vec<u8>, String), CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    let key = KeyPair::generate()?;
    let csr = p.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

/// A secondary datacenter's intermediate: key and CSR for the trust domain's signing identity.
pub fn intermediate_csr(trust_domain: &str, config: &CaConfig) -> Result<(Vec<u8>, String), CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = vec![SanType::URI(spiffe::signing_uri(trust_domain).try_into()?)];
    let key = key_for(config)?;
    let csr = p.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

/// Sign a secondary datacenter's intermediate CA with the primary's active root.
pub fn sign_intermediate(ca: &ConnectCa, datacenter: &str, csr_der: &[u8]) -> Result<String, CaError> {
    let root = ca.active_root().ok_or(CaError::NotInitialized)?;
    let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
        .map_err(|e| CaError::Invalid(format!("invalid intermediate signing request: {e}")))?;
    let cn = format!("sec-{}.consul.ca.{}.{datacenter}.consul", random_label(), ca.cluster_id.get(..8).unwrap_or(&ca.cluster_id));
    let validity = ttl("IntermediateCertTTL", &ca.config.intermediate_cert_ttl)?;
    let mut p = ca_params(&cn, &ca.trust_domain(), validity)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let issuer = Issuer::from_ca_cert_pem(&root.signing_cert, KeyPair::from_pem(&root.signing_key)?)?;
    Ok(p.signed_by(&csr.public_key, &issuer)?.pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> ConnectCa {
        let (root, _) = generate_root("11111111-2222-3333-4444-555555555555", &CaConfig::default()).unwrap();
        ConnectCa { cluster_id: "11111111-2222-3333-4444-555555555555".into(), roots: vec![root], ..Default::default() }
    }

    fn verifies(leaf_pem: &str, roots: &[&str]) -> bool {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            for c in rustls_pemfile::certs(&mut r.as_bytes()) {
                store.add(c.unwrap()).unwrap();
            }
        }
        let mut chain: Vec<_> = rustls_pemfile::certs(&mut leaf_pem.as_bytes()).map(|c| c.unwrap()).collect();
        let end = chain.remove(0);
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(store),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        v.verify_client_cert(&end, &chain, rustls::pki_types::UnixTime::now()).is_ok()
    }

    #[test]
    fn a_leaf_carries_the_services_spiffe_id_and_verifies_against_the_root() {
        let ca = ca();
        let uri = spiffe::service_uri(&ca.trust_domain(), "dc1", "web");
        let (csr, _key) = leaf_csr(&uri).unwrap();
        let leaf = sign_leaf(&ca, "dc1", &csr).unwrap();
        assert_eq!(leaf.service_uri, uri);
        let der = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes()).next().unwrap().unwrap();
        assert_eq!(spiffe::uri_sans(&der), vec![uri]);
        assert!(verifies(&leaf.cert_pem, &[&ca.roots[0].root_cert]));
        let info = cert_info(&leaf.cert_pem).unwrap();
        assert_eq!(info.authority_key_id, ca.roots[0].signing_key_id);
        assert!(info.not_after.duration_since(info.not_before).unwrap() >= Duration::from_secs(72 * 3600));
    }

    #[test]
    fn csrs_for_other_datacenters_domains_or_kinds_are_refused() {
        let ca = ca();
        let (csr, _) = leaf_csr(&spiffe::service_uri(&ca.trust_domain(), "dc2", "web")).unwrap();
        assert!(sign_leaf(&ca, "dc1", &csr).unwrap_err().to_string().contains("different datacenter"));
        let (csr, _) = leaf_csr(&spiffe::service_uri("other.consul", "dc1", "web")).unwrap();
        assert!(sign_leaf(&ca, "dc1", &csr).unwrap_err().to_string().contains("different trust domain"));
        let (csr, _) = leaf_csr("spiffe://x.consul/agent/server/dc/dc1").unwrap();
        assert!(sign_leaf(&ca, "dc1", &csr).is_err());
        assert!(sign_leaf(&ca, "dc1", b"garbage").is_err());
    }

    #[test]
    fn rotation_cross_signs_so_old_and_new_leaves_verify_on_both_sides() {
        let old = ca();
        let uri = spiffe::service_uri(&old.trust_domain(), "dc1", "web");
        let (csr, _) = leaf_csr(&uri).unwrap();
        let old_leaf = sign_leaf(&old, "dc1", &csr).unwrap();
        let new = rotate(&old, &CaConfig::default(), 1).unwrap();
        assert_eq!(new.roots.len(), 2);
        assert!(!new.roots[0].active && new.roots[1].active);
        assert_eq!(new.roots[1].intermediate_certs.len(), 1, "the cross-signed certificate");
        let new_leaf = sign_leaf(&new, "dc1", &csr).unwrap();
        // A peer that still trusts only the old root accepts a new leaf (through the
        // cross-signed certificate it carries); a peer with both roots accepts either leaf.
        assert!(verifies(&new_leaf.cert_pem, &[&old.roots[0].root_cert]));
        assert!(verifies(&old_leaf.cert_pem, &[&new.roots[0].root_cert, &new.roots[1].root_cert]));
        assert!(verifies(&new_leaf.cert_pem, &[&new.roots[1].root_cert]));
        assert!(prune(&new, 2).is_none(), "the old root is kept while leaves may need it");
        assert_eq!(prune(&new, 1 + 7 * 24 * 3600 * 1000).unwrap().roots.len(), 1);
    }

    #[test]
    fn secondary_intermediates_chain_to_the_primary_root() {
        let primary = ca();
        let (csr, key) = intermediate_csr(&primary.trust_domain(), &CaConfig::default()).unwrap();
        let inter = sign_intermediate(&primary, "dc2", &csr).unwrap();
        let info = cert_info(&inter).unwrap();
        let mut secondary = primary.clone();
        let r = &mut secondary.roots[0];
        r.intermediate_certs.push(inter.clone());
        r.signing_cert = inter;
        r.signing_key = key;
        r.signing_key_id = info.key_id;
        let (leaf_csr_der, _) = leaf_csr(&spiffe::service_uri(&primary.trust_domain(), "dc2", "api")).unwrap();
        let leaf = sign_leaf(&secondary, "dc2", &leaf_csr_der).unwrap();
        assert!(verifies(&leaf.cert_pem, &[&primary.roots[0].root_cert]), "a dc2 leaf verifies in dc1");
    }

    #[test]
    fn configuration_errors_use_consuls_messages() {
        let bad = |f: fn(&mut CaConfig)| {
            let mut c = CaConfig::default();
            f(&mut c);
            validate_config(&c).unwrap_err().to_string()
        };
        assert!(bad(|c| c.leaf_cert_ttl = "30m".into()).contains("leaf cert TTL must be greater or equal than 1h0m0s"));
        assert!(bad(|c| c.intermediate_cert_ttl = "100h".into()).contains("3 * LeafCertTTL"));
        assert!(bad(|c| c.root_cert_ttl = "100h".into()).contains("root cert TTL"));
        assert!(bad(|c| c.private_key_type = "dsa".into()).contains("'ec' or 'rsa'"));
        assert!(bad(|c| c.provider = "vault".into()).contains("unknown CA provider"));
        assert!(validate_config(&CaConfig::default()).is_ok());
    }
}
