"""What the chart tests share: helm run offline with its own empty home, and readers of the
rendered objects. The `helm` fixture (conftest.py) hands out one `Helm` per session."""

import functools
import importlib.resources
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
VALUES = Path(__file__).resolve().parent / "values"


class Helm:
    """Runs helm with its own, empty, configuration and cache directories."""

    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        self.env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_CACHE_HOME": str(home / "cache"), "HELM_DATA_HOME": str(home / "data")}
        self.render = functools.lru_cache(maxsize=None)(self._render)
        self.documents = functools.lru_cache(maxsize=None)(self._documents)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=60, check=False)

    def lint(self, chart: str, *values: str, extra: tuple[str, ...] = ()):
        return self.run("lint", "--strict", str(CHARTS / chart), *value_args(values), *extra)

    def template(self, chart: str, *values: str, extra: tuple[str, ...] = ()):
        return self.run("template", "mesh", str(CHARTS / chart), "--namespace", "serving",
                        *value_args(values), *extra)

    def _documents(self, chart: str, values: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> tuple[dict, ...]:
        """`helm template` parsed: every object, in order (values: the chart's own file)."""
        done = self.template(chart, *(values or (chart,)), extra=extra)
        assert done.returncode == 0, done.stderr
        return tuple(document for document in yaml.safe_load_all(done.stdout) if document)

    def _render(self, chart: str, values: tuple[str, ...] = (),
                extra: tuple[str, ...] = ()) -> dict[str, dict]:
        """{kind: object}, for a service chart, which renders one object of each kind."""
        objects = {}
        for document in self.documents(chart, values, extra):
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
        return objects


def value_args(names) -> list[str]:
    return [argument for name in names for argument in ("-f", str(VALUES / f"{name}.yaml"))]


def public_ports(service: str) -> list[str]:
    """The ports a service's callers reach, in order: the ingress serves HTTP/REST too."""
    return ["grpc", "http"] if service == "ingress" else ["grpc"]


def pod_spec(objects: dict) -> dict:
    return objects["Deployment"]["spec"]["template"]["spec"]


def container(objects: dict) -> dict:
    [main] = pod_spec(objects)["containers"]
    return main


def pod_labels(objects: dict) -> dict:
    return objects["Deployment"]["spec"]["template"]["metadata"]["labels"]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in args if arg.split("=", 1)[0] == flag]


@functools.cache
def service_help(service: str) -> str:
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", service, "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    return done.stdout


def help_flags(service: str) -> tuple[set[str], set[str]]:
    """(every flag, the required flags) of `meshserve <service> --help`. A required flag is
    one of the usage outside any group: `[--a A]` is optional, and neither flag of a group of
    alternatives, `[--a A | --b B]` or `(--a A | --b B)`, is required on its own."""
    text = service_help(service)
    usage = text.split("\n\n", 1)[0]
    everything = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    outside = usage
    while (inner := re.sub(r"\[[^][()]*\]|\([^][()]*\)", " ", outside)) != outside:
        outside = inner
    required = set(re.findall(r"--[a-z][a-z0-9-]*", outside))
    return everything, required


@functools.cache
def kubernetes_schemas(version: str):
    """The strict (no unknown fields) JSON schemas of kubernetes-validate for one version."""
    pytest.importorskip("kubernetes_validate")
    from referencing import Registry, Resource

    folder = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
              / f"v{version}.0-local-strict")
    definitions = json.loads((folder / "_definitions.json").read_text())
    return folder, Resource.from_contents(definitions) @ Registry()


def kubernetes_errors(document: dict, version: str) -> list[str]:
    """Every schema error of one object (kubernetes-validate's CLI reports only the first)."""
    from jsonschema import Draft202012Validator
    from referencing import Resource

    folder, registry = kubernetes_schemas(version)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", document["apiVersion"])
    schema_file = folder / f"{document['kind'].lower()}-{group_version}.json"
    if not schema_file.is_file():
        return [f"{document['kind']} {document['apiVersion']}: unknown to Kubernetes {version}"]
    schema = json.loads(schema_file.read_text())
    validator = Draft202012Validator(schema, registry=Resource.from_contents(schema) @ registry)
    return [f"{document['kind']} /{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(document)]
