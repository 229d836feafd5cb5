"""The docs: tutorials' code runs, every public name has an API page, mkdocs builds strictly.

The tutorials' ```python exec="on" blocks (markdown-exec) run when the site is built, which
embeds what they print and draw. The default suite builds the site without running them
(FUNDL_DOCS_EXEC=false) and runs the quick pages' blocks here, in-process; FUNDL_SLOW=1
builds the site as it is published, running every executed page and checking its figures.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import fundl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
PAGES_WITH_CODE = [ROOT / "README.md", DOCS / "index.md", *TUTORIALS]
# Tutorials that train a model for 5-20 s: FUNDL_SLOW=1 runs them (CI does).
SLOW_PAGES = {"attention", "cnn", "going_fast", "overfitting", "rnn", "transfer_learning",
              "taking_out", "benchmarking", "scaling_out", "looking_inside"}  # fmt: skip
# Pages that need optional extras (fundl[onnx], fundl[torch]): skipped with a note without them.
NEEDS = {"taking_out": ("jax2onnx", "onnxruntime", "torch")}
# The figures (inline SVG) each page shows once built; the other pages show none.
FIGURES = {
    "first_network": 2,
    "cnn": 3,
    "rnn": 2,
    "attention": 2,
    "overfitting": 3,
    "transfer_learning": 1,
    "looking_inside": 2,
}
# A fence and its options (markdown-exec's `exec="on" session=...`, or none), the code.
FENCE = re.compile(r"^```python(?P<options>[^\n]*)\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return [block["code"] for block in FENCE.finditer(page.read_text())]


def executed(page: Path) -> bool:
    """Whether the docs build runs the page's blocks (markdown-exec)."""
    return 'exec="on"' in page.read_text()


def runs_here(page: Path) -> bool:
    """Slow executed pages run in the executing build alone (once is enough)."""
    return not (page.stem in SLOW_PAGES and executed(page))


@pytest.mark.parametrize("page", [p for p in PAGES_WITH_CODE if executed(p)], ids=lambda p: p.stem)
def test_executed_page_runs_every_block_in_its_session(page):
    # A plain block on an executed page would be skipped by the build, and the blocks after
    # it would miss its names; one session per page keeps pages apart.
    options = [block["options"] for block in FENCE.finditer(page.read_text())]
    wanted = f'exec="on" session="{page.stem}"'
    assert [line for line in options if wanted not in line] == []


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if p.stem in SLOW_PAGES else [])
        for p in PAGES_WITH_CODE
        if runs_here(p)
    ],
    ids=lambda p: p.stem,
)
def test_page_code_runs(page):
    for module in NEEDS.get(page.stem, ()):
        pytest.importorskip(module, reason=f"{page.name} needs {module} (the onnx/torch extras)")
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no python code blocks"
    namespace = {"__name__": f"tutorial_{page.stem}"}
    printed = io.StringIO()
    # Tutorials run as users run them: JAX's default promotion rules (optax relies on them).
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for i, block in enumerate(blocks):
            with contextlib.redirect_stdout(printed):
                exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
    assert printed.getvalue().count("<svg") == FIGURES.get(page.stem, 0)  # figures, as SVG


def documented_names() -> set[str]:
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    names = set(re.findall(r"^::: fundl\.(\w+)", text, re.M))
    names |= set(re.findall(r"`fl\.(\w+)`", text))
    for members in re.findall(r"members: \[(.*?)\]", text):
        names |= {m.strip() for m in members.split(",")}
    return names


def test_every_public_name_has_an_api_page():
    missing = sorted(
        set(fundl.__all__) - documented_names() - {"datasets", "metrics", "checkpoint"}
    )
    assert missing == []


def build_site(site: Path, execute: bool) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "FUNDL_DOCS_EXEC": str(execute).lower()}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (site / "api" / "combinators" / "index.html").exists()


def article(html_file: Path) -> str:
    """A built page's own content, without the theme's header, navigation and icons."""
    return html_file.read_text().split("<article", 1)[1].split("</article>", 1)[0]


def test_mkdocs_build_strict(tmp_path):
    build_site(tmp_path, execute=False)
    first = article(tmp_path / "tutorials" / "first_network" / "index.html")
    assert "digits_split" in first and "<svg" not in first  # the code shown, not run
    assert not (tmp_path / "hooks.py").exists()  # docs/hooks.py is the build's, not the site's


@pytest.mark.slow
def test_mkdocs_build_runs_the_tutorials_and_shows_their_figures(tmp_path):
    build_site(tmp_path, execute=True)
    pages = {p.stem: article(tmp_path / "tutorials" / p.stem / "index.html") for p in TUTORIALS}
    shown = {stem: html.count("<svg") for stem, html in pages.items()}
    assert shown == {stem: FIGURES.get(stem, 0) for stem in pages}
    assert "Total params: 10,026" in pages["cnn"]  # fl.summary's table, printed by the page
