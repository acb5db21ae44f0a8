"""The README and every page under docs/: their Python blocks run as pasted and print what the
page shows after them, and their relative links point at files that exist.

The docs pages' blocks and the documentation site (``mkdocs build --strict``: broken links and
anchors fail it) run in the slow tier.
"""

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A ```python block, optionally followed by a plain ``` block: the output the page shows.
BLOCK = re.compile(r"```python\n(.*?)```\n(?:\n```\n(.*?)```)?", re.S)
BLOCKS = [(page, *m) for page in PAGES for m in BLOCK.findall(page.read_text())]


def test_pages_have_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize(
    ("page", "code", "shown"),
    # The README's blocks in the default tier; the docs pages' (about 25 s) in the slow tier.
    [
        pytest.param(*b, marks=[] if b[0].name == "README.md" else [pytest.mark.slow])
        for b in BLOCKS
    ],
    ids=[f"{p.name}-{i}" for i, (p, _, _) in enumerate(BLOCKS)],
)
def test_block_runs_and_prints_what_the_page_shows(page, code, shown):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(page), "exec"), {"__name__": "docs"})
    if shown:
        assert out.getvalue().strip() == shown.strip()


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_at_files_that_exist(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which is missing"


@pytest.mark.slow
def test_documentation_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is in the test extra"
    out = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "architecture" / "index.html").exists()
