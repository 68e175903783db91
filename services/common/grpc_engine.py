"""The I/O engine of meshserve's gRPC channels (each hop's client side; the services' servers are
meshserve's own, meshserve.common.http2_server): gRPC's polling thread reads the sockets.

By default grpcio 1.85 reads and writes sockets on its EventEngine's threads and hands each
finished operation to the thread that polls the completion queue, which then wakes the
asyncio loop: two hand-offs between threads for every message. With the EventEngine's
endpoints turned off (three of gRPC's own experiment switches), its I/O manager (epoll1)
reads the sockets on the polling thread itself and writes them from the thread that sends:
one hand-off fewer per message, and the same gRPC, TLS and HTTP/2 otherwise. Every service
started by `meshserve <service>` runs so, and so do the reference servers the benchmarks
measure against (`meshserve bench budget`'s bare server, `meshserve bench relay`), so that a
bare call stays the services' own floor.

gRPC reads `GRPC_EXPERIMENTS` once, when it is imported: `use()` must run before that. An
operator's own `GRPC_EXPERIMENTS` wins (set it to "" for gRPC's default engine).
"""

import os
from collections.abc import MutableMapping

POLLING_THREAD_IO = ("-event_engine_client,-event_engine_listener,"
                     "-event_engine_for_all_other_endpoints")


def use(environ: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Choose the engine in `environ` (this process's, or a child's), unless it says
    otherwise already; returns `environ`."""
    environ.setdefault("GRPC_EXPERIMENTS", POLLING_THREAD_IO)
    return environ
