"""Log settings that change while a service runs: Triton's logging extension (`GET` and
`POST /v2/logging`, the `LogSettings` RPC), with Triton's names.

- `log_info`, `log_warning`, `log_error`: whether records of that level are written (ERROR
  covers CRITICAL);
- `log_verbose_level`: above 0, the DEBUG records of meshserve's own code are written too
  (never the libraries': an HTTP/2 library's debug lines hold request headers, tokens
  included), and every answered request gets an access-log line (the
  `--access-log-sample` fraction otherwise), still within `--access-log-max-per-second`;
- `log_format`: `json` (one object a line) or `text`;
- `log_file`: where the lines go; always "" (standard error, where the platform collects a
  container's logs) and not changed over the API, which would let a caller write files.

`LogSettings.changed` is the pure part (names, types, values; each refusal names the
setting); `LogControl` applies settings to the process's logging.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshserve.common.errors import InvalidArgument
from meshserve.common.logs import formatter

FORMATS = ("json", "text")
BOOLEAN = ("log_info", "log_warning", "log_error")
# Each setting's name, and the JSON type its value takes.
KINDS = {"log_file": str, "log_info": bool, "log_warning": bool, "log_error": bool,
         "log_verbose_level": int, "log_format": str}
MAX_VERBOSE_LEVEL = 2**32 - 1  # Triton's uint32
OWN_LOGGERS = "meshserve"  # the loggers whose DEBUG records a verbose level writes


@dataclass(frozen=True)
class LogSettings:
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_verbose_level: int = 0
    log_format: str = "json"
    log_file: str = ""

    @classmethod
    def at(cls, level: str, log_format: str) -> LogSettings:
        """The settings a service starts with (`--log-level`, `--log-format`): DEBUG is
        verbose level 1, WARNING leaves INFO out, ERROR leaves WARNING out too, CRITICAL
        ERROR."""
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise InvalidArgument(f"log level '{level}' is not DEBUG, INFO, WARNING, ERROR "
                                  f"or CRITICAL")
        return cls(log_info=number <= logging.INFO, log_warning=number <= logging.WARNING,
                   log_error=number <= logging.ERROR,
                   log_verbose_level=int(number <= logging.DEBUG), log_format=log_format)

    def as_dict(self) -> dict[str, bool | int | str]:
        return dataclasses.asdict(self)

    def changed(self, updates: Mapping[str, object]) -> LogSettings:
        """These settings with `updates` (a setting's name to its new value) applied;
        InvalidArgument naming the first setting that is unknown, of the wrong type or out
        of range, and nothing changed."""
        for name, value in updates.items():
            kind = KINDS.get(name)
            if kind is None:
                raise InvalidArgument(f"unknown log setting '{name[:64]}' (settings: "
                                      f"{', '.join(KINDS)})")
            # JSON's true is not a number, nor its 1 a boolean.
            if type(value) is not kind:
                raise InvalidArgument(f"log setting '{name}' takes "
                                      f"{TYPE_NAMES[kind]}, not {shown_value(value)}")
        verbose = updates.get("log_verbose_level", self.log_verbose_level)
        if not 0 <= verbose <= MAX_VERBOSE_LEVEL:
            raise InvalidArgument(f"log setting 'log_verbose_level' must be from 0 to "
                                  f"{MAX_VERBOSE_LEVEL}, not {verbose}")
        if updates.get("log_format", self.log_format) not in FORMATS:
            raise InvalidArgument(f"log setting 'log_format' must be json or text, not "
                                  f"{shown_value(updates['log_format'])}")
        if updates.get("log_file", self.log_file) != self.log_file:
            raise InvalidArgument("log setting 'log_file' cannot be changed: the service "
                                  "logs to standard error, where the platform collects them")
        return dataclasses.replace(self, **updates)

    def lowest_level(self) -> int:
        """The lowest level written above DEBUG (above CRITICAL when none is)."""
        written = [level for level, on in self._levels()[1:] if on]
        return min(written, default=logging.CRITICAL + 1)

    def writes(self, level: int) -> bool:
        """Whether a record of `level` is written."""
        for lowest, on in reversed(self._levels()):
            if level >= lowest:
                return on
        return False

    def _levels(self) -> list[tuple[int, bool]]:
        return [(logging.DEBUG, self.log_verbose_level > 0), (logging.INFO, self.log_info),
                (logging.WARNING, self.log_warning), (logging.ERROR, self.log_error)]


TYPE_NAMES = {bool: "true or false", int: "a whole number", str: "a string"}


def shown_value(value: object) -> str:
    """A value a caller sent, as a refusal shows it: its repr, at most 64 characters."""
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:64]}…"


class LevelFilter(logging.Filter):
    """Lets through the records the settings write (a level can be off between two on)."""

    def __init__(self, settings: LogSettings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        return self.settings.writes(record.levelno)


class LogControl:
    """The process's log settings: `settings`, what its logging was configured with as it
    started, until `update` applies others to the root logger and its handlers. A verbose
    level above 0 sets the access log's sample to 1 through `sample` (back to
    `access_log_sample` at 0)."""

    def __init__(self, service: str, settings: LogSettings, access_log_sample: float,
                 sample: Callable[[float], None],
                 audit: Callable[[str, str], None] | None = None) -> None:
        self.service = service
        self.settings = settings
        self._access_log_sample = access_log_sample
        self._sample = sample
        self._audit = audit
        self._filter = LevelFilter(settings)

    def update(self, updates: Mapping[str, object], by: str) -> LogSettings:
        """Apply `updates` (InvalidArgument, and nothing changed, when one is refused);
        returns the settings now. A change is logged at WARNING under the settings before
        it, naming who made it (`by`) and what changed, and told to `audit(by, changes)`."""
        settings = self.settings.changed(updates)
        if settings != self.settings:
            changes = ", ".join(f"{name}={value}" for name, value in settings.as_dict().items()
                                if value != getattr(self.settings, name))
            logging.getLogger(__name__).warning("log settings changed by '%s': %s", by,
                                                changes)
            if self._audit is not None:
                self._audit(by, changes)
            self._apply(settings)
        return settings

    def _apply(self, settings: LogSettings) -> None:
        root = logging.getLogger()
        root.setLevel(settings.lowest_level())
        logging.getLogger(OWN_LOGGERS).setLevel(
            logging.DEBUG if settings.log_verbose_level else logging.NOTSET)
        self._filter.settings = settings
        for handler in root.handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
            if settings.log_format != self.settings.log_format:
                handler.setFormatter(formatter(self.service, settings.log_format))
        self._sample(1.0 if settings.log_verbose_level else self._access_log_sample)
        self.settings = settings


def log_updates(sent: Mapping[str, Any]) -> dict[str, object]:
    """The updates a `LogSettingsRequest`'s settings ask for; InvalidArgument naming a
    setting sent without a value."""
    updates: dict[str, object] = {}
    for name, value in sent.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidArgument(f"log setting '{name[:64]}' is sent without a value")
        updates[name] = getattr(value, choice)
    return updates


def fill_log_settings(answer: Any, settings: LogSettings) -> None:
    """A `LogSettingsResponse`'s settings map, filled with `settings`."""
    for name, value in settings.as_dict().items():
        entry = answer[name]
        if isinstance(value, bool):
            entry.bool_param = value
        elif isinstance(value, int):
            entry.uint32_param = value
        else:
            entry.string_param = value
