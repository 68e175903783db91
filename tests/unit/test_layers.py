"""The layers hold: `lint-imports` keeps the contracts in pyproject.toml (README, "Layers").

The checkout maps `meshserve` onto three folders (`services/`, `mesh/`, `tools/`), which
import-linter cannot follow through an editable install; each test lays the package out as it
is installed, as links into this checkout, and runs `lint-imports` against that.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def installed_layout(into: Path) -> Path:
    """`into/meshserve/...` as links to this checkout's folders, as `pip install` lays them
    out; `into` goes on PYTHONPATH."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    package = into / "meshserve"
    package.mkdir(parents=True)
    for child in (ROOT / folders["meshserve"]).iterdir():
        if child.name != "__pycache__":
            (package / child.name).symlink_to(child)
    for name, folder in folders.items():
        if name != "meshserve":
            (package / name.removeprefix("meshserve.")).symlink_to(ROOT / folder)
    return into


def lint_imports(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", "pyproject.toml"],
                          cwd=ROOT, env={"PYTHONPATH": str(path)},
                          capture_output=True, text=True, timeout=120)


def test_the_import_contracts_are_kept(tmp_path):
    done = lint_imports(installed_layout(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    layout = installed_layout(tmp_path)
    common = layout / "meshserve" / "common"
    common.unlink()
    common.mkdir()
    for module in (ROOT / "services" / "common").glob("*.py"):
        (common / module.name).symlink_to(module)
    (common / "reaching_up.py").write_text("from meshserve.tools import cli\n")
    done = lint_imports(layout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "meshserve.common is not allowed to import meshserve.tools" in done.stdout
    assert "meshserve.common.reaching_up -> meshserve.tools.cli" in done.stdout
