"""The README is a front page and the docs speak of the product: short, linked, and with speed
figures rendered from result files, never typed."""

from __future__ import annotations

import re
import sys

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_every_relative_link_resolves():
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_docs_speak_of_the_product_not_its_history():
    for page in DOCS:
        text = page.read_text(encoding="utf-8").lower()
        for word in (r"\brounds?\b", r"\blent\b", r"\bsessions?\b", r"\bissue \d+"):
            assert not re.search(word, text), f"{page.name}: {word}"


def test_performance_tables_are_rendered_from_the_result_files():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render

    found = render.results()
    assert found, "no result files in benchmarks/results"
    assert (ROOT / "docs" / "performance.md").read_text(encoding="utf-8") == render.performance_page(found)
    assert render.readme_table(found) in (ROOT / "README.md").read_text(encoding="utf-8")
