"""Every python example of README.md runs as written (issue 16, item 5).

A block is skipped only when the line before it is an HTML comment starting with
``<!-- no-test`` that says why; such a block must still compile, and its imports must resolve
(so a renamed API still breaks the test).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) for each ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").splitlines()
        skipped = bool(before) and before[-1].lstrip().startswith("<!-- no-test")
        out.append((text[: m.start()].count("\n") + 1, m.group(1), skipped))
    return out


BLOCKS = _blocks()


def test_readme_has_examples_and_few_skips():
    assert len(BLOCKS) >= 4
    skipped = [line for line, _, s in BLOCKS if s]
    # three: a signature overview, the full-width ResNet-18 example (minutes on a CPU) and the
    # torchrun example (one process per rank); each says why in its marker
    assert len(skipped) <= 3, f"README blocks skipped at lines {skipped}: keep skips rare"
    text = README.read_text(encoding="utf-8")
    for m in re.finditer(r"<!-- no-test(.*?)-->", text, re.S):
        assert len(m.group(1).strip(" :")) > 20, "a no-test marker must say why"


@pytest.mark.parametrize("line,code,skipped", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, skipped):
    tree = compile(code, f"README.md:{line}", "exec", flags=ast.PyCF_ONLY_AST)
    if skipped:  # at least its imports must still exist
        imports = ast.Module(
            body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
            type_ignores=[],
        )
        exec(compile(imports, f"README.md:{line}", "exec"), {})
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(tree, f"README.md:{line}", "exec"), {"__name__": "readme_example"})
    finally:
        torch.set_num_threads(threads)
