"""The backends compute runs a model version with, chosen by the config's platform or
backend. Each meets the one model contract: `run(request, version) -> (response, Timings)`
on the worker thread, `warmup_requests(warmup_dir)`, and `device`.

    TorchScript    platform "pytorch_libtorch" / backend "pytorch"   model.pt
    ONNX Runtime   platform "onnxruntime_onnx" / backend "onnxruntime" model.onnx
    Python         backend "python" (Triton's TritonPythonModel)     model.py
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from meshserve.common.errors import FailedPrecondition
from meshserve.common.repository import ENSEMBLE, ONNX, PYTHON, artifact_filename, kind_of
from meshserve.compute.reshape import reshaping
from meshserve.compute.torchscript_config import NOT_APPLIED, Settings
from meshserve.protocol.model_config_pb2 import ModelConfig

logger = logging.getLogger(__name__)


def load_model(config: ModelConfig, source: bytes | Path, version_dir: Path, device: str,
               threads: int):
    """The model of one version from its verified artifact (`source`: plaintext bytes, or
    the file's path when unsigned), behind its configuration's reshapes. A ServingError says
    why it cannot be served."""
    return reshaping(_backend(config, source, version_dir, device, threads), config)


def _backend(config: ModelConfig, source: bytes | Path, version_dir: Path, device: str,
             threads: int):
    kind = kind_of(config)
    path = version_dir / artifact_filename(config)
    where = f"{path}"
    if kind is ENSEMBLE:
        raise FailedPrecondition(f"model '{config.name}' is an ensemble: the ingress runs its "
                                 "steps; it has no compute of its own")
    if kind is ONNX:
        from meshserve.compute.backends import onnx

        return onnx.load(source, config, device, threads, where)
    if kind is PYTHON:
        from meshserve.compute.backends import python

        return python.load(source, config, path, version_dir.name)
    return _torchscript(config, source, device, threads, where)


def _torchscript(config: ModelConfig, source: bytes | Path, device: str, threads: int,
                 where: str):
    import warnings

    from meshserve.compute.model import TorchScriptModel, pick_device

    warnings.filterwarnings("ignore", message=".*(buffer|NumPy array) is not writable.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
    model = TorchScriptModel(io.BytesIO(source) if isinstance(source, bytes) else source,
                             config, pick_device(device), where)
    _apply_to_process(model.settings, threads, where)
    return model


def _apply_to_process(settings: Settings, threads: int, where: str) -> None:
    """The settings TorchScript holds for the whole process (a compute serves one model
    version): the config's INTRA_OP_THREAD_COUNT (else compute's `--threads`) and
    INTER_OP_THREAD_COUNT, cuDNN, and the JIT switches the config gives."""
    import torch

    if settings.intra_op_threads or threads:
        torch.set_num_threads(settings.intra_op_threads or threads)
    if settings.inter_op_threads:
        try:
            torch.set_num_interop_threads(settings.inter_op_threads)
        except RuntimeError as error:  # only before the pool starts; Triton's caveat too
            logger.warning("%s: INTER_OP_THREAD_COUNT not applied: %s", where, error)
    if not settings.cudnn:
        torch.backends.cudnn.enabled = False
    switches = {"ENABLE_JIT_EXECUTOR": torch._C._jit_set_profiling_executor,
                "ENABLE_JIT_PROFILING": torch._C._jit_set_profiling_mode,
                "ENABLE_TENSOR_FUSER": torch._C._jit_set_texpr_fuser_enabled}
    for key, value in settings.jit.items():
        switches[key](value)
    for key in settings.not_applied:
        logger.warning("%s: parameter %s is not applied: %s", where, key, NOT_APPLIED[key])
