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
    """K~(x, y) along the great circle y(theta) = cos(theta) x + sin(theta) v_perp, theta in [0, pi]:
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
    ax.set(xlabel="angle between x and y (degrees)", ylabel=r"$\tilde K(x, y)$", title=title, ylim=(0, 1.02))
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
    ax.set(xlabel="step", title=title)
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
