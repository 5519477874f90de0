"""Two-sided exercise checking: every solution notebook passes its checks, and every untouched
exercise stub fails them (as "not implemented"), with the same exercises on both sides."""
from pathlib import Path

import pytest

from tlama_mini.checks import grade_notebook, load_exercises

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))


def test_every_exercise_notebook_has_a_solution():
    assert [p.name for p in EXERCISES] == [p.name for p in SOLUTIONS]
    for ex, sol in zip(EXERCISES, SOLUTIONS):
        assert load_exercises(ex)[1] == load_exercises(sol)[1], f"{ex.name}: exercise names differ"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solutions_pass(path):
    results = grade_notebook(path)
    assert len(results) >= 3, f"{path.name}: at least three exercises per lesson"
    bad = [f"{r.exercise}: {r.status} {r.message}" for r in results if r.status != "pass"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_untouched_stubs_fail(path):
    results = grade_notebook(path)
    assert results and all(r.status == "todo" for r in results), [(r.exercise, r.status) for r in results]
