"""skaffold.yaml, Dockerfile and .dockerignore, checked statically (no Docker engine and no
cluster here: the image is never built by these tests).

Each skaffold profile's patches are applied here as skaffold would (JSON patch add/replace),
and the values the release would get are rendered and linted with the umbrella chart.
"""

import copy
import re
import tomllib

import pytest
import yaml

from tests.charts.chartlib import CHARTS, ROOT

SKAFFOLD = ROOT / "skaffold.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load(SKAFFOLD.read_text())


def apply_patches(config: dict, patches: list[dict]) -> dict:
    """JSON patch (RFC 6902) `add` and `replace`, the operations the profiles use."""
    config = copy.deepcopy(config)
    for patch in patches:
        assert patch["op"] in ("add", "replace"), patch
        *parents, last = [part.replace("~1", "/").replace("~0", "~")
                          for part in patch["path"].lstrip("/").split("/")]
        target = config
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            if patch["op"] == "add":
                target.insert(index, patch["value"])
            else:
                target[index] = patch["value"]
        else:
            if patch["op"] == "replace":
                assert last in target, f"replace of a missing {patch['path']}"
            target[last] = patch["value"]
    return config


def test_skaffold_config(skaffold):
    assert skaffold["apiVersion"] == "skaffold/v4beta11"
    assert skaffold["kind"] == "Config"
    [artifact] = skaffold["build"]["artifacts"]
    assert artifact["image"] == "meshserve"
    assert artifact["docker"]["dockerfile"] == "Dockerfile"
    assert (ROOT / artifact["docker"]["dockerfile"]).is_file()
    [release] = skaffold["deploy"]["helm"]["releases"]
    assert release["chartPath"] == "charts/meshserve"
    assert (ROOT / release["chartPath"] / "Chart.yaml").is_file()
    assert release["setValueTemplates"] == {"image.repository": "{{.IMAGE_REPO_meshserve}}",
                                            "image.tag": "{{.IMAGE_TAG_meshserve}}"}
    assert {profile["name"] for profile in skaffold["profiles"]} == {"cpu", "gpu"}


def profile_values(skaffold: dict, name: str) -> tuple[dict, dict]:
    """(the patched config, the values the release would get) of one profile."""
    [profile] = [p for p in skaffold["profiles"] if p["name"] == name]
    assert set(profile) <= {"name", "patches", "build", "deploy", "activation"}
    config = apply_patches(skaffold, profile.get("patches", []))
    [release] = config["deploy"]["helm"]["releases"]
    values = copy.deepcopy(release["overrides"])
    # What skaffold's setValueTemplates would set for a built image.
    values["image"] = {"repository": "registry.example.com/meshserve", "tag": "dev"}
    return config, values


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_profile_values_lint_and_render(helm, skaffold, tmp_path, profile):
    config, values = profile_values(skaffold, profile)
    path = tmp_path / f"{profile}.yaml"
    path.write_text(yaml.safe_dump(values))
    done = helm.run("lint", "--strict", str(CHARTS / "meshserve"), "-f", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    done = helm.run("template", "meshserve", str(CHARTS / "meshserve"), "-f", str(path))
    assert done.returncode == 0, done.stderr
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    computes = [d for d in documents if d["kind"] == "StatefulSet"]
    assert len(computes) == len(values["models"]) >= 1
    for compute in computes:
        [main] = compute["spec"]["template"]["spec"]["containers"]
        assert main["image"] == "registry.example.com/meshserve:dev"
        device = [a for a in main["args"] if a.startswith("--device=")]
        gpus = main["resources"].get("limits", {}).get(GPU)
        if profile == "gpu":
            assert device == ["--device=cuda"] and gpus == 1
        else:
            assert device == ["--device=cpu"] and gpus is None
    build_args = config["build"]["artifacts"][0]["docker"].get("buildArgs", {})
    if profile == "cpu":
        assert build_args == {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    else:
        assert "TORCH_INDEX_URL" not in build_args  # PyPI's CUDA build


def test_dev_model_repository_is_the_demo_one(skaffold):
    """The dev release's init container writes `meshserve up`'s demo models; the script runs."""
    command = skaffold["deploy"]["helm"]["releases"][0]["overrides"]["modelRepository"]["init"][
        "command"]
    assert command[:2] == ["python3", "-c"]
    compile(command[2], "<init>", "exec")
    assert "write_demo_repository(os.environ['MODEL_REPOSITORY'])" in command[2]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines())
            if line and not line.startswith("#")]


def test_dockerfile():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [(i, arguments) for i, (name, arguments) in enumerate(instructions) if name == "RUN"]
    [torch_at] = [i for i, run in runs if "pip install" in run and "torch==2.13.0" in run]
    [project_at] = [i for i, run in runs if re.search(r"pip install \.(\s|$)", run)]
    assert torch_at < project_at, "torch must be installed (pinned) before the project"
    assert "https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    # The project pins the same torch, so installing it changes nothing.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    [user] = [arguments for name, arguments in instructions if name == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can check it
    charts_uid = yaml.safe_load((CHARTS / "router" / "values.yaml").read_text())[
        "podSecurityContext"]["runAsUser"]
    assert int(uid) == charts_uid
    names = [name for name, _ in instructions]
    assert names.index("USER") > project_at  # installed as root, run as the user
    assert names[-2:] == ["ENTRYPOINT", "CMD"]
    assert ("ENTRYPOINT", '["meshserve"]') in instructions


def test_dockerfile_copies_every_package_and_dockerignore_lets_them_through():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {arguments.split()[0] for name, arguments in dockerfile_instructions()
              if name == "COPY"} | {part for name, arguments in dockerfile_instructions()
                                    if name == "COPY" for part in arguments.split()[:-1]}
    assert package_dirs | {"pyproject.toml", "README.md"} <= copied
    rules = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # only what is listed reaches the build context
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert package_dirs | {"pyproject.toml", "README.md"} <= allowed
    assert not {".venv", ".git", ".meshserve", "tests"} & allowed
