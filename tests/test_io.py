"""ntkscrub.io: the JSON-safe record form shared by the experiments and the benchmarks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ntkscrub.io import atomic_write_json, to_jsonable


@dataclass
class _Rec:
    a: float
    b: torch.Tensor


def test_to_jsonable_covers_the_record_types(tmp_path):
    rec = {
        1: float("nan"),
        "inf": float("-inf"),
        "t": torch.tensor([[1.0, float("nan")]], dtype=torch.float64),
        "np": np.array([1, 2]),
        "npf": np.float32(0.5),
        "npi": np.int64(3),
        "npb": np.bool_(True),
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "tuple": (1, True, None, "x"),
        "dc": _Rec(2.0, torch.zeros(2)),
    }
    out = to_jsonable(rec)
    assert out == {
        "1": None,
        "inf": None,
        "t": [[1.0, None]],
        "np": [1, 2],
        "npf": 0.5,
        "npi": 3,
        "npb": True,
        "dtype": "torch.float32",
        "device": "cpu",
        "tuple": [1, True, None, "x"],
        "dc": {"a": 2.0, "b": [0.0, 0.0]},
    }
    assert type(out["npi"]) is int and type(out["npb"]) is bool
    path = atomic_write_json(tmp_path / "r.json", out, allow_nan=False)  # strict JSON
    assert json.loads(path.read_text()) == out
    assert isinstance(rec["t"], torch.Tensor)  # the input is not modified


def test_figures_and_text_reports_are_written_atomically(tmp_path, monkeypatch):
    """A failing figure or report write leaves neither a partial file nor a temp file behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ntkscrub.io import save_figure, write_text

    fig = plt.figure()
    png = save_figure(fig, tmp_path / "f.png", dpi=50)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_text(tmp_path / "r.md", "# report\n").read_text() == "# report\n"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, tmp_path / "g.png")
    plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "r.md"]
