"""Trellis against the real py-consul client.

A Trellis dev agent is started once for this module and driven through
py-consul (import name ``consul``), the way a Python application would use a
Consul agent. The expectations come from Consul's HTTP API documentation
(website/content/api-docs in hashicorp/consul), not from Trellis.

Run from the repository root:

    pip install -r tests/python/requirements.txt
    cargo build
    python -m pytest tests/python -v

``TRELLIS_BIN`` overrides the binary (default ``target/debug/trellis``,
relative paths taken from the repository root).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

import consul
from consul.exceptions import ClientError, NotFound

# Every test is bounded; the TTL-expiry test overrides this.
pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE = "py-test"
DATACENTER = "dc1"  # a dev agent's default datacenter, as in Consul
STARTUP_DEADLINE_S = 30


# --------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll *predicate* until it returns a truthy value, or fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def duration_seconds(value: str) -> float:
    """Parse a Go duration string such as "30s", "1m30s" or "15000ms"."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", value)
    assert parts, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def trellis_binary() -> Path:
    path = Path(os.environ.get("TRELLIS_BIN", "target/debug/trellis"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


class Agent:
    def __init__(self, proc, http_port, server_port, data_dir, log_path):
        self.proc = proc
        self.http_port = http_port
        self.server_port = server_port
        self.data_dir = data_dir
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{http_port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def client(self) -> consul.Consul:
        return consul.Consul(host="127.0.0.1", port=self.http_port)


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def agent(request):
    binary = trellis_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"no Trellis binary at {binary}: run `cargo build` or set TRELLIS_BIN")

    tmp = Path(tempfile.mkdtemp(prefix="trellis-py-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    log_path = tmp / "agent.log"
    http_port, server_port = free_port(), free_port()
    while server_port == http_port:
        server_port = free_port()
    cmd = [
        str(binary), "agent", "--dev",
        "--node", NODE,
        "--bind", "127.0.0.1",
        "--client", "127.0.0.1",
        "--http-port", str(http_port),
        "--dns-port", "0",
        "--server-port", str(server_port),
        "--serf-lan-port", "0",
        # Every port its own: the tests must not need Consul's default ports free (a user's
        # `trellis dev` holds 8302 on 127.0.0.1).
        "--serf-wan-port", "0",
        "--data-dir", str(data_dir),
    ]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    a = Agent(proc, http_port, server_port, data_dir, log_path)

    def stop():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()

    try:
        # Ready when /v1/status/leader names a leader: a non-empty JSON string.
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        leader = None
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"trellis exited with {proc.returncode} during startup\n"
                    f"command: {' '.join(cmd)}\n{a.log_tail()}"
                )
            try:
                r = requests.get(f"{a.base}/v1/status/leader", timeout=2)
                if r.status_code == 200:
                    leader = r.json()
            except (requests.RequestException, ValueError):
                pass
            if isinstance(leader, str) and leader:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no leader after {STARTUP_DEADLINE_S}s (last: {leader!r})\n"
                    f"command: {' '.join(cmd)}\n{a.log_tail()}"
                )
            time.sleep(0.1)

        # Like Consul, the agent registers its own node (with the serfHealth
        # check) shortly after leadership; sessions need it. Wait for it, but
        # leave a missing registration to the test that checks for it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                r = requests.get(f"{a.base}/v1/health/node/{NODE}", timeout=2)
                if r.status_code == 200 and any(c.get("CheckID") == "serfHealth" for c in r.json() or []):
                    break
            except (requests.RequestException, ValueError, AttributeError):
                pass
            time.sleep(0.1)
    except BaseException:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    yield a

    stop()
    if request.session.testsfailed:
        sys.__stderr__.write(f"\n----- last lines of the trellis agent log ({log_path}) -----\n{a.log_tail(60)}\n")
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def c(agent) -> consul.Consul:
    return agent.client()


# --------------------------------------------------------------------------
# KV


def test_put_then_get_returns_the_value_with_its_indexes(c):
    key = unique("kv/basic")
    assert c.kv.put(key, "hello") is True
    index, entry = c.kv.get(key)
    assert int(index) > 0
    assert entry["Key"] == key
    assert entry["Value"] == b"hello"
    assert entry["Flags"] == 0
    assert entry["CreateIndex"] > 0
    assert entry["ModifyIndex"] >= entry["CreateIndex"]
    assert entry["LockIndex"] == 0
    assert entry.get("Session") in (None, "")


def test_get_of_a_missing_key_returns_none(c):
    index, entry = c.kv.get(unique("kv/missing"))
    assert entry is None
    assert int(index) > 0


def test_binary_values_round_trip_unchanged(c):
    key = unique("kv/binary")
    blob = bytes(range(256))
    assert c.kv.put(key, blob) is True
    _, entry = c.kv.get(key)
    assert entry["Value"] == blob


def test_update_changes_modify_index_but_keeps_create_index(c):
    key = unique("kv/update")
    c.kv.put(key, "one")
    _, first = c.kv.get(key)
    c.kv.put(key, "two")
    _, second = c.kv.get(key)
    assert second["Value"] == b"two"
    assert second["CreateIndex"] == first["CreateIndex"]
    assert second["ModifyIndex"] > first["ModifyIndex"]


def test_flags_are_stored_with_the_value(c):
    key = unique("kv/flags")
    assert c.kv.put(key, "v", flags=42) is True
    _, entry = c.kv.get(key)
    assert entry["Flags"] == 42
    big = 2**64 - 1  # documented range: 0 .. 2^64-1
    assert c.kv.put(key, "v", flags=big) is True
    _, entry = c.kv.get(key)
    assert entry["Flags"] == big


def test_recurse_returns_every_key_under_the_prefix_sorted(c):
    prefix = unique("kv/tree") + "/"
    for suffix in ("b", "a", "c/d"):
        assert c.kv.put(prefix + suffix, suffix)
    c.kv.put(prefix.rstrip("/") + "-sibling", "outside the prefix")
    index, entries = c.kv.get(prefix, recurse=True)
    assert [e["Key"] for e in entries] == [prefix + "a", prefix + "b", prefix + "c/d"]
    assert [e["Value"] for e in entries] == [b"a", b"b", b"c/d"]
    # For a recursive read the index is the latest ModifyIndex within the prefix.
    assert int(index) >= max(e["ModifyIndex"] for e in entries)


def test_recurse_on_an_empty_prefix_returns_none(c):
    _, entries = c.kv.get(unique("kv/empty") + "/", recurse=True)
    assert entries is None


def test_keys_with_separator_lists_only_one_level(c):
    prefix = unique("kv/sep") + "/"
    for suffix in ("foo", "bar", "subdir/x", "subdir/y/z"):
        c.kv.put(prefix + suffix, "v")
    _, keys = c.kv.get(prefix, keys=True, separator="/")
    assert keys == [prefix + "bar", prefix + "foo", prefix + "subdir/"]
    _, all_keys = c.kv.get(prefix, keys=True)
    assert all_keys == [prefix + "bar", prefix + "foo", prefix + "subdir/x", prefix + "subdir/y/z"]


def test_delete_removes_only_that_key(c):
    key = unique("kv/del")
    c.kv.put(key, "v")
    c.kv.put(key + "/child", "v")
    assert c.kv.delete(key) is True
    assert c.kv.get(key)[1] is None
    assert c.kv.get(key + "/child")[1]["Value"] == b"v"


def test_recursive_delete_removes_the_whole_prefix(c):
    prefix = unique("kv/rdel") + "/"
    for suffix in ("a", "b/c"):
        c.kv.put(prefix + suffix, "v")
    outside = prefix.rstrip("/") + "-keep"
    c.kv.put(outside, "v")
    assert c.kv.delete(prefix, recurse=True) is True
    assert c.kv.get(prefix, recurse=True)[1] is None
    assert c.kv.get(outside)[1]["Value"] == b"v"


def test_cas_zero_creates_a_key_only_if_it_does_not_exist(c):
    key = unique("kv/cas0")
    assert c.kv.put(key, "first", cas=0) is True
    assert c.kv.put(key, "second", cas=0) is False
    assert c.kv.get(key)[1]["Value"] == b"first"


def test_cas_with_the_current_index_succeeds(c):
    key = unique("kv/cas")
    c.kv.put(key, "one")
    _, entry = c.kv.get(key)
    assert c.kv.put(key, "two", cas=entry["ModifyIndex"]) is True
    assert c.kv.get(key)[1]["Value"] == b"two"


def test_stale_cas_is_rejected(c):
    key = unique("kv/stale")
    c.kv.put(key, "one")
    stale = c.kv.get(key)[1]["ModifyIndex"]
    c.kv.put(key, "two")
    assert c.kv.put(key, "three", cas=stale) is False
    _, entry = c.kv.get(key)
    assert entry["Value"] == b"two"
    assert entry["ModifyIndex"] > stale


def test_delete_with_a_stale_cas_is_rejected(c):
    key = unique("kv/delcas")
    c.kv.put(key, "one")
    stale = c.kv.get(key)[1]["ModifyIndex"]
    c.kv.put(key, "two")
    assert c.kv.delete(key, cas=stale) is False
    assert c.kv.get(key)[1]["Value"] == b"two"
    current = c.kv.get(key)[1]["ModifyIndex"]
    assert c.kv.delete(key, cas=current) is True
    assert c.kv.get(key)[1] is None


def test_blocking_get_returns_as_soon_as_another_client_writes(c, agent):
    key = unique("kv/block")
    c.kv.put(key, "before")
    index, entry = c.kv.get(key)
    assert entry["Value"] == b"before"

    writer_delay = 1.0

    def write_later():
        time.sleep(writer_delay)
        agent.client().kv.put(key, "after")

    writer = threading.Thread(target=write_later)
    start = time.monotonic()
    writer.start()
    # A return is no guarantee of a change (idempotent writes may wake the
    # query), so re-block on the new index a few times; a server that does
    # not block at all would need far more round trips than this.
    calls = 0
    new_index, new_entry = index, entry
    while new_entry is not None and new_entry["Value"] == b"before" and calls < 5:
        new_index, new_entry = c.kv.get(key, index=new_index, wait="30s")
        calls += 1
    elapsed = time.monotonic() - start
    writer.join(timeout=10)

    assert new_entry is not None and new_entry["Value"] == b"after", f"saw {new_entry!r} after {calls} calls"
    assert int(new_index) > int(index)
    assert elapsed >= writer_delay * 0.9, f"returned after {elapsed:.2f}s, before the write happened"
    assert elapsed < 10, f"blocking query took {elapsed:.2f}s although the key changed after {writer_delay}s"


def test_blocking_get_without_a_change_waits_for_the_wait_time(c):
    key = unique("kv/idle")
    c.kv.put(key, "v")
    index, _ = c.kv.get(key)
    start = time.monotonic()
    new_index, entry = c.kv.get(key, index=index, wait="2s")
    elapsed = time.monotonic() - start
    assert entry["Value"] == b"v"
    assert int(new_index) >= int(index)
    # wait plus up to wait/16 of jitter
    assert 1.8 <= elapsed < 2 + 2 / 16 + 1.5, f"returned after {elapsed:.2f}s for wait=2s"


# --------------------------------------------------------------------------
# sessions


def test_agent_registers_its_own_node_with_the_serf_health_check(c):
    _, checks = c.health.node(NODE)
    serf = [ch for ch in checks if ch["CheckID"] == "serfHealth"]
    assert serf, f"no serfHealth check for {NODE}: {checks!r}"
    assert serf[0]["Status"] == "passing"


def test_session_create_returns_an_id_that_info_list_and_node_report(c):
    name = unique("sess")
    sid = c.session.create(name=name, ttl=30)
    try:
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", sid), sid

        index, info = c.session.info(sid)
        assert int(index) > 0
        assert info["ID"] == sid
        assert info["Name"] == name
        assert info["Node"] == NODE
        assert info["Behavior"] == "release"
        assert duration_seconds(info["TTL"]) == 30
        assert info["LockDelay"] == 15 * 10**9  # default 15s, in nanoseconds
        assert info["CreateIndex"] > 0

        _, sessions = c.session.list()
        assert sid in [s["ID"] for s in sessions]

        _, on_node = c.session.node(NODE)
        assert sid in [s["ID"] for s in on_node]
        assert all(s["Node"] == NODE for s in on_node)
    finally:
        c.session.destroy(sid)


def test_session_create_with_delete_behavior_reports_it(c):
    sid = c.session.create(name=unique("sess-del"), behavior="delete", ttl=30)
    try:
        assert c.session.info(sid)[1]["Behavior"] == "delete"
    finally:
        c.session.destroy(sid)


def test_info_of_an_unknown_session_is_none(c):
    _, info = c.session.info(str(uuid.uuid4()))
    assert info is None


def test_renew_returns_the_session_with_at_least_its_ttl(c):
    sid = c.session.create(name=unique("sess-renew"), ttl=30)
    try:
        renewed = c.session.renew(sid)
        assert renewed["ID"] == sid
        # The server may hand back a higher TTL under load, never a lower one.
        assert duration_seconds(renewed["TTL"]) >= 30
    finally:
        c.session.destroy(sid)


def test_renewing_a_destroyed_session_is_not_found(c):
    sid = c.session.create(name=unique("sess-gone"), ttl=30)
    assert c.session.destroy(sid) is True
    with pytest.raises(NotFound):
        c.session.renew(sid)


def test_destroy_removes_the_session_everywhere(c):
    sid = c.session.create(name=unique("sess-destroy"))
    assert c.session.destroy(sid) is True
    assert c.session.info(sid)[1] is None
    assert sid not in [s["ID"] for s in c.session.list()[1]]
    assert sid not in [s["ID"] for s in c.session.node(NODE)[1]]
    # Destroying an unknown or already destroyed session is idempotent.
    assert c.session.destroy(sid) is True


# --------------------------------------------------------------------------
# locks


def test_a_lock_is_exclusive_between_sessions(c):
    key = unique("lock/exclusive")
    s1 = c.session.create(name=unique("holder"))
    s2 = c.session.create(name=unique("contender"))
    try:
        assert c.kv.put(key, "s1 holds", acquire=s1) is True
        _, entry = c.kv.get(key)
        assert entry["Session"] == s1
        assert entry["LockIndex"] == 1
        assert entry["Value"] == b"s1 holds"

        assert c.kv.put(key, "s2 wants", acquire=s2) is False
        _, entry = c.kv.get(key)
        assert entry["Session"] == s1
        assert entry["Value"] == b"s1 holds"

        # The holder may update the value without re-counting the lock.
        assert c.kv.put(key, "s1 again", acquire=s1) is True
        _, entry = c.kv.get(key)
        assert entry["LockIndex"] == 1
        assert entry["Value"] == b"s1 again"

        # Only the holder can release.
        assert c.kv.put(key, "s2 release", release=s2) is False
        assert c.kv.get(key)[1]["Session"] == s1

        assert c.kv.put(key, "released", release=s1) is True
        _, entry = c.kv.get(key)
        assert entry.get("Session") in (None, "")
        assert entry["LockIndex"] == 1
        assert entry["Value"] == b"released"

        # An explicit release applies no lock delay: s2 gets it at once.
        assert c.kv.put(key, "s2 holds", acquire=s2) is True
        _, entry = c.kv.get(key)
        assert entry["Session"] == s2
        assert entry["LockIndex"] == 2
    finally:
        c.session.destroy(s1)
        c.session.destroy(s2)


def test_acquire_with_an_unknown_session_fails(c):
    key = unique("lock/unknown")
    try:
        result = c.kv.put(key, "v", acquire=str(uuid.uuid4()))
    except consul.ConsulException:
        result = None  # refused with an error status ("invalid session"), as Consul does
    assert result is not True, "a lock was granted to a session that does not exist"
    assert c.kv.get(key)[1] is None


def test_destroying_a_release_session_unlocks_but_keeps_the_key(c):
    key = unique("lock/release")
    sid = c.session.create(name=unique("rel"), behavior="release")
    assert c.kv.put(key, "held", acquire=sid) is True
    assert c.session.destroy(sid) is True
    _, entry = c.kv.get(key)
    assert entry is not None, "behavior=release must keep the key"
    assert entry.get("Session") in (None, "")
    assert entry["Value"] == b"held"


def test_destroying_a_delete_session_deletes_its_keys(c):
    key = unique("lock/delete")
    sid = c.session.create(name=unique("del"), behavior="delete")
    assert c.kv.put(key, "ephemeral", acquire=sid) is True
    assert c.session.destroy(sid) is True
    assert c.kv.get(key)[1] is None


@pytest.mark.timeout(90)
def test_session_ttl_expiry_releases_the_lock(c):
    key = unique("lock/ttl")
    ttl = 10  # Consul's minimum
    sid = c.session.create(name=unique("ttl"), ttl=ttl)
    created = time.monotonic()
    assert c.kv.put(key, "held", acquire=sid) is True
    assert c.kv.get(key)[1]["Session"] == sid

    # Not renewed: invalidated after the TTL, possibly up to twice it
    # (Consul's grace), plus a margin for the write that releases the lock.
    def released():
        entry = c.kv.get(key)[1]
        return entry is not None and not entry.get("Session")

    wait_until(released, timeout=40, interval=0.5, what=f"session {sid} (TTL {ttl}s) to release {key}")
    elapsed = time.monotonic() - created
    assert elapsed >= ttl - 1, f"session expired after {elapsed:.1f}s, before its {ttl}s TTL"

    _, entry = c.kv.get(key)
    assert entry["Value"] == b"held", "behavior=release keeps the key and its value"
    assert c.session.info(sid)[1] is None
    assert sid not in [s["ID"] for s in c.session.list()[1]]


# --------------------------------------------------------------------------
# catalog and health


@pytest.fixture
def web(c):
    """Two external nodes offering one service: a passing 'primary' instance
    and a critical 'v2' instance."""
    svc = unique("web")
    healthy, sick = unique("node-ok"), unique("node-bad")
    healthy_id, sick_id = f"{svc}-1", f"{svc}-2"
    assert c.catalog.register(
        healthy,
        "127.0.0.101",
        service={"Service": svc, "ID": healthy_id, "Tags": ["primary", "v1"], "Port": 8000},
        check={
            "Node": healthy,
            "CheckID": f"service:{healthy_id}",
            "Name": f"{svc} health",
            "Status": "passing",
            "ServiceID": healthy_id,
        },
    ) is True
    assert c.catalog.register(
        sick,
        "127.0.0.102",
        service={"Service": svc, "ID": sick_id, "Tags": ["v2"], "Port": 8001},
        check={
            "Node": sick,
            "CheckID": f"service:{sick_id}",
            "Name": f"{svc} health",
            "Status": "critical",
            "ServiceID": sick_id,
        },
    ) is True
    info = {
        "service": svc,
        "healthy": healthy,
        "sick": sick,
        "healthy_id": healthy_id,
        "sick_id": sick_id,
    }
    yield info
    c.catalog.deregister(healthy)
    c.catalog.deregister(sick)


def test_catalog_nodes_lists_registered_nodes_with_their_addresses(c, web):
    index, nodes = c.catalog.nodes()
    assert int(index) > 0
    by_name = {n["Node"]: n for n in nodes}
    assert by_name[web["healthy"]]["Address"] == "127.0.0.101"
    assert by_name[web["sick"]]["Address"] == "127.0.0.102"
    assert by_name[web["healthy"]]["Datacenter"] == DATACENTER
    assert NODE in by_name, "the agent's own node is in the catalog"


def test_catalog_services_lists_the_service_with_all_its_tags(c, web):
    _, services = c.catalog.services()
    assert sorted(services[web["service"]]) == ["primary", "v1", "v2"]
    assert "consul" in services, "a server agent registers the 'consul' service, as in Consul"


def test_catalog_service_lists_every_instance(c, web):
    _, instances = c.catalog.service(web["service"])
    by_id = {i["ServiceID"]: i for i in instances}
    assert set(by_id) == {web["healthy_id"], web["sick_id"]}
    one = by_id[web["healthy_id"]]
    assert one["Node"] == web["healthy"]
    assert one["Address"] == "127.0.0.101"
    assert one["ServiceName"] == web["service"]
    assert one["ServicePort"] == 8000
    assert sorted(one["ServiceTags"]) == ["primary", "v1"]


def test_catalog_service_with_a_tag_returns_only_tagged_instances(c, web):
    _, instances = c.catalog.service(web["service"], tag="primary")
    assert [i["ServiceID"] for i in instances] == [web["healthy_id"]]
    _, none = c.catalog.service(web["service"], tag="no-such-tag")
    assert none == []


def test_catalog_service_of_an_unknown_service_is_an_empty_list(c):
    _, instances = c.catalog.service(unique("nothing"))
    assert instances == []


def test_catalog_node_lists_the_node_and_its_services(c, web):
    _, node = c.catalog.node(web["healthy"])
    assert node["Node"]["Node"] == web["healthy"]
    assert node["Node"]["Address"] == "127.0.0.101"
    services = node["Services"]
    assert list(services) == [web["healthy_id"]]
    svc = services[web["healthy_id"]]
    assert svc["Service"] == web["service"]
    assert svc["Port"] == 8000
    assert sorted(svc["Tags"]) == ["primary", "v1"]


def test_deregistering_a_service_removes_it_and_its_checks(c, web):
    assert c.catalog.deregister(web["sick"], service_id=web["sick_id"]) is True
    _, instances = c.catalog.service(web["service"])
    assert [i["ServiceID"] for i in instances] == [web["healthy_id"]]
    _, checks = c.health.checks(web["service"])
    assert [ch["CheckID"] for ch in checks] == [f"service:{web['healthy_id']}"]
    # The node itself stays.
    assert web["sick"] in [n["Node"] for n in c.catalog.nodes()[1]]


def test_deregistering_a_check_keeps_the_service(c, web):
    assert c.catalog.deregister(web["sick"], check_id=f"service:{web['sick_id']}") is True
    _, checks = c.health.node(web["sick"])
    assert checks == []
    _, instances = c.catalog.service(web["service"])
    assert web["sick_id"] in [i["ServiceID"] for i in instances]


def test_deregistering_a_node_removes_it_and_its_services(c, web):
    assert c.catalog.deregister(web["sick"]) is True
    assert web["sick"] not in [n["Node"] for n in c.catalog.nodes()[1]]
    _, instances = c.catalog.service(web["service"])
    assert [i["Node"] for i in instances] == [web["healthy"]]
    assert c.health.node(web["sick"])[1] == []


def test_health_service_lists_every_instance_with_its_checks(c, web):
    _, entries = c.health.service(web["service"])
    by_id = {e["Service"]["ID"]: e for e in entries}
    assert set(by_id) == {web["healthy_id"], web["sick_id"]}
    sick = by_id[web["sick_id"]]
    assert sick["Node"]["Node"] == web["sick"]
    assert sick["Service"]["Port"] == 8001
    assert [ch["Status"] for ch in sick["Checks"]] == ["critical"]


def test_health_service_passing_excludes_critical_instances(c, web):
    _, entries = c.health.service(web["service"], passing=True)
    assert [e["Service"]["ID"] for e in entries] == [web["healthy_id"]]
    assert all(ch["Status"] == "passing" for ch in entries[0]["Checks"])


def test_health_service_filters_by_tag(c, web):
    _, entries = c.health.service(web["service"], tag="v2")
    assert [e["Service"]["ID"] for e in entries] == [web["sick_id"]]


def test_health_checks_lists_the_checks_of_the_service(c, web):
    _, checks = c.health.checks(web["service"])
    by_id = {ch["CheckID"]: ch for ch in checks}
    assert set(by_id) == {f"service:{web['healthy_id']}", f"service:{web['sick_id']}"}
    sick = by_id[f"service:{web['sick_id']}"]
    assert sick["Status"] == "critical"
    assert sick["Node"] == web["sick"]
    assert sick["ServiceID"] == web["sick_id"]
    assert sick["ServiceName"] == web["service"]


def test_health_state_critical_lists_the_critical_check_only(c, web):
    _, checks = c.health.state("critical")
    ids = [ch["CheckID"] for ch in checks]
    assert f"service:{web['sick_id']}" in ids
    assert f"service:{web['healthy_id']}" not in ids
    assert all(ch["Status"] == "critical" for ch in checks)
    _, passing = c.health.state("passing")
    assert f"service:{web['healthy_id']}" in [ch["CheckID"] for ch in passing]
    _, anything = c.health.state("any")
    assert {f"service:{web['healthy_id']}", f"service:{web['sick_id']}"} <= {ch["CheckID"] for ch in anything}


def test_health_node_lists_the_checks_of_that_node(c, web):
    _, checks = c.health.node(web["healthy"])
    assert [(ch["CheckID"], ch["Status"], ch["ServiceName"]) for ch in checks] == [
        (f"service:{web['healthy_id']}", "passing", web["service"])
    ]


# --------------------------------------------------------------------------
# transactions


def test_txn_applies_every_operation(c):
    k1, k2 = unique("txn/a"), unique("txn/b")
    result = c.txn.put([
        {"KV": {"Verb": "set", "Key": k1, "Value": b64("one")}},
        {"KV": {"Verb": "set", "Key": k2, "Value": b64("two"), "Flags": 7}},
        {"KV": {"Verb": "get", "Key": k1}},
    ])
    assert result.get("Errors") in (None, [])
    results = result["Results"]
    assert [r["KV"]["Key"] for r in results] == [k1, k2, k1]
    assert results[0]["KV"]["Value"] is None  # set results carry no value
    assert results[2]["KV"]["Value"] == b64("one")
    assert c.kv.get(k1)[1]["Value"] == b"one"
    _, second = c.kv.get(k2)
    assert second["Value"] == b"two"
    assert second["Flags"] == 7


def test_txn_with_a_failing_cas_is_rejected_and_applies_nothing(c):
    fresh, guarded = unique("txn/fresh"), unique("txn/guarded")
    c.kv.put(guarded, "original")
    stale = c.kv.get(guarded)[1]["ModifyIndex"]
    c.kv.put(guarded, "changed")
    before = c.kv.get(guarded)[1]

    with pytest.raises(ClientError) as raised:
        c.txn.put([
            {"KV": {"Verb": "set", "Key": fresh, "Value": b64("should not exist")}},
            {"KV": {"Verb": "cas", "Key": guarded, "Value": b64("overwritten"), "Index": stale}},
            {"KV": {"Verb": "delete", "Key": guarded}},
        ])
    message = str(raised.value)
    assert message.startswith("409 "), message
    body = json.loads(message[4:])
    assert [e["OpIndex"] for e in body["Errors"]] == [1], body
    assert body["Errors"][0]["What"]

    assert c.kv.get(fresh)[1] is None, "the set before the failing cas was applied"
    after = c.kv.get(guarded)[1]
    assert after["Value"] == b"changed"
    assert after["ModifyIndex"] == before["ModifyIndex"]


# --------------------------------------------------------------------------
# status and agent


def test_status_leader_is_the_raft_address_of_the_agent(c, agent):
    assert c.status.leader() == f"127.0.0.1:{agent.server_port}"


def test_status_peers_is_the_single_dev_server(c, agent):
    assert c.status.peers() == [f"127.0.0.1:{agent.server_port}"]


def test_agent_self_reports_config_and_member(c):
    me = c.agent.self()
    assert me["Config"]["Datacenter"] == DATACENTER
    assert me["Config"]["NodeName"] == NODE
    assert me["Config"]["Server"] is True
    member = me["Member"]
    assert member["Name"] == NODE
    assert member["Addr"] == "127.0.0.1"
    assert member["Tags"]["dc"] == DATACENTER
    assert member["Tags"]["role"] == "consul"


# --------------------------------------------------------------------------
# prepared queries


def test_prepared_query_lifecycle_through_py_consul(c, web):
    # py-consul always sends Template.Type, so its queries are name_prefix_match templates.
    name = unique("pq")
    created = c.query.create(web["service"], name=name, onlypassing=True, tags=["primary"])
    qid = created["ID"]
    try:
        assert re.fullmatch(r"[0-9a-f-]{36}", qid), created
        [stored] = c.query.get(qid)
        assert stored["Name"] == name
        assert stored["Service"]["Service"] == web["service"]
        assert stored["Service"]["OnlyPassing"] is True
        assert stored["Template"]["Type"] == "name_prefix_match"
        assert stored["CreateIndex"] > 0
        assert qid in [q["ID"] for q in c.query.list()]

        # Executed by ID and by name: only the passing, tagged instance.
        for key in (qid, name):
            result = c.query.execute(key)
            assert result["Service"] == web["service"]
            assert [n["Node"]["Node"] for n in result["Nodes"]] == [web["healthy"]]
            assert result["Datacenter"] == DATACENTER
            assert result["Failovers"] == 0

        assert c.query.explain(name)["Query"]["ID"] == qid

        # A second query may not take the same name.
        with pytest.raises(consul.exceptions.ConsulException):
            c.query.create(web["service"], name=name)

        assert c.query.update(qid, web["service"], name=name, tags=["v2"]) is True
        assert c.query.get(qid)[0]["Service"]["Tags"] == ["v2"]
        # The v2 instance is critical: nothing healthy is left.
        assert c.query.execute(qid)["Nodes"] == []
    finally:
        assert c.query.delete(qid) is True
    # A 404 (Consul's "Query not found"), which py-consul turns into None.
    assert c.query.get(qid) is None


def test_prepared_query_template_interpolates_the_name(agent, c, web):
    prefix = unique("geo") + "-"
    body = {
        "Name": prefix,
        "Template": {"Type": "name_prefix_match", "Regexp": f"^{prefix}(.*)$"},
        "Service": {"Service": "${match(1)}", "Tags": ["!v2"]},
    }
    r = requests.post(f"{agent.base}/v1/query", json=body, timeout=10)
    assert r.status_code == 200, r.text
    qid = r.json()["ID"]
    try:
        result = c.query.execute(prefix + web["service"])
        assert result["Service"] == web["service"]
        assert [n["Node"]["Node"] for n in result["Nodes"]] == [web["healthy"]]
        explained = c.query.explain(prefix + web["service"])["Query"]
        assert explained["Service"]["Service"] == web["service"]

        bad = dict(body, Name=unique("bad"), Service={"Service": "${nope}"})
        r = requests.post(f"{agent.base}/v1/query", json=bad, timeout=10)
        assert r.status_code == 400 and "unknown variable" in r.text, r.text
        r = requests.get(f"{agent.base}/v1/query/{uuid.uuid4()}/execute", timeout=10)
        assert r.status_code == 404, r.text
    finally:
        requests.delete(f"{agent.base}/v1/query/{qid}", timeout=10)


# --------------------------------------------------------------------------
# coordinates


def test_coordinates_of_the_datacenter_and_of_this_node(c):
    [dc] = c.coordinate.datacenters()
    assert dc["Datacenter"] == DATACENTER
    assert dc["AreaID"] == "WAN"
    [server] = dc["Coordinates"]
    assert server["Node"] == f"{NODE}.{DATACENTER}"
    assert len(server["Coord"]["Vec"]) == 8

    # The agent stores its own coordinate after its first probe round (every 5 s).
    deadline = time.monotonic() + 20
    while True:
        index, nodes = c.coordinate.nodes()
        if any(n["Node"] == NODE for n in nodes):
            break
        assert time.monotonic() < deadline, f"no coordinate for {NODE}: {nodes}"
        # Block on the coordinates table instead of polling blindly.
        c.coordinate.nodes(index=index, wait="2s")
    mine = next(n for n in nodes if n["Node"] == NODE)
    assert set(mine["Coord"]) >= {"Vec", "Error", "Adjustment", "Height"}
    assert int(index) > 0


# --------------------------------------------------------------------------
# behaviours clients rely on (found by driving py-consul as a new user would)


def test_an_empty_kv_value_reads_back_as_none(c):
    key = unique("empty")
    assert c.kv.put(key, "")
    _, entry = c.kv.get(key)
    assert entry["Value"] is None


def test_agent_self_has_consuls_top_level_keys(agent):
    body = requests.get(f"{agent.base}/v1/agent/self", timeout=10).json()
    assert set(body) >= {"Config", "DebugConfig", "Coord", "Member", "Stats", "Meta", "xDS"}


def test_agent_services_keep_tagged_addresses_and_carry_no_raft_indexes(c):
    sid = unique("tagged")
    c.agent.service.register(
        "tagged", service_id=sid, port=81,
        tagged_addresses={"lan": {"address": "10.1.1.1", "port": 81}, "wan": {"address": "198.51.100.7", "port": 8081}},
    )
    try:
        svc = c.agent.services()[sid]
        assert svc["TaggedAddresses"] == {"lan": {"Address": "10.1.1.1", "Port": 81}, "wan": {"Address": "198.51.100.7", "Port": 8081}}
        assert "CreateIndex" not in svc and "ModifyIndex" not in svc
        assert svc["ContentHash"]
    finally:
        c.agent.service.deregister(sid)


def test_a_service_check_keeps_its_id_and_a_service_without_checks_has_none(c):
    sid = unique("checked")
    c.agent.service.register("checked", service_id=sid)
    try:
        assert not [k for k, v in c.agent.checks().items() if v["ServiceID"] == sid]
        c.agent.check.register("c", check=consul.Check.ttl("10s"), check_id=f"{sid}-given", service_id=sid)
        assert c.agent.checks()[f"{sid}-given"]["ServiceID"] == sid
    finally:
        c.agent.service.deregister(sid)


def test_catalog_services_filter_keeps_only_matching_instances(c, agent):
    sid = unique("filtered")
    c.agent.service.register("filtered-svc", service_id=sid, tags=["keep", "also"])
    try:
        wait_until(lambda: "filtered-svc" in c.catalog.services()[1], 20, what="the service in the catalog")
        r = requests.get(f"{agent.base}/v1/catalog/services", params={"filter": 'ServiceTags contains "keep"'}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json() == {"filtered-svc": ["also", "keep"]}
    finally:
        c.agent.service.deregister(sid)


def test_agent_monitor_refuses_unknown_levels_and_token_endpoints_say_acls_are_off(agent):
    r = requests.get(f"{agent.base}/v1/agent/monitor", params={"loglevel": "loud"}, timeout=10)
    assert r.status_code == 400 and "loud" in r.text
    r = requests.put(f"{agent.base}/v1/agent/token/default", json={"Token": "x"}, timeout=10)
    assert (r.status_code, r.text) == (401, "ACL support disabled")


def test_agent_monitor_streams_log_lines(agent, c):
    got = []

    def read():
        with requests.get(f"{agent.base}/v1/agent/monitor", params={"loglevel": "debug"}, stream=True, timeout=20) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    got.append(line)
                    return

    t = threading.Thread(target=read)
    t.start()
    # Something to log: a service registration logs at info.
    deadline = time.monotonic() + 15
    while t.is_alive() and time.monotonic() < deadline:
        sid = unique("noisy")
        c.agent.service.register("noisy", service_id=sid)
        c.agent.service.deregister(sid)
        t.join(0.5)
    assert got, "no log line streamed"


def test_unknown_peers_gateways_and_ingress_answer_empty_with_an_index(agent, web):
    for path in (
        f"/v1/health/service/{web['service']}?peer=nobody",
        f"/v1/catalog/service/{web['service']}?peer=nobody",
        "/v1/catalog/gateway-services/no-such-gateway?filter=Service%20%3D%3D%20x",
        f"/v1/health/ingress/{web['service']}?filter=Node.Node%20%3D%3D%20x",
    ):
        r = requests.get(agent.base + path, timeout=10)
        assert r.status_code == 200, (path, r.text)
        assert r.json() == [], path
        assert int(r.headers["X-Consul-Index"]) > 0, path
    r = requests.get(f"{agent.base}/v1/catalog/services?peer=nobody", timeout=10)
    assert r.json() == {} and int(r.headers["X-Consul-Index"]) > 0


def test_operator_usage_counts_services_and_nodes(agent):
    body = requests.get(f"{agent.base}/v1/operator/usage", timeout=10).json()
    usage = body["Usage"][DATACENTER]
    assert usage["Services"] >= 1 and usage["ServiceInstances"] >= 1 and usage["Nodes"] >= 1
    assert set(usage["ConnectServiceInstances"]) >= {"connect-proxy", "mesh-gateway"}
    assert body["KnownLeader"] is True


def test_a_coordinate_for_an_unknown_node_is_accepted_and_dropped(c, agent):
    coord = {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-5}
    r = requests.put(f"{agent.base}/v1/coordinate/update", json={"Node": "ghost-node", "Coord": coord}, timeout=10)
    assert (r.status_code, r.json()) == (200, True)
    assert not any(n["Node"] == "ghost-node" for n in c.coordinate.nodes()[1])
