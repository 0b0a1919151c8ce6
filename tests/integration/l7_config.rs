//! The control-plane half of L7 traffic management against real agents: router, splitter and
//! resolver entries written with `trellis config write` from HCL files (Consul's documented
//! block forms), the compiled `/v1/discovery-chain/:service` read back through a client agent,
//! overrides, blocking reads, and the validation errors a user meets.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{BIN, Cluster, SOON, eventually};

/// `trellis config write` of `hcl` against the agent at `addr`: (success, stderr).
fn config_write(addr: &str, dir: &std::path::Path, file: &str, hcl: &str) -> (bool, String) {
    let path = dir.join(file);
    std::fs::write(&path, hcl).unwrap();
    let out = Command::new(BIN).args(["config", "write", path.to_str().unwrap()]).env("TRELLIS_HTTP_ADDR", addr).output().expect("run trellis");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const ROUTER: &str = r#"
Kind = "service-router"
Name = "web"
Routes = [
  {
    Match {
      HTTP {
        PathPrefix = "/admin"
      }
    }
    Destination {
      Service       = "admin"
      PrefixRewrite = "/"
      RequestTimeout = "15s"
      NumRetries    = 3
      RetryOnStatusCodes = [503]
    }
  },
  {
    Match {
      HTTP {
        Header = [
          { Name = "x-debug", Exact = "1" },
        ]
        Methods = ["get"]
      }
    }
    Destination {
      ServiceSubset = "v2"
    }
  },
]
"#;

const SPLITTER: &str = r#"
Kind = "service-splitter"
Name = "web"
Splits = [
  {
    Weight        = 90
    ServiceSubset = "v1"
  },
  {
    Weight        = 10
    ServiceSubset = "v2"
    RequestHeaders {
      Set { "x-canary" = "1" }
    }
  },
]
"#;

const RESOLVER: &str = r#"
Kind          = "service-resolver"
Name          = "web"
DefaultSubset = "v1"
ConnectTimeout = "15s"
Subsets = {
  v1 = { Filter = "Service.Meta.version == v1" }
  v2 = {
    Filter      = "Service.Meta.version == v2"
    OnlyPassing = true
  }
}
Failover = {
  "*" = { Datacenters = ["dc2"] }
}
"#;

/// What this test does:
/// - writes service-defaults, a resolver (subsets, failover to dc2), a splitter (90/10) and a
///   router (path and header routes) for `web` as HCL files with `trellis config write`,
///   through a client agent;
/// - reads `/v1/discovery-chain/web` from the client agent and checks the graph Consul
///   compiles: router -> splitter -> subset resolvers, failover targets, SNIs in the CA's trust
///   domain; `?compile-dc=dc2`; POST overrides (a tcp protocol drops routing, a bad gateway
///   mode is a 400);
/// - a blocking read wakes on a config entry change;
/// - invalid entries are refused with 400 and the field (or the broken chain) named, by the
///   API and by the CLI, and L7 intentions show their permissions.
#[tokio::test(flavor = "multi_thread")]
async fn l7_config_entries_compile_into_the_discovery_chain() {
    let c = Cluster::start_with(1, 1, &[]).await;
    let (server, client) = (c.servers[0].http(), c.servers[1].http());
    let dir = tempfile::tempdir().unwrap();
    let td: String = eventually("the CA's trust domain", SOON, || async {
        let v = c.get_json(&format!("{server}/v1/connect/ca/roots")).await.ok()?;
        v["TrustDomain"].as_str().filter(|t| !t.is_empty()).map(str::to_string)
    })
    .await;

    for (file, hcl) in [
        ("web-defaults.hcl", "Kind = \"service-defaults\"\nName = \"web\"\nProtocol = \"http\"\n"),
        ("admin-defaults.hcl", "Kind = \"service-defaults\"\nName = \"admin\"\nProtocol = \"http\"\n"),
        ("web-resolver.hcl", RESOLVER),
        ("web-splitter.hcl", SPLITTER),
        ("web-router.hcl", ROUTER),
    ] {
        let (ok, err) = config_write(&client, dir.path(), file, hcl);
        assert!(ok, "trellis config write {file} failed: {err}");
    }

    let url = format!("{client}/v1/discovery-chain/web");
    let r = c.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let index: u64 = r.headers()["x-consul-index"].to_str().unwrap().parse().unwrap();
    let v: Value = r.json().await.unwrap();
    let chain = &v["Chain"];
    assert_eq!((chain["ServiceName"].as_str(), chain["Protocol"].as_str()), (Some("web"), Some("http")));
    assert_eq!(chain["StartNode"], "router:web.default.default");
    let routes: Vec<&str> =
        chain["Nodes"]["router:web.default.default"]["Routes"].as_array().unwrap().iter().map(|r| r["NextNode"].as_str().unwrap()).collect();
    assert_eq!(routes, vec!["resolver:admin.default.default.dc1", "resolver:v2.web.default.default.dc1", "splitter:web.default.default"]);
    let admin_route = &chain["Nodes"]["router:web.default.default"]["Routes"][0]["Definition"]["Destination"];
    assert_eq!(admin_route["RequestTimeout"], "15s");
    assert_eq!(admin_route["RetryOnStatusCodes"], json!([503]));
    let split = &chain["Nodes"]["splitter:web.default.default"]["Splits"];
    assert_eq!((split[0]["Weight"].clone(), split[1]["Weight"].clone()), (json!(90), json!(10)));
    assert_eq!(split[1]["Definition"]["RequestHeaders"]["Set"]["x-canary"], "1");
    let v1 = &chain["Nodes"]["resolver:v1.web.default.default.dc1"]["Resolver"];
    assert_eq!(v1["ConnectTimeout"], "15s");
    assert_eq!(v1["Failover"]["Targets"], json!(["v1.web.default.default.dc2"]));
    let target = &chain["Targets"]["v2.web.default.default.dc1"];
    assert_eq!(target["SNI"], format!("v2.web.default.dc1.internal.{td}"));
    assert_eq!(target["Subset"], json!({"Filter": "Service.Meta.version == v2", "OnlyPassing": true}));
    assert_eq!(chain["Targets"]["v1.web.default.default.dc2"]["Datacenter"], "dc2");
    assert!(chain.get("Default").is_none());

    let dc2 = c.get_json(&format!("{client}/v1/discovery-chain/web?compile-dc=dc2")).await.unwrap();
    assert_eq!(dc2["Chain"]["Datacenter"], "dc2");
    assert!(dc2["Chain"]["Targets"].get("v1.web.default.default.dc2").is_some());

    // Overrides: tcp drops the router and splitter; a bad gateway mode is refused.
    let r = c.http.post(&url).body(r#"{"OverrideProtocol": "tcp", "OverrideConnectTimeout": "2s"}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let o: Value = r.json().await.unwrap();
    assert_eq!(o["Chain"]["StartNode"], "resolver:v1.web.default.default.dc1");
    assert_eq!(o["Chain"]["Protocol"], "tcp");
    assert!(o["Chain"]["CustomizationHash"].is_string());
    assert_eq!(o["Chain"]["Targets"]["v1.web.default.default.dc1"]["ConnectTimeout"], "2s");
    let r = c.http.post(&url).body(r#"{"OverrideMeshGateway": {"Mode": "sideways"}}"#).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (400, "Invalid OverrideMeshGateway.Mode parameter".to_string()));
    let r = c.http.get(format!("{server}/v1/discovery-chain/")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (400, "Missing chain name".to_string()));

    // A blocking read returns when an entry changes, with a higher index.
    let blocked = {
        let (http, url) = (c.http.clone(), format!("{url}?index={index}&wait=20s"));
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http.get(url).send().await.unwrap();
            let index: u64 = r.headers()["x-consul-index"].to_str().unwrap().parse().unwrap();
            (started.elapsed(), index, r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, err) =
        config_write(&client, dir.path(), "admin-resolver.hcl", "Kind = \"service-resolver\"\nName = \"admin\"\nConnectTimeout = \"3s\"\n");
    assert!(ok, "{err}");
    let (took, new_index, woke) = blocked.await.unwrap();
    assert!(took < Duration::from_secs(15) && new_index > index, "took {took:?}, index {index} -> {new_index}");
    assert_eq!(woke["Chain"]["Nodes"]["resolver:admin.default.default.dc1"]["Resolver"]["ConnectTimeout"], "3s");

    // Validation: 400 with the field named, from the API and through the CLI.
    let put = |body: Value| {
        let (http, url) = (c.http.clone(), format!("{server}/v1/config"));
        async move {
            let r = http.put(url).body(body.to_string()).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(
        put(json!({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 90, "ServiceSubset": "v1"}]})).await,
        (400, "the sum of all split weights must be 100, not 90.000000".to_string())
    );
    assert_eq!(
        put(json!({"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"PathPrefix": "admin"}}}]})).await,
        (400, "Route[0] PathPrefix doesn't start with '/': \"admin\"".to_string())
    );
    assert_eq!(
        put(json!({"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v9", "Subsets": {"v1": {}}})).await,
        (400, "DefaultSubset \"v9\" is not a valid subset".to_string())
    );
    assert_eq!(
        put(json!({"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"Service": "db"}}]})).await,
        (400, "discovery chain \"web\" uses inconsistent protocols; service \"db\" has \"tcp\" which is not \"http\"".to_string())
    );
    assert_eq!(
        put(json!({"Kind": "service-intentions", "Name": "db", "Sources": [
            {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]}))
        .await,
        (400, "service \"db\" has protocol \"tcp\", which is incompatible with L7 intentions permissions".to_string())
    );
    let r = c.http.delete(format!("{server}/v1/config/service-defaults/admin")).send().await.unwrap();
    assert_eq!(r.status(), 400, "deleting admin's protocol would break web's chain");
    let (ok, err) = config_write(&client, dir.path(), "db-splitter.hcl", "Kind = \"service-splitter\"\nName = \"db\"\nSplits = [{ Weight = 100 }]\n");
    assert!(!ok && err.contains("400") && err.contains("uses a protocol \"tcp\" that does not permit advanced routing"), "{err}");

    // L7 intentions on an HTTP service are accepted and shown with their permissions.
    let (status, body) = put(json!({"Kind": "service-intentions", "Name": "web", "Sources": [
        {"Name": "admin", "Permissions": [{"Action": "deny", "HTTP": {"PathPrefix": "/private", "Methods": ["post"]}}]}]}))
    .await;
    assert_eq!((status, body.as_str()), (200, "true"));
    let list = c.get_json(&format!("{client}/v1/connect/intentions")).await.unwrap();
    let l7 = list.as_array().unwrap().iter().find(|i| i["DestinationName"] == "web").expect("the web intention");
    assert_eq!(l7["Permissions"], json!([{"Action": "deny", "HTTP": {"PathPrefix": "/private", "Methods": ["POST"]}}]));
    assert!(l7.get("Action").is_none());

    // The HTTP API takes JSON only (HCL is read by the CLI): an HCL body, and a crafted one
    // that kept the HCL parser busy for minutes in fuzzing, are refused at once.
    let hostile = format!("GkGk1zH=1-\u{f9}0-\u{f9}+((N2%{{-k\u{f9}Gk*2%{{-{}", "kkakGkkakG=G0%kG0%{kakGGGGGGGk0%kG0%{".repeat(20));
    for body in ["Kind = \"service-defaults\"\nName = \"x\"\n".to_string(), hostile] {
        let started = Instant::now();
        let r = c.http.put(format!("{server}/v1/config")).body(body).send().await.unwrap();
        let (status, text) = (r.status().as_u16(), r.text().await.unwrap());
        assert!(status == 400 && text.contains("takes JSON"), "{status} {text}");
        assert!(started.elapsed() < Duration::from_secs(5), "the body took {:?} to refuse", started.elapsed());
    }
}
