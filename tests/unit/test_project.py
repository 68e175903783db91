"""Project hygiene that CI enforces: generated code is fresh, ruff is clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_protocol_code_is_fresh():
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.genproto", "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_ruff_is_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# What the README's commands leave in the checkout (run from it, as the README does).
README_OUTPUTS = ["mlp.json", "mlp.bin", "answer.bin", "my-models/linear/1/model.pt",
                  "runs.jsonl", "latency.png", ".meshserve/models/mlp/1/model.pt", "mlp.pt",
                  "signing.key", "kek"]


def test_what_the_readmes_commands_write_is_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "--no-index", *README_OUTPUTS],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert sorted(done.stdout.split()) == sorted(README_OUTPUTS), done.stderr


def test_ruff_leaves_out_the_data_directories_the_readme_makes(tmp_path):
    """In a checkout without .git too, where ruff reads no .gitignore: the demo's model.py
    files and the worked example's are not this project's code."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for model in (".meshserve/models/preprocess/1/model.py", "my-models/describe/1/model.py"):
        (tmp_path / model).parent.mkdir(parents=True)
        (tmp_path / model).write_text("import sys\nimport os\nx=1\n")  # unused, unsorted
    (tmp_path / "code.py").write_text("x = 1\n")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
