"""Every ```python block of README.md runs as written, given only `model` (the bundled digits model), in CI.

Each block runs in a fresh namespace holding `model` and nothing else; whatever `x` a block leaves must be a finite
sample. The README's commands (```bash) are measured from a fresh clone instead (its timing line)."""
import os
import re

import pytest
import torch

from fastdiff.app.checkpoint import bundled_checkpoint, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python fenced block."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


BLOCKS = python_blocks(open(README, encoding="utf-8").read())


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2, "README.md lost its python examples (or this test's fence pattern no longer finds them)"


def test_python_blocks_parser_finds_each_block():
    text = "intro\n```python\na = 1\n```\n\n```bash\necho no\n```\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "b = 2\nc = 3\n")]


@pytest.fixture(scope="module")
def model():
    m, _meta = load_checkpoint(bundled_checkpoint())
    return m


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, model):
    if "diffusers" in code:
        pytest.importorskip("diffusers")  # the API block builds diffusers schedulers ([test] extra)
    ns = {"model": model, "__name__": "readme"}
    exec(compile(code, f"README.md:{line}", "exec"), ns)  # noqa: S102 - the README's own examples
    if "x" in ns:
        x = ns["x"]
        assert isinstance(x, torch.Tensor) and x.numel() > 0 and torch.isfinite(x).all(), f"README.md:{line}"
