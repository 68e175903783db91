"""The chaos suite: every scenario against one live mesh; nothing lost, nothing failed
that the fault did not make unavoidable. `.venv/bin/pytest tests/chaos -q` runs the short
plan; `MESHSERVE_CHAOS=full .venv/bin/pytest tests/chaos -q -s` the long one."""

import pytest

from tests.chaos.outcomes import Row
from tests.chaos.scenarios import SCENARIOS, Chaos


def describe(row: Row) -> str:
    tally = row.tally
    return (f"{tally.scenario}: sent {tally.sent}, {dict(tally.outcomes)}, "
            f"statuses {dict(tally.statuses)}, examples {tally.examples}")


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario(name, chaos_mesh, chaos_plan, chaos_references, chaos_report):
    chaos = Chaos(chaos_mesh.data_dir, chaos_plan, chaos_references)
    try:
        result = await SCENARIOS[name](chaos)
    finally:
        await chaos.close()
    rows = result if isinstance(result, list) else [result]
    chaos_report.extend(rows)
    for row in rows:
        tally = row.tally
        assert tally.accounted, describe(row)
        assert tally.lost == 0, describe(row)
        assert tally.failed <= row.max_failed, describe(row)
        assert row.verdict == "pass", describe(row)
        if not name.startswith("fuzz"):  # malformed input has nothing to succeed
            assert tally.succeeded > 0, describe(row)
    if name == "slow-model":  # 20 ms timeouts queued behind 50 ms batches: refused, clearly
        assert rows[0].tally.statuses["DEADLINE_EXCEEDED"] > 0, describe(rows[0])
