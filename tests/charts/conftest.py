import pytest

from meshserve.tools.helm import ensure_helm
from tests.charts.chartlib import Helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    try:
        binary = ensure_helm()
    except RuntimeError as error:  # offline and not cached yet
        pytest.skip(f"no helm: {error}")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))
