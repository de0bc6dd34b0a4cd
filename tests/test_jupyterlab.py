"""Every notebook runs in a real JupyterLab, in a real (headless) browser.

The notebooks' one execution per test run happens there when these tests are selected
(tests/notebook_tools.py: ExecutedNotebooks, tests/jupyterlab_tools.py: Lab): Chromium, driven
by Playwright, runs all cells of each notebook in JupyterLab's own kernel and records what a
learner would see, which these tests check: no errors, every ipywidget rendered (not its text
fallback), every matplotlib figure shown as a PNG, and a dataset browser that reacts to its
Dropdown. What they check exists only while JupyterLab's kernel runs the cells (widgets are drawn
from a live kernel's comm messages, and the Dropdown is clicked), so these runs are the ones the
other notebook tests read, not the other way round. A screenshot of each notebook goes to
artifacts/screenshots/<name>.png.

Needs Chromium (`apt-get install -y --no-install-recommends chromium`) and the playwright
package (requirements-dev.txt); `playwright install` is not needed. Everything stays on 127.0.0.1.
"""
from __future__ import annotations

import pytest

import jupyterlab_tools
from conftest import unavailable
from test_notebooks import notebook_names


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_runs_in_jupyterlab(name, executed_notebooks):
    if reason := jupyterlab_tools.missing():
        unavailable(reason)
    report = executed_notebooks.in_jupyterlab(name)
    assert report is not None, "the notebooks ran under papermill, not in JupyterLab (tests/conftest.py: lab_for)"
    assert (report.failure, report.problems, report.interaction) == (None, [], None), report.explain()
    assert report.state["executed"] == report.state["total"], \
        f"{name}: only {report.state['executed']} of {report.state['total']} code cells ran\n{report.explain()}"


def test_the_data_notebook_has_a_dataset_browser():
    """The Dropdown check must not silently disappear with a renamed notebook."""
    assert "data" in notebook_names() and "data" in jupyterlab_tools.INTERACTIONS
