"""`make site` (docs/build_site.py): every notebook executed and rendered with its outputs, the
performance tables, and every Slurm file beside the notebook of the script it runs.

The site is built once, from the notebooks the tests execute once per run (`--executed`, the
executed_notebooks fixture), into a temporary directory. The site's own executor (`execute`,
papermill with the site's parameters) is tested on a two-cell notebook, and the site's
parameters against each notebook's parameters cell."""
from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

import notebook_tools as nt
from conftest import ROOT, cpu_env, load_build_site, one_line_exit_2

BUILDER = ROOT / "docs" / "build_site.py"
SLURM = ROOT / "slurm"
PERFORMANCE = ROOT / "docs" / "performance.md"


build_site = load_build_site()


def run_builder(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILDER), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=cpu_env(), timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory, executed_notebooks) -> Path:
    """The site rendered from the notebooks the tests executed once (--executed), by the command."""
    out = tmp_path_factory.mktemp("site") / "site"
    executed = executed_notebooks.directory()
    start = time.monotonic()
    done = run_builder("--out", out, "--executed", executed)
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"site rendered from {executed} in {time.monotonic() - start:.0f} s")
    return out


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if (tag, name) in {("a", "href"), ("img", "src"), ("link", "href"), ("script", "src")} and value:
                self.links.append(value)


def links(page: Path) -> list[str]:
    parser = Links()
    parser.feed(page.read_text())
    return parser.links


def local(url: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", url)


def notebook_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def sbatch_files() -> list[Path]:
    return sorted(SLURM.glob("*.sbatch"))


def test_teaching_order_names_every_notebook_once():
    assert sorted(build_site.TEACHING_ORDER) == notebook_names()
    assert len(set(build_site.TEACHING_ORDER)) == len(build_site.TEACHING_ORDER)


def test_a_notebook_missing_from_the_order_is_an_error():
    with pytest.raises(build_site.UserError, match="extra.ipynb is not in TEACHING_ORDER"):
        build_site.teaching_order([*build_site.TEACHING_ORDER, "extra"])
    with pytest.raises(build_site.UserError, match="does not exist"):
        build_site.teaching_order(list(build_site.TEACHING_ORDER[1:]))


def test_each_notebook_numbers_itself_as_the_teaching_order_does():
    for number, name in enumerate(build_site.TEACHING_ORDER, 1):
        assert build_site.read_notebook(name, number).title  # raises when its "# N. Title" disagrees


def test_index_lists_every_notebook_in_teaching_order_with_links_that_exist(site):
    index = site / "index.html"
    text = index.read_text()
    lessons = text[text.index('id="lessons"'):]
    lessons = lessons.split("<h2", 1)[0]  # to the next section: intros may hold lists of their own
    listed = re.findall(r'<a class="title" href="notebooks/(\w+)\.html"', lessons)  # intros may link other lessons
    assert listed == list(build_site.TEACHING_ORDER)
    for url in filter(local, links(index)):
        assert (site / url.split("#")[0]).is_file(), f"index.html links to missing {url}"


def test_every_local_link_of_the_site_exists(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 1 + len(notebook_names()) + len(sbatch_files())
    for page in pages:
        for url in filter(local, links(page)):
            target = (page.parent / url.split("#")[0]).resolve()
            assert target.is_file(), f"{page.relative_to(site)} links to missing {url}"


def test_each_notebook_page_shows_its_outputs(site):
    for name in build_site.TEACHING_ORDER:
        text = (site / "notebooks" / f"{name}.html").read_text()
        assert "jp-OutputArea-output" in text, f"{name}.html has no outputs"
        assert 'class="site-nav"' in text and "Lesson " in text  # the site's navigation and banner
    train = (site / "notebooks" / "train.html").read_text()
    assert re.search(r'<img[^>]+src="data:image/png;base64,', train), "train.html has no plot"
    assert re.search(r"summary: epochs=\d+/\d+ val_acc=\d\.\d{4}", train), "train.html has no summary line"


def test_each_slurm_file_page_shows_its_sbatch_lines_and_links_the_notebook_of_its_script(site):
    index = (site / "index.html").read_text()
    assert sbatch_files()
    for path in sbatch_files():
        page = site / "slurm" / f"{path.name}.html"
        assert page.is_file(), f"no page for slurm/{path.name}"
        assert f'href="slurm/{path.name}.html"' in index
        text = re.sub(r"<[^>]+>", "", page.read_text())  # the text, without the markup of highlighting
        sbatch = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
        assert sbatch, f"slurm/{path.name} has no #SBATCH line"
        for line in sbatch:
            assert html.escape(line) in text, f"{path.name}.html lacks {line!r}"
        scripts = set(re.findall(r"\bscripts/(\w+)\.py\b", path.read_text()))
        assert scripts, f"slurm/{path.name} runs no script of the course"
        targets = {url for url in links(page)}
        for script in scripts:
            assert f"../notebooks/{script}.html" in targets, f"{path.name}.html does not link the {script} notebook"


def test_performance_tables_when_docs_performance_md_exists(site):
    page = site / "performance.html"
    if not PERFORMANCE.is_file():
        assert not page.exists()
        return
    text = page.read_text()
    assert 'href="performance.html"' in (site / "index.html").read_text()
    if re.search(r"^\s*\|[\s:|-]*---", PERFORMANCE.read_text(), re.M):  # a Markdown table
        assert "<table" in text and "<td" in text


def test_performance_page_renders_markdown_tables_links_and_images(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ladder.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (docs / "performance.md").write_text(
        "# Performance\n\n| row | img/s |\n|---|--:|\n| `loader` | 1234.5 |\n\n"
        "Measured with [the benchmark notebook](../notebooks/benchmark.ipynb) and `slurm/train.sbatch`.\n\n"
        "![ladder](ladder.png)\n")
    monkeypatch.setattr(build_site, "PERFORMANCE", docs / "performance.md")
    names = list(build_site.TEACHING_ORDER)
    notebooks = [build_site.Notebook(name, i + 1, name, "") for i, name in enumerate(names)]
    site = build_site.Site(notebooks, build_site.read_slurm(names), True, "now", "here", performance=True)
    text = site.performance_page()
    text = text[text.index("<main>"):]  # not the navigation bar
    assert re.search(r"<td[^>]*><code>loader</code></td>\s*<td[^>]*>1234.5</td>", text)
    assert 'href="notebooks/benchmark.html"' in text
    assert 'href="slurm/train.sbatch.html"' in text
    assert 'src="data:image/png;base64,' in text


def test_bad_input_is_a_one_line_error_and_touches_nothing(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for args in (["--out", mine], ["--out", ROOT], ["--no-such-option"], ["--executed", tmp_path / "none"]):
        assert one_line_exit_2(build_site.main, args, capsys).startswith("error: ")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_failed_build_leaves_the_previous_site_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "site"
    out.mkdir()
    (out / build_site.MARKER).write_text("")
    (out / "index.html").write_text("previous")

    def fail(name, parameters, target):
        raise build_site.UserError(f"notebooks/{name}.ipynb failed")

    monkeypatch.setattr(build_site, "kernel_environment", lambda: None)  # leave this process's environment alone
    monkeypatch.setattr(build_site, "make_synthetic", lambda target, *args: target)
    monkeypatch.setattr(build_site, "execute", fail)
    with pytest.raises(build_site.UserError, match="failed"):
        build_site.build(out, quick=True, log=lambda message: None)
    assert (out / "index.html").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no partial build left beside it


def test_publish_replaces_the_previous_site(tmp_path):
    out, staging = tmp_path / "site", tmp_path / ".staging"
    out.mkdir()
    (out / build_site.MARKER).write_text("")
    (out / "old.html").write_text("old")
    staging.mkdir()
    (staging / "index.html").write_text("new")
    build_site.publish(staging, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([build_site.MARKER, "index.html"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_notebook_pages_leave_out_the_cells_the_tests_added(site):
    """Each page has the shipped notebook's code cells and papermill's injected parameters, not
    the solutions and checks the tests ran after each exercise."""
    for name in build_site.TEACHING_ORDER:
        shipped = sum(c.cell_type == "code" for c in nt.read(name).cells)
        page = (site / "notebooks" / f"{name}.html").read_text()
        assert page.count('class="jp-Cell jp-CodeCell ') == shipped + 1, name


def test_executed_copies_are_taken_without_the_added_cells_and_refused_with_an_error(tmp_path):
    def cell(source, tags=(), outputs=()):
        return {"cell_type": "code", "source": source, "metadata": {"tags": list(tags)}, "outputs": list(outputs),
                "execution_count": 1}

    papermill = {"papermill": {"duration": 12.5, "parameters": {"epochs": 1}}}
    lesson = [cell("x = 1"), cell("print(x)", outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"}])]
    added = [cell("x = 2", tags=["solution", build_site.ADDED_BY_TESTS])]
    source = tmp_path / "lesson.ipynb"
    source.write_text(json.dumps({"cells": lesson + added, "metadata": papermill, "nbformat": 4, "nbformat_minor": 5}))
    assert build_site.take_executed(source, tmp_path / "out.ipynb") == (12.5, {"epochs": 1})
    assert json.loads((tmp_path / "out.ipynb").read_text())["cells"] == lesson

    error = {"output_type": "error", "ename": "ValueError", "evalue": "bad value", "traceback": []}
    source.write_text(json.dumps({"cells": [*lesson, cell("f()", outputs=[error])], "metadata": papermill}))
    with pytest.raises(build_site.UserError, match=r"lesson.ipynb failed in cell 2: ValueError: bad value"):
        build_site.take_executed(source, tmp_path / "out.ipynb")
    source.write_text(json.dumps({"cells": lesson, "metadata": {}}))
    with pytest.raises(build_site.UserError, match="was not executed by papermill"):
        build_site.take_executed(source, tmp_path / "out.ipynb")
    with pytest.raises(build_site.UserError, match="does not exist: execute every notebook"):
        build_site.take_executed(tmp_path / "missing.ipynb", tmp_path / "out.ipynb")


def test_the_sites_executor_injects_parameters_and_names_the_cell_that_failed(tmp_path, monkeypatch):
    """build_site.execute, which `make site` runs for every notebook, on a two-cell notebook."""
    import nbformat
    parameters = nbformat.v4.new_code_cell("fail = True", metadata={"tags": ["parameters"]})
    work = nbformat.v4.new_code_cell('print("ran with fail =", fail)\nassert not fail, "told to fail"')
    nbformat.write(nbformat.v4.new_notebook(cells=[parameters, work], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), tmp_path / "two.ipynb")
    monkeypatch.setattr(build_site, "NOTEBOOKS", tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where it keeps a failed copy
    seconds = build_site.execute("two", {"fail": False}, tmp_path / "ok.ipynb")
    assert seconds > 0
    assert "ran with fail = False" in nt.output_text(nbformat.read(tmp_path / "ok.ipynb", as_version=4).cells[-1])
    # cell 3 in the order of execution: the parameters, papermill's injected parameters, the failing cell
    with pytest.raises(build_site.UserError, match=r"two.ipynb failed in cell 3: AssertionError: told to fail"):
        build_site.execute("two", {"fail": True}, tmp_path / "failed.ipynb")


@pytest.mark.parametrize("name", notebook_names())
def test_the_site_and_the_tests_give_each_notebook_only_parameters_it_has(name, tmp_path):
    from test_notebooks import small_parameters
    build_site.check_parameters(name, build_site.site_parameters(name, "data", tmp_path))
    build_site.check_parameters(name, small_parameters(name, tmp_path, tmp_path))
