"""Exercises of the notebook course: the student writes a function, a `check_...` helper says right or wrong.

Each check calls the student's function on a few seeded inputs, compares the answers with the
library's own implementation (or the closed form the notebook derives), prints one line

    right: <exercise>                                  or
    not yet right: <exercise>: <what went wrong>. Hint: <hint>

and returns True or False. A check never raises: a stub that returns None, raises, or returns the
wrong shape is reported as "not yet right", so a notebook with unsolved exercises still runs top to
bottom (nbval runs it that way). Solutions: notebooks/solutions/, one notebook per course notebook.
Heavy modules (weightwatcher via spectra) are imported inside the checks that need them.
"""
import math

import torch

D = torch.float64


def _report(title, ok, detail="", hint=""):
    print(f"right: {title}" if ok else f"not yet right: {title}: {detail}. Hint: {hint}")
    return ok


def _check(title, fn, cases, reference, hint, atol=1e-6, rtol=1e-6):
    """Run fn(*args) for each args in cases against reference(*args); report the first mismatch."""
    for args in cases:
        try:
            got = fn(*args)
        except Exception as err:  # the student's code, whatever it raises, is "not yet right"
            return _report(title, False, f"it raised {type(err).__name__}: {err}", hint)
        if got is None:
            return _report(title, False, "it returned None (the stub is still there)", hint)
        expected = torch.as_tensor(reference(*args), dtype=D)
        try:
            got = torch.as_tensor(got, dtype=D)
        except (TypeError, ValueError, RuntimeError) as err:
            return _report(title, False, f"its answer is not a number or tensor ({err})", hint)
        if got.shape != expected.shape:
            return _report(title, False, f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}", hint)
        if not torch.allclose(got, expected, atol=atol, rtol=rtol):
            worst = (got - expected).abs().max().item()
            return _report(title, False, f"off by up to {worst:.3g} from the expected value", hint)
    return _report(title, True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- 01: DPO from Bradley-Terry ------------------------------------------------------------------------

def _toy_cases():
    from kdpo_lab import toy
    cases = []
    for seed, beta in ((0, 0.25), (1, 1.0), (2, 4.0)):
        r, pi_ref = toy.make_problem(n=6, seed=seed)
        cases.append((r, pi_ref, beta))
    return cases


def check_optimal_policy(fn):
    """fn(r, pi_ref, beta) -> pi*, the closed-form optimum of J(pi) = E_pi[r] - beta KL(pi || pi_ref)."""
    from kdpo_lab import toy
    return _check("the optimal policy pi*", fn, _toy_cases(), toy.optimal_policy,
                  "pi* = pi_ref * exp(r / beta) / Z, with Z the sum that makes pi* sum to 1; "
                  "torch.softmax(pi_ref.log() + r / beta, -1) computes it without overflow")


def check_optimal_value(fn):
    """fn(r, pi_ref, beta) -> J(pi*) = beta log Z, Z = sum_y pi_ref(y) exp(r(y) / beta)."""
    return _check("the optimal value J(pi*)", fn, _toy_cases(),
                  lambda r, pi_ref, beta: beta * torch.logsumexp(pi_ref.log() + r / beta, -1),
                  "J(pi*) = beta log Z(x); the factor beta matters, and logsumexp(log pi_ref + r / beta) "
                  "is log Z")


def check_dpo_loss(fn):
    """fn(logp_w, logp_l, ref_w, ref_l, beta) -> per-pair DPO loss [B]."""
    from kdpo_lab.losses import kernel_dpo_loss
    g = _gen(0)
    cases = [tuple(torch.randn(5, generator=g, dtype=D) * 3 - 10 for _ in range(4)) + (beta,) for beta in (0.1, 1.0)]
    return _check("the DPO loss", fn, cases,
                  lambda pw, pl, rw, rl, beta: kernel_dpo_loss(pw, pl, rw, rl, beta=beta)[0],
                  "z = beta * ((logp_w - ref_w) - (logp_l - ref_l)), loss = -log sigmoid(z) "
                  "(torch.nn.functional.logsigmoid); one value per pair, no mean")


# ---- 02: kernels ---------------------------------------------------------------------------------------

def check_rbf_log_kernel(fn):
    """fn(x, y, sigma) -> log K~(x, y) of the RBF kernel on the directions of x, y [B, d] -> [B]."""
    from kdpo_lab import kernels
    g = _gen(1)
    cases = [(3 * torch.randn(6, 5, generator=g, dtype=D), torch.randn(6, 5, generator=g, dtype=D), s)
             for s in (0.5, 1.3)]
    return _check("the RBF log-kernel", fn, cases,
                  lambda x, y, s: kernels.get("rbf", sigma=s).log_kernel(x, y),
                  "directions first: u = x / ||x||, v = y / ||y|| (norm over the last axis), then "
                  "-||u - v||^2 / (2 sigma^2)")


def check_normalised_spectral(fn):
    """fn(u, v, A) -> log K~(u, v) for log K(u, v) = u'Av on unit u, v [B, d], A [d, d] symmetric PSD."""
    g = _gen(2)
    cases = []
    for d in (3, 6):
        u = torch.nn.functional.normalize(torch.randn(4, d, generator=g, dtype=D), dim=-1)
        v = torch.nn.functional.normalize(torch.randn(4, d, generator=g, dtype=D), dim=-1)
        M = torch.randn(d, 2, generator=g, dtype=D)
        cases.append((u, v, M @ M.T))
    quad = lambda a, A, b: torch.einsum("bi,ij,bj->b", a, A, b)
    return _check("the normalised spectral log-kernel", fn, cases,
                  lambda u, v, A: -0.5 * quad(u - v, A, u - v),
                  "log K~(u, v) = log K(u, v) - (log K(u, u) + log K(v, v)) / 2 with log K(u, u) = u'Au: "
                  "this depends on u, so normalising changes the margins")


def check_gram_matrix(fn):
    """fn(kernel, X) -> [n, n] Gram matrix K~(x_i, x_j) of a kdpo_lab kernel on embeddings X [n, d]."""
    from kdpo_lab import kernels
    g = _gen(3)
    X = torch.randn(7, 4, generator=g, dtype=D)
    cases = [(kernels.get(name).fit(X), X) for name in ("rbf", "polynomial", "mahalanobis")]
    return _check("the Gram matrix", fn, cases, lambda kernel, X: kernel.gram(X).detach(),
                  "kernel.log_kernel(a, b) broadcasts: pair every row with every row through "
                  "X[:, None, :] and X[None, :, :], then exponentiate")


# ---- 03: divergences -----------------------------------------------------------------------------------

def check_link(fn):
    """fn(f_prime, rho) -> s(rho) = f'(e^rho) - f'(1), for any generator derivative f_prime."""
    from kdpo_lab import divergences
    rho = torch.linspace(-3, 3, 13, dtype=D)
    cases = [(divergences.get(name).f_prime, rho) for name in ("kl", "forward_kl", "js", "hellinger", "chi2")]
    return _check("the link score s(rho)", fn, cases, lambda fp, r: fp.__self__.link(r),
                  "s(rho) = f'(e^rho) - f'(1): evaluate f_prime at u = exp(rho) and subtract its value "
                  "at u = 1 (so that s(0) = 0)", atol=1e-9)


def check_js_link(fn):
    """fn(rho) -> the Jensen-Shannon link log 2 + log sigmoid(rho), stable for |rho| up to 50."""
    from kdpo_lab import divergences
    cases = [(torch.linspace(-50, 50, 21, dtype=D),)]
    return _check("the Jensen-Shannon link", fn, cases, divergences.get("js").link,
                  "f'(u) = log(2u / (1 + u)); at u = e^rho that is log 2 + log sigmoid(rho) "
                  "(torch.nn.functional.logsigmoid, stable where log(sigmoid(rho)) underflows)")


def check_hellinger(fn):
    """fn(logp, logq) -> squared Hellinger sum_i (sqrt p_i - sqrt q_i)^2 over the last axis."""
    from kdpo_lab import divergences
    g = _gen(4)
    cases = [((2 * torch.randn(3, 9, generator=g, dtype=D)).log_softmax(-1),
              (2 * torch.randn(3, 9, generator=g, dtype=D)).log_softmax(-1))]
    return _check("the squared Hellinger distance", fn, cases, divergences.get("hellinger").penalty,
                  "inputs are log-probabilities: sqrt p = exp(logp / 2); our Hellinger is the plain sum "
                  "of squares, 2 (1 - BC), with no factor 1/2", atol=1e-5)


# ---- 04: the hybrid loss and HMK (for notebook 04's exercise block) ---------------------------------

def _hmk_cases():
    g = _gen(5)
    return [tuple(torch.randn(2, generator=g, dtype=D) for _ in range(3)) for _ in range(3)]


def check_hmk_weights(fn):
    """fn(tau_logits, local_logits, global_logits) -> [4] effective weights (w_rbf, w_poly, w_spec, w_maha)."""
    from kdpo_lab import kernels

    def reference(t, a, b):
        hmk = kernels.get("hmk")
        with torch.no_grad():
            hmk.tau_logits.copy_(t), hmk.local_logits.copy_(a), hmk.global_logits.copy_(b)
            return hmk.log_weights().exp()
    return _check("the HMK mixture weights", fn, _hmk_cases(), reference,
                  "each pair of logits goes through its own softmax; w_rbf = tau_L a_rbf, "
                  "w_poly = tau_L a_poly, w_spec = tau_G a_spec, w_maha = tau_G a_maha (they sum to 1)")


def check_hmk_entropy(fn):
    """fn(tau_logits, local_logits, global_logits) -> H, the sum of the three groups' Shannon entropies."""
    from kdpo_lab import kernels

    def reference(t, a, b):
        hmk = kernels.get("hmk")
        with torch.no_grad():
            hmk.tau_logits.copy_(t), hmk.local_logits.copy_(a), hmk.global_logits.copy_(b)
            return hmk.entropy()
    return _check("the HMK entropy term", fn, _hmk_cases(), reference,
                  "H = sum over the three groups of -sum_i p_i log p_i, p = softmax(group logits): "
                  "three entropies of two weights each, not the entropy of the four w_c")


# ---- 05: training a small model ------------------------------------------------------------------------

def check_dpo_logit(fn):
    """fn(rho_w, rho_l, beta, gamma, kernel_margin) -> z of the hybrid loss with the KL link, [B]."""
    g = _gen(6)
    cases = [(torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D), beta, gamma,
              0.1 * torch.randn(5, generator=g, dtype=D)) for beta, gamma in ((0.1, 0.5), (0.5, 2.0))]
    return _check("the hybrid logit z", fn, cases,
                  lambda rw, rl, beta, gamma, m: beta * (rw - rl) + gamma * m,
                  "z = beta (rho_w - rho_l) + gamma (log K(e_x, e_w) - log K(e_x, e_l)): the kernel "
                  "margin is added with weight gamma, outside the beta")


def check_sampled_kl(fn):
    """fn(logp_policy, logp_ref) -> the Monte Carlo KL(pi || pi_ref) from responses sampled from pi."""
    g = _gen(7)
    cases = [(torch.randn(16, generator=g, dtype=D) - 20, torch.randn(16, generator=g, dtype=D) - 22)]
    return _check("the sampled KL estimate", fn, cases, lambda lp, lr: (lp - lr).mean(),
                  "with y_i ~ pi, KL(pi || pi_ref) = E_pi[log pi(y|x) - log pi_ref(y|x)]: the mean of "
                  "the differences, policy minus reference (one number)")


def check_winrate(fn):
    """fn(r_policy, r_ref) -> P(r_policy > r_ref) + P(tie) / 2 over prompts."""
    cases = [(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))]
    return _check("the win-rate", fn, cases,
                  lambda a, b: ((a > b).double() + 0.5 * (a == b).double()).mean(),
                  "a tie counts half a win: mean of 1[r_pi > r_ref] + 0.5 * 1[r_pi == r_ref]")


# ---- 08: scaling to 7B ---------------------------------------------------------------------------------

def _llama_shapes():
    from kdpo_lab import models
    out = []
    for scale, V in ((1.0, 32000), (1 / 4, 1024), (1 / 16, 512)):
        c = models.llama_7b_config(scale, vocab_size=V)
        out.append((c, (V, c.hidden_size, c.num_hidden_layers, c.intermediate_size)))
    return out


def check_param_count(fn):
    """fn(V, d, L, d_ff) -> parameters of a Llama (untied embeddings, as many key/value as query heads)."""
    from kdpo_lab import models
    shapes = _llama_shapes()
    table = {args: models.param_count(c) for c, args in shapes}
    return _check("the Llama parameter count", fn, [args for _, args in shapes], lambda *a: table[a],
                  "per layer 4 d^2 (q, k, v, o) + 3 d d_ff (gate, up, down) + 2 d (two RMSNorms); "
                  "then the embedding and the output layer (V d each) and the final norm (d)", atol=0.5)


def check_lora_param_count(fn):
    """fn(d, L, d_ff, r) -> LoRA parameters on every linear map of the blocks (all-linear)."""
    from kdpo_lab import models
    shapes = _llama_shapes()
    cases, table = [], {}
    for c, (V, d, L, ff) in shapes:
        for r in (4, 16):
            cases.append((d, L, ff, r))
            table[(d, L, ff, r)] = models.lora_param_count(c, r)
    return _check("the LoRA parameter count", fn, cases, lambda *a: table[a],
                  "a map R^m -> R^n gets A [r, m] and B [n, r]: r (m + n). Per layer q, k, v, o are d -> d, "
                  "gate and up d -> d_ff, down d_ff -> d", atol=0.5)


def check_full_finetune_bytes(fn):
    """fn(P, b) -> bytes of weights, reference copy, grads and AdamW states for full fine-tuning at b bytes."""
    from kdpo_lab import models
    config = models.llama_7b_config()
    cases, table = [], {}
    for dtype, b in models.BYTES.items():
        est = models.memory_estimate(config, dtype=dtype)
        key = (models.param_count(config), b)
        cases.append(key)
        table[key] = sum(est[k] for k in ("weights", "reference", "grads", "optimizer"))
    return _check("full fine-tuning memory before activations", fn, cases, lambda *a: table[a],
                  "weights b P, the frozen reference another b P, grads b P, AdamW's m and v 2 b P", atol=0.5)


# ---- 09: heavy-tailed self-regularisation --------------------------------------------------------------

def _hill(evals, xmin):
    tail = evals[evals >= xmin]
    return 1 + len(tail) / torch.log(tail / xmin).sum()


def check_hill_alpha(fn):
    """fn(evals, xmin) -> the Hill (maximum-likelihood) power-law exponent of the eigenvalues >= xmin."""
    g = _gen(8)
    cases = []
    for a in (2.5, 4.0):
        evals = (1 - torch.rand(300, generator=g, dtype=D)) ** (-1 / (a - 1))  # Pareto(a) on [1, inf)
        cases.append((evals, float(evals.median())))
    return _check("the Hill estimate of the power-law exponent", fn, cases, _hill,
                  "keep the tail evals >= xmin (n of them), then 1 + n / sum(log(evals / xmin))")


def check_band(fn):
    """fn(alpha) -> the HT-SR band of one exponent: "<2", "2-4", "4-6" or ">6" (spectra.band_of)."""
    from kdpo_lab import spectra
    title = "the HT-SR band"
    hint = "alpha < 2: '<2'; 2 <= alpha < 4: '2-4'; 4 <= alpha <= 6: '4-6'; alpha > 6: '>6' (mind the edges)"
    for a in (1.2, 2.0, 3.3, 4.0, 5.1, 6.0, 6.5):
        try:
            got = fn(a)
        except Exception as err:
            return _report(title, False, f"it raised {type(err).__name__}: {err}", hint)
        if got != spectra.band_of(a):
            return _report(title, False, f"alpha = {a} gave {got!r}, expected {spectra.band_of(a)!r}", hint)
    return _report(title, True)


def check_mp_edges(fn):
    """fn(sigma2, Q) -> (lower, upper) edges of the Marchenko-Pastur bulk, Q = N / M >= 1."""
    cases = [(1.0, 1.0), (0.5, 4.0), (2.0, 1.5)]
    return _check("the Marchenko-Pastur edges", fn, cases,
                  lambda s2, Q: torch.tensor([s2 * (1 - 1 / math.sqrt(Q)) ** 2, s2 * (1 + 1 / math.sqrt(Q)) ** 2]),
                  "sigma^2 (1 -/+ 1 / sqrt(Q))^2, returned as a pair (lower, upper)")


# ---- 06: choosing a kernel and a divergence -------------------------------------------------------------

def check_auc(fn):
    """fn(positive, negative) -> P(positive > negative) + P(tie) / 2 over all pairs (selection.auc)."""
    from kdpo_lab import selection
    g = _gen(11)
    cases = [(torch.tensor([0.1, 0.4, 0.4, 0.9], dtype=D), torch.tensor([0.0, 0.4, 0.5], dtype=D)),
             (torch.randn(30, generator=g, dtype=D) + 1, torch.randn(40, generator=g, dtype=D)),
             (torch.tensor([1.0, 2.0], dtype=D), torch.tensor([3.0], dtype=D))]
    return _check("the AUC of a margin", fn, cases, lambda p, n: selection.auc(p.numpy(), n.numpy()),
                  "count the pairs (p, n) with p > n, add half the ties, divide by the number of pairs")


def check_link_score(fn):
    """fn(overlap, kurtosis, drift, damping) -> selection's score of a link-form divergence."""
    from kdpo_lab import selection

    def reference(overlap, kurtosis, drift, damping):
        table = selection.divergence_table({"overlap": overlap, "kurtosis": kurtosis, "drift": drift})
        name = next(n for n, c in selection.DAMPING.items() if c == damping)
        return table.set_index("divergence").loc[name, "divergence_score"]
    cases = [(o, k, d, c) for o, k, d in ((0.6, 5.0, 0.2), (0.3, -1.0, 0.0), (0.9, 0.5, 2.0))
             for c in selection.DAMPING.values()]
    return _check("a link-form divergence's score", fn, cases, reference,
                  "c* = k+ / (k+ + 3) * (1 - d / (d + 1)) with k+ = max(kurtosis, 0); score = overlap * (1 - |c - c*|)")


def check_regret(fn):
    """fn(table, results) -> the best achieved result minus the result of the top-scored pair."""
    import pandas as pd

    from kdpo_lab import selection
    g = _gen(12)
    cases = []
    for _ in range(5):
        table = pd.DataFrame({"kernel": ["rbf", "rbf", "spectral", "spectral"], "divergence": ["kl", "js"] * 2,
                              "score": torch.rand(4, generator=g, dtype=D).numpy()})
        cases.append((table, table[["kernel", "divergence"]].assign(result=torch.rand(4, generator=g, dtype=D).numpy())))
    return _check("the regret of the recommended pair", fn, cases,
                  lambda table, results: selection.validate(table, results)["regret"],
                  "merge on (kernel, divergence); regret = max(result) - the result of the pair with the top score")


# ---- 07: the hierarchical mixture in training ------------------------------------------------------------

def check_mixture_margin(fn):
    """fn(log_w [4], logk_w [B, 4], logk_l [B, 4]) -> [B] HMK margin log(sum_c w_c K_c(x, w) / sum_c w_c K_c(x, l))."""
    g = _gen(13)
    cases = []
    for _ in range(3):
        log_w = torch.log_softmax(torch.randn(4, generator=g, dtype=D), -1)
        cases.append((log_w, -torch.rand(8, 4, generator=g, dtype=D) * 3, -torch.rand(8, 4, generator=g, dtype=D) * 3))
    return _check("the mixture's margin", fn, cases,
                  lambda log_w, kw, kl: torch.logsumexp(log_w + kw, -1) - torch.logsumexp(log_w + kl, -1),
                  "log sum_c w_c K_c = logsumexp(log_w + log K_c) over the components; chosen minus rejected")


def check_kernel_share(fn):
    """fn(prob_term [B], margin [B], gamma) -> the kernel term's share of |z| (losses.kernel_metrics)."""
    from kdpo_lab import losses
    g = _gen(14)
    cases = [(torch.randn(16, generator=g, dtype=D), torch.randn(16, generator=g, dtype=D), gamma) for gamma in (0.5, 2.0)]
    return _check("the kernel term's share", fn, cases,
                  lambda p, m, gamma: losses.kernel_metrics(p, m, gamma)["kernel/share"][0],
                  "a ratio of batch means of absolute values: mean|gamma m| / (mean|prob term| + mean|gamma m|)")


# ---- 10: reading the sweep against the paper ------------------------------------------------------------

def check_paired_interval(fn):
    """fn(variant [S], dpo [S]) -> (mean, low, high): the paired difference variant - dpo over seeds, with
    a 95% Student t interval (n - 1 degrees of freedom)."""
    from kdpo_lab import sweep_stats
    g = _gen(14)
    cases = []
    for n in (3, 5, 8):
        dpo = torch.rand(n, generator=g, dtype=D) * 0.5
        cases.append((dpo + 0.02 + 0.03 * torch.randn(n, generator=g, dtype=D), dpo))
    return _check("the paired difference to DPO with its t interval", fn, cases,
                  lambda a, b: sweep_stats.t_interval((a - b).numpy()),
                  "d_s = variant_s - dpo_s per seed; mean(d) -+ t_{0.975, n-1} * std(d, ddof=1) / sqrt(n) (scipy.stats.t.ppf)")


def check_relative_gain(fn):
    """fn(variant [S, F], dpo [S, F]) -> the relative gain averaged over families:
    mean_f (mean_s variant[s, f] / mean_s dpo[s, f]) - 1."""
    g = _gen(15)
    cases = [(torch.rand(5, 4, generator=g, dtype=D) + 0.2, torch.rand(5, 4, generator=g, dtype=D) + 0.2) for _ in range(3)]
    return _check("the family-averaged relative gain (the paper's +9.2% metric)", fn, cases,
                  lambda a, b: (a.mean(0) / b.mean(0) - 1).mean(),
                  "a ratio of means over seeds in each family, minus 1, then the mean over families (not pooled rewards)")
