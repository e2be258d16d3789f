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

Bands (the reading of Das et al. 2025's HT-SR section; the same edges as weightwatcher's warnings):
    alpha < 2  over-fit risk  |  2 <= alpha < 4  well trained  |  4 <= alpha <= 6  weakly trained  |
    alpha > 6  under-trained (a random matrix's ESD is Marchenko-Pastur: large fitted alpha).

Device: with CUDA available weightwatcher casts weights to fp16 before its (GPU) SVD, so alphas
can differ slightly between a CPU and a GPU machine; compare runs analysed on the same kind.

Small matrices: see MIN_RELIABLE_EVALS. Layers with fewer eigenvalues are marked reliable=False,
reported separately by `summarize` and drawn hollow/grey by the plots.

Runs: `spectra_runs.analyse_runs` (the `kdpo spectra RUN_DIR...` command) compares run folders with
these tables; `spectra_reliability.reliability_experiment` measured MIN_RELIABLE_EVALS.
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

Found with `spectra_reliability.reliability_experiment(n_seeds=200)` and `spectra_reliability.reliability_experiment(sizes=(288, 320, 352),
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


def esd_data(model_or_path, name, lora="merge"):
    """What `plots.plot_esd` draws for one layer: (eigenvalues of W^T W, the layer's layer_table row)."""
    model = resolve_model(model_or_path, lora=lora)
    row = layer_table(model, layers=[name], warn=False).iloc[0]
    return layer_esd(model, name), row


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
    healthy range the paper reads (= "2-4" + "4-6")."""
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
