"""`slow`: a deterministic model whose every batch costs a fixed stretch of CPU time.

Its forward multiplies a fixed 256×256 matrix `spin` times (about 50 ms on one core of a
2-core CPU) before a small linear layer; the spun result is added times zero, so the answer
is exactly the linear layer's and equals a local forward pass.
"""

from pathlib import Path

import torch

INPUT_DIM = 16
OUTPUT_DIM = 4
# Sized so that one batch takes ~50 ms with one torch thread on the reference machine.
SPIN = 100
SEED = 77

CONFIG = f"""name: "slow"
platform: "pytorch_libtorch"
max_batch_size: 32
version_policy: {{ all {{ }} }}
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {INPUT_DIM} ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {OUTPUT_DIM} ] }} ]
dynamic_batching {{ }}
"""


class Slow(torch.nn.Module):
    def __init__(self, spin: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(INPUT_DIM, OUTPUT_DIM)
        self.register_buffer("work", torch.rand(256, 256) / 16)
        self.spin = spin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.work
        for _ in range(self.spin):
            state = torch.tanh(state @ self.work)
        return self.linear(x) + state.sum() * 0.0


def build_slow_model(spin: int = SPIN) -> Slow:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return Slow(spin).eval()


def write_slow_model(models: Path, spin: int = SPIN) -> None:
    """`slow` version 1 into the repository at `models`."""
    target = models / "slow" / "1" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    (models / "slow" / "config.pbtxt").write_text(CONFIG)
    torch.jit.save(torch.jit.script(build_slow_model(spin)), str(target))
