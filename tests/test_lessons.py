"""Lessons first (issue 14): every notebook reads as a lesson, and the DDP lesson is a short list.

What a learner sees is measured by tests/lessons.py (`python tests/lessons.py` prints the table):
the code cells of the lesson flow (not collapsed, not in the appendix), the first cell that shows
something, the exercises, and the time each notebook says it takes.
"""
from __future__ import annotations

import re

import pytest

import lessons
from conftest import ROOT, SCRIPTS, load_build_site
from test_notebooks import NOTEBOOKS, notebook_names

DDP_BUDGET = 40  # lines of train.py that run only under DDP (the anchor tutorial's diff: ~40)
FSDP_BUDGET = 15  # lines of train.py that run only with --fsdp


@pytest.fixture(scope="module")
def measured(executed_notebooks) -> dict[str, lessons.Lesson]:
    found = {name: lessons.measure(NOTEBOOKS / f"{name}.ipynb", executed_notebooks[name]) for name in notebook_names()}
    print("\n" + lessons.table(list(found.values())))
    return found


def static(name: str) -> lessons.Lesson:
    return lessons.measure(NOTEBOOKS / f"{name}.ipynb")


def test_the_lesson_flow_of_all_notebooks_fits_its_budget(capsys):
    measured = [static(name) for name in notebook_names()]
    with capsys.disabled():
        print("\n" + lessons.table(measured))
    total = sum(lesson.flow_lines for lesson in measured)
    assert total <= lessons.FLOW_BUDGET, f"{total} lesson-flow code lines, budget {lessons.FLOW_BUDGET}"


@pytest.mark.parametrize("name", notebook_names())
def test_every_lesson_flow_cell_fits_on_a_screen(name):
    lesson = static(name)
    assert lesson.long_cells == [], (f"notebooks/{name}.ipynb: cells {lesson.long_cells} have more than "
                                     f"{lessons.MAX_CELL_LINES} lines; move support code to a collapsed cell or the appendix")


@pytest.mark.parametrize("name", notebook_names())
def test_something_runs_and_shows_within_the_first_code_cells(name, measured):
    lesson = measured[name]
    assert lesson.first_output_cell is not None, f"notebooks/{name}.ipynb shows no output at all"
    assert lesson.first_output_cell <= lessons.FIRST_OUTPUT_WITHIN, (
        f"notebooks/{name}.ipynb: the first output is in code cell {lesson.first_output_cell} "
        f"after {lesson.lines_before_output} lines of code")


@pytest.mark.parametrize("name", notebook_names())
def test_every_exercise_checks_itself_and_every_discussion_has_a_model_answer(name):
    lesson = static(name)
    assert lesson.exercises >= 1, f"notebooks/{name}.ipynb has no exercise with a check"
    assert lesson.numbered == lesson.exercises, (
        f"notebooks/{name}.ipynb numbers {lesson.numbered} exercises but {lesson.exercises} have a check cell: "
        "give each a check, or make it a **Discuss:** prompt with a model answer")
    assert lesson.model_answers == lesson.discuss, f"notebooks/{name}.ipynb: a **Discuss:** prompt lacks its model answer"


@pytest.mark.parametrize("name", notebook_names())
def test_every_notebook_states_an_honest_time(name):
    """Reading at 200 words and 10 lines of code a minute + the measured run time + 5 minutes per exercise,
    within a third."""
    lesson = static(name)
    assert lesson.stated_minutes, f"notebooks/{name}.ipynb does not say `**Time:** about N minutes`"
    assert lesson.run_seconds is not None, (
        f"notebooks/{name}.ipynb changed since its run time was measured: run `python tests/lessons.py --measure {name}`")
    estimate = lesson.estimated_minutes
    assert abs(lesson.stated_minutes - estimate) <= estimate / 3, (
        f"notebooks/{name}.ipynb says about {lesson.stated_minutes} minutes; the estimate is {estimate:.0f}")


def readme_lessons() -> dict[str, tuple[str, int]]:
    """The README's lesson table: notebook -> (core or optional, minutes)."""
    rows = re.findall(r"^\| \d+ \| \[`(\w+)`\]\(notebooks/\1\.ipynb\) \|[^|]*\| (core|optional) \| (\d+) min \|",
                      (ROOT / "README.md").read_text(), re.M)
    return {name: (path, int(minutes)) for name, path, minutes in rows}


def test_the_readme_lists_every_lesson_with_its_stated_time():
    table = readme_lessons()
    assert list(table) == list(load_build_site().TEACHING_ORDER), "the README's lesson table, in teaching order"
    for name, (_, minutes) in table.items():
        assert minutes == static(name).stated_minutes, f"README says {minutes} min for {name}, its notebook says otherwise"


def test_the_core_path_fits_a_morning():
    """The README's core path: about 3 hours of notebooks on a laptop CPU."""
    core = [minutes for path, minutes in readme_lessons().values() if path == "core"]
    assert len(core) >= 7 and sum(core) <= 200, f"the core path takes {sum(core)} minutes"


def test_what_ddp_adds_to_train_py_is_a_short_list():
    import train_ddp
    blocks = train_ddp.ddp_blocks(SCRIPTS / "train.py")
    lines = sum(len(text.splitlines()) for _, _, text in blocks)
    print(f"\n{len(blocks)} `if ddp` blocks, {lines} lines of train.py run only under DDP (budget {DDP_BUDGET})")
    assert {function for function, _, _ in blocks} >= {"start_processes", "fit", "wrap_model", "evaluate", "main"}
    assert 10 <= lines <= DDP_BUDGET


def test_what_fsdp_changes_in_train_py_is_a_shorter_list():
    import train_ddp
    blocks = train_ddp.ddp_blocks(SCRIPTS / "train.py", "fsdp")
    lines = sum(len(text.splitlines()) for _, _, text in blocks)
    print(f"\n{len(blocks)} `if cfg.fsdp` blocks, {lines} lines of train.py run only with --fsdp (budget {FSDP_BUDGET})")
    assert {function for function, _, _ in blocks} == {"parse_args", "prepare", "eval_loader"}
    assert 5 <= lines <= FSDP_BUDGET


def test_an_optional_section_is_timed_apart_from_the_core(tmp_path):
    """`## ... (optional)` up to the next heading of its level: its reading and exercises leave the
    core estimate (which the stated time must match) and show as optional minutes."""
    def markdown(text):
        return {"cell_type": "markdown", "metadata": {}, "source": text}

    def code(text):
        return {"cell_type": "code", "metadata": {}, "source": text, "outputs": [], "execution_count": None}

    words = " ".join(["word"] * 200)  # a minute of reading
    cells = [markdown("# A lesson (optional)\n\n**Time:** about 5 minutes"), markdown(f"## Core\n\n{words}"),
             code("\n".join(["x = 1"] * 10)), markdown(f"## Sharding (optional)\n\n{words}"),
             markdown("### Its exercise"), code("print('Correct' if x else 'Not yet. Hint: ...')"),
             markdown("## Exercises"), code("print('Correct' if x else 'Not yet. Hint: ...')")]
    notebook = tmp_path / "lesson.ipynb"
    notebook.write_text(__import__("json").dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    lesson = lessons.measure(notebook)
    lesson.run_seconds = 60.0
    assert (lesson.exercises, lesson.optional.exercises, lesson.optional.flow_lines) == (2, 1, 1)
    # its 206 words ("## Sharding (optional)", "### Its exercise" and the 200), one line of code, one exercise
    assert lesson.optional_minutes == pytest.approx(206 / 200 + 1 / 10 + 5)
    # the other 212 words, 11 lines and one exercise, and the whole run time
    assert lesson.estimated_minutes == pytest.approx(212 / 200 + 11 / 10 + 5 + 1)
