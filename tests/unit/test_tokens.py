"""Bearer-token verification against a JWKS: every check, each failure named."""

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common.errors import Unauthenticated
from meshserve.ingress.tokens import (
    MAX_JWKS_BYTES,
    MAX_TOKEN_BYTES,
    JwksFile,
    JwksUrl,
    Verifier,
    b64url,
    jwks_document,
    jwks_source,
    key_id,
    models_of,
    parse_jwks,
    scopes_of,
    sign,
    verify,
)
from meshserve.tools.tokens import (
    claims_for,
    duration,
    init_auth,
    issuance_record,
    issue,
    rotate_key,
    token_ttl,
)
from meshserve.tools.tokens import subject as subject_argument

NOW = 1_800_000_000.0
OLD = Ed25519PrivateKey.generate()
NEW = Ed25519PrivateKey.generate()
FOREIGN = Ed25519PrivateKey.generate()
# Both keys published: the overlap after a rotation.
KEYS = parse_jwks(jwks_document([NEW.public_key(), OLD.public_key()]))


def token(key=NEW, kid=None, **changes) -> str:
    claims = {**claims_for("app/a", 3600, NOW), **changes}
    return sign({k: v for k, v in claims.items() if v is not None}, key,
                kid or key_id(key.public_key()))


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def signed_text(claims: str, header: str | None = None, key=NEW) -> str:
    """A token whose claims (and header) are the JSON text given, signed with `key`: for
    what `sign` cannot write (a repeated member, a number out of range)."""
    header = header or json.dumps({"alg": "EdDSA", "kid": key_id(key.public_key())})
    signing_input = f"{b64url(header.encode())}.{b64url(claims.encode())}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


def claims_text(**changes) -> str:
    return json.dumps({**claims_for("app/a", 3600, NOW), **changes})


def check(text: str, now: float = NOW) -> dict:
    return verify(text, KEYS, issuer="meshserve", audience="meshserve-ingress", now=now)


@pytest.mark.parametrize(("text", "now", "message"), [
    (token(exp=int(NOW) - 1), NOW, "bearer token has expired"),
    (token(), NOW + 3600, "bearer token has expired"),
    (token(nbf=int(NOW) + 60), NOW, "bearer token is not valid yet ('nbf' is in the future)"),
    (token(aud="other"), NOW, "bearer token audience does not include 'meshserve-ingress'"),
    (token(aud=["a", "b"]), NOW, "bearer token audience does not include 'meshserve-ingress'"),
    (token(iss="someone-else"), NOW, "bearer token issuer is not 'meshserve'"),
    (token(key=FOREIGN), NOW, "bearer token is signed by an unknown key"),
    (token(key=FOREIGN, kid=key_id(NEW.public_key())), NOW,
     "bearer token signature does not verify"),
    (token(exp=None), NOW, "bearer token has no 'exp' claim"),
    (token(exp="soon"), NOW, "bearer token claim 'exp' must be a number"),
    (token(sub=""), NOW, "bearer token has no 'sub' claim"),
    ("not-a-token", NOW, "bearer token is malformed: expected three dot-separated parts"),
    ("a.b.c", NOW, "bearer token is malformed: not base64url JSON"),
    (f"{b64({'alg': 'none'})}.{b64({'sub': 'x'})}.", NOW,
     "bearer token algorithm must be EdDSA"),
    (f"{b64({'alg': 'HS256', 'kid': 'x'})}.{b64({'sub': 'x'})}.c2ln", NOW,
     "bearer token algorithm must be EdDSA"),
])
def test_rejected_tokens_name_the_failed_check(text, now, message):
    with pytest.raises(Unauthenticated) as caught:
        check(text, now)
    assert caught.value.message == message
    assert text not in caught.value.message


NESTED = b64url(b"[" * 2000 + b"]" * 2000)


@pytest.mark.parametrize(("text", "message"), [
    # Read before anything is decoded: the length, the alphabet; a nesting too deep for the
    # parser is malformed, not an internal error.
    ("a" * (MAX_TOKEN_BYTES - 4) + ".b.c", None),
    ("a" * MAX_TOKEN_BYTES + ".b.c", f"bearer token is longer than {MAX_TOKEN_BYTES} bytes"),
    (f"{NESTED}.e30.e30", "bearer token is malformed: not base64url JSON"),
    (signed_text(claims_text(), header='{"alg":"EdDSA","kid":' + "[" * 1500 + "]" * 1500
                 + "}"), "bearer token is malformed: not base64url JSON"),
    (token()[:5] + "!" + token()[5:], "bearer token is malformed: not base64url JSON"),
    # Signed, but not JSON (NaN) or not of their type: refused, naming the claim.
    (signed_text(claims_text(exp="X").replace('"X"', "NaN")),
     "bearer token is malformed: not base64url JSON"),
    (signed_text(claims_text(exp="X").replace('"X"', "1e999")),
     "bearer token claim 'exp' must be a number"),
    (signed_text(claims_text()[:-1] + ', "sub": "client/developer"}'),
     "bearer token is malformed: a member of its claims appears twice"),
    (signed_text(claims_text(), header=json.dumps({"alg": "EdDSA", "kid": key_id(
        NEW.public_key())})[:-1] + ', "alg": "none"}'),
     "bearer token is malformed: a member of its header appears twice"),
    (signed_text(claims_text(), header=json.dumps({"alg": "EdDSA", "crit": ["exp"], "kid": key_id(
        NEW.public_key())})),
     "bearer token header 'crit' names extensions this verifier does not support"),
    (token(iat=int(NOW) + 365 * 86400), "bearer token is not valid yet ('iat' is in the future)"),
    (token(iat="yesterday"), "bearer token claim 'iat' must be a number"),
    (token(aud=5), "bearer token audience does not include 'meshserve-ingress'"),
    (token(aud={"meshserve-ingress": True}),
     "bearer token audience does not include 'meshserve-ingress'"),
    (token(aud=["meshserve-ingress", 5]),
     "bearer token audience does not include 'meshserve-ingress'"),
    (token(sub="app/a\nprincipal=client/developer"),
     "bearer token claim 'sub' must hold printable characters only"),
    (token(models=5), "bearer token claim 'models' must be a string or a list of strings"),
    (token(models={"mlp": 1}), "bearer token claim 'models' must be a string or a list of strings"),
    (token(scope=5), "bearer token claim 'scope' must be a string or a list of strings"),
    (token(groups="developers"), "bearer token claim 'groups' must be a list of strings"),
])
def test_tokens_are_read_strictly(text, message):
    """Each of these was accepted, or an internal error, before the token was read strictly."""
    if message is None:  # at the limit: read, and refused for what it says
        with pytest.raises(Unauthenticated, match="not base64url JSON"):
            check(text)
        return
    with pytest.raises(Unauthenticated) as caught:
        check(text)
    assert caught.value.message == message
    assert text not in caught.value.message


def test_times_allow_the_leeway_either_side():
    early = token(nbf=int(NOW) + 30, iat=int(NOW) + 30)
    with pytest.raises(Unauthenticated, match="'nbf' is in the future"):
        check(early)
    assert verify(early, KEYS, issuer="meshserve", audience="meshserve-ingress", now=NOW,
                  leeway=60)["sub"] == "app/a"
    with pytest.raises(Unauthenticated, match="'iat' is in the future"):
        verify(token(iat=int(NOW) + 90), KEYS, issuer="meshserve",
               audience="meshserve-ingress", now=NOW, leeway=60)


YEAR_S = 365 * 86400
TOO_LONG_AFTER_IAT = ("bearer token claim 'exp' is more than 365 days after its 'iat' (the "
                      "longest lifetime accepted)")
TOO_LONG_FROM_NOW = ("bearer token claim 'exp' is more than 365 days from now (the longest "
                     "lifetime accepted; the token has no 'iat')")


@pytest.mark.parametrize(("changes", "message"), [
    # As `meshserve token issue --ttl 365d` writes it: the longest lifetime, accepted.
    ({"exp": int(NOW) + YEAR_S}, None),
    ({"exp": int(NOW) + YEAR_S + 1}, TOO_LONG_AFTER_IAT),
    ({"exp": int(NOW) + 100 * YEAR_S}, TOO_LONG_AFTER_IAT),
    # Issued a while ago: the lifetime runs from `iat`, not from now.
    ({"iat": int(NOW) - 86400, "nbf": int(NOW) - 86400, "exp": int(NOW) + YEAR_S},
     TOO_LONG_AFTER_IAT),
    # No `iat`: from now, with the leeway the issuer's clock may be ahead by.
    ({"iat": None, "exp": int(NOW) + YEAR_S + 60}, None),
    ({"iat": None, "exp": int(NOW) + YEAR_S + 61}, TOO_LONG_FROM_NOW),
    ({"iat": None, "nbf": None, "exp": int(NOW) + 100 * YEAR_S}, TOO_LONG_FROM_NOW),
])
def test_a_token_lives_at_most_365_days(changes, message):
    """A signed token with `exp` a century away was accepted: it outlived any key rotation
    or change of mind, as `--ttl` (at most 365 days) means it cannot."""
    text = token(**changes)
    keys = {key_id(NEW.public_key()): NEW.public_key()}
    verifier = Verifier(lambda: keys, issuer="meshserve", audience="meshserve-ingress",
                        leeway=60)
    if message is None:
        assert verifier.grant(text, NOW).subject == "app/a"
        return
    for _ in range(2):  # and again, once the verifier remembers the token
        with pytest.raises(Unauthenticated) as caught:
            verifier.grant(text, NOW)
        assert caught.value.message == message


@pytest.mark.parametrize("key", [OLD, NEW])
def test_both_keys_verify_during_the_overlap(key):
    assert check(token(key=key))["sub"] == "app/a"


def test_list_audience_and_leeway():
    assert check(token(aud=["x", "meshserve-ingress"]))["sub"] == "app/a"
    late = token(exp=int(NOW) - 2)
    assert verify(late, KEYS, issuer="meshserve", audience="meshserve-ingress", now=NOW,
                  leeway=5)["sub"] == "app/a"


@pytest.mark.parametrize(("claims", "scopes", "models"), [
    ({}, None, None),
    ({"scope": "infer models:read"}, frozenset({"infer", "models:read"}), None),
    ({"models": ["mlp", "cnn*"]}, None, ("mlp", "cnn*")),
    ({"models": "mlp, cnn"}, None, ("mlp", "cnn")),
    ({"scope": ""}, frozenset(), None),
    ({"scope": ["infer", "models:read"]}, frozenset({"infer", "models:read"}), None),
])
def test_scopes_and_models_claims(claims, scopes, models):
    assert scopes_of(claims) == scopes
    assert models_of(claims) == models


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), ("0.5h", 1800)])
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize(("ttl", "written"), [
    ("365d", "ttl=31536000s"), ("1h", "ttl=3600s"), ("90", "ttl=90s"), ("0.5s", "ttl=0.5s")])
def test_the_audit_record_writes_the_lifetime_in_plain_seconds(ttl, written):
    record = issuance_record("t", ["infer"], None, token_ttl(ttl))
    assert record.startswith(f"scopes=infer models=* {written} sha256=")


def test_jwks_file_reloads_when_changed_at_most_once_per_interval(tmp_path):
    now = [0.0]
    path = tmp_path / "jwks.json"
    path.write_text(jwks_document([OLD.public_key()]))
    source = JwksFile(path, lambda: now[0], interval=1.0)
    assert set(source.keys()) == {key_id(OLD.public_key())}
    path.write_text(jwks_document([NEW.public_key(), OLD.public_key()]))
    now[0] = 0.5
    assert set(source.keys()) == {key_id(OLD.public_key())}  # not looked at yet
    now[0] = 1.5
    assert set(source.keys()) == {key_id(OLD.public_key()), key_id(NEW.public_key())}
    path.write_text("{broken")
    now[0] = 3.0
    assert len(source.keys()) == 2  # a broken file keeps the previous keys


def test_issue_and_rotate_keep_the_previous_key(tmp_path):
    auth = tmp_path / "auth"
    assert init_auth(auth) is True
    assert init_auth(auth) is False
    assert oct((auth / "signing.key").stat().st_mode & 0o777) == "0o600"
    first = issue(auth, "app/a", 60, now=NOW, scopes=["infer"], models=["cnn"])
    rotate_key(auth)
    second = issue(auth, "app/b", 60, now=NOW)
    keys = parse_jwks((auth / "jwks.json").read_text())
    assert len(keys) == 2
    for text, subject in ((first, "app/a"), (second, "app/b")):
        claims = verify(text, keys, issuer="meshserve", audience="meshserve-ingress", now=NOW)
        assert claims["sub"] == subject
    rotate_key(auth)  # the first key leaves the JWKS
    keys = parse_jwks((auth / "jwks.json").read_text())
    with pytest.raises(Unauthenticated, match="unknown key"):
        verify(first, keys, issuer="meshserve", audience="meshserve-ingress", now=NOW)
    verify(second, keys, issuer="meshserve", audience="meshserve-ingress", now=NOW)


def test_verifier_remembers_signatures_but_checks_claims_and_keys_every_time():
    keys = dict(KEYS)
    verifier = Verifier(lambda: keys, issuer="meshserve", audience="meshserve-ingress",
                        size=2)
    text = token(key=OLD)
    assert verifier.claims(text, NOW)["sub"] == "app/a"
    assert verifier.claims(text, NOW + 10)["sub"] == "app/a"
    with pytest.raises(Unauthenticated, match="^bearer token has expired$"):
        verifier.claims(text, NOW + 3600)
    del keys[key_id(OLD.public_key())]  # the old key leaves the JWKS
    with pytest.raises(Unauthenticated, match="^bearer token is signed by an unknown key$"):
        verifier.claims(text, NOW)
    forged = text[:text.rindex(".") + 1] + "AAAA"
    with pytest.raises(Unauthenticated):
        verifier.claims(forged, NOW)


def test_jwks_url_is_fetched_and_a_failed_refresh_keeps_the_keys():
    """A real HTTP server on port 0 serves the JWKS; rotation reaches the ingress at the next
    fetch, and an unreachable or broken document never empties the keys."""
    import http.server
    import threading

    document = {"body": jwks_document([OLD.public_key()]).encode(), "status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — the stdlib's name
            self.send_response(document["status"])
            self.end_headers()
            self.wfile.write(document["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = jwks_source(f"http://127.0.0.1:{server.server_port}/jwks.json", lambda: NOW)
        assert set(source.keys()) == {key_id(OLD.public_key())}
        document["body"] = jwks_document([NEW.public_key(), OLD.public_key()]).encode()
        source.fetch()
        assert set(source.keys()) == {key_id(NEW.public_key()), key_id(OLD.public_key())}
        for broken in ({"body": b"not json", "status": 200}, {"body": b"", "status": 500}):
            document.update(broken)
            source.fetch()
            assert len(source.keys()) == 2
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("document", "message"), [
    ("[]", "a JWKS must be a JSON object with a 'keys' list"),
    ('{"keys": "none"}', "a JWKS must be a JSON object with a 'keys' list"),
    ('{"keys": [1]}', "each entry of a JWKS's 'keys' must be an object"),
    ('{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": 5}]}',
     "an Ed25519 key of a JWKS needs 'kid' and 'x' strings"),
    ('{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": "AAAA"}]}',
     "key 'a' of the JWKS: 'x' is not a base64url Ed25519 public key"),
])
def test_a_document_that_is_not_a_jwks_is_refused_naming_why(document, message):
    with pytest.raises(ValueError) as caught:
        parse_jwks(document)
    assert str(caught.value) == message


def test_keys_for_another_use_are_skipped():
    jwk = json.loads(jwks_document([OLD.public_key()]))["keys"][0]
    assert parse_jwks(json.dumps({"keys": [{**jwk, "use": "enc"}]})) == {}


@pytest.mark.parametrize("broken", ["[]", '{"keys": [1]}',
                                    '{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a", '
                                    '"x": 5}]}'])
def test_a_jwks_file_that_is_not_one_keeps_the_keys(tmp_path, broken):
    """JSON of another shape raised out of keys() (AttributeError, TypeError), refusing
    every token as an internal error, where a broken file keeps the previous keys."""
    now = [0.0]
    path = tmp_path / "jwks.json"
    path.write_text(jwks_document([OLD.public_key()]))
    source = JwksFile(path, lambda: now[0], interval=1.0)
    path.write_text(broken)
    now[0] = 2.0
    assert set(source.keys()) == {key_id(OLD.public_key())}


def test_a_jwks_url_that_sends_too_much_or_too_slowly_keeps_the_keys():
    """A real HTTP server on port 0: a body past MAX_JWKS_BYTES, or one that trickles, is
    given up (within the fetch's timeout) and the keys stay; a malformed document too."""
    import http.server
    import threading
    import time

    good = jwks_document([OLD.public_key()]).encode()
    mode = {"now": "good"}
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — the stdlib's name
            self.send_response(200)
            self.end_headers()
            try:
                if mode["now"] == "good":
                    self.wfile.write(good)
                elif mode["now"] == "huge":  # a valid JWKS, but past the limit
                    chunk = b" " * 65536
                    for _ in range(MAX_JWKS_BYTES // len(chunk) + 2):
                        self.wfile.write(chunk)
                    self.wfile.write(jwks_document([NEW.public_key()]).encode())
                elif mode["now"] == "slow":
                    while not stop.is_set():  # a space every 50 ms: valid JSON, never done
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        stop.wait(0.05)
                else:
                    self.wfile.write(b'{"keys": "none"}')
            except OSError:
                pass  # the client gave up

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = JwksUrl(f"http://127.0.0.1:{server.server_port}/jwks.json", timeout=1.0)
        source.fetch()
        assert set(source.keys()) == {key_id(OLD.public_key())}
        for broken in ("huge", "slow", "malformed"):
            mode["now"] = broken
            started = time.monotonic()
            source.fetch()
            assert time.monotonic() - started < 3.0, broken  # timeout 1 s, plus one read
            assert set(source.keys()) == {key_id(OLD.public_key())}, broken
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("text", ["app/a\nprincipal=client/developer", "app\ta", "   "])
def test_token_issue_refuses_a_subject_the_ingress_would_refuse(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        subject_argument(text)
    assert subject_argument("app/web") == "app/web"


class CountingKey:
    """A public key that counts the signatures it checks."""

    def __init__(self, key) -> None:
        self.key, self.checks = key, 0

    def verify(self, signature: bytes, data: bytes) -> None:
        self.checks += 1
        self.key.verify(signature, data)


def test_the_verifier_checks_a_signature_once_whatever_the_claims_say():
    """A signed token refused for its claims (another audience, say) is remembered as
    refused: a client that repeats it does not make the ingress check the signature again."""
    key = CountingKey(NEW.public_key())
    verifier = Verifier(lambda: {key_id(NEW.public_key()): key}, issuer="meshserve",
                        audience="meshserve-ingress")
    for text, refusal in ((token(aud="other"), "audience does not include"),
                          (token(models=5), "claim 'models' must be")):
        for _ in range(3):
            with pytest.raises(Unauthenticated, match=refusal):
                verifier.grant(text, NOW)
    assert key.checks == 2
    good = token()
    assert [verifier.grant(good, NOW).subject for _ in range(3)] == ["app/a"] * 3
    assert key.checks == 3
