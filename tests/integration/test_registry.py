"""The model registry against `meshserve up` (a data directory of its own, since the tests
tamper with its files and its audit log): an encrypted push, compute verifying before it
loads, tampered versions refused while the mesh keeps serving, offline verification and the
audit log's chain."""

import contextlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common import artifacts
from meshserve.common.audit_client import record
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import health_pb2
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.protocol.health_pb2_grpc import HealthStub
from meshserve.tools.demo_models import build_model, torchscript_bytes
from tests.integration.conftest import Mesh, meshserve, running_mesh
from tests.integration.test_mesh import mlp_request, public_stub
from tests.polling import until

WAIT_S = 90.0
ROW = numpy.linspace(-1.0, 1.0, 256, dtype=numpy.float32).reshape(1, 256)


@pytest.fixture(scope="module")
def registry_mesh(tmp_path_factory) -> Mesh:
    data_dir = tmp_path_factory.mktemp("registry") / "data"
    with running_mesh(data_dir) as started:
        yield started


@pytest.fixture(scope="module")
def pushed(registry_mesh: Mesh, tmp_path_factory) -> tuple[Path, str]:
    """mlp version 3 (the demo's version 1 weights, saved again), pushed encrypted."""
    path = tmp_path_factory.mktemp("artifact") / "mlp-retrained.pt"
    path.write_bytes(torchscript_bytes(build_model("mlp", 1)))
    done = meshserve("models", "push", str(path), "--name", "mlp", "--version", "3",
                     "--encrypt", "--source", "git:0123abc", "--notes", "accuracy 0.91",
                     "--data-dir", str(registry_mesh.data_dir))
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"pushed mlp version 3 \(encrypted\): (sha256:[0-9a-f]{64}), signed "
                         r"by (ed25519:[0-9a-f]{16})\n", done.stdout)
    assert match, done.stdout
    assert match.group(1) == artifacts.sha256_digest(path.read_bytes())
    return path, match.group(1)


def local_forward(path: Path) -> numpy.ndarray:
    module = torch.jit.load(str(path)).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(ROW)).numpy()


def test_push_is_listed_and_stored_encrypted(registry_mesh: Mesh, pushed) -> None:
    path, digest = pushed
    data_dir = registry_mesh.data_dir
    listing = meshserve("models", "list", "--data-dir", str(data_dir))
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.startswith("mlp "))
    assert line.split()[:5] == ["mlp", "3", artifacts.short(digest),
                                line.split()[3], "yes"]
    assert line.split()[3].startswith("ed25519:")
    shown = meshserve("models", "show", "mlp", "--version", "3", "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    assert f"  digest     {digest}\n" in shown.stdout
    assert "  source     git:0123abc\n" in shown.stdout
    assert "  notes      accuracy 0.91\n" in shown.stdout
    assert "  encrypted  AES-256-GCM\n" in shown.stdout
    missing = meshserve("models", "show", "mlp", "--version", "9", "--data-dir", str(data_dir))
    assert missing.returncode == 1
    assert missing.stderr.strip() == ("error: NOT_FOUND: model 'mlp' has no pushed version '9' "
                                      "(pushed: 3)")
    again = meshserve("models", "push", str(path), "--name", "mlp", "--version", "3",
                      "--data-dir", str(data_dir))
    assert again.returncode == 1
    assert "FAILED_PRECONDITION: model 'mlp' version 3 already exists" in again.stderr
    version_dir = data_dir / "models" / "mlp" / "3"
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "manifest.sig",
                                                             "model.pt.enc"]
    plain = path.read_bytes()
    for stored in [*version_dir.iterdir(), *(data_dir / "registry").rglob("*")]:
        if stored.is_file():
            assert plain[-4096:] not in stored.read_bytes(), stored


async def test_model_config_carries_digest_and_signer(registry_mesh: Mesh) -> None:
    manifest = json.loads((registry_mesh.data_dir / "models" / "mlp" / "2" /
                           "manifest.json").read_text())
    assert manifest["source"] == "meshserve up (development)"
    channel, stub = await public_stub(registry_mesh)
    async with channel:
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert config.parameters["artifact_digest"].string_value == manifest["digest"]
    assert config.parameters["artifact_signer"].string_value.startswith("ed25519:")


@contextlib.contextmanager
def compute(mesh: Mesh, repository: Path, name: str):
    """A compute process on mlp version 3 of `repository`, verifying with the mesh's keys."""
    run = mesh.data_dir / "run"
    port_file, log = run / f"{name}.port", run / f"{name}.log"
    tls, keys = mesh.data_dir / "tls", mesh.data_dir / "keys"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshserve.tools.cli", "compute",
             f"--model-repository={repository}", "--model=mlp", "--version=3",
             "--device=cpu", f"--trusted-signers={keys / 'trusted'}", "--require-signed",
             f"--kek-file={keys / 'kek'}", "--listen=127.0.0.1:0", f"--port-file={port_file}",
             f"--tls-cert={tls / 'compute.crt'}", f"--tls-key={tls / 'compute.key'}",
             f"--tls-ca={tls / 'ca.crt'}", "--log-format=text"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_S
        while not port_file.exists() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert port_file.exists(), log.read_text()
        yield process, f"127.0.0.1:{int(port_file.read_text())}", log
    finally:
        process.kill()
        process.wait()


def batcher_channel(mesh: Mesh, address: str) -> grpc.aio.Channel:
    """Compute answers only the batcher identity."""
    return secure_channel(address, TlsFiles.for_identity(mesh.tls, "batcher"), "compute")


async def health(channel: grpc.aio.Channel) -> int:
    reply = await HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return reply.status


async def test_compute_decrypts_in_memory_and_answers_as_torch(registry_mesh: Mesh,
                                                               pushed) -> None:
    path, digest = pushed
    with compute(registry_mesh, registry_mesh.data_dir / "models", "compute-encrypted") as (
            _, address, log):
        async with batcher_channel(registry_mesh, address) as channel:
            async def serving() -> bool:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    return await health(channel) == health_pb2.HealthCheckResponse.SERVING
                return False

            await until(serving, WAIT_S, f"compute on the encrypted version ({log})", interval=0.2)
            request = pb.ModelInferRequest(model_name="mlp", model_version="3")
            request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
            request.raw_input_contents.append(ROW.tobytes())
            reply = await GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        output = numpy.frombuffer(reply.raw_output_contents[0], numpy.float32).reshape(1, 10)
        numpy.testing.assert_allclose(output, local_forward(path), rtol=1e-5, atol=1e-6)
        text = log.read_text()
        assert f"artifact {digest} verified, signed by ed25519:" in text


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def tampered_copies(mesh: Mesh) -> dict[str, tuple[Path, str]]:
    """Three repositories holding a damaged copy of mlp version 3, with the expected reason."""
    source = mesh.data_dir / "models" / "mlp"
    copies = {}
    for case in ("flipped", "unknown-signer", "digest-edited"):
        repository = mesh.data_dir / "tampered" / case
        shutil.rmtree(repository, ignore_errors=True)
        (repository / "mlp").mkdir(parents=True)
        shutil.copy(source / "config.pbtxt", repository / "mlp" / "config.pbtxt")
        shutil.copytree(source / "3", repository / "mlp" / "3")
        copies[case] = repository
    version = {case: repo / "mlp" / "3" for case, repo in copies.items()}
    flip_byte(version["flipped"] / "model.pt.enc")
    manifest = json.loads((version["unknown-signer"] / "manifest.json").read_text())
    stranger = Ed25519PrivateKey.generate()
    (version["unknown-signer"] / "manifest.sig").write_bytes(artifacts.sign(manifest, stranger))
    edited = json.loads((version["digest-edited"] / "manifest.json").read_text())
    edited["digest"] = artifacts.sha256_digest(b"another model")
    (version["digest-edited"] / "manifest.json").write_text(json.dumps(edited))
    return {
        "flipped": (copies["flipped"],
                    r"encrypted artifact digest sha256:[0-9a-f]{12}\.\. does not match the "
                    r"manifest's sha256:[0-9a-f]{12}\.\."),
        "unknown-signer": (copies["unknown-signer"],
                           r"manifest signed by an unknown key \(key id "
                           + re.escape(artifacts.key_id(stranger.public_key())) + r"\)"),
        "digest-edited": (copies["digest-edited"],
                          r"manifest signature does not verify with key ed25519:[0-9a-f]{16}: "
                          r"the manifest was changed after signing"),
    }


async def test_tampered_versions_are_refused_while_the_mesh_serves(registry_mesh: Mesh,
                                                                   pushed) -> None:
    cases = tampered_copies(registry_mesh)
    with contextlib.ExitStack() as stack:
        started = {case: stack.enter_context(compute(registry_mesh, repository, f"bad-{case}"))
                   for case, (repository, _) in cases.items()}
        for case, (process, address, log) in started.items():
            reason = "refusing model 'mlp' version 3: " + cases[case][1]

            async def refused(log=log, reason=reason) -> bool:
                return re.search(reason, log.read_text()) is not None

            await until(refused, WAIT_S, f"{case}: the refusal in {log}", interval=0.2)
            assert process.poll() is None, f"{case}: compute exited"
            async with batcher_channel(registry_mesh, address) as channel:
                assert await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
                stub = GRPCInferenceServiceStub(channel)
                ready = await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="3"))
                assert ready.ready is False
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.ModelInfer(mlp_request(model_version="3"), timeout=5)
                assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert re.fullmatch(reason, raised.value.details()), raised.value.details()
        channel, stub = await public_stub(registry_mesh)
        async with channel:
            reply = await stub.ModelInfer(mlp_request(), timeout=10)
        assert reply.model_name == "mlp" and len(reply.raw_output_contents[0]) == 40

    for case, (repository, reason) in cases.items():
        checked = meshserve("models", "verify", str(repository), "--data-dir",
                            str(registry_mesh.data_dir))
        assert checked.returncode == 1, (case, checked.stdout)
        assert re.fullmatch("mlp/3: " + reason + "\n", checked.stdout), checked.stdout


def test_the_mesh_repository_verifies(registry_mesh: Mesh, pushed) -> None:
    data_dir = registry_mesh.data_dir
    for extra in ([], ["--kek-file", str(data_dir / "keys" / "kek")]):
        checked = meshserve("models", "verify", str(data_dir / "models"), "--data-dir",
                            str(data_dir), *extra)
        assert checked.returncode == 0, checked.stdout
        # Every version but the classify ensemble's, which has no artifact.
        assert checked.stdout.startswith("ok: 8 versions verified (cnn/1, cnn/2, mlp/1, mlp/2, "
                                         "mlp/3, mlp_onnx/1, postprocess/1, preprocess/1)")


def test_rewrap_moves_data_keys_to_a_new_kek(registry_mesh: Mesh, pushed, tmp_path) -> None:
    data_dir = registry_mesh.data_dir
    repository = tmp_path / "copy"
    shutil.copytree(data_dir / "models", repository)
    new_kek = tmp_path / "new.kek"
    new_kek.write_bytes(bytes(range(32)))
    before = (repository / "mlp" / "3" / "model.pt.enc").read_bytes()
    done = meshserve("models", "rewrap", str(repository), "--old-kek",
                     str(data_dir / "keys" / "kek"), "--new-kek", str(new_kek))
    assert done.returncode == 0, done.stdout
    assert done.stdout == (f"mlp/3: data key re-wrapped under "
                           f"{artifacts.kek_id(bytes(range(32)))}\n")
    assert (repository / "mlp" / "3" / "model.pt.enc").read_bytes() == before
    with_new = meshserve("models", "verify", str(repository), "--data-dir", str(data_dir),
                         "--kek-file", str(new_kek))
    assert with_new.returncode == 0, with_new.stdout
    with_old = meshserve("models", "verify", str(repository), "--data-dir", str(data_dir),
                         "--kek-file", str(data_dir / "keys" / "kek"))
    assert with_old.returncode == 1
    assert "mlp/3: the data key is wrapped by key-encryption key" in with_old.stdout


def test_events_are_recorded_by_operators_and_the_ingress_only(registry_mesh: Mesh) -> None:
    data_dir = registry_mesh.data_dir
    address = f"127.0.0.1:{(data_dir / 'run' / 'control-plane.port').read_text().strip()}"
    entry = record(address, TlsFiles.for_identity(data_dir / "tls", "client"), "token.issue",
                   "app/demo", "ttl 3600 s")
    assert (entry.action, entry.subject, entry.reason) == ("token.issue", "app/demo",
                                                           "ttl 3600 s")
    assert entry.actor.startswith("client")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        record(address, TlsFiles.for_identity(data_dir / "tls", "router"), "token.issue", "x")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_audit_tail_and_verify_then_an_edited_row_is_named(registry_mesh: Mesh,
                                                            pushed) -> None:
    data_dir = registry_mesh.data_dir
    tail = meshserve("audit", "tail", "-n", "200", "--data-dir", str(data_dir))
    assert tail.returncode == 0, tail.stderr
    push_line = next(line for line in tail.stdout.splitlines() if " model.push " in line)
    assert " mlp/3" in push_line
    assert re.search(r" client\S* +model\.push ", push_line), push_line
    intact = meshserve("audit", "verify", "--data-dir", str(data_dir))
    assert intact.returncode == 0, intact.stdout
    head = re.fullmatch(r"audit log intact: \d+ entries; head ([0-9a-f]{64})\n",
                        intact.stdout).group(1)
    anchored = meshserve("audit", "verify", "--anchor", head, "--data-dir", str(data_dir))
    assert anchored.returncode == 0, anchored.stdout
    seq = int(push_line.split()[0])
    with contextlib.closing(sqlite3.connect(data_dir / "mesh.db")) as db, db:
        db.execute("UPDATE audit_log SET reason = 'nothing to see' WHERE seq = ?", (seq,))
    broken = meshserve("audit", "verify", "--data-dir", str(data_dir))
    assert broken.returncode == 1
    assert broken.stdout == f"entry {seq} was altered\n"
    offline = meshserve("audit", "verify", "--store", str(data_dir / "mesh.db"))
    assert (offline.returncode, offline.stdout) == (1, f"entry {seq} was altered\n")
