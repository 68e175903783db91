"""Generate the Python modules in services/protocol from the .proto sources in protos/.

`python -m meshserve.tools.genproto` rewrites them; `--check` fails when they are stale.
"""

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("meshserve/protocol")
TARGET = ROOT / "services" / "protocol"


def generate(out: Path) -> None:
    """Run protoc over every .proto under protos/, writing modules below `out`."""
    from grpc_tools import protoc  # a test/dev dependency only

    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith((".py", ".pyi"))
            and p.name != "__init__.py"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE
        names = generated_files(fresh)
        if args.check:
            stale = sorted(n for n in names if not (TARGET / n).exists()
                           or not filecmp.cmp(fresh / n, TARGET / n, shallow=False))
            extra = sorted(generated_files(TARGET) - names)
            if stale or extra:
                print(f"generated code is stale: {', '.join(stale + extra)}; "
                      "run: python -m meshserve.tools.genproto", file=sys.stderr)
                return 1
            return 0
        for name in generated_files(TARGET) - names:
            (TARGET / name).unlink()
        for name in names:
            shutil.copyfile(fresh / name, TARGET / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
