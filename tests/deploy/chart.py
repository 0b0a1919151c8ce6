"""Rendering the Helm chart offline through the Helm SDK (helm-python-sdk: Helm's Go SDK behind
a C ABI, no helm binary, no cluster) and reading the result as Kubernetes objects."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import helm_python as helm
import yaml

from util import REPO

CHART = REPO / "helm/trellis"
VALUES = CHART / "ci"


def values_file(name: str) -> dict:
    return yaml.safe_load((VALUES / f"{name}.yaml").read_text()) or {}


def render(values: dict, release: str = "dc1", namespace: str = "default") -> list[dict]:
    """Every object of an install, each with the template it came from under "__source"."""
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values=values, name=release, namespace=namespace, is_install=True)
    objects = []
    for source, text in sorted(out.items()):
        if source.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source"] = source
                objects.append(doc)
    return objects


def notes(values: dict, release: str = "dc1", namespace: str = "default") -> str:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values=values, name=release, namespace=namespace, is_install=True)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def lint(values: dict) -> dict:
    return helm.lint(str(CHART), values=values, strict=True, namespace="default", kube_version="v1.30.0")


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects: list[dict]) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def config_files(configmap: dict) -> dict[str, dict]:
    return {k: json.loads(v) for k, v in configmap["data"].items()}


def strip_source(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__source"}


def container(pod_spec: dict, name: str = "trellis") -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def chart_path() -> Path:
    return CHART
