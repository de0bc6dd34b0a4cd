"""Helpers shared by the notebook tests: parametrised copies, exercises and their solutions.

A notebook's exercise is three cells (README: "every notebook ends with exercises that check
themselves"):

1. an answer cell (tag `active-ipynb`) that assigns `None  # your answer...` to a variable,
2. a check cell (tag `active-ipynb`) that prints `Correct...` when the answer is right and
   `Not yet. Hint: ...` otherwise, and never raises,
3. a markdown cell with `<details><summary>Solution</summary>` holding a ```python block.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat

from conftest import ROOT, cpu_env, load_build_site
from test_notebooks import NOTEBOOKS, notebook_names, small_parameters

ANSWER = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*None\b", re.M)  # the brief's "cell containing `= None`"
YOUR_ANSWER = re.compile(r"^([A-Za-z_]\w*) = None\s+# your answer", re.M)  # the course's convention
SOLUTION = re.compile(r"<details>\s*<summary>\s*Solution\s*</summary>(.*?)</details>", re.S)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def write_parametrised(name: str, data_dir: Path, tmp: Path, target: Path) -> Path:
    """Write the notebook to target with small_parameters injected after its `parameters`
    cell, by papermill itself (prepare_only: nothing runs)."""
    import papermill
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(target),
                               parameters=small_parameters(name, data_dir, tmp), prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    return target


def is_check(cell) -> bool:
    return cell.cell_type == "code" and "Correct" in cell.source and "Not yet. Hint:" in cell.source


@dataclass
class Exercise:
    answer: int  # index of the answer cell
    check: int  # index of its check cell
    solution: int | None  # index of the markdown cell with the solution, None when missing
    variable: str
    code: str | None  # the solution's Python code


def exercises(nb) -> list[Exercise]:
    """Every check cell with its answer cell (the nearest code cell before it that assigns None)
    and its solution (the first <details> Solution block after it, before the next check)."""
    cells = nb.cells
    checks = [i for i, c in enumerate(cells) if is_check(c)]
    found = []
    for n, j in enumerate(checks):
        previous_check = checks[n - 1] if n else -1
        answer = next((i for i in range(j - 1, previous_check, -1)
                       if cells[i].cell_type == "code" and ANSWER.search(cells[i].source)), None)
        if answer is None:
            raise AssertionError(f"check cell {j} has no answer cell (`name = None  # your answer`) before it")
        end = checks[n + 1] if n + 1 < len(checks) else len(cells)
        solution, code = None, None
        for k in range(j + 1, end):
            if cells[k].cell_type == "markdown" and (details := SOLUTION.search(cells[k].source)):
                block = PYTHON_BLOCK.search(details.group(1))
                solution, code = k, block.group(1) if block else None
                break
        found.append(Exercise(answer, j, solution, ANSWER.search(cells[answer].source).group(1), code))
    return found


def problems(nb) -> list[str]:
    """What is wrong with a notebook's exercises; empty when each is complete."""
    cells = nb.cells
    try:
        found = exercises(nb)
    except AssertionError as error:
        return [str(error)]
    out = [] if found else ["no exercise with a check cell"]
    checked = {e.answer for e in found}
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and YOUR_ANSWER.search(cell.source) and i not in checked:
            out.append(f"answer cell {i} ({YOUR_ANSWER.search(cell.source).group(1)}) has no check cell after it")
    for e in found:
        for what, i in (("answer", e.answer), ("check", e.check)):
            if "active-ipynb" not in cells[i].metadata.get("tags", []):
                out.append(f"{what} cell {i} lacks the tag active-ipynb (it would run in scripts/)")
        if e.solution is None:
            out.append(f"exercise `{e.variable}` (cell {e.answer}) has no <details><summary>Solution</summary>")
        elif e.code is None:
            out.append(f"the solution of `{e.variable}` (cell {e.solution}) has no ```python block")
        elif not re.search(rf"^{re.escape(e.variable)}\s*=", e.code, re.M):
            out.append(f"the solution of `{e.variable}` (cell {e.solution}) does not assign {e.variable}")
    return out


SOLVED = "solved-check"  # tag of the check cells that run after a solution
ADDED = load_build_site().ADDED_BY_TESTS  # on every cell with_solutions_after_checks adds; the site leaves them out


def with_solutions_after_checks(nb) -> nbformat.NotebookNode:
    """A copy that runs every exercise twice: after each check cell, as shipped, come a cell with
    the solution's code and a copy of the check cell (tagged SOLVED), so one run shows both what
    a learner sees first (`Not yet. Hint:`) and what the solution gives (`Correct`)."""
    assert not problems(nb), problems(nb)
    solved = nbformat.from_dict(nb)
    for e in reversed(exercises(nb)):  # from the end, so earlier indices stay valid
        shipped = nb.cells[e.check]
        check = nbformat.v4.new_code_cell(shipped.source, metadata={
            **shipped.metadata, "tags": [*shipped.metadata.get("tags", []), SOLVED, ADDED]})
        code = nbformat.v4.new_code_cell(e.code.rstrip("\n"), metadata={"tags": ["active-ipynb", "solution", ADDED]})
        solved.cells[e.check + 1:e.check + 1] = [code, check]
    return solved


def output_text(cell) -> str:
    """The text a code cell printed or displayed."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
        elif output.get("output_type") == "error":
            parts.append(f"{output.get('ename')}: {output.get('evalue')}")
    return "".join(p if isinstance(p, str) else "".join(p) for p in parts)


def cell_errors(cell) -> list[str]:
    """`Name: message (the end of what the cell printed)` for each error output of a cell."""
    printed = output_text({"outputs": [o for o in cell.get("outputs", []) if o.get("output_type") == "stream"]})
    printed = f" (after printing ...{printed.strip()[-400:]!r})" if printed.strip() else ""
    return [f"{o.get('ename')}: {o.get('evalue')}{printed}"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def errors(nb) -> list[str]:
    """`cell i: Name: message ...` for every error output of an executed notebook."""
    return [f"cell {i}: {error}" for i, cell in enumerate(nb["cells"]) for error in cell_errors(cell)]


EXECUTED = ROOT / "artifacts" / "executed"  # the executed copies, kept after the run for a look
CELL_TIMEOUT_S = 600


class ExecutedNotebooks(Mapping):
    """name -> artifacts/executed/<name>.ipynb: notebooks/<name>.ipynb executed once per test run
    with small_parameters, CPU only; each exercise's solution and its check run again right after
    the shipped check (with_solutions_after_checks), so one execution shows what a learner sees
    first and what the solution gives. A notebook whose exercises are incomplete runs as shipped.

    Executed in JupyterLab, in headless Chromium, when the selected tests include the browser
    tests (`lab`: tests/jupyterlab_tools.py), which then read the page's Report (`in_jupyterlab`);
    otherwise under papermill, in notebooks/ (as a learner runs it), two at a time: the kernels
    have one thread each and the machine 2 cores. Either way each notebook runs once.

    Readers: tests/test_exercises.py (the checks' `Not yet`/`Correct`), tests/test_lessons.py
    (the first output), tests/test_site.py (the site renders these copies with the added cells
    stripped), tests/test_jupyterlab.py (what the page showed). A notebook runs when it is first
    read; `needed` (what the selected tests read) then runs together.

    Executed on their own: test_site.py's test of the site's own executor, on a two-cell notebook,
    and test_train.py's second run of a training notebook into the same folder."""

    def __init__(self, data_dir: Path, work: Path, needed: Iterable[str] = (), lab=None):
        self.data_dir, self.work, self.needed, self.lab = data_dir, work, list(needed), lab
        self.paths: dict[str, Path] = {}
        self.reports: dict = {}  # name -> jupyterlab_tools.Report, when run in JupyterLab

    def __getitem__(self, name: str) -> Path:
        if name not in notebook_names():
            raise KeyError(name)
        if name not in self.paths:
            self.execute([name, *(n for n in self.needed if n not in self.paths and n != name)])
        return self.paths[name]

    def __iter__(self):
        return iter(notebook_names())

    def __len__(self) -> int:
        return len(notebook_names())

    def read(self, name: str) -> nbformat.NotebookNode:
        return nbformat.read(self[name], as_version=4)

    def directory(self) -> Path:
        """artifacts/executed/, once every notebook is executed into it."""
        missing = [n for n in self if n not in self.paths]
        if missing:
            self.execute(missing)
        return EXECUTED

    def in_jupyterlab(self, name: str):
        """The Report of the notebook's run in JupyterLab; None when it ran under papermill."""
        self[name]
        return self.reports.get(name)

    def execute(self, names: list[str]) -> None:
        EXECUTED.mkdir(parents=True, exist_ok=True)
        if self.lab:  # one browser: one notebook after another
            for name in names:
                self.paths[name] = self.execute_in_jupyterlab(name)
            return
        workers = min(2, os.cpu_count() or 1, len(names))
        with ThreadPoolExecutor(workers) as pool:
            for name, path in zip(names, pool.map(self.execute_one, names)):
                self.paths[name] = path

    def prepare(self, name: str) -> tuple[Path, Path, Path]:
        """(the notebook to run, with the solutions after the checks; its work directory; the
        executed copy's path, emptied)."""
        tmp = self.work / name
        tmp.mkdir(parents=True, exist_ok=True)
        shipped = read(name)
        source, target = tmp / f"{name}-with-solutions.ipynb", EXECUTED / f"{name}.ipynb"
        nbformat.write(shipped if problems(shipped) else with_solutions_after_checks(shipped), source)
        target.unlink(missing_ok=True)
        return source, tmp, target

    def execute_in_jupyterlab(self, name: str) -> Path:
        """Parameters injected by papermill (nothing run), then every cell run in JupyterLab,
        which saves the notebook; papermill's metadata gets the run's duration, as papermill
        would (docs/build_site.py reads it). A run that did not save leaves no executed copy."""
        import papermill
        source, tmp, target = self.prepare(name)
        in_lab = self.lab.root / "notebooks" / f"{name}.ipynb"
        papermill.execute_notebook(str(source), str(in_lab), parameters=small_parameters(name, self.data_dir, tmp),
                                   prepare_only=True, kernel_name="python3", progress_bar=False)
        report = self.reports[name] = self.lab.run(name)
        if not report.saved:
            raise AssertionError(report.explain())
        executed = nbformat.read(in_lab, as_version=4)
        executed.metadata.setdefault("papermill", {})["duration"] = round(report.seconds, 3)
        nbformat.write(executed, target)
        return target

    def execute_one(self, name: str) -> Path:
        """papermill in a subprocess (threads cannot share one process's kernel clients); a cell
        that fails leaves its error in the executed copy, for the tests to report."""
        source, tmp, target = self.prepare(name)
        done = subprocess.run(
            [sys.executable, "-m", "papermill", str(source), str(target), "--no-progress-bar", "--log-level", "ERROR",
             "-y", json.dumps(small_parameters(name, self.data_dir, tmp)), "--cwd", str(NOTEBOOKS), "-k", "python3",
             "--execution-timeout", str(CELL_TIMEOUT_S)],
            capture_output=True, text=True, env=cpu_env(), cwd=ROOT)  # the kernel: CPU only, no Slurm or W&B
        if not target.is_file():
            raise AssertionError(f"papermill did not run notebooks/{name}.ipynb (exit {done.returncode}):\n"
                                 f"{done.stderr[-3000:]}")
        return target
