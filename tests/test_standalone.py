"""The repository stands alone: every file that its code, comments, recipes and documents name
exists in it (a fork needs nothing from outside), the design document's sections that comments
cite exist, and the licence and the citation file are there and well formed."""

import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCANNED = (".py", ".md", ".yaml", ".cff", ".toml")
# The CIFAR-10 tarball is the one thing reached outside the repository, with a fallback ($CIFAR10_TAR,
# a download, --data_path): these files may name its folder beside the repository, nothing else may.
OUTSIDE_DATA = {"data.py", "tests/conftest.py", "Makefile", "README.md"}
OUTSIDE = "../" + "shared"  # split so that this file does not match itself
OLD_DOC_NAME = re.compile(r"\b" + "DES" + r"IGN\b")  # the old, external design document's name
# a path into one of the repository's folders, or the name of one of its documents
PATH = re.compile(r"(?<![\w./-])((?:docs|yaml|tests|bench|launch|papers|\.ci)/[\w.*/{},-]*)")
DOCS = re.compile(r"\b(LICENSE|CITATION\.cff|README\.md|requirements\.txt|pyproject\.toml|STY" + r"LE\.md)\b")
SECTION = re.compile(r"docs[/]design\.md, ([A-Z][^)\n;:]*)")


def repo_files():
    """Files of the repository as a fresh clone has them (tracked, plus new files not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split("\n")
        files = sorted({f for f in out if f and (REPO / f).is_file()})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk, minus what .gitignore lists
        skip = {".git", ".venv", "out", "runs", "data", "wandb", "__pycache__", ".pytest_cache", ".ruff_cache"}
        files = sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*")
                       if p.is_file() and not skip & set(p.relative_to(REPO).parts))
    assert "README.md" in files and "data.py" in files
    return files


def scanned_files():
    return [f for f in repo_files() if f.endswith(SCANNED) or Path(f).name == "Makefile"]


def exists(ref):
    ref = ref.rstrip(".,/")
    if any(c in ref for c in "*{"):  # a glob such as yaml/*.yaml: something must match it
        return any(REPO.glob(re.sub(r"\{[^}]*\}", "*", ref)))
    return (REPO / ref).exists()


def headings():
    text = (REPO / "docs" / "design.md").read_text()
    return [h.strip() for h in re.findall(r"^#+ (.+)$", text, re.M)]


def test_no_reference_leaves_the_repository():
    bad = []
    for f in scanned_files():
        for n, line in enumerate((REPO / f).read_text(errors="replace").splitlines(), 1):
            where = f"{f}:{n}: {line.strip()[:120]}"
            if OLD_DOC_NAME.search(line):
                bad.append(f"names a design document that is not in the repository (docs/design.md is): {where}")
            for m in re.finditer(re.escape(OUTSIDE) + r"(/data)?", line):
                if not (m[1] and f in OUTSIDE_DATA):
                    bad.append(f"reaches outside the repository: {where}")
            for m in PATH.finditer(line):
                if not exists(m[1]):
                    bad.append(f"names {m[1]!r}, which is not in the repository: {where}")
            for m in DOCS.finditer(line):
                if not (REPO / m[1]).is_file():
                    bad.append(f"names {m[1]!r}, which is not in the repository: {where}")
    assert not bad, "\n".join(bad)


def test_cited_design_sections_exist():
    titles, cited = headings(), 0
    for f in scanned_files():
        for m in SECTION.finditer((REPO / f).read_text(errors="replace")):
            cited += 1
            assert any(m[1].startswith(t) for t in titles), f"{f} cites docs/design.md, {m[1]!r}: no such section"
    assert cited >= 10  # the code's comments point there instead of repeating the reasoning
    for topic in ("Slimmable networks", "Batch norm across widths", "The per-width backward", "US3L as implemented",
                  "DSPNet as implemented", "Data order, seeding and resume", "The three loaders", "Evaluation",
                  "Performance targets"):
        assert topic in titles


def test_licence_and_citation():
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2026 the slimmable-ssl authors" in licence
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert str(cff["cff-version"]) == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    assert cff["title"] and cff["authors"] and cff["message"]
    refs = {r["title"]: r for r in cff["references"]}
    us3l = refs["Three Guidelines You Should Know for Universally Slimmable Self-Supervised Learning"]
    dspnet = refs["DSPNet: Towards Slimmable Pretrained Networks based on Discriminative Self-supervised Learning"]
    assert [a["family-names"] for a in us3l["authors"]] == ["Cao", "Sun", "Zhou"] and us3l["year"] == 2023
    assert "CVPR" in us3l["conference"]["name"] and dspnet["authors"][0]["family-names"] == "Wang"
    readme = (REPO / "README.md").read_text()
    assert "MIT" in readme and "CITATION.cff" in readme and "docs/design.md" in readme


def test_layout_table_matches_the_files():
    """README's layout table names every top-level script and folder of the repository and nothing that
    is not there. No line count is tested: about 500 lines is a signal to split a file along a seam, not
    a limit."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout"):]
    table = table[:table.index("\n## ")]
    named = {name.rstrip("/") for row in table.splitlines() if row.startswith("| `")
             for name in re.findall(r"`([^`]+)`", row.split("|")[1])}
    files = repo_files()
    top = {f for f in files if "/" not in f and f.endswith(".py")}
    folders = {f.split("/")[0] for f in files if "/" in f and not f.startswith(".")}
    assert top - named == set(), f"README's layout table lacks {sorted(top - named)}"
    assert folders - named - {"docs"} == set(), f"README's layout table lacks {sorted(folders - named)}"
    assert {n for n in named if not (REPO / n).exists()} == set()
