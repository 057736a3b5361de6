"""Information bounds of Gaussian scrubbing (Proposition 1, eq. 6–7), matrix-free.

Proposition 1 compares the scrubbed weights ``S(w_D) = h(w_D) + n``, ``n ~ N(0, Σ)``, with the
baseline ``S0(w_Dr) = w_Dr + n'``, ``n' ~ N(0, Σ0)`` (the model retrained on D_r plus noise):

* white box (eq. 6, :func:`white_box`): ``KL(N(h(w_D), Σ) ‖ N(w_Dr, Σ0))`` in the p weights;
* black box (eq. 7, :func:`black_box`, :func:`per_query_information`):
  ``KL(N(f_h(x), Σₓ) ‖ N(f_ref(x), Σ'ₓ))`` in the c·k outputs of k queries, ``Σₓ = Jₓ Σ Jₓᵀ``
  with ``Jₓ`` at h(w_D) and ``Σ'ₓ = Jₓ Σ0 Jₓᵀ`` with ``Jₓ`` at w_Dr (eq. 5);
* both at once, sharing the covariances: :func:`information_bounds`.

KL in nats with the ½ (:data:`CONVENTION`, in every result; the paper's printed d(Σ, Σ0) and the
reference code's 2·reversed-KL are reported beside it). ``kind="diag"`` is the reference code's
diagonal-Fisher noise, ``kind="full"`` is Σ = α(sF + δI)⁻¹ with F the GGN/Fisher on D_r.

Modules, one concept each:

* :mod:`~ntkscrub.bounds.gaussian` — the Gaussian algebra: KL terms, the convention string, the
  diagonal KL, per-block KLs;
* :mod:`~ntkscrub.bounds.hessian` — the softmax output Hessian's square root H^½;
* :mod:`~ntkscrub.bounds.config` — :class:`BoundsConfig` (engineering knobs) and the mode types;
* :mod:`~ntkscrub.bounds.inverse` — :class:`~ntkscrub.bounds.inverse.Inverse`, the one place where
  the bounds solve a linear system;
* :mod:`~ntkscrub.bounds.covariance` — the noise covariance of one model (apply, precision, dual,
  output moments Jₓ Σ Jₓᵀ) and the trace / log-det terms comparing two;
* :mod:`~ntkscrub.bounds.weights` / :mod:`~ntkscrub.bounds.outputs` — the white-box and black-box
  KL from two covariances;
* :mod:`~ntkscrub.bounds.information` — the entry points above and :func:`output_covariance`.
"""

from ntkscrub.bounds.config import (
    BoundsConfig,
    FisherVariance,
    Form,
    Kind,
    Loss,
    Reduction,
    Solver,
)
from ntkscrub.bounds.covariance import NoiseCovariance
from ntkscrub.bounds.gaussian import CONVENTION, gaussian_kl, gaussian_kl_diag
from ntkscrub.bounds.hessian import hessian_sqrt_apply, softmax_hessian_sqrt
from ntkscrub.bounds.information import (
    black_box,
    information_bounds,
    output_covariance,
    per_query_information,
    white_box,
)

__all__ = [
    "CONVENTION",
    "BoundsConfig",
    "FisherVariance",
    "Form",
    "Kind",
    "Loss",
    "NoiseCovariance",
    "Reduction",
    "Solver",
    "black_box",
    "gaussian_kl",
    "gaussian_kl_diag",
    "hessian_sqrt_apply",
    "information_bounds",
    "output_covariance",
    "per_query_information",
    "softmax_hessian_sqrt",
    "white_box",
]
