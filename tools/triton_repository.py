"""A Triton mirror of meshserve models, for the Python backend (pure text generation but for
`write_repository`): the same ``max_batch_size``, input and output names, datatypes and dims,
``dynamic_batching`` with a 1 ms queue delay, as many CPU instances as meshserve starts
computes for it, and a ``model.py`` that loads
the same TorchScript file (``torch.jit.load``, one intra-op thread, ``torch.inference_mode``)
and runs all requests of a batch as one torch batch."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from meshserve.common.arrays import config_dtype
from meshserve.common.repository import ModelRepository, instance_count
from meshserve.protocol import model_config_pb2
from meshserve.tools.pbtxt import dims_text

QUEUE_DELAY_US = 1000


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, config.pbtxt data type, dims without the batch."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """What a Triton Python-backend model needs to mirror a meshserve model."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # meshserve's preferred batch sizes, so both batchers aim for the same batches.
    preferred_batch_sizes: tuple[int, ...] = ()
    # meshserve's computes per version (`instance_count`), so both run as many instances.
    instances: int = 1


def model_spec(repository: ModelRepository, name: str) -> ModelSpec:
    """The `ModelSpec` of model `name` of a meshserve repository."""
    config = repository.get(name).config

    def tensors(items: Iterable) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims))
            for t in items
        )

    return ModelSpec(name, config.max_batch_size, tensors(config.input), tensors(config.output),
                     tuple(config.dynamic_batching.preferred_batch_size),
                     instance_count(config))


def _tensor_block(kind: str, tensors: tuple[TensorSpec, ...]) -> str:
    entries = ",\n".join(
        f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n'
        f'    dims: {dims_text(t.dims)}\n  }}'
        for t in tensors
    )
    return f"{kind} [\n{entries}\n]\n"


def triton_config(spec: ModelSpec, queue_delay_us: int = QUEUE_DELAY_US) -> str:
    """config.pbtxt text of the Python-backend mirror of `spec`."""
    return (
        f'name: "{spec.name}"\n'
        f'backend: "python"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        + _tensor_block("input", spec.inputs)
        + _tensor_block("output", spec.outputs)
        + "dynamic_batching { "
        + (f"preferred_batch_size: {dims_text(spec.preferred_batch_sizes)} "
           if spec.preferred_batch_sizes else "")
        + f"max_queue_delay_microseconds: {queue_delay_us} }}\n"
        + f"instance_group [ {{ kind: KIND_CPU count: {spec.instances} }} ]\n"
    )


_MODEL_PY = '''\
"""Triton Python backend: a TorchScript file, one torch batch per Triton batch."""

import os
import warnings

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

MODEL_FILE = {model_file!r}
INPUTS = {inputs!r}
OUTPUTS = {outputs!r}
OUTPUT_DTYPES = {output_dtypes!r}
THREADS = {threads!r}


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(THREADS)
        warnings.filterwarnings("ignore", message=".*not writable.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        path = os.path.join(args["model_repository"], args["model_version"], MODEL_FILE)
        self.model = torch.jit.load(path, map_location="cpu").eval()

    def execute(self, requests):
        columns = [
            [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for request in requests]
            for name in INPUTS
        ]
        sizes = [array.shape[0] for array in columns[0]]
        with torch.inference_mode():
            tensors = [torch.from_numpy(np.concatenate(arrays)) for arrays in columns]
            results = self.model(*tensors)
            if not isinstance(results, (tuple, list)):
                results = (results,)
            arrays = [result.cpu().numpy() for result in results]
        responses = []
        start = 0
        for size in sizes:
            outputs = [
                pb_utils.Tensor(name, np.ascontiguousarray(array[start:start + size], dtype=dtype))
                for name, dtype, array in zip(OUTPUTS, OUTPUT_DTYPES, arrays)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            start += size
        return responses
'''


def model_py(spec: ModelSpec, model_file: str = "model.pt", threads: int = 1) -> str:
    """model.py text of the Python-backend mirror of `spec` (loads `model_file`)."""
    dtypes = [config_dtype(model_config_pb2.DataType.Value(t.data_type)) for t in spec.outputs]
    for tensor, dtype in zip(spec.outputs, dtypes):
        if dtype is None:
            raise ValueError(f"output {tensor.name}: data type {tensor.data_type} unsupported")
    return _MODEL_PY.format(
        model_file=model_file,
        inputs=[t.name for t in spec.inputs],
        outputs=[t.name for t in spec.outputs],
        output_dtypes=[dtype.name for dtype in dtypes],
        threads=threads,
    )


class Mirrored(NamedTuple):
    """A model as the mirror serves it: the version it copied, its CPU instances."""

    version: str
    instances: int


def write_repository(
    source: Path, destination: Path, models: Iterable[str], queue_delay_us: int = QUEUE_DELAY_US
) -> dict[str, Mirrored]:
    """Writes the Triton mirror of `models` of the meshserve repository at `source`.

    Each model gets the TorchScript file of its default (highest served) version, under that
    same version number.
    """
    repository = ModelRepository.load(source)
    mirrored = {}
    for name in models:
        spec = model_spec(repository, name)
        version = repository.version(name, "")
        model_dir = destination / name
        (model_dir / version).mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(triton_config(spec, queue_delay_us), "utf-8")
        (model_dir / version / "model.py").write_text(model_py(spec), "utf-8")
        shutil.copyfile(repository.artifact(name, version), model_dir / version / "model.pt")
        mirrored[name] = Mirrored(version, spec.instances)
    return mirrored
