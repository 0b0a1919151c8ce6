"""Shared helpers of the deploy tests: waiting on conditions with a deadline (never sleeping
to synchronise), processes that are always cleaned up, an sd_notify listener, HTTP reads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def trellis_bin() -> Path:
    """The binary under test: $TRELLIS_BIN, else target/debug/trellis (scripts/test.sh builds it)."""
    p = Path(os.environ.get("TRELLIS_BIN") or REPO / "target/debug/trellis").resolve()
    if not os.access(p, os.X_OK):
        raise RuntimeError(f"no trellis binary at {p}: run `cargo build` or set TRELLIS_BIN")
    return p


def wait_until(cond, timeout: float, what: str, interval: float = 0.1):
    """Poll `cond` until it returns a truthy value or the deadline passes; return that value."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - report the last failure at the deadline
            last_error = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Procs:
    """Processes started by a test; `stop_all` terminates, then kills, whatever is left."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen, Path | None]] = []

    def start(self, name: str, argv: list[str], log: Path | None = None, **kw) -> subprocess.Popen:
        out = open(log, "wb") if log else subprocess.DEVNULL
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.procs.append((name, p, log))
        return p

    def log_tail(self, name: str, lines: int = 40) -> str:
        for n, _, log in self.procs:
            if n == name and log and log.exists():
                return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def all_logs(self, lines: int = 25) -> str:
        return "\n".join(f"--- {n} (exit {p.poll()}) ---\n{self.log_tail(n, lines)}" for n, p, _ in self.procs)

    def stop(self, p: subprocess.Popen, timeout: float = 20.0) -> int:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        return p.returncode

    def stop_all(self):
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for _, p, _ in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)


class NotifyListener:
    """The service manager's side of sd_notify: a datagram socket, at a path or (name starting
    with '@') in the abstract namespace, collecting every message the service sends."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if address.startswith("@"):
            self.sock.bind("\0" + address[1:])
        else:
            self.sock.bind(address)
            os.chmod(address, 0o777)  # the service runs as another user, as under systemd
        self.messages: list[dict[str, str]] = []

    def _drain(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)

    def wait_for(self, key: str, value: str, timeout: float, what: str) -> dict[str, str]:
        """Wait for the first message after those already seen with key=value."""
        seen = len(self.messages)
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages[seen:]:
                if m.get(key) == value:
                    return m
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} from {what} within {timeout}s; got {self.messages}")
            self._drain(min(left, 0.5))

    def collect_for(self, seconds: float) -> list[dict[str, str]]:
        """Everything that arrives within `seconds` (to check that something does NOT happen)."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._drain(min(left, 0.5))
        return self.messages[start:]

    def close(self):
        self.sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass


def run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, with its output in the error when it fails."""
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


# A DNS A query, printed as "<rcode> <answer count>": run by a Python inside another network
# namespace (python -c DNS_PROBE <name> <server ip> <port>).
DNS_PROBE = r"""
import socket, struct, sys
name, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, (server, port))
data = s.recv(4096)
print(data[3] & 0x0F, struct.unpack(">H", data[6:8])[0])
"""


def dns_query(netns_args: list[str], name: str, server: str, port: int) -> tuple[int, int]:
    """(rcode, answers) of an A query sent from inside a namespace (nsenter arguments)."""
    import sys

    r = subprocess.run(["nsenter", *netns_args, "--", sys.executable, "-c", DNS_PROBE, name, server, str(port)], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise AssertionError(f"DNS query {name} to {server}:{port} failed: {r.stderr}")
    rcode, answers = r.stdout.split()
    return int(rcode), int(answers)
