"""Validating custom resources offline against their CRD schemas.

tests/js/validate.mjs checks objects with the @kubernetes-models npm packages (Istio,
cert-manager, Prometheus Operator), dispatching on apiVersion/kind. `validator()` installs
them with `npm ci` into tests/js/node_modules when missing or stale (once at a time, even
across parallel runs) and returns `run(objects) -> (exit code, result)`. Node.js and npm
must be on PATH: a missing tool fails the tests with a message saying so.
"""

import fcntl
import json
import shutil
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


def validator() -> Callable[[list], tuple[int, dict]]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js and npm must be on PATH to validate custom resources (tests/js)")
    node_modules = JS / "node_modules"
    with open(JS / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed(node_modules):
            command = [npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund",
                       "--engine-strict=false", "--loglevel=error"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                      timeout=INSTALL_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`npm ci --prefix tests/js` ran past {INSTALL_TIMEOUT_S} s "
                            "(is the npm registry reachable?)")
            if done.returncode != 0 or not installed(node_modules):
                pytest.fail(f"`npm ci --prefix tests/js` exited {done.returncode}\n"
                            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def run(objects: list) -> tuple[int, dict]:
        try:
            done = subprocess.run([node, str(JS / "validate.mjs")], input=json.dumps(objects),
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
