"""The chart's pods as real processes (tests/deploy/kube.py: each pod in its own network
namespace on a bridge, each container chrooted into an image-like root with its volumes).

What this test does:
- renders the chart for one datacenter and runs every pod: 3 servers (StatefulSet; their init
  container signs their certificate with the generated CA) and a client on each of 3 nodes
  (DaemonSet); all pass their readiness probes, the servers form one Raft configuration, the
  clients are in the catalog, KV written through a client reads back from a server, DNS
  answers through a client, and gossip uses the key from the chart's Secret;
- renders a primary with the federation secret in one cluster, and a secondary in a second
  cluster (flat pod network, DNS between the clusters) from that secret alone: the secondary
  datacenter forms with clients on the nodes' network, both datacenters see each other, and
  ?dc= reads cross in both directions;
- renders the gateway values (two mesh gateways): the gateway pods pass their readiness probe,
  each is in the catalog as a mesh-gateway service on its pod's address with the chart's WAN
  address and a passing check, and a TLS connection to a gateway for server.<dc>.consul
  reaches a server (SNI routing);
- federates two releases through mesh gateways alone (the primary's gateway behind a load
  balancer with a static address, the secondary's on its node's address through a host port;
  between the clusters only the gateways' addresses are reachable): the secondary finds the
  primary through primary_gateways from the federation secret, both datacenters see each
  other's gateways with no WAN gossip pool, and ?dc= reads cross both ways.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from chart import find, render, secret_data, values_file
from kube import Cluster, Network, wait_ready
from util import dns_query, wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def network():
    n = Network()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def clusters(network, trellis, tmp_path):
    made: list[Cluster] = []

    def make(name: str) -> Cluster:
        c = Cluster(name, network, tmp_path, trellis, nodes=3)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in reversed(made):
            c.close()


def check_datacenter(c: Cluster, ns: str, dc: str):
    servers, clients = c.pods_of(ns, "server"), c.pods_of(ns, "client")
    wait_ready([c], servers + clients, 120)
    s0 = servers[0]
    code, peers = c.http(s0, "/v1/status/peers")
    assert code == 200 and sorted(json.loads(peers)) == sorted(f"{p.ip}:8300" for p in servers), peers
    code, leader = c.http(s0, "/v1/status/leader")
    assert json.loads(leader) in json.loads(peers)

    # Gateways run an agent of their own, named after their pod.
    gateways = c.pods_of(ns, "mesh-gateway")

    def catalog_complete():
        code, body = c.http(s0, "/v1/catalog/nodes")
        return code == 200 and sorted(n["Node"] for n in json.loads(body)) == sorted([p.name for p in servers + gateways] + [p.node.name for p in clients])

    wait_until(catalog_complete, 60, f"{dc}'s servers, every node's client and the gateways in the catalog")
    code, body = c.http(clients[-1], "/v1/kv/deploy-test", "PUT", f"written-in-{dc}")
    assert (code, body.strip()) == (200, "true"), body
    code, body = c.http(servers[-1], "/v1/kv/deploy-test?raw")
    assert (code, body) == (200, f"written-in-{dc}")
    # DNS through a client agent: the servers' consul service, one answer per server.
    assert dns_query([f"--net=/run/netns/{clients[0].netns}"], "consul.service.consul", clients[0].ip, 8600) == (0, len(servers))
    # Gossip is encrypted with the key the release's Secret holds.
    gossip = next(e for e in servers[0].main.spec["env"] if e["name"] == "GOSSIP_KEY")["valueFrom"]["secretKeyRef"]
    key = c.secret_data(ns, gossip["name"])[gossip["key"]].decode()
    code, body = c.http(s0, "/v1/operator/keyring")
    assert code == 200 and key in body, body


def test_chart_forms_a_datacenter(clusters):
    c = clusters("solo")
    objects = render(values_file("single-dc"), release="dc1", namespace="default")
    c.apply(objects, "default")
    try:
        check_datacenter(c, "default", "dc1")
        # The datacenter is alone: no WAN pool (serf_wan disabled without federation).
        code, body = c.http(c.pods_of("default", "server")[0], "/v1/catalog/datacenters")
        assert json.loads(body) == ["dc1"], body
    except BaseException:
        print(c.logs())
        raise


def test_two_releases_federate_through_the_federation_secret(clusters):
    east, west = clusters("east"), clusters("west")
    west.dns_peers = [east]  # the secondary's cluster resolves the primary's service names
    primary = render(values_file("primary-federation"), release="dc1", namespace="default")
    east.apply(primary, "default")
    try:
        check_datacenter(east, "default", "dc1")
        # kubectl get secret dc1-trellis-federation -o yaml | kubectl apply (into the secondary).
        fed = find(primary, "Secret", "dc1-trellis-federation")
        secondary = render(values_file("secondary"), release="dc2", namespace="default")
        west.apply([fed] + secondary, "default")
        check_datacenter(west, "default", "dc2")
        # The secondary runs with the primary's CA and gossip key, and knows its primary.
        s_west, s_east = west.pods_of("default", "server")[0], east.pods_of("default", "server")[0]
        code, body = west.http(s_west, "/v1/agent/self")
        assert json.loads(body)["Config"]["PrimaryDatacenter"] == "dc1", body
        assert all(p.ip == p.node.ip for p in west.pods_of("default", "client")), "secondary clients are on the nodes' network"

        def both(c, pod):
            code, body = c.http(pod, "/v1/catalog/datacenters")
            return code == 200 and sorted(json.loads(body)) == ["dc1", "dc2"]

        wait_until(lambda: both(west, s_west) and both(east, s_east), 60, "both datacenters to list each other")
        code, body = west.http(west.pods_of("default", "client")[0], "/v1/kv/deploy-test?dc=dc1&raw")
        assert (code, body) == (200, "written-in-dc1"), body
        code, body = east.http(s_east, "/v1/catalog/nodes?dc=dc2")
        assert code == 200 and s_west.name in [n["Node"] for n in json.loads(body)], body
        code, body = east.http(s_east, "/v1/agent/members?wan=1")
        wan = sorted(m["Name"] for m in json.loads(body))
        assert wan == sorted([f"{p.name}.dc1" for p in east.pods_of("default", "server")] + [f"{s_west.name}.dc2"]), wan
        assert secret_data(fed)["caCert"] == west.secret_data("default", "dc1-trellis-federation")["caCert"].decode()
    except BaseException:
        print(east.logs())
        print(west.logs())
        raise


def merged(base: dict, override: dict) -> dict:
    """Values files merged the way helm merges -f files: maps key by key, the rest replaced."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def mesh_gateways(c: Cluster, pod, dc: str | None = None) -> list[dict]:
    code, body = c.http(pod, "/v1/health/service/mesh-gateway" + (f"?dc={dc}" if dc else ""))
    assert code == 200, body
    return json.loads(body)


def check_gateways(c: Cluster, ns: str, wan: dict[str, str]):
    """Every gateway pod is ready and registered on its own address with its WAN address
    (pod name -> "ip:port") and a passing check."""
    gateways, s0 = c.pods_of(ns, "mesh-gateway"), c.pods_of(ns, "server")[0]
    assert sorted(p.name for p in gateways) == sorted(wan), gateways
    wait_ready([c], gateways, 60)

    def registered():
        entries = mesh_gateways(c, s0)
        got = {
            e["Node"]["Node"]: (
                e["Service"]["Kind"],
                e["Service"]["Address"],
                e["Service"]["Port"],
                "{Address}:{Port}".format(**e["Service"]["TaggedAddresses"]["wan"]),
                e["Service"]["Meta"].get("consul-wan-federation"),
                sorted({ch["Status"] for ch in e["Checks"]}),
            )
            for e in entries
        }
        want = {p.name: ("mesh-gateway", p.ip, 8443, wan[p.name], "1", ["passing"]) for p in gateways}
        return got == want or print(f"mesh-gateway in the catalog: {got}, want {want}")

    wait_until(registered, 30, f"the mesh gateways of {ns} registered, with passing checks")


def test_chart_gateways_register_and_route_by_sni(clusters):
    c = clusters("gw")
    values = values_file("gateway")
    objects = render(values, release="dc1", namespace="default")
    c.apply(objects, "default")
    try:
        wait_ready([c], c.pods_of("default", "server") + c.pods_of("default", "client"), 120)
        gateways = c.pods_of("default", "mesh-gateway")
        assert len(gateways) == values["meshGateway"]["replicas"] == 2
        static = values["meshGateway"]["wanAddress"]["static"]
        check_gateways(c, "default", {p.name: f"{static}:8443" for p in gateways})
        # A connection for server.dc1.consul through a gateway reaches a server: the server's
        # certificate comes back through the spliced bytes (the gateway never terminates TLS).
        client = c.pods_of("default", "client")[0]

        def server_certificate():
            r = subprocess.run(
                ["nsenter", f"--net=/run/netns/{client.netns}", "--", "openssl", "s_client", "-connect", f"{gateways[0].ip}:8443", "-servername", "server.dc1.consul"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15,
            )
            return "subject=CN = server.dc1.consul" in r.stdout

        wait_until(server_certificate, 30, "a server's certificate through the gateway")
    except BaseException:
        print(c.logs())
        raise


def isolate(c: Cluster, gateways_elsewhere: set[str]):
    """Only gateways cross between clusters: every pod of `c` may reach the pods, nodes and load
    balancers of its own cluster, and elsewhere only port 8443 of the other datacenter's
    gateway addresses (the rest of the network is refused on the way out)."""
    own = {p.ip for p in c.pods} | {n.ip for n in c.nodes} | set(c.load_balancers.values())
    rules = f"""
    table inet isolate {{
      chain out {{
        type filter hook output priority 0; policy accept;
        ct state established,related accept
        ip daddr {{ {", ".join(sorted(own))} }} accept
        ip daddr {{ {", ".join(sorted(gateways_elsewhere))} }} meta l4proto {{ tcp, udp }} th dport 8443 accept
        ip daddr {c.network.prefix}.0.0/16 reject with icmpx type admin-prohibited
      }}
    }}
    """
    for netns in sorted({p.netns for p in c.pods}):
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)


def test_two_releases_federate_through_mesh_gateways(network, clusters):
    east, west = clusters("north"), clusters("south")
    # The primary's gateway behind a load balancer whose address is pinned (and so known when
    # rendering, as meshGateway.wanAddress.source=Static needs).
    lb = network.allocate_ip()
    primary_values = merged(values_file("primary-federation-gateway"), {"meshGateway": {"wanAddress": {"static": lb}, "service": {"loadBalancerIP": lb}}})
    primary = render(primary_values, release="dc1", namespace="default")
    east.apply(primary, "default")
    # The secondary's gateway will be on one of its nodes' addresses (a host port).
    isolate(east, {n.ip for n in west.nodes})
    try:
        check_datacenter(east, "default", "dc1")
        assert east.load_balancers == {"dc1-trellis-mesh-gateway": lb}
        check_gateways(east, "default", {p.name: f"{lb}:8443" for p in east.pods_of("default", "mesh-gateway")})
        fed = find(primary, "Secret", "dc1-trellis-federation")
        assert json.loads(secret_data(fed)["serverConfigJSON"]) == {"primary_datacenter": "dc1", "primary_gateways": [f"{lb}:8443"]}
        # The secondary, from the primary's secret alone; no DNS between the clusters, and
        # only the gateways' addresses are reachable across them.
        secondary = render(values_file("secondary-gateway"), release="dc2", namespace="default")
        west.apply([fed] + secondary, "default")
        isolate(west, {lb})
        check_datacenter(west, "default", "dc2")
        check_gateways(west, "default", {p.name: f"{p.node.ip}:8443" for p in west.pods_of("default", "mesh-gateway")})

        s_west, s_east = west.pods_of("default", "server")[0], east.pods_of("default", "server")[0]
        # The servers cannot reach each other directly.
        reach = subprocess.run(["nsenter", f"--net=/run/netns/{s_west.netns}", "--", "curl", "-s", "-m", "5", f"http://{s_east.ip}:8500/v1/status/leader"], capture_output=True)
        assert reach.returncode == 7, reach  # curl: could not connect
        code, body = west.http(s_west, "/v1/agent/self")
        assert json.loads(body)["Config"]["PrimaryDatacenter"] == "dc1", body

        def both(c, pod):
            code, body = c.http(pod, "/v1/catalog/datacenters")
            return code == 200 and sorted(json.loads(body)) == ["dc1", "dc2"]

        wait_until(lambda: both(west, s_west) and both(east, s_east), 60, "both datacenters to list each other (federation states)")
        # A path through the gateways follows the federation states within seconds.
        wait_until(lambda: west.http(west.pods_of("default", "client")[0], "/v1/kv/deploy-test?dc=dc1&raw") == (200, "written-in-dc1"), 30, "a dc1 read from a dc2 client")

        def dc2_nodes_from_dc1():
            code, body = east.http(s_east, "/v1/catalog/nodes?dc=dc2")
            return code == 200 and s_west.name in [n["Node"] for n in json.loads(body)]

        wait_until(dc2_nodes_from_dc1, 30, "dc2's nodes read from a dc1 server")
        # Each side sees the other's gateways, with the WAN addresses they advertise.
        dc2_gateways = {f"{p.node.ip}:8443" for p in west.pods_of("default", "mesh-gateway")}
        wan_of = lambda entries: {"{Address}:{Port}".format(**e["Service"]["TaggedAddresses"]["wan"]) for e in entries}  # noqa: E731
        assert wan_of(mesh_gateways(east, s_east, "dc2")) == dc2_gateways
        assert wan_of(mesh_gateways(west, s_west, "dc1")) == {f"{lb}:8443"}
        # No WAN gossip pool: the datacenters know each other from federation states only.
        for c, pod in [(east, s_east), (west, s_west)]:
            code, body = c.http(pod, "/v1/agent/members?wan=1")
            assert code == 200 and json.loads(body) == [], body
    except BaseException:
        print(east.logs())
        print(west.logs())
        raise
