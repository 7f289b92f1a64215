"""Tables in the docs generated from code: a Markdown table between two marker comments, read
back for a test that the docs show what the code declares, and rewritten by ``--write FILE``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DocTable:
    begin: str
    end: str
    render: Callable[[], str]

    def table_in(self, text: str) -> str:
        """The generated table in a document, between the markers."""
        start, end = text.index(self.begin) + len(self.begin), text.index(self.end)
        return text[start:end].strip("\n") + "\n"

    def write_into(self, path: Path) -> None:
        text = path.read_text()
        start, end = text.index(self.begin) + len(self.begin), text.index(self.end)
        path.write_text(text[:start] + "\n" + self.render() + text[end:])

    def main(self, description: str, argv: list[str] | None = None) -> None:
        """``python -m <module>`` prints the table; ``--write FILE`` replaces it in FILE."""
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--write", type=Path, help="replace the table in this Markdown file")
        args = parser.parse_args(argv)
        if args.write:
            self.write_into(args.write)
        else:
            sys.stdout.write(self.render())
