"""`meshserve` imports what the command it runs needs, and nothing else: an operator command
never loads torch (a second of CPU before it does anything), and `meshserve --help` loads no
tool at all. Counted in modules, in a fresh interpreter per command, not timed."""

import json
import subprocess
import sys

import pytest

# Packages that only serving a model (or the control plane's server side) needs.
HEAVY = ("torch", "numpy", "matplotlib", "kubernetes", "psycopg", "envoy", "opentelemetry",
         "meshserve.mesh.control", "meshserve.compute")
LISTED = [
    ("traffic", "status", "--help"), ("traffic", "--help"), ("canary", "status", "--help"),
    ("health", "--help"), ("token", "issue", "--help"), ("audit", "tail", "--help"),
    ("models", "list", "--help"), ("top", "--help"), ("certs", "init", "--help"),
]


def imported_by(argv: tuple[str, ...]) -> set[str]:
    """The modules a fresh interpreter holds after `meshserve ARGV` has parsed its arguments."""
    script = ("import json, sys\n"
              "from meshserve.tools.cli import main\n"
              "try:\n"
              f"    main({list(argv)!r})\n"
              "except SystemExit:\n"
              "    pass\n"
              "sys.stdout = sys.__stdout__\n"
              "print('\\n' + json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def loaded(modules: set[str], package: str) -> bool:
    return package in modules or any(name.startswith(package + ".") for name in modules)


@pytest.mark.parametrize("argv", LISTED, ids=" ".join)
def test_operator_commands_load_no_serving_code(argv):
    modules = imported_by(argv)
    assert [package for package in HEAVY if loaded(modules, package)] == []


def test_the_command_list_loads_no_tool():
    modules = imported_by(("--help",))
    tools = {name for name in modules if name.startswith("meshserve.tools.")}
    assert tools == {"meshserve.tools.cli"}
    assert not loaded(modules, "grpc")

