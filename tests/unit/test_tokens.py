"""Bearer-token verification against a JWKS: every check, each failure named."""

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common.errors import Unauthenticated
from meshserve.ingress.tokens import (
    JwksFile,
    Verifier,
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
