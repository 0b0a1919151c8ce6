//! Federation through mesh gateways alone, with each datacenter in its own network namespace.
//!
//! Both datacenters use the same private range inside (10.0.0.0/24: dc1's server and dc2's
//! server are both 10.0.0.1), so their servers cannot reach each other however they try; only
//! the gateways have a leg on the shared WAN segment (192.168.100.0/24). dc1 is the primary.
//!
//! | | dc1 | dc2 |
//! |---|---|---|
//! | server | 10.0.0.1 | 10.0.0.1 |
//! | client agent (apps, sidecars) | 10.0.0.2 | 10.0.0.2 |
//! | gateway A: LAN / WAN | 10.0.0.9 / 192.168.100.1 | 10.0.0.9 / 192.168.100.2 |
//! | gateway B: LAN / WAN | — | 10.0.0.10 / 192.168.100.3 |
//!
//! dc2's servers find the primary through `primary_gateways = ["gw.dc1.test:8443"]`, a name
//! dc2 resolves through its own hosts file (`/etc/netns/<ns>/hosts`, which `ip netns exec`
//! mounts over `/etc/hosts`), so that a test can move dc1's gateway and the name with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{SOON, eventually};
use crate::netns::{Netns, NsProcess, Topology, Wan};

const SERVER: &str = "10.0.0.1";
const CLIENT: &str = "10.0.0.2";
const UPSTREAM: &str = "10.0.0.2:19000";

struct Dc {
    ns: Netns,
    name: &'static str,
    procs: Vec<NsProcess>,
}

impl Dc {
    fn http(&self, ip: &str, path: &str) -> String {
        format!("http://{ip}:8500{path}")
    }

    fn proc(&mut self, name: &str) -> &mut NsProcess {
        self.procs.iter_mut().find(|p| p.name == name).unwrap_or_else(|| panic!("no process {name}"))
    }
}

struct Federation {
    // Dropped last: the processes die with it.
    dc1: Dc,
    dc2: Dc,
    wan: Wan,
    hosts: HostsFile,
    files: PathBuf,
    topo: Topology,
}

/// `/etc/netns/<ns>/hosts`, removed when the test ends.
struct HostsFile(PathBuf);

impl HostsFile {
    fn write(&self, content: &str) {
        // In place: `ip netns exec` bind-mounts this very file, so it must keep its inode.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&self.0).expect("hosts file");
        f.write_all(content.as_bytes()).expect("write hosts");
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn write(dir: &std::path::Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

impl Federation {
    async fn start() -> Federation {
        let mut topo = Topology::new();
        let ns1 = topo.namespace("dc1");
        let ns2 = topo.namespace("dc2");
        for ns in [&ns1, &ns2] {
            for ip in ["10.0.0.1/24", "10.0.0.2/24", "10.0.0.9/24", "10.0.0.10/24"] {
                ns.add_lo_addr(ip);
            }
        }
        let wan = topo.wan(&[(&ns1, "192.168.100.1/24"), (&ns2, "192.168.100.2/24")]);
        ns2.add_addr(wan.iface(), "192.168.100.3/24");
        let files = topo.dir().join("federation-files");
        std::fs::create_dir_all(&files).unwrap();
        let hosts_dir = PathBuf::from("/etc/netns").join(ns2.name());
        std::fs::create_dir_all(&hosts_dir).unwrap();
        let hosts = HostsFile(hosts_dir.join("hosts"));
        hosts.write("127.0.0.1 localhost\n192.168.100.1 gw.dc1.test\n");

        let (ca_pem, ca_key) = trellis::tls::create_ca("consul").expect("ca");
        let ca = write(&files, "ca.pem", &ca_pem);
        let mut dcs = Vec::new();
        for (ns, name) in [(ns1, "dc1"), (ns2, "dc2")] {
            let mut procs = Vec::new();
            let cert = |kind: trellis::tls::CertKind, who: &str| {
                let (c, k) = trellis::tls::create_cert(&ca_pem, &ca_key, kind, name, "consul", &[]).expect("cert");
                (write(&files, &format!("{name}-{who}.pem"), &c), write(&files, &format!("{name}-{who}-key.pem"), &k))
            };
            let data = |who: &str| files.join(format!("{name}-{who}-data")).display().to_string();
            let mut fed = String::from("connect {\n  enable_mesh_gateway_wan_federation = true\n}\n");
            if name == "dc2" {
                fed.push_str("primary_gateways = [\"gw.dc1.test:8443\"]\nprimary_gateways_interval = \"1s\"\n");
            }
            let fed_file = write(&files, &format!("{name}-federation.hcl"), &fed);
            let (sc, sk) = cert(trellis::tls::CertKind::Server, "server");
            let server_data = data("server");
            procs.push(ns.trellis(
                "server",
                &[
                    "agent",
                    "--server",
                    "--bootstrap-expect",
                    "1",
                    "--node",
                    &format!("{name}-server"),
                    "--datacenter",
                    name,
                    "--primary-datacenter",
                    "dc1",
                    "--bind",
                    SERVER,
                    "--client",
                    SERVER,
                    "--data-dir",
                    &server_data,
                    "--ca-file",
                    &ca,
                    "--cert-file",
                    &sc,
                    "--key-file",
                    &sk,
                    "--config-file",
                    &fed_file,
                ],
            ));
            let (cc, ck) = cert(trellis::tls::CertKind::Client, "client");
            let client_data = data("client");
            procs.push(ns.trellis(
                "client",
                &[
                    "agent",
                    "--node",
                    &format!("{name}-client"),
                    "--datacenter",
                    name,
                    "--primary-datacenter",
                    "dc1",
                    "--bind",
                    CLIENT,
                    "--client",
                    CLIENT,
                    "--retry-join",
                    SERVER,
                    "--data-dir",
                    &client_data,
                    "--ca-file",
                    &ca,
                    "--cert-file",
                    &cc,
                    "--key-file",
                    &ck,
                ],
            ));
            let gateways: &[(&str, &str, &str)] = if name == "dc1" {
                &[("gwa", "10.0.0.9", "192.168.100.1")]
            } else {
                &[("gwa", "10.0.0.9", "192.168.100.2"), ("gwb", "10.0.0.10", "192.168.100.3")]
            };
            for (who, lan, wan_ip) in gateways {
                let (gc, gk) = cert(trellis::tls::CertKind::Client, who);
                let gw_data = data(who);
                procs.push(ns.trellis(
                    who,
                    &[
                        "gateway",
                        "mesh",
                        "--address",
                        &format!("{lan}:8443"),
                        "--wan-address",
                        &format!("{wan_ip}:8443"),
                        "--join",
                        SERVER,
                        "--node",
                        &format!("{name}-{who}"),
                        "--datacenter",
                        name,
                        "--primary-datacenter",
                        "dc1",
                        "--data-dir",
                        &gw_data,
                        "--ca-file",
                        &ca,
                        "--cert-file",
                        &gc,
                        "--key-file",
                        &gk,
                    ],
                ));
            }
            dcs.push(Dc { ns, name, procs });
        }
        let dc2 = dcs.pop().unwrap();
        let dc1 = dcs.pop().unwrap();
        let f = Federation { dc1, dc2, wan, hosts, files, topo };
        // Both datacenters know each other (federation states, through the gateways alone).
        for dc in [&f.dc1, &f.dc2] {
            let url = dc.http(SERVER, "/v1/catalog/datacenters");
            eventually(&format!("{} to list both datacenters", dc.name), Duration::from_secs(90), || async {
                let v = dc.ns.get_json(&url).await.ok()?;
                let mut got: Vec<String> = serde_json::from_value(v).ok()?;
                got.sort();
                (got == ["dc1", "dc2"]).then_some(())
            })
            .await;
        }
        f
    }

    async fn register(&self, dc: &Dc, def: Value) {
        let (status, body) = dc.ns.put(&dc.http(CLIENT, "/v1/agent/service/register"), def.to_string()).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }

    /// The gateway counters of a gateway's agent, by Prometheus name and labels.
    async fn gateway_counter(&self, dc: &Dc, gw_ip: &str, series: &str) -> u64 {
        let (_, text) = dc.ns.get(&dc.http(gw_ip, "/v1/agent/metrics?format=prometheus")).await.unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok())).unwrap_or(0.0) as u64
    }
}

/// db in dc2 (client agent, sidecar), web in dc1 (client agent, sidecar) with db in dc2 as an
/// upstream through the local gateway; returns (the app, which stops when dropped) when a
/// call gets through.
async fn apps(f: &Federation) -> crate::netns::App {
    let db = f.dc2.ns.echo_app("db", "127.0.0.1:9000").await;
    f.register(&f.dc2, json!({"Name": "db", "Port": 9000, "Connect": {"SidecarService": {}}})).await;
    f.register(
        &f.dc1,
        json!({"Name": "web", "Port": 9001, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "db", "Datacenter": "dc2", "LocalBindAddress": CLIENT, "LocalBindPort": 19000, "MeshGateway": {"Mode": "local"}}
        ]}}}}),
    )
    .await;
    eventually("web in dc1 to reach db in dc2 through the gateways", Duration::from_secs(60), || async {
        f.dc1.ns.tcp_call(UPSTREAM, "ping").await.ok().filter(|a| a == "db:ping")
    })
    .await;
    db
}

async fn ask_dns(ns: &Netns, server: SocketAddr, name: &str) -> Vec<String> {
    let name = name.to_string();
    ns.run(async move {
        let m = crate::dns::ask(server, &name, hickory_proto::rr::RecordType::A).await;
        m.map(|m| crate::dns::a_records(&m)).unwrap_or_default()
    })
    .await
}

/// What this test does (see the module docs for the layout):
/// - servers of two datacenters with the same private addresses federate through gateways;
///   `?dc=` works both ways and dc1's DNS resolves `db.service.dc2.consul`;
/// - an app in dc1 calls an app in dc2 through sidecar, gateway, gateway, sidecar, and a
///   capture on the WAN segment never shows the plaintext of the call;
/// - an intention denying web, written in dc1 (the primary), is enforced by dc2's sidecar;
///   removing it restores the path;
/// - the gateway hop is QUIC; with UDP dropped on dc2's WAN leg every following call still
///   succeeds, now over TCP, and QUIC comes back when the drop is lifted;
/// - with one of dc2's two gateways killed, calls keep succeeding on the other.
#[tokio::test(flavor = "multi_thread")]
async fn datacenters_federate_and_call_each_other_through_gateways_alone() {
    let mut f = Federation::start().await;
    // The servers really are unreachable across datacenters: 10.0.0.1 in dc1 is dc1's own.
    let (_, me) = f.dc1.ns.get(&f.dc1.http(SERVER, "/v1/agent/self")).await.unwrap();
    assert!(me.contains("\"dc1\""));

    // ?dc= both ways, over the gateways.
    for (from, to) in [(&f.dc1, "dc2"), (&f.dc2, "dc1")] {
        let url = from.http(SERVER, &format!("/v1/catalog/nodes?dc={to}"));
        let nodes = eventually(&format!("{} to list {to}'s nodes", from.name), SOON, || async {
            let v = from.ns.get_json(&url).await.ok()?;
            let names: Vec<String> = v.as_array()?.iter().filter_map(|n| n["Node"].as_str().map(str::to_string)).collect();
            names.iter().any(|n| n == &format!("{to}-server")).then_some(names)
        })
        .await;
        assert!(nodes.iter().all(|n| n.starts_with(to)), "{nodes:?}");
    }

    let _db = apps(&f).await;
    // Cross-datacenter DNS from dc1.
    let dns: SocketAddr = format!("{SERVER}:8600").parse().unwrap();
    let ips = eventually("db.service.dc2.consul from dc1", SOON, || async {
        let ips = ask_dns(&f.dc1.ns, dns, "db.service.dc2.consul.").await;
        (!ips.is_empty()).then_some(ips)
    })
    .await;
    assert_eq!(ips, vec![CLIENT.to_string()]);

    // No plaintext on the WAN segment.
    let capture = f.dc1.ns.capture(f.wan.iface());
    let marker = "PLAINTEXT-MARKER-7d1f";
    for _ in 0..3 {
        assert_eq!(f.dc1.ns.tcp_call(UPSTREAM, marker).await.unwrap(), format!("db:{marker}"));
    }
    let seen = capture.stop();
    assert!(seen.is_complete(), "the capture lost packets; its absence proves nothing");
    assert!(!seen.segments().is_empty(), "the capture saw no traffic at all");
    assert!(!seen.contains(marker.as_bytes()), "the marker crossed the WAN in plaintext");

    // An intention written in the primary, enforced by dc2's sidecar.
    let url = f.dc1.http(SERVER, "/v1/connect/intentions/exact?source=web&destination=db");
    let (status, body) = f.dc1.ns.put(&url, json!({"Action": "deny"}).to_string()).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let written = Instant::now();
    eventually("the deny written in dc1 to be enforced in dc2", SOON, || async { f.dc1.ns.tcp_call(UPSTREAM, "x").await.is_err().then_some(()) })
        .await;
    eprintln!("an intention written in dc1 was enforced in dc2 {:?} after the write", written.elapsed());
    assert_eq!(f.dc1.ns.delete(&url).await.unwrap().0, 200);
    eventually("the path to come back after the deny is deleted", SOON, || async {
        f.dc1.ns.tcp_call(UPSTREAM, "ping").await.ok().filter(|a| a == "db:ping")
    })
    .await;

    // QUIC between the gateways; UDP dropped moves calls to TCP without failing them.
    let quic = "trellis_gateway_wan_connections_total{transport=\"quic\",direction=\"out\"}";
    let tcp = "trellis_gateway_wan_connections_total{transport=\"tcp\",direction=\"out\"}";
    eventually("the gateway hop to use QUIC", SOON, || async {
        let _ = f.dc1.ns.tcp_call(UPSTREAM, "q").await;
        (f.gateway_counter(&f.dc1, "10.0.0.9", quic).await > 0).then_some(())
    })
    .await;
    let tcp_before = f.gateway_counter(&f.dc1, "10.0.0.9", tcp).await;
    let rule = f.dc2.ns.drop_udp(f.wan.iface(), 8443);
    for i in 0..20 {
        let got = f.dc1.ns.tcp_call(UPSTREAM, &format!("u{i}")).await;
        assert_eq!(got.as_deref(), Ok(format!("db:u{i}").as_str()), "call {i} with UDP dropped");
    }
    assert!(f.gateway_counter(&f.dc1, "10.0.0.9", tcp).await > tcp_before, "no call went over TCP");
    rule.remove();
    let quic_before = f.gateway_counter(&f.dc1, "10.0.0.9", quic).await;
    eventually("QUIC to be used again once UDP gets through", Duration::from_secs(60), || async {
        let _ = f.dc1.ns.tcp_call(UPSTREAM, "q").await;
        (f.gateway_counter(&f.dc1, "10.0.0.9", quic).await > quic_before).then_some(())
    })
    .await;

    // One of dc2's two gateways killed: calls keep succeeding.
    f.dc2.proc("gwa").kill();
    let killed = Instant::now();
    let mut failures = 0;
    let mut last_failure = None;
    let mut successes_in_a_row = 0;
    while successes_in_a_row < 20 {
        match f.dc1.ns.tcp_call(UPSTREAM, "k").await {
            Ok(a) if a == "db:k" => successes_in_a_row += 1,
            _ => {
                failures += 1;
                successes_in_a_row = 0;
                last_failure = Some(killed.elapsed());
            }
        }
        assert!(killed.elapsed() < SOON, "calls did not recover after a gateway died ({failures} failed)");
    }
    eprintln!("one of two gateways killed: {failures} calls failed, the last {last_failure:?} after the kill");
}

/// What this test does: the primary's only gateway moves to a new WAN address (the old one
/// gone, the name `gw.dc1.test` pointing at the new one). dc2 heals with no restart: its
/// servers reach dc1 again through the fallback name, replicate dc1's new federation state,
/// and web in dc1 reaches db in dc2 again.
#[tokio::test(flavor = "multi_thread")]
async fn federation_heals_when_the_primary_gateways_move() {
    let mut f = Federation::start().await;
    let _db = apps(&f).await;
    // Move dc1's gateway: new WAN address, old one gone, name updated.
    f.dc1.proc("gwa").stop();
    f.dc1.ns.add_addr(f.wan.iface(), "192.168.100.11/24");
    f.dc1.ns.del_addr(f.wan.iface(), "192.168.100.1/24");
    f.hosts.write("127.0.0.1 localhost\n192.168.100.11 gw.dc1.test\n");
    let ca = f.files.join("ca.pem").display().to_string();
    let (gc, gk) = (f.files.join("dc1-gwa.pem").display().to_string(), f.files.join("dc1-gwa-key.pem").display().to_string());
    let data = f.files.join("dc1-gwa-data").display().to_string();
    let moved = f.dc1.ns.trellis(
        "gwa-moved",
        &[
            "gateway",
            "mesh",
            "--address",
            "10.0.0.9:8443",
            "--wan-address",
            "192.168.100.11:8443",
            "--join",
            SERVER,
            "--node",
            "dc1-gwa",
            "--datacenter",
            "dc1",
            "--primary-datacenter",
            "dc1",
            "--data-dir",
            &data,
            "--ca-file",
            &ca,
            "--cert-file",
            &gc,
            "--key-file",
            &gk,
        ],
    );
    f.dc1.procs.push(moved);
    let healed = Instant::now();
    // dc2 learns the new address: its federation state for dc1 names 192.168.100.11.
    eventually("dc2 to replicate dc1's moved gateway", Duration::from_secs(90), || async {
        let v = f.dc2.ns.get_json(&f.dc2.http(SERVER, "/v1/internal/federation-state/dc1")).await.ok()?;
        v.to_string().contains("192.168.100.11").then_some(())
    })
    .await;
    // Both directions work again: ?dc= from dc2, and the mesh call from dc1.
    eventually("dc2 to read dc1 again", SOON, || async {
        let v = f.dc2.ns.get_json(&f.dc2.http(SERVER, "/v1/catalog/nodes?dc=dc1")).await.ok()?;
        (!v.as_array()?.is_empty()).then_some(())
    })
    .await;
    eventually("web in dc1 to reach db in dc2 again", SOON, || async { f.dc1.ns.tcp_call(UPSTREAM, "ping").await.ok().filter(|a| a == "db:ping") })
        .await;
    eprintln!("federation healed {:?} after the primary's gateway moved", healed.elapsed());
    let _ = &f.topo;
}

/// What this test does: `api` runs in dc1 (v1 and v2) and in dc2 (v1) (HTTP, with sidecars);
/// `web` in dc2 calls api in dc1 through the gateways, with a resolver whose default subset is
/// v1, failing over to dc2 (written in dc1, the primary). Requests go to dc1's v1 only (the
/// gateway routes the subset's SNI to the subset's instances, not to v2); with dc1's api instance gone (its agent killed) they go to
/// dc2, and back to dc1 when it returns; then with dc1's gateway killed they go to dc2 again,
/// and back when it returns. Each switch is timed from the failure.
#[tokio::test(flavor = "multi_thread")]
async fn http_requests_fail_over_to_another_datacenter_and_come_back() {
    let mut f = Federation::start().await;
    let b = crate::l7::Behaviour::default();
    let p1 = f.dc1.ns.run(crate::l7::backend("api-dc1", b.clone())).await;
    let p1v2 = f.dc1.ns.run(crate::l7::backend("api-dc1-v2", b.clone())).await;
    let p2 = f.dc2.ns.run(crate::l7::backend("api-dc2", b)).await;
    f.register(&f.dc1, json!({"Name": "api", "Port": p1, "Meta": {"version": "v1"}, "Connect": {"SidecarService": {}}})).await;
    f.register(&f.dc1, json!({"ID": "api-v2", "Name": "api", "Port": p1v2, "Meta": {"version": "v2"}, "Connect": {"SidecarService": {}}})).await;
    f.register(&f.dc2, json!({"Name": "api", "Port": p2, "Meta": {"version": "v1"}, "Connect": {"SidecarService": {}}})).await;
    let (ns1, config_url) = (f.dc1.ns.clone(), f.dc1.http(SERVER, "/v1/config"));
    let put = |entry: Value| {
        let (ns, url) = (ns1.clone(), config_url.clone());
        async move {
            let (status, body) = ns.put(&url, entry.to_string()).await.unwrap();
            assert_eq!((status, body.trim()), (200, "true"));
        }
    };
    put(json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http"})).await;
    put(json!({"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}},
        "Failover": {"*": {"Datacenters": ["dc2"]}}}))
    .await;
    f.register(
        &f.dc2,
        json!({"Name": "web", "Port": 1, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "api", "Datacenter": "dc1", "LocalBindAddress": CLIENT, "LocalBindPort": 19400, "MeshGateway": {"Mode": "local"}}
        ]}}}}),
    )
    .await;
    let url = format!("http://{CLIENT}:19400/x");
    let answer = |want: &'static str| {
        let (ns, url) = (f.dc2.ns.clone(), url.clone());
        async move { ns.get(&url).await.ok().filter(|(s, b)| *s == 200 && b == &format!("{want} /x")).map(|_| ()) }
    };
    eventually("web in dc2 to reach api in dc1 over HTTP", Duration::from_secs(60), || answer("api-dc1")).await;
    // Both dc1 instances are up and healthy; the subset's requests reach v1 only.
    let v2_sidecar = f.dc1.http(SERVER, "/v1/health/connect/api?passing&filter=Service.Meta.version%20%3D%3D%20v2");
    eventually("dc1's v2 instance to be healthy", SOON, || async {
        let (_, body) = f.dc1.ns.get(&v2_sidecar).await.ok()?;
        body.contains("api-v2-sidecar-proxy").then_some(())
    })
    .await;
    for i in 0..20 {
        let (status, body) = f.dc2.ns.get(&url).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "api-dc1 /x"), "request {i}");
    }

    for (what, name) in [("dc1's api instance", "client"), ("dc1's gateway", "gwa")] {
        f.dc1.proc(name).kill();
        let failed = Instant::now();
        eventually(&format!("requests to fail over to dc2 once {what} is gone"), SOON, || answer("api-dc2")).await;
        eprintln!("{what} gone: requests failed over to dc2 after {:?}", failed.elapsed());
        f.dc1.proc(name).start();
        let back = Instant::now();
        eventually(&format!("requests to come back to dc1 once {what} returns"), Duration::from_secs(90), || answer("api-dc1")).await;
        eprintln!("{what} back: requests returned to dc1 after {:?}", back.elapsed());
    }
}
