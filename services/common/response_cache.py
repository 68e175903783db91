"""The response cache: finished inference responses, keyed by what determines them.

A key is the sha256 of the model, its version, the version's artifact digest, every input's
name, datatype, shape and bytes, and the requested outputs: two requests share a key only
when the same model file computes the same outputs from the same inputs, so no response is
ever served across versions (or across a replaced artifact of the same version).

Values are serialized `ModelInferResponse` bytes, exactly as compute produced them.
`LruCache` keeps them in process within a byte budget; `RedisCache` shares them between
processes through Redis with a TTL. `ResponseCache` puts the two together: the local LRU is
asked first, the shared store next. No grpc import; the Redis client is handed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from meshserve.common.errors import FailedPrecondition
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024
DEFAULT_TTL_SECONDS = 3600
REDIS_PREFIX = "meshserve:response:"
MANIFEST = "manifest.json"


def _field(digest, data: bytes) -> None:
    """Length-prefixed, so that no two different field sequences hash alike."""
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def cache_key(model: str, version: str, artifact_digest: str,
              request: ModelInferRequest) -> bytes:
    """The key of `request`'s response on one model version with one artifact."""
    digest = hashlib.sha256()
    for text in (model, version, artifact_digest):
        _field(digest, text.encode())
    _field(digest, len(request.inputs).to_bytes(4, "little"))
    for tensor in request.inputs:
        _field(digest, tensor.name.encode())
        _field(digest, tensor.datatype.encode())
        _field(digest, b",".join(str(d).encode() for d in tensor.shape))
        # Typed contents (a client that sent no raw bytes); empty once the ingress converted.
        _field(digest, tensor.contents.SerializeToString(deterministic=True))
    _field(digest, len(request.raw_input_contents).to_bytes(4, "little"))
    for raw in request.raw_input_contents:
        _field(digest, raw)
    _field(digest, len(request.outputs).to_bytes(4, "little"))
    for wanted in request.outputs:
        _field(digest, wanted.SerializeToString(deterministic=True))
    return digest.digest()


def artifact_digest(artifact: Path) -> str:
    """`sha256:<hex>` identifying a version's model: the `digest` of the version directory's
    manifest.json when there is one (the plaintext's digest, so an encrypted `.enc`
    artifact needs no plain copy), else the sha256 of the artifact file itself."""
    manifest = artifact.parent / MANIFEST
    if manifest.is_file():
        try:
            declared = json.loads(manifest.read_text(encoding="utf-8")).get("digest")
        except (ValueError, AttributeError, UnicodeDecodeError):
            declared = None
        if isinstance(declared, str) and declared:
            return declared
    if not artifact.is_file():
        raise FailedPrecondition(f"{artifact}: no model file, and no manifest.json digest, "
                                 "to key the response cache by")
    digest = hashlib.sha256()
    with artifact.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class LruCache:
    """Least recently used first out, within `budget` bytes (keys and values counted).

    An entry larger than the whole budget is never stored."""

    def __init__(self, budget: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.used = 0
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> bool:
        """Store `value`, evicting the least recently used; False when it cannot fit."""
        size = len(key) + len(value)
        if size > self.budget:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= len(key) + len(old)
        while self.used + size > self.budget:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.used -= len(evicted_key) + len(evicted)
        self._entries[key] = value
        self.used += size
        return True


class SharedStore(Protocol):
    """What `RedisCache` needs of a client (redis.asyncio.Redis has it)."""

    async def get(self, name: str): ...

    async def set(self, name: str, value: bytes, ex: int | None = None): ...


class RedisCache:
    """Responses shared through Redis with a TTL. A Redis error is a miss (or a skipped
    insert), logged once until Redis answers again; it never fails a request."""

    def __init__(self, client: SharedStore, ttl_seconds: int = DEFAULT_TTL_SECONDS,
                 prefix: str = REDIS_PREFIX) -> None:
        self._client = client
        self._ttl = ttl_seconds
        self._prefix = prefix
        self._failing = False
        self.errors = 0

    def _name(self, key: bytes) -> str:
        return self._prefix + key.hex()

    async def get(self, key: bytes) -> bytes | None:
        try:
            value = await self._client.get(self._name(key))
        except Exception as error:  # noqa: BLE001 — any client failure degrades to a miss
            self._failed("get", error)
            return None
        self._failing = False
        return value

    async def put(self, key: bytes, value: bytes) -> None:
        try:
            await self._client.set(self._name(key), value, ex=self._ttl)
        except Exception as error:  # noqa: BLE001
            self._failed("set", error)
            return
        self._failing = False

    def _failed(self, operation: str, error: Exception) -> None:
        self.errors += 1
        if not self._failing:
            log.warning("response cache: Redis %s failed (%s); serving without the shared "
                        "cache until it answers again", operation, error)
        self._failing = True


class ResponseCache:
    """The local LRU first, then the shared store (whose hits are kept locally too)."""

    def __init__(self, local: LruCache, shared: RedisCache | None = None) -> None:
        self.local = local
        self.shared = shared

    async def get(self, key: bytes) -> bytes | None:
        value = self.local.get(key)
        if value is None and self.shared is not None:
            value = await self.shared.get(key)
            if value is not None:
                self.local.put(key, value)
        return value

    async def put(self, key: bytes, value: bytes) -> None:
        self.local.put(key, value)
        if self.shared is not None:
            await self.shared.put(key, value)
