"""`meshserve infer`'s arguments: a bad --input or --batch is a usage error, not a traceback."""

import argparse
import re

import numpy
import pytest

from meshserve.tools.client import npy_array, register


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="meshserve")
    register(top.add_subparsers())
    return top


def test_input_is_read_as_the_arguments_are(tmp_path):
    saved = tmp_path / "x.npy"
    numpy.save(saved, numpy.arange(6, dtype=numpy.float32).reshape(2, 3))
    args = parser().parse_args(["infer", "mlp", "--input", str(saved)])
    numpy.testing.assert_array_equal(args.input, numpy.arange(6).reshape(2, 3))


@pytest.mark.parametrize("name, content", [("missing.npy", None), ("text.npy", "hello")])
def test_an_input_that_does_not_read_is_refused_naming_it(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(argparse.ArgumentTypeError,
                       match=re.escape(f"cannot read '{path}' as a .npy file: ")):
        npy_array(str(path))


@pytest.mark.parametrize("batch", ["-1", "0", "two"])
def test_a_batch_below_one_is_a_usage_error(batch, capsys):
    with pytest.raises(SystemExit) as stopped:
        parser().parse_args(["infer", "mlp", "--batch", batch])
    assert stopped.value.code == 2
    assert f"argument --batch: must be a whole number of at least 1, not '{batch}'" in \
        capsys.readouterr().err
