"""`meshserve models …`: the model registry.

    push PATH --name M --version V [--source URI] [--notes TEXT] [--encrypt] [--config F]
    list [M]                      the catalog: every pushed version with digest and signer
    show M [--version V]          one version's signed manifest
    fetch M [--version V] -o FILE [--trusted F ...]
                                  the artifact as stored (0600), FILE.manifest.json and
                                  FILE.sig beside it; with --trusted, checked before writing
    verify DIR [--trusted F ...]  offline: every version's signature and digests
    rewrap DIR --old-kek F --new-kek F   re-wrap data keys under a new KEK, no re-encryption

push, list, show and fetch talk to the control plane's admin API over mutual TLS (as `meshserve
traffic` does); verify and rewrap read a model repository directly, and fail on a path that
holds no model versions. push first checks the file by its name: TorchScript (a zip archive
as torch.jit.save writes it), `.onnx` (parses as ONNX) or `.py` (compiles), with the check
(`meshserve.common.model_check`) the control plane makes again against the model's
config.pbtxt before it stores anything.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc

from meshserve.common import artifacts, model_check, model_files
from meshserve.common.errors import FailedPrecondition, ServingError
from meshserve.common.files import write_atomic
from meshserve.common.model_check import MAX_ARTIFACT_BYTES
from meshserve.common.repository import ONNX, PYTHON, TORCHSCRIPT, Kind, ModelRepository
from meshserve.mesh.fetch import verify_fetched
from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools.checks import verdict
from meshserve.tools.connection import add_connection_flags
from meshserve.tools.traffic import admin_channel, control_plane_address, operator_tls


def format_versions(versions) -> str:
    lines = [f"{'model':<12} {'version':>7}  {'digest':<21} {'signer':<24} {'enc':<3}  "
             f"{'pushed by':<18} pushed at"]
    for v in versions:
        encrypted = "yes" if json.loads(v.manifest).get("encryption") else "no"
        lines.append(f"{v.name:<12} {v.version:>7}  {artifacts.short(v.digest):<21} "
                     f"{v.signer:<24} {encrypted:<3}  {v.pushed_by:<18} {v.pushed_at}")
    return "\n".join(lines) if versions else "no pushed versions"


def format_version(version: pb.ModelVersion) -> str:
    manifest = json.loads(version.manifest)
    encryption = manifest.get("encryption")
    return "\n".join([
        f"{version.name} version {version.version}",
        f"  digest     {version.digest}",
        f"  signer     {version.signer}",
        f"  pushed by  {version.pushed_by} at {version.pushed_at}",
        f"  source     {manifest.get('source') or '-'}",
        f"  notes      {manifest.get('notes') or '-'}",
        f"  encrypted  {encryption['algorithm'] if encryption else 'no'}",
        "  manifest   " + json.dumps(manifest, sort_keys=True, indent=2).replace("\n", "\n  ")])


def read_artifact(path: Path) -> bytes:
    """The file to push, refused (FailedPrecondition) unless it looks like a model."""
    size = path.stat().st_size
    if size > MAX_ARTIFACT_BYTES:
        raise SystemExit(f"error: {path} is {size} bytes; a push carries at most "
                         f"{MAX_ARTIFACT_BYTES} (one 64 MiB gRPC message)")
    data = path.read_bytes()
    refusal = artifact_refusal(path, data)
    if refusal:
        raise FailedPrecondition(f"{refusal}; nothing was pushed")
    return data


def kind_of_file(path: Path) -> Kind:
    """The kind of model a file's name says: `.onnx` ONNX, `.py` Python, else TorchScript."""
    return {".onnx": ONNX, ".py": PYTHON}.get(path.suffix.lower(), TORCHSCRIPT)


def artifact_refusal(path: Path, data: bytes) -> str | None:
    """Why `data` is not a model of the kind its name says, or None (the control plane makes
    the same check against the model's config.pbtxt)."""
    kind = kind_of_file(path)
    refusal = model_check.refusal(kind, data, str(path))
    if refusal and kind is TORCHSCRIPT:
        refusal += "; an ONNX model's file ends in .onnx, a Python model's in .py"
    return refusal


async def call(args: argparse.Namespace) -> str:
    artifact = read_artifact(args.path) if args.action == "push" else b""  # checked first
    async with admin_channel(control_plane_address(args), operator_tls(args)) as channel:
        admin = AdminStub(channel)
        if args.action == "push":
            reply = await admin.PushModel(pb.PushModelRequest(
                name=args.name, version=args.version, artifact=artifact,
                source=args.source, notes=args.notes, encrypt=args.encrypt,
                config=args.config.read_text("utf-8") if args.config else ""), timeout=120)
            encrypted = " (encrypted)" if args.encrypt else ""
            return (f"pushed {reply.name} version {reply.version}{encrypted}: {reply.digest}, "
                    f"signed by {reply.signer}")
        if args.action == "list":
            reply = await admin.ListModels(pb.ListModelsRequest(name=args.model or ""))
            return format_versions(reply.versions)
        if args.action == "show":
            return format_version(await admin.ShowModel(pb.ShowModelRequest(
                name=args.model, version=args.version)))
        if args.action == "fetch":
            return save_fetched(await admin.FetchModel(pb.FetchModelRequest(
                name=args.model, version=args.version), timeout=120), args.output,
                args.trusted)
        raise AssertionError(args.action)


def fetched_paths(output: Path) -> tuple[Path, Path, Path]:
    """The artifact, its manifest and its signature: FILE, FILE.manifest.json, FILE.sig."""
    return output, output.with_name(output.name + ".manifest.json"), \
        output.with_name(output.name + ".sig")


def save_fetched(reply: pb.FetchedModel, output: Path, trusted: list[Path] | None) -> str:
    """Write a fetched version (the artifact 0600), after checking it when `trusted` keys
    are given; nothing is written when the check fails."""
    checked = ""
    if trusted:
        signer = verify_fetched(reply.manifest, reply.signature, reply.artifact, trusted)
        checked = f", signature by {signer} and digest verified"
    artifact, manifest, signature = fetched_paths(output)
    write_atomic(artifact, reply.artifact, 0o600)
    write_atomic(manifest, reply.manifest)
    write_atomic(signature, reply.signature)
    encrypted = " (encrypted, as stored)" if reply.filename.endswith(
        artifacts.ENCRYPTED_SUFFIX) else ""
    return (f"fetched {reply.name} version {reply.version}{encrypted}: {reply.digest}, "
            f"{len(reply.artifact)} bytes to {artifact}{checked}")


def run(args: argparse.Namespace) -> int:
    try:
        print(asyncio.run(call(args)))
        return 0
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except ServingError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    except OSError as error:  # the file to push, its --config, or where a fetch writes
        print(f"error: {error}", file=sys.stderr)
        return 1


def no_versions(repository: Path, what: str) -> str | None:
    """Why `repository` cannot be verified or re-wrapped, or None: a mistyped path or an
    empty directory must not pass as a repository whose every version is fine."""
    if not repository.is_dir():
        return f"model repository {repository} is not a directory"
    if next(model_files.version_dirs(repository), None) is None:
        return (f"{repository} holds no model versions to {what} (expected "
                "MODEL/VERSION/ directories)")
    return None


def verify(args: argparse.Namespace) -> int:
    try:
        trusted = model_files.trusted_signers(args.trusted or
                                              [args.data_dir / "keys" / "trusted"])
        kek_file = model_files.kek_path(args.kek_file, {})
        kek = model_files.read_kek(kek_file) if kek_file else None
        if refusal := no_versions(args.repository, "verify"):
            raise FailedPrecondition(refusal)
        ensembles = frozenset(ModelRepository.load(args.repository).ensembles())
    except ServingError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    checked = []
    problems = model_files.verify_repository(args.repository, trusted, kek,
                                             lambda m, v: checked.append(f"{m}/{v}"),
                                             without_artifact=ensembles)
    if not checked and not problems:  # only ensembles, which carry no artifact
        print(f"error: {args.repository} holds no model versions with an artifact to "
              "verify", file=sys.stderr)
        return 1
    return verdict(problems, f"ok: {len(checked)} versions verified ({', '.join(checked)})")


def rewrap(args: argparse.Namespace) -> int:
    try:
        old, new = model_files.read_kek(args.old_kek), model_files.read_kek(args.new_kek)
        if refusal := no_versions(args.repository, "re-wrap"):
            raise FailedPrecondition(refusal)
    except ServingError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    versions = list(model_files.version_dirs(args.repository))
    failures = encrypted = 0
    for model, version, version_dir in versions:
        path = version_dir / artifacts.MANIFEST_FILENAME
        if not path.is_file():
            continue
        try:
            manifest = artifacts.parse_manifest(path.read_bytes())
            if not manifest.get("wrapped_key"):
                continue
            encrypted += 1
            if manifest["wrapped_key"].get("kek_id") == artifacts.kek_id(new):
                print(f"{model}/{version}: already wrapped by {artifacts.kek_id(new)}")
                continue
            write_atomic(path, artifacts.manifest_bytes(
                artifacts.rewrap(manifest, old, new)))
            print(f"{model}/{version}: data key re-wrapped under {artifacts.kek_id(new)}")
        except ServingError as error:
            failures += 1
            print(f"{model}/{version}: {error.message}")
    if not encrypted:
        print(f"nothing to re-wrap: none of the {len(versions)} versions in "
              f"{args.repository} is encrypted")
    return 1 if failures else 0


def register(commands) -> None:
    models = commands.add_parser("models")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = actions.add_parser("push", help="store a version with a signed manifest")
    push.add_argument("path", type=Path, help="the TorchScript file")
    push.add_argument("--name", required=True)
    push.add_argument("--version", required=True)
    push.add_argument("--source", default="", help="URI, training run or commit")
    push.add_argument("--notes", default="", help="accuracy, known limits")
    push.add_argument("--encrypt", action="store_true",
                      help="store it encrypted under the control plane's KEK")
    push.add_argument("--config", type=Path, help="config.pbtxt of a model not yet in the "
                                                  "repository")
    listing = actions.add_parser("list", help="every pushed version")
    listing.add_argument("model", nargs="?")
    show = actions.add_parser("show", help="one version's manifest (default: the latest)")
    show.add_argument("model")
    show.add_argument("--version", default="")
    fetch = actions.add_parser("fetch", help="take a version's artifact as stored, with its "
                                             "manifest and signature")
    fetch.add_argument("model")
    fetch.add_argument("--version", default="", help="default: the highest signed version")
    fetch.add_argument("-o", "--output", type=Path, required=True,
                       help="the artifact's file; FILE.manifest.json and FILE.sig beside it")
    fetch.add_argument("--trusted", type=Path, action="append",
                       help="verify the signature and digest with these public key(s) (a "
                            "PEM file or a directory of *.pub) before writing")
    for parser in (push, listing, show, fetch):
        add_connection_flags(parser)
        parser.set_defaults(func=run)

    check = actions.add_parser("verify", help="check a repository's signatures and digests "
                                              "offline (exit 1 on problems)")
    check.add_argument("repository", type=Path)
    check.add_argument("--trusted", type=Path, action="append",
                       help="trusted public key(s): a PEM file or a directory of *.pub "
                            "(default: DATA_DIR/keys/trusted)")
    check.add_argument("--kek-file", type=Path,
                       help="also decrypt encrypted artifacts and check the plaintext digest")
    check.add_argument("--data-dir", type=Path, default=Path(".meshserve"))
    check.set_defaults(func=verify)
    wrap = actions.add_parser("rewrap", help="re-wrap encrypted artifacts' data keys under a "
                                             "new key-encryption key")
    wrap.add_argument("repository", type=Path)
    wrap.add_argument("--old-kek", type=Path, required=True)
    wrap.add_argument("--new-kek", type=Path, required=True)
    wrap.set_defaults(func=rewrap)
