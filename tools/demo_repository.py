"""The demo model repository `meshserve up` serves by default: TorchScript `mlp` and `cnn`
(`meshserve.tools.demo_models`), and one model per other backend plus an ensemble
(`meshserve.tools.demo_pipeline`)."""

from __future__ import annotations

from pathlib import Path

from meshserve.tools.demo_models import write_torchscript_models
from meshserve.tools.demo_pipeline import write_pipeline_models


def write_demo_repository(path: Path | str) -> None:
    """Write the demo models into the repository at `path`.

    Pieces already present and complete (a config.pbtxt with the expected text, a model
    file per version) are left unchanged; missing or different ones are (re)written.
    """
    path = Path(path)
    write_torchscript_models(path)
    write_pipeline_models(path)
