"""How far weightwatcher's alpha can be trusted as a function of a matrix's size: a Monte Carlo experiment
on Gaussian matrices (no power law) and planted power laws (known alpha). Its 200-seed result is
`spectra.MIN_RELIABLE_EVALS`; `plots.plot_alpha_reliability` draws it (notebook 09)."""
import math

import numpy as np
import pandas as pd
import torch

from kdpo_lab.spectra import _analyze, _blas_threads


def _haar(n, rng):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _gaussian(n, Q, rng):
    """N x M Gaussian with N = Q n, M = n: ESD of W^T W is Marchenko-Pastur (no power-law tail)."""
    return rng.standard_normal((Q * n, n)) / math.sqrt(Q * n)


def _planted(n, alpha_true, rng):
    """n x n W = U diag(sqrt(lambda)) V^T, lambda_i iid Pareto: p(lambda) = (a-1) lambda^-a, lambda >= 1."""
    lam = (1.0 - rng.random(n)) ** (-1.0 / (alpha_true - 1.0))
    return (_haar(n, rng) * np.sqrt(lam)) @ _haar(n, rng).T


def _fit_alphas(mats):
    """weightwatcher alphas of a list of matrices (as bias-free Linear layers of one Sequential)."""
    layers = []
    for W in mats:
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data = torch.as_tensor(W, dtype=torch.float32)
        layers.append(lin)
    details = _analyze(torch.nn.Sequential(*layers), range(1, len(layers) + 1), min_evals=1)
    return details["alpha"].to_numpy(dtype=float)


def reliability_experiment(sizes=(16, 32, 64, 128, 192, 256, 384, 512), n_seeds=50,
                           alphas=(2.5, 3.5, 5.0), aspects=(1, 4), seed=0):
    """How far weightwatcher's alpha can be trusted as a function of the number of eigenvalues n.

    For each n: n_seeds Gaussian matrices (Q n x n for each Q in `aspects`; true ESD Marchenko-Pastur,
    no power law) and n_seeds planted power laws (n x n, lambda ~ Pareto(alpha_true) for each
    alpha_true in `alphas`), all fitted by weightwatcher. Returns one row per (n, ensemble):
    n, ensemble, alpha_true (NaN for Gaussian), q05, median, q95, std of the fitted alphas,
    frac_2_4 (fraction fitted into the "well trained" band 2 <= alpha < 4) and recovered (fraction
    with |alpha - alpha_true| < 0.5; NaN for Gaussian). MIN_RELIABLE_EVALS summarises a 200-seed run.
    """
    if n_seeds < 2 or min(sizes) < 8:
        raise ValueError("need n_seeds >= 2 and sizes >= 8 (weightwatcher's smallest layer)")
    rng = np.random.default_rng(seed)
    rows = []
    with _blas_threads(max(sizes)):
        for n in sizes:
            rows += _reliability_rows(n, n_seeds, alphas, aspects, rng)
    return pd.DataFrame(rows)


def _reliability_rows(n, n_seeds, alphas, aspects, rng):
    """The rows of `reliability_experiment` for one size n."""
    ensembles = [(f"Gaussian Q={Q}", math.nan, lambda Q=Q: _gaussian(n, Q, rng)) for Q in aspects]
    ensembles += [(f"planted alpha={a:g}", a, lambda a=a: _planted(n, a, rng)) for a in alphas]
    rows = []
    for label, a, draw in ensembles:
        fit = _fit_alphas([draw() for _ in range(n_seeds)])
        rows.append(dict(n=n, ensemble=label, alpha_true=a, q05=np.quantile(fit, 0.05),
                         median=np.median(fit), q95=np.quantile(fit, 0.95), std=fit.std(),
                         frac_2_4=np.mean((fit >= 2) & (fit < 4)),
                         recovered=np.mean(np.abs(fit - a) < 0.5) if np.isfinite(a) else math.nan))
    return rows


