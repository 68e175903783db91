"""The access policy: rules, groups, globs, token narrowing, anonymous callers, reloads."""

import pytest

from meshserve.common.access import Limit, PolicyError, PolicyFile, parse_policy
from meshserve.tools.tokens import DEFAULT_POLICY

POLICY = parse_policy("""
groups:
  developers: [client/developer]
  apps: ["app/*"]
rules:
  - groups: [developers]
    actions: [admin]
  - groups: [apps]
    actions: [infer, models:read]
    models: [mlp, "cnn*"]
  - principals: [auditor]
    actions: [audit:read, models:read]
    models: ["*"]
limits:
  default: {rate: 10, burst: 20}
  principals:
    "app/batch": {rate: 1, burst: 2, priority: 3}
""")

OPEN_TO_ANONYMOUS = parse_policy("""
anonymous:
  actions: [models:read]
  models: [mlp]
""")


@pytest.mark.parametrize(("principal", "groups", "scopes", "models", "action", "model",
                          "allowed"), [
    ("client/developer", (), None, None, "infer", "anything", True),
    ("client/developer", (), None, None, "traffic:write", "mlp", True),  # admin: all
    ("app/web", (), None, None, "infer", "mlp", True),
    ("app/web", (), None, None, "infer", "cnn-large", True),  # glob
    ("app/web", (), None, None, "infer", "resnet", False),
    ("app/web", (), None, None, "models:write", "mlp", False),
    ("other", (), None, None, "infer", "mlp", False),
    ("other", ("apps",), None, None, "infer", "mlp", True),  # a token's groups claim
    ("auditor", (), None, None, "audit:read", "", True),
    ("auditor", (), None, None, "infer", "mlp", False),
    # A token narrows: policy ∩ scopes ∩ models.
    ("app/web", (), frozenset({"infer"}), None, "models:read", "mlp", False),
    ("app/web", (), frozenset({"infer"}), ("cnn",), "infer", "cnn", True),
    ("app/web", (), frozenset({"infer"}), ("cnn",), "infer", "mlp", False),
    ("client/developer", (), frozenset({"infer"}), None, "models:write", "mlp", False),
    ("client/developer", (), frozenset({"admin"}), None, "models:write", "mlp", True),
    ("app/web", (), frozenset({"admin"}), None, "models:write", "mlp", False),  # not widened
    (None, (), None, None, "models:read", "mlp", False),  # anonymous: refused
])
def test_allowed(principal, groups, scopes, models, action, model, allowed):
    assert POLICY.allowed(principal, groups, scopes, action, model, models) is allowed


@pytest.mark.parametrize(("action", "model", "allowed"), [
    ("models:read", "mlp", True), ("models:read", "cnn", False), ("infer", "mlp", False)])
def test_anonymous_rule(action, model, allowed):
    assert OPEN_TO_ANONYMOUS.admits_anonymous
    assert not POLICY.admits_anonymous
    assert OPEN_TO_ANONYMOUS.allowed(None, (), None, action, model) is allowed


@pytest.mark.parametrize(("principal", "limit"), [
    ("app/batch", Limit(rate=1, burst=2, priority=3)),
    ("app/web", Limit(rate=10, burst=20)),
    (None, Limit(rate=10, burst=20)),
])
def test_limits(principal, limit):
    assert POLICY.limit_for(principal) == limit


@pytest.mark.parametrize(("text", "message"), [
    ("rules: [{actions: [fly]}]", "rules[0].actions: unknown action(s) fly"),
    ("rules: [{actions: []}]", "rules[0].actions must name at least one action"),
    ("rules: [{actions: [infer], who: x}]", "rules[0]: unknown key(s) who"),
    ("rules: {a: 1}", "rules must be a list"),
    ("colour: red", "policy: unknown key(s) colour"),
    ("limits: {default: {rate: -1}}", "limits.default: rate, burst and priority must not"),
    ("limits: {default: {rate: 1, burst: 0.5}}", "limits.default: burst must be at least 1"),
    ("anonymous: {actions: [infer], principals: [x]}", "anonymous: unknown key(s) principals"),
    ("rules: [", "policy is not valid YAML"),
    ("- a", "policy must be a mapping"),
])
def test_invalid_policies_are_named(text, message):
    with pytest.raises(PolicyError, match="^" + message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_policy(text)


def test_default_policy_admits_the_developer_and_narrows_tokens():
    policy = parse_policy(DEFAULT_POLICY)
    assert policy.allowed("client/developer", (), None, "admin", "", None)
    assert policy.allowed("app/x", (), frozenset({"infer"}), "infer", "cnn", ("cnn",))
    assert not policy.allowed("app/x", (), frozenset({"infer"}), "infer", "mlp", ("cnn",))
    assert not policy.allowed("app/x", (), None, "models:write", "mlp")
    assert not policy.admits_anonymous
    assert policy.limit_for("app/x").rate == 0


def test_policy_file_reloads_and_keeps_the_old_policy_when_broken(tmp_path, caplog):
    now = [0.0]
    path = tmp_path / "policy.yaml"
    path.write_text("rules: [{principals: [a], actions: [infer]}]\n")
    holder = PolicyFile(path, lambda: now[0])
    assert holder.current().allowed("a", (), None, "infer", "mlp")
    path.write_text("rules: [{principals: [b], actions: [infer]}]\n")
    now[0] = 0.5
    assert holder.current().allowed("a", (), None, "infer", "mlp")  # checked at most 1/s
    now[0] = 1.0
    assert holder.current().allowed("b", (), None, "infer", "mlp")
    assert not holder.current().allowed("a", (), None, "infer", "mlp")
    path.write_text("rules: [{principals: [c], actions: [fly]}]\n")
    now[0] = 2.0
    assert holder.current().allowed("b", (), None, "infer", "mlp")
    assert "not reloaded, keeping the previous one: rules[0].actions: unknown action" \
        in caplog.text


def test_policy_file_written_while_read_is_read_again(tmp_path, monkeypatch):
    """A policy read half-written (the writer finished right after the read) is not
    adopted; the next look reads the whole file."""
    now = [0.0]
    path = tmp_path / "policy.yaml"
    whole = "groups: {ops: [a]}\nrules: [{groups: [ops], actions: [admin]}]\n"
    path.write_text(whole)
    holder = PolicyFile(path, lambda: now[0])
    half = "groups: {ops: [a]}\n"  # parses: a policy that allows nothing
    path.write_text(half)
    read_text = type(path).read_text

    def read_then_finish(self, *args, **kwargs):
        text = read_text(self, *args, **kwargs)
        if self == path and text == half:
            path.write_text(whole.replace("[a]", "[a, b]"))
        return text

    monkeypatch.setattr(type(path), "read_text", read_then_finish)
    now[0] = 1.0
    assert holder.current().allowed("a", (), None, "admin", "")
    now[0] = 2.0
    assert holder.current().allowed("b", (), None, "admin", "")
