"""xDS resources built from the mesh state: pure functions, one per resource kind.

For each model: a client Listener named after the model (the router dials `xds:///<model>`),
a RouteConfiguration (first a pin per version on header `x-model-version`, then the weighted
split), one EDS Cluster per version, and its ClusterLoadAssignment of batcher endpoints.
"""

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshserve.common.version_pin import PIN_HEADER
from meshserve.mesh.policy import Endpoint, MeshState, TrafficPolicy

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINTS)

MAX_REQUESTS = 1024  # circuit breaker: groups in flight per version
# On UNAVAILABLE (the group never reached a batcher, or it refused it as not ready) and on
# CANCELLED (gRPC core's answer to a call that reached a batcher just as it began to shut
# down; inference is a pure function of the group, so a second attempt is safe): one retry,
# after a jittered 25-250 ms back-off, on another batcher of the version when it has one, so
# a failing version sees at most twice its traffic; outlier detection below ejects a failing
# batcher, max_requests caps the total.
RETRY_ON = "unavailable,cancelled"
RETRIES = 1


def cluster_name(model: str, version: str) -> str:
    return f"{model}-v{version}"


def route_name(model: str) -> str:
    return f"{model}-routes"


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def listener(model: str) -> listener_pb2.Listener:
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    manager = hcm.HttpConnectionManager(
        rds=hcm.Rds(config_source=_ads(), route_config_name=route_name(model)),
        http_filters=[hcm.HttpFilter(name="envoy.filters.http.router", typed_config=router)])
    packed = any_pb2.Any()
    packed.Pack(manager)
    return listener_pb2.Listener(name=model,
                                 api_listener=api_listener_pb2.ApiListener(api_listener=packed))


def _retry() -> route_components_pb2.RetryPolicy:
    return route_components_pb2.RetryPolicy(
        retry_on=RETRY_ON, num_retries=wrappers_pb2.UInt32Value(value=RETRIES),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=duration_pb2.Duration(nanos=25_000_000),
            max_interval=duration_pb2.Duration(nanos=250_000_000)))


def route_configuration(policy: TrafficPolicy) -> route_pb2.RouteConfiguration:
    model = policy.model
    routes = [route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/", headers=[
            route_components_pb2.HeaderMatcher(name=PIN_HEADER, exact_match=version)]),
        route=route_components_pb2.RouteAction(cluster=cluster_name(model, version),
                                               retry_policy=_retry()))
        for version in policy.versions]
    split = route_components_pb2.WeightedCluster(clusters=[
        route_components_pb2.WeightedCluster.ClusterWeight(
            name=cluster_name(model, version), weight=wrappers_pb2.UInt32Value(value=weight))
        for version, weight in sorted(policy.weights.items()) if weight > 0])
    routes.append(route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(weighted_clusters=split, retry_policy=_retry())))
    host = route_components_pb2.VirtualHost(name=model, domains=["*"], routes=routes)
    return route_pb2.RouteConfiguration(name=route_name(model), virtual_hosts=[host])


def cluster(model: str, version: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=cluster_name(model, version), type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                max_requests=wrappers_pb2.UInt32Value(value=MAX_REQUESTS))]),
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            interval=duration_pb2.Duration(seconds=1),
            base_ejection_time=duration_pb2.Duration(seconds=10),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=50),
            failure_percentage_threshold=wrappers_pb2.UInt32Value(value=50),
            enforcing_failure_percentage=wrappers_pb2.UInt32Value(value=100),
            failure_percentage_minimum_hosts=wrappers_pb2.UInt32Value(value=2),
            failure_percentage_request_volume=wrappers_pb2.UInt32Value(value=20)))


def load_assignment(model: str, version: str, endpoints: list[Endpoint],
                    region: str = "") -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints grouped by locality; each locality has a weight, as gRPC requires.

    With `region` set, only that region's endpoints are listed: traffic never leaves it.
    """
    localities: dict[tuple[str, str], list[Endpoint]] = {}
    for endpoint in endpoints:
        if not region or endpoint.region == region:
            localities.setdefault((endpoint.region, endpoint.zone), []).append(endpoint)
    groups = []
    for (where, zone), members in sorted(localities.items()):
        lb_endpoints = []
        for endpoint in members:
            host, port = endpoint.host_port
            address = address_pb2.Address(socket_address=address_pb2.SocketAddress(
                address=host, port_value=port))
            lb_endpoints.append(endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=address),
                health_status=health_check_pb2.HEALTHY))
        groups.append(endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(region=where, zone=zone), lb_endpoints=lb_endpoints,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1)))
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(model, version),
                                              endpoints=groups)


def resources(state: MeshState) -> dict[str, dict[str, object]]:
    """Every resource for the state, by type URL and name."""
    out: dict[str, dict[str, object]] = {kind: {} for kind in TYPES}
    for model, policy in sorted(state.policies.items()):
        out[LISTENER][model] = listener(model)
        out[ROUTE][route_name(model)] = route_configuration(policy)
        for version in policy.versions:
            name = cluster_name(model, version)
            out[CLUSTER][name] = cluster(model, version)
            out[ENDPOINTS][name] = load_assignment(
                model, version, state.endpoints_of(model, version), policy.region)
    return out
