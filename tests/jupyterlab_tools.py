"""Notebooks run in a real JupyterLab, in a real (headless) browser: the one execution per test run
of each notebook when the browser tests are selected (tests/notebook_tools.py: ExecutedNotebooks).

One JupyterLab from this environment serves a temporary copy of the course: notebooks/ with the
small parameters of test_notebooks.py injected (by papermill, nothing run), next to links to
scripts/ and slurm/, which the notebooks reach as ../scripts and ../slurm. Chromium, driven by
Playwright, opens each notebook in a fresh page and workspace, runs all cells, and records what a
learner would see (a Report): errors, every ipywidget rendered (not its text fallback), every
matplotlib figure shown as a PNG, and a dataset browser that reacts to its Dropdown. Then the page
saves the notebook, outputs and all: that file is the executed copy the other tests read. A
screenshot of each notebook goes to artifacts/screenshots/<name>.png.

Needs Chromium (`apt-get install -y --no-install-recommends chromium`) and the playwright package
(requirements-dev.txt); `playwright install` is not needed. Everything stays on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import notebook_tools as nt
from conftest import ROOT, cpu_env, free_port

SCREENSHOTS = ROOT / "artifacts" / "screenshots"
APT_CHROMIUM = "apt-get update && apt-get install -y --no-install-recommends chromium"
RUN_TIMEOUT_S = 600  # one notebook, all cells
WIDGET = "application/vnd.jupyter.widget-view+json"

# Chromium with no network beyond this machine: no sync, updates or QUIC, and every host name but
# localhost resolves to nothing (docs/build_kit.py prints the cheat sheet with the same flags).
sys.path.insert(0, str(ROOT / "docs"))
from build_kit import CHROMIUM_OFFLINE as CHROMIUM_ARGS  # noqa: E402

# User settings of the test's JupyterLab; no news or update checks, no extension manager (PyPI).
SETTINGS = {
    # no windowing: every cell stays in the DOM; no space after the last cell (screenshots)
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "scrollPastEnd": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False,
                                                    "doNotDisturbMode": True},
    "@jupyterlab/extensionmanager-extension/plugin": {"enabled": False},
}


def chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def missing() -> str | None:
    """Why the notebooks cannot run in JupyterLab here, or None when they can."""
    if not chromium():
        return f"no Chromium for the JupyterLab tests ({APT_CHROMIUM})"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no playwright package for the JupyterLab tests (pip install -r requirements-dev.txt)"
    return None


# --- JavaScript run in the page; window.jupyterapp is there thanks to expose_app_in_browser.

JS_KERNEL_READY = """(path) => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  if (!w || !w.context || w.context.path !== path || !w.sessionContext) return false;
  const ctx = w.sessionContext, kernel = ctx.session && ctx.session.kernel;
  const bar = document.querySelector('#jp-main-statusbar');
  return !!kernel && kernel.status === 'idle' && ctx.kernelDisplayStatus === 'idle'
    && !!bar && /\\| Idle/.test(bar.innerText);
}"""

JS_PROGRESS = """() => {
  const w = window.jupyterapp.shell.currentWidget, ctx = w.sessionContext;
  const code = w.content.widgets.filter(c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
  const prompts = code.map(c => (c.node.querySelector('.jp-InputPrompt') || {}).innerText || '');
  const errors = code.filter(c => c.model.toJSON().outputs.some(o => o.output_type === 'error')).length;
  return {idle: !!ctx.session && !!ctx.session.kernel && ctx.session.kernel.status === 'idle',
          running: prompts.filter(p => p.includes('*')).length,
          executed: code.filter(c => c.model.executionCount !== null).length,
          total: code.length, errors};
}"""

# What each output of each code cell looks like in the page, next to the notebook's model.
JS_OUTPUTS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  return w.content.widgets.map((cell, index) => {
    if (cell.model.type !== 'code') return null;
    const shown = [...cell.node.querySelectorAll('.jp-OutputArea-child .jp-OutputArea-output')].map(o => ({
      mime: o.getAttribute('data-mime-type'), hidden: o.classList.contains('lm-mod-hidden'),
      text: o.innerText.slice(0, 300),
      widgets: o.querySelectorAll('.jupyter-widgets').length,
      pngs: [...o.querySelectorAll('img')].filter(i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 0).length,
    }));
    return {index, model: cell.model.toJSON(), shown};
  });
}"""

JS_IMAGES = """async () => Promise.all([...document.querySelectorAll('img.widget-image')].map(async img => {
  const bytes = await (await fetch(img.src)).arrayBuffer();
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return {src: img.src, loaded: img.complete && img.naturalWidth > 0,
          sha256: [...digest].map(b => b.toString(16).padStart(2, '0')).join('')};
}))"""

JS_CONTENT_HEIGHT = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const outer = w.content.node.querySelector('.jp-WindowedPanel-outer') || w.content.node;
  return outer.scrollHeight + (window.innerHeight - outer.clientHeight);
}"""


def wait(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run_all(page, path: str) -> dict:
    """Run All once the kernel is idle; wait until every cell ran (or one failed) and all is quiet."""
    page.wait_for_function(JS_KERNEL_READY, arg=path, timeout=180_000, polling=500)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    quiet = []

    def finished():
        state = page.evaluate(JS_PROGRESS)
        done = state["idle"] and not state["running"] and (state["executed"] == state["total"] or state["errors"])
        quiet.append(done)
        return state if done and quiet[-3:] == [True] * 3 else None  # idle for three polls in a row

    return wait(finished, RUN_TIMEOUT_S, f"{path}: all cells run")


def rendering_problems(page) -> list[str]:
    """Errors, widgets not rendered, figures not shown as PNG images, per cell."""
    found = []
    for cell in filter(None, page.evaluate(JS_OUTPUTS)):
        i, outputs, shown = cell["index"], cell["model"].get("outputs", []), cell["shown"]
        for k, output in enumerate(outputs):
            dom = shown[k] if k < len(shown) else {"mime": None, "hidden": False, "text": "", "widgets": 0, "pngs": 0}
            data = output.get("data", {})
            if output.get("output_type") == "error":
                found += [f"cell {i}: {error}" for error in nt.cell_errors({"outputs": [output, *(
                    o for o in outputs if o.get("output_type") == "stream")]})]
            elif WIDGET in data:
                # A rendered widget is a Panel (no data-mime-type) of .jupyter-widgets elements; one
                # the kernel closed (tqdm's bars with leave=False) is an empty, hidden Panel. Without
                # the widget manager the page shows text/plain instead, e.g. `VBox(children=...)`.
                closed = dom["mime"] is None and dom["hidden"] and not dom["text"].strip()
                broken = dom["mime"] not in (None, WIDGET) or not dom["widgets"] or "Loading widget" in dom["text"] \
                    or "Error displaying widget" in dom["text"]
                if broken and not closed:
                    found.append(f"cell {i}: a widget did not render; the page shows {dom['mime']} "
                                 f"{dom['text'][:120]!r}")
            elif "image/png" in data:
                if dom["mime"] != "image/png" or not dom["pngs"]:
                    found.append(f"cell {i}: a PNG output is not shown as an image ({dom['mime']})")
            elif str(data.get("text/plain", "")).startswith("<Figure size"):
                found.append(f"cell {i}: a matplotlib figure was not drawn as PNG: {data['text/plain']!r}")
            elif "cannot be shown" in (text := nt.output_text({"outputs": [output]})):  # plt.show(), no inline backend
                found.append(f"cell {i}: a matplotlib figure was not shown: {text[:200]!r}")
            elif dom["mime"] is None:
                found.append(f"cell {i}: output {k} ({output.get('output_type')}) is not in the page")
    return found


def check_dataset_browser(page) -> None:
    """Choosing another species in the data notebook's Dropdown shows other images."""
    select = page.locator(".jp-Notebook .widget-dropdown select").first
    assert select.count(), "no rendered Dropdown in the data notebook"
    before = page.evaluate(JS_IMAGES)
    assert before and all(i["loaded"] for i in before), f"the dataset browser shows no loaded images: {before}"
    options = select.locator("option").all_inner_texts()
    assert len(options) >= 2, f"the Dropdown offers {options}"
    chosen = select.evaluate("s => s.selectedIndex")
    select.select_option(index=(chosen + 1) % len(options))
    srcs = {i["src"] for i in before}
    seen = []

    def changed():
        seen[:] = [now := page.evaluate(JS_IMAGES)]
        return now and not srcs & {i["src"] for i in now} and all(i["loaded"] for i in now)

    try:
        wait(changed, 60, "the image grid to change after choosing another species")
    except AssertionError as error:
        raise AssertionError(f"{error}: the Dropdown shows {select.input_value()!r} (was option {chosen} of {options}); images before "
                             f"{[i['src'] for i in before]}, now {[i['src'] for i in seen[0]]}") from None
    after = seen[0]
    assert {i["sha256"] for i in after}.isdisjoint({i["sha256"] for i in before}), \
        "after choosing another species the grid shows the same images"


INTERACTIONS = {"data": check_dataset_browser}


def screenshot(page, name: str) -> Path:
    """The whole notebook in one PNG: left sidebar closed, a viewport as tall as the notebook."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => { window.jupyterapp.shell.collapseLeft(); window.jupyterapp.shell.collapseRight(); }")
    for _ in range(5):  # cells re-lay out at a new size: grow until the notebook fits
        height = max(800, min(int(page.evaluate(JS_CONTENT_HEIGHT)) + 20, 16000))
        if height == page.viewport_size["height"]:
            break
        page.set_viewport_size({"width": 1280, "height": height})
        page.wait_for_timeout(700)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


JS_SAVE = """async () => {
  const w = window.jupyterapp.shell.currentWidget;
  await w.context.save();
  return !w.context.model.dirty;
}"""


@contextmanager
def launch_chromium():
    """Headless Chromium through playwright (`playwright install` is not needed), offline."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Report:
    """What one notebook's run in JupyterLab showed."""
    name: str
    state: dict | None = None  # JS_PROGRESS at the end: code cells executed, total, errors
    problems: list[str] = field(default_factory=list)  # rendering_problems
    interaction: str | None = None  # why the notebook's interaction (INTERACTIONS) failed
    failure: str | None = None  # why the run itself did not finish (a timeout, a crash)
    saved: bool = False  # the page saved the executed notebook
    seconds: float = 0.0
    screenshot: Path | None = None
    console: list[str] = field(default_factory=list)  # the browser console's errors
    log: str = ""  # the end of JupyterLab's log, when something failed

    def explain(self) -> str:
        return (f"notebooks/{self.name}.ipynb in JupyterLab (screenshot {self.screenshot}):\n"
                + "\n".join(filter(None, [self.failure, *self.problems, self.interaction]))
                + "\nbrowser console errors:\n  " + "\n  ".join(self.console)
                + f"\nJupyterLab log (end):\n{self.log}")


class Lab:
    """A JupyterLab on 127.0.0.1 with a random port and token and its own config and state,
    serving <work>/course (notebooks/, links to scripts/ and slurm/), opened in a headless Chromium."""

    def __init__(self, work: Path, browser):
        self.root, state = work / "course", work / "jupyter-state"
        (self.root / "notebooks").mkdir(parents=True)
        for name in ("scripts", "slurm"):
            (self.root / name).symlink_to(ROOT / name, target_is_directory=True)
        self.log = state / "jupyterlab.log"
        self.server, self.browser = self.start_server(state), browser

    def start_server(self, state: Path) -> subprocess.Popen:
        env = cpu_env()
        env.pop("MPLBACKEND", None)  # the kernel's inline backend must draw the figures
        for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                         ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")]:
            env[var] = str(state / sub)
            (state / sub).mkdir(parents=True)
        for plugin, values in SETTINGS.items():
            path = state / "settings" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        port, self.token = free_port(), secrets.token_hex(24)
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                   "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                   f"--ServerApp.root_dir={self.root}", "--LabApp.expose_app_in_browser=True",
                   # nothing that reaches out: no news feed, update check or PyPI extension manager
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly"]
        if os.geteuid() == 0:
            command.append("--allow-root")
        with self.log.open("w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise AssertionError(f"JupyterLab exited with {server.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5):
                    return server
            except OSError:
                if time.monotonic() > deadline:
                    server.kill()
                    raise AssertionError(f"JupyterLab did not answer in 120 s:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.5)

    def run(self, name: str) -> Report:
        """Run every cell of <root>/notebooks/<name>.ipynb (written there by the caller) in a fresh
        page and workspace, check what the page shows, save the notebook with its outputs."""
        path, report, started = f"notebooks/{name}.ipynb", Report(name), time.monotonic()
        context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.on("console", lambda m: report.console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        workspace = f"test-{name}-{uuid.uuid4().hex[:8]}"  # a fresh workspace reopens nothing else
        try:
            page.goto(f"{self.url}/lab/workspaces/{workspace}/tree/{path}?token={self.token}")
            try:
                report.state = run_all(page, path)
            finally:
                page.wait_for_timeout(1000)  # let the last widgets draw
                report.seconds = time.monotonic() - started
                report.screenshot = screenshot(page, name)
                report.problems = rendering_problems(page)
                report.saved = page.evaluate(JS_SAVE)
            if name in INTERACTIONS:
                try:
                    INTERACTIONS[name](page)
                except AssertionError as error:
                    report.interaction = str(error)
                screenshot(page, name)
        except Exception as error:  # a timeout or a crash: the test reports it with the log
            report.failure = f"{type(error).__name__}: {error}"
        finally:
            try:
                page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
            except Exception:
                pass
            context.close()
        report.console = report.console[-20:]
        if report.failure or report.problems or report.interaction:
            report.log = self.log.read_text()[-3000:]
        return report

    def close(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
