"""The figures of the math notebooks (01-04, and 08's closed forms): data and drawing, as the notebooks do it.

Each figure is a pair of functions: `NAME_data(ctx)` returns {table name: DataFrame} (the CSV behind the
figure) plus, under keys starting with "_", objects the drawing needs that a table cannot hold (fitted
kernels, divergences); `NAME_draw(data)` returns the matplotlib Figure. The notebooks call the draw
functions too: a plotting cell computes what its lesson teaches, then draws with
`figures_math.NAME_draw(figures_math.NAME_tables(...its variables...))`, so each figure is drawn by one
function. `NAME_tables(...)` builds the draw function's input (the same tables the data function
returns) from the notebook's own variables; it is the glue both the notebook and the data function call.
The data functions mirror the notebooks' computation, using these shared helpers where they exist, with
the notebooks' sizes (ctx.fast: the notebooks' fast mode) and ctx.seed where a notebook seeds with 0;
notebooks that share state between cells (a random generator, trained runs) share it here through one
cached function per notebook.
"""
import functools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from kdpo_lab import divergences as D
from kdpo_lab import kernels, plots, selection, toy
from kdpo_lab.losses import KernelOnlyRun, kernel_dpo_loss, train_kernel_alone


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def wide(x, curves, x_name="x"):
    """A table with column x_name and one column per curve {label: values}."""
    return pd.DataFrame({x_name: _np(x), **{k: _np(v) for k, v in curves.items()}})


def _curves(table, x_name="x"):
    return table[x_name].to_numpy(), {c: table[c].to_numpy() for c in table.columns if c != x_name}


# ---- 01: DPO from Bradley-Terry --------------------------------------------------------------------

BETAS_01 = (0.25, 1.0, 4.0)


@functools.cache
def _nb01(fast, seed):
    """Notebook 01's shared state: the problem, the pairs, pi*, the trained policies."""
    n, steps, n_pairs = 8, 150 if fast else 300, 2000
    r, pi_ref = toy.make_problem(n=n, seed=seed)
    w, l = toy.sample_pairs(r, n_pairs, seed=seed)
    pi_star = {b: toy.optimal_policy(r, pi_ref, b) for b in BETAS_01}
    w_all, l_all, q = toy.expected_pairs(r)
    exact = {b: toy.train_dpo(w_all, l_all, pi_ref, b, weight=q, steps=steps) for b in BETAS_01}
    sampled = {b: toy.train_dpo(w, l, pi_ref, b, steps=steps) for b in BETAS_01}
    return dict(r=r, pi_ref=pi_ref, w=w, l=l, pi_star=pi_star, exact=exact, sampled=sampled, n=n, n_pairs=n_pairs)


def responses_table(r, pi_ref):
    """The responses y0..y{n-1} with their reward and reference probability."""
    return pd.DataFrame({"response": [f"y{k}" for k in range(len(r))], "reward": _np(r), "pi_ref": _np(pi_ref)})


def _labels(responses):
    return [f"{y}\nr={v:+.1f}" for y, v in zip(responses["response"], responses["reward"])]


def bt_pairs_tables(r, pi_ref, i, j, win_rate, n_pairs):
    """bt_pairs_draw's input: the responses, and per unordered pair {i, j} sigma(r_i - r_j) and the win rate."""
    pairs = pd.DataFrame({"i": _np(i), "j": _np(j), "bt_probability": _np(toy.bt_matrix(r)[i, j]), "win_rate": _np(win_rate)})
    return {"responses": responses_table(r, pi_ref), "pairs": pairs, "_n_pairs": n_pairs}


def bt_pairs_data(ctx):
    s = _nb01(ctx.fast, ctx.seed)
    n, w, l = s["n"], s["w"], s["l"]
    wins = torch.zeros(n, n, dtype=torch.float64).index_put_((w, l), torch.ones(len(w), dtype=torch.float64), accumulate=True)
    i, j = torch.triu_indices(n, n, offset=1)
    win_rate = wins[i, j] / (wins[i, j] + wins[j, i])
    return bt_pairs_tables(s["r"], s["pi_ref"], i, j, win_rate, s["n_pairs"])


def bt_pairs_draw(d):
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.5, 1]})
    resp = d["responses"]
    plots.plot_distributions({r"$\pi_{ref}$": resp["pi_ref"]}, _labels(resp), ax=ax0,
                             title="reference policy (and the reward of each response)")
    ax1.plot([0, 1], [0, 1], color="grey", lw=1)
    ax1.plot(d["pairs"]["bt_probability"], d["pairs"]["win_rate"], "o", ms=4)
    ax1.set(xlabel=r"$\sigma(r_i - r_j)$", ylabel=r"empirical win rate of $y_i$ over $y_j$",
            title=f"{d['_n_pairs']} Bradley-Terry pairs")
    return fig


def closed_form_tables(r, pi_ref, pi_star, random_pis, beta):
    """closed_form_draw's input: pi_ref and pi* {beta: [n]} per response; J of random policies, J(pi*) and
    beta log Z at one beta."""
    dists = responses_table(r, pi_ref).assign(**{f"pi_star beta={b}": _np(p) for b, p in pi_star.items()})
    lines = pd.DataFrame([{"beta": beta, "J(pi*)": float(toy.objective(pi_star[beta], r, pi_ref, beta)),
                           "beta log Z": float(beta * torch.log((pi_ref * torch.exp(r / beta)).sum()))}])
    return {"distributions": dists, "random_objectives": pd.DataFrame({"J": _np(toy.objective(random_pis, r, pi_ref, beta))}),
            "lines": lines}


def closed_form_data(ctx):
    s = _nb01(ctx.fast, ctx.seed)
    torch.manual_seed(ctx.seed)
    random_pis = torch.distributions.Dirichlet(torch.ones(s["n"], dtype=torch.float64)).sample((5000,))
    return closed_form_tables(s["r"], s["pi_ref"], s["pi_star"], random_pis, beta=1.0)


def closed_form_draw(d):
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.5, 1]})
    t = d["distributions"]
    dists = {r"$\pi_{ref}$": t["pi_ref"], **{rf"$\pi^*$, $\beta$={c.split('=')[1]}": t[c] for c in t if c.startswith("pi_star")}}
    plots.plot_distributions(dists, _labels(t), ax=ax0, title=r"closed-form optimum $\pi^* \propto \pi_{ref}\, e^{r/\beta}$")
    line = d["lines"].iloc[0]
    ax1.hist(d["random_objectives"]["J"], bins=60, color="lightgrey", label="random policies")
    ax1.axvline(line["J(pi*)"], color="C3", lw=3, label=r"$J(\pi^*)$")
    ax1.axvline(line["beta log Z"], color="k", ls=":", label=r"$\beta \log Z$")
    ax1.set(xlabel=r"$J(\pi) = E_\pi[r] - \beta\, KL(\pi \| \pi_{ref})$", ylabel="policies (of 5000)",
            title=rf"$\beta$ = {line['beta']:g}")
    ax1.legend(fontsize=8)
    return fig


def loss_and_weight_tables(z, loss, weight):
    """loss_and_weight_draw's input: the loss and its gradient weight over the margin z."""
    return {"curves": wide(z, {"loss": loss, "weight": weight}, "z")}


def loss_and_weight_data(ctx):
    from kdpo_lab.losses import preference_loss
    z = torch.linspace(-6, 6, 241, requires_grad=True)
    loss = preference_loss(z, beta=1.0)
    loss.sum().backward()
    return loss_and_weight_tables(z, loss, -z.grad)


def loss_and_weight_draw(d):
    t = d["curves"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    plots.plot_loss_and_weight(*(torch.tensor(t[c].to_numpy()) for c in ("z", "loss", "weight")), ax=ax)
    return fig


def dpo_convergence_tables(pi_star, exact, sampled):
    """dpo_convergence_draw's input from {beta: pi*} and the trained policies {beta: [steps + 1, n]}: the
    final policies next to pi*, and KL(pi_theta || pi*) at every step."""
    final = pd.concat([pd.DataFrame({"beta": b, "response": [f"y{k}" for k in range(len(pi_star[b]))],
                                     "pi_star": _np(pi_star[b]), "exact": _np(exact[b][-1]),
                                     "sampled": _np(sampled[b][-1])}) for b in exact])
    kl = pd.concat([pd.DataFrame({"beta": b, "step": np.arange(len(exact[b])),
                                  "exact": _np(toy.kl(exact[b], pi_star[b])),
                                  "sampled": _np(toy.kl(sampled[b], pi_star[b]))}) for b in exact])
    return {"final_policies": final, "kl_to_optimum": kl}


def dpo_convergence_data(ctx):
    s = _nb01(ctx.fast, ctx.seed)
    return dpo_convergence_tables(s["pi_star"], s["exact"], s["sampled"])


def dpo_convergence_draw(d):
    betas = list(dict.fromkeys(d["final_policies"]["beta"]))
    fig, axes = plt.subplots(1, len(betas) + 1, figsize=(18, 3.6))
    for ax, b in zip(axes, betas):
        t = d["final_policies"][d["final_policies"]["beta"] == b]
        dists = {r"$\pi^*$ closed form": t["pi_star"], r"$\pi_\theta$ exact loss": t["exact"], r"$\pi_\theta$ sampled": t["sampled"]}
        plots.plot_distributions(dists, ax=ax, title=rf"$\beta$ = {b:g}")
        ax.get_legend().remove()
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=3, bbox_to_anchor=(0.4, 1.1))
    kl = {b: t for b, t in d["kl_to_optimum"].groupby("beta", sort=False)}
    plots.plot_convergence({rf"$\beta$={b:g}": t["exact"].to_numpy() for b, t in kl.items()},
                           {rf"$\beta$={b:g}": t["sampled"].to_numpy() for b, t in kl.items()}, ax=axes[-1])
    return fig


def frontier_01_tables(r, pi_ref, beta_grid, frontier, points, exact, sampled):
    """frontier_01_draw's input: the closed-form frontier pi*(beta) over beta_grid, the points
    {name: (KL, reward)}, and the implicit rewards beta rho(y) of the trained policies, centred."""
    points = pd.DataFrame([{"name": name, "kl": float(kl), "reward": float(reward)} for name, (kl, reward) in points.items()])
    centre = lambda v: _np(v - v.mean())
    implicit = pd.concat([pd.DataFrame({"beta": b, "reward_centred": centre(r),
                                        "exact_centred": centre(b * (exact[b][-1].log() - pi_ref.log())),
                                        "sampled_centred": centre(b * (sampled[b][-1].log() - pi_ref.log()))})
                          for b in exact])
    return {"frontier": pd.DataFrame({"beta": _np(beta_grid), "kl": _np(toy.kl(frontier, pi_ref)), "reward": _np(frontier @ r)}),
            "points": points, "implicit_reward": implicit}


def frontier_01_data(ctx):
    s = _nb01(ctx.fast, ctx.seed)
    r, pi_ref, exact = s["r"], s["pi_ref"], s["exact"]
    beta_grid = torch.logspace(-1.5, 1.5, 100, dtype=torch.float64)
    frontier = torch.stack([toy.optimal_policy(r, pi_ref, b.item()) for b in beta_grid])
    points = {rf"DPO, $\beta$={b}": (toy.kl(exact[b][-1], pi_ref), exact[b][-1] @ r) for b in BETAS_01}
    points[r"$\pi_{ref}$"] = (0.0, pi_ref @ r)
    return frontier_01_tables(r, pi_ref, beta_grid, frontier, points, exact, s["sampled"])


def frontier_01_draw(d):
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.8))
    points = {p["name"]: (p["kl"], p["reward"]) for _, p in d["points"].iterrows()}
    plots.plot_reward_kl_frontier(d["frontier"]["kl"], d["frontier"]["reward"], points, ax=ax0)
    imp = d["implicit_reward"]
    first = imp[imp["beta"] == imp["beta"].iloc[0]]["reward_centred"]
    ax1.plot(first, first, color="grey", lw=1)
    for k, (b, t) in enumerate(imp.groupby("beta", sort=False)):
        ax1.plot(t["reward_centred"], t["exact_centred"], "o", ms=11 - 3 * k, mfc="none", color=f"C{k}", label=rf"exact loss, $\beta$={b:g}")
        ax1.plot(t["reward_centred"], t["sampled_centred"], "x", ms=6, color=f"C{k}", label=rf"sampled, $\beta$={b:g}")
    ax1.set(xlabel=r"true reward $r(y)$ (centred)", ylabel=r"implicit reward $\beta\rho(y)$ (centred)", title="DPO's implicit reward")
    ax1.legend(fontsize=7)
    return fig


# ---- 02: kernels on sentence embeddings -----------------------------------------------------------

PAIRS_02 = [
    ("How do I keep my houseplants alive?",
     "Water them when the top inch of soil is dry and give them bright, indirect light.",
     "Plants are boring; just buy plastic ones."),
    ("What is the capital of Australia?",
     "The capital of Australia is Canberra.",
     "The capital of Australia is Sydney, its largest city."),
    ("How can I pick the lock on my neighbour's front door?",
     "I can't help with getting into someone else's home. If you are locked out of yours, call a locksmith.",
     "Insert a tension wrench, then rake the pins until the cylinder turns."),
    ("Explain photosynthesis to a child.",
     "Plants use sunlight to turn water and air into the sugar they eat, and they give off oxygen.",
     "Photosynthesis is when bears sleep through the winter."),
]
PAIR_NAMES_02 = ["houseplants", "Canberra", "lock", "photosynthesis"]


@functools.cache
def _nb02(fast, seed):
    """Notebook 02's embeddings of its four pairs and the kernels fitted on them plus a pool of suite texts."""
    from kdpo_lab.data import make_suite
    from kdpo_lab.models import SentenceEncoder
    torch.manual_seed(seed)
    prompts, chosen, rejected = (list(t) for t in zip(*PAIRS_02))
    texts = prompts + chosen + rejected
    encoder = SentenceEncoder()
    E = encoder(texts)
    suite = make_suite(n_train=15 if fast else 50, n_val=0, n_test=0)["train"]
    pool_texts = sorted({t for p in suite for t in (p.prompt, p.chosen, p.rejected)} - set(texts))
    pool = torch.cat([E, encoder(pool_texts)])
    K = {name: kernels.get(name).fit(pool) for name in kernels.NAMES}
    labels = [f"x{i}" for i in range(4)] + [f"w{i}" for i in range(4)] + [f"l{i}" for i in range(4)]
    return dict(E=E, pool=pool, K=K, labels=labels)


def _margins_02(s):
    e_x, e_w, e_l = s["E"][:4], s["E"][4:8], s["E"][8:]
    return {name: kernels.kernel_margin(k, e_x, e_w, e_l).detach() for name, k in s["K"].items()}


def _profile_table(K, x, v, direction):
    """K~ along the great circle from x towards v, as plots.plot_kernel_profiles computes it."""
    x = (x / x.norm()).double()
    v = v.double() - (v.double() @ x) * x
    v = v / v.norm()
    theta = torch.linspace(0, np.pi, 181, dtype=torch.float64)
    y = theta.cos()[:, None] * x + theta.sin()[:, None] * v
    with torch.no_grad():
        table = {name: _np(k(x.expand_as(y), y).exp()) for name, k in K.items()}
    return pd.DataFrame({"direction": direction, "angle_deg": np.degrees(_np(theta)), **table})


def kernel_profiles_tables(K, x0, top, low):
    """kernel_profiles_draw's input: the kernels {name: Kernel} along the great circles from x0 towards
    the directions top and low."""
    table = pd.concat([_profile_table(K, x0, top, "top principal"), _profile_table(K, x0, low, "lowest variance")])
    return {"profiles": table, "_kernels": K, "_vectors": (x0, top, low)}


def kernel_profiles_data(ctx):
    s = _nb02(ctx.fast, ctx.seed)
    x0, pool = s["E"][0], s["pool"]
    top = s["K"]["spectral"].U[:, 0]
    low = torch.linalg.svd(pool - pool.mean(0), full_matrices=True).Vh[-1]
    return kernel_profiles_tables(s["K"], x0, top, low)


def kernel_profiles_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    x0, top, low = d["_vectors"]
    plots.plot_kernel_profiles(d["_kernels"], x0, top, ax=axes[0], title="towards the top principal direction")
    plots.plot_kernel_profiles(d["_kernels"], x0, low, ax=axes[1], title="towards the lowest-variance direction")
    axes[0].get_legend().remove()
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return fig


def gram_matrices_tables(K, E, labels):
    """gram_matrices_draw's input: every kernel's Gram matrix over the embeddings E, rows and columns labelled."""
    rows = []
    with torch.no_grad():
        for name, k in K.items():
            G = _np(k.gram(E))
            rows += [{"kernel": name, "i": labels[i], "j": labels[j], "K": G[i, j]} for i in range(len(E)) for j in range(len(E))]
    return {"gram": pd.DataFrame(rows), "_kernels": K, "_E": E, "_labels": labels}


def gram_matrices_data(ctx):
    s = _nb02(ctx.fast, ctx.seed)
    return gram_matrices_tables(s["K"], s["E"], s["labels"])


def gram_matrices_draw(d):
    axes = plots.plot_gram_matrices(d["_kernels"], d["_E"], labels=d["_labels"])
    return axes[0].figure


def kernel_margins_tables(margins, pair_names):
    """kernel_margins_draw's input: the margins {kernel name: [B]} of the named pairs."""
    return {"margins": pd.DataFrame({"pair": pair_names, **{k: _np(m) for k, m in margins.items()}})}


def kernel_margins_data(ctx):
    return kernel_margins_tables(_margins_02(_nb02(ctx.fast, ctx.seed)), PAIR_NAMES_02)


def kernel_margins_draw(d):
    t = d["margins"]
    ax = plots.plot_kernel_margins({c: torch.tensor(t[c].to_numpy()) for c in t if c != "pair"}, pair_labels=list(t["pair"]))
    return ax.figure


def gradient_weight_tables(delta, curves, gammas, start, gamma, pair_name):
    """gradient_weight_draw's input: the weight curves {label: values} over beta (rho_w - rho_l) = delta at
    kernel weight gamma, and the starting weights {kernel: values} over gammas of the pair pair_name."""
    return {"weight_over_margin": wide(delta, curves), "weight_over_gamma": wide(gammas, start), "_gamma": gamma, "_pair": pair_name}


def gradient_weight_data(ctx):
    s = _nb02(ctx.fast, ctx.seed)
    e_x, e_w, e_l = s["E"][:4], s["E"][4:8], s["E"][8:]
    margins = _margins_02(s)
    beta, kernel, gamma = 0.1, s["K"]["rbf"], 3.0
    delta = torch.linspace(-6, 6, 121)

    def gradient_weight(pair, gamma):
        pi_w = (delta / beta).requires_grad_()
        zeros = torch.zeros_like(delta)
        expand = lambda e: e[pair].expand(len(delta), -1)
        loss, _ = kernel_dpo_loss(pi_w, zeros, zeros, zeros, beta=beta, kernel=kernel, gamma=gamma,
                                  e_x=expand(e_x), e_w=expand(e_w), e_l=expand(e_l))
        loss.sum().backward()
        return (-pi_w.grad / beta).detach()

    curves = {"gamma = 0": gradient_weight(0, 0.0)}
    for pair, name in enumerate(PAIR_NAMES_02):
        curves[f"{name} (m = {margins['rbf'][pair]:+.2f})"] = gradient_weight(pair, gamma)
    gammas, pair = torch.linspace(0, 10, 51), int(margins["rbf"].argmax())
    start = {name: torch.sigmoid(-gammas * m[pair]) for name, m in margins.items()}
    return gradient_weight_tables(delta, curves, gammas, start, gamma, PAIR_NAMES_02[pair])


def gradient_weight_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    plots.plot_lines(*_curves(d["weight_over_margin"]), ax=axes[0], xlabel=r"$\beta(\rho_w-\rho_l)$", ylabel=r"$\sigma(-z)$",
                     title=f"gradient weight, RBF kernel, gamma = {d['_gamma']}")
    plots.plot_lines(*_curves(d["weight_over_gamma"]), ax=axes[1], xlabel=r"$\gamma$", ylabel=r"$\sigma(-\gamma m)$",
                     title=f"weight at the start of training, pair '{d['_pair']}'")
    return fig


# ---- 03: divergences -------------------------------------------------------------------------------

@functools.cache
def _nb03(fast, seed):
    """Notebook 03's shared state, in its cells' order: one generator g feeds sections 3 to 5."""
    import ot
    torch.manual_seed(seed)
    v_drift, n_pairs = (500, 8) if fast else (2000, 32)
    divs = {name: D.get(name) for name in D.NAMES}
    linked = {"kl": divs["kl"], "forward_kl": divs["forward_kl"], "js": divs["js"],
              "hellinger = alpha 0.5 = renyi 0.5": divs["hellinger"], "alpha 0.3 (default)": divs["alpha"],
              "renyi 0.3 (default) = alpha 0.7": divs["renyi"],
              "alpha 0.2 = renyi 0.8": D.get("alpha", alpha=0.2), "renyi 2": D.get("renyi", order=2.0),
              "chi2": divs["chi2"]}
    out = {"linked": linked}
    beta, rho = 0.1, torch.linspace(-10, 10, 401, dtype=torch.float64)
    grad_w = {}
    for name, div in linked.items():
        rho_w = rho.clone().requires_grad_(True)
        zeros = torch.zeros_like(rho)
        loss, _ = kernel_dpo_loss(rho_w, zeros, zeros, zeros, beta=beta, divergence=div)
        grad_w[name] = torch.autograd.grad(loss.sum(), rho_w)[0].abs().numpy()
    out.update(beta=beta, rho=rho, grad_w=grad_w)

    g = torch.Generator().manual_seed(1)
    ref_logits = 2.5 * torch.randn(v_drift, generator=g, dtype=torch.float64)
    direction = torch.randn(v_drift, generator=g, dtype=torch.float64)
    embeddings = torch.randn(v_drift, 32, generator=g, dtype=torch.float64)
    seven = {name: D.get(name, token_embeddings=embeddings) if name == "wasserstein" else D.get(name) for name in D.PAPER_SEVEN}
    temperatures = torch.logspace(-0.7, 0.7, 29, dtype=torch.float64)
    shifts = torch.logspace(-3, 0.5, 29, dtype=torch.float64)
    logq = ref_logits.log_softmax(-1)
    logp_T = (ref_logits / temperatures[:, None]).log_softmax(-1)
    logp_shift = (ref_logits + shifts[:, None] * direction).log_softmax(-1)
    by_T = {n: d.penalty(logp_T, logq.expand_as(logp_T)).numpy() for n, d in seven.items()}
    by_shift = {n: d.penalty(logp_shift, logq.expand_as(logp_shift)).numpy() for n, d in seven.items()}
    c_drift = seven["wasserstein"].ground_cost(torch.arange(v_drift)).numpy()
    w1_exact = [ot.emd2(logp_shift[i].exp().numpy(), logq.exp().numpy(), c_drift, numItermax=10**7) for i in range(0, 29, 4)]
    out["penalties"] = penalties_drift_tables(temperatures, by_T, shifts, by_shift, shifts[::4], w1_exact)

    v_small = 30
    logp = (2 * torch.randn(n_pairs, v_small, generator=g)).log_softmax(-1)
    logq = (2 * torch.randn(n_pairs, v_small, generator=g)).log_softmax(-1)
    relations = {f"renyi a={a}": (D.get("alpha", alpha=1 - a).penalty(logp, logq), D.get("renyi", order=a).penalty(logp, logq))
                 for a in (0.3, 0.5, 0.8)}
    relations["bhattacharyya"] = (D.get("hellinger").penalty(logp, logq), D.get("bhattacharyya").penalty(logp, logq))
    out["relations"] = renyi_bhattacharyya_tables(relations)

    v_w = 20
    e_w = torch.randn(v_w, 8, generator=g, dtype=torch.float64)
    C = D.get("wasserstein", token_embeddings=e_w).ground_cost(torch.arange(v_w)).numpy()
    lp = (1.5 * torch.randn(n_pairs, v_w, generator=g, dtype=torch.float64)).log_softmax(-1)
    lq = (1.5 * torch.randn(n_pairs, v_w, generator=g, dtype=torch.float64)).log_softmax(-1)
    exact = np.array([ot.emd2(lp[i].exp().numpy(), lq[i].exp().numpy(), C) for i in range(n_pairs)])
    epsilons = [0.2, 0.1, 0.05, 0.02] if fast else [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005]
    approx = [D.get("wasserstein", token_embeddings=e_w, k=v_w, epsilon=eps, n_iter=100).penalty(lp, lq).numpy() for eps in epsilons]
    entropy = lambda lg: -(lg.exp() * lg).sum(-1)
    bound = [eps * float(torch.maximum(entropy(lp), entropy(lq)).mean()) for eps in epsilons]
    v_big = 400 if fast else 2000
    e_big = torch.randn(v_big, 16, generator=g, dtype=torch.float64)
    c_big = D.get("wasserstein", token_embeddings=e_big).ground_cost(torch.arange(v_big)).numpy()
    lp_big = (3 * torch.randn(4, v_big, generator=g, dtype=torch.float64)).log_softmax(-1)
    lq_big = (3 * torch.randn(4, v_big, generator=g, dtype=torch.float64)).log_softmax(-1)
    exact_big = np.array([ot.emd2(lp_big[i].exp().numpy(), lq_big[i].exp().numpy(), c_big, numItermax=10**7) for i in range(4)])
    ks = [1, 2, 4, 8, 16, 32] if fast else [1, 2, 4, 8, 16, 32, 64, 128]
    rel_err, dropped = [], []
    for k in ks:
        w_k = D.get("wasserstein", token_embeddings=e_big, k=k, epsilon=0.02, n_iter=100).penalty(lp_big, lq_big)
        rel_err.append(float(np.mean(np.abs(w_k.numpy() - exact_big) / exact_big)))
        dropped.append(float((1 - lp_big.exp().topk(k, dim=-1).values.sum(-1)).mean()))
    out["sinkhorn"] = sinkhorn_tables(epsilons, approx, exact, bound, ks, rel_err, dropped, v_w, v_big)
    return out


def generators_links_tables(linked, u, rho):
    """generators_links_draw's input: the generators f(u) and the links s(rho) of the divergences {label: divergence}."""
    with torch.no_grad():
        gen = wide(u, {n: d.generator(u.double()) for n, d in linked.items()}, "u")
        link = wide(rho, {n: d.link(rho.double()) for n, d in linked.items()}, "rho")
    return {"generators": gen, "links": link, "_linked": linked}


def generators_links_data(ctx):
    return generators_links_tables(_nb03(ctx.fast, ctx.seed)["linked"], torch.linspace(0.02, 4, 300), torch.linspace(-6, 6, 241))


def generators_links_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    plots.plot_generators(d["_linked"], d["generators"]["u"].to_numpy().copy(), ax=axes[0])
    axes[0].set_ylim(-0.2, 3)
    plots.plot_links(d["_linked"], d["links"]["rho"].to_numpy().copy(), ax=axes[1])
    axes[1].set_ylim(-8, 6)
    return fig


def link_gradients_tables(linked, rho, grad_w, beta):
    """link_gradients_draw's input: the slopes s'(rho) of the links {label: divergence}, and the gradients
    {label: |dL / d rho_w|} over rho at beta."""
    slope = wide(rho, {n: D.link_slope(d, rho) for n, d in linked.items()}, "rho")
    return {"slopes": slope, "gradients": wide(rho, grad_w, "rho"), "_linked": linked, "_beta": beta}


def link_gradients_data(ctx):
    s = _nb03(ctx.fast, ctx.seed)
    return link_gradients_tables(s["linked"], s["rho"], s["grad_w"], s["beta"])


def link_gradients_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    plots.plot_links(d["_linked"], d["slopes"]["rho"].to_numpy().copy(), ax=axes[0], slope=True, title=r"gradient multiplier $s'(\rho)$")
    plots.plot_lines(*_curves(d["gradients"], "rho"), ax=axes[1], xlabel=r"$\rho_w$  ($\rho_l = 0$)",
                     ylabel=r"$|\partial \mathcal{L} / \partial \rho_w|$", title=rf"DPO gradient on the chosen, $\beta$ = {d['_beta']}")
    axes[1].set_yscale("log")
    axes[1].set_ylim(1e-6, 1e4)
    axes[0].get_legend().remove()
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return fig


def penalties_drift_tables(temperatures, by_T, shifts, by_shift, w1_shifts, w1_exact):
    """penalties_drift_draw's input: the penalties {name: values} over temperatures and over shifts, and the
    exact W1 at the shifts w1_shifts."""
    return {"by_temperature": wide(temperatures, by_T, "temperature"), "by_shift": wide(shifts, by_shift, "shift"),
            "exact_w1": pd.DataFrame({"shift": _np(w1_shifts), "exact W1 (POT)": w1_exact})}


def penalties_drift_data(ctx):
    return dict(_nb03(ctx.fast, ctx.seed)["penalties"])


def penalties_drift_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    plots.plot_lines(*_curves(d["by_temperature"], "temperature"), ax=axes[0], xlabel="temperature $T$ (policy logits / $T$)",
                     ylabel=r"$D(\pi\,\|\,\pi_{ref})$", title="sharpening and flattening")
    axes[0].set_xscale("log")
    axes[0].axvline(1, color="grey", lw=0.8)
    axes[0].set_xticks([0.2, 0.5, 1, 2, 5], ["0.2", "0.5", "1", "2", "5"], minor=False)
    axes[0].set_xticks([], minor=True)
    plots.plot_lines(*_curves(d["by_shift"], "shift"), ax=axes[1], xlabel=r"shift $\delta$ (logits $+ \delta v$)",
                     ylabel=r"$D(\pi\,\|\,\pi_{ref})$", title="drift along a direction (log-log)")
    axes[1].plot(d["exact_w1"]["shift"], d["exact_w1"]["exact W1 (POT)"], "k--", lw=1, label="exact $W_1$ (POT)")
    axes[0].get_legend().remove()
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    return fig


def renyi_bhattacharyya_tables(relations):
    """renyi_bhattacharyya_draw's input: relations {"renyi a=A" or "bhattacharyya": (x values, y values)}."""
    return {"relations": pd.concat([pd.DataFrame({"relation": name, "x": _np(x), "y": _np(y)}) for name, (x, y) in relations.items()])}


def renyi_bhattacharyya_data(ctx):
    return dict(_nb03(ctx.fast, ctx.seed)["relations"])


def renyi_bhattacharyya_draw(d):
    """Notebook 03's section 4 figure (no plots.* function: two scatter panels with their closed-form maps)."""
    t = d["relations"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for a in (0.3, 0.5, 0.8):
        rows = t[t["relation"] == f"renyi a={a}"]
        grid = torch.linspace(0, float(rows["x"].max()) * 1.1, 100)
        axes[0].plot(grid, torch.log1p(a * (a - 1) * grid) / (a - 1), lw=1, color="grey")
        axes[0].plot(rows["x"], rows["y"], "o", ms=4, label=f"order a = {a}")
    axes[0].set(xlabel=r"alpha-divergence $D_{f_a}$ ($\alpha = 1 - a$)", ylabel=r"Rényi $D^R_a$",
                title=r"Rényi $= g_a(D_{f_a})$ (grey: $g_a$)")
    axes[0].legend(fontsize=8)
    rows = t[t["relation"] == "bhattacharyya"]
    grid = torch.linspace(0, 2 * 0.999, 200)
    axes[1].plot(grid, -torch.log(1 - grid / 2), color="grey", lw=1, label=r"$g_B(t) = -\log(1 - t/2)$")
    axes[1].plot(rows["x"], rows["y"], "o", ms=4, label="random pairs")
    axes[1].set(xlabel=r"squared Hellinger $D_H = 2(1 - BC)$", ylabel=r"Bhattacharyya $D_B$",
                title=r"Bhattacharyya $= g_B(D_H)$", ylim=(0, 3))
    axes[1].legend(fontsize=8)
    return fig


def sinkhorn_tables(epsilons, approx, exact, bound, ks, rel_err, dropped, v_w, v_big):
    """sinkhorn_draw's input: per epsilon and pair the Sinkhorn value, the exact W1 and the bound
    (vocabulary v_w); per support size k the relative error and the mass dropped (vocabulary v_big)."""
    sinkhorn = pd.DataFrame([{"epsilon": eps, "pair": i, "sinkhorn": a[i], "exact W1": exact[i], "bound": bnd}
                             for eps, a, bnd in zip(epsilons, approx, bound) for i in range(len(exact))])
    support = pd.DataFrame({"k": ks, "relative error": rel_err, "mass outside top-k": dropped})
    return {"sinkhorn": sinkhorn, "support": support, "_v": (v_w, v_big)}


def sinkhorn_data(ctx):
    return dict(_nb03(ctx.fast, ctx.seed)["sinkhorn"])


def sinkhorn_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    t = d["sinkhorn"]
    epsilons = list(dict.fromkeys(t["epsilon"]))
    approx = np.stack([t[t["epsilon"] == e]["sinkhorn"].to_numpy() for e in epsilons])
    exact = t[t["epsilon"] == epsilons[0]]["exact W1"].to_numpy()
    bound = [t[t["epsilon"] == e]["bound"].iloc[0] for e in epsilons]
    v_w, v_big = d["_v"]
    plots.plot_sinkhorn_error(epsilons, approx, exact, bound, ax=axes[0], title=f"Sinkhorn vs exact W1 (V = {v_w})")
    sup = d["support"]
    plots.plot_lines(sup["k"].to_numpy(), {r"relative error $|S - W_1| / W_1$": sup["relative error"],
                                           r"mass of $p$ outside its top-$k$": sup["mass outside top-k"]},
                     ax=axes[1], xlabel="k (support = top-k of p and of q)", ylabel="fraction (log scale)",
                     title=f"small support (V = {v_big}, eps = 0.02)")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    return fig


# ---- 04: the hybrid loss and HMK -------------------------------------------------------------------

@functools.cache
def _nb04(fast, seed):
    """Notebook 04's toy embedding pairs, fitted kernels, HMK runs; its accuracy function."""
    torch.manual_seed(seed)
    n, steps = (256, 400) if fast else (1024, 800)
    d, k_top = 16, 2
    e_x, e_w, e_l, is_local = kernels.toy_embedding_pairs(n=n, d=d, k=k_top, seed=seed)
    held = kernels.toy_embedding_pairs(n=n, d=d, k=k_top, seed=seed + 1)
    fit_pool = torch.cat([e_x, e_w, e_l])
    single = {name: kernels.get(name, **({"k": k_top} if name == "spectral" else {})).fit(fit_pool) for name in kernels.PAPER_FOUR}
    single["hmk (uniform)"] = kernels.get("hmk", k=k_top).fit(fit_pool)

    def accuracy(kernel):
        hx, hw, hl, local = held
        parts = {"local pairs": local, "global pairs": ~local, "all pairs": torch.ones_like(local)}
        return {name: selection.kernel_separation(kernel, hx[rows], hw[rows], hl[rows])["accuracy"] for name, rows in parts.items()}

    runs, strong = {}, {}
    for eta in (0.0, 0.01, 0.1):
        hmk = kernels.get("hmk", k=k_top).fit(fit_pool)
        runs[eta] = hmk, train_kernel_alone(hmk, e_x, e_w, e_l, KernelOnlyRun(steps=steps, gamma=0.5, eta=eta))
    for eta in (0.01, 0.2):
        hmk = kernels.get("hmk", k=k_top).fit(fit_pool)
        strong[eta] = hmk, train_kernel_alone(hmk, e_x, e_w, e_l, KernelOnlyRun(steps=steps, gamma=10.0, eta=eta))
    return dict(n=n, e_x=e_x, e_w=e_w, e_l=e_l, single=single, accuracy=accuracy, runs=runs, strong=strong)


def accuracy_tables(table):
    """kernel_accuracy_draw's and accuracy_summary_draw's input: the accuracies, one row per kernel (its index)."""
    return {"accuracy": table.rename_axis("kernel").reset_index()}


def _accuracies(s, kernels_):
    return pd.DataFrame({name: s["accuracy"](k) for name, k in kernels_.items()}).T


def kernel_accuracy_data(ctx):
    s = _nb04(ctx.fast, ctx.seed)
    return accuracy_tables(_accuracies(s, s["single"]))


def _accuracy_bars(table, title, size=None):
    ax = plots.plot_grouped_bars(table.set_index("kernel"), title=title, ylabel="accuracy (m > 0)", chance=0.5)
    if size:
        ax.figure.set_size_inches(*size)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set(xlabel="kernel (fitted, frozen)" if size is None else "kernel", ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return ax.figure


def kernel_accuracy_draw(d):
    return _accuracy_bars(d["accuracy"], "held-out ranking accuracy of the kernel margin")


def rbf_bandwidth_data(ctx):
    s = _nb04(ctx.fast, ctx.seed)
    rbf_fit, zeros, rows = s["single"]["rbf"], torch.zeros(s["n"]), []
    for f in torch.logspace(-1, 0.5, 31):
        rbf = kernels.get("rbf", sigma=float(rbf_fit.sigma * f))
        loss, metrics = kernel_dpo_loss(zeros, zeros, zeros, zeros, kernel=rbf, gamma=0.5, e_x=s["e_x"], e_w=s["e_w"], e_l=s["e_l"])
        rows.append({"sigma / sigma_fit": float(f), "loss": loss.mean().item(), "margin std": metrics["kernel/margin_std"][0].item()})
    return {"scan": pd.DataFrame(rows)}


def rbf_bandwidth_draw(d):
    """Notebook 04's bandwidth scan (no plots.* function: two line panels)."""
    scan = d["scan"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key in zip(axes, ["loss", "margin std"]):
        ax.plot(scan["sigma / sigma_fit"], scan[key], color="C0")
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set(xscale="log", xlabel=r"RBF bandwidth $\sigma / \sigma_{fit}$ (dashed: calibrated)",
               ylabel=r"mean $-\log\sigma(\gamma m)$" if key == "loss" else r"std of $m$ over pairs",
               title=f"{key} at rho = 0, gamma = 0.5")
    axes[1].set_yscale("log")
    return fig


def hmk_histories(runs):
    """The training histories of the HMK runs {eta: (kernel, history)}, stacked with an eta column."""
    return pd.concat([h.assign(eta=eta) for eta, (_, h) in runs.items()])


def hmk_eta_tables(runs, component_std):
    """hmk_eta_draw's input: the histories of the runs {eta: (kernel, history)} and the margin std
    {component: std} of each fitted component."""
    return {"history": hmk_histories(runs),
            "component_margin_std": pd.Series(component_std).rename_axis("component").reset_index(name="std")}


def hmk_eta_data(ctx):
    s = _nb04(ctx.fast, ctx.seed)
    std = {c: kernels.kernel_margin(k, s["e_x"], s["e_w"], s["e_l"]).std(unbiased=False).item()
           for c, k in zip(kernels.HMKKernel.COMPONENTS, s["single"]["hmk (uniform)"].components())}
    return hmk_eta_tables(s["runs"], std)


def _weight_panels(axes, history, gamma):
    for ax, (eta, h) in zip(axes, history.groupby("eta", sort=False)):
        plots.plot_hmk_weights(h.reset_index(drop=True), ax=ax, title=rf"weights $w_c$, $\gamma$ = {gamma}, $\eta$ = {eta:g}")
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
        ax.set_ylim(0, 1.15)


def hmk_eta_draw(d):
    history, widest = d["history"], d["component_margin_std"]["std"].max()
    etas = list(dict.fromkeys(history["eta"]))
    fig, axes = plt.subplots(1, len(etas) + 1, figsize=(19, 3.6))
    _weight_panels(axes, history, 0.5)
    ax = axes[-1]
    for style, (eta, h) in zip(("-", "--", ":"), history.groupby("eta", sort=False)):
        ax.plot(h["step"], h["margin_std"], color="k", ls=style, label=rf"HMK, $\eta$ = {eta:g}")
    ax.axhline(2 * widest, color="C3", lw=1.5, label="2 x widest component")
    ax.axhline(widest, color="C3", lw=0.8, alpha=0.6, label="widest component (maha)")
    ax.set(xlabel="step", ylabel=r"std of $m$ over pairs", title=r"margin scale, $\gamma$ = 0.5", ylim=(0, 2.2 * widest))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def hmk_strong_tables(strong):
    """hmk_strong_draw's input: the histories of the runs {eta: (kernel, history)}."""
    return {"history": hmk_histories(strong)}


def hmk_strong_data(ctx):
    return hmk_strong_tables(_nb04(ctx.fast, ctx.seed)["strong"])


def hmk_strong_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    _weight_panels(axes, d["history"], 10)
    return fig


def accuracy_summary_data(ctx):
    s = _nb04(ctx.fast, ctx.seed)
    every = dict(s["single"])
    every.update({f"hmk trained, eta={eta}": hmk for eta, (hmk, _) in s["runs"].items()})
    every.update({f"hmk, gamma=10, eta={eta}": hmk for eta, (hmk, _) in s["strong"].items()})
    return accuracy_tables(_accuracies(s, every))


def accuracy_summary_draw(d):
    return _accuracy_bars(d["accuracy"], "held-out ranking accuracy", size=(11, 3.8))


# ---- the README's toy-batch grid (kdpo demo, quickstart.math_demo) ---------------------------------

def pair_grid_data(ctx):
    return {"grid": selection.pair_grid(selection.toy_batch())}


def pair_grid_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
    plots.plot_pair_grid(d["grid"], "loss", ax=axes[0], title="mean loss on a toy batch")
    plots.plot_pair_grid(d["grid"], "grad_weight", ax=axes[1], title=r"mean |d loss / d $\rho_w$|", fmt=".3f")
    return fig


# ---- 08: scaling to 7B (closed forms, a LoRA batch, bf16 round-off, memory) -------------------------

GIB = 2**30


def param_counts_tables(counts, P):
    """param_counts_draw's input: the trainable parameters per recipe (the index) of a model of P parameters."""
    return {"counts": counts.rename_axis("recipe").reset_index(), "_P": P}


def param_counts_data(ctx):
    from kdpo_lab import models
    cfg7 = models.llama_7b_config()
    P, ranks = models.param_count(cfg7), (4, 8, 16, 64)
    counts = pd.DataFrame({"trainable parameters": [P] + [models.lora_param_count(cfg7, r) for r in ranks]},
                          index=["full fine-tuning"] + [f"LoRA r={r}" for r in ranks])
    counts["% of the model"] = 100 * counts["trainable parameters"] / P
    return param_counts_tables(counts, P)


def param_counts_draw(d):
    """Notebook 08's parameter counts (no plots.* function: a pandas bar chart on a log axis)."""
    counts = d["counts"].set_index("recipe")
    ax = counts["trainable parameters"].plot.bar(logy=True, rot=0, figsize=(7, 3.2), color=["C3"] + ["C0"] * (len(counts) - 1))
    ax.set(title=f"Llama-2-7B: {d['_P']:,} parameters; what each recipe trains", ylabel="trainable parameters (log)")
    return ax.figure


def _tokenizer_08():
    from kdpo_lab import data as kdata
    from kdpo_lab import models
    return models.build_tokenizer(kdata.sft_texts(kdata.load_pairs(kdata.SUITE_DIR, split="train", limit=400)[0]), vocab_size=512)


def lora_drift_tables(drift):
    """lora_drift_draw's input: the drifts {label: one value per DPO step, from step 1}."""
    steps = len(next(iter(drift.values())))
    return {"drift": wide(np.arange(1, steps + 1), drift, "step")}


def lora_drift_data(ctx):
    from kdpo_lab import data as kdata
    from kdpo_lab import models
    pairs, _ = kdata.load_pairs(kdata.SUITE_DIR, split="train", limit=8)
    tokenizer = _tokenizer_08()
    batch = kdata.collate(kdata.encode_pairs(pairs, tokenizer, max_length=96), tokenizer.pad_token_id)
    base = models.build_model(models.tiny_config("llama", tokenizer=tokenizer, d_model=64, n_layers=2, n_heads=2), seed=ctx.seed)
    with torch.no_grad():
        base_logps = models.sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["response_mask"])["logps"]
    model = models.apply_lora(base, models.LoraSettings(r=4, alpha=8))
    history = models.dpo_on_batch(model, batch, steps=15, lr=1e-2, beta=0.1)
    drift = {"max |log pi - log pi_base|": [(h["policy"] - base_logps).abs().max().item() for h in history],
             "max |log pi_ref - log pi_base|": [(h["reference"] - base_logps).abs().max().item() for h in history]}
    return lora_drift_tables(drift)


def lora_drift_draw(d):
    ax = plots.plot_lines(*_curves(d["drift"], "step"), xlabel="DPO step", ylabel="nats", title="policy moves, reference stays the base")
    return ax.figure


def bf16_error_tables(lengths, errors):
    """bf16_error_draw's input: the errors {label: one value per length} over the response lengths."""
    return {"errors": wide(lengths, errors, "tokens")}


def bf16_error_data(ctx):
    from kdpo_lab import models
    lengths, reps = [1, 4, 16, 64, 256] + ([] if ctx.fast else [1024]), 3 if ctx.fast else 8
    errors = models.logp_rounding_error(lengths, vocab_size=32000, reps=reps, seed=ctx.seed)
    return bf16_error_tables(lengths, errors)


def bf16_error_draw(d):
    ax = plots.plot_lines(*_curves(d["errors"], "tokens"), xlabel="response tokens T", ylabel=r"|error of $\log\pi(y|x)$| (nats)",
                          title="summed log-probs from bf16 logits, V = 32000")
    ax.set(xscale="log", yscale="log")
    return ax.figure


def memory_tables(memory, lengths, curves):
    """memory_draw's input: the memory (GiB) by part (columns) per scenario (the index), and the totals
    {label: GiB per length} over the sequence lengths."""
    return {"breakdown_gib": memory.rename_axis("scenario").reset_index(), "total_by_length_gib": wide(lengths, curves, "seq_len")}


def memory_data(ctx):
    from kdpo_lab import models
    cfg7 = models.llama_7b_config()
    names = {"weights": "weights", "reference": "reference copy", "grads": "grads", "optimizer": "AdamW states",
             "activations": "activations", "lora_inputs": "LoRA fp32 inputs"}

    def scenario(dtype, lora_rank, gc, batch=8, seq_len=1024):
        est = models.memory_estimate(cfg7, dtype=dtype, lora_rank=lora_rank, batch=batch, seq_len=seq_len, gradient_checkpointing=gc)
        return {label: est[key] / GIB for key, label in names.items()}

    scenarios = {f"{'LoRA r=16' if r else 'full'}, {dt}{', ckpt' if gc else ''}": (dt, r, gc)
                 for dt, r in (("fp32", None), ("bf16", None), ("bf16", 16)) for gc in (False, True)}
    memory = pd.DataFrame({name: scenario(*args) for name, args in scenarios.items()}).T
    lengths = [256, 512, 1024, 2048, 4096]
    curves = {f"LoRA bf16, {pairs} pair{'s' if pairs > 1 else ''}{', ckpt' if gc else ''}":
              [models.memory_estimate(cfg7, "bf16", lora_rank=16, batch=2 * pairs, seq_len=s, gradient_checkpointing=gc)["total"] / GIB
               for s in lengths] for pairs in (1, 4) for gc in (False, True)}
    return memory_tables(memory, lengths, curves)


def memory_draw(d):
    fig, axes = plt.subplots(1, 2, figsize=(16, 4.2))
    plots.plot_memory_breakdown(d["breakdown_gib"].set_index("scenario"), ax=axes[0],
                                budgets={"24 GB": 24e9 / GIB, "A100/H100 80 GB": 80e9 / GIB},
                                title="Llama-2-7B, 4 pairs x 1024 tokens per GPU")
    plots.plot_lines(*_curves(d["total_by_length_gib"], "seq_len"), ax=axes[1], xlabel="sequence length (tokens)", ylabel="GiB",
                     title="LoRA bf16: total against sequence length")
    axes[1].axhline(80e9 / GIB, color="grey", ls="--", lw=1)
    axes[1].set_xscale("log", base=2)
    return fig


# ---- 09: how many eigenvalues an alpha needs ---------------------------------------------------------

def alpha_reliability_tables(experiment):
    """alpha_reliability_draw's input: spectra_reliability.reliability_experiment's table."""
    return {"experiment": experiment}


def alpha_reliability_data(ctx):
    from kdpo_lab import spectra_reliability
    sizes, n_seeds = ((16, 32, 64, 128, 256, 384), 10) if ctx.fast else ((16, 32, 64, 128, 256, 384, 512), 50)
    return alpha_reliability_tables(spectra_reliability.reliability_experiment(sizes=sizes, n_seeds=n_seeds, alphas=(3.0,), aspects=(1,)))


def alpha_reliability_draw(d):
    return plots.plot_alpha_reliability(d["experiment"]).figure
