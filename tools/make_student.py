"""Write workshop copies of the chapters with the exercise solutions removed.

    python tools/make_student.py [OUT_DIR]        # default: build/student/<chapter>.ipynb  (make student)

Everything between a ``{solution-start}`` directive and the closing fence of the matching ``{solution-end}``
directive is removed — markdown and code alike — and each removed solution is replaced by one empty code cell
for the learner's answer. Exercises, prose and all other code stay as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
STUB = "# Your answer here\n"


def strip_solutions(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """A copy of ``nb`` without solutions, and the number of solutions removed."""
    cells, in_solution, closing, removed = [], False, False, 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            if not in_solution:
                cells.append(cell)
            continue
        kept = []
        for line in cell.source.splitlines():
            if "{solution-start}" in line:
                in_solution, removed = True, removed + 1
                if any(text.strip() for text in kept):
                    cells.append(nbformat.v4.new_markdown_cell("\n".join(kept)))
                kept = []
                cells.append(nbformat.v4.new_code_cell(STUB))
            elif in_solution and "{solution-end}" in line:
                closing = True
            elif in_solution and closing and line.strip().startswith("```"):
                in_solution = closing = False
            elif not in_solution:
                kept.append(line)
        if kept and any(line.strip() for line in kept):
            cells.append(nbformat.v4.new_markdown_cell("\n".join(kept)))
    out = nbformat.from_dict({**nb, "cells": cells})
    return out, removed


def main() -> int:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "student"
    out_dir.mkdir(parents=True, exist_ok=True)
    for chapter in sorted(ROOT.glob("chapters/*/c*.py")):
        student, removed = strip_solutions(jupytext.read(chapter))
        jupytext.write(student, out_dir / f"{chapter.stem}.ipynb")
        print(f"{chapter.stem}: {removed} solutions removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
