"""Generate meg/v1/*_pb2.py, *_pb2_grpc.py and *.pyi from proto/meg/v1/*.proto.

The generated files are committed and never edited by hand; tests/test_proto.py
regenerates them into a temporary folder and fails if they differ.

    python scripts/gen_proto.py            # writes into the repository
    python scripts/gen_proto.py --out DIR  # writes DIR/meg/v1/...
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    """Run protoc (python, grpc and mypy-protobuf outputs) into ``out``; return written files."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "meg" / "v1").glob("*.proto"))
    plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit("protoc-gen-mypy not found beside the interpreter: pip install mypy-protobuf")
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out / "meg" / "v1"
    (pkg / "__init__.py").write_text('"""Generated wire types of meg.v1 (do not edit; see scripts/gen_proto.py)."""\n')
    return sorted(pkg.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="folder that receives meg/v1/")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
