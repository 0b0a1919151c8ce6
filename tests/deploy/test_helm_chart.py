"""The Helm chart, rendered offline through the Helm SDK for a matrix of values files (single
datacenter, primary with the federation secret, secondary consuming it, gateway off and on):
it lints strictly, every object validates against the Kubernetes schemas (oldest supported and
newest), and the objects say what the chart promises."""

from __future__ import annotations

import json
import re

import helm_python as helm
import kubernetes_validate
import pytest

from chart import config_files, container, find, kinds, lint, notes, render, secret_data, strip_source, values_file

pytestmark = pytest.mark.timeout(120)

MATRIX = ["single-dc", "primary-federation", "secondary", "gateway", "primary-federation-gateway", "secondary-gateway"]
KUBE_VERSIONS = ["1.26.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("name", MATRIX)
def test_chart_lints_strictly(name):
    report = lint(values_file(name))
    assert report["errors"] == [], report
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


@pytest.mark.parametrize("name", MATRIX)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(name):
    objects = render(values_file(name), release="dc2" if name.startswith("secondary") else "dc1")
    assert objects
    for obj in objects:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(strip_source(obj), version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['__source']}: {obj['kind']} {obj['metadata']['name']} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_single_datacenter_objects():
    objs = render(values_file("single-dc"))
    assert kinds(objs) == sorted(
        [
            ("ConfigMap", "dc1-trellis-client-config"),
            ("ConfigMap", "dc1-trellis-server-config"),
            ("DaemonSet", "dc1-trellis-client"),
            ("PodDisruptionBudget", "dc1-trellis-server"),
            ("Secret", "dc1-trellis-ca"),
            ("Secret", "dc1-trellis-gossip-key"),
            ("Service", "dc1-trellis-dns"),
            ("Service", "dc1-trellis-server"),
            ("Service", "dc1-trellis-ui"),
            ("ServiceAccount", "dc1-trellis-client"),
            ("ServiceAccount", "dc1-trellis-server"),
            ("StatefulSet", "dc1-trellis-server"),
        ]
    )
    sts = find(objs, "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    probe = container(spec)["readinessProbe"]["exec"]["command"]
    assert "/v1/status/leader" in probe[-1], probe
    # The CA key reaches only the init container that signs the server certificate.
    assert [m["name"] for m in spec["initContainers"][0]["volumeMounts"]].count("ca-key") == 1
    assert "ca-key" not in [m["name"] for m in container(spec)["volumeMounts"]]
    server_cfg = config_files(find(objs, "ConfigMap", "dc1-trellis-server-config"))["00-server.json"]
    assert server_cfg["bootstrap_expect"] == 3 and server_cfg["server"] is True
    assert server_cfg["retry_join"] == [f"dc1-trellis-server-{i}.dc1-trellis-server.default.svc" for i in range(3)]
    assert find(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    headless = find(objs, "Service", "dc1-trellis-server")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    ds = find(objs, "DaemonSet")["spec"]["template"]["spec"]
    http = next(p for p in container(ds)["ports"] if p["name"] == "http")
    assert http["hostPort"] == 8500 and "hostNetwork" not in ds
    client_cfg = config_files(find(objs, "ConfigMap", "dc1-trellis-client-config"))["00-client.json"]
    assert client_cfg["auto_encrypt"] == {"tls": True} and "cert_file" not in client_cfg["tls"]["defaults"]
    assert find(objs, "Service", "dc1-trellis-ui")["spec"]["ports"][0]["targetPort"] == 8500
    gossip = secret_data(find(objs, "Secret", "dc1-trellis-gossip-key"))["key"]
    assert len(__import__("base64").b64decode(gossip)) == 32


def test_bootstrap_expect_and_disruption_budget_follow_replicas():
    objs = render({"server": {"replicas": 5}})
    cfg = config_files(find(objs, "ConfigMap", "dc1-trellis-server-config"))["00-server.json"]
    assert cfg["bootstrap_expect"] == 5 and len(cfg["retry_join"]) == 5
    assert find(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 2
    objs = render({"server": {"replicas": 1}})
    assert config_files(find(objs, "ConfigMap", "dc1-trellis-server-config"))["00-server.json"]["bootstrap_expect"] == 1


def test_primary_renders_a_federation_secret_with_the_same_ca_and_gossip_key():
    objs = render(values_file("primary-federation"))
    fed = secret_data(find(objs, "Secret", "dc1-trellis-federation"))
    ca = secret_data(find(objs, "Secret", "dc1-trellis-ca"))
    assert (fed["caCert"], fed["caKey"]) == (ca["tls.crt"], ca["tls.key"])
    assert fed["gossipEncryptionKey"] == secret_data(find(objs, "Secret", "dc1-trellis-gossip-key"))["key"]
    assert json.loads(fed["serverConfigJSON"]) == {
        "primary_datacenter": "dc1",
        "retry_join_wan": [f"dc1-trellis-server-{i}.dc1-trellis-server.default.svc" for i in range(3)],
    }
    cfg = config_files(find(objs, "ConfigMap", "dc1-trellis-server-config"))["00-server.json"]
    assert cfg["ports"] == {"serf_wan": 8302}


def test_federation_through_gateways_names_the_primary_gateways():
    objs = render(values_file("primary-federation-gateway"))
    fed = json.loads(secret_data(find(objs, "Secret", "dc1-trellis-federation"))["serverConfigJSON"])
    assert fed == {"primary_datacenter": "dc1", "primary_gateways": ["198.51.100.10:8443"]}
    cfg = config_files(find(objs, "ConfigMap", "dc1-trellis-server-config"))["00-server.json"]
    assert cfg["connect"] == {"enable_mesh_gateway_wan_federation": True}


def test_secondary_consumes_the_federation_secret():
    objs = render(values_file("secondary"), release="dc2")
    assert not [o for o in objs if o["kind"] == "Secret"], "a secondary must not generate its own CA or gossip key"
    spec = find(objs, "StatefulSet")["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"dc1-trellis-federation"}
    assert "--config-dir=/trellis/userconfig/dc1-trellis-federation" in container(spec)["command"]
    gossip = next(e for e in container(spec)["env"] if e["name"] == "GOSSIP_KEY")
    assert gossip["valueFrom"]["secretKeyRef"] == {"name": "dc1-trellis-federation", "key": "gossipEncryptionKey"}
    ds = find(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert ds["hostNetwork"] is True
    adv = next(e for e in container(ds)["env"] if e["name"] == "ADVERTISE_IP")
    assert adv["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_mesh_gateway_is_a_deployment_behind_a_tcp_and_udp_load_balancer():
    objs = render(values_file("gateway"))
    dep = find(objs, "Deployment", "dc1-trellis-mesh-gateway")
    assert dep["spec"]["replicas"] == 2
    c = container(dep["spec"]["template"]["spec"])
    cmd = c["command"]
    assert cmd[:3] == ["trellis", "gateway", "mesh"]
    assert "--address=$(POD_IP):8443" in cmd and "--wan-address=198.51.100.10:8443" in cmd
    assert [a for a in cmd if a.startswith("--join=")] == [f"--join=dc1-trellis-server-{i}.dc1-trellis-server.default.svc" for i in range(3)]
    # Ready when its agent knows the leader and the gateway's own check passes.
    probe = c["readinessProbe"]["exec"]["command"][-1]
    assert "/v1/status/leader" in probe and "/v1/agent/health/service/id/mesh-gateway" in probe, probe
    svc = find(objs, "Service", "dc1-trellis-mesh-gateway")["spec"]
    assert svc["type"] == "LoadBalancer"
    assert sorted((p["port"], p["protocol"]) for p in svc["ports"]) == [(8443, "TCP"), (8443, "UDP")]
    # Without a gateway, nothing of it is rendered.
    assert not [o for o in render(values_file("single-dc")) if "gateway" in o["metadata"]["name"]]


def test_gateway_wan_address_from_the_load_balancer_waits_for_it():
    # Rendered without a cluster, the Service has no load balancer address: the gateways
    # advertise their pods' addresses (the command takes an IP), a primary's federation secret
    # names the Service, and the notes say to upgrade once the load balancer has an address.
    values = {"meshGateway": {"enabled": True}, "global": {"federation": {"enabled": True, "createFederationSecret": True}}}
    text = notes(values)
    assert "<each gateway pod's IP>:8443" in text and "helm upgrade" in text, text
    objs = render(values)
    cmd = container(find(objs, "Deployment", "dc1-trellis-mesh-gateway")["spec"]["template"]["spec"])["command"]
    assert "--wan-address=$(POD_IP):8443" in cmd, cmd
    fed = json.loads(secret_data(find(objs, "Secret", "dc1-trellis-federation"))["serverConfigJSON"])
    assert fed["primary_gateways"] == ["dc1-trellis-mesh-gateway.default.svc:8443"], fed


def test_gateway_wan_address_from_the_node_and_static_ipv6():
    objs = render(values_file("secondary-gateway"), release="dc2")
    c = container(find(objs, "Deployment", "dc2-trellis-mesh-gateway")["spec"]["template"]["spec"])
    assert "--wan-address=$(HOST_IP):8443" in c["command"]
    assert {(p["protocol"], p.get("hostPort")) for p in c["ports"]} == {("TCP", 8443), ("UDP", 8443)}
    objs = render({"meshGateway": {"enabled": True, "wanAddress": {"source": "Static", "static": "2001:db8::10"}}})
    cmd = container(find(objs, "Deployment", "dc1-trellis-mesh-gateway")["spec"]["template"]["spec"])["command"]
    assert "--wan-address=[2001:db8::10]:8443" in cmd, cmd


@pytest.mark.parametrize(
    "values, message",
    [
        ({"global": {"tls": {"caCert": {"secretName": "ca"}}}}, "global.tls.caKey.secretName is required"),
        ({"meshGateway": {"enabled": True, "wanAddress": {"source": "Elsewhere"}}}, "must be Service, NodeIP or Static"),
        ({"meshGateway": {"enabled": True, "wanAddress": {"source": "Static"}}}, "meshGateway.wanAddress.static is required"),
        ({"meshGateway": {"enabled": True, "wanAddress": {"source": "Static", "static": "gw.example.com"}}}, "must be an IP address"),
        (
            {"meshGateway": {"enabled": True, "wanAddress": {"source": "NodeIP"}}, "global": {"federation": {"enabled": True, "createFederationSecret": True}}},
            "cannot name them in primary_gateways",
        ),
        ({"meshGateway": {"enabled": True}, "global": {"federation": {"enabled": True, "retryJoinWan": ["10.1.0.11"]}}}, "retryJoinWan is for traditional WAN federation"),
        ({"global": {"federation": {"createFederationSecret": True}}}, "needs global.federation.enabled"),
        ({"global": {"federation": {"enabled": True, "createFederationSecret": True}, "tls": {"caCert": {"secretName": "ca"}, "caKey": {"secretName": "ca"}}}}, "create the federation secret by hand"),
        ({"server": {"extraVolumes": [{"type": "hostPath", "name": "x"}]}}, "type must be secret or configMap"),
        ({"global": {"gossipEncryption": {"autoGenerate": False}}}, "a gossip key is required"),
    ],
)
def test_bad_values_fail_with_a_clear_message(values, message):
    with pytest.raises(helm.HelmError) as e:
        render(values)
    assert message in str(e.value), str(e.value)


def test_values_file_documents_every_key():
    """Every key of values.yaml down to the second level has a comment right above it; deeper
    keys are explained by their parent's comment (resources.requests.memory and the like)."""
    from chart import chart_path

    lines = chart_path().joinpath("values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if not m or len(m.group(1)) > 2:
            continue
        j = i - 1
        while j >= 0 and lines[j].strip() == "":
            j -= 1
        if j < 0 or not lines[j].strip().startswith("#"):
            undocumented.append(f"line {i + 1}: {line.strip()}")
    assert undocumented == [], f"keys without a comment: {undocumented}"
