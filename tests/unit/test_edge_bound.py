"""Tests of the ingress's bound on a model's waiting requests (pure: no gRPC)."""

import pytest
from google.protobuf import text_format

from meshserve.common.errors import ResourceExhausted
from meshserve.ingress.saturation import EdgeBound
from meshserve.protocol import model_config_pb2

TWO_LEVELS = """
name: "mlp"
max_batch_size: 32
dynamic_batching {
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 4 }
}
"""


def bound_of(text: str) -> EdgeBound:
    return EdgeBound.of("mlp", text_format.Parse(text, model_config_pb2.ModelConfig()))


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(TWO_LEVELS, EdgeBound("mlp", 4, 2, 2), id="two-levels"),
    pytest.param('name: "mlp" max_batch_size: 8', EdgeBound("mlp", 0, 1, 0),
                 id="no-dynamic-batching"),
    pytest.param(TWO_LEVELS.replace(
        "default_queue_policy", "priority_queue_policy { key: 2 value { max_queue_size: 3 } }"
        " priority_queue_policy { key: 1 value { max_queue_size: 9 } } default_queue_policy"),
        EdgeBound("mlp", 3, 2, 2), id="the-least-urgent-levels-own-policy"),
])
def test_the_bound_is_the_configs_max_queue_size(text, expected):
    assert bound_of(text) == expected


def test_below_the_bound_every_request_is_admitted():
    bound_of(TWO_LEVELS).admit(priority=0, waiting=3, round_trip=0.2)


def test_at_the_bound_a_request_is_refused_naming_the_limit_with_the_round_trip_as_hint():
    with pytest.raises(ResourceExhausted) as refused:
        bound_of(TWO_LEVELS).admit(priority=0, waiting=4, round_trip=0.2)
    assert refused.value.message == ("model 'mlp' is saturated: 4 requests wait at the "
                                     "ingress (max_queue_size 4); retry after 0.2 s")
    assert refused.value.retry_after == 0.2


def test_the_hint_is_never_below_fifty_ms():
    with pytest.raises(ResourceExhausted) as refused:
        bound_of(TWO_LEVELS).admit(priority=2, waiting=9, round_trip=0.0)
    assert refused.value.retry_after == 0.05


@pytest.mark.parametrize(("priority", "refused"), [
    (0, True), (2, True), (7, True),  # the default level, the last, beyond the last
    (1, False),  # more urgent: the batcher sheds a less urgent request for it
])
def test_only_the_least_urgent_level_is_refused_at_the_edge(priority, refused):
    bound = bound_of(TWO_LEVELS)
    if refused:
        with pytest.raises(ResourceExhausted):
            bound.admit(priority, waiting=4, round_trip=0.1)
    else:
        bound.admit(priority, waiting=4, round_trip=0.1)


def test_a_model_without_max_queue_size_is_never_refused_here():
    bound_of('name: "mlp" max_batch_size: 8').admit(priority=0, waiting=100_000,
                                                    round_trip=1.0)
