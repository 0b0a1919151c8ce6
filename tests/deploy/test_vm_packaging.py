"""The .deb and the systemd units, without a running systemd:

- the units pass `systemd-analyze verify` with no output at all;
- the .deb holds exactly the expected files, with conffiles and dependencies;
- it installs into a scratch root (dpkg --root, maintainer scripts chroot-less), which
  creates the trellis user, /var/lib/trellis and /etc/trellis.d and enables nothing;
- the units' ExecStart lines run in that root as the unit's user, configured from the shipped
  examples, and report readiness through sd_notify on a socket the test listens on: a
  client reports nothing until it has joined, a server READY=1 once it has a leader; reload
  is RELOADING=1 then READY=1; SIGTERM gives STOPPING=1 and a clean exit;
- the gateway unit, configured from its shipped example, against a server from the same root:
  not ready while nobody answers its retry_join, READY=1 once joined; it registers the
  mesh-gateway service (LAN and WAN addresses, passing check) and routes a TLS connection by
  SNI to the server; reload and stop as above, its node leaving the catalog; then with the
  --agent drop-in of docs/deploy-vms.md: ready when routing, registered through the server's
  agent, deregistered on stop;
- purge removes the data directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from util import NotifyListener, Procs, REPO, http_get, run, wait_until
from vm import account, build_deb, dpkg_root, edit, make_root, parse_unit, run_unit

pytestmark = pytest.mark.timeout(240)

UNITS = ["trellis-server.service", "trellis-client.service", "trellis-gateway.service"]
SERVER_IP, CLIENT_IP = "127.0.16.1", "127.0.16.2"


@pytest.fixture(scope="module")
def deb(trellis, tmp_path_factory) -> Path:
    return build_deb(trellis, tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def root(deb, tmp_path_factory) -> Path:
    r = make_root(tmp_path_factory.mktemp("scratch") / "root", with_host_units=True)
    dpkg_root(r, "-i", str(deb))
    return r


def test_units_pass_systemd_analyze_verify_without_warnings(root):
    for unit in UNITS:
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", unit], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        assert r.returncode == 0 and out == "", f"systemd-analyze verify {unit}: exit {r.returncode}\n{out}"


def test_units_are_hardened_notify_services_that_start_nothing_unconfigured():
    for unit in UNITS:
        u = parse_unit(REPO / "systemd" / unit)
        svc = u["Service"]
        assert svc["Type"] == ["notify"] and svc["User"] == ["trellis"], unit
        assert svc["ExecReload"] == ["/bin/kill -s HUP $MAINPID"], unit
        assert int(svc["LimitNOFILE"][0]) >= 65536, unit
        assert svc["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"] == svc["AmbientCapabilities"], unit
        for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("ProtectHome", "yes")]:
            assert svc[key] == [value], f"{unit}: {key}"
        assert svc["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"], unit
        assert "@system-service" in svc["SystemCallFilter"], unit
        conds = u["Unit"]["ConditionPathExistsGlob"]
        assert all(c.startswith("|/etc/trellis.d/") for c in conds) and len(conds) == 2, unit


def test_deb_contents_and_control(deb):
    listing = run(["dpkg-deb", "--contents", str(deb)]).stdout
    files = {}
    for line in listing.splitlines():
        perms, owner, _size, _date, _time, path = line.split(None, 5)
        files[path.removeprefix(".")] = (perms, owner)
    expected = {
        "/usr/bin/trellis": "-rwxr-xr-x",
        "/lib/systemd/system/trellis-server.service": "-rw-r--r--",
        "/lib/systemd/system/trellis-client.service": "-rw-r--r--",
        "/lib/systemd/system/trellis-gateway.service": "-rw-r--r--",
        "/etc/trellis.d/server.hcl.example": "-rw-r--r--",
        "/etc/trellis.d/client.hcl.example": "-rw-r--r--",
        "/etc/trellis.d/gateway/gateway.hcl.example": "-rw-r--r--",
        "/usr/share/doc/trellis/copyright": "-rw-r--r--",
        "/usr/share/doc/trellis/deploy-vms.md": "-rw-r--r--",
        "/usr/share/doc/trellis/configuration.md": "-rw-r--r--",
    }
    regular = {p: v for p, v in files.items() if not p.endswith("/")}
    assert set(regular) == set(expected), f"unexpected or missing files: {set(regular) ^ set(expected)}"
    for path, perms in expected.items():
        assert regular[path] == (perms, "root/root"), path
    # Nothing that would start or enable anything: no wants/ symlinks, no configured files.
    assert not [p for p in files if ".wants/" in p or re.search(r"/etc/trellis\.d/[^/]*\.(hcl|json)$", p)]
    control = run(["dpkg-deb", "--field", str(deb)]).stdout
    assert re.search(r"^Depends: .*libc6 \(>= [0-9.]+\).*passwd", control, re.M), control
    ctrl = subprocess.run(f"dpkg-deb --ctrl-tarfile {shlex.quote(str(deb))} | tar -xO ./conffiles", shell=True, capture_output=True, text=True, check=True).stdout
    assert sorted(ctrl.split()) == sorted(p for p in expected if p.startswith("/etc/"))


def test_postinst_creates_user_and_directories_and_enables_nothing(root):
    pw = account(root, "trellis")
    gr = account(root, "trellis", "group")
    assert pw and gr, "postinst did not create the trellis user and group"
    assert pw[3] == gr[2] and pw[5] == "/var/lib/trellis" and pw[6] == "/usr/sbin/nologin", pw
    assert int(pw[2]) < 1000, f"not a system uid: {pw}"
    data = (root / "var/lib/trellis").stat()
    assert (data.st_uid, data.st_gid, stat.S_IMODE(data.st_mode)) == (int(pw[2]), int(gr[2]), 0o750)
    conf = (root / "etc/trellis.d").stat()
    assert (conf.st_uid, conf.st_gid, stat.S_IMODE(conf.st_mode)) == (0, int(gr[2]), 0o750)
    assert not list(root.glob("etc/systemd/system/*.wants/trellis*")), "the package enabled a unit"
    status = (root / "var/lib/dpkg/status").read_text()
    assert "Package: trellis\nStatus: install ok installed" in status


def _tls(trellis: Path, root: Path, gid: int):
    tls = root / "etc/trellis.d/tls"
    tls.mkdir(mode=0o750, exist_ok=True)
    run([str(trellis), "tls", "ca", "create"], cwd=tls)
    run([str(trellis), "tls", "cert", "create", "--server", "--dc", "dc1"], cwd=tls)
    for f in tls.iterdir():
        os.chown(f, 0, gid)
        os.chmod(f, 0o640 if f.name.endswith("-key.pem") else 0o644)
    os.chown(tls, 0, gid)


def test_units_run_in_the_root_and_report_readiness_through_sd_notify(trellis, root, tmp_path):
    gid = int(account(root, "trellis", "group")[2])
    _tls(trellis, root, gid)
    key = run([str(trellis), "keygen"]).stdout.strip()
    server_hcl = edit(
        (root / "etc/trellis.d/server.hcl.example").read_text(),
        {
            r'^# node_name = ".*"$': 'node_name = "srv1"',
            r'^bind_addr = "10\.0\.0\.11"$': f'bind_addr = "{SERVER_IP}"',
            r'^client_addr = "127\.0\.0\.1"$': f'client_addr = "{SERVER_IP}"',
            r"^bootstrap_expect = 3$": "bootstrap_expect = 1",
            r"^retry_join = \[.*\]$": f'retry_join = ["{SERVER_IP}"]',
            r'^encrypt = ".*"$': f'encrypt = "{key}"',
        },
    )
    client_hcl = edit(
        (root / "etc/trellis.d/client.hcl.example").read_text(),
        {
            r'^# node_name = ".*"$': 'node_name = "web1"',
            r'^bind_addr = "10\.0\.0\.21"$': f'bind_addr = "{CLIENT_IP}"',
            r'^client_addr = "127\.0\.0\.1"$': f'client_addr = "{CLIENT_IP}"',
            r"^retry_join = \[.*\]$": f'retry_join = ["{SERVER_IP}"]',
            r'^encrypt = ".*"$': f'encrypt = "{key}"',
        },
    )
    # A server host and a client host: each unit reads /etc/trellis.d, so each gets its own
    # copy of the installed root's configuration directory (same files, one role each).
    procs = Procs()
    server_sock = NotifyListener(str(root / "run/server-notify.sock"))
    client_sock = NotifyListener(f"@trellis-test-notify-{uuid.uuid4().hex}")
    try:
        (root / "etc/trellis.d/client.hcl").write_text(client_hcl)
        nofile, client, client_svc = run_unit(root, "trellis-client.service", client_sock.address, tmp_path / "client.log", procs, "client")
        # The client has nobody to join yet: it says so, and is not ready.
        status = client_sock.wait_for("STATUS", "serving; joining the LAN pool", 30, "the client")
        assert "READY" not in status
        early = client_sock.collect_for(3)
        assert not [m for m in early if m.get("READY") == "1"], f"client claimed readiness before joining: {early}"
        assert client.poll() is None, procs.all_logs()

        # Now the server, from the same root: swap the client's file for the server's.
        (root / "etc/trellis.d/client.hcl").unlink()
        (root / "etc/trellis.d/server.hcl").write_text(server_hcl)
        _, server, server_svc = run_unit(root, "trellis-server.service", "/run/server-notify.sock", tmp_path / "server.log", procs, "server")
        ready = server_sock.wait_for("READY", "1", 60, "the server")
        assert ready["STATUS"].startswith("serving; Raft leader is srv1"), ready
        # Ready means usable: the API answers with the leader at once.
        code, body = http_get(f"http://{SERVER_IP}:8500/v1/status/leader")
        assert code == 200 and body.strip('"') == f"{SERVER_IP}:8300", (code, body)
        ready = client_sock.wait_for("READY", "1", 60, "the client after the server came up")
        assert ready["STATUS"].startswith("serving; joined the LAN pool"), ready
        # It runs as the unit's user with the unit's limits.
        for p in (server, client):
            st = Path(f"/proc/{p.pid}/status").read_text()
            uid = int(re.search(r"^Uid:\s+(\d+)", st, re.M).group(1))
            assert uid == int(account(root, "trellis")[2]), st
            limits = Path(f"/proc/{p.pid}/limits").read_text()
            assert re.search(rf"Max open files\s+{nofile}\s+{nofile}", limits), limits
        assert (root / "var/lib/trellis/node-id").exists(), "data_dir is not the unit's state directory"
        wait_until(lambda: "web1" in http_get(f"http://{SERVER_IP}:8500/v1/catalog/nodes")[1], 30, "the client in the catalog")

        # systemctl reload runs ExecReload with $MAINPID.
        reload = shlex.split(client_svc["ExecReload"][-1].replace("$MAINPID", str(client.pid)))
        run(reload)
        reloading = client_sock.wait_for("RELOADING", "1", 10, "the client on reload")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        again = client_sock.wait_for("READY", "1", 10, "the client after reload")
        assert again["STATUS"] == "configuration reloaded", again

        # systemctl stop: KillSignal, then a clean exit within TimeoutStopSec.
        assert server_svc["KillSignal"] == ["SIGTERM"]
        timeout = int(server_svc["TimeoutStopSec"][-1])
        for p, sock, what in [(client, client_sock, "client"), (server, server_sock, "server")]:
            p.terminate()
            sock.wait_for("STOPPING", "1", 10, f"the {what} on SIGTERM")
            assert p.wait(timeout) == 0, procs.all_logs()
    except BaseException:
        print(procs.all_logs(60))
        raise
    finally:
        procs.stop_all()
        server_sock.close()
        client_sock.close()


GW_SERVER_IP, GATEWAY_IP, GATEWAY_WAN_IP = "127.0.16.11", "127.0.16.12", "127.0.16.13"


def _docs_dropin(path: str) -> str:
    """The drop-in that docs/deploy-vms.md shows under the comment naming `path`."""
    text = (REPO / "docs/deploy-vms.md").read_text()
    m = re.search(r"```ini\n# " + re.escape(path) + r"\n(.*?)```", text, re.S)
    assert m, f"docs/deploy-vms.md shows no drop-in {path}"
    return m.group(1)


def _catalog_gateways() -> list[dict]:
    code, body = http_get(f"http://{GW_SERVER_IP}:8500/v1/health/service/mesh-gateway")
    assert code == 200, body
    return json.loads(body)


def _routes_to_the_server() -> bool:
    """A TLS connection to the gateway for server.dc1.consul gets the server's certificate."""
    r = subprocess.run(["openssl", "s_client", "-connect", f"{GATEWAY_IP}:8443", "-servername", "server.dc1.consul"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15)
    return "subject=CN = server.dc1.consul" in r.stdout


def test_gateway_unit_joins_registers_and_routes(trellis, deb, tmp_path):
    root = make_root(tmp_path / "root")
    dpkg_root(root, "-i", str(deb))
    gid = int(account(root, "trellis", "group")[2])
    _tls(trellis, root, gid)
    key = run([str(trellis), "keygen"]).stdout.strip()
    (root / "etc/trellis.d/server.hcl").write_text(
        edit(
            (root / "etc/trellis.d/server.hcl.example").read_text(),
            {
                r'^# node_name = ".*"$': 'node_name = "srv1"',
                r'^bind_addr = "10\.0\.0\.11"$': f'bind_addr = "{GW_SERVER_IP}"',
                r'^client_addr = "127\.0\.0\.1"$': f'client_addr = "{GW_SERVER_IP}"',
                r"^bootstrap_expect = 3$": "bootstrap_expect = 1",
                r"^retry_join = \[.*\]$": f'retry_join = ["{GW_SERVER_IP}"]',
                r'^encrypt = ".*"$': f'encrypt = "{key}"',
            },
        )
    )
    (root / "etc/trellis.d/gateway/gateway.hcl").write_text(
        edit(
            (root / "etc/trellis.d/gateway/gateway.hcl.example").read_text(),
            {
                r'^# node_name = ".*"$': 'node_name = "gw1"',
                r"^retry_join = \[.*\]$": f'retry_join = ["{GW_SERVER_IP}"]',
                r'^encrypt = ".*"$': f'encrypt = "{key}"',
                r'^  address = "10\.0\.0\.31:8443"$': f'  address = "{GATEWAY_IP}:8443"',
                r'^  wan_address = "203\.0\.113\.31:8443"$': f'  wan_address = "{GATEWAY_WAN_IP}:8443"',
            },
        )
    )
    procs = Procs()
    server_sock = NotifyListener(f"@trellis-test-notify-{uuid.uuid4().hex}")
    gw_sock = NotifyListener(f"@trellis-test-notify-{uuid.uuid4().hex}")
    try:
        # The gateway first: its agent has nobody to join yet, so it is not ready.
        nofile, gw, gw_svc = run_unit(root, "trellis-gateway.service", gw_sock.address, tmp_path / "gateway.log", procs, "gateway")
        gw_sock.wait_for("STATUS", "serving; joining the LAN pool", 30, "the gateway")
        _, server, _ = run_unit(root, "trellis-server.service", server_sock.address, tmp_path / "server.log", procs, "server")
        assert not [m for m in gw_sock.messages if m.get("READY") == "1"], f"the gateway claimed readiness before joining: {gw_sock.messages}"
        server_sock.wait_for("READY", "1", 60, "the server")
        ready = gw_sock.wait_for("READY", "1", 60, "the gateway after the server came up")
        assert ready["STATUS"].startswith("serving; joined the LAN pool"), ready
        st = Path(f"/proc/{gw.pid}/status").read_text()
        assert int(re.search(r"^Uid:\s+(\d+)", st, re.M).group(1)) == int(account(root, "trellis")[2]), st
        assert re.search(rf"Max open files\s+{nofile}\s+{nofile}", Path(f"/proc/{gw.pid}/limits").read_text())
        assert (root / "var/lib/trellis/gateway/node-id").exists(), "the gateway's data_dir is not its state directory"

        def registered():
            entries = _catalog_gateways()
            return [
                (
                    e["Node"]["Node"],
                    e["Service"]["Kind"],
                    e["Service"]["ID"],
                    e["Service"]["TaggedAddresses"]["lan"],
                    e["Service"]["TaggedAddresses"]["wan"],
                    sorted({c["Status"] for c in e["Checks"]}),
                )
                for e in entries
            ] == [("gw1", "mesh-gateway", "mesh-gateway", {"Address": GATEWAY_IP, "Port": 8443}, {"Address": GATEWAY_WAN_IP, "Port": 8443}, ["passing"])]

        wait_until(registered, 30, "the mesh-gateway service in the catalog, passing")
        wait_until(_routes_to_the_server, 30, "a TLS connection through the gateway to reach the server")

        reload = shlex.split(gw_svc["ExecReload"][-1].replace("$MAINPID", str(gw.pid)))
        run(reload)
        gw_sock.wait_for("RELOADING", "1", 10, "the gateway on reload")
        gw_sock.wait_for("READY", "1", 10, "the gateway after reload")
        assert registered(), _catalog_gateways()

        gw.terminate()
        gw_sock.wait_for("STOPPING", "1", 10, "the gateway on SIGTERM")
        assert gw.wait(int(gw_svc["TimeoutStopSec"][-1])) == 0, procs.all_logs()
        wait_until(lambda: _catalog_gateways() == [], 30, "the stopped gateway's service to leave the catalog")

        # Beside an agent: the drop-in the docs give, pointed at this test's server agent.
        dropin = root / "etc/systemd/system/trellis-gateway.service.d/agent.conf"
        dropin.parent.mkdir(parents=True)
        dropin.write_text(_docs_dropin("/etc/systemd/system/trellis-gateway.service.d/agent.conf").replace("127.0.0.1:8500", f"{GW_SERVER_IP}:8500"))
        agent_sock = NotifyListener(f"@trellis-test-notify-{uuid.uuid4().hex}")
        try:
            _, gw2, gw2_svc = run_unit(root, "trellis-gateway.service", agent_sock.address, tmp_path / "gateway-agent.log", procs, "gateway-agent")
            assert "ExecReload" not in gw2_svc or gw2_svc["ExecReload"] == [], gw2_svc
            assert agent_sock.wait_for("READY", "1", 30, "the gateway through the agent")["STATUS"] == "mesh gateway routing"
            wait_until(lambda: [(e["Node"]["Node"], e["Service"]["Address"]) for e in _catalog_gateways()] == [("srv1", GATEWAY_IP)], 30, "the gateway registered on the server's node")
            wait_until(_routes_to_the_server, 30, "routing through the gateway beside the agent")
            gw2.terminate()
            agent_sock.wait_for("STOPPING", "1", 10, "the gateway through the agent on SIGTERM")
            assert gw2.wait(30) == 0, procs.all_logs()
            # Deregistered through the agent before exiting; the catalog follows by the
            # agent's anti-entropy, moments later.
            wait_until(lambda: _catalog_gateways() == [], 30, "the gateway beside the agent to deregister on stop")
        finally:
            agent_sock.close()
    except BaseException:
        print(procs.all_logs(60))
        raise
    finally:
        procs.stop_all()
        server_sock.close()
        gw_sock.close()


def test_purge_removes_the_data_directory(deb, tmp_path):
    r = make_root(tmp_path / "root")
    dpkg_root(r, "-i", str(deb))
    (r / "var/lib/trellis/node-id").write_text("x")
    dpkg_root(r, "--purge", "trellis")
    assert not (r / "var/lib/trellis").exists()
    assert not (r / "usr/bin/trellis").exists()
