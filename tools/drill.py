"""`meshserve drill`: a disaster-recovery drill on a running `meshserve up`, under load.

    meshserve drill [--data-dir DIR] [--quick] [--model mlp] [--work-dir DIR] [--report FILE]

With inference load running throughout (a few callers on the mutual-TLS port):

1. submit asynchronous requests; note what the mesh serves (routes and canaries, registry
   rows, the digest of every model file, the audit head); back up, keys included, encrypted
   under a key-encryption key the drill makes in its work directory (as an operator keeps
   one apart from the data); restore the archive into a scratch directory to prove it;
2. submit more: these are accepted after the backup, past its recovery point;
3. SIGKILL `up` and every service it started, and delete the data directory;
4. restore the archive into it and start `up` again with its own command line;
5. wait for the first successful inference: the recovery time runs from the kill to it;
6. check that the same routes, canaries and models (digests) are back and every version is
   ready, that the audit chain verifies from the backup's head on and records the restore,
   and that every submission accepted before the backup gets its answer (those accepted
   after it are reported lost: that is the recovery point).

The model repository is the one `up` serves: DIR/models, or the `--model-repository` its
recorded command line names. One outside DIR outlives the deletion, as a volume of its own
does: the archive's copy of it is restored into the work directory and checked against it,
and `up` starts again on the repository as it is.

The restarted `up` keeps running (its log: DIR/run/up.log). Exit status 0 when every check
passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from meshserve.common import artifacts, model_files
from meshserve.common.tls import TlsFiles
from meshserve.protocol import admin_pb2
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.backup import Layout, create_backup
from meshserve.tools.cli import parser_for
from meshserve.tools.client import client_tls
from meshserve.tools.drill_load import Connection, Load, answers, submit
from meshserve.tools.random_requests import random_request
from meshserve.tools.restore import restore_backup
from meshserve.tools.traffic import admin_channel
from meshserve.tools.up_children import HOST
from meshserve.tools.up_record import UP_FILE, alive, service_pid, up_data_dir


@dataclass(frozen=True)
class Plan:
    """How much the drill does: `--quick` for CI, the default for a real exercise."""

    callers: int = 2
    pause_s: float = 0.05
    steady_s: float = 5.0
    before_backup: int = 100
    after_backup: int = 20
    timeout_s: float = 300.0


QUICK = Plan(steady_s=1.0, before_backup=20, after_backup=5, timeout_s=240.0)


# --------------------------------------------------------------------------- the processes


@dataclass(frozen=True)
class UpProcess:
    """A running `meshserve up`: its pid, how to start it again, and its services' pids."""

    pid: int
    cwd: str
    argv: list[str]
    services: list[int]

    def repository(self, data_dir: Path) -> Path:
        """The model repository it serves: its `--model-repository` (relative to its working
        directory), else the demo's in `data_dir`/models."""
        args, _ = parser_for("up").parse_known_args(self.argv)
        if args.model_repository is None:
            return data_dir / "models"
        return (Path(self.cwd) / args.model_repository).resolve()

    @classmethod
    def find(cls, data_dir: Path) -> UpProcess:
        """The `up` serving `data_dir` (a resolved path), from what it recorded in DIR/run,
        once the process is checked to be that `up` on that directory: a copy of a data
        directory records the `up` of the original."""
        run_dir = data_dir / "run"
        try:
            record = json.loads((run_dir / UP_FILE).read_text())
        except (OSError, ValueError):
            raise SystemExit(f"no `meshserve up` recorded in {run_dir / UP_FILE}: start "
                             f"`meshserve up --data-dir {data_dir}` first") from None
        if not alive(record["pid"]) or record["argv"][:1] != ["up"]:
            raise SystemExit(f"the `meshserve up` of {data_dir} (pid {record['pid']}) is not "
                             "running")
        serves = up_data_dir(record["pid"], record["argv"])
        if serves != data_dir.resolve():
            what = (f"serves {serves} (a copy of another data directory?)" if serves else
                    "is another process")
            raise SystemExit(f"no `meshserve up` is running on {data_dir}: the one recorded in "
                             f"{run_dir / UP_FILE} (pid {record['pid']}) {what}")
        services = [pid for pid in map(service_pid, sorted(run_dir.glob("*.pid"))) if pid]
        return cls(record["pid"], record["cwd"], record["argv"], services)



def kill_all(up: UpProcess, timeout_s: float = 10.0) -> int:
    """SIGKILL `up` first (so it restarts nothing), then each service's process group."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(up.pid, signal.SIGKILL)
    for pid in up.services:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in (up.pid, *up.services)):
        if time.monotonic() > deadline:
            raise RuntimeError("processes of the mesh outlived SIGKILL")
        time.sleep(0.02)
    return 1 + len(up.services)


def start_again(up: UpProcess, data_dir: Path) -> subprocess.Popen:
    """`up` with its own command line and directory, in a session of its own (it outlives
    the drill), logging to DIR/run/up.log."""
    (data_dir / "run").mkdir(parents=True, exist_ok=True)
    with open(data_dir / "run" / "up.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "meshserve.tools.cli", *up.argv],
                                cwd=up.cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


# --------------------------------------------------------------------------- what is checked


@dataclass(frozen=True)
class Observed:
    routes: dict[str, dict]
    canaries: dict[str, dict]
    registry: dict[str, str]
    model_files: dict[str, str]


def control_plane(data_dir: Path, tls: TlsFiles) -> grpc.aio.Channel:
    """A channel to the control plane of the `up` in `data_dir`, at the port it bound."""
    port = int((data_dir / "run" / "control-plane.port").read_text())
    return admin_channel(f"{HOST}:{port}", tls)


async def observe(data_dir: Path, repository: Path, tls: TlsFiles) -> Observed:
    async with control_plane(data_dir, tls) as channel:
        admin = AdminStub(channel)
        status = await admin.Status(admin_pb2.StatusRequest(), timeout=10)
        listed = await admin.ListModels(admin_pb2.ListModelsRequest(), timeout=10)
    return Observed(
        routes={m.policy.model: MessageToDict(m.policy) for m in status.models},
        canaries={m.policy.model: MessageToDict(m.canary) for m in status.models
                  if m.canary.state},
        registry={f"{v.name}/{v.version}": v.digest for v in listed.versions},
        model_files=file_digests(repository))


def file_digests(root: Path) -> dict[str, str]:
    """Every file under `root` (a model repository), by its path relative to it."""
    return {str(path.relative_to(root)): artifacts.sha256_digest(path.read_bytes())
            for path in sorted(root.rglob("*")) if path.is_file()}


def restored_layout(data_dir: Path, repository: Path, work: Path) -> Layout:
    """Where the drill restores the archive: the data directory, with the model repository
    in it; a repository outside it, which the drill does not delete, is left as it is and its
    copy in the archive goes to `work`/restored-models (empty: a restore refuses anything
    else) to be checked against it."""
    if repository.is_relative_to(data_dir):
        return Layout.of(data_dir, model_repository=repository)
    return Layout.of(data_dir, model_repository=work / "restored-models")


def copy_differences(before: Observed, copy: Path) -> list[str]:
    """How the archive's copy of the repository (restored into `copy`) differs from the files
    observed before the backup."""
    restored = file_digests(copy)
    return [f"model_files {key}: backed up {before.model_files.get(key)!r}, restored copy "
            f"{restored.get(key)!r}" for key in sorted(set(before.model_files) | set(restored))
            if before.model_files.get(key) != restored.get(key)]


def differences(before: Observed, after: Observed) -> list[str]:
    """What the restored mesh serves differently from what was backed up. A version that the
    restarted `up` registered at 0 % (one pushed before the backup that the backed-up policy
    did not name yet, its files in the restored repository) is none: `up` serves every
    version of its repository, a new one reached only when pinned until weight moves to it."""
    held = {tuple(path.split("/")[:2]) for path in after.model_files}
    after = replace(after, routes={
        model: less_new_at_zero(policy, before.routes.get(model), held)
        for model, policy in after.routes.items()}, canaries={
        model: {**canary, "current": less_new_at_zero(
            canary["current"], before.canaries.get(model, {}).get("current"), held)}
        if "current" in canary else canary for model, canary in after.canaries.items()})
    found = []
    for name in ("routes", "canaries", "registry", "model_files"):
        old, new = getattr(before, name), getattr(after, name)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                found.append(f"{name} {key}: backed up {old.get(key)!r}, now {new.get(key)!r}")
    return found


def less_new_at_zero(policy: dict, backed_up: dict | None,
                     held: set[tuple[str, ...]]) -> dict:
    """`policy` (as `MessageToDict` writes a Policy) less each version at weight 0 that
    `backed_up` does not name and whose files are held (`held`: (model, version) pairs)."""
    if backed_up is None:
        return policy
    known = backed_up.get("weights", {})
    weights = {version: weight for version, weight in policy.get("weights", {}).items()
               if version in known or weight or (policy.get("model"), version) not in held}
    return {**policy, "weights": weights}


async def wait_all_ready(channel: grpc.aio.Channel, timeout_s: float) -> tuple[int, list[str]]:
    """(versions ready, those that were not within the time)."""
    stub = GRPCInferenceServiceStub(channel)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
            versions = [(m.name, m.version) for m in index.models]
            ready = [await stub.ModelReady(pb.ModelReadyRequest(name=n, version=v), timeout=5)
                     for n, v in versions]
            waiting = [f"{n}/{v}" for (n, v), r in zip(versions, ready, strict=True)
                       if not r.ready]
            if versions and (not waiting or time.monotonic() > deadline):
                return len(versions) - len(waiting), waiting
        if time.monotonic() > deadline:
            return 0, ["the repository index (no answer)"]
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- the drill


@dataclass
class Report:
    ok: bool = False
    recovery_s: float | None = None
    restored_s: float | None = None
    archive: str = ""
    archive_bytes: int = 0
    recovery_point: str = ""
    backup_s: float = 0.0
    restore_s: float = 0.0
    processes_killed: int = 0
    submissions_before: int = 0
    submissions_kept: int = 0
    submissions_after: int = 0
    submissions_after_lost: int = 0
    versions_ready: int = 0
    audit_entries: int = 0
    load: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    up_pid: int = 0


async def drill(data_dir: Path, work: Path, plan: Plan, model: str, say=print) -> Report:
    report = Report()
    up = UpProcess.find(data_dir)
    repository = up.repository(data_dir)
    operator = client_tls(data_dir)
    say(f"drill on the `meshserve up` of {data_dir} (pid {up.pid}, {len(up.services)} "
        f"services); work directory {work}")
    connection = Connection(data_dir)
    channel = connection.get()
    if channel is None:
        raise SystemExit(f"the ingress of {data_dir} has no port file yet: is it still "
                         "starting?")
    metadata = await GRPCInferenceServiceStub(channel).ModelMetadata(
        pb.ModelMetadataRequest(name=model), timeout=10)
    request, _ = random_request(metadata, 1)
    load = Load(connection, request, plan.pause_s)
    callers = [asyncio.create_task(load.caller()) for _ in range(plan.callers)]
    try:
        await run_steps(data_dir, repository, work, plan, up, operator, connection, request,
                        load, report, say)
    except Exception as error:  # reported with what to do, never left as a bare traceback
        report.problems.append(f"the drill stopped: {type(error).__name__}: {error}")
        if report.archive and not (data_dir / "mesh.db").exists():
            models = restored_layout(data_dir, repository, work).parts["models"]
            report.problems.append(
                f"the data directory is not restored: meshserve restore {report.archive} "
                f"--data-dir {data_dir} --model-repository {models} --trusted "
                f"{work / 'trusted'} --kek-file {work / 'backup.kek'}, then start "
                f"`meshserve {' '.join(up.argv)}` again")
    finally:
        load.stopping = True
        await asyncio.gather(*callers, return_exceptions=True)
        await connection.close()
    report.load = load.counts()
    report.ok = not report.problems and report.recovery_s is not None
    return report


async def run_steps(data_dir: Path, repository: Path, work: Path, plan: Plan, up: UpProcess,
                    operator: TlsFiles, connection: Connection, request: pb.ModelInferRequest,
                    load: Load, report: Report, say) -> None:
    await asyncio.sleep(plan.steady_s)
    before = await observe(data_dir, repository, operator)
    kek_file = work / "backup.kek"
    model_files.ensure_kek(kek_file)
    trusted = work / "trusted"
    shutil.copytree(data_dir / "keys" / "trusted", trusted, dirs_exist_ok=True)
    # Submitted just before the backup, so that some are still pending in it.
    before_ids = await submit(connection.get(), request, plan.before_backup)
    report.submissions_before = len(before_ids)
    started = time.monotonic()
    result = await asyncio.to_thread(
        create_backup, Layout.of(data_dir, model_repository=repository), work,
        model_files.signing_key(data_dir / "keys" / "signing.key"),
        kek=model_files.read_kek(kek_file), actor="meshserve drill")
    report.backup_s = time.monotonic() - started
    report.archive, report.archive_bytes = str(result.path), result.size
    report.recovery_point = result.point.describe()
    say(f"  backup     {report.backup_s:6.2f} s  {result.path.name}: {result.size:,} bytes; "
        f"recovery point {report.recovery_point}; submissions {result.manifest['submissions']}")
    scratch = work / "trial-restore"
    trial = await asyncio.to_thread(restore_backup, result.path, Layout.of(scratch),
                                    model_files.trusted_signers(trusted),
                                    kek=model_files.read_kek(kek_file), actor="meshserve drill")
    shutil.rmtree(scratch)
    if not trial.ok:
        report.problems += [f"trial restore: {problem}" for problem in trial.problems]
        return
    after_ids = await submit(connection.get(), request, plan.after_backup)
    report.submissions_after = len(after_ids)
    await asyncio.sleep(plan.steady_s)

    killed_at = time.monotonic()
    report.processes_killed = await asyncio.to_thread(kill_all, up)
    dead_at = time.monotonic()
    shutil.rmtree(data_dir)
    say(f"  kill       every process ({report.processes_killed}) SIGKILLed; {data_dir} "
        "deleted")
    started = time.monotonic()
    layout = restored_layout(data_dir, repository, work)
    shutil.rmtree(layout.parts["models"], ignore_errors=True)  # an earlier drill's copy
    restored = await asyncio.to_thread(restore_backup, result.path, layout,
                                       model_files.trusted_signers(trusted),
                                       kek=model_files.read_kek(kek_file),
                                       actor="meshserve drill")
    report.restore_s = time.monotonic() - started
    report.restored_s = time.monotonic() - killed_at
    report.problems += [f"restored audit chain: {problem}" for problem in restored.problems]
    if layout.parts["models"] != repository:  # the archive's copy, checked, then dropped
        report.problems += copy_differences(before, layout.parts["models"])
        shutil.rmtree(layout.parts["models"])
    say(f"  restore    {report.restore_s:6.2f} s  audit chain of {restored.entries} entries "
        f"{'intact' if restored.ok else 'BROKEN'}")
    report.up_pid = start_again(up, data_dir).pid
    say(f"  start      meshserve up again (pid {report.up_pid}, log {data_dir}/run/up.log)")
    deadline = killed_at + plan.timeout_s
    # Calls sent before every process was dead may still be answered by the old mesh.
    while (first := load.first_success_after(dead_at)) is None:
        if time.monotonic() > deadline:
            report.problems.append(f"no successful inference within {plan.timeout_s:.0f} s "
                                   "of the kill")
            return
        await asyncio.sleep(0.05)
    report.recovery_s = first - killed_at
    say(f"  recovered  first successful inference {report.recovery_s:.2f} s after the kill")
    await check(data_dir, repository, operator, connection, before, result, before_ids,
                after_ids, plan, report, say)
    await asyncio.sleep(plan.steady_s)


async def check(data_dir: Path, repository: Path, operator: TlsFiles, connection: Connection,
                before: Observed, result, before_ids: list[str], after_ids: list[str],
                plan: Plan, report: Report, say) -> None:
    report.versions_ready, waiting = await wait_all_ready(connection.get(), plan.timeout_s)
    report.problems += [f"model {name} is not ready" for name in waiting]
    await wait_port(data_dir / "run" / "control-plane.port", plan.timeout_s)
    report.problems += differences(before, await observe(data_dir, repository, operator))
    async with control_plane(data_dir, operator) as channel:
        audit = await AdminStub(channel).Audit(admin_pb2.AuditRequest(
            verify=True, anchor=result.point.audit_head if result.point.audit_seq else ""),
            timeout=30)
    report.audit_entries = len(audit.entries)
    report.problems += [f"audit chain: {problem}" for problem in audit.problems]
    later = [entry.action for entry in audit.entries if entry.seq > result.point.audit_seq]
    if "backup.restore" not in later[:1]:
        report.problems.append(f"audit chain: the entry after the recovery point is {later[:1]}, "
                               "not backup.restore")
    kept = await answers(connection.get(), before_ids, plan.timeout_s)
    lost = await answers(connection.get(), after_ids, 30.0)
    report.submissions_kept = kept["DONE"]
    report.submissions_after_lost = lost["NOT_FOUND"]
    if kept["DONE"] != len(before_ids):
        report.problems.append(f"submissions accepted before the backup: {dict(kept)}")
    say(f"  checked    routes {len(before.routes)}, canaries {len(before.canaries)}, registry "
        f"rows {len(before.registry)}, model files {len(before.model_files)}; "
        f"{report.versions_ready} versions ready; audit {report.audit_entries} entries")


async def wait_port(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def summary(report: Report) -> str:
    load = ", ".join(f"{code} {count}" for code, count in sorted(report.load.items()))
    recovery = f"{report.recovery_s:.2f} s" if report.recovery_s is not None else "none"
    restored = f"{report.restored_s:.2f} s" if report.restored_s is not None else "never"
    lines = [
        f"recovery time (kill -> first successful inference): {recovery} (state restored "
        f"{restored} after the kill; the rest is `up` starting every service)",
        f"submissions kept: {report.submissions_kept} of {report.submissions_before} accepted "
        f"before the backup; {report.submissions_after_lost} of {report.submissions_after} "
        "accepted after it lost (past the recovery point)",
        f"archive: {report.archive_bytes:,} bytes ({report.archive})",
        f"recovery point: {report.recovery_point}",
        f"load during the drill: {load}",
    ]
    lines += [f"PROBLEM: {problem}" for problem in report.problems]
    lines.append("drill passed" if report.ok else "drill FAILED")
    if report.up_pid:
        lines.append(f"meshserve up runs again (pid {report.up_pid}); stop it with "
                     f"kill -TERM {report.up_pid}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    data_dir = args.data_dir.resolve()
    UpProcess.find(data_dir)  # before making anything
    if args.work_dir and args.work_dir.resolve().is_relative_to(data_dir):
        print(f"error: --work-dir {args.work_dir} is inside {data_dir}, which the drill "
              "deletes (with the archive and its key in it)", file=sys.stderr)
        return 2
    try:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="meshserve-drill-"))
        work.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: cannot make the work directory {error.filename or args.work_dir}: "
              f"{error.strerror}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else Plan()
    report = asyncio.run(drill(data_dir, work.resolve(), plan, args.model))
    print(summary(report), flush=True)
    if args.report:
        args.report.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.ok else 1


def register(commands) -> None:
    parser = commands.add_parser("drill")
    parser.add_argument("--data-dir", type=Path, default=Path(".meshserve"),
                        help="the data directory of the running `meshserve up` (default "
                             "./.meshserve); it is deleted and restored")
    parser.add_argument("--quick", action="store_true",
                        help="shorter load and fewer submissions (for CI)")
    parser.add_argument("--model", default="mlp", help="the model the load calls (default mlp)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the archive, its key-encryption key and a copy of the "
                             "trusted key go (default a new temporary directory)")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the figures as JSON to this file")
    parser.set_defaults(func=run)
