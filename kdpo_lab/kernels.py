"""Kernels on embeddings for the hybrid DPO-Kernels loss (Das et al. 2025, arXiv 2501.03271).

The kernel term of the preference logit is

    z += gamma * (log K(e_x, e_w) - log K(e_x, e_l))        (`kernel_margin`)

so every kernel here works in log form: `log_kernel(x, y)` maps `[..., d]` pairs to `[...]`.

Conventions shared by all kernels (decisions the paper leaves open):
* Directions only. Inputs are first mapped onto the unit sphere, u = x / max(|x|, 1e-6) (a zero
  vector stays zero). Hidden-state norms carry length and frequency effects that a similarity
  between meanings should not see, and on the sphere the kernels become comparable: the linear,
  RBF, spectral and Mahalanobis kernels are all Gaussians in a (projected) distance |u - v|.
* Normalised: log K~(x, y) = log K(x, y) - (log K(x, x) + log K(y, y)) / 2, so K~(x, x) = 1 and
  K~ <= 1 (Cauchy-Schwarz); mixtures of normalised kernels stay normalised. For the linear and
  polynomial kernels log K(u, u) is the same for every unit vector (1/tau, d log(1 + c)), so there
  normalisation subtracts a constant and leaves every margin unchanged. Not for the spectral kernel:
  log K(u, u) = u'Au/tau depends on u, normalisation adds -(e_w'Ae_w - e_l'Ae_l)/(2 tau) to the raw
  margin, and turns exp(u'Av/tau) into a Gaussian in the projected distance (tested).
* Positive by construction (exp forms, polynomial with c > 1), so log K always exists. Distances
  are used squared (no sqrt), so values and gradients are finite at x == y, x == -y and x == 0.
  Half-precision inputs are computed in float32; the result is float32 then.

The scale of the kernel term is fixed; the preference loss cannot learn it. Every kernel's scale
(RBF bandwidth sigma, polynomial offset c, spectral temperature tau and eigenvalues lambda,
Mahalanobis covariance scale) is set by `fit(embeddings)`, which calibrates it so that the median
log K over all pairs of the given embeddings is -1 (`CALIBRATION`; `fit` uses at most `FIT_MAX`
embeddings, a seeded subsample, and no gradient), and is then a frozen buffer.
Why: with the policy frozen (rho = 0) the loss -log sigmoid(gamma * m) of a kernel margin m falls
to 0 as |m| grows, so any parameter that can multiply m (a bandwidth sigma -> 0, a precision P ->
infinity) will be pushed to do so. Measured before this design, with learnable bandwidths and
precisions, on fixed embeddings (AdamW lr 1e-2, gamma 0.5, eta 0.01): the RBF bandwidth inside the
HMK went 1.0 -> 0.12, the Mahalanobis precision trace 18 -> 926, the margin std 0.32 -> 2.15 (a
learnable Mahalanobis kernel alone: 0.24 -> 10.8, loss 0.69 -> 0.005); on `toy_embedding_pairs`
(n = 256, 300 steps) the HMK's margin std went 0.022 -> 2.2 and the Mahalanobis kernel's 0.086 ->
15. A kernel that lowers the loss by rescaling itself takes over z and starves the
policy's gradient (sigma(-z) shrinks). The size of the kernel term relative to the probability term
is a hyper-parameter, gamma, chosen by the user; calibration makes gamma mean the same for every
kernel and every data set. What may still learn cannot raise the margin's scale:
* HMK: only the softmax logits of the mixture weights learn. The components are normalised and
  calibrated, and a mixture margin is bounded by its components' margins (mediant inequality:
  log(sum_c w_c K_c(x,w) / sum_c w_c K_c(x,l)) lies between min_c and max_c of log(K_c(x,w)/K_c(x,l))),
  so the weights can choose between calibrated components but never sharpen them.
* No shape learns either. A learnable Mahalanobis shape with a calibrated, fixed trace,
  P = T L L' / tr(L L'), was tried: it bounds |m| <= 2T, but on `toy_embedding_pairs` (AdamW lr
  1e-2, gamma 0.5, 200 steps) it still raised the margin std 0.086 -> 0.44 (5x) by moving the
  precision onto the axes that separate chosen from rejected: re-weighting axes is itself a way to
  sharpen the margin. (A determinant normalisation is weaker still: one axis can grow without bound
  while another shrinks.) So every single kernel is fixed after `fit`.
`losses.train_kernel_alone` trains a kernel against a frozen policy and records the margin's std;
the tests and notebook 04 use it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NAMES = ("linear", "polynomial", "rbf", "spectral", "mahalanobis", "hmk")
PAPER_FOUR = ("polynomial", "rbf", "spectral", "mahalanobis")
CALIBRATION = -1.0  # target median log K over data pairs after fit()
UNIT_EPS = 1e-6     # u = x / max(|x|, UNIT_EPS)
FIT_MAX = 1000      # fit() subsamples to at most this many embeddings


def unit(x):
    """The direction u = x / max(|x|, eps) of each row of x; a zero vector stays zero."""
    return F.normalize(x, dim=-1, eps=UNIT_EPS)


def _prepare(x, y):
    """Check shapes, promote half precision to float32, map both onto the unit sphere."""
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise ValueError(f"x and y must be tensors; got {type(x).__name__}, {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must be [..., d] with the same d; got {tuple(x.shape)} and {tuple(y.shape)}")
    try:
        torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    except RuntimeError:
        raise ValueError(f"x and y batch shapes do not broadcast: {tuple(x.shape)} and {tuple(y.shape)}") from None
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return unit(x.to(dtype)), unit(y.to(dtype))


def _pairs(values):
    """The strictly-upper-triangular entries of a square [n, n] matrix (all pairs i < j)."""
    i, j = torch.triu_indices(len(values), len(values), offset=1, device=values.device)
    return values[i, j]


def _fit_sample(embeddings):
    """Unit-normalised float64 copy of the embeddings, subsampled (seeded) to FIT_MAX rows."""
    if not torch.is_tensor(embeddings) or embeddings.dim() != 2 or len(embeddings) < 2:
        shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings).__name__
        raise ValueError(f"fit needs embeddings of shape [n >= 2, d]; got {shape}")
    e = embeddings.detach().to(torch.float64)
    if len(e) > FIT_MAX:
        e = e[torch.randperm(len(e), generator=torch.Generator().manual_seed(0))[:FIT_MAX]]
    return unit(e)


def _covariance(u):
    """Sample covariance (n - 1 in the denominator) of the rows of u, [d, d]."""
    centred = u - u.mean(0)
    return centred.T @ centred / (len(u) - 1)


def _median_sq_dist(u, A=None):
    """Median over pairs of (u_i - u_j)' A (u_i - u_j) (A = I when None), via the Gram matrix."""
    G = u @ u.T if A is None else u @ A @ u.T
    q = G.diagonal()[:, None] + G.diagonal()[None, :] - 2 * G
    med = _pairs(q).median()
    if not med > 0:
        raise ValueError("fit: the embeddings are (nearly) identical in direction; cannot calibrate a scale")
    return med


def _like(module, value):
    """value on the device and in the floating dtype of module's own tensors (float32 if it has none)."""
    own = [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
           if t.is_floating_point()]
    return value.detach().to(own[0].device, own[0].dtype) if own else value.detach().to(torch.float32)


def _store(module, name, value):
    """Set the buffer module.name to value, in place if it exists with that shape."""
    value = _like(module, value)
    current = getattr(module, name, None)
    if isinstance(current, torch.Tensor) and current.shape == value.shape:
        current.copy_(value)
    else:
        module.register_buffer(name, value)


def _positive(name, value):
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return float(value)


class Kernel(nn.Module):
    """Base class: a normalised, positive kernel on directions, evaluated in log form."""

    name = "kernel"

    def log_kernel(self, x, y):
        """log K~(x, y) for x, y of shape [..., d] (broadcastable) -> [...]; log K~(x, x) = 0."""
        u, v = _prepare(x, y)
        return self._log_k(u, v)

    def forward(self, x, y):
        return self.log_kernel(x, y)

    def _log_k(self, u, v):  # u, v already on the unit sphere
        raise NotImplementedError

    def fit(self, embeddings):
        """Set data-dependent defaults from embeddings [n, d] (no gradient); returns self."""
        _fit_sample(embeddings)
        return self

    def entropy(self):
        """Entropy of the mixture weights; 0 for a plain kernel."""
        return torch.zeros(())

    def gram(self, x):
        """The Gram matrix K~(x_i, x_j), [n, n], of embeddings x [n, d]."""
        return self.log_kernel(x[:, None, :], x[None, :, :]).exp()


class LinearKernel(Kernel):
    """The paper's base case K = exp(<x, y> / tau) on directions u, v.

    Normalised: log K~ = <u, v>/tau - (|u|^2 + |v|^2) / (2 tau) = -|u - v|^2 / (2 tau), i.e. on the
    sphere the linear kernel IS the RBF kernel with sigma^2 = tau. `fit` leaves tau alone: this is
    the uncalibrated reference (tau = 1, as in the paper).
    """

    name = "linear"

    def __init__(self, tau=1.0):
        super().__init__()
        self.tau = _positive("tau", tau)

    def _log_k(self, u, v):
        return -(u - v).pow(2).sum(-1) / (2 * self.tau)

    def extra_repr(self):
        return f"tau={self.tau}"


class PolynomialKernel(Kernel):
    """K = (<u, v> + c)^d, log K = d * log(<u, v> + c), with c > 1 so that K > 0 on the sphere.

    Normalised: log K~ = d * [log(<u,v> + c) - (log(|u|^2 + c) + log(|v|^2 + c)) / 2]; on unit
    vectors d * log((<u,v> + c) / (1 + c)), in [d log((c-1)/(c+1)), 0]. c = 1 + softplus(c_raw), a buffer.
    The Gram matrix is positive semi-definite for integer degree d (non-integer d >= 1 is allowed
    but is not a kernel in general).
    fit: with r = exp(CALIBRATION / d) and s the median pair cosine, c = (r - s) / (1 - r) puts the
    median pair at log K~ = CALIBRATION. Data concentrated in a narrow cap (s > 2r - 1) would need
    c <= 1; c is then clipped to 1 + C_MIN_FIT and the median log K~ is closer to 0.
    """

    name = "polynomial"
    C_MIN_FIT = 0.01

    def __init__(self, degree=2, c=2.0):
        super().__init__()
        if not degree >= 1:
            raise ValueError(f"degree must be >= 1; got {degree}")
        if not c > 1:
            raise ValueError(f"c must be > 1 so that <u, v> + c > 0 on unit vectors; got {c}")
        self.degree = float(degree)
        self._set_c(c)

    def _set_c(self, c):
        raw = torch.tensor(float(c) - 1.0, dtype=torch.float64)
        raw = raw + torch.log(-torch.expm1(-raw))  # inverse softplus
        _store(self, "c_raw", raw)

    @property
    def c(self):
        return 1 + F.softplus(self.c_raw)

    def _log_k(self, u, v):
        c = self.c.to(u.dtype)
        tiny = torch.finfo(u.dtype).tiny
        cross = ((u * v).sum(-1) + c).clamp_min(tiny).log()
        self_u, self_v = (u.pow(2).sum(-1) + c).log(), (v.pow(2).sum(-1) + c).log()
        return self.degree * (cross - (self_u + self_v) / 2)

    @torch.no_grad()
    def fit(self, embeddings):
        u = _fit_sample(embeddings)
        s = _pairs(u @ u.T).median().item()
        r = math.exp(CALIBRATION / self.degree)
        self._set_c(max((r - s) / (1 - r), 1 + self.C_MIN_FIT))
        return self

    def extra_repr(self):
        return f"degree={self.degree:g}, c={self.c.item():.4g}"


class RBFKernel(Kernel):
    """K = exp(-|u - v|^2 / (2 sigma^2)); already normalised. sigma is a buffer (log_sigma).

    fit: median heuristic, sigma^2 = median_{i<j} |u_i - u_j|^2 / 2, so the median pair has
    log K = CALIBRATION = -1 (Gretton's sigma = median distance would give -1/2).
    """

    name = "rbf"

    def __init__(self, sigma=1.0):
        super().__init__()
        _store(self, "log_sigma", torch.tensor(math.log(_positive("sigma", sigma))))

    @property
    def sigma(self):
        return self.log_sigma.exp()

    def _log_k(self, u, v):
        log_sigma = self.log_sigma.to(u.dtype)
        return -(u - v).pow(2).sum(-1) * torch.exp(-2 * log_sigma) / 2

    @torch.no_grad()
    def fit(self, embeddings):
        med = _median_sq_dist(_fit_sample(embeddings))
        _store(self, "log_sigma", 0.5 * torch.log(med / (2 * -CALIBRATION)))
        return self

    def extra_repr(self):
        return f"sigma={self.sigma.item():.4g}"


class SpectralKernel(Kernel):
    """Kernel from the top-k eigenpairs (U, lambda) of the embedding covariance.

    log K = u' U diag(lambda) U' v / tau; normalised,
        log K~ = -(u - v)' A (u - v) / 2,   A = U diag(lambda) U' / tau.
    After normalisation this is a Gaussian whose precision A lives on the top-k principal directions:
    it compares embeddings by where they sit along the dominant axes of the data (the "global"
    structure) and ignores differences orthogonal to them. Positive by its exp form; PSD Gram
    (a Gaussian kernel of the projection U'u). lambda and tau are buffers.
    Unfitted: U = the first k coordinate axes, lambda = 1. fit: U, lambda from the covariance of
    the unit-normalised embeddings; tau so that the median pair has log K~ = CALIBRATION.
    (Compare Mahalanobis, whose precision S^-1 weights the LOW-variance directions.)
    """

    name = "spectral"

    def __init__(self, k=8, tau=1.0):
        super().__init__()
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k (number of eigenpairs) must be an integer >= 1; got {k}")
        self.k = k
        self.register_buffer("tau", torch.tensor(_positive("tau", tau)))  # a buffer: saved with the fit
        _store(self, "log_lam", torch.zeros(k))
        self.register_buffer("U", None)

    def _directions(self, d, dtype, device):
        if self.U is not None:
            if self.U.shape[0] != d:
                raise ValueError(f"spectral kernel was fitted on d = {self.U.shape[0]}; got d = {d}")
            return self.U.to(dtype)
        return torch.eye(d, min(self.k, d), dtype=dtype, device=device)

    def _log_k(self, u, v):
        U = self._directions(u.shape[-1], u.dtype, u.device)
        lam = self.log_lam[: U.shape[1]].exp().to(u.dtype)
        proj = (u - v) @ U
        return -(proj.pow(2) * lam).sum(-1) / (2 * self.tau.to(u.dtype))

    @torch.no_grad()
    def fit(self, embeddings):
        u = _fit_sample(embeddings)
        evals, evecs = torch.linalg.eigh(_covariance(u))
        k = min(self.k, u.shape[1])
        lam, U = evals.flip(0)[:k], evecs.flip(1)[:, :k]
        lam = lam.clamp_min(1e-8 * lam[0].clamp_min(1e-30))
        self.U = _like(self, U)
        log_lam = self.log_lam.detach().to(lam.device, torch.float64).clone()
        log_lam[:k] = lam.log()
        _store(self, "log_lam", log_lam)
        A = U @ torch.diag(lam) @ U.T
        _store(self, "tau", _median_sq_dist(u, A) / (2 * -CALIBRATION))
        return self

    def extra_repr(self):
        return f"k={self.k}, tau={self.tau.item():.4g}, fitted={self.U is not None}"


class MahalanobisKernel(Kernel):
    """K = exp(-(u - v)' P (u - v) / 2) with a precision P = S^-1 (a buffer); already normalised.

    S (a covariance) is given or fitted; unfitted and without S, P = I (then this is the RBF kernel
    with sigma = 1). fit: Ledoit-Wolf style shrinkage S = (1 - s) Sigma + s tr(Sigma)/d I of the
    covariance Sigma of the unit-normalised embeddings (s = `shrinkage`; needed when d > n), then P =
    S^-1 is multiplied by a scalar so that the median pair has log K = CALIBRATION (a scalar does not
    change the geometry). Nothing learns: see the module docstring for why not even the shape of P.
    """

    name = "mahalanobis"

    def __init__(self, S=None, shrinkage=0.1):
        super().__init__()
        if not 0 <= shrinkage <= 1:
            raise ValueError(f"shrinkage must lie in [0, 1]; got {shrinkage}")
        self.shrinkage = float(shrinkage)
        self.register_buffer("P", None)
        if S is not None:
            self.P = _like(self, self._inverse(torch.as_tensor(S, dtype=torch.float64)))

    @staticmethod
    def _inverse(S):
        if S.dim() != 2 or S.shape[0] != S.shape[1] or not torch.allclose(S, S.T, atol=1e-8):
            raise ValueError(f"S must be a symmetric [d, d] matrix; got shape {tuple(S.shape)}")
        L, info = torch.linalg.cholesky_ex(S)
        if info != 0:
            raise ValueError("S must be positive definite (raise shrinkage if d > n)")
        return torch.cholesky_inverse(L)

    def precision(self):
        """P = S^-1 ([d, d]), or None for the identity."""
        return self.P

    def _log_k(self, u, v):
        diff, P = u - v, self.precision()
        if P is None:
            return -diff.pow(2).sum(-1) / 2
        if P.shape[0] != u.shape[-1]:
            raise ValueError(f"Mahalanobis precision is {P.shape[0]}-dimensional; got d = {u.shape[-1]}")
        return -((diff @ P.to(u.dtype)) * diff).sum(-1) / 2

    @torch.no_grad()
    def fit(self, embeddings):
        u = _fit_sample(embeddings)
        sigma, d = _covariance(u), u.shape[1]
        identity = torch.eye(d, dtype=sigma.dtype, device=sigma.device)
        S = (1 - self.shrinkage) * sigma + self.shrinkage * sigma.trace() / d * identity
        P = self._inverse(S)
        self.P = _like(self, P * (2 * -CALIBRATION) / _median_sq_dist(u, P))
        return self

    def extra_repr(self):
        return f"shrinkage={self.shrinkage}, fitted={self.P is not None}"


class HMKKernel(Kernel):
    """Hierarchical Mixture of Kernels (Das et al. 2025, HMK):

        K = tau_L (a_rbf K_rbf + a_poly K_poly) + tau_G (a_spec K_spec + a_maha K_maha),

    local kernels (RBF, polynomial) and global ones (spectral, Mahalanobis); (tau_L, tau_G),
    (a_rbf, a_poly), (a_spec, a_maha) are softmaxes of learned logits (init 0: uniform). In log form
    log K = logsumexp_c(log w_c + log K_c), w_c the product of the two levels' weights; every K_c is
    normalised and the w_c sum to 1, so K(x, x) = 1 as well. `entropy()` is the sum of the three
    groups' Shannon entropies (at most 3 log 2, at uniform weights); the loss subtracts eta times it
    so that the weights do not collapse onto one kernel.
    Only the six logits are parameters. The components are calibrated by `fit` and frozen (buffers):
    the paper leaves open what HMK learns besides its weights; we pick the option under which the
    mixture chooses between kernels but cannot sharpen them (module docstring), so the margin of the
    mixture stays between the smallest and the largest of its components' margins, pair by pair.
    """

    name = "hmk"
    COMPONENTS = ("rbf", "poly", "spec", "maha")

    def __init__(self, degree=2, k=8, shrinkage=0.1):
        super().__init__()
        self.rbf = RBFKernel()
        self.poly = PolynomialKernel(degree=degree)
        self.spec = SpectralKernel(k=k)
        self.maha = MahalanobisKernel(shrinkage=shrinkage)
        self.tau_logits = nn.Parameter(torch.zeros(2))     # (tau_L, tau_G)
        self.local_logits = nn.Parameter(torch.zeros(2))   # (a_rbf, a_poly)
        self.global_logits = nn.Parameter(torch.zeros(2))  # (a_spec, a_maha)

    def components(self):
        """The four component kernels, in the order of COMPONENTS."""
        return (self.rbf, self.poly, self.spec, self.maha)

    def log_weights(self):
        """log w_c for c in COMPONENTS: log tau_group + log a_c, [4]."""
        log_tau = F.log_softmax(self.tau_logits, -1)
        return torch.cat([log_tau[0] + F.log_softmax(self.local_logits, -1),
                          log_tau[1] + F.log_softmax(self.global_logits, -1)])

    def _log_k(self, u, v):
        comps = torch.stack([kernel._log_k(u, v) for kernel in self.components()], -1)
        return torch.logsumexp(comps + self.log_weights().to(comps.dtype), -1)

    def entropy(self):
        groups = (self.tau_logits, self.local_logits, self.global_logits)
        return sum(torch.special.entr(F.softmax(g, -1)).sum() for g in groups)

    def weights(self):
        """Group weights (tau_L, tau_G, a_*) and the effective weights w_* = tau * a, as floats."""
        tau, a_loc, a_glob = (F.softmax(g.detach(), -1) for g in
                              (self.tau_logits, self.local_logits, self.global_logits))
        w = self.log_weights().detach().exp()
        out = {"tau_L": tau[0], "tau_G": tau[1], "a_rbf": a_loc[0], "a_poly": a_loc[1],
               "a_spec": a_glob[0], "a_maha": a_glob[1]}
        out.update({f"w_{c}": w[i] for i, c in enumerate(self.COMPONENTS)})
        return {key: float(value) for key, value in out.items()}

    @torch.no_grad()
    def fit(self, embeddings):
        for kernel in self.components():
            kernel.fit(embeddings)
        return self


_CLASSES = {"linear": LinearKernel, "polynomial": PolynomialKernel, "rbf": RBFKernel,
            "spectral": SpectralKernel, "mahalanobis": MahalanobisKernel, "hmk": HMKKernel}


def get(name, **params):
    """A kernel by name (one of NAMES) with its parameters; a Kernel instance is returned as is."""
    if isinstance(name, Kernel):
        if params:
            raise ValueError(f"got a Kernel instance and parameters {sorted(params)}; pass one or the other")
        return name
    if name not in _CLASSES:
        raise ValueError(f"unknown kernel {name!r}; choose one of {NAMES}")
    if "learnable" in params:
        raise ValueError("learnable: kernel scales come from fit() and are not trained (see kdpo_lab.kernels); "
                         "only the HMK's mixture weights learn")
    try:
        return _CLASSES[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for kernel {name!r}: {err}") from None


def kernel_margin(kernel, e_x, e_w, e_l):
    """The kernel term's margin log K(e_x, e_w) - log K(e_x, e_l), [B]."""
    return kernel.log_kernel(e_x, e_w) - kernel.log_kernel(e_x, e_l)


def toy_embedding_pairs(n=256, d=16, k=2, frac_local=0.5, step=0.6, noise=0.02, seed=0):
    """Toy unit embeddings (e_x, e_w, e_l, is_local), [n, d] each (is_local [n] bool), for HMK.

    Write a unit vector as u = (g, h): g on the first k axes (high variance: the top principal,
    "global" directions), h on the other d - k (low variance). Responses are moves of the prompt
    e_x that rotate g or h within its own subspace (|g|, |h| unchanged), by a chord
    delta = step * min(|g|, |h|), then get a little isotropic noise:
    * local pairs: chosen moves h by delta/2, rejected moves h by delta. Closer in plain distance
      (RBF, polynomial and Mahalanobis rank them); g is untouched, so the spectral kernel is blind.
    * global pairs: chosen moves h by delta, rejected moves g by delta. Equally far in plain distance
      (RBF, polynomial at chance); closer along the principal axes (spectral ranks them); farther in
      Mahalanobis distance, which up-weights the low-variance axes (it ranks them the wrong way).
    """
    if not (0 <= frac_local <= 1 and 1 <= k < d and n >= 1 and 0 < step <= 1):
        raise ValueError(f"need 0 <= frac_local <= 1, 1 <= k < d, n >= 1, 0 < step <= 1; "
                         f"got frac_local={frac_local}, k={k}, d={d}, n={n}, step={step}")
    gen = torch.Generator().manual_seed(seed)
    is_glob = torch.arange(d) < k
    e_x = unit(torch.randn(n, d, generator=gen) * torch.where(is_glob, 1.0, 0.3))

    def rotate(x, axes, chord):
        part = x * axes
        r = part.norm(dim=-1, keepdim=True)
        t = torch.randn(n, d, generator=gen) * axes
        t = unit(t - (t * part).sum(-1, keepdim=True) / r**2 * part)
        theta = 2 * torch.asin(chord / (2 * r))
        return x + (theta.cos() - 1) * part + theta.sin() * r * t

    delta = step * torch.minimum((e_x * is_glob).norm(dim=-1), (e_x * ~is_glob).norm(dim=-1))[:, None]
    is_local = torch.rand(n, generator=gen) < frac_local
    loc = is_local[:, None]
    e_w = rotate(e_x, ~is_glob, torch.where(loc, delta / 2, delta))
    e_l = torch.where(loc, rotate(e_x, ~is_glob, delta), rotate(e_x, is_glob, delta))
    e_w = e_w + noise * torch.randn(n, d, generator=gen)
    e_l = e_l + noise * torch.randn(n, d, generator=gen)
    return e_x, e_w, e_l, is_local
