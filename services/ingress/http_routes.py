"""The paths of the Open Inference Protocol's HTTP binding (as Triton serves it), plus the
asynchronous API's submit, fetch and cancel. Pure: a path to the route it names, or None.

    GET  /v2                                        server metadata
    GET  /v2/health/live | /v2/health/ready         health (200, or 400 when not ready)
    GET  /v2/models/M[/versions/V]                  model metadata
    GET  /v2/models/M[/versions/V]/ready            model readiness (200 or 400)
    GET  /v2/models/M[/versions/V]/config           model configuration
    GET  /v2/models[/M[/versions/V]]/stats          statistics
    POST /v2/models/M[/versions/V]/infer            inference
    POST /v2/repository/index                       the repository index
    POST /v2/models/M[/versions/V]/infer/async      submit an asynchronous request
    GET  /v2/async/ID                               its state, or its result
    POST /v2/async/ID/cancel                        give it up
    GET | POST /v2/logging                          the log settings: read, or change
    GET | POST /v2[/models/M]/trace/setting         the trace settings: read, or change

The paths of Triton's extensions that are not served (model load and unload, shared memory)
are routes too, whatever their method: each says which extension it belongs to, for an
answer of 501 that names it (as gRPC answers their methods UNIMPLEMENTED), where any other
unknown path is 404.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True)
class Route:
    name: str
    method: str  # the method the route takes (or methods, apart by spaces)
    model: str = ""
    version: str = ""
    id: str = ""
    unserved: str = ""  # why a path of Triton's is not served ("": it is)


FIXED = {
    ("v2",): Route("server_metadata", "GET"),
    ("v2", "health", "live"): Route("live", "GET"),
    ("v2", "health", "ready"): Route("ready", "GET"),
    ("v2", "models", "stats"): Route("statistics", "GET"),
    ("v2", "repository", "index"): Route("repository_index", "POST"),
    ("v2", "logging"): Route("log_settings", "GET POST"),
    ("v2", "trace", "setting"): Route("trace_settings", "GET POST"),
}
SHARED_MEMORY = ("is not served: the mesh's services run on other hosts than the client, so "
                 "tensors travel in the request and the answer")
UNSERVED = {  # the leading parts of a path of Triton's, and why it is not served
    ("v2", "repository", "models"): "model load and unload (Triton's model_repository "
                                    "extension) are not served",
    ("v2", "systemsharedmemory"): f"system shared memory (Triton's system_shared_memory "
                                  f"extension) {SHARED_MEMORY}",
    ("v2", "cudasharedmemory"): f"CUDA shared memory (Triton's cuda_shared_memory extension) "
                                f"{SHARED_MEMORY}",
}
MODEL_TAILS = {
    (): ("model_metadata", "GET"),
    ("ready",): ("model_ready", "GET"),
    ("config",): ("model_config", "GET"),
    ("stats",): ("statistics", "GET"),
    ("infer",): ("infer", "POST"),
    ("infer", "async"): ("submit", "POST"),
    ("generate",): ("generate", "POST"),
    ("generate_stream",): ("generate_stream", "POST"),
}


def route(path: str) -> Route | None:
    parts = tuple(unquote(part) for part in path.strip("/").split("/"))
    fixed = FIXED.get(parts)
    if fixed is not None:
        return fixed
    if len(parts) == 3 and parts[:2] == ("v2", "async") and parts[2]:
        return Route("result", "GET", id=parts[2])
    if len(parts) == 4 and parts[:2] == ("v2", "async") and parts[2] and parts[3] == "cancel":
        return Route("cancel", "POST", id=parts[2])
    unserved = UNSERVED.get(parts[:3]) or UNSERVED.get(parts[:2])
    if unserved:
        return Route("unserved", "", unserved=unserved)
    if len(parts) < 3 or parts[:2] != ("v2", "models") or not parts[2]:
        return None
    model, tail, version = parts[2], parts[3:], ""
    if tail[:1] == ("versions",):
        if len(tail) < 2 or not tail[1]:
            return None
        version, tail = tail[1], tail[2:]
    if tail == ("trace", "setting"):  # a model's, for all its versions
        return None if version else Route("trace_settings", "GET POST", model=model)
    found = MODEL_TAILS.get(tail)
    if found is None:
        return None
    name, method = found
    return Route(name, method, model=model, version=version)
