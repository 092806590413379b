"""Regenerate posefix/_proto from proto/posefix/v1/*.proto with grpcio-tools.

    python scripts/gen_proto.py            # rewrite posefix/_proto in the source tree
    python scripts/gen_proto.py --out DIR  # write the generated tree under DIR instead

The generated files are never edited by hand: change the .proto and run this. protoc writes
``from posefix.v1 import posefix_pb2``, which would resolve to the ``posefix`` package itself, so
imports of generated modules are rewritten to their place in the package (``posefix._proto.posefix.v1``).
``posefix/_proto/__init__.py`` itself is written by hand; the ``__init__.py`` files below it are generated.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "posefix" / "_proto"
PACKAGE = "posefix._proto"
INIT_DOC = '"""Code generated from proto/ by scripts/gen_proto.py. Do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "posefix" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc on every .proto into ``out`` (created); return the files written, sorted."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", *protos])
    if rc != 0:
        raise SystemExit(f"gen_proto: protoc failed with status {rc}")
    written = []
    for path in sorted(out.rglob("*")):
        if path.suffix in (".py", ".pyi") and path.name != "__init__.py":
            text = re.sub(r"^from posefix\.v1 import ", f"from {PACKAGE}.posefix.v1 import ",
                          path.read_text(), flags=re.MULTILINE)
            path.write_text(text)
            written.append(path)
    for package in sorted({p.parent for p in written}):
        while package != out:
            (package / "__init__.py").write_text(INIT_DOC)
            written.append(package / "__init__.py")
            package = package.parent
    return sorted(set(written))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory ({OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    written = generate(args.out)
    print(f"gen_proto: wrote {len(written)} files under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
