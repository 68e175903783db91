"""The model repository, in Triton's layout.

    <repository>/<model>/config.pbtxt
    <repository>/<model>/<version>/model.pt     (TorchScript; model.onnx, model.py, or
                                                 nothing for an ensemble)

A version is a directory named by a positive integer; its artifact is the config's
`default_model_filename`, or the backend's default file. Which versions are served follows
the config's `version_policy`, whose default (as in Triton) is the latest one.

`config.pbtxt` is protobuf text format, read leniently (`meshserve.common.config_text`: what
meshserve does not define is skipped with a warning) and then checked here.

Loading completes configs (an ONNX model's inputs and outputs from its graph) and checks
each ensemble's plan against the models it names. A model that cannot load is refused,
with the reason kept in `refused`, while the rest are served.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshserve.common import ensemble_plan, onnx_graph
from meshserve.common.artifacts import MANIFEST_FILENAME, SIGNATURE_FILENAME
from meshserve.common.config_text import parse_text
from meshserve.common.datatypes import WIRE_FROM_CONFIG
from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError
from meshserve.common.model_files import is_version_name, manifest_summary
from meshserve.protocol.model_config_pb2 import ModelConfig, ModelQueuePolicy

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.pbtxt"
DEFAULT_MODEL_FILENAME = "model.pt"
PLATFORM = "pytorch_libtorch"
BACKEND = "pytorch"
VERSION_FILES = (MANIFEST_FILENAME, SIGNATURE_FILENAME)  # beside the artifact, never it


@dataclass(frozen=True)
class Kind:
    """One kind of model meshserve serves: how config.pbtxt names it, and its file."""

    name: str
    platform: str  # "" when only a backend names it
    backend: str
    filename: str  # "" for an ensemble, which has no artifact


TORCHSCRIPT = Kind("torchscript", PLATFORM, BACKEND, DEFAULT_MODEL_FILENAME)
ONNX = Kind("onnx", "onnxruntime_onnx", "onnxruntime", "model.onnx")
PYTHON = Kind("python", "", "python", "model.py")
ENSEMBLE = Kind("ensemble", "ensemble", "", "")
KINDS = (TORCHSCRIPT, ONNX, PYTHON, ENSEMBLE)
_SUPPORTED = ", ".join(
    f'platform "{k.platform}"' if k.platform else f'backend "{k.backend}"' for k in KINDS)


def kind_of(config: ModelConfig) -> Kind:
    """The kind of a parsed config (parse_config has refused any other)."""
    for kind in KINDS:
        if (config.platform and config.platform == kind.platform) or (
                not config.platform and config.backend and config.backend == kind.backend):
            return kind
    return TORCHSCRIPT


def instance_count(config: ModelConfig) -> int:
    """The instances of the model its `instance_group` asks for: each group's `count` (1 when
    unset), together; 1 without a group. (A group's `gpus` list is not applied: every instance
    runs on the device its compute is given.)"""
    return sum(max(group.count, 1) for group in config.instance_group) or 1


def artifact_filename(config: ModelConfig) -> str:
    """The file each version directory holds: `default_model_filename` or the kind's."""
    return config.default_model_filename or kind_of(config).filename


def _check_tensor(source: str, kind: str, tensor, seen: set[str]) -> None:
    if not tensor.name:
        raise InvalidArgument(f"{source}: an {kind} has no name")
    if tensor.name in seen:
        raise InvalidArgument(f"{source}: {kind} '{tensor.name}' is declared twice")
    seen.add(tensor.name)
    if tensor.data_type not in WIRE_FROM_CONFIG:
        raise InvalidArgument(
            f"{source}: {kind} '{tensor.name}' has no valid data_type "
            f"(got {tensor.data_type}; expected TYPE_BOOL ... TYPE_BF16)"
        )
    for d in tensor.dims:
        if d != -1 and d < 1:
            raise InvalidArgument(
                f"{source}: {kind} '{tensor.name}' has dimension {d} in dims "
                f"{list(tensor.dims)}; each must be >= 1, or -1 for a variable size"
            )


# Triton sections whose models meshserve cannot serve right: refused, not skipped.
UNSUPPORTED = {
    "sequence_batching": "meshserve serves stateless models only (its batcher would mix the "
                         "requests of different sequences and give the model no sequence "
                         "controls or state)",
    "batch_input": "ragged batching: meshserve makes no batch input tensors for the model",
    "batch_output": "ragged batching: meshserve splits no batch output tensors",
}


def parse_config(text: str, source: str, default_name: str) -> ModelConfig:
    """Parse and validate a model's config.pbtxt.

    `source` names the file in messages; `default_name` (the model's directory) fills in an
    empty `name` and must match a given one.
    """
    config = parse_text(text, source, UNSUPPORTED)

    if not config.name:
        config.name = default_name
    elif default_name and config.name != default_name:
        raise InvalidArgument(
            f"{source}: model name '{config.name}' does not match its directory '{default_name}'"
        )

    kind = _check_kind(config, source)
    _check_decoupled(config, kind, source)
    _check_filename(config, source)
    if config.max_batch_size < 0:
        raise InvalidArgument(
            f"{source}: max_batch_size must be >= 0 (0: no batch dimension), "
            f"got {config.max_batch_size}"
        )
    # An ONNX model's undeclared inputs and outputs are read from its graph at load.
    if not config.input and kind is not ONNX:
        raise InvalidArgument(f"{source}: model '{config.name}' declares no input")
    if not config.output and kind is not ONNX:
        raise InvalidArgument(f"{source}: model '{config.name}' declares no output")
    seen: set[str] = set()
    for tensor in config.input:
        _check_tensor(source, "input", tensor, seen)
    seen = set()
    for tensor in config.output:
        _check_tensor(source, "output", tensor, seen)

    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest" and policy.latest.num_versions < 1:
        raise InvalidArgument(f"{source}: version_policy latest needs num_versions >= 1")
    if choice == "specific":
        if not policy.specific.versions:
            raise InvalidArgument(f"{source}: version_policy specific lists no versions")
        bad = [v for v in policy.specific.versions if v < 1]
        if bad:
            raise InvalidArgument(
                f"{source}: version_policy specific lists versions {bad}; "
                f"versions are positive integers"
            )
    _check_preferred_sizes(config, source)
    _check_priorities(config, source)
    if kind is ENSEMBLE:
        ensemble_plan.check_steps(config, source)
    return config


def _check_filename(config: ModelConfig, source: str) -> None:
    """The artifact is a file of its version directory: a plain name, not a path (which would
    read or write outside it) nor the manifest or its signature."""
    name = config.default_model_filename
    if name and ("/" in name or "\\" in name or name in (".", "..", *VERSION_FILES)
                 or any(is_control(c) for c in name)):
        raise InvalidArgument(
            f"{source}: default_model_filename {name!r} must be a file name in the version "
            f"directory (no '/', not {' or '.join(VERSION_FILES)})")


def is_control(char: str) -> bool:
    """Whether `char` is a C0 or C1 control character (a terminal obeys them)."""
    return ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0


def _check_preferred_sizes(config: ModelConfig, source: str) -> None:
    """Each preferred batch size is a batch the model takes: 1 to max_batch_size (Triton
    refuses the model otherwise; the batcher could not apply it)."""
    for size in config.dynamic_batching.preferred_batch_size:
        if not 1 <= size <= config.max_batch_size:
            raise InvalidArgument(
                f"{source}: dynamic_batching preferred_batch_size {size} must be between 1 "
                f"and max_batch_size {config.max_batch_size}")


def _check_priorities(config: ModelConfig, source: str) -> None:
    """As Triton checks a config: with priority levels, the default level is one of them and
    so is each level given a queue policy; preserve_ordering takes one level and no DELAY."""
    dynamic = config.dynamic_batching
    levels = dynamic.priority_levels
    where = f"{source}: dynamic_batching"
    if levels and not 1 <= dynamic.default_priority_level <= levels:
        raise InvalidArgument(
            f"{where} default_priority_level {dynamic.default_priority_level} must be between "
            f"1 and priority_levels {levels}")
    for level in sorted(dynamic.priority_queue_policy):
        if not 1 <= level <= levels:
            raise InvalidArgument(
                f"{where} priority_queue_policy for priority level {level} is outside 1 to "
                f"priority_levels {levels}")
    if not dynamic.preserve_ordering:
        return
    if levels > 1:
        raise InvalidArgument(f"{where} preserve_ordering allows one priority level, not "
                              f"priority_levels {levels}")
    policies = [dynamic.default_queue_policy, *dynamic.priority_queue_policy.values()]
    if any(p.timeout_action == ModelQueuePolicy.DELAY and p.default_timeout_microseconds
           for p in policies):
        raise InvalidArgument(f"{where} preserve_ordering does not allow a queue policy whose "
                              "timeout_action is DELAY")


def _check_decoupled(config: ModelConfig, kind: Kind, source: str) -> None:
    """A decoupled model (`model_transaction_policy { decoupled: true }`) is a Python model
    or an ensemble, whose answers are not cached."""
    if not config.model_transaction_policy.decoupled:
        return
    if kind not in (PYTHON, ENSEMBLE):
        raise FailedPrecondition(
            f"{source}: model_transaction_policy decoupled is served for Python models "
            f"(backend \"python\") and ensembles only; a {kind.name} model answers each "
            "request once")
    if config.response_cache.enable:
        raise InvalidArgument(
            f"{source}: response_cache cannot be enabled for a decoupled model: it answers a "
            "request any number of times, and a cache keeps one answer")


def _check_kind(config: ModelConfig, source: str) -> Kind:
    """Refuse platforms and backends meshserve does not serve; fill in the platform (and
    for ONNX and Python models the file name) the way Triton completes a config."""
    if not config.platform and not config.backend:
        config.platform = PLATFORM
    platforms = {k.platform: k for k in KINDS if k.platform}
    backends = {k.backend: k for k in KINDS if k.backend}
    by_platform = platforms.get(config.platform) if config.platform else None
    by_backend = backends.get(config.backend) if config.backend else None
    if config.platform and by_platform is None:
        raise FailedPrecondition(
            f"{source}: platform '{config.platform}' is not supported; meshserve serves "
            f"{_SUPPORTED}")
    if config.backend and by_backend is None:
        raise FailedPrecondition(
            f"{source}: backend '{config.backend}' is not supported; meshserve serves "
            f"{_SUPPORTED}")
    if by_platform and by_backend and by_platform is not by_backend:
        raise FailedPrecondition(
            f"{source}: platform '{config.platform}' and backend '{config.backend}' name "
            "different runtimes; give one of them")
    kind = by_platform or by_backend
    if kind is ONNX:
        config.platform = ONNX.platform
    if kind in (ONNX, PYTHON) and not config.default_model_filename:
        config.default_model_filename = kind.filename
    return kind


# --------------------------------------------------------------------------- repository


def _served_versions(name: str, config: ModelConfig, available: list[int]) -> tuple[str, ...]:
    """Apply the version policy to the versions on disk (sorted ascending)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        served = available
    elif choice == "specific":
        wanted = set(policy.specific.versions)
        served = [v for v in available if v in wanted]
        missing = sorted(wanted.difference(available))
        if missing:
            logger.warning(
                "model '%s': version_policy names versions %s that have no directory",
                name,
                ", ".join(map(str, missing)),
            )
        if not served:
            raise FailedPrecondition(
                f"model '{name}': none of the versions its version_policy names "
                f"({', '.join(map(str, sorted(wanted)))}) exists "
                f"(on disk: {', '.join(map(str, available))})"
            )
    else:  # latest, which is also the default
        count = policy.latest.num_versions if choice == "latest" else 1
        served = available[-count:]
    return tuple(str(v) for v in served)


def _attach_provenance(config: ModelConfig, model_dir: Path, versions: tuple[str, ...]) -> None:
    """Signed versions' artifact digest and signer as config parameters, as they are on
    disk (compute verifies them before loading): `artifact_digest`/`artifact_signer` of the
    default version, and `artifact_digest.V`/`artifact_signer.V` of each served version."""
    for version in versions:
        summary = manifest_summary(model_dir / version)
        if summary is None:
            continue
        suffixes = [f".{version}"] + ([""] if version == versions[-1] else [])
        for suffix in suffixes:
            config.parameters[f"artifact_digest{suffix}"].string_value = summary[0]
            config.parameters[f"artifact_signer{suffix}"].string_value = summary[1]


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository: its directory, configuration and served versions, the
    class labels of its outputs that have a `label_filename` (and for an ensemble, its
    checked plan)."""

    name: str
    path: Path
    config: ModelConfig
    versions: tuple[str, ...]
    plan: ensemble_plan.Plan | None = None
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def default_version(self) -> str:
        """The highest served version."""
        return self.versions[-1]


class ModelRepository:
    """The models of a repository directory, loaded once; `refused` maps each model that
    could not load to why."""

    def __init__(self, path: Path, models: dict[str, ModelEntry],
                 refused: dict[str, str] | None = None) -> None:
        self.path = path
        self.models = models
        self.refused = refused or {}

    @classmethod
    def load(cls, path: Path | str) -> ModelRepository:
        path = Path(path)
        if not path.is_dir():
            raise FailedPrecondition(f"model repository {path} is not a directory")
        models: dict[str, ModelEntry] = {}
        refused: dict[str, str] = {}
        for model_dir in sorted(p for p in path.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            try:
                entry = cls._load_model(model_dir)
            except ServingError as error:
                refused[model_dir.name] = _naming(model_dir.name, error.message)
                continue
            if entry is not None:
                models[entry.name] = entry
        _plan_ensembles(models, refused)
        for reason in sorted(refused.values()):
            logger.error("refusing %s", reason)
        if not models:
            logger.warning("model repository %s holds no models it can serve", path)
        return cls(path, models, refused)

    @staticmethod
    def _load_model(model_dir: Path) -> ModelEntry | None:
        name = model_dir.name
        config_path = model_dir / CONFIG_FILENAME
        if not config_path.is_file():
            logger.warning("skipping %s: it has no %s", model_dir, CONFIG_FILENAME)
            return None
        try:
            text = config_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise InvalidArgument(f"{config_path}: not UTF-8 text ({error})") from None
        config = parse_config(text, str(config_path), name)

        available: list[int] = []
        for child in model_dir.iterdir():
            if not child.is_dir():
                continue
            if is_version_name(child.name):
                available.append(int(child.name))
            elif child.name.isascii() and child.name.isdigit():
                logger.warning(
                    "model '%s': ignoring directory %s; a version is a positive integer "
                    "without leading zeros",
                    name,
                    child,
                )
        if not available:
            raise FailedPrecondition(
                f"model '{name}' in {model_dir} has no version directory "
                f"(a subdirectory named by a positive integer, holding the model file)"
            )
        available.sort()
        versions = _served_versions(name, config, available)
        if kind_of(config) is ONNX and not (config.input and config.output):
            version = versions[-1]
            onnx_graph.complete_config(
                config, model_dir / version / artifact_filename(config),
                f"model '{name}' version {version}")
        _check_reshapes(name, config)
        _warn_unapplied(name, config)
        _attach_provenance(config, model_dir, versions)
        return ModelEntry(name=name, path=model_dir, config=config, versions=versions,
                          labels=_labels(name, model_dir, config))

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            if name in self.refused:
                raise NotFound(f"model '{name}' is not served: refused at load: "
                               f"{self.refused[name]}") from None
            raise NotFound(f"unknown model '{name}'") from None

    def ensembles(self) -> dict[str, ModelEntry]:
        """The ensembles, by name (they have no batcher or compute of their own)."""
        return {name: entry for name, entry in self.models.items() if entry.plan is not None}

    def version(self, name: str, version: str) -> str:
        """The served version a request for `version` means ("" means the default)."""
        entry = self.get(name)
        if not version:
            return entry.default_version
        wanted = version.strip()
        # "02" is version 2; int() would read it too, but raises past 4,300 digits.
        if wanted.isascii() and wanted.isdigit():
            wanted = wanted.lstrip("0") or "0"
        if wanted not in entry.versions:
            raise NotFound(
                f"model '{name}' has no version '{version}' (served: {', '.join(entry.versions)})"
            )
        return wanted

    def artifact(self, name: str, version: str) -> Path:
        """The model file of a served version; FailedPrecondition if it is missing."""
        entry = self.get(name)
        resolved = self.version(name, version)
        filename = artifact_filename(entry.config)
        path = entry.path / resolved / filename
        if not path.is_file():
            raise FailedPrecondition(f"model '{name}' version {resolved} has no model file {path}")
        return path


def _check_reshapes(name: str, config: ModelConfig) -> None:
    """Refuse a `reshape` that holds other than its tensor's elements (a variable dimension
    on either side is checked on each request, in compute)."""
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            if not tensor.HasField("reshape"):
                continue
            dims, target = list(tensor.dims), list(tensor.reshape.shape)
            if -1 in dims or -1 in target:
                continue
            if math.prod(dims) != math.prod(target):
                raise InvalidArgument(
                    f"model '{name}' {kind} '{tensor.name}': reshape {target} holds "
                    f"{math.prod(target)} elements; its dims {dims} hold {math.prod(dims)}")


def _warn_unapplied(name: str, config: ModelConfig) -> None:
    """Warn of the settings meshserve does not apply, and what it does instead."""
    for tensor in config.input:
        if tensor.allow_ragged_batch:
            logger.warning("model '%s' input '%s': allow_ragged_batch is not applied: only "
                           "requests of the same shape share a batch", name, tensor.name)


def named_file(directory: Path, name: str) -> Path | None:
    """The file a model's config names in `directory`; None when the name leads outside it
    (`..`, an absolute path, a link out)."""
    path = directory / name
    return path if path.resolve().is_relative_to(directory.resolve()) else None


def _labels(name: str, model_dir: Path, config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each output's class labels, one a line of its `label_filename` (a file in the model's
    directory), for the classification extension."""
    labels = {}
    for output in config.output:
        if not output.label_filename:
            continue
        path = named_file(model_dir, output.label_filename)
        where = f"model '{name}' output '{output.name}': label_filename '{output.label_filename}'"
        if path is None:
            raise InvalidArgument(f"{where} is outside the model's directory")
        try:
            labels[output.name] = tuple(path.read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError) as error:
            raise FailedPrecondition(f"{where} cannot be read: {error}") from None
    return labels


def _naming(name: str, message: str) -> str:
    """A refusal message that names the model first."""
    return message if message.startswith(f"model '{name}'") else f"model '{name}': {message}"


def _plan_ensembles(models: dict[str, ModelEntry], refused: dict[str, str]) -> None:
    """Give each ensemble its checked plan; refuse (removing it from `models`) an ensemble
    whose steps name a missing or refused model, form a cycle, or leave a tensor unmapped.
    Repeats until no ensemble depends on a refused one."""
    changed = True
    while changed:
        changed = False
        for name, entry in sorted(models.items()):
            if kind_of(entry.config) is not ENSEMBLE:
                continue
            try:
                plan = ensemble_plan.build(entry.config, _step_lookup(models, refused),
                                           str(entry.path / CONFIG_FILENAME))
                ensemble_plan.check_acyclic(name, models_of=lambda n: _steps_of(models, n))
            except ServingError as error:
                refused[name] = _naming(name, error.message)
                del models[name]
                changed = True
                continue
            if entry.plan != plan:
                models[name] = replace(entry, plan=plan, config=_decoupled_if(plan, entry.config))
                changed = changed or models[name].config is not entry.config


def _decoupled_if(plan: ensemble_plan.Plan, config: ModelConfig) -> ModelConfig:
    """An ensemble with a decoupled step is decoupled itself, as its config then says (for
    the clients that read it to choose a stream)."""
    if not plan.decoupled or config.model_transaction_policy.decoupled:
        return config
    marked = ModelConfig()
    marked.CopyFrom(config)
    marked.model_transaction_policy.decoupled = True
    return marked


def _step_lookup(models: dict[str, ModelEntry], refused: dict[str, str]):
    def lookup(name: str) -> tuple[ModelConfig, tuple[str, ...]]:
        if name in models:
            return models[name].config, models[name].versions
        if name in refused:
            raise FailedPrecondition(f"model '{name}' was refused: {refused[name]}")
        raise NotFound(f"model '{name}' is not in the repository")
    return lookup


def _steps_of(models: dict[str, ModelEntry], name: str) -> list[str]:
    entry = models.get(name)
    if entry is None or kind_of(entry.config) is not ENSEMBLE:
        return []
    return [step.model_name for step in entry.config.ensemble_scheduling.step]
