"""Session fixtures of the micro-benchmarks.

`pytest benchmarks` picks up pyproject's `[tool.pytest.ini_options]` (rootdir is the
repository root); its `asyncio_mode = "auto"` only touches `async def` tests and fixtures,
and there are none here: code that needs an event loop drives its own loop inside a plain
benchmark function, one `run_until_complete` per round.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchmarks.inputs import demo_model_config
from meshserve.protocol.model_config_pb2 import ModelConfig
from meshserve.tools.demo_repository import write_demo_repository

if importlib.util.find_spec("pytest_benchmark") is None:
    raise pytest.UsageError("the benchmarks need pytest-benchmark: "
                            ".venv/bin/pip install pytest-benchmark==5.3.1")


@pytest.fixture(scope="session")
def mlp_config() -> ModelConfig:
    return demo_model_config("mlp")


@pytest.fixture(scope="session")
def cnn_config() -> ModelConfig:
    return demo_model_config("cnn")


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model repository, written once per session."""
    path = tmp_path_factory.mktemp("demo-repository")
    write_demo_repository(path)
    return path
