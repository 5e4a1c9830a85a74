"""README.md's promises about itself: the two commands at the top that work on a fresh machine, the test command CI
runs, a short page (at most 10 KB) whose quick starts are at most 10 lines each, every page it points to there.

Its code blocks, the quick starts included, are run by tests/test_docs.py (the training-loop quick start with a
recording stand-in for wandb); the examples that moved from the README to docs/ are run there too.
"""
from pathlib import Path
import re

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMAND = "python -m pytest -q tests"


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)


def test_the_first_lines_are_the_demo_and_the_tests():
    first = fenced_blocks(README.read_text())[0].splitlines()
    assert first[0].startswith("pip install -e . && moshi-eval demo --out demo_out ")
    assert first[1].startswith(f'pip install -e ".[test]" && {TEST_COMMAND} ')
    assert len(first) == 2


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert lines[-1] == TEST_COMMAND


def test_the_readme_is_short_and_its_quick_starts_too():
    text = README.read_text()
    assert len(text.encode()) <= 10 * 1024
    quick = text[text.index("## Quick starts"):text.index("\n## ", text.index("## Quick starts") + 1)]
    starts = fenced_blocks(quick)
    assert len(starts) == 4
    assert all(len(block.splitlines()) <= 10 for block in starts), [len(b.splitlines()) for b in starts]


def test_every_page_of_docs_is_reachable_from_the_readme():
    text = README.read_text()
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)\)", text))
    assert "README.md" in linked
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked, sorted(pages - linked)
