"""The development keys of `meshserve up` and the signing of its own model repository.

On every start `up` makes sure DIR/keys holds a signing key (`signing.key`, 0600), its public
half among the trusted signers (`trusted/<key id>.pub`) and a key-encryption key (`kek`,
0600), then signs every version in the repository it serves (DIR/models, or the one
`--model-repository` names) that has no manifest yet (the demo models, and any model a
developer or a test copied in), with source "meshserve up (development)". Ensembles have
no artifact and are not signed. So
the default path verifies everything: computes start with `--trusted-signers
DIR/keys/trusted --require-signed`, and the control plane signs pushes with the same key.
A version that already has a manifest is left alone: if it was tampered with, compute
refuses it rather than `up` re-signing it.
"""

from datetime import UTC, datetime
from pathlib import Path

from meshserve.common import model_files
from meshserve.common.artifacts import MANIFEST_FILENAME
from meshserve.common.repository import ModelRepository
from meshserve.mesh.audit import utc_timestamp

DEVELOPMENT_SOURCE = "meshserve up (development)"


def keys_dir(data_dir: Path) -> Path:
    return data_dir / "keys"


def prepare_keys_and_sign(data_dir: Path, say=print, models: Path | None = None) -> list[str]:
    """Create missing keys; sign unsigned versions of `models` (default DIR/models).
    Returns the `model/version`s signed."""
    keys = keys_dir(data_dir)
    if not (keys / "signing.key").exists():
        say(f"creating the development signing key and key-encryption key in {keys}")
    key = model_files.signing_key(keys / "signing.key", create=True)
    model_files.trust(key, keys / "trusted")
    model_files.ensure_kek(keys / "kek")
    repository = ModelRepository.load(data_dir / "models" if models is None else models)
    signed = []
    now = utc_timestamp(datetime.now(UTC))
    for model, version, version_dir in model_files.version_dirs(repository.path):
        if (model not in repository or (version_dir / MANIFEST_FILENAME).exists()
                or repository.get(model).plan is not None):
            continue
        model_files.sign_version(version_dir, repository.get(model).config, key,
                                 pushed_by="meshserve up", pushed_at=now,
                                 source=DEVELOPMENT_SOURCE)
        signed.append(f"{model}/{version}")
    if signed:
        say(f"signed {len(signed)} unsigned model versions with the development key: "
            f"{', '.join(signed)}")
    return signed


def compute_flags(data_dir: Path) -> list[str]:
    keys = keys_dir(data_dir)
    return [f"--trusted-signers={keys / 'trusted'}", "--require-signed",
            f"--kek-file={keys / 'kek'}"]


def control_plane_flags(data_dir: Path, models: Path | None = None) -> list[str]:
    keys = keys_dir(data_dir)
    return [f"--model-repository={data_dir / 'models' if models is None else models}",
            f"--registry-dir={data_dir / 'registry'}",
            f"--signing-key={keys / 'signing.key'}", f"--kek-file={keys / 'kek'}"]
