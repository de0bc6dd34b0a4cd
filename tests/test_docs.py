"""The instructor's kit (issue 19) stays true of the course: docs/instructor.md,
docs/cheatsheet.md, docs/troubleshooting.md, LICENSE and CITATION.cff. Text only: each test
reads files and takes well under a second."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT, load_build_site
from lessons import NUMBERED_EXERCISE, STATED_TIME, source_of

DOCS = ROOT / "docs"
KIT = [DOCS / "instructor.md", DOCS / "cheatsheet.md", DOCS / "troubleshooting.md"]
SBATCH_OPTION = re.compile(r"^#SBATCH\s+(--[\w-]+)", re.M)


def notebook_cells(name: str, kind: str) -> list[str]:
    import json
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    return [source_of(c) for c in cells if c["cell_type"] == kind]


def notebook_markdown(name: str) -> str:
    return "\n".join(notebook_cells(name, "markdown"))


def answer_variables(name: str) -> list[str]:
    """The variable each exercise asks for (`x = None  # your answer`), in the notebook's order."""
    return re.findall(r"^(\w+) = None  # your answer", "\n".join(notebook_cells(name, "code")), re.M)


def teaching_order() -> tuple[str, ...]:
    return load_build_site().TEACHING_ORDER


# --- the cheat sheet --------------------------------------------------------------------------

def sbatch_options(files) -> set[str]:
    return {option for f in files for option in SBATCH_OPTION.findall(Path(f).read_text())}


def test_every_sbatch_option_of_the_slurm_files_is_in_the_cheatsheet():
    options = sbatch_options(sorted((ROOT / "slurm").glob("*.sbatch")))
    assert len(options) >= 10, options  # the files were read
    sheet = (DOCS / "cheatsheet.md").read_text()
    assert sorted(o for o in options if f"`{o}" not in sheet) == []


# --- the instructor's guide: exercises and the plan -------------------------------------------

def sections(markdown: str, level: str = "### ") -> dict[str, str]:
    """Heading text (first word) -> the text up to the next heading of that level or above."""
    found, name, lines = {}, None, []
    for line in markdown.splitlines() + ["## end"]:
        if line.startswith(("## ", level)) and not line.startswith(level + "#"):
            if name:
                found[name] = "\n".join(lines)
            name = line[len(level):].split()[0] if line.startswith(level) else None
            lines = []
        else:
            lines.append(line)
    return found


def answer_rows(section: str) -> dict[int, str]:
    """Exercise number -> its row of the section's answer table."""
    return {int(n): row for n, row in re.findall(r"^\|\s*(\d+)\s*\|(.*\S.*)\|$", section, re.M)}


def missing_answers(guide: str) -> list[str]:
    """Exercises without a row, or whose row does not name the variable the check reads."""
    lessons = sections(guide)
    missing = []
    for name in teaching_order():
        numbers = sorted(int(n) for n in NUMBERED_EXERCISE.findall(notebook_markdown(name)))
        if name not in lessons:
            missing.append(f"{name}: no section")
            continue
        rows = answer_rows(lessons[name])
        for number, variable in zip(numbers, answer_variables(name) + [None] * len(numbers)):
            if number not in rows:
                missing.append(f"{name}: exercise {number}")
            elif variable and f"`{variable} = " not in rows[number]:
                missing.append(f"{name}: exercise {number} does not give `{variable} = ...`")
    return missing


def test_every_numbered_exercise_of_every_notebook_has_its_answer_in_the_instructors_guide():
    numbered = sum(len(NUMBERED_EXERCISE.findall(notebook_markdown(n))) for n in teaching_order())
    assert numbered >= 9 and numbered == sum(len(answer_variables(n)) for n in teaching_order())
    assert missing_answers((DOCS / "instructor.md").read_text()) == []


def test_a_missing_answer_is_found():
    guide = (DOCS / "instructor.md").read_text()
    without = re.sub(r"^\| 2 \| `array_line.*\n", "", guide, flags=re.M)
    assert without != guide and missing_answers(without) == ["sweep: exercise 2"]
    renamed = guide.replace("`global_batch = 2 * 4 * 32`", "`batch = 2 * 4 * 32`")
    assert missing_answers(renamed) == ["train_ddp: exercise 1 does not give `global_batch = ...`"]


PLAN_ROW = re.compile(r"^\| (\d\d):(\d\d) \| (.+?) \| (\d+) \| (\w[\w-]*) \|$", re.M)


def plan_problems(guide: str) -> list[str]:
    """Minutes that do not add up to the total or to the next start, lessons missing, out of
    order, or with other minutes than the notebook's own **Time:** line."""
    plan = sections(guide, "## ").get("One-day", "")
    rows = [(int(h) * 60 + int(m), part, int(minutes), kind) for h, m, part, minutes, kind in PLAN_ROW.findall(plan)]
    total = re.search(r"\*\*Total:\*\* (\d+) minutes", plan)
    problems = [] if total else ["no **Total:** N minutes line"]
    if total and sum(r[2] for r in rows) != int(total.group(1)):
        problems.append(f"the rows add up to {sum(r[2] for r in rows)} minutes, the total says {total.group(1)}")
    problems += [f"{b[1][:30]} starts at {b[0]} but the part before ends at {a[0] + a[2]}"
                 for a, b in zip(rows, rows[1:]) if a[0] + a[2] != b[0]]
    lessons = [(re.match(r"lesson `(\w+)`", part), minutes, kind) for _, part, minutes, kind in rows]
    taught = [(m.group(1), minutes, kind) for m, minutes, kind in lessons if m]
    for name in teaching_order():
        text = notebook_markdown(name)
        stated = int(STATED_TIME.search(text).group(1))
        core = "Optional:" not in STATED_TIME.split(text, 1)[-1].split("\n\n")[0]
        row = next((t for t in taught if t[0] == name), None)
        if row is None:
            problems += [f"core lesson {name} is not in the plan"] if core else []
        elif row[1] != stated or row[2] != ("core" if core else "optional"):
            problems.append(f"{name}: {row[1]} minutes, {row[2]}; its notebook says {stated}, "
                            f"{'core' if core else 'optional'}")
    if [t[0] for t in taught] != [n for n in teaching_order() if n in {t[0] for t in taught}]:
        problems.append(f"lessons out of teaching order: {[t[0] for t in taught]}")
    return problems


def test_the_one_day_plan_adds_up_and_holds_every_core_lesson_with_its_stated_time():
    guide = (DOCS / "instructor.md").read_text()
    assert len(PLAN_ROW.findall(guide)) >= len(teaching_order())
    assert plan_problems(guide) == []


def test_a_plan_that_does_not_add_up_or_lacks_a_lesson_is_found():
    guide = (DOCS / "instructor.md").read_text()
    longer = re.sub(r"(lesson `model`[^|]*\| )(\d+) ", lambda m: f"{m[1]}{int(m[2]) + 5} ", guide)
    assert any("add up" in p for p in plan_problems(longer)) and any("model" in p for p in plan_problems(longer))
    without_train = re.sub(r"^\| \d\d:\d\d \| lesson `train`:.*\n", "", guide, flags=re.M)
    assert "core lesson train is not in the plan" in plan_problems(without_train)


# --- paths and make targets named in the kit --------------------------------------------------

PATH = re.compile(r"(?<![\w/.$])((?:slurm|scripts|docs|notebooks|tests|ondemand)/[\w.-]+(?:/[\w.-]+)*)")
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
MAKE = re.compile(r"(?:^|[\s`;&(])make ([a-z][\w-]*)")


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def missing_references(text: str) -> list[str]:
    paths = {p.rstrip(".") for p in PATH.findall(text)}
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    code = "\n".join(CODE.findall(text))
    missing += [f"make {t}" for t in sorted(set(MAKE.findall(code)) - make_targets())]
    links = re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", text)
    return missing + [f"link {link}" for link in links if not (DOCS / link).exists()]


@pytest.mark.parametrize("doc", KIT, ids=lambda p: p.name)
def test_every_path_link_and_make_target_in_the_kit_exists(doc):
    text = doc.read_text()
    assert PATH.search(text), f"{doc.name} names no file of the course"
    assert missing_references(text) == []


def test_a_missing_path_or_make_target_is_found():
    assert missing_references("Run `make demo` with `slurm/train.sbatch`.") == []
    assert missing_references("Run `make handouts` with `slurm/train_4gpu.sbatch`.") == [
        "slurm/train_4gpu.sbatch", "make handouts"]


# --- error messages quoted in the troubleshooting guide ---------------------------------------

def message_templates() -> list[str]:
    """Every string literal of scripts/*.py, f-strings with `…` for their fields, and every
    line of the Slurm files (their shell `echo "error: …"` lines)."""
    templates = []
    for path in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                templates.append("".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                templates.append(node.value)
    for path in sorted((ROOT / "slurm").rglob("*")):
        if path.is_file() and not path.is_symlink():
            templates += path.read_text().splitlines()
    return templates


def quoted_errors(markdown: str) -> list[str]:
    blocks = re.findall(r"```\w*\n(.*?)```", markdown, re.S)
    return [line[len("error: "):] for block in blocks for line in block.splitlines() if line.startswith("error: ")]


def unknown_errors(quoted: list[str], templates: list[str]) -> list[str]:
    """Quoted messages that no template matches; `…` in a quote stands for any text."""
    def known(message):
        pattern = re.compile(".*?".join(map(re.escape, message.split("…"))))
        return any(pattern.search(t) for t in templates)
    return [m for m in quoted if not known(m)]


def test_every_error_quoted_in_the_troubleshooting_guide_is_printed_by_the_course():
    quoted = quoted_errors((DOCS / "troubleshooting.md").read_text())
    assert len(quoted) >= 15, quoted
    assert unknown_errors(quoted, message_templates()) == []


def test_a_reworded_error_is_found():
    templates = ["--resume continues the run in --out and --overwrite replaces it: choose one",
                 "row … does not exist: … has rows 0 to …"]
    assert unknown_errors(["row … does not exist: … has rows 0 to …"], templates) == []
    assert unknown_errors(["--resume and --overwrite cannot be combined"], templates) == [
        "--resume and --overwrite cannot be combined"]


# --- licence and citation ---------------------------------------------------------------------

def test_the_licence_is_mit_and_the_lessons_are_cc_by():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    lessons = (ROOT / "LICENSE-lessons.md").read_text()
    assert "CC BY 4.0" in lessons and "https://creativecommons.org/licenses/by/4.0/" in lessons


def cff_by_lines(text: str) -> dict:
    """CITATION.cff read line by line, for where PyYAML is missing: top-level `key: value`,
    and lists of `- key: value` items (every key of an item, however deeply indented)."""
    data, key, item_indent = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"^([\w-]+):\s*(.*)$", line):
            key, value = m.groups()
            data[key], item_indent = (value.strip("\"'") if value not in ("", ">-", "|") else []), None
        elif key and isinstance(data[key], list) and (m := re.match(r"^(\s+)(-\s+)?([\w-]+):\s*(.*)$", line)):
            if m.group(2) and item_indent in (None, len(m.group(1))):
                item_indent = len(m.group(1))
                data[key].append({})
            data[key][-1].setdefault(m.group(3), m.group(4).strip("\"'"))
    return data


def read_cff(text: str) -> dict:
    try:
        import yaml
    except ImportError:
        return cff_by_lines(text)
    return yaml.safe_load(text)


def test_the_line_reader_of_citation_cff_reads_what_the_tests_look_at():
    cff = cff_by_lines((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["authors"] == [{"name": "The course authors"}]
    assert cff["references"][0]["repository-code"] == "https://github.com/jan3zk/HPC_ML"


def test_citation_cff_parses_and_names_the_course_and_the_original_workshop():
    cff = read_cff((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    assert cff["title"] and cff["authors"] == [{"name": "The course authors"}]
    assert any("jan3zk/HPC_ML" in str(ref) for ref in cff["references"])
    readme = (ROOT / "README.md").read_text()
    assert "## Acknowledgements and licences" in readme and "jan3zk/HPC_ML" in readme
    assert all(f"docs/{doc.name}" in readme for doc in KIT)
