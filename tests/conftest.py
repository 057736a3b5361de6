"""Shared fixtures: a grid of small float64 models and data, each with a dense reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from model_zoo import make_cnn, make_data, make_mlp

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
torch.set_num_threads(1)  # tiny problems: threads only add OpenMP overhead


@pytest.fixture(params=["mlp", "cnn"])
def case(request):
    """(model, X, Y) for each model kind of the grid."""
    kind = request.param
    model = make_mlp() if kind == "mlp" else make_cnn()
    X, Y = make_data(kind, 14)
    return model, X, Y
