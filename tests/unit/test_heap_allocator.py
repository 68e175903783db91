"""`heap.keep_freed_memory()`: a block the process freed is used again without faulting fresh
pages in. Each case runs in a fresh interpreter, whose allocator starts as glibc sets it, so
this process's own allocator is left alone."""

import subprocess
import sys

import pytest

# Allocates and frees an 8 MiB block twice; prints the minor page faults of the second time.
SECOND_TIME_FAULTS = """
import resource, sys
from meshserve.common import heap
if sys.argv[1] == "kept":
    assert heap.keep_freed_memory()
block = bytearray(8 << 20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(8 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (8 << 20) // 4096


def second_time_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SECOND_TIME_FAULTS, mode], capture_output=True,
                          text=True, timeout=60, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_block_is_used_again_without_faults():
    # glibc's default maps a block this large on its own and unmaps it when freed, so the
    # second allocation faults every page in again.
    assert second_time_faults("default") >= PAGES // 2
    assert second_time_faults("kept") < PAGES // 20
