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
  ?dc= reads cross in both directions.
"""

from __future__ import annotations

import json

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

    def catalog_complete():
        code, body = c.http(s0, "/v1/catalog/nodes")
        return code == 200 and sorted(n["Node"] for n in json.loads(body)) == sorted([p.name for p in servers] + [p.node.name for p in clients])

    wait_until(catalog_complete, 60, f"{dc}'s servers and every node's client in the catalog")
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
