"""Regenerate the *_pb2.py modules from the .proto files next to this script.

Run from anywhere: ``python -m kabuto.protos.generate`` (needs grpcio-tools, a dev
dependency). The output is committed, so the runtime and the guest need only protobuf.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS_DIR = Path(__file__).resolve().parent
# -I src makes the generated modules import each other as kabuto.protos.xxx_pb2.
SOURCE_ROOT = PROTOS_DIR.parent.parent


def main() -> int:
    well_known = resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(SOURCE_ROOT)) for p in PROTOS_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{SOURCE_ROOT}",
        f"-I{well_known}",
        f"--python_out={SOURCE_ROOT}",
        f"--pyi_out={SOURCE_ROOT}",
        *protos,
    ]
    status = protoc.main(args)
    if status != 0:
        print(f"protoc failed with status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
