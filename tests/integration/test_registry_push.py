"""PushModel at the control plane's real admin gRPC server (in process, mutual TLS, port 0),
called directly as a client that skips `meshserve models push` would: bytes that are not a
model of the model's kind are INVALID_ARGUMENT, and nothing is stored."""

from pathlib import Path

import grpc
import pytest

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.mesh.service import ControlPlaneSettings, build_service
from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools.certs import init_certs

CONFIG = """name: "mlp"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


@pytest.fixture
async def admin(tmp_path: Path):
    init_certs(tmp_path / "tls")
    (tmp_path / "models" / "mlp").mkdir(parents=True)
    (tmp_path / "models" / "mlp" / "config.pbtxt").write_text(CONFIG)
    service = build_service(ControlPlaneSettings(
        listen="127.0.0.1:0", tls=TlsFiles.for_identity(tmp_path / "tls", "control-plane"),
        store=str(tmp_path / "mesh.db"), model_repository=tmp_path / "models"))
    port = await service.start()
    channel = secure_channel(f"127.0.0.1:{port}",
                             TlsFiles.for_identity(tmp_path / "tls", "client"), "control-plane")
    try:
        yield AdminStub(channel)
    finally:
        await channel.close()
        await service.stop(0.5)


def stored_files(root: Path) -> list[str]:
    """Everything the registry could have written: the repository and the content store."""
    return sorted(str(p.relative_to(root)) for top in ("models", "registry")
                  for p in (root / top).rglob("*"))


async def test_a_text_file_pushed_as_torchscript_is_refused_and_nothing_stored(admin,
                                                                               tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello, wor")  # 10 bytes of text
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin.PushModel(pb.PushModelRequest(name="mlp", version="2",
                                                  artifact=text.read_bytes()), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "artifact is not a TorchScript archive (torch.jit.save writes a zip holding */data.pkl "
        "and */code/); model 'mlp' is declared TorchScript (platform \"pytorch_libtorch\" in "
        "its config.pbtxt)")
    assert stored_files(tmp_path) == ["models/mlp", "models/mlp/config.pbtxt"]
    listed = await admin.ListModels(pb.ListModelsRequest(), timeout=30)
    assert list(listed.versions) == []
    audit = await admin.Audit(pb.AuditRequest(), timeout=30)
    assert [e.action for e in audit.entries if e.action == "model.push"] == []
