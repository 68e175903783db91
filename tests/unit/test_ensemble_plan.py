"""An ensemble's plan, checked at load against the models it names."""

import pytest

from meshserve.common import ensemble_plan
from meshserve.common.repository import ModelRepository

# Two-input, one-output step models (the repository reads only their configs).
STEP = """
max_batch_size: 8
input [ {{ name: "IN" data_type: {dtype} dims: [ 4 ] }},
        {{ name: "EXTRA" data_type: TYPE_FP32 dims: [ 4 ] optional: true }} ]
output [ {{ name: "OUT" data_type: {dtype} dims: [ 4 ] }} ]
"""


def step_model(repo, name, dtype="TYPE_FP32", versions=(1,)):
    (repo / name).mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(STEP.format(dtype=dtype))
    for version in versions:
        (repo / name / str(version)).mkdir()


def ensemble(repo, name, steps: str, max_batch_size=8, outputs="RESULT"):
    (repo / name / "1").mkdir(parents=True)
    out = "".join(f'{{ name: "{o}" data_type: TYPE_FP32 dims: [ 4 ] }}' for o in
                  outputs.split(","))
    (repo / name / "config.pbtxt").write_text(
        f'platform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        f"output [ {out} ]\n"
        f"ensemble_scheduling {{ step [ {steps} ] }}\n")


def step(model, reads, writes, version=-1, extra=""):
    return (f'{{ model_name: "{model}" model_version: {version} '
            f'input_map {{ key: "IN" value: "{reads}" }} {extra}'
            f'output_map {{ key: "OUT" value: "{writes}" }} }}')


@pytest.fixture
def repo(tmp_path):
    step_model(tmp_path, "a")
    step_model(tmp_path, "b", versions=(1, 2))
    step_model(tmp_path, "ints", dtype="TYPE_INT64")
    return tmp_path


def test_a_valid_plan_runs_in_waves(repo):
    ensemble(repo, "diamond", ",".join([
        step("a", "X", "left"), step("b", "X", "right", version=2),
        step("a", "left", "RESULT", extra='input_map { key: "EXTRA" value: "right" } ')]))
    loaded = ModelRepository.load(repo)
    assert not loaded.refused
    plan = loaded.get("diamond").plan
    assert [[(s.number, s.model, s.version) for s in wave] for wave in plan.waves] == [
        [(1, "a", ""), (2, "b", "2")], [(3, "a", "")]]
    assert plan.outputs == ("RESULT",)
    assert plan.waves[1][0].inputs == (("EXTRA", "right"), ("IN", "left"))
    assert set(loaded.ensembles()) == {"diamond"}


@pytest.mark.parametrize(("steps", "reason"), [
    (step("nope", "X", "RESULT"),
     "step 1 ('nope'): model 'nope' is not in the repository"),
    (step("a", "X", "t") + "," + step("b", "t", "RESULT", version=3),
     "step 2 ('b') asks for version 3, which is not served (served: 2)"),
    (step("a", "u", "t") + "," + step("b", "t", "u"),
     "steps 1, 2 form a cycle: each waits for a tensor another of them writes"),
    (step("a", "X", "t") + "," + step("b", "missing", "RESULT"),
     "step 2 ('b') reads tensor 'missing', which is neither an ensemble input nor written "
     "by any step"),
    (step("a", "X", "t"), "ensemble output 'RESULT' is not written by any step's output_map"),
    (step("a", "X", "RESULT") + "," + step("b", "X", "RESULT"),
     "step 2 ('b') writes tensor 'RESULT', which is already written by step 1"),
    (step("ints", "X", "RESULT"),
     "tensor 'RESULT' is INT64 as output 'OUT' of step 1 ('ints') but FP32 as ensemble "
     "output"),
    (step("a", "X", "t") + "," + step("ints", "t", "u") + "," + step("a", "X", "RESULT"),
     "tensor 't' is FP32 as output 'OUT' of step 1 ('a') but INT64 as input 'IN' of step 2 "
     "('ints')"),
    ('{ model_name: "a" input_map { key: "EXTRA" value: "X" } '
     'output_map { key: "OUT" value: "RESULT" } }',
     "step 1 ('a'): input 'IN' of model 'a' is not in input_map"),
    ('{ model_name: "a" input_map { key: "IN" value: "X" } '
     'output_map { key: "NOPE" value: "RESULT" } }',
     "step 1 ('a'): output_map names output 'NOPE', which model 'a' lacks (outputs: OUT)"),
])
def test_a_bad_plan_is_refused_naming_the_step_while_the_rest_serve(repo, steps, reason):
    ensemble(repo, "bad", steps)
    ensemble(repo, "good", step("a", "X", "RESULT"))
    loaded = ModelRepository.load(repo)
    assert set(loaded.models) == {"a", "b", "ints", "good"}
    assert loaded.refused["bad"] == (
        f"model 'bad': {repo / 'bad' / 'config.pbtxt'}: {reason}"), loaded.refused["bad"]


def test_an_ensemble_over_a_refused_model_is_refused(repo):
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text("max_batch_size: nope")
    ensemble(repo, "uses_broken", step("broken", "X", "RESULT"))
    loaded = ModelRepository.load(repo)
    assert "step 1 ('broken'): model 'broken' was refused: model 'broken':" in \
        loaded.refused["uses_broken"]


def test_ensembles_that_contain_each_other_are_refused(repo):
    ensemble(repo, "outer", step("inner", "X", "RESULT"))
    # inner's step model is outer: outer -> inner -> outer.
    (repo / "inner" / "1").mkdir(parents=True)
    (repo / "inner" / "config.pbtxt").write_text(
        'platform: "ensemble"\nmax_batch_size: 8\n'
        'input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "outer" input_map { key: "X" value: "IN" }'
        ' output_map { key: "RESULT" value: "OUT" } } ] }\n')
    loaded = ModelRepository.load(repo)
    assert "ensemble 'inner' contains itself: inner -> outer -> inner" in \
        loaded.refused["inner"]
    assert "outer" in loaded.refused


def test_an_ensemble_batching_more_than_a_step_allows_is_refused(repo):
    ensemble(repo, "wide", step("a", "X", "RESULT"), max_batch_size=16)
    assert "the ensemble's max_batch_size 16 exceeds the step model's 8" in \
        ModelRepository.load(repo).refused["wide"]


@pytest.mark.parametrize(("scheduling", "reason"), [
    ("", "ensemble 'e' has no ensemble_scheduling step"),
    ('step [ { input_map { key: "IN" value: "X" } } ]', "step 1 names no model_name"),
    ('step [ { model_name: "a" output_map { key: "OUT" value: "R" } } ]', "empty input_map"),
])
def test_steps_are_checked_when_the_config_is_parsed(repo, scheduling, reason):
    (repo / "e" / "1").mkdir(parents=True)
    (repo / "e" / "config.pbtxt").write_text(
        'platform: "ensemble"\ninput [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "R" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        f"ensemble_scheduling {{ {scheduling} }}\n")
    assert reason in ModelRepository.load(repo).refused["e"]


UNBATCHED_STEP = """
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
"""


def test_batching_and_non_batching_models_mix_when_shapes_agree_with_the_batch(repo):
    """As Triton checks an ensemble: a step without batching (max_batch_size 0) may be in a
    batching ensemble, and an ensemble without batching may run batching steps, when the
    tensors' shapes agree with the batch dimension counted ([-1, 4] and a batch of [4])."""
    (repo / "unbatched" / "1").mkdir(parents=True)
    (repo / "unbatched" / "config.pbtxt").write_text(UNBATCHED_STEP)
    ensemble(repo, "mixed", step("unbatched", "X", "t") + "," + step("a", "t", "RESULT"),
             max_batch_size=8)
    (repo / "flat" / "1").mkdir(parents=True)
    (repo / "flat" / "config.pbtxt").write_text(
        'platform: "ensemble"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
        'output [ { name: "R" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
        f'ensemble_scheduling {{ step [ {step("a", "X", "R")} ] }}\n')
    (repo / "wrong" / "1").mkdir(parents=True)
    (repo / "wrong" / "config.pbtxt").write_text(
        'platform: "ensemble"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 2, 5 ] } ]\n'
        'output [ { name: "R" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
        f'ensemble_scheduling {{ step [ {step("a", "X", "R")} ] }}\n')
    loaded = ModelRepository.load(repo)
    assert set(loaded.refused) == {"wrong"}
    assert loaded.refused["wrong"].endswith(
        "tensor 'X' has dims [2, 5] as ensemble input but [4] as input 'IN' of step 1 ('a')")
    mixed, flat = loaded.get("mixed").plan, loaded.get("flat").plan
    assert [(s.batching, s.input_dims) for s in mixed.steps] == [
        (False, ((-1, 4),)), (True, ((4,),))]
    assert (mixed.batching, flat.batching, flat.output_dims) == (True, False, ((-1, 4),))


@pytest.mark.parametrize(("shape", "dims", "batching", "batched", "carried"), [
    ([4], (4,), True, False, [1, 4]),  # gains a batch of one
    ([2, 4], (4,), True, False, [2, 4]),  # holds its batch already
    ([1, 4], (4,), False, True, [4]),  # loses its batch of one
    ([1, 4], (-1, 4), False, True, [1, 4]),  # the reader's dims describe it as it is
    ([2, 4], (4,), False, True, [2, 4]),  # a batch of two stays (the reader refuses it)
    ([3, 4], (4,), True, True, [3, 4]),
    ([3, 4], (-1, 4), False, False, [3, 4]),
])
def test_a_tensor_takes_the_shape_its_reader_expects_as_triton_carries_it(
        shape, dims, batching, batched, carried):
    assert ensemble_plan.carried_shape(shape, dims, batching, batched) == carried


def decoupled_model(repo, name):
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(
        'backend: "python"\nmodel_transaction_policy { decoupled: true }\n'
        + STEP.format(dtype="TYPE_FP32"))


def test_a_decoupled_step_makes_its_ensemble_decoupled_and_nested_ones_too(repo):
    decoupled_model(repo, "streams")
    ensemble(repo, "e", ",".join([step("streams", "X", "tokens"),
                                  step("a", "tokens", "RESULT")]))
    ensemble(repo, "a_outer", step("e", "X", "RESULT").replace('"IN"', '"X"').replace(
        '"OUT"', '"RESULT"'))
    ensemble(repo, "plain", step("a", "X", "RESULT"))
    loaded = ModelRepository.load(repo)
    assert not loaded.refused
    plan = loaded.get("e").plan
    assert [[(s.model, s.decoupled) for s in wave] for wave in plan.waves] == [
        [("streams", True)], [("a", False)]]
    assert plan.decoupled
    assert loaded.get("e").config.model_transaction_policy.decoupled
    assert loaded.get("a_outer").plan.decoupled  # planned before "e", and again after it
    assert loaded.get("a_outer").config.model_transaction_policy.decoupled
    assert not loaded.get("plain").plan.decoupled
    assert not loaded.get("plain").config.model_transaction_policy.decoupled


def test_two_decoupled_steps_that_would_run_at_once_are_refused(repo):
    decoupled_model(repo, "streams")
    decoupled_model(repo, "more")
    ensemble(repo, "e", ",".join([
        step("streams", "X", "left"), step("more", "X", "right"),
        step("a", "left", "RESULT", extra='input_map { key: "EXTRA" value: "right" } ')]))
    ensemble(repo, "chained", ",".join([step("streams", "X", "left"),
                                        step("more", "left", "RESULT")]))
    loaded = ModelRepository.load(repo)
    assert "step 1 ('streams') and step 2 ('more') are both decoupled and would run at " \
           "once: an ensemble forks at one decoupled step at a time" in loaded.refused["e"]
    assert "chained" not in loaded.refused
    assert [s.decoupled for s in loaded.get("chained").plan.steps] == [True, True]
