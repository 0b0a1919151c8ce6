#!/usr/bin/env python3
"""Build packaging/Dockerfile's stages without a container engine, and check the image.

Where no Docker engine exists (this project's machines and CI), this keeps the Dockerfile from
rotting: it parses the Dockerfile, runs every RUN step for real in a stand-in for its base
image, performs every COPY (from the build context, filtered by .dockerignore, or from an
earlier stage), and checks the final image: the binary is where ENTRYPOINT finds it, USER
names an account of the image, VOLUME and WORKDIR belong to it, `trellis version` runs as that
user, and the default command (ENTRYPOINT + CMD) starts an agent that serves its API.

Base images are replaced by stand-ins made from this machine, which must match them:
  rust:<version>-bookworm   this machine's root (Debian 12) with its Rust toolchain, which
                            must be <version> (at its own CARGO_HOME and RUSTUP_HOME)
  debian:bookworm-slim      this machine's root (Debian 12) with Debian's stock accounts
                            (base-passwd's passwd.master/group.master) instead of its own,
                            and no dpkg stat overrides
The stand-ins hold more packages than the real images, so a missing apt-get install of a
tool the image needs would go unnoticed here; the checks of the final image below name
what the image must have.
Each stage runs in an overlay of / (nothing on this machine changes), chrooted, in a private
mount namespace; RUN --mount=type=cache targets are persistent directories under --cache-dir.

  packaging/check-dockerfile.py [--dockerfile F] [--context DIR] [--build-arg K=V ...]
                                [--cache-dir DIR] [--seed-target DIR] [--keep DIR]
                                [--print-config]

--seed-target hard-links an existing cargo target directory's dependencies into the builder's
/src/target cache (as a warm BuildKit cache would hold them). --print-config prints the final
image's configuration as JSON and exits without building (other tools read it).
Needs root (mounts, chroot). Exit status 0 when every stage ran and every check passed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class CheckError(Exception):
    pass


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile."""
    lines = path.read_text().splitlines()
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comments inside a continued instruction are dropped, as Docker does
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    if buf:
        raise CheckError(f"{path}:{start}: the file ends inside a continued instruction")
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for n, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            if not m:
                raise CheckError(f"{path}:{n}: cannot read FROM {rest!r}")
            stages.append(Stage(base=m.group(1), name=m.group(2), index=len(stages)))
        elif not stages:
            if keyword != "ARG":
                raise CheckError(f"{path}:{n}: only ARG may come before the first FROM, not {keyword}")
            k, _, v = rest.partition("=")
            global_args[k] = v
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, n))
    if not stages:
        raise CheckError(f"{path}: no FROM")
    return global_args, stages


def substitute(text: str, env: dict[str, str]) -> str:
    def one(m):
        name = m.group(1) or m.group(2)
        if name not in env:
            raise CheckError(f"${{{name}}} is not defined (no ARG or ENV gives it a value)")
        return env[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def json_or_shell(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


def flags(args: str) -> tuple[dict[str, list[str]], str]:
    """Leading --flag=value options of COPY/RUN, and the rest."""
    found: dict[str, list[str]] = {}
    while args.startswith("--"):
        token, _, args = args.partition(" ")
        k, _, v = token[2:].partition("=")
        found.setdefault(k, []).append(v)
        args = args.lstrip()
    return found, args


def dockerignore(context: Path) -> list[str]:
    f = context / ".dockerignore"
    if not f.exists():
        return []
    return [line.strip().rstrip("/") for line in f.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for p in patterns:
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, p) or (p.startswith("**/") and fnmatch.fnmatch(parts[i - 1], p[3:])):
                return True
    return False


def final_config(dockerfile: Path, build_args: dict[str, str] | None = None) -> dict:
    """The final stage's image configuration, as `docker inspect` would report it."""
    global_args, stages = parse(dockerfile)
    last = stages[-1]
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    args = {**global_args, **(build_args or {})}
    cfg = {"user": "", "workdir": "/", "entrypoint": [], "cmd": [], "env": env, "exposed": [], "volumes": [], "stopsignal": "SIGTERM", "copies": []}
    for ins in last.instructions:
        scope = {**args, **env}
        if ins.keyword == "ARG":
            k, _, v = ins.args.partition("=")
            args.setdefault(k, v)
        elif ins.keyword == "ENV":
            for k, v in (p.split("=", 1) for p in shlex.split(ins.args)):
                env[k] = substitute(v, scope)
        elif ins.keyword == "USER":
            cfg["user"] = substitute(ins.args, scope)
        elif ins.keyword == "WORKDIR":
            cfg["workdir"] = os.path.join(cfg["workdir"], substitute(ins.args, scope))
        elif ins.keyword == "ENTRYPOINT":
            cfg["entrypoint"] = json_or_shell(ins.args)
            cfg["cmd"] = []
        elif ins.keyword == "CMD":
            cfg["cmd"] = json_or_shell(ins.args)
        elif ins.keyword == "EXPOSE":
            cfg["exposed"] += [p if "/" in p else f"{p}/tcp" for p in ins.args.split()]
        elif ins.keyword == "VOLUME":
            cfg["volumes"] += json_or_shell(ins.args) if ins.args.startswith("[") else ins.args.split()
        elif ins.keyword == "STOPSIGNAL":
            cfg["stopsignal"] = ins.args
        elif ins.keyword == "COPY":
            f, rest = flags(ins.args)
            parts = shlex.split(rest)
            cfg["copies"].append({"from": f.get("from", [None])[0], "sources": parts[:-1], "dest": parts[-1]})
    return cfg


class Runner:
    def __init__(self, dockerfile: Path, context: Path, build_args: dict[str, str], cache_dir: Path, work: Path, seed_target: Path | None):
        self.dockerfile, self.context, self.cache_dir, self.work = dockerfile, context, cache_dir, work
        self.global_args, self.stages = parse(dockerfile)
        unknown = set(build_args) - set(self.global_args) - {i.args.partition("=")[0] for s in self.stages for i in s.instructions if i.keyword == "ARG"}
        if unknown:
            raise CheckError(f"--build-arg {sorted(unknown)}: no ARG of that name in {dockerfile}")
        self.build_args = build_args
        self.roots: dict[str, Path] = {}
        self.mounted: list[Path] = []
        self.seed_target = seed_target
        self.ignore = dockerignore(context)

    def log(self, msg: str):
        print(f"==> {msg}", flush=True)

    # --- stand-ins for the base images -------------------------------------------------------
    def standin(self, stage: Stage, base: str) -> tuple[Path, dict[str, str]]:
        if re.fullmatch(r"\w+", base) and base in self.roots:
            raise CheckError(f"FROM {base}: building on an earlier stage is not supported by this check")
        osrel = Path("/etc/os-release").read_text()
        if 'VERSION_ID="12"' not in osrel or "ID=debian" not in osrel:
            raise CheckError(f"FROM {base}: the stand-in is this machine's root, which must be Debian 12 (bookworm)")
        root = self.overlay(f"stage{stage.index}")
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        m = re.fullmatch(r"rust:(\d+\.\d+)(?:\.\d+)?-bookworm", base)
        if m:
            version = subprocess.run(["rustc", "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
            if not version.startswith(m.group(1) + "."):
                raise CheckError(f"FROM {base}: the stand-in is this machine's Rust toolchain, which is {version}, not {m.group(1)}")
            cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
            rustup_home = Path(os.environ.get("RUSTUP_HOME", Path.home() / ".rustup"))
            # This machine's toolchain at its own paths (the overlay shows them): its registry
            # cache is the image's cargo registry cache mount.
            env.update({"CARGO_HOME": str(cargo_home), "RUSTUP_HOME": str(rustup_home), "PATH": f"{cargo_home}/bin:" + env["PATH"]})
            return root, env
        if base == "debian:bookworm-slim":
            # Debian's stock accounts, as in a fresh image, instead of this machine's.
            for name, master in [("passwd", "passwd.master"), ("group", "group.master")]:
                shutil.copy(f"/usr/share/base-passwd/{master}", root / "etc" / name)
            users = [line.split(":")[0] for line in (root / "etc/passwd").read_text().splitlines()]
            groups = [line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()]
            (root / "etc/shadow").write_text("".join(f"{u}:*:19000:0:99999:7:::\n" for u in users))
            (root / "etc/gshadow").write_text("".join(f"{g}:*::\n" for g in groups))
            # No overrides for accounts the image does not have (a fresh image has none).
            (root / "var/lib/dpkg/statoverride").write_text("")
            return root, env
        raise CheckError(f"FROM {base}: no stand-in for this base image (known: rust:<version>-bookworm, debian:bookworm-slim)")

    def overlay(self, name: str) -> Path:
        d = self.work / name
        for sub in ["upper", "work", "root"]:
            (d / sub).mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={d}/upper,workdir={d}/work", str(d / "root")], check=True)
        self.mounted.append(d / "root")
        return d / "root"

    def cleanup(self):
        for m in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)

    # --- instructions -------------------------------------------------------------------------
    def copy_from_context(self, sources: list[str], dest: Path, ins: Instruction):
        for src in sources:
            rel = os.path.normpath(src).lstrip("/")
            path = self.context / rel
            if rel in ("", ".") or ".." in rel.split("/"):
                raise CheckError(f"line {ins.line}: COPY {src}: copies outside or the whole context are not checked")
            if not path.exists():
                raise CheckError(f"line {ins.line}: COPY {src}: not in the build context {self.context}")
            if ignored(rel, self.ignore):
                raise CheckError(f"line {ins.line}: COPY {src}: excluded by .dockerignore")
            target = dest / path.name if (len(sources) > 1 or str(dest).endswith("/")) and path.is_file() else dest
            if path.is_dir():
                def skip(d, names, _rel=rel):
                    base = os.path.relpath(d, self.context)
                    return [n for n in names if ignored(os.path.normpath(os.path.join(base, n)), self.ignore)]

                shutil.copytree(path, target, dirs_exist_ok=True, symlinks=True, ignore=skip)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)

    def run_step(self, root: Path, cmd: list[str], env: dict[str, str], workdir: str, mounts: list[str], user: str, ins: Instruction):
        binds = []
        for spec in mounts:
            opts = dict(kv.partition("=")[::2] for kv in spec.split(","))
            if opts.get("type") != "cache":
                raise CheckError(f"line {ins.line}: RUN --mount={spec}: only type=cache is supported by this check")
            target = opts["target"]
            host = self.cache_dir / target.strip("/").replace("/", "_")
            host.mkdir(parents=True, exist_ok=True)
            if target == "/src/target" and self.seed_target and not (host / ".seeded").exists():
                self.seed(host)
            (root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
            binds.append(f"mount --bind {shlex.quote(str(host))} {shlex.quote(str(root / target.lstrip('/')))}")
        binds += [f"mount --rbind /dev {shlex.quote(str(root / 'dev'))}", f"mount --rbind /proc {shlex.quote(str(root / 'proc'))}", f"mount --rbind /sys {shlex.quote(str(root / 'sys'))}"]
        userspec = f"--userspec={user}" if user else ""
        envs = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        inner = " && ".join(binds) + f" && exec chroot {userspec} {shlex.quote(str(root))} /usr/bin/env -i -C {shlex.quote(workdir)} {envs} " + " ".join(shlex.quote(c) for c in cmd)
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner])
        if r.returncode != 0:
            raise CheckError(f"line {ins.line}: RUN failed with exit status {r.returncode}")

    def seed(self, cache: Path):
        """Hard-link a built target directory's dependency artifacts into the cache, as a warm
        BuildKit cache would hold them: cargo keys registry dependencies by their identity,
        not by the workspace's path, so only this crate is compiled again. The crate's own
        artifacts (trellis-*) are left out; cargo never rewrites a fresh dependency's files."""
        for profile in ["debug", "release"]:
            for sub in ["deps", ".fingerprint", "build"]:
                src = self.seed_target / profile / sub
                if not src.is_dir():
                    continue
                dst = cache / profile / sub
                dst.mkdir(parents=True, exist_ok=True)
                for entry in src.iterdir():
                    if entry.name.startswith(("trellis-", "libtrellis-")) or (dst / entry.name).exists():
                        continue
                    subprocess.run(["cp", "-al", str(entry), str(dst / entry.name)], check=True)
        (cache / ".seeded").touch()

    def build(self) -> Path:
        args = {**self.global_args, **self.build_args}
        last_root = None
        for stage in self.stages:
            base = substitute(stage.base, args)
            self.log(f"stage {stage.index} ({stage.name or 'unnamed'}): FROM {base}")
            root, env = self.standin(stage, base)
            stage_args = dict(args)
            workdir, user = "/", ""
            for ins in stage.instructions:
                scope = {**stage_args, **env}
                kw = ins.keyword
                if kw == "ARG":
                    k, _, v = ins.args.partition("=")
                    stage_args[k] = self.build_args.get(k, args.get(k, v))
                elif kw == "ENV":
                    for k, v in (p.split("=", 1) for p in shlex.split(ins.args)):
                        env[k] = substitute(v, scope)
                elif kw == "WORKDIR":
                    workdir = os.path.join(workdir, substitute(ins.args, scope))
                    (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
                elif kw == "USER":
                    user = substitute(ins.args, scope)
                elif kw == "COPY":
                    f, rest = flags(ins.args)
                    parts = [substitute(p, scope) for p in shlex.split(rest)]
                    sources, dest = parts[:-1], parts[-1]
                    dest_path = root / os.path.join(workdir, dest).lstrip("/")
                    if dest.endswith("/"):
                        dest_path.mkdir(parents=True, exist_ok=True)
                    if "from" in f:
                        src_stage = f["from"][0]
                        if src_stage not in self.roots:
                            raise CheckError(f"line {ins.line}: COPY --from={src_stage}: no earlier stage of that name")
                        for s in sources:
                            src = self.roots[src_stage] / s.lstrip("/")
                            if not src.exists():
                                raise CheckError(f"line {ins.line}: COPY --from={src_stage} {s}: the stage did not produce it")
                            dest_path.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(src, dest_path) if src.is_file() else shutil.copytree(src, dest_path, dirs_exist_ok=True, symlinks=True)
                    else:
                        self.copy_from_context(sources, dest_path, ins)
                    self.log(f"line {ins.line}: COPY {' '.join(sources)} -> {dest}")
                elif kw == "RUN":
                    f, rest = flags(ins.args)
                    run_env = {**stage_args, **env}
                    self.log(f"line {ins.line}: RUN {rest[:100]}{'...' if len(rest) > 100 else ''}")
                    started = time.monotonic()
                    self.run_step(root, json_or_shell(rest), run_env, workdir, f.get("mount", []), user, ins)
                    self.log(f"line {ins.line}: done in {time.monotonic() - started:.1f}s")
                elif kw in ("EXPOSE", "VOLUME", "STOPSIGNAL", "ENTRYPOINT", "CMD", "LABEL", "HEALTHCHECK", "SHELL"):
                    pass
                else:
                    raise CheckError(f"line {ins.line}: {kw} is not supported by this check")
            if stage.name:
                self.roots[stage.name] = root
            self.roots[str(stage.index)] = root
            last_root = root
        return last_root

    # --- the final image ------------------------------------------------------------------
    def check_image(self, root: Path):
        cfg = final_config(self.dockerfile, self.build_args)
        user = cfg["user"]
        if not user:
            raise CheckError("the image runs as root: give the final stage a USER")
        uid, _, gid = user.partition(":")
        accounts = {line.split(":")[2]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
        if not uid.isdigit() or uid == "0":
            raise CheckError(f"USER {user}: use a numeric, non-root uid (Kubernetes runAsNonRoot needs a number)")
        if uid not in accounts:
            raise CheckError(f"USER {user}: uid {uid} has no account in the image's /etc/passwd")
        if gid and accounts[uid][3] != gid:
            raise CheckError(f"USER {user}: the account's primary group is {accounts[uid][3]}, not {gid}")
        self.log(f"USER {user} is {accounts[uid][0]} in the image")
        argv = cfg["entrypoint"] + cfg["cmd"]
        exe = argv[0]
        found = exe if exe.startswith("/") else next((f"{d}/{exe}" for d in cfg["env"]["PATH"].split(":") if os.access(root / d.lstrip("/") / exe, os.X_OK)), None)
        if not found or not os.access(root / found.lstrip("/"), os.X_OK):
            raise CheckError(f"ENTRYPOINT {exe}: not an executable on the image's PATH {cfg['env']['PATH']}")
        self.log(f"ENTRYPOINT {exe} is {found}")
        for v in cfg["volumes"] + [cfg["workdir"]]:
            st = (root / v.lstrip("/")).stat()
            if str(st.st_uid) != uid:
                raise CheckError(f"{v} belongs to uid {st.st_uid}, not the image's user {uid}: it could not write there")
        # `trellis version` as the image's user, in the image.
        out = self.run_in_image(root, cfg, [found, "version"], timeout=30)
        if "Trellis v" not in out:
            raise CheckError(f"{found} version printed {out!r}")
        self.log(f"{out.splitlines()[0]} runs as {user}")
        self.check_default_command(root, cfg, argv)

    def run_in_image(self, root: Path, cfg: dict, argv: list[str], timeout: float, net: bool = False):
        envs = " ".join(shlex.quote(f"{k}={v}") for k, v in cfg["env"].items())
        inner = f"mount --rbind /dev {root}/dev && mount --rbind /proc {root}/proc && exec chroot --userspec={cfg['user']} {root} /usr/bin/env -i -C {cfg['workdir']} {envs} " + " ".join(map(shlex.quote, argv))
        pre = ["unshare", "--net", "sh", "-c", "ip link set lo up && exec \"$@\"", "-"] if net else []
        return subprocess.run(pre + ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner], capture_output=True, text=True, timeout=timeout, check=True).stdout

    def check_default_command(self, root: Path, cfg: dict, argv: list[str]):
        """ENTRYPOINT + CMD, as `docker run <image>` runs it, in a network namespace of its own:
        it must come up and serve its HTTP API, then stop cleanly on the STOPSIGNAL."""
        envs = " ".join(shlex.quote(f"{k}={v}") for k, v in cfg["env"].items())
        probe = "for i in $(seq 1 300); do curl -sf http://127.0.0.1:8500/v1/status/leader | grep -q '\"' && exit 0; sleep 0.1; done; exit 1"
        inner = (
            f"ip link set lo up && mount --rbind /dev {root}/dev && mount --rbind /proc {root}/proc && "
            f"(chroot --userspec={cfg['user']} {root} /usr/bin/env -i -C {cfg['workdir']} {envs} {' '.join(map(shlex.quote, argv))} > {self.work}/default-command.log 2>&1 & "
            f"pid=$!; {probe}; ok=$?; kill -s {cfg['stopsignal'].removeprefix('SIG')} $pid; wait $pid; rc=$?; [ $ok = 0 ] && [ $rc = 0 ])"
        )
        r = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", inner], timeout=90)
        log = (self.work / "default-command.log").read_text(errors="replace")
        if r.returncode != 0:
            raise CheckError(f"the default command {argv} did not serve its API and stop cleanly; its output:\n{log[-3000:]}")
        self.log(f"the default command {' '.join(argv)} served /v1/status/leader and stopped cleanly")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dockerfile", type=Path, default=REPO / "packaging/Dockerfile")
    ap.add_argument("--context", type=Path, default=REPO)
    ap.add_argument("--build-arg", action="append", default=[])
    ap.add_argument("--cache-dir", type=Path, default=REPO / "target/dockerfile-cache")
    ap.add_argument("--seed-target", type=Path)
    ap.add_argument("--keep", type=Path, help="build in this directory and leave it (unmounted) for inspection")
    ap.add_argument("--print-config", action="store_true")
    a = ap.parse_args()
    build_args = dict(kv.split("=", 1) for kv in a.build_arg)
    try:
        if a.print_config:
            print(json.dumps(final_config(a.dockerfile, build_args), indent=2))
            return 0
        if os.geteuid() != 0:
            raise CheckError("needs root (overlay mounts, chroot)")
        work = Path(tempfile.mkdtemp(prefix="dockerfile-check-")) if not a.keep else a.keep
        work.mkdir(parents=True, exist_ok=True)
        runner = Runner(a.dockerfile.resolve(), a.context.resolve(), build_args, a.cache_dir.resolve(), work, a.seed_target.resolve() if a.seed_target else None)
        try:
            root = runner.build()
            runner.check_image(root)
        finally:
            runner.cleanup()
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
    except (CheckError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"check-dockerfile: {e}", file=sys.stderr)
        return 1
    print("check-dockerfile: every stage ran and the image checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
