import warnings

import pytest
import torch

from meshserve.common.repository import ModelRepository
from meshserve.protocol import model_config_pb2 as mc
from meshserve.tools.demo_models import DEMO_MODELS, build_model
from meshserve.tools.demo_repository import write_demo_repository

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*:DeprecationWarning")

INPUT_SHAPES = {"mlp": (4, 256), "cnn": (2, 3, 64, 64)}


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path)).eval()


def run(repo: ModelRepository, name: str, version: str, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return load(repo.artifact(name, version))(x)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(shape, generator=generator) for name, shape in INPUT_SHAPES.items()}


def test_weights_are_deterministic():
    rng_before = torch.random.get_rng_state()
    for name in DEMO_MODELS:
        a, b = build_model(name, 1).state_dict(), build_model(name, 1).state_dict()
        c = build_model(name, 2).state_dict()
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_demo_repository(tmp_path_factory, inputs):
    first = tmp_path_factory.mktemp("repo1")
    write_demo_repository(first)
    repo = ModelRepository.load(first)
    assert set(DEMO_MODELS) == {"mlp", "cnn"}
    assert set(repo.models) == {*DEMO_MODELS, "mlp_onnx", "preprocess", "postprocess",
                                "classify"}
    assert not repo.refused

    outputs = {}
    for name in DEMO_MODELS:
        entry = repo.get(name)
        assert entry.versions == ("1", "2")
        assert entry.default_version == "2"
        config = entry.config
        assert config.platform == "pytorch_libtorch"
        assert config.max_batch_size == 32
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds == 0
        assert [t.name for t in config.input] == ["INPUT__0"]
        assert [t.name for t in config.output] == ["OUTPUT__0"]
        assert config.input[0].data_type == config.output[0].data_type == mc.TYPE_FP32
        assert list(config.input[0].dims) == list(INPUT_SHAPES[name][1:])
        assert list(config.output[0].dims) == [10]
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO
        assert config.instance_group[0].count == {"mlp": 1, "cnn": 2}[name]

        x = inputs[name]
        v1, v2 = run(repo, name, "1", x), run(repo, name, "2", x)
        assert v1.shape == v2.shape == (x.shape[0], 10)
        assert v1.dtype == torch.float32
        assert not torch.equal(v1, v2)
        outputs[name] = (v1, v2)

    # Writing again over a complete repository leaves the files alone.
    stamp = (first / "mlp" / "1" / "model.pt").stat().st_mtime_ns
    write_demo_repository(first)
    assert (first / "mlp" / "1" / "model.pt").stat().st_mtime_ns == stamp

    # A second repository gives the same output bytes.
    second = tmp_path_factory.mktemp("repo2")
    write_demo_repository(second)
    again = ModelRepository.load(second)
    for name in DEMO_MODELS:
        for version, expected in zip(("1", "2"), outputs[name], strict=True):
            got = run(again, name, version, inputs[name])
            assert got.numpy().tobytes() == expected.numpy().tobytes()
