"""`meshserve up`: the embedded default — every service as a local process on loopback.

On first run it creates development certificates in DIR/tls and the demo model repository
in DIR/models (or serves the repository `--model-repository` names); then it starts the
control plane (state in DIR/mesh.db), compute replicas and batchers for each version of each
model but ensembles (the ingress runs those), a router steered by the control plane, and the
ingress; waits until each is ready (a version whose compute refuses its model is reported
and left out), and stops them all on Ctrl-C or SIGTERM.

One module of ~540 lines on purpose: the order of a start (certificates, repository, control
plane, computes, batchers, router, ingress) and of a stop reads as one story; the child
processes themselves are in `up_children`.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import time
import urllib.parse
from pathlib import Path

from meshserve.common import runtime
from meshserve.common.files import write_atomic
from meshserve.common.logs import DEFAULT_ACCESS_LOG_SAMPLE, sample_fraction
from meshserve.common.repository import ModelRepository, instance_count
from meshserve.common.tls import TlsFiles
from meshserve.ingress.readiness import RULES, STRICT
from meshserve.protocol import admin_pb2
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools import dev_signing
from meshserve.tools.arguments import positive_int
from meshserve.tools.certs import CA_CERT, CA_KEY, CertsError, expected_files, init_certs
from meshserve.tools.tokens import JWKS, POLICY, init_auth
from meshserve.tools.traffic import admin_channel
from meshserve.tools.up_children import (
    HOST,
    Child,
    Refused,
    ingress_timeout,
    stop_all,
    versions_not_ready,
    wait_ready,
)
from meshserve.tools.up_record import UP_FILE, running_up

TOKEN_PORT_FILE = "ingress.token-port"
HTTP_PORT_FILE = "ingress.http-port"
# In DIR/run: how to find this `up` and start it again (`meshserve drill` reads it); each
# service's process id is in DIR/run/<name>.pid.
# The demo's traffic on a first run: a 10 % canary of mlp version 2; cnn on its latest.
DEMO_POLICY = {"mlp": {"1": 90, "2": 10}, "cnn": {"1": 0, "2": 100}}


def auth_args(data_dir: Path, port: int) -> list[str]:
    """The ingress's token listener (`port` + 1, or any free port when `port` is 0), its
    policy and the keys that verify tokens."""
    auth = data_dir / "auth"
    return [f"--token-listen={HOST}:{port + 1 if port else 0}",
            f"--token-port-file={data_dir / 'run' / TOKEN_PORT_FILE}",
            f"--policy={auth / POLICY}", f"--jwks={auth / JWKS}"]


def http_args(data_dir: Path, port: int) -> list[str]:
    """The ingress's HTTP/REST listener: `port` - 1 (8000 beside gRPC's 8001, as Triton), or
    any free port when `port` is 0."""
    return [f"--http-listen={HOST}:{port - 1 if port else 0}",
            f"--http-port-file={data_dir / 'run' / HTTP_PORT_FILE}"]


def bound_port(data_dir: Path, name: str = TOKEN_PORT_FILE) -> int | None:
    """A port the ingress wrote once bound: the bearer-token one, or `name`'s."""
    path = data_dir / "run" / name
    return int(path.read_text()) if path.exists() else None


def repository_of(data_dir: Path, repository: Path | None = None) -> Path:
    """The repository `up` serves: the one given, else the demo's in DIR/models."""
    return (data_dir / "models") if repository is None else repository.resolve()


def plan(data_dir: Path, port: int, device: str, metrics: bool = True,
         compute_replicas: int | None = None, audit_denied_sample: float = 0.01,
         batcher_replicas: int = 1, repository: Path | None = None,
         access_log_sample: float = DEFAULT_ACCESS_LOG_SAMPLE,
         readiness: str = STRICT, loaded: ModelRepository | None = None) -> list[list[Child]]:
    """The children in start order: control plane, computes, batchers, router, ingress.

    Each version of each model but ensembles gets `compute_replicas` compute processes (when
    None, as many as the model's `instance_group` asks for: `instance_count`; `compute-M-V`
    when there is one, `compute-M-V-0`, `compute-M-V-1`, ... when there are more) and
    likewise `batcher_replicas` batchers (`batcher-M-V`, or `batcher-M-V-0`, ...);
    every batcher of a version is given all of that version's computes. Ensembles and models
    the repository refused get none. `loaded`: the repository as `prepare` read it."""
    models = repository_of(data_dir, repository)
    run_dir = data_dir / "run"
    loaded = ModelRepository.load(models) if loaded is None else loaded
    ingress = Child("ingress", "ingress", [f"--model-repository={models}",
                                           f"--listen={HOST}:{port}", "--require-client-cert",
                                           *auth_args(data_dir, port),
                                           *http_args(data_dir, port)],
                    run_dir)
    computes, batchers = [], []
    for name, entry in sorted(loaded.models.items()):
        if entry.plan is not None:  # an ensemble: the ingress runs its steps
            continue
        replicas = compute_replicas or instance_count(entry.config)
        for version in entry.versions:
            common = [f"--model-repository={models}", f"--model={name}", f"--version={version}"]
            for replica in range(replicas):
                suffix = f"-{replica}" if replicas > 1 else ""
                computes.append(Child(f"compute-{name}-{version}{suffix}", "compute",
                                      [*common, f"--device={device}",
                                       f"--bls-target-file={ingress.port_file}",
                                       *dev_signing.compute_flags(data_dir)], run_dir,
                                      model=name, version=version))
            for replica in range(batcher_replicas):
                suffix = f"-{replica}" if batcher_replicas > 1 else ""
                batchers.append(Child(f"batcher-{name}-{version}{suffix}", "batcher",
                                      list(common), run_dir, model=name, version=version))
    control_plane = Child("control-plane", "control-plane",
                          [f"--store={data_dir / 'mesh.db'}",
                           f"--policy={data_dir / 'auth' / POLICY}",
                           *dev_signing.control_plane_flags(data_dir, models)], run_dir)
    router = Child("router", "router", [], run_dir)
    ingress.args += [f"--async-store={data_dir / 'async.db'}",
                     f"--audit-denied-sample={audit_denied_sample}",
                     f"--access-log-sample={access_log_sample}", f"--readiness={readiness}"]
    tiers = [[control_plane], computes, batchers, [router], [ingress]]
    for child in (child for tier in tiers for child in tier):
        child.metrics = metrics
    return tiers


def compute_flags(batcher: Child, computes: list[Child]) -> list[str]:
    """`--compute=ADDRESS` for each compute of the batcher's model version."""
    return [f"--compute={compute.address}" for compute in computes
            if (compute.model, compute.version) == (batcher.model, batcher.version)]


async def register_batchers(control_plane: Child, batchers: list[Child], tls: TlsFiles,
                            first_policy: dict[str, dict[str, int]]) -> None:
    """Tell the control plane where each version's batchers are (replacing stale addresses of
    an earlier run) and, on a first run, set `first_policy`'s weights. Stale addresses go
    after the new ones are registered: registering a version puts it back in its model's
    policy (were it missing), so Status lists its stale endpoints too."""
    async with admin_channel(control_plane.address, tls) as channel:
        admin = AdminStub(channel)
        status = await admin.Status(admin_pb2.StatusRequest())
        running = set()
        for batcher in batchers:
            await admin.RegisterEndpoint(admin_pb2.Endpoint(
                model=batcher.model, version=batcher.version, address=batcher.address,
                region="local"))
            running.add((batcher.model, batcher.version, batcher.address))
        registered = await admin.Status(admin_pb2.StatusRequest())
        for model in registered.models:
            for version in model.versions:
                for stale in version.endpoints:
                    if (stale.model, stale.version, stale.address) not in running:
                        await admin.RemoveEndpoint(stale)
        if not status.models:  # a first run
            current = await admin.Status(admin_pb2.StatusRequest())
            for model in current.models:
                demo = first_policy.get(model.policy.model)
                if demo:
                    weights = {version: demo.get(version, 0) for version in model.policy.weights}
                    await admin.SetPolicy(admin_pb2.SetPolicyRequest(
                        policy=admin_pb2.Policy(model=model.policy.model, weights=weights),
                        reason="meshserve up: demo policy"))


async def start_mesh(data_dir: Path, port: int, device: str, timeout: float,
                     say=print, metrics: bool = True, compute_replicas: int | None = None,
                     audit_denied_sample: float = 0.01, batcher_replicas: int = 1,
                     repository: Path | None = None,
                     access_log_sample: float = DEFAULT_ACCESS_LOG_SAMPLE,
                     readiness: str = STRICT,
                     loaded: ModelRepository | None = None) -> list[Child]:
    tls_dir = data_dir / "tls"
    operator = TlsFiles.for_identity(tls_dir, "client")
    tiers = plan(data_dir, port, device, metrics, compute_replicas, audit_denied_sample,
                 batcher_replicas, repository, access_log_sample, readiness, loaded)
    [control_plane], computes, batchers, [router], [ingress] = tiers
    first_policy = DEMO_POLICY if repository is None else {}
    started: list[Child] = []
    try:
        for tier in tiers:
            for child in tier:
                if child in batchers:
                    child.args.extend(compute_flags(child, computes))
                if child is router:
                    child.args.append(f"--control-plane={control_plane.address}")
                if child is ingress:
                    child.args += [f"--router={router.address}",
                                   f"--control-plane={control_plane.address}"]
                child.start(tls_dir)
                started.append(child)
            await asyncio.gather(*(child.wait_port(timeout) for child in tier))
            if tier is batchers:
                await wait_ready(control_plane, operator, timeout)
                await register_batchers(control_plane, batchers, operator, first_policy)
        refused: set[tuple[str, str]] = set()
        compute_caller = TlsFiles.for_identity(tls_dir, "batcher")
        # Each service is watched from its start, so that its figure is its own; the ingress
        # once every version is (it cannot be ready before them), with all of `timeout`.
        waits = {child.name: asyncio.create_task(wait_ready(
            child, operator, timeout, compute_caller if child in computes else None))
            for child in started if child is not ingress}
        # A service found ready and lost while the others are still checked is restarted,
        # as after the start; one that never was ready fails the start.
        ready: list[Child] = []
        keeper = asyncio.create_task(supervise(ready, tls_dir))
        try:
            for child in started:
                if child in batchers and (child.model, child.version) in refused:
                    say(f"  down   {child.name:<18} {child.address:<16} (its compute refused "
                        "the model)")
                    continue
                if child is ingress and refused and readiness == STRICT:
                    # Strict readiness waits for every version; a refused one never answers.
                    say(f"  up     {child.name:<18} {child.address:<16} (not ready: "
                        f"{len(refused)} refused version(s) cannot answer; the rest serve)")
                    continue
                try:
                    seconds = await (waits[child.name] if child is not ingress else
                                     wait_ready(ingress, operator, timeout))
                except Refused as refusal:
                    refused.add((child.model, child.version))
                    say(f"  REFUSED {child.name}: {refusal}")
                    continue
                except TimeoutError:
                    if child is not ingress:
                        raise
                    waiting = await versions_not_ready(control_plane, operator,
                                                       {b.model for b in batchers})
                    raise TimeoutError(ingress_timeout(ingress, timeout, waiting)) from None
                say(f"  ready  {child.name:<18} {child.address:<16} ({seconds:.1f} s)")
                ready.append(child)
        finally:
            keeper.cancel()
            for wait in waits.values():
                wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # and their errors retrieved
                await asyncio.gather(*waits.values(), return_exceptions=True)
        return started
    except BaseException:
        stop_all(list(reversed(started)), grace=2.0)
        raise


def check_certs(data_dir: Path) -> None:
    """The mesh's certificates, completed where they can be (`init_certs`); RuntimeError, saying
    what to do, where they cannot. Certificates without their keys are what a backup restored
    without its keys leaves: a new CA would not be the one the mesh's clients trust."""
    tls_dir = data_dir / "tls"
    if (tls_dir / CA_CERT).exists() and not (tls_dir / CA_KEY).exists():
        keyless = [path.name for path in expected_files(tls_dir)
                   if path.suffix == ".crt" and path.exists() and
                   not path.with_suffix(".key").exists()]
        raise RuntimeError(
            f"{tls_dir} has certificates without their private keys ({', '.join(keyless)}), "
            "as a backup restored without its keys leaves it: restore the archive again with "
            f"them (meshserve restore ARCHIVE --data-dir {data_dir} --kek-file FILE, an archive "
            "written with --include-keys) into an empty directory, or put back the private "
            "keys (*.key, keys/kek) you keep apart; a new CA would not be the one its clients "
            "trust")
    try:
        init_certs(tls_dir)
    except CertsError as error:
        raise RuntimeError(str(error)) from None


def prepare(data_dir: Path, say=print, repository: Path | None = None) -> ModelRepository:
    """Certificates, keys and the access policy; the demo repository unless `repository`
    names another. Unsigned versions are signed with the development key; models the
    repository refuses are reported. Returns the repository as read once signed."""
    tls_dir = data_dir / "tls"
    if not (tls_dir / "ca.crt").exists():
        say(f"creating development certificates in {tls_dir}")
    check_certs(data_dir)
    models = repository_of(data_dir, repository)
    if repository is None:
        from meshserve.tools.demo_repository import write_demo_repository  # torch: when needed

        if not models.exists():
            say(f"writing the demo model repository to {models}")
        write_demo_repository(models)
    elif not models.is_dir():
        raise RuntimeError(f"model repository {models} is not a directory")
    else:
        say(f"serving the model repository {models}")
    dev_signing.prepare_keys_and_sign(data_dir, say, models)
    loaded = ModelRepository.load(models)
    for reason in sorted(loaded.refused.values()):
        say(f"  REFUSED {reason}")
    if init_auth(data_dir / "auth"):
        say(f"creating the token-signing key and access policy in {data_dir / 'auth'}")
    (data_dir / "run").mkdir(parents=True, exist_ok=True)
    (data_dir / "run" / TOKEN_PORT_FILE).unlink(missing_ok=True)
    (data_dir / "run" / HTTP_PORT_FILE).unlink(missing_ok=True)
    (data_dir / "run" / UP_FILE).write_text(json.dumps(
        {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:]}) + "\n")
    return loaded


class RepositoryLog(logging.Handler):
    """What reading the model repository logs, as `up` shows it (on stderr): each warning
    once, though `up` reads the repository more than once (to sign its versions, then to
    plan); its refusals are left to the `REFUSED` lines `up` prints."""

    def __init__(self, say=lambda line: print(line, file=sys.stderr)) -> None:
        super().__init__(logging.WARNING)
        self._say = say
        self._seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno < logging.ERROR and text not in self._seen:
            self._seen.add(text)
            self._say(text)


@contextlib.contextmanager
def repository_log(handler: logging.Handler):
    """`handler` hears the repository's log (instead of Python's last-resort stderr) inside."""
    logger = logging.getLogger(ModelRepository.__module__)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def metrics_lines(children: list[Child]) -> str:
    return "\n".join(f"  {child.name:<18} {child.metrics_url() or '(not serving yet)'}"
                     for child in children)


def banner(data_dir: Path, ingress: Child, children: list[Child] | None = None,
           bearer_port: int | None = None, http_port: int | None = None,
           model: str = "") -> str:
    """What to call now; `model` names one of a user's repository (the demo's otherwise).
    Commands are quoted for a POSIX shell (a model or a directory named with spaces, `#` or
    `%` pastes as it is) and the model is percent-encoded in URLs."""
    tls = data_dir / "tls"
    q = shlex.quote
    dirs = f"--data-dir {q(str(data_dir))} --target {ingress.address}"
    metrics = (f"\nPrometheus metrics:\n{metrics_lines(children)}\n"
               if children and children[0].metrics else "")
    tokens = "" if bearer_port is None else f"""
Bearer-token callers: {HOST}:{bearer_port} (server TLS; CA {tls}/ca.crt; policy
{data_dir / 'auth' / POLICY})

  meshserve token issue --subject app/demo --scope infer --models {q(model or 'mlp')} \\
      --ttl 1h --data-dir {q(str(data_dir))}
"""
    url = f"https://{HOST}:{http_port}/v2/models/{urllib.parse.quote(model or 'mlp', safe='')}"
    rest = "" if http_port is None else f"""
HTTP/REST (the same protocol over HTTPS; client certificate or bearer token):
https://{HOST}:{http_port}/v2

  curl --cacert {q(f'{tls}/ca.crt')} --cert {q(f'{tls}/client.crt')} \\
      --key {q(f'{tls}/client.key')} {q(url)}
"""
    if model:
        return f"""
meshserve is ready: {ingress.address} (mutual TLS; client certificate {tls}/client.crt)

  meshserve infer {q(model)} {dirs}
{tokens}{rest}{metrics}
Logs: {data_dir / 'run'}/*.log. Ctrl-C stops everything.
"""
    return f"""
meshserve is ready: {ingress.address} (mutual TLS; client certificate {tls}/client.crt)

  meshserve infer mlp {dirs}
  meshserve infer classify {dirs}

  import numpy, tritonclient.grpc as tc
  client = tc.InferenceServerClient("{ingress.address}", ssl=True,
      root_certificates="{tls}/ca.crt", private_key="{tls}/client.key",
      certificate_chain="{tls}/client.crt")
  x = tc.InferInput("INPUT__0", [1, 256], "FP32")
  x.set_data_from_numpy(numpy.random.rand(1, 256).astype("float32"))
  print(client.infer("mlp", [x]).as_numpy("OUTPUT__0"))
{tokens}{rest}{metrics}
Logs: {data_dir / 'run'}/*.log. Ctrl-C stops everything.
"""


# Restarts wait 0.5 s, then twice as long each time, at most 30 s; a service that ran this
# long before it exited starts again from 0.5 s (Kubernetes: 10 minutes).
FIRST_BACKOFF_S, MAX_BACKOFF_S, BACKOFF_RESET_S = 0.5, 30.0, 600.0


def restart_wait(previous: float | None, ran_for: float) -> float:
    """How long to wait before restarting a service that exited after `ran_for` seconds,
    `previous` being the wait before its last restart (None: never restarted)."""
    if previous is None or ran_for >= BACKOFF_RESET_S:
        return FIRST_BACKOFF_S
    return min(previous * 2, MAX_BACKOFF_S)


async def supervise(children: list[Child], tls_dir: Path) -> None:
    """Restart a service of `children` (a list that may grow) that exits, on the same port,
    with backoff (as Kubernetes would)."""
    backoff: dict[str, float] = {}
    while True:
        await asyncio.sleep(0.2)
        for child in children:
            code = child.exited()
            if code is None:
                continue
            wait = backoff[child.name] = restart_wait(backoff.get(child.name),
                                                      time.monotonic() - child.started)
            print(f"{child.name} exited with {code}; restarting in {wait:.1f} s "
                  f"(log: {child.log})", flush=True)
            await asyncio.sleep(wait)
            child.args = [a for a in child.args if not a.startswith("--listen=")]
            child.args.append(f"--listen={child.address}")
            if child.name == "ingress":
                for name, flag in ((TOKEN_PORT_FILE, "--token-listen"),
                                   (HTTP_PORT_FILE, "--http-listen")):
                    bound = bound_port(tls_dir.parent, name)
                    if bound is not None:
                        child.args = [a for a in child.args if not a.startswith(f"{flag}=")]
                        child.args.append(f"{flag}={HOST}:{bound}")
            child.start(tls_dir)


async def wait_bound_port(data_dir: Path, timeout: float,
                          name: str = TOKEN_PORT_FILE) -> int | None:
    """The ingress's bearer-token port (or `name`'s), once it has written it."""
    deadline = time.monotonic() + timeout
    while (port := bound_port(data_dir, name)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return port


async def serve_until_stopped(args: argparse.Namespace) -> int:
    data_dir = args.data_dir.resolve()
    other = running_up(data_dir)
    if other is not None:  # two meshes on one store and one set of ports and pid files
        raise RuntimeError(f"another `meshserve up` (pid {other}) serves {data_dir}: stop it "
                           f"first (Ctrl-C, or kill {other})")
    loaded = prepare(data_dir, repository=args.model_repository)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("starting services")
    starting = asyncio.create_task(start_mesh(data_dir, args.port, args.device, args.timeout,
                                              metrics=not args.no_metrics,
                                              compute_replicas=args.compute_replicas,
                                              audit_denied_sample=args.audit_denied_sample,
                                              batcher_replicas=args.batcher_replicas,
                                              repository=args.model_repository,
                                              access_log_sample=args.access_log_sample,
                                              readiness=args.readiness, loaded=loaded))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return 0
    children = starting.result()
    ingress = children[-1]
    bearer_port = await wait_bound_port(data_dir, args.timeout)
    http_port = await wait_bound_port(data_dir, args.timeout, HTTP_PORT_FILE)
    write_atomic(data_dir / "run" / "endpoint", f"{ingress.address}\n".encode())
    model = "" if args.model_repository is None else next(
        (child.model for child in children if child.model), "MODEL")
    print(banner(data_dir, ingress, children, bearer_port, http_port, model), flush=True)
    supervisor = asyncio.create_task(supervise(children, data_dir / "tls"))
    await stop.wait()
    supervisor.cancel()
    print("stopping")
    stop_all(list(reversed(children)), grace=args.drain_seconds + 2)
    return 0


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ[runtime.PARENT_ENV] = str(os.getpid())  # its services stop when it dies
    if args.otlp:  # the children inherit it; each service reads it once in its main()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{args.otlp}"
    try:
        with repository_log(RepositoryLog()):
            return asyncio.run(serve_until_stopped(args))
    except BrokenPipeError:  # its reader has gone: the command line's business (cli.main)
        raise
    except (RuntimeError, TimeoutError, OSError) as error:  # OSError: a data directory
        print(f"error: {error}", file=sys.stderr)  # that cannot be written, say
        return 1


def register(commands) -> None:
    parser = commands.add_parser("up")
    parser.add_argument("--data-dir", type=Path, default=Path(".meshserve"),
                        help="certificates, models and logs (default ./.meshserve)")
    parser.add_argument("--model-repository", type=Path, metavar="PATH",
                        help="serve this Triton-layout repository (TorchScript, ONNX, Python "
                             "and ensemble models) instead of the demo in DIR/models; unsigned "
                             "versions are signed with the development key")
    parser.add_argument("--port", type=int, default=8001, help="ingress port (0: any free)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds each service may take to become ready")
    parser.add_argument("--drain-seconds", type=float, default=5.0)
    parser.add_argument("--compute-replicas", type=positive_int, metavar="N",
                        help="compute processes per version of every model (default: as "
                             "many as the model's instance_group count)")
    parser.add_argument("--batcher-replicas", type=positive_int, default=1, metavar="N",
                        help="batchers per model version, each an endpoint of the version in "
                             "the mesh (default 1)")
    parser.add_argument("--audit-denied-sample", type=sample_fraction, default=0.01,
                        metavar="FRACTION",
                        help="fraction (0..1) of denied calls recorded in the audit log "
                             "(default 0.01)")
    parser.add_argument("--access-log-sample", type=sample_fraction,
                        default=DEFAULT_ACCESS_LOG_SAMPLE, metavar="FRACTION",
                        help="fraction (0..1) of answered requests given an access-log line by "
                             "the ingress; failures always get one "
                             f"(default {DEFAULT_ACCESS_LOG_SAMPLE})")
    parser.add_argument("--readiness", choices=RULES, default=STRICT,
                        help="the ingress is ready (ServerReady) when every model version can "
                             "answer (strict, the default) or when one can (any)")
    parser.add_argument("--no-metrics", action="store_true",
                        help="serve and record no Prometheus metrics")
    parser.add_argument("--otlp", default="", metavar="HOST:PORT",
                        help="export traces to this OTLP gRPC collector (plaintext; sets "
                             "OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT for every service)")
    parser.set_defaults(func=run)
