"""Facts about kdpo_lab.kernels: closed forms, limits, peers (scipy), gradients, the HMK."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, mahalanobis

from kdpo_lab import kernels, losses

D = 6


def unit_np(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(40, D, generator=g, dtype=torch.float64) * torch.linspace(2.0, 0.3, D, dtype=torch.float64)
    return E


def make(name, E=None):
    """A fitted (when E is given) kernel of each kind; the HMK at non-uniform weights."""
    params = {"spectral": {"k": 3}, "hmk": {"k": 3}}.get(name, {})
    kernel = kernels.get(name, **params)
    if E is not None:
        kernel.fit(E)
    if name == "hmk":
        with torch.no_grad():
            kernel.tau_logits.copy_(torch.tensor([0.3, -0.2]))
            kernel.local_logits.copy_(torch.tensor([-0.5, 0.4]))
            kernel.global_logits.copy_(torch.tensor([0.1, 0.7]))
    return kernel


def log_k_np(kernel, x, y):
    """Direct numpy formula of log K~ for unit rows x, y (the closed form each kernel documents)."""
    u, v = unit_np(x), unit_np(y)
    diff, dot = u - v, (u * v).sum(-1)
    if isinstance(kernel, kernels.LinearKernel):
        return dot / kernel.tau - 1 / kernel.tau
    if isinstance(kernel, kernels.PolynomialKernel):
        c = kernel.c.item()
        return kernel.degree * (np.log(dot + c) - np.log(1 + c))
    if isinstance(kernel, kernels.RBFKernel):
        return -(diff**2).sum(-1) / (2 * kernel.sigma.item() ** 2)
    if isinstance(kernel, kernels.SpectralKernel):
        U, lam = kernel.U.double().numpy(), kernel.log_lam.detach().double().exp().numpy()[: kernel.U.shape[1]]
        tau = float(kernel.tau)
        return (u @ U * lam * (v @ U)).sum(-1) / tau - ((u @ U) ** 2 * lam + (v @ U) ** 2 * lam).sum(-1) / (2 * tau)
    if isinstance(kernel, kernels.MahalanobisKernel):
        P = kernel.precision().detach().double().numpy()
        return -np.einsum("ni,ij,nj->n", diff, P, diff) / 2
    if isinstance(kernel, kernels.HMKKernel):
        comps = [kernel.rbf, kernel.poly, kernel.spec, kernel.maha]
        w = kernel.log_weights().detach().double().exp().numpy()
        return np.log(sum(wi * np.exp(log_k_np(k, x, y)) for wi, k in zip(w, comps)))
    raise AssertionError(kernel)


# ---- closed forms, normalisation, symmetry, positive semi-definiteness ------------------------------

@pytest.mark.parametrize("name", kernels.NAMES)
def test_log_kernel_matches_numpy_closed_form(name, data):
    kernel = make(name, data)
    x, y = data[:20], data[20:]
    expected = log_k_np(kernel, x.numpy(), y.numpy())
    np.testing.assert_allclose(kernel.log_kernel(x, y).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", kernels.NAMES)
def test_kernel_of_a_point_with_itself_is_one(name, data):
    kernel = make(name, data)
    x = torch.cat([data, torch.zeros(1, D, dtype=data.dtype)])
    assert kernel.log_kernel(x, x).abs().max().item() < 1e-6
    assert (kernel.log_kernel(x, x.flip(0)) <= 1e-6).all()  # K~ <= 1


@pytest.mark.parametrize("name", kernels.NAMES)
def test_kernel_is_symmetric(name, data):
    kernel = make(name, data)
    torch.testing.assert_close(kernel.log_kernel(data[:20], data[20:]), kernel.log_kernel(data[20:], data[:20]))


@pytest.mark.parametrize("name", ["rbf", "mahalanobis", "spectral", "polynomial", "hmk"])
def test_gram_matrix_is_positive_semidefinite(name, data):
    kernel = make(name, data)
    x = torch.randn(60, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = kernel.gram(kernels.unit(x)).detach()
    torch.testing.assert_close(gram, gram.T)
    assert torch.linalg.eigvalsh(gram).min().item() >= -1e-6


def test_log_kernel_broadcasts_over_batch_shapes(data):
    kernel = make("rbf", data)
    assert kernel(data[:, None, :], data[None, :5, :]).shape == (40, 5)
    torch.testing.assert_close(kernel(data[:5], data[:1]), kernel(data[:5], data[:1].expand(5, D)))


def test_kernels_act_on_directions_only(data):
    for name in kernels.NAMES:
        kernel = make(name, data)
        torch.testing.assert_close(kernel(3.0 * data[:10], 0.2 * data[10:20]), kernel(data[:10], data[10:20]))


# ---- limits and equalities between kernels ------------------------------------------------------------

def test_rbf_with_sigma_squared_tau_is_the_normalised_linear_kernel():
    x, y = (kernels.unit(torch.randn(30, D, dtype=torch.float64)) for _ in range(2))
    for tau in (0.3, 1.0, 4.0):
        linear = kernels.get("linear", tau=tau)
        rbf = kernels.get("rbf", sigma=math.sqrt(tau))
        expected = (x * y).sum(-1) / tau - 1 / tau  # <x, y>/tau - (<x,x> + <y,y>)/(2 tau)
        torch.testing.assert_close(linear(x, y), expected)
        torch.testing.assert_close(rbf(x, y), expected)


def margins(kernel, n=30, seed=2):
    g = torch.Generator().manual_seed(seed)
    e_x, e_w, e_l = (kernels.unit(torch.randn(n, D, dtype=torch.float64, generator=g)) for _ in range(3))
    return kernels.kernel_margin(kernel, e_x, e_w, e_l), (e_x * e_w).sum(-1) - (e_x * e_l).sum(-1)


def test_rbf_margin_times_sigma_squared_is_the_linear_margin_for_any_sigma():
    for sigma in (1.0, 1e2, 1e4):
        m_rbf, m_lin = margins(kernels.get("rbf", sigma=sigma))
        torch.testing.assert_close(sigma**2 * m_rbf, m_lin, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(margins(kernels.get("linear"))[0], m_lin)


def test_polynomial_degree_one_margin_times_c_tends_to_linear_margin():
    errors = []
    for c in (1e1, 1e3, 1e5):
        m_poly, m_lin = margins(kernels.get("polynomial", degree=1, c=c))
        errors.append((c * m_poly - m_lin).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4  # error ~ 1/c


def test_mahalanobis_with_identity_covariance_is_rbf_with_unit_sigma(data):
    maha = kernels.get("mahalanobis", S=torch.eye(D))
    torch.testing.assert_close(maha(data[:20], data[20:]), kernels.get("rbf", sigma=1.0)(data[:20], data[20:]))


@pytest.mark.parametrize("index", range(4))
def test_hmk_with_one_hot_weights_is_that_component(index, data):
    hmk = make("hmk", data)
    group, inner = divmod(index, 2)
    with torch.no_grad():
        hmk.tau_logits.copy_(torch.tensor([0.0, -math.inf] if group == 0 else [-math.inf, 0.0]))
        for logits in (hmk.local_logits, hmk.global_logits):  # the unused group one-hot too
            logits.copy_(torch.tensor([0.0, -math.inf] if inner == 0 else [-math.inf, 0.0]))
    component = [hmk.rbf, hmk.poly, hmk.spec, hmk.maha][index]
    torch.testing.assert_close(hmk(data[:20], data[20:]), component(data[:20], data[20:]))
    assert hmk.entropy().item() == 0.0


# ---- peers: scipy distances ----------------------------------------------------------------------------

def test_rbf_matches_scipy_squared_euclidean(data):
    rbf = make("rbf", data)
    u = unit_np(data.numpy())
    expected = -cdist(u, u, "sqeuclidean") / (2 * rbf.sigma.item() ** 2)
    np.testing.assert_allclose(rbf(data[:, None], data[None]).detach().numpy(), expected, atol=1e-6)


def test_mahalanobis_matches_scipy_mahalanobis(data):
    maha = kernels.get("mahalanobis").fit(data)
    P = maha.precision().detach().double().numpy()
    u = unit_np(data.numpy())
    expected = -cdist(u, u, "mahalanobis", VI=P) ** 2 / 2
    np.testing.assert_allclose(maha(data[:, None], data[None]).detach().numpy(), expected, atol=1e-5)
    assert maha(data[0], data[1]).item() == pytest.approx(-mahalanobis(u[0], u[1], P) ** 2 / 2, abs=1e-5)


def test_spectral_is_a_gaussian_with_precision_on_the_top_principal_directions(data):
    spec = make("spectral", data)
    u = unit_np(data.numpy())
    evals, evecs = np.linalg.eigh(np.cov(u, rowvar=False))
    top = evecs[:, ::-1][:, :3]
    np.testing.assert_allclose(np.abs(top.T @ spec.U.double().numpy()), np.eye(3), atol=1e-5)  # same axes
    np.testing.assert_allclose(spec.log_lam.exp().double().numpy(), evals[::-1][:3], rtol=1e-5)
    A = top @ np.diag(evals[::-1][:3]) @ top.T / float(spec.tau)
    expected = -cdist(u, u, "mahalanobis", VI=A) ** 2 / 2
    np.testing.assert_allclose(spec(data[:, None], data[None]).detach().numpy(), expected, atol=1e-5)


def test_mahalanobis_fit_inverts_the_shrunk_covariance_up_to_a_scale(data):
    s = 0.3
    maha = kernels.get("mahalanobis", shrinkage=s).fit(data)
    sigma = np.cov(unit_np(data.numpy()), rowvar=False)
    S = (1 - s) * sigma + s * np.trace(sigma) / D * np.eye(D)
    product = maha.precision().double().numpy() @ S  # = scale * I
    np.testing.assert_allclose(product, product[0, 0] * np.eye(D), atol=1e-5 * product[0, 0])


# ---- fit: calibration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["polynomial", "rbf", "spectral", "mahalanobis"])
def test_fit_puts_the_median_pair_at_log_kernel_minus_one(name, data):
    kernel = make(name, data)
    values = kernel(data[:, None], data[None])
    i, j = torch.triu_indices(len(data), len(data), offset=1)
    assert values[i, j].median().item() == pytest.approx(kernels.CALIBRATION, abs=0.02)


def test_polynomial_fit_clips_c_above_one_for_concentrated_data():
    E = torch.ones(30, D) + 0.01 * torch.randn(30, D, generator=torch.Generator().manual_seed(0))
    poly = kernels.get("polynomial").fit(E)
    assert poly.c.item() == pytest.approx(1 + poly.C_MIN_FIT, rel=1e-4)


def test_fit_updates_buffers_in_place_and_leaves_the_hmk_logits_alone(data):
    hmk = kernels.get("hmk", k=3)
    before = {name: id(p) for name, p in hmk.named_parameters()}
    sigma = hmk.rbf.log_sigma
    sigma_before = sigma.item()
    hmk.fit(data)
    assert {name: id(p) for name, p in hmk.named_parameters()} == before  # optimiser references stay valid
    assert hmk.rbf.log_sigma is sigma and sigma.item() != sigma_before
    assert set(hmk.weights().values()) == {0.5, 0.25}


# ---- gradients and edge cases ------------------------------------------------------------------------

@pytest.mark.parametrize("name", kernels.NAMES)
def test_gradcheck_in_float64(name, data):
    kernel = make(name, data).double()
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(4, D, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(kernel.log_kernel, (x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", kernels.NAMES)
def test_values_and_gradients_are_finite_at_equal_opposite_and_zero_inputs(name, dtype, data):
    kernel = make(name, data)
    x = torch.randn(3, D).to(dtype)
    for y in (x.clone(), -x, torch.zeros_like(x)):
        for a, b in ((x, y), (y, y)):
            a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
            value = kernel(a, b)
            value.sum().backward()
            assert torch.isfinite(value).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
            params = [p.grad for p in kernel.parameters() if p.grad is not None]
            assert all(torch.isfinite(p).all() for p in params)
            kernel.zero_grad()


def test_every_hmk_parameter_receives_a_nonzero_gradient(data):
    hmk = make("hmk", data)
    e_x, e_w, e_l = data[:10], data[10:20], data[20:30]
    loss = -torch.nn.functional.logsigmoid(kernels.kernel_margin(hmk, e_x, e_w, e_l)).mean()
    loss.backward()
    for name, p in hmk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_only_the_hmk_mixture_logits_are_parameters(data):
    assert [name for name, _ in make("hmk", data).named_parameters()] == ["tau_logits", "local_logits",
                                                                          "global_logits"]
    for name in kernels.NAMES[:-1]:
        assert list(make(name, data).parameters()) == [], name  # scales are calibrated buffers


def test_a_learnable_scale_is_refused():
    for name in ("rbf", "polynomial", "spectral", "mahalanobis", "hmk"):
        with pytest.raises(ValueError, match="fit"):
            kernels.get(name, learnable=True)


def test_hmk_entropy_is_maximal_at_uniform_weights():
    hmk = kernels.get("hmk")
    assert hmk.entropy().item() == pytest.approx(3 * math.log(2))
    assert set(hmk.weights().values()) == {0.5, 0.25}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for logits in (hmk.tau_logits, hmk.local_logits, hmk.global_logits):
                logits.copy_(torch.randn(2, generator=g))
        assert hmk.entropy().item() < 3 * math.log(2)
        w = hmk.weights()
        assert sum(w[f"w_{c}"] for c in hmk.COMPONENTS) == pytest.approx(1.0)
        assert w["w_rbf"] == pytest.approx(w["tau_L"] * w["a_rbf"])


def test_plain_kernels_have_zero_entropy():
    for name in kernels.NAMES[:-1]:
        assert kernels.get(name).entropy().item() == 0.0


# ---- the registry and bad arguments -----------------------------------------------------------------

def test_get_accepts_an_instance_and_lists_names_for_an_unknown_one():
    rbf = kernels.RBFKernel()
    assert kernels.get(rbf) is rbf
    with pytest.raises(ValueError, match="polynomial"):
        kernels.get("laplace")
    assert kernels.PAPER_FOUR == ("polynomial", "rbf", "spectral", "mahalanobis")


@pytest.mark.parametrize("name, params", [
    ("polynomial", {"c": 1.0}), ("polynomial", {"degree": 0.5}), ("rbf", {"sigma": 0.0}),
    ("linear", {"tau": -1.0}), ("spectral", {"k": 0}), ("mahalanobis", {"shrinkage": 1.5}),
    ("mahalanobis", {"S": -torch.eye(3)}), ("rbf", {"bandwidth": 1.0}),
])
def test_bad_parameters_raise_value_error(name, params):
    with pytest.raises(ValueError):
        kernels.get(name, **params)


def test_shape_mismatch_and_unusable_inputs_raise_value_error():
    rbf = kernels.get("rbf")
    with pytest.raises(ValueError, match="same d"):
        rbf(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="broadcast"):
        rbf(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="fit"):
        rbf.fit(torch.randn(1, 4))
    with pytest.raises(ValueError, match="fitted on d"):
        kernels.get("spectral", k=2).fit(torch.randn(10, 4))(torch.randn(3, 5), torch.randn(3, 5))


# ---- the toy problem -------------------------------------------------------------------------------

def test_fitted_state_survives_a_state_dict_round_trip(data):
    fitted = make("hmk", data)
    fresh = kernels.get("hmk", k=3).fit(data[:5] + 1.0)  # same shapes, other values
    fresh.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh(data[:20], data[20:]), fitted(data[:20], data[20:]))


def test_toy_pairs_reject_bad_arguments():
    for bad in ({"frac_local": 1.5}, {"k": 16, "d": 16}, {"step": 0.0}):
        with pytest.raises(ValueError):
            kernels.toy_embedding_pairs(**bad)


def test_toy_pairs_are_ranked_locally_or_globally_as_constructed():
    e_x, e_w, e_l, is_local = kernels.toy_embedding_pairs(n=400, seed=1)
    fit_on = torch.cat([e_x, e_w, e_l])
    accuracy = {}
    for name in kernels.PAPER_FOUR:
        kernel = kernels.get(name, **({"k": 2} if name == "spectral" else {})).fit(fit_on)
        right = kernels.kernel_margin(kernel, e_x, e_w, e_l) > 0
        accuracy[name] = right[is_local].float().mean().item(), right[~is_local].float().mean().item()
    assert accuracy["rbf"][0] > 0.95 and 0.35 < accuracy["rbf"][1] < 0.65  # local: right; global: chance
    assert accuracy["spectral"][1] > 0.95 and accuracy["spectral"][0] < 0.75  # global: right; local: near chance
    assert accuracy["mahalanobis"][0] > 0.95 and accuracy["mahalanobis"][1] < 0.05  # global: wrong


# ---- the kernel term cannot rescale itself: the kernel trained alone against a frozen policy ------------

def toy_run():
    """Toy pairs (as notebook 04), an HMK fitted on them, and its components' margin stds after fit."""
    e_x, e_w, e_l, _ = kernels.toy_embedding_pairs(n=256, seed=0)
    hmk = kernels.get("hmk", k=2).fit(torch.cat([e_x, e_w, e_l]))
    stds = [kernels.kernel_margin(c, e_x, e_w, e_l).std(unbiased=False).item() for c in hmk.components()]
    return (e_x, e_w, e_l), hmk, stds


def test_normalising_leaves_linear_and_polynomial_margins_but_not_spectral_ones(data):
    u = kernels.unit(data)
    x, w, l = u[:10], u[10:20], u[20:30]
    poly, lin, spec = (k.double() for k in (make("polynomial", data), kernels.get("linear", tau=0.7), make("spectral", data)))
    raw_poly = lambda a, b: poly.degree * torch.log((a * b).sum(-1) + poly.c)
    torch.testing.assert_close(kernels.kernel_margin(poly, x, w, l), raw_poly(x, w) - raw_poly(x, l))
    torch.testing.assert_close(kernels.kernel_margin(lin, x, w, l), ((x * w).sum(-1) - (x * l).sum(-1)) / 0.7)
    A = spec.U @ torch.diag(spec.log_lam.exp()) @ spec.U.T / spec.tau  # raw log K(a, b) = a'Ab
    raw = ((x @ A) * w).sum(-1) - ((x @ A) * l).sum(-1)
    self_term = ((w @ A) * w).sum(-1) - ((l @ A) * l).sum(-1)  # log K(w, w) - log K(l, l): depends on w, l
    assert self_term.abs().max() > 1e-3
    torch.testing.assert_close(kernels.kernel_margin(spec, x, w, l), raw - self_term / 2)


def test_hmk_margin_lies_between_its_components_margins_pair_by_pair(data):
    hmk = make("hmk", data)  # non-uniform weights
    e_x, e_w, e_l = data[:10], data[10:20], data[20:30]
    comps = torch.stack([kernels.kernel_margin(c, e_x, e_w, e_l) for c in hmk.components()])
    margin = kernels.kernel_margin(hmk, e_x, e_w, e_l).detach()
    assert (margin >= comps.min(0).values - 1e-9).all() and (margin <= comps.max(0).values + 1e-9).all()


def test_single_kernels_trained_alone_keep_their_margin_exactly():
    (e_x, e_w, e_l), hmk, stds = toy_run()
    for index, kernel in enumerate(hmk.components()):
        history = losses.train_kernel_alone(kernel, e_x, e_w, e_l, losses.KernelOnlyRun(steps=20))
        assert history.margin_std.tolist() == [pytest.approx(stds[index], rel=1e-6)] * 21


def test_hmk_margin_std_cannot_grow_past_twice_its_largest_component():
    (e_x, e_w, e_l), hmk, stds = toy_run()
    history = losses.train_kernel_alone(hmk, e_x, e_w, e_l, losses.KernelOnlyRun(steps=400))
    assert history.margin_std.max() < 2 * max(stds)


def test_hmk_weights_move_when_trained_alone_but_none_exceeds_0_9_at_default_eta():
    (e_x, e_w, e_l), hmk, _ = toy_run()
    history = losses.train_kernel_alone(hmk, e_x, e_w, e_l, losses.KernelOnlyRun(steps=400, eta=0.01))
    w = history[[f"w_{c}" for c in hmk.COMPONENTS]]
    assert (w.iloc[0] == 0.25).all() and (w.iloc[-1] - 0.25).abs().max() > 0.1  # the weights learn
    assert w.to_numpy().max() < 0.9  # no collapse onto one kernel
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_entropy_term_leaves_the_hmk_weights_more_spread_than_without():
    (e_x, e_w, e_l), _, _ = toy_run()
    entropy = {}
    for eta in (0.0, 0.1):
        hmk = toy_run()[1]
        losses.train_kernel_alone(hmk, e_x, e_w, e_l, losses.KernelOnlyRun(steps=150, eta=eta))
        entropy[eta] = hmk.entropy().item()
    assert entropy[0.1] > entropy[0.0] + 0.01
