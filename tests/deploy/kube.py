"""A stand-in for Kubernetes that runs a rendered chart's pods as real processes.

No kubelet, no container engine: each pod gets its own network namespace (a veth on a bridge
that lives in a namespace of its own, so this machine's network is untouched), and each
container a private mount namespace chrooted into a root assembled like its image
(packaging/Dockerfile's final stage: the binary under test at the image's path, the image's
user and environment, /bin/sh and curl for the probes), with the pod's volumes mounted where
the manifest says. What the kubelet does is done from the manifests as rendered:

- StatefulSets (ordinal names, a volume per claim template, hostname + subdomain), DaemonSets
  (one pod per node), Deployments; required pod anti-affinity on kubernetes.io/hostname is
  honoured when placing pods on nodes, and hostNetwork pods share their node's namespace;
- env from values, fieldRefs (metadata.name/namespace, status.podIP/hostIP, spec.nodeName),
  secretKeyRef and configMapKeyRef; $(VAR) expansion in command and args; the image's
  ENTRYPOINT/CMD when the manifest gives none;
- volumes: configMap, secret (items, defaultMode, fsGroup ownership as the kubelet sets it),
  emptyDir, volumeClaimTemplates; readOnly mounts; readOnlyRootFilesystem;
- runAsUser/runAsGroup/fsGroup (and runAsNonRoot is enforced); init containers run to
  completion first; exec, tcpSocket and httpGet readiness probes;
- cluster DNS as /etc/hosts: headless Services' pod names (<pod>.<svc>.<ns>.svc[.cluster.local])
  and the service names, for the cluster itself and any clusters it is told to resolve;
- hostPort (TCP and UDP): the node's address forwards the port to the pod (DNAT and
  masquerade in the node's namespace, as the CNI portmap plugin does);
- LoadBalancer Services with spec.loadBalancerIP: that address (a namespace of its own on the
  network) forwards each port to the Service's pods, new connections spread over them.

Everything it makes is removed by close(): processes (SIGTERM, then SIGKILL after the pod's
grace period), namespaces and files.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from util import REPO

_spec = importlib.util.spec_from_file_location("check_dockerfile", REPO / "packaging/check-dockerfile.py")
check_dockerfile = importlib.util.module_from_spec(_spec)
sys.modules["check_dockerfile"] = check_dockerfile
_spec.loader.exec_module(check_dockerfile)

HOST_DIRS = ["/usr/bin", "/usr/lib", "/usr/lib64"]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


class Network:
    """A flat layer-2 network for pods and nodes: a bridge in a namespace of its own."""

    def __init__(self, prefix: str = "10.244"):
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.bridge_ns = self._netns("br")
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        self._ifaces = itertools.count()
        self._hosts = itertools.count(10)
        self._forwarding: set[str] = set()

    def _netns(self, name: str) -> str:
        ns = f"trellis-{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def allocate_ip(self) -> str:
        """An unused address of the network (for attach, e.g. a load balancer's to render with)."""
        n = next(self._hosts)
        return f"{self.prefix}.{n // 250}.{n % 250 + 1}"

    def attach(self, name: str, ip: str | None = None) -> tuple[str, str]:
        """A new network namespace with one address on the bridge: (netns, ip)."""
        ip = ip or self.allocate_ip()
        ns = self._netns(name)
        veth = f"v{next(self._ifaces)}"
        sh("ip", "-n", self.bridge_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.bridge_ns, "link", "set", veth, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns, ip

    def forward(self, netns: str, ip: str, proto: str, port: int, targets: list[str], target_port: int):
        """Connections to ip:port (proto "TCP" or "UDP") arriving in `netns` go to one of the
        targets' target_port, their source rewritten to `ip` (so replies come back this way)."""
        if netns not in self._forwarding:
            sh("ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.eth0.send_redirects=0")
            rules = (
                "add table ip kube\n"
                "add chain ip kube pre { type nat hook prerouting priority dstnat; policy accept; }\n"
                "add chain ip kube post { type nat hook postrouting priority srcnat; policy accept; }\n"
                "add rule ip kube post ct status dnat masquerade\n"
            )
            subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
            self._forwarding.add(netns)
        targets_map = ", ".join(f"{i} : {t}" for i, t in enumerate(targets))
        rule = f"add rule ip kube pre ip daddr {ip} {proto.lower()} dport {port} dnat to numgen inc mod {len(targets)} map {{ {targets_map} }} : {target_port}\n"
        r = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rule, text=True, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"nft in {netns}: {rule.strip()}: {r.stderr.strip()}")

    def close(self):
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


@dataclass
class Node:
    name: str
    ip: str
    netns: str


@dataclass
class Container:
    name: str
    spec: dict
    root: Path
    log: Path
    proc: subprocess.Popen | None = None
    uid: int = 0
    gid: int = 0


@dataclass
class Pod:
    name: str
    namespace: str
    spec: dict
    labels: dict
    node: Node
    ip: str
    netns: str
    dir: Path
    hostname: str | None = None
    subdomain: str | None = None
    volumes: dict[str, Path] = field(default_factory=dict)
    containers: list[Container] = field(default_factory=list)

    @property
    def main(self) -> Container:
        return self.containers[0]


class Cluster:
    def __init__(self, name: str, network: Network, workdir: Path, trellis: Path, nodes: int = 3):
        self.name, self.network, self.trellis = name, network, trellis
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.image = check_dockerfile.final_config(REPO / "packaging/Dockerfile")
        copies = [c for c in self.image["copies"] if c["from"]]
        # Where the image puts the binary (COPY --from=builder ... <dest>).
        self.binary_path = next(c["dest"] for c in copies if c["sources"][-1].endswith("/trellis"))
        self.nodes = []
        for i in range(nodes):
            ns, ip = network.attach(f"{name}-node{i}")
            self.nodes.append(Node(f"{name}-node-{i}", ip, ns))
        self.objects: dict[str, list[dict]] = {}  # namespace -> objects
        self.pods: list[Pod] = []
        self.dns_peers: list[Cluster] = []
        self.load_balancers: dict[str, str] = {}  # Service name -> its loadBalancerIP

    # --- objects --------------------------------------------------------------------------
    def find(self, namespace: str, kind: str, name: str) -> dict:
        for o in self.objects.get(namespace, []):
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise LookupError(f"{kind} {namespace}/{name} does not exist in cluster {self.name}")

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes]:
        s = self.find(namespace, "Secret", name)
        data = {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (s.get("stringData") or {}).items()})
        return data

    def apply(self, objects: list[dict], namespace: str):
        """Create the objects, then the pods of their workloads, and start them."""
        objs = [{k: v for k, v in o.items() if k != "__source"} for o in objects]
        self.objects.setdefault(namespace, []).extend(objs)
        new = []
        for o in objs:
            kind = o["kind"]
            if kind == "StatefulSet":
                for i in range(o["spec"]["replicas"]):
                    new.append(self._pod(o, f"{o['metadata']['name']}-{i}", namespace, ordinal=i))
            elif kind == "DaemonSet":
                for node in self.nodes:
                    new.append(self._pod(o, f"{o['metadata']['name']}-{node.name}", namespace, node=node))
            elif kind == "Deployment":
                h = uuid.uuid4().hex[:5]
                for i in range(o["spec"].get("replicas", 1)):
                    new.append(self._pod(o, f"{o['metadata']['name']}-{h}-{i}", namespace))
        self.write_dns()
        for p in new:
            self._host_ports(p)
        for svc in (o for o in objs if o["kind"] == "Service" and o["spec"].get("type") == "LoadBalancer" and o["spec"].get("loadBalancerIP")):
            self._load_balancer(svc, namespace)
        for p in new:
            self._start(p)
        return new

    def _host_ports(self, pod: Pod):
        if pod.spec.get("hostNetwork"):
            return
        for c in pod.spec["containers"]:
            for port in c.get("ports") or []:
                if port.get("hostPort"):
                    self.network.forward(pod.node.netns, pod.node.ip, port.get("protocol", "TCP"), port["hostPort"], [pod.ip], port["containerPort"])

    def _load_balancer(self, svc: dict, namespace: str):
        spec, name = svc["spec"], svc["metadata"]["name"]
        pods = [p for p in self.pods if p.namespace == namespace and all(p.labels.get(k) == v for k, v in spec["selector"].items())]
        if not pods:
            raise AssertionError(f"LoadBalancer Service {name}: no pods match {spec['selector']}")
        netns, ip = self.network.attach(f"{self.name}-lb{len(self.load_balancers)}", ip=spec["loadBalancerIP"])
        self.load_balancers[name] = ip
        for port in spec["ports"]:
            target = port.get("targetPort", port["port"])
            if not isinstance(target, int):
                raise NotImplementedError(f"Service {name}: named targetPort {target}")
            self.network.forward(netns, ip, port.get("protocol", "TCP"), port["port"], [p.ip for p in pods], target)

    # --- pods -----------------------------------------------------------------------------
    def _place(self, workload: dict, spec: dict, labels: dict) -> Node:
        anti = (((spec.get("affinity") or {}).get("podAntiAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")) or []
        taken: set[str] = set()
        for term in anti:
            if term["topologyKey"] != "kubernetes.io/hostname":
                raise NotImplementedError(f"anti-affinity topology {term['topologyKey']}")
            want = term["labelSelector"]["matchLabels"]
            taken |= {p.node.name for p in self.pods if all(p.labels.get(k) == v for k, v in want.items())}
        free = [n for n in self.nodes if n.name not in taken]
        if not free:
            raise AssertionError(f"{workload['metadata']['name']}: unschedulable: the required pod anti-affinity leaves no node among {len(self.nodes)}")
        # Spread: the node with the fewest pods.
        return min(free, key=lambda n: sum(p.node is n for p in self.pods))

    def _pod(self, workload: dict, name: str, namespace: str, ordinal: int | None = None, node: Node | None = None) -> Pod:
        tmpl = workload["spec"]["template"]
        spec, labels = tmpl["spec"], dict(tmpl["metadata"].get("labels") or {})
        node = node or self._place(workload, spec, labels)
        if spec.get("hostNetwork"):
            netns, ip = node.netns, node.ip
        else:
            netns, ip = self.network.attach(f"{self.name}-p{len(self.pods)}")
        pod = Pod(name, namespace, spec, labels, node, ip, netns, self.dir / "pods" / name)
        if workload["kind"] == "StatefulSet":
            pod.hostname, pod.subdomain = name, workload["spec"]["serviceName"]
        pod.dir.mkdir(parents=True)
        self._volumes(pod, workload)
        for c in (spec.get("initContainers") or []) + spec["containers"]:
            pod.containers.append(Container(c["name"], c, pod.dir / "roots" / c["name"], pod.dir / f"{c['name']}.log"))
        # Main containers first in pod.containers order for Pod.main; init containers ran first.
        inits = {c["name"] for c in spec.get("initContainers") or []}
        pod.containers.sort(key=lambda c: c.name in inits)
        self.pods.append(pod)
        return pod

    def _volumes(self, pod: Pod, workload: dict):
        sc = pod.spec.get("securityContext") or {}
        fs_group = sc.get("fsGroup")
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates") or []}
        for name in claims:
            d = pod.dir / "volumes" / name
            d.mkdir(parents=True)
            if fs_group is not None:
                os.chown(d, 0, fs_group)
                os.chmod(d, 0o2775)
            pod.volumes[name] = d
        for v in pod.spec.get("volumes") or []:
            d = pod.dir / "volumes" / v["name"]
            d.mkdir(parents=True)
            pod.volumes[v["name"]] = d
            if "emptyDir" in v:
                os.chmod(d, 0o777)
            elif "configMap" in v or "secret" in v:
                src = v.get("configMap") or v.get("secret")
                if "configMap" in v:
                    cm = self.find(pod.namespace, "ConfigMap", src["name"])
                    data = {k: s.encode() for k, s in (cm.get("data") or {}).items()}
                else:
                    data = self.secret_data(pod.namespace, src["secretName"])
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                mode = src.get("defaultMode", 0o644)
                for it in items:
                    if it["key"] not in data:
                        raise AssertionError(f"pod {pod.name}: volume {v['name']}: key {it['key']} is not in {src}")
                    f = d / it["path"]
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(data[it["key"]])
                    m = it.get("mode", mode)
                    if fs_group is not None:
                        # The kubelet gives the fsGroup group ownership and read access.
                        os.chown(f, 0, fs_group)
                        m |= 0o440
                    os.chmod(f, m)
                os.chmod(d, 0o755)
            else:
                raise NotImplementedError(f"pod {pod.name}: volume {v['name']}: {sorted(set(v) - {'name'})}")

    def _env(self, pod: Pod, c: dict) -> dict[str, str]:
        env = dict(self.image["env"])
        fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "status.podIP": pod.ip, "status.hostIP": pod.node.ip, "spec.nodeName": pod.node.name}
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secret_data(pod.namespace, ref["name"])[ref["key"]].decode()
            elif "configMapKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["configMapKeyRef"]
                env[e["name"]] = self.find(pod.namespace, "ConfigMap", ref["name"])["data"][ref["key"]]
            else:
                raise NotImplementedError(f"env {e}")
        return env

    def _identity(self, pod: Pod, c: dict) -> tuple[int, int, list[int]]:
        psc, csc = pod.spec.get("securityContext") or {}, c.get("securityContext") or {}
        image_uid, _, image_gid = self.image["user"].partition(":")
        uid = csc.get("runAsUser", psc.get("runAsUser", int(image_uid or 0)))
        gid = csc.get("runAsGroup", psc.get("runAsGroup", int(image_gid or 0)))
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and uid == 0:
            raise AssertionError(f"pod {pod.name}: container {c['name']} has runAsNonRoot but would run as root")
        groups = [g for g in [psc.get("fsGroup"), *psc.get("supplementalGroups", [])] if g is not None]
        return uid, gid, groups or [gid]

    def _argv(self, c: dict, env: dict[str, str]) -> list[str]:
        if c.get("command"):
            argv = list(c["command"]) + list(c.get("args") or [])
        else:
            argv = list(self.image["entrypoint"]) + list(c.get("args") or self.image["cmd"])
        return [expand(a, env) for a in argv]

    def _root(self, pod: Pod, ct: Container) -> str:
        """Make the container's root and return the mount script that assembles it."""
        r = ct.root
        for d in HOST_DIRS + ["/dev", "/proc", "/tmp", "/etc", str(Path(self.binary_path).parent)]:
            (r / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for link in ["bin", "lib", "lib64", "sbin"]:
            if not (r / link).is_symlink():
                (r / link).symlink_to(f"usr/{link}")
        (r / self.binary_path.lstrip("/")).touch()
        (r / "etc/passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\ntrellis:x:{ct.uid}:{ct.gid}::/trellis:/usr/sbin/nologin\n")
        (r / "etc/group").write_text(f"root:x:0:\ntrellis:x:{ct.gid}:\n")
        (r / "etc/nsswitch.conf").write_text("hosts: files\npasswd: files\ngroup: files\n")
        (r / "etc/resolv.conf").write_text("")
        (r / "etc/hostname").write_text(pod.name + "\n")
        q = shlex.quote
        script = [f"mount --bind {q(str(r))} {q(str(r))}"]
        for d in HOST_DIRS:
            if os.path.isdir(d):
                script.append(f"mount --bind -o ro {d} {q(str(r / d.lstrip('/')))}")
        script.append(f"mount --bind -o ro {q(str(self.trellis))} {q(str(r / self.binary_path.lstrip('/')))}")
        script += [f"mount --rbind /dev {q(str(r / 'dev'))}", f"mount --rbind /proc {q(str(r / 'proc'))}"]
        for m in ct.spec.get("volumeMounts") or []:
            src = pod.volumes[m["name"]] / m.get("subPath", "")
            dst = r / m["mountPath"].lstrip("/")
            dst.mkdir(parents=True, exist_ok=True)
            script.append(f"mount --bind {'-o ro ' if m.get('readOnly') else ''}{q(str(src))} {q(str(dst))}")
        if (ct.spec.get("securityContext") or {}).get("readOnlyRootFilesystem"):
            script.append(f"mount -o remount,bind,ro {q(str(r))}")
        return " && ".join(script)

    def _launch(self, pod: Pod, ct: Container) -> subprocess.Popen:
        ct.uid, ct.gid, groups = self._identity(pod, ct.spec)
        env = self._env(pod, ct.spec)
        argv = self._argv(ct.spec, env)
        script = self._root(pod, ct)
        workdir = ct.spec.get("workingDir") or self.image["workdir"]
        (ct.root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        q = shlex.quote
        script += f" && exec chroot --userspec={ct.uid}:{ct.gid} --groups={','.join(map(str, groups))} {q(str(ct.root))} /usr/bin/env -i -C {q(workdir)} " + " ".join(q(f"{k}={v}") for k, v in env.items()) + " " + " ".join(map(q, argv))
        out = open(ct.log, "ab")
        return subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{pod.netns}", "--", "unshare", "--mount", "--propagation", "private", "--uts", "sh", "-c", f"hostname {q(pod.name)} && {script}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def _start(self, pod: Pod):
        inits = {c["name"] for c in pod.spec.get("initContainers") or []}
        for ct in [c for c in pod.containers if c.name in inits]:
            p = self._launch(pod, ct)
            try:
                rc = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                raise AssertionError(f"pod {pod.name}: init container {ct.name} did not finish in 60s")
            if rc != 0:
                raise AssertionError(f"pod {pod.name}: init container {ct.name} exited {rc}:\n{ct.log.read_text(errors='replace')[-3000:]}")
        for ct in [c for c in pod.containers if c.name not in inits]:
            ct.proc = self._launch(pod, ct)

    # --- DNS ------------------------------------------------------------------------------
    def dns_entries(self) -> list[str]:
        lines = []
        for ns, objs in self.objects.items():
            for svc in (o for o in objs if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"):
                if not svc["spec"].get("publishNotReadyAddresses"):
                    raise NotImplementedError(f"headless Service {svc['metadata']['name']} without publishNotReadyAddresses (readiness-dependent DNS)")
                sel = svc["spec"]["selector"]
                name = svc["metadata"]["name"]
                for p in self.pods:
                    if p.namespace == ns and all(p.labels.get(k) == v for k, v in sel.items()):
                        names = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc"]
                        if p.subdomain == name:
                            names = [f"{p.hostname}.{name}.{ns}.svc.cluster.local", f"{p.hostname}.{name}.{ns}.svc"] + names
                        lines.append(f"{p.ip}\t{' '.join(names)}")
        return lines

    def write_dns(self):
        entries = self.dns_entries() + [e for peer in self.dns_peers for e in peer.dns_entries()]
        for p in self.pods:
            own = f"{p.ip}\t{p.name}" + (f" {p.hostname}.{p.subdomain}.{p.namespace}.svc.cluster.local" if p.subdomain else "")
            text = "127.0.0.1\tlocalhost\n" + own + "\n" + "\n".join(entries) + "\n"
            for ct in p.containers:
                hosts = ct.root / "etc/hosts"
                hosts.parent.mkdir(parents=True, exist_ok=True)
                with open(hosts, "w") as f:  # rewritten in place: running containers see it
                    f.write(text)

    # --- probes and access ----------------------------------------------------------------
    def probe(self, pod: Pod) -> bool:
        """The main container's readiness probe, once."""
        ct = pod.main
        if ct.proc is None or ct.proc.poll() is not None:
            raise AssertionError(f"pod {pod.name}: container {ct.name} exited {ct.proc.returncode if ct.proc else '?'}:\n{ct.log.read_text(errors='replace')[-3000:]}")
        rp = ct.spec.get("readinessProbe")
        if not rp:
            return True
        timeout = rp.get("timeoutSeconds", 1) + 2
        if "exec" in rp:
            # The probe runs in the container, with the container's environment.
            env = [f"{k}={v}" for k, v in self._env(pod, ct.spec).items()]
            argv = ["nsenter", "-t", str(ct.proc.pid), "-m", "-n", "-r", "-w", "-S", str(ct.uid), "-G", str(ct.gid), "--", "/usr/bin/env", "-i", *env, *rp["exec"]["command"]]
        elif "tcpSocket" in rp:
            argv = ["nsenter", f"--net=/run/netns/{pod.netns}", "--", "bash", "-c", f"exec 3<>/dev/tcp/{pod.ip}/{rp['tcpSocket']['port']}"]
        elif "httpGet" in rp:
            g = rp["httpGet"]
            argv = ["nsenter", f"--net=/run/netns/{pod.netns}", "--", "curl", "-sf", "-o", "/dev/null", f"http://{pod.ip}:{g['port']}{g.get('path', '/')}"]
        else:
            raise NotImplementedError(f"probe {rp}")
        try:
            return subprocess.run(argv, capture_output=True, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def http(self, pod: Pod, path: str, method: str = "GET", data: str | None = None, port: int = 8500) -> tuple[int, str]:
        """An HTTP request to a pod's address from inside its network (its namespace)."""
        argv = ["nsenter", f"--net=/run/netns/{pod.netns}", "--", "curl", "-s", "-m", "10", "-X", method, "-w", "\n%{http_code}", f"http://{pod.ip}:{port}{path}"]
        if data is not None:
            argv += ["--data-binary", data]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def pods_of(self, namespace: str, component: str) -> list[Pod]:
        return [p for p in self.pods if p.namespace == namespace and p.labels.get("app.kubernetes.io/component") == component]

    def logs(self, lines: int = 30) -> str:
        out = []
        for p in self.pods:
            for ct in p.containers:
                if ct.log.exists():
                    tail = "\n".join(ct.log.read_text(errors="replace").splitlines()[-lines:])
                    out.append(f"--- {self.name}/{p.name}/{ct.name} ({p.ip}) ---\n{tail}")
        return "\n".join(out)

    def close(self):
        procs = [(p, ct.proc) for p in self.pods for ct in p.containers if ct.proc and ct.proc.poll() is None]
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        for pod, proc in procs:
            grace = pod.spec.get("terminationGracePeriodSeconds", 30)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, and a
    reference to an undefined variable is left as written."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def wait_ready(clusters: list[Cluster], pods: list[Pod], timeout: float):
    deadline = time.monotonic() + timeout
    pending = list(pods)
    while pending:
        pending = [p for p in pending if not next(c for c in clusters if p in c.pods).probe(p)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready after {timeout}s: {[p.name for p in pending]}")
        time.sleep(0.5)
