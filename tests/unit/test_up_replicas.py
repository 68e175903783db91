"""`meshserve up --compute-replicas N --batcher-replicas M`: the processes of each model
version, and which compute processes each batcher is given."""

import argparse

import pytest

from meshserve.tools.arguments import positive_int
from meshserve.tools.up import compute_flags, plan
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


@pytest.mark.parametrize(("replicas", "names"), [
    (1, ["batcher-flaky-1", "batcher-flaky-2", "batcher-flaky-3"]),
    (2, ["batcher-flaky-1-0", "batcher-flaky-1-1", "batcher-flaky-2-0", "batcher-flaky-2-1",
         "batcher-flaky-3-0", "batcher-flaky-3-1"]),
])
def test_batcher_processes_per_version(tmp_path, replicas, names):
    write_flaky_model(tmp_path / "models")
    _, computes, batchers, _, _ = plan(tmp_path, 0, "cpu", batcher_replicas=replicas)
    assert [b.name for b in batchers] == names
    assert [(b.model, b.version) for b in batchers] == [
        ("flaky", v) for v in ("1", "2", "3") for _ in range(replicas)]
    assert {b.identity for b in batchers} == {"batcher"}
    assert [c.name for c in computes] == ["compute-flaky-1", "compute-flaky-2",
                                          "compute-flaky-3"]


def test_a_models_instance_group_count_sets_its_computes(tmp_path):
    """Without --compute-replicas, each version gets as many computes as the model's
    instance_group asks for (Triton's instances); with it, that many for every model."""
    write_flaky_model(tmp_path / "models")
    config = tmp_path / "models" / "flaky" / "config.pbtxt"
    config.write_text(config.read_text()
                      + "instance_group [ { kind: KIND_AUTO count: 2 }, { count: 1 } ]\n")
    _, computes, _, _, _ = plan(tmp_path, 0, "cpu")
    assert [c.name for c in computes] == [f"compute-flaky-{v}-{r}" for v in ("1", "2", "3")
                                          for r in range(3)]
    _, computes, _, _, _ = plan(tmp_path, 0, "cpu", compute_replicas=1)
    assert [c.name for c in computes] == ["compute-flaky-1", "compute-flaky-2",
                                          "compute-flaky-3"]


def test_every_batcher_of_a_version_gets_its_computes(tmp_path):
    write_flaky_model(tmp_path / "models")
    _, computes, batchers, _, _ = plan(tmp_path, 0, "cpu", compute_replicas=2,
                                       batcher_replicas=3)
    for port, compute in enumerate(computes, start=7000):
        compute.port = port
    flags = {b.name: compute_flags(b, computes) for b in batchers}
    assert flags["batcher-flaky-1-0"] == ["--compute=127.0.0.1:7000",
                                          "--compute=127.0.0.1:7001"]
    assert flags["batcher-flaky-1-2"] == flags["batcher-flaky-1-0"]
    assert flags["batcher-flaky-3-1"] == ["--compute=127.0.0.1:7004",
                                          "--compute=127.0.0.1:7005"]
    # Each batcher has its own argument list: giving one its flags leaves the others alone.
    batchers[0].args.extend(flags["batcher-flaky-1-0"])
    assert not any(a.startswith("--compute=") for b in batchers[1:] for a in b.args)


@pytest.mark.parametrize(("text", "count"), [("1", 1), ("4", 4)])
def test_replica_count_accepted(text, count):
    assert positive_int(text) == count


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_replica_count_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        positive_int(text)
