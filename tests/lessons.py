"""What a learner sees in each notebook: the measurements behind tests/test_lessons.py.

    python tests/lessons.py                 # the table, from the notebooks as committed
    python tests/lessons.py --executed DIR  # also first output, from executed copies DIR/<name>.ipynb
    python tests/lessons.py --measure [NAME ...]  # run notebooks as shipped, record their run time

A notebook's time estimate is the same for every notebook: reading its markdown at 200 words a
minute and its lesson-flow code at 10 lines a minute, plus its measured run time with the parameters it ships with (what a learner runs, on
the test machine: 2 cores; `--measure` records it in docs/lesson-times.json with a hash of the
code, so that a changed notebook asks to be measured again), plus 5 minutes per exercise.

The *lesson flow* is every code cell a learner reads on the way through: not collapsed
(JupyterLab's `source_hidden` cell metadata) and not in the appendix (from the first markdown
heading that starts with "Appendix" to the end). Lines are non-blank lines.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TIMES = ROOT / "docs" / "lesson-times.json"

MAX_CELL_LINES = 25         # a lesson-flow code cell fits on one screen
FIRST_OUTPUT_WITHIN = 5     # something runs and shows a result within the first code cells
FLOW_BUDGET = 1070          # all notebooks' lesson-flow code lines (2,147 before the re-cut)
READING_WORDS_PER_MINUTE = 200
READING_CODE_LINES_PER_MINUTE = 10
MINUTES_PER_EXERCISE = 5
STATED_TIME = re.compile(r"\*\*Time:\*\*\s*about\s+(\d+)\s*min", re.I)
EXERCISE_CHECK = re.compile(r"Not yet\. Hint:")
DISCUSS = re.compile(r"\*\*Discuss:\*\*")
MODEL_ANSWER = re.compile(r"<details>\s*<summary>\s*Model answer\s*</summary>", re.S)
NUMBERED_EXERCISE = re.compile(r"^\*\*(\d+)\.\*\*", re.M)


def nonblank(source: str) -> int:
    return sum(1 for line in source.splitlines() if line.strip())


def is_appendix_heading(cell: dict) -> bool:
    return cell["cell_type"] == "markdown" and any(
        line.lstrip("#").strip().lower().startswith("appendix")
        for line in source_of(cell).splitlines() if line.startswith("#"))


def heading_levels(cell: dict) -> list[tuple[int, str]]:
    """(level, text) of each markdown heading in a cell."""
    if cell["cell_type"] != "markdown":
        return []
    return [(len(line) - len(line.lstrip("#")), line.lstrip("#").strip().lower())
            for line in source_of(cell).splitlines() if line.startswith("#")]


def is_optional(heading: str) -> bool:
    """`## Optional: ...` or `## ... (optional)`: a section learners may skip, timed apart (a whole
    optional lesson says so in the README instead)."""
    return heading.startswith("optional") or heading.endswith("(optional)")


def is_collapsed(cell: dict) -> bool:
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))


def source_of(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


@dataclass
class Lesson:
    name: str
    flow_lines: int = 0               # non-blank code lines in the lesson flow
    longest_cell: int = 0
    hidden_lines: int = 0             # collapsed or appendix
    words: int = 0                    # of the markdown cells before the appendix
    exercises: int = 0
    numbered: int = 0                 # exercises numbered **N.** in the markdown
    discuss: int = 0                  # **Discuss:** prompts
    model_answers: int = 0
    stated_minutes: int | None = None
    first_output_cell: int | None = None   # 1-based among code cells; None: not measured
    lines_before_output: int | None = None
    run_seconds: float | None = None
    long_cells: list[int] = field(default_factory=list)  # indices of cells over the limit
    optional: Lesson | None = None    # the counts of the sections marked optional, also in those above

    def reading_minutes(self) -> float:
        return (self.words / READING_WORDS_PER_MINUTE + self.flow_lines / READING_CODE_LINES_PER_MINUTE
                + MINUTES_PER_EXERCISE * self.exercises)

    @property
    def estimated_minutes(self) -> float | None:
        """The core: all but the appendix and the optional sections, with the whole run time
        (the notebook runs them all)."""
        if self.run_seconds is None:
            return None
        return self.reading_minutes() - self.optional_minutes + self.run_seconds / 60

    @property
    def optional_minutes(self) -> float:
        return self.optional.reading_minutes() if self.optional else 0.0


def measure(notebook: Path, executed: Path | None = None) -> Lesson:
    cells = json.loads(notebook.read_text())["cells"]
    lesson = Lesson(notebook.stem, optional=Lesson(notebook.stem))
    in_appendix, optional_level = False, None
    for index, cell in enumerate(cells):
        text = source_of(cell)
        in_appendix = in_appendix or is_appendix_heading(cell)
        for level, heading in heading_levels(cell):  # an optional section ends at a heading of its level or above
            if optional_level is not None and level <= optional_level:
                optional_level = None
            if optional_level is None and level >= 2 and is_optional(heading):  # not the title
                optional_level = level
        # Every count is the whole lesson's; those of optional sections are also kept apart.
        counts = [lesson, lesson.optional] if optional_level is not None and not in_appendix else [lesson]
        if cell["cell_type"] == "markdown":
            for counted in counts:
                counted.words += 0 if in_appendix else len(text.split())
            lesson.numbered += len(NUMBERED_EXERCISE.findall(text))
            lesson.discuss += len(DISCUSS.findall(text))
            lesson.model_answers += len(MODEL_ANSWER.findall(text))
            if lesson.stated_minutes is None and (found := STATED_TIME.search(text)):
                lesson.stated_minutes = int(found.group(1))
            continue
        if cell["cell_type"] != "code":
            continue
        lines = nonblank(text)
        for counted in counts:
            counted.exercises += 1 if EXERCISE_CHECK.search(text) else 0
        if in_appendix or is_collapsed(cell):
            lesson.hidden_lines += lines
            continue
        for counted in counts:
            counted.flow_lines += lines
        lesson.longest_cell = max(lesson.longest_cell, lines)
        if lines > MAX_CELL_LINES:
            lesson.long_cells.append(index)
    if executed is not None and executed.is_file():
        add_execution(lesson, cells, json.loads(executed.read_text())["cells"])
    recorded = recorded_times().get(notebook.stem, {})
    lesson.run_seconds = recorded.get("seconds") if recorded.get("code") == code_hash(cells) else None
    return lesson


def code_hash(cells: list[dict]) -> str:
    """What decides a notebook's run time: its code cells."""
    code = "\n\0".join(source_of(c) for c in cells if c["cell_type"] == "code")
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def recorded_times() -> dict:
    return json.loads(TIMES.read_text()) if TIMES.is_file() else {}


def measure_run_time(name: str) -> float:
    """Run notebooks/<name>.ipynb as shipped (its own parameters, in notebooks/, CPU only), as a
    learner would; the seconds it took. Its outputs go to a temporary copy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", "--cwd", str(NOTEBOOKS),
                               str(NOTEBOOKS / f"{name}.ipynb"), str(Path(tmp) / f"{name}.ipynb")],
                              capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"notebooks/{name}.ipynb failed: {done.stderr[-2000:]}")
    return seconds


def record_times(names: list[str]) -> None:
    times = recorded_times()
    for name in names:
        cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]
        seconds = measure_run_time(name)
        times[name] = {"seconds": round(seconds, 1), "code": code_hash(cells)}
        print(f"{name}: {seconds:.0f} s")
        TIMES.write_text(json.dumps(dict(sorted(times.items())), indent=2) + "\n")


def add_execution(lesson: Lesson, cells: list[dict], ran: list[dict]) -> None:
    """The first code cell with output, from an executed copy of the notebook (papermill's injected
    parameters cell is not counted: a learner does not see it)."""
    code_seen, flow_lines = 0, 0
    for cell in ran:
        if cell["cell_type"] != "code" or "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        code_seen += 1
        if lesson.first_output_cell is None and visible_output(cell):
            lesson.first_output_cell, lesson.lines_before_output = code_seen, flow_lines
        if not is_collapsed(cell):
            flow_lines += nonblank(source_of(cell))


def visible_output(cell: dict) -> bool:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and "".join(output.get("text", "")).strip():
            return True
        if output.get("output_type") in ("display_data", "execute_result"):
            return True
    return False


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def table(lessons: list[Lesson]) -> str:
    header = (f"{'notebook':12s} {'flow':>5s} {'longest':>7s} {'hidden':>6s} {'words':>6s} {'exer':>4s} "
              f"{'1st out':>7s} {'lines<out':>9s} {'run s':>6s} {'est min':>7s} {'stated':>6s} {'+optional':>9s}")
    rows = [header]
    for n in lessons:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        rows.append(f"{n.name:12s} {n.flow_lines:5d} {n.longest_cell:7d} {n.hidden_lines:6d} {n.words:6d} "
                    f"{n.exercises:4d} {fmt(n.first_output_cell, '7d')} {fmt(n.lines_before_output, '9d')} "
                    f"{fmt(n.run_seconds, '6.0f')} {fmt(n.estimated_minutes, '7.0f')} {fmt(n.stated_minutes, '6d')} "
                    f"{n.optional_minutes:9.0f}")
    rows.append(f"{'total':12s} {sum(n.flow_lines for n in lessons):5d}   (budget {FLOW_BUDGET})")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executed", type=Path, help="folder of executed copies <name>.ipynb")
    parser.add_argument("--measure", nargs="*", metavar="NAME",
                        help="run these notebooks (all without a name) and record their run time")
    args = parser.parse_args()
    if args.measure is not None:
        record_times(args.measure or [nb.stem for nb in notebooks()])
    lessons = [measure(nb, args.executed / nb.name if args.executed else None) for nb in notebooks()]
    print(table(lessons))


if __name__ == "__main__":
    main()
