"""The docs: tutorials' code runs, every public name has an API page, mkdocs builds strictly."""

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
              "taking_out", "benchmarking"}  # fmt: skip
# Pages that need optional extras (fundl[onnx], fundl[torch]): skipped with a note without them.
NEEDS = {"taking_out": ("jax2onnx", "onnxruntime", "torch")}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if p.stem in SLOW_PAGES else [])
        for p in PAGES_WITH_CODE
    ],
    ids=lambda p: p.stem,
)
def test_page_code_runs(page):
    for module in NEEDS.get(page.stem, ()):
        pytest.importorskip(module, reason=f"{page.name} needs {module} (the onnx/torch extras)")
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no python code blocks"
    namespace = {"__name__": f"tutorial_{page.stem}"}
    # Tutorials run as users run them: JAX's default promotion rules (optax relies on them).
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for i, block in enumerate(blocks):
            exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)


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


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "api" / "combinators" / "index.html").exists()
