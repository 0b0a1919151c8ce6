//! The request handler: turns one question into records, then fits them into the message.
//!
//! Answers are computed into owned vectors first (no lock or catalog borrow is held while a
//! response is written), grouped so that trimming keeps each answer with its additional
//! records, then cut to the transport's size with the TC bit set when answers were dropped.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, Query, ResponseCode, emit_message_parts};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use rand::seq::SliceRandom;

use super::names::{self, Lookup};
use super::records::{self, HEADER_LEN, OPT_LEN, ttl_secs};
use super::recursor;
use super::{DnsCatalog, DnsConfig, Health, Instance, LookupError, PtrTarget};

/// Largest UDP answer to a client without EDNS0 (RFC 1035 §4.2.1).
const CLASSIC_UDP_PAYLOAD: u16 = 512;
/// Largest UDP answer whatever the client's EDNS0 buffer says: 64 KiB less the largest IPv4
/// header (60) and the UDP header (8), as Consul caps it, so the datagram can be sent at all.
const MAX_UDP_PAYLOAD: u16 = u16::MAX - 68;
/// Largest TCP answer: the 16-bit length prefix of RFC 1035 §4.2.2.
const MAX_TCP_PAYLOAD: u16 = u16::MAX;
/// Consul's ceiling on `udp_answer_limit`: about what fits in 512 bytes without compression.
const MAX_UDP_ANSWER_LIMIT: usize = 8;
/// Answer groups built per question at most. A compressed A record takes 16 bytes, so no more
/// than ~4096 fit in a 64 KiB message; building more would be work thrown away.
const MAX_ANSWER_GROUPS: usize = 4096;
/// Name servers listed for the domain, as Consul lists at most three servers.
const MAX_NS_RECORDS: usize = 3;
/// How deep a CNAME target inside the domain is resolved through the domain again
/// (Consul's default recursion level), so self-referencing addresses terminate.
const MAX_CNAME_DEPTH: u8 = 3;
/// Distinct hostnames resolved (in the domain or through a recursor) per question: bounds the
/// work one question about a service with many hostname instances can cause.
const MAX_HOST_RESOLUTIONS: usize = 8;
/// Records kept from a hostname's resolution for a client without EDNS0, as in Consul.
const MAX_RESOLVED_RECORDS_CLASSIC: usize = 5;
/// Time a local lookup (catalog calls included) may take before the answer is SERVFAIL:
/// below a typical stub resolver's 5 s timeout, so the client hears a failure rather than
/// nothing and can move on.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(4);
/// TTL of PTR answers: Consul answers them with TTL 0.
const PTR_TTL: u32 = 0;
/// The service whose instances are the domain's name servers (Consul's servers register it).
const SERVER_SERVICE: &str = "consul";

/// One answer with the additional records that belong to it (an SRV and its target's address):
/// trimming drops whole groups, so the additional section always matches the answers.
#[derive(Debug, Default)]
struct Group {
    answers: Vec<Record>,
    extras: Vec<Record>,
}

impl Group {
    fn one(r: Record) -> Self {
        Self { answers: vec![r], extras: Vec::new() }
    }
}

/// The outcome of a question before it is fitted into a message.
#[derive(Debug)]
struct Local {
    code: ResponseCode,
    authoritative: bool,
    groups: Vec<Group>,
    authority: Vec<Record>,
    /// Additional records not tied to one answer (node meta, NS glue): dropped first.
    additional: Vec<Record>,
    /// `udp_answer_limit` applies (service-like answers).
    udp_limit_applies: bool,
    /// `a_record_limit` cut the answer.
    limited: bool,
    /// More answers existed than [`MAX_ANSWER_GROUPS`].
    capped: bool,
}

impl Local {
    fn new(code: ResponseCode) -> Self {
        Self {
            code,
            authoritative: true,
            groups: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            udp_limit_applies: false,
            limited: false,
            capped: false,
        }
    }

    fn answers(groups: Vec<Group>) -> Self {
        Self { groups, ..Self::new(ResponseCode::NoError) }
    }
}

/// What a request gets back.
enum Reply {
    Answer(Local),
    /// A header-only response (with the request's question).
    Code(ResponseCode),
}

/// Per-question context.
struct Ctx<'a> {
    /// The question name as asked (answers are owned by it, case preserved).
    qname: Name,
    qtype: RecordType,
    /// The domain the question was under (`domain` or `alt_domain`): targets are built in it.
    apex: Name,
    edns: bool,
    /// Hostname resolutions left for this question, shared by nested lookups.
    resolutions: &'a AtomicUsize,
    /// The asking client's address.
    source: Option<IpAddr>,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Clone)]
pub(crate) struct Handler {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DnsConfig,
    catalog: Arc<dyn DnsCatalog>,
    node_name: String,
    /// `domain` and `alt_domain`, lowercased, as labels (for matching) and names.
    domains: Vec<(Vec<String>, Name)>,
    ttl_exact: HashMap<String, u32>,
    /// `prefix*` keys of `service_ttl`, longest prefix first (`*` is the empty prefix).
    ttl_prefix: Vec<(String, u32)>,
}

fn domain_name(s: &str) -> Name {
    let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
    if s.is_empty() {
        return Name::root();
    }
    names::hostname(&s).unwrap_or_else(|| {
        tracing::warn!(domain = %s, "invalid DNS domain, using consul.");
        names::hostname("consul").unwrap_or_else(Name::root)
    })
}

fn labels_of(name: &Name) -> Vec<String> {
    name.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect()
}

impl Handler {
    pub(crate) fn new(cfg: DnsConfig, catalog: Arc<dyn DnsCatalog>, node_name: String) -> Self {
        let mut domains = Vec::new();
        for d in std::iter::once(&cfg.domain).chain(cfg.alt_domain.as_ref()) {
            let name = domain_name(d);
            if !domains.iter().any(|(_, n): &(Vec<String>, Name)| n == &name) {
                domains.push((labels_of(&name), name));
            }
        }
        let mut ttl_exact = HashMap::new();
        let mut ttl_prefix = Vec::new();
        for (key, ttl) in &cfg.service_ttl {
            let key = key.to_ascii_lowercase();
            match key.strip_suffix('*') {
                Some(prefix) => ttl_prefix.push((prefix.to_string(), ttl_secs(*ttl))),
                None => {
                    ttl_exact.insert(key, ttl_secs(*ttl));
                }
            }
        }
        ttl_prefix.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self { inner: Arc::new(Inner { cfg, catalog, node_name, domains, ttl_exact, ttl_prefix }) }
    }
}

impl Handler {
    /// Whether the answer to `name` depends only on this datacenter's catalog, so that it may
    /// be cached per catalog generation: not other datacenters' names, not prepared queries
    /// (their `Near` may depend on the client), not names outside the domain.
    pub(crate) fn cacheable(&self, name: &Name, qtype: RecordType) -> bool {
        let inner = &*self.inner;
        let labels = labels_of(name);
        let Some((_, rest)) = inner.split_domain(&labels) else { return false };
        let own = inner.catalog.datacenter();
        match names::parse(rest, qtype) {
            Lookup::Service { dc, .. } | Lookup::Connect { dc, .. } | Lookup::Node { dc, .. } => dc.is_none_or(|d| d.eq_ignore_ascii_case(&own)),
            Lookup::PreparedQuery { .. } => false,
            Lookup::Apex | Lookup::Addr(_) | Lookup::Invalid => true,
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        let inner = &*self.inner;
        let reply = inner.reply(request).await;
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD));
            e.set_version(0);
            e
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = !inner.cfg.recursors.is_empty();
        let result = match reply {
            Reply::Code(code) => {
                meta.response_code = code;
                response_handle.send_response(builder.build_no_records(meta)).await
            }
            Reply::Answer(local) => {
                let fitted = inner.fit(request, edns.as_ref(), local);
                meta.response_code = fitted.code;
                meta.authoritative = fitted.authoritative;
                meta.truncation = fitted.truncated;
                let resp = builder.build(meta, fitted.answers.iter(), fitted.authority.iter(), std::iter::empty(), fitted.additional.iter());
                response_handle.send_response(resp).await
            }
        };
        result.unwrap_or_else(|error| {
            tracing::debug!(%error, "failed to send DNS response");
            let mut meta = Metadata::response_from_request(&request.metadata);
            meta.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata: meta, counts: HeaderCounts::default() })
        })
    }
}

/// A response ready to encode.
struct Fitted {
    code: ResponseCode,
    authoritative: bool,
    truncated: bool,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additional: Vec<Record>,
}

impl Inner {
    async fn reply(&self, request: &Request) -> Reply {
        if request.metadata.message_type != MessageType::Query {
            return Reply::Code(ResponseCode::FormErr);
        }
        if request.metadata.op_code != OpCode::Query {
            return Reply::Code(ResponseCode::NotImp);
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Reply::Code(ResponseCode::BADVERS);
        }
        let [query] = request.queries.queries() else {
            return Reply::Code(ResponseCode::FormErr);
        };
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return Reply::Code(ResponseCode::Refused);
        }
        let qtype = query.query_type();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return Reply::Code(ResponseCode::NotImp);
        }
        let original = query.original();
        let labels = labels_of(original.name());
        let resolutions = AtomicUsize::new(MAX_HOST_RESOLUTIONS);

        if let Some((apex, rest)) = self.split_domain(&labels) {
            let source = Some(request.src().ip());
            let ctx = Ctx { qname: original.name().clone(), qtype, apex, edns: request.edns.is_some(), resolutions: &resolutions, source };
            let outcome = tokio::time::timeout(LOOKUP_TIMEOUT, self.lookup(&ctx, rest, MAX_CNAME_DEPTH)).await;
            return match outcome {
                Ok(Ok(local)) => Reply::Answer(self.with_soa(local, &ctx.apex)),
                Ok(Err(LookupError::UnknownDatacenter)) => Reply::Answer(self.with_soa(Local::new(ResponseCode::NXDomain), &ctx.apex)),
                Ok(Err(LookupError::Unavailable(error))) => {
                    tracing::warn!(%error, name = %ctx.qname, "DNS lookup failed");
                    Reply::Code(ResponseCode::ServFail)
                }
                Err(_) => {
                    tracing::warn!(name = %ctx.qname, "DNS lookup timed out");
                    Reply::Code(ResponseCode::ServFail)
                }
            };
        }
        if names::is_arpa(&labels) {
            return self.reverse(original, qtype).await;
        }
        self.forward(original).await
    }

    /// Which of our domains `labels` is under (the longest match), and the labels left of it.
    fn split_domain<'l>(&self, labels: &'l [String]) -> Option<(Name, &'l [String])> {
        self.domains
            .iter()
            .filter(|(d, _)| labels.len() >= d.len() && labels[labels.len() - d.len()..] == d[..])
            .max_by_key(|(d, _)| d.len())
            .map(|(d, name)| (name.clone(), &labels[..labels.len() - d.len()]))
    }

    fn primary_domain(&self) -> Name {
        self.domains.first().map(|(_, n)| n.clone()).unwrap_or_else(Name::root)
    }

    /// Negative answers (NXDOMAIN, and NOERROR without answers) carry the SOA (RFC 2308).
    fn with_soa(&self, mut local: Local, apex: &Name) -> Local {
        if local.code == ResponseCode::NXDomain || local.groups.is_empty() {
            local.authority = vec![records::soa(apex, &self.cfg.soa)];
            local.additional.clear();
        }
        local
    }

    fn service_ttl(&self, service: &str) -> u32 {
        let service = service.to_ascii_lowercase();
        if let Some(ttl) = self.ttl_exact.get(&service) {
            return *ttl;
        }
        self.ttl_prefix.iter().find(|(p, _)| service.starts_with(p.as_str())).map_or(0, |(_, ttl)| *ttl)
    }

    fn own_dc<'a>(&self, dc: &'a str, own: &'a str) -> &'a str {
        if dc.is_empty() { own } else { dc }
    }

    /// Answer a name under the domain; `labels` are those left of the domain.
    fn lookup<'a>(&'a self, ctx: &'a Ctx<'a>, labels: &'a [String], depth: u8) -> BoxFut<'a, Result<Local, LookupError>> {
        Box::pin(async move {
            let cat = &*self.catalog;
            match names::parse(labels, ctx.qtype) {
                Lookup::Invalid => Ok(Local::new(ResponseCode::NXDomain)),
                Lookup::Apex => Ok(self.apex(ctx).await),
                Lookup::Service { dc, service, tag } => {
                    let instances = cat.service_instances(dc.as_deref(), &service, tag.as_deref()).await?;
                    let ttl = self.service_ttl(&service);
                    Ok(self.service_answer(ctx, instances, ttl, self.cfg.only_passing, true, depth).await)
                }
                Lookup::Connect { dc, service } => {
                    let instances = cat.connect_instances(dc.as_deref(), &service).await?;
                    let ttl = self.service_ttl(&service);
                    Ok(self.service_answer(ctx, instances, ttl, self.cfg.only_passing, true, depth).await)
                }
                Lookup::PreparedQuery { dc, name } => {
                    let Some(result) = cat.prepared_query(dc.as_deref(), &name, ctx.source).await? else {
                        return Ok(Local::new(ResponseCode::NXDomain));
                    };
                    let ttl = result.ttl.map_or_else(|| self.service_ttl(&result.service), ttl_secs);
                    Ok(self.service_answer(ctx, result.instances, ttl, result.only_passing, !result.ordered, depth).await)
                }
                Lookup::Node { dc, node } => {
                    let Some(info) = cat.node(dc.as_deref(), &node).await? else {
                        return Ok(Local::new(ResponseCode::NXDomain));
                    };
                    Ok(self.node_answer(ctx, &info.address, &info.meta, depth).await)
                }
                Lookup::Addr(ip) => {
                    let mut groups = Vec::new();
                    if wants_addr(ip, ctx.qtype) {
                        groups.push(Group::one(records::addr(ctx.qname.clone(), ip, ttl_secs(self.cfg.node_ttl))));
                    }
                    Ok(Local::answers(groups))
                }
            }
        })
    }

    async fn apex(&self, ctx: &Ctx<'_>) -> Local {
        let soa = || records::soa(&ctx.apex, &self.cfg.soa);
        match ctx.qtype {
            RecordType::SOA => {
                let (ns, glue) = self.name_servers(ctx).await;
                Local { authority: ns, additional: glue, ..Local::answers(vec![Group::one(soa())]) }
            }
            RecordType::NS => {
                let (ns, glue) = self.name_servers(ctx).await;
                Local { additional: glue, ..Local::answers(ns.into_iter().map(Group::one).collect()) }
            }
            RecordType::ANY => {
                let (ns, glue) = self.name_servers(ctx).await;
                let groups = std::iter::once(soa()).chain(ns).map(Group::one).collect();
                Local { additional: glue, ..Local::answers(groups) }
            }
            _ => Local::answers(Vec::new()),
        }
    }

    /// NS records for the domain: up to three servers (instances of `consul`), else this agent's
    /// node, else `ns.<domain>`; with their addresses as glue.
    async fn name_servers(&self, ctx: &Ctx<'_>) -> (Vec<Record>, Vec<Record>) {
        let ttl = ttl_secs(self.cfg.node_ttl);
        let own = self.catalog.datacenter();
        let mut servers: Vec<(String, String, String)> = match self.catalog.service_instances(None, SERVER_SERVICE, None).await {
            Ok(instances) => instances.into_iter().filter(|i| i.status != Health::Critical).map(|i| (i.node, i.node_address, i.datacenter)).collect(),
            Err(error) => {
                tracing::debug!(%error, "listing servers for NS failed");
                Vec::new()
            }
        };
        servers.shuffle(&mut rand::rng());
        let mut seen = HashSet::new();
        servers.retain(|(node, _, _)| seen.insert(node.clone()));
        servers.truncate(MAX_NS_RECORDS);
        if servers.is_empty()
            && let Ok(Some(me)) = self.catalog.node(None, &self.node_name).await
        {
            servers.push((me.name, me.address, me.datacenter));
        }
        let (mut ns, mut glue) = (Vec::new(), Vec::new());
        for (node, address, dc) in servers {
            let Some(target) = names::join_name(&[&node, "node", self.own_dc(&dc, &own)], &ctx.apex).map(|n| n.to_lowercase()) else {
                continue;
            };
            if let Ok(ip) = address.parse::<IpAddr>() {
                glue.push(records::addr(target.clone(), ip, ttl));
            }
            ns.push(records::ns(ctx.apex.clone(), target, ttl));
        }
        if ns.is_empty()
            && let Some(target) = names::join_name(&["ns"], &ctx.apex)
        {
            ns.push(records::ns(ctx.apex.clone(), target, ttl));
        }
        (ns, glue)
    }

    async fn service_answer(&self, ctx: &Ctx<'_>, instances: Vec<Instance>, ttl: u32, only_passing: bool, shuffle: bool, depth: u8) -> Local {
        let mut instances: Vec<Instance> = instances.into_iter().filter(|i| healthy(i.status, only_passing)).collect();
        if instances.is_empty() {
            return Local::new(ResponseCode::NXDomain);
        }
        if shuffle {
            instances.shuffle(&mut rand::rng());
        }
        let mut local = match ctx.qtype {
            RecordType::SRV => self.srv_groups(ctx, &instances, ttl, depth).await,
            RecordType::A | RecordType::AAAA | RecordType::ANY | RecordType::CNAME => self.addr_groups(ctx, &instances, ttl, depth).await,
            _ => Local::answers(Vec::new()),
        };
        local.udp_limit_applies = true;
        local
    }

    /// A/AAAA answers of a service (or the CNAME of the first hostname instance when no
    /// instance has an IP of the asked family, as Consul does).
    async fn addr_groups(&self, ctx: &Ctx<'_>, instances: &[Instance], ttl: u32, depth: u8) -> Local {
        let mut local = Local::answers(Vec::new());
        let mut seen = HashSet::new();
        let mut first_host: Option<Name> = None;
        for inst in instances {
            let address = match self.instance_address(ctx, inst) {
                Address::Ip(ip) => ip,
                Address::Host(host) => {
                    first_host.get_or_insert(host);
                    continue;
                }
                Address::None => continue,
            };
            if !wants_addr(address, ctx.qtype) || !seen.insert(address) {
                continue;
            }
            if self.cfg.a_record_limit > 0 && local.groups.len() == self.cfg.a_record_limit {
                local.limited = true;
                break;
            }
            if local.groups.len() == MAX_ANSWER_GROUPS {
                local.capped = true;
                break;
            }
            local.groups.push(Group::one(records::addr(ctx.qname.clone(), address, ttl)));
        }
        if local.groups.is_empty()
            && let Some(host) = first_host
        {
            let mut answers = vec![records::cname(ctx.qname.clone(), host.clone(), ttl)];
            if ctx.qtype != RecordType::CNAME {
                answers.extend(self.resolve_host(ctx, &host, ttl, depth).await);
            }
            local.groups.push(Group { answers, extras: Vec::new() });
        }
        local
    }

    /// SRV answers, each with its target's address (and node meta) as additional records.
    async fn srv_groups(&self, ctx: &Ctx<'_>, instances: &[Instance], ttl: u32, depth: u8) -> Local {
        let own = self.catalog.datacenter();
        let mut local = Local::answers(Vec::new());
        let mut seen = HashSet::new();
        // Additional records are attached to the first group that needs them only: trimming
        // keeps a prefix of the groups, so every later group's target stays covered.
        let mut covered: HashSet<Name> = HashSet::new();
        let mut resolved: HashMap<Name, Vec<Record>> = HashMap::new();
        for inst in instances {
            if !seen.insert((inst.node.as_str(), self.address_of(inst), inst.port)) {
                continue;
            }
            if local.groups.len() == MAX_ANSWER_GROUPS {
                local.capped = true;
                break;
            }
            let dc = self.own_dc(&inst.datacenter, &own);
            let Some(node_target) = names::join_name(&[&inst.node, "node", dc], &ctx.apex) else {
                continue;
            };
            let mut group = Group::default();
            let target = match self.instance_address(ctx, inst) {
                Address::None => continue,
                Address::Ip(ip) => {
                    let target = if self.service_ip(inst).is_some() {
                        match names::join_name(&[&names::encode_hex(ip), "addr", dc], &ctx.apex) {
                            Some(t) => t,
                            None => continue,
                        }
                    } else {
                        node_target.clone()
                    };
                    if covered.insert(target.clone()) {
                        group.extras.push(records::addr(target.clone(), ip, ttl));
                    }
                    target
                }
                Address::Host(host) => {
                    if covered.insert(host.clone()) {
                        if !resolved.contains_key(&host) {
                            let records = self.resolve_host(ctx, &host, ttl, depth).await;
                            resolved.insert(host.clone(), records);
                        }
                        group.extras.extend(resolved.get(&host).into_iter().flatten().cloned());
                    }
                    host
                }
            };
            if self.cfg.node_meta_txt && !inst.node_meta.is_empty() && covered.insert(txt_key(&node_target)) {
                group.extras.extend(records::meta_txts(&node_target, &inst.node_meta, ttl));
            }
            group.answers.push(records::srv(ctx.qname.clone(), ttl, inst.port, target));
            local.groups.push(group);
        }
        local
    }

    async fn node_answer(&self, ctx: &Ctx<'_>, address: &str, meta: &std::collections::BTreeMap<String, String>, depth: u8) -> Local {
        let ttl = ttl_secs(self.cfg.node_ttl);
        let mut local = Local::answers(Vec::new());
        if !matches!(ctx.qtype, RecordType::A | RecordType::AAAA | RecordType::ANY | RecordType::TXT | RecordType::CNAME) {
            return local;
        }
        if ctx.qtype != RecordType::TXT {
            match address.parse::<IpAddr>() {
                Ok(ip) if wants_addr(ip, ctx.qtype) => local.groups.push(Group::one(records::addr(ctx.qname.clone(), ip, ttl))),
                Ok(_) => {}
                Err(_) => {
                    if let Some(host) = names::hostname(address) {
                        let mut answers = vec![records::cname(ctx.qname.clone(), host.clone(), ttl)];
                        if ctx.qtype != RecordType::CNAME {
                            answers.extend(self.resolve_host(ctx, &host, ttl, depth).await);
                        }
                        local.groups.push(Group { answers, extras: Vec::new() });
                    }
                }
            }
        }
        let txts = records::meta_txts(&ctx.qname, meta, ttl);
        match ctx.qtype {
            RecordType::TXT | RecordType::ANY => local.groups.extend(txts.into_iter().map(Group::one)),
            _ if self.cfg.node_meta_txt => local.additional = txts,
            _ => {}
        }
        local
    }

    /// The address DNS answers for an instance: the service address when set, else the node's.
    fn address_of<'i>(&self, inst: &'i Instance) -> &'i str {
        if inst.service_address.is_empty() { &inst.node_address } else { &inst.service_address }
    }

    fn service_ip(&self, inst: &Instance) -> Option<IpAddr> {
        inst.service_address.parse().ok()
    }

    fn instance_address(&self, ctx: &Ctx<'_>, inst: &Instance) -> Address {
        let address = self.address_of(inst);
        if let Ok(ip) = address.parse::<IpAddr>() {
            return Address::Ip(ip);
        }
        let Some(host) = names::hostname(address) else {
            return Address::None;
        };
        // A service address naming the very service asked about means "the node" (Consul).
        if !inst.service_address.is_empty()
            && host.eq_ignore_root_case(&ctx.qname)
            && let Ok(ip) = inst.node_address.parse::<IpAddr>()
        {
            return Address::Ip(ip);
        }
        Address::Host(host)
    }

    /// Addresses (and CNAMEs) of a hostname that a catalog address pointed to: through the
    /// domain itself when it is ours, else through the recursors, within the question's budget.
    async fn resolve_host(&self, ctx: &Ctx<'_>, host: &Name, ttl: u32, depth: u8) -> Vec<Record> {
        if depth == 0 {
            tracing::debug!(%host, "CNAME chain too deep, not resolving");
            return Vec::new();
        }
        if ctx.resolutions.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_err() {
            return Vec::new();
        }
        let labels = labels_of(host);
        let mut found: Vec<Record> = if let Some((apex, rest)) = self.split_domain(&labels) {
            let sub = Ctx { qname: host.clone(), qtype: RecordType::ANY, apex, edns: ctx.edns, resolutions: ctx.resolutions, source: ctx.source };
            match self.lookup(&sub, rest, depth - 1).await {
                Ok(local) => local.groups.into_iter().flat_map(|g| g.answers).collect(),
                Err(_) => Vec::new(),
            }
        } else if self.cfg.recursors.is_empty() {
            Vec::new()
        } else {
            let query = Query::query(host.clone(), RecordType::A);
            recursor::forward(&self.cfg.recursors, self.cfg.recursor_timeout, &query).await.map(|m| m.answers).unwrap_or_default()
        };
        found.retain(|r| matches!(r.data, RData::A(_) | RData::AAAA(_) | RData::CNAME(_)));
        for r in &mut found {
            r.ttl = ttl;
        }
        if !ctx.edns {
            found.truncate(MAX_RESOLVED_RECORDS_CLASSIC);
        }
        found
    }

    /// PTR questions: the node (or else service) with that address, else the recursors.
    async fn reverse(&self, original: &Query, qtype: RecordType) -> Reply {
        let apex = self.primary_domain();
        let name = original.name();
        let target = match names::arpa_to_ip(&name.to_lowercase()) {
            Some(ip) => match tokio::time::timeout(LOOKUP_TIMEOUT, self.catalog.by_address(ip)).await {
                Ok(Ok(targets)) => self.ptr_target(&targets, &apex),
                Ok(Err(LookupError::UnknownDatacenter)) => None,
                Ok(Err(LookupError::Unavailable(error))) => {
                    tracing::warn!(%error, %name, "PTR lookup failed");
                    return Reply::Code(ResponseCode::ServFail);
                }
                Err(_) => return Reply::Code(ResponseCode::ServFail),
            },
            None => None,
        };
        let Some(target) = target else {
            if !self.cfg.recursors.is_empty() {
                return self.forward(original).await;
            }
            return Reply::Answer(self.with_soa(Local::new(ResponseCode::NXDomain), &apex));
        };
        let mut groups = Vec::new();
        if matches!(qtype, RecordType::PTR | RecordType::ANY) {
            groups.push(Group::one(records::ptr(name.clone(), target, PTR_TTL)));
        }
        Reply::Answer(self.with_soa(Local::answers(groups), &apex))
    }

    fn ptr_target(&self, targets: &[PtrTarget], apex: &Name) -> Option<Name> {
        let own = self.catalog.datacenter();
        let node = targets.iter().find_map(|t| match t {
            PtrTarget::Node { name, dc } => names::join_name(&[name, "node", self.own_dc(dc, &own)], apex),
            PtrTarget::Service { .. } => None,
        });
        node.or_else(|| {
            targets.iter().find_map(|t| match t {
                PtrTarget::Service { service, dc, .. } => names::join_name(&[service, "service", self.own_dc(dc, &own)], apex),
                PtrTarget::Node { .. } => None,
            })
        })
    }

    /// Names outside the domain: the recursors' answer, SERVFAIL when none answered, REFUSED
    /// when there are no recursors.
    async fn forward(&self, original: &Query) -> Reply {
        if self.cfg.recursors.is_empty() {
            return Reply::Code(ResponseCode::Refused);
        }
        let Some(msg) = recursor::forward(&self.cfg.recursors, self.cfg.recursor_timeout, original).await else {
            return Reply::Code(ResponseCode::ServFail);
        };
        Reply::Answer(Local {
            code: msg.metadata.response_code,
            authoritative: false,
            groups: msg.answers.into_iter().map(Group::one).collect(),
            authority: msg.authorities,
            additional: msg.additionals,
            ..Local::new(ResponseCode::NoError)
        })
    }

    /// Cut the answer to what the transport carries: Consul's UDP answer limit for classic
    /// clients, then the message size (512, the client's EDNS0 size, or 64 KiB over TCP).
    fn fit(&self, request: &Request, edns: Option<&Edns>, mut local: Local) -> Fitted {
        let udp = request.protocol() == Protocol::Udp;
        let max = match (udp, edns) {
            (false, _) => MAX_TCP_PAYLOAD,
            (true, Some(e)) => e.max_payload(),
            (true, None) => CLASSIC_UDP_PAYLOAD,
        } as usize;
        let mut truncated = local.capped || (local.limited && self.cfg.enable_truncate);
        if udp && edns.is_none() && local.udp_limit_applies && self.cfg.udp_answer_limit > 0 {
            let limit = self.cfg.udp_answer_limit.min(MAX_UDP_ANSWER_LIMIT);
            if local.groups.len() > limit {
                local.groups.truncate(limit);
                truncated |= self.cfg.enable_truncate;
            }
        }

        let query = request.queries.queries().first().map(|q| q.original().clone()).unwrap_or_default();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.response_code = local.code;
        let probe = Probe { meta: &meta, query: &query, edns, max };
        let cut = probe.cut(&local);
        truncated |= cut.truncated;
        local.groups.truncate(cut.groups);
        let mut answers = Vec::new();
        let mut additional = Vec::new();
        for g in local.groups {
            answers.extend(g.answers);
            additional.extend(g.extras);
        }
        additional.extend(local.additional);
        additional.truncate(cut.additional);
        Fitted {
            code: local.code,
            authoritative: local.authoritative,
            truncated,
            answers,
            authority: if cut.authority { local.authority } else { Vec::new() },
            additional,
        }
    }
}

/// What of a [`Local`] goes into the message: a prefix of the groups, a prefix of the
/// additional records (the kept groups' extras in order, then the loose ones), the authority.
#[derive(Debug, PartialEq, Eq)]
struct Cut {
    groups: usize,
    additional: usize,
    authority: bool,
    truncated: bool,
}

/// Measures candidate responses against the size limit. Encoding is the expensive part of
/// answering (hickory's encoder costs about half a microsecond per record), so the cut is
/// found with an upper-bound estimate first and at most a few trial encodings.
struct Probe<'a> {
    meta: &'a Metadata,
    query: &'a Query,
    edns: Option<&'a Edns>,
    max: usize,
}

impl Probe<'_> {
    /// In order of preference: everything; every answer with the additional records that fit
    /// (no TC: only additional data is left out, RFC 2181 §9), without the authority section
    /// if that does not fit either; as many whole groups as fit, each with its additional
    /// records, and TC.
    fn cut(&self, local: &Local) -> Cut {
        let total = local.groups.len();
        let (fits, counts) = self.measure(local, total, usize::MAX, true);
        if fits {
            return Cut { groups: total, additional: usize::MAX, authority: true, truncated: false };
        }
        let answer_records: usize = local.groups.iter().map(|g| g.answers.len()).sum();
        if counts.answers as usize == answer_records {
            let (mut authority, mut counts) = (true, counts);
            if (counts.authorities as usize) < local.authority.len() {
                authority = false;
                let (fits, c) = self.measure(local, total, usize::MAX, false);
                if fits {
                    return Cut { groups: total, additional: usize::MAX, authority, truncated: false };
                }
                counts = c;
            }
            // The count may include the OPT record: leaving one record more out is safe.
            let additional = (counts.additionals as usize).saturating_sub(usize::from(self.edns.is_some()));
            return Cut { groups: total, additional, authority, truncated: false };
        }
        // Answers must go. Whole groups whose answers fitted in the trial:
        let mut within = counts.answers as usize;
        let mut keep = 0;
        for g in &local.groups {
            if g.answers.len() > within {
                break;
            }
            within -= g.answers.len();
            keep += 1;
        }
        let extras = |k: usize| local.groups[..k].iter().map(|g| g.extras.len()).sum::<usize>();
        if extras(keep) > 0 {
            keep = self.interleaved(local, keep);
            while keep > 0 && !self.measure(local, keep, extras(keep), false).0 {
                keep -= (keep / 16).max(1);
            }
        }
        Cut { groups: keep, additional: extras(keep), authority: total == 0, truncated: true }
    }

    /// Encode the first `groups` groups' answers, the first `additional` additional records and
    /// optionally the authority under the limit: whether all of it fits, and what did.
    fn measure(&self, local: &Local, groups: usize, additional: usize, authority: bool) -> (bool, HeaderCounts) {
        let answers = local.groups[..groups].iter().flat_map(|g| g.answers.iter());
        let extras = local.groups[..groups].iter().flat_map(|g| g.extras.iter()).chain(local.additional.iter()).take(additional);
        let auth = local.authority.iter().filter(|_| authority);

        // Cheap upper bound first: most answers are far below the limit.
        let fixed = HEADER_LEN + self.query.name().len() + 5 + if self.edns.is_some() { OPT_LEN } else { 0 };
        let upper = answers.clone().chain(extras.clone()).chain(auth.clone()).try_fold(fixed, |acc, r| Some(acc + records::wire_len_upper(r)?));
        if upper.is_some_and(|n| n <= self.max) {
            return (true, HeaderCounts::default());
        }
        let mut buf = Vec::with_capacity(self.max.min(8192));
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(u16::try_from(self.max).unwrap_or(u16::MAX));
        let mut meta = *self.meta;
        meta.truncation = false;
        match emit_message_parts(
            &meta,
            &mut std::iter::once(self.query),
            &mut answers.clone(),
            &mut auth.clone(),
            &mut extras.clone(),
            self.edns,
            None,
            &mut encoder,
        ) {
            Ok(header) => (!header.metadata.truncation, header.counts),
            Err(_) => (false, HeaderCounts::default()),
        }
    }

    /// How many of the first `upto` groups fit with their extras, each group's additional
    /// records encoded right after its answers: one pass that estimates the real layout
    /// (all answers, then all additional records) closely; the caller verifies.
    fn interleaved(&self, local: &Local, upto: usize) -> usize {
        let limit = self.max.saturating_sub(if self.edns.is_some() { OPT_LEN } else { 0 });
        let mut buf = Vec::with_capacity(self.max.min(8192));
        let mut encoder = BinEncoder::new(&mut buf);
        if encoder.emit_vec(&[0; HEADER_LEN]).is_err() || self.query.emit(&mut encoder).is_err() {
            return 0;
        }
        for (i, g) in local.groups[..upto].iter().enumerate() {
            for r in g.answers.iter().chain(&g.extras) {
                if r.emit(&mut encoder).is_err() {
                    return i;
                }
            }
            if encoder.offset() > limit {
                return i;
            }
        }
        upto
    }
}

enum Address {
    Ip(IpAddr),
    Host(Name),
    None,
}

/// The key under which a node's meta TXT records are attached once per answer.
fn txt_key(node_target: &Name) -> Name {
    node_target.prepend_label("_txt").unwrap_or_else(|_| node_target.clone())
}

fn healthy(status: Health, only_passing: bool) -> bool {
    match status {
        Health::Passing => true,
        Health::Warning => !only_passing,
        Health::Critical => false,
    }
}

/// Does an address answer a question of `qtype` (A wants IPv4, AAAA IPv6, ANY either)?
fn wants_addr(ip: IpAddr, qtype: RecordType) -> bool {
    match qtype {
        RecordType::ANY => true,
        RecordType::A | RecordType::AAAA => records::family_matches(ip, qtype),
        _ => false,
    }
}
