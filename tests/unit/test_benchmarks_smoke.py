"""The micro-benchmarks in benchmarks/ still run: each once, untimed (a smoke, not a timing)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIN_BENCHMARKS = 10


def test_benchmarks_run_once_each():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable",
         "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    summary = re.search(r"(\d+) passed", output.strip().splitlines()[-1])
    assert summary, output
    assert int(summary.group(1)) >= MIN_BENCHMARKS, output
