"""The test suite itself: its asserts can fail, every test process computes with one thread,
and each test lands in its tier (pytest.ini's markers).

Asserts that cannot fail: one on a constant (`assert (x, "message")` is a non-empty tuple,
always true), or a comparison of an expression with itself (`a.b == a.b`); found by reading the
source with `ast`, and weak_asserts explains each finding."""
from __future__ import annotations

import ast
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import conftest

TESTS = Path(__file__).resolve().parent
COMPARING_CALLS = ("equal", "allclose", "isclose", "array_equal", "samefile")  # f(a, a) compares a with itself


def is_constant(node: ast.expr) -> bool:
    """An expression whose truth is fixed by the source: a literal, a display such as a tuple or
    dict (true when not empty), a lambda, an f-string with literal text, or made of those."""
    if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.Lambda)):
        return True
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.Constant) and v.value for v in node.values)
    if isinstance(node, ast.UnaryOp):
        return is_constant(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(is_constant(v) for v in node.values)
    return False


def same_expression(a: ast.expr, b: ast.expr) -> bool:
    """The same code on both sides, without calls: two calls may rightly differ (a determinism
    check compares make(seed=0) with make(seed=0))."""
    return ast.dump(a) == ast.dump(b) and not any(isinstance(n, ast.Call) for n in ast.walk(a))


def self_comparisons(test: ast.expr) -> list[ast.AST]:
    found = []
    for node in ast.walk(test):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            found += [node for a, b in zip(sides, sides[1:]) if same_expression(a, b)]
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name.endswith(COMPARING_CALLS) and same_expression(node.args[0], node.args[1]):
                found.append(node)
    return found


def weak_asserts(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: why` for every assert that cannot fail or compares a thing with itself."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Assert):
            continue
        if is_constant(node.test):
            found.append(f"{filename}:{node.lineno}: asserts a constant, whose truth the source fixes: "
                         f"{ast.unparse(node.test)[:60]} (to fail on purpose: pytest.fail)")
        for compared in self_comparisons(node.test):
            found.append(f"{filename}:{compared.lineno}: compares an expression with itself: {ast.unparse(compared)[:80]}")
    return found


def test_no_assert_in_the_suite_is_constant_or_compares_a_thing_with_itself():
    found = [finding for path in sorted(TESTS.rglob("*.py"))
             for finding in weak_asserts(path.read_text(), str(path.relative_to(TESTS.parent)))]
    assert found == []


PLANTED = '''
def test_planted(x, w, k, runs, nb):
    assert True
    assert "always true"
    assert (x == 1, "a message in a tuple")
    assert {"cell_type": "markdown", "source": ""}
    assert f"value {x}"
    assert x == x
    assert runs["single"].path == runs["single"].path
    assert 0 < x.size <= x.size
    assert torch.equal(w[k], w[k])
    assert all(torch.allclose(w[k], w[k], atol=1e-5) for k in w)
'''

SOUND = '''
def test_sound(x, y, w, v, k, make, nb):
    assert x
    assert x == 1, "a message"
    assert w[k] == v[k]
    assert make(seed=0) == make(seed=0)  # two calls: a determinism check
    assert f"{x}"
    assert not nb.cells[-1]
    assert torch.equal(w[k], v[k])
    assert 0 < x.size <= y.size
'''


def test_the_check_finds_each_planted_weak_assert_and_passes_sound_ones():
    assert [int(f.split(":")[1]) for f in weak_asserts(PLANTED)] == list(range(3, 13))
    assert weak_asserts(SOUND) == []


def test_every_test_process_computes_with_one_thread():
    """conftest.py sets it before torch is imported; subprocesses inherit the variables."""
    assert torch.get_num_threads() == 1
    assert {k: os.environ[k] for k in conftest.ONE_THREAD} == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def fake_item(path: str, test: str, fixtures=(), **params) -> SimpleNamespace:
    item = SimpleNamespace(path=conftest.ROOT / path, nodeid=f"{path}::{test}", fixturenames=["request", *fixtures],
                           markers=[])
    item.add_marker = lambda marker: item.markers.append(marker)
    if params:
        item.callspec = SimpleNamespace(params=params)
    return item


def test_tests_are_marked_by_what_they_need():
    items = {
        "slurm": fake_item("tests/test_slurm.py", "test_sbatch_new", ["tmp_path"]),
        "ondemand": fake_item("tests/test_ondemand.py", "test_new"),
        "cluster_script": fake_item("tests/slurm/test_cluster.py", "test_up"),
        "browser": fake_item("tests/test_jupyterlab.py", "test_new"),
        "reads_notebooks": fake_item("tests/test_lessons.py", "test_first_output", ["executed_notebooks"]),
        "plain": fake_item("tests/test_train.py", "test_new", ["tiny_data", "tmp_path"]),
        "slow": fake_item("tests/test_train.py", "test_resume_continues_to_the_same_result[x]"),
        "slow_fixture": fake_item("tests/test_parallel.py", "test_new", ["runs"]),
    }
    conftest.pytest_collection_modifyitems(None, list(items.values()))
    assert {key: item.markers for key, item in items.items()} == {
        "slurm": ["slurm"], "ondemand": ["slurm"], "cluster_script": ["slurm"], "browser": ["browser"],
        "reads_notebooks": ["notebooks"], "plain": [], "slow": ["slow"], "slow_fixture": ["slow"]}
    # One process of `make test` runs the cluster's tests, one the notebooks' (their session fixtures).
    assert {key: conftest.group_of(item.nodeid) for key, item in items.items()} == {
        "slurm": "slurm", "ondemand": "slurm", "cluster_script": "slurm", "browser": "notebooks",
        "reads_notebooks": "notebooks", "plain": None, "slow": None, "slow_fixture": None}


def test_a_test_that_reads_the_executed_notebooks_outside_their_group_is_refused():
    stray = fake_item("tests/test_train.py", "test_reads", ["executed_notebooks"])
    with pytest.raises(pytest.UsageError, match="add its file to GROUP_OF_FILE"):
        conftest.pytest_collection_modifyitems(None, [stray])


def test_make_test_shares_tests_out_by_group(pytestconfig):
    """pytest-xdist's scheduler gets the groups: whole groups, the rest one test at a time."""
    as_in_make_test = {"dist": "loadgroup", "tx": ["2*popen"]}
    config = SimpleNamespace(getvalue=lambda name: as_in_make_test.get(name) or pytestconfig.getvalue(name),
                             option=pytestconfig.option, getini=pytestconfig.getini)
    scheduler = conftest.pytest_xdist_make_scheduler(config, None)
    assert [scheduler._split_scope(n) for n in ["tests/test_slurm.py::test_sbatch_train", "tests/slurm/x.py::t",
                                                 "tests/test_site.py::test_pages[data]", "tests/test_train.py::t[a]"]] \
        == ["slurm", "slurm", "notebooks", "tests/test_train.py::t[a]"]


def test_every_test_named_slow_exists():
    """A renamed test would silently move into `make check`."""
    names = {f"tests/{path.name}::{node.name}" for path in TESTS.glob("test_*.py")
             for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
    assert conftest.SLOW - names == set()


def test_the_notebooks_a_selection_reads_are_executed_together():
    from test_notebooks import notebook_names
    one = fake_item("tests/test_exercises.py", "test_x[data]", ["executed_notebooks"], name="data")
    two = fake_item("tests/test_exercises.py", "test_x[train]", ["executed_notebooks"], name="train")
    every = fake_item("tests/test_site.py", "test_pages", ["site", "executed_notebooks"])
    assert conftest.notebooks_read_by([one, two, fake_item("tests/test_data.py", "test_y")]) == ["data", "train"]
    assert conftest.notebooks_read_by([one, every]) == notebook_names()


@pytest.mark.parametrize("marker", ["slurm", "browser", "notebooks", "slow"])
def test_each_tier_is_registered(pytestconfig, marker):
    """--strict-markers (pytest.ini) turns a marker that is not registered into an error."""
    assert any(line.split(":")[0] == marker for line in pytestconfig.getini("markers"))
    assert "--strict-markers" in pytestconfig.getini("addopts")


def test_ci_builds_the_environment_before_the_cluster_opens_the_way_to_its_interpreter():
    """tests/slurm/cluster.sh lets the job user traverse (o+x) the directories above the .venv's
    interpreter only when the .venv exists. On a fresh clone whose Python lives in root's home
    (pyenv, /root mode 700), .ci/run started the cluster first, and every job failed with
    "env: '.venv/bin/python': Permission denied"."""
    steps = [line.strip() for line in (conftest.ROOT / ".ci/run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert steps.index("make env") < steps.index("bash tests/slurm/cluster.sh up")
    assert "env: $(DEV_STAMP)" in (conftest.ROOT / "Makefile").read_text().splitlines()
