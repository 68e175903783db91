"""The admin API's servicer: check the caller against the access policy (without one: reads
for every caller, changes for the operators; see `meshserve.mesh.admin_access`), convert,
delegate, convert."""

import asyncio
import json
import logging
from collections.abc import Callable

import grpc

from meshserve.common import artifacts
from meshserve.common.access import Policy
from meshserve.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from meshserve.common.identity import OPERATORS, IdentityCache, caller_identity, parse_callers
from meshserve.mesh import admin_access
from meshserve.mesh.canary import CanaryPlan
from meshserve.mesh.control import ControlPlane, start_policy
from meshserve.mesh.fetch import read_version
from meshserve.mesh.policy import Endpoint, Shadow, TrafficPolicy
from meshserve.mesh.readiness import Readiness
from meshserve.mesh.registry import Push, Registry
from meshserve.mesh.store_models import ModelVersion
from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol import admin_pb2_grpc

log = logging.getLogger(__name__)

STATUS_WINDOW_SECONDS = 3.0


# CanaryPlan's optional numbers in the request → the plan's fields.
CANARY_FIELDS = {"interval_seconds": "interval_s", "max_error_rate": "max_error_rate",
                 "max_latency_ratio": "max_latency_ratio", "min_requests": "min_requests"}


def model_version_to_proto(row: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(name=row.name, version=row.version, digest=row.digest,
                           signer=row.signer, manifest=row.manifest, pushed_by=row.pushed_by,
                           pushed_at=row.pushed_at)


def audit_entry_to_proto(e) -> pb.AuditEntry:
    return pb.AuditEntry(seq=e.seq, at=e.at, actor=e.actor, action=e.action, subject=e.subject,
                         before=e.before, after=e.after, reason=e.reason, hash=e.hash)


def policy_to_proto(policy: TrafficPolicy) -> pb.Policy:
    message = pb.Policy(model=policy.model, weights=policy.weights, region=policy.region)
    if policy.shadow is not None:
        message.shadow.version = policy.shadow.version
        message.shadow.percent = policy.shadow.percent
    return message


def policy_from_proto(message: pb.Policy) -> TrafficPolicy:
    shadow = (Shadow(message.shadow.version, message.shadow.percent)
              if message.shadow.version else None)
    return TrafficPolicy(message.model, dict(message.weights), shadow, message.region)


def endpoint_to_proto(endpoint: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(model=endpoint.model, version=endpoint.version, address=endpoint.address,
                       region=endpoint.region, zone=endpoint.zone)


def endpoint_from_proto(message: pb.Endpoint) -> Endpoint:
    if not (message.model and message.version.isdigit() and ":" in message.address):
        raise InvalidArgument("endpoint needs model, a numeric version and address HOST:PORT")
    return Endpoint(message.model, message.version, message.address,
                    message.region or "local", message.zone)


def canary_to_proto(record: dict | None, current: TrafficPolicy) -> pb.Canary:
    """The model's canary record (None: it never had one) with the model's `current`
    policy."""
    if not record:
        return pb.Canary()
    plan = record["plan"]
    message = pb.Canary(
        plan=pb.CanaryPlan(model=plan["model"], to_version=plan["canary"], steps=plan["steps"],
                           interval_seconds=plan["interval_s"],
                           max_error_rate=plan["max_error_rate"],
                           max_latency_ratio=plan["max_latency_ratio"],
                           min_requests=plan["min_requests"], from_version=plan["baseline"]),
        baseline=plan["baseline"], state=record["state"], weight=record["weight"],
        reason=record.get("reason", ""), updated_at=record.get("updated_at", ""),
        current=policy_to_proto(current),
        baseline_by_weight=record.get("baseline_by_weight", False))
    if "start_policy" in record or record["state"] == "running":  # else: not recorded
        message.restore.CopyFrom(policy_to_proto(start_policy(record, current)))
    return message


def fetched_to_proto(fetched) -> pb.FetchedModel:
    return pb.FetchedModel(name=fetched.name, version=fetched.version, artifact=fetched.artifact,
                           manifest=fetched.manifest, signature=fetched.signature,
                           digest=fetched.digest, filename=fetched.filename)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """`policy()` gives the current access policy (None: no `--policy`; every admitted caller
    may read, only `operators` (identity globs) may change anything, the services call their
    own RPCs); `count_denied(action)` counts refusals."""

    def __init__(self, control: ControlPlane, registry: Registry | None = None,
                 policy: Callable[[], Policy] | None = None,
                 count_denied: Callable[[str], None] | None = None,
                 readiness: Readiness | None = None,
                 operators: frozenset[str] = parse_callers(OPERATORS)) -> None:
        self._control = control
        self._readiness = readiness
        self._registry = registry
        self._policy = policy
        self._count_denied = count_denied
        self._operators = operators
        self._identities = IdentityCache()

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's identity from its certificate (recorded in the audit log)."""
        return caller_identity(context, self._identities)

    def _authorize(self, context, method: str, request) -> Callable[[str], bool]:
        """PERMISSION_DENIED (audited, counted) unless the caller may call `method`; returns
        which models the caller may see in a listing."""
        identity = self._caller(context)
        if self._policy is None:
            decision = admin_access.decide_without_policy(identity, method, request,
                                                          self._operators)
            if not decision.allowed:
                self._deny(identity, method, decision)
            return lambda model: True
        policy = self._policy()
        decision = admin_access.decide(policy, identity, method, request)
        if not decision.allowed:
            self._deny(identity, method, decision)
        if decision.filtered:
            return lambda model: admin_access.may_read(policy, identity, model)
        return lambda model: True

    def _deny(self, identity: str, method: str, decision: admin_access.Decision) -> None:
        reason = admin_access.denial_reason(method, decision)
        log.info("denied: principal=%s %s", identity, reason)
        if self._count_denied is not None:
            self._count_denied(decision.action)
        try:
            self._control.store.append_audit(identity, admin_access.DENIED_EVENT,
                                             decision.model, reason=reason)
        except Exception:  # noqa: BLE001 — auditing must not change the answer
            log.exception("could not record a denied admin call in the audit log")
        raise PermissionDenied(decision.refusal(identity))

    def _models(self) -> Registry:
        if self._registry is None:
            raise FailedPrecondition("this control plane keeps no model registry (start it "
                                     "with --model-repository)")
        return self._registry

    async def Status(self, request, context):
        visible = self._authorize(context, "Status", request)
        control = self._control
        policies = control.store.policies()
        if request.model and request.model not in policies:
            raise NotFound(f"no traffic policy for model '{request.model}'")
        response = pb.StatusResponse(snapshot_version=control.cache.snapshot.version)
        endpoints = control.store.endpoints()
        for model in sorted(policies):
            if (request.model and model != request.model) or not visible(model):
                continue
            policy = policies[model]
            status = response.models.add(
                policy=policy_to_proto(policy),
                canary=canary_to_proto(control.store.canary(model), policy))
            for version in policy.versions:
                live = control.window(model, version, STATUS_WINDOW_SECONDS)
                compared, differing, largest = control.shadow_counts.get(
                    (model, version), (0, 0, 0.0))
                status.versions.add(
                    shadow=pb.ShadowReport(model=model, version=version, compared=compared,
                                           differing=differing, max_abs_diff=largest),
                    version=version, weight=policy.weights[version],
                    requests_per_second=live.rate, error_rate=live.error_rate,
                    p50_ms=live.percentile(50) or 0.0, p99_ms=live.percentile(99) or 0.0,
                    endpoints=[endpoint_to_proto(e) for e in endpoints
                               if (e.model, e.version) == (model, version)])
        return response

    async def SetPolicy(self, request, context):
        self._authorize(context, "SetPolicy", request)
        policy = policy_from_proto(request.policy)
        expected = (policy_from_proto(request.expected) if request.HasField("expected")
                    else None)
        return policy_to_proto(self._control.set_policy(
            policy, self._caller(context), request.reason, expected=expected,
            force=request.force))

    async def Pin(self, request, context):
        self._authorize(context, "Pin", request)
        return policy_to_proto(self._control.pin(request.model, request.version,
                                                 self._caller(context), request.reason))

    async def Rollback(self, request, context):
        self._authorize(context, "Rollback", request)
        return policy_to_proto(self._control.rollback(request.model, self._caller(context),
                                                      request.reason))

    async def RegisterEndpoint(self, request, context):
        self._authorize(context, "RegisterEndpoint", request)
        self._control.register(endpoint_from_proto(request), self._caller(context))
        return request

    async def RemoveEndpoint(self, request, context):
        self._authorize(context, "RemoveEndpoint", request)
        self._control.unregister(endpoint_from_proto(request), self._caller(context))
        return request

    async def StartCanary(self, request, context):
        self._authorize(context, "StartCanary", request)
        plan = CanaryPlan(
            model=request.model, baseline=request.from_version, canary=request.to_version,
            steps=tuple(request.steps) or CanaryPlan.steps,
            **{name: getattr(request, field) for field, name in CANARY_FIELDS.items()
               if request.HasField(field)})  # unset: CanaryPlan's default; set: as given
        return self._canary(request.model,
                            self._control.start_canary(plan, self._caller(context)))

    async def GetCanary(self, request, context):
        self._authorize(context, "GetCanary", request)
        return self._canary(request.model, self._control.store.canary(request.model))

    async def AbortCanary(self, request, context):
        self._authorize(context, "AbortCanary", request)
        return self._canary(request.model,
                            self._control.abort_canary(request.model, self._caller(context)))

    def _canary(self, model: str, record: dict | None) -> pb.Canary:
        return canary_to_proto(record, self._control.policy(model))

    async def WatchReadiness(self, request, context):
        """The readiness table of the versions the caller may read, again at each change."""
        visible = self._authorize(context, "WatchReadiness", request)
        if self._readiness is None:
            raise FailedPrecondition("this control plane does not follow batchers' health")
        await self._readiness.known()
        last = None
        while True:
            changed = self._readiness.changes.event
            now = [v for v in self._readiness.table() if visible(v.model)]
            if now != last:
                last = now
                yield pb.Readiness(versions=[
                    pb.VersionReadiness(model=v.model, version=v.version, weight=v.weight,
                                        ready=v.ready, reason=v.reason) for v in now])
            await changed.wait()

    async def ReportShadow(self, request, context):
        self._authorize(context, "ReportShadow", request)
        self._control.record_shadow(request.model, request.version, request.compared,
                                    request.differing, request.max_abs_diff)
        return request

    async def Audit(self, request, context):
        self._authorize(context, "Audit", request)
        store = self._control.store
        if request.limit < 0:
            raise InvalidArgument(f"limit must be 0 (every entry) or more, not {request.limit}")
        if request.after_seq:
            entries = store.audit(limit=request.limit or None, after_seq=request.after_seq)
        else:
            entries = store.audit()
            if request.limit:  # the newest `limit`; 0 (unset) is every entry
                entries = entries[max(len(entries) - request.limit, 0):]
        response = pb.AuditResponse(entries=[audit_entry_to_proto(e) for e in entries])
        if request.verify:
            response.problems.extend(store.verify_audit(anchor=request.anchor or None))
        return response

    async def PushModel(self, request, context):
        self._authorize(context, "PushModel", request)
        push = Push(request.name, request.version, request.artifact, request.source,
                    request.notes, request.encrypt, request.config)
        return model_version_to_proto(self._models().push(push, self._caller(context)))

    async def ListModels(self, request, context):
        visible = self._authorize(context, "ListModels", request)
        return pb.ListModelsResponse(versions=[
            model_version_to_proto(row) for row in self._models().versions(request.name)
            if visible(row.name)])

    async def FetchModel(self, request, context):
        self._authorize(context, "FetchModel", request)
        fetched = await asyncio.to_thread(read_version, self._models().repository,
                                          request.name, request.version)
        stored = artifacts.sha256_digest(fetched.artifact)
        self._control.store.append_audit(
            self._caller(context), "model.fetch", f"{fetched.name}/{fetched.version}",
            after=json.dumps({"digest": fetched.digest, "stored": stored,
                              "encrypted": fetched.encrypted}, sort_keys=True))
        return fetched_to_proto(fetched)

    async def ShowModel(self, request, context):
        self._authorize(context, "ShowModel", request)
        return model_version_to_proto(self._models().show(request.name, request.version))

    async def RecordEvent(self, request, context):
        self._authorize(context, "RecordEvent", request)
        identity = self._caller(context)
        if not request.action:
            raise InvalidArgument("action is empty")
        return audit_entry_to_proto(self._control.store.append_audit(
            identity, request.action, request.subject, after=request.details,
            reason=request.reason))
