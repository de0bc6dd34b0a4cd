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

The pages are Sphinx's: this script writes a Sphinx source folder laid out as the repository
(conf.py; index.md: the lessons in TEACHING_ORDER, the documents, the Slurm files;
notebooks/<name>.ipynb, the executed copies, which MyST-NB renders with their stored outputs;
slurm/<file>.md, each file beside the lesson of the script it runs; docs/<page>.md, the
performance tables among them) and builds it with `sphinx-build -W -b html`, in this process.
Nothing on a page loads from another host.

The site is built in temporary directories and renamed over --out only when complete: a
failed or interrupted build leaves the previous site as it was.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
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
DOCS = ROOT / "docs"
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
# The pages: a Sphinx source folder laid out as the repository (notebooks/, slurm/, docs/),
# rendered by MyST-NB from the notebooks' stored outputs (its execution is off)

CONF = """\
# Written by docs/build_site.py for each build.
project = {title!r}
extensions = ["myst_nb"]
nb_execution_mode = "off"  # the notebooks were executed by build_site.py (papermill) or by the tests
nb_ipywidgets_js = {{}}  # no widget scripts from unpkg or cdnjs: the site works offline
myst_enable_extensions = []  # no dollarmath: a page with math would load MathJax from a CDN
myst_heading_anchors = 3  # links to a heading of a docs page (troubleshooting.md#a-job-that-never-starts)
html_theme = "alabaster"
html_theme_options = {{"show_powered_by": False, "page_width": "1400px"}}
html_show_sphinx = False
html_copy_source = False
html_static_path = ["_static"]
html_css_files = ["site.css"]  # each Slurm file beside its lesson: Sphinx puts code blocks below a sidebar
# Solutions in Markdown fences marked python hold IPython's `!command` lines: Pygments highlights them
# in its relaxed mode instead.
suppress_warnings = ["misc.highlighting_failure"]
"""

IMAGES = (".png", ".svg", ".jpg", ".jpeg", ".gif")  # docs/ files that docs pages may show


def site_target(repo_path: str, notebooks: list[str], slurm: list[str]) -> str | None:
    """The source of the site's page for a repository path (scripts/x.py shows as its notebook), if any."""
    if m := re.fullmatch(r"(?:notebooks/(\w+)\.ipynb|scripts/(\w+)\.py)", repo_path):
        name = m.group(1) or m.group(2)
        return f"notebooks/{name}.ipynb" if name in notebooks else None
    if m := re.fullmatch(r"slurm/([\w.-]+)", repo_path):
        return f"slurm/{m.group(1)}.md" if m.group(1) in slurm else None
    if repo_path.startswith("docs/") and repo_path.endswith((".md", *IMAGES)) and (ROOT / repo_path).is_file():
        return repo_path
    return None


def site_markdown(text: str, source: str, page: str, notebooks: list[str], slurm: list[str]) -> str:
    """Markdown of the repository folder `source` for the site page `page`: links to repository files
    point at their pages (a file the site does not show keeps its text, unlinked), and inline code
    naming one becomes a link."""
    def link(m):
        bang, label, url = m.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", url):
            return m.group(0)
        path, hash_, anchor = url.partition("#")
        target = site_target(posixpath.normpath(posixpath.join(source, path)), notebooks, slurm)
        if target is None:
            return label
        return f"{bang}[{label}]({posixpath.relpath(target, posixpath.dirname(page) or '.')}{hash_}{anchor})"

    def code(m):
        target = site_target(m.group(1), notebooks, slurm)
        if target in (None, page):
            return m.group(0)
        return f"[{m.group(0)}]({posixpath.relpath(target, posixpath.dirname(page) or '.')})"

    text = re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", link, text)
    return re.sub(r"(?<!\[)`((?:notebooks|scripts|slurm|docs)/[\w./-]+)`(?!\])", code, text)


def fence(text: str, language: str) -> str:
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def indent(text: str, spaces: int = 3) -> str:
    return "\n".join(" " * spaces + line if line.strip() else "" for line in text.splitlines())


def table(header: list[str], rows: list[list[str]]) -> str:
    cells = lambda row: "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"  # noqa: E731
    return "\n".join([cells(header), cells(["---"] * len(header)), *map(cells, rows)])


def lesson_page(nb: Notebook, executed: Path, total: int, machine: str, names: list[str], slurm: list[str]) -> str:
    """The executed notebook as the site shows it: a banner after its first Markdown cell, links to
    repository files pointing at their pages, and its hidden cells' code folded."""
    node = json.loads(executed.read_text())
    for cell in node["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = site_markdown("".join(cell["source"]), "notebooks", f"notebooks/{nb.name}.ipynb", names, slurm)
        elif cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"):
            cell["metadata"].setdefault("tags", []).append("hide-input")
    runs = ", ".join(f"[`slurm/{s}`](../slurm/{s}.md)" for s in nb.slurm)
    banner = (f"Lesson {nb.number} of {total}: executed in {nb.seconds:.0f} s on {machine}, with the values of the "
              f"cell `# Parameters`. The notebook is also `scripts/{nb.name}.py`"
              + (f"; on a cluster {runs} {'runs' if len(nb.slurm) == 1 else 'run'} it." if runs else "."))
    first = next((i for i, c in enumerate(node["cells"]) if c["cell_type"] == "markdown"), -1)
    node["cells"].insert(first + 1, {"cell_type": "markdown", "id": "site-banner", "metadata": {},
                                     "source": fence(banner, "{note}")})
    node["metadata"].setdefault("language_info", {"name": "python", "pygments_lexer": "ipython3"})  # `!` lines
    return json.dumps(node)


def index_page(title: str, notebooks: list[Notebook], slurm: list[SlurmFile], docs: dict[str, str], built: str) -> str:
    names, slurm_names = [nb.name for nb in notebooks], [s.name for s in slurm]
    lessons = []
    for nb in notebooks:
        meta = [f"script `scripts/{nb.name}.py`", f"executed in {nb.seconds:.0f} s"]
        if nb.slurm:
            meta.append("run by " + ", ".join(f"[`{s}`](slurm/{s}.md)" for s in nb.slurm))
        intro = site_markdown(nb.intro, "notebooks", "index.md", names, slurm_names)
        lessons.append(f"{nb.number}. [{nb.title}](notebooks/{nb.name}.ipynb)\n\n{indent(intro)}\n\n{indent(' · '.join(meta))}")
    jobs = [s for s in slurm if s.name.endswith(".sbatch")]
    shared = [s for s in slurm if not s.name.endswith(".sbatch")]
    page_link = lambda s: f"[`{s}`](slurm/{s}.md)"  # noqa: E731
    job_rows = [[page_link(s.name), s.about, ", ".join(f"[{n}](notebooks/{n}.ipynb)" for n in s.scripts) or "—"]
                for s in jobs]
    shared_rows = [[page_link(s.name), s.about, ", ".join(page_link(o.name) for o in jobs if s.name in o.uses) or "—"]
                   for s in shared]
    toctrees = [fence(":hidden:\n:caption: " + caption + "\n\n" + "\n".join(entries), "{toctree}") for caption, entries in
                (("Lessons", [f"notebooks/{n}" for n in names]), ("Documents", [d.removesuffix(".md") for d in docs]),
                 ("Slurm files", [f"slurm/{s}" for s in slurm_names]))]
    return "\n\n".join([
        f"# {title}",
        "The course's notebooks in teaching order, executed on a CPU with small datasets and models so that every "
        "output, table and plot below is real; on a cluster the same code trains a ResNet-152 on the full dataset. "
        "Each Slurm file is shown beside the notebook of the script it runs.",
        *toctrees,
        "## Lessons", "\n\n".join(lessons),
        "## Documents",
        "\n".join(f"- [{heading}]({path}) (`{path}`)" for path, heading in docs.items()),
        "## Slurm files",
        "Batch files: submit them with `sbatch` from the course's root directory. Each page shows the file beside "
        "the lesson whose script it runs.",
        table(["batch file", "what", "lesson of the script it runs"], job_rows),
        "Files the batch files share:", table(["file", "what", "used by"], shared_rows),
        built])


def slurm_page(s: SlurmFile, notebooks: list[Notebook], slurm: list[SlurmFile]) -> str:
    by_name = {nb.name: nb for nb in notebooks}
    names, slurm_names = list(by_name), [o.name for o in slurm]
    side = []
    for name in s.scripts:
        nb = by_name[name]
        side.append(f"**{'Runs' if s.name.endswith('.sbatch') else 'Calls'} `scripts/{name}.py`**, the export of lesson "
                    f"{nb.number}, [{nb.title}](../notebooks/{name}.ipynb).\n\n"
                    + site_markdown(nb.intro, "notebooks", f"slurm/{s.name}.md", names, slurm_names))
    if s.uses:
        side.append("**Uses** " + ", ".join(f"[`slurm/{u}`]({u}.md)" for u in s.uses))
    users = [o.name for o in slurm if s.name in o.uses]
    if users:
        side.append("**Used by** " + ", ".join(f"[`{u}`]({u}.md)" for u in users))
    language = {".py": "python", ".csv": "text"}.get(Path(s.name).suffix, "bash")
    return "\n\n".join([
        f"# `slurm/{s.name}`", s.about,
        f"Submit with `sbatch slurm/{s.name}` from the course's root directory." if s.name.endswith(".sbatch") else "",
        fence("\n\n".join(side or ["Runs no script of the course."]), "{sidebar} The lesson" if s.scripts else "{sidebar} Links"),
        fence(s.text, language)])


def doc_pages() -> dict[str, str]:
    """docs/<page>.md -> its title (first heading), in the order of the file names."""
    pages = {}
    for path in sorted(DOCS.glob("*.md")):
        heading = next((line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")), path.stem)
        pages[f"docs/{path.name}"] = heading
    return pages


def write_conf(src: Path, title: str) -> None:
    (src / "_static").mkdir(parents=True)
    (src / "conf.py").write_text(CONF.format(title=title))
    (src / "_static" / "site.css").write_text(
        'aside.sidebar + div[class*="highlight-"], aside.sidebar + div[class*="highlight-"] pre { clear: none; }\n'
        "aside.sidebar { width: 30%; }\n")


def write_sources(src: Path, notebooks: list[Notebook], slurm: list[SlurmFile], executed: Path, built: str) -> None:
    names, slurm_names = [nb.name for nb in notebooks], [s.name for s in slurm]
    readme = ROOT / "README.md"
    title = next((line[2:].strip() for line in readme.read_text().splitlines() if line.startswith("# ")),
                 "The course") if readme.is_file() else "The course"
    for folder in ("notebooks", "slurm", "docs"):
        (src / folder).mkdir(parents=True)
    write_conf(src, title)
    machine = machine_description()
    for nb in notebooks:
        page = lesson_page(nb, executed / f"{nb.name}.ipynb", len(notebooks), machine, names, slurm_names)
        (src / "notebooks" / f"{nb.name}.ipynb").write_text(page)
    for s in slurm:
        (src / "slurm" / f"{s.name}.md").write_text(slurm_page(s, notebooks, slurm))
    docs = doc_pages()
    for path in docs:
        (src / path).write_text(site_markdown((ROOT / path).read_text(), "docs", path, names, slurm_names))
    for image in (p for p in DOCS.iterdir() if p.suffix.lower() in IMAGES):
        shutil.copyfile(image, src / "docs" / image.name)
    (src / "index.md").write_text(index_page(title, notebooks, slurm, docs, built))


def sphinx_build(src: Path, out: Path, doctrees: Path) -> None:
    """`sphinx-build -W -b html src out` in this process; its first warning is the one-line error."""
    from sphinx.application import Sphinx
    from sphinx.errors import SphinxError
    warnings = io.StringIO()
    try:
        app = Sphinx(src, src, out, doctrees, "html", status=None, warning=warnings, warningiserror=True)
        app.build()
    except SphinxError as error:  # a broken conf.py or extension
        raise UserError(f"the site's Sphinx build failed: {error.category}: {str(error).splitlines()[0][:400]}") from None
    if app.statuscode:
        text = re.sub(r"\x1b\[[0-9;]*m", "", warnings.getvalue()).replace(f"{src}/", "")  # no colours, repository paths
        found = [line for line in text.splitlines() if "WARNING" in line or "ERROR" in line]
        first = found[0] if found else "no message"
        raise UserError(f"the site's Sphinx build failed ({len(found)} warning{'s' if len(found) != 1 else ''}); "
                        f"the first: {first[:400]}")


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
    if out == ROOT or ROOT.is_relative_to(out) or out in (NOTEBOOKS, SCRIPTS, SLURM, DOCS, ROOT / "tests"):
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
          executed_from: Path | None = None) -> float:
    """Build the site into `out`; return the seconds the Sphinx build took."""
    out = check_out(out)
    present = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    names = teaching_order(present)
    notebooks = [read_notebook(name, i + 1) for i, name in enumerate(names)]
    slurm = read_slurm(names)
    for nb in notebooks:
        nb.slurm = [s.name for s in slurm if s.name.endswith(".sbatch") and nb.name in s.scripts]
    try:
        import myst_nb  # noqa: F401
        import sphinx  # noqa: F401
        if executed_from is None:
            import papermill  # noqa: F401
    except ImportError as error:
        raise UserError(f"{error.name} is missing: install the maintainers' tools (pip install -r requirements-dev.txt; "
                        "`make site` does)") from None

    with tempfile.TemporaryDirectory(prefix="build_site-") as tmp:
        work = Path(tmp)
        executed = work / "executed"
        executed.mkdir()
        if executed_from is None:
            execute_all(notebooks, quick, work, executed, log)
            how = f"notebooks executed with {'tiny test parameters (--quick)' if quick else 'small CPU parameters'}"
        else:
            for nb in notebooks:
                nb.seconds, nb.parameters = take_executed(executed_from / f"{nb.name}.ipynb", executed / f"{nb.name}.ipynb")
            how = f"notebooks executed beforehand ({executed_from})"
        built = f"Built {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `docs/build_site.py` from {how}."
        write_sources(work / "src", notebooks, slurm, executed, built)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            start = time.monotonic()
            sphinx_build(work / "src", staging, work / "doctrees")
            seconds = time.monotonic() - start
            publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"site: {out / 'index.html'} ({len(notebooks)} notebooks, {len(slurm)} Slurm files, "
        f"{len(doc_pages())} documents; Sphinx took {seconds:.1f} s)")
    return seconds


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
