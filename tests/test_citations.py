"""Every section citation in the repository resolves to a heading of the document it cites.

What counts as a citation (the section sign followed by a number; `S` stands for it below):

* `S4`, `S4.3`: a section or subsection, i.e. a Markdown heading whose text starts with that number
  (`## 4. Losses`, `### 4.3 SiD generator loss`);
* `S10 item 7`: entry 7 of a numbered list (`7. ...` at the start of a line) inside section 10;
* `S4.3 step 3`: step 3 inside section 4.3, a numbered list entry or a `**Step 3...` label;
* a chain `S1.2-S1.4, S3` or `S4.2/S4.4`: every member is checked against the same document.

Which document: the one named just before the chain (`docs/ARCHITECTURE.md S3`, `ALGORITHM.md S4`); without a name,
a Markdown file under docs/ cites its own sections and every other file (Python, README, benchmark notes) cites
docs/ALGORITHM.md. Sections of docs/ALGORITHM.md may also come from `docs/_algorithm_<n>.md`, the fragments of new
sections waiting to be merged into it. A named document that is not in the repository (or lies outside it) is an
error. A section of the paper itself ("the paper's S5") is recognised by the word "paper" just before it and skipped.
"""

import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT


SECTION_SIGN = "\N{SECTION SIGN}"
SCANNED_DIRS = ("sida_diffusers", "examples", "benchmarks", "tests", "docs")
SCANNED_SUFFIXES = (".py", ".md")
ALGORITHM = "docs/ALGORITHM.md"

_REF = SECTION_SIGN + r"(\d+)(?:\.(\d+))?(?:\s+(item|step)\s+(\d+))?"
_REF_PLAIN = SECTION_SIGN + r"\d+(?:\.\d+)?(?:\s+(?:item|step)\s+\d+)?"
_CHAIN = re.compile(r"(?:(?P<doc>[\w./-]*\w\.md)`?\s+)?(?P<refs>" + _REF_PLAIN
                    + r"(?:\s*(?:,|/|-|\u2013|\band\b|\bor\b)\s*" + _REF_PLAIN + r")*)")
_ONE_REF = re.compile(_REF)
_PAPER_BEFORE = re.compile(r"paper(?:'s)?\s*$")
_HEADING = re.compile(r"^#{1,6}\s+" + SECTION_SIGN + r"?(\d+(?:\.\d+)*)\.?(?=\s|$)")
_LIST_ENTRY = re.compile(r"^(\d+)\.\s")
_STEP_LABEL = re.compile(r"^\s*(?:[-*]\s+)?\**Step\s+(\d+)\b")


def parse_sections(text: str) -> dict:
    """Section number -> {"items": list entry numbers, "steps": step numbers} of one Markdown text.

    A heading `### 4.3 ...` also makes its parents (`4`) citable; fenced code blocks are not read."""
    sections: dict = {}
    current = None
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        heading = _HEADING.match(line)
        if heading:
            current = heading.group(1)
            parts = current.split(".")
            for depth in range(1, len(parts) + 1):
                sections.setdefault(".".join(parts[:depth]), {"items": set(), "steps": set()})
            continue
        if current is None:
            continue
        entry = _LIST_ENTRY.match(line)
        if entry:
            sections[current]["items"].add(int(entry.group(1)))
        step = _STEP_LABEL.match(line)
        if step:
            sections[current]["steps"].add(int(step.group(1)))
    return sections


def document_sections(relpath: str, root: Path = REPO_ROOT) -> dict:
    """The sections of the repository document `relpath` (docs/ALGORITHM.md together with its fragments)."""
    paths = [root / relpath]
    if relpath == ALGORITHM:
        paths += sorted((root / "docs").glob("_algorithm_*.md"))
    sections: dict = {}
    for path in paths:
        if path.is_file():
            for number, entries in parse_sections(path.read_text(encoding="utf-8")).items():
                merged = sections.setdefault(number, {"items": set(), "steps": set()})
                merged["items"] |= entries["items"]
                merged["steps"] |= entries["steps"]
    return sections


def default_document(citing: str) -> str:
    """The document a citation without a document name refers to, for the file `citing` (relative, POSIX)."""
    if citing.startswith("docs/") and citing.endswith(".md") and not Path(citing).name.startswith("_algorithm_"):
        return citing
    return ALGORITHM


def resolve_document(name: str, citing: str, root: Path = REPO_ROOT):
    """The repository-relative path of the document cited as `name` from the file `citing`, or None when the
    repository has no such document (or the name points outside it)."""
    if "/" in name:
        candidates = [root / name, root / Path(citing).parent / name]
    else:
        candidates = [root / "docs" / name, root / name, root / Path(citing).parent / name]
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved.is_file() and resolved.is_relative_to(root.resolve()):
            return resolved.relative_to(root.resolve()).as_posix()
    return None


def citations(text: str):
    """``(line number, document name or None, section, item kind or None, item number or None, cited text)`` for
    every section citation in `text`."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        for chain in _CHAIN.finditer(line):
            if _PAPER_BEFORE.search(line[:chain.start()]):
                continue  # the paper's own sections are not the repository's
            for ref in _ONE_REF.finditer(chain.group("refs")):
                section = ref.group(1) + (f".{ref.group(2)}" if ref.group(2) else "")
                kind, number = ref.group(3), (int(ref.group(4)) if ref.group(4) else None)
                yield lineno, chain.group("doc"), section, kind, number, ref.group(0)


def unresolved_citations(text: str, citing: str, root: Path = REPO_ROOT) -> tuple[list, int]:
    """``(problems, checked)``: one ``"file:line: ..."`` message per citation in `text` (the content of the file
    `citing`) that names a missing document, section, item or step, and the number of citations checked."""
    problems, checked, cache = [], 0, {}
    for lineno, doc_name, section, kind, number, cited in citations(text):
        checked += 1
        where = f"{citing}:{lineno}"
        doc = default_document(citing) if doc_name is None else resolve_document(doc_name, citing, root)
        if doc is None:
            problems.append(f"{where}: cites {doc_name} {cited!r}, a document the repository does not have; cite a "
                            "document of the repository, or drop the citation")
            continue
        if doc not in cache:
            cache[doc] = document_sections(doc, root)
        sections = cache[doc]
        if section not in sections:
            problems.append(f"{where}: {cited!r} cites section {section} of {doc}, which has no such heading"
                            + _hint(sections, section))
        elif kind is not None:
            entries = sections[section]["items"] | (sections[section]["steps"] if kind == "step" else set())
            if number not in entries:
                problems.append(f"{where}: {cited!r} cites {kind} {number} of section {section} of {doc}, which has "
                                f"no such {kind} (it has {sorted(entries) or 'none'})")
    return problems, checked


def _numeric(section: str) -> tuple:
    return tuple(int(part) for part in section.split("."))


def _hint(sections: dict, section: str) -> str:
    """What the cited document does have near a missing `section` (and the item form when that is what was meant)."""
    top, _, sub = section.partition(".")
    if top not in sections:
        return f" (its sections: {', '.join(sorted((s for s in sections if '.' not in s), key=_numeric)) or 'none'})"
    if sub and int(sub) in sections[top]["items"]:
        return f"; {sub} is an entry of the list in section {top}: write '{SECTION_SIGN}{top} item {sub}'"
    nearby = sorted((s for s in sections if s.split(".")[0] == top), key=_numeric)
    return f" (section {top} has: {', '.join(nearby)})"


def scanned_files(root: Path = REPO_ROOT) -> list:
    """README.md and every .py / .md file under the package, examples, benchmarks, tests and docs."""
    files = [root / "README.md"]
    for folder in SCANNED_DIRS:
        files += [p for p in sorted((root / folder).rglob("*"))
                  if p.suffix in SCANNED_SUFFIXES and p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p.is_file()]


def check_repository(root: Path = REPO_ROOT) -> tuple[list, int]:
    problems, checked = [], 0
    for path in scanned_files(root):
        found, count = unresolved_citations(path.read_text(encoding="utf-8"), path.relative_to(root).as_posix(), root)
        problems += found
        checked += count
    return problems, checked


S = SECTION_SIGN


# ---- the repository ---------------------------------------------------------------------------------------------------

def test_every_section_citation_in_the_repository_resolves():
    problems, checked = check_repository()
    assert not problems, "citations that do not resolve:\n" + "\n".join(problems)
    assert checked >= 100, f"only {checked} citations found: the scanner no longer sees the code's citations"


def test_algorithm_md_keeps_the_numbering_the_code_cites():
    sections = document_sections(ALGORITHM)
    expected = {"1": 4, "2": 0, "3": 0, "4": 8, "5": 11, "6": 2, "7": 3, "8": 3, "9": 2, "10": 0}
    for top, subsections in expected.items():
        assert top in sections, f"{ALGORITHM} lost section {top}"
        for sub in range(1, subsections + 1):
            assert f"{top}.{sub}" in sections, f"{ALGORITHM} lost section {top}.{sub}"
    assert sections["10"]["items"] == set(range(1, 21))
    assert {1, 2, 3} <= sections["4.1"]["steps"] and {1, 2, 3, 4} <= sections["4.3"]["steps"]
    assert {1, 2} <= sections["5.1"]["items"]


def test_algorithm_md_is_the_repositorys_own_text():
    text = (REPO_ROOT / ALGORITHM).read_text(encoding="utf-8")
    assert "shared/" not in text and "$" not in text, "cite no file outside the repository; equations in plain text"


# ---- the checker on examples ------------------------------------------------------------------------------------------

def test_a_missing_section_is_reported_with_file_and_line():
    text = f'"""Loss (ALGORITHM.md {S}4.3).\n\nNoise levels (ALGORITHM.md {S}4.99)."""\nx = 1  # ({S}42)\n'
    problems, checked = unresolved_citations(text, "sida_diffusers/example.py")
    assert checked == 3
    assert len(problems) == 2
    assert problems[0].startswith("sida_diffusers/example.py:3: ") and "section 4.99 of docs/ALGORITHM.md" in problems[0]
    assert problems[1].startswith("sida_diffusers/example.py:4: ") and "section 42 " in problems[1]


def test_items_and_steps_must_exist_in_the_cited_section():
    good = f"# ({S}10 item 7, {S}4.3 step 3, {S}5.1 step 2, {S}10 item 20)"
    bad = f"# ({S}10 item 21) ({S}4.3 step 5) ({S}4.5 step 1)"
    assert unresolved_citations(good, "sida_diffusers/x.py") == ([], 4)
    problems, checked = unresolved_citations(bad, "sida_diffusers/x.py")
    assert checked == 3 and len(problems) == 3
    assert "item 21 of section 10" in problems[0] and "step 5 of section 4.3" in problems[1]


def test_chains_and_ranges_check_every_member_against_the_named_document():
    problems, checked = unresolved_citations(f"(ALGORITHM.md {S}1.2-{S}1.4, {S}3/{S}4.9)", "sida_diffusers/x.py")
    assert checked == 4
    assert len(problems) == 1 and "section 4.9 of docs/ALGORITHM.md" in problems[0]


def test_other_documents_are_cited_by_name_and_resolve_against_their_own_headings():
    good = f"(docs/ARCHITECTURE.md {S}3) (ARCHITECTURE.md {S}4) (ALGORITHM.md {S}3)"
    assert unresolved_citations(good, "sida_diffusers/x.py") == ([], 3)
    problems, _ = unresolved_citations(f"(docs/ARCHITECTURE.md {S}4.3)", "sida_diffusers/x.py")
    assert len(problems) == 1 and "section 4.3 of docs/ARCHITECTURE.md" in problems[0]
    outside = "/".join(["..", "shared", "spec", "ALGORITHM.md"])  # a path beside the clone, not in it
    for missing in (f"(ECOSYSTEM.md {S}2)", f"({outside} {S}4)", f"(notes/ECOSYSTEM.md {S}1)"):
        problems, _ = unresolved_citations(missing, "sida_diffusers/x.py")
        assert len(problems) == 1 and "a document the repository does not have" in problems[0], missing


def test_a_bare_citation_in_a_doc_means_that_doc_and_elsewhere_the_algorithm():
    assert unresolved_citations(f"see {S}6", "docs/ARCHITECTURE.md") == ([], 1)  # ARCHITECTURE.md has a section 6
    problems, _ = unresolved_citations(f"see {S}5.6", "docs/ARCHITECTURE.md")
    assert len(problems) == 1 and "of docs/ARCHITECTURE.md" in problems[0]
    assert unresolved_citations(f"see {S}5.6", "README.md") == ([], 1)
    assert unresolved_citations(f"as in the paper {S}5 and the paper's {S}7", "README.md") == ([], 0)


def test_fragments_of_new_algorithm_sections_count_as_part_of_algorithm_md(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ALGORITHM.md").write_text("## 1. One\n\n### 1.1 Sub\n\n## 10. Pitfalls\n\n1. a\n2. b\n")
    (tmp_path / "docs" / "_algorithm_11.md").write_text("## 11. Few steps\n\n### 11.2 Which step\n\n```text\n"
                                                         "# 11.9 not a heading inside a code block\n```\n")
    text = f"({S}1.1, {S}11.2, {S}10 item 2) ({S}11.9) ({S}10 item 3)"
    problems, checked = unresolved_citations(text, "sida_diffusers/x.py", root=tmp_path)
    assert checked == 5
    assert [p.split("'")[1] for p in problems] == [f"{S}11.9", f"{S}10 item 3"]


@pytest.mark.parametrize("line", ["x = '\u00a7'", "# a section sign without a number: \u00a7x.y", "(ALGORITHM.md)"])
def test_text_without_a_numbered_section_is_not_a_citation(line):
    assert unresolved_citations(line, "sida_diffusers/x.py") == ([], 0)
