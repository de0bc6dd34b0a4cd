#!/usr/bin/env python3
"""Build the course's static site: every notebook executed on the CPU and rendered with its
outputs, the measured performance tables, and every Slurm file beside the notebook of the
script it runs.

    python docs/build_site.py [--out site] [--quick]      # `make site` runs this
    python docs/build_site.py --out DIR --executed artifacts/executed   # notebooks executed beforehand

The notebooks run under papermill on the CPU (CUDA_VISIBLE_DEVICES="") with small but real
parameters (site_parameters below: a synthetic dataset of 10 classes at 64 px, made once
under data/, ResNet-18 from random weights, 2-3 epochs): about 4 minutes on 2 cores. `--quick` (or SITE_QUICK=1) uses
the tests' tiny parameters instead (`small_parameters` in tests/test_notebooks.py).
`--executed DIR` executes nothing: it renders DIR/<name>.ipynb, notebooks that papermill
executed earlier (the tests execute each notebook once per run, into artifacts/executed/),
without the cells the tests added to them (tag `added-by-tests`: each exercise's solution and
its check run again).

The site is built in temporary directories and renamed over --out only when complete: a
failed or interrupted build leaves the previous site as it was.

Pages: index.html (the lessons in TEACHING_ORDER, the Slurm files, the performance
tables), notebooks/<name>.html, slurm/<file>.html, performance.html (from
docs/performance.md, when it exists).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import html
import json
import mimetypes
import os
import platform
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SCRIPTS = ROOT / "scripts"
SLURM = ROOT / "slurm"
PERFORMANCE = ROOT / "docs" / "performance.md"
sys.path.insert(0, str(SCRIPTS))
from data import UserError, run_cli  # noqa: E402  (the course's one way to report user mistakes)

# Cells with this tag are not part of the lesson: the tests add each exercise's solution and its
# check again after the shipped check (tests/notebook_tools.py); --executed leaves them out.
ADDED_BY_TESTS = "added-by-tests"

MARKER = ".built-by-build_site"  # in every site this tool writes; it only ever replaces such a directory

# The lessons in teaching order. Every notebook in notebooks/ must be listed here.
TEACHING_ORDER = ("data", "model", "train", "resilience", "sweep", "train_dp", "train_ddp", "speed", "benchmark")

# The site's dataset: made once (scripts/data.py synthetic) and reused by later builds.
SITE_DATA = {"classes": 10, "train": 40, "valid": 10, "test": 10, "image_size": 64}
SITE_DATA_DIR = ROOT / "data" / "site-birds-synthetic-{classes}c-{image_size}px".format(**SITE_DATA)


def site_parameters(name: str, data_dir: str, work: Path) -> dict:
    """Each notebook's parameters for the site: real runs, sized for a 2-core CPU."""
    common = {"data_dir": data_dir, "image_size": SITE_DATA["image_size"]}
    return {
        "data": {**common, "batch_size": 32, "max_workers": 2, "batches_to_time": 6},
        "model": {"num_classes": SITE_DATA["classes"], "image_size": SITE_DATA["image_size"], "arch": "resnet18"},
        "train": {**common, "arch": "resnet18", "weights": "none", "epochs": 3, "batch_size": 32, "workers": 1,
                  "out_dir": str(work / "run")},
        "resilience": {**common, "image_size": 32, "epochs": 2, "batch_size": 8, "out_dir": str(work / "run")},
        "speed": {**common, "batch_size": 16, "out_dir": str(work / "run")},
        "sweep": {**common, "image_size": 32, "epochs": 2, "sweep_file": str(SLURM / "sweep.csv"), "runs_dir": str(work / "runs")},
        "train_dp": {**common, "epochs": 2, "batch_size": 32, "workers": 1, "out_dir": str(work / "run")},
        "train_ddp": {**common, "epochs": 2, "batch_size": 16, "processes": 2, "out_dir": str(work / "run")},
        "benchmark": {**common, "arch": "resnet18", "batch_size": 16, "images": 64, "warmup": 1, "steps": 3,
                      "repeats": 2, "out_dir": str(work / "bench")},
    }[name]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


# ---------------------------------------------------------------------------------------
# What the site is made of


@dataclass
class Notebook:
    name: str
    number: int
    title: str
    intro: str  # the first paragraph of the first markdown cell (Markdown)
    slurm: list[str] = field(default_factory=list)  # Slurm files that run its script
    seconds: float = 0.0
    parameters: dict = field(default_factory=dict)


@dataclass
class SlurmFile:
    name: str
    text: str
    about: str  # the leading comment
    scripts: list[str]  # notebook names of the scripts/<name>.py it runs
    uses: list[str]  # other files of slurm/ it names


def teaching_order(present: list[str]) -> list[str]:
    """TEACHING_ORDER, checked against the notebooks that exist."""
    missing = sorted(set(present) - set(TEACHING_ORDER))
    if missing:
        raise UserError(f"notebooks/{missing[0]}.ipynb is not in TEACHING_ORDER of docs/build_site.py: "
                        f"add {', '.join(missing)} where it belongs in the course")
    gone = [n for n in TEACHING_ORDER if n not in present]
    if gone:
        raise UserError(f"TEACHING_ORDER in docs/build_site.py names {gone[0]}, but notebooks/{gone[0]}.ipynb does not exist")
    return list(TEACHING_ORDER)


def read_notebook(name: str, number: int) -> Notebook:
    cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]
    first = next(("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"), "")
    title, intro = name, ""
    heading = re.match(r"#\s+(\d+)\.", first.lstrip())
    if heading and int(heading.group(1)) != number:
        raise UserError(f"notebooks/{name}.ipynb calls itself lesson {heading.group(1)}, but TEACHING_ORDER in "
                        f"docs/build_site.py puts it at {number}: make the two agree")
    blocks = [b.strip() for b in re.split(r"\n\s*\n", first) if b.strip()]
    for i, block in enumerate(blocks):
        if block.startswith("# ") and title == name:
            title = re.sub(r"^\d+\.\s*", "", block[2:].strip())  # "3. Training on one device"
        elif not block.startswith(("#", "```", "|", "<", "*", "-")):
            intro = block
            following = blocks[i + 1] if i + 1 < len(blocks) else ""
            if intro.endswith(":") and following.count("```") != 1:  # "... two ways:" and its list or code
                intro += "\n\n" + following
            break
    return Notebook(name, number, title, intro)


def leading_comment(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#") or line.startswith("#SBATCH"):
            break
        lines.append(line[1:].strip())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(lines).strip())[0] if lines else ""  # the first sentence


def read_slurm(notebooks: list[str]) -> list[SlurmFile]:
    files = []
    for path in sorted(p for p in SLURM.iterdir() if p.is_file() and not p.name.startswith(".")):
        text = path.read_text()
        scripts = list(dict.fromkeys(re.findall(r"\bscripts/(\w+)\.py\b", text)))
        for script in scripts:
            if script not in notebooks:
                raise UserError(f"slurm/{path.name} runs scripts/{script}.py, which has no notebook notebooks/{script}.ipynb")
        uses = [u for u in dict.fromkeys(re.findall(r"\bslurm/([\w.-]+)", text))
                if u != path.name and (SLURM / u).is_file()]
        about = leading_comment(text)
        if path.suffix == ".csv" and text.strip():
            header, *rows = text.strip().splitlines()
            about = f"{len(rows)} row{'s' if len(rows) != 1 else ''} of columns {header.replace(',', ', ')}"
        files.append(SlurmFile(path.name, text, about, scripts, uses))
    return files


# ---------------------------------------------------------------------------------------
# Executing the notebooks


def quick_parameters():
    """The tests' tiny dataset and parameters (tests/conftest.py, tests/test_notebooks.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from conftest import TINY
        from test_notebooks import small_parameters
    except ImportError as error:
        raise UserError(f"--quick needs the tests' parameters: {error}") from None
    return TINY, small_parameters


def make_synthetic(target: Path, classes: int, per_class: tuple[int, int, int], image_size: int) -> Path:
    """scripts/data.py synthetic into a temporary sibling, renamed into place when complete."""
    if (target / "birds.csv").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        command = [sys.executable, str(SCRIPTS / "data.py"), "synthetic", str(partial / "d"), "--classes", str(classes),
                   "--train", str(per_class[0]), "--valid", str(per_class[1]), "--test", str(per_class[2]),
                   "--image-size", str(image_size), "--seed", "0"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise UserError(f"making the synthetic dataset failed: {(done.stderr.strip() or 'no message').splitlines()[-1]}")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        (partial / "d").rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def kernel_environment() -> None:
    """The kernels inherit this process's environment: CPU only, no Slurm job, no W&B network."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "WANDB_", "KAGGLE_"))]:
        del os.environ[key]
    os.environ.update({"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"})
    os.environ.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 4)))
    # OpenMP threads that spin while waiting make PyTorch up to 30 times slower on a machine
    # where other processes compete for the cores; sleeping threads cost little when it is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def check_parameters(name: str, parameters: dict) -> None:
    import papermill
    known = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise UserError(f"notebooks/{name}.ipynb has no parameter {unknown[0]!r} (its parameters cell: "
                        f"{', '.join(known) or 'none'}): update the parameters given to it")


def last_output_line(executed: Path, count) -> str:
    """The last line a failed cell printed: a bare `assert` has no message of its own."""
    try:
        cell = next(c for c in json.loads(executed.read_text())["cells"] if c.get("execution_count") == count)
    except (OSError, ValueError, StopIteration):
        return ""
    text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"its last output: {lines[-1][:300]}" if lines else ""


@contextlib.contextmanager
def stderr_to(path: Path):
    """Send file descriptor 2, which the kernels inherit, to a file: their logs are noise unless they die."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def execute(name: str, parameters: dict, target: Path) -> float:
    import papermill
    from papermill.exceptions import PapermillExecutionError
    start = time.monotonic()
    log = target.with_suffix(".kernel.log")
    try:
        with stderr_to(log):
            papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(target), parameters=parameters,
                                       cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
                                       execution_timeout=900)
    except PapermillExecutionError as error:
        kept = Path(tempfile.gettempdir()) / f"build_site-{name}-failed.ipynb"
        if target.is_file():
            shutil.copyfile(target, kept)
        message = ((error.evalue or "").strip().splitlines() or [""])[-1] or last_output_line(target, error.exec_count)
        raise UserError(f"notebooks/{name}.ipynb failed in cell {error.exec_count}: {error.ename}: {message} "
                        f"(executed copy: {kept})") from None
    except Exception as error:  # a dead kernel, a timeout, no kernel
        kept = Path(tempfile.gettempdir()) / f"build_site-{name}-kernel.log"
        if log.is_file():
            shutil.copyfile(log, kept)
        raise UserError(f"notebooks/{name}.ipynb did not run: {type(error).__name__}: "
                        f"{(str(error).strip().splitlines() or [''])[-1]} (kernel log: {kept})") from None
    return time.monotonic() - start


def take_executed(source: Path, target: Path) -> tuple[float, dict]:
    """Copy a notebook papermill executed earlier to target without the cells the tests added;
    return its execution time and parameters. One with an error output is refused, as a failed
    execution is."""
    try:
        node = json.loads(source.read_text())
    except OSError:
        raise UserError(f"--executed: {source} does not exist: execute every notebook into that directory first") from None
    except ValueError:
        raise UserError(f"--executed: {source} is not a notebook (JSON)") from None
    run = node.get("metadata", {}).get("papermill")
    if not run or run.get("duration") is None:
        raise UserError(f"--executed: {source} was not executed by papermill to the end")
    node["cells"] = [c for c in node["cells"] if ADDED_BY_TESTS not in c.get("metadata", {}).get("tags", [])]
    for i, cell in enumerate(node["cells"]):
        failed = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)
        if failed:
            raise UserError(f"--executed: {source} failed in cell {i}: {failed.get('ename')}: "
                            f"{(failed.get('evalue') or '').strip()[:300]}")
    target.write_text(json.dumps(node))
    return run["duration"], run.get("parameters", {})


# ---------------------------------------------------------------------------------------
# Rendering

CSS = """
body.site { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; margin: 0; background: #fff; }
.site main { max-width: 1100px; margin: 0 auto; padding: 0 24px 48px; }
.site-nav { background: #1d3557; color: #fff; padding: 10px 24px; font: 15px/1.4 system-ui, sans-serif; }
.site-nav a, .site .site-nav a { color: #fff; text-decoration: none; margin-right: 16px; }
.site-nav a:hover { text-decoration: underline; }
.site-nav .here { font-weight: 600; border-bottom: 2px solid #f1c40f; }
.site h1 { font-size: 30px; margin: 28px 0 8px; }
.site h2 { font-size: 22px; margin: 36px 0 10px; border-bottom: 1px solid #dde3ea; padding-bottom: 4px; }
.site .lede { color: #4a5566; margin-top: 0; }
.site code { background: #f2f4f7; padding: 1px 4px; border-radius: 3px; font-size: 90%; }
.site pre code { background: none; padding: 0; }
.site table { border-collapse: collapse; margin: 12px 0; font-size: 15px; }
.site th, .site td { border: 1px solid #dde3ea; padding: 5px 10px; vertical-align: top; text-align: left; }
.site th { background: #f5f7fa; }
ol.lessons { list-style: none; padding: 0; }
ol.lessons > li { display: grid; grid-template-columns: 44px 1fr; gap: 4px 12px; padding: 12px 0; border-bottom: 1px solid #eef1f4; }
ol.lessons > li > .num { grid-row: span 3; font-size: 26px; font-weight: 700; color: #457b9d; text-align: right; }
ol.lessons > li > .title { font-size: 19px; font-weight: 600; }
ol.lessons .intro { color: #333c48; }
ol.lessons .meta { font-size: 14px; color: #5d6878; }
.site a { color: #1d5fa8; }
.slurm-page { display: grid; grid-template-columns: minmax(0, 3fr) minmax(240px, 1.2fr); gap: 24px; align-items: start; }
.slurm-page pre { background: #f7f8fa; border: 1px solid #dde3ea; border-radius: 4px; padding: 12px; overflow-x: auto;
  font: 13px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; margin: 0; }
.slurm-page aside { background: #f5f8fc; border: 1px solid #d6e2ef; border-radius: 4px; padding: 4px 16px 12px; font-size: 15px; }
.slurm-page aside h3 { font-size: 16px; margin: 12px 0 4px; }
pre .sbatch { color: #1d3557; font-weight: 600; }
pre .comment { color: #6a7585; font-weight: normal; }
.banner { background: #f5f8fc; border: 1px solid #d6e2ef; border-radius: 4px; padding: 8px 14px; margin: 16px 0;
  font: 14px/1.5 system-ui, sans-serif; color: #333c48; }
.banner a { color: #1d5fa8; text-decoration: underline; }
.banner code { background: #e8eef5; padding: 0 3px; border-radius: 3px; }
.footer { color: #7a8494; font-size: 13px; margin-top: 40px; }
"""


def md_renderer():
    import mistune
    return mistune.create_markdown(escape=False, plugins=["table", "strikethrough", "url"])


def rel(page: str, target: str) -> str:
    """The link from site page `page` (e.g. slurm/train.sbatch.html) to `target` (e.g. notebooks/train.html)."""
    return os.path.relpath(target, os.path.dirname(page) or ".")


def notebook_page(name: str) -> str:
    return f"notebooks/{name}.html"


def slurm_page(name: str) -> str:
    return f"slurm/{name}.html"


def repo_target(path: str, notebooks: list[str], slurm: list[str]) -> str | None:
    """The site page for a repository path (notebooks/x.ipynb, scripts/x.py, slurm/f), if it has one."""
    if m := re.fullmatch(r"(?:notebooks/(\w+)\.ipynb|scripts/(\w+)\.py)", path):
        name = m.group(1) or m.group(2)
        return notebook_page(name) if name in notebooks else None
    if m := re.fullmatch(r"slurm/([\w.-]+)", path):
        return slurm_page(m.group(1)) if m.group(1) in slurm else None
    if path in ("docs/performance.md",):
        return "performance.html"
    return None


def link_repo_paths(text: str, page: str, source: str, notebooks: list[str], slurm: list[str]) -> str:
    """Point links to repository files at their site pages, and make inline code naming them a link.

    source: the document's directory in the repository ("docs", "notebooks"); its links are relative to it."""
    def href(m):
        url = m.group(2)
        if re.match(r"^[a-z]+:|^#|^/", url):
            return m.group(0)
        path, _, anchor = url.partition("#")
        repo_path = posixpath.normpath(posixpath.join(source, html.unescape(path)))
        target = repo_target(repo_path, notebooks, slurm)
        return m.group(0) if target is None else f'{m.group(1)}"{rel(page, target)}{"#" + anchor if anchor else ""}"'

    text = re.sub(r'(href=)"([^"]+)"', href, text)

    def code(m):
        target = repo_target(m.group(1), notebooks, slurm)
        return m.group(0) if target in (None, page) else f'<a href="{rel(page, target)}">{m.group(0)}</a>'

    return re.sub(r"(?<!>)<code>((?:notebooks|scripts|slurm|docs)/[\w./-]+)</code>(?!</a>)", code, text)


def embed_images(text: str, source_dir: Path) -> str:
    """Inline local images of a Markdown document, so its page needs no copies of them."""
    def src(m):
        url = m.group(2)
        if re.match(r"^[a-z]+:", url):
            return m.group(0)
        path = (source_dir / url).resolve()
        if not path.is_file():
            return m.group(0)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f'{m.group(1)}"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"'
    return re.sub(r'(<img[^>]*?\bsrc=)"([^"]+)"', src, text)


@dataclass
class Site:
    notebooks: list[Notebook]
    slurm: list[SlurmFile]
    quick: bool
    built: str
    machine: str
    seconds: float = 0.0
    performance: bool = False
    executed_from: str = ""  # --executed: where the executed notebooks came from

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.notebooks]

    @property
    def slurm_names(self) -> list[str]:
        return [s.name for s in self.slurm]

    def nav(self, page: str, here: str = "") -> str:
        items = [("index.html", "Course", "index")]
        items += [(notebook_page(n.name), f"{n.number}. {n.name}", n.name) for n in self.notebooks]
        if self.performance:
            items.append(("performance.html", "Performance", "performance"))
        items.append(("index.html#slurm", "Slurm files", "slurm"))
        here_class = ' class="here"'
        links = "".join(f'<a href="{rel(page, target)}"{here_class if key == here else ""}>{html.escape(label)}</a>'
                        for target, label, key in items)
        return f'<nav class="site-nav">{links}</nav>'

    def page(self, page: str, title: str, body: str, here: str = "") -> str:
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
                f'<body class="site">\n{self.nav(page, here)}\n<main>\n{body}\n'
                f'<p class="footer">{html.escape(self.built_line())}</p>\n</main>\n</body>\n</html>\n')

    def built_line(self) -> str:
        if self.executed_from:
            return f"Built {self.built} by docs/build_site.py from notebooks executed beforehand ({self.executed_from})."
        mode = "tiny test parameters (--quick)" if self.quick else "small CPU parameters"
        return f"Built {self.built} by docs/build_site.py: notebooks executed with {mode} on {self.machine}."

    def md(self, text: str, page: str, source: str, images: Path | None = None) -> str:
        """Markdown from the repository directory `source` as HTML; local images from `images` are inlined."""
        rendered = link_repo_paths(md_renderer()(text), page, source, self.names, self.slurm_names)
        return embed_images(rendered, images) if images else rendered

    # --- pages

    def index(self, title: str) -> str:
        page = "index.html"
        lessons = []
        for nb in self.notebooks:
            runs = [f'<a href="{slurm_page(s)}"><code>{html.escape(s)}</code></a>' for s in nb.slurm]
            meta = [f"script <code>scripts/{nb.name}.py</code>", f"executed in {nb.seconds:.0f} s"]
            if runs:
                meta.append("run by " + ", ".join(runs))
            lessons.append(
                f'<li><span class="num">{nb.number}</span>'
                f'<a class="title" href="{notebook_page(nb.name)}">{html.escape(nb.title)}</a>'
                f'<div class="intro">{self.md(nb.intro, page, "notebooks")}</div>'
                f'<div class="meta">{" · ".join(meta)}</div></li>')
        body = [f"<h1>{html.escape(title)}</h1>",
                '<p class="lede">The course\'s notebooks in teaching order, executed on a CPU with small '
                "datasets and models so that every output, table and plot below is real; on a cluster the "
                "same code trains a ResNet-152 on the full dataset. "
                + ("The measured GPU numbers are under <a href=\"performance.html\">Performance</a>. " if self.performance else "")
                + "Each Slurm file is shown beside the notebook of the script it runs.</p>",
                "<h2 id=\"lessons\">Lessons</h2>", '<ol class="lessons">', *lessons, "</ol>"]
        if self.performance:
            body += ['<h2 id="performance">Performance</h2>',
                     '<p>The measured throughput tables: <a href="performance.html">Performance</a> '
                     "(from <code>docs/performance.md</code>).</p>"]
        jobs = [s for s in self.slurm if s.name.endswith(".sbatch")]
        shared = [s for s in self.slurm if not s.name.endswith(".sbatch")]
        rows = []
        for s in jobs:
            runs = ", ".join(f'<a href="{notebook_page(n)}">{html.escape(n)}</a>' for n in s.scripts) or "&mdash;"
            rows.append(f'<tr><td><a href="{slurm_page(s.name)}"><code>{html.escape(s.name)}</code></a></td>'
                        f"<td>{html.escape(s.about)}</td><td>{runs}</td></tr>")
        body += ['<h2 id="slurm">Slurm files</h2>',
                 "<p>Batch files: submit them with <code>sbatch</code> from the course's root directory. Each page "
                 "shows the file beside the lesson whose script it runs.</p>",
                 "<table><tr><th>batch file</th><th>what</th><th>lesson of the script it runs</th></tr>",
                 *rows, "</table>"]
        if shared:
            rows = []
            for s in shared:
                users = [o.name for o in jobs if s.name in o.uses]
                used = ", ".join(f'<a href="{slurm_page(u)}"><code>{html.escape(u)}</code></a>' for u in users) or "&mdash;"
                rows.append(f'<tr><td><a href="{slurm_page(s.name)}"><code>{html.escape(s.name)}</code></a></td>'
                            f"<td>{html.escape(s.about)}</td><td>{used}</td></tr>")
            body += ["<p>Files the batch files share:</p>",
                     "<table><tr><th>file</th><th>what</th><th>used by</th></tr>", *rows, "</table>"]
        return self.page(page, title, "\n".join(body), "index")

    def slurm_file(self, s: SlurmFile) -> str:
        page = slurm_page(s.name)
        lines = []
        for line in s.text.splitlines():
            escaped = html.escape(line)
            if line.startswith("#SBATCH"):
                directive, sep, comment = escaped.partition(" #")
                escaped = f'<span class="sbatch">{directive}</span>' + (f'<span class="comment"> #{comment}</span>' if sep else "")
            elif line.lstrip().startswith("#"):
                escaped = f'<span class="comment">{escaped}</span>'
            lines.append(escaped)
        text = "\n".join(lines)
        text = re.sub(r"\bscripts/(\w+)\.py\b", lambda m: f'<a href="{rel(page, notebook_page(m.group(1)))}">{m.group(0)}</a>'
                      if m.group(1) in self.names else m.group(0), text)
        text = re.sub(r"\bslurm/([\w.-]+)", lambda m: f'<a href="{rel(page, slurm_page(m.group(1)))}">{m.group(0)}</a>'
                      if m.group(1) in self.slurm_names and m.group(1) != s.name else m.group(0), text)
        by_name = {nb.name: nb for nb in self.notebooks}
        side = []
        for name in s.scripts:
            nb = by_name[name]
            side.append(f'<h3>{"Runs" if s.name.endswith(".sbatch") else "Calls"} <code>scripts/{name}.py</code></h3>'
                        f'<p>the export of lesson {nb.number}, <a href="{rel(page, notebook_page(name))}">'
                        f'{html.escape(nb.title)}</a>.</p>{self.md(nb.intro, page, "notebooks")}')
        users = [o.name for o in self.slurm if s.name in o.uses]
        if s.uses:
            side.append("<h3>Uses</h3><p>" + ", ".join(
                f'<a href="{rel(page, slurm_page(u))}"><code>slurm/{html.escape(u)}</code></a>' for u in s.uses) + "</p>")
        if users:
            side.append("<h3>Used by</h3><p>" + ", ".join(
                f'<a href="{rel(page, slurm_page(u))}"><code>{html.escape(u)}</code></a>' for u in users) + "</p>")
        if not side:
            side.append("<p>Runs no script of the course.</p>")
        submit = (f'<p class="lede">Submit with <code>sbatch slurm/{html.escape(s.name)}</code> from the course\'s root '
                  "directory.</p>" if s.name.endswith(".sbatch") else "")
        body = (f"<h1><code>slurm/{html.escape(s.name)}</code></h1>"
                + (f'<p class="lede">{html.escape(s.about)}</p>' if s.about else "") + submit
                + f'<div class="slurm-page"><pre>{text}</pre><aside>{"".join(side)}</aside></div>')
        return self.page(page, f"slurm/{s.name}", body, "slurm")

    def performance_page(self) -> str:
        page = "performance.html"
        body = self.md(PERFORMANCE.read_text(), page, "docs", PERFORMANCE.parent)
        if "<h1" not in body:
            body = "<h1>Performance</h1>\n" + body
        return self.page(page, "Performance", body, "performance")

    def notebook(self, nb: Notebook, executed: Path) -> str:
        import nbformat
        from nbconvert import HTMLExporter
        page = notebook_page(nb.name)
        node = nbformat.read(str(executed), as_version=4)
        exporter = HTMLExporter(template_name="lab")
        body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": f"{nb.number}. {nb.title}"}})
        body = link_repo_paths(body, page, "notebooks", self.names, self.slurm_names)
        i = self.names.index(nb.name)
        steps = []
        if i:
            steps.append(f'&larr; <a href="{rel(page, notebook_page(self.names[i - 1]))}">{self.names[i - 1]}</a>')
        if i + 1 < len(self.names):
            steps.append(f'<a href="{rel(page, notebook_page(self.names[i + 1]))}">{self.names[i + 1]}</a> &rarr;')
        runs = ", ".join(f'<a href="{rel(page, slurm_page(s))}"><code>slurm/{html.escape(s)}</code></a>' for s in nb.slurm)
        banner = (f'<div class="banner">Lesson {nb.number} of {len(self.names)}: executed in {nb.seconds:.0f} s on '
                  f"{html.escape(self.machine)}, with the values of the cell <code># Parameters</code>. The notebook is also "
                  f"<code>scripts/{nb.name}.py</code>"
                  + (f"; on a cluster {runs} {'runs' if len(nb.slurm) == 1 else 'run'} it." if runs else ".")
                  + (f' <span style="float:right">{" · ".join(steps)}</span>' if steps else "") + "</div>")
        header = f"{self.nav(page, nb.name)}<div style=\"padding:0 24px\">{banner}</div>"
        body = body.replace("</head>", f"<style>{CSS}</style>\n</head>", 1)
        return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + "\n" + header, body, count=1)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version
        torch = f", PyTorch {version('torch')}"
    except Exception:
        torch = ""
    return f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPU cores ({cpu}){torch}"


# ---------------------------------------------------------------------------------------
# Building


def check_out(out: Path) -> Path:
    out = out.resolve()
    if out == ROOT or ROOT.is_relative_to(out) or out in (NOTEBOOKS, SCRIPTS, SLURM, ROOT / "docs", ROOT / "tests"):
        raise UserError(f"--out {out} would replace the course's own files: choose a new directory, e.g. site")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out} exists and was not built by docs/build_site.py: choose another directory or delete it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its parent directory {out.parent} does not exist")
    return out


def publish(staging: Path, out: Path) -> None:
    """Put the complete site `staging` in place of `out`: two renames, the old site removed last."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp made it private; a web server must read it
    (staging / MARKER).write_text("Built by docs/build_site.py; the next build replaces this directory.\n")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(out: Path, quick: bool, log=lambda message: print(message, file=sys.stderr, flush=True),
          executed_from: Path | None = None) -> Site:
    start = time.monotonic()
    out = check_out(out)
    present = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    names = teaching_order(present)
    notebooks = [read_notebook(name, i + 1) for i, name in enumerate(names)]
    slurm = read_slurm(names)
    for nb in notebooks:
        nb.slurm = [s.name for s in slurm if s.name.endswith(".sbatch") and nb.name in s.scripts]
    try:
        import mistune  # noqa: F401
        import nbconvert  # noqa: F401
        if executed_from is None:
            import papermill  # noqa: F401
    except ImportError as error:
        raise UserError(f"{error.name} is missing: run with the course's environment (.venv/bin/python, `make site`)") from None

    with tempfile.TemporaryDirectory(prefix="build_site-") as tmp:
        work = Path(tmp)
        executed = work / "executed"
        executed.mkdir()
        if executed_from is None:
            execute_all(notebooks, quick, work, executed, log)
        else:
            for nb in notebooks:
                nb.seconds, nb.parameters = take_executed(executed_from / f"{nb.name}.ipynb", executed / f"{nb.name}.ipynb")

        site = Site(notebooks, slurm, quick, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    machine_description(), performance=PERFORMANCE.is_file(),
                    executed_from=str(executed_from or ""))
        title = next((line[2:].strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("# ")),
                     "The course") if (ROOT / "README.md").is_file() else "The course"
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            (staging / "notebooks").mkdir()
            (staging / "slurm").mkdir()
            for nb in notebooks:
                (staging / notebook_page(nb.name)).write_text(site.notebook(nb, executed / f"{nb.name}.ipynb"))
            for s in slurm:
                (staging / slurm_page(s.name)).write_text(site.slurm_file(s))
            if site.performance:
                (staging / "performance.html").write_text(site.performance_page())
            (staging / "index.html").write_text(site.index(title))
            publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    site.seconds = time.monotonic() - start
    log(f"site: {out / 'index.html'} ({len(notebooks)} notebooks, {len(slurm)} Slurm files"
        f"{', performance tables' if site.performance else ''}) built in {site.seconds:.0f} s")
    return site


def execute_all(notebooks: list[Notebook], quick: bool, work: Path, executed: Path, log) -> None:
    """Execute every notebook into executed/<name>.ipynb with the site's (or --quick, the tests')
    parameters; each gets its own run directories under work/<name>."""
    kernel_environment()
    if quick:
        tiny, small_parameters = quick_parameters()
        data_dir = make_synthetic(work / "birds-synthetic", tiny["classes"], tiny["per_class"], tiny["image_size"])
        parameters = lambda name: small_parameters(name, data_dir, work / name)  # noqa: E731
    else:
        if not (SITE_DATA_DIR / "birds.csv").is_file():
            log(f"making the site's dataset {SITE_DATA_DIR.relative_to(ROOT)} (once)")
        data_dir = make_synthetic(SITE_DATA_DIR, SITE_DATA["classes"],
                                  (SITE_DATA["train"], SITE_DATA["valid"], SITE_DATA["test"]), SITE_DATA["image_size"])
        relative = os.path.relpath(data_dir, NOTEBOOKS)  # reads as in the notebooks: ../data/...
        parameters = lambda name: site_parameters(name, relative, work / name)  # noqa: E731
    for nb in notebooks:
        nb.parameters = parameters(nb.name)
        check_parameters(nb.name, nb.parameters)
    for nb in notebooks:
        (work / nb.name).mkdir(exist_ok=True)
        nb.seconds = execute(nb.name, nb.parameters, executed / f"{nb.name}.ipynb")
        log(f"executed notebooks/{nb.name}.ipynb in {nb.seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "site", help="the site's directory (default: site/)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("SITE_QUICK", "") not in ("", "0"),
                        help="the tests' tiny parameters instead of the site's (also SITE_QUICK=1)")
    parser.add_argument("--executed", type=Path, metavar="DIR",
                        help="execute nothing: render DIR/<name>.ipynb, executed earlier by papermill "
                             "(the tests' artifacts/executed), without the cells the tests added")
    args = parser.parse_args(argv)
    if args.executed is not None and not args.executed.is_dir():
        raise UserError(f"--executed {args.executed} is not a directory: execute the notebooks into it first")
    build(args.out, args.quick, executed_from=args.executed)
    return 0


if __name__ == "__main__":
    run_cli(main)  # a UserError is one line and exit 2, as in every script of the course
