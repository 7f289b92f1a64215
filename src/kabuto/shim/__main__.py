"""Entry point of ``containerd-shim-kabuto-v2``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from kabuto.shim.cli import main as shim_main

    return shim_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
