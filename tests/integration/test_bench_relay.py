"""`meshserve bench relay`: a bare relay and echo over real mutual-TLS gRPC, measured."""

import json
import subprocess
import sys

import pytest

from meshserve.tools.bench_relay import Phase, measure, per_message_us, relay_adds, report
from tests.integration.conftest import children_of


@pytest.mark.parametrize("client", ["http2", "grpc"])
def test_the_relay_answers_every_message_and_both_servers_stop(tmp_path, client):
    # Enough messages for the relay's CPU to span several of /proc's 10 ms ticks on a fast
    # machine (~100 µs a message): 60 once read as 0.
    phases = measure(size=1100, messages=600, paced_messages=12, pace_s=0.002,
                     work_dir=tmp_path, client=client)
    assert [(p.name, p.messages) for p in phases] == [("back to back", 600),
                                                      ("paced every 2 ms", 12),
                                                      ("paced every 2 ms, no relay", 12)]
    assert all(phase.p50_ms > 0 for phase in phases)
    assert sum(p.relay_us * p.messages for p in phases) > 0  # its CPU was read from /proc
    assert children_of(tmp_path) == []  # the relay and the echo stopped


def test_the_command_prints_its_figures_as_json():
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", "bench", "relay",
                           "--messages=40", "--paced-messages=5", "--pace-ms=1",
                           "--size=64", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert document["size"] == 64 and document["client"] == "http2"
    assert [p["messages"] for p in document["phases"]] == [40, 5, 5]
    assert document["relay_adds_round_trips"] == pytest.approx(
        relay_adds([Phase(**p) for p in document["phases"]]))  # from the phases it printed


def test_cpu_per_message_and_the_report():
    assert per_message_us(100, 130, 100, 1000) == pytest.approx(300.0)  # 0.3 s over 1000
    phases = [Phase("back to back", 2000, 300.0, 200.0, 0.5),
              Phase("paced every 10 ms", 300, 900.0, 400.0, 1.5),
              Phase("paced every 10 ms, no relay", 300, 0.0, 500.0, 1.0)]
    text = report(phases, 11000, "grpc")
    assert "11000-byte messages" in text and "on a grpc.aio channel" in text
    assert text.splitlines()[-2].split()[-2:] == ["3.00x", "2.00x"]
    assert relay_adds(phases) == pytest.approx(0.5)  # 0.5 ms over a 1.0 ms round trip
    assert text.splitlines()[-1] == ("the relay adds 0.500 ms to the paced p50: 0.50x the p50 "
                                     "with no relay")
