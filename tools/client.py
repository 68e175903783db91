"""`meshserve infer`: one request through the public endpoint, with TLS, and its latency."""

import argparse
import asyncio
import time
from pathlib import Path

import grpc
import numpy

from meshserve.common.arrays import NUMPY_DTYPE, deserialize_bytes
from meshserve.common.forwarding import CODE_NAME
from meshserve.common.stream_answers import FINAL_RESPONSE
from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.async_inference_pb2 import ResultRequest, ResultResponse
from meshserve.protocol.async_inference_pb2_grpc import AsyncInferenceStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.arguments import positive_int
from meshserve.tools.random_requests import random_request


def client_tls(data_dir: Path) -> TlsFiles:
    """The development client certificate that `meshserve up` generates."""
    return TlsFiles.for_identity(data_dir / "tls", "client")


def connect(target: str, tls: TlsFiles) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, channel_credentials(tls))


def dtype_of(datatype: str) -> numpy.dtype:
    """The numpy dtype of a fixed-size wire datatype (BF16: `ml_dtypes.bfloat16`)."""
    if datatype == "BF16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return NUMPY_DTYPE[datatype]


def outputs_of(response: pb.ModelInferResponse) -> dict[str, numpy.ndarray]:
    """The response's outputs as arrays (BYTES: object arrays of bytes)."""
    return {t.name: deserialize_bytes(raw, t.shape) if t.datatype == "BYTES" else
            numpy.frombuffer(raw, dtype_of(t.datatype)).reshape(tuple(t.shape))
            for t, raw in zip(response.outputs, response.raw_output_contents)}


async def infer_once(args: argparse.Namespace) -> int:
    async with connect(args.target, client_tls(args.data_dir)) as channel:
        stub = GRPCInferenceServiceStub(channel)
        metadata = await stub.ModelMetadata(
            pb.ModelMetadataRequest(name=args.model, version=args.version), timeout=10)
        request, _ = random_request(metadata, args.batch, args.seed)
        request.model_version = args.version
        if args.input is not None:
            array = args.input
            del request.raw_input_contents[:]
            request.inputs[0].ClearField("shape")
            request.inputs[0].shape.extend(array.shape)
            request.raw_input_contents.append(array.astype(
                dtype_of(request.inputs[0].datatype)).tobytes())
        start = time.perf_counter()
        if args.stream:
            return await stream_answers(stub, request, args.timeout, start)
        if args.use_async:
            response = await submit_and_wait(channel, request, args.timeout)
        else:
            response = await stub.ModelInfer(request, timeout=args.timeout)
        elapsed_ms = (time.perf_counter() - start) * 1e3
    print(f"model {response.model_name} version {response.model_version} "
          f"answered in {elapsed_ms:.2f} ms")
    print_outputs(response)
    return 0


def print_outputs(response: pb.ModelInferResponse) -> None:
    for name, array in outputs_of(response).items():
        print(f"{name} {array.dtype} {list(array.shape)}")
        print(numpy.array2string(array, precision=4, threshold=40))


async def stream_answers(stub: GRPCInferenceServiceStub, request: pb.ModelInferRequest,
                         timeout: float, start: float) -> int:
    """The request on ModelStreamInfer, each answer printed as it comes (a decoupled model's
    several, each saying whether it is the last); 1 when one is an error."""
    failed = 0
    async for answer in stub.ModelStreamInfer(iter([request]), timeout=timeout):
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if answer.error_message:
            failed = 1
            print(f"error after {elapsed_ms:.2f} ms: {answer.error_message}")
            continue
        response = answer.infer_response
        final = response.parameters[FINAL_RESPONSE].bool_param
        print(f"model {response.model_name} version {response.model_version} answered in "
              f"{elapsed_ms:.2f} ms{' (its last answer)' if final else ''}")
        print_outputs(response)
    return failed


class NotAnswered(Exception):
    pass


async def submit_and_wait(channel: grpc.aio.Channel, request: pb.ModelInferRequest,
                          timeout: float) -> pb.ModelInferResponse:
    """Through the asynchronous API: Submit, then Result waiting up to `timeout`."""
    stub = AsyncInferenceStub(channel)
    submitted = await stub.Submit(request, timeout=10)
    print(f"submitted as {submitted.id}")
    answer = await stub.Result(ResultRequest(id=submitted.id, wait_ms=int(timeout * 1000)),
                               timeout=timeout + 5)
    if answer.state == ResultResponse.DONE:
        return answer.response
    if answer.state == ResultResponse.FAILED:
        raise NotAnswered(f"{CODE_NAME.get(answer.code, answer.code)}: {answer.message}")
    if answer.state == ResultResponse.CANCELLED:
        raise NotAnswered(f"{submitted.id} was cancelled")
    raise NotAnswered(f"{submitted.id} is still {ResultResponse.State.Name(answer.state)}")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(infer_once(args))
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}")
        return 1
    except NotAnswered as error:
        print(f"error: {error}")
        return 1


def npy_array(text: str) -> numpy.ndarray:
    """argparse type of `--input`: the array a .npy file holds (read before connecting)."""
    try:
        return numpy.load(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"cannot read '{text}' as a .npy file: {error}") \
            from None


def register(commands) -> None:
    parser = commands.add_parser("infer")
    parser.add_argument("model")
    parser.add_argument("--version", default="", help="default: the version the mesh picks")
    parser.add_argument("--target", default="127.0.0.1:8001")
    parser.add_argument("--data-dir", type=Path, default=Path(".meshserve"),
                        help="where `meshserve up` keeps its certificates")
    parser.add_argument("--input", type=npy_array, help="a .npy file for the first input")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--async", dest="use_async", action="store_true",
                     help="through the asynchronous API (Submit, then Result)")
    how.add_argument("--stream", action="store_true",
                     help="on ModelStreamInfer, each answer printed as it comes (a decoupled "
                          "model's several)")
    parser.set_defaults(func=run)
