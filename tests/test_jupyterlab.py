"""Every lesson as a learner meets it: opened in JupyterLab in a real (headless) browser, run from the
menu, with ipywidgets that must render and respond.

    pytest tests/test_jupyterlab.py                          # every lesson (and each exercise notebook's setup)
    TLAMA_BROWSER_NOTEBOOKS=03,09 pytest tests/test_jupyterlab.py   # only lessons whose name starts so

Starts `jupyter lab` on a free local port with token auth, on a temporary copy of the notebooks, with its
own settings (notebook windowing off, so every cell is in the page; no news or update checks), and drives
Debian's Chromium through Playwright (`executable_path`: no browser download). For each lesson: open it in
a fresh workspace, Run > Run All Cells, wait until the kernel is idle, save, and check that every code cell
ran without an error output, that no widget failed to render, and that every `interact` rendered and
responds: its first slider moved with the keyboard changes the readout and redraws the output. Exercise
notebooks: the cells above the first stub run without errors. The kernels get TLAMA_QUICK_LESSONS=1, with
which the lessons that train (10, 11) take a tenth of their steps: the numbers are nbval's to check, at
full size; this test checks what the page shows. Screenshots of every widget (and of the
page on a failure) go to $TLAMA_ARTIFACTS_DIR/jupyterlab (default .ci/artifacts/jupyterlab).
Skipped when Chromium or Playwright is missing, unless TLAMA_REQUIRE_BROWSER=1 (set by .ci/run).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
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

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

if CHROMIUM is None or sync_playwright is None:
    reason = "needs Chromium (apt-get install chromium) and Playwright (pip install playwright)"
    if REQUIRED:
        raise RuntimeError(f"TLAMA_REQUIRE_BROWSER=1 but the JupyterLab test {reason}")
    pytest.skip(reason, allow_module_level=True)

TIMES: dict[str, float] = {}


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
        settings = tmp / "settings"
        for path, value in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                            "@jupyterlab/apputils-extension/notification": {"checkForUpdates": False,
                                                                           "fetchNews": "false"}}.items():
            (settings / path).parent.mkdir(parents=True, exist_ok=True)
            (settings / f"{path}.jupyterlab-settings").write_text(json.dumps(value))
        env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "ws"),
               "JUPYTER_CONFIG_DIR": str(tmp / "config"), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
               # lessons 10 and 11 train for fewer steps: this test checks what the page shows, nbval the numbers
               "TLAMA_QUICK_LESSONS": os.environ.get("TLAMA_QUICK_LESSONS", "1")}
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

    def shutdown_kernels(self) -> None:
        for session in self.api("GET", "sessions"):
            self.api("DELETE", f"sessions/{session['id']}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    server = Lab(tmp_path_factory.mktemp("jupyterlab"))
    try:
        yield server
    finally:
        server.stop()
        if TIMES:
            print("\nJupyterLab seconds per notebook (Run All to idle): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, lab):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    try:
        yield pg
    finally:
        context.close()
        lab.shutdown_kernels()


@contextlib.contextmanager
def screenshot_on_failure(page, name: str):
    """On a failure, a screenshot of the whole page beside the widget screenshots."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"FAILED-{name}.png"), full_page=True)
        raise


def open_notebook(page, lab: Lab, rel: str) -> None:
    page.goto(lab.url(f"lab/tree/{rel}?reset&token={lab.token}"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    deadline = time.monotonic() + 60
    while not kernel_idle(lab, rel):  # the kernel starts with the notebook
        assert time.monotonic() < deadline, f"{rel}: the kernel did not start"
        time.sleep(0.3)


def kernel_idle(lab: Lab, rel: str) -> bool:
    sessions = [s for s in lab.api("GET", "sessions") if s["path"].endswith(rel)]
    return bool(sessions) and sessions[0]["kernel"]["execution_state"] == "idle"


def menu(page, top: str, item: str) -> None:
    """Click a menu bar entry, then one of its items (by its exact label)."""
    page.click(f".lm-MenuBar-item:has-text('{top}')")
    page.locator(".lm-Menu-itemLabel").get_by_text(item, exact=True).click()


def wait_until_done(page, lab: Lab, rel: str, n_cells: int) -> None:
    """Until n_cells prompts show a number (none '[*]') and the kernel is idle."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent)")
        ran = sum(p.strip().strip("[]:").isdigit() for p in prompts)
        if ran >= n_cells and not any("*" in p for p in prompts) and kernel_idle(lab, rel):
            return
        assert time.monotonic() < deadline, f"{rel}: still running after {RUN_TIMEOUT_S} s ({ran}/{n_cells} cells)"
        time.sleep(0.5)


def saved_cells(page, lab: Lab, rel: str) -> list[dict]:
    page.keyboard.press("Control+s")
    page.wait_for_timeout(1500)
    return [c for c in lab.api("GET", f"contents/{rel}?content=1")["content"]["cells"] if c["cell_type"] == "code"]


def check_widgets(page, name: str, sources: list[str]) -> None:
    """No widget error; every interact rendered; its first slider responds to the keyboard."""
    text = page.inner_text(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
    assert "Error displaying widget" not in text, f"{name}: a widget failed to render"
    expected = sum(s.count("interact(") for s in sources)
    interacts = page.locator(".jp-NotebookPanel .widget-interact")
    assert interacts.count() == expected, f"{name}: {interacts.count()} interact widgets rendered, {expected} in the code"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for i in range(interacts.count()):
        box = interacts.nth(i)
        box.scroll_into_view_if_needed()
        box.screenshot(path=str(ARTIFACTS / f"{name[:-6]}-widget{i}.png"))
        slider = box.locator(".widget-slider").first
        readout = slider.locator(".widget-readout")
        output = box.locator(".widget-output")
        before_value, before_output = readout.inner_text(), output.inner_html()
        handle = slider.locator(".noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowRight" if handle.get_attribute("aria-valuenow") != handle.get_attribute("aria-valuemax")
                            else "ArrowLeft")
        deadline = time.monotonic() + 30
        while readout.inner_text() == before_value or output.inner_html() == before_output:
            assert time.monotonic() < deadline, (f"{name}: moving interact {i}'s first slider did not change "
                                                 f"{'its readout' if readout.inner_text() == before_value else 'the output'}")
            page.wait_for_timeout(200)
        box.screenshot(path=str(ARTIFACTS / f"{name[:-6]}-widget{i}-moved.png"))


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name[:2])
def test_lesson_runs_in_jupyterlab(page, lab, path):
    rel = f"notebooks/{path.name}"
    sources = ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
               if c["cell_type"] == "code"]
    with screenshot_on_failure(page, path.stem):
        open_notebook(page, lab, rel)
        t0 = time.monotonic()
        menu(page, "Edit", "Clear Outputs of All Cells")  # the committed outputs would look like a finished run
        menu(page, "Run", "Run All Cells")
        wait_until_done(page, lab, rel, len(sources))
        TIMES[path.name[:2]] = time.monotonic() - t0
        cells = saved_cells(page, lab, rel)
        not_run = [i for i, c in enumerate(cells) if "".join(c["source"]).strip() and c["execution_count"] is None]
        assert not not_run, f"{path.name}: code cells {not_run} did not run"
        errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(cells) for o in c["outputs"]
                  if o["output_type"] == "error"]
        assert not errors, f"{path.name}: error outputs {errors}"
        check_widgets(page, path.name, sources)
        assert not page.errors, f"{path.name}: JavaScript errors in the page: {page.errors[:3]}"


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name[:2])
def test_exercise_notebook_opens_and_runs_up_to_its_first_stub(page, lab, path):
    rel = f"exercises/{path.name}"
    code = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    first_stub = next(i for i, c in enumerate(code) if "".join(c["source"]).lstrip().startswith("# exercise:"))
    with screenshot_on_failure(page, f"exercises-{path.stem}"):
        open_notebook(page, lab, rel)
        menu(page, "Edit", "Clear Outputs of All Cells")
        page.locator(".jp-CodeCell").nth(first_stub).locator(".jp-InputPrompt").click()
        menu(page, "Run", "Run All Above Selected Cell")
        wait_until_done(page, lab, rel, first_stub)
        cells = saved_cells(page, lab, rel)[:first_stub]
    errors = [(i, o.get("ename")) for i, c in enumerate(cells) for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name}: error outputs before the first exercise: {errors}"
    assert all(c["execution_count"] for c in cells if "".join(c["source"]).strip()), f"{path.name}: a setup cell did not run"
