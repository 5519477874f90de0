"""Every lesson as a learner meets it: opened in JupyterLab in a real (headless) browser, run from the
menu, with ipywidgets that must render and respond.

    pytest tests/test_jupyterlab.py                          # every lesson (and each exercise notebook's setup)
    TLAMA_BROWSER_NOTEBOOKS=03,09 pytest tests/test_jupyterlab.py   # only lessons whose name starts so

One `jupyter lab` for the whole run, on a free local port with token auth, on a temporary copy of the
notebooks, with its own settings (notebook windowing off, so every cell is in the page; no news or update
checks); one Debian Chromium driven by Playwright (`executable_path`: no browser download), with
TLAMA_BROWSER_PAGES (default 2) notebooks running at once, each in its own page and kernel. Each page loads
JupyterLab once and then opens one notebook after another in it (as a learner opens them from the file browser),
closing each when its test is done; a page whose notebook failed is replaced by a fresh one. The server starts
each notebook's kernel while the notebook waits for a page (at most one waiting per page). Every notebook this
run's tests ask for is queued when the first test starts, the longest first (by the run times recorded in its
committed outputs), and each test waits for its own.
For each lesson: open it, Run > Run All Cells, wait until the run stops, save, and check that no code cell
raised (a cell that raises ends the run at once: the kernel drops the queued cells, and the test fails with
the cell's error), that every code cell ran, that no widget failed to render, and that every `interact`
rendered and responds: its first slider moved with the keyboard changes the readout and redraws the output.
Exercise notebooks: the cells above the first stub run without errors. The kernels get TLAMA_QUICK_LESSONS=1,
with which the lessons that train or time things run the same cells at smaller sizes (fewer steps, lengths or
sizes: `grep -rn TLAMA_QUICK_LESSONS notebooks`): the numbers are nbval's to check, at full size; this test
checks what the page shows. Screenshots of every widget (and of the page on a failure)
go to $TLAMA_ARTIFACTS_DIR/jupyterlab (default .ci/artifacts/jupyterlab), with timings.json: the fixed costs
(server and Chromium start, each page's JupyterLab load) and each notebook's steps (open, kernel start, run,
save, checks, close) and slowest code cells, printed as a table at the end (seen with `pytest -s`). Under
pytest-xdist, keep this file on one worker (`--dist loadfile`, as CI runs it).
Skipped when Chromium or Playwright is missing, unless TLAMA_REQUIRE_BROWSER=1 (set by .ci/run).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("TLAMA_ARTIFACTS_DIR", ROOT / ".ci" / "artifacts")) / "jupyterlab"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
REQUIRED = os.environ.get("TLAMA_REQUIRE_BROWSER") == "1"
PREFIXES = [p for p in os.environ.get("TLAMA_BROWSER_NOTEBOOKS", "").split(",") if p]
LESSONS = [p for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
           if not PREFIXES or p.name.startswith(tuple(PREFIXES))]
EXERCISES = [p for p in sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))
             if not PREFIXES or p.name.startswith(tuple(PREFIXES))]
RUN_TIMEOUT_S = 300  # one notebook, from Run All to idle
PAGES = int(os.environ.get("TLAMA_BROWSER_PAGES", "2"))  # notebooks running at once, each in its own page and kernel
RAISES = "harness/raises.ipynb"  # written into the server's copy only

try:
    from playwright.async_api import async_playwright
except ImportError:
    async_playwright = None

if CHROMIUM is None or async_playwright is None:
    reason = "needs Chromium (apt-get install chromium) and Playwright (pip install playwright)"
    if REQUIRED:
        raise RuntimeError(f"TLAMA_REQUIRE_BROWSER=1 but the JupyterLab test {reason}")
    pytest.skip(reason, allow_module_level=True)

TIMES: dict[str, dict[str, float]] = {}  # seconds per step ("run": Run All to done), per notebook (relative path)
FIXED: dict[str, float] = {}  # seconds: the server's start, Chromium's start, each page's JupyterLab load
SLOWEST: dict[str, list] = {}  # per notebook: its three slowest code cells in this run, [(index, seconds)]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def timed(rel: str, step: str):
    """Adds the block's wall time to TIMES[rel][step], also when it raises."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        steps = TIMES.setdefault(rel, {})
        steps[step] = steps.get(step, 0.0) + time.monotonic() - t0


def cell_seconds(cell: dict) -> float:
    """A code cell's run time from the execution timestamps in its metadata (nbclient and JupyterLab's
    recordTiming write the same keys); 0 without them."""
    from datetime import datetime
    stamps = cell.get("metadata", {}).get("execution", {})
    try:
        return (datetime.fromisoformat(stamps["shell.execute_reply"].replace("Z", "+00:00"))
                - datetime.fromisoformat(stamps["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
    except (KeyError, ValueError):
        return 0.0


def recorded_seconds(path: Path, cells: int | None = None) -> float:
    """How long the first `cells` code cells (all when None) took in the committed run."""
    code = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"][:cells]
    return sum(map(cell_seconds, code))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on a temporary copy of the notebooks, and its REST API."""

    def __init__(self, tmp: Path) -> None:
        self.root, self.port, self.token = tmp / "repo", _free_port(), os.urandom(12).hex()
        for folder in ("notebooks", "exercises"):
            shutil.copytree(ROOT / folder, self.root / folder)
        # A notebook whose second cell raises, for the test of the harness itself.
        (self.root / RAISES).parent.mkdir(parents=True)
        (self.root / RAISES).write_text(json.dumps({
            "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src}
                      for src in ("print('first cell')", "raise ValueError('deliberate failure 4242')",
                                  "import time\ntime.sleep(600)  # never runs: the kernel stops at the error")],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 4}))
        settings = tmp / "settings"
        # recordTiming: each cell's execution times go into the saved notebook, for the timing report
        for path, value in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "recordTiming": True},
                            "@jupyterlab/apputils-extension/notification": {"checkForUpdates": False,
                                                                           "fetchNews": "false"}}.items():
            (settings / path).parent.mkdir(parents=True, exist_ok=True)
            (settings / f"{path}.jupyterlab-settings").write_text(json.dumps(value))
        env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "ws"),
               "JUPYTER_CONFIG_DIR": str(tmp / "config"), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
               # lessons that train or time things do less: this test checks what the page shows, nbval the numbers
               "TLAMA_QUICK_LESSONS": os.environ.get("TLAMA_QUICK_LESSONS", "1"),
               # PAGES kernels compute at once: each gets its share of the cores (more threads than cores make
               # torch's thread pool spin and wait on a busy machine)
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // PAGES)))}
        self.log = open(tmp / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
             "--ServerApp.open_browser=False", "--LabApp.news_url=", "--allow-root",
             "--LabApp.expose_app_in_browser=True"],  # window.jupyterapp: a page opens one notebook after another
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.api("GET", "status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"jupyter lab did not start: {(tmp / 'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def api(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(self.url(f"api/{path}"), method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    async def aapi(self, method: str, path: str, body: dict | None = None):
        """The REST API from the event loop, without blocking the other page."""
        return await asyncio.to_thread(self.api, method, path, body)

    async def start_kernel(self, rel: str) -> None:
        """A fresh kernel for the notebook, started by the server ahead of its page: JupyterLab, opening the
        notebook, connects to the running session of its path (as it does when a learner reopens a notebook)."""
        await self.aapi("POST", "sessions", {"path": rel, "name": Path(rel).name, "type": "notebook",
                                             "kernel": {"name": "python3"}})

    async def kernel_idle(self, rel: str) -> bool:
        sessions = [s for s in await self.aapi("GET", "sessions") if s["path"].endswith(rel)]
        assert len(sessions) <= 1, f"{rel}: {len(sessions)} kernels"  # the page used the kernel started for it
        return bool(sessions) and sessions[0]["kernel"]["execution_state"] == "idle"

    async def shutdown_kernel(self, rel: str) -> None:
        for session in await self.aapi("GET", "sessions"):
            if session["path"].endswith(rel):
                await self.aapi("DELETE", f"sessions/{session['id']}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --- one notebook in one page (coroutines; PAGES of them run at once) ---

async def load_jupyterlab(page, lab: Lab, workspace: str) -> None:
    """JupyterLab in the page, with no document open (each page in a workspace of its own, so pages opened at the
    same time never restore each other's tabs), until its layout is restored."""
    await page.goto(lab.url(f"lab/workspaces/{workspace}?reset&token={lab.token}"))
    await page.wait_for_function("() => window.jupyterapp !== undefined", timeout=60_000)
    await page.evaluate("() => window.jupyterapp.restored")


async def open_notebook(page, lab: Lab, rel: str) -> None:
    """Open the notebook in the page's JupyterLab (what a double click in the file browser does), and wait until
    its cells are in the page and its kernel has started."""
    with timed(rel, "open"):
        await page.evaluate("async rel => { await window.jupyterapp.commands.execute('docmanager:open', "
                            "{path: rel, factory: 'Notebook'}); }", rel)
        await page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    with timed(rel, "kernel start"):
        deadline = time.monotonic() + 60
        while not await lab.kernel_idle(rel):  # the kernel starts with the notebook
            assert time.monotonic() < deadline, f"{rel}: the kernel did not start"
            await asyncio.sleep(0.2)


async def close_notebook(page, lab: Lab, rel: str) -> None:
    """Close the (saved) notebook's tab and wait until it has left the page (the Runner then shuts its kernel
    down, with the page already free for the next notebook)."""
    with timed(rel, "close"):
        await page.evaluate("() => { for (const w of Array.from(window.jupyterapp.shell.widgets('main')))"
                            " if (w.node.classList.contains('jp-NotebookPanel')) w.close(); }")
        await page.wait_for_selector(".jp-NotebookPanel", state="detached", timeout=30_000)


async def menu(page, top: str, item: str) -> None:
    """Click a menu bar entry, then one of its items (by its exact label)."""
    await page.click(f".lm-MenuBar-item:has-text('{top}')")
    await page.locator(".lm-Menu-itemLabel").get_by_text(item, exact=True).click()


async def wait_until_done(page, lab: Lab, rel: str, n_cells: int) -> None:
    """Until the run has stopped: no prompt '[*]' and the kernel idle, either with n_cells prompts numbered (the
    whole run) or, for three polls in a row, with fewer (a cell raised: the kernel drops the queued cells, and the
    caller reports the error at once instead of waiting out RUN_TIMEOUT_S)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    started, stopped_short = False, 0
    while True:
        prompts = await page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt",
                                                  "els => els.map(e => e.textContent)")
        ran = sum(p.strip().strip("[]:").isdigit() for p in prompts)
        busy = any("*" in p for p in prompts)
        started = started or busy or ran > 0
        if started and not busy and await lab.kernel_idle(rel):
            if ran >= n_cells:
                return
            stopped_short += 1
            if stopped_short >= 3:
                return
        else:
            stopped_short = 0
        assert time.monotonic() < deadline, f"{rel}: still running after {RUN_TIMEOUT_S} s ({ran}/{n_cells} cells)"
        await asyncio.sleep(0.5)


async def saved_cells(page, lab: Lab, rel: str) -> list[dict]:
    """Save (Ctrl+S), wait until the tab is no longer marked unsaved, and read the code cells back."""
    with timed(rel, "save"):
        await page.keyboard.press("Control+s")
        await page.wait_for_selector(".lm-TabBar-tab.jp-mod-dirty", state="detached", timeout=30_000)
        content = (await lab.aapi("GET", f"contents/{rel}?content=1"))["content"]
    return [c for c in content["cells"] if c["cell_type"] == "code"]


def error_report(rel: str, cells: list[dict]) -> str:
    """Each error output as 'cell i raised Name: value' and the end of its traceback ('' when none)."""
    lines = []
    for i, c in enumerate(cells):
        for o in c["outputs"]:
            if o["output_type"] == "error":
                tail = "\n".join(ANSI.sub("", t) for t in o.get("traceback", [])[-3:])
                lines.append(f"{rel}: code cell {i} raised {o.get('ename')}: {o.get('evalue')}\n{tail[-1500:]}")
    return "\n".join(lines)


async def check_widgets(page, name: str, sources: list[str]) -> None:
    """No widget error; every interact rendered; its first slider responds to the keyboard."""
    text = await page.inner_text(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
    assert "Error displaying widget" not in text, f"{name}: a widget failed to render"
    expected = sum(s.count("interact(") for s in sources)
    interacts = page.locator(".jp-NotebookPanel .widget-interact")
    n = await interacts.count()
    assert n == expected, f"{name}: {n} interact widgets rendered, {expected} in the code"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        box = interacts.nth(i)
        await box.scroll_into_view_if_needed()
        await box.screenshot(path=str(ARTIFACTS / f"{name[:-6]}-widget{i}.png"))
        slider = box.locator(".widget-slider").first
        readout = slider.locator(".widget-readout")
        output = box.locator(".widget-output")
        before_value, before_output = await readout.inner_text(), await output.inner_html()
        handle = slider.locator(".noUi-handle").first
        await handle.focus()
        at_max = await handle.get_attribute("aria-valuenow") == await handle.get_attribute("aria-valuemax")
        await page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
        deadline = time.monotonic() + 30
        while (value := await readout.inner_text()) == before_value or await output.inner_html() == before_output:
            assert time.monotonic() < deadline, (f"{name}: moving interact {i}'s first slider did not change "
                                                 f"{'its readout' if value == before_value else 'the output'}")
            await page.wait_for_timeout(200)
        await box.screenshot(path=str(ARTIFACTS / f"{name[:-6]}-widget{i}-moved.png"))


async def run_lesson(page, lab: Lab, rel: str) -> None:
    """Run > Run All Cells; every code cell ran, none raised, every widget works, no JavaScript error."""
    name = Path(rel).name
    sources = ["".join(c["source"]) for c in json.loads((lab.root / rel).read_text(encoding="utf-8"))["cells"]
               if c["cell_type"] == "code"]
    await open_notebook(page, lab, rel)
    js_errors = len(page.errors)  # the page's earlier notebooks' are not this one's
    with timed(rel, "run"):
        await menu(page, "Edit", "Clear Outputs of All Cells")  # the committed outputs would look like a finished run
        await menu(page, "Run", "Run All Cells")
        await wait_until_done(page, lab, rel, len(sources))
    cells = await saved_cells(page, lab, rel)
    SLOWEST[rel] = sorted(((i, round(cell_seconds(c), 1)) for i, c in enumerate(cells)), key=lambda x: -x[1])[:3]
    errors = error_report(rel, cells)
    assert not errors, errors
    not_run = [i for i, c in enumerate(cells) if "".join(c["source"]).strip() and c["execution_count"] is None]
    assert not not_run, f"{name}: code cells {not_run} did not run"
    with timed(rel, "widgets"):
        await check_widgets(page, name, sources)
    assert not page.errors[js_errors:], f"{name}: JavaScript errors in the page: {page.errors[js_errors:][:3]}"
    await close_notebook(page, lab, rel)


async def run_exercise_setup(page, lab: Lab, rel: str) -> None:
    """Run > Run All Above Selected Cell, from the first stub: the setup cells run without errors."""
    code = [c for c in json.loads((lab.root / rel).read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    first_stub = next(i for i, c in enumerate(code) if "".join(c["source"]).lstrip().startswith("# exercise:"))
    await open_notebook(page, lab, rel)
    with timed(rel, "run"):
        await menu(page, "Edit", "Clear Outputs of All Cells")
        await page.locator(".jp-CodeCell").nth(first_stub).locator(".jp-InputPrompt").click()
        await menu(page, "Run", "Run All Above Selected Cell")
        await wait_until_done(page, lab, rel, first_stub)
    cells = (await saved_cells(page, lab, rel))[:first_stub]
    errors = error_report(rel, cells)
    assert not errors, f"error outputs before the first exercise:\n{errors}"
    assert all(c["execution_count"] for c in cells if "".join(c["source"]).strip()), f"{rel}: a setup cell did not run"
    await close_notebook(page, lab, rel)


class Runner:
    """Runs notebooks in one headless Chromium against one JupyterLab server, in PAGES pages at once (each its own
    browser context, with JupyterLab loaded once and reused for one notebook after another), on an asyncio event loop
    in a background thread. Every job this session's tests will ask for is queued up front, so while pytest waits
    on one notebook's result, the next ones are running."""

    def __init__(self, lab: Lab, pages: int) -> None:
        self.lab, self.jobs, self.opened = lab, {}, 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jupyterlab-pages", daemon=True)
        self.thread.start()
        self._call(self._start(pages))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self, pages: int) -> None:
        t0 = time.monotonic()
        self.playwright = await async_playwright().start()
        self.browser = await self.playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                             args=["--no-sandbox", "--disable-gpu"])
        FIXED["Chromium start"] = time.monotonic() - t0
        self.idle = asyncio.Queue()  # pages free for the next notebook; None: one still to open
        for _ in range(pages):
            self.idle.put_nowait(None)
        # kernels alive at once: one per page, and one started ahead for each page's next notebook
        self.kernels = asyncio.Semaphore(2 * pages)

    async def _new_page(self):
        self.opened += 1
        n, t0 = self.opened, time.monotonic()
        context = await self.browser.new_context(viewport={"width": 1400, "height": 1000})
        page = await context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        await load_jupyterlab(page, self.lab, f"page{n}")
        FIXED[f"page {n}: JupyterLab loaded"] = time.monotonic() - t0
        return page

    async def _job(self, run, rel: str) -> None:
        async with self.kernels:
            try:
                await self.lab.start_kernel(rel)
                await self._in_page(run, rel)
            finally:
                with timed(rel, "kernel stop"), contextlib.suppress(Exception):
                    await self.lab.shutdown_kernel(rel)

    async def _in_page(self, run, rel: str) -> None:
        page = await self.idle.get()
        try:
            page = page or await self._new_page()
            await run(page, self.lab, rel)
        except BaseException:
            # A screenshot of the whole page beside the widget screenshots; the page (perhaps with a dialog
            # open, or a notebook left unsaved) is closed, and the next notebook gets a fresh one.
            if page is not None:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / f"FAILED-{rel.replace('/', '-')[:-6]}.png"
                with contextlib.suppress(Exception):
                    await page.screenshot(path=str(shot), full_page=True)
                with contextlib.suppress(Exception):
                    await page.context.close()
            page = None
            raise
        finally:
            self.idle.put_nowait(page)  # free for the next notebook while this one's kernel shuts down

    def submit(self, run, rel: str) -> concurrent.futures.Future:
        if rel not in self.jobs:
            self.jobs[rel] = asyncio.run_coroutine_threadsafe(self._job(run, rel), self.loop)
        return self.jobs[rel]

    def result(self, run, rel: str) -> None:
        """Wait for this notebook's run; its failure (an AssertionError with the reason) is raised here."""
        self.submit(run, rel).result()

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel()
        with contextlib.suppress(Exception):
            concurrent.futures.wait(list(self.jobs.values()), timeout=30)
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

    async def _stop(self) -> None:
        await self.browser.close()
        await self.playwright.stop()


def _job_of(item) -> tuple | None:
    """The (coroutine, notebook) a test item of this module waits for, or None."""
    if getattr(item, "module", None) is None or item.module.__name__ != __name__:  # nbval's cells have no module
        return None
    if item.originalname == "test_a_cell_that_raises_ends_the_run_at_once_with_its_error":
        return run_lesson, RAISES
    path = getattr(item, "callspec", None) and item.callspec.params.get("path")
    if item.originalname == "test_lesson_runs_in_jupyterlab":
        return run_lesson, f"notebooks/{path.name}"
    if item.originalname == "test_exercise_notebook_opens_and_runs_up_to_its_first_stub":
        return run_exercise_setup, f"exercises/{path.name}"
    return None


def _expected_seconds(job: tuple) -> float:
    """A job's committed run time (for an exercise, of its cells above the first stub); 0 for the harness test."""
    run, rel = job
    path = ROOT / rel
    if not path.exists():
        return 0.0
    if run is run_exercise_setup:
        code = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
        return recorded_seconds(path, next(i for i, c in enumerate(code)
                                           if "".join(c["source"]).lstrip().startswith("# exercise:")))
    return recorded_seconds(path)


def report(total: float) -> str:
    """The fixed costs and each notebook's steps, slowest first, as a text table (also in timings.json)."""
    steps = ["open", "kernel start", "run", "save", "widgets", "close", "kernel stop"]  # the page is free at "close"
    lines = [f"JupyterLab browser test: {total:.1f} s from the server's start to the last notebook, {PAGES} pages at "
             "once; " + ", ".join(f"{k} {v:.1f} s" for k, v in FIXED.items()),
             f"{'notebook':48s}" + "".join(f"{k:>13s}" for k in [*steps, "total"])]
    for rel, t in sorted(TIMES.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(f"{rel:48s}" + "".join(f"{t[k]:13.1f}" if k in t else f"{'':13s}" for k in steps)
                     + f"{sum(t.values()):13.1f}" + ("   slowest cells " + ", ".join(
                         f"{i}: {sec:.1f}" for i, sec in SLOWEST[rel]) if rel in SLOWEST else ""))
    lines.append(f"{'sum':48s}" + "".join(f"{sum(t.get(k, 0) for t in TIMES.values()):13.1f}" for k in steps)
                 + f"{sum(sum(t.values()) for t in TIMES.values()):13.1f}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps({"total_s": total, "pages": PAGES, "fixed_s": FIXED,
                                                        "notebooks_s": TIMES, "slowest_cells_s": SLOWEST},
                                                       indent=1))
    return "\n".join(lines)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    t0 = time.monotonic()
    server = Lab(tmp_path_factory.mktemp("jupyterlab"))
    FIXED["server start"] = time.monotonic() - t0
    try:
        yield server
    finally:
        server.stop()
        if TIMES:
            print("\n" + report(time.monotonic() - t0))


@pytest.fixture(scope="session")
def runner(lab, request):
    pages = Runner(lab, PAGES)
    try:
        # the harness's own test first (seconds), then the longest notebooks, so none runs alone at the end
        jobs = sorted(filter(None, map(_job_of, request.session.items)),
                      key=lambda job: (job[1] != RAISES, -_expected_seconds(job)))
        for job in jobs:
            pages.submit(*job)
        yield pages
    finally:
        pages.close()


def test_a_cell_that_raises_ends_the_run_at_once_with_its_error(runner):
    """The harness itself: a failing cell fails its notebook's test with the error's text, within seconds,
    although the next cell would sleep for 10 minutes and the run's timeout is RUN_TIMEOUT_S."""
    with pytest.raises(AssertionError) as failure:
        runner.result(run_lesson, RAISES)
    message = str(failure.value)
    assert "code cell 1 raised ValueError: deliberate failure 4242" in message, message
    assert TIMES[RAISES]["run"] < 30, f"the run took {TIMES[RAISES]['run']:.1f} s to report the error"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name[:2])
def test_lesson_runs_in_jupyterlab(runner, path):
    runner.result(run_lesson, f"notebooks/{path.name}")


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name[:2])
def test_exercise_notebook_opens_and_runs_up_to_its_first_stub(runner, path):
    runner.result(run_exercise_setup, f"exercises/{path.name}")
