"""Table-driven tests of the router's version table (pure)."""

import pytest

from meshserve.common.errors import InvalidArgument, NotFound
from meshserve.router.routes import RouteTable

ROUTES = ["mlp@1=b1:9001", "mlp@2=b2:9002", "cnn@9=c9:9009", "cnn@10=c10:9010"]


def test_parse_builds_routes():
    table = RouteTable.parse(ROUTES)
    assert table.routes == {"mlp": {"1": "b1:9001", "2": "b2:9002"},
                            "cnn": {"9": "c9:9009", "10": "c10:9010"}}
    assert sorted(table.targets()) == [("cnn", "10", "c10:9010"), ("cnn", "9", "c9:9009"),
                                       ("mlp", "1", "b1:9001"), ("mlp", "2", "b2:9002")]


@pytest.mark.parametrize("defaults, expected", [
    pytest.param([], {"mlp": "2", "cnn": "10"}, id="highest-numerically"),
    pytest.param(["cnn=9"], {"mlp": "2", "cnn": "9"}, id="explicit"),
    pytest.param(["mlp=1", "cnn=9"], {"mlp": "1", "cnn": "9"}, id="both-explicit"),
    pytest.param(["mlp=1", "mlp=2"], {"mlp": "2", "cnn": "10"}, id="last-wins"),
])
def test_defaults(defaults, expected):
    assert RouteTable.parse(ROUTES, defaults).defaults == expected


def test_address_may_hold_equals_and_at():
    table = RouteTable.parse(["m@3=dns:///host@x=1"])
    assert table.routes == {"m": {"3": "dns:///host@x=1"}}


@pytest.mark.parametrize("route", [
    "mlp=b1:9001",      # no version
    "mlp@1",            # no address
    "mlp@1=",           # empty address
    "@1=b1:9001",       # empty model
    "mlp@=b1:9001",     # empty version
    "",
])
def test_bad_route_syntax(route):
    with pytest.raises(InvalidArgument) as caught:
        RouteTable.parse([route])
    assert caught.value.message == (f"route '{route}' is not MODEL@VERSION=HOST:PORT "
                                    "(VERSION a number)")


@pytest.mark.parametrize("default", ["mlp=3", "rnn=1", "mlp", "mlp@1", "=1"])
def test_unknown_default(default):
    with pytest.raises(InvalidArgument) as caught:
        RouteTable.parse(ROUTES, [default])
    assert caught.value.message == f"default version '{default}' names no route"


def test_non_numeric_version_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="VERSION a number"):
        RouteTable.parse(["mlp@latest=b1:9001"])


@pytest.mark.parametrize("model, requested, version", [
    ("mlp", "", "2"),
    ("mlp", "1", "1"),
    ("mlp", "2", "2"),
    ("cnn", "", "10"),
    ("cnn", "9", "9"),
])
def test_resolve(model, requested, version):
    assert RouteTable.parse(ROUTES).resolve(model, requested) == version


def test_resolve_uses_explicit_default():
    assert RouteTable.parse(ROUTES, ["mlp=1"]).resolve("mlp", "") == "1"


@pytest.mark.parametrize("model, requested, message", [
    ("rnn", "", "unknown model 'rnn'"),
    ("rnn", "1", "unknown model 'rnn'"),
    ("mlp", "3", "model 'mlp' has no version '3' (served: 1, 2)"),
    ("mlp", "01", "model 'mlp' has no version '01' (served: 1, 2)"),
    ("cnn", "8", "model 'cnn' has no version '8' (served: 9, 10)"),
])
def test_resolve_not_found(model, requested, message):
    with pytest.raises(NotFound) as caught:
        RouteTable.parse(ROUTES).resolve(model, requested)
    assert caught.value.message == message
