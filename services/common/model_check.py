"""Whether bytes are a model of a given kind: the one check of a pushed artifact, made by
`meshserve models push` before it sends the file and by the control plane's registry before
it signs and stores it.

Cheap and inert: torch is not imported and nothing runs. A TorchScript model is a zip laid
out as `torch.jit.save` writes it (a top folder holding `data.pkl` and `code/`), an ONNX
model parses as one, a Python model compiles.
"""

from __future__ import annotations

import io
import warnings
import zipfile

from meshserve.common.errors import FailedPrecondition
from meshserve.common.repository import ONNX, PYTHON, TORCHSCRIPT, Kind

# What one push carries: one 64 MiB gRPC message, less room for the request's other fields.
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024 - 64 * 1024
# A Python model's source. Compiling it is the check, and the control plane compiles on its
# event loop: the bound keeps that pause short.
MAX_PYTHON_BYTES = 1024 * 1024

LABELS = {TORCHSCRIPT: "TorchScript", ONNX: "ONNX", PYTHON: "Python"}


def refusal(kind: Kind, data: bytes, source: str) -> str | None:
    """Why `data` (named `source` in the answer) is not a model of `kind`, or None."""
    if kind is ONNX:
        from meshserve.common import onnx_graph  # the onnx package, for this kind only

        try:
            onnx_graph.read_graph(data, source)
        except FailedPrecondition as error:
            return error.message
        return None
    if kind is PYTHON:
        return python_refusal(data, source)
    if kind is TORCHSCRIPT:
        return None if is_torchscript(data) else (
            f"{source} is not a TorchScript archive (torch.jit.save writes a zip holding "
            "*/data.pkl and */code/)")
    return f"{source}: a model of kind {kind.name} carries no artifact"


def python_refusal(data: bytes, source: str) -> str | None:
    """Why `data` is not Python source that compiles, or None. Compiling runs nothing."""
    if len(data) > MAX_PYTHON_BYTES:
        return (f"{source} is {len(data)} bytes; a Python model's source is at most "
                f"{MAX_PYTHON_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a SyntaxWarning of the pushed code is not ours
            compile(data, source, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        return f"{source} is not a Python model (it does not compile: {error})"
    return None


def is_torchscript(data: bytes) -> bool:
    """Whether `data` is a zip archive laid out as torch.jit.save writes one: a top folder
    holding data.pkl and code/ (a plain torch.save archive has no code/)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [name.split("/") for name in archive.namelist()]
    except (zipfile.BadZipFile, ValueError):
        return False
    return any(parts[1:] == ["data.pkl"] for parts in names) and \
        any(len(parts) > 2 and parts[1] == "code" for parts in names)
