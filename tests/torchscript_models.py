"""TorchScript archives for tests: a real one (`torchscript_bytes`), and bytes the model
registry takes for TorchScript without loading them (a zip laid out as torch.jit.save writes
one: a top folder holding data.pkl and code/), for tests that store and move artifacts but
never run them."""

import io
import zipfile

import pytest


def torchscript_shaped(payload: bytes) -> bytes:
    """An archive whose data.pkl holds `payload` (stored, so its bytes appear as given)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/data.pkl", payload)
        archive.writestr("model/code/__torch__.py", b"")
    return buffer.getvalue()


def torchscript_bytes() -> bytes:
    """A real TorchScript archive (x + 1), as torch.jit.save writes it."""
    torch = pytest.importorskip("torch")

    class AddOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(AddOne()), buffer)
    return buffer.getvalue()
