//! SPIFFE identities of the mesh, as Consul forms them:
//! `spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>` for services, and the URI SANs of
//! peer certificates.

use rustls::pki_types::CertificateDer;

/// A service's SPIFFE ID.
pub fn service_uri(trust_domain: &str, dc: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/default/dc/{dc}/svc/{service}")
}

/// The signing identity of the CA itself (a root's or intermediate's URI SAN).
pub fn signing_uri(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}")
}

/// A parsed service identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceId {
    pub trust_domain: String,
    pub namespace: String,
    pub datacenter: String,
    pub service: String,
}

impl ServiceId {
    pub fn uri(&self) -> String {
        format!("spiffe://{}/ns/{}/dc/{}/svc/{}", self.trust_domain, self.namespace, self.datacenter, self.service)
    }
}

/// Why a URI is not a service identity (Consul's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("SPIFFE ID must have 'spiffe' scheme")]
    Scheme,
    #[error("SPIFFE ID is not in the expected format")]
    Format,
}

/// Parse `spiffe://<td>/ns/<ns>/dc/<dc>/svc/<service>`.
pub fn parse_service(uri: &str) -> Result<ServiceId, SpiffeError> {
    let rest = uri.strip_prefix("spiffe://").ok_or(SpiffeError::Scheme)?;
    let (td, path) = rest.split_once('/').ok_or(SpiffeError::Format)?;
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["ns", ns, "dc", dc, "svc", svc] if !td.is_empty() && !ns.is_empty() && !dc.is_empty() && !svc.is_empty() => Ok(ServiceId {
            trust_domain: td.to_ascii_lowercase(),
            namespace: (*ns).to_string(),
            datacenter: (*dc).to_string(),
            service: (*svc).to_string(),
        }),
        _ => Err(SpiffeError::Format),
    }
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The service identity a peer certificate carries, if any.
pub fn service_of(cert: &CertificateDer<'_>) -> Option<ServiceId> {
    uri_sans(cert).iter().find_map(|u| parse_service(u).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ids_round_trip_and_bad_ones_are_named() {
        let uri = service_uri("abc.consul", "dc1", "web");
        let id = parse_service(&uri).unwrap();
        assert_eq!((id.trust_domain.as_str(), id.datacenter.as_str(), id.service.as_str()), ("abc.consul", "dc1", "web"));
        assert_eq!(id.uri(), uri);
        assert_eq!(parse_service("https://x/ns/default/dc/dc1/svc/web"), Err(SpiffeError::Scheme));
        assert_eq!(parse_service("spiffe://td/agent/client/dc/dc1/id/n1"), Err(SpiffeError::Format));
        assert_eq!(parse_service("spiffe://td/ns/default/dc/dc1/svc/"), Err(SpiffeError::Format));
    }
}
