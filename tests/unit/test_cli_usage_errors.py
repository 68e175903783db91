"""Commands given what cannot work say so in a line and exit non-zero, without a traceback."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.tools.certs import init_certs
from meshserve.tools.cli import main


@pytest.mark.parametrize("argv, refusal", [
    (["token", "issue", "--subject", ""], "argument --subject: must not be empty"),
    (["token", "issue", "--subject", "  "], "argument --subject: must not be empty"),
    (["token", "rotate-key", "--keep", "0"],
     "argument --keep: must be a whole number of at least 1, not '0'"),
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
