"""Small float64 models and data shared by the tests (imported by name, not through conftest,
so that the benchmarks' conftest cannot shadow them when both folders are collected)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draws from torch's global generator seeded with ``seed`` inside the block, its state
    restored afterwards: torch seeds it at random per process, so a module built (or data drawn)
    without a seed gives a test run on its own a new problem every run."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def make_mlp(in_dim: int = 6, hidden: int = 8, c: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, c)).double().eval()


def make_cnn(c: int = 3, seed: int = 0) -> nn.Module:
    """A small CNN with BatchNorm (random running statistics) in eval mode, 1×6×6 inputs."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, c),
    ).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def make_data(kind: str, n: int, c: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 1, 6, 6)
    X = torch.randn(shape, generator=g, dtype=torch.float64)
    Y = torch.randint(0, c, (n,), generator=g)
    return X, Y


def spd(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Dense U diag(eigenvalues) Uᵀ with a random orthogonal U; (n, n) float64."""
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return (U * eigenvalues.to(torch.float64)) @ U.T


def random_features_model(seed: int = 0, d: int = 5, h: int = 12, c: int = 3) -> nn.Module:
    """A model linear in its trainable parameters: fixed random features → nn.Linear."""
    torch.manual_seed(seed)
    feats = nn.Linear(d, h).double().requires_grad_(False)
    return nn.Sequential(feats, nn.Tanh(), nn.Linear(h, c).double()).eval()


def min_norm_interpolant(theta0: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> nn.Module:
    """θ0 + the min-norm w with f(θ0 + w; X) = onehot(Y) (the linear model's GD limit), for a
    :func:`random_features_model`."""
    import copy

    with torch.no_grad():
        phi = torch.tanh(theta0[0](X))
        Phi = torch.cat([phi, torch.ones(len(X), 1, dtype=phi.dtype)], 1)
        e = torch.nn.functional.one_hot(Y, theta0[2].out_features).double() - theta0(X)
        Wb = (torch.linalg.pinv(Phi) @ e).T
        out = copy.deepcopy(theta0)
        out[2].weight.add_(Wb[:, :-1])
        out[2].bias.add_(Wb[:, -1])
    return out


def flat(model: nn.Module) -> torch.Tensor:
    """The trainable parameters as one vector, in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def explicit_jacobian(model: nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N·c, p) Jacobian of the logits in named_parameters order, and the logits (N, c) —
    by torch.autograd.functional.jacobian on the flat vector (independent of ntkscrub)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    theta = flat(model).clone()

    def f(t: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            params[n] = t[i : i + k].reshape(s)
            i += k
        return functional_call(model, params, (X,))

    J = torch.autograd.functional.jacobian(f, theta)  # (N, c, p)
    with torch.no_grad():
        out = f(theta)
    return J.reshape(-1, theta.numel()), out
