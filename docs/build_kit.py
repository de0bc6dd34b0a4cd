#!/usr/bin/env python3
"""Build the instructor's kit: a slide deck per lesson and the one-page cheat sheet.

    python docs/build_kit.py slides [--out kit]       # `make slides`: kit/slides/<name>.html
    python docs/build_kit.py cheatsheet [--out kit]   # `make cheatsheet`: kit/cheatsheet.html and .pdf

Slides are made from the notebooks, not a second copy: a cell is on a slide when its metadata
says so (`slideshow: {slide_type: slide|subslide|fragment|notes}`, written in the scripts as
`# %% [markdown] slideshow={"slide_type": "slide"}`); unmarked cells stay in the notebook only.
A marked markdown cell that has a heading shows that heading and the paragraph after it; the
rest of its text becomes the slide's speaker notes (key S), so the notebook's text is never
cut, only moved out of sight. The decks render the notebooks as committed, without outputs:
always possible, in seconds, and the live cells are run in JupyterLab during the lesson.

The decks open offline, from a USB stick or file://: reveal.js is copied beside them
(kit/slides/reveal.js/) and nothing else is loaded (no require.js, jQuery, MathJax, Mermaid or
widget manager from a CDN, which nbconvert's reveal template links by default). reveal.js comes
from the npm registry (`npm pack`, the version and checksum pinned below), once, into
.cache/: no Python package ships the reveal.js 4-5 layout that nbconvert's template expects
without pulling a documentation framework into the course's environment.

The cheat sheet is docs/cheatsheet.md rendered with the Markdown renderer the site uses
(mistune, installed with nbconvert), then printed to an A4 PDF by headless Chromium.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))
import build_site  # noqa: E402  (TEACHING_ORDER, read_notebook: one source with the site)
from build_site import NOTEBOOKS, ROOT, OneLineParser  # noqa: E402
from data import UserError, run_cli  # noqa: E402

# reveal.js from the npm registry: the layout nbconvert's reveal template links (dist/, plugin/notes/).
REVEAL_VERSION = "5.2.1"
REVEAL_INTEGRITY = "sha512-r7//6mIM5p34hFiDMvYfXgyjXqGRta+/psd9YtytsgRlrpRzFv4RbH76TXd2qD+7ZPZEbpBDhdRhJaFgfQ7zNQ=="
REVEAL_PARTS = ("LICENSE", "dist/", "plugin/notes/")
CACHE = ROOT / ".cache"
APT_NPM = "apt-get install -y --no-install-recommends nodejs npm"
APT_CHROMIUM = "apt-get install -y --no-install-recommends chromium"

SLIDE_TYPES = {"slide", "subslide", "fragment", "notes"}
CHEATSHEET = DOCS / "cheatsheet.md"

# Chromium offline: no sync, updates or QUIC, and every host name but localhost resolves to nothing.
CHROMIUM_OFFLINE = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1"]

# nbconvert's reveal template, less everything it fetches from a CDN: reveal.js is loaded as a
# plain script from the copy beside the deck, with its speaker-notes plugin.
DECK_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js %}{% endblock html_head_js %}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_css %}<style>.reveal pre { white-space: pre-wrap; }</style>{% endblock html_head_css %}
{% block footer_js %}
<script src="{{ resources.reveal.url_prefix }}/dist/reveal.js"></script>
<script src="{{ resources.reveal.url_prefix }}/plugin/notes/notes.js"></script>
<script>
Reveal.initialize({controls: true, progress: true, hash: true, slideNumber: "c/t", transition: "none",
                   width: 1280, height: 760, plugins: [RevealNotes]});
</script>
{% endblock footer_js %}
"""


# ---------------------------------------------------------------------------------------
# reveal.js


def npm_pack(spec: str, into: Path) -> Path:
    if not shutil.which("npm"):
        raise UserError(f"no npm to fetch reveal.js {REVEAL_VERSION} from the npm registry: {APT_NPM}")
    done = subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(into)],
                          capture_output=True, text=True, timeout=300)
    tarballs = list(into.glob("*.tgz"))
    if done.returncode or len(tarballs) != 1:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"npm pack {spec} failed ({last}): check that the npm registry is reachable")
    return tarballs[0]


def integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def reveal_js(cache: Path = CACHE) -> Path:
    """The unpacked reveal.js of REVEAL_VERSION (fetched and checked on first use)."""
    target = cache / f"reveal.js-{REVEAL_VERSION}"
    if (target / "dist" / "reveal.js").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tarball = npm_pack(f"reveal.js@{REVEAL_VERSION}", Path(tmp))
        if integrity(tarball) != REVEAL_INTEGRITY:
            raise UserError(f"{tarball.name} from the npm registry does not match the checksum pinned in "
                            "docs/build_kit.py: not used")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if (m.isfile() or m.isdir())
                       and m.name.removeprefix("package/").startswith(REVEAL_PARTS)]
            archive.extractall(unpacked, members=members, filter="data")
        (unpacked / "package").rename(Path(tmp) / "done")
        shutil.rmtree(target, ignore_errors=True)
        (Path(tmp) / "done").rename(target)
    return target


# ---------------------------------------------------------------------------------------
# Slides


def split_for_slide(markdown: str) -> tuple[str, str]:
    """(on the slide, speaker notes): from the first heading, it and the paragraph after it."""
    blocks = [b for b in re.split(r"\n\s*\n", markdown.strip()) if b.strip()]
    first = next((i for i, b in enumerate(blocks) if b.startswith("#")), None)
    if first is None:
        return markdown, ""
    shown = blocks[first:first + 2] if first + 1 < len(blocks) and not blocks[first + 1].startswith("#") \
        else blocks[first:first + 1]
    rest = blocks[:first] + blocks[first + len(shown):]
    return "\n\n".join(shown), "\n\n".join(rest)


def deck_cells(cells: list) -> list:
    """The notebook's marked cells, each markdown slide cut to its heading and first paragraph
    with the rest as its notes."""
    import nbformat
    kept = []
    for cell in cells:
        kind = cell.get("metadata", {}).get("slideshow", {}).get("slide_type")
        if kind not in SLIDE_TYPES:
            continue
        cell = nbformat.from_dict({**cell, "outputs": []} if cell["cell_type"] == "code" else dict(cell))
        if cell["cell_type"] == "markdown" and kind != "notes":
            shown, notes = split_for_slide(cell["source"])
            cell["source"] = shown
            kept.append(cell)
            if notes:
                kept.append(nbformat.v4.new_markdown_cell(notes, metadata={"slideshow": {"slide_type": "notes"}}))
            continue
        kept.append(cell)
    return kept


def render_deck(name: str, number: int, reveal_prefix: str = "reveal.js") -> str:
    """notebooks/<name>.ipynb's marked cells as a reveal.js deck (HTML) that loads nothing from outside."""
    import jinja2
    import nbformat
    from nbconvert import SlidesExporter
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    notebook.cells = deck_cells(notebook.cells)
    if not notebook.cells or notebook.cells[0].metadata["slideshow"]["slide_type"] != "slide":
        raise UserError(f"notebooks/{name}.ipynb: its first cell on slides must be marked "
                        '`slideshow={"slide_type": "slide"}` (scripts/{name}.py, then jupytext --update)')
    exporter = SlidesExporter(template_name="reveal", template_file="course_deck.html.j2",
                              extra_loaders=[jinja2.DictLoader({"course_deck.html.j2": DECK_TEMPLATE})],
                              reveal_url_prefix=reveal_prefix, reveal_theme="white")
    title = build_site.read_notebook(name, number).title
    body, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": f"{number}. {title}"}})
    return body


def build_slides(out: Path, log=print) -> list[Path]:
    """kit/slides/<name>.html for every lesson, and reveal.js beside them."""
    slides = out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    names = build_site.teaching_order(sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")))
    decks = []
    for number, name in enumerate(names, 1):
        deck = slides / f"{name}.html"
        deck.write_text(render_deck(name, number))
        decks.append(deck)
    copy = slides / "reveal.js"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(reveal_js(), copy)
    log(f"{len(decks)} decks in {slides}/ (reveal.js {REVEAL_VERSION} beside them): open {decks[0]}")
    return decks


# ---------------------------------------------------------------------------------------
# Cheat sheet

CHEATSHEET_CSS = """
@page { size: A4 landscape; margin: 5mm; }
body { font: 6.5pt/1.2 "DejaVu Sans", sans-serif; color: #111; margin: 0; column-count: 3; column-gap: 5mm; }
h1 { font-size: A4 landscape; margin: 0 0 2pt; column-span: all; }
h1 + p { column-span: all; margin: 0 0 4pt; }
h2 { font-size: A4 landscape; margin: 5pt 0 2pt; border-bottom: 0.6pt solid #999; break-after: avoid; }
p, ul { margin: 2pt 0; } ul { padding-left: 10pt; }
pre { background: #f3f3f3; padding: 2pt 3pt; margin: 2pt 0; white-space: pre-wrap; font-size: A4 landscape; }
code { font-family: "DejaVu Sans Mono", monospace; font-size: A4 landscape; }
table { border-collapse: collapse; width: 100%; margin: 2pt 0; }
th, td { border: 0.4pt solid #bbb; padding: 0.5pt 2pt; text-align: left; vertical-align: top; }
td code { overflow-wrap: anywhere; }  /* long options and commands wrap inside narrow columns */
pre, tr { break-inside: avoid; }
a { color: inherit; text-decoration: none; }
"""


def md_renderer():
    import mistune
    return mistune.create_markdown(escape=False, plugins=["table", "strikethrough", "url"])


def cheatsheet_html(markdown: str) -> str:
    body = md_renderer()(markdown)
    title = re.search(r"^#\s+(.+)$", markdown, re.M)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{title.group(1) if title else 'Cheat sheet'}</title><style>{CHEATSHEET_CSS}</style></head>"
            f"<body>\n{body}</body></html>\n")


def chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    raise UserError(f"no Chromium to print the cheat sheet to PDF: {APT_CHROMIUM} (or set CHROMIUM)")


def print_to_pdf(page: Path, pdf: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([chromium(), *CHROMIUM_OFFLINE, f"--user-data-dir={profile}", "--no-pdf-header-footer",
                               f"--print-to-pdf={pdf}", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    if done.returncode or not pdf.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"Chromium could not print {page} to PDF ({last})")


def pdf_pages(pdf: Path) -> int:
    """Pages of a PDF that Chromium wrote (its page objects are not compressed)."""
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf.read_bytes()))


def build_cheatsheet(out: Path, log=print) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    page, pdf = out / "cheatsheet.html", out / "cheatsheet.pdf"
    page.write_text(cheatsheet_html(CHEATSHEET.read_text()))
    print_to_pdf(page, pdf)
    pages = pdf_pages(pdf)
    if pages != 1:
        raise UserError(f"{pdf} has {pages} pages: docs/cheatsheet.md has grown past one page; shorten it")
    log(f"{page} and {pdf} (1 page)")
    return page, pdf


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["slides", "cheatsheet"])
    parser.add_argument("--out", type=Path, default=ROOT / "kit", help="the kit's directory (default: kit/)")
    args = parser.parse_args(argv)
    if args.what == "slides":
        build_slides(args.out)
    else:
        build_cheatsheet(args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
