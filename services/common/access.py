"""The access policy: which principals and groups may do which actions on which models.

A YAML file:

    groups:                      # group → members (principals; fnmatch globs)
      developers: [client/developer]
    rules:                       # a caller may act when any rule allows it
      - principals: ["app/*"]    # fnmatch globs on the principal ...
        groups: [developers]     # ... or membership of one of these groups
        actions: [infer, models:read]
        models: [mlp, "cnn*"]    # fnmatch globs on model names
    anonymous:                   # callers with no certificate and no token (omit: refused)
      actions: [models:read]
      models: ["*"]
    limits:                      # requests per second per principal, token bucket
      default: {rate: 100, burst: 200}          # rate 0: unlimited (the default)
      principals:
        "app/batch": {rate: 5, burst: 10, priority: 2}

`admin` allows every action. A token narrows what its principal may do: its scopes and its
`models` globs intersect with the policy (`allowed(...)`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

ACTIONS = frozenset({"infer", "models:read", "models:fetch", "models:write", "traffic:write",
                     "audit:read", "audit:write", "admin"})
ADMIN = "admin"


class PolicyError(ValueError):
    """The policy file is not valid; the message names the entry."""


@dataclass(frozen=True)
class Rule:
    principals: tuple[str, ...]
    groups: frozenset[str]
    actions: frozenset[str]
    models: tuple[str, ...]

    def applies_to(self, principal: str | None, groups: frozenset[str]) -> bool:
        if principal is None:
            return False
        return bool(self.groups & groups) or matches_any(principal, self.principals)

    def allows(self, action: str, model: str) -> bool:
        return ((action in self.actions or ADMIN in self.actions)
                and matches_any(model, self.models))


@dataclass(frozen=True)
class Limit:
    """Requests per second (0: unlimited), the bucket's size, and a default priority."""

    rate: float = 0.0
    burst: float = 0.0
    priority: int = 0


def matches_any(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatchcase(name, glob) for glob in globs)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    members: tuple[tuple[str, tuple[str, ...]], ...] = ()
    anonymous: Rule | None = None
    default_limit: Limit = Limit()
    limits: tuple[tuple[str, Limit], ...] = ()

    @property
    def admits_anonymous(self) -> bool:
        return self.anonymous is not None

    def groups_of(self, principal: str | None, claimed: Iterable[str] = ()) -> frozenset[str]:
        """The policy's groups that list `principal`, plus groups a token claims."""
        found = set(claimed)
        if principal is not None:
            found.update(group for group, globs in self.members if matches_any(principal, globs))
        return frozenset(found)

    def allowed(self, principal: str | None, groups: Iterable[str],
                scopes: frozenset[str] | None, action: str, model: str,
                token_models: tuple[str, ...] | None = None) -> bool:
        """May `principal` (None: anonymous) do `action` on `model`? The policy's answer,
        narrowed by a token's `scopes` and `token_models` (None: no narrowing)."""
        if scopes is not None and action not in scopes and ADMIN not in scopes:
            return False
        if token_models is not None and not matches_any(model, token_models):
            return False
        if principal is None:
            return self.anonymous is not None and self.anonymous.allows(action, model)
        all_groups = self.groups_of(principal, groups)
        return any(rule.allows(action, model) for rule in self.rules
                   if rule.applies_to(principal, all_groups))

    def limit_for(self, principal: str | None) -> Limit:
        """The first `limits.principals` entry whose glob matches, else the default."""
        name = "" if principal is None else principal
        for glob, limit in self.limits:
            if fnmatchcase(name, glob):
                return limit
        return self.default_limit


def _strings(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where} must be a list of strings")
    return tuple(value)


def _actions(value, where: str) -> frozenset[str]:
    actions = frozenset(_strings(value, where))
    unknown = sorted(actions - ACTIONS)
    if unknown:
        raise PolicyError(f"{where}: unknown action(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(ACTIONS))}")
    if not actions:
        raise PolicyError(f"{where} must name at least one action")
    return actions


def _rule(entry, where: str, anonymous: bool = False) -> Rule:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where} must be a mapping")
    unknown = set(entry) - ({"actions", "models"} if anonymous else
                            {"principals", "groups", "actions", "models"})
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    models = _strings(entry.get("models", ["*"]), f"{where}.models")
    return Rule(principals=_strings(entry.get("principals"), f"{where}.principals"),
                groups=frozenset(_strings(entry.get("groups"), f"{where}.groups")),
                actions=_actions(entry.get("actions"), f"{where}.actions"), models=models)


def _limit(entry, where: str) -> Limit:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where} must be a mapping with rate, burst, priority")
    try:
        rate = float(entry.get("rate", 0))
        burst = float(entry.get("burst", max(rate, 1.0)))
        priority = int(entry.get("priority", 0))
    except (TypeError, ValueError):
        raise PolicyError(f"{where}: rate and burst must be numbers, priority an integer") \
            from None
    if rate < 0 or burst < 0 or priority < 0:
        raise PolicyError(f"{where}: rate, burst and priority must not be negative")
    if rate > 0 and burst < 1:
        raise PolicyError(f"{where}: burst must be at least 1 when rate is set")
    return Limit(rate=rate, burst=burst, priority=priority)


def parse_policy(text: str) -> Policy:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PolicyError(f"policy is not valid YAML: {error}") from None
    document = {} if document is None else document
    if not isinstance(document, dict):
        raise PolicyError("policy must be a mapping")
    unknown = set(document) - {"groups", "rules", "anonymous", "limits"}
    if unknown:
        raise PolicyError(f"policy: unknown key(s) {', '.join(sorted(unknown))}")
    groups = document.get("groups") or {}
    if not isinstance(groups, dict):
        raise PolicyError("groups must map group names to lists of principals")
    members = tuple((str(g), _strings(m, f"groups.{g}")) for g, m in groups.items())
    rules = document.get("rules") or []
    if not isinstance(rules, list):
        raise PolicyError("rules must be a list")
    anonymous = document.get("anonymous")
    limits = document.get("limits") or {}
    if not isinstance(limits, dict):
        raise PolicyError("limits must be a mapping")
    per_principal = limits.get("principals") or {}
    if not isinstance(per_principal, dict):
        raise PolicyError("limits.principals must map principals to limits")
    return Policy(
        rules=tuple(_rule(r, f"rules[{i}]") for i, r in enumerate(rules)),
        members=members,
        anonymous=None if anonymous is None else _rule(anonymous, "anonymous", anonymous=True),
        default_limit=_limit(limits.get("default", {}), "limits.default"),
        limits=tuple((str(p), _limit(e, f"limits.principals.{p}"))
                     for p, e in per_principal.items()))


class PolicyFile:
    """The policy in a file, re-read when the file changes (looked at no more than once
    per `interval` seconds of `clock`). A broken new file keeps the previous policy and
    logs why; the first load must succeed. A file that changed again while it was read (an
    editor or `cat >` writing it in place) is read at the next look: a half-written policy
    may parse, and would deny, or allow, what the whole one does not."""

    def __init__(self, path: Path, clock: Callable[[], float], interval: float = 1.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self._interval = interval
        self._stamp = self._read_stamp()
        self._policy = parse_policy(self.path.read_text())
        self._checked = clock()

    def _read_stamp(self) -> tuple[int, int]:
        status = os.stat(self.path)
        return status.st_mtime_ns, status.st_size

    def current(self) -> Policy:
        now = self._clock()
        if now - self._checked < self._interval:
            return self._policy
        self._checked = now
        try:
            stamp = self._read_stamp()
            if stamp != self._stamp:
                text = self.path.read_text()
                if self._read_stamp() != stamp:  # still being written
                    return self._policy
                self._stamp = stamp
                self._policy = parse_policy(text)
                log.info("policy %s reloaded", self.path)
        except (OSError, PolicyError) as error:
            log.warning("policy %s not reloaded, keeping the previous one: %s", self.path,
                        error)
        return self._policy
