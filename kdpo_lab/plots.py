"""Figures. Each function draws on a matplotlib Axes (made if not given) and returns it."""
import matplotlib.pyplot as plt
import pandas as pd


def _ax(ax, figsize=(5, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_training_curves(metrics, keys=("loss", "rewards/accuracies"), axes=None):
    """metrics: {run name: DataFrame of metrics.jsonl}. One panel per key, one line per run."""
    if axes is None:
        _, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.3))
    for ax, key in zip(axes, keys):
        for name, df in metrics.items():
            if key in df:
                rows = df.dropna(subset=[key])
                ax.plot(rows["step"], rows[key], label=name)
        ax.set(xlabel="step", title=key)
    axes[0].legend(fontsize=8)
    return axes


def plot_reward_vs_kl(evals, reference_reward=None, ax=None):
    """The DPO paper's frontier: ground-truth reward of samples against KL(pi || pi_ref), per run.

    evals: {run name: DataFrame of eval.jsonl with columns kl, reward/policy, step}; points along
    training are joined in step order, the last one is marked."""
    ax = _ax(ax)
    for name, df in evals.items():
        df = df.dropna(subset=["kl"]).sort_values("step")
        line, = ax.plot(df["kl"], df["reward/policy"], "-o", ms=3, label=name)
        ax.plot(df["kl"].iloc[-1:], df["reward/policy"].iloc[-1:], "o", ms=8, color=line.get_color())
    if reference_reward is not None:
        ax.axhline(reference_reward, color="grey", ls="--", lw=1, label="reference")
    ax.set(xlabel=r"KL$(\pi \,\|\, \pi_{ref})$ (nats, sampled)", ylabel="ground-truth reward", title="reward vs KL")
    ax.legend(fontsize=8)
    return ax


def plot_by_family(table, prefix="winrate/", ax=None, title="win-rate against the reference"):
    """Grouped bars: rows of `table` are runs, columns starting with `prefix` are families."""
    ax = _ax(ax, (6, 3.5))
    cols = [c for c in table.columns if c.startswith(prefix) and c.count("/") == prefix.count("/")]
    data = table[cols].rename(columns=lambda c: c[len(prefix):])
    data.T.plot.bar(ax=ax, rot=0)
    if prefix.startswith("winrate"):
        ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set(title=title)
    ax.legend(fontsize=8)
    return ax


def plot_pair_grid(table, value, ax=None, title=None, fmt=".2f"):
    """Heatmap of a kernel x divergence table (long format with columns kernel, divergence, value)."""
    import seaborn as sns
    ax = _ax(ax, (7, 3.2))
    grid = pd.pivot_table(table, index="kernel", columns="divergence", values=value, sort=False)
    sns.heatmap(grid, annot=True, fmt=fmt, cmap="viridis", ax=ax, cbar=False)
    ax.set(title=title or value)
    return ax


# ---- kernels (notebooks 02 and 04) ------------------------------------------------------------------

def plot_kernel_profiles(kernels, x, v, ax=None, title=None):
    """K~(x, y) along the great circle y(phi) = cos(phi) x + sin(phi) v_perp, phi in [0, pi]:
    x a direction, v_perp the unit part of v orthogonal to x. kernels: {name: Kernel}, one line each."""
    import numpy as np
    import torch
    ax = _ax(ax)
    x = (x / x.norm()).double()
    v = v.double() - (v.double() @ x) * x
    v = v / v.norm()
    theta = torch.linspace(0, np.pi, 181, dtype=torch.float64)
    y = theta.cos()[:, None] * x + theta.sin()[:, None] * v
    for name, kernel in kernels.items():
        with torch.no_grad():
            ax.plot(np.degrees(theta.numpy()), kernel(x.expand_as(y), y).exp().numpy(), label=name)
    ax.set(xlabel=r"angle $\varphi$ between x and y (degrees)", ylabel=r"$\tilde K(x, y)$", title=title, ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return ax


def plot_gram_matrices(kernels, embeddings, labels=None, axes=None):
    """Heatmaps of the Gram matrices K~(e_i, e_j), one panel per kernel {name: Kernel}, colour 0..1."""
    import torch
    if axes is None:
        cols = min(3, len(kernels))
        rows = -(-len(kernels) // cols)
        _, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
        axes = axes.ravel()
    for ax, (name, kernel) in zip(axes, kernels.items()):
        with torch.no_grad():
            image = ax.imshow(kernel.gram(embeddings).numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name)
        ticks = range(len(embeddings))
        ax.set_xticks(ticks, labels if labels is not None else ticks, rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels if labels is not None else ticks, fontsize=7)
    for ax in list(axes)[len(kernels):]:
        ax.axis("off")
    plt.colorbar(image, ax=list(axes), shrink=0.6, label=r"$\tilde K$")
    return axes


def plot_kernel_margins(margins, pair_labels=None, ax=None, title="kernel margin per pair"):
    """Grouped bars of log K(e_x, e_w) - log K(e_x, e_l): margins {kernel name: [B] tensor}."""
    ax = _ax(ax, (7, 3.5))
    table = pd.DataFrame({name: m.detach().float().numpy() for name, m in margins.items()}, index=pair_labels)
    table.plot.bar(ax=ax, rot=0)
    ax.axhline(0, color="grey", lw=1)
    ax.set(ylabel=r"$\log K(e_x,e_w) - \log K(e_x,e_l)$", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_lines(x, curves, ax=None, xlabel=None, ylabel=None, title=None):
    """One line per entry of curves {label: y values over x}."""
    ax = _ax(ax)
    for label, y in curves.items():
        ax.plot(x, y, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return ax


def plot_hmk_weights(history, ax=None, title=None, keys=("w_rbf", "w_poly", "w_spec", "w_maha")):
    """HMK effective weights w_c = tau_group * a_c over training steps; history: list of HMKKernel.weights()."""
    ax = _ax(ax)
    table = pd.DataFrame(history)
    for key in keys:
        ax.plot(table.index, table[key], label=key)
    ax.set(xlabel="step", ylabel="weight", title=title, ylim=(0, 1))
    ax.legend(fontsize=8)
    return ax


def plot_grouped_bars(table, ax=None, title=None, ylabel=None, chance=None):
    """Bars of a DataFrame: one group per row, one bar per column; optional dashed chance line."""
    ax = _ax(ax, (7, 3.5))
    table.plot.bar(ax=ax, rot=0)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8, ncol=len(table.columns), loc="upper center")
    return ax


# ---- the tabular DPO toy (notebook 01) --------------------------------------------------------------

def plot_distributions(dists, labels=None, ax=None, title=None):
    """Grouped bars of distributions over K responses. dists: {name: [K] probabilities}."""
    import numpy as np
    ax = _ax(ax, (6, 3.2))
    names = list(dists)
    K = len(dists[names[0]])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(K) + (i - (len(names) - 1) / 2) * width, np.asarray(dists[name]), width, label=name)
    ax.set_xticks(np.arange(K), labels if labels is not None else [f"y{k}" for k in range(K)], fontsize=8)
    ax.set(ylabel=r"$\pi(y|x)$", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_loss_and_weight(z, loss, weight, ax=None, title="DPO loss and gradient weight"):
    """ell(z) and the gradient weight -d ell / dz (= sigma(-z) for DPO) against the margin z."""
    ax = _ax(ax)
    z = z.detach()
    ax.plot(z, loss.detach(), label=r"loss $\ell(z) = -\log\sigma(z)$")
    ax.plot(z, weight.detach(), label=r"weight $-\ell'(z) = \sigma(-z)$")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(xlabel=r"margin $z = \beta(\rho_w - \rho_l)$", title=title, ylim=(0, None))
    ax.legend(fontsize=8)
    return ax


def plot_convergence(exact, sampled=None, ax=None, title=r"KL$(\pi_\theta \,\|\, \pi^*)$ during training"):
    """Log-scale curves over steps, one colour per key: exact[key] solid, sampled[key] dashed.

    Values are clipped below at 1e-16 (round-off can make a converged KL a tiny negative number)."""
    import numpy as np
    ax = _ax(ax)
    clip = lambda curve: np.clip(np.asarray(curve, dtype=float), 1e-16, None)
    for key, curve in exact.items():
        line, = ax.semilogy(clip(curve), label=f"{key} (exact loss)")
        if sampled is not None and key in sampled:
            ax.semilogy(clip(sampled[key]), "--", color=line.get_color(), label=f"{key} (sampled pairs)")
    ax.set(xlabel="step", ylabel="KL (nats, log scale)", title=title)
    ax.legend(fontsize=7)
    return ax


def plot_reward_kl_frontier(curve_kl, curve_reward, points=None, ax=None, title="reward-KL frontier"):
    """The closed-form frontier (KL(pi* || pi_ref), E_pi*[r]) over beta, with trained policies as markers.

    points: {name: (kl, reward)}."""
    ax = _ax(ax)
    ax.plot(curve_kl, curve_reward, color="grey", lw=1.5, label=r"closed form $\pi^*_\beta$")
    for name, (kl, reward) in (points or {}).items():
        ax.plot([kl], [reward], "o", ms=7, label=name)
    ax.set(xlabel=r"KL$(\pi \,\|\, \pi_{ref})$ (nats)", ylabel=r"$E_\pi[r]$", title=title)
    ax.legend(fontsize=8)
    return ax


# ---- HT-SR weight spectra (notebook 09) --------------------------------------------------------

_BAND_SHADES = ((0, 2, "#f4cccc"), (2, 4, "#d9ead3"), (4, 6, "#fff2cc"), (6, None, "#eeeeee"))


def _shade_bands(ax, axis="y"):
    """Light background per HT-SR band (alpha < 2, 2-4, 4-6, > 6) with lines at 2, 4, 6."""
    span = ax.axhspan if axis == "y" else ax.axvspan
    line = ax.axhline if axis == "y" else ax.axvline
    for lo, hi, colour in _BAND_SHADES:
        span(lo, hi if hi is not None else 1e3, color=colour, alpha=0.5, lw=0, zorder=0)
    for edge in (2, 4, 6):
        line(edge, color="grey", lw=0.6, ls=":", zorder=0)


def _run_colour(row, position):
    """Colour of a run in the HT-SR plots: C of its row number in analyse_runs' summary (row 0, the
    baseline, is C0), so a run looks the same in every figure; the position when the index is not one."""
    import numpy as np
    return f"C{(row if isinstance(row, (int, np.integer)) else position) % 10}"


def plot_alpha_by_layer(tables, ax=None, title=r"$\alpha_{\mathrm{PL}}$ by layer"):
    """alpha of every block layer, one line per run, layers in model order on the x-axis.

    tables: {run name: spectra.layer_table}. Reliable layers are filled markers; layers below
    spectra.MIN_RELIABLE_EVALS (reliable=False) are hollow, so nobody reads noise as a finding.
    Run i gets colour Ci, as in plot_delta_alpha and plot_alpha_vs_gap (the baseline, first, C0)."""
    ax = _ax(ax, (8, 3.5))
    _shade_bands(ax)
    top = 0
    for i, (run, table) in enumerate(tables.items()):
        x = list(range(len(table)))
        alpha = table["alpha"].to_numpy(dtype=float)
        ok = table["reliable"].to_numpy(dtype=bool)
        colour = _run_colour(i, i)
        ax.plot(x, alpha, "-", lw=1, alpha=0.7, label=run, color=colour)
        ax.plot([i for i in x if ok[i]], alpha[ok], "o", ms=5, color=colour)
        ax.plot([i for i in x if not ok[i]], alpha[~ok], "o", ms=5, mfc="none", color=colour)
        top = max(top, float(max(alpha[alpha == alpha], default=0)))
    first = next(iter(tables.values()))
    _layer_axis(ax, first["block"].to_numpy(), first["module"].to_numpy() if "module" in first else None)
    ax.set(ylabel=r"$\alpha_{\mathrm{PL}}$ (weightwatcher's alpha)", title=title, ylim=(0, max(8, 1.05 * top)))
    if not all(t["reliable"].all() for t in tables.values()):
        ax.plot([], [], "o", mfc="none", color="grey", label="hollow: too few eigenvalues")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside the data
    return ax


def _short_module(module):
    """q_proj -> q, gate_proj -> gate, c_attn -> c_attn: the tick label of one layer."""
    return str(module).removesuffix("_proj")


def _layer_axis(ax, blocks, modules=None):
    """x-axis of a per-layer plot: every layer named by its module (q, k, v, o, gate, up, down) below,
    the blocks named on a secondary axis on top, a faint line between blocks."""
    x = list(range(len(blocks)))
    ax.set_xticks(x, [_short_module(m) for m in modules] if modules is not None else x, rotation=90, fontsize=7)
    starts = [i for i in x if i == 0 or blocks[i] != blocks[i - 1]]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="grey", lw=0.5, zorder=0)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, starts[1:] + [len(x)])],
                   [f"block {blocks[i]}" for i in starts], fontsize=8)
    top.tick_params(length=0)
    ax.set(xlabel="layer (module within each block)", xlim=(-0.5, len(x) - 0.5))


def plot_alpha_and_gap_by_setting(summary, axes=None):
    """The confound check of an HT-SR comparison, from analyse_runs' summary (columns lr, passes):
    left, mean alpha against the learning rate (the size of the updates); right, the generalisation
    gap against passes over the training pairs (repetition). One point per run with a gap, colour C of
    its summary row as in plot_alpha_by_layer; a run without a reliable layer is hollow and grey at
    the mean over its small layers. The dashed line is the baseline's mean alpha."""
    import numpy as np
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    base = summary[summary["baseline"]] if "baseline" in summary else summary.iloc[:1]
    for k, (row, r) in enumerate(summary.iterrows()):
        if not np.isfinite(r["gen_gap"]):
            continue
        reliable = np.isfinite(r["mean_alpha"])
        style = dict(color=_run_colour(row, k)) if reliable else dict(color="grey", mfc="none")
        axes[0].plot([r["lr"]], [r["mean_alpha"] if reliable else r["mean_alpha_small"]], "o", ms=8, label=r["run"],
                     **style)
        axes[1].plot([r["passes"]], [r["gen_gap"]], "o", ms=8, **style)
    if len(base) and np.isfinite(base["mean_alpha"].iloc[0]):
        axes[0].axhline(base["mean_alpha"].iloc[0], color="grey", ls="--", lw=1, label=f"{base['run'].iloc[0]} (baseline)")
    axes[0].set(xscale="log", xlabel="learning rate", ylabel=r"mean $\alpha$ (reliable layers)",
                title=r"$\alpha$ against the size of the updates")
    axes[1].set(xscale="log", xlabel="passes over the training pairs", ylabel="gap (train - held-out accuracy)",
                title="the gap against repetition")
    axes[0].legend(fontsize=7, ncol=2)
    return axes


def plot_esd(lam, row, ax=None):
    """Empirical spectral density of W^T W for one block layer on log-log axes, with the power-law
    tail p(lambda) = (n_tail / n) (alpha - 1) / xmin (lambda / xmin)^(-alpha) for lambda >= xmin.
    lam: the eigenvalues; row: the layer's row of spectra.layer_table (name, alpha, xmin, reliable,
    n_evals), i.e. weightwatcher's fit. `spectra.esd_data(model_or_path, layer_name)` returns both."""
    import numpy as np
    from kdpo_lab import spectra
    ax = _ax(ax)
    layer_name = row["name"]
    lam = lam[lam > 0]
    bins = np.logspace(np.log10(lam.min()), np.log10(lam.max()), min(60, max(10, len(lam) // 8)))
    ax.hist(lam, bins=bins, density=True, color="C0" if row["reliable"] else "grey", alpha=0.6,
            label=f"ESD ({len(lam)} eigenvalues)")
    alpha, xmin = float(row["alpha"]), float(row["xmin"])
    if np.isfinite(alpha) and xmin > 0:
        x = np.logspace(np.log10(xmin), np.log10(lam.max()), 50)
        frac = np.mean(lam >= xmin)
        ax.plot(x, frac * (alpha - 1) / xmin * (x / xmin) ** (-alpha), "r--", lw=2,
                label=rf"power law $\alpha$={alpha:.2f}")
        ax.axvline(xmin, color="red", lw=0.8, label=r"$\lambda_{min}$" + f"={xmin:.3g}")
    ax.set(xscale="log", yscale="log", xlabel=r"eigenvalue $\lambda$ of $W^T W$", ylabel="density")
    note = "" if row["reliable"] else f"  (unreliable: {row['n_evals']} < {spectra.MIN_RELIABLE_EVALS} eigenvalues)"
    ax.set_title(f"{layer_name}{note}", fontsize=9)
    ax.legend(fontsize=8)
    return ax


def plot_alpha_vs_gap(summary, ax=None, title=r"mean $\alpha$ vs generalisation gap"):
    """Scatter of each run's mean alpha (reliable layers) against its generalisation gap (train minus
    held-out preference accuracy), from spectra.summarize(tables, gaps). Runs with no reliable layer
    are drawn hollow and grey at the mean over their small layers, labelled as such; the title gives
    the Spearman correlation over the reliable runs when there are at least 3. A run's colour is C of
    its row number in the summary (row 0 is the baseline), as in plot_alpha_by_layer."""
    import numpy as np
    from kdpo_lab import spectra
    if "gen_gap" not in summary:
        raise ValueError("summary has no gen_gap column: pass gaps= to spectra.summarize")
    ax = _ax(ax)
    _shade_bands(ax)
    ys = []
    for k, (row, r) in enumerate(summary.iterrows()):
        if np.isfinite(r["mean_alpha"]):
            y, style = r["mean_alpha"], dict(color=_run_colour(row, k))
        elif np.isfinite(r["mean_alpha_small"]):
            y, style = r["mean_alpha_small"], dict(color="grey", mfc="none")
        else:
            continue
        ax.plot([r["gen_gap"]], [y], "o", ms=8, label=r["run"], **style)
        ys.append(y)
    rel = spectra.gap_relation(summary)
    if rel["n"] >= 3:
        title = f"{title}\nSpearman {rel['spearman']:.2f} over {rel['n']} runs"
    if summary["mean_alpha"].isna().any():
        ax.plot([], [], "o", mfc="none", color="grey", label="hollow: no reliable layer")
    if ys:
        ax.legend(fontsize=8, ncol=2)
    ax.set(xlabel="generalisation gap (train - held-out preference accuracy)",
           ylabel=r"mean $\alpha$", title=title, ylim=(0, max([8] + [1.1 * y for y in ys])))
    return ax


def plot_alpha_reliability(table, ax=None, title=r"fitted $\alpha$ vs matrix size"):
    """spectra_reliability.reliability_experiment: median and 5-95% range of the fitted alpha against the number
    of eigenvalues n, per ensemble (Gaussian = no power law; planted = known alpha, dotted), with the
    threshold spectra.MIN_RELIABLE_EVALS as a vertical line."""
    import numpy as np
    from kdpo_lab import spectra
    ax = _ax(ax, (7, 4))
    _shade_bands(ax)
    for i, (label, g) in enumerate(table.groupby("ensemble", sort=False)):
        colour = f"C{i}"
        ax.plot(g["n"], g["median"], "o-", color=colour, label=label, ms=4)
        ax.fill_between(g["n"], g["q05"], g["q95"], color=colour, alpha=0.15)
        if np.isfinite(g["alpha_true"].iloc[0]):
            ax.axhline(g["alpha_true"].iloc[0], color=colour, ls=":", lw=1)
    ax.axvline(spectra.MIN_RELIABLE_EVALS, color="black", ls="--", lw=1,
               label=f"MIN_RELIABLE_EVALS = {spectra.MIN_RELIABLE_EVALS}")
    ax.set(xscale="log", xlabel="eigenvalues n = min(N, M)", ylabel=r"fitted $\alpha$ (5-95%)", title=title,
           ylim=(0, min(20, max(8, float(table["q95"].max()) * 1.05))))
    sizes = sorted(set(table["n"]))
    ax.set_xticks(sizes, [str(n) for n in sizes], fontsize=7, rotation=90)
    ax.minorticks_off()
    ax.legend(fontsize=7, ncol=2)
    return ax


# ---- divergences (notebook 03) -----------------------------------------------------------------

def plot_generators(divs, u, ax=None, title=r"generators $f(u)$, $u = \pi/\pi_{ref}$"):
    """f(u) of each divergence in divs {label: Divergence} (those with a link) over the grid u."""
    import torch
    ax = _ax(ax)
    u = torch.as_tensor(u, dtype=torch.float64)
    for label, div in divs.items():
        ax.plot(u.numpy(), div.generator(u).numpy(), label=label)
    ax.axvline(1, color="grey", lw=0.8)
    ax.set(xlabel=r"$u$", ylabel=r"$f(u)$", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_links(divs, rho, ax=None, slope=False, title=None):
    """Link scores s(rho) = f'(e^rho) - f'(1) of divs {label: Divergence}, or with slope=True their
    derivatives ds/drho = f''(u) u (the per-example gradient weight), on a log y-axis."""
    import torch
    from kdpo_lab.divergences import link_slope
    ax = _ax(ax)
    rho = torch.as_tensor(rho, dtype=torch.float64)
    for label, div in divs.items():
        y = link_slope(div, rho) if slope else div.link(rho)
        ax.plot(rho.numpy(), y.detach().numpy(), label=label)
    if slope:
        ax.set_yscale("log")
        ax.set(ylabel=r"$ds/d\rho = f''(u)\,u$", title=title or r"slope of the link")
    else:
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(ylabel=r"$s(\rho)$", title=title or r"link score $s(\rho) = f'(e^\rho) - f'(1)$")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(xlabel=r"$\rho = \log \pi/\pi_{ref}$")
    ax.legend(fontsize=8)
    return ax


def plot_sinkhorn_error(epsilons, approx, exact, bound=None, ax=None, title="Sinkhorn divergence vs exact W1"):
    """|S_eps - W1| against eps on log-log axes: approx [n_eps, n_pairs] of S_eps, exact [n_pairs] of
    W1 (POT's emd2); one thin line per pair, their mean thick, and the bound [n_eps] (eps max H) dashed."""
    import numpy as np
    ax = _ax(ax)
    err = np.abs(np.asarray(approx) - np.asarray(exact)[None, :])
    ax.loglog(epsilons, err, color="C0", lw=0.6, alpha=0.4)
    ax.loglog(epsilons, err.mean(1), "o-", color="C0", lw=2, label=r"$|S_\varepsilon - W_1|$ (mean)")
    if bound is not None:
        ax.loglog(epsilons, bound, "--", color="C3", label=r"bound $\varepsilon \max(H(a), H(b))$")
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(epsilons), [f"{e:g}" for e in epsilons])
    ax.set(xlabel=r"$\varepsilon$", ylabel="absolute error", title=title)
    ax.legend(fontsize=8)
    return ax


# ---- scaling up (notebook 08) -----------------------------------------------------------------------

def plot_memory_breakdown(table, ax=None, budgets=None, title="training memory", unit="GiB"):
    """Stacked bars: one bar per row of `table` (a scenario), one segment per column (weights, grads, ...),
    values already in `unit`. budgets: {label: size in unit} drawn as dashed lines (e.g. GPU sizes)."""
    ax = _ax(ax, (8, 3.8))
    table.plot.bar(stacked=True, ax=ax, rot=20, width=0.7)
    for label, size in (budgets or {}).items():
        ax.axhline(size, color="grey", ls="--", lw=1)
        ax.annotate(label, (len(table) - 0.5, size), textcoords="offset points", xytext=(-2, 2), ha="right",
                    fontsize=8, color="grey")
    ax.set(ylabel=unit, title=title)
    ax.set_xticks(range(len(table)), table.index, rotation=20, ha="right")
    ax.legend(fontsize=8)
    return ax


def plot_memory_timeline(timeline, step_ends=(), estimate=None, ax=None, title="tensor memory during a run"):
    """Allocated memory (timeline: DataFrame with t_s, allocated_mb, as from evaluation.memory_timeline)
    over time; dotted lines at the optimizer-step ends, a dashed line at an estimate (MB) if given."""
    ax = _ax(ax, (7, 3.5))
    ax.step(timeline["t_s"], timeline["allocated_mb"], where="post", lw=1, label="allocated")
    for i, t in enumerate(step_ends):
        ax.axvline(t, color="grey", ls=":", lw=0.8, label="optimizer step ends" if i == 0 else None)
    if estimate is not None:
        ax.axhline(estimate, color="C3", ls="--", lw=1, label="memory_estimate (one step)")
    ax.set(xlabel="time (s)", ylabel="MB", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_delta_alpha(delta, ax=None, title=r"change of $\alpha_{\mathrm{PL}}$ against the baseline, by layer"):
    """delta_alpha = alpha(run) - alpha(baseline) of every block layer (spectra.compare), one line per
    run, layers in model order. Filled markers: both fits reliable; hollow: at least one layer below
    spectra.MIN_RELIABLE_EVALS, a difference of two noisy numbers. Run i gets colour C(i+1), the
    colour plot_alpha_by_layer gives it when the baseline comes first."""
    import numpy as np
    ax = _ax(ax, (8, 3.5))
    ax.axhline(0, color="grey", lw=0.8)
    first = None
    for i, (run, d) in enumerate(delta.groupby("run", sort=False)):
        first = d if first is None else first
        x = np.arange(len(d))
        y = d["delta_alpha"].to_numpy(dtype=float)
        ok = d["reliable"].to_numpy(dtype=bool)
        colour = _run_colour(i + 1, i + 1)
        ax.plot(x, y, "-", lw=1, alpha=0.7, label=run, color=colour)
        ax.plot(x[ok], y[ok], "o", ms=5, color=colour)
        ax.plot(x[~ok], y[~ok], "o", ms=5, mfc="none", color=colour)
    _layer_axis(ax, first["block"].to_numpy(), first["module"].to_numpy() if "module" in first else None)
    if not delta["reliable"].astype(bool).all():
        ax.plot([], [], "o", mfc="none", color="grey", label="hollow: too few eigenvalues")
    ax.set(ylabel=r"$\Delta\alpha_{\mathrm{PL}}$ against the baseline", title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside the data
    return ax


# ---- choosing the pair and HMK in training (notebooks 06 and 07, `kdpo select`) --------------------

def plot_selection_heatmap(grid, ax=None, title="selection score", marks=None, fmt=".2f"):
    """Heatmap of a 4 x 7 score grid (rows kernels, columns divergences, in the grid's order), every
    cell annotated. marks: {label: (kernel, divergence)}, each outlined in its own colour and named
    in a legend to the right of the axes (never over the cells)."""
    import numpy as np
    ax = _ax(ax, (8, 3.2))
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=np.nanmin(values), vmax=np.nanmax(values))
    middle = (np.nanmin(values) + np.nanmax(values)) / 2
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="k" if v > middle else "w")
    for n, (label, (kernel, divergence)) in enumerate((marks or {}).items()):
        i, j = list(grid.index).index(kernel), list(grid.columns).index(divergence)
        inset = 0.06 * n
        ax.add_patch(plt.Rectangle((j - 0.5 + inset, i - 0.5 + inset), 1 - 2 * inset, 1 - 2 * inset, fill=False,
                                   lw=2.5, ls="-" if n == 0 else "--", edgecolor=f"C{3 + n}", label=label))
    ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(grid.index)), grid.index)
    ax.set(xlabel="divergence", ylabel="kernel", title=title)
    plt.colorbar(image, ax=ax, label="score", pad=0.02)
    if marks:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.25, 1))
    return ax


def plot_intervals(table, ax=None, title=None, xlabel=None, zero=0.0):
    """Horizontal points with interval bars: table indexed by label with columns mean, low, high; a
    vertical line at `zero` (e.g. no difference to plain DPO)."""
    import numpy as np
    ax = _ax(ax, (6.5, 0.55 * len(table) + 1.2))
    y = np.arange(len(table))[::-1]
    mean = table["mean"].to_numpy(dtype=float)
    err = np.vstack([mean - table["low"].to_numpy(dtype=float), table["high"].to_numpy(dtype=float) - mean])
    ax.errorbar(mean, y, xerr=err, fmt="o", color="C0", capsize=4)
    ax.axvline(zero, color="grey", ls="--", lw=1)
    ax.set_yticks(y, table.index)
    ax.set(xlabel=xlabel, title=title)
    return ax


def plot_run_metric(metrics, key, ax=None, ylabel=None, title=None):
    """One line per run of a metrics.jsonl column over steps; metrics {run name: DataFrame}. The legend
    sits to the right of the axes."""
    ax = _ax(ax)
    for name, df in metrics.items():
        rows = df.dropna(subset=[key])
        ax.plot(rows["step"], rows[key], label=name)
    ax.set(xlabel="step", ylabel=ylabel or key, title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return ax


# ---- the paper's claims beside ours (notebook 10) ----------------------------------------------------

def plot_note(text, ax=None, title=None):
    """An empty panel that says why it is empty (e.g. "no finished runs yet"), in place of a figure."""
    ax = _ax(ax, (6.5, 1.6))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.3")
    ax.set(xticks=[], yticks=[], title=title)
    return ax


def plot_score_vs_result(table, ax=None, marks=None, title="selection score vs achieved result",
                         ylabel="held-out exact reward (mean over seeds)"):
    """Scatter of one point per pair: table with columns kernel, divergence, score, value (the achieved
    result). Colour by kernel; marks {label: (kernel, divergence)} ringed and named in a legend to the right."""
    ax = _ax(ax, (6.5, 4))
    for n, (kernel, rows) in enumerate(table.groupby("kernel", sort=False)):
        ax.scatter(rows["score"], rows["value"], s=28, color=f"C{n}", label=kernel)
    for n, (label, (kernel, divergence)) in enumerate((marks or {}).items()):
        row = table[(table["kernel"] == kernel) & (table["divergence"] == divergence)]
        if len(row):
            ax.scatter(row["score"], row["value"], s=160 + 90 * n, facecolors="none", edgecolors=f"C{5 + n}", lw=2,
                       label=f"{label}: {kernel}+{divergence}")
    ax.set(xlabel="selection score (before training)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return ax


def plot_differences(table, ax=None, title="every variant against plain DPO",
                     xlabel="held-out exact reward minus plain DPO's (same seed)"):
    """plot_intervals of a table with columns variant, mean, low, high (n_seeds shown in the title), or a
    note saying the comparison is pending while it is empty."""
    if not len(table):
        return plot_note("no finished seed runs of DPO and another variant yet: pending", ax=ax, title=title)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.3 * len(table) + 1.2))
    return plot_intervals(table.set_index("variant"), ax=ax, xlabel=xlabel,
                          title=f"{title} (95% t interval, up to {int(table['n_seeds'].max())} seeds)")


def plot_family_differences(table, axes=None):
    """One plot_differences panel per task family: table with columns family, variant, mean, low, high, n_seeds."""
    families = list(dict.fromkeys(table["family"]))
    if not families:
        return plot_note("no finished seed runs yet: pending", title="per-family differences to plain DPO")
    if axes is None:
        _, axes = plt.subplots(2, (len(families) + 1) // 2, figsize=(12, 5.5), squeeze=False)
    for ax, family in zip(axes.flat, families):
        plot_differences(table[table["family"] == family], ax=ax, title=family, xlabel="exact reward minus DPO's (same seed)")
    return axes


def plot_selection_check(points, pickers, note="", axes=None):
    """Above, score vs achieved result per pair (plot_score_vs_result, the rows with a `mark` ringed);
    below, the pickers against plain DPO (plot_differences). A note while no pair has a finished run."""
    if not len(points):
        return plot_note("no finished pair runs yet: pending", title="selection score vs achieved result")
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(8.5, 7.5), gridspec_kw={"height_ratios": [1.6, 1]})
    marked = points[points["mark"] != ""]
    plot_score_vs_result(points, ax=axes[0], marks={m: (k, d) for k, d, m in zip(marked["kernel"], marked["divergence"], marked["mark"])},
                         title=f"whole suite: {note}")
    plot_differences(pickers, ax=axes[1], title="three pickers against plain DPO")
    return axes
