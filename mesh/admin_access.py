"""Who may call which admin RPC: the access policy at the control plane's admin API.

Every admin RPC is one action on one model (`RPC_ACTIONS`); the caller's certificate
identity is the principal and the ingress's policy file (`meshserve.common.access`) decides.
Calls about the whole mesh (`Audit`) are checked against the model `*`, so only a rule
with `models: ["*"]` allows them; a listing of every model (`Status`, `ListModels` with no
model) is not refused but shows only the models the caller may read.

The mesh's own services are not principals of the policy: they keep, by identity, exactly
the RPCs they call (`SERVICE_RPCS`: the router reads the status and reports shadow
comparisons; the ingress records events and follows versions' readiness) and nothing else.
`RecordEvent` keeps its own rule (the ingress and operators' `client/*` certificates) and
is not a policy action.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshserve.common.access import Policy

EVERY_MODEL = "*"
DENIED_EVENT = "request.denied"


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
    "WatchReadiness": Guard("models:read", None, lists=True),
}
# Not a policy action: RecordEvent admits the ingress and operators (mesh/admin.py).
OWN_RULE = frozenset({"RecordEvent"})

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

    def refusal(self, principal: str) -> str:
        return f"'{principal}' may not {self.action} model '{self.model}'"


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
        return Decision(method in OWN_RULE, method, EVERY_MODEL)
    model = target_model(method, request)
    if principal in SERVICE_RPCS:
        return Decision(method in SERVICE_RPCS[principal], guard.action, model or EVERY_MODEL)
    if guard.lists and not model:
        return Decision(True, guard.action, EVERY_MODEL, filtered=True)
    return Decision(policy.allowed(principal, (), None, guard.action, model), guard.action,
                    model)


def may_read(policy: Policy, principal: str, model: str) -> bool:
    """For listings: whether `principal` sees `model` (services see every model)."""
    if principal in SERVICE_RPCS:
        return True
    return policy.allowed(principal, (), None, "models:read", model)


def denial_reason(method: str, decision: Decision) -> str:
    """What the audit log keeps of a refused admin call."""
    return f"permission_denied: {decision.action} on {decision.model} ({method})"
