"""Trace settings that change while the ingress runs: Triton's trace extension (`GET` and
`POST /v2[/models/M]/trace/setting`, the `TraceSetting` RPC), with Triton's names and
string values, deciding which requests start an OpenTelemetry trace.

- `trace_level`: `["OFF"]` (no request starts a trace) or `["TIMESTAMPS"]` (spans, with
  their times, at every hop); `TENSORS` is refused: a trace never holds a request's data;
- `trace_rate`: `"N"`, every N-th request starts one;
- `trace_count`: `"-1"` no bound, `"N"` N traces more and then none (what a read shows is
  what is left);
- `log_frequency` (`"0"`), `trace_file` (`""`) and `trace_mode` (`"opentelemetry"`): fixed:
  spans leave over OTLP as they end, and no file of Triton's is written.

A model may have settings of its own: each it does not set follows the global one (its count
included, shared then), and one sent as null (an empty list over gRPC) follows the global one
again; a global setting sent as null goes back to what the ingress started with. Counting is
per owner of the rate: the model's when it sets one, else all the models that follow the
global rate together.

`Sampled` is the OpenTelemetry sampler that applies them to the ingress's `ingress.request`
spans (the model in the span's `model` attribute); spans inside a request follow it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import get_current_span

from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.common.log_settings import shown_value
from meshserve.common.tracing import ratio_of

OFF, TIMESTAMPS = "OFF", "TIMESTAMPS"
FIXED = {"log_frequency": "0", "trace_file": "", "trace_mode": "opentelemetry"}
NAMES = ("trace_level", "trace_rate", "trace_count", *FIXED)
DEFAULT_RATE = 1000  # Triton's
WHY_FIXED = {
    "log_frequency": "spans leave over OTLP as they end",
    "trace_file": "spans leave over OTLP, no trace file is written",
    "trace_mode": "meshserve's traces are OpenTelemetry's",
}


@dataclass(frozen=True)
class TraceSettings:
    """One owner's settings; None: not its own (a model's), following the global one."""

    level: str | None = None
    rate: int | None = None
    count: int | None = None

    @classmethod
    def of_sampler(cls, name: str, ratio: float) -> TraceSettings:
        """What the ingress starts with, from `OTEL_TRACES_SAMPLER` and its ratio: always on
        every request, always off none, a ratio every round(1 / ratio)-th."""
        if name.endswith("always_off") or (name.endswith("traceidratio") and ratio <= 0):
            return cls(OFF, DEFAULT_RATE, -1)
        rate = max(1, round(1 / ratio)) if name.endswith("traceidratio") else 1
        return cls(TIMESTAMPS, rate, -1)

    def over(self, base: TraceSettings) -> TraceSettings:
        """These settings, each unset one taken from `base`."""
        return TraceSettings(*(base_value if own is None else own for own, base_value in
                               zip(dataclasses.astuple(self), dataclasses.astuple(base))))

    def as_dict(self) -> dict[str, list[str]]:
        """Triton's names, each value a list of strings (gRPC's form)."""
        return {"trace_level": [self.level], "trace_rate": [str(self.rate)],
                "trace_count": [str(self.count)],
                **{name: [value] for name, value in FIXED.items()}}

    def changed(self, updates: Mapping[str, Sequence[str] | None],
                start: TraceSettings) -> TraceSettings:
        """These settings with `updates` applied (a name to its values, or None: back to
        `start`'s value, which is None for a model's); InvalidArgument naming the first
        setting that is unknown or refused, and nothing changed."""
        values = {}
        for name, sent in updates.items():
            if name not in NAMES:
                raise InvalidArgument(f"unknown trace setting '{name[:64]}' (settings: "
                                      f"{', '.join(NAMES)})")
            if sent is None:
                if name in FIXED:
                    continue
                key = name.removeprefix("trace_")
                values[key] = getattr(start, key)
                continue
            if name == "trace_level":
                values["level"] = level_of(sent)
                continue
            text = one_value(name, sent)
            if name in FIXED:
                if text != FIXED[name]:
                    raise InvalidArgument(f"trace setting '{name}' can only be "
                                          f"'{FIXED[name]}': {WHY_FIXED[name]}")
            elif name == "trace_rate":
                values["rate"] = whole(name, text, 1)
            else:
                values["count"] = whole(name, text, -1)
        return dataclasses.replace(self, **values)


def level_of(sent: Sequence[str]) -> str:
    levels = set(sent)
    if "TENSORS" in levels:
        raise InvalidArgument("trace setting 'trace_level' TENSORS is not served: a trace "
                              "never holds a request's data")
    if levels in ({OFF}, {TIMESTAMPS}):
        return levels.pop()
    raise InvalidArgument(f"trace setting 'trace_level' must be [\"OFF\"] or "
                          f"[\"TIMESTAMPS\"], not {shown_value(list(sent))}")


def one_value(name: str, sent: Sequence[str]) -> str:
    if len(sent) != 1 or not isinstance(sent[0], str):
        raise InvalidArgument(f"trace setting '{name}' takes one string, not {shown_value(sent)}")
    return sent[0]


def whole(name: str, text: str, lowest: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or value < lowest or value >= 2**63:
        raise InvalidArgument(f"trace setting '{name}' must be a whole number from {lowest}, "
                              f"not {shown_value(text)}")
    return value


@dataclass
class Owner:
    """Settings and the requests counted against its rate (and its traces left)."""

    settings: TraceSettings
    seen: int = 0


@dataclass
class TraceControl:
    """The ingress's trace settings: the global ones (`start` at first) and each model's
    own. `enabled` is False when the ingress exports no traces (no OTLP endpoint): then
    nothing may turn them on. Changes are logged at WARNING, naming who made them, and told
    to `audit(by, changes)`."""

    start: TraceSettings
    enabled: bool = True
    audit: Callable[[str, str], None] | None = None
    owners: dict[str, Owner] = field(default_factory=dict)  # "" the global one, else models

    def __post_init__(self) -> None:
        self.owners.setdefault("", Owner(self.start))

    def settings(self, model: str = "") -> TraceSettings:
        """The settings in force for `model` ("": the global ones)."""
        base = self.owners[""].settings
        own = self.owners.get(model) if model else None
        return base if own is None else own.settings.over(base)

    def update(self, model: str, updates: Mapping[str, Sequence[str] | None],
               by: str) -> TraceSettings:
        """Apply `updates` to the global settings (`model` "") or to the model's own;
        returns the settings in force for it then."""
        owner = self.owners.get(model)
        current = owner.settings if owner is not None else TraceSettings()
        changed = current.changed(updates, self.start if not model else TraceSettings())
        if not self.enabled and changed.over(self.owners[""].settings).level == TIMESTAMPS:
            raise FailedPrecondition("tracing is off in this ingress: it exports no traces "
                                     "(OTEL_EXPORTER_OTLP_ENDPOINT is not set)")
        if changed != current:
            before = self.settings(model)
            if model and changed == TraceSettings():  # all its own cleared
                del self.owners[model]
            else:
                self.owners[model] = Owner(changed)
            after = self.settings(model)
            changes = ", ".join(
                f"{name}={value[0]}" for name, value in after.as_dict().items()
                if value != before.as_dict()[name]) or "own settings"
            where = f"model '{model}'" if model else "global"
            logging.getLogger(__name__).warning("trace settings (%s) changed by '%s': %s",
                                                where, by, changes)
            if self.audit is not None:
                self.audit(by, f"{where}: {changes}")
        return self.settings(model)

    def sample(self, model: str) -> bool:
        """Whether a request for `model` starts a trace; counts it."""
        own = self.owners.get(model)
        settings = self.settings(model)
        if settings.level != TIMESTAMPS or settings.count == 0:
            return False
        counted = own if own is not None and own.settings.rate is not None else self.owners[""]
        counted.seen += 1
        if counted.seen % settings.rate:
            return False
        spent = own if own is not None and own.settings.count is not None else self.owners[""]
        if spent.settings.count > 0:
            spent.settings = dataclasses.replace(spent.settings, count=spent.settings.count - 1)
        return True


class Sampled(Sampler):
    """The ingress's sampler: an `ingress.request` span starts a trace as the settings say
    (`parent_based`: unless its caller sent a traceparent, whose choice it follows); a span
    inside one follows its parent."""

    def __init__(self, control: TraceControl, parent_based: bool) -> None:
        self.control = control
        self.parent_based = parent_based

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None) -> SamplingResult:
        parent = get_current_span(parent_context).get_span_context()
        if parent.is_valid and (not parent.is_remote or self.parent_based):
            sampled = parent.trace_flags.sampled
        else:
            sampled = self.control.sample(str((attributes or {}).get("model", "")))
        decision = Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP
        return SamplingResult(decision, attributes if sampled else None,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return "meshserve trace settings"


def trace_updates(sent: Mapping[str, Any]) -> dict[str, list[str] | None]:
    """The updates a `TraceSettingRequest`'s settings ask for (no values: null)."""
    return {name: list(value.value) or None for name, value in sent.items()}


def fill_trace_settings(answer: Any, settings: TraceSettings) -> None:
    """A `TraceSettingResponse`'s settings map, filled with `settings`."""
    for name, values in settings.as_dict().items():
        answer[name].value.extend(values)


def json_document(settings: TraceSettings) -> dict[str, list[str] | str]:
    """The settings as the HTTP binding writes them: `trace_level` a list, the others
    strings."""
    return {name: values if name == "trace_level" else values[0]
            for name, values in settings.as_dict().items()}


def sent_values(name: str, value: object) -> list[str] | None:
    """A setting's value as the HTTP binding sends it (a string, a list of strings, or null)
    in gRPC's form; InvalidArgument naming the setting otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise InvalidArgument(f"trace setting '{name[:64]}' takes a string, a list of strings or "
                          f"null, not {shown_value(value)}")


def take_charge(tracing: Any, audit: Callable[[str, str], None] | None = None
                ) -> TraceControl:
    """The ingress's trace settings, put in charge of which of its requests start a trace
    (from what `OTEL_TRACES_SAMPLER` said at first); without tracing, off and kept so."""
    if tracing is None or tracing.sampler is None:
        return TraceControl(TraceSettings(OFF, DEFAULT_RATE, -1), enabled=False, audit=audit)
    name = tracing.settings.sampler
    start = TraceSettings.of_sampler(name, ratio_of(tracing.settings.sampler_arg))
    control = TraceControl(start, audit=audit)
    tracing.sampler.inner = Sampled(control, parent_based=name.startswith("parentbased"))
    return control
