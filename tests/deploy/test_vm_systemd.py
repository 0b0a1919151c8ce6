"""The .deb under a real systemd: a container (systemd-nspawn --boot) whose root is an
overlay of this machine's, so its systemd is the host's own, with no network but loopback.

What this test does:
- installs the .deb with dpkg inside, checks the units are installed, disabled, and that
  starting the server unconfigured is skipped by its condition;
- configures a one-server datacenter from the shipped example (DNS on port 53), starts
  trellis-server.service: `systemctl start` returns once the agent sent READY=1, and the
  status line is the agent's;
- checks the main process runs with the unit's sandbox for real: the trellis user, only
  CAP_NET_BIND_SERVICE, no_new_privs, a seccomp filter, a read-only root; DNS answers on 53;
- reload (RELOADING=1/READY=1) and stop (a clean exit) through systemctl;
- trellis-gateway.service beside it, configured from its example: `systemctl start` returns
  once its agent has joined, inside the same sandbox; the mesh-gateway service is registered
  and passing, the gateway listens on TCP and UDP (QUIC) and routes a TLS connection by SNI to
  the server; reload and stop through systemctl.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from util import dns_query, run, wait_until
from vm import build_deb, edit

pytestmark = pytest.mark.timeout(240)


class Container:
    def __init__(self, base: Path):
        self.base = base
        self.merged = base / "merged"
        for d in ["upper", "work", "merged"]:
            (base / d).mkdir(parents=True)
        run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", str(self.merged)])
        self.name = f"trellis-test-{uuid.uuid4().hex[:8]}"
        self.log = open(base / "nspawn.log", "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.merged), "--boot", "--register=no", "--keep-unit", "--private-network", "-M", self.name, "--console=pipe", "-q", "--", "--unit=basic.target"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.pid = wait_until(self._init_pid, 30, "the container's systemd to start")
        wait_until(lambda: self.sh("systemctl is-system-running", check=False).stdout.strip() in ("running", "degraded"), 60, "the container to finish booting")

    def _init_pid(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}: {(self.base / 'nspawn.log').read_text()[-2000:]}")
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if int((p / "stat").read_text().split(") ", 1)[1].split()[1]) == self.proc.pid and (p / "exe").resolve().name == "systemd":
                        return int(p.name)
                except (OSError, ValueError, IndexError):
                    continue
        return None

    def sh(self, cmd: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        argv = ["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "-r", "-w", "--", "/bin/sh", "-c", cmd]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in the container: {cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def close(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, 37)  # SIGRTMIN+3: systemd halts
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.log.close()
        subprocess.run(["umount", "-l", str(self.merged)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def container(tmp_path_factory):
    if not shutil.which("systemd-nspawn"):
        pytest.fail("systemd-nspawn is missing: apt-get install systemd-container (scripts/test.sh does)")
    c = Container(tmp_path_factory.mktemp("nspawn"))
    try:
        yield c
    finally:
        c.close()


def test_the_deb_under_systemd_reaches_readiness_inside_its_sandbox(trellis, container, tmp_path):
    deb = build_deb(trellis, tmp_path / "deb")
    shutil.copy(deb, container.merged / "root/trellis.deb")
    container.sh("dpkg -i /root/trellis.deb")
    for unit in ["trellis-server", "trellis-client", "trellis-gateway"]:
        assert container.sh(f"systemctl is-enabled {unit}", check=False).stdout.strip() == "disabled", unit
    # Unconfigured: the condition skips the start, nothing runs.
    container.sh("systemctl start trellis-server")
    st = container.show("trellis-server", "ActiveState", "ConditionResult")
    assert st == {"ActiveState": "inactive", "ConditionResult": "no"}, st

    m = container.merged
    gid = int(next(line.split(":")[2] for line in (m / "etc/group").read_text().splitlines() if line.startswith("trellis:")))
    container.sh("install -d -m 0750 -g trellis /etc/trellis.d/tls && cd /etc/trellis.d/tls && trellis tls ca create && trellis tls cert create --server --dc dc1 && chgrp trellis * && chmod 0640 *-key.pem")
    key = container.sh("trellis keygen").stdout.strip()
    hcl = edit(
        (m / "etc/trellis.d/server.hcl.example").read_text(),
        {
            r'^bind_addr = "10\.0\.0\.11"$': 'bind_addr = "127.0.0.1"',
            r"^bootstrap_expect = 3$": "bootstrap_expect = 1",
            r"^retry_join = \[.*\]$": 'retry_join = ["127.0.0.1"]',
            r'^encrypt = ".*"$': f'encrypt = "{key}"',
            r"^# ports \{\n#   dns = 53\n# \}$": "ports {\n  dns = 53\n}",
        },
    )
    (m / "etc/trellis.d/server.hcl").write_text(hcl)
    os.chown(m / "etc/trellis.d/server.hcl", 0, gid)
    # This machine withholds CAP_SYS_RESOURCE even from root, so no process here (systemd
    # included) may raise its open-files hard limit past the machine's; lower the unit's
    # LimitNOFILE to it with a drop-in, as an operator would.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    dropin = m / "etc/systemd/system/trellis-server.service.d"
    dropin.mkdir(parents=True)
    (dropin / "nofile.conf").write_text(f"[Service]\nLimitNOFILE={min(hard, 65536)}\n")
    container.sh("systemctl daemon-reload")

    r = container.sh("timeout 90 systemctl start trellis-server", check=False)
    journal = lambda: container.sh("journalctl -u trellis-server --no-pager -o cat", check=False).stdout  # noqa: E731
    assert r.returncode == 0, f"systemctl start failed: {r.stderr}\n{journal()}"
    st = container.show("trellis-server", "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (st["ActiveState"], st["SubState"], st["NRestarts"]) == ("active", "running", "0"), (st, journal())
    assert st["StatusText"].startswith("serving; Raft leader is"), st
    pid = st["MainPID"]

    status = container.sh(f"cat /proc/{pid}/status").stdout
    field = lambda k: re.search(rf"^{k}:\s+(.*)$", status, re.M).group(1).split()  # noqa: E731
    uid = next(line.split(":")[2] for line in (m / "etc/passwd").read_text().splitlines() if line.startswith("trellis:"))
    assert field("Uid")[0] == uid, status
    assert field("NoNewPrivs") == ["1"] and field("Seccomp") == ["2"], status
    net_bind = f"{1 << 10:016x}"  # CAP_NET_BIND_SERVICE is capability 10
    assert field("CapEff") == [net_bind] and field("CapBnd") == [net_bind] and field("CapAmb") == [net_bind], status
    mounts = container.sh(f"cat /proc/{pid}/mountinfo").stdout
    opts = {line.split()[4]: line.split()[5].split(",") for line in mounts.splitlines()}
    assert "ro" in opts["/"] and "rw" in opts["/var/lib/trellis"], mounts

    code = container.sh("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8500/v1/status/leader").stdout
    assert code == "200"
    # DNS on port 53, as the trellis user, through the ambient capability.
    assert dns_query(["-t", str(container.pid), "-n"], "consul.service.consul", "127.0.0.1", 53) == (0, 1)

    check_gateway_unit(container, key, gid, hard)

    container.sh("timeout 30 systemctl reload trellis-server")
    st = container.show("trellis-server", "ActiveState", "StatusText", "MainPID")
    assert st == {"ActiveState": "active", "StatusText": "configuration reloaded", "MainPID": pid}, st
    assert "configuration reloaded (SIGHUP)" in journal()

    container.sh("timeout 60 systemctl stop trellis-server")
    st = container.show("trellis-server", "ActiveState", "Result", "ExecMainStatus")
    assert st == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (st, journal())
    assert "shutdown complete" in journal()


def check_gateway_unit(container: Container, key: str, gid: int, nofile: int):
    """trellis-gateway.service against the running server: LAN 127.0.0.2, WAN 127.0.0.3."""
    m = container.merged
    hcl = edit(
        (m / "etc/trellis.d/gateway/gateway.hcl.example").read_text(),
        {
            r'^# node_name = ".*"$': 'node_name = "gw1"',
            r"^retry_join = \[.*\]$": 'retry_join = ["127.0.0.1"]',
            r'^encrypt = ".*"$': f'encrypt = "{key}"',
            r'^  address = "10\.0\.0\.31:8443"$': '  address = "127.0.0.2:8443"',
            r'^  wan_address = "203\.0\.113\.31:8443"$': '  wan_address = "127.0.0.3:8443"',
        },
    )
    (m / "etc/trellis.d/gateway/gateway.hcl").write_text(hcl)
    os.chown(m / "etc/trellis.d/gateway/gateway.hcl", 0, gid)
    dropin = m / "etc/systemd/system/trellis-gateway.service.d"
    dropin.mkdir(parents=True)
    (dropin / "nofile.conf").write_text(f"[Service]\nLimitNOFILE={min(nofile, 65536)}\n")
    container.sh("systemctl daemon-reload")
    journal = lambda: container.sh("journalctl -u trellis-gateway --no-pager -o cat", check=False).stdout  # noqa: E731

    r = container.sh("timeout 90 systemctl start trellis-gateway", check=False)
    assert r.returncode == 0, f"systemctl start trellis-gateway failed: {r.stderr}\n{journal()}"
    st = container.show("trellis-gateway", "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (st["ActiveState"], st["SubState"], st["NRestarts"]) == ("active", "running", "0"), (st, journal())
    assert st["StatusText"].startswith("serving; joined the LAN pool"), st
    pid = st["MainPID"]
    status = container.sh(f"cat /proc/{pid}/status").stdout
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^Seccomp:\s+2$", status, re.M), status
    mounts = container.sh(f"cat /proc/{pid}/mountinfo").stdout
    opts = {line.split()[4]: line.split()[5].split(",") for line in mounts.splitlines()}
    assert "ro" in opts["/"] and "rw" in opts["/var/lib/trellis/gateway"], mounts

    def passing():
        out = container.sh("curl -s http://127.0.0.1:8500/v1/health/service/mesh-gateway?passing").stdout
        return [(e["Node"]["Node"], e["Service"]["TaggedAddresses"]["wan"]["Address"]) for e in json.loads(out)] == [("gw1", "127.0.0.3")]

    wait_until(passing, 30, "the gateway registered and passing")
    # TCP on the LAN and WAN addresses, and QUIC (UDP) on the WAN one, inside the sandbox.
    tcp = container.sh("ss -Hltn 'sport = :8443'").stdout
    udp = container.sh("ss -Hlun 'sport = :8443'").stdout
    assert "127.0.0.2:8443" in tcp and "127.0.0.3:8443" in tcp and "127.0.0.3:8443" in udp, (tcp, udp)
    routed = lambda: "subject=CN = server.dc1.consul" in container.sh("timeout 10 openssl s_client -connect 127.0.0.2:8443 -servername server.dc1.consul </dev/null", check=False).stdout  # noqa: E731
    wait_until(routed, 30, "a TLS connection through the gateway to reach the server")

    container.sh("timeout 30 systemctl reload trellis-gateway")
    st = container.show("trellis-gateway", "ActiveState", "StatusText", "MainPID")
    assert st == {"ActiveState": "active", "StatusText": "configuration reloaded", "MainPID": pid}, st
    container.sh("timeout 60 systemctl stop trellis-gateway")
    st = container.show("trellis-gateway", "ActiveState", "Result", "ExecMainStatus")
    assert st == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (st, journal())
    assert "ERROR" not in journal(), journal()
