"""Python's garbage collector and glibc's allocator, set for a long-running service.

Python's cyclic collector runs a young collection every 700 net allocations of container
objects, and from time to time a full one that walks every object in the process. A
service's heap is mostly what its start built (modules, protobuf descriptors, its
configuration, gRPC's and the metrics' objects), alive until it stops; walking it finds
nothing to free. Measured on the ingress of `meshserve up` at concurrency 32: 45-65 young
collections a second (0.3 ms each) and a full one every 2-3 s (25-35 ms, during which no request
moves), 3-4 % of its CPU in all.

`settle()`, called once the service serves, collects what its start left behind, freezes
the rest out of every later collection (`gc.freeze`), and runs a young collection every
5,000 net allocations instead of 700: the same ingress then spends ~0.4 % of its CPU there, in
pauses of ~1 ms. Cycles made while serving are collected as before, only less often. A frozen
object is still freed when its last reference goes, but never as part of a garbage cycle: a
policy, key set or certificate reloaded later can leave its first copy behind, once.

`keep_freed_memory()`, called by every service as it starts (and by the in-process model
measurements of `meshserve bench`), keeps glibc's allocator from giving back the memory of
large blocks that come and go: a batch's tensors, a large message. glibc serves a block of
128 KiB or more with its own mapping at first, raises that bound to the size of each such
block freed (up to 32 MiB), and gives the top of its heap back to the kernel whenever more
than twice that bound is free there. Which of those a process's blocks meet depends on the
order of its earlier allocations, so one process of the same model runs every batch from
memory it already holds while another maps and unmaps its activations at each batch and
faults fresh zeroed pages in (the demo cnn at batch 4, one thread, six fresh processes:
1,248-1,504 faults a batch and 1,472-1,541 µs of CPU a row in three, 0-8 and 1,059-1,072 µs
in the others; the router of `up` at cnn c=8, 1 to 19 faults a request). With both bounds
fixed, blocks under 32 MiB come from the heap and the heap keeps up to 128 MiB free at its
top: six processes of six ran the cnn without faults, at 1,008-1,092 µs a row.
"""

import ctypes
import gc
import logging

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 5_000


def settle(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collect, freeze what is left, and run young collections every `young_threshold`."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)


# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own highest bound (64-bit)
TRIM_THRESHOLD = 128 << 20


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD,
                      trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's bounds (see the module's doc); False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return False
    kept = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not kept:
        log.warning("could not set the allocator's bounds (mallopt)")
    return kept
