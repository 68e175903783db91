"""The response cache's pure parts: keys, the byte-budgeted LRU, Redis errors as misses,
and the batcher's caching front."""

import hashlib
import json
import logging

import pytest

from meshserve.batcher.caching import CachingFront, VersionIdentity
from meshserve.common.errors import FailedPrecondition
from meshserve.common.response_cache import (
    LruCache,
    RedisCache,
    ResponseCache,
    artifact_digest,
    cache_key,
)
from meshserve.common.statistics import Statistics
from meshserve.protocol.groups_pb2 import GroupItem, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse


def request(data: bytes = b"\x00" * 8, shape=(1, 2), datatype="FP32", name="INPUT__0",
            outputs=(), request_id="") -> ModelInferRequest:
    r = ModelInferRequest(model_name="m", id=request_id)
    r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    r.raw_input_contents.append(data)
    for output in outputs:
        r.outputs.add(name=output)
    return r


BASE = ("m", "1", "sha256:aa", request())
DIFFERENT = [
    ("model", ("n", "1", "sha256:aa", request())),
    ("version", ("m", "2", "sha256:aa", request())),
    ("digest", ("m", "1", "sha256:bb", request())),
    ("input bytes", ("m", "1", "sha256:aa", request(data=b"\x01" + b"\x00" * 7))),
    ("shape", ("m", "1", "sha256:aa", request(shape=(2, 1)))),
    ("datatype", ("m", "1", "sha256:aa", request(datatype="INT32"))),
    ("input name", ("m", "1", "sha256:aa", request(name="INPUT__1"))),
    ("requested outputs", ("m", "1", "sha256:aa", request(outputs=["OUTPUT__0"]))),
    ("field boundaries", ("m1", "", "sha256:aa", request())),
]


@pytest.mark.parametrize("what, other", DIFFERENT, ids=[d[0] for d in DIFFERENT])
def test_keys_differ_when_anything_that_decides_the_response_differs(what, other):
    assert cache_key(*other) != cache_key(*BASE)


def test_keys_ignore_the_request_id_and_parameters():
    other = request(request_id="another")
    other.parameters["priority"].int64_param = 3
    assert cache_key("m", "1", "sha256:aa", other) == cache_key(*BASE)


def test_lru_evicts_the_least_recently_used_by_bytes():
    cache = LruCache(budget=3 * (1 + 10))  # three entries of a 1-byte key and 10-byte value
    for key in (b"a", b"b", b"c"):
        assert cache.put(key, key * 10)
    assert cache.get(b"a") == b"a" * 10  # a is now the most recently used
    assert cache.put(b"d", b"d" * 10)
    assert cache.get(b"b") is None  # b was the least recently used
    assert [cache.get(k) is not None for k in (b"a", b"c", b"d")] == [True, True, True]
    assert cache.used == 33


def test_a_big_entry_evicts_as_many_as_it_needs():
    cache = LruCache(budget=30)
    for key in (b"a", b"b", b"c"):
        cache.put(key, b"x" * 9)
    assert cache.put(b"z", b"y" * 19)  # 20 bytes: two of the 10-byte entries must go
    assert (cache.get(b"a"), cache.get(b"b")) == (None, None)
    assert cache.get(b"c") is not None and cache.used == 30


def test_replacing_a_key_counts_its_bytes_once():
    cache = LruCache(budget=100)
    cache.put(b"k", b"12345")
    cache.put(b"k", b"1")
    assert (len(cache), cache.used) == (1, 2)


def test_budget_holds_after_many_inserts_of_mixed_sizes():
    cache = LruCache(budget=10_000)
    for n in range(5_000):
        key = n.to_bytes(4, "little")
        cache.put(key, b"v" * (n * 7919 % 997))
        assert cache.used <= cache.budget
    assert cache.used == sum(len(k) + len(cache.get(k)) for k in list(cache._entries))
    assert 0 < len(cache) < 5_000


@pytest.mark.parametrize("budget, size, stored", [(100, 95, True), (100, 96, True),
                                                  (100, 97, False), (3, 0, False)])
def test_an_entry_larger_than_the_budget_is_never_stored(budget, size, stored):
    cache = LruCache(budget=budget)
    assert cache.put(b"keyy", b"v" * size) is stored  # a 4-byte key and `size` bytes
    assert (cache.get(b"keyy") is not None) is stored
    assert cache.used <= budget


class BrokenRedis:
    def __init__(self) -> None:
        self.calls = 0

    async def get(self, name):
        self.calls += 1
        raise ConnectionError("Connection refused")

    async def set(self, name, value, ex=None):
        self.calls += 1
        raise ConnectionError("Connection refused")


class DictRedis:
    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}

    async def get(self, name):
        return self.data.get(name, (None, 0))[0]

    async def set(self, name, value, ex=None):
        self.data[name] = (value, ex)


async def test_redis_errors_are_misses_and_logged_once(caplog):
    broken = BrokenRedis()
    cache = ResponseCache(LruCache(1000), RedisCache(broken, ttl_seconds=60))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert await cache.get(b"k") is None
            await cache.put(b"k", b"v")
            cache.local = LruCache(1000)  # forget locally so Redis is asked again
    assert broken.calls == 6 and cache.shared.errors == 6
    assert len([r for r in caplog.records if "Redis" in r.getMessage()]) == 1


async def test_shared_hits_fill_the_local_cache_and_carry_the_ttl():
    shared = DictRedis()
    writer = ResponseCache(LruCache(1000), RedisCache(shared, ttl_seconds=60))
    await writer.put(b"\x01\x02", b"response")
    [(name, (value, ttl))] = shared.data.items()
    assert (name, value, ttl) == ("meshserve:response:0102", b"response", 60)
    reader = ResponseCache(LruCache(1000), RedisCache(shared))
    assert await reader.get(b"\x01\x02") == b"response"
    assert reader.local.get(b"\x01\x02") == b"response"


def test_artifact_digest_is_the_file_hash_or_the_manifest_digest(tmp_path):
    artifact = tmp_path / "1" / "model.pt"
    artifact.parent.mkdir()
    artifact.write_bytes(b"weights")
    assert artifact_digest(artifact) == "sha256:" + hashlib.sha256(b"weights").hexdigest()
    (artifact.parent / "manifest.json").write_text(json.dumps({"digest": "sha256:feed"}))
    assert artifact_digest(artifact) == "sha256:feed"
    artifact.unlink()  # an encrypted version: model.pt.enc and the plaintext's digest
    assert artifact_digest(artifact) == "sha256:feed"
    (artifact.parent / "manifest.json").unlink()
    with pytest.raises(FailedPrecondition, match="no model file, and no manifest.json digest"):
        artifact_digest(artifact)


def answer(item: GroupItem) -> ItemResult:
    response = ModelInferResponse(model_name="m", model_version="1", id=item.request.id)
    response.raw_output_contents.append(bytes(reversed(item.request.raw_input_contents[0])))
    return ItemResult(response=response)


class Forward:
    def __init__(self, fail: bool = False) -> None:
        self.seen: list[str] = []
        self.fail = fail

    async def __call__(self, items):
        self.seen.extend(item.request.id for item in items)
        if self.fail:
            return [ItemResult(code=8, message="queue full") for _ in items]
        return [answer(item) for item in items]


def front() -> tuple[CachingFront, Statistics]:
    statistics = Statistics(name="m", version="1")
    ticks = iter(range(0, 10_000_000, 1000))
    return CachingFront(ResponseCache(LruCache(10_000)), VersionIdentity("m", "1", "sha256:aa"),
                        statistics, clock=lambda: next(ticks)), statistics


def item(data: bytes, request_id: str) -> GroupItem:
    return GroupItem(request=request(data=data, request_id=request_id))


async def test_front_answers_hits_without_forwarding_and_restores_the_id():
    cache, statistics = front()
    forward = Forward()
    [first] = await cache.infer([item(b"12345678", "a")], forward)
    results = await cache.infer([item(b"12345678", "b"), item(b"87654321", "c")], forward)
    assert forward.seen == ["a", "c"]  # "b" was a hit: never forwarded
    assert results[0].response.id == "b"
    assert results[0].response.raw_output_contents == first.response.raw_output_contents
    assert results[1].response.id == "c"
    assert (statistics.cache_hit.count, statistics.cache_miss.count) == (1, 2)
    assert statistics.success.count == 1  # the hit; forwarded ones are counted by the queue
    assert statistics.cache_hit.ns == 1000 and statistics.cache_miss.ns == 4000


async def test_front_never_caches_failures():
    cache, statistics = front()
    failing = Forward(fail=True)
    [result] = await cache.infer([item(b"12345678", "a")], failing)
    assert result.code == 8
    await cache.infer([item(b"12345678", "b")], failing)
    assert failing.seen == ["a", "b"] and statistics.cache_hit.count == 0


@pytest.mark.parametrize(("url", "ok"), [
    ("redis://cache:6379/0", True), ("unix:///run/redis.sock", True), ("redis://cache/0", True),
    ("redis://:secret@cache:6379/0", False), ("rediss://user:secret@cache/0", False),
])
def test_a_redis_url_may_not_carry_credentials(url, ok):
    import argparse

    from meshserve.batcher.service import redis_url

    if ok:
        assert redis_url(url) == url
    else:
        with pytest.raises(argparse.ArgumentTypeError,
                           match="must not hold a password; put it in MESHSERVE_BATCHER_"):
            redis_url(url)
