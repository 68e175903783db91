"""The one check of a pushed artifact (`meshserve models push` and the registry): bytes that
are a model of the kind, and bytes that are not."""

import io
import zipfile

import pytest

from meshserve.common import model_check
from meshserve.common.repository import ENSEMBLE, ONNX, PYTHON, TORCHSCRIPT
from tests.onnx_models import fixed_shape_model
from tests.torchscript_models import torchscript_bytes


def saved_weights() -> bytes:
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buffer)
    return buffer.getvalue()


def test_models_of_each_kind_pass() -> None:
    assert model_check.refusal(TORCHSCRIPT, torchscript_bytes(), "m.pt") is None
    assert model_check.refusal(ONNX, fixed_shape_model(), "m.onnx") is None
    assert model_check.refusal(PYTHON, b"class TritonPythonModel:\n    pass\n", "m.py") is None


@pytest.mark.parametrize(("kind", "data", "refusal"), [
    (TORCHSCRIPT, b"hello, wor\n", "m is not a TorchScript archive (torch.jit.save writes a "
                                   "zip holding */data.pkl and */code/)"),
    (TORCHSCRIPT, b"", "m is not a TorchScript archive"),
    (TORCHSCRIPT, fixed_shape_model(), "m is not a TorchScript archive"),
    (ONNX, b"hello, wor\n", "m: not an ONNX model"),
    (PYTHON, b"def broken(:\n", "m is not a Python model (it does not compile: "),
    (PYTHON, b"\xff\xfe not utf-8", "m is not a Python model (it does not compile: "),
    (PYTHON, b"x = 1\0", "m is not a Python model (it does not compile: "),
    (PYTHON, b"(" * 10_000, "m is not a Python model (it does not compile: "),
    (PYTHON, b"#" * (model_check.MAX_PYTHON_BYTES + 1),
     f"m is {model_check.MAX_PYTHON_BYTES + 1} bytes; a Python model's source is at most "
     f"{model_check.MAX_PYTHON_BYTES}"),
    (ENSEMBLE, b"anything", "m: a model of kind ensemble carries no artifact"),
])
def test_bytes_that_are_not_a_model_of_the_kind_are_refused(kind, data, refusal) -> None:
    assert model_check.refusal(kind, data, "m").startswith(refusal)


def test_weights_saved_by_torch_save_are_not_torchscript() -> None:
    assert not model_check.is_torchscript(saved_weights())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/data.pkl", b"")
        archive.writestr("m/code/__torch__.py", b"")
    assert model_check.is_torchscript(buffer.getvalue())


def test_compiling_a_python_model_runs_none_of_it(tmp_path) -> None:
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').write('x')\n".encode()
    assert model_check.refusal(PYTHON, source, "m.py") is None
    assert not marker.exists()
