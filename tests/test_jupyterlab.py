"""Every lesson as a learner meets it: opened in JupyterLab in a real (headless) browser, run from the
menu, with ipywidgets that must render and respond.

    pytest tests/test_jupyterlab.py                          # every lesson (and each exercise notebook's setup)
    TLAMA_BROWSER_NOTEBOOKS=03,09 pytest tests/test_jupyterlab.py   # only lessons whose name starts so

One `jupyter lab` for the whole run, on a free local port with token auth, on a temporary copy of the
notebooks, with its own settings (notebook windowing off, so every cell is in the page; no news or update
checks); one Debian Chromium driven by Playwright (`executable_path`: no browser download), with
TLAMA_BROWSER_PAGES (default 2) notebooks running at once, each in its own page, workspace and kernel: every
notebook this run's tests ask for is queued when the first test starts, and each test waits for its own.
For each lesson: open it, Run > Run All Cells, wait until the run stops, save, and check that no code cell
raised (a cell that raises ends the run at once: the kernel drops the queued cells, and the test fails with
the cell's error), that every code cell ran, that no widget failed to render, and that every `interact`
rendered and responds: its first slider moved with the keyboard changes the readout and redraws the output.
Exercise notebooks: the cells above the first stub run without errors. The kernels get TLAMA_QUICK_LESSONS=1,
with which the lessons that train (10, 11) take a tenth of their steps: the numbers are nbval's to check, at
full size; this test checks what the page shows. Screenshots of every widget (and of the page on a failure)
go to $TLAMA_ARTIFACTS_DIR/jupyterlab (default .ci/artifacts/jupyterlab). Under pytest-xdist, keep this file
on one worker (`--dist loadfile`, as CI runs it).
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

TIMES: dict[str, float] = {}  # Run All to done, seconds, per notebook (its relative path)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
        for path, value in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                            "@jupyterlab/apputils-extension/notification": {"checkForUpdates": False,
                                                                           "fetchNews": "false"}}.items():
            (settings / path).parent.mkdir(parents=True, exist_ok=True)
            (settings / f"{path}.jupyterlab-settings").write_text(json.dumps(value))
        env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "ws"),
               "JUPYTER_CONFIG_DIR": str(tmp / "config"), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
               # lessons 10 and 11 train for fewer steps: this test checks what the page shows, nbval the numbers
               "TLAMA_QUICK_LESSONS": os.environ.get("TLAMA_QUICK_LESSONS", "1"),
               # PAGES kernels compute at once: each gets its share of the cores (more threads than cores make
               # torch's thread pool spin and wait on a busy machine)
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // PAGES)))}
        self.log = open(tmp / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
             "--ServerApp.open_browser=False", "--LabApp.news_url=", "--allow-root"],
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

    def api(self, method: str, path: str):
        req = urllib.request.Request(self.url(f"api/{path}"), method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    async def aapi(self, method: str, path: str):
        """The REST API from the event loop, without blocking the other page."""
        return await asyncio.to_thread(self.api, method, path)

    async def kernel_idle(self, rel: str) -> bool:
        sessions = [s for s in await self.aapi("GET", "sessions") if s["path"].endswith(rel)]
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

async def open_notebook(page, lab: Lab, rel: str) -> None:
    # Each notebook in a workspace of its own, so pages open at the same time never restore each other's tabs.
    workspace = re.sub(r"\W", "-", rel)
    await page.goto(lab.url(f"lab/workspaces/{workspace}/tree/{rel}?reset&token={lab.token}"))
    await page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    deadline = time.monotonic() + 60
    while not await lab.kernel_idle(rel):  # the kernel starts with the notebook
        assert time.monotonic() < deadline, f"{rel}: the kernel did not start"
        await asyncio.sleep(0.3)


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
    t0 = time.monotonic()
    await menu(page, "Edit", "Clear Outputs of All Cells")  # the committed outputs would look like a finished run
    await menu(page, "Run", "Run All Cells")
    try:
        await wait_until_done(page, lab, rel, len(sources))
    finally:
        TIMES[rel] = time.monotonic() - t0
    cells = await saved_cells(page, lab, rel)
    errors = error_report(rel, cells)
    assert not errors, errors
    not_run = [i for i, c in enumerate(cells) if "".join(c["source"]).strip() and c["execution_count"] is None]
    assert not not_run, f"{name}: code cells {not_run} did not run"
    await check_widgets(page, name, sources)
    assert not page.errors, f"{name}: JavaScript errors in the page: {page.errors[:3]}"


async def run_exercise_setup(page, lab: Lab, rel: str) -> None:
    """Run > Run All Above Selected Cell, from the first stub: the setup cells run without errors."""
    code = [c for c in json.loads((lab.root / rel).read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    first_stub = next(i for i, c in enumerate(code) if "".join(c["source"]).lstrip().startswith("# exercise:"))
    await open_notebook(page, lab, rel)
    t0 = time.monotonic()
    await menu(page, "Edit", "Clear Outputs of All Cells")
    await page.locator(".jp-CodeCell").nth(first_stub).locator(".jp-InputPrompt").click()
    await menu(page, "Run", "Run All Above Selected Cell")
    try:
        await wait_until_done(page, lab, rel, first_stub)
    finally:
        TIMES[rel] = time.monotonic() - t0
    cells = (await saved_cells(page, lab, rel))[:first_stub]
    errors = error_report(rel, cells)
    assert not errors, f"error outputs before the first exercise:\n{errors}"
    assert all(c["execution_count"] for c in cells if "".join(c["source"]).strip()), f"{rel}: a setup cell did not run"


class Runner:
    """Runs notebooks in one headless Chromium against one JupyterLab server, PAGES pages at once (each its
    own browser context and kernel), on an asyncio event loop in a background thread. Every job this session's
    tests will ask for is queued up front, so while pytest waits on one notebook's result, the next is running."""

    def __init__(self, lab: Lab, pages: int) -> None:
        self.lab, self.jobs = lab, {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jupyterlab-pages", daemon=True)
        self.thread.start()
        self._call(self._start(pages))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self, pages: int) -> None:
        self.playwright = await async_playwright().start()
        self.browser = await self.playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                             args=["--no-sandbox", "--disable-gpu"])
        self.pages = asyncio.Semaphore(pages)

    async def _job(self, run, rel: str) -> None:
        async with self.pages:
            context = await self.browser.new_context(viewport={"width": 1400, "height": 1000})
            try:
                page = await context.new_page()
                page.errors = []
                page.on("pageerror", lambda e: page.errors.append(str(e)))
                try:
                    await run(page, self.lab, rel)
                except BaseException:  # a screenshot of the whole page beside the widget screenshots
                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    shot = ARTIFACTS / f"FAILED-{rel.replace('/', '-')[:-6]}.png"
                    with contextlib.suppress(Exception):
                        await page.screenshot(path=str(shot), full_page=True)
                    raise
            finally:
                await context.close()
                await self.lab.shutdown_kernel(rel)

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


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    server = Lab(tmp_path_factory.mktemp("jupyterlab"))
    t0 = time.monotonic()
    try:
        yield server
    finally:
        server.stop()
        if TIMES:
            print(f"\nJupyterLab: {time.monotonic() - t0:.1f} s from the server's start to the last notebook, "
                  f"{PAGES} pages at once; seconds per notebook (Run All to done): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))


@pytest.fixture(scope="session")
def runner(lab, request):
    pages = Runner(lab, PAGES)
    try:
        for job in filter(None, map(_job_of, request.session.items)):
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
    assert TIMES[RAISES] < 30, f"the run took {TIMES[RAISES]:.1f} s to report the error"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name[:2])
def test_lesson_runs_in_jupyterlab(runner, path):
    runner.result(run_lesson, f"notebooks/{path.name}")


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name[:2])
def test_exercise_notebook_opens_and_runs_up_to_its_first_stub(runner, path):
    runner.result(run_exercise_setup, f"exercises/{path.name}")
