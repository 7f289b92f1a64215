"""Progress of a long command on stderr: a bar on a terminal, a line per phase otherwise (a log, CI)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import click

Report = Callable[[str], None]


@contextlib.contextmanager
def phases(title: str, steps: Sequence[str]) -> Iterator[Report]:
    """A ``report(step)`` to call as each of ``steps`` begins; ``"<step>: detail"`` says how far
    a step got (a kernel build's heartbeat) without moving the bar."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    started = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(title, total=len(steps))

        def report(step: str) -> None:
            progress.update(task, description=step, completed=steps.index(step.split(": ")[0]))
            if not console.is_terminal:  # the bar cannot show there: a line per step
                click.echo(f"[{time.monotonic() - started:6.1f} s] {step}", err=True)

        yield report
