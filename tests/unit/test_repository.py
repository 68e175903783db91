import logging
import re
from pathlib import Path

import pytest

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.common.model_files import version_dirs
from meshserve.common.repository import (
    ModelEntry,
    ModelRepository,
    artifact_filename,
    instance_count,
    kind_of,
    parse_config,
)
from meshserve.protocol import model_config_pb2 as mc

TRITON_CONFIG = """
name: "densenet"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
# Sections meshserve does not define.
optimization {
  execution_accelerators {
    gpu_execution_accelerator : [
      { name : "tensorrt" parameters { key: "precision_mode" value: "FP16" } }
    ]
  }
}
model_repository_agents {
  agents [
    {
      name: "checksum"
      parameters [ { key: "MD5:model.pt" value: "d41d8cd98f00b204e9800998ecf8427e" } ]
    }
  ]
}
instance_group [
  { count: 2 kind: KIND_GPU secondary_devices [ { kind: KIND_NVDLA device_id: 0 } ] }
]
dynamic_batching { max_queue_delay_microseconds: 100 }
"""

MINIMAL = """
input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 2 ] }
"""


def test_triton_config_with_unknown_sections(caplog):
    with caplog.at_level(logging.WARNING, logger="meshserve.common.config_text"):
        config = parse_config(TRITON_CONFIG, "/repo/densenet/config.pbtxt", "densenet")
    assert config.name == "densenet"
    assert config.platform == "pytorch_libtorch"
    assert config.max_batch_size == 8
    assert list(config.input[0].dims) == [3, 224, 224]
    assert config.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert config.output[0].label_filename == "labels.txt"
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "/repo/densenet/config.pbtxt" in message
    for field in ("optimization", "model_repository_agents", "secondary_devices"):
        assert f'no field named "{field}"' in message


def test_defaults_name_and_platform(caplog):
    with caplog.at_level(logging.WARNING):
        config = parse_config(MINIMAL, "m/config.pbtxt", "m")
    assert config.name == "m"
    assert config.platform == "pytorch_libtorch"
    assert not caplog.records


def test_backend_pytorch_accepted():
    config = parse_config('backend: "pytorch"\n' + MINIMAL, "m/config.pbtxt", "m")
    assert config.backend == "pytorch"
    assert config.platform == ""


@pytest.mark.parametrize(("groups", "count"), [
    ("", 1),
    ("instance_group [ { kind: KIND_CPU count: 2 } ]", 2),
    ("instance_group [ { kind: KIND_AUTO } ]", 1),
    ("instance_group [ { count: 2 }, { kind: KIND_GPU count: 3 gpus: [ 0 ] } ]", 5),
])
def test_instance_count(groups, count):
    assert instance_count(parse_config(MINIMAL + groups, "m/config.pbtxt", "m")) == count


def test_syntax_error_names_file():
    text = MINIMAL + "max_batch_size: 4\ninput { name: 'z' data_type: TYPE_FP32 "
    with pytest.raises(InvalidArgument) as info:
        parse_config(text, "/repo/broken/config.pbtxt", "broken")
    assert "/repo/broken/config.pbtxt" in info.value.message
    assert "cannot parse" in info.value.message


def test_bad_enum_value_is_an_error():
    text = MINIMAL.replace("TYPE_FP32", "TYPE_FLOAT32", 1)
    with pytest.raises(InvalidArgument, match=r"bad/config\.pbtxt.*TYPE_FLOAT32"):
        parse_config(text, "bad/config.pbtxt", "bad")


def test_unsupported_platform():
    text = 'platform: "tensorflow_savedmodel"\n' + MINIMAL
    with pytest.raises(FailedPrecondition,
                       match="platform 'tensorflow_savedmodel' is not supported; meshserve "
                             'serves platform "pytorch_libtorch", platform "onnxruntime_onnx", '
                             'backend "python", platform "ensemble"'):
        parse_config(text, "m/config.pbtxt", "m")
    with pytest.raises(FailedPrecondition, match="backend 'tensorrt'"):
        parse_config('backend: "tensorrt"\n' + MINIMAL, "m/config.pbtxt", "m")
    with pytest.raises(FailedPrecondition, match="name different runtimes"):
        parse_config('platform: "onnxruntime_onnx"\nbackend: "python"\n' + MINIMAL,
                     "m/config.pbtxt", "m")


@pytest.mark.parametrize(("header", "kind", "platform", "filename"), [
    ("", "torchscript", "pytorch_libtorch", "model.pt"),
    ('backend: "pytorch"', "torchscript", "", "model.pt"),
    ('platform: "onnxruntime_onnx"', "onnx", "onnxruntime_onnx", "model.onnx"),
    ('backend: "onnxruntime"', "onnx", "onnxruntime_onnx", "model.onnx"),
    ('backend: "python"', "python", "", "model.py"),
    ('backend: "python"\ndefault_model_filename: "net.py"', "python", "", "net.py"),
])
def test_kinds_are_completed_as_triton_does(header, kind, platform, filename):
    config = parse_config(header + "\n" + MINIMAL, "m/config.pbtxt", "m")
    assert kind_of(config).name == kind
    assert config.platform == platform
    assert artifact_filename(config) == filename


def test_an_onnx_config_may_leave_out_inputs_and_outputs():
    config = parse_config('platform: "onnxruntime_onnx"', "m/config.pbtxt", "m")
    assert not config.input and not config.output
    with pytest.raises(InvalidArgument, match="declares no input"):
        parse_config('backend: "python"', "m/config.pbtxt", "m")


def test_name_mismatch():
    with pytest.raises(InvalidArgument, match="'other'.*'m'"):
        parse_config('name: "other"\n' + MINIMAL, "m/config.pbtxt", "m")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('output { name: "y" data_type: TYPE_FP32 dims: [ 2 ] }', "no input"),
        ('input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }', "no output"),
        (MINIMAL.replace("TYPE_FP32", "TYPE_INVALID", 1), "'x' has no valid data_type"),
        (MINIMAL.replace("data_type: TYPE_FP32 dims: [ 2 ]", "dims: [ 2 ]"), "'y' has no valid"),
        ("max_batch_size: -1\n" + MINIMAL, "max_batch_size"),
        (MINIMAL.replace("[ 4 ]", "[ 0 ]"), "dimension 0"),
        ("version_policy { specific { versions: [ 0 ] } }\n" + MINIMAL, "positive"),
    ],
)
def test_validation(text, match):
    with pytest.raises(InvalidArgument, match=match):
        parse_config(text, "m/config.pbtxt", "m")


def make_model(repo: Path, name: str, versions, policy: str = "") -> None:
    model = repo / name
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(f'name: "{name}"\n{policy}\n{MINIMAL}')
    for v in versions:
        (model / str(v)).mkdir()
        (model / str(v) / "model.pt").write_bytes(b"not really torchscript")


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", ("3",)),
        ("version_policy: { latest { num_versions: 2 } }", ("2", "3")),
        ("version_policy: { latest { num_versions: 9 } }", ("1", "2", "3")),
        ("version_policy: { all { } }", ("1", "2", "3")),
        ("version_policy: { specific { versions: [ 1, 3 ] } }", ("1", "3")),
    ],
)
def test_version_policy(tmp_path, policy, served):
    make_model(tmp_path, "mlp", [1, 2, 3], policy)
    repo = ModelRepository.load(tmp_path)
    entry = repo.get("mlp")
    assert isinstance(entry, ModelEntry)
    assert entry.versions == served
    assert entry.default_version == served[-1]
    assert entry.path == tmp_path / "mlp"


def test_versions_sort_numerically(tmp_path):
    make_model(tmp_path, "m", [2, 10, 9], "version_policy: { all { } }")
    (tmp_path / "m" / "notes").mkdir()
    assert ModelRepository.load(tmp_path).get("m").versions == ("2", "9", "10")


def test_specific_missing_versions(tmp_path, caplog):
    make_model(tmp_path, "m", [1, 2], "version_policy: { specific { versions: [ 2, 5 ] } }")
    with caplog.at_level(logging.WARNING):
        assert ModelRepository.load(tmp_path).get("m").versions == ("2",)
    assert "5" in caplog.text

    make_model(tmp_path / "other", "n", [1], "version_policy: { specific { versions: [ 4 ] } }")
    make_model(tmp_path / "other", "fine", [1])
    other = ModelRepository.load(tmp_path / "other")
    assert set(other.models) == {"fine"}
    assert other.refused["n"].startswith("model 'n': none of the versions its version_policy")
    with pytest.raises(NotFound, match="model 'n' is not served: refused at load: model 'n'"):
        other.get("n")


def test_version_lookup(tmp_path):
    make_model(tmp_path, "mlp", [1, 2, 3], "version_policy: { specific { versions: [ 1, 2 ] } }")
    repo = ModelRepository.load(tmp_path)
    assert repo.version("mlp", "") == "2"
    assert repo.version("mlp", "1") == "1"
    with pytest.raises(NotFound) as info:
        repo.version("mlp", "7")
    assert info.value.message == "model 'mlp' has no version '7' (served: 1, 2)"
    with pytest.raises(NotFound, match="no version '3'"):
        repo.version("mlp", "3")
    assert [repo.version("mlp", v) for v in ("02", " 1 ", "0" * 5000 + "2")] == ["2", "1", "2"]
    with pytest.raises(NotFound, match="no version '9999"):  # past int()'s 4,300 digits
        repo.version("mlp", "9" * 5000)
    assert repo.artifact("mlp", "") == tmp_path / "mlp" / "2" / "model.pt"
    assert repo.artifact("mlp", "1") == tmp_path / "mlp" / "1" / "model.pt"


def test_artifact_filename_and_missing_file(tmp_path):
    make_model(tmp_path, "m", [1, 2], 'default_model_filename: "net.pt"')
    (tmp_path / "m" / "2" / "net.pt").write_bytes(b"x")
    repo = ModelRepository.load(tmp_path)
    assert repo.artifact("m", "2") == tmp_path / "m" / "2" / "net.pt"
    (tmp_path / "m" / "2" / "net.pt").unlink()
    with pytest.raises(FailedPrecondition, match="net.pt"):
        repo.artifact("m", "")


def test_unknown_model(tmp_path):
    make_model(tmp_path, "mlp", [1])
    repo = ModelRepository.load(tmp_path)
    assert "mlp" in repo
    assert set(repo.models) == {"mlp"}
    assert repo.path == tmp_path
    with pytest.raises(NotFound) as info:
        repo.get("resnet")
    assert info.value.message == "unknown model 'resnet'"
    with pytest.raises(NotFound, match="unknown model 'resnet'"):
        repo.version("resnet", "1")


def test_directory_without_config_is_skipped(tmp_path, caplog):
    make_model(tmp_path, "mlp", [1])
    (tmp_path / "scratch" / "1").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        repo = ModelRepository.load(tmp_path)
    assert set(repo.models) == {"mlp"}
    assert "scratch" in caplog.text


def test_model_without_versions(tmp_path):
    make_model(tmp_path, "empty", [])
    assert re.match(r"model 'empty' in .*empty has no version directory",
                    ModelRepository.load(tmp_path).refused["empty"])


def test_a_broken_model_is_refused_naming_its_file_while_the_rest_load(tmp_path, caplog):
    make_model(tmp_path, "good", [1])
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "config.pbtxt").write_text("max_batch_size: oops\n")
    with caplog.at_level(logging.ERROR, logger="meshserve.common.repository"):
        repo = ModelRepository.load(tmp_path)
    assert set(repo.models) == {"good"}
    reason = repo.refused["bad"]
    assert reason.startswith(f"model 'bad': {tmp_path / 'bad' / 'config.pbtxt'}: cannot parse")
    assert f"refusing {reason}" in caplog.text


@pytest.mark.parametrize("filename", ["../other/1/model.pt", "/etc/passwd", "manifest.json"])
def test_an_artifact_named_outside_its_version_directory_is_refused(tmp_path, filename):
    make_model(tmp_path, "good", [1])
    make_model(tmp_path, "bad", [1], f'default_model_filename: "{filename}"')
    repo = ModelRepository.load(tmp_path)
    assert set(repo.models) == {"good"}
    assert repo.refused["bad"] == (
        f"model 'bad': {tmp_path / 'bad' / 'config.pbtxt'}: default_model_filename "
        f"'{filename}' must be a file name in the version directory (no '/', not "
        "manifest.json or manifest.sig)")


def test_missing_repository(tmp_path):
    with pytest.raises(FailedPrecondition, match="not a directory"):
        ModelRepository.load(tmp_path / "nope")


LABELLED = 'output { name: "y" data_type: TYPE_FP32 dims: [ 2 ] label_filename: "%s" }'


def test_labels_are_read_from_the_model_directory_or_the_model_is_refused(tmp_path):
    for name, labels in (("named", "cats.txt"), ("missing", "nope.txt"),
                         ("outside", "../named/cats.txt")):
        make_model(tmp_path, name, [1])
        config = tmp_path / name / "config.pbtxt"
        config.write_text(config.read_text().replace(
            'output { name: "y" data_type: TYPE_FP32 dims: [ 2 ] }', LABELLED % labels))
    (tmp_path / "named" / "cats.txt").write_text("tabby\nsiamese\n")
    repo = ModelRepository.load(tmp_path)
    assert repo.get("named").labels == {"y": ("tabby", "siamese")}
    assert set(repo.refused) == {"missing", "outside"}
    assert repo.refused["missing"].startswith(
        "model 'missing' output 'y': label_filename 'nope.txt' cannot be read: ")
    assert repo.refused["outside"] == ("model 'outside' output 'y': label_filename "
                                       "'../named/cats.txt' is outside the model's directory")


def test_queue_policies_are_applied_so_load_without_a_warning(tmp_path, caplog):
    make_model(tmp_path, "m", [1], "dynamic_batching { priority_levels: 2 "
               "default_priority_level: 2 "
               "default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 10 } "
               "priority_queue_policy { key: 1 value { max_queue_size: 4 } } }")
    with caplog.at_level(logging.WARNING, logger="meshserve.common.repository"):
        assert "m" in ModelRepository.load(tmp_path)
    assert caplog.messages == []


def test_a_setting_not_applied_is_named_in_a_warning(tmp_path, caplog):
    make_model(tmp_path, "m", [1])
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 4 ] }", "dims: [ 4 ] "
                                                 "allow_ragged_batch: true }", 1))
    with caplog.at_level(logging.WARNING, logger="meshserve.common.repository"):
        assert "m" in ModelRepository.load(tmp_path)
    assert caplog.messages == [
        "model 'm' input 'x': allow_ragged_batch is not applied: only requests of the same "
        "shape share a batch"]


def test_an_ensembles_max_inflight_requests_is_served_without_a_warning(tmp_path, caplog):
    make_model(tmp_path, "m", [1])
    ensemble = tmp_path / "e"
    (ensemble / "1").mkdir(parents=True)
    (ensemble / "config.pbtxt").write_text(
        'platform: "ensemble"\nmax_batch_size: 4\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'ensemble_scheduling { max_inflight_requests: 8 step [ { model_name: "m" '
        'model_version: -1 input_map { key: "x" value: "X" } '
        'output_map { key: "y" value: "Y" } } ] }\n')
    with caplog.at_level(logging.WARNING, logger="meshserve.common.repository"):
        loaded = ModelRepository.load(tmp_path)
    assert loaded.get("e").config.ensemble_scheduling.max_inflight_requests == 8
    assert caplog.messages == []  # applied by the ingress's ensemble runner


@pytest.mark.parametrize(
    ("section", "reason"),
    [
        pytest.param("dynamic_batching { priority_levels: 2 }",
                     "dynamic_batching default_priority_level 0 must be between 1 and "
                     "priority_levels 2", id="no-default-level"),
        pytest.param("dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
                     "dynamic_batching default_priority_level 3 must be between 1 and "
                     "priority_levels 2", id="default-level-past-the-last"),
        pytest.param("dynamic_batching { priority_levels: 2 default_priority_level: 1 "
                     "priority_queue_policy { key: 3 value { max_queue_size: 1 } } }",
                     "dynamic_batching priority_queue_policy for priority level 3 is outside "
                     "1 to priority_levels 2", id="queue-policy-of-no-level"),
        pytest.param("dynamic_batching { priority_queue_policy { key: 1 value { } } }",
                     "dynamic_batching priority_queue_policy for priority level 1 is outside "
                     "1 to priority_levels 0", id="queue-policy-without-levels"),
        pytest.param("dynamic_batching { preserve_ordering: true priority_levels: 2 "
                     "default_priority_level: 1 }",
                     "dynamic_batching preserve_ordering allows one priority level, not "
                     "priority_levels 2", id="ordering-with-levels"),
        pytest.param("dynamic_batching { preserve_ordering: true default_queue_policy { "
                     "timeout_action: DELAY default_timeout_microseconds: 5 } }",
                     "dynamic_batching preserve_ordering does not allow a queue policy whose "
                     "timeout_action is DELAY", id="ordering-with-delay"),
        pytest.param("sequence_batching { max_sequence_idle_microseconds: 5000000 "
                     "control_input [ { name: \"START\" control [ { kind: "
                     "CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ] }",
                     "sequence_batching is not supported: meshserve serves stateless models "
                     "only (its batcher would mix the requests of different sequences and "
                     "give the model no sequence controls or state)", id="sequence-batching"),
        pytest.param("batch_input [ { kind: BATCH_ACCUMULATED_ELEMENT_COUNT target_name: "
                     "\"INDEX\" data_type: TYPE_FP32 source_input: \"x\" } ]",
                     "batch_input is not supported: ragged batching: meshserve makes no batch "
                     "input tensors for the model", id="batch-input"),
    ],
)
def test_configs_triton_refuses_or_meshserve_cannot_serve_are_refused(tmp_path, section,
                                                                      reason):
    """The model is refused at load, naming the setting (the rest of the repository loads);
    a stateful or ragged model was served as if stateless, its sections skipped."""
    make_model(tmp_path, "good", [1])
    make_model(tmp_path, "m", [1], "max_batch_size: 4\n" + section)
    repo = ModelRepository.load(tmp_path)
    assert set(repo.models) == {"good"}
    assert repo.refused["m"] == f"model 'm': {tmp_path / 'm' / 'config.pbtxt'}: {reason}"


def test_a_preferred_batch_size_past_max_batch_size_refuses_that_model_only(tmp_path):
    make_model(tmp_path, "good", [1])
    make_model(tmp_path, "pref", [1], "max_batch_size: 4\n"
                                      "dynamic_batching { preferred_batch_size: [ 2, 8 ] }")
    repo = ModelRepository.load(tmp_path)
    assert set(repo.models) == {"good"}
    assert repo.refused["pref"] == (
        f"model 'pref': {tmp_path / 'pref' / 'config.pbtxt'}: dynamic_batching "
        "preferred_batch_size 8 must be between 1 and max_batch_size 4")


def test_the_loader_and_the_signer_take_the_same_version_directories(tmp_path):
    make_model(tmp_path, "m", [0, 1, "01", 12], "version_policy: { all { } }")
    assert ModelRepository.load(tmp_path).get("m").versions == ("1", "12")
    assert [version for _, version, _ in version_dirs(tmp_path)] == ["1", "12"]


def test_only_python_models_and_ensembles_are_decoupled_and_their_answers_are_not_cached():
    decoupled = "model_transaction_policy { decoupled: true }\n"
    config = parse_config('backend: "python"\n' + decoupled + MINIMAL, "m/config.pbtxt", "m")
    assert config.model_transaction_policy.decoupled
    with pytest.raises(FailedPrecondition, match=r"m/config\.pbtxt: model_transaction_policy "
                       r"decoupled is served for Python models \(backend \"python\"\) and "
                       "ensembles only; a torchscript model answers each request once"):
        parse_config(decoupled + MINIMAL, "m/config.pbtxt", "m")
    with pytest.raises(InvalidArgument, match="response_cache cannot be enabled for a "
                                              "decoupled model"):
        parse_config('backend: "python"\nresponse_cache { enable: true }\n' + decoupled
                     + MINIMAL, "m/config.pbtxt", "m")
