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
refuses it rather than `up` re-signing it. Two exceptions say what happened instead of a bare
refusal: a manifest that `up` signed for development with another data directory's key (the
same repository served from a fresh data directory) is signed again with this one, and one
that this data directory's key signed for an artifact that has changed since (a retrained
file copied over the old one) is named, with what to do. A version without its model file is
not signed either: its compute refuses it, saying so, while the rest serve.
"""

from datetime import UTC, datetime
from pathlib import Path

from meshserve.common import artifacts, model_files
from meshserve.common.artifacts import MANIFEST_FILENAME
from meshserve.common.repository import ModelRepository, artifact_filename
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
    own = artifacts.key_id(key.public_key())
    signed, resigned, changed = [], [], []
    now = utc_timestamp(datetime.now(UTC))
    for model, version, version_dir in model_files.version_dirs(repository.path):
        if model not in repository or repository.get(model).plan is not None:
            continue
        config = repository.get(model).config
        artifact = version_dir / artifact_filename(config)
        if not artifact.is_file():
            continue
        name = f"{model}/{version}"
        if (version_dir / MANIFEST_FILENAME).exists():
            state = development_signature(version_dir, artifact, own)
            if state == CHANGED:
                changed.append(f"{name} ({version_dir})")
            if state != ANOTHER_KEY:
                continue
            resigned.append(name)
        else:
            signed.append(name)
        model_files.sign_version(version_dir, config, key,
                                 pushed_by="meshserve up", pushed_at=now,
                                 source=DEVELOPMENT_SOURCE)
    if signed:
        say(f"signed {len(signed)} unsigned model versions with the development key: "
            f"{', '.join(signed)}")
    if resigned:
        say(f"signed again with this data directory's development key {len(resigned)} model "
            f"versions that another data directory's development key had signed: "
            f"{', '.join(resigned)}")
    if changed:
        say(f"the model file of {', '.join(changed)} changed after `meshserve up` signed it "
            "for development, so its compute refuses it; to serve the new file, remove "
            f"{MANIFEST_FILENAME} and {artifacts.SIGNATURE_FILENAME} from the version's "
            "directory and start `up` again")
    return signed + resigned


ANOTHER_KEY, CHANGED = "another key", "changed"


def development_signature(version_dir: Path, artifact: Path, own: str) -> str | None:
    """For a manifest `up` signed for development: ANOTHER_KEY when a key other than `own`
    signed it, CHANGED when `own` did and the artifact is no longer the one signed; else
    (another source, an encrypted or unreadable manifest, or all well) None."""
    try:
        manifest = artifacts.parse_manifest((version_dir / MANIFEST_FILENAME).read_bytes())
    except (OSError, artifacts.ArtifactRefused):
        return None
    summary = model_files.manifest_summary(version_dir)
    if manifest.get("source") != DEVELOPMENT_SOURCE or summary is None \
            or manifest.get("wrapped_key"):
        return None
    digest, signer = summary
    if signer != own:
        return ANOTHER_KEY
    return CHANGED if artifacts.sha256_digest(artifact.read_bytes()) != digest else None


def compute_flags(data_dir: Path) -> list[str]:
    keys = keys_dir(data_dir)
    return [f"--trusted-signers={keys / 'trusted'}", "--require-signed",
            f"--kek-file={keys / 'kek'}"]


def control_plane_flags(data_dir: Path, models: Path | None = None) -> list[str]:
    keys = keys_dir(data_dir)
    return [f"--model-repository={data_dir / 'models' if models is None else models}",
            f"--registry-dir={data_dir / 'registry'}",
            f"--signing-key={keys / 'signing.key'}", f"--kek-file={keys / 'kek'}"]
