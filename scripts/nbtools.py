"""Notebook maintenance: one place for the repository URL, the Colab header, and clean execution.

    python scripts/nbtools.py header NB...   # (re)write the Colab badge and the install cell
    python scripts/nbtools.py run NB...      # execute top to bottom in a fresh kernel, save outputs, print times

Every lesson, exercise and solution notebook starts with the same two cells: a markdown cell
with the "Open in Colab" badge and a code cell that installs tlama_mini when it is not importable.
Change REPO here and run `header` on all notebooks to move the project.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat

REPO = "tlama-mini/tlama-mini"  # GitHub owner/name: the one place the repository URL is set
BRANCH = "main"
HEADER_MARK = "<!-- tlama-header -->"
SETUP_MARK = "# Colab / fresh-environment setup"


def badge_cell(path: Path) -> nbformat.NotebookNode:
    rel = path.resolve().relative_to(Path(__file__).resolve().parent.parent).as_posix()
    url = f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{rel}"
    return nbformat.v4.new_markdown_cell(
        f"{HEADER_MARK}\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})")


def setup_cell() -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(f'''{SETUP_MARK}: installs tlama_mini if it is not importable.
import importlib.util, subprocess, sys
if importlib.util.find_spec("tlama_mini") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/{REPO}@{BRANCH}"], check=True)''')


def header(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if not (c.cell_type == "markdown" and HEADER_MARK in c.source)
             and not (c.cell_type == "code" and c.source.startswith(SETUP_MARK))]
    nb.cells = [badge_cell(path), setup_cell(), *cells]
    nbformat.write(nb, path)


def run(path: Path, timeout: int = 600) -> float:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("header", "run"):
        print(__doc__)
        return 2
    for name in argv[1:]:
        path = Path(name)
        if argv[0] == "header":
            header(path)
        else:
            print(f"{path}: {run(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
