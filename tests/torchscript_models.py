"""Bytes the model registry takes for TorchScript without loading them: a zip laid out as
torch.jit.save writes one (a top folder holding data.pkl and code/), for tests that store and
move artifacts but never run them."""

import io
import zipfile


def torchscript_shaped(payload: bytes) -> bytes:
    """An archive whose data.pkl holds `payload` (stored, so its bytes appear as given)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/data.pkl", payload)
        archive.writestr("model/code/__torch__.py", b"")
    return buffer.getvalue()
