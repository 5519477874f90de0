"""Exercise checks: `tlama_mini.checks.lessonNN.check_<name>(fn)` tests a learner's `fn` against the
reference implementation in `tlama_mini` on fresh random inputs and explains what is wrong.

Exercise notebooks (exercises/NN_topic.ipynb, solved in solutions/) mark each function to write
with a first line `# exercise: <name>`, and cells that must run first with `# setup`. The same
checks run in the notebook (one call after each exercise) and from the command line:

    python -m tlama_mini.checks exercises/03_rope.ipynb      # grade your work
    python -m tlama_mini.checks solutions                    # every solution notebook
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import ExerciseFailed

__all__ = ["ExerciseFailed", "Result", "grade_notebook", "load_exercises"]


@dataclass
class Result:
    notebook: str
    exercise: str
    status: str   # "pass", "fail" (wrong answer), "todo" (NotImplementedError) or "error" (it crashed)
    message: str = ""


def _cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def load_exercises(path: str | Path) -> tuple[dict[str, Any], list[str], str]:
    """Run the `# setup` and `# exercise:` cells of a notebook; return (namespace, exercise names,
    lesson number). Other cells (demos, check calls) are not run."""
    path = Path(path)
    cells = _cells(path)
    # the lesson number: from the checks the notebook imports, else from a NN_ file-name prefix
    match = re.search(r"tlama_mini\.checks\.lesson(\d\d)", "\n".join(cells)) or re.match(r"(\d\d)_", path.name)
    if not match:
        raise ValueError(f"{path.name}: no `from tlama_mini.checks.lessonNN import ...` in its setup cell "
                         "and no NN_ prefix in its name; which lesson's checks should grade it?")
    ns: dict[str, Any] = {"__name__": f"exercises_{match.group(1)}"}
    names: list[str] = []
    for source in cells:
        first = source.lstrip().splitlines()[0] if source.strip() else ""
        m = re.match(r"#\s*exercise:\s*(\w+)", first)
        if m:
            names.append(m.group(1))
        if m or re.match(r"#\s*setup\b", first):
            exec(compile(source, f"{path.name}:{m.group(1) if m else 'setup'}", "exec"), ns)  # noqa: S102
    return ns, names, match.group(1)


def grade_notebook(path: str | Path) -> list[Result]:
    """Run every exercise check of one notebook; never raises for a learner's mistake."""
    path = Path(path)
    ns, names, lesson = load_exercises(path)
    checks = importlib.import_module(f"tlama_mini.checks.lesson{lesson}")
    results = []
    for name in names:
        check = getattr(checks, f"check_{name}", None)
        if check is None:
            results.append(Result(path.name, name, "error", f"no check named check_{name} in lesson{lesson}"))
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the summary reports passes itself
                check(ns[name])
            results.append(Result(path.name, name, "pass"))
        except NotImplementedError as e:  # a stub: this exercise's, or (the message says so) one it calls
            results.append(Result(path.name, name, "todo", str(e) or "not implemented yet"))
        except ExerciseFailed as e:
            results.append(Result(path.name, name, "fail", str(e)))
        except Exception as e:  # the learner's code crashed: report it as such
            results.append(Result(path.name, name, "error", f"{type(e).__name__}: {e}"))
    return results
