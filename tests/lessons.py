"""What a learner sees in each notebook: the measurements behind tests/test_lessons.py.

    python tests/lessons.py                 # the table, from the notebooks as committed
    python tests/lessons.py --executed DIR  # also first output, from executed copies DIR/<name>.ipynb

The *lesson flow* is every code cell a learner reads on the way through: not collapsed
(JupyterLab's `source_hidden` cell metadata) and not in the appendix (from the first markdown
heading that starts with "Appendix" to the end). Lines are non-blank lines.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

MAX_CELL_LINES = 25         # a lesson-flow code cell fits on one screen
FIRST_OUTPUT_WITHIN = 5     # something runs and shows a result within the first code cells
FLOW_BUDGET = 1070          # all notebooks' lesson-flow code lines (2,147 before the re-cut)
READING_WORDS_PER_MINUTE = 200
MINUTES_PER_EXERCISE = 5
STATED_TIME = re.compile(r"\*\*Time:\*\*\s*about\s+(\d+)\s*min", re.I)
EXERCISE_CHECK = re.compile(r"Not yet\. Hint:")


def nonblank(source: str) -> int:
    return sum(1 for line in source.splitlines() if line.strip())


def is_appendix_heading(cell: dict) -> bool:
    return cell["cell_type"] == "markdown" and any(
        line.lstrip("#").strip().lower().startswith("appendix")
        for line in source_of(cell).splitlines() if line.startswith("#"))


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
    stated_minutes: int | None = None
    first_output_cell: int | None = None   # 1-based among code cells; None: not measured
    lines_before_output: int | None = None
    run_seconds: float | None = None
    long_cells: list[int] = field(default_factory=list)  # indices of cells over the limit

    @property
    def estimated_minutes(self) -> float | None:
        if self.run_seconds is None:
            return None
        return self.words / READING_WORDS_PER_MINUTE + self.run_seconds / 60 + MINUTES_PER_EXERCISE * self.exercises


def measure(notebook: Path, executed: Path | None = None) -> Lesson:
    cells = json.loads(notebook.read_text())["cells"]
    lesson = Lesson(notebook.stem)
    in_appendix = False
    for index, cell in enumerate(cells):
        text = source_of(cell)
        in_appendix = in_appendix or is_appendix_heading(cell)
        if cell["cell_type"] == "markdown":
            if not in_appendix:
                lesson.words += len(text.split())
            if lesson.stated_minutes is None and (found := STATED_TIME.search(text)):
                lesson.stated_minutes = int(found.group(1))
            continue
        if cell["cell_type"] != "code":
            continue
        lines = nonblank(text)
        if EXERCISE_CHECK.search(text):
            lesson.exercises += 1
        if in_appendix or is_collapsed(cell):
            lesson.hidden_lines += lines
            continue
        lesson.flow_lines += lines
        lesson.longest_cell = max(lesson.longest_cell, lines)
        if lines > MAX_CELL_LINES:
            lesson.long_cells.append(index)
    if executed is not None and executed.is_file():
        add_execution(lesson, cells, json.loads(executed.read_text())["cells"])
    return lesson


def add_execution(lesson: Lesson, cells: list[dict], ran: list[dict]) -> None:
    """First cell with output and total run time, from an executed copy of the notebook."""
    code_seen, flow_lines, seconds = 0, 0, 0.0
    for cell in ran:
        if cell["cell_type"] != "code":
            continue
        code_seen += 1
        seconds += cell_seconds(cell)
        if lesson.first_output_cell is None and visible_output(cell):
            lesson.first_output_cell, lesson.lines_before_output = code_seen, flow_lines
        if not is_collapsed(cell):
            flow_lines += nonblank(source_of(cell))
    lesson.run_seconds = seconds


def visible_output(cell: dict) -> bool:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and "".join(output.get("text", "")).strip():
            return True
        if output.get("output_type") in ("display_data", "execute_result"):
            return True
    return False


def cell_seconds(cell: dict) -> float:
    duration = cell.get("metadata", {}).get("papermill", {}).get("duration")
    return float(duration) if duration is not None else 0.0


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def table(lessons: list[Lesson]) -> str:
    header = (f"{'notebook':12s} {'flow':>5s} {'longest':>7s} {'hidden':>6s} {'words':>6s} {'exer':>4s} "
              f"{'1st out':>7s} {'lines<out':>9s} {'run s':>6s} {'est min':>7s} {'stated':>6s}")
    rows = [header]
    for n in lessons:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        rows.append(f"{n.name:12s} {n.flow_lines:5d} {n.longest_cell:7d} {n.hidden_lines:6d} {n.words:6d} "
                    f"{n.exercises:4d} {fmt(n.first_output_cell, '7d')} {fmt(n.lines_before_output, '9d')} "
                    f"{fmt(n.run_seconds, '6.0f')} {fmt(n.estimated_minutes, '7.0f')} {fmt(n.stated_minutes, '6d')}")
    rows.append(f"{'total':12s} {sum(n.flow_lines for n in lessons):5d}   (budget {FLOW_BUDGET})")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executed", type=Path, help="folder of executed copies <name>.ipynb")
    args = parser.parse_args()
    lessons = [measure(nb, args.executed / nb.name if args.executed else None) for nb in notebooks()]
    print(table(lessons))


if __name__ == "__main__":
    main()
