"""`up` signs the versions of the repository it serves; a version it cannot sign (no model
file) is left for its compute to refuse, and what the loader does not take as a version is
not signed: one bad model never stops `up`."""

from meshserve.common.artifacts import MANIFEST_FILENAME
from meshserve.tools.dev_signing import prepare_keys_and_sign

CONFIG = """\
max_batch_size: 4
input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 2 ] }
"""


def test_versions_without_a_model_file_or_not_numbered_as_the_loader_wants_are_not_signed(
        tmp_path):
    models = tmp_path / "models"
    for name, versions in {"good": ["1"], "empty": ["1"], "zeros": ["0", "01", "2"]}.items():
        (models / name).mkdir(parents=True)
        (models / name / "config.pbtxt").write_text(CONFIG)
        for version in versions:
            (models / name / version).mkdir()
            if name != "empty":
                (models / name / version / "model.pt").write_bytes(b"weights " + version.encode())
    said = []
    signed = prepare_keys_and_sign(tmp_path / "data", said.append, models)
    assert signed == ["good/1", "zeros/2"]
    assert not (models / "empty" / "1" / MANIFEST_FILENAME).exists()
    assert not (models / "zeros" / "0" / MANIFEST_FILENAME).exists()
    assert not (models / "zeros" / "01" / MANIFEST_FILENAME).exists()
    assert said[-1].endswith("good/1, zeros/2")


def one_model(models):
    (models / "m" / "1").mkdir(parents=True)
    (models / "m" / "config.pbtxt").write_text(CONFIG)
    (models / "m" / "1" / "model.pt").write_bytes(b"weights")


def test_a_development_signature_of_another_data_directory_is_made_again(tmp_path):
    """The same repository served from a fresh data directory (a new development key): `up`
    signs it again, where compute would refuse 'manifest signed by an unknown key'."""
    models = tmp_path / "models"
    one_model(models)
    assert prepare_keys_and_sign(tmp_path / "first", lambda _: None, models) == ["m/1"]
    first = (models / "m" / "1" / "manifest.sig").read_bytes()
    said = []
    assert prepare_keys_and_sign(tmp_path / "fresh", said.append, models) == ["m/1"]
    assert (models / "m" / "1" / "manifest.sig").read_bytes() != first
    assert said[-1] == ("signed again with this data directory's development key 1 model "
                        "versions that another data directory's development key had signed: "
                        "m/1")
    assert prepare_keys_and_sign(tmp_path / "fresh", said.append, models) == []  # now its own


def test_a_file_changed_after_up_signed_it_is_named_not_signed_again(tmp_path):
    models = tmp_path / "models"
    one_model(models)
    prepare_keys_and_sign(tmp_path / "data", lambda _: None, models)
    signature = (models / "m" / "1" / "manifest.sig").read_bytes()
    (models / "m" / "1" / "model.pt").write_bytes(b"retrained weights")
    said = []
    assert prepare_keys_and_sign(tmp_path / "data", said.append, models) == []
    assert (models / "m" / "1" / "manifest.sig").read_bytes() == signature  # still refused
    assert said == [f"the model file of m/1 ({models / 'm' / '1'}) changed after `meshserve up` "
                    "signed it for development, so its compute refuses it; to serve the new "
                    "file, remove manifest.json and manifest.sig from the version's directory "
                    "and start `up` again"]


def test_a_manifest_signed_elsewhere_than_by_up_is_left_alone(tmp_path):
    """A version pushed through the registry (or signed by a release key) keeps its manifest:
    only what `up` signed for development is `up`'s to sign again."""
    models = tmp_path / "models"
    one_model(models)
    prepare_keys_and_sign(tmp_path / "first", lambda _: None, models)
    manifest = models / "m" / "1" / MANIFEST_FILENAME
    manifest.write_text(manifest.read_text().replace("meshserve up (development)", "git:abc"))
    before = (models / "m" / "1" / "manifest.sig").read_bytes()
    assert prepare_keys_and_sign(tmp_path / "fresh", lambda _: None, models) == []
    assert (models / "m" / "1" / "manifest.sig").read_bytes() == before
