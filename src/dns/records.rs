//! Record constructors and the size bookkeeping used to fit answers into a message.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::SoaConfig;
use super::names::meta_txt;

/// SRV priority of every instance: Consul gives all instances the same priority.
const SRV_PRIORITY: u16 = 1;
/// SRV weight of every instance: Consul's default weight for passing and warning instances.
const SRV_WEIGHT: u16 = 1;
/// Longest `<character-string>` in a TXT record (RFC 1035 §3.3: one length octet).
const TXT_CHUNK: usize = 255;
/// Fixed part of a resource record on the wire: type, class, TTL and RDLENGTH.
const RR_FIXED_LEN: usize = 10;
/// Size of a DNS message header.
pub(crate) const HEADER_LEN: usize = 12;
/// Size of an OPT record with no options: root name, type, class, TTL, RDLENGTH.
pub(crate) const OPT_LEN: usize = 11;

/// A TTL in whole seconds, saturating.
pub(crate) fn ttl_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// A or AAAA for `ip`.
pub(crate) fn addr(name: Name, ip: IpAddr, ttl: u32) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A::from(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA::from(v6)),
    };
    Record::from_rdata(name, ttl, data)
}

/// Does an address of `ip`'s family answer a question of `qtype`?
pub(crate) fn family_matches(ip: IpAddr, qtype: RecordType) -> bool {
    match qtype {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        _ => true,
    }
}

pub(crate) fn cname(name: Name, target: Name, ttl: u32) -> Record {
    Record::from_rdata(name, ttl, RData::CNAME(CNAME(target)))
}

pub(crate) fn srv(name: Name, ttl: u32, port: u16, target: Name) -> Record {
    Record::from_rdata(name, ttl, RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, port, target)))
}

pub(crate) fn ptr(name: Name, target: Name, ttl: u32) -> Record {
    Record::from_rdata(name, ttl, RData::PTR(PTR(target)))
}

pub(crate) fn ns(name: Name, target: Name, ttl: u32) -> Record {
    Record::from_rdata(name, ttl, RData::NS(NS(target)))
}

/// One TXT record per metadata pair, as Consul publishes node metadata.
pub(crate) fn meta_txts(name: &Name, meta: &BTreeMap<String, String>, ttl: u32) -> Vec<Record> {
    meta.iter()
        .map(|(k, v)| {
            let text = meta_txt(k, v);
            let chunks: Vec<&[u8]> = if text.is_empty() { vec![&[][..]] } else { text.as_bytes().chunks(TXT_CHUNK).collect() };
            Record::from_rdata(name.clone(), ttl, RData::TXT(TXT::from_bytes(chunks)))
        })
        .collect()
}

/// The domain's SOA, owned by `apex` (the domain the question used). Its TTL is the minimum
/// TTL, as Consul does, so negative answers are cached no longer than that.
pub(crate) fn soa(apex: &Name, cfg: &SoaConfig) -> Record {
    let ns = Name::from_ascii("ns").ok().and_then(|n| n.append_domain(apex).ok()).unwrap_or_else(|| apex.clone());
    let mbox = Name::from_ascii("hostmaster").ok().and_then(|n| n.append_domain(apex).ok()).unwrap_or_else(|| apex.clone());
    // Consul uses the current Unix time as serial: the data changes all the time anyway.
    let serial = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0);
    let timer = |d: Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
    let min = ttl_secs(cfg.min_ttl);
    let data = SOA::new(ns, mbox, serial, timer(cfg.refresh), timer(cfg.retry), timer(cfg.expire), min);
    Record::from_rdata(apex.clone(), min, RData::SOA(data))
}

/// An upper bound of the record's size on the wire (names uncompressed), or `None` when the
/// type is not one this module builds (then the caller measures by encoding).
pub(crate) fn wire_len_upper(r: &Record) -> Option<usize> {
    let name = |n: &Name| n.len() + 1;
    let rdata = match &r.data {
        RData::A(_) => 4,
        RData::AAAA(_) => 16,
        RData::CNAME(c) => name(&c.0),
        RData::NS(n) => name(&n.0),
        RData::PTR(p) => name(&p.0),
        RData::SRV(s) => 6 + name(&s.target),
        RData::TXT(t) => t.txt_data.iter().map(|s| s.len() + 1).sum(),
        RData::SOA(s) => name(&s.mname) + name(&s.rname) + 20,
        _ => return None,
    };
    Some(name(&r.name) + RR_FIXED_LEN + rdata)
}
