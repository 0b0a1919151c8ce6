"""The VM side of the deploy tests: build the .deb, install it into a scratch root the way
dpkg does for another root (maintainer scripts run chroot-less with $DPKG_ROOT), and run a
unit's ExecStart inside that root the way systemd would (its drop-ins, User, LimitNOFILE, UMask,
StateDirectory, $NOTIFY_SOCKET), in a private mount namespace chrooted into the root."""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import subprocess
from pathlib import Path

from util import REPO, run

HOST_LIBS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64"]


def build_deb(trellis: Path, out: Path) -> Path:
    r = run([str(REPO / "packaging/build-deb.sh"), "--binary", str(trellis), "--out", str(out), "--fast"], cwd=REPO)
    deb = Path(r.stdout.strip().splitlines()[-1])
    assert deb.is_file(), r.stdout
    return deb


def make_root(root: Path, with_host_units: bool = False) -> Path:
    """An empty merged-/usr Debian root with a dpkg database and the base account files."""
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "usr/bin", "usr/lib", "usr/sbin", "usr/lib64", "etc", "tmp", "run", "dev", "proc"]:
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"]:
        (root / f).touch()
    for d in ["bin", "lib", "sbin", "lib64"]:
        (root / d).symlink_to(f"usr/{d}")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n")
    os.chmod(root / "tmp", 0o1777)
    if with_host_units:
        # What systemd-analyze needs to resolve dependencies (sysinit.target, ...) and the base
        # system's /bin/kill of ExecReload, as on any Debian root.
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
        shutil.copy2(shutil.which("kill") or "/usr/bin/kill", root / "usr/bin/kill")
    return root


def dpkg_root(root: Path, *args: str) -> subprocess.CompletedProcess:
    # --force-depends: the scratch root has no libc6 package registered (the binary runs on the
    # host's libraries, bound in by run_unit).
    return run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", *args])


def account(root: Path, name: str, file: str = "passwd") -> list[str] | None:
    for line in (root / "etc" / file).read_text().splitlines():
        f = line.split(":")
        if f[0] == name:
            return f
    return None


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value, repeated keys accumulate, '#'/';' comments,
    backslash continuation."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: key outside a section: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def effective_unit(root: Path, unit: str) -> dict[str, dict[str, list[str]]]:
    """The unit as systemd loads it: the packaged file, then the drop-ins of
    /etc/systemd/system/<unit>.d/*.conf in name order; an empty assignment (ExecStart=)
    resets the list, as in systemd."""
    u = parse_unit(root / "lib/systemd/system" / unit)
    for dropin in sorted((root / "etc/systemd/system" / f"{unit}.d").glob("*.conf")):
        for section, keys in parse_unit(dropin).items():
            target = u.setdefault(section, {})
            for key, values in keys.items():
                for v in values:
                    target[key] = [] if v == "" else target.get(key, []) + [v]
    return u


def edit(text: str, changes: dict[str, str]) -> str:
    """Apply regex replacements to an example file, each of which must match exactly once (so
    the test notices when the example changes shape)."""
    for pattern, repl in changes.items():
        text, n = re.subn(pattern, repl, text, flags=re.M)
        assert n == 1, f"expected one match of {pattern!r} in the example, found {n}"
    return text


def run_unit(root: Path, unit: str, notify_socket: str, log: Path, procs, name: str):
    """Start a unit's ExecStart as systemd would, inside `root`. `notify_socket` is the
    $NOTIFY_SOCKET value as seen inside the root (a path under root/run, or '@abstract')."""
    svc = effective_unit(root, unit)["Service"]
    argv = shlex.split(svc["ExecStart"][-1])
    assert svc["Type"] == ["notify"], f"{unit} must be Type=notify"
    pw = account(root, svc["User"][-1])
    gr = account(root, svc["Group"][-1], "group")
    assert pw and gr, f"{unit}: User={svc['User']} / Group={svc['Group']} not created by the postinst"
    uid, gid = int(pw[2]), int(gr[2])
    for sd in svc.get("StateDirectory", []):
        d = root / "var/lib" / sd
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, int(svc.get("StateDirectoryMode", ["0755"])[-1], 8))
    # LimitNOFILE, capped by the hard limit this machine lets root set (this sandbox withholds
    # CAP_SYS_RESOURCE; systemd on a real host raises it).
    nofile = min(int(svc["LimitNOFILE"][-1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    umask = int(svc["UMask"][-1], 8)
    mounts = []
    for lib in HOST_LIBS:
        if os.path.isdir(lib):
            (root / lib.lstrip("/")).mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind -o ro {shlex.quote(lib)} {shlex.quote(str(root / lib.lstrip('/')))}")
    mounts.append(f"mount --rbind /dev {shlex.quote(str(root / 'dev'))}")
    mounts.append(f"mount --rbind /proc {shlex.quote(str(root / 'proc'))}")
    env = ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", f"NOTIFY_SOCKET={notify_socket}"]
    inner = " && ".join(mounts) + " && exec chroot --userspec={}:{} --groups={} {} /usr/bin/env -i {} {}".format(
        uid, gid, gid, shlex.quote(str(root)), " ".join(shlex.quote(e) for e in env), " ".join(shlex.quote(a) for a in argv)
    )

    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        os.umask(umask)

    # A private mount namespace per service, gone with it; sh, chroot and env each exec the
    # next, so the process started here is the service's main PID ($MAINPID). env must exist
    # inside the root: the base system's, as on any Debian root.
    shutil.copy2(shutil.which("env"), root / "usr/bin/env")
    return nofile, procs.start(name, ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner], log=log, preexec_fn=limits), svc
