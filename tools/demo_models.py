"""Deterministic demo models for a meshserve model repository.

`write_torchscript_models(path)` writes two TorchScript models, `mlp` and `cnn`, each in
versions 1 and 2 with different weights (`meshserve.tools.demo_repository` adds the models of
the other backends). Weights come from a fixed seed per model and
version, drawn under a forked RNG (the caller's RNG state is left untouched), so every run
writes the same weights and the models give the same output bytes for the same input.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from meshserve.common.files import write_atomic
from meshserve.tools.pbtxt import dims_text

DEMO_MODELS = ("mlp", "cnn")
DEMO_VERSIONS = ("1", "2")
MAX_BATCH_SIZE = 32

_SEED_BASE = {"mlp": 1000, "cnn": 2000}
_INPUT_DIMS = {"mlp": (256,), "cnn": (3, 64, 64)}
_OUTPUT_DIMS = {"mlp": (10,), "cnn": (10,)}


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(128, 128, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


_BUILDERS: dict[str, Callable[[], nn.Module]] = {"mlp": _mlp, "cnn": _cnn}


def build_model(name: str, version: str | int) -> nn.Module:
    """The demo model `name` at `version`, in eval mode, with its deterministic weights."""
    seed = _SEED_BASE[name] + int(version)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _BUILDERS[name]()
    return model.eval()


# Measured on a 2-core CPU with one torch thread: cnn computes most rows per second at
# batch 4 (about 1,640 rows/s, against 790 at batch 32), so its batcher aims for 4.
PREFERRED_BATCH_SIZES = {"cnn": (4,)}


# The cnn's compute is busy all the time under load, one core's worth, while the mlp's waits
# for its groups: two instances of the cnn take a core each (`up` starts a compute per
# instance; on 2 cores, cnn c=32 1.22x the requests a second against one side by side in a
# slow hour, and 0.73-0.82x its in-process limit in the full races against 0.76x with one).
INSTANCE_COUNTS = {"cnn": 2}


# Overload: two priority levels, requests without a `priority` parameter are the less urgent
# level 2, and a queue holds at most this many requests (beyond it level-2 requests are shed
# first; see README "Overload"). 256 is twice the highest concurrency `meshserve bench` uses.
MAX_QUEUE_SIZE = 256


def _preferred(name: str) -> str:
    sizes = PREFERRED_BATCH_SIZES.get(name)
    return f"  preferred_batch_size: {dims_text(sizes)}\n" if sizes else ""


def demo_config(name: str) -> str:
    """The config.pbtxt text of demo model `name`."""
    return (
        f'name: "{name}"\n'
        f'platform: "pytorch_libtorch"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        f"version_policy: {{ all {{ }} }}\n"
        f"input [\n"
        f"  {{\n"
        f'    name: "INPUT__0"\n'
        f"    data_type: TYPE_FP32\n"
        f"    dims: {dims_text(_INPUT_DIMS[name])}\n"
        f"  }}\n"
        f"]\n"
        f"output [\n"
        f"  {{\n"
        f'    name: "OUTPUT__0"\n'
        f"    data_type: TYPE_FP32\n"
        f"    dims: {dims_text(_OUTPUT_DIMS[name])}\n"
        f"  }}\n"
        f"]\n"
        f"# No queue delay: meshserve's batcher is work-conserving.\n"
        f"dynamic_batching {{\n"
        f"{_preferred(name)}"
        f"  priority_levels: 2\n"
        f"  default_priority_level: 2\n"
        f"  default_queue_policy {{ max_queue_size: {MAX_QUEUE_SIZE} }}\n"
        f"}}\n"
        f"instance_group [ {{ kind: KIND_AUTO count: {INSTANCE_COUNTS.get(name, 1)} }} ]\n"
    )


def torchscript_bytes(model: nn.Module) -> bytes:
    """`model` scripted and saved as a TorchScript file's bytes."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what the
        # pytorch_libtorch platform serves.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        scripted = torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def write_text_if_changed(path: Path, text: str) -> None:
    """Write `path` whole unless it already holds `text`."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_atomic(path, text.encode())


def write_if_missing(path: Path, data: Callable[[], bytes]) -> None:
    """Write `path` whole with `data()` unless it already holds some bytes."""
    if not path.is_file() or path.stat().st_size == 0:
        write_atomic(path, data())


def write_torchscript_models(path: Path) -> None:
    """Write `mlp` and `cnn`, versions 1 and 2, into the repository at `path`, leaving
    pieces already present and complete unchanged."""
    for name in DEMO_MODELS:
        write_text_if_changed(path / name / "config.pbtxt", demo_config(name))
        for version in DEMO_VERSIONS:
            write_if_missing(path / name / version / "model.pt",
                             lambda n=name, v=version: torchscript_bytes(build_model(n, v)))
