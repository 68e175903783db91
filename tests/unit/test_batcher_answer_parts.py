"""A group's answers in as many messages as the services' message limit takes: answers that
fit one message each may not fit together (two batches of one group finishing at once)."""

from meshserve.batcher.service import last_answer, tell
from meshserve.common.validation import MAX_MESSAGE
from meshserve.protocol.groups_pb2 import InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse

BIG = 24 << 20  # three are past one message, two are not


def result(tag: int, size: int) -> ItemResult:
    response = ModelInferResponse(id=str(tag))
    response.raw_output_contents.append(bytes([tag]) * size)
    return ItemResult(response=response)


class Early:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def __call__(self, message: bytes) -> None:
        self.sent.append(message)


def items_of(message: bytes) -> list[tuple[int, str]]:
    answer = InferGroupResult.FromString(message)
    return [(item, r.response.id) for item, r in zip(answer.items, answer.results, strict=True)]


async def test_an_early_answer_past_the_limit_goes_in_parts_each_within_it():
    results = [result(i, BIG) for i in range(4)]
    early = Early()
    await tell(results, [0, 1, 2, 3], early)
    assert all(len(message) <= MAX_MESSAGE for message in early.sent)
    assert [items_of(m) for m in early.sent] == [[(0, "0"), (1, "1")], [(2, "2"), (3, "3")]]


async def test_small_answers_go_in_one_message():
    results = [result(i, 100) for i in range(5)]
    early = Early()
    await tell(results, [4, 1], early)
    assert [items_of(m) for m in early.sent] == [[(4, "4"), (1, "1")]]
    assert items_of(await last_answer(results, [0, 2, 3], early)) == [
        (0, "0"), (2, "2"), (3, "3")]
    assert len(early.sent) == 1


async def test_a_last_answer_past_the_limit_sends_its_first_part_early():
    results = [result(i, BIG) for i in range(5)]
    early = Early()
    last = await last_answer(results, [0, 1, 2, 3, 4], early)
    assert [items_of(m) for m in early.sent] == [[(0, "0"), (1, "1")], [(2, "2")]]
    assert items_of(last) == [(3, "3"), (4, "4")]
    assert all(len(m) <= MAX_MESSAGE for m in [*early.sent, last])
