"""One `meshserve up` (two compute replicas and two batchers per model version, plus the
`slow` model) shared by every chaos scenario, and the report table printed at the end of
the run.

`MESHSERVE_CHAOS=full` selects the long plan (read here, in the test harness, once)."""

import os
from pathlib import Path

import pytest

from tests.chaos.outcomes import Row, markdown_table
from tests.chaos.scenarios import Plan, references
from tests.chaos.slow_model import write_slow_model
from tests.integration.conftest import Mesh, running_mesh

REPORT = pytest.StashKey[list[Row]]()
TABLE_PATH = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def chaos_plan() -> Plan:
    return Plan.named(os.environ.get("MESHSERVE_CHAOS", "short"))


# Module scope: the mesh stops when the chaos tests are done, before the rest of the run.
@pytest.fixture(scope="module")
def chaos_mesh(tmp_path_factory, request) -> Mesh:
    data_dir = tmp_path_factory.mktemp("chaos") / "data"
    write_slow_model(data_dir / "models")
    request.config.stash[TABLE_PATH] = data_dir / "chaos-table.md"
    with running_mesh(data_dir, extra_args=("--compute-replicas=2",
                                                  "--batcher-replicas=2")) as started:
        yield started


@pytest.fixture(scope="module")
def chaos_references(chaos_mesh):
    return references(chaos_mesh.data_dir / "models")


@pytest.fixture(scope="session")
def chaos_report(request) -> list[Row]:
    return request.config.stash.setdefault(REPORT, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(REPORT, [])
    if not rows:
        return
    table = markdown_table(rows)
    path = config.stash.get(TABLE_PATH, None)
    if path is not None:
        path.write_text(table)
    terminalreporter.write_sep("=", "chaos suite")
    terminalreporter.write(table)
    if path is not None:
        terminalreporter.write_line(f"(written to {path})")
