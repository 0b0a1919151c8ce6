"""packaging/Dockerfile without a container engine: packaging/check-dockerfile.py runs every
stage (cargo build in the builder stand-in, apt-get and the user in the runtime stand-in),
checks the final image (user, entrypoint, volume, `trellis version`, the default command
serving its API), and the chart runs the image the way the Dockerfile built it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chart import container, find, render, values_file
from util import REPO

pytestmark = pytest.mark.timeout(400)
CHECK = REPO / "packaging/check-dockerfile.py"


def image_config() -> dict:
    import json

    r = subprocess.run([sys.executable, str(CHECK), "--print-config"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def test_dockerfile_stages_build_and_the_image_checks_pass():
    # The builder builds with the dev profile, seeded from this checkout's target directory
    # (what a warm build cache holds), so that only the crate itself is compiled again.
    r = subprocess.run(
        [sys.executable, str(CHECK), "--build-arg", "CARGO_PROFILE=dev", "--seed-target", str(REPO / "target"), "--cache-dir", str(REPO / "target/dockerfile-cache")],
        capture_output=True, text=True, timeout=380,
    )
    assert r.returncode == 0, f"check-dockerfile failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "every stage ran and the image checks passed" in r.stdout


def test_a_copy_of_a_missing_file_fails_the_check(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text((REPO / "packaging/Dockerfile").read_text().replace("COPY web ./web", "COPY webui ./web"))
    r = subprocess.run([sys.executable, str(CHECK), "--dockerfile", str(bad), "--context", str(REPO), "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "COPY webui: not in the build context" in r.stderr, (r.stdout[-2000:], r.stderr)


def test_the_chart_runs_the_image_as_its_user_on_its_exposed_ports():
    cfg = image_config()
    uid, gid = (int(x) for x in cfg["user"].split(":"))
    exposed = set(cfg["exposed"])
    for name in ["single-dc", "gateway"]:
        for obj in render(values_file(name)):
            if obj["kind"] not in ("StatefulSet", "DaemonSet", "Deployment"):
                continue
            spec = obj["spec"]["template"]["spec"]
            sc = spec["securityContext"]
            assert (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid), obj["metadata"]["name"]
            c = container(spec)
            # The image's ENTRYPOINT is the command the chart names (found on the image's PATH).
            assert c["command"][0] == cfg["entrypoint"][0], c["command"]
            for p in c["ports"]:
                assert f"{p['containerPort']}/{p.get('protocol', 'TCP').lower()}" in exposed, (obj["metadata"]["name"], p)
            # Writable places under readOnlyRootFilesystem are volumes.
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"/tmp", "/trellis/data"} <= {m["mountPath"] for m in c["volumeMounts"]}
    sts = find(render(values_file("single-dc")), "StatefulSet")
    assert [v["mountPath"] for v in container(sts["spec"]["template"]["spec"])["volumeMounts"] if v["name"] == "data"] == cfg["volumes"]
