"""`meshserve up --compute-replicas N`: which compute processes each batcher is given."""

import argparse

import pytest

from meshserve.tools.up import plan, positive_count
from tests.integration.flaky_model import write_flaky_model


@pytest.mark.parametrize(("replicas", "names"), [
    (1, ["compute-flaky-1", "compute-flaky-2", "compute-flaky-3"]),
    (2, ["compute-flaky-1-0", "compute-flaky-1-1", "compute-flaky-2-0", "compute-flaky-2-1",
         "compute-flaky-3-0", "compute-flaky-3-1"]),
])
def test_compute_processes_per_version(tmp_path, replicas, names):
    write_flaky_model(tmp_path / "models")
    _, computes, batchers, _, _ = plan(tmp_path, 0, "cpu", compute_replicas=replicas)
    assert [c.name for c in computes] == names
    assert [(c.model, c.version) for c in computes] == [
        ("flaky", v) for v in ("1", "2", "3") for _ in range(replicas)]
    assert [b.name for b in batchers] == ["batcher-flaky-1", "batcher-flaky-2",
                                          "batcher-flaky-3"]


@pytest.mark.parametrize(("text", "count"), [("1", 1), ("4", 4)])
def test_replica_count_accepted(text, count):
    assert positive_count(text) == count


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_replica_count_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        positive_count(text)
