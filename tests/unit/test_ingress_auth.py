"""The ingress's gate: credentials to a caller, the caller to a decision, denials counted."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common.access import parse_policy
from meshserve.common.certificates import principal_of
from meshserve.common.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from meshserve.ingress.auth import Gate, InsufficientScope, MalformedAuthorization
from meshserve.ingress.tokens import InvalidToken, key_id, sign
from meshserve.tools.certs import init_certs
from meshserve.tools.tokens import claims_for

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
POLICY = parse_policy("""
rules:
  - principals: [client/developer]
    actions: [models:read]
  - principals: ["app/*"]
    actions: [infer]
    models: ["cnn*", mlp]
limits:
  principals:
    app/slow: {rate: 2, burst: 1}
""")


def bearer(subject="app/a", **options) -> list[tuple[str, str]]:
    claims = claims_for(subject, 60, NOW, **options)
    return [("authorization", f"Bearer {sign(claims, KEY, key_id(KEY.public_key()))}")]


class Recorder:
    def __init__(self, sample: float = 1.0, policy=POLICY) -> None:
        self.denied: list[str] = []
        self.audited: list[tuple[str, str, str, str]] = []
        self.clock = 0.0
        self.gate = Gate(lambda: policy, lambda: KEYS, issuer="meshserve",
                         audience="meshserve-ingress", wall_clock=lambda: NOW,
                         clock=lambda: self.clock, random=lambda: 0.5,
                         on_denied=lambda *args: self.audited.append(args),
                         denied_sample=sample, count_denied=self.denied.append)


@pytest.fixture(scope="module")
def client_pem(tmp_path_factory) -> bytes:
    directory = tmp_path_factory.mktemp("tls")
    init_certs(directory)
    return (directory / "client.crt").read_bytes()


def test_certificate_principal_is_the_spiffe_identity(client_pem):
    assert principal_of(client_pem) == "client/developer"
    assert Recorder().gate.authenticate((), client_pem).principal == "client/developer"


def test_token_caller_is_authorized_within_its_scopes():
    recorder = Recorder()
    caller = recorder.gate.authenticate(bearer(scopes=["infer"], models=["cnn"]), None)
    assert caller.name == "app/a"
    recorder.gate.authorize(caller, "infer", "cnn")
    with pytest.raises(PermissionDenied) as denied:
        recorder.gate.authorize(caller, "infer", "mlp")
    assert denied.value.message == "'app/a' may not infer model 'mlp'"
    # A model that does not exist gets the same answer as one that does.
    with pytest.raises(PermissionDenied) as missing:
        recorder.gate.authorize(caller, "infer", "no-such-model")
    assert missing.value.message == "'app/a' may not infer model 'no-such-model'"
    assert recorder.denied == ["permission_denied", "permission_denied"]
    assert recorder.audited[0] == ("app/a", "infer", "mlp", "permission_denied")


@pytest.mark.parametrize(("metadata", "message"), [
    ([], "no credentials: present a client certificate on the mutual-TLS port or send "
         "'authorization: Bearer <token>'"),
    ([("authorization", "Basic dXNlcg==")], "authorization metadata must be 'Bearer <token>'"),
    ([("authorization", "Bearer x.y")], "bearer token is malformed: expected three "
                                         "dot-separated parts"),
])
def test_unauthenticated(metadata, message):
    recorder = Recorder()
    with pytest.raises(Unauthenticated) as caught:
        recorder.gate.authenticate(metadata, None)
    assert caught.value.message == message
    assert recorder.denied == ["unauthenticated"]


@pytest.mark.parametrize(("metadata", "kind"), [
    ([], Unauthenticated),
    ([("authorization", "Basic dXNlcg==")], Unauthenticated),  # another scheme: no token
    ([("authorization", "Bearer x.y")], InvalidToken),
    ([("authorization", "Bearer   ")], MalformedAuthorization),
    ([("authorization", "Bearer a.b.c, d.e.f")], MalformedAuthorization),
    ([("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")],
     MalformedAuthorization),
])
def test_a_refusal_says_whether_a_token_was_sent_and_refused(metadata, kind):
    """What the HTTP challenge's RFC 6750 error is read from: no token sent, a token refused,
    an authorization header that holds no single token."""
    with pytest.raises(Unauthenticated) as caught:
        Recorder().gate.authenticate(metadata, None)
    assert type(caught.value) is kind


@pytest.mark.parametrize(("options", "action", "model", "kind"), [
    # the policy lets app/* infer on mlp; the token's own claims leave it out
    ({"scopes": ["models:read"]}, "infer", "mlp", InsufficientScope),
    ({"models": ["cnn"]}, "infer", "mlp", InsufficientScope),
    # the policy itself refuses: the token is not what is missing
    ({"scopes": ["models:read"]}, "models:read", "mlp", PermissionDenied),
    ({}, "infer", "resnet", PermissionDenied),
    ({"scopes": ["infer"]}, "infer", "resnet", PermissionDenied),
])
def test_a_denial_says_whether_the_tokens_scope_caused_it(options, action, model, kind):
    recorder = Recorder()
    caller = recorder.gate.authenticate(bearer("app/a", **options), None)
    with pytest.raises(PermissionDenied) as denied:
        recorder.gate.authorize(caller, action, model)
    assert type(denied.value) is kind
    assert denied.value.message == f"'app/a' may not {action} model '{model}'"


def test_a_token_on_the_certificate_port_adds_to_the_certificate(client_pem):
    recorder = Recorder()
    alone = recorder.gate.authenticate([], client_pem)
    assert alone.name == "client/developer"
    assert not recorder.gate.allows(alone, "infer", "mlp")
    both = recorder.gate.authenticate(bearer("app/a", scopes=["infer"]), client_pem)
    assert both.name == "client/developer"
    assert recorder.gate.allows(both, "infer", "mlp")
    assert recorder.gate.allows(both, "models:read", "mlp")


def test_anonymous_callers_when_the_policy_admits_them():
    recorder = Recorder(policy=parse_policy("anonymous: {actions: [models:read]}"))
    caller = recorder.gate.authenticate([], None)
    assert caller.principal is None
    recorder.gate.authorize(caller, "models:read", "mlp")
    with pytest.raises(PermissionDenied, match="^'anonymous' may not infer model 'mlp'$"):
        recorder.gate.authorize(caller, "infer", "mlp")


def test_rate_limit_gives_a_retry_hint():
    recorder = Recorder(sample=0.1)  # random() = 0.5: not audited
    caller = recorder.gate.authenticate(bearer("app/slow"), None)
    recorder.gate.admit(caller)
    with pytest.raises(ResourceExhausted) as caught:
        recorder.gate.admit(caller)
    assert caught.value.message == ("rate limit of 2 requests/s for 'app/slow' reached; "
                                    "retry after 0.5 s")
    recorder.clock = 0.5
    recorder.gate.admit(caller)
    assert recorder.denied == ["rate_limited"]
    assert recorder.audited == []


@pytest.mark.parametrize(("given", "default", "expected"), [
    (None, 0, None), (None, 2, 2), (0, 2, 0), (1, 2, 1)])
def test_default_priority_applies_only_when_the_request_sets_none(given, default, expected):
    from meshserve.ingress.service import default_priority
    from meshserve.protocol import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name="mlp")
    if given is not None:
        request.parameters["priority"].int64_param = given
    default_priority(request, default)
    got = (request.parameters["priority"].int64_param if "priority" in request.parameters
           else None)
    assert got == expected


def test_decisions_are_remembered_per_policy_and_bounded():
    from meshserve.ingress.auth import Decisions

    decisions = Decisions(size=2)
    first, second = object(), object()
    decisions.of(first)["a"] = True
    assert decisions.of(first) == {"a": True}
    assert decisions.of(second) == {}  # a reloaded policy decides afresh
    known = decisions.of(second)
    known["a"], known["b"] = True, False
    assert decisions.of(second) == {}  # full: starts again


@pytest.mark.parametrize("metadata", [
    # Sent twice (gRPC keeps both) or joined by a comma (HTTP joins a repeated header): which
    # one counts would be left to chance, so neither does.
    [("authorization", "Bearer e30.e30.e30"), bearer()[0]],
    [bearer()[0], ("authorization", "Bearer e30.e30.e30")],
    [("authorization", f"{bearer()[0][1]}, Bearer e30.e30.e30")],
])
def test_two_bearer_tokens_are_refused(metadata):
    recorder = Recorder()
    with pytest.raises(Unauthenticated) as caught:
        recorder.gate.authenticate(metadata, None)
    assert caught.value.message == ("authorization metadata must hold one 'Bearer <token>' and "
                                    "be sent once")
    assert recorder.denied == ["unauthenticated"]


@pytest.mark.parametrize(("prefix", "accepted"), [
    ("bearer ", True), ("BEARER ", True), ("Bearer  ", True), ("  Bearer ", True),
    ("Bearer\t", False), ("Token ", False)])
def test_the_scheme_is_case_insensitive_and_space_separated(prefix, accepted):
    text = prefix + bearer()[0][1].removeprefix("Bearer ")
    recorder = Recorder()
    if accepted:
        assert recorder.gate.authenticate([("authorization", text)], None).name == "app/a"
    else:
        with pytest.raises(Unauthenticated, match="^authorization metadata must be 'Bearer "
                                                  "<token>'$"):
            recorder.gate.authenticate([("authorization", text)], None)


@pytest.mark.parametrize(("offset", "accepted"), [(30, True), (59, True), (61, False)])
def test_a_token_from_a_clock_ahead_by_up_to_a_minute_is_accepted(offset, accepted):
    """`meshserve token issue` on a machine whose clock runs ahead writes an `nbf` (and
    `iat`) that is still in the future at the ingress."""
    recorder = Recorder()
    metadata = bearer(not_before=NOW + offset)
    if accepted:
        assert recorder.gate.authenticate(metadata, None).name == "app/a"
    else:
        with pytest.raises(Unauthenticated, match=r"'nbf' is in the future"):
            recorder.gate.authenticate(metadata, None)


def test_a_malformed_claim_is_unauthenticated_and_counted():
    """A signed token whose claim has the wrong type was an internal error (TypeError)."""
    claims = {**claims_for("app/a", 60, NOW), "models": 5}
    token = sign(claims, KEY, key_id(KEY.public_key()))
    recorder = Recorder()
    with pytest.raises(Unauthenticated, match="^bearer token claim 'models' must be a string "
                                              "or a list of strings$"):
        recorder.gate.authenticate([("authorization", f"Bearer {token}")], None)
    assert recorder.denied == ["unauthenticated"]


def test_long_model_names_are_cut_in_refusals_logs_and_audit_and_not_remembered(caplog):
    """A caller chooses the model name: a refusal echoed a name of any length into the
    answer, the log and the audit log, and every such decision was remembered (4,096 names
    of 1 MB: 4 GB)."""
    import logging
    import tracemalloc

    recorder = Recorder()
    caller = recorder.gate.authenticate(bearer(models=["cnn"]), None)
    name = "m\n" + "A" * 99_998
    with caplog.at_level(logging.INFO, logger="meshserve.ingress.auth"), \
            pytest.raises(PermissionDenied) as caught:
        recorder.gate.authorize(caller, "infer", name)
    shown = "m\\n" + "A" * 254 + "… (100000 characters)"
    assert caught.value.message == f"'app/a' may not infer model '{shown}'"
    assert recorder.audited == [("app/a", "infer", shown, "permission_denied")]
    [record] = caplog.records
    assert record.getMessage() == (f"denied (permission_denied): principal=app/a action=infer "
                                   f"model={shown}: 'app/a' may not infer model '{shown}'")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            assert not recorder.gate.allows(caller, "infer", f"{i}{name}")
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000, kept  # 200 names of 100 kB: 20 MB when remembered
