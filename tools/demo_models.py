"""Deterministic demo models for a meshserve model repository.

`write_demo_repository(path)` writes two TorchScript models, `mlp` and `cnn`, each in
versions 1 and 2 with different weights, and the models of `meshserve.tools.demo_pipeline`
(ONNX, Python and an ensemble). Weights come from a fixed seed per model and
version, drawn under a forked RNG (the caller's RNG state is left untouched), so every run
writes the same weights and the models give the same output bytes for the same input.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

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


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


# Measured on a 2-core CPU with one torch thread: cnn computes most rows per second at
# batch 4 (about 1,640 rows/s, against 790 at batch 32), so its batcher aims for 4.
PREFERRED_BATCH_SIZES = {"cnn": (4,)}


# Overload: two priority levels, requests without a `priority` parameter are the less urgent
# level 2, and a queue holds at most this many requests (beyond it level-2 requests are shed
# first; see README "Overload"). 256 is twice the highest concurrency `meshserve bench` uses.
MAX_QUEUE_SIZE = 256


def _preferred(name: str) -> str:
    sizes = PREFERRED_BATCH_SIZES.get(name)
    return f"  preferred_batch_size: {_dims(sizes)}\n" if sizes else ""


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
        f"    dims: {_dims(_INPUT_DIMS[name])}\n"
        f"  }}\n"
        f"]\n"
        f"output [\n"
        f"  {{\n"
        f'    name: "OUTPUT__0"\n'
        f"    data_type: TYPE_FP32\n"
        f"    dims: {_dims(_OUTPUT_DIMS[name])}\n"
        f"  }}\n"
        f"]\n"
        f"# No queue delay: meshserve's batcher is work-conserving.\n"
        f"dynamic_batching {{\n"
        f"{_preferred(name)}"
        f"  priority_levels: 2\n"
        f"  default_priority_level: 2\n"
        f"  default_queue_policy {{ max_queue_size: {MAX_QUEUE_SIZE} }}\n"
        f"}}\n"
        f"instance_group [ {{ kind: KIND_AUTO count: 1 }} ]\n"
    )


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write `path` through a temporary file in the same directory, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_torchscript(model: nn.Module, target: str) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what the
        # pytorch_libtorch platform serves.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, target)


def write_demo_repository(path: Path | str) -> None:
    """Write the demo models into the repository at `path`.

    Pieces already present and complete (a config.pbtxt with the expected text, a model
    file per version) are left unchanged; missing or different ones are (re)written.
    """
    path = Path(path)
    for name in DEMO_MODELS:
        model_dir = path / name
        config_path = model_dir / "config.pbtxt"
        text = demo_config(name)
        if not config_path.is_file() or config_path.read_text(encoding="utf-8") != text:
            atomic_write(config_path, lambda tmp, t=text: Path(tmp).write_text(t, "utf-8"))
        for version in DEMO_VERSIONS:
            artifact = model_dir / version / "model.pt"
            if artifact.is_file() and artifact.stat().st_size > 0:
                continue
            model = build_model(name, version)
            atomic_write(artifact, lambda tmp, m=model: _save_torchscript(m, tmp))
    from meshserve.tools.demo_pipeline import write_pipeline_models

    write_pipeline_models(path)
