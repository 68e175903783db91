"""Authentication, authorization, rate limits and key rotation at the ingress of a real
`meshserve up`: bearer tokens on the token port, the client certificate on the mTLS port."""

import base64
import hashlib
import http.client
import json
import re
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.ingress.tokens import MAX_TOKEN_BYTES, key_id, sign
from meshserve.protocol import async_inference_pb2 as async_pb
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.async_inference_pb2_grpc import AsyncInferenceStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.tokens import claims_for, issue, load_signing_key
from tests.integration.conftest import meshserve, running_mesh
from tests.integration.test_http import run_scenarios
from tests.policies import DEVELOPERS_ADMIN
from tests.polling import until_sync

POLICY = DEVELOPERS_ADMIN + """\
  - principals: ["app/*"]
    actions: [infer, models:read]
    models: ["*"]
limits:
  principals:
    app/limited: {rate: 0.1, burst: 2}
"""
RELOADED = POLICY.replace('principals: ["app/*"]', 'principals: ["app/*", "late/*"]')
TIMEOUT_S = 30
WAIT_S = 10  # the ingress looks at changed files at most once a second


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("auth") / "data"
    (data_dir / "auth").mkdir(parents=True)
    (data_dir / "auth" / "policy.yaml").write_text(POLICY)
    with running_mesh(data_dir, extra_args=("--audit-denied-sample=1",)) as started:
        yield started


@pytest.fixture(scope="module")
def auth_dir(mesh) -> Path:
    return mesh.data_dir / "auth"


@pytest.fixture(scope="module")
def token_stub(mesh):
    port = int((mesh.data_dir / "run" / "ingress.token-port").read_text())
    credentials = grpc.ssl_channel_credentials((mesh.tls / "ca.crt").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        yield GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def mtls_stub(mesh):
    files = TlsFiles.for_identity(mesh.tls, "client")
    with grpc.secure_channel(mesh.endpoint, channel_credentials(files)) as channel:
        yield GRPCInferenceServiceStub(channel)


def request_for(model: str) -> pb.ModelInferRequest:
    dims = [3, 64, 64] if model == "cnn" else [256]
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, *dims])
    request.raw_input_contents.append(numpy.ones([1, *dims], numpy.float32).tobytes())
    return request


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def infer(stub, model: str, token: str | None = None) -> pb.ModelInferResponse:
    return stub.ModelInfer(request_for(model), metadata=bearer(token) if token else None,
                           timeout=TIMEOUT_S)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def output_shape(response: pb.ModelInferResponse) -> list[int]:
    return list(response.outputs[0].shape)


def eventually(call, deadline_s: float = WAIT_S):
    """`call()` once it stops raising grpc.RpcError (bounded in time and tries)."""
    deadline = time.monotonic() + deadline_s
    for _ in range(100):
        try:
            return call()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return call()


def test_no_principal_on_the_token_port_is_unauthenticated(token_stub):
    error = refused(lambda: infer(token_stub, "mlp"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == ("no credentials: present a client certificate on the "
                               "mutual-TLS port or send 'authorization: Bearer <token>'")


def signed(auth_dir: Path, now: float, **changes) -> str:
    """A token of the deployment's key whose claims `changes` alter (any type)."""
    key = load_signing_key(auth_dir)
    return sign({**claims_for("app/a", 60, now), **changes}, key, key_id(key.public_key()))


def nested(depth: int) -> str:
    """An unsigned token whose header nests `depth` arrays."""
    header = base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).rstrip(b"=").decode()
    return f"{header}.e30.e30"


def bad_tokens(auth_dir: Path) -> list[tuple[str, str]]:
    now = time.time()
    foreign = Ed25519PrivateKey.generate()
    return [
        # Each of these was an internal error, or accepted, until tokens were read strictly.
        (nested(2000), "bearer token is malformed: not base64url JSON"),
        (signed(auth_dir, now, aud=5),
         "bearer token audience does not include 'meshserve-ingress'"),
        (signed(auth_dir, now, models=5),
         "bearer token claim 'models' must be a string or a list of strings"),
        (signed(auth_dir, now, iat=int(now) + 86400),
         "bearer token is not valid yet ('iat' is in the future)"),
        # Accepted until a token's lifetime was bounded as `meshserve token issue` bounds it.
        (signed(auth_dir, now, exp=int(now) + 100 * 365 * 86400),
         "bearer token claim 'exp' is more than 365 days after its 'iat' (the longest lifetime "
         "accepted)"),
        ("e30." + "e" * MAX_TOKEN_BYTES + ".e30",
         f"bearer token is longer than {MAX_TOKEN_BYTES} bytes"),
        (issue(auth_dir, "app/a", 60, now=now - 3600), "bearer token has expired"),
        (issue(auth_dir, "app/a", 60, now=now, not_before=now + 600),
         "bearer token is not valid yet ('nbf' is in the future)"),
        (issue(auth_dir, "app/a", 60, now=now, audience="someone-else"),
         "bearer token audience does not include 'meshserve-ingress'"),
        (issue(auth_dir, "app/a", 60, now=now, issuer="someone-else"),
         "bearer token issuer is not 'meshserve'"),
        (sign(claims_for("app/a", 60, now), foreign, key_id(foreign.public_key())),
         "bearer token is signed by an unknown key"),
        ("e30.e30.e30", "bearer token algorithm must be EdDSA"),
    ]


def test_bad_tokens_are_unauthenticated_and_never_echoed(token_stub, auth_dir):
    for token, message in bad_tokens(auth_dir):
        error = refused(lambda token=token: infer(token_stub, "mlp", token))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        assert token not in error.details()


def test_two_authorization_headers_are_refused(token_stub, auth_dir):
    """gRPC keeps both; the first used to count, whatever the second said."""
    good = issue(auth_dir, "app/a", 600)
    for metadata in (bearer(good) + bearer("e30.e30.e30"), bearer("e30.e30.e30") + bearer(good)):
        error = refused(lambda metadata=metadata: token_stub.ModelInfer(
            request_for("mlp"), metadata=metadata, timeout=TIMEOUT_S))
        assert (error.code(), error.details()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "authorization metadata must hold one 'Bearer <token>' and be sent once")


def test_a_token_from_a_clock_a_little_ahead_is_accepted(token_stub, auth_dir):
    """Issued where the clock runs 20 s ahead of the ingress's: its `nbf` and `iat` are
    still to come here."""
    ahead = time.time() + 20
    token = issue(auth_dir, "app/ahead", 600, now=ahead)
    assert output_shape(infer(token_stub, "mlp", token)) == [1, 10]


def test_an_async_result_asks_for_credentials_before_looking(mesh, auth_dir):
    """Without credentials, an id that was never submitted answered NOT_FOUND, one that
    was UNAUTHENTICATED: the store was read, and told which ids exist, before the caller
    was known."""
    port = int((mesh.data_dir / "run" / "ingress.token-port").read_text())
    credentials = grpc.ssl_channel_credentials((mesh.tls / "ca.crt").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = AsyncInferenceStub(channel)
        token = issue(auth_dir, "app/async", 600)
        submitted = stub.Submit(request_for("mlp"), metadata=bearer(token), timeout=TIMEOUT_S)
        for request_id in (submitted.id, "0" * 32):
            error = refused(lambda request_id=request_id: stub.Result(
                async_pb.ResultRequest(id=request_id), timeout=TIMEOUT_S))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, request_id
        done = stub.Result(async_pb.ResultRequest(id=submitted.id, wait_ms=10_000),
                           metadata=bearer(token), timeout=TIMEOUT_S)
        assert done.state == async_pb.ResultResponse.DONE


def test_a_long_model_name_is_cut_in_the_refusal_and_the_log(mesh, token_stub, auth_dir):
    """The name is the caller's: a refusal echoed it whole into the answer, the log and the
    audit log, and kept it in memory."""
    token = issue(auth_dir, "app/long", 600, models=["cnn"])
    request = request_for("mlp")
    request.model_name = "x" * 300_000
    error = refused(lambda: token_stub.ModelInfer(request, metadata=bearer(token),
                                                  timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == ("'app/long' may not infer model '" + "x" * 256
                               + "… (300000 characters)'")
    log = (mesh.data_dir / "run" / "ingress.log").read_text()
    assert "principal=app/long" in log
    assert "x" * 300 not in log


def test_http_refusals_say_how_to_authenticate(mesh, auth_dir):
    """401 with WWW-Authenticate naming RFC 6750's error for a bad token or header (a deeply
    nested one was a 500), 403 with `insufficient_scope` for a token whose own scope leaves
    the call out."""
    good = issue(auth_dir, "app/http", 600)
    reader = issue(auth_dir, "app/http-reader", 600, scopes=["models:read"])
    cases = [
        ([("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {good}")], 401,
         "authorization metadata must hold one 'Bearer <token>' and be sent once",
         "invalid_request"),
        ([("Authorization", f"Bearer {nested(2000)}")], 401,
         "bearer token is malformed: not base64url JSON", "invalid_token"),
        ([("Authorization", f"Bearer {reader}")], 403,
         "'app/http-reader' may not infer model 'mlp'", "insufficient_scope"),
    ]
    port = int((mesh.data_dir / "run" / "ingress.http-port").read_text())
    context = ssl.create_default_context(cafile=str(mesh.tls / "ca.crt"))
    context.check_hostname = False
    body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 256],
                                   "data": [1.0] * 256}]}).encode()
    for headers, status, message, error in cases:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                 timeout=TIMEOUT_S)
        try:
            connection.putrequest("POST", "/v2/models/mlp/infer")
            for name, value in [*headers, ("Content-Length", str(len(body)))]:
                connection.putheader(name, value)
            connection.endheaders(body)
            reply = connection.getresponse()
            answer = json.loads(reply.read())
        finally:
            connection.close()
        assert (reply.status, answer) == (status, {"error": message})
        assert reply.getheader("WWW-Authenticate") == (
            f'Bearer realm="meshserve", error="{error}", error_description="'
            + message.replace('"', "'") + '"')


def test_a_token_scoped_to_cnn(token_stub, auth_dir):
    token = meshserve("token", "issue", "--subject", "app/cnn-only", "--scope", "infer",
                      "--models", "cnn", "--ttl", "10m",
                      f"--data-dir={auth_dir.parent}").stdout.strip()
    assert output_shape(infer(token_stub, "cnn", token)) == [1, 10]
    for model in ("mlp", "no-such-model"):  # the same answer whether the model exists
        error = refused(lambda model=model: infer(token_stub, model, token))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == f"'app/cnn-only' may not infer model '{model}'"
    error = refused(lambda: token_stub.ModelMetadata(pb.ModelMetadataRequest(name="cnn"),
                                                     metadata=bearer(token), timeout=TIMEOUT_S))
    assert error.details() == "'app/cnn-only' may not models:read model 'cnn'"


def test_repository_index_lists_only_readable_models(token_stub, auth_dir):
    token = issue(auth_dir, "app/reader", 600, scopes=["models:read"], models=["cnn"])
    index = token_stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=bearer(token),
                                       timeout=TIMEOUT_S)
    assert {model.name for model in index.models} == {"cnn"}


def test_quota_exceeded_is_resource_exhausted_with_a_retry_hint(token_stub, auth_dir):
    token = issue(auth_dir, "app/limited", 600)
    assert output_shape(infer(token_stub, "mlp", token)) == [1, 10]
    assert output_shape(infer(token_stub, "mlp", token)) == [1, 10]
    error = refused(lambda: infer(token_stub, "mlp", token))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(r"rate limit of 0\.1 requests/s for 'app/limited' reached; "
                        r"retry after \d+(\.\d+)? s", error.details()), error.details()
    trailing = dict(error.trailing_metadata())
    assert 0 < int(trailing["retry-after-ms"]) <= 10_000


def test_tokens_of_the_old_and_new_key_both_work_after_rotation(token_stub, auth_dir):
    old = issue(auth_dir, "app/rotation", 600)
    done = meshserve("token", "rotate-key", f"--data-dir={auth_dir.parent}")
    assert done.returncode == 0, done.stderr
    new = issue(auth_dir, "app/rotation", 600)
    assert new.split(".")[0] != old.split(".")[0]  # another kid
    assert output_shape(eventually(lambda: infer(token_stub, "mlp", new))) == [1, 10]
    assert output_shape(infer(token_stub, "mlp", old)) == [1, 10]


def test_policy_edits_take_effect_without_restart(mesh, token_stub, auth_dir):
    token = issue(auth_dir, "late/joiner", 600)
    error = refused(lambda: infer(token_stub, "mlp", token))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    (auth_dir / "policy.yaml").write_text(RELOADED)
    assert output_shape(eventually(lambda: infer(token_stub, "mlp", token))) == [1, 10]
    log = mesh.data_dir / "run" / "ingress.log"
    kept = "not reloaded, keeping the previous one"  # the ingress's line about the policy
    seen = log.read_text().count(kept)
    (auth_dir / "policy.yaml").write_text("rules: [{actions: [fly]}]\n")  # broken: kept

    def answered_after_the_broken_file_was_read() -> bool:
        assert output_shape(infer(token_stub, "mlp", token)) == [1, 10]
        return log.read_text().count(kept) > seen

    until_sync(answered_after_the_broken_file_was_read, WAIT_S, "the broken policy read")
    assert output_shape(infer(token_stub, "mlp", token)) == [1, 10]
    (auth_dir / "policy.yaml").write_text(POLICY)


def test_the_client_certificate_still_works_on_the_mtls_port(mtls_stub):
    assert output_shape(infer(mtls_stub, "mlp")) == [1, 10]
    ready = mtls_stub.ModelReady(pb.ModelReadyRequest(name="cnn"), timeout=TIMEOUT_S)
    assert ready.ready
    error = refused(lambda: infer(mtls_stub, "no-such-model"))
    assert error.code() == grpc.StatusCode.NOT_FOUND  # the developer may read everything


def test_denials_are_counted_and_logged_without_tokens(mesh, token_stub, auth_dir):
    token = issue(auth_dir, "app/a", 600, models=["cnn"])
    refused(lambda: infer(token_stub, "mlp", token))
    refused(lambda: infer(token_stub, "mlp", "e30.e30.e30"))
    port = int((mesh.data_dir / "run" / "ingress.metrics-port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as reply:
        text = reply.read().decode()
    counts = dict(re.findall(r'^meshserve_ingress_denied_total\{reason="(\w+)"\} (\S+)$', text,
                             re.MULTILINE))
    assert float(counts["unauthenticated"]) >= 2
    assert float(counts["permission_denied"]) >= 1
    log = (mesh.data_dir / "run" / "ingress.log").read_text()
    assert "principal=app/a action=infer model=mlp" in log
    assert token not in log
    assert token.split(".")[2] not in log


def test_denials_are_recorded_in_the_audit_log(mesh, token_stub, auth_dir):
    token = issue(auth_dir, "app/audited", 600, models=["cnn"])
    refused(lambda: infer(token_stub, "mlp", token))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        tail = meshserve("audit", "tail", "-n", "50", f"--data-dir={mesh.data_dir}")
        assert tail.returncode == 0, tail.stderr
        lines = [line for line in tail.stdout.splitlines() if "request.denied" in line]
        if any("app/audited" in line for line in lines):
            break
        time.sleep(0.2)
    [line] = [line for line in lines if "app/audited" in line]
    assert "permission_denied: infer on mlp" in line
    assert "ingress" in line  # the actor: the ingress's certificate identity
    assert token not in tail.stdout


def test_issued_tokens_are_audited_by_digest(mesh):
    issued = meshserve("token", "issue", "--subject", "app/audited-issue", "--scope", "infer",
                       "--ttl", "5m", f"--data-dir={mesh.data_dir}")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    tail = meshserve("audit", "tail", "-n", "50", f"--data-dir={mesh.data_dir}")
    [line] = [line for line in tail.stdout.splitlines() if "app/audited-issue" in line]
    assert "token.issue" in line
    assert hashlib.sha256(token.encode()).hexdigest() in line
    assert token not in tail.stdout
    offline = meshserve("token", "issue", "--subject", "x", "--no-audit",
                        f"--data-dir={mesh.data_dir}", "--control-plane=127.0.0.1:1")
    assert offline.returncode == 0 and "not recorded in the audit log" in offline.stderr
    unreachable = meshserve("token", "issue", "--subject", "x", f"--data-dir={mesh.data_dir}",
                            "--control-plane=127.0.0.1:1")
    assert unreachable.returncode == 1 and unreachable.stdout == ""
    assert "could not record the token in the audit log" in unreachable.stderr


def test_tritonclient_http_with_a_bearer_token(mesh, auth_dir):
    token = issue(auth_dir, "app/web", 600, scopes=["infer", "models:read"], models=["mlp"])
    report = run_scenarios(mesh, token)
    assert (report["live"], report["ready"], report["model_ready"]) == (True, True, True)
    assert report["metadata"]["mlp"]["versions"] == ["1", "2"]
    assert all(diff <= 1e-5 for diff in report["diffs"].values()) and len(report["diffs"]) == 4
    assert report["stats"] == {"inference_count": 4, "success": 2}
    assert report["cnn_metadata"] == ["403", "'app/web' may not models:read model 'cnn'"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def denied_counts(mesh) -> dict[str, float]:
    port = int((mesh.data_dir / "run" / "ingress.metrics-port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as reply:
        text = reply.read().decode()
    return {reason: float(value) for reason, value in re.findall(
        r'^meshserve_ingress_denied_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def test_a_flood_of_bad_tokens_is_refused_cheaply(mesh, token_stub, auth_dir):
    """2,000 bad tokens (garbage, a known key's kid with a wrong signature, nesting too deep,
    a signed claim of the wrong type), 64 in flight, while a caller with a good token keeps
    asking: every bad one UNAUTHENTICATED and counted, every good one answered, and the
    ingress's memory does not grow with them."""
    now = time.time()
    key = load_signing_key(auth_dir)
    header = base64.urlsafe_b64encode(json.dumps(
        {"alg": "EdDSA", "kid": key_id(key.public_key())}).encode()).rstrip(b"=").decode()
    kinds = [lambda i: f"e30.{i}.e30",
             lambda i: f"{header}.e30.{'A' * 86}{i}",
             lambda i: nested(1500 + i % 100),
             lambda i: signed(auth_dir, now, aud=i)]
    bad = [kinds[i % len(kinds)](i) for i in range(2000)]
    good = issue(auth_dir, "app/steady", 600)
    pid = int((mesh.data_dir / "run" / "ingress.pid").read_text())
    infer(token_stub, "mlp", good)
    before, counted = rss_bytes(pid), denied_counts(mesh).get("unauthenticated", 0)
    codes: dict[str, int] = {}
    done = threading.Event()

    def flood() -> None:
        try:
            for start in range(0, len(bad), 64):
                calls = [token_stub.ServerLive.future(pb.ServerLiveRequest(), metadata=bearer(t),
                                                      timeout=TIMEOUT_S)
                         for t in bad[start:start + 64]]
                for call in calls:
                    code = call.code().name
                    codes[code] = codes.get(code, 0) + 1
        finally:
            done.set()

    flooding = threading.Thread(target=flood)
    flooding.start()
    answered = 0
    while not done.is_set():
        assert output_shape(infer(token_stub, "mlp", good)) == [1, 10]
        answered += 1
    flooding.join(TIMEOUT_S)
    assert codes == {"UNAUTHENTICATED": len(bad)}
    assert answered >= 1
    assert denied_counts(mesh)["unauthenticated"] - counted >= len(bad)
    grown = rss_bytes(pid) - before
    assert grown < 16 << 20, f"the ingress grew by {grown / 2**20:.1f} MiB"
