"""Workshop copies keep every exercise and lose every solution."""

import importlib.util
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(ROOT.glob("chapters/*/c*.py"))
spec = importlib.util.spec_from_file_location("make_student", ROOT / "tools" / "make_student.py")
make_student = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_student)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_solutions_are_removed_and_exercises_kept(chapter):
    nb = jupytext.read(chapter)
    text = "\n".join(c.source for c in nb.cells)
    n_exercises = text.count("{exercise-start}")
    assert n_exercises >= 2, f"{chapter.stem} should have at least two exercises"
    assert text.count("{solution-start}") == n_exercises, "every exercise needs a solution"
    student, removed = make_student.strip_solutions(nb)
    student_text = "\n".join(c.source for c in student.cells)
    assert removed == n_exercises
    assert "{solution" not in student_text
    assert student_text.count("{exercise-start}") == n_exercises
    assert sum(c.source == make_student.STUB for c in student.cells) == n_exercises
    assert len(student.cells) < len(nb.cells) + n_exercises
