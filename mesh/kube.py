"""Endpoints from Kubernetes: watch the batchers' EndpointSlices and mirror them into the
control plane. The translation is pure (`endpointslices`); this module is only the watch."""

import asyncio
import logging
import threading

from meshserve.mesh.control import ControlPlane
from meshserve.mesh.endpointslices import endpoints_from_slices, watch_selector

log = logging.getLogger(__name__)
ACTOR = "kubernetes"


def _stream(namespace: str, deliver) -> None:
    """Blocking: list and watch slices in `namespace`, delivering every new set of them."""
    from kubernetes import client, config, watch

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.DiscoveryV1Api()
    slices: dict[str, object] = {}
    while True:
        listed = api.list_namespaced_endpoint_slice(namespace, label_selector=watch_selector())
        slices = {s.metadata.name: s for s in listed.items}
        deliver(list(slices.values()))
        stream = watch.Watch().stream(
            api.list_namespaced_endpoint_slice, namespace, label_selector=watch_selector(),
            resource_version=listed.metadata.resource_version, timeout_seconds=300)
        for event in stream:
            item = event["object"]
            if event["type"] == "DELETED":
                slices.pop(item.metadata.name, None)
            else:
                slices[item.metadata.name] = item
            deliver(list(slices.values()))


async def follow_endpoint_slices(control: ControlPlane, namespace: str) -> None:
    """Keep the control plane's endpoints equal to the ready batchers Kubernetes lists."""
    loop = asyncio.get_running_loop()

    def deliver(slices) -> None:
        endpoints = endpoints_from_slices(slices)
        loop.call_soon_threadsafe(control.replace_endpoints, endpoints, ACTOR)

    thread = threading.Thread(target=_stream, args=(namespace, deliver), daemon=True,
                              name="endpointslice-watch")
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(1.0)
    log.error("the EndpointSlice watch stopped; endpoints are no longer updated")
