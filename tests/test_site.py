"""`make site` (docs/build_site.py): every notebook executed and rendered with its outputs, the
performance tables, and every Slurm file beside the notebook of the script it runs; the pages
are Sphinx's (MyST-NB renders the notebooks' stored outputs) and load nothing from another host.

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
# Tags and attributes that make a browser load something when the page opens (a link <a> does not).
LOADED = {("script", "src"), ("img", "src"), ("link", "href"), ("iframe", "src"), ("source", "src"), ("video", "src"),
          ("audio", "src"), ("embed", "src"), ("object", "data")}


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
    def __init__(self, kinds):
        super().__init__()
        self.kinds, self.links = kinds, []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if (tag, name) in self.kinds and value:
                self.links.append(value)


def links(page: Path, kinds=LOADED | {("a", "href")}) -> list[str]:
    parser = Links(kinds)
    parser.feed(page.read_text())
    return parser.links


def section(page: Path, anchor: str) -> str:
    """The HTML of the section `id="anchor"` of a page, to the next section of its level."""
    text = page.read_text()
    start = text.index(f'<section id="{anchor}">')
    return text[start:text.find("<section id=", start + 1) % (len(text) + 1)]


def local(url: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", url)


def path_of(url: str) -> str:
    """A local URL without its anchor or query (Sphinx adds `?v=<hash>` to its style sheets and scripts)."""
    return re.split(r"[#?]", url, maxsplit=1)[0]


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
    # each item starts with its lesson's link; intros may link other lessons
    listed = re.findall(r'<li><p><a class="reference internal" href="notebooks/(\w+)\.html"', section(index, "lessons"))
    assert listed == list(build_site.TEACHING_ORDER)
    for url in filter(local, links(index)):
        assert (site / path_of(url)).is_file(), f"index.html links to missing {url}"


def test_the_lesson_pages_lead_from_one_to_the_next_in_teaching_order(site):
    order = list(build_site.TEACHING_ORDER)
    for before, after in zip(order, order[1:]):
        nexts = re.findall(r'<link rel="next" title="[^"]*" href="([^"]+)"', (site / "notebooks" / f"{before}.html").read_text())
        assert nexts == [f"{after}.html"], before


def test_every_local_link_of_the_site_exists(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 1 + len(notebook_names()) + len(sbatch_files())
    for page in pages:
        for url in filter(local, links(page)):
            target = (page.parent / path_of(url)).resolve()
            assert target.is_file(), f"{page.relative_to(site)} links to missing {url}"


def test_each_notebook_page_shows_its_outputs(site):
    for number, name in enumerate(build_site.TEACHING_ORDER, 1):
        text = (site / "notebooks" / f"{name}.html").read_text()
        assert 'class="cell_output docutils container"' in text, f"{name}.html has no outputs"
        assert f"Lesson {number} of {len(build_site.TEACHING_ORDER)}: executed in " in text  # the banner
    train = site / "notebooks" / "train.html"
    plots = [url for url in links(train, {("img", "src")}) if url.startswith("../_images/") and url.endswith(".png")]
    assert plots and all((train.parent / url).is_file() for url in plots), "train.html has no plot"
    assert re.search(r"summary: epochs=\d+/\d+ val_acc=\d\.\d{4}", train.read_text()), "train.html has no summary line"


def test_no_page_loads_anything_from_another_host(site):
    """The site works offline: no script, style sheet, font or image from a CDN (MathJax, widgets)."""
    remote = re.compile(r"^(https?:)?//")
    for page in sorted(site.rglob("*.html")):
        assert [url for url in links(page, LOADED) if remote.match(url)] == [], page.relative_to(site)
    for sheet in sorted(site.rglob("*.css")):
        assert not re.search(r"(@import|url\()\s*['\"]?(https?:)?//", sheet.read_text()), sheet.relative_to(site)


def test_each_slurm_file_page_shows_its_sbatch_lines_and_links_the_notebook_of_its_script(site):
    index = (site / "index.html").read_text()
    assert sbatch_files()
    for path in sbatch_files():
        page = site / "slurm" / f"{path.name}.html"
        assert page.is_file(), f"no page for slurm/{path.name}"
        assert f'href="slurm/{path.name}.html"' in index
        text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))  # the text, without the markup of highlighting
        sbatch = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
        assert sbatch, f"slurm/{path.name} has no #SBATCH line"
        for line in sbatch:
            assert line in text, f"{path.name}.html lacks {line!r}"
        scripts = set(re.findall(r"\bscripts/(\w+)\.py\b", path.read_text()))
        assert scripts, f"slurm/{path.name} runs no script of the course"
        targets = {url for url in links(page)}
        for script in scripts:
            assert f"../notebooks/{script}.html" in targets, f"{path.name}.html does not link the {script} notebook"


def test_the_documents_and_the_performance_tables(site):
    documents = section(site / "index.html", "documents")
    for path in sorted((ROOT / "docs").glob("*.md")):
        assert f'href="docs/{path.stem}.html"' in documents and (site / "docs" / f"{path.stem}.html").is_file(), path.name
    text = (site / "docs" / "performance.html").read_text()
    tables = re.findall(r"^\s*\|[\s:|-]*---", PERFORMANCE.read_text(), re.M)  # Markdown tables
    assert tables and text.count("<table") == len(tables) and "<td" in text


def test_documents_link_repository_files_to_their_pages():
    names, slurm = list(build_site.TEACHING_ORDER), [p.name for p in SLURM.iterdir() if p.is_file()]
    text = ("| `loader` | see [the benchmark](../notebooks/benchmark.ipynb#timing), `slurm/train.sbatch`, "
            "[its script](../scripts/train.py), [the cheat sheet](cheatsheet.md), [the Dockerfile](../container/Dockerfile), "
            "[PyTorch](https://pytorch.org) |")
    assert build_site.site_markdown(text, "docs", "docs/performance.md", names, slurm) == (
        "| `loader` | see [the benchmark](../notebooks/benchmark.ipynb#timing), "
        "[`slurm/train.sbatch`](../slurm/train.sbatch.md), [its script](../notebooks/train.ipynb), "
        "[the cheat sheet](cheatsheet.md), the Dockerfile, [PyTorch](https://pytorch.org) |")
    # on the page of the notebook itself, its script stays code
    assert build_site.site_markdown("`scripts/train.py`", "notebooks", "notebooks/train.ipynb", names, slurm) == "`scripts/train.py`"


def test_a_sphinx_warning_is_a_one_line_error_naming_the_page(tmp_path):
    src = tmp_path / "src"
    build_site.write_conf(src, "t")
    (src / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    with pytest.raises(build_site.UserError) as raised:
        build_site.sphinx_build(src, tmp_path / "out", tmp_path / "doctrees")
    message = str(raised.value)
    assert "\n" not in message and re.search(r"failed \(1 warning\); the first: index.md:3: WARNING: .*missing", message)


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
        assert len(re.findall(r'<div class="cell(?: tag_[\w-]+)* docutils container"', page)) == shipped + 1, name


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
