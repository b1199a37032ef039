"""README.md leads to the docs: its relative links resolve, and it links every page of docs/.

(Links inside docs/ are checked by `mkdocs build --strict`, a gate of scripts/test.sh.)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links() -> list[str]:
    links = LINK.findall(README.read_text(encoding="utf-8"))
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


def test_readme_relative_links_resolve() -> None:
    links = _relative_links()
    assert len(links) > 10
    broken = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not broken, f"README.md links to what is not in the repository: {broken}"


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / link.split("#")[0]).resolve() for link in _relative_links()}
    pages = sorted((ROOT / "docs").rglob("*.md"))
    missing = [page.relative_to(ROOT).as_posix() for page in pages if page.resolve() not in linked]
    assert not missing, f"README.md's Documentation list does not link: {missing}"
