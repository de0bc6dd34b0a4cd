"""`make site` (docs/build_site.py): every notebook executed and rendered with its outputs, the
performance tables, and every Slurm file beside the notebook of the script it runs.

The site is built once, in quick mode (the tests' tiny parameters), into a temporary directory."""
from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT, cpu_env

BUILDER = ROOT / "docs" / "build_site.py"
SLURM = ROOT / "slurm"
PERFORMANCE = ROOT / "docs" / "performance.md"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_site", BUILDER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_site = load_builder()


def run_builder(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILDER), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=cpu_env(), timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    start = time.monotonic()
    done = run_builder("--out", out, "--quick")
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"quick site built in {time.monotonic() - start:.0f} s")
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
    lessons = lessons[:lessons.index("</ol>")]
    listed = list(dict.fromkeys(re.findall(r'href="notebooks/(\w+)\.html"', lessons)))
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


def test_bad_input_is_a_one_line_error_and_touches_nothing(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for args in (["--out", mine], ["--out", ROOT], ["--no-such-option"]):
        done = run_builder(*args, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
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
