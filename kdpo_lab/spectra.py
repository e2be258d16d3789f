"""Heavy-tailed self-regularisation (HT-SR; Martin & Mahoney 2021): per-layer power-law exponents of
the transformer blocks' weight matrices, computed by weightwatcher (never re-fitted here).

For a weight matrix W (N x M, N >= M) the empirical spectral density (ESD) is the distribution of the
M eigenvalues lambda_i of X = W^T W (squared singular values of W, unnormalised: weightwatcher's
convention). HT-SR fits the tail of the ESD with a power law

    p(lambda) ~ lambda^(-alpha)         for lambda >= lambda_min (= xmin)

weightwatcher 0.7.7 estimates alpha by maximum likelihood, alpha = 1 + n / sum_i log(lambda_i / xmin)
over the n eigenvalues >= xmin (the Hill estimator; HT-SR papers call it PL_Alpha_Hill, some of them
fixing xmin elsewhere, e.g. at the median eigenvalue), and chooses xmin by minimising the
Kolmogorov-Smirnov distance D between tail and fit (Clauset et al. 2009); below 20 eigenvalues it
uses an (n-1)-bias-corrected variant. Its `alpha` column is our `alpha`, unchanged.
Other per-layer metrics, as weightwatcher defines them (log = log10):
    alpha_weighted    = alpha * log lambda_max
    log_norm          = log sum_i lambda_i            (log of ||W||_F^2)
    log_spectral_norm = log lambda_max                (log of ||W||_2^2)
    stable_rank       = sum_i lambda_i / lambda_max

Bands (paper notes, section 7; the same edges as weightwatcher's warnings):
    alpha < 2  over-fit risk  |  2 <= alpha < 4  well trained  |  4 <= alpha <= 6  weakly trained  |
    alpha > 6  under-trained (a random matrix's ESD is Marchenko-Pastur: large fitted alpha).

Device: with CUDA available weightwatcher casts weights to fp16 before its (GPU) SVD, so alphas
can differ slightly between a CPU and a GPU machine; compare runs analysed on the same kind.

Small matrices: see MIN_RELIABLE_EVALS. Layers with fewer eigenvalues are marked reliable=False,
reported separately by `summarize` and drawn hollow/grey by the plots.

Runs: `analyse_runs` (the `kdpo spectra RUN_DIR...` command) tables every run, compares it with a
reference run, relates mean alpha to the generalisation gap, and writes CSVs and figures; `findings`
answers the two questions of notebook 09 in words, with their caveats, from its summary.
"""
import contextlib
import copy
import io
import logging
import math
import os
import warnings

import numpy as np
import pandas as pd
import torch

MIN_RELIABLE_EVALS = 384
"""Fewest eigenvalues (min(N, M) of W) for which weightwatcher's alpha means something.

Found with `reliability_experiment(n_seeds=200)` and `reliability_experiment(sizes=(288, 320, 352),
n_seeds=200)` (about 10 CPU-minutes together; run them to reproduce). Two ensembles bracket a real
layer: (a) Gaussian W, whose ESD is Marchenko-Pastur (no power-law tail at all): the null case;
(b) a planted pure power law, W = U diag(sqrt(lambda)) V^T with Haar U, V and lambda_i iid
Pareto(alpha_true): the best case for the estimator. Criteria: noise must rarely look "well trained"
(fewer than 5% of Gaussian matrices fitted into 2 <= alpha < 4, for aspect ratios Q = N/M = 1 and 4),
and a planted tail must be recovered (|alpha - alpha_true| < 0.5 in at least 95% of draws,
alpha_true = 2.5 and 3.5). Measured (weightwatcher 0.7.7, 200 matrices per cell):

      n    Gaussian in [2, 4): Q=1 / Q=4    planted recovered: 2.5 / 3.5 / 5.0    median alpha, Gaussian Q=1
     16        63% / 92%                         67% / 46% / 32%                       2.1
     32        65% / 40%                         77% / 52% / 42%                       3.2
     64        46% / 17%                         91% / 75% / 52%                       4.1
    128        23% /  3%                         98% / 89% / 66%                       5.4
    192        12% /  2%                        100% / 92% / 78%                       5.9
    256       7.5% /  0%                         98% / 97% / 85%                       6.8
    288       3.5% /  0%                        100% / 96% / 89%                       7.4
    320       5.0% /  0%                        100% / 97% / 86%                       6.9
    352       2.0% /  0%                        100% / 95% / 95%                       7.5
    384       3.0% /  0%                        100% / 98% / 95%                       7.5
    512       0.5% /  0%                        100% / 100% / 92%                      8.8

Both criteria hold from 352 on; 288-320 is the transition (a 5% rate has a standard error of 1.5%
over 200 draws) and 256 fails. We take 384, the first size with a clear margin. Below it, noise is
read as a trained layer too often; at 32 or fewer eigenvalues a noise matrix is fitted at alpha
near 2 to 3. Square matrices are the hard case (MLP matrices with Q = 4 pass from 128). Even above
the threshold alpha_true = 5 is recovered within 0.5 in only ~90-95% of draws, so the 4-6 versus
> 6 distinction stays soft.
"""

BANDS = ("<2", "2-4", "4-6", ">6")
BAND_MEANING = {"<2": "over-fit risk", "2-4": "well trained", "4-6": "weakly trained", ">6": "under-trained"}
KINDS = ("attn", "mlp", "other")
LORA_MODES = ("merge", "base")

_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "fc", "dense", "experts")
_TABLE_COLUMNS = ["name", "block", "kind", "module", "N", "M", "n_evals", "alpha", "alpha_weighted",
                  "log_norm", "log_spectral_norm", "stable_rank", "D", "xmin", "n_tail", "ww_warning",
                  "reliable"]
_WW_COLUMNS = {"alpha": "alpha", "alpha_weighted": "alpha_weighted", "log_norm": "log_norm",
               "log_spectral_norm": "log_spectral_norm", "stable_rank": "stable_rank", "D": "D",
               "xmin": "xmin", "num_pl_spikes": "n_tail", "warning": "ww_warning", "num_evals": "n_evals"}


class SmallMatrixWarning(UserWarning):
    """Some layers have too few eigenvalues for a meaningful power-law fit."""


# ---- weightwatcher, quietly ---------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """Swallow weightwatcher's prints ("SMALL N PL FIT", SVD back-end notes), its log records and
    numpy/pandas warnings raised inside it; restore the root logger, which it configures on import."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ww_logger = logging.getLogger("weightwatcher")
    ww_level = ww_logger.level
    ww_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        ww_logger.setLevel(ww_level)


def _ww():
    """Import weightwatcher without its side effects: it prints on import, calls
    logging.basicConfig(level=INFO) and installs a global warnings "ignore" filter (which would also
    hide our SmallMatrixWarning). `_quiet` undoes all three."""
    with _quiet():
        import weightwatcher
    return weightwatcher


@contextlib.contextmanager
def _blas_threads(n_max):
    """One BLAS/torch thread while analysing small matrices (n_max <= 1024 eigenvalues): their SVDs are
    several times faster single-threaded on a shared CPU; large matrices keep every thread."""
    if n_max > 1024:
        yield
        return
    _ww()  # load scipy's BLAS first: threadpool_limits only reaches libraries already loaded
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn, a weightwatcher dependency
    except ImportError:  # pragma: no cover
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=1)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(torch_threads)


def _analyze(model, layer_ids, min_evals=None):
    """weightwatcher's analyze() on the modules at these positions of model.named_modules()
    (weightwatcher numbers layers that way, from 0). Returns its details DataFrame indexed by id."""
    ww = _ww()
    kwargs = dict(layers=list(layer_ids), plot=False, savefig=False, randomize=False, mp_fit=False)
    if min_evals is not None:
        kwargs["min_evals"] = min_evals
    modules = dict(enumerate(m for _, m in model.named_modules()))
    n_max = max((min(modules[i].weight.shape) for i in kwargs["layers"] if hasattr(modules[i], "weight")), default=0)
    with _quiet(), _blas_threads(n_max):
        details = ww.WeightWatcher(model=model).analyze(**kwargs)
    if len(details) == 0:
        return pd.DataFrame(columns=["layer_id"]).set_index("layer_id")
    return details.set_index("layer_id")


# ---- which layers -------------------------------------------------------------------------------

def _is_linear(module):
    """torch Linear or GPT-2's Conv1D (a linear map stored transposed)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _kind(rest):
    """attn / mlp / other from the module path inside its block, e.g. 'self_attn.q_proj', 'mlp.c_fc'."""
    parts = rest.lower().split(".")
    if any(w in p for p in parts for w in _ATTN_WORDS):
        return "attn"
    if any(w in p for p in parts for w in _MLP_WORDS):
        return "mlp"
    return "other"


def block_linear_layers(model):
    """The linear layers inside the transformer blocks, in model order.

    A block is an element of the outermost torch ModuleList whose children hold linear layers
    (`model.layers` for Llama, `transformer.h` for GPT-2). Embeddings and the output layer sit
    outside the blocks and are excluded. Returns a DataFrame with columns name (dotted module
    path), block, kind (attn / mlp / other), module (last path part) and ww_id (the position in
    model.named_modules(), which is weightwatcher's layer id)."""
    modules = list(model.named_modules())
    lists = sorted((n for n, m in modules if isinstance(m, torch.nn.ModuleList)), key=len)
    rows = []
    for ww_id, (name, module) in enumerate(modules):
        if not _is_linear(module):
            continue
        for L in lists:  # outermost first
            prefix = f"{L}." if L else ""
            head, _, rest = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
            if head.isdigit() and rest:
                rows.append(dict(name=name, block=int(head), kind=_kind(rest), module=name.split(".")[-1],
                                 ww_id=ww_id))
                break
    if not rows:
        raise ValueError(f"no linear layers inside transformer blocks (a ModuleList of blocks) found in "
                         f"{type(model).__name__}")
    return pd.DataFrame(rows)


# ---- models and paths ---------------------------------------------------------------------------

def _model_dir(path):
    """A saved model or adapter folder; a run folder (OUT/) resolves to its OUT/model."""
    for candidate in (path, os.path.join(path, "model")):
        for marker in ("adapter_config.json", "config.json"):
            if os.path.isfile(os.path.join(candidate, marker)):
                return candidate, marker
    raise ValueError(f"{path!r} holds neither a model (config.json) nor a LoRA adapter "
                     f"(adapter_config.json), nor a run folder with model/ inside")


def resolve_model(model_or_path, lora="merge"):
    """A plain torch model whose linear layers hold the weights to analyse.

    model_or_path: a transformers model, a peft model, or a local folder (a saved model, a saved
        LoRA adapter whose base model is reachable locally, or a run folder with model/ inside).
    lora: "merge" analyses W + (lora_alpha / r) B A (peft merge_and_unload, on a copy: the argument
        is left untouched); "base" analyses the base weights W with the adapters removed (the
        reference of a LoRA run). Plain models are returned as they are.
    """
    if lora not in LORA_MODES:
        raise ValueError(f"lora must be one of {LORA_MODES}, got {lora!r}")
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        folder, marker = _model_dir(os.fspath(model_or_path))
        if marker == "adapter_config.json":
            from peft import AutoPeftModelForCausalLM
            model = AutoPeftModelForCausalLM.from_pretrained(folder)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"expected a torch model or a path, got {type(model_or_path).__name__}")
    from kdpo_lab.models import is_peft
    if is_peft(model):
        model = copy.deepcopy(model)
        model = model.merge_and_unload() if lora == "merge" else model.unload()
    elif any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise ValueError("model holds peft adapter layers but is not a peft.PeftModel; wrap it with "
                         "peft (get_peft_model / PeftModel.from_pretrained) or merge the adapters first")
    return model


# ---- the per-layer table ------------------------------------------------------------------------

def layer_table(model_or_path, *, min_evals=MIN_RELIABLE_EVALS, include=("attn", "mlp", "other"),
                layers=None, lora="merge", warn=True):
    """One row per linear layer of the transformer blocks, with weightwatcher's metrics.

    Columns: name, block, kind, module, N, M (N >= M: weightwatcher's convention), n_evals (= M, the
    eigenvalues of W^T W), alpha, alpha_weighted, log_norm, log_spectral_norm, stable_rank, D (KS
    distance of the fit), xmin, n_tail (eigenvalues >= xmin), ww_warning ("over-trained" for alpha < 2,
    "under-trained" for alpha > 6, "fit failed", else ""), reliable (n_evals >= min_evals and the fit succeeded).
    Layers weightwatcher skips (fewer than its own floor of 8 eigenvalues) keep a row with NaN metrics;
    a failed fit (weightwatcher writes -1) has NaN fit columns (alpha, alpha_weighted, D, xmin, n_tail).

    min_evals: reliability threshold (default MIN_RELIABLE_EVALS; see its docstring for the evidence).
    include: kinds to keep, a subset of ("attn", "mlp", "other").
    layers: optional list of layer names (dotted paths) to restrict to.
    lora: see `resolve_model`.
    warn: emit one SmallMatrixWarning when some layers are unreliable.
    """
    bad = set(include) - set(KINDS)
    if bad or not include:
        raise ValueError(f"include must be a non-empty subset of {KINDS}, got {include!r}")
    if min_evals < 1:
        raise ValueError(f"min_evals must be >= 1, got {min_evals}")
    model = resolve_model(model_or_path, lora=lora)
    rows = block_linear_layers(model)
    rows = rows[rows["kind"].isin(include)]
    if layers is not None:
        unknown = sorted(set(layers) - set(rows["name"]))
        if unknown:
            raise ValueError(f"unknown block layers {unknown}; see block_linear_layers(model)")
        rows = rows[rows["name"].isin(layers)]
    if rows.empty:
        raise ValueError(f"no block linear layers of kinds {include}")
    details = _analyze(model, rows["ww_id"])
    table = rows.reset_index(drop=True)
    dims = [_dims(model.get_submodule(n)) for n in table["name"]]
    table["N"] = [d[0] for d in dims]
    table["M"] = [d[1] for d in dims]
    if "N" in details and not (table["ww_id"].map(details["N"]).fillna(table["N"]) == table["N"]).all():
        raise RuntimeError("weightwatcher's layer ids do not match model.named_modules() positions")
    for src, dst in _WW_COLUMNS.items():
        column = details[src] if src in details else pd.Series(dtype=float)
        table[dst] = table["ww_id"].map(column)
    table["n_evals"] = table["n_evals"].fillna(table["M"]).astype(int)
    fitted = table["ww_id"].map(details["status"] if "status" in details else pd.Series(dtype=str)).eq("success")
    fit_columns = ["alpha", "alpha_weighted", "D", "xmin", "n_tail"]
    table[fit_columns] = table[fit_columns].astype(float).where(fitted)  # weightwatcher's -1 = "failed"
    table["ww_warning"] = table["ww_warning"].fillna("").astype(str).where(fitted, "fit failed")
    table["reliable"] = (table["n_evals"] >= min_evals) & fitted
    table = table[_TABLE_COLUMNS]
    if warn:
        _warn_unreliable(table, min_evals)
    return table


def _dims(module):
    shape = tuple(module.weight.shape)
    return max(shape), min(shape)


def _warn_unreliable(table, min_evals):
    small = int((table["n_evals"] < min_evals).sum())
    failed = int((~table["reliable"]).sum()) - small
    if small == 0 and failed == 0:
        return
    parts = []
    if small:
        sizes = sorted(set(table.loc[table["n_evals"] < min_evals, "n_evals"]))
        parts.append(f"{small} of {len(table)} layers have fewer than {min_evals} eigenvalues "
                     f"(min(N, M) = {', '.join(map(str, sizes))}); below that size a power-law alpha is "
                     f"not distinguishable from noise (see kdpo_lab.spectra.MIN_RELIABLE_EVALS)")
    if failed:
        parts.append(f"{failed} power-law fits failed or were skipped by weightwatcher")
    warnings.warn("; ".join(parts) + ". They are marked reliable=False and left out of summaries.",
                  SmallMatrixWarning, stacklevel=3)


def layer_esd(model_or_path, name, lora="merge"):
    """Sorted eigenvalues lambda_i of W^T W for one block layer (float64; the histogram of
    `plots.plot_esd`; weightwatcher's ESD is the same set: squared singular values of W)."""
    model = resolve_model(model_or_path, lora=lora)
    names = set(block_linear_layers(model)["name"])
    if name not in names:
        raise ValueError(f"{name!r} is not a linear layer of the transformer blocks")
    W = model.get_submodule(name).weight.detach().to("cpu", torch.float64)
    return np.sort(torch.linalg.svdvals(W).numpy() ** 2)


# ---- bands, comparisons, summaries --------------------------------------------------------------

def band_of(alpha):
    """Band label of each alpha ("<2", "2-4", "4-6", ">6"; "" for NaN). Works on scalars and arrays."""
    a = np.asarray(alpha, dtype=float)
    out = np.select([a < 2, a < 4, a <= 6, a > 6], list(BANDS), default="")
    return out.item() if out.ndim == 0 else out


def bands(table):
    """Fractions and counts of the reliable layers in each band.

    Returns {"<2": f, "2-4": f, "4-6": f, ">6": f, "2-6": f, "n <2": k, ..., "n_reliable": n,
    "n_layers": L}; the four fractions sum to 1 (all NaN when no layer is reliable). "2-6" is the
    healthy range of paper notes section 7 (= "2-4" + "4-6")."""
    alpha = table.loc[table["reliable"], "alpha"].to_numpy(dtype=float)
    labels = band_of(alpha) if len(alpha) else np.array([], dtype=str)
    out = {}
    for b in BANDS:
        k = int((labels == b).sum())
        out[b] = k / len(alpha) if len(alpha) else math.nan
        out[f"n {b}"] = k
    out["2-6"] = out["2-4"] + out["4-6"]
    out["n_reliable"] = len(alpha)
    out["n_layers"] = len(table)
    return out


def compare(tables, baseline):
    """Per-layer change of alpha against a baseline run (the base or SFT reference).

    tables: {run name: layer_table}. Returns one row per (run != baseline, layer): run, name, block,
    kind, module, alpha_baseline, alpha, delta_alpha = alpha - alpha_baseline, band_baseline, band,
    reliable (both fits reliable; treat other rows' deltas as noise)."""
    if baseline not in tables:
        raise ValueError(f"baseline {baseline!r} is not among the runs {list(tables)}")
    base = tables[baseline].set_index("name")
    out = []
    for run, table in tables.items():
        if run == baseline:
            continue
        t = table.set_index("name")
        if set(t.index) != set(base.index):
            raise ValueError(f"run {run!r} and baseline {baseline!r} have different layers; compare "
                             f"tables of the same architecture")
        b = base.loc[t.index]
        out.append(pd.DataFrame({
            "run": run, "name": t.index, "block": t["block"].to_numpy(), "kind": t["kind"].to_numpy(),
            "module": t["module"].to_numpy(), "alpha_baseline": b["alpha"].to_numpy(),
            "alpha": t["alpha"].to_numpy(), "delta_alpha": (t["alpha"] - b["alpha"]).to_numpy(),
            "band_baseline": band_of(b["alpha"].to_numpy()), "band": band_of(t["alpha"].to_numpy()),
            "reliable": (t["reliable"] & b["reliable"]).to_numpy()}))
    if not out:
        raise ValueError("compare needs at least one run besides the baseline")
    return pd.concat(out, ignore_index=True)


def summarize(tables, gaps=None):
    """One row per run: mean alpha over reliable layers only, band fractions, counts, gap.

    Columns: run, n_layers, n_reliable, mean_alpha, std_alpha, mean_alpha_weighted (reliable layers;
    NaN when none is reliable), the band fractions of `bands`, mean_alpha_small (mean over the
    unreliable layers, kept apart and meant to be shown as such, never as a finding) and gen_gap
    (train minus held-out preference accuracy) when `gaps` {run: gap} is given."""
    if gaps is not None:
        unknown = sorted(set(gaps) - set(tables))
        if unknown:
            raise ValueError(f"gaps for unknown runs {unknown}; runs are {list(tables)}")
    rows = []
    for run, table in tables.items():
        ok = table["reliable"].to_numpy(dtype=bool)
        alpha = table["alpha"].to_numpy(dtype=float)
        small = alpha[~ok & np.isfinite(alpha)]
        row = {"run": run, "n_layers": len(table), "n_reliable": int(ok.sum()),
               "mean_alpha": alpha[ok].mean() if ok.any() else math.nan,
               "std_alpha": alpha[ok].std() if ok.any() else math.nan,
               "mean_alpha_weighted": table.loc[ok, "alpha_weighted"].mean() if ok.any() else math.nan}
        row.update({f"frac {b}": v for b, v in bands(table).items() if not b.startswith("n")})
        row["mean_alpha_small"] = small.mean() if len(small) else math.nan
        if gaps is not None:
            row["gen_gap"] = gaps.get(run, math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def gap_relation(summary):
    """Pearson and Spearman correlation of mean_alpha with gen_gap over runs with both finite
    (runs without a reliable mean alpha are left out). Returns {"n", "pearson", "spearman",
    "p_spearman"}; the correlations are NaN with fewer than 3 runs. p_spearman is two-sided: exact
    (all n! pairings, `spearman_exact_p`) up to 8 runs, scipy's t approximation above."""
    from scipy import stats
    if "gen_gap" not in summary:
        raise ValueError("summary has no gen_gap column: pass gaps= to summarize")
    s = summary[np.isfinite(summary["mean_alpha"]) & np.isfinite(summary["gen_gap"])]
    if len(s) < 3:
        return {"n": len(s), "pearson": math.nan, "spearman": math.nan, "p_spearman": math.nan}
    x, y = s["mean_alpha"].to_numpy(dtype=float), s["gen_gap"].to_numpy(dtype=float)
    rho = stats.spearmanr(x, y)
    return {"n": len(s), "pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(rho.statistic),
            "p_spearman": spearman_exact_p(x, y) if len(s) <= 8 else float(rho.pvalue)}


def spearman_exact_p(x, y):
    """Two-sided exact p-value of Spearman's rho: the fraction of the n! re-pairings of y with x whose
    |rho| >= the observed |rho| (ties get average ranks). With n points the smallest possible value
    is 2 / n! (0.083 for 4 runs, 0.017 for 5): few runs cannot show much."""
    import itertools
    from scipy import stats
    n = len(x)
    if n != len(y) or not 3 <= n <= 8:
        raise ValueError(f"need 3 to 8 paired values for an exact permutation test, got {len(x)} and {len(y)}")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    if norm == 0:
        return math.nan  # a constant variable: rho undefined
    perms = ry[np.array(list(itertools.permutations(range(n))))]
    rho_all = perms @ rx / norm
    observed = abs(rx @ ry / norm)
    return float(np.mean(np.abs(rho_all) >= observed - 1e-12))


# ---- the reliability experiment -----------------------------------------------------------------

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


# ---- runs: `kdpo spectra RUN_DIR...` ------------------------------------------------------------

FIGURES = ("alpha_by_layer.png", "delta_alpha.png", "esd.png", "alpha_vs_gap.png", "alpha_and_gap_by_setting.png")


def run_names(run_dirs):
    """Short unique names of run folders: the folder name ('runs/dpo' -> 'dpo'; a model folder
    'runs/dpo/model' -> 'dpo'); names that collide take their parent folders ('a/dpo', 'b/dpo')."""
    parts = [[p for p in os.path.normpath(os.path.abspath(os.fspath(d))).split(os.sep) if p] for d in run_dirs]
    parts = [p[:-1] if len(p) > 1 and p[-1] == "model" else p for p in parts]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    if len(set(names)) != len(names):
        raise ValueError(f"run folders repeat: {[os.fspath(d) for d in run_dirs]}")
    return names


def read_gap(run_dir):
    """The last held-out evaluation of a training run (OUT/eval.jsonl, written by training.train):
    {"gen_gap": pref/gap = train minus held-out preference accuracy, "train_accuracy",
    "heldout_accuracy", "eval_step"}; NaNs for an SFT run, a bare model folder, or an old eval.jsonl
    without pref/gap. A model folder OUT/model reads OUT/eval.jsonl."""
    path = os.fspath(run_dir)
    out = {"gen_gap": math.nan, "train_accuracy": math.nan, "heldout_accuracy": math.nan, "eval_step": math.nan}
    for folder in (path, os.path.dirname(os.path.normpath(path))):
        file = os.path.join(folder, "eval.jsonl")
        if os.path.isfile(file):
            rows = pd.read_json(file, lines=True)
            if len(rows) and "pref/gap" in rows:
                last = rows.iloc[-1]
                return {"gen_gap": float(last["pref/gap"]), "train_accuracy": float(last["pref/train_accuracy"]),
                        "heldout_accuracy": float(last["pref/accuracy"]), "eval_step": int(last["step"])}
            return out
    return out


def read_settings(run_dir):
    """The two training settings HT-SR comparisons get confounded by, from a run's OUT/config.yaml
    (written by training.train and training.sft): {"lr", "passes"}, passes = pairs seen (max_steps x
    batch_size x grad_accum) / training pairs used. NaNs without a config; passes counts against
    max_train_pairs when the data can no longer be read."""
    from kdpo_lab import training
    path = os.fspath(run_dir)
    for folder in (path, os.path.dirname(os.path.normpath(path))):
        file = os.path.join(folder, "config.yaml")
        if os.path.isfile(file):
            cfg = training.TrainConfig.from_yaml(file)
            try:
                n_pairs = len(training.read_pairs(cfg, "train", cfg.max_train_pairs)[0])
            except (OSError, ValueError):
                n_pairs = cfg.max_train_pairs
            seen = cfg.max_steps * cfg.batch_size * cfg.grad_accum
            return {"lr": float(cfg.lr), "passes": seen / n_pairs if n_pairs else math.nan}
    return {"lr": math.nan, "passes": math.nan}


def esd_layer(table):
    """The layer whose ESD `analyse_runs` draws: the largest reliable layer (most eigenvalues, then
    the larger N; the first in model order on ties), else the largest layer."""
    pool = table[table["reliable"].astype(bool)]
    pool = pool if len(pool) else table
    order = pool.assign(_pos=range(len(pool))).sort_values(["n_evals", "N", "_pos"], ascending=[False, False, True])
    return order["name"].iloc[0]


def analyse_runs(run_dirs, out_dir, baseline=None, *, names=None, min_evals=MIN_RELIABLE_EVALS, lora="merge",
                 verbose=True):
    """HT-SR comparison of runs: the `kdpo spectra RUN_DIR... --out OUT` command.

    run_dirs: training runs (OUT/ with model/ and eval.jsonl), SFT runs, bare model or LoRA adapter
        folders; all of the same architecture for the per-layer comparison.
    baseline: the run the others are compared with (a name from `names`, or one of run_dirs); default
        the first run, typically the SFT reference or base model.
    names: run names (default `run_names(run_dirs)`).
    Writes to out_dir:
        layers.csv       layer_table of every run, long format (column `run` first)
        summary.csv      summarize(tables, gaps) + mean_delta_alpha (reliable layers, vs baseline) +
                         train_accuracy, heldout_accuracy, eval_step (see read_gap) + lr, passes
                         (see read_settings)
        delta_alpha.csv  compare(tables, baseline): per-layer alpha - alpha_baseline (when >= 2 runs)
        alpha_by_layer.png, delta_alpha.png (>= 2 runs), esd.png (layer `esd_layer`, one panel per
        run), alpha_vs_gap.png (when >= 2 runs have a gap), alpha_and_gap_by_setting.png (when >= 2
        runs have a gap and a config.yaml: plots.plot_alpha_and_gap_by_setting)
    Emits one SmallMatrixWarning if any layer is below min_evals eigenvalues (or failed to fit); the
    printed summary gives mean alpha over reliable layers only, and says so when there is none.
    Returns the summary DataFrame.
    """
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("analyse_runs needs at least one run folder")
    names = run_names(run_dirs) if names is None else list(names)
    if len(names) != len(run_dirs) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(run_dirs)} distinct strings, got {names!r}")
    if baseline is None:
        baseline = names[0]
    elif os.fspath(baseline) in run_dirs:
        baseline = names[run_dirs.index(os.fspath(baseline))]
    elif baseline not in names:
        raise ValueError(f"baseline {baseline!r} is neither a run name {names} nor one of the run folders")
    os.makedirs(out_dir, exist_ok=True)

    tables = {}
    for name, path in zip(names, run_dirs):
        tables[name] = layer_table(path, min_evals=min_evals, lora=lora, warn=False)
    layers = pd.concat([t.assign(run=name) for name, t in tables.items()], ignore_index=True)
    layers = layers[["run"] + _TABLE_COLUMNS]
    layers.to_csv(os.path.join(out_dir, "layers.csv"), index=False)
    _warn_runs(layers, min_evals)

    evals = {name: read_gap(path) for name, path in zip(names, run_dirs)}
    summary = summarize(tables, gaps={name: e["gen_gap"] for name, e in evals.items()})
    delta = _deltas(tables, baseline)
    if len(delta):
        delta.to_csv(os.path.join(out_dir, "delta_alpha.csv"), index=False)
    ok = delta[delta["reliable"]] if len(delta) else delta
    mean_delta = ok.groupby("run")["delta_alpha"].mean() if len(ok) else pd.Series(dtype=float)
    summary["mean_delta_alpha"] = summary["run"].map(mean_delta).astype(float)
    for key in ("train_accuracy", "heldout_accuracy", "eval_step"):
        summary[key] = summary["run"].map({name: e[key] for name, e in evals.items()})
    settings = {name: read_settings(path) for name, path in zip(names, run_dirs)}
    for key in ("lr", "passes"):
        summary[key] = summary["run"].map({name: st[key] for name, st in settings.items()})
    summary.insert(1, "baseline", summary["run"] == baseline)
    summary.to_csv(os.path.join(out_dir, "summary.csv"), index=False)

    written = ["layers.csv", "summary.csv"] + (["delta_alpha.csv"] if len(delta) else [])
    written += _figures(tables, dict(zip(names, run_dirs)), summary, delta, out_dir, lora)
    if verbose:
        print(format_summary(summary, layers, baseline, min_evals))
        print(f"wrote {', '.join(written)} to {out_dir}")
    return summary


def _deltas(tables, baseline):
    """compare() of each run with the baseline; runs with other layers are left out (with a note)."""
    parts = []
    for name, table in tables.items():
        if name == baseline:
            continue
        try:
            parts.append(compare({baseline: tables[baseline], name: table}, baseline))
        except ValueError as error:
            print(f"no delta alpha for {name!r}: {error}")
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["run", "name", "delta_alpha", "reliable"])


def _warn_runs(layers, min_evals):
    """One SmallMatrixWarning for all runs: how many layers are below min_evals eigenvalues, their sizes."""
    runs = layers.groupby("run", sort=False)
    small = layers["n_evals"] < min_evals
    failed = int((~layers["reliable"].astype(bool) & ~small).sum())
    if not small.any() and not failed:
        return
    parts = []
    if small.any():
        per_run = {(int((t["n_evals"] < min_evals).sum()), len(t)) for _, t in runs}
        if len(per_run) == 1:
            (k, n), = per_run
            count = f"{k} of {n} layers" + (f" in each of {runs.ngroups} runs" if runs.ngroups > 1 else "")
        else:
            count = f"{int(small.sum())} of {len(layers)} layers over {runs.ngroups} runs"
        sizes = ", ".join(map(str, sorted(set(layers.loc[small, "n_evals"]))))
        parts.append(f"{count} have fewer than {min_evals} eigenvalues (min(N, M) = {sizes}); below that size a "
                     f"power-law alpha is not distinguishable from noise (see kdpo_lab.spectra.MIN_RELIABLE_EVALS)")
    if failed:
        parts.append(f"{failed} power-law fits failed or were skipped by weightwatcher")
    warnings.warn("; ".join(parts) + ". They are marked reliable=False, drawn hollow, and left out of mean alpha "
                  "and the band fractions.", SmallMatrixWarning, stacklevel=3)


def format_summary(summary, layers, baseline, min_evals=MIN_RELIABLE_EVALS):
    """The text `analyse_runs` prints: per run, reliable layers, mean alpha and the fraction in [2, 6]
    over reliable layers only ("-" when there is none: no number from noise), mean delta alpha, gap."""
    fmt = lambda x, spec: "-" if not np.isfinite(x) else format(x, spec)
    rows = []
    for _, r in summary.iterrows():
        rows.append({"run": r["run"] + (" (baseline)" if r["run"] == baseline else ""),
                     "reliable layers": f"{r['n_reliable']} of {r['n_layers']}",
                     "mean alpha": fmt(r["mean_alpha"], ".2f"), "in [2, 6]": fmt(r["frac 2-6"], ".0%"),
                     "< 2": fmt(r["frac <2"], ".0%"), "> 6": fmt(r["frac >6"], ".0%"),
                     "mean d-alpha": fmt(r["mean_delta_alpha"], "+.2f"), "gap": fmt(r["gen_gap"], "+.3f")})
    n_max = int(layers["n_evals"].max())
    lines = [f"HT-SR: weightwatcher alpha of the linear layers in the transformer blocks, {len(summary)} run(s); "
             f"delta against {baseline!r}.",
             f"A layer is reliable with at least {min_evals} eigenvalues (min(N, M) of W); mean alpha, band "
             f"fractions and mean d-alpha use reliable layers only; gap = train - held-out preference accuracy.",
             pd.DataFrame(rows).to_string(index=False)]
    if int(summary["n_reliable"].sum()) == 0:
        lines.append(f"No layer is reliable: the largest matrix here has {n_max} eigenvalues, below {min_evals}. "
                     f"At this size a fitted alpha is not distinguishable from noise, so no mean alpha is "
                     f"reported; the per-layer values in layers.csv are for inspection only.")
    elif not layers["reliable"].astype(bool).all():
        lines.append(f"Layers with fewer than {min_evals} eigenvalues are left out (reliable=False in layers.csv).")
    return "\n".join(lines)


def _figures(tables, paths, summary, delta, out_dir, lora):
    """alpha_by_layer.png, delta_alpha.png, esd.png, alpha_vs_gap.png, alpha_and_gap_by_setting.png (the
    last two need at least two runs with a gap; the last also their config.yaml); returns the names written."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    from kdpo_lab import plots
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(next(iter(tables.values())))), 3.8))
    plots.plot_alpha_by_layer(tables, ax=ax)
    save(fig, "alpha_by_layer.png")
    if len(delta):
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * delta["name"].nunique()), 3.5))
        plots.plot_delta_alpha(delta, ax=ax)
        save(fig, "delta_alpha.png")
    layer = esd_layer(next(iter(tables.values())))
    cols = min(3, len(paths))
    rows = -(-len(paths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    n_layer = int(next(iter(tables.values())).set_index("name").loc[layer, "n_evals"])
    for ax, (name, path) in zip(axes.ravel(), paths.items()):
        if layer in set(tables[name]["name"]):
            with _blas_threads(n_layer):
                plots.plot_esd(path, layer, ax=ax, lora=lora)
            ax.set_title(f"{name}: {ax.get_title()}", fontsize=8)
            ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded labels when lambda spans < a decade
    for ax in axes.ravel()[len(paths):]:
        ax.axis("off")
    save(fig, "esd.png")
    if int(np.isfinite(summary["gen_gap"]).sum()) >= 2:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        plots.plot_alpha_vs_gap(summary[np.isfinite(summary["gen_gap"])], ax=ax)
        save(fig, "alpha_vs_gap.png")
    known = summary[np.isfinite(summary["gen_gap"]) & np.isfinite(summary["lr"]) & np.isfinite(summary["passes"])]
    if len(known) >= 2:  # runs trained by kdpo_lab (config.yaml): the confound check
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
        plots.plot_alpha_and_gap_by_setting(summary, axes=axes)
        save(fig, "alpha_and_gap_by_setting.png")
    return written


def findings(summary, n_eval=None, min_evals=MIN_RELIABLE_EVALS):
    """The paper's two HT-SR questions answered from `analyse_runs`' summary, as markdown bullets,
    every number read from the summary, each with the caveat that limits it:
      1. do the aligned variants keep their layers in the healthy band 2 <= alpha <= 6?
      2. does mean alpha track the generalisation gap (HT-SR: lower alpha, more over-fitting)?
    Only reliable layers count (at least min_evals eigenvalues); with none, both are declared
    unanswerable. n_eval: held-out pairs behind each gap, for its standard error."""
    base = summary.loc[summary["baseline"], "run"].iloc[0] if "baseline" in summary else summary["run"].iloc[0]
    if int(summary["n_reliable"].sum()) == 0:
        return (f"- **No layer of any run has {min_evals} eigenvalues or more**, so neither question can be "
                f"answered here: at this size a fitted alpha is not distinguishable from noise (see the reliability "
                f"plot). Every alpha of this analysis is shown hollow and no mean alpha is reported.")
    pct = lambda x: "-" if not np.isfinite(x) else f"{x:.0%}"
    lines = [f"- Reliable layers (at least {min_evals} eigenvalues): "
             + ", ".join(f"`{r['run']}` {r['n_reliable']} of {r['n_layers']}" for _, r in summary.iterrows()) + "."]
    ref = summary[summary["run"] == base].iloc[0]
    runs = summary[(summary["run"] != base) & (summary["n_reliable"] > 0)]
    lines.append(f"- Reference `{base}`: {pct(ref['frac 2-6'])} of reliable layers in [2, 6], {pct(ref['frac <2'])} "
                 f"below 2, {pct(ref['frac >6'])} above 6 (mean alpha {ref['mean_alpha']:.2f}).")
    for _, r in runs.iterrows():
        lines.append(f"- `{r['run']}`: {pct(r['frac 2-6'])} in [2, 6], {pct(r['frac <2'])} below 2, "
                     f"{pct(r['frac >6'])} above 6; mean alpha {r['mean_alpha']:.2f}, mean change "
                     f"{r['mean_delta_alpha']:+.2f} against the reference.")
    if len(runs):
        below, above = runs[runs["frac <2"] > 0], runs[runs["frac >6"] > 0]
        if below.empty and above.empty:
            verdict = "every aligned run keeps all its reliable layers in [2, 6]"
        else:
            verdict = ("no aligned run has a reliable layer below 2 (over-fit risk)" if below.empty else
                       f"{len(below)} of {len(runs)} aligned runs have layers below 2 (over-fit risk): "
                       f"{', '.join(below['run'])}")
            if len(above):
                verdict += (f"; {len(above)} of {len(runs)} have layers above 6 (under-trained): "
                            f"{', '.join(above['run'])}")
        lines.append(f"- **Healthy band:** {verdict}.")
        if np.isfinite(ref["frac >6"]) and ref["frac >6"] >= 0.5:
            lines.append("- Caveat: at least half of the reference's layers are above 6, where a random (untrained) "
                         "matrix of this size is fitted; staying out of the over-fit band says little about "
                         "alignment when the weights barely left their initialisation.")
        gapped = runs[np.isfinite(runs["gen_gap"])]
        if len(gapped) >= 2:
            worst = gapped.loc[gapped["gen_gap"].idxmax()]
            others = gapped.drop(index=worst.name)["frac 2-6"]
            rank = ("as many as or more than any other aligned run: being inside the band did not rule out "
                    "over-fitting here" if worst["frac 2-6"] >= others.max() else
                    "fewer than any other aligned run" if worst["frac 2-6"] < others.min() else
                    f"within the other runs' range of {pct(others.min())} to {pct(others.max())}")
            lines.append(f"- **The band and over-fitting:** the run with the largest gap, `{worst['run']}` "
                         f"({worst['gen_gap']:+.3f}), has {pct(worst['frac 2-6'])} of its reliable layers in [2, 6], "
                         f"{rank}.")
        moves = runs["mean_delta_alpha"].abs()
        if moves.notna().any():
            lines.append(f"- The largest mean change of alpha is {moves.max():.2f} (`{runs.loc[moves.idxmax(), 'run']}`). "
                         f"Single layers are noisier than means: even at {min_evals} eigenvalues a planted alpha is "
                         f"recovered within 0.5 in only about 95% of draws (MIN_RELIABLE_EVALS docstring), and a layer's "
                         f"alpha can jump by several units when the fit's tail start (xmin, see n_tail) switches "
                         f"between candidates.")
    rel = gap_relation(summary)
    se = f" Each gap is a difference of two accuracies on {n_eval} pairs: standard error up to " \
         f"{math.sqrt(0.5 / n_eval):.3f}." if n_eval else ""
    if rel["n"] < 3:
        lines.append(f"- **Alpha and the gap:** only {rel['n']} run(s) have both a reliable mean alpha and a gap; "
                     f"a relation needs at least 3 (and means little below about 8).{se}")
    else:
        smallest = 2 / math.factorial(rel["n"]) if rel["n"] <= 8 else math.nan
        sign = ("negative, the direction HT-SR predicts (lower alpha, larger gap)" if rel["spearman"] < 0 else
                "not negative: not the direction HT-SR predicts" if rel["spearman"] > 0 else "zero")
        strength = "significant at 5%" if rel["p_spearman"] < 0.05 else "not significant at 5%"
        lines.append(f"- **Alpha and the gap:** Spearman {rel['spearman']:+.2f} over {rel['n']} runs, {sign}; exact "
                     f"p = {rel['p_spearman']:.2f}, {strength}"
                     + (f" (with {rel['n']} runs even a perfect ranking gives p = {smallest:.2g})" if smallest == smallest
                        else "") + f".{se}")
    return "\n".join(lines)
