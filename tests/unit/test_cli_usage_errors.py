"""Commands given what cannot work say so in a line and exit non-zero, without a traceback."""

import io
import zipfile

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.tools.certs import init_certs
from meshserve.tools.cli import main
from tests.torchscript_models import torchscript_bytes


@pytest.mark.parametrize("argv, refusal", [
    (["token", "issue", "--subject", ""], "argument --subject: must not be empty"),
    (["token", "issue", "--subject", "  "], "argument --subject: must not be empty"),
    (["token", "rotate-key", "--keep", "0"],
     "argument --keep: must be a whole number of at least 1, not '0'"),
    (["token", "issue", "--subject", "app/a", "--scope", "bogus"],
     "argument --scope: unknown action(s) bogus; known: admin, audit:read, audit:write, "
     "infer, models:fetch, models:read, models:write, traffic:write"),
    (["token", "issue", "--subject", "app/a", "--scope", "infer models:reed"],
     "argument --scope: unknown action(s) models:reed; known: admin, "),
    (["token", "issue", "--subject", "app/a", "--ttl", "99999d"],
     "argument --ttl: '99999d' is longer than the 365d a token may live"),
    (["token", "issue", "--subject", "app/a", "--ttl", "366d"],
     "argument --ttl: '366d' is longer than the 365d a token may live"),
    (["audit", "tail", "-n", "-3"],
     "argument -n: must be a whole number of at least 0, not '-3'"),
])
def test_usage_errors_name_the_argument(argv, refusal, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert refusal in capsys.readouterr().err


def test_models_verify_of_a_missing_repository(tmp_path, capsys):
    trusted = tmp_path / "signer.pub"
    trusted.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    missing = tmp_path / "nowhere"
    assert main(["models", "verify", str(missing), "--trusted", str(trusted)]) == 2
    assert capsys.readouterr().err == f"error: model repository {missing} is not a directory\n"


def test_models_push_of_a_missing_file(tmp_path, capsys):
    init_certs(tmp_path / "tls")  # the operator's certificate; the file is read first
    missing = tmp_path / "model.pt"
    assert main(["models", "push", str(missing), "--name", "mlp", "--version", "3",
                 "--data-dir", str(tmp_path), "--control-plane", "127.0.0.1:9"]) == 1
    assert capsys.readouterr().err == \
        f"error: [Errno 2] No such file or directory: '{missing}'\n"


@pytest.mark.parametrize("written", ["{}", "sqlite:///{}"])
def test_audit_verify_of_a_missing_store_neither_passes_nor_creates_it(tmp_path, capsys,
                                                                       written):
    store = tmp_path / "typo" / "mesh.db"
    assert main(["audit", "verify", "--store", written.format(store)]) == 2
    assert capsys.readouterr().err == f"error: no store at {store}\n"
    assert not store.parent.exists()


def test_up_with_a_data_directory_it_cannot_write(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["up", "--data-dir", str(blocker / "data"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 20] Not a directory: ") and str(blocker) in err


def test_token_rotate_key_without_a_key_set_creates_none(tmp_path, capsys):
    typo = tmp_path / "TYPO"
    assert main(["token", "rotate-key", "--data-dir", str(typo)]) == 1
    assert capsys.readouterr().err == (
        f"error: no key set to rotate: {typo / 'auth' / 'signing.key'} does not exist (is "
        "--data-dir right? --create starts a new key set)\n")
    assert not typo.exists()
    assert main(["token", "rotate-key", "--create", "--data-dir", str(typo)]) == 0
    assert capsys.readouterr().out.startswith(f"new key set in {typo / 'auth'}: signing key ")
    assert main(["token", "rotate-key", "--data-dir", str(typo)]) == 0
    assert capsys.readouterr().out.startswith("new signing key ")


def public_key_file(path):
    path.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize("contents", [{}, {"f.pt": b"0123456789", "notes": {}}])
def test_models_verify_and_rewrap_of_a_directory_without_versions_fail(tmp_path, capsys,
                                                                       contents):
    """A mistyped path must not pass a gate: no versions found is a failure, not 'ok: 0'."""
    repository = tmp_path / "repo"
    repository.mkdir()
    for name, data in contents.items():
        (repository / name).mkdir() if data == {} else (repository / name).write_bytes(data)
    trusted = public_key_file(tmp_path / "signer.pub")
    assert main(["models", "verify", str(repository), "--trusted", str(trusted)]) == 2
    assert capsys.readouterr() == ("", f"error: {repository} holds no model versions to verify "
                                       "(expected MODEL/VERSION/ directories)\n")
    kek = tmp_path / "kek"
    kek.write_bytes(bytes(32))
    assert main(["models", "rewrap", str(repository), "--old-kek", str(kek),
                 "--new-kek", str(kek)]) == 2
    assert capsys.readouterr() == ("", f"error: {repository} holds no model versions to "
                                       "re-wrap (expected MODEL/VERSION/ directories)\n")


def test_models_rewrap_of_a_missing_repository(tmp_path, capsys):
    kek = tmp_path / "kek"
    kek.write_bytes(bytes(32))
    missing = tmp_path / "nowhere"
    assert main(["models", "rewrap", str(missing), "--old-kek", str(kek),
                 "--new-kek", str(kek)]) == 2
    assert capsys.readouterr() == ("", f"error: model repository {missing} is not a "
                                       "directory\n")


def test_models_rewrap_says_when_nothing_is_encrypted(tmp_path, capsys):
    (tmp_path / "repo" / "mlp" / "1").mkdir(parents=True)
    kek = tmp_path / "kek"
    kek.write_bytes(bytes(32))
    assert main(["models", "rewrap", str(tmp_path / "repo"), "--old-kek", str(kek),
                 "--new-kek", str(kek)]) == 0
    assert capsys.readouterr().out == \
        f"nothing to re-wrap: none of the 1 versions in {tmp_path / 'repo'} is encrypted\n"


def state_dict_bytes() -> bytes:
    """What torch.save writes (a zip with data.pkl but no code/): weights, not a model."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("archive/data.pkl", "archive/version", "archive/data/0"):
            archive.writestr(name, b"x")
    return buffer.getvalue()


def push(tmp_path, name: str, data: bytes, certificates: bool = True) -> int:
    if certificates:
        init_certs(tmp_path / "tls")  # the operator's certificate
    path = tmp_path / name
    path.write_bytes(data)
    return main(["models", "push", str(path), "--name", "mlp", "--version", "5",
                 "--data-dir", str(tmp_path), "--control-plane", "127.0.0.1:9"])


@pytest.mark.parametrize(("name", "data", "refusal"), [
    ("f.pt", b"0123456789", " is not a TorchScript archive"),
    ("weights.pt", state_dict_bytes(), " is not a TorchScript archive"),
    ("model.onnx", b"0123456789", ": not an ONNX model"),
    ("model.py", b"def broken(:\n", " is not a Python model (it does not compile: "),
])
def test_models_push_refuses_a_file_that_is_not_a_model_before_sending_it(tmp_path, capsys,
                                                                          name, data,
                                                                          refusal):
    assert push(tmp_path, name, data, certificates=False) == 1  # checked before anything
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / name}{refusal}"), err
    assert err.endswith("; nothing was pushed\n") and "UNAVAILABLE" not in err


@pytest.mark.parametrize(("name", "data"), [
    ("model.pt", torchscript_bytes()), ("model.py", b"class TritonPythonModel:\n    pass\n")])
def test_models_push_sends_a_model(tmp_path, capsys, name, data):
    assert push(tmp_path, name, data) == 1  # no control plane at port 9: the check passed
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")
