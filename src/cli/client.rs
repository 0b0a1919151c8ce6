//! Client commands that talk to a running agent over its Consul-compatible
//! HTTP API: `kv`, `catalog`, `operator raft` and `snapshot`.
//!
//! Output, messages and flag semantics follow Consul's CLI. Results go to
//! stdout; every failure (including "no such key" and a failed check-and-set)
//! comes back as an [`anyhow::Error`] whose alternate form (`{:#}`) is the
//! one-line message to print on stderr before exiting with status 1.
//!
//! All HTTP goes through the private [`Api`] helper, which builds the URL
//! (escaped path, query pairs, `?dc=` and `?stale`), sends the request and
//! turns transport failures and non-2xx answers into readable errors.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::{Method, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;

/// Connection flags shared by every client command.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpOpts {
    /// Address of the agent's HTTP API
    #[arg(long = "http-addr", env = "TRELLIS_HTTP_ADDR", default_value = "http://127.0.0.1:8500", global = true)]
    pub http_addr: String,
    /// Datacenter to query (default: the agent's)
    #[arg(long = "datacenter", global = true)]
    pub datacenter: Option<String>,
    /// Allow stale reads
    #[arg(long, global = true)]
    pub stale: bool,
}

/// Read and write the key-value store
#[derive(clap::Subcommand, Debug)]
pub enum KvCommand {
    /// Retrieve the value at KEY, or list keys and values under a prefix
    Get {
        /// Key to read; a prefix with --recurse or --keys (default: the root)
        key: Option<String>,
        /// Print every `key:value` under the prefix
        #[arg(long)]
        recurse: bool,
        /// List the keys under the prefix instead of their values
        #[arg(long)]
        keys: bool,
        /// Separator grouping keys for --keys ("" lists every key)
        #[arg(long, default_value = "/")]
        separator: String,
        /// Print the key's metadata as well as its value
        #[arg(long)]
        detailed: bool,
        /// Base64-encode printed values
        #[arg(long)]
        base64: bool,
    },
    /// Set or update the value at KEY
    Put {
        /// Key to write
        key: String,
        /// Value: a literal, `-` to read stdin or `@PATH` to read a file (default: empty)
        #[arg(allow_hyphen_values = true)]
        value: Option<String>,
        /// Opaque unsigned integer stored with the key
        #[arg(long, default_value_t = 0)]
        flags: u64,
        /// Write only if the key's ModifyIndex equals --modify-index (0: only if absent)
        #[arg(long, requires = "modify_index", conflicts_with_all = ["acquire", "release"])]
        cas: bool,
        /// ModifyIndex expected by --cas
        #[arg(long, requires = "cas")]
        modify_index: Option<u64>,
        /// Take the lock on KEY for --session (creating the key if absent)
        #[arg(long, requires = "session", conflicts_with = "release")]
        acquire: bool,
        /// Give up the lock --session holds on KEY
        #[arg(long, requires = "session")]
        release: bool,
        /// Session ID for --acquire / --release
        #[arg(long)]
        session: Option<String>,
        /// The value is base64-encoded; decode it before writing
        #[arg(long)]
        base64: bool,
    },
    /// Remove KEY, or every key under a prefix
    Delete {
        /// Key (or prefix, with --recurse) to delete
        key: Option<String>,
        /// Delete every key starting with the prefix
        #[arg(long, conflicts_with = "cas")]
        recurse: bool,
        /// Delete only if the key's ModifyIndex equals --modify-index
        #[arg(long, requires = "modify_index")]
        cas: bool,
        /// ModifyIndex expected by --cas
        #[arg(long, requires = "cas")]
        modify_index: Option<u64>,
    },
}

/// List the nodes and services in the catalog
#[derive(clap::Subcommand, Debug)]
pub enum CatalogCommand {
    /// List the nodes in the datacenter
    Nodes {
        /// Show full IDs, tagged addresses and metadata
        #[arg(long)]
        detailed: bool,
        /// Only nodes providing this service
        #[arg(long)]
        service: Option<String>,
        /// Only nodes with this metadata (repeatable)
        #[arg(long = "node-meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        node_meta: Vec<(String, String)>,
    },
    /// List the services registered in the datacenter
    Services {
        /// Only services registered on this node
        #[arg(long)]
        node: Option<String>,
        /// Only services on nodes with this metadata (repeatable)
        #[arg(long = "node-meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        node_meta: Vec<(String, String)>,
        /// Show each service's tags
        #[arg(long)]
        tags: bool,
    },
}

/// Cluster operator tools
#[derive(clap::Subcommand, Debug)]
pub enum OperatorCommand {
    /// Inspect and change the Raft peer set
    #[command(subcommand)]
    Raft(RaftCommand),
}

/// Inspect and change the Raft peer set
#[derive(clap::Subcommand, Debug)]
pub enum RaftCommand {
    /// Show the current Raft peer configuration
    ListPeers,
    /// Remove a server from the Raft configuration
    RemovePeer {
        /// Address of the peer to remove
        #[arg(long, conflicts_with = "id")]
        address: Option<String>,
        /// ID of the peer to remove
        #[arg(long)]
        id: Option<String>,
    },
}

/// Save and restore snapshots of the servers' state
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a point-in-time snapshot of the servers' state to FILE
    Save {
        /// Destination file
        file: PathBuf,
    },
    /// Restore the servers' state from the snapshot in FILE
    Restore {
        /// Snapshot file to restore
        file: PathBuf,
    },
}

/// Runs a `kv` subcommand.
pub async fn kv(opts: &HttpOpts, cmd: KvCommand) -> Result<()> {
    let api = Api::new(opts)?;
    match cmd {
        KvCommand::Get { key, recurse, keys, separator, detailed, base64 } => {
            let key = strip_leading_slash(key.as_deref().unwrap_or_default());
            if key.is_empty() && !(recurse || keys) {
                bail!("Error! Missing KEY argument");
            }
            kv_get(&api, key, keys, recurse, &separator, detailed, base64).await
        }
        KvCommand::Put { key, value, flags, cas, modify_index, acquire, release, session, base64 } => {
            let mut data = read_value(value.as_deref(), std::io::stdin().lock())?;
            if base64 {
                data = BASE64.decode(&data).context("Error! Cannot base 64 decode data")?;
            }
            let mut query = Vec::new();
            if flags != 0 {
                query.push(("flags", Some(flags.to_string())));
            }
            let session = session.unwrap_or_default();
            let (verb, refusal) = if cas {
                let index = modify_index.unwrap_or_default();
                query.push(("cas", Some(index.to_string())));
                ("Data written to", format!("Did not write to {key}: CAS failed"))
            } else if acquire {
                query.push(("acquire", Some(session)));
                ("Lock acquired on", "Did not acquire lock".to_owned())
            } else if release {
                query.push(("release", Some(session)));
                ("Lock released on", "Did not release lock".to_owned())
            } else {
                ("Data written to", format!("Did not write to {key}"))
            };
            let written: bool = api.json(Method::PUT, &kv_path(&key), &query, Some(data)).await.context("Error! Failed writing data")?;
            if !written {
                bail!("Error! {refusal}");
            }
            print_line(format!("Success! {verb}: {key}"))
        }
        KvCommand::Delete { key, recurse, cas, modify_index } => {
            let key = strip_leading_slash(key.as_deref().unwrap_or_default());
            if key.is_empty() && !recurse {
                bail!("Error! Missing KEY argument");
            }
            let path = kv_path(key);
            if recurse {
                api.send(Method::DELETE, &path, &[("recurse", None)], None).await.with_context(|| format!("Error! Did not delete prefix {key}"))?;
                return print_line(format!("Success! Deleted keys with prefix: {key}"));
            }
            let query = match (cas, modify_index) {
                (true, Some(index)) => vec![("cas", Some(index.to_string()))],
                _ => Vec::new(),
            };
            let deleted: bool = api.json(Method::DELETE, &path, &query, None).await.with_context(|| format!("Error! Did not delete key {key}"))?;
            if !deleted {
                bail!("Error! Did not delete key {key}: CAS failed");
            }
            print_line(format!("Success! Deleted key: {key}"))
        }
    }
}

/// Runs a `catalog` subcommand.
pub async fn catalog(opts: &HttpOpts, cmd: CatalogCommand) -> Result<()> {
    let api = Api::new(opts)?;
    match cmd {
        CatalogCommand::Nodes { detailed, service, node_meta } => {
            let query = node_meta_query(&node_meta);
            let nodes: Vec<CatalogNode> = match &service {
                Some(name) => api
                    .get_or_default(&format!("catalog/service/{}", escape(name, false)), &query)
                    .await
                    .context("Error listing nodes for service")?,
                None => api.get_or_default("catalog/nodes", &query).await.context("Error listing nodes")?,
            };
            if nodes.is_empty() {
                eprintln!("No nodes match the given query - try expanding your search.");
                return Ok(());
            }
            print_line(render_nodes(&nodes, detailed))
        }
        CatalogCommand::Services { node, node_meta, tags } => {
            let query = node_meta_query(&node_meta);
            let services: BTreeMap<String, Vec<String>> = match &node {
                Some(name) => {
                    let listing: NodeServices = api
                        .get_or_default(&format!("catalog/node-services/{}", escape(name, false)), &query)
                        .await
                        .context("Error listing services for node")?;
                    let mut services = BTreeMap::<String, Vec<String>>::new();
                    for entry in listing.services.unwrap_or_default() {
                        let tags = entry.tags.unwrap_or_default();
                        services.entry(entry.service).or_default().extend(tags);
                    }
                    services
                }
                None => {
                    let services: BTreeMap<String, Option<Vec<String>>> =
                        api.get_or_default("catalog/services", &query).await.context("Error listing services")?;
                    services.into_iter().map(|(name, tags)| (name, tags.unwrap_or_default())).collect()
                }
            };
            if services.is_empty() {
                eprintln!("No services match the given query - try expanding your search.");
                return Ok(());
            }
            print_line(render_services(services, tags))
        }
    }
}

/// Runs an `operator` subcommand.
pub async fn operator(opts: &HttpOpts, cmd: OperatorCommand) -> Result<()> {
    let api = Api::new(opts)?;
    let OperatorCommand::Raft(cmd) = cmd;
    match cmd {
        RaftCommand::ListPeers => {
            let config: RaftConfiguration = api.json(Method::GET, "operator/raft/configuration", &[], None).await.context("Error getting peers")?;
            print_line(render_peers(&config.servers))
        }
        RaftCommand::RemovePeer { address, id } => {
            let (field, value) = match (address, id) {
                (Some(address), None) => ("address", address),
                (None, Some(id)) => ("id", id),
                (None, None) => {
                    bail!("Error removing peer: an address or id is required for the peer to remove")
                }
                (Some(_), Some(_)) => {
                    bail!("Error removing peer: cannot give both an address and id")
                }
            };
            api.send(Method::DELETE, "operator/raft/peer", &[(field, Some(value.clone()))], None).await.context("Error removing peer")?;
            print_line(format!("Removed peer with {field} {value:?}"))
        }
    }
}

/// Runs a `snapshot` subcommand.
pub async fn snapshot(opts: &HttpOpts, cmd: SnapshotCommand) -> Result<()> {
    let api = Api::new(opts)?;
    match cmd {
        SnapshotCommand::Save { file } => {
            let response = api.send(Method::GET, "snapshot", &[], None).await.context("Error saving snapshot")?;
            let index = consul_index(&response).context("Error saving snapshot")?;
            let partial = partial_path(&file);
            let saved = save_body(response, &partial).await;
            let saved = match saved {
                Ok(()) => {
                    tokio::fs::rename(&partial, &file).await.with_context(|| format!("Error renaming {} to {}", partial.display(), file.display()))
                }
                Err(err) => Err(err.context("Error writing snapshot file")),
            };
            if saved.is_err() {
                let _ = tokio::fs::remove_file(&partial).await;
            }
            saved?;
            print_line(format!("Saved and verified snapshot to index {index}"))
        }
        SnapshotCommand::Restore { file } => {
            let body = tokio::fs::read(&file).await.with_context(|| format!("Error opening snapshot file {}", file.display()))?;
            api.send(Method::PUT, "snapshot", &[], Some(body)).await.context("Error restoring snapshot")?;
            print_line("Restored snapshot")
        }
    }
}

// ---------------------------------------------------------------------------
// Membership: members, join, leave, force-leave

/// `trellis members`: the gossip pool as this agent sees it.
pub async fn members(opts: &HttpOpts, wan: bool, status: Option<String>) -> Result<()> {
    let api = Api::new(opts)?;
    let query: Vec<Param<'_>> = if wan { vec![("wan", Some("1".into()))] } else { vec![] };
    let list: Vec<serde_json::Value> = api.json(Method::GET, "agent/members", &query, None).await.context("Error retrieving members")?;
    let status_name = |code: u64| match code {
        1 => "alive",
        2 => "leaving",
        3 => "left",
        4 => "failed",
        _ => "none",
    };
    let mut rows = vec![vec!["Node".to_string(), "Address".into(), "Status".into(), "Type".into(), "Build".into(), "Protocol".into(), "DC".into()]];
    let mut list = list;
    list.sort_by(|a, b| a["Name"].as_str().cmp(&b["Name"].as_str()));
    for m in &list {
        let st = status_name(m["Status"].as_u64().unwrap_or(0));
        if status.as_deref().is_some_and(|want| !regex::Regex::new(&format!("^(?:{want})$")).map(|r| r.is_match(st)).unwrap_or(false)) {
            continue;
        }
        let role = if m["Tags"]["role"] == "consul" { "server" } else { "client" };
        rows.push(vec![
            m["Name"].as_str().unwrap_or("").to_string(),
            format!("{}:{}", m["Addr"].as_str().unwrap_or(""), m["Port"]),
            st.to_string(),
            role.to_string(),
            m["Tags"]["build"].as_str().unwrap_or("").to_string(),
            m["Tags"]["vsn"].as_str().unwrap_or("2").to_string(),
            m["Tags"]["dc"].as_str().unwrap_or("").to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        print_line(line.join("  ").trim_end())?;
    }
    Ok(())
}

/// `trellis join ADDR...`
pub async fn join(opts: &HttpOpts, addrs: &[String], wan: bool) -> Result<()> {
    let api = Api::new(opts)?;
    let mut joined = 0;
    for a in addrs {
        let query: Vec<Param<'_>> = if wan { vec![("wan", Some("1".into()))] } else { vec![] };
        match api.send(Method::PUT, &format!("agent/join/{}", escape(a, false)), &query, None).await {
            Ok(_) => joined += 1,
            Err(e) => eprintln!("Error joining address '{a}': {e:#}"),
        }
    }
    if joined == 0 {
        bail!("Failed to join any nodes.");
    }
    print_line(format!("Successfully joined cluster by contacting {joined} nodes."))
}

/// `trellis leave`: the agent leaves the cluster gracefully and shuts down.
pub async fn leave(opts: &HttpOpts) -> Result<()> {
    Api::new(opts)?.send(Method::PUT, "agent/leave", &[], None).await.context("Error leaving")?;
    print_line("Graceful leave complete")
}

/// `trellis force-leave NODE`: mark a failed member as left.
pub async fn force_leave(opts: &HttpOpts, node: &str) -> Result<()> {
    Api::new(opts)?.send(Method::PUT, &format!("agent/force-leave/{}", escape(node, false)), &[], None).await.context("Error force leaving")?;
    Ok(())
}

/// `trellis event --name NAME [payload]`: fire a user event.
pub async fn event(
    opts: &HttpOpts,
    name: &str,
    payload: Option<String>,
    node: Option<String>,
    service: Option<String>,
    tag: Option<String>,
) -> Result<()> {
    let api = Api::new(opts)?;
    let mut query: Vec<Param<'_>> = Vec::new();
    for (k, v) in [("node", node), ("service", service), ("tag", tag)] {
        if let Some(v) = v {
            query.push((k, Some(v)));
        }
    }
    let ev: serde_json::Value = api
        .json(Method::PUT, &format!("event/fire/{}", escape(name, false)), &query, payload.map(String::into_bytes))
        .await
        .context("Error firing event")?;
    print_line(format!("Event ID: {}", ev["ID"].as_str().unwrap_or("")))
}

/// `trellis watch --type event [--name NAME]`: print events as they arrive, one JSON array
/// per change, until interrupted (a blocking query on `/v1/event/list`).
pub async fn watch_events(opts: &HttpOpts, name: Option<String>) -> Result<()> {
    let api = Api::new(opts)?;
    let mut index = 0u64;
    loop {
        let mut query: Vec<Param<'_>> = vec![("index", Some(index.to_string())), ("wait", Some("5m".into()))];
        if let Some(n) = &name {
            query.push(("name", Some(n.clone())));
        }
        let resp = api.send(Method::GET, "event/list", &query, None).await.context("Error watching events")?;
        let next: u64 = resp.headers().get("x-consul-index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(index);
        let body = resp.text().await.unwrap_or_default();
        if next != index {
            print_line(body.trim())?;
            index = next;
        }
    }
}

/// `trellis keyring`: list the gossip keys, or install, switch to, or remove one on every member.
pub async fn keyring(opts: &HttpOpts, list: bool, install: Option<String>, use_key: Option<String>, remove: Option<String>) -> Result<()> {
    let api = Api::new(opts)?;
    let change = [(Method::POST, install, "installed"), (Method::PUT, use_key, "now the primary key"), (Method::DELETE, remove, "removed")]
        .into_iter()
        .filter_map(|(m, k, what)| k.map(|k| (m, k, what)))
        .collect::<Vec<_>>();
    match (list, change.as_slice()) {
        (true, []) => {
            let rings: Vec<serde_json::Value> = api.json(Method::GET, "operator/keyring", &[], None).await.context("Error listing keys")?;
            for r in rings {
                print_line(format!("==> {} ({}/{} nodes):", r["Datacenter"].as_str().unwrap_or(""), r["NumNodes"], r["NumNodes"]))?;
                for (k, n) in r["Keys"].as_object().cloned().unwrap_or_default() {
                    let primary = if r["PrimaryKeys"].get(&k).is_some() { " (primary)" } else { "" };
                    print_line(format!("  {k} [{n}/{}]{primary}", r["NumNodes"]))?;
                }
            }
            Ok(())
        }
        (false, [(method, key, what)]) => {
            let body = serde_json::to_vec(&serde_json::json!({ "Key": key }))?;
            api.send(method.clone(), "operator/keyring", &[], Some(body)).await.context("Error changing the keyring")?;
            print_line(format!("==> Key {what} on every member"))
        }
        _ => bail!("choose exactly one of --list, --install KEY, --use KEY, --remove KEY"),
    }
}

// ---------------------------------------------------------------------------
// HTTP plumbing

/// One query parameter; `None` is a bare flag such as `?recurse`.
pub(crate) type Param<'a> = (&'a str, Option<String>);

/// The agent's HTTP API, as selected by [`HttpOpts`].
pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    datacenter: Option<String>,
    stale: bool,
}

/// A non-2xx answer, rendered the way Consul's API client renders it.
#[derive(Debug)]
struct UnexpectedStatus {
    status: u16,
    body: String,
}

impl fmt::Display for UnexpectedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Unexpected response code: {}", self.status)?;
        if !self.body.is_empty() {
            write!(f, " ({})", self.body)?;
        }
        Ok(())
    }
}

impl std::error::Error for UnexpectedStatus {}

impl Api {
    pub(crate) fn new(opts: &HttpOpts) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::new(),
            base: base_url(&opts.http_addr)?,
            datacenter: opts.datacenter.clone().filter(|dc| !dc.is_empty()),
            stale: opts.stale,
        })
    }

    /// The full URL for `path` (below `/v1/`, already escaped) with `query`,
    /// plus `dc` and, for reads, `stale`.
    fn url(&self, method: &Method, path: &str, query: &[Param<'_>]) -> String {
        let mut url = format!("{}/v1/{path}", self.base);
        let dc = self.datacenter.clone().map(|dc| ("dc", Some(dc)));
        let stale = (self.stale && *method == Method::GET).then_some(("stale", None));
        let extra = [dc, stale];
        let params = query.iter().chain(extra.iter().flatten());
        for (i, (name, value)) in params.enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(name);
            if let Some(value) = value {
                url.push('=');
                url.push_str(&escape(value, false));
            }
        }
        url
    }

    /// Sends one request; fails on transport errors and non-2xx answers.
    pub(crate) async fn send(&self, method: Method, path: &str, query: &[Param<'_>], body: Option<Vec<u8>>) -> Result<Response> {
        let url = self.url(&method, path, query);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.map_err(|err| {
            if err.is_connect() {
                anyhow!(
                    "cannot reach the Trellis agent at {} ({}); is it running? \
                     Point --http-addr or TRELLIS_HTTP_ADDR at its HTTP API",
                    self.base,
                    root_cause(&err)
                )
            } else {
                anyhow!("request to {url} failed: {}", root_cause(&err))
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(UnexpectedStatus { status: status.as_u16(), body: body.trim().to_owned() }.into())
    }

    /// Sends one request and decodes its JSON answer.
    pub(crate) async fn json<T: DeserializeOwned>(&self, method: Method, path: &str, query: &[Param<'_>], body: Option<Vec<u8>>) -> Result<T> {
        let response = self.send(method, path, query, body).await?;
        let bytes = response.bytes().await.with_context(|| format!("reading the answer from /v1/{path}"))?;
        serde_json::from_slice(&bytes).with_context(|| format!("decoding the answer from /v1/{path}"))
    }

    /// A GET decoded from JSON, where a 404 or a JSON `null` yields
    /// `T::default()`, the way Consul's client treats missing entries.
    pub(crate) async fn get_or_default<T: DeserializeOwned + Default>(&self, path: &str, query: &[Param<'_>]) -> Result<T> {
        match self.json::<Option<T>>(Method::GET, path, query, None).await {
            Ok(found) => Ok(found.unwrap_or_default()),
            Err(err) if is_not_found(&err) => Ok(T::default()),
            Err(err) => Err(err),
        }
    }
}

pub(crate) fn is_not_found(err: &anyhow::Error) -> bool {
    err.downcast_ref::<UnexpectedStatus>().is_some_and(|e| e.status == 404)
}

/// The innermost cause of an error, e.g. "Connection refused (os error 111)".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Normalises `--http-addr`: adds `http://` when no scheme is given and drops
/// trailing slashes. Only plain HTTP is supported.
pub(crate) fn base_url(addr: &str) -> Result<String> {
    let addr = addr.trim().trim_end_matches('/');
    match addr.split_once("://") {
        _ if addr.is_empty() => bail!("--http-addr is empty"),
        None => Ok(format!("http://{addr}")),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => Ok(addr.to_owned()),
        Some((scheme, _)) => {
            bail!("unsupported scheme {scheme:?} in --http-addr {addr:?}; use an http:// address")
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, and `/`
/// too unless `keep_slash`.
pub(crate) fn escape(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') || (keep_slash && byte == b'/') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The API path for a key; `/` inside the key stays a path separator.
fn kv_path(key: &str) -> String {
    format!("kv/{}", escape(strip_leading_slash(key), true))
}

/// Keys never start with `/`; like Consul, forgive a user who types one.
fn strip_leading_slash(key: &str) -> &str {
    key.strip_prefix('/').unwrap_or(key)
}

/// `--node-meta k=v` pairs as Consul's repeated `node-meta=k:v` parameters.
fn node_meta_query(meta: &[(String, String)]) -> Vec<Param<'static>> {
    meta.iter().map(|(key, value)| ("node-meta", Some(format!("{key}:{value}")))).collect()
}

/// Parses a `KEY=VALUE` flag value.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// The `X-Consul-Index` of an answer (0 when absent).
fn consul_index(response: &Response) -> Result<u64> {
    match response.headers().get("X-Consul-Index") {
        None => Ok(0),
        Some(value) => value.to_str().ok().and_then(|v| v.trim().parse().ok()).ok_or_else(|| anyhow!("malformed X-Consul-Index header {value:?}")),
    }
}

// ---------------------------------------------------------------------------
// kv

/// One entry as returned by `GET /v1/kv/...`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct KvPair {
    key: String,
    create_index: u64,
    modify_index: u64,
    lock_index: u64,
    flags: u64,
    /// Base64 as sent on the wire; `None` for an empty value.
    value: Option<String>,
    session: Option<String>,
}

impl KvPair {
    fn value_bytes(&self) -> Result<Vec<u8>> {
        match &self.value {
            None => Ok(Vec::new()),
            Some(encoded) => BASE64.decode(encoded).with_context(|| format!("the value of {} is not valid base64", self.key)),
        }
    }

    /// The value as printed: raw bytes, or base64 text with `--base64`.
    fn printable_value(&self, base64: bool) -> Result<Vec<u8>> {
        let value = self.value_bytes()?;
        Ok(if base64 { BASE64.encode(value).into_bytes() } else { value })
    }
}

const QUERY_FAILED: &str = "Error querying Trellis agent";

/// `kv get`: one value, every pair under a prefix, or the keys under it.
async fn kv_get(api: &Api, key: &str, keys: bool, recurse: bool, separator: &str, detailed: bool, base64: bool) -> Result<()> {
    let path = kv_path(key);
    if keys {
        let mut query = vec![("keys", None)];
        if !separator.is_empty() {
            query.push(("separator", Some(separator.to_owned())));
        }
        let keys: Vec<String> = api.get_or_default(&path, &query).await.context(QUERY_FAILED)?;
        return keys.iter().try_for_each(print_line);
    }
    if recurse {
        let pairs: Vec<KvPair> = api.get_or_default(&path, &[("recurse", None)]).await.context(QUERY_FAILED)?;
        for (i, pair) in pairs.iter().enumerate() {
            if detailed {
                if i > 0 {
                    print_line("")?;
                }
                print_line(render_kv_detailed(pair, base64)?)?;
            } else {
                let mut line = format!("{}:", pair.key).into_bytes();
                line.extend(pair.printable_value(base64)?);
                print_line(line)?;
            }
        }
        return Ok(());
    }
    let pairs: Vec<KvPair> = api.get_or_default(&path, &[]).await.context(QUERY_FAILED)?;
    let Some(pair) = pairs.into_iter().next() else {
        bail!("Error! No key exists at: {key}");
    };
    if detailed { print_line(render_kv_detailed(&pair, base64)?) } else { print_line(pair.printable_value(base64)?) }
}

/// Resolves the `kv put` VALUE argument: `-` reads `stdin`, `@PATH` reads a
/// file, anything else (including `-x`) is the literal value; none is empty.
fn read_value(arg: Option<&str>, mut stdin: impl Read) -> Result<Vec<u8>> {
    match arg {
        None => Ok(Vec::new()),
        Some("-") => {
            let mut data = Vec::new();
            stdin.read_to_end(&mut data).context("Error! Failed to read stdin")?;
            Ok(data)
        }
        Some(arg) => match arg.strip_prefix('@') {
            Some(path) => std::fs::read(path).with_context(|| format!("Error! Failed to read file {path}")),
            None => Ok(arg.as_bytes().to_vec()),
        },
    }
}

/// The `--detailed` view of one key: each field and its value, aligned.
fn render_kv_detailed(pair: &KvPair, base64: bool) -> Result<String> {
    let session = pair.session.as_deref().filter(|s| !s.is_empty());
    let value = pair.printable_value(base64)?;
    let rows = [
        ("CreateIndex", pair.create_index.to_string()),
        ("Flags", pair.flags.to_string()),
        ("Key", pair.key.clone()),
        ("LockIndex", pair.lock_index.to_string()),
        ("ModifyIndex", pair.modify_index.to_string()),
        ("Session", session.unwrap_or("-").to_owned()),
        ("Value", String::from_utf8_lossy(&value).into_owned()),
    ];
    Ok(align(rows.into_iter().map(|(name, value)| vec![name.to_owned(), value]), 6))
}

// ---------------------------------------------------------------------------
// catalog

/// A node from `/v1/catalog/nodes`, or a service instance's node from
/// `/v1/catalog/service/NAME` (which calls the metadata `NodeMeta`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct CatalogNode {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: Option<BTreeMap<String, String>>,
    #[serde(alias = "NodeMeta")]
    meta: Option<BTreeMap<String, String>>,
}

/// `/v1/catalog/node-services/NAME`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct NodeServices {
    services: Option<Vec<NodeService>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct NodeService {
    service: String,
    tags: Option<Vec<String>>,
}

/// The `catalog nodes` table.
fn render_nodes(nodes: &[CatalogNode], detailed: bool) -> String {
    let mut header = vec!["Node", "ID", "Address", "DC"];
    if detailed {
        header.extend(["TaggedAddresses", "Meta"]);
    }
    let header = header.into_iter().map(str::to_owned).collect();
    let rows = nodes.iter().map(|node| {
        let id = if detailed { node.id.clone() } else { node.id.chars().take(8).collect() };
        let mut row = vec![id, node.address.clone(), node.datacenter.clone()];
        row.insert(0, node.node.clone());
        if detailed {
            row.push(join_pairs(node.tagged_addresses.as_ref()));
            row.push(join_pairs(node.meta.as_ref()));
        }
        row
    });
    align(std::iter::once(header).chain(rows), 2)
}

/// `k1=v1, k2=v2`, sorted by key.
fn join_pairs(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter().flatten().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(", ")
}

/// The `catalog services` listing: sorted names, optionally with their
/// sorted, de-duplicated tags.
fn render_services(services: BTreeMap<String, Vec<String>>, tags: bool) -> String {
    if !tags {
        return services.into_keys().collect::<Vec<_>>().join("\n");
    }
    let rows = services.into_iter().map(|(name, mut tags)| {
        tags.sort();
        tags.dedup();
        vec![name, tags.join(",")]
    });
    align(rows, 6)
}

// ---------------------------------------------------------------------------
// operator raft

/// `/v1/operator/raft/configuration`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct RaftConfiguration {
    servers: Vec<RaftServer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct RaftServer {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    leader: bool,
    voter: bool,
    protocol_version: String,
}

/// The `operator raft list-peers` table.
fn render_peers(servers: &[RaftServer]) -> String {
    let header = ["Node", "ID", "Address", "State", "Voter", "RaftProtocol"].map(str::to_owned).to_vec();
    let rows = servers.iter().map(|server| {
        let state = if server.leader { "leader" } else { "follower" };
        let protocol = match server.protocol_version.as_str() {
            "" => "<=1",
            version => version,
        };
        vec![server.node.clone(), server.id.clone(), server.address.clone(), state.to_owned(), server.voter.to_string(), protocol.to_owned()]
    });
    align(std::iter::once(header).chain(rows), 2)
}

// ---------------------------------------------------------------------------
// snapshot

/// Where `snapshot save` writes before renaming into place: `FILE.tmp`.
fn partial_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Streams the snapshot body to `path` (mode 0600), flushes it to disk and
/// checks that every byte announced arrived and was written.
async fn save_body(mut response: Response, path: &Path) -> Result<()> {
    let expected = response.content_length();
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).await.with_context(|| format!("creating {}", path.display()))?;
    let mut received = 0u64;
    while let Some(chunk) = response.chunk().await.context("receiving the snapshot")? {
        file.write_all(&chunk).await?;
        received += chunk.len() as u64;
    }
    file.sync_all().await?;
    let on_disk = file.metadata().await?.len();
    if received == 0 {
        bail!("the agent sent an empty snapshot");
    }
    if expected.is_some_and(|n| n != received) || on_disk != received {
        bail!("snapshot is incomplete: expected {} bytes, received {received}, wrote {on_disk}", expected.unwrap_or(received));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// output

/// Writes `line` and a newline to stdout, reporting (not panicking on) a
/// closed pipe.
fn print_line(line: impl AsRef<[u8]>) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(line.as_ref())?;
    stdout.write_all(b"\n")?;
    Ok(())
}

/// Lays out rows as left-aligned columns separated by at least `gap` spaces;
/// the last cell of a row is never padded and lines carry no trailing blanks.
fn align(rows: impl IntoIterator<Item = Vec<String>>, gap: usize) -> String {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = Vec::new();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            let width = cell.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(width),
                None => widths.push(width),
            }
        }
    }
    let mut lines = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                let _ = write!(line, "{cell:<width$}", width = widths[i] + gap);
            } else {
                line.push_str(cell);
            }
        }
        lines.push(line.trim_end().to_owned());
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(addr: &str, datacenter: Option<&str>, stale: bool) -> HttpOpts {
        HttpOpts { http_addr: addr.to_owned(), datacenter: datacenter.map(str::to_owned), stale }
    }

    fn api(datacenter: Option<&str>, stale: bool) -> Api {
        Api::new(&opts("127.0.0.1:8500", datacenter, stale)).unwrap()
    }

    #[test]
    fn an_address_without_a_scheme_gets_http() {
        assert_eq!(base_url("127.0.0.1:8500").unwrap(), "http://127.0.0.1:8500");
    }

    #[test]
    fn an_http_address_keeps_its_scheme_and_loses_trailing_slashes() {
        assert_eq!(base_url("http://agent:8500/").unwrap(), "http://agent:8500");
    }

    #[test]
    fn an_https_address_is_refused() {
        assert!(base_url("https://agent:8501").is_err());
    }

    #[test]
    fn key_paths_keep_slashes_and_escape_everything_else() {
        assert_eq!(kv_path("app/db conf/ü?&"), "kv/app/db%20conf/%C3%BC%3F%26");
    }

    #[test]
    fn a_leading_slash_on_a_key_is_dropped() {
        assert_eq!(kv_path("/foo/bar"), "kv/foo/bar");
    }

    #[test]
    fn path_segments_escape_slashes() {
        assert_eq!(escape("a/b c", false), "a%2Fb%20c");
    }

    #[test]
    fn urls_carry_query_pairs_and_bare_flags_in_order() {
        let url = api(None, false).url(&Method::PUT, "kv/a", &[("flags", Some("3".into())), ("recurse", None)]);
        assert_eq!(url, "http://127.0.0.1:8500/v1/kv/a?flags=3&recurse");
    }

    #[test]
    fn query_values_are_escaped() {
        let url = api(None, false).url(&Method::GET, "kv/", &[("separator", Some("/ &".into()))]);
        assert_eq!(url, "http://127.0.0.1:8500/v1/kv/?separator=%2F%20%26");
    }

    #[test]
    fn datacenter_and_stale_are_added_to_reads() {
        let url = api(Some("dc2"), true).url(&Method::GET, "catalog/nodes", &[]);
        assert_eq!(url, "http://127.0.0.1:8500/v1/catalog/nodes?dc=dc2&stale");
    }

    #[test]
    fn stale_is_not_added_to_writes() {
        let url = api(Some("dc2"), true).url(&Method::PUT, "kv/a", &[("cas", Some("7".into()))]);
        assert_eq!(url, "http://127.0.0.1:8500/v1/kv/a?cas=7&dc=dc2");
    }

    #[test]
    fn node_meta_becomes_repeated_colon_separated_parameters() {
        let meta = [("rack".into(), "r1".into()), ("os".into(), "linux".into())];
        let url = api(None, false).url(&Method::GET, "catalog/nodes", &node_meta_query(&meta));
        assert_eq!(url, "http://127.0.0.1:8500/v1/catalog/nodes?node-meta=rack%3Ar1&node-meta=os%3Alinux");
    }

    #[test]
    fn key_value_flags_split_at_the_first_equals_sign() {
        assert_eq!(parse_key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=v").is_err());
    }

    #[test]
    fn a_missing_value_is_empty() {
        assert_eq!(read_value(None, std::io::empty()).unwrap(), b"");
    }

    #[test]
    fn a_literal_value_is_taken_as_is() {
        assert_eq!(read_value(Some("hello"), std::io::empty()).unwrap(), b"hello");
    }

    #[test]
    fn a_dash_value_reads_stdin() {
        let stdin = &b"from stdin\n"[..];
        assert_eq!(read_value(Some("-"), stdin).unwrap(), b"from stdin\n");
    }

    #[test]
    fn a_value_that_only_starts_with_a_dash_is_literal() {
        assert_eq!(read_value(Some("-5"), std::io::empty()).unwrap(), b"-5");
    }

    #[test]
    fn an_at_value_reads_the_named_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"\x00binary\xff").unwrap();
        let arg = format!("@{}", file.path().display());
        assert_eq!(read_value(Some(&arg), std::io::empty()).unwrap(), b"\x00binary\xff");
    }

    #[test]
    fn an_at_value_naming_a_missing_file_fails() {
        let err = read_value(Some("@/no/such/file"), std::io::empty()).unwrap_err();
        assert!(format!("{err:#}").contains("Failed to read file /no/such/file"));
    }

    #[test]
    fn columns_are_padded_to_the_widest_cell_plus_the_gap() {
        let rows = [vec!["a".to_owned(), "bb".to_owned(), "c".to_owned()], vec!["aaa".to_owned(), "b".to_owned(), "".to_owned()]];
        assert_eq!(align(rows, 2), "a    bb  c\naaa  b");
    }

    #[test]
    fn detailed_kv_output_lists_every_field_aligned() {
        let pair = KvPair {
            key: "redis/maxconns".into(),
            create_index: 17,
            modify_index: 20,
            lock_index: 0,
            flags: 42,
            value: Some(BASE64.encode("5")),
            session: None,
        };
        let expected = "\
CreateIndex      17
Flags            42
Key              redis/maxconns
LockIndex        0
ModifyIndex      20
Session          -
Value            5";
        assert_eq!(render_kv_detailed(&pair, false).unwrap(), expected);
    }

    #[test]
    fn detailed_kv_output_can_show_the_value_as_base64() {
        let pair = KvPair { value: Some(BASE64.encode("5")), session: Some("adf4238a".into()), ..KvPair::default() };
        let out = render_kv_detailed(&pair, true).unwrap();
        assert!(out.contains("Session          adf4238a"));
        assert!(out.ends_with("Value            NQ=="));
    }

    #[test]
    fn node_tables_shorten_ids_to_eight_characters() {
        let nodes = [CatalogNode {
            id: "e0c8b5f2-6f2a-4a44-9d5e-3b1f0c1d2e3f".into(),
            node: "server-1".into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            ..CatalogNode::default()
        }];
        assert_eq!(render_nodes(&nodes, false), "Node      ID        Address   DC\nserver-1  e0c8b5f2  10.0.0.1  dc1");
    }

    #[test]
    fn detailed_node_tables_add_tagged_addresses_and_meta() {
        let nodes = [CatalogNode {
            id: "e0c8b5f2-6f2a".into(),
            node: "n".into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            tagged_addresses: Some(BTreeMap::from([("wan".into(), "1.2.3.4".into()), ("lan".into(), "10.0.0.1".into())])),
            meta: Some(BTreeMap::from([("rack".into(), "r1".into())])),
        }];
        let out = render_nodes(&nodes, true);
        let row = out.lines().nth(1).unwrap();
        assert!(out.starts_with("Node  ID             Address   DC   TaggedAddresses"));
        assert!(row.contains("e0c8b5f2-6f2a"));
        assert!(row.ends_with("lan=10.0.0.1, wan=1.2.3.4  rack=r1"));
    }

    #[test]
    fn service_node_listings_read_node_meta() {
        let json = r#"[{"ID":"x","Node":"n","Address":"a","Datacenter":"dc1",
            "TaggedAddresses":null,"NodeMeta":{"k":"v"},"ServiceName":"web"}]"#;
        let nodes: Vec<CatalogNode> = serde_json::from_str(json).unwrap();
        assert_eq!(join_pairs(nodes[0].meta.as_ref()), "k=v");
    }

    #[test]
    fn services_are_listed_by_name_in_order() {
        let services = BTreeMap::from([("web".into(), vec![]), ("consul".into(), vec![])]);
        assert_eq!(render_services(services, false), "consul\nweb");
    }

    #[test]
    fn services_with_tags_show_sorted_unique_tags() {
        let services = BTreeMap::from([("web".into(), vec!["v2".into(), "primary".into(), "v2".into()]), ("db".into(), vec![])]);
        assert_eq!(render_services(services, true), "db\nweb      primary,v2");
    }

    #[test]
    fn peer_tables_show_state_voter_and_protocol() {
        let config: RaftConfiguration = serde_json::from_str(
            r#"{"Servers":[
                {"ID":"id-1","Node":"s1","Address":"10.0.0.1:8300","Leader":true,
                 "Voter":true,"ProtocolVersion":"3"},
                {"ID":"id-2","Node":"s2","Address":"10.0.0.2:8300","Leader":false,
                 "Voter":false,"ProtocolVersion":""}],"Index":9}"#,
        )
        .unwrap();
        let expected = "\
Node  ID    Address        State     Voter  RaftProtocol
s1    id-1  10.0.0.1:8300  leader    true   3
s2    id-2  10.0.0.2:8300  follower  false  <=1";
        assert_eq!(render_peers(&config.servers), expected);
    }

    #[test]
    fn unexpected_statuses_read_like_consuls() {
        let err = UnexpectedStatus { status: 500, body: "No cluster leader".into() };
        assert_eq!(err.to_string(), "Unexpected response code: 500 (No cluster leader)");
        let bare = UnexpectedStatus { status: 403, body: String::new() };
        assert_eq!(bare.to_string(), "Unexpected response code: 403");
    }

    #[test]
    fn snapshots_are_written_beside_the_target_first() {
        assert_eq!(partial_path(Path::new("/tmp/backup.snap")), Path::new("/tmp/backup.snap.tmp"));
    }
}
