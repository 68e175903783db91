"""The load generator: pure helpers, and short runs against an in-test echo server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshserve.common.datatypes import bytes_elements
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import grpc_service_pb2_grpc as pb_grpc
from meshserve.tools import bench
from meshserve.tools.load import run_load
from meshserve.tools.load_engine import Runner
from meshserve.tools.load_results import percentiles
from meshserve.tools.load_spec import LoadSpec, shares_of, split_evenly
from meshserve.tools.load_wire import stream_error_code, with_id
from meshserve.tools.random_requests import random_request
from tests.polling import until

# --- percentiles: nearest rank, value at 1-based rank ceil(p/100 * n) of the sorted samples.

PERCENTILE_CASES = [
    ([7.0], {"p50": 7.0, "p90": 7.0, "p99": 7.0, "p999": 7.0, "max": 7.0, "mean": 7.0}),
    ([2.0, 1.0], {"p50": 1.0, "p90": 2.0, "p99": 2.0, "p999": 2.0, "max": 2.0, "mean": 1.5}),
    (
        [5.0, 1.0, 4.0, 2.0, 3.0],
        {"p50": 3.0, "p90": 5.0, "p99": 5.0, "p999": 5.0, "max": 5.0, "mean": 3.0},
    ),
    # n = 10: 0.9 * 10 is exactly rank 9 (no float round-up to 10).
    (
        [float(v) for v in range(10, 0, -1)],
        {"p50": 5.0, "p90": 9.0, "p99": 10.0, "p999": 10.0, "max": 10.0, "mean": 5.5},
    ),
    (
        [float(v) for v in range(1, 101)],
        {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 100.0, "max": 100.0, "mean": 50.5},
    ),
    (
        [float(v) for v in range(1, 1001)],
        {"p50": 500.0, "p90": 900.0, "p99": 990.0, "p999": 999.0, "max": 1000.0, "mean": 500.5},
    ),
    (
        [1.0] * 999 + [50.0],
        {"p50": 1.0, "p90": 1.0, "p99": 1.0, "p999": 1.0, "max": 50.0, "mean": 1.049},
    ),
]


@pytest.mark.parametrize(("samples", "expected"), PERCENTILE_CASES)
def test_percentiles_nearest_rank(samples: list[float], expected: dict) -> None:
    got = percentiles(samples)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=1e-12), name


def test_percentiles_empty_and_pure() -> None:
    assert percentiles([]) == dict.fromkeys(("p50", "p90", "p99", "p999", "max", "mean"))
    samples = [3.0, 1.0, 2.0]
    percentiles(samples)
    assert samples == [3.0, 1.0, 2.0]


# --- request building


def test_build_request_replaces_variable_dims_and_sizes_payload() -> None:
    metadata = pb.ModelMetadataResponse(
        name="m",
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name="a", datatype="FP32", shape=[-1, 4]),
            pb.ModelMetadataResponse.TensorMetadata(name="b", datatype="INT64", shape=[-1, -1, 2]),
            pb.ModelMetadataResponse.TensorMetadata(name="c", datatype="FP16", shape=[3]),
            pb.ModelMetadataResponse.TensorMetadata(name="d", datatype="BF16", shape=[2, -1]),
        ],
    )
    request, _ = random_request(metadata, 3, model="m", version="2")
    assert (request.model_name, request.model_version) == ("m", "2")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("a", "FP32", [3, 4]),
        ("b", "INT64", [3, 1, 2]),
        ("c", "FP16", [3]),
        ("d", "BF16", [2, 1]),
    ]
    assert [len(raw) for raw in request.raw_input_contents] == [48, 48, 6, 4]
    values = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
    assert np.all((values >= 0) & (values < 1))


def test_build_request_fills_bytes_inputs_and_rejects_unknown_datatypes() -> None:
    metadata = pb.ModelMetadataResponse(
        name="m",
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name="t", datatype="BYTES", shape=[-1, 2])]
    )
    request, arrays = random_request(metadata, 3)
    assert request.model_name == "m" and arrays["t"].shape == (3, 2)
    assert bytes_elements(request.raw_input_contents[0]) == 6
    unknown = pb.ModelMetadataResponse(
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name="t", datatype="FP8", shape=[1])]
    )
    with pytest.raises(ValueError, match="'FP8' is not supported"):
        random_request(unknown, model="m")


def test_with_id_sets_id_without_touching_payload() -> None:
    request = pb.ModelInferRequest(model_name="m", id="old", raw_input_contents=[b"\x01" * 300])
    tagged = pb.ModelInferRequest.FromString(with_id(request.SerializeToString(), "x" * 200))
    assert tagged.id == "x" * 200
    assert tagged.raw_input_contents == [b"\x01" * 300]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("RESOURCE_EXHAUSTED: queue full", "RESOURCE_EXHAUSTED"),
        ("unavailable: draining", "UNAVAILABLE"),
        ("model 'x' failed", "UNKNOWN"),
        ("OK: odd", "UNKNOWN"),
    ],
)
def test_stream_error_code(message: str, code: str) -> None:
    assert stream_error_code(message) == code


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(0, 2) == [0, 0]


def test_invalid_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        run_load(LoadSpec(target="127.0.0.1:1", model="m", concurrency=0))
    with pytest.raises(ValueError, match="cert and key"):
        run_load(LoadSpec(target="127.0.0.1:1", model="m", cert=Path("c.pem")))


# --- against an in-test server


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Echoes INPUT__0 as OUTPUT__0 at version "1".

    Every 10th ModelInfer aborts with RESOURCE_EXHAUSTED. On a stream, every 10th message
    aborts the stream with RESOURCE_EXHAUSTED and every 7th other one is answered in-band with
    an UNAVAILABLE error_message.
    """

    def __init__(self) -> None:
        self.unary_calls = 0
        self.stream_messages = 0
        self.shapes: set[tuple[int, ...]] = set()
        self.headers: set[tuple[str, str]] = set()
        self.versions: set[str] = set()

    async def ModelMetadata(self, request, context):
        if request.name != "echo":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name="echo",
            versions=["1"],
            platform="test",
            inputs=[tensor(name="INPUT__0", datatype="FP32", shape=[-1, 4])],
            outputs=[tensor(name="OUTPUT__0", datatype="FP32", shape=[-1, 4])],
        )

    def _answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse | None:
        if len(request.inputs) != 1 or request.inputs[0].name != "INPUT__0":
            return None
        tensor = request.inputs[0]
        if len(request.raw_input_contents[0]) != 4 * math.prod(tensor.shape):
            return None
        self.shapes.add(tuple(tensor.shape))
        output = pb.ModelInferResponse.InferOutputTensor(
            name="OUTPUT__0", datatype=tensor.datatype, shape=tensor.shape
        )
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            id=request.id,
            outputs=[output],
            raw_output_contents=[request.raw_input_contents[0]],
        )

    async def ModelInfer(self, request, context):
        self.unary_calls += 1
        self.headers.update((m.key, m.value) for m in context.invocation_metadata() or ())
        self.versions.add(request.model_version)
        if self.unary_calls % 10 == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "every 10th call")
        response = self._answer(request)
        if response is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            self.stream_messages += 1
            if self.stream_messages % 10 == 0:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "every 10th message")
            response = self._answer(request)
            if response is None:
                yield pb.ModelStreamInferResponse(error_message="INVALID_ARGUMENT: bad input")
            elif self.stream_messages % 7 == 0:
                yield pb.ModelStreamInferResponse(
                    error_message="UNAVAILABLE: warming up",
                    infer_response=pb.ModelInferResponse(id=request.id),
                )
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)


@contextlib.asynccontextmanager
async def serving(servicer: EchoServicer):
    """`servicer` on a plaintext server on a free port: its target, until the block ends."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def echo_server():
    servicer = EchoServicer()
    async with serving(servicer) as target:
        yield target, servicer


def _check(result: dict, spec: LoadSpec) -> None:
    assert result["target"] == spec.target
    assert result["model"] == "echo"
    assert result["transport"] == ("stream" if spec.stream else "unary")
    assert result["requests"] > 0
    assert result["versions"] == {"1": result["requests"]}
    assert result["throughput_rps"] > 0
    window = result["window_unix_s"]
    assert 0 < result["duration_s"] == pytest.approx(window[1] - window[0], abs=2e-4)
    if result["processes"] == 1:  # the window is cut at its end, never stretched
        assert result["duration_s"] <= spec.duration_s + 1e-4
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"]
    assert latency["p999"] <= latency["max"]
    assert result["client_cpu_s"] >= 0
    json.dumps(result)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_closed_loop_against_echo_server(echo_server, stream: bool) -> None:
    target, servicer = echo_server
    spec = LoadSpec(
        target=target, model="echo", concurrency=4, stream=stream, duration_s=1.0, warmup_s=0.2
    )
    result = await asyncio.to_thread(run_load, spec)
    _check(result, spec)
    assert result["mode"] == "closed" and result["concurrency"] == 4
    assert servicer.shapes == {(1, 4)}
    errors = result["errors"]
    total = result["requests"] + sum(errors.values())
    assert errors["RESOURCE_EXHAUSTED"] >= total // 10 - 4 > 0
    if stream:
        assert set(errors) == {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
    else:
        assert set(errors) == {"RESOURCE_EXHAUSTED"}
        assert errors["RESOURCE_EXHAUSTED"] <= total // 10 + 4


class SlowEchoServicer(EchoServicer):
    """Echoes every request after 20 ms, without errors, and counts how each call ended:
    answered (unary), half-closed by the client (a stream), or cancelled by the client."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0
        self.ended: Counter[str] = Counter()

    async def ModelInfer(self, request, context):
        self.started += 1
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.ended["cancelled"] += 1
            raise
        self.ended["answered"] += 1
        return self._answer(request)

    async def ModelStreamInfer(self, request_iterator, context):
        self.started += 1
        try:
            async for request in request_iterator:
                await asyncio.sleep(0.02)
                yield pb.ModelStreamInferResponse(infer_response=self._answer(request))
        except asyncio.CancelledError:
            self.ended["cancelled"] += 1
            raise
        self.ended["half-closed"] += 1


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_closed_loop_ends_without_cancelling_a_request_in_flight(stream: bool) -> None:
    """At the window's end every worker's last request is answered and each stream is
    half-closed: a server is never left holding a request whose caller cancelled it."""
    servicer = SlowEchoServicer()
    async with serving(servicer) as target:
        spec = LoadSpec(target=target, model="echo", concurrency=4, stream=stream,
                        duration_s=0.5, warmup_s=0.1)
        result = await asyncio.to_thread(run_load, spec)
        await until(lambda: servicer.started and servicer.ended.total() == servicer.started,
                    5.0, "every call to end")
    assert result["requests"] > 0 and not result["errors"]
    if stream:
        assert servicer.ended == {"half-closed": 4}
    else:
        assert servicer.ended == {"answered": servicer.started}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_open_loop_against_echo_server(echo_server, stream: bool) -> None:
    target, _ = echo_server
    spec = LoadSpec(
        target=target, model="echo", rate=300.0, stream=stream, duration_s=0.8, warmup_s=0.2
    )
    result = await asyncio.to_thread(run_load, spec)
    _check(result, spec)
    assert result["mode"] == "open" and result["rate"] == 300.0
    assert result["dropped"] == 0
    total = result["requests"] + sum(result["errors"].values())
    assert 0.4 * 300 * 0.8 < total < 2.0 * 300 * 0.8  # Poisson around 240
    assert "CANCELLED" not in result["errors"]
    assert result["errors"].get("RESOURCE_EXHAUSTED", 0) > 0


async def test_max_requests_stops_early_and_batch_shapes_input(echo_server) -> None:
    target, servicer = echo_server
    spec = LoadSpec(
        target=target,
        model="echo",
        concurrency=2,
        duration_s=5.0,
        warmup_s=0.0,
        max_requests=25,
        batch=3,
    )
    result = await asyncio.to_thread(run_load, spec)
    assert result["requests"] + sum(result["errors"].values()) == 25
    assert servicer.shapes == {(3, 4)}


def test_the_request_budget_ends_the_closed_loop_window_at_its_last_answer() -> None:
    spec = LoadSpec(target="t", model="m", concurrency=2, duration_s=5.0, warmup_s=0.0,
                    max_requests=3)
    [share] = shares_of(spec)
    runner = Runner(spec, share, None, b"")
    runner.w_start, runner.w_end = 100.0, 105.0  # the window, on the runner's clock
    runner.record(99.9, 100.1, version="1")  # sent before the window: not counted
    for n in range(3):
        runner.record(100.0 + n, 100.5 + n, version="1")
    assert runner.stop.is_set() and runner.w_end == 102.5
    runner.record(102.0, 102.6, version="1")  # answered after the budget: not counted
    assert (runner.ok, runner.measured, runner.samples) == (3, 3, [500.0, 500.0, 500.0])


async def test_unknown_model_fails_clearly(echo_server) -> None:
    target, _ = echo_server
    spec = LoadSpec(target=target, model="nope", duration_s=0.5, warmup_s=0.0)
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        await asyncio.to_thread(run_load, spec)


async def test_two_processes_merge(echo_server) -> None:
    target, _ = echo_server
    spec = LoadSpec(
        target=target, model="echo", concurrency=4, duration_s=0.8, warmup_s=0.1, processes=2
    )
    result = await asyncio.to_thread(run_load, spec)
    _check(result, spec)
    assert result["processes"] == 2
    assert result["errors"]["RESOURCE_EXHAUSTED"] > 0


async def test_cli_prints_and_appends_json(echo_server, tmp_path, capsys) -> None:
    target, _ = echo_server
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "runs" / "bench.jsonl"
    argv = [
        "bench", "run", "--target", target, "--model", "echo", "--concurrency", "2",
        "--duration", "0.4", "--warmup", "0", "--header", "X-Run=cli", "--output", str(out),
    ]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.header == [("x-run", "cli")]
    code = await asyncio.to_thread(args.func, args)
    assert code == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text().strip())
    assert printed["mode"] == "closed" and printed["requests"] > 0
    assert "req/s" in captured.err


def _issue(name: str, issuer: tuple | None, *, ca: bool = False, dns: str = "") -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_mutual_tls_headers_and_version(tmp_path) -> None:
    ca_cert, ca_key, ca_pem, _ = _issue("test ca", None, ca=True)
    _, _, server_pem, server_key = _issue("echo", (ca_cert.subject, ca_key), dns="echo.test")
    _, _, client_pem, client_key = _issue("client", (ca_cert.subject, ca_key))
    for name, data in [("ca.crt", ca_pem), ("client.crt", client_pem), ("client.key", client_key)]:
        (tmp_path / name).write_bytes(data)
    servicer = EchoServicer()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(server_key, server_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        spec = LoadSpec(
            target=f"127.0.0.1:{port}",
            model="echo",
            version="1",
            concurrency=2,
            duration_s=0.4,
            warmup_s=0.0,
            ca=tmp_path / "ca.crt",
            cert=tmp_path / "client.crt",
            key=tmp_path / "client.key",
            server_name="echo.test",
            headers=(("X-Tenant", "t1"),),
        )
        result = await asyncio.to_thread(run_load, spec)
        assert result["requests"] > 0 and result["version"] == "1"
        assert ("x-tenant", "t1") in servicer.headers
        assert servicer.versions == {"1"}
        without_client_cert = LoadSpec(
            target=spec.target, model="echo", ca=spec.ca, server_name="echo.test", warmup_s=0.0
        )
        with pytest.raises(RuntimeError, match="ModelMetadata"):
            await asyncio.to_thread(run_load, without_client_cert)
    finally:
        await server.stop(None)


def test_plot_draws_latency_against_throughput(tmp_path):
    from meshserve.tools.plots import plot_results

    results = [{"model": "mlp", "transport": "unary", "target": "t", "throughput_rps": rps,
                "latency_ms": {"p50": p50, "p99": p50 * 3}}
               for rps, p50 in ((300, 3.0), (1000, 6.0), (1600, 17.0))]
    plot_results(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
