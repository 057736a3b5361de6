"""Packaging and ecosystem fit (issue 16, item 4): one version source, py.typed, no unused
dependency, matplotlib only where figures are drawn, no dependency warning on first use,
``ForgetResult.to_dict``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ntkscrub
from ntkscrub.baselines import finetune, fisher_forget

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_has_one_source():
    proj = _pyproject()
    assert "version" not in proj["project"] and "version" in proj["project"]["dynamic"]
    assert proj["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ntkscrub.__version__"}
    parts = ntkscrub.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)


def test_py_typed_is_shipped():
    assert (ROOT / "ntkscrub" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["ntkscrub"]


def test_gpytorch_is_not_a_dependency_and_not_imported():
    deps = " ".join(_pyproject()["project"]["dependencies"])
    assert "gpytorch" not in deps and "linear_operator" in deps
    for path in (ROOT / "ntkscrub").rglob("*.py"):
        text = path.read_text()
        assert "import gpytorch" not in text and "from gpytorch" not in text, path


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_matplotlib_only_where_figures_are_drawn():
    proc = _run(
        "import sys, ntkscrub, ntkscrub.recipes.demo, ntkscrub.cli, ntkscrub.challenge\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_no_future_warning_on_import_and_first_jvp():
    """linear_operator's import and torch's JVP decompositions call the deprecated
    torch.jit.script; neither warning reaches a user (FutureWarning is an error here)."""
    proc = _run(
        "import torch, ntkscrub\n"
        "from torch.func import jvp\n"
        "f = torch.nn.Linear(3, 2)\n"
        "jvp(lambda x: torch.nn.functional.cross_entropy(f(x), torch.tensor([0])),"
        " (torch.randn(1, 3),), (torch.randn(1, 3),))\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_forget_result_to_dict_is_json():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    X, Y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    for res in (
        finetune(model, (X[:25], Y[:25]), init=model, epochs=1),
        fisher_forget(model, (X[:25], Y[:25]), alpha=1e-6, seed=0),
    ):
        d = res.to_dict()
        text = json.dumps(d, allow_nan=False)
        assert set(d) == {"info", "shift_norm", "shift_numel"}
        assert d["shift_numel"] == sum(p.numel() for p in model.parameters())
        assert d["shift_norm"] == float(res.shift.norm()) and "info" in json.loads(text)


# Layers (README "Architecture"): the engine in the package root never imports the applications
# in ntkscrub.recipes; only the command line (the top layer) reaches them.
_TOP_LAYER = {"cli.py", "challenge.py", "__main__.py"}


def test_engine_never_imports_the_recipes():
    import ast

    offenders = []
    for path in sorted((ROOT / "ntkscrub").rglob("*.py")):
        rel = path.relative_to(ROOT / "ntkscrub")
        if rel.parts[0] == "recipes" or str(rel) in _TOP_LAYER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("ntkscrub.recipes") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"the engine imports ntkscrub.recipes at {offenders}"
