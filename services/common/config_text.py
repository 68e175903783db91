"""Model configurations read from protobuf text (config.pbtxt), leniently: meshserve defines
a subset of Triton's model configuration, and fields outside it (`optimization`,
`model_repository_agents`, ...) are skipped with one warning, so that existing Triton configs
load unchanged; a caller may name top-level fields to refuse instead (a section whose model
cannot be served right without it)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from google.protobuf import text_format

from meshserve.common.errors import InvalidArgument
from meshserve.protocol.model_config_pb2 import ModelConfig

logger = logging.getLogger(__name__)

_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')
_TOP_LEVEL = 'Message type "inference.ModelConfig" has no field'
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCALAR = re.compile(r"""[^\s,;{}\[\]<>#:"']+""")
_OPEN = "{[<"
_CLOSE = "}]>"
_MAX_SKIPPED = 1000


def _skip_blank(text: str, i: int) -> int:
    """Skip whitespace and `#` comments."""
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text[i] == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end + 1
        else:
            break
    return i


def _skip_string(text: str, i: int) -> int:
    """Skip the quoted string starting at text[i]; -1 if it is not terminated on its line."""
    quote = text[i]
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
        elif c == quote:
            return i + 1
        elif c == "\n":
            return -1
        else:
            i += 1
    return -1


def _skip_value(text: str, i: int) -> int:
    """Skip one field value (scalar, string(s), message or list) at text[i]; -1 if broken."""
    if i >= len(text):
        return -1
    if text[i] in "\"'":
        while i < len(text) and text[i] in "\"'":  # adjacent strings concatenate
            i = _skip_string(text, i)
            if i < 0:
                return -1
            i = _skip_blank(text, i)
        return i
    if text[i] in _OPEN:
        depth = 0
        while i < len(text):
            c = text[i]
            if c in "\"'":
                i = _skip_string(text, i)
                if i < 0:
                    return -1
                continue
            if c == "#":
                i = _skip_blank(text, i)
                continue
            if c in _OPEN:
                depth += 1
            elif c in _CLOSE:
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    match = _SCALAR.match(text, i)
    return match.end() if match else -1


def _unknown_field_span(text: str, line: int, column: int, name: str) -> tuple[int, int] | None:
    """The span of the unknown field `name` (name and value) that the parser reported at
    line:column (both 1-based), or None when the text there is not that field."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return None
    start = sum(len(x) + 1 for x in lines[: line - 1]) + column - 1
    match = _IDENTIFIER.match(text, start)
    if match is None or match.group() != name:
        return None
    i = _skip_blank(text, match.end())
    if i < len(text) and text[i] == ":":
        i = _skip_blank(text, i + 1)
    end = _skip_value(text, i)
    if end < 0:
        return None
    after = _skip_blank(text, end)
    if after < len(text) and text[after] in ",;":
        end = after + 1
    return start, end


def _blank_out(text: str, start: int, end: int) -> str:
    """Replace text[start:end] by spaces, keeping newlines so later positions stay put."""
    hole = "".join(c if c == "\n" else " " for c in text[start:end])
    return text[:start] + hole + text[end:]


def parse_text(text: str, source: str, refused: Mapping[str, str] | None = None) -> ModelConfig:
    """Parse config.pbtxt text, skipping (with one warning) fields meshserve does not define,
    except the top-level ones named in `refused` (InvalidArgument, with the reason given).

    Protobuf's own `allow_unknown_field` skipper cannot step over some forms Triton configs
    use (`control_input [ { ... } ]`, a list of messages without a colon), so unknown fields
    are instead blanked out one at a time and the text parsed strictly again.
    """
    skipped: list[str] = []
    while True:
        config = ModelConfig()
        try:
            text_format.Parse(text, config)
        except text_format.ParseError as error:
            unknown = _UNKNOWN_FIELD.search(str(error))
            if (unknown is not None and refused and unknown.group(1) in refused
                    and _TOP_LEVEL in str(error)):
                raise InvalidArgument(f"{source}: {unknown.group(1)} is not supported: "
                                      f"{refused[unknown.group(1)]}") from None
            span = None
            if unknown is not None and error.GetLine() and error.GetColumn():
                span = _unknown_field_span(
                    text, error.GetLine(), error.GetColumn(), unknown.group(1)
                )
            if span is None or len(skipped) >= _MAX_SKIPPED:
                hint = ""
                if unknown is not None:
                    hint = " (an unknown field is skipped, but this one's value is malformed)"
                raise InvalidArgument(
                    f"{source}: cannot parse model configuration: {error}{hint}"
                ) from None
            skipped.append(str(error))
            text = _blank_out(text, *span)
            continue
        if skipped:
            logger.warning(
                "%s: skipping model configuration fields meshserve does not define: %s",
                source,
                "; ".join(skipped),
            )
        return config
