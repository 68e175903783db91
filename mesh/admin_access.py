"""Who may call which admin RPC: the access policy at the control plane's admin API.

Every admin RPC is one action on one model (`RPC_ACTIONS`); the caller's certificate
identity is the principal and the ingress's policy file (`meshserve.common.access`) decides.
Calls about the whole mesh (`Audit`) are checked against the model `*`, so only a rule
with `models: ["*"]` allows them; a listing of every model (`Status`, `ListModels` with no
model) is not refused but shows only the models the caller may read.

The mesh's own services are not principals of the policy: they keep, by identity, exactly
the RPCs they call (`SERVICE_RPCS`: the router reads the status and reports shadow
comparisons; the ingress records events and follows versions' readiness) and nothing else.
Writing an event into the audit log (`RecordEvent`) is `audit:write` on the model `*`.

Without a policy (`decide_without_policy`) the least is allowed: every client certificate
the control plane admits may read (`OPEN_ACTIONS`: status, canaries, the registry's
listings), every other RPC (pushes, fetches, traffic and canary changes, endpoints, the
audit log, recording events) takes an operator's certificate (`identity.OPERATORS`), and
the services keep exactly their RPCs, as under a policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from meshserve.common.access import Policy

EVERY_MODEL = "*"
DENIED_EVENT = "request.denied"
# Without a policy: the actions every admitted client certificate may take.
OPEN_ACTIONS = frozenset({"models:read"})


@dataclass(frozen=True)
class Guard:
    """An RPC's action, and which request field names its model (None: the whole mesh)."""

    action: str
    model_field: str | None = "model"
    lists: bool = False  # an empty model field means "every model": filtered, not refused


def _field(path: str) -> Callable[[object], str]:
    def read(request: object) -> str:
        value = request
        for name in path.split("."):
            value = getattr(value, name)
        return str(value)
    return read


RPC_ACTIONS: dict[str, Guard] = {
    "Status": Guard("models:read", lists=True),
    "GetCanary": Guard("models:read"),
    "ListModels": Guard("models:read", "name", lists=True),
    "ShowModel": Guard("models:read", "name"),
    "FetchModel": Guard("models:fetch", "name"),
    "PushModel": Guard("models:write", "name"),
    "SetPolicy": Guard("traffic:write", "policy.model"),
    "Pin": Guard("traffic:write"),
    "Rollback": Guard("traffic:write"),
    "StartCanary": Guard("traffic:write"),
    "AbortCanary": Guard("traffic:write"),
    "RegisterEndpoint": Guard("traffic:write"),
    "RemoveEndpoint": Guard("traffic:write"),
    "ReportShadow": Guard("traffic:write"),
    "Audit": Guard("audit:read", None),
    "RecordEvent": Guard("audit:write", None),
    "WatchReadiness": Guard("models:read", None, lists=True),
}

# The mesh's services, admitted by identity to exactly the RPCs they call.
SERVICE_RPCS: dict[str, frozenset[str]] = {
    "router": frozenset({"Status", "ReportShadow"}),
    "ingress": frozenset({"RecordEvent", "WatchReadiness"}),
    "batcher": frozenset(),
    "compute": frozenset(),
    "control-plane": frozenset(),
}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    action: str
    model: str
    # The whole answer is limited to models the caller may read (a listing).
    filtered: bool = False
    # What the caller lacks, told in the refusal (without a policy: an operator's certificate).
    needs: str = ""

    def refusal(self, principal: str) -> str:
        refused = f"'{principal}' may not {self.action} model '{self.model}'"
        return f"{refused}: {self.needs}" if self.needs else refused


def guard_of(method: str) -> Guard:
    """The guard of an admin RPC; KeyError for an RPC without one (refused)."""
    return RPC_ACTIONS[method]


def target_model(method: str, request: object) -> str:
    guard = guard_of(method)
    if guard.model_field is None:
        return EVERY_MODEL
    return _field(guard.model_field)(request)


def decide(policy: Policy, principal: str, method: str, request: object) -> Decision:
    """May `principal` (a certificate identity) call `method` with `request`?"""
    guard = RPC_ACTIONS.get(method)
    if guard is None:
        return Decision(False, method, EVERY_MODEL)
    model = target_model(method, request)
    if principal in SERVICE_RPCS:
        return Decision(method in SERVICE_RPCS[principal], guard.action, model or EVERY_MODEL)
    if guard.lists and not model:
        return Decision(True, guard.action, EVERY_MODEL, filtered=True)
    return Decision(policy.allowed(principal, (), None, guard.action, model), guard.action,
                    model)


def decide_without_policy(principal: str, method: str, request: object,
                          operators: frozenset[str]) -> Decision:
    """May `principal` call `method` on a control plane without an access policy? Reads
    (OPEN_ACTIONS) for every caller, everything for `operators` (globs), and the services'
    own RPCs for each service."""
    guard = RPC_ACTIONS.get(method)
    if guard is None:
        return Decision(False, method, EVERY_MODEL)
    model = target_model(method, request) or EVERY_MODEL
    if principal in SERVICE_RPCS:
        return Decision(method in SERVICE_RPCS[principal], guard.action, model)
    if guard.action in OPEN_ACTIONS or is_operator(principal, operators):
        return Decision(True, guard.action, model)
    return Decision(False, guard.action, model, needs=operator_needed(operators))


def is_operator(principal: str, operators: frozenset[str]) -> bool:
    return any(fnmatchcase(principal, pattern) for pattern in operators)


def operator_needed(operators: frozenset[str]) -> str:
    """What a refusal without a policy says the caller lacks."""
    return (f"without an access policy (--policy) that takes an operator's certificate "
            f"({', '.join(sorted(operators))})")


def may_read(policy: Policy, principal: str, model: str) -> bool:
    """For listings: whether `principal` sees `model` (services see every model)."""
    if principal in SERVICE_RPCS:
        return True
    return policy.allowed(principal, (), None, "models:read", model)


def denial_reason(method: str, decision: Decision) -> str:
    """What the audit log keeps of a refused admin call."""
    return f"permission_denied: {decision.action} on {decision.model} ({method})"
