"""What config.pbtxt says of a TorchScript model, read as Triton's PyTorch (libtorch) backend
reads it, once, when the model loads: pure rules, no torch.

Inputs reach `forward` by one of three conventions, the first that every input follows:
their names are forward's argument names; or each is `<name>__<index>` (`INPUT__1` is
argument 1); or else config order. Outputs are results by `<name>__<index>` (`OUTPUT__1` is
result 1), or else in config order; results no output names are not sent. A forward that
takes one `Dict[str, Tensor]` gets the inputs by their names as its keys.

The config's `parameters` (string values) set how the module runs; `SWITCHES` are Triton's
boolean spellings, in any case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshserve.common.errors import FailedPrecondition

SWITCHES = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
# Parameters that change nothing here, and why
NOT_APPLIED = {"ENABLE_WEIGHT_SHARING": "each instance is a compute process of its own",
               "ENABLE_NVFUSER": "Triton's backend dropped it in 23.12"}
# TorchScript's process-wide JIT switches, set only when the config gives them.
JIT_SWITCHES = ("ENABLE_JIT_EXECUTOR", "ENABLE_JIT_PROFILING", "ENABLE_TENSOR_FUSER")


@dataclass(frozen=True)
class Settings:
    """How a TorchScript model runs, from its config's `parameters`."""

    inference_mode: bool = True  # INFERENCE_MODE; off: torch.no_grad, as Triton
    optimized_execution: bool = True  # not DISABLE_OPTIMIZED_EXECUTION
    cudnn: bool = True  # not DISABLE_CUDNN
    cache_cleaning: bool = False  # ENABLE_CACHE_CLEANING: empty the CUDA cache after a batch
    jit: dict[str, bool] = field(default_factory=dict)  # the JIT_SWITCHES given
    intra_op_threads: int = 0  # INTRA_OP_THREAD_COUNT, when above 0
    inter_op_threads: int = 0  # INTER_OP_THREAD_COUNT, when above 0
    not_applied: tuple[str, ...] = ()

    @property
    def per_batch(self) -> bool:
        """Whether each batch needs more than inference mode around the module's call."""
        return not (self.inference_mode and self.optimized_execution) or self.cache_cleaning


def settings_of(parameters: Mapping[str, str]) -> Settings:
    """The Settings of a config's parameters; FailedPrecondition names a parameter whose
    value is not one it takes (Triton refuses the model too)."""
    def switch(key: str, default: bool) -> bool:
        if key not in parameters:
            return default
        value = SWITCHES.get(parameters[key].strip().lower())
        if value is None:
            raise FailedPrecondition(f"parameter {key} is {parameters[key]!r}; it takes true "
                                     "or false (on/off, 1/0)")
        return value

    def count(key: str) -> int:
        try:
            return max(int(parameters.get(key, "0")), 0)
        except ValueError:
            raise FailedPrecondition(f"parameter {key} is {parameters[key]!r}; it takes an "
                                     "integer") from None

    switch("ENABLE_WEIGHT_SHARING", False)  # refused when not a boolean, as in Triton
    return Settings(
        inference_mode=switch("INFERENCE_MODE", True),
        optimized_execution=not switch("DISABLE_OPTIMIZED_EXECUTION", False),
        cudnn=not switch("DISABLE_CUDNN", False),
        cache_cleaning=switch("ENABLE_CACHE_CLEANING", False),
        jit={key: switch(key, True) for key in JIT_SWITCHES if key in parameters},
        intra_op_threads=count("INTRA_OP_THREAD_COUNT"),
        inter_op_threads=count("INTER_OP_THREAD_COUNT"),
        not_applied=tuple(key for key in NOT_APPLIED if key in parameters))


def named_index(name: str) -> int | None:
    """The index of a `<name>__<index>` name (what follows its first `__`, all digits)."""
    _, separator, index = name.partition("__")
    return int(index) if separator and index.isascii() and index.isdigit() else None


def output_positions(names: list[str]) -> list[int]:
    """The result each output is: `<name>__<index>` when every name is one, else config
    order."""
    indices = [named_index(name) for name in names]
    return indices if None not in indices else list(range(len(names)))


def input_positions(names: list[str], arguments: list[str]) -> list[int]:
    """The forward argument each input is: by name, by `<name>__<index>`, else config order
    (the first convention every input follows)."""
    if all(name in arguments for name in names):
        return [arguments.index(name) for name in names]
    return output_positions(names)


def check_inputs(names: list[str], positions: list[int], arguments: list[str],
                 required: int) -> None:
    """Refuse inputs that are not forward's first arguments, each once: every argument
    without a default (the first `required`) needs one."""
    signature = f"forward({', '.join(arguments)})"
    if not required <= len(names) <= len(arguments):
        takes = (f"{len(arguments)}" if required == len(arguments)
                 else f"{required} to {len(arguments)}")
        raise FailedPrecondition(
            f"{signature} takes {takes} inputs; config.pbtxt declares {len(names)} "
            f"({', '.join(names)})")
    for argument in range(len(names)):
        given = [name for name, position in zip(names, positions) if position == argument]
        if len(given) != 1:
            raise FailedPrecondition(
                f"{signature}: argument {argument} ('{arguments[argument]}') is given by "
                f"{' and '.join(repr(n) for n in given) if given else 'no input'} of "
                f"config.pbtxt ({', '.join(names)})")
