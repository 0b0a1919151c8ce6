//! Parsing question names into Consul lookups, and building the names answers point to.
//!
//! Everything here is pure: labels in, a [`Lookup`] out. Labels are already lowercased.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{Name, RecordType};

/// What a name under the domain asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The domain itself (SOA, NS).
    Apex,
    Service {
        dc: Option<String>,
        service: String,
        tag: Option<String>,
    },
    /// `<service>.connect.<dc>`: the instances that accept the service's mesh connections.
    Connect {
        dc: Option<String>,
        service: String,
    },
    Node {
        dc: Option<String>,
        node: String,
    },
    PreparedQuery {
        dc: Option<String>,
        name: String,
    },
    Addr(IpAddr),
    /// Not a name Consul knows: NXDOMAIN.
    Invalid,
}

/// Parse the labels left of the domain (`["web", "service", "dc1"]` for
/// `web.service.dc1.consul.`), following Consul's rules: the rightmost kind label
/// (`service`, `node`, `query`, `addr`) splits the name into its parts (left) and locality
/// (right); for SRV questions a rightmost label starting with `_` stands for `service`.
pub(crate) fn parse(labels: &[String], qtype: RecordType) -> Lookup {
    if labels.is_empty() {
        return Lookup::Apex;
    }
    let Some((kind, parts, suffix)) = split_kind(labels, qtype) else {
        return Lookup::Invalid;
    };
    match kind {
        "service" => parse_service(parts, suffix),
        "connect" => match (parts, locality(suffix)) {
            ([service], Some(dc)) => Lookup::Connect { dc, service: service.clone() },
            _ => Lookup::Invalid,
        },
        "node" => {
            if parts.is_empty() {
                return Lookup::Invalid;
            }
            match locality(suffix) {
                // A "." in a node name is allowed: the parts are joined back.
                Some(dc) => Lookup::Node { dc, node: parts.join(".") },
                None => Lookup::Invalid,
            }
        }
        "query" => parse_query(parts, suffix),
        "addr" => parse_addr(parts),
        _ => Lookup::Invalid,
    }
}

/// Find the rightmost kind label; returns (kind, parts, suffix).
fn split_kind(labels: &[String], qtype: RecordType) -> Option<(&str, &[String], &[String])> {
    for i in (0..labels.len()).rev() {
        let label = labels[i].as_str();
        match label {
            "service" | "connect" | "node" | "query" | "addr" => return Some((label, &labels[..i], &labels[i + 1..])),
            // `_web._tcp.consul` SRV: the "service" label is optional in the RFC 2782 form.
            _ if qtype == RecordType::SRV && label.starts_with('_') => return Some(("service", &labels[..=i], &labels[i + 1..])),
            _ => {}
        }
    }
    None
}

fn parse_service(parts: &[String], suffix: &[String]) -> Lookup {
    let Some(dc) = locality(suffix) else {
        return Lookup::Invalid;
    };
    match parts {
        [] => Lookup::Invalid,
        // RFC 2782: _<service>._<tag or protocol>; "_tcp" means no tag filter.
        [svc, tag] if svc.starts_with('_') && tag.starts_with('_') => {
            let (service, tag) = (&svc[1..], &tag[1..]);
            if service.is_empty() {
                return Lookup::Invalid;
            }
            let tag = (tag != "tcp" && !tag.is_empty()).then(|| tag.to_string());
            Lookup::Service { dc, service: service.to_string(), tag }
        }
        // Consul 0.3 form: [<tag>.]<service>, a tag may itself contain dots.
        [tag @ .., service] => {
            let tag = (!tag.is_empty()).then(|| tag.join("."));
            Lookup::Service { dc, service: service.clone(), tag }
        }
    }
}

fn parse_query(parts: &[String], suffix: &[String]) -> Lookup {
    // Prepared queries take only the legacy `<dc>` locality, as in Consul.
    let dc = match suffix {
        [] => None,
        [dc] => Some(dc.clone()),
        _ => return Lookup::Invalid,
    };
    let name = match parts {
        [] => return Lookup::Invalid,
        // RFC 2782 form `_<query>._<proto>`: the last part is the (ignored) protocol.
        [first, .., last] if first.starts_with('_') && last.starts_with('_') => parts[..parts.len() - 1].join(".")[1..].to_string(),
        _ => parts.join("."),
    };
    if name.is_empty() {
        return Lookup::Invalid;
    }
    Lookup::PreparedQuery { dc, name }
}

fn parse_addr(parts: &[String]) -> Lookup {
    // `<hex>.addr.<anything>`: Consul ignores the labels after `addr`.
    let [hex] = parts else {
        return Lookup::Invalid;
    };
    match decode_hex(hex).as_deref() {
        Some(&[a, b, c, d]) => Lookup::Addr(IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
        Some(bytes) if bytes.len() == 16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            Lookup::Addr(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => Lookup::Invalid,
    }
}

/// The datacenter from the labels right of the kind: none, `<dc>` (legacy) or `<dc>.dc`.
/// Returns `None` for anything else (peers, partitions and namespaces are not supported).
fn locality(suffix: &[String]) -> Option<Option<String>> {
    match suffix {
        [] => Some(None),
        [dc] => Some(Some(dc.clone())),
        [dc, kind] if kind == "dc" => Some(Some(dc.clone())),
        _ => None,
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// `ip` as the hex label of an `addr` name: 8 digits for IPv4, 32 for IPv6.
pub(crate) fn encode_hex(ip: IpAddr) -> String {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name made of dot-separated `parts` (each may itself contain dots, as node names may)
/// followed by `domain`. Fails for empty labels or names too long for DNS.
pub(crate) fn join_name(parts: &[&str], domain: &Name) -> Option<Name> {
    let mut labels: Vec<&[u8]> = Vec::new();
    for part in parts {
        for label in part.split('.') {
            if label.is_empty() {
                return None;
            }
            labels.push(label.as_bytes());
        }
    }
    let mut name = Name::from_labels(labels).ok()?;
    name.set_fqdn(false);
    name.append_domain(domain).ok()
}

/// A hostname from the catalog (an address that is not an IP) as a fully qualified name.
pub(crate) fn hostname(host: &str) -> Option<Name> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let labels: Vec<&[u8]> = host.split('.').map(str::as_bytes).collect();
    if labels.iter().any(|l| l.is_empty()) {
        return None;
    }
    Name::from_labels(labels).ok()
}

/// The IP address of a full reverse name (`4.3.2.1.in-addr.arpa.`, 32 nibbles of `ip6.arpa.`).
pub(crate) fn arpa_to_ip(name: &Name) -> Option<IpAddr> {
    let net = name.parse_arpa_name().ok()?;
    let full = match net.addr() {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    (net.prefix_len() == full).then(|| net.addr())
}

/// Is `name` (lowercased) under one of the reverse-lookup zones?
pub(crate) fn is_arpa(labels: &[String]) -> bool {
    matches!(labels, [.., a, b] if (a == "in-addr" || a == "ip6") && b == "arpa")
}

/// Encode one node-meta pair as TXT text the way Consul does: RFC 1464 `key=value` with the
/// key's backquotes, `=` and leading/trailing spaces escaped, except that keys starting with
/// `rfc1035-` are published as the bare value.
pub(crate) fn meta_txt(key: &str, value: &str) -> String {
    if key.to_ascii_lowercase().starts_with("rfc1035-") {
        return value.to_string();
    }
    let escaped = key.replace('`', "``").replace('=', "`=");
    let lead = escaped.len() - escaped.trim_start_matches(' ').len();
    let trail = escaped.len() - escaped.trim_end_matches(' ').len();
    let key = if lead == escaped.len() {
        "` ".repeat(lead)
    } else {
        format!("{}{}{}", "` ".repeat(lead), &escaped[lead..escaped.len() - trail], "` ".repeat(trail))
    };
    format!("{key}={}", value.replace('`', "``"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &str) -> Vec<String> {
        if s.is_empty() { Vec::new() } else { s.split('.').map(str::to_string).collect() }
    }

    fn svc(dc: Option<&str>, service: &str, tag: Option<&str>) -> Lookup {
        Lookup::Service { dc: dc.map(str::to_string), service: service.to_string(), tag: tag.map(str::to_string) }
    }

    #[test]
    fn service_names_parse_in_every_consul_form() {
        let a = RecordType::A;
        assert_eq!(parse(&labels("web.service"), a), svc(None, "web", None));
        assert_eq!(parse(&labels("v1.web.service"), a), svc(None, "web", Some("v1")));
        assert_eq!(parse(&labels("a.b.web.service"), a), svc(None, "web", Some("a.b")));
        assert_eq!(parse(&labels("web.service.dc2"), a), svc(Some("dc2"), "web", None));
        assert_eq!(parse(&labels("web.service.dc2.dc"), a), svc(Some("dc2"), "web", None));
        assert_eq!(parse(&labels("_web._tcp.service"), RecordType::SRV), svc(None, "web", None));
        assert_eq!(parse(&labels("_web._v1.service.dc2.dc"), RecordType::SRV), svc(Some("dc2"), "web", Some("v1")));
        assert_eq!(parse(&labels("_web._tcp"), RecordType::SRV), svc(None, "web", None));
        assert_eq!(parse(&labels("_web._tcp"), a), Lookup::Invalid);
        assert_eq!(parse(&labels("service"), a), Lookup::Invalid);
        assert_eq!(parse(&labels("web.service.x.peer"), a), Lookup::Invalid);
        assert_eq!(parse(&labels("web.service.a.b.c"), a), Lookup::Invalid);
    }

    #[test]
    fn node_query_addr_and_apex_names_parse() {
        let a = RecordType::A;
        assert_eq!(parse(&[], a), Lookup::Apex);
        assert_eq!(parse(&labels("n1.node"), a), Lookup::Node { dc: None, node: "n1".into() });
        assert_eq!(parse(&labels("n.1.node.dc1.dc"), a), Lookup::Node { dc: Some("dc1".into()), node: "n.1".into() });
        assert_eq!(parse(&labels("q.query"), a), Lookup::PreparedQuery { dc: None, name: "q".into() });
        assert_eq!(parse(&labels("_q._tcp.query.dc3"), a), Lookup::PreparedQuery { dc: Some("dc3".into()), name: "q".into() });
        assert_eq!(parse(&labels("q.query.a.dc"), a), Lookup::Invalid);
        assert_eq!(parse(&labels("7f000001.addr.dc1"), a), Lookup::Addr("127.0.0.1".parse().unwrap()));
        assert_eq!(parse(&labels("20010db8000000000000000000000001.addr.dc1"), a), Lookup::Addr("2001:db8::1".parse().unwrap()));
        assert_eq!(parse(&labels("7f0001.addr.dc1"), a), Lookup::Invalid);
        assert_eq!(parse(&labels("zz000001.addr"), a), Lookup::Invalid);
        assert_eq!(parse(&labels("whatever"), a), Lookup::Invalid);
    }

    #[test]
    fn hex_encoding_round_trips_through_addr_names() {
        for ip in ["10.1.2.3", "::1", "2001:db8::ff"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse(&[encode_hex(ip), "addr".into()], RecordType::A), Lookup::Addr(ip));
        }
    }

    #[test]
    fn node_meta_is_encoded_as_rfc_1464_text() {
        assert_eq!(meta_txt("key", "value"), "key=value");
        assert_eq!(meta_txt("a=b", "c`d"), "a`=b=c``d");
        assert_eq!(meta_txt("  k ", "v"), "` ` k` =v");
        assert_eq!(meta_txt("rfc1035-x", "raw text"), "raw text");
    }

    #[test]
    fn reverse_names_map_to_addresses() {
        let v4 = Name::from_ascii("4.3.2.1.in-addr.arpa.").unwrap();
        assert_eq!(arpa_to_ip(&v4), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(arpa_to_ip(&Name::from_ascii("3.2.1.in-addr.arpa.").unwrap()), None);
        let v6 = Name::from_ascii("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.").unwrap();
        assert_eq!(arpa_to_ip(&v6), Some("2001:db8::1".parse().unwrap()));
    }
}
