//! The mesh's commands: `trellis connect` (the standalone sidecar proxy, the CA),
//! `trellis config` (config entries) and `trellis intention`, with Consul's CLI output.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::Method;
use serde_json::Value;

use super::client::{Api, HttpOpts, escape, is_not_found};

/// Service mesh commands
#[derive(clap::Subcommand, Debug)]
pub enum ConnectCommand {
    /// Run the sidecar proxy of a registered service outside the agent's process
    Proxy {
        /// The ID of the service whose sidecar proxy to run (the app's ID, or the proxy's own)
        #[arg(long = "sidecar-for")]
        sidecar_for: String,
    },
    /// Read and change the mesh CA's configuration
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum CaCommand {
    /// Print the CA configuration as JSON
    GetConfig,
    /// Replace the CA configuration (a new private key type or size rotates the root)
    SetConfig {
        /// JSON file with the new configuration (Provider and Config)
        #[arg(long = "config-file")]
        config_file: String,
    },
}

/// Config entries
#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Create or update a config entry from an HCL or JSON file ("-" reads stdin)
    Write {
        file: String,
        /// Only write if the entry's ModifyIndex is --modify-index (0: only if it does not exist)
        #[arg(long)]
        cas: bool,
        #[arg(long = "modify-index", default_value_t = 0)]
        modify_index: u64,
    },
    /// Print one config entry as JSON
    Read {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: String,
    },
    /// List the names of the config entries of a kind
    List {
        #[arg(long)]
        kind: String,
    },
    /// Delete a config entry
    Delete {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        cas: bool,
        #[arg(long = "modify-index", default_value_t = 0)]
        modify_index: u64,
    },
}

/// Intentions: which services may connect to which
#[derive(clap::Subcommand, Debug)]
pub enum IntentionCommand {
    /// Create an intention from SOURCE to DESTINATION (allow unless --deny)
    Create {
        #[arg(long, conflicts_with = "allow")]
        deny: bool,
        #[arg(long)]
        allow: bool,
        /// Replace an existing intention between the two services
        #[arg(long)]
        replace: bool,
        /// Description
        #[arg(long)]
        description: Option<String>,
        source: String,
        destination: String,
    },
    /// Print the intention from SOURCE to DESTINATION
    Get { source: String, destination: String },
    /// Delete the intention from SOURCE to DESTINATION
    Delete { source: String, destination: String },
    /// Would a connection from SOURCE to DESTINATION be allowed? (exit 0 allowed, 2 denied)
    Check { source: String, destination: String },
    /// List every intention
    List,
    /// List the intentions that match a service
    Match {
        /// Match intentions with this service as their source rather than destination
        #[arg(long)]
        source: bool,
        service: String,
    },
}

pub async fn connect(http: &HttpOpts, cmd: ConnectCommand) -> Result<()> {
    let api = Api::new(http)?;
    match cmd {
        ConnectCommand::Proxy { sidecar_for } => run_proxy(&api, &sidecar_for).await,
        ConnectCommand::Ca(CaCommand::GetConfig) => {
            let v: Value = api.json(Method::GET, "connect/ca/configuration", &[], None).await.context("Error request CA configuration")?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        ConnectCommand::Ca(CaCommand::SetConfig { config_file }) => {
            let body = std::fs::read(&config_file).with_context(|| format!("Error reading config file {config_file}"))?;
            serde_json::from_slice::<Value>(&body).with_context(|| format!("Error parsing config file {config_file}"))?;
            api.send(Method::PUT, "connect/ca/configuration", &[], Some(body)).await.context("Error setting CA configuration")?;
            println!("Configuration updated!");
            Ok(())
        }
    }
}

/// Find the proxy to run: `id` itself when it is a proxy, else the proxy whose
/// `DestinationServiceID` is `id`.
async fn proxy_id_for(api: &Api, id: &str) -> Result<String> {
    let services: serde_json::Map<String, Value> =
        api.json(Method::GET, "agent/services", &[], None).await.context("Error listing the agent's services")?;
    if services.get(id).is_some_and(|s| s["Kind"] == "connect-proxy") {
        return Ok(id.to_string());
    }
    let found: Vec<&String> =
        services.iter().filter(|(_, s)| s["Kind"] == "connect-proxy" && s["Proxy"]["DestinationServiceID"] == id).map(|(k, _)| k).collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("Failed looking up sidecar proxy info for {id}: no sidecar proxy is registered for service {id:?} on this agent"),
        _ => bail!("Failed looking up sidecar proxy info for {id}: more than one sidecar proxy is registered for it"),
    }
}

async fn run_proxy(api: &Api, sidecar_for: &str) -> Result<()> {
    let id = proxy_id_for(api, sidecar_for).await?;
    let me: Value = api.json(Method::GET, "agent/self", &[], None).await.context("Error reading the agent's configuration")?;
    let debug = &me["DebugConfig"];
    if debug["ConnectEnabled"] == false {
        bail!("the agent has connect disabled (connect {{ enabled = false }}); sidecar proxies cannot get certificates");
    }
    let node_address = debug["BindAddr"].as_str().and_then(|a| a.parse().ok()).unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let settings = crate::proxy::ProxySettings {
        node_address,
        datacenter: me["Config"]["Datacenter"].as_str().unwrap_or_default().to_string(),
        default_intention_policy: match debug["DefaultIntentionPolicy"].as_str() {
            Some("allow") => Some(true),
            Some("deny") => Some(false),
            _ => None,
        },
    };
    // Blocking queries wait up to 5 minutes plus jitter: no client-side timeout.
    let source = crate::proxy::source::OverHttp { client: reqwest::Client::new(), base: api.base.clone() };
    let proxy = crate::proxy::Proxy { api: Arc::new(source), service_id: id.clone(), settings };
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        super::signal().await;
        on_signal.cancel();
    });
    eprintln!("==> Trellis sidecar proxy {id} starting (agent at {})", api.base);
    proxy.run(stop).await.map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

pub async fn config(http: &HttpOpts, cmd: ConfigCommand) -> Result<()> {
    let api = Api::new(http)?;
    match cmd {
        ConfigCommand::Write { file, cas, modify_index } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("Failed to read stdin")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("Failed to read file {file:?}"))?
            };
            let entry = crate::api::config::decode_entry(text.as_bytes()).map_err(|e| anyhow!("Failed to decode config entry input: {e}"))?;
            let (kind, name) = (str_field(&entry, "Kind"), str_field(&entry, "Name"));
            let query = if cas { vec![("cas", Some(modify_index.to_string()))] } else { Vec::new() };
            let written: bool = api
                .json(Method::PUT, "config", &query, Some(serde_json::to_vec(&entry)?))
                .await
                .with_context(|| format!("Error writing config entry {kind}/{name}"))?;
            if !written {
                bail!("Config entry not updated: {kind}/{name}");
            }
            println!("Config entry written: {kind}/{name}");
            Ok(())
        }
        ConfigCommand::Read { kind, name } => {
            let v: Value = api
                .json(Method::GET, &format!("config/{}/{}", escape(&kind, false), escape(&name, false)), &[], None)
                .await
                .map_err(|e| if is_not_found(&e) { anyhow!("Error reading config entry {kind}/{name}: Config entry not found") } else { e })?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        ConfigCommand::List { kind } => {
            let v: Vec<Value> =
                api.json(Method::GET, &format!("config/{}", escape(&kind, false)), &[], None).await.context("Error listing config entries")?;
            for e in v {
                println!("{}", str_field(&e, "Name"));
            }
            Ok(())
        }
        ConfigCommand::Delete { kind, name, cas, modify_index } => {
            let query = if cas { vec![("cas", Some(modify_index.to_string()))] } else { Vec::new() };
            let path = format!("config/{}/{}", escape(&kind, false), escape(&name, false));
            let r = api.send(Method::DELETE, &path, &query, None).await.with_context(|| format!("Error deleting config entry {kind}/{name}"))?;
            if cas && r.text().await.unwrap_or_default().trim() == "false" {
                bail!("Config entry not deleted: {kind}/{name}");
            }
            println!("Config entry deleted: {kind}/{name}");
            Ok(())
        }
    }
}

fn str_field(v: &Value, k: &str) -> String {
    v.get(k).or_else(|| v.get(k.to_ascii_lowercase().as_str())).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn pair(source: &str, destination: &str) -> Vec<(&'static str, Option<String>)> {
    vec![("source", Some(source.to_string())), ("destination", Some(destination.to_string()))]
}

/// Exit status of `trellis intention check` when the connection would be denied.
pub const DENIED_EXIT: i32 = 2;

/// Returns `Some(code)` when the command's result is an exit status rather than success.
pub async fn intention(http: &HttpOpts, cmd: IntentionCommand) -> Result<Option<i32>> {
    let api = Api::new(http)?;
    match cmd {
        IntentionCommand::Create { deny, allow: _, replace, description, source, destination } => {
            let exists = match api.json::<Value>(Method::GET, "connect/intentions/exact", &pair(&source, &destination), None).await {
                Ok(_) => true,
                Err(e) if is_not_found(&e) => false,
                Err(e) => return Err(e.context("Error checking for an existing intention")),
            };
            if exists && !replace {
                bail!("Intention with source {source:?} and destination {destination:?} already exists (use --replace to replace it)");
            }
            let action = if deny { "deny" } else { "allow" };
            let mut body = serde_json::json!({ "SourceName": source, "DestinationName": destination, "Action": action });
            if let Some(d) = description {
                body["Description"] = Value::String(d);
            }
            api.send(Method::PUT, "connect/intentions/exact", &pair(&source, &destination), Some(serde_json::to_vec(&body)?))
                .await
                .context("Error creating intention")?;
            println!("Created: {source} => {destination} ({action})");
            Ok(None)
        }
        IntentionCommand::Get { source, destination } => {
            let v: Value = api
                .json(Method::GET, "connect/intentions/exact", &pair(&source, &destination), None)
                .await
                .map_err(|e| if is_not_found(&e) { anyhow!("Intention not found: {source} => {destination}") } else { e })?;
            for (k, label) in [
                ("SourceName", "Source"),
                ("DestinationName", "Destination"),
                ("Action", "Action"),
                ("Description", "Description"),
                ("Precedence", "Precedence"),
            ] {
                let val = match &v[k] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                println!("{label:<12} {val}");
            }
            if let Some(perms) = v["Permissions"].as_array().filter(|p| !p.is_empty()) {
                println!("{:<12} {} L7 permission(s)", "Permissions", perms.len());
            }
            Ok(None)
        }
        IntentionCommand::Delete { source, destination } => {
            api.send(Method::DELETE, "connect/intentions/exact", &pair(&source, &destination), None).await.context("Error deleting intention")?;
            println!("Intention deleted.");
            Ok(None)
        }
        IntentionCommand::Check { source, destination } => {
            let v: Value = api
                .json(Method::GET, "connect/intentions/check", &pair(&source, &destination), None)
                .await
                .context("Error checking the connection")?;
            if v["Allowed"] == true {
                println!("Allowed");
                Ok(None)
            } else {
                println!("Denied");
                Ok(Some(DENIED_EXIT))
            }
        }
        IntentionCommand::List => {
            let v: Vec<Value> = api.json(Method::GET, "connect/intentions", &[], None).await.context("Error listing intentions")?;
            print_intentions(&v);
            Ok(None)
        }
        IntentionCommand::Match { source, service } => {
            let by = if source { "source" } else { "destination" };
            let v: serde_json::Map<String, Value> = api
                .json(Method::GET, "connect/intentions/match", &[("by", Some(by.into())), ("name", Some(service.clone()))], None)
                .await
                .context("Error matching intentions")?;
            print_intentions(v.get(&service).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default());
            Ok(None)
        }
    }
}

fn print_intentions(list: &[Value]) {
    if list.is_empty() {
        println!("No intentions found.");
        return;
    }
    println!("{:<24} {:<8} {:<24} Precedence", "Source", "Action", "Destination");
    for i in list {
        let action = if i["Permissions"].as_array().is_some_and(|p| !p.is_empty()) {
            "(L7)".to_string()
        } else {
            i["Action"].as_str().unwrap_or_default().to_string()
        };
        println!(
            "{:<24} {:<8} {:<24} {}",
            i["SourceName"].as_str().unwrap_or_default(),
            action,
            i["DestinationName"].as_str().unwrap_or_default(),
            i["Precedence"]
        );
    }
}

/// Register and deregister services with the local agent
#[derive(clap::Subcommand, Debug)]
pub enum ServicesCommand {
    /// Register services from definition files (HCL or JSON with `service { ... }` or
    /// `services = [...]`), or one service from flags
    Register {
        /// Service name (instead of a file)
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        address: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// Tag (repeatable)
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// key=value metadata (repeatable)
        #[arg(long = "meta")]
        meta: Vec<String>,
        files: Vec<String>,
    },
    /// Deregister services by ID, or those defined in files
    Deregister {
        #[arg(long)]
        id: Option<String>,
        files: Vec<String>,
    },
}

/// The service definitions in a file: `service { ... }`, `services = [...]`, or a bare
/// definition as the HTTP API takes it.
fn service_definitions(file: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("Error reading {file}"))?;
    // The agent's own config-file syntax: JSON, or HCL with blocks as objects.
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(json_err) if text.trim_start().starts_with('{') => bail!("Error decoding {file}: {json_err}"),
        Err(_) => hcl::from_str(&text).map_err(|e| anyhow!("Error decoding {file}: {e}"))?,
    };
    let Value::Object(o) = &v else { bail!("Error decoding {file}: expected an object with a service or services key") };
    let field = |k: &str| o.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
    let list = match (field("service"), field("services")) {
        (Some(Value::Object(s)), None) => vec![Value::Object(s)],
        (None, Some(Value::Array(a))) => a,
        (None, Some(Value::Object(s))) => vec![Value::Object(s)],
        (None, None) if field("name").is_some() => vec![v.clone()],
        (Some(_), Some(_)) => bail!("{file}: has both service and services; use one"),
        _ => bail!("{file}: no service definition (a `service` block or a `services` list)"),
    };
    Ok(list)
}

pub async fn services(http: &HttpOpts, cmd: ServicesCommand) -> Result<()> {
    let api = Api::new(http)?;
    match cmd {
        ServicesCommand::Register { name, id, address, port, tags, meta, files } => {
            let defs = match (name, files.is_empty()) {
                (Some(name), true) => {
                    let mut m = serde_json::Map::new();
                    for kv in meta {
                        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--meta {kv:?}: expected key=value"))?;
                        m.insert(k.to_string(), json_str(v));
                    }
                    vec![serde_json::json!({ "Name": name, "ID": id.unwrap_or_default(), "Address": address.unwrap_or_default(),
                        "Port": port.unwrap_or(0), "Tags": tags, "Meta": m })]
                }
                (None, false) => {
                    let mut all = Vec::new();
                    for f in &files {
                        all.extend(service_definitions(f)?);
                    }
                    all
                }
                (Some(_), false) => bail!("give either --name (and flags) or definition files, not both"),
                (None, true) => bail!("nothing to register: give definition files or --name"),
            };
            for d in defs {
                let label = d.get("Name").or_else(|| d.get("name")).and_then(Value::as_str).unwrap_or_default().to_string();
                api.send(Method::PUT, "agent/service/register", &[], Some(serde_json::to_vec(&d)?))
                    .await
                    .with_context(|| format!("Error registering service {label:?}"))?;
                println!("Registered service: {label}");
            }
            Ok(())
        }
        ServicesCommand::Deregister { id, files } => {
            let ids: Vec<String> = match (id, files.is_empty()) {
                (Some(id), true) => vec![id],
                (None, false) => {
                    let mut ids = Vec::new();
                    for f in &files {
                        for d in service_definitions(f)? {
                            let get = |k: &str| {
                                d.as_object()
                                    .and_then(|o| o.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)))
                                    .and_then(|(_, v)| v.as_str())
                                    .filter(|s| !s.is_empty())
                                    .map(str::to_string)
                            };
                            ids.push(get("id").or_else(|| get("name")).ok_or_else(|| anyhow!("{f}: a service without a name or ID"))?);
                        }
                    }
                    ids
                }
                _ => bail!("give either --id or definition files"),
            };
            for id in ids {
                api.send(Method::PUT, &format!("agent/service/deregister/{}", escape(&id, false)), &[], None)
                    .await
                    .with_context(|| format!("Error deregistering service {id:?}"))?;
                println!("Deregistered service: {id}");
            }
            Ok(())
        }
    }
}

fn json_str(s: &str) -> Value {
    Value::String(s.to_string())
}
