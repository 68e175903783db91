"""`meshserve audit tail -n N` and the admin API's Audit limit: N newest entries, none for 0,
and a negative count refused on both sides."""

import asyncio

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.mesh.admin import AdminServicer
from meshserve.mesh.control import ControlPlane
from meshserve.mesh.store import Store
from meshserve.protocol import admin_pb2 as pb
from meshserve.tools.audit import print_tail
from meshserve.tools.cli import main
from tests.peers import Peer

ENTRIES = 5


@pytest.fixture
def admin(tmp_path):
    """The real servicer over a store of ENTRIES events, called the way a stub is."""
    store = Store.open(tmp_path / "mesh.db")
    for seq in range(1, ENTRIES + 1):
        store.append_audit("client/developer", "token.issue", f"app/{seq}")
    servicer = AdminServicer(ControlPlane(store))

    class Stub:
        async def Audit(self, request):  # noqa: N802 — the RPC's name
            return await servicer.Audit(request, Peer())

    yield Stub()
    store.close()


def tail(admin, n: int) -> list[str]:
    lines: list[str] = []
    asyncio.run(print_tail(admin, n, follow=False, out=lines.append))
    return [line.split()[0] for line in lines]  # the seqs


@pytest.mark.parametrize(("n", "seqs"), [
    (0, []), (1, ["5"]), (3, ["3", "4", "5"]), (ENTRIES, ["1", "2", "3", "4", "5"]),
    (20, ["1", "2", "3", "4", "5"]), (2**40, ["1", "2", "3", "4", "5"]),
])
def test_tail_prints_the_newest_n_and_nothing_for_0(admin, n, seqs):
    assert tail(admin, n) == seqs


@pytest.mark.parametrize("n", ["-3", "-1", "x", "1.5"])
def test_tail_refuses_a_count_that_is_not_a_whole_number_of_at_least_0(n, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["audit", "tail", "-n", n])
    assert stopped.value.code == 2
    assert f"argument -n: must be a whole number of at least 0, not '{n}'" in \
        capsys.readouterr().err


@pytest.mark.parametrize(("limit", "after_seq"), [(-3, 0), (-1, 2)])
def test_the_server_refuses_a_negative_limit(admin, limit, after_seq):
    with pytest.raises(InvalidArgument, match=f"limit must be 0 .* not {limit}$"):
        asyncio.run(admin.Audit(pb.AuditRequest(limit=limit, after_seq=after_seq)))


@pytest.mark.parametrize(("limit", "count"), [(0, ENTRIES), (2, 2), (ENTRIES + 3, ENTRIES)])
def test_the_server_limit_counts_the_newest_and_0_is_every_entry(admin, limit, count):
    entries = asyncio.run(admin.Audit(pb.AuditRequest(limit=limit))).entries
    assert [e.seq for e in entries] == list(range(ENTRIES - count + 1, ENTRIES + 1))
