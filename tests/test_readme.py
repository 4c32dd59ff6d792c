"""The measured results (``docs/results.md``) are generated from ``bench/results/*.json`` and must stay so.

``tools/results_tables.py`` writes every table and key figure of the page's "Measured results"
section between ``<!-- results:NAME:start/end -->`` markers. These tests fail when the page differs
from what the tool generates now (a JSON or the tool changed and the page was not regenerated), and
when a number appears in the section outside the generated blocks (written by hand, so it can drift).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "tools" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page() -> str:
    return (ROOT / "docs" / "results.md").read_text(encoding="utf-8")


def test_measured_results_match_the_json(tool, page):
    """Regenerate with ``python tools/results_tables.py`` when a result or the tool changes."""
    assert tool.render(page) == page, "docs/results.md's measured results are out of date: run python tools/results_tables.py"


def test_check_mode(tool, page, tmp_path):
    current = tmp_path / "results.md"
    current.write_text(page, encoding="utf-8")
    assert tool.main(["--check", "--page", str(current)]) == 0
    stale = page.replace(tool.start_marker("loss") + "\n", tool.start_marker("loss") + "\n| stale | 9.99x |\n", 1)
    current.write_text(stale, encoding="utf-8")
    assert tool.main(["--check", "--page", str(current)]) == 1
    assert current.read_text(encoding="utf-8") == stale, "--check must not write"
    assert tool.main(["--page", str(current)]) == 0
    assert current.read_text(encoding="utf-8") == page


def test_every_block_is_in_the_section_once(tool, page):
    start, end = tool.section_bounds(page)
    section = page[start:end]
    for name in tool.BLOCKS:
        assert section.count(tool.start_marker(name)) == 1 and section.count(tool.end_marker(name)) == 1, name
    outside = page[:start] + page[end:]
    assert "<!-- results:" not in outside, "generated blocks belong to the Measured results section only"
    assert "<!-- results:" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_plots_the_page_shows_exist(page):
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert images and all((ROOT / "docs" / path).resolve().is_file() for path in images), images


def hand_written(tool, page: str) -> str:
    """The section's text outside the generated blocks, code spans and image links."""
    start, end = tool.section_bounds(page)
    text = page[start:end]
    for name in tool.BLOCKS:
        before, rest = text.split(tool.start_marker(name), 1)
        _, after = rest.split(tool.end_marker(name), 1)
        text = before + after
    text = re.sub(r"`[^`]*`", "", text)  # commands and file names
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # the plot
    text = re.sub(r"\b[A-Za-z][A-Za-z.]*[-@]\d+[A-Za-z]*\b", "", text)  # names: MovieLens-1M, NDCG@10
    return re.sub(r"§\s?\d+", "", text)  # section references


def test_no_number_is_written_by_hand(tool, page):
    numbers = re.findall(r"[^\s]*\d[^\s]*", hand_written(tool, page))
    assert not numbers, f"numbers outside the generated blocks of Measured results (generate them instead): {numbers}"


def test_funnel_figure_names_both_exact_baselines(tool):
    """The funnel's speed-up is quoted against torch.topk (the faster exact search) and faiss flat."""
    text = "\n".join(tool.block_retrieval())
    line = next(x for x in text.splitlines() if "fastest funnel" in x)
    assert "torch.topk" in line and "faiss flat" in line
    data = tool.load("retrieval.json")
    largest = max(data["results"], key=lambda r: r["num_items"])
    assert largest["exact_full_torch_topk_ms"] < largest["exact_full_faiss_flat_ms"], (
        "the text calls torch.topk the faster exact baseline"
    )
