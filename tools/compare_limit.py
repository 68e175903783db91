"""The in-process limit of `meshserve bench compare`: a TorchScript model called directly at
each batch size, with nothing between the caller and torch."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
_MAX_LIMIT_CALLS = 1_000_000


def measure_limit(model_file: Path, input_dims: Iterable[tuple[int, ...]],
                  batch_sizes: Iterable[int] = BATCH_SIZES, duration_s: float = 2.0,
                  threads: int = 1, input_dtype: Any = np.float32) -> dict[int, dict]:
    """Rows/s and per-call latency of the TorchScript model at each batch size, in-process.

    One input per entry of `input_dims` (dims without the batch). Each batch size runs three
    calls of warm-up, then calls for `duration_s` (bounded by a call count as well). The torch
    thread count is set to `threads` for the measurement and restored after.
    """
    import warnings

    import torch

    from meshserve.common import heap

    heap.keep_freed_memory()  # as compute runs its model
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            model = torch.jit.load(str(model_file), map_location="cpu").eval()
        dims = [tuple(d) for d in input_dims]
        results: dict[int, dict] = {}
        with torch.inference_mode():
            for batch in batch_sizes:
                inputs = [torch.from_numpy(rng.random((batch, *d)).astype(input_dtype))
                          for d in dims]
                for _ in range(3):
                    model(*inputs)
                latencies = []
                start = time.perf_counter()
                end = start + duration_s
                done = start
                while done < end and len(latencies) < _MAX_LIMIT_CALLS:
                    sent = time.perf_counter()
                    model(*inputs)
                    done = time.perf_counter()
                    latencies.append(done - sent)
                elapsed = max(done - start, 1e-9)
                values = np.sort(np.asarray(latencies)) * 1000.0
                results[batch] = {
                    "calls": len(latencies),
                    "rows_per_s": round(len(latencies) * batch / elapsed, 2),
                    "p50_ms": round(float(values[(len(values) - 1) // 2]), 4),
                }
        return results
    finally:
        torch.set_num_threads(previous)
