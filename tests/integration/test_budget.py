"""The speed gate: `meshserve bench budget --quick --gate 2` on a real `meshserve up`.

It fails only when the gated figure (the whole mesh's CPU per request at c=32) is past twice
its budget (benchmarks/budget.toml), or when a figure CI must have could not be measured.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshserve.tools.budget import KINDS, RELAY_CLIENTS
from tests.integration.conftest import children_of


def test_quick_budget_is_within_twice_the_budget(tmp_path):
    out = tmp_path / "budget"
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", "bench", "budget",
                           "--quick", "--gate", "2", "--json", f"--out={out}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-4000:]  # 2: the run itself failed
    document = json.loads(done.stdout)
    assert document == json.loads((out / "budget.json").read_text())
    found = {figure["name"]: figure for figure in document["figures"]}
    assert found["B: bare call server CPU, c=32"]["measured"] > 0
    for kind in KINDS:
        figure = found[f"mlp c=32 {kind} CPU per request"]
        assert figure["measured"] > 0 and figure["budget"] > 0, figure
    model = found["mlp c=32 model CPU per request inside compute"]["measured"]
    beyond = found["mlp c=32 compute CPU per request beyond its model"]["measured"]
    assert model > 0 and beyond > 0  # read from the computes' metrics
    # the same calls in this process, after a pause and back to back: both were measured
    assert found["mlp model CPU at batch 1, after a pause / back to back"]["measured"] > 0
    assert found["batcher's Python per group of one, after a pause / back to back"][
        "measured"] > 0  # the in-process batcher answered its groups
    for client in RELAY_CLIENTS.values():  # the floor: a bare relay, paced, on each client
        assert found[f"floor: bare relay CPU per message, c=1, {client}"]["measured"] > 0
        assert found[f"floor: p50 added by a bare relay, c=1, {client}"]["measured"] is not None
    assert found["mlp c=32 compute CPU per request"]["measured"] == \
        pytest.approx(model + beyond, abs=2e-4)  # rounded to 4 places
    assert children_of(Path(document["data_dir"])) == []  # the mesh and the bare server stopped
    past = [f"{f['name']}: {f['measured']} {f['unit']} (budget {f['budget']})"
            for f in document["figures"] if f["name"] in document["past_gate"]]
    assert done.returncode == 0, "past twice the budget:\n" + "\n".join(past)
