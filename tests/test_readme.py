"""README.md is the newcomer's page: short, its set-up command is what CI runs, and its links lead
somewhere. The manual itself is checked by tests/test_docs.py."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(markdown: str) -> list[str]:
    """Every link target that is a path in the repository (no scheme, no bare #anchor)."""
    targets = LINK.findall(markdown)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def test_ci_runs_the_readme_test_command():
    """The quick start's second command is what .ci/run runs, step for step."""
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    [command] = [
        line.strip()
        for line in readme.splitlines()
        if line.startswith("python3 -m venv") and "pytest" in line
    ]
    for step in command.split("&&"):
        step = step.strip()
        assert step == "python3 -m venv .venv" or step in ci, f"{step!r} is not in .ci/run"
    assert "python3 -m venv .venv" in ci


def test_the_readme_stays_a_short_page():
    lines = len(README.read_text().splitlines())
    assert lines < MAX_LINES, (
        f"README.md has {lines} lines; keep it under {MAX_LINES} and move detail to docs/"
    )


def test_every_relative_link_in_the_readme_points_at_a_file_that_exists():
    links = relative_links(README.read_text())
    assert links, "README.md links into docs/; none found"
    missing = [link for link in links if not (ROOT / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_link_finder_sees_links_and_images_and_skips_urls_and_anchors():
    text = '[a](docs/a.md#x) ![b](docs/b.png) [c](https://x.org) [d](#top) [e](docs/e.md "title")'
    assert relative_links(text) == ["docs/a.md#x", "docs/b.png", "docs/e.md"]
