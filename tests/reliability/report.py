"""Write the figures a reliability run measured (KABUTO_FIGURES, JSON) into docs/reliability.md,
between its two FIGURES markers: `python tests/reliability/report.py FIGURES.json docs/reliability.md`
(what `make soak` runs after the suite). The prose around the markers is written by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN = "<!-- FIGURES BEGIN (make soak writes this part) -->"
END = "<!-- FIGURES END -->"


def render(figures: dict[str, object]) -> str:
    scenarios = figures.get("scenarios", {})
    assert isinstance(scenarios, dict)
    lines = [BEGIN, "",
             f"Measured by `{figures.get('mode')}` run at {figures.get('written')} "
             f"(`KABUTO_SOAK={'1' if figures.get('mode') == 'soak' else '0'}`"
             + (f", `KABUTO_SOAK_CYCLES={figures['soak_cycles']}`" if figures.get("soak_cycles") else "")
             + f"): {figures.get('outcome', 'outcome not recorded')}.", "",
             "| scenario | figure | value |", "|---|---|---|"]
    for scenario in sorted(scenarios):
        for name, value in sorted(scenarios[scenario].items()):
            shown = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
            lines.append(f"| `{scenario}` | {name.replace('_', ' ')} | {shown} |")
    lines += ["", END]
    return "\n".join(lines)


def main(figures_path: str, doc_path: str) -> None:
    figures = json.loads(Path(figures_path).read_text())
    doc = Path(doc_path)
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + render(figures) + tail)


if __name__ == "__main__":
    main(*sys.argv[1:3])
