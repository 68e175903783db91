"""The access policy at the control plane's admin API, against a real `meshserve up` with a
policy of its own: `client/alice` may only read mlp; the development certificate is admin."""

import hashlib
import json
import stat
import urllib.request
from pathlib import Path

import pytest

from meshserve.common.certificates import spiffe_id
from meshserve.tools.certs import issue_leaf
from tests.integration.conftest import Mesh, meshserve, running_mesh
from tests.policies import ALICE_READS_MLP

POLICY = ALICE_READS_MLP


@pytest.fixture(scope="module")
def policy_mesh(tmp_path_factory) -> Mesh:
    data_dir = tmp_path_factory.mktemp("admin-policy") / "data"
    (data_dir / "auth").mkdir(parents=True)
    (data_dir / "auth" / "policy.yaml").write_text(POLICY)
    with running_mesh(data_dir) as started:
        yield started


@pytest.fixture(scope="module")
def alice(policy_mesh: Mesh, tmp_path_factory) -> list[str]:
    """Connection flags of a certificate whose identity is client/alice."""
    tls = policy_mesh.data_dir / "tls"
    out = tmp_path_factory.mktemp("alice")
    cert, key = issue_leaf(tls / "ca.crt", tls / "ca.key", out, "alice",
                           [f"URI:{spiffe_id('client/alice')}"], days=1, client_only=True)
    return ["--data-dir", str(policy_mesh.data_dir), "--cert", str(cert), "--key", str(key)]


def developer(mesh: Mesh) -> list[str]:
    return ["--data-dir", str(mesh.data_dir)]


def weights(status: str, model: str) -> dict[str, str]:
    """Version → weight of `model` in `meshserve traffic status` output."""
    found, inside = {}, False
    for line in status.splitlines():
        if not line.startswith(" "):
            inside = line.split()[0] == model if line.strip() else False
        elif inside and line.split()[0].isdigit():
            found[line.split()[0]] = line.split()[1]
    return found


def test_alice_may_not_shift_traffic(policy_mesh: Mesh, alice) -> None:
    done = meshserve("traffic", "set", "mlp", "1=100", *alice)
    assert done.returncode == 1, done.stdout
    # `meshserve traffic` prints its errors on stdout
    assert done.stdout.strip() == ("error: PERMISSION_DENIED: 'client/alice' may not "
                                   "traffic:write model 'mlp'")
    pin = meshserve("traffic", "pin", "cnn", "1", *alice)
    assert pin.returncode == 1
    assert "'client/alice' may not traffic:write model 'cnn'" in pin.stdout
    status = meshserve("traffic", "status", *developer(policy_mesh))
    assert status.returncode == 0, status.stderr
    assert weights(status.stdout, "mlp") == {"1": "90%", "2": "10%"}


def test_alice_reads_only_mlp(policy_mesh: Mesh, alice) -> None:
    listing = meshserve("models", "list", *alice)
    assert listing.returncode == 0, listing.stderr
    status = meshserve("traffic", "status", *alice)
    assert status.returncode == 0, status.stderr
    models = [line.split()[0] for line in status.stdout.splitlines()
              if line and not line.startswith((" ", "snapshot"))]
    assert models == ["mlp"]
    other = meshserve("traffic", "status", "cnn", *alice)
    assert other.returncode == 1
    assert other.stdout.strip() == ("error: PERMISSION_DENIED: 'client/alice' may not "
                                    "models:read model 'cnn'")


def test_alice_may_not_fetch_weights(policy_mesh: Mesh, alice, tmp_path: Path) -> None:
    target = tmp_path / "mlp.pt"
    done = meshserve("models", "fetch", "mlp", "-o", str(target), *alice)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: PERMISSION_DENIED: 'client/alice' may not "
                                   "models:fetch model 'mlp'")
    assert not target.exists()


def test_developer_fetches_the_stored_artifact_verified(policy_mesh: Mesh,
                                                        tmp_path: Path) -> None:
    data_dir = policy_mesh.data_dir
    target = tmp_path / "out" / "mlp.pt"
    done = meshserve("models", "fetch", "mlp", "-o", str(target), "--trusted",
                     str(data_dir / "keys" / "trusted"), *developer(policy_mesh))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "mlp.pt.manifest.json").read_text())
    digest = "sha256:" + hashlib.sha256(target.read_bytes()).hexdigest()
    assert manifest["digest"] == digest
    assert (manifest["model"], manifest["version"]) == ("mlp", "2")  # the highest version
    assert done.stdout.startswith(f"fetched mlp version 2: {digest}, ")
    assert "signature by ed25519:" in done.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    stored = data_dir / "models" / "mlp" / "2"
    assert target.read_bytes() == (stored / "model.pt").read_bytes()
    assert (tmp_path / "out" / "mlp.pt.sig").read_bytes() == \
        (stored / "manifest.sig").read_bytes()
    one = meshserve("models", "fetch", "mlp", "--version", "1", "-o", str(tmp_path / "v1.pt"),
                    *developer(policy_mesh))
    assert one.returncode == 0, one.stderr
    assert (tmp_path / "v1.pt").read_bytes() == \
        (data_dir / "models" / "mlp" / "1" / "model.pt").read_bytes()
    missing = meshserve("models", "fetch", "mlp", "--version", "9", "-o",
                        str(tmp_path / "v9.pt"), *developer(policy_mesh))
    assert missing.returncode == 1
    assert missing.stderr.strip() == ("error: NOT_FOUND: model 'mlp' has no signed version "
                                      "'9' (signed: 1, 2)")


def test_a_fetch_refused_by_an_untrusted_key_writes_nothing(policy_mesh: Mesh,
                                                            tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from meshserve.common import keys

    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(keys.public_key_pem(Ed25519PrivateKey.generate().public_key()))
    target = tmp_path / "mlp.pt"
    done = meshserve("models", "fetch", "mlp", "-o", str(target), "--trusted", str(stranger),
                     *developer(policy_mesh))
    assert done.returncode == 1
    assert done.stderr.startswith("error: manifest signed by an unknown key (key id ed25519:")
    assert not target.exists()


def test_audit_shows_fetches_and_denials_and_alice_may_not_read_it(policy_mesh: Mesh, alice,
                                                                     tmp_path: Path) -> None:
    assert meshserve("traffic", "rollback", "mlp", *alice).returncode == 1
    fetched = meshserve("models", "fetch", "mlp", "-o", str(tmp_path / "mlp.pt"),
                        *developer(policy_mesh))
    assert fetched.returncode == 0, fetched.stderr
    tail = meshserve("audit", "tail", "-n", "100", *developer(policy_mesh))
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    fetches = [line for line in lines if " model.fetch " in line]
    assert any(line.split()[2:5] == ["client/developer", "model.fetch", "mlp/2"]
               for line in fetches), tail.stdout
    denials = [line.split() for line in lines if " request.denied " in line]
    assert ["client/alice", "request.denied", "mlp"] in [d[2:5] for d in denials]
    assert any("(permission_denied: traffic:write on mlp (Rollback))" in line
               for line in lines), tail.stdout
    refused = meshserve("audit", "tail", *alice)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: PERMISSION_DENIED: 'client/alice' may not "
                                      "audit:read model '*'")


def test_denials_are_counted_by_action(policy_mesh: Mesh, alice, tmp_path: Path) -> None:
    assert meshserve("models", "fetch", "mlp", "-o", str(tmp_path / "x.pt"),
                     *alice).returncode == 1
    port = (policy_mesh.data_dir / "run" / "control-plane.metrics-port").read_text().strip()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("meshserve_admin_denied_total{")}
    assert counts['meshserve_admin_denied_total{action="traffic:write"}'] >= 1
    assert counts['meshserve_admin_denied_total{action="models:fetch"}'] >= 1
