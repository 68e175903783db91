"""Services set Python's garbage collector for serving (meshserve.common.heap): under load the
ingress of `meshserve up` runs young collections a few times per thousand requests, where
Python's default settings ran about thirty (and a full collection of the whole heap every few
thousand). Counted by the collector's own statistics on the ingress's /metrics."""

import re
import urllib.request

from meshserve.tools.load import run_load
from meshserve.tools.load_spec import LoadSpec

REQUESTS = 3000
# Python's default threshold (700) ran ~33 per 1,000 mlp requests here; 5,000 runs ~2.
MOST_YOUNG_COLLECTIONS_PER_1000 = 10


def collections(port: int) -> dict[str, float]:
    """`python_gc_collections_total` by generation, from a service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {generation: float(count) for generation, count in re.findall(
        r'^python_gc_collections_total\{generation="(\d)"\} (\S+)$', text, re.MULTILINE)}


def test_the_ingress_collects_rarely_under_load(mesh):
    port = int((mesh.data_dir / "run" / "ingress.metrics-port").read_text())
    before = collections(port)
    result = run_load(LoadSpec(
        target=mesh.endpoint, model="mlp", concurrency=32, duration_s=60, warmup_s=0,
        max_requests=REQUESTS, ca=mesh.tls / "ca.crt", cert=mesh.tls / "client.crt",
        key=mesh.tls / "client.key", server_name="ingress"))
    after = collections(port)
    assert (result["requests"], result["errors"]) == (REQUESTS, {})
    young = after["0"] - before["0"]
    assert young <= MOST_YOUNG_COLLECTIONS_PER_1000 * REQUESTS / 1000, (
        f"{young:.0f} young collections for {REQUESTS} requests")
