"""Every notebook ends with exercises that check themselves (README). Each exercise has an
answer cell (`name = None  # your answer`), a check cell and a <details> Solution; as shipped
every check says `Not yet. Hint:`, with the solution filled in every check says `Correct`.

Both are read from the one execution of each notebook per test run (the executed_notebooks
fixture, tests/notebook_tools.py): the notebook runs as shipped, and after each check cell come
the solution's code and the check again (with_solutions_after_checks). The shipped answer and
check cells and the solutions really run, at the exercise's place.
"""
from __future__ import annotations

import pytest

import notebook_tools as nt
from test_notebooks import notebook_names


def checks(nb, solved: bool) -> list[tuple[int, str]]:
    """(cell index, printed text) of the check cells as shipped, or of those after a solution."""
    return [(i, nt.output_text(c)) for i, c in enumerate(nb.cells)
            if nt.is_check(c) and (nt.SOLVED in c.metadata.get("tags", [])) == solved]


@pytest.mark.parametrize("name", notebook_names())
def test_every_exercise_has_an_answer_cell_a_check_and_a_solution(name):
    assert nt.problems(nt.read(name)) == []


def assert_every_check_prints(name: str, executed_notebooks, solved: bool, expected: str) -> None:
    """No cell failed, every check of this variant ran, and each printed `expected` first."""
    shipped = nt.read(name)
    if nt.problems(shipped):  # reported by the structural test above
        pytest.skip(f"notebooks/{name}.ipynb has incomplete exercises")
    nb = executed_notebooks.read(name)
    assert nt.errors(nb) == [], f"notebooks/{name}.ipynb (executed copy: {executed_notebooks[name]})"
    found = checks(nb, solved)
    assert len(found) == len(nt.exercises(shipped)), f"notebooks/{name}.ipynb: not every check cell ran"
    wrong = [(i, text) for i, text in found if not text.lstrip().startswith(expected)]
    assert wrong == [], f"notebooks/{name}.ipynb: these checks did not print `{expected} ...`"


@pytest.mark.parametrize("name", notebook_names())
def test_as_shipped_every_check_says_not_yet(name, executed_notebooks):
    assert_every_check_prints(name, executed_notebooks, solved=False, expected="Not yet. Hint:")


@pytest.mark.parametrize("name", notebook_names())
def test_with_the_solutions_every_check_says_correct(name, executed_notebooks):
    assert_every_check_prints(name, executed_notebooks, solved=True, expected="Correct")
