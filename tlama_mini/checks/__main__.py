"""Grade exercise notebooks from the command line: python -m tlama_mini.checks PATH [PATH ...]
(a notebook or a folder of them). Exit status 0 only when every exercise passes."""
from __future__ import annotations

import sys
from pathlib import Path

from . import grade_notebook


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if not p.exists():
            print(f"no such file or folder: {p}")
            return 2
        paths += sorted(p.glob("[0-9][0-9]_*.ipynb")) if p.is_dir() else [p]
    icons = {"pass": "✓", "fail": "✗", "todo": "…", "error": "!"}
    results = [r for p in paths for r in grade_notebook(p)]
    for r in results:
        print(f"{icons[r.status]} {r.notebook} {r.exercise}: {r.status}" + (f"\n    {r.message}" if r.status != "pass" else ""))
    done = sum(r.status == "pass" for r in results)
    print(f"{done}/{len(results)} exercises pass")
    return 0 if results and done == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
