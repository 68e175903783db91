"""What `meshserve up` prints as it starts: commands that paste into a shell as they are, each
warning of the repository once, and, when the ingress is not ready in time, which versions it
waits for and why."""

import logging
import shlex
import urllib.parse
from pathlib import Path

from meshserve.common.repository import ModelRepository
from meshserve.protocol import admin_pb2
from meshserve.tools.up import RepositoryLog, banner, plan, prepare, repository_log
from meshserve.tools.up_children import Child, ingress_timeout, not_ready_lines

ODD = "my model %#1"


def ingress(run_dir: Path) -> Child:
    child = Child("ingress", "ingress", [], run_dir)
    child.port = 8001
    return child


def commands(text: str) -> list[list[str]]:
    """The shell commands of the banner, as a shell would split them."""
    lines = text.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines
            if line.startswith(("  meshserve ", "  curl "))]


def test_the_banner_quotes_a_model_and_a_directory_for_the_shell(tmp_path):
    data_dir = tmp_path / "data dir #2"
    text = banner(data_dir, ingress(data_dir / "run"), bearer_port=8002, http_port=8000,
                  model=ODD)
    infer, token, curl = commands(text)
    assert infer == ["meshserve", "infer", ODD, "--data-dir", str(data_dir),
                     "--target", "127.0.0.1:8001"]
    assert token[token.index("--models") + 1] == ODD
    assert token[-2:] == ["--data-dir", str(data_dir)]
    assert curl[curl.index("--cacert") + 1] == f"{data_dir}/tls/ca.crt"
    url = curl[-1]
    assert url == f"https://127.0.0.1:8000/v2/models/{urllib.parse.quote(ODD, safe='')}"
    assert urllib.parse.unquote(url.rsplit("/", 1)[1]) == ODD


def test_the_demo_banner_commands_split_as_written(tmp_path):
    data_dir = tmp_path / "data"
    infer_mlp, infer_classify = commands(banner(data_dir, ingress(data_dir / "run")))
    assert infer_mlp == ["meshserve", "infer", "mlp", "--data-dir", str(data_dir),
                         "--target", "127.0.0.1:8001"]
    assert infer_classify[:3] == ["meshserve", "infer", "classify"]


def version(model: str, number: str, weight: int, ready: bool = False,
            reason: str = "") -> admin_pb2.VersionReadiness:
    return admin_pb2.VersionReadiness(model=model, version=number, weight=weight, ready=ready,
                                      reason=reason)


def test_what_keeps_the_ingress_from_being_ready():
    table = admin_pb2.Readiness(versions=[
        version("alpha", "1", 50, ready=True), version("alpha", "2", 50),
        version("gamma", "1", 100), version("gamma", "2", 0, reason="refusing model 'gamma' "
                                                                    "version 2: model.pt: bad"),
        version("mlp", "1", 100)])  # a policy left from another repository: not served
    status = admin_pb2.StatusResponse(models=[
        admin_pb2.ModelStatus(policy=admin_pb2.Policy(model="alpha"), versions=[
            admin_pb2.VersionStatus(version="1", endpoints=[admin_pb2.Endpoint(address="a:1")]),
            admin_pb2.VersionStatus(version="2")]),
        admin_pb2.ModelStatus(policy=admin_pb2.Policy(model="gamma"), versions=[
            admin_pb2.VersionStatus(version=v, endpoints=[admin_pb2.Endpoint(address="g:1")])
            for v in ("1", "2")])])
    lines = not_ready_lines(table, status, {"alpha", "gamma"})
    assert lines == [
        "model 'alpha' version 2 (50 % of its traffic): no batcher of it is registered (the "
        "repository serves no such version; give its weight to another with `meshserve traffic "
        "set`)",
        "model 'gamma' version 1 (100 % of its traffic): none of its batchers answers SERVING",
        "model 'gamma' version 2 (0 % of its traffic): refusing model 'gamma' version 2: "
        "model.pt: bad"]
    child = ingress(Path("/d/run"))
    assert ingress_timeout(child, 120, lines[:1]) == (
        f"ingress not ready after 120 s: not ready: {lines[0]}; see /d/run/ingress.log")
    assert ingress_timeout(child, 120, []) == "ingress not ready after 120 s; see " \
                                              "/d/run/ingress.log"


def test_the_repository_read_twice_warns_once_and_leaves_refusals_to_up(tmp_path):
    repository = tmp_path / "models"
    (repository / "linear" / "01").mkdir(parents=True)
    (repository / "linear" / "1").mkdir()
    (repository / "linear" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
        'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n')
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text("max_batch_size: oops\n")
    heard, said = [], []
    with repository_log(RepositoryLog(heard.append)):
        loaded = prepare(tmp_path / "data", said.append, repository)
        plan(tmp_path / "data", 0, "cpu", repository=repository, loaded=loaded)
        ModelRepository.load(repository)  # and any other read
    assert [line for line in heard if "ignoring directory" in line] == [
        f"model 'linear': ignoring directory {repository / 'linear' / '01'}; a version is a "
        "positive integer without leading zeros"]
    assert not [line for line in heard if "broken" in line]
    assert [line for line in said if "broken" in line] == [
        f"  REFUSED {loaded.refused['broken']}"]
    assert not logging.getLogger(ModelRepository.__module__).handlers  # taken off again
