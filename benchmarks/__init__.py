"""pytest-benchmark micro-benchmarks of meshserve's hot path (run: `pytest benchmarks`)."""
