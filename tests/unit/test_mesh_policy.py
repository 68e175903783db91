"""Traffic policy, endpoints and mesh state: validation messages, weight changes, JSON."""

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.common.version_pin import PIN_HEADER
from meshserve.mesh.policy import (
    Endpoint,
    MeshState,
    Shadow,
    TrafficPolicy,
    check_region,
    parse_weights,
)

# name, weights, shadow, expected message
INVALID = [
    ("no version", {}, None, "policy of model 'mlp' names no version"),
    ("sum below 100", {"1": 90, "2": 5}, None, "weights of model 'mlp' sum to 95, not 100"),
    ("sum above 100", {"1": 90, "2": 20}, None, "weights of model 'mlp' sum to 110, not 100"),
    ("single version not 100", {"1": 99}, None, "weights of model 'mlp' sum to 99, not 100"),
    ("first bad weight is named", {"1": 101, "2": -1}, None,
     "weight 101 of version '1' is not between 0 and 100"),
    ("negative weight", {"1": 50, "2": -1, "3": 51}, None,
     "weight -1 of version '2' is not between 0 and 100"),
    ("weight above 100", {"1": 0, "2": 150}, None,
     "weight 150 of version '2' is not between 0 and 100"),
    ("non-numeric version", {"v1": 100}, None, "version 'v1' of model 'mlp' is not a number"),
    ("empty version", {"": 100}, None, "version '' of model 'mlp' is not a number"),
    ("signed version", {"-1": 100}, None, "version '-1' of model 'mlp' is not a number"),
    ("version checked before the sum", {"1": 10, "x": 10}, None,
     "version 'x' of model 'mlp' is not a number"),
    ("unknown shadow version", {"1": 100}, Shadow("2", 5.0),
     "shadow version '2' is not a version of model 'mlp'"),
    ("shadow percent zero", {"1": 100}, Shadow("1", 0.0),
     "shadow percent must be above 0 and at most 100"),
    ("shadow percent negative", {"1": 100}, Shadow("1", -5.0),
     "shadow percent must be above 0 and at most 100"),
    ("shadow percent above 100", {"1": 100}, Shadow("1", 100.5),
     "shadow percent must be above 0 and at most 100"),
    ("shadow percent NaN", {"1": 100}, Shadow("1", float("nan")),
     "shadow percent must be above 0 and at most 100"),
]


@pytest.mark.parametrize("weights, shadow, message", [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_policy_is_refused_with_a_message_naming_the_problem(weights, shadow, message):
    with pytest.raises(InvalidArgument) as caught:
        TrafficPolicy("mlp", weights, shadow)
    assert caught.value.message == message
    assert caught.value.code == "INVALID_ARGUMENT"


VALID = [
    ("one version", {"1": 100}, None),
    ("split", {"1": 90, "2": 10}, None),
    ("a zero weight is allowed", {"1": 100, "2": 0}, None),
    ("all on the newer", {"1": 0, "2": 100}, None),
    ("shadow at the upper bound", {"1": 100, "2": 0}, Shadow("2", 100.0)),
    ("shadow just above zero", {"1": 100, "2": 0}, Shadow("2", 0.01)),
    ("shadow of the serving version", {"1": 100}, Shadow("1", 50.0)),
]


@pytest.mark.parametrize("weights, shadow", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_policy_is_accepted(weights, shadow):
    policy = TrafficPolicy("mlp", weights, shadow)
    assert policy.weights == weights
    assert policy.shadow == shadow


def test_versions_are_sorted_numerically():
    policy = TrafficPolicy("mlp", {"10": 50, "9": 25, "2": 25})
    assert policy.versions == ["2", "9", "10"]


BASE = TrafficPolicy("mlp", {"1": 90, "2": 10, "10": 0}, Shadow("2", 5.0), "eu")

# name, new weights, expected weights
WITH_WEIGHTS = [
    ("all named", {"1": 50, "2": 25, "10": 25}, {"1": 50, "2": 25, "10": 25}),
    ("unnamed versions get 0", {"10": 100}, {"1": 0, "2": 0, "10": 100}),
    ("two named, one left out", {"1": 40, "2": 60}, {"1": 40, "2": 60, "10": 0}),
]


@pytest.mark.parametrize("new, expected", [c[1:] for c in WITH_WEIGHTS],
                         ids=[c[0] for c in WITH_WEIGHTS])
def test_with_weights_sets_named_versions_and_zeroes_the_rest(new, expected):
    changed = BASE.with_weights(new)
    assert changed.weights == expected
    assert list(changed.weights) == ["1", "2", "10"]  # the policy's versions, in its order
    assert (changed.model, changed.shadow, changed.region) == ("mlp", Shadow("2", 5.0), "eu")
    assert BASE.weights == {"1": 90, "2": 10, "10": 0}  # the original is untouched


# name, new weights, expected message
WITH_WEIGHTS_BAD = [
    ("unknown version", {"3": 100},
     "model 'mlp' has no version '3' (versions: 1, 2, 10)"),
    ("first unknown version, numerically", {"20": 50, "3": 50},
     "model 'mlp' has no version '3' (versions: 1, 2, 10)"),
    ("unknown among known", {"1": 50, "11": 50},
     "model 'mlp' has no version '11' (versions: 1, 2, 10)"),
]


@pytest.mark.parametrize("new, message", [c[1:] for c in WITH_WEIGHTS_BAD],
                         ids=[c[0] for c in WITH_WEIGHTS_BAD])
def test_with_weights_refuses_an_unknown_version_naming_it(new, message):
    with pytest.raises(InvalidArgument) as caught:
        BASE.with_weights(new)
    assert caught.value.message == message


@pytest.mark.parametrize("new, message", [
    ({"1": 50}, "weights of model 'mlp' sum to 50, not 100"),
    ({"1": 120, "2": -20}, "weight 120 of version '1' is not between 0 and 100"),
])
def test_with_weights_result_is_validated(new, message):
    with pytest.raises(InvalidArgument) as caught:
        BASE.with_weights(new)
    assert caught.value.message == message


def test_with_weights_refuses_a_non_numeric_unknown_version_as_invalid_argument():
    with pytest.raises(InvalidArgument) as caught:
        BASE.with_weights({"latest": 100})
    assert caught.value.message == "model 'mlp' has no version 'latest' (versions: 1, 2, 10)"


# name, version, expected weights
PINNED = [
    ("pin the old version", "1", {"1": 100, "2": 0, "10": 0}),
    ("pin the canary", "2", {"1": 0, "2": 100, "10": 0}),
    ("pin an idle version", "10", {"1": 0, "2": 0, "10": 100}),
]


@pytest.mark.parametrize("version, expected", [c[1:] for c in PINNED],
                         ids=[c[0] for c in PINNED])
def test_pinned_sends_all_unpinned_traffic_to_one_version(version, expected):
    pinned = BASE.pinned(version)
    assert pinned.weights == expected
    assert (pinned.shadow, pinned.region) == (Shadow("2", 5.0), "eu")


def test_pinned_to_an_unknown_version_is_refused():
    with pytest.raises(InvalidArgument) as caught:
        BASE.pinned("4")
    assert caught.value.message == "model 'mlp' has no version '4' (versions: 1, 2, 10)"


ROUND_TRIP = [
    ("plain", TrafficPolicy("mlp", {"1": 100})),
    ("split", TrafficPolicy("mlp", {"1": 90, "2": 10})),
    ("shadow", TrafficPolicy("mlp", {"1": 100, "2": 0}, Shadow("2", 12.5))),
    ("region", TrafficPolicy("mlp", {"1": 100}, region="eu-west")),
    ("shadow and region", BASE),
]


@pytest.mark.parametrize("policy", [c[1] for c in ROUND_TRIP], ids=[c[0] for c in ROUND_TRIP])
def test_json_round_trip_keeps_every_field(policy):
    back = TrafficPolicy.from_json(policy.to_json())
    assert back == policy
    assert back.shadow == policy.shadow
    assert back.region == policy.region


def test_to_json_is_exact_and_sorted():
    assert BASE.to_json() == ('{"model": "mlp", "region": "eu", "shadow": {"percent": 5.0, '
                              '"version": "2"}, "weights": {"1": 90, "10": 0, "2": 10}}')
    assert TrafficPolicy("m", {"1": 100}).to_json() == (
        '{"model": "m", "region": "", "shadow": null, "weights": {"1": 100}}')


def test_from_json_without_region_or_shadow_uses_defaults():
    policy = TrafficPolicy.from_json('{"model": "m", "weights": {"1": 100}}')
    assert policy == TrafficPolicy("m", {"1": 100})
    assert (policy.shadow, policy.region) == (None, "")


def test_from_json_validates():
    with pytest.raises(InvalidArgument) as caught:
        TrafficPolicy.from_json('{"model": "m", "weights": {"1": 60}}')
    assert caught.value.message == "weights of model 'm' sum to 60, not 100"


# name, pairs, expected
PARSE_GOOD = [
    ("two pairs", ["1=90", "2=10"], {"1": 90, "2": 10}),
    ("one pair", ["3=100"], {"3": 100}),
    ("zero weight", ["1=100", "2=0"], {"1": 100, "2": 0}),
    ("none", [], {}),
    ("leading zeros", ["01=007"], {"01": 7}),
]


@pytest.mark.parametrize("pairs, expected", [c[1:] for c in PARSE_GOOD],
                         ids=[c[0] for c in PARSE_GOOD])
def test_parse_weights_good(pairs, expected):
    assert parse_weights(pairs) == expected


PARSE_BAD = [
    ("no equals sign", ["1:90"], "1:90"),
    ("no weight", ["1="], "1="),
    ("no version", ["=90"], "=90"),
    ("non-numeric version", ["v1=90"], "v1=90"),
    ("non-numeric weight", ["1=ninety"], "1=ninety"),
    ("negative weight", ["1=-10"], "1=-10"),
    ("fractional weight", ["1=9.5"], "1=9.5"),
    ("two equals signs", ["1=9=0"], "1=9=0"),
    ("second pair bad", ["1=90", "2"], "2"),
    ("empty", [""], ""),
]


@pytest.mark.parametrize("pairs, bad", [c[1:] for c in PARSE_BAD], ids=[c[0] for c in PARSE_BAD])
def test_parse_weights_bad_names_the_pair(pairs, bad):
    with pytest.raises(InvalidArgument) as caught:
        parse_weights(pairs)
    assert caught.value.message == f"'{bad}' is not VERSION=WEIGHT (for example 1=90)"


@pytest.mark.parametrize("pairs", [["1=50", "1=50"], ["1=10", "2=0", "1=90"]])
def test_parse_weights_refuses_a_version_given_twice(pairs):
    with pytest.raises(InvalidArgument) as caught:
        parse_weights(pairs)
    assert caught.value.message == (f"version '1' is given twice ('{pairs[-1]}'): give each "
                                    "version once")


def test_with_versions_adds_the_missing_at_weight_0():
    policy = TrafficPolicy("mlp", {"1": 100}, shadow=Shadow("1", 5), region="eu")
    assert policy.with_versions(["2", "1", "10"]) == TrafficPolicy(
        "mlp", {"1": 100, "2": 0, "10": 0}, shadow=Shadow("1", 5), region="eu")
    assert policy.with_versions(["1"]) is policy


@pytest.mark.parametrize("region", ["eu-west1", "us_east.1", "A", "a" * 63])
def test_check_region_accepts_locality_names(region):
    assert check_region(region) == region


@pytest.mark.parametrize("region", ["", "  ", "EU West/1", "eu/*", "-eu", "eu-", "a" * 64,
                                    "é"])
def test_check_region_refuses_what_istio_cannot_name(region):
    with pytest.raises(InvalidArgument, match="is not a locality region name"):
        check_region(region)


@pytest.mark.parametrize("weight", ["101", "9" * 20])
def test_parse_weights_refuses_a_weight_past_100(weight):
    with pytest.raises(InvalidArgument) as caught:  # one past 2^32 cannot travel at all
        parse_weights(["1=0", f"2={weight}"])
    assert caught.value.message == f"weight {weight} of version '2' is not between 0 and 100"


def test_refuse_unknown_names_the_first_version_the_policy_lacks():
    policy = TrafficPolicy("mlp", {"1": 90, "2": 10})
    policy.refuse_unknown(["2", "1"])
    with pytest.raises(InvalidArgument) as caught:
        policy.refuse_unknown(["1", "12", "3"])
    assert caught.value.message == "model 'mlp' has no version '3' (versions: 1, 2)"


# address, (host, port)
HOST_PORT = [
    ("10.0.0.1:8001", ("10.0.0.1", 8001)),
    ("batcher.ns.svc:50051", ("batcher.ns.svc", 50051)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:80", ("::1", 80)),
    ("[2001:db8::7]:65535", ("2001:db8::7", 65535)),
]


@pytest.mark.parametrize("address, expected", HOST_PORT)
def test_endpoint_host_port(address, expected):
    assert Endpoint("mlp", "1", address).host_port == expected


@pytest.mark.parametrize("address", ["10.0.0.1", "host:", "host:http"])
def test_endpoint_host_port_without_a_numeric_port_raises(address):
    with pytest.raises(ValueError):
        _ = Endpoint("mlp", "1", address).host_port


def test_endpoint_defaults():
    endpoint = Endpoint("mlp", "1", "h:1")
    assert (endpoint.region, endpoint.zone) == ("local", "")


def test_mesh_state_endpoints_of_filters_by_model_and_version_in_order():
    a1 = Endpoint("mlp", "1", "10.0.0.1:1")
    a2 = Endpoint("mlp", "1", "10.0.0.2:1", region="eu")
    b1 = Endpoint("mlp", "2", "10.0.0.3:1")
    c1 = Endpoint("bert", "1", "10.0.0.4:1")
    state = MeshState({"mlp": TrafficPolicy("mlp", {"1": 100, "2": 0})}, (a1, b1, c1, a2))
    assert state.endpoints_of("mlp", "1") == [a1, a2]
    assert state.endpoints_of("mlp", "2") == [b1]
    assert state.endpoints_of("bert", "1") == [c1]
    assert state.endpoints_of("bert", "2") == []
    assert state.endpoints_of("nope", "1") == []
    assert MeshState().endpoints_of("mlp", "1") == []


def test_pin_header_name():
    assert PIN_HEADER == "x-model-version"
