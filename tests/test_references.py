"""Code, comments, help and docs cite what a reader can open (a paper's arXiv id and section, an upstream
file, a file of this project), never an internal specification or an issue tracker's numbers."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".yaml", ".md", ".sh", ".txt", ".cfg", ".toml"}
FORBIDDEN = [
    re.compile(r"\bSPEC(\.md)?\s*§|\bSPEC\.md\b|\bthe SPEC\b"),  # the internal reference document
    re.compile(r"\bissues? #?\d+", re.IGNORECASE),                         # issue-tracker numbers
    re.compile(r"(?<!\d{4}\.\d{5} )§"),                                   # a section sign without its arXiv id
]


def project_files():
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if path.suffix in SUFFIXES and path.is_file() and not any(p.startswith(".") or p in ("build", "checkpoints",
                                                                                             "videos", "runs", "logs")
                                                                  for p in parts) and "egg-info" not in str(path):
            yield path


def test_no_citation_of_documents_a_reader_cannot_open():
    this = Path(__file__).resolve()
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()[:80]}"
             for path in project_files() if path.resolve() != this
             for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if any(pattern.search(line) for pattern in FORBIDDEN)]
    assert found == []
