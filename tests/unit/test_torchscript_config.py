"""config.pbtxt read as Triton's PyTorch (libtorch) backend reads it: which argument each
input is, which result each output is, and what the parameters set."""

import pytest

from meshserve.common.errors import FailedPrecondition
from meshserve.compute.torchscript_config import (
    Settings,
    input_positions,
    named_index,
    output_positions,
    settings_of,
)


@pytest.mark.parametrize(("name", "index"), [
    ("INPUT__0", 0), ("OUTPUT__12", 12), ("x__3", 3), ("a__b__1", None), ("INPUT_0", None),
    ("INPUT__", None), ("INPUT__-1", None), ("INPUT__١", None)])
def test_a_named_index_is_all_digits_after_the_first_double_underscore(name, index):
    assert named_index(name) == index


@pytest.mark.parametrize(("names", "positions"), [
    (["b", "a"], [1, 0]),  # forward's argument names
    (["INPUT__1", "INPUT__0"], [1, 0]),  # <name>__<index>
    (["a", "INPUT__1"], [0, 1]),  # neither throughout: config order
    (["first", "second"], [0, 1]),
])
def test_inputs_follow_the_first_convention_all_of_them_follow(names, positions):
    assert input_positions(names, ["a", "b"]) == positions


def test_outputs_are_results_by_index_only_when_every_name_has_one():
    assert output_positions(["OUTPUT__2", "OUTPUT__0"]) == [2, 0]
    assert output_positions(["OUTPUT__2", "logits"]) == [0, 1]


def test_no_parameters_is_triton_default():
    assert settings_of({}) == Settings()
    assert not Settings().per_batch


def test_parameters_set_what_triton_s_backend_sets():
    settings = settings_of({
        "INFERENCE_MODE": "Off", "DISABLE_OPTIMIZED_EXECUTION": "TRUE", "DISABLE_CUDNN": "1",
        "ENABLE_CACHE_CLEANING": "on", "ENABLE_JIT_PROFILING": "false",
        "ENABLE_TENSOR_FUSER": "0", "INTRA_OP_THREAD_COUNT": "4", "INTER_OP_THREAD_COUNT": "-1",
        "ENABLE_WEIGHT_SHARING": "true", "ENABLE_NVFUSER": "anything", "artifact_digest": "ab"})
    assert settings == Settings(
        inference_mode=False, optimized_execution=False, cudnn=False, cache_cleaning=True,
        jit={"ENABLE_JIT_PROFILING": False, "ENABLE_TENSOR_FUSER": False},
        intra_op_threads=4, inter_op_threads=0,
        not_applied=("ENABLE_WEIGHT_SHARING", "ENABLE_NVFUSER"))
    assert settings.per_batch


@pytest.mark.parametrize(("key", "value"), [("ENABLE_CACHE_CLEANING", ""),
                                            ("ENABLE_WEIGHT_SHARING", "yes"),
                                            ("INTER_OP_THREAD_COUNT", "1.5")])
def test_a_value_a_parameter_does_not_take_is_refused_naming_it(key, value):
    with pytest.raises(FailedPrecondition) as info:
        settings_of({key: value})
    assert info.value.message.startswith(f"parameter {key} is {value!r}; it takes ")
