"""`meshserve traffic …` and `meshserve canary …`: the SRE's view of the mesh.

Talks to the control plane's admin API over mutual TLS with the operator's certificate (by
default the development client certificate of `meshserve up`).
"""

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable

import grpc

from meshserve.common.errors import InvalidArgument, ServingError
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.mesh.canary import parse_duration, parse_steps
from meshserve.mesh.policy import TrafficPolicy, check_region, parse_weights
from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools.connection import add_connection_flags


def control_plane_address(args: argparse.Namespace) -> str:
    if args.control_plane:
        return args.control_plane
    port_file = args.data_dir / "run" / "control-plane.port"
    if not port_file.exists():
        raise SystemExit(f"no control plane known: start `meshserve up --data-dir "
                         f"{args.data_dir}` or pass --control-plane HOST:PORT")
    return f"127.0.0.1:{port_file.read_text().strip()}"


def admin_channel(address: str, tls: TlsFiles) -> grpc.aio.Channel:
    return secure_channel(address, tls, "control-plane")


def operator_tls(args: argparse.Namespace) -> TlsFiles:
    tls_dir = args.data_dir / "tls"
    return TlsFiles(cert=args.cert or tls_dir / "client.crt",
                    key=args.key or tls_dir / "client.key", ca=args.ca or tls_dir / "ca.crt")


def format_status(response: pb.StatusResponse) -> str:
    lines = []
    for model in response.models:
        policy = model.policy
        extras = []
        if policy.region:
            extras.append(f"region {policy.region} only")
        if policy.shadow.version:
            extras.append(f"shadow {policy.shadow.percent:g}% to {policy.shadow.version}")
        canary = model.canary
        if canary.state:  # the running canary, or the last one, which has ended
            last = "" if canary.state == "running" else "last "
            extras.append(f"{last}canary {canary.baseline} → {canary.plan.to_version} "
                          f"{canary.state} at {canary.weight}%")
        if canary.state == "running" and canary.restore.model:
            extras.append(f"a rollback restores {policy_text(canary.restore)}")
        lines.append(f"{policy.model}" + (f"  ({', '.join(extras)})" if extras else ""))
        lines.append(f"  {'version':<8} {'weight':>6} {'req/s':>8} {'errors':>7} "
                     f"{'p50 ms':>7} {'p99 ms':>7}  endpoints")
        for v in model.versions:
            where = ", ".join(e.address for e in v.endpoints) or "-"
            lines.append(f"  {v.version:<8} {v.weight:>5}% {v.requests_per_second:>8.1f} "
                         f"{v.error_rate:>6.1%} {v.p50_ms:>7.1f} {v.p99_ms:>7.1f}  {where}")
            if v.shadow.compared and v.version == policy.shadow.version:
                lines.append(f"  {'':<8} shadow: {v.shadow.differing} of {v.shadow.compared} "
                             f"answers differ from the primary (max abs diff "
                             f"{v.shadow.max_abs_diff:.3g})")
    lines.append(f"snapshot {response.snapshot_version}")
    return "\n".join(lines)


# How `canary status` labels the policy the canary started from, by state.
START_POLICY_LABELS = {"running": "rollback restores", "promoted": "before the canary"}


def format_canary(canary: pb.Canary) -> str:
    if not canary.state:
        return "no canary"
    plan = canary.plan
    steps = ",".join(str(s) for s in plan.steps)
    lines = [f"canary of {plan.model}: {canary.baseline} → {plan.to_version}, {canary.state}, "
             f"weight {canary.weight}% (steps {steps}, every {plan.interval_seconds:g}s, "
             f"max error rate {plan.max_error_rate:g}, max latency ratio "
             f"{plan.max_latency_ratio:g})"]
    if canary.baseline_by_weight:
        lines.append(f"  baseline {canary.baseline}: the version with the most weight "
                     "(--from VERSION names another)")
    if plan.steps and plan.steps[-1] < 100:
        lines.append(f"  steps end at {plan.steps[-1]}%: what {canary.baseline} and "
                     f"{plan.to_version} carried together when it started")
    lines.append(f"  {'weights now':<18} {weights_text(canary.current)}")
    if canary.restore.model:
        label = START_POLICY_LABELS.get(canary.state, "restored")
        lines.append(f"  {label:<18} {policy_text(canary.restore)}")
    lines.append(f"  {canary.updated_at} {canary.reason}")
    return "\n".join(lines)


# How often `set`, `shadow` and `region` read the policy again when another change landed
# between their read and their write (SetPolicy refused with ABORTED).
CONFLICT_TRIES = 5


async def current_policy(admin: AdminStub, model: str) -> pb.Policy:
    return (await admin.Status(pb.StatusRequest(model=model))).models[0].policy


async def change(admin: AdminStub, args: argparse.Namespace,
                 compute: Callable[[pb.Policy], pb.Policy], force: bool = False) -> str:
    """Send the policy `compute` makes of the model's current one, on condition that the
    current one is still that (optimistic concurrency): on a conflict, read it again and
    recompute, up to CONFLICT_TRIES times, then report the conflict."""
    for attempt in range(1, CONFLICT_TRIES + 1):
        current = await current_policy(admin, args.model)
        policy = compute(current)
        if policy == current:
            return f"{args.model} unchanged: {policy_text(current)}"
        try:
            reply = await admin.SetPolicy(pb.SetPolicyRequest(
                policy=policy, reason=args.reason, expected=current, force=force))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ABORTED or attempt == CONFLICT_TRIES:
                raise
            continue
        return f"{args.model}: {policy_text(reply)}"
    raise AssertionError("unreachable")


def with_weights(args: argparse.Namespace, weights: dict[str, int]):
    def compute(current: pb.Policy) -> pb.Policy:
        # As `pin`, a version the model has: a typo must not send its traffic nowhere (a
        # policy that names versions ahead of their rollout is SetPolicy's, in the API).
        TrafficPolicy(args.model, dict(current.weights)).refuse_unknown(weights)
        policy = pb.Policy()
        policy.CopyFrom(current)
        for version in current.weights:
            policy.weights[version] = weights.get(version, 0)
        return policy
    return compute


def with_shadow(args: argparse.Namespace):
    def compute(current: pb.Policy) -> pb.Policy:
        policy = pb.Policy()
        policy.CopyFrom(current)
        policy.ClearField("shadow")
        if not args.off:
            policy.shadow.version, policy.shadow.percent = args.version, args.percent
        return policy
    return compute


def with_region(args: argparse.Namespace):
    def compute(current: pb.Policy) -> pb.Policy:
        policy = pb.Policy()
        policy.CopyFrom(current)
        policy.region = "" if args.off else args.region
        return policy
    return compute


def check_args(args: argparse.Namespace) -> None:
    """InvalidArgument for what the command line got wrong, before any connection."""
    command = args.action
    if command == "set":
        args.parsed_weights = parse_weights(args.weights)
    elif command == "shadow":
        if args.off and args.version:
            raise InvalidArgument(f"--off turns shadowing off: name no version (got "
                                  f"'{args.version}')")
        if not args.off and not args.version:
            raise InvalidArgument("name the version to mirror to (traffic shadow MODEL "
                                  "VERSION [--percent P]), or turn shadowing off with --off")
    elif command == "region":
        if args.off and args.region:
            raise InvalidArgument(f"--off lifts the region: name none (got '{args.region}')")
        if not args.off:
            if not args.region:
                raise InvalidArgument("name the region (traffic region MODEL REGION), or "
                                      "lift it with --off")
            check_region(args.region)
    elif command == "render":
        from meshserve.mesh.istio import check_cluster_domain

        check_cluster_domain(args.cluster_domain, "--cluster-domain")
    elif command == "canary-start":
        args.parsed_steps = parse_steps(args.steps)
        args.interval_seconds = parse_duration(args.interval)


async def call(args: argparse.Namespace) -> str:
    async with admin_channel(control_plane_address(args), operator_tls(args)) as channel:
        admin = AdminStub(channel)
        command = args.action
        if command == "status":
            return format_status(await admin.Status(pb.StatusRequest(model=args.model or "")))
        if command == "set":
            return await change(admin, args, with_weights(args, args.parsed_weights))
        if command == "pin":  # the same pin again records nothing (the control plane skips it)
            reply = await admin.Pin(pb.PinRequest(model=args.model, version=args.version,
                                                  reason=args.reason))
            return f"{args.model}: " + policy_text(reply)
        if command == "rollback":
            reply = await admin.Rollback(pb.RollbackRequest(model=args.model,
                                                            reason=args.reason))
            return f"{args.model} rolled back to: " + policy_text(reply)
        if command == "shadow":
            return await change(admin, args, with_shadow(args))
        if command == "region":
            return await change(admin, args, with_region(args), force=args.force)
        if command == "render":  # the control plane's own code: imported for this alone
            from meshserve.mesh.admin import policy_from_proto
            from meshserve.mesh.istio import check_namespace, render, to_yaml

            check_namespace(args.namespace)
            status = await admin.Status(pb.StatusRequest(model=args.model))
            policy = policy_from_proto(status.models[0].policy)
            return to_yaml(render(policy, host=args.host or "", namespace=args.namespace,
                                  port=args.port, release=args.release,
                                  cluster_domain=args.cluster_domain)).rstrip()
        if command == "canary-start":
            reply = await admin.StartCanary(pb.CanaryPlan(
                model=args.model, to_version=args.to, from_version=args.from_version,
                steps=args.parsed_steps, interval_seconds=args.interval_seconds,
                max_error_rate=args.max_error_rate, max_latency_ratio=args.max_latency_ratio,
                min_requests=args.min_requests))
            return format_canary(reply)
        if command == "canary-status":
            return format_canary(await admin.GetCanary(pb.ModelRef(model=args.model)))
        if command == "canary-abort":
            return format_canary(await admin.AbortCanary(pb.ModelRef(model=args.model)))
        raise AssertionError(command)


def policy_extras(policy: pb.Policy) -> str:
    extras = ""
    if policy.shadow.version:
        extras += f", shadow {policy.shadow.percent:g}% to {policy.shadow.version}"
    if policy.region:
        extras += f", region {policy.region} only"
    return extras


def weights_text(policy: pb.Policy) -> str:
    return " ".join(f"{v}={policy.weights[v]}" for v in sorted(policy.weights, key=int))


def policy_text(policy: pb.Policy) -> str:
    """The whole policy: weights, then shadow and region when set."""
    return weights_text(policy) + policy_extras(policy)


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        text = asyncio.run(call(args))
    except grpc.aio.AioRpcError as error:
        return emit(f"error: {error.code().name}: {error.details()}", 1)
    except ServingError as error:
        return emit(f"error: {error.message}", 2)
    return emit(text, 0)


def emit(text: str, code: int) -> int:
    """Print `text`; a reader that stopped early (`| head -1`) is no error of ours."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
    return code


def _common(parser: argparse.ArgumentParser) -> None:
    add_connection_flags(parser)
    parser.add_argument("--reason", default="", help="recorded in the audit log")
    parser.set_defaults(func=run)


def register(commands) -> None:
    traffic = commands.add_parser("traffic")
    actions = traffic.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="weights, rates, errors, latency per version")
    status.add_argument("model", nargs="?")
    setter = actions.add_parser("set", help="set weights, e.g. `set mlp 1=90 2=10`")
    setter.add_argument("model")
    setter.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    pin = actions.add_parser("pin", help="send all unpinned traffic to one version")
    pin.add_argument("model")
    pin.add_argument("version")
    rollback = actions.add_parser("rollback", help="back to the previous policy")
    rollback.add_argument("model")
    shadow = actions.add_parser("shadow", help="mirror a share of requests to a version "
                                                "(answers compared, then discarded)")
    shadow.add_argument("model")
    shadow.add_argument("version", nargs="?", default="")
    shadow.add_argument("--percent", type=float, default=10.0)
    shadow.add_argument("--off", action="store_true")
    region = actions.add_parser("region", help="keep a model's traffic inside one region")
    region.add_argument("model")
    region.add_argument("region", nargs="?", default="")
    region.add_argument("--off", action="store_true")
    region.add_argument("--force", action="store_true",
                        help="even where no endpoint of the model is registered (yet)")
    istio = actions.add_parser("render", help="the policy as Istio VirtualService and "
                                              "DestinationRule YAML")
    istio.add_argument("model")
    istio.add_argument("--istio", action="store_true", required=True)
    istio.add_argument("--namespace", default="default")
    istio.add_argument("--release", default="mesh",
                       help="the umbrella chart's release: each version's batcher Service is "
                            "<release>-<model slug>-<version>-batcher (default mesh; '' for "
                            "batcher charts installed as <model slug>-<version>)")
    istio.add_argument("--cluster-domain", default="cluster.local",
                       help="the cluster's DNS domain, the charts' clusterDomain: Service hosts "
                            "are <service>.<namespace>.svc.<domain> (default cluster.local)")
    istio.add_argument("--host", help="instead, one Service host that selects the batcher pods "
                                      "of every version (routes go to subsets of it)")
    istio.add_argument("--port", type=int, default=7003,
                       help="the batchers' Service port (default 7003, the charts')")
    for parser in (status, setter, pin, rollback, shadow, region, istio):
        _common(parser)

    canary = commands.add_parser("canary")
    steps = canary.add_subparsers(dest="canary_action", required=True, metavar="ACTION")
    start = steps.add_parser("start", help="step a new version's weight up while healthy")
    start.add_argument("model")
    start.add_argument("--to", required=True, metavar="VERSION")
    start.add_argument("--from", dest="from_version", default="", metavar="VERSION",
                       help="the baseline, the only version weight is taken from (default: "
                            "the version with the most weight)")
    start.add_argument("--steps", default="5,25,50,100",
                       help="the candidate's weight at each step, in percent of all unpinned "
                            "traffic, ending at 100 (capped at what the baseline and the "
                            "candidate carry together)")
    start.add_argument("--interval", default="30s")
    start.add_argument("--max-error-rate", type=float, default=0.01)
    start.add_argument("--max-latency-ratio", type=float, default=1.5)
    start.add_argument("--min-requests", type=int, default=20)
    start.set_defaults(action="canary-start")
    # `--steps -5,100`, `--interval -5s`: values (refused in one line), not unknown options.
    start._negative_number_matcher = re.compile(r"^-[0-9.]")
    for name, action in (("status", "canary-status"), ("abort", "canary-abort")):
        parser = steps.add_parser(name, help=f"{name} the model's canary")
        parser.add_argument("model")
        parser.set_defaults(action=action)
    for parser in (start, *[steps.choices[n] for n in ("status", "abort")]):
        _common(parser)
