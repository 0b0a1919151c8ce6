//! Prepared queries (`/v1/query`): stored service queries executed by ID or name, and
//! `name_prefix_match` templates that render a query for any name under their prefix.
//!
//! Storage and lookup are deterministic state; execution here selects the healthy instances in
//! this datacenter. Ordering (shuffle, `Near`), `Limit` and failover to other datacenters are
//! the caller's, since they depend on where and when the query runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::catalog::{ServiceInstance, meta_matches};
use super::{CheckStatus, Outcome, RaftIndex, StateData, Store, Str, Table};

pub const TEMPLATE_TYPE: &str = "name_prefix_match";
/// Consul's message for an ID or name that names no query.
pub const NOT_FOUND: &str = "Query not found";

/// A prepared query in Consul's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct PreparedQuery {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    /// When set, the query is deleted with this session.
    pub session: String,
    pub token: String,
    pub template: QueryTemplate,
    pub service: ServiceSpec,
    #[serde(rename = "DNS")]
    pub dns: QueryDns,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryTemplate {
    /// Empty for a static query, else `name_prefix_match`.
    #[serde(rename = "Type")]
    pub kind: String,
    pub regexp: String,
    pub remove_empty_tags: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceSpec {
    pub service: String,
    pub failover: QueryFailover,
    #[serde(rename = "IgnoreCheckIDs")]
    pub ignore_check_ids: Vec<String>,
    pub only_passing: bool,
    pub near: String,
    /// Required tags, and `!tag` for excluded ones.
    pub tags: Vec<String>,
    pub node_meta: BTreeMap<String, String>,
    pub service_meta: BTreeMap<String, String>,
    pub connect: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryFailover {
    #[serde(rename = "NearestN")]
    pub nearest_n: i64,
    pub datacenters: Vec<String>,
    pub targets: Vec<QueryTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryTarget {
    pub peer: String,
    pub datacenter: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryDns {
    #[serde(rename = "TTL")]
    pub ttl: String,
}

impl PreparedQuery {
    pub fn is_template(&self) -> bool {
        !self.template.kind.is_empty()
    }

    /// Render a template for `name` (which its prefix matched): interpolate every string of
    /// the `Service` block. A static query comes back unchanged.
    pub fn render(&self, name: &str) -> Result<PreparedQuery, String> {
        if !self.is_template() {
            return Ok(self.clone());
        }
        let captures: Vec<String> = if self.template.regexp.is_empty() {
            Vec::new()
        } else {
            let re = regex::Regex::new(&self.template.regexp).map_err(|e| format!("Invalid template Regexp: {e}"))?;
            re.captures(name).map(|c| c.iter().map(|m| m.map(|m| m.as_str().to_string()).unwrap_or_default()).collect()).unwrap_or_default()
        };
        let vars = Vars { full: name, prefix: &self.name, suffix: name.get(self.name.len()..).unwrap_or(""), captures: &captures };
        let mut q = self.clone();
        let s = &mut q.service;
        s.service = vars.interpolate(&s.service)?;
        s.near = vars.interpolate(&s.near)?;
        for v in s.tags.iter_mut().chain(s.ignore_check_ids.iter_mut()).chain(s.failover.datacenters.iter_mut()) {
            *v = vars.interpolate(v)?;
        }
        for v in s.node_meta.values_mut().chain(s.service_meta.values_mut()) {
            *v = vars.interpolate(v)?;
        }
        if self.template.remove_empty_tags {
            s.tags.retain(|t| !t.is_empty());
        }
        Ok(q)
    }

    /// Check a query as the API receives it; `Err` is the message users see.
    pub fn validate(&self) -> Result<(), String> {
        if self.service.service.is_empty() {
            return Err("Must provide a Service name to query".into());
        }
        if self.service.failover.nearest_n < 0 {
            return Err(format!("Bad NearestN '{}', must be >= 0", self.service.failover.nearest_n));
        }
        if !self.service.failover.targets.is_empty() && (self.service.failover.nearest_n != 0 || !self.service.failover.datacenters.is_empty()) {
            return Err("Failover Targets cannot be used with NearestN or Datacenters".into());
        }
        if !self.dns.ttl.is_empty() && crate::duration::parse(&self.dns.ttl).is_none() {
            return Err(format!("Bad DNS TTL '{}': not a duration like \"10s\"", self.dns.ttl));
        }
        match self.template.kind.as_str() {
            "" => {
                if !self.template.regexp.is_empty() {
                    return Err("Regexp is only allowed in a template".into());
                }
            }
            TEMPLATE_TYPE => {
                if !self.template.regexp.is_empty() {
                    regex::Regex::new(&self.template.regexp).map_err(|e| format!("Invalid template Regexp: {e}"))?;
                }
                // Rendering against the prefix itself reports unknown variables now, not at
                // the first execution.
                self.render(&self.name)?;
            }
            other => return Err(format!("Bad Template Type '{other}'")),
        }
        Ok(())
    }
}

struct Vars<'a> {
    full: &'a str,
    prefix: &'a str,
    suffix: &'a str,
    captures: &'a [String],
}

impl Vars<'_> {
    /// Replace `${name.full}`, `${name.prefix}`, `${name.suffix}`, `${match(N)}` and
    /// `${agent.segment}` (always empty: there are no network segments).
    fn interpolate(&self, s: &str) -> Result<String, String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| format!("Invalid template: unterminated variable in {s:?}"))?;
            let var = after[..end].trim();
            let value = match var {
                "name.full" => self.full.to_string(),
                "name.prefix" => self.prefix.to_string(),
                "name.suffix" => self.suffix.to_string(),
                "agent.segment" => String::new(),
                _ => match var.strip_prefix("match(").and_then(|v| v.strip_suffix(')')).map(|n| n.trim().parse::<usize>()) {
                    Some(Ok(n)) => self.captures.get(n).cloned().unwrap_or_default(),
                    _ => return Err(format!("Invalid template: unknown variable ${{{var}}} in {s:?}")),
                },
            };
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

impl Store {
    pub(super) fn query_set(&mut self, index: RaftIndex, q: &PreparedQuery) -> Outcome {
        if q.id.is_empty() {
            return Outcome::Rejected("Missing query ID".into());
        }
        if !q.session.is_empty() && !self.data.sessions.contains_key(&q.session) {
            return Outcome::Rejected(format!("Invalid session {:?}", q.session));
        }
        for other in self.data.prepared_queries.values().filter(|o| o.id != q.id) {
            if !q.name.is_empty() && other.name.eq_ignore_ascii_case(&q.name) {
                return Outcome::Rejected(format!("Name '{}' aliases an existing query name", q.name));
            }
            if other.id.eq_ignore_ascii_case(&q.name) {
                return Outcome::Rejected(format!("Name '{}' aliases an existing query ID", q.name));
            }
            if q.is_template() && other.is_template() && q.name.is_empty() && other.name.is_empty() {
                return Outcome::Rejected("A catch-all template (empty Name) already exists".into());
            }
        }
        let mut q = q.clone();
        q.create_index = self.data.prepared_queries.get(&q.id).map_or(index, |old| old.create_index);
        q.modify_index = index;
        self.data.prepared_queries.insert(q.id.clone(), q);
        self.touch(Table::PreparedQueries);
        Outcome::Done
    }

    pub(super) fn query_delete(&mut self, id: &str) -> Outcome {
        let found = self.data.prepared_queries.remove(id).is_some();
        if found {
            self.touch(Table::PreparedQueries);
        }
        Outcome::Applied(found)
    }

    /// Queries bound to a session go with it.
    pub(super) fn queries_of_session_gone(&mut self, session: &str) {
        let before = self.data.prepared_queries.len();
        self.data.prepared_queries.retain(|_, q| q.session != session);
        if self.data.prepared_queries.len() != before {
            self.touch(Table::PreparedQueries);
        }
    }
}

impl StateData {
    /// The query `id_or_name` names, rendered: by ID, then by exact name among static queries,
    /// then by the template with the longest matching prefix (names compare case-insensitively).
    pub fn resolve_query(&self, id_or_name: &str) -> Result<Option<PreparedQuery>, String> {
        if let Some(q) = self.prepared_queries.get(id_or_name) {
            return q.render(&q.name).map(Some);
        }
        let lower = id_or_name.to_ascii_lowercase();
        let queries = self.prepared_queries.values();
        if let Some(q) = queries.clone().find(|q| !q.is_template() && !q.name.is_empty() && q.name.eq_ignore_ascii_case(id_or_name)) {
            return Ok(Some(q.clone()));
        }
        let template = queries.filter(|q| q.is_template() && lower.starts_with(&q.name.to_ascii_lowercase())).max_by_key(|q| q.name.len());
        template.map(|t| t.render(id_or_name)).transpose()
    }

    /// The instances a rendered query selects in this datacenter, in catalog order.
    pub fn execute_query(&self, q: &PreparedQuery) -> Vec<ServiceInstance> {
        let s = &q.service;
        let (required, excluded): (Vec<&str>, Vec<&str>) = {
            let (ex, req): (Vec<&String>, Vec<&String>) = s.tags.iter().partition(|t| t.starts_with('!'));
            (req.into_iter().map(String::as_str).collect(), ex.into_iter().map(|t| &t[1..]).collect())
        };
        let has = |tags: &[Str], t: &str| tags.iter().any(|x| x.eq_ignore_ascii_case(t));
        let mut out = Vec::new();
        for ((node_name, _), svc) in &self.services {
            if !svc.service.eq_ignore_ascii_case(&s.service)
                || !required.iter().all(|t| has(&svc.tags, t))
                || excluded.iter().any(|t| has(&svc.tags, t))
                || !meta_matches(&svc.meta, &s.service_meta)
            {
                continue;
            }
            let Some(node) = self.nodes.get(node_name) else { continue };
            if !meta_matches(&node.meta, &s.node_meta) {
                continue;
            }
            let checks = self.instance_checks(node_name, &svc.id);
            let worst = checks
                .iter()
                .filter(|c| !s.ignore_check_ids.iter().any(|i| c.check_id == *i))
                .map(|c| c.status)
                .max()
                .unwrap_or(CheckStatus::Passing);
            let healthy = match worst {
                CheckStatus::Passing => true,
                CheckStatus::Warning => !s.only_passing,
                CheckStatus::Critical | CheckStatus::Maintenance => false,
            };
            if healthy {
                out.push(ServiceInstance { node: node.clone(), service: svc.clone(), checks });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::catalog::tests::web_registration;
    use crate::state::tests::req;
    use crate::state::{Command, HealthCheck};

    fn query(id: &str, name: &str, service: &str) -> PreparedQuery {
        PreparedQuery {
            id: id.into(),
            name: name.into(),
            service: ServiceSpec { service: service.into(), ..Default::default() },
            ..Default::default()
        }
    }

    fn template(id: &str, prefix: &str, service: &str, regexp: &str) -> PreparedQuery {
        let mut q = query(id, prefix, service);
        q.template = QueryTemplate { kind: TEMPLATE_TYPE.into(), regexp: regexp.into(), remove_empty_tags: true };
        q
    }

    #[test]
    fn names_are_unique_and_lookups_prefer_ids_then_names_then_the_longest_prefix() {
        let mut s = Store::new();
        assert_eq!(s.apply(2, &req(Command::QuerySet(query("q1", "web-fast", "web")))), Outcome::Done);
        assert!(matches!(s.apply(3, &req(Command::QuerySet(query("q2", "WEB-FAST", "web")))), Outcome::Rejected(m) if m.contains("aliases")));
        assert_eq!(s.apply(4, &req(Command::QuerySet(template("t1", "geo-", "${name.suffix}", "")))), Outcome::Done);
        assert_eq!(s.apply(5, &req(Command::QuerySet(template("t2", "geo-db-", "db-${match(1)}", "^geo-db-(.*)$")))), Outcome::Done);
        assert!(matches!(s.apply(6, &req(Command::QuerySet(template("t3", "", "x", "")))), Outcome::Done));
        assert!(matches!(s.apply(7, &req(Command::QuerySet(template("t4", "", "y", "")))), Outcome::Rejected(m) if m.contains("catch-all")));
        let d = s.data();
        assert_eq!(d.resolve_query("q1").unwrap().unwrap().id, "q1");
        assert_eq!(d.resolve_query("web-fast").unwrap().unwrap().id, "q1");
        assert_eq!(d.resolve_query("geo-cache").unwrap().unwrap().service.service, "cache");
        assert_eq!(d.resolve_query("geo-db-users").unwrap().unwrap().service.service, "db-users");
        assert_eq!(d.resolve_query("anything").unwrap().unwrap().id, "t3");
        // Updating keeps the create index.
        s.apply(8, &req(Command::QuerySet(query("q1", "web-fast", "web2"))));
        let q = &s.data().prepared_queries["q1"];
        assert_eq!((q.create_index, q.modify_index, q.service.service.as_str()), (2, 8, "web2"));
        assert_eq!(s.apply(9, &req(Command::QueryDelete { id: "q1".into() })), Outcome::Applied(true));
        assert_eq!(s.apply(10, &req(Command::QueryDelete { id: "q1".into() })), Outcome::Applied(false));
        // An update of a query deleted meanwhile does not bring it back.
        assert_eq!(s.apply(11, &req(Command::QueryUpdate(query("q1", "web-fast", "web")))), Outcome::Rejected(NOT_FOUND.into()));
        assert!(!s.data().prepared_queries.contains_key("q1"));
    }

    #[test]
    fn templates_interpolate_and_reject_unknown_variables() {
        let mut t = template("t", "geo-db-", "mysql-${match(1)}", r"^geo-db-(.*?)-([^\-]+?)$");
        t.service.tags = vec!["${match(2)}".into(), "${match(7)}".into()];
        let r = t.render("geo-db-customer-primary").unwrap();
        assert_eq!(r.service.service, "mysql-customer");
        assert_eq!(r.service.tags, vec!["primary"], "empty tags removed");
        t.service.near = "${nope}".into();
        assert!(t.validate().unwrap_err().contains("unknown variable"));
        assert!(query("q", "", "").validate().unwrap_err().contains("Service name"));
        let mut bad = template("t", "x", "s", "(");
        assert!(bad.validate().unwrap_err().contains("Regexp"));
        bad.template.kind = "prefix".into();
        assert!(bad.validate().unwrap_err().contains("Bad Template Type"));
    }

    #[test]
    fn execution_filters_health_tags_and_meta_and_sessions_take_their_queries() {
        let mut s = Store::new();
        let mut a = web_registration("n1", "10.0.0.1");
        a.service.as_mut().unwrap().tags = vec!["primary".into()];
        s.apply(1, &req(Command::Register(a)));
        let mut b = web_registration("n2", "10.0.0.2");
        b.service.as_mut().unwrap().tags = vec!["primary".into(), "canary".into()];
        s.apply(2, &req(Command::Register(b)));
        let warn =
            HealthCheck { node: "n1".into(), check_id: "flaky".into(), name: "flaky".into(), status: CheckStatus::Warning, ..Default::default() };
        s.apply(
            3,
            &req(Command::Register(crate::state::Registration {
                node: (*s.data().nodes["n1"]).clone(),
                service: None,
                checks: vec![warn],
                skip_node_update: true,
            })),
        );
        let mut q = query("q", "", "web");
        let nodes = |d: &StateData, q: &PreparedQuery| d.execute_query(q).into_iter().map(|i| i.node.node.clone()).collect::<Vec<_>>();
        assert_eq!(nodes(s.data(), &q), vec!["n1", "n2"]);
        q.service.only_passing = true;
        assert_eq!(nodes(s.data(), &q), vec!["n2"]);
        q.service.ignore_check_ids = vec!["flaky".into()];
        assert_eq!(nodes(s.data(), &q), vec!["n1", "n2"]);
        q.service.tags = vec!["primary".into(), "!canary".into()];
        assert_eq!(nodes(s.data(), &q), vec!["n1"]);

        let session = crate::state::Session { id: "s1".into(), node: "n1".into(), ..Default::default() };
        s.apply(4, &req(Command::SessionCreate(session)));
        let mut bound = query("qs", "bound", "web");
        bound.session = "s1".into();
        assert_eq!(s.apply(5, &req(Command::QuerySet(bound.clone()))), Outcome::Done);
        bound.session = "nope".into();
        assert!(matches!(s.apply(6, &req(Command::QuerySet(bound))), Outcome::Rejected(m) if m.contains("session")));
        s.apply(7, &req(Command::SessionDestroy { id: "s1".into() }));
        assert!(!s.data().prepared_queries.contains_key("qs"));
    }
}
