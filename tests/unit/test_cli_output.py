"""A command whose reader has gone (`meshserve infer mlp | head -1`) stops quietly, as other
command-line tools do: no traceback, nothing on stderr; the command's own status when it had
done its work (its output was still buffered), else 141, as a shell reports a tool that
SIGPIPE ended."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("unbuffered", "status"), [(False, 0), (True, 141)],
                         ids=["buffered", "unbuffered"])
def test_output_to_a_reader_that_has_gone(tmp_path, unbuffered, status):
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "meshserve.tools.cli", "certs", "init", str(tmp_path)],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
            env=env | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {}))
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (status, "")
