"""Every notebook ends with exercises that check themselves (README). Each exercise has an
answer cell (`name = None  # your answer`), a check cell and a <details> Solution; as shipped
every check says `Not yet. Hint:`, with the solution filled in every check says `Correct`.

One papermill run per notebook shows both (small parameters and cwd as test_notebooks.py):
the notebook runs as shipped, and after each check cell come the solution's code and the
check again (notebook_tools.with_solutions_after_checks). The shipped answer and check cells
and the solutions really run, at the exercise's place, without a second run of the notebook.
"""
from __future__ import annotations

import os

import nbformat
import pytest

import notebook_tools as nt
from conftest import cpu_env
from test_notebooks import NOTEBOOKS, notebook_names, small_parameters


@pytest.fixture(scope="module", params=notebook_names())
def executed(request, tiny_data, tmp_path_factory):
    """(name, the notebook as shipped, the executed notebook with solutions after the checks)."""
    import papermill

    name = request.param
    tmp = tmp_path_factory.mktemp(f"exercises-{name}")
    shipped = nt.read(name)
    if nt.problems(shipped):  # reported by the structural test
        pytest.skip(f"notebooks/{name}.ipynb has incomplete exercises")
    source, output = tmp / f"{name}-with-solutions.ipynb", tmp / f"{name}-executed.ipynb"
    nbformat.write(nt.with_solutions_after_checks(shipped), source)
    env = cpu_env()  # the kernel inherits this environment: CPU only, no Slurm or W&B variables
    with pytest.MonkeyPatch.context() as patch:
        for key in set(os.environ) - set(env):
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            papermill.execute_notebook(str(source), str(output), parameters=small_parameters(name, tiny_data, tmp),
                                       cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
                                       execution_timeout=600)
        except papermill.PapermillExecutionError:
            pass  # the saved notebook holds the error; the tests report it
    return name, shipped, nbformat.read(output, as_version=4)


def checks(nb, solved: bool) -> list[tuple[int, str]]:
    """(cell index, printed text) of the check cells as shipped, or of those after a solution."""
    return [(i, nt.output_text(c)) for i, c in enumerate(nb.cells)
            if nt.is_check(c) and (nt.SOLVED in c.metadata.get("tags", [])) == solved]


@pytest.mark.parametrize("name", notebook_names())
def test_every_exercise_has_an_answer_cell_a_check_and_a_solution(name):
    assert nt.problems(nt.read(name)) == []


def assert_every_check_prints(executed, solved: bool, expected: str) -> None:
    """No cell failed, every check of this variant ran, and each printed `expected` first."""
    name, shipped, nb = executed
    assert nt.errors(nb) == [], f"notebooks/{name}.ipynb"
    found = checks(nb, solved)
    assert len(found) == len(nt.exercises(shipped)), f"notebooks/{name}.ipynb: not every check cell ran"
    wrong = [(i, text) for i, text in found if not text.lstrip().startswith(expected)]
    assert wrong == [], f"notebooks/{name}.ipynb: these checks did not print `{expected} ...`"


def test_as_shipped_every_check_says_not_yet(executed):
    assert_every_check_prints(executed, solved=False, expected="Not yet. Hint:")


def test_with_the_solutions_every_check_says_correct(executed):
    assert_every_check_prints(executed, solved=True, expected="Correct")
