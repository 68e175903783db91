"""Envoy bootstrap configurations of the Envoy mesh baseline, read back as Envoy's own protos
(the xDS classes of xds-protos), and the admin interface's answers."""

from pathlib import Path

import pytest
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from meshserve.tools import envoy_mesh

CERTS = envoy_mesh.MeshCerts(Path("/tls"))
GATEWAY_ID = "spiffe://meshserve.local/envoy-gateway"
SIDECAR_ID = "spiffe://meshserve.local/envoy-sidecar"


def _bootstrap(config: dict) -> Bootstrap:
    return json_format.ParseDict(config, Bootstrap())  # fails on any unknown field or type


def _unpack(any_message, message):
    assert any_message.Unpack(message), any_message.type_url
    return message


def _parts(bootstrap: Bootstrap):
    """(listener, its TLS context, its connection manager, the one cluster)."""
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (cluster,) = bootstrap.static_resources.clusters
    tls = _unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext())
    manager = _unpack(chain.filters[0].typed_config, hcm_pb2.HttpConnectionManager())
    return listener, tls, manager, cluster


def _endpoint(cluster) -> str:
    (group,) = cluster.load_assignment.endpoints
    (endpoint,) = group.lb_endpoints
    socket = endpoint.endpoint.address.socket_address
    return f"{socket.address}:{socket.port_value}"


def _peer_ids(context) -> list[str]:
    return [m.matcher.exact for m in context.validation_context.match_typed_subject_alt_names]


def _assert_grpc_proxy(listener, manager, cluster, name: str, upstream: str) -> None:
    assert listener.name == name
    assert listener.address.socket_address.address == "127.0.0.1"
    assert listener.address.socket_address.port_value == 0  # the kernel picks
    assert manager.codec_type == hcm_pb2.HttpConnectionManager.HTTP2
    (host,) = manager.route_config.virtual_hosts
    (route,) = host.routes
    assert route.route.cluster == cluster.name
    assert route.route.HasField("timeout") and route.route.timeout.ToSeconds() == 0
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert _endpoint(cluster) == upstream
    options = _unpack(
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"],
        http_protocol_options_pb2.HttpProtocolOptions())
    assert options.explicit_http_config.HasField("http2_protocol_options")
    (limits,) = cluster.circuit_breakers.thresholds
    assert limits.max_requests.value == limits.max_pending_requests.value == 2**32 - 1


def test_gateway_terminates_tls_and_opens_mutual_tls_to_the_sidecar():
    bootstrap = _bootstrap(envoy_mesh.gateway_config(CERTS, "127.0.0.1:7001"))
    listener, tls, manager, cluster = _parts(bootstrap)
    _assert_grpc_proxy(listener, manager, cluster, "envoy-gateway", "127.0.0.1:7001")
    assert not tls.require_client_certificate.value
    (own,) = tls.common_tls_context.tls_certificates
    assert own.certificate_chain.filename == "/tls/envoy-gateway.crt"
    assert own.private_key.filename == "/tls/envoy-gateway.key"
    assert list(tls.common_tls_context.alpn_protocols) == ["h2"]
    upstream = _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext())
    assert upstream.sni == "envoy-sidecar"
    (client,) = upstream.common_tls_context.tls_certificates
    assert client.certificate_chain.filename == "/tls/envoy-gateway.crt"
    assert upstream.common_tls_context.validation_context.trusted_ca.filename == "/tls/ca.crt"
    assert _peer_ids(upstream.common_tls_context) == [SIDECAR_ID]
    assert bootstrap.admin.address.socket_address.port_value == 0


def test_sidecar_admits_only_the_gateway_and_forwards_plaintext_with_its_identity():
    listener, tls, manager, cluster = _parts(
        _bootstrap(envoy_mesh.sidecar_config(CERTS, "127.0.0.1:8001")))
    _assert_grpc_proxy(listener, manager, cluster, "envoy-sidecar", "127.0.0.1:8001")
    assert tls.require_client_certificate.value
    (own,) = tls.common_tls_context.tls_certificates
    assert own.certificate_chain.filename == "/tls/envoy-sidecar.crt"
    assert tls.common_tls_context.validation_context.trusted_ca.filename == "/tls/ca.crt"
    assert _peer_ids(tls.common_tls_context) == [GATEWAY_ID]
    assert not cluster.HasField("transport_socket")  # to the server on loopback: h2c
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.APPEND_FORWARD
    assert manager.set_current_client_cert_details.uri


@pytest.mark.parametrize("address", ["7001", "127.0.0.1:", "127.0.0.1:x"])
def test_upstream_must_be_host_and_port(address):
    with pytest.raises(ValueError, match="HOST:PORT"):
        envoy_mesh.sidecar_config(CERTS, address)


def test_listener_address_reads_the_bound_port():
    listeners = {"listener_statuses": [
        {"name": "other", "local_address": {"socket_address": {"address": "127.0.0.1",
                                                                "port_value": 1}}},
        {"name": "envoy-gateway", "local_address": {"socket_address": {"address": "127.0.0.1",
                                                                        "port_value": 40123}}},
    ]}
    assert envoy_mesh.listener_address(listeners, "envoy-gateway") == "127.0.0.1:40123"
    with pytest.raises(KeyError, match="envoy-sidecar"):
        envoy_mesh.listener_address(listeners, "envoy-sidecar")


def test_parse_stats_keeps_numbers_only():
    text = ("listener.envoy-sidecar.ssl.fail_verify_san: 2\n"
            "cluster.app.upstream_rq_total: 0\n"
            "cluster.app.upstream_rq_time: P0(nan,1.0) P25(nan,1.1)\n"
            "server.version: 9e55\n")
    assert envoy_mesh.parse_stats(text) == {"listener.envoy-sidecar.ssl.fail_verify_san": 2,
                                            "cluster.app.upstream_rq_total": 0}
