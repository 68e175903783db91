"""The router's reading of a group answered in parts (`InferGroupResult.items`)."""

from meshserve.protocol.groups_pb2 import InferGroupResult, ItemResult
from meshserve.router.service import place


def answer(items: list[int], codes: list[int]) -> InferGroupResult:
    return InferGroupResult(items=items, results=[ItemResult(code=c) for c in codes])


def test_parts_land_at_the_positions_they_answer():
    results = [None] * 4
    assert list(place(results, answer([2], [8]))) == [2]
    assert list(place(results, answer([], []))) == []  # answers nothing: the group has left
    assert list(place(results, answer([0, 3, 1], [0, 4, 0]))) == [0, 3, 1]
    assert [r.code for r in results] == [0, 0, 8, 4]


def test_an_answer_naming_no_positions_answers_the_whole_group_in_order():
    results = [None] * 3
    assert list(place(results, answer([], [0, 5, 0]))) == [0, 1, 2]
    assert [r.code for r in results] == [0, 5, 0]
