"""The instructor's kit that docs/build_kit.py builds: a reveal.js deck per lesson, made from
the cells the notebooks mark as slides, that opens with no network; the cheat sheet as one page
of HTML and PDF.

The tests marked `browser` open each deck in headless Chromium with every host name but
localhost unresolvable (build_kit.CHROMIUM_OFFLINE, as the JupyterLab tests), check that reveal.js started
and that no request left the file system, and save screenshots of the first two slides to
artifacts/screenshots/slides-<name>-<n>.png; the cheat sheet's to cheatsheet.png."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import ROOT, unavailable
from jupyterlab_tools import SCREENSHOTS
from test_notebooks import notebook_names

sys.path.insert(0, str(ROOT / "docs"))
import build_kit  # noqa: E402


def marked(name: str) -> list[tuple[str, str]]:
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    return [(c["metadata"]["slideshow"]["slide_type"], c["cell_type"]) for c in cells
            if "slideshow" in c["metadata"]]


# --- fast: what goes on the slides -----------------------------------------------------------

@pytest.mark.parametrize("name", notebook_names())
def test_every_lesson_marks_its_title_and_some_code_as_slides(name):
    kinds = marked(name)
    assert kinds[0] == ("slide", "markdown"), "the deck starts with the lesson's title cell"
    assert sum(k == ("slide", "markdown") for k in kinds) >= 3, kinds
    assert any(cell == "code" for _, cell in kinds), "a deck shows some of the lesson's code"
    assert {k for k, _ in kinds} <= build_kit.SLIDE_TYPES


def test_a_slide_shows_the_heading_and_its_first_paragraph_and_keeps_the_rest_as_notes():
    text = "Look at the loss.\n\n## Validation\n\nWhy it matters.\n\n| a | b |\n|---|---|\n\nMore."
    assert build_kit.split_for_slide(text) == ("## Validation\n\nWhy it matters.",
                                               "Look at the loss.\n\n| a | b |\n|---|---|\n\nMore.")
    assert build_kit.split_for_slide("# Title\n\n## Next") == ("# Title", "## Next")
    assert build_kit.split_for_slide("No heading here.\n\nTwo paragraphs.") == ("No heading here.\n\nTwo paragraphs.", "")


def test_the_deck_holds_only_marked_cells_without_outputs():
    cells = [{"cell_type": "markdown", "metadata": {"slideshow": {"slide_type": "slide"}}, "source": "# T\n\nP.\n\nQ."},
             {"cell_type": "markdown", "metadata": {}, "source": "not on a slide"},
             {"cell_type": "code", "metadata": {"slideshow": {"slide_type": "fragment"}}, "source": "x = 1",
              "outputs": [{"output_type": "stream", "name": "stdout", "text": "1"}], "execution_count": 1},
             {"cell_type": "code", "metadata": {"slideshow": {"slide_type": "skip"}}, "source": "y = 2",
              "outputs": [], "execution_count": None}]
    kept = build_kit.deck_cells(cells)
    assert [(c["source"], c["metadata"]["slideshow"]["slide_type"]) for c in kept] == [
        ("# T\n\nP.", "slide"), ("Q.", "notes"), ("x = 1", "fragment")]
    assert kept[2]["outputs"] == []


def test_the_cheatsheet_page_is_the_markdown_rendered_with_print_styles():
    page = build_kit.cheatsheet_html(build_kit.CHEATSHEET.read_text())
    assert page.count("<table>") == build_kit.CHEATSHEET.read_text().count("\n|---") and "<table>" in page
    assert "<title>Cheat sheet: Slurm and PyTorch for this course</title>" in page
    assert "@page { size: A4" in page and "http" not in page.split("<body>")[0]


def test_pdf_pages_counts_page_objects_not_the_page_tree(tmp_path):
    pdf = tmp_path / "two.pdf"
    pdf.write_bytes(b"<< /Type /Pages /Kids [3 0 R 4 0 R] >>\n<< /Type /Page >>\n<</Type/Page/Parent 2 0 R>>")
    assert build_kit.pdf_pages(pdf) == 2


# --- browser: every deck opens offline; the cheat sheet prints to one page ---------------------

@pytest.fixture(scope="module")
def browser(offline_chromium):
    return offline_chromium


@pytest.fixture(scope="module")
def deck_dir(tmp_path_factory):
    """A kit's slides/ folder with reveal.js beside the decks (fetched once into .cache/ by npm)."""
    if not shutil.which("npm") and not (build_kit.CACHE / f"reveal.js-{build_kit.REVEAL_VERSION}").is_dir():
        unavailable(f"no npm to fetch reveal.js ({build_kit.APT_NPM})")
    slides = tmp_path_factory.mktemp("kit") / "slides"
    shutil.copytree(build_kit.reveal_js(), slides / "reveal.js")
    return slides


def offline_page(browser):  # noqa: F811  (the fixture's value)
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    return page, requests


@pytest.mark.browser
@pytest.mark.parametrize("name", notebook_names())
def test_each_deck_opens_offline_and_shows_its_first_slides(name, deck_dir, browser):  # noqa: F811
    number = build_kit.build_site.TEACHING_ORDER.index(name) + 1
    deck = deck_dir / f"{name}.html"
    deck.write_text(build_kit.render_deck(name, number))
    page, requests = offline_page(browser)
    try:
        page.goto(deck.as_uri())
        page.wait_for_function("() => window.Reveal && Reveal.isReady()", timeout=10_000)
        total = page.evaluate("() => Reveal.getTotalSlides()")
        assert total >= 3, f"{name}: {total} slides"
        title = page.inner_text(".reveal .slides section.present h1")
        assert title.startswith(f"{number}. "), title
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for n in (1, 2):  # each with all its fragments (the code after the heading) shown
            page.evaluate("() => { while (Reveal.nextFragment()); }")
            page.screenshot(path=str(SCREENSHOTS / f"slides-{name}-{n}.png"))
            page.evaluate("() => Reveal.next()")
        outside = [url for url in requests if not url.startswith(("file://", "data:"))]
        assert outside == [], f"{name}: requests left the machine: {outside}"
        assert any(url.endswith("reveal.js/dist/reveal.js") for url in requests)
    finally:
        page.close()


@pytest.mark.browser
def test_the_cheatsheet_prints_to_one_pdf_page_offline(tmp_path, browser):  # noqa: F811
    page_html, pdf = build_kit.build_cheatsheet(tmp_path, log=lambda message: None)
    assert pdf.read_bytes().startswith(b"%PDF") and build_kit.pdf_pages(pdf) == 1
    page, requests = offline_page(browser)
    try:
        page.set_viewport_size({"width": 1123, "height": 794})  # A4 landscape at 96 dpi
        page.goto(page_html.as_uri())
        assert page.inner_text("h1") == "Cheat sheet: Slurm and PyTorch for this course"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.emulate_media(media="print")
        page.screenshot(path=str(SCREENSHOTS / "cheatsheet.png"), full_page=True)
        assert [url for url in requests if not url.startswith(("file://", "data:"))] == []
    finally:
        page.close()
