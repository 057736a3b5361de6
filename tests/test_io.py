"""ntkscrub.io: the JSON-safe record form shared by the experiments and the benchmarks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
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
