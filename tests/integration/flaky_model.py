"""A small model with a deliberately faulty version, for canary tests.

`flaky` versions 1 and 3 are healthy; version 2 fails every batch that holds a row whose
sum is positive (about half of random inputs).
"""

from pathlib import Path

import torch

CONFIG = """name: "flaky"
platform: "pytorch_libtorch"
max_batch_size: 32
version_policy: { all { } }
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { }
"""


class Flaky(torch.nn.Module):
    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 2)
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail and bool((x.sum(dim=1) > 0).any()):
            raise RuntimeError("flaky version refuses inputs with a positive sum")
        return self.linear(x)


def write_flaky_model(models: Path) -> None:
    (models / "flaky").mkdir(parents=True, exist_ok=True)
    (models / "flaky" / "config.pbtxt").write_text(CONFIG)
    for version, fail in (("1", False), ("2", True), ("3", False)):
        torch.manual_seed(int(version))
        target = models / "flaky" / version / "model.pt"
        target.parent.mkdir(exist_ok=True)
        torch.jit.save(torch.jit.script(Flaky(fail).eval()), str(target))


class RefusesPositiveRows(torch.nn.Module):
    """A model that fails every batch holding a row whose sum is positive, and otherwise
    answers as the model it wraps."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.sum(dim=1) > 0).any()):
            raise RuntimeError("this version refuses inputs with a positive sum")
        return self.model(x)


def write_mlp_version_3(models: Path) -> None:
    """`mlp` version 3 beside the demo's 1 and 2 (write it before `meshserve up` starts):
    the demo mlp with its own weights, failing every request whose input sums above 0 (so
    a load of positive rows finds it broken, and one of negative rows healthy)."""
    from meshserve.tools.demo_models import build_model

    target = models / "mlp" / "3" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    model = RefusesPositiveRows(build_model("mlp", "3")).eval()
    torch.jit.save(torch.jit.script(model), str(target))
