"""The control plane's registry and the version-directory files, on a temporary directory."""

import io
import json
import os
import random
import re
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshserve.common import artifacts, model_files
from meshserve.common.artifacts import ArtifactRefused
from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.common.repository import ModelRepository
from meshserve.mesh.registry import (
    MAX_ARTIFACT_BYTES,
    MAX_CONFIG_BYTES,
    MAX_NAME_CHARS,
    MAX_NOTES_CHARS,
    MAX_SOURCE_CHARS,
    Push,
    Registry,
)
from meshserve.mesh.store import Store
from tests.onnx_models import fixed_shape_model
from tests.torchscript_models import torchscript_shaped

CONFIG = """name: "tiny"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""

PAYLOAD = b"not really torchscript, but bytes are bytes" * 50
PLAIN = torchscript_shaped(PAYLOAD)
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def tiny_repository(root: Path, version_1: bytes = b"v1") -> Path:
    """`root/models` with model `tiny` (version 1 unsigned, holding `version_1`), and in
    `root/keys` a KEK, a signing key and its public key trusted."""
    (root / "models" / "tiny" / "1").mkdir(parents=True)
    (root / "models" / "tiny" / "config.pbtxt").write_text(CONFIG)
    (root / "models" / "tiny" / "1" / "model.pt").write_bytes(version_1)
    model_files.ensure_kek(root / "keys" / "kek")
    key = model_files.signing_key(root / "keys" / "signing.key", create=True)
    model_files.trust(key, root / "keys" / "trusted")
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tiny_repository(tmp_path)


@pytest.fixture
def registry(data: Path):
    rng = random.Random(1)
    with Store.open(data / "mesh.db") as store:
        yield Registry(store, data / "models", data / "registry",
                       model_files.signing_key(data / "keys" / "signing.key"),
                       model_files.read_kek(data / "keys" / "kek"), clock=lambda: NOW,
                       random=rng.randbytes)


def trusted(data: Path) -> dict:
    return model_files.trusted_signers(data / "keys" / "trusted")


def test_keys_are_private_files(data: Path) -> None:
    assert (data / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert (data / "keys" / "kek").stat().st_mode & 0o777 == 0o600
    assert len(list((data / "keys" / "trusted").glob("ed25519-*.pub"))) == 1


def test_push_writes_a_signed_version_and_keeps_the_artifact(data: Path, registry) -> None:
    row = registry.push(Push("tiny", "2", PLAIN, source="git:abc", notes="acc 0.9"),
                        actor="client/developer")
    assert (row.name, row.version, row.digest, row.signer, row.pushed_by) == (
        "tiny", "2", artifacts.sha256_digest(PLAIN), registry.signer, "client/developer")
    version_dir = data / "models" / "tiny" / "2"
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "manifest.sig",
                                                             "model.pt"]
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "dims": [3]}]
    assert manifest["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "dims": [2]}]
    assert (manifest["source"], manifest["notes"], manifest["pushed_at"]) == (
        "git:abc", "acc 0.9", "2026-05-01T12:00:00.000000Z")
    assert (data / "registry" / "sha256" / row.digest[7:]).read_bytes() == PLAIN
    plain, _, signer = model_files.load_version(version_dir, "model.pt", trusted(data), None,
                                                True)
    assert (plain, signer) == (PLAIN, registry.signer)
    assert [(v.version, v.digest) for v in registry.versions("tiny")] == [("2", row.digest)]
    assert registry.show("tiny") == row
    config = ModelRepository.load(data / "models").get("tiny").config
    assert config.parameters["artifact_digest"].string_value == row.digest
    assert config.parameters["artifact_signer"].string_value == registry.signer
    assert config.parameters["artifact_digest.2"].string_value == row.digest
    assert "artifact_digest.1" not in config.parameters  # version 1 is unsigned


def test_encrypted_push_never_writes_plaintext(data: Path, registry) -> None:
    row = registry.push(Push("tiny", "3", PLAIN, encrypt=True), actor="ci")
    version_dir = data / "models" / "tiny" / "3"
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "manifest.sig",
                                                             "model.pt.enc"]
    for path in data.rglob("*"):
        if path.is_file():
            assert PAYLOAD[:40] not in path.read_bytes(), path
    kek = model_files.read_kek(data / "keys" / "kek")
    plain, manifest, _ = model_files.load_version(version_dir, "model.pt", trusted(data), kek,
                                                  True)
    assert plain == PLAIN and manifest["digest"] == row.digest
    # The registry row holds the signed manifest, without the wrapped key.
    assert "wrapped_key" not in json.loads(row.manifest)
    assert json.loads(row.manifest)["encryption"]["file"] == "model.pt.enc"
    with pytest.raises(ArtifactRefused, match="no key-encryption key was given"):
        model_files.load_version(version_dir, "model.pt", trusted(data), None, True)


@pytest.mark.parametrize("push, error, message", [
    (Push("tiny", "1", PLAIN), FailedPrecondition, "version 1 already exists in the repository"),
    (Push("tiny", "02", PLAIN), InvalidArgument, "positive integer without leading zeros"),
    (Push("tiny", "x", PLAIN), InvalidArgument, "not 'x'"),
    (Push("../etc", "2", PLAIN), InvalidArgument, "model name '../etc' must be"),
    (Push("tiny", "4", b""), InvalidArgument, "artifact is empty"),
    (Push("tiny", "4", b"x" * (MAX_ARTIFACT_BYTES + 1)), InvalidArgument,
     "one 64 MiB gRPC message"),
    (Push("other", "1", PLAIN), NotFound, "model 'other' is not in the repository; push its "
                                          "config.pbtxt with it"),
    (Push("tiny", "4", PLAIN, config="name: \"tiny\""), FailedPrecondition,
     "exists with a different config.pbtxt"),
    (Push("chain", "1", PLAIN, config=(
        'platform: "ensemble"\ninput { name: "x" data_type: TYPE_FP32 dims: [1] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [1] }\nensemble_scheduling { step {'
        ' model_name: "tiny" input_map { key: "a" value: "x" }'
        ' output_map { key: "b" value: "y" } } }')), FailedPrecondition,
     "model 'chain' is an ensemble: it has no artifact to push"),
])
def test_bad_pushes_are_refused(data: Path, registry, push, error, message) -> None:
    before = files_of(data)
    with pytest.raises(error, match=message):
        registry.push(push, actor="ci")
    assert_nothing_stored(data, registry, before)


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_nothing_stored(data: Path, registry, before: list[str]) -> None:
    """No version in the registry's rows, and no file written anywhere under the data
    directory but the store's own."""
    assert registry.versions() == []
    assert [f for f in files_of(data) if f not in before and not f.startswith("mesh.db")] == []


ONNX_CONFIG = 'name: "graph"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
PYTHON_CONFIG = CONFIG.replace('"tiny"', '"script"') + 'backend: "python"\n'
TEXT = b"hello, wor\n"  # 10 bytes of text


def state_dict_shaped() -> bytes:
    """What torch.save writes (data.pkl, no code/): weights, not a TorchScript model."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("tiny/data.pkl", b"weights")
    return buffer.getvalue()


TORCHSCRIPT_DECLARED = ("; model 'tiny' is declared TorchScript (platform \"pytorch_libtorch\" "
                        "in its config.pbtxt)")


@pytest.mark.parametrize("push, start, end", [
    (Push("tiny", "2", TEXT),
     "artifact is not a TorchScript archive (torch.jit.save writes a zip holding */data.pkl and "
     "*/code/)", TORCHSCRIPT_DECLARED),
    (Push("tiny", "2", state_dict_shaped()), "artifact is not a TorchScript archive ",
     TORCHSCRIPT_DECLARED),
    (Push("tiny", "2", fixed_shape_model()), "artifact is not a TorchScript archive ",
     TORCHSCRIPT_DECLARED),
    (Push("graph", "1", PLAIN, config=ONNX_CONFIG), "artifact: not an ONNX model (cannot parse",
     "; model 'graph' is declared ONNX (platform \"onnxruntime_onnx\" in its config.pbtxt)"),
    (Push("script", "1", b"def broken(:\n", config=PYTHON_CONFIG),
     "artifact is not a Python model (it does not compile: ",
     "; model 'script' is declared Python (backend \"python\" in its config.pbtxt)"),
    (Push("script", "1", b"print('x')\0", config=PYTHON_CONFIG),
     "artifact is not a Python model (it does not compile: ", "(backend \"python\" in its "
                                                              "config.pbtxt)"),
])
def test_an_artifact_not_of_its_models_kind_is_refused(data: Path, registry, push, start,
                                                       end) -> None:
    before = files_of(data)
    with pytest.raises(InvalidArgument) as raised:
        registry.push(push, actor="ci")
    message = raised.value.message
    assert message.startswith(start) and message.endswith(end), message
    assert_nothing_stored(data, registry, before)


def test_artifacts_of_each_kind_are_taken(data: Path, registry) -> None:
    registry.push(Push("graph", "1", fixed_shape_model(), config=ONNX_CONFIG), "ci")
    registry.push(Push("script", "1", b"class TritonPythonModel:\n    pass\n",
                       config=PYTHON_CONFIG), "ci")
    assert (data / "models" / "graph" / "1" / "model.onnx").read_bytes() == fixed_shape_model()
    assert (data / "models" / "script" / "1" / "model.py").is_file()
    assert [(v.name, v.version) for v in registry.versions()] == [("graph", "1"),
                                                                  ("script", "1")]


ESCAPING = CONFIG.replace('"tiny"', '"fresh"') + 'default_model_filename: "../../escaped.pt"\n'


@pytest.mark.parametrize("push, message", [
    (Push("tiny", "\u0661", PLAIN),  # ARABIC-INDIC DIGIT ONE: str.isdigit, but not a version
     "version must be a positive integer without leading zeros, at most 9223372036854775807, "
     "not '\u0661'"),
    (Push("tiny", "\u00b2", PLAIN), "version must be a positive integer"),
    (Push("tiny", "9223372036854775808", PLAIN),
     "at most 9223372036854775807, not '9223372036854775808'"),
    (Push("tiny", "1" * 5000, PLAIN), "not '1111111111111111111111111111111111111111...'"),
    (Push("t" * (MAX_NAME_CHARS + 1), "2", PLAIN),
     f"model name is {MAX_NAME_CHARS + 1} characters; at most {MAX_NAME_CHARS}"),
    (Push("tiny", "2", PLAIN, source="git:abc\x1b]2;owned\x07"),
     "source holds the control character '\\x1b'; source is plain text"),
    (Push("tiny", "2", PLAIN, source="s" * (MAX_SOURCE_CHARS + 1)),
     f"source is {MAX_SOURCE_CHARS + 1} characters; at most {MAX_SOURCE_CHARS}"),
    (Push("tiny", "2", PLAIN, notes="n" * (MAX_NOTES_CHARS + 1)),
     f"notes is {MAX_NOTES_CHARS + 1} characters; at most {MAX_NOTES_CHARS}"),
    (Push("tiny", "2", PLAIN, notes="line\rover"), "notes holds the control character '\\r'"),
    (Push("fresh", "1", PLAIN, config="#" * (MAX_CONFIG_BYTES + 1)),
     f"config is {MAX_CONFIG_BYTES + 1} bytes; a config.pbtxt has at most {MAX_CONFIG_BYTES}"),
    (Push("fresh", "1", PLAIN, config=ESCAPING),
     "config: default_model_filename '../../escaped.pt' must be a file name in the version "
     "directory (no '/', not manifest.json or manifest.sig)"),
    (Push("fresh", "1", PLAIN, config=ESCAPING.replace("../../escaped.pt", "manifest.json")),
     "config: default_model_filename 'manifest.json' must be a file name"),
    (Push("fresh", "1", PLAIN, config=CONFIG.replace('"tiny"', '"fresh"') +
          'platform: "tensorflow_graphdef"\n'),
     "config: platform 'tensorflow_graphdef' is not supported"),
    (Push("fresh", "1", PLAIN, config=CONFIG), "config: model name 'tiny' does not match its "
                                               "directory 'fresh'"),
])
def test_fields_a_push_cannot_carry_are_invalid_arguments(data: Path, registry, push,
                                                          message) -> None:
    before = files_of(data)
    with pytest.raises(InvalidArgument) as raised:
        registry.push(push, actor="ci")
    assert message in raised.value.message
    assert_nothing_stored(data, registry, before)


def test_notes_keep_lines_and_tabs(registry) -> None:
    row = registry.push(Push("tiny", "2", PLAIN, notes="top-1 0.91\n\tnot for x > 1e3"), "ci")
    assert json.loads(row.manifest)["notes"] == "top-1 0.91\n\tnot for x > 1e3"


def test_a_repository_config_naming_a_path_is_refused(data: Path, registry) -> None:
    config = data / "models" / "tiny" / "config.pbtxt"
    config.write_text(CONFIG + 'default_model_filename: "../model.pt"\n')
    before = files_of(data)
    with pytest.raises(FailedPrecondition, match=re.escape(
            f"{config}: default_model_filename '../model.pt' must be a file name")):
        registry.push(Push("tiny", "2", PLAIN), actor="ci")
    assert_nothing_stored(data, registry, before)


def test_push_of_a_new_model_with_its_config(data: Path, registry) -> None:
    registry.push(Push("fresh", "1", PLAIN, config=CONFIG.replace("tiny", "fresh")), "ci")
    assert ModelRepository.load(data / "models").get("fresh").versions == ("1",)


def test_versions_are_immutable(data: Path, registry) -> None:
    registry.push(Push("tiny", "2", PLAIN), "ci")
    os.rename(data / "models" / "tiny" / "2", data / "elsewhere")
    with pytest.raises(FailedPrecondition, match="already in the registry"):
        registry.push(Push("tiny", "2", b"other bytes"), "ci")


def test_no_kek_no_encryption(data: Path) -> None:
    with Store.open(data / "mesh.db") as store:
        registry = Registry(store, data / "models", data / "registry",
                            model_files.signing_key(data / "keys" / "signing.key"))
        with pytest.raises(FailedPrecondition, match="no key-encryption key"):
            registry.push(Push("tiny", "2", PLAIN, encrypt=True), "ci")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_repository_reports_each_problem(data: Path, registry) -> None:
    for version in ("2", "3", "4"):
        registry.push(Push("tiny", version, PLAIN, encrypt=version == "4"), "ci")
    models = data / "models"
    assert model_files.verify_repository(models, trusted(data), None) == [
        "tiny/1: unsigned (no manifest.json)"]
    flip_byte(models / "tiny" / "2" / "model.pt")
    manifest = json.loads((models / "tiny" / "3" / "manifest.json").read_text())
    manifest["digest"] = artifacts.sha256_digest(b"something else")
    (models / "tiny" / "3" / "manifest.json").write_text(json.dumps(manifest))
    flip_byte(models / "tiny" / "4" / "model.pt.enc")
    problems = model_files.verify_repository(models, trusted(data), None)
    assert problems[0] == "tiny/1: unsigned (no manifest.json)"
    assert problems[1].startswith("tiny/2: artifact digest sha256:")
    assert problems[2].startswith("tiny/3: manifest signature does not verify")
    assert problems[3].startswith("tiny/4: encrypted artifact digest sha256:")
    assert len(problems) == 4


@pytest.mark.parametrize("require_signed, outcome", [
    (False, "path"),
    (True, "manifest.json is missing and signed artifacts are required (--require-signed)"),
])
def test_unsigned_versions(data: Path, require_signed, outcome) -> None:
    version_dir = data / "models" / "tiny" / "1"
    if outcome == "path":
        assert model_files.load_version(version_dir, "model.pt", trusted(data), None,
                                        require_signed) == (version_dir / "model.pt", None, "")
    else:
        with pytest.raises(ArtifactRefused, match=re.escape(outcome)):
            model_files.load_version(version_dir, "model.pt", trusted(data), None,
                                     require_signed)


def test_kek_path_prefers_the_flag(tmp_path: Path) -> None:
    assert model_files.kek_path(tmp_path / "a", {"MESHSERVE_KEK_FILE": "b"}) == tmp_path / "a"
    assert model_files.kek_path(None, {"MESHSERVE_KEK_FILE": "b"}) == Path("b")
    assert model_files.kek_path(None, {}) is None
    with pytest.raises(FailedPrecondition, match="cannot read the key-encryption key"):
        model_files.read_kek(tmp_path / "missing")
