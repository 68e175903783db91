"""Tensors at and past the size one message between the services carries, and shapes whose
dimensions multiply past int64: refused with a status that names the limit or the field,
never sent to break a stream deeper in the mesh (where the caller heard only INTERNAL)."""

import numpy
import pytest
import torch

from meshserve.common import tls
from meshserve.common.errors import (
    InvalidArgument,
    OverLimit,
    ResourceExhausted,
    TooLarge,
    from_code,
)
from meshserve.common.validation import MAX_MESSAGE, MESSAGE_LIMIT, Schema
from meshserve.compute import tensors
from meshserve.protocol import model_config_pb2 as mc
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest
from tests.unit.test_torchscript_backend import load, write_model


def flat_config(dims=(-1,), max_batch_size: int = 4) -> mc.ModelConfig:
    config = mc.ModelConfig(name="flat", max_batch_size=max_batch_size)
    config.input.add(name="X", data_type=mc.TYPE_FP32, dims=list(dims))
    config.output.add(name="Y", data_type=mc.TYPE_FP32, dims=list(dims))
    return config


def request_of(shape, raw: bytes) -> ModelInferRequest:
    request = ModelInferRequest(model_name="flat")
    request.inputs.add(name="X", datatype="FP32", shape=shape)
    request.raw_input_contents.append(raw)
    return request


class Tenfold(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x.repeat(1, 10)


def test_the_limit_is_the_services_message_limit():
    assert MESSAGE_LIMIT == tls.MAX_MESSAGE_BYTES
    assert MESSAGE_LIMIT - MAX_MESSAGE >= 4096


@pytest.mark.parametrize("dims", [(-1,), (-1, -1)])
def test_inputs_that_fit_the_client_message_but_not_a_group_are_refused(dims):
    # A client's message just under 64 MiB: wrapped in a group item at the ingress it passed
    # the limit between the services (RESOURCE_EXHAUSTED "Sent message larger than max", or
    # INTERNAL from compute, whose answer is as large).
    size = MESSAGE_LIMIT - 1000
    shape = [1, size // 4] if len(dims) == 1 else [1, 2, size // 8]
    request = request_of(shape, bytes(size))
    with pytest.raises(TooLarge) as refused:  # RESOURCE_EXHAUSTED, not retried
        Schema(flat_config(dims)).validate(request)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and not refused.value.retryable
    assert refused.value.message.startswith(f"the request is {request.ByteSize()} bytes, past "
                                            f"the {MAX_MESSAGE} bytes")
    assert f"{MESSAGE_LIMIT}-byte message limit" in refused.value.message


def test_inputs_up_to_the_limit_pass():
    request = request_of([1, 1], b"")
    size = (MAX_MESSAGE - request.ByteSize() - 8) // 4 * 4
    request = request_of([1, size // 4], bytes(size))
    assert MAX_MESSAGE - 8 <= request.ByteSize() <= MAX_MESSAGE
    assert Schema(flat_config()).validate(request).size == size


@pytest.mark.parametrize("shape", [[1, 0, 2**62, 2**62], [1, 0, 2**63 - 1, 2]])
def test_a_zero_size_shape_whose_other_dims_pass_int64_is_refused(shape):
    # Its elements are 0, so its bytes matched; numpy refused to view it at compute, which
    # answered INTERNAL.
    with pytest.raises(InvalidArgument) as refused:
        Schema(flat_config((-1, -1, -1))).validate(request_of(shape, b""))
    assert "input 'X' has shape" in refused.value.message
    assert "2^63 - 1" in refused.value.message


def test_a_zero_size_shape_is_served():
    checked = Schema(flat_config((-1, -1))).validate(request_of([2, 0, 3], b""))
    assert (checked.size, checked.rows) == (0, 2)


def test_numpy_answers_past_the_limit_are_refused_naming_the_output():
    config = flat_config()
    big = numpy.zeros((1, MAX_MESSAGE // 4), numpy.float32)
    with pytest.raises(ResourceExhausted) as refused:
        tensors.encode({"Y": big}, ["Y"], config, request_of([1, 1], bytes(4)), "1",
                       "model 'flat' version 1")
    message = refused.value.message
    assert message.startswith(f"model 'flat' version 1: the answer (outputs 'Y' {big.nbytes} "
                              "bytes) is ")
    assert f"past the {MAX_MESSAGE} bytes" in message


def test_numpy_answers_at_the_limit_are_sent():
    config = flat_config()
    big = numpy.ones((1, (MAX_MESSAGE - 100) // 4), numpy.float32)
    response = tensors.encode({"Y": big}, ["Y"], config, request_of([1, 1], bytes(4)), "1", "m")
    assert len(response.raw_output_contents[0]) == big.nbytes


def test_torchscript_answers_past_the_limit_are_refused(tmp_path):
    write_model(tmp_path, "tenfold", Tenfold())
    model = load(tmp_path, "tenfold")
    elements = 7 << 18  # 7 MiB of FP32 in, 70 MiB out
    request = request_of([1, elements], bytes(4 * elements))
    request.model_name = "tenfold"
    request.inputs[0].name = "INPUT__0"
    with pytest.raises(ResourceExhausted) as refused:
        model.run(request, "1")
    message = refused.value.message
    assert message.startswith(f"model 'tenfold' version 1: the answer (outputs 'OUTPUT__0' "
                              f"{40 * elements} bytes) is ")
    assert f"{MESSAGE_LIMIT}-byte message limit" in message
    # Relayed to the ingress, it is a limit a retry will not pass: HTTP 500, not retried.
    assert type(from_code("RESOURCE_EXHAUSTED", message)) is OverLimit
