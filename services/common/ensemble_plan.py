"""An ensemble's plan: which model versions run in which order, and which tensors flow
between them. Pure: built from `ensemble_scheduling` and the step models' configs.

Tensors are named in the ensemble's scope. The ensemble's inputs exist at the start; each
step reads some of them (`input_map`: the step model's input → an ensemble tensor) and
writes new ones (`output_map`: the step model's output → an ensemble tensor). The plan puts
the steps in waves: every step of a wave reads only tensors that exist before the wave
starts, so a wave's steps may run at once. A plan is refused at load when a step names a
missing model or version, maps a tensor its model lacks, leaves a required input unmapped,
reads a tensor no one writes, disagrees on a datatype or shape, when steps (or ensembles)
form a cycle, or when two decoupled steps would run in one wave.

A decoupled step (its model answers a request any number of times) forks the plan: each of
its answers runs the waves after it on its own, with the tensors written before it and that
answer's outputs; the plan of an ensemble with such a step is `decoupled`.

As in Triton, a tensor may pass between a model that takes a batch dimension and one that
does not (an ensemble with `max_batch_size: 0` over batching steps, or a step with
`max_batch_size: 0` in a batching ensemble) when their shapes agree with the batch dimension
counted (`[-1, 4]` and `[4]` with a batch); `carried_shape` gives the shape it then takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshserve.common.datatypes import WIRE_FROM_CONFIG
from meshserve.common.errors import FailedPrecondition, InvalidArgument, ServingError
from meshserve.protocol.model_config_pb2 import ModelConfig

# A step model's (config, served versions); raises a ServingError when it cannot be served.
Lookup = Callable[[str], tuple[ModelConfig, tuple[str, ...]]]


@dataclass(frozen=True)
class Step:
    number: int  # 1-based, as the steps are written in config.pbtxt
    model: str
    version: str  # "": the version the mesh's traffic policy picks
    inputs: tuple[tuple[str, str], ...]  # (step model's input, ensemble tensor)
    outputs: tuple[tuple[str, str], ...]  # (step model's output, ensemble tensor)
    batching: bool  # the step model takes a batch dimension (max_batch_size > 0)
    input_dims: tuple[tuple[int, ...], ...]  # the step model's dims of each input
    decoupled: bool = False  # the step model may answer a request any number of times

    def describe(self) -> str:
        return f"step {self.number} ('{self.model}'" + (
            f" version {self.version})" if self.version else ")")


@dataclass(frozen=True)
class Plan:
    waves: tuple[tuple[Step, ...], ...]
    outputs: tuple[str, ...]  # the ensemble's outputs, in config order
    batching: bool  # the ensemble takes a batch dimension (max_batch_size > 0)
    output_dims: tuple[tuple[int, ...], ...]  # the ensemble's dims of each output

    @property
    def decoupled(self) -> bool:
        """Whether a step may answer any number of times, and the ensemble with it."""
        return any(s.decoupled for wave in self.waves for s in wave)

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(sorted((s for wave in self.waves for s in wave), key=lambda s: s.number))

    def waves_for(self, wanted: set[str]) -> tuple[tuple[Step, ...], ...]:
        """The waves that compute the `wanted` outputs (every output when empty): as Triton
        prunes them when a request asks for some of the outputs, a step none of whose
        outputs leads to a wanted one does not run."""
        if not wanted or wanted >= set(self.outputs):
            return self.waves
        needed, runs = set(wanted), set()
        for step in reversed([s for wave in self.waves for s in wave]):
            if any(tensor in needed for _, tensor in step.outputs):
                runs.add(step.number)
                needed.update(tensor for _, tensor in step.inputs)
        waves = (tuple(s for s in wave if s.number in runs) for wave in self.waves)
        return tuple(wave for wave in waves if wave)


def check_steps(config: ModelConfig, source: str) -> None:
    """What can be checked from the ensemble's own config: steps exist, name a model and
    map tensors, and no tensor is written twice."""
    steps = config.ensemble_scheduling.step
    if not steps:
        raise InvalidArgument(f"{source}: ensemble '{config.name}' has no "
                              "ensemble_scheduling step")
    written = {t.name: "an ensemble input" for t in config.input}
    for number, step in enumerate(steps, 1):
        where = f"{source}: step {number}"
        if not step.model_name:
            raise InvalidArgument(f"{where} names no model_name")
        if not step.input_map:
            raise InvalidArgument(f"{where} ('{step.model_name}') has an empty input_map")
        if not step.output_map:
            raise InvalidArgument(f"{where} ('{step.model_name}') has an empty output_map")
        for tensor in step.output_map.values():
            if tensor in written:
                raise InvalidArgument(f"{where} ('{step.model_name}') writes tensor "
                                      f"'{tensor}', which is already {written[tensor]}")
            written[tensor] = f"written by step {number}"


@dataclass(frozen=True)
class _Tensor:
    datatype: str
    dims: tuple[int, ...]
    origin: str
    batching: bool

    @property
    def shape(self) -> tuple[int, ...]:
        """Its dims with the batch dimension, when it has one."""
        return (-1, *self.dims) if self.batching else self.dims


def _fits(dims, shape) -> bool:
    """Whether `shape` is one that `dims` describes (-1 on either side fits any size)."""
    return len(dims) == len(shape) and all(
        a == b or -1 in (a, b) for a, b in zip(dims, shape))


def carried_shape(shape: list[int], dims: tuple[int, ...], batching: bool,
                  batched: bool) -> list[int]:
    """The shape in which a tensor of `shape` (`batched`: made with a batch dimension)
    reaches a reader of config `dims` that takes a batch dimension when `batching` (a step's
    input, or the ensemble's output), as Triton carries it: a tensor without a batch
    dimension that `dims` describes gains one of 1 for a batching reader; a tensor with a
    batch of 1 that `dims` does not describe loses it for a reader without batching; any
    other tensor keeps its shape."""
    if batching and not batched and _fits(dims, shape):
        return [1, *shape]
    if batched and not batching and shape[:1] == [1] and not _fits(dims, shape):
        return list(shape[1:])
    return list(shape)


def build(config: ModelConfig, lookup: Lookup, source: str) -> Plan:
    """The checked plan of an ensemble (raises a ServingError naming the step and why)."""
    check_steps(config, source)
    batching = config.max_batch_size > 0
    known = {t.name: _Tensor(WIRE_FROM_CONFIG[t.data_type], tuple(t.dims),
                             "ensemble input", batching) for t in config.input}
    steps = []
    for number, spec in enumerate(config.ensemble_scheduling.step, 1):
        step, written = _step(config, number, spec, lookup, source)
        steps.append(step)
        known.update(written)
    waves = _waves(steps, {t.name for t in config.input}, source)
    for tensor in config.output:
        producer = known.get(tensor.name)
        if producer is None or producer.origin == "ensemble input":
            raise InvalidArgument(f"{source}: ensemble output '{tensor.name}' is not written "
                                  "by any step's output_map")
        _agree(tensor.name, producer, _Tensor(WIRE_FROM_CONFIG[tensor.data_type],
                                              tuple(tensor.dims), "ensemble output", batching),
               source)
    for step in steps:
        for name, tensor in step.inputs:
            _agree(tensor, known[tensor], _input_of(lookup(step.model)[0], name, step), source)
    return Plan(waves=waves, outputs=tuple(t.name for t in config.output), batching=batching,
                output_dims=tuple(tuple(t.dims) for t in config.output))


def _step(config: ModelConfig, number: int, spec, lookup: Lookup,
          source: str) -> tuple[Step, dict[str, _Tensor]]:
    where = f"{source}: step {number} ('{spec.model_name}')"
    if spec.model_name == config.name:
        raise FailedPrecondition(f"{where} names the ensemble itself")
    try:
        step_config, versions = lookup(spec.model_name)
    except ServingError as error:
        raise type(error)(f"{where}: {error.message}") from None
    version = "" if spec.model_version <= 0 else str(spec.model_version)
    if version and version not in versions:
        raise FailedPrecondition(f"{where} asks for version {version}, which is not served "
                                 f"(served: {', '.join(versions)})")
    if step_config.max_batch_size and config.max_batch_size > step_config.max_batch_size:
        raise FailedPrecondition(
            f"{where}: the ensemble's max_batch_size {config.max_batch_size} exceeds the step "
            f"model's {step_config.max_batch_size}")
    inputs = {t.name: t for t in step_config.input}
    outputs = {t.name: t for t in step_config.output}
    for name in spec.input_map:
        if name not in inputs:
            raise InvalidArgument(f"{where}: input_map names input '{name}', which model "
                                  f"'{spec.model_name}' lacks (inputs: {', '.join(inputs)})")
    for name, tensor in inputs.items():
        if name not in spec.input_map and not tensor.optional:
            raise InvalidArgument(f"{where}: input '{name}' of model '{spec.model_name}' is "
                                  "not in input_map")
    batching = step_config.max_batch_size > 0
    written = {}
    for name, tensor in spec.output_map.items():
        if name not in outputs:
            raise InvalidArgument(f"{where}: output_map names output '{name}', which model "
                                  f"'{spec.model_name}' lacks (outputs: {', '.join(outputs)})")
        out = outputs[name]
        written[tensor] = _Tensor(WIRE_FROM_CONFIG[out.data_type], tuple(out.dims),
                                  f"output '{name}' of step {number} ('{spec.model_name}')",
                                  batching)
    mapped = tuple(sorted(spec.input_map.items()))
    step = Step(number, spec.model_name, version, mapped, tuple(sorted(spec.output_map.items())),
                batching, tuple(tuple(inputs[name].dims) for name, _ in mapped),
                step_config.model_transaction_policy.decoupled)
    return step, written


def _input_of(step_config: ModelConfig, name: str, step: Step) -> _Tensor:
    tensor = next(t for t in step_config.input if t.name == name)
    return _Tensor(WIRE_FROM_CONFIG[tensor.data_type], tuple(tensor.dims),
                   f"input '{name}' of {step.describe()}", step.batching)


def _agree(name: str, producer: _Tensor, consumer: _Tensor, source: str) -> None:
    if producer.datatype != consumer.datatype:
        raise InvalidArgument(f"{source}: tensor '{name}' is {producer.datatype} as "
                              f"{producer.origin} but {consumer.datatype} as {consumer.origin}")
    if not (_fits(producer.dims, consumer.dims) or _fits(producer.shape, consumer.shape)):
        raise InvalidArgument(f"{source}: tensor '{name}' has dims {list(producer.dims)} as "
                              f"{producer.origin} but {list(consumer.dims)} as "
                              f"{consumer.origin}")


def _waves(steps: list[Step], inputs: set[str], source: str) -> tuple[tuple[Step, ...], ...]:
    available = set(inputs)
    remaining = list(steps)
    waves = []
    while remaining:
        ready = tuple(s for s in remaining if all(t in available for _, t in s.inputs))
        if not ready:
            _refuse_stuck(remaining, available, steps, source)
        forks = [s for s in ready if s.decoupled]
        if len(forks) > 1:
            raise InvalidArgument(
                f"{source}: {forks[0].describe()} and {forks[1].describe()} are both "
                "decoupled and would run at once: an ensemble forks at one decoupled step at "
                "a time (give one of them an input the other writes)")
        waves.append(ready)
        remaining = [s for s in remaining if s not in ready]
        available.update(t for s in ready for _, t in s.outputs)
    return tuple(waves)


def _refuse_stuck(remaining: list[Step], available: set[str], steps: list[Step],
                  source: str) -> None:
    written = {t for s in steps for _, t in s.outputs}
    for step in remaining:
        for _, tensor in step.inputs:
            if tensor not in available and tensor not in written:
                raise InvalidArgument(
                    f"{source}: {step.describe()} reads tensor '{tensor}', which is neither an "
                    "ensemble input nor written by any step")
    names = ", ".join(str(s.number) for s in remaining)
    raise InvalidArgument(f"{source}: steps {names} form a cycle: each waits for a tensor "
                          "another of them writes")


def check_acyclic(name: str, models_of: Callable[[str], list[str]]) -> None:
    """Refuse an ensemble that reaches itself through the ensembles among its steps."""
    def visit(model: str, path: tuple[str, ...]) -> None:
        for step in models_of(model):
            if step == name:
                chain = " -> ".join((*path, step))
                raise FailedPrecondition(f"ensemble '{name}' contains itself: {chain}")
            if step not in path:
                visit(step, (*path, step))

    visit(name, (name,))
