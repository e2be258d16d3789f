"""Facts about kdpo_lab.spectra: per-layer HT-SR metrics are weightwatcher's own, every block linear
layer appears once, LoRA is merged, small matrices are flagged, summaries keep noise out.
`analyse_runs` (`kdpo spectra`) tables what layer_table computes and prints no mean alpha from noise.
Models are built from configs (hidden 384 so that some fits are reliable); nothing downloads."""
import copy
import json
import math
import os
import subprocess
import sys
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from kdpo_lab import cli
from kdpo_lab import models as M
from kdpo_lab import plots
from kdpo_lab import spectra as S
from kdpo_lab import spectra_reliability, spectra_runs

METRICS = ["alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "D", "xmin"]
# With CUDA present weightwatcher casts weights to fp16 before its SVD, so its eigenvalues agree with
# our float64 ones (layer_esd) to about 1e-3 only; against itself it stays exact on any machine.
ESD_RTOL = 1e-2 if torch.cuda.is_available() else 1e-4


def llama(seed=0, d=384, d_ff=768, layers=2, kv_heads=4):
    config = M.tiny_config("llama", 300, d_model=d, n_layers=layers, n_heads=4, d_ff=d_ff)
    config.num_key_value_heads = kv_heads  # kv_heads=1: k_proj, v_proj are d x d/4 (grouped-query)
    return M.build_model(config, seed=seed).eval()


def gpt2(seed=0, d=256, layers=2):
    return M.build_model(M.tiny_config("gpt2", 300, d_model=d, n_layers=layers, n_heads=4), seed=seed).eval()


def quiet_table(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.SmallMatrixWarning)
        return S.layer_table(model, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def single_threaded_blas():
    """weightwatcher's SVDs of these small matrices run several times faster on one BLAS thread
    than on a shared, oversubscribed CPU."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    S._ww()  # load scipy's BLAS first: threadpool_limits only reaches libraries already loaded
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def gqa_llama():
    """q/o/gate/up/down have 384 eigenvalues (reliable); k/v are 384 x 96 (96: unreliable)."""
    return llama(kv_heads=1)


@pytest.fixture(scope="module")
def gqa_table(gqa_llama):
    return quiet_table(gqa_llama)


# ---- the table is weightwatcher's --------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_metrics_equal_weightwatchers_own_analysis(arch):
    model = llama() if arch == "llama" else gpt2()
    table = quiet_table(model).set_index("name")
    ww = S._ww()
    with S._quiet():
        details = ww.WeightWatcher(model=model).analyze().set_index("longname")
    peer = details.loc[table.index]
    for column in METRICS:
        np.testing.assert_allclose(table[column].to_numpy(float), peer[column].to_numpy(float), rtol=1e-6,
                                   err_msg=column)
    assert (table["n_evals"] == peer["num_evals"]).all()
    assert (table["ww_warning"] == peer["warning"]).all()
    # weightwatcher itself also reports embeddings and the output layer; the table keeps block layers only
    assert set(details.index) - set(table.index) >= {"lm_head"}


def test_alpha_is_the_hill_estimator_at_weightwatchers_xmin(gqa_llama, gqa_table):
    # alpha = 1 + n / sum log(lambda_i / xmin) over the n eigenvalues >= xmin (continuous power-law MLE)
    row = gqa_table.iloc[0]
    lam = S.layer_esd(gqa_llama, row["name"])
    tail = lam[lam >= row["xmin"] * (1 - 1e-9)]
    assert abs(len(tail) - row["n_tail"]) <= (2 if torch.cuda.is_available() else 0)
    hill = 1 + len(tail) / np.log(tail / tail.min()).sum()
    assert hill == pytest.approx(row["alpha"], rel=ESD_RTOL)


def test_alpha_weighted_is_alpha_times_log_lambda_max(gqa_llama, gqa_table):
    row = gqa_table.iloc[-1]
    lam = S.layer_esd(gqa_llama, row["name"])
    assert row["alpha_weighted"] == pytest.approx(row["alpha"] * np.log10(lam.max()), rel=ESD_RTOL)
    assert row["stable_rank"] == pytest.approx(lam.sum() / lam.max(), rel=ESD_RTOL)


# ---- which layers ------------------------------------------------------------------------------

def test_every_llama_block_linear_layer_appears_exactly_once(gqa_table):
    expected = [f"model.layers.{i}.{p}" for i in range(2) for p in
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]]
    assert list(gqa_table["name"]) == expected
    assert list(gqa_table["kind"]) == (["attn"] * 4 + ["mlp"] * 3) * 2
    assert list(gqa_table["block"]) == [0] * 7 + [1] * 7
    k = gqa_table.set_index("module").loc["k_proj"].iloc[0]
    assert (k["N"], k["M"], k["n_evals"]) == (384, 96, 96)


def test_every_gpt2_conv1d_layer_appears_exactly_once():
    table = quiet_table(gpt2(d=64, layers=3))
    expected = [f"transformer.h.{i}.{p}" for i in range(3)
                for p in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]]
    assert list(table["name"]) == expected
    assert list(table["kind"]) == ["attn", "attn", "mlp", "mlp"] * 3
    assert table.set_index("name").loc["transformer.h.0.attn.c_attn", ["N", "M"]].tolist() == [192, 64]


def test_include_keeps_only_the_chosen_kinds(gqa_llama):
    table = S.layer_table(gqa_llama, include=("mlp",))
    assert set(table["module"]) == {"gate_proj", "up_proj", "down_proj"} and len(table) == 6


# ---- reliability -------------------------------------------------------------------------------

def test_small_layers_are_unreliable_and_warned_about_once(gqa_llama):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = S.layer_table(gqa_llama)
    ours = [w for w in caught if issubclass(w.category, S.SmallMatrixWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert f"4 of 14 layers have fewer than {S.MIN_RELIABLE_EVALS} eigenvalues" in message and "96" in message
    assert list(table.loc[~table["reliable"], "module"]) == ["k_proj", "v_proj"] * 2


def test_no_warning_when_every_layer_is_large_enough(gqa_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.SmallMatrixWarning)
        table = S.layer_table(gqa_llama, include=("mlp",))
    assert table["reliable"].all()


def test_min_evals_moves_the_threshold(gqa_llama):
    table = S.layer_table(gqa_llama, min_evals=64)
    assert table["reliable"].all()


def test_a_failed_fit_is_nan_and_unreliable_not_minus_one():
    model = llama(d=64, d_ff=128, layers=1)
    model.model.layers[0].mlp.up_proj.weight.data.zero_()  # no nonzero eigenvalue to fit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = S.layer_table(model, min_evals=8).set_index("module")
    assert [str(w.message) for w in caught if w.category is S.SmallMatrixWarning] == [
        "1 power-law fits failed or were skipped by weightwatcher. They are marked reliable=False and left "
        "out of summaries."]
    up = table.loc["up_proj"]
    assert math.isnan(up["alpha"]) and not up["reliable"] and up["ww_warning"] == "fit failed"
    assert table.drop(index="up_proj")["reliable"].all()


def test_weightwatcher_import_leaves_no_trace_and_writes_no_images(tmp_path):
    # weightwatcher prints on import, calls logging.basicConfig and installs a global "ignore" filter
    code = (
        "import logging, warnings\n"
        "from kdpo_lab import spectra, models as M\n"
        "m = M.build_model(M.tiny_config('gpt2', 300, d_model=32, n_layers=1, n_heads=2))\n"
        "t = spectra.layer_table(m)\n"
        "print('ROOT', logging.getLogger().handlers)\n"
        "print('IGNORE-ALL', any(f[0] == 'ignore' and f[1] is None and f[2] is Warning for f in warnings.filters))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ROOT []", "IGNORE-ALL False"]
    assert "SmallMatrixWarning" in out.stderr  # our warning is still shown
    assert "SVD" not in out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []  # no ww-img


def test_reliability_experiment_shows_noise_at_small_n_and_recovery_at_large_n():
    table = spectra_reliability.reliability_experiment(sizes=(16, 384), n_seeds=12, alphas=(3.0,), aspects=(1,))
    g = table.set_index(["ensemble", "n"])
    planted, noise = "planted alpha=3", "Gaussian Q=1"
    assert g.loc[(planted, 384), "recovered"] >= 0.9
    assert g.loc[(planted, 384), "q95"] - g.loc[(planted, 384), "q05"] < \
        g.loc[(planted, 16), "q95"] - g.loc[(planted, 16), "q05"]
    # a Gaussian matrix has no power-law tail: at 16 eigenvalues it is still fitted into alpha < 4 ...
    assert g.loc[(noise, 16), "median"] < 4
    # ... at 384 it reads as untrained (alpha > 4), rarely as "well trained"
    assert g.loc[(noise, 384), "median"] > 4 and g.loc[(noise, 384), "frac_2_4"] < 0.2


# ---- LoRA and paths ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_pair():
    """(base model, peft LoRA model on a copy of it with nonzero B on every block linear layer)."""
    from peft import LoraConfig, get_peft_model
    base = llama(d=128, d_ff=256, layers=1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    for name, module in peft_model.named_modules():
        if name.endswith("lora_B.default"):
            module.weight.data = 0.05 * torch.randn(module.weight.shape, generator=g)
    return base, peft_model


def test_lora_model_gives_the_merged_weights_alphas(lora_pair):
    base, peft_model = lora_pair
    merged = copy.deepcopy(base)  # W + (lora_alpha / r) B A, by hand
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            target = merged.get_submodule(name.removeprefix("base_model.model."))
            target.weight.data = target.weight.data + (B @ A) * module.scaling["default"]
    got, want, before = (quiet_table(m) for m in (peft_model, merged, base))
    assert list(got["name"]) == list(want["name"])
    for column in METRICS:
        np.testing.assert_allclose(got[column].to_numpy(float), want[column].to_numpy(float), rtol=1e-6)
    assert not np.allclose(got["alpha"], before["alpha"])  # the adapter changed the spectra
    q = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")  # left untouched:
    assert hasattr(q, "lora_A") and not q.merged  # still adapted, not merged in place
    assert torch.equal(q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_lora_base_mode_analyses_the_reference_weights(lora_pair):
    base, peft_model = lora_pair
    got, want = quiet_table(peft_model, lora="base"), quiet_table(base)
    np.testing.assert_array_equal(got["alpha"].to_numpy(), want["alpha"].to_numpy())


def test_checkpoint_run_folder_and_adapter_paths_load(tmp_path, lora_pair):
    base, peft_model = lora_pair
    base.save_pretrained(tmp_path / "base")
    base.save_pretrained(tmp_path / "run" / "model")
    adapter = copy.deepcopy(peft_model)
    adapter.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    adapter.save_pretrained(tmp_path / "adapter")
    want = quiet_table(base)
    for path in (tmp_path / "base", str(tmp_path / "run")):
        np.testing.assert_allclose(quiet_table(path)["alpha"], want["alpha"], rtol=1e-6)
    np.testing.assert_allclose(quiet_table(tmp_path / "adapter")["alpha"], quiet_table(peft_model)["alpha"],
                               rtol=1e-6)


def test_bad_arguments_raise_value_errors(gqa_llama, tmp_path):
    for kwargs in (dict(include=("conv",)), dict(lora="drop"), dict(layers=["lm_head"]), dict(min_evals=0)):
        with pytest.raises(ValueError):
            S.layer_table(gqa_llama, **kwargs)
    with pytest.raises(ValueError, match="config.json"):
        S.layer_table(tmp_path)
    with pytest.raises(ValueError, match="transformer blocks"):
        S.layer_table(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# ---- bands, comparison, summary ----------------------------------------------------------------

def fake_table(alphas, reliable):
    n = len(alphas)
    return pd.DataFrame({"name": [f"l{i}" for i in range(n)], "block": range(n), "kind": "mlp",
                         "module": "fc", "alpha": alphas, "alpha_weighted": alphas, "reliable": reliable})


def test_band_edges_follow_weightwatchers_warnings():
    assert list(S.band_of([1.99, 2.0, 3.99, 4.0, 6.0, 6.01, math.nan])) == ["<2", "2-4", "2-4", "4-6", "4-6", ">6", ""]


def test_band_fractions_count_reliable_layers_and_sum_to_one(gqa_table):
    b = S.bands(fake_table([1.5, 3, 3, 5, 7, 100], [True] * 5 + [False]))
    assert (b["<2"], b["2-4"], b["4-6"], b[">6"], b["2-6"]) == (0.2, 0.4, 0.2, 0.2, pytest.approx(0.6))
    assert (b["n 2-4"], b["n_reliable"], b["n_layers"]) == (2, 5, 6)
    real = S.bands(gqa_table)
    assert sum(real[k] for k in S.BANDS) == pytest.approx(1.0) and real["n_reliable"] == 10
    assert all(math.isnan(S.bands(fake_table([3.0], [False]))[k]) for k in S.BANDS)


def test_summary_mean_alpha_ignores_unreliable_layers(gqa_table):
    s = S.summarize({"run": fake_table([3.0, 5.0, 40.0], [True, True, False])}, gaps={"run": 0.1}).iloc[0]
    assert (s["mean_alpha"], s["mean_alpha_small"], s["n_reliable"], s["gen_gap"]) == (4.0, 40.0, 2, 0.1)
    real = S.summarize({"gqa": gqa_table}).iloc[0]
    assert real["mean_alpha"] == pytest.approx(gqa_table.loc[gqa_table["reliable"], "alpha"].mean())
    tiny = S.summarize({"tiny": fake_table([3.0], [False])}).iloc[0]
    assert math.isnan(tiny["mean_alpha"]) and tiny["n_reliable"] == 0
    with pytest.raises(ValueError):
        S.summarize({"a": gqa_table}, gaps={"b": 0.0})


def test_compare_gives_per_layer_delta_alpha():
    base, run = fake_table([3.0, 5.0], [True, False]), fake_table([2.5, 7.0], [True, True])
    c = S.compare({"sft": base, "dpo": run}, baseline="sft")
    assert list(c["delta_alpha"]) == [-0.5, 2.0] and list(c["reliable"]) == [True, False]
    assert list(c["band"]) == ["2-4", ">6"] and set(c["run"]) == {"dpo"}
    with pytest.raises(ValueError):
        S.compare({"sft": base, "dpo": fake_table([1.0], [True])}, baseline="sft")
    with pytest.raises(ValueError):
        S.compare({"sft": base}, baseline="ref")


def test_gap_relation_of_monotone_runs_is_one():
    tables = {f"r{i}": fake_table([2.0 + i], [True]) for i in range(4)}
    summary = S.summarize(tables, gaps={f"r{i}": 0.1 * i for i in range(4)})
    rel = S.gap_relation(summary)
    assert rel["n"] == 4 and rel["spearman"] == pytest.approx(1.0) and rel["pearson"] == pytest.approx(1.0)


# ---- plots -------------------------------------------------------------------------------------

def test_plots_draw_and_mark_unreliable_layers(gqa_llama, gqa_table):
    tables = {"a": gqa_table, "b": gqa_table.assign(alpha=gqa_table["alpha"] + 0.5)}
    ax = plots.plot_alpha_by_layer(tables)
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "none" and len(line.get_xdata())]
    assert len(hollow) == 2 and all(len(line.get_xdata()) == 4 for line in hollow)
    ax = plots.plot_esd(*S.esd_data(gqa_llama, "model.layers.0.mlp.up_proj"))
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert any("power law" in t.get_text() for t in ax.get_legend().get_texts())
    summary = S.summarize({**tables, "tiny": fake_table([3.0], [False])}, gaps={"a": 0.1, "b": 0.2, "tiny": 0.3})
    ax = plots.plot_alpha_vs_gap(summary)
    assert len([l for l in ax.get_lines() if len(l.get_xdata()) == 1]) == 3
    experiment = pd.DataFrame({"n": [16, 32] * 2, "ensemble": ["G"] * 2 + ["P"] * 2,
                               "alpha_true": [math.nan] * 2 + [3.0] * 2, "q05": 1.0, "median": 3.0, "q95": 5.0})
    assert plots.plot_alpha_reliability(experiment).get_xscale() == "log"
    plt.close("all")


def test_a_run_has_the_same_colour_in_every_ht_sr_plot():
    from matplotlib.colors import to_hex
    tables = {run: fake_table([3.0 + k, 4.0], [True, True]) for k, run in enumerate(["sft", "dpo", "js"])}
    summary = S.summarize(tables, gaps={"sft": math.nan, "dpo": 0.0, "js": 0.1})
    delta = pd.DataFrame({"run": ["dpo", "dpo", "js", "js"], "block": [0, 1] * 2, "delta_alpha": [1.0, 0, 2, 0],
                          "reliable": True})
    def colours(ax):
        return {l.get_label(): to_hex(l.get_color()) for l in ax.get_lines() if not l.get_label().startswith("_")}
    by_layer = colours(plots.plot_alpha_by_layer(tables))
    moved = colours(plots.plot_delta_alpha(delta))
    scatter = colours(plots.plot_alpha_vs_gap(summary[np.isfinite(summary["gen_gap"])]))
    for run in ("dpo", "js"):
        assert by_layer[run] == moved[run] == scatter[run]
    assert by_layer["dpo"] != by_layer["js"] != by_layer["sft"]
    plt.close("all")


# ---- runs: `kdpo spectra RUN_DIR...` -----------------------------------------------------------

def save_run(folder, model, gaps=()):
    """A run folder as training.train leaves it: model/ and one eval.jsonl row per (step, gap)."""
    model.save_pretrained(folder / "model")
    rows = [{"step": step, "pref/accuracy": 0.6, "pref/train_accuracy": 0.6 + gap, "pref/gap": gap}
            for step, gap in gaps]
    if rows:
        (folder / "eval.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """An SFT reference (no eval.jsonl) and two aligned runs of a width-32 Llama: every matrix has 32
    eigenvalues, far below MIN_RELIABLE_EVALS."""
    root = tmp_path_factory.mktemp("runs")
    make = lambda seed: M.build_model(M.tiny_config("llama", 300, d_model=32, n_layers=2, n_heads=2), seed=seed)
    return [save_run(root / "sft", make(0)),
            save_run(root / "dpo", make(1), gaps=[(5, 0.5), (10, 0.1)]),
            save_run(root / "dpo_high_lr", make(2), gaps=[(10, 0.3)])]


def test_spectra_command_writes_tables_and_figures_and_warns_once_about_small_matrices(tiny_runs, tmp_path,
                                                                                        capsys):
    out = tmp_path / "spectra"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["spectra", *map(str, tiny_runs), "--out", str(out)]) == 0
    ours = [str(w.message) for w in caught if issubclass(w.category, S.SmallMatrixWarning)]
    assert len(ours) == 1 and "14 of 14 layers in each of 3 runs" in ours[0] and "(min(N, M) = 32)" in ours[0]
    no_config = {"alpha_and_gap_by_setting.png"}  # these runs have no config.yaml: no lr, no passes
    assert {p.name for p in out.iterdir()} == {"layers.csv", "summary.csv", "delta_alpha.csv", *spectra_runs.FIGURES} - no_config
    layers = pd.read_csv(out / "layers.csv")
    for run in tiny_runs:  # the long table is each run's layer_table
        own = quiet_table(run)
        np.testing.assert_array_equal(layers.loc[layers["run"] == run.name, "alpha"], own["alpha"])
    summary = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary["baseline"].tolist() == [True, False, False] and (summary["n_reliable"] == 0).all()
    assert summary["mean_alpha"].isna().all() and summary["frac 2-6"].isna().all()
    assert summary.loc["dpo", "gen_gap"] == 0.1 and summary.loc["dpo", "eval_step"] == 10  # the LAST evaluation
    assert math.isnan(summary.loc["sft", "gen_gap"])  # an SFT run has no preference evaluation
    delta = pd.read_csv(out / "delta_alpha.csv")
    sft = layers[layers["run"] == "sft"].set_index("name")["alpha"]
    np.testing.assert_allclose(delta["delta_alpha"], delta["alpha"] - delta["name"].map(sft).to_numpy())
    assert set(delta["run"]) == {"dpo", "dpo_high_lr"} and not delta["reliable"].any()
    text = capsys.readouterr().out
    assert "0 of 14" in text and "No layer is reliable" in text and "32 eigenvalues, below 384" in text
    for small in summary["mean_alpha_small"]:  # the mean of noisy alphas is never printed
        assert f"{small:.2f}" not in text


def test_mean_alpha_and_its_change_count_reliable_layers_only(tmp_path, capsys):
    # q/o/gate/up/down have 384 eigenvalues; k/v (grouped-query, one kv head) only 96
    a = save_run(tmp_path / "base", llama(seed=0, layers=1, kv_heads=1))
    b = save_run(tmp_path / "other", llama(seed=1, layers=1, kv_heads=1), gaps=[(1, 0.2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = spectra_runs.analyse_runs([a, b], tmp_path / "out").set_index("run")
    assert ["2 of 7 layers in each of 2 runs" in str(w.message) for w in caught
            if issubclass(w.category, S.SmallMatrixWarning)] == [True]
    ta, tb = quiet_table(a), quiet_table(b)
    ok = ta["reliable"]
    assert ok.sum() == 5 and summary.loc["other", "n_reliable"] == 5
    assert summary.loc["other", "mean_alpha"] == pytest.approx(tb.loc[ok, "alpha"].mean(), rel=1e-12)
    assert summary.loc["other", "mean_delta_alpha"] == pytest.approx((tb["alpha"] - ta["alpha"])[ok].mean(), rel=1e-9)
    assert math.isnan(summary.loc["base", "mean_delta_alpha"])
    text = capsys.readouterr().out
    assert f"{tb.loc[ok, 'alpha'].mean():.2f}" in text and "5 of 7" in text
    assert f"{tb['alpha'].mean():.2f}" not in text  # the mean that would include the k/v noise
    assert not (tmp_path / "out" / "alpha_vs_gap.png").exists()  # one run with a gap: nothing to relate


def test_the_esd_layer_is_the_largest_reliable_one_else_the_largest(gqa_table):
    assert spectra_runs.esd_layer(gqa_table) == "model.layers.0.mlp.gate_proj"  # 768 x 384, before up/down in model order
    noisy = gqa_table.assign(reliable=False)
    assert spectra_runs.esd_layer(noisy) == "model.layers.0.mlp.gate_proj"
    only_k = gqa_table.assign(reliable=gqa_table["module"] == "k_proj")
    assert spectra_runs.esd_layer(only_k) == "model.layers.0.self_attn.k_proj"


def test_baseline_is_the_first_run_unless_named_by_name_or_folder(tiny_runs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.SmallMatrixWarning)
        for baseline, expected in ((None, "sft"), ("dpo", "dpo"), (tiny_runs[2], "dpo_high_lr")):
            summary = spectra_runs.analyse_runs(tiny_runs, tmp_path / str(expected), baseline=baseline, verbose=False)
            assert summary.loc[summary["baseline"], "run"].tolist() == [expected]
            assert expected not in set(pd.read_csv(tmp_path / str(expected) / "delta_alpha.csv")["run"])
        with pytest.raises(ValueError, match="baseline"):
            spectra_runs.analyse_runs(tiny_runs, tmp_path / "bad", baseline="ref", verbose=False)
    with pytest.raises(ValueError):
        spectra_runs.analyse_runs([], tmp_path / "none")


def test_run_names_are_folder_names_made_unique_by_their_parents():
    assert spectra_runs.run_names(["runs/a/dpo", "runs/b/dpo", "runs/sft/model", "x"]) == ["a/dpo", "b/dpo", "sft", "x"]
    with pytest.raises(ValueError, match="repeat"):
        spectra_runs.run_names(["runs/dpo", "runs/dpo/model"])


def test_the_gap_is_read_from_a_run_or_from_its_model_folder(tiny_runs):
    assert spectra_runs.read_gap(tiny_runs[1])["gen_gap"] == 0.1
    assert spectra_runs.read_gap(tiny_runs[1] / "model")["train_accuracy"] == pytest.approx(0.7)
    assert all(math.isnan(v) for v in spectra_runs.read_gap(tiny_runs[0]).values())


def test_settings_are_the_learning_rate_and_the_passes_over_the_training_pairs(tiny_runs, tmp_path):
    from kdpo_lab import suite
    from kdpo_lab.config import TrainConfig
    run = tmp_path / "over"
    run.mkdir()
    TrainConfig(output_dir=str(run), data=str(suite.SUITE_DIR), learning_rate=2e-3, max_steps=800, per_device_train_batch_size=16,
                max_train_pairs=256).save(run / "config.yaml")
    assert spectra_runs.read_settings(run) == {"lr": 2e-3, "passes": 800 * 16 / 256}
    assert spectra_runs.read_settings(run / "model")["passes"] == 50.0  # a model folder reads its run's config
    TrainConfig(output_dir=str(run), data=str(tmp_path / "gone.jsonl"), max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_train_pairs=40).save(run / "config.yaml")
    assert spectra_runs.read_settings(run)["passes"] == 2.0  # data moved away: counted against max_train_pairs
    assert all(math.isnan(v) for v in spectra_runs.read_settings(tiny_runs[0]).values())  # no config.yaml


def test_runs_trained_by_kdpo_lab_get_their_settings_in_the_summary_and_the_confound_figure(tiny_runs, tmp_path):
    import shutil
    from kdpo_lab.config import TrainConfig
    runs = [shutil.copytree(run, tmp_path / run.name) for run in tiny_runs]
    for run, lr in zip(runs, (1e-3, 1e-4, 2e-3)):
        TrainConfig(output_dir=str(run), data=str(tmp_path / "moved.jsonl"), learning_rate=lr, max_steps=100, per_device_train_batch_size=8,
                    max_train_pairs=200).save(run / "config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.SmallMatrixWarning)
        summary = spectra_runs.analyse_runs(runs, tmp_path / "out", verbose=False).set_index("run")
    assert summary["lr"].tolist() == [1e-3, 1e-4, 2e-3] and (summary["passes"] == 4.0).all()
    assert (tmp_path / "out" / "alpha_and_gap_by_setting.png").exists()


def test_the_confound_plot_draws_one_point_per_aligned_run_even_without_reliable_layers():
    from matplotlib.colors import to_hex
    tables = {"sft": fake_table([3.0], [True]), "dpo": fake_table([3.0], [True]), "over": fake_table([2.0], [True])}
    summary = S.summarize(tables, gaps={"sft": math.nan, "dpo": 0.0, "over": 0.2})
    summary.insert(1, "baseline", summary["run"] == "sft")
    summary["lr"], summary["passes"] = [1e-3, 1e-4, 2e-3], [4.0, 0.8, 50.0]
    left, right = plots.plot_alpha_and_gap_by_setting(summary)
    points = [l for l in left.get_lines() if len(l.get_xdata()) == 1]
    assert [(l.get_label(), l.get_xdata()[0]) for l in points] == [("dpo", 1e-4), ("over", 2e-3)]
    assert to_hex(points[1].get_color()) == to_hex("C2")  # summary row 2, as in plot_alpha_by_layer
    assert sorted(l.get_xdata()[0] for l in right.get_lines()) == [0.8, 50.0]
    noisy = summary.assign(mean_alpha=math.nan, mean_alpha_small=3.0)  # fast mode: no reliable layer
    left, _ = plots.plot_alpha_and_gap_by_setting(noisy)
    assert all(l.get_markerfacecolor() == "none" for l in left.get_lines() if len(l.get_xdata()) == 1)
    plt.close("all")


# ---- the reading: exact p-values and findings ------------------------------------------------------

def test_with_four_runs_even_a_perfect_rank_correlation_has_p_one_in_twelve():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert S.spearman_exact_p(x, x) == pytest.approx(2 / 24)
    assert S.spearman_exact_p(x, -x) == pytest.approx(2 / 24)
    assert S.spearman_exact_p(x, np.ones(4)) != S.spearman_exact_p(x, np.ones(4))  # constant gap: undefined
    with pytest.raises(ValueError):
        S.spearman_exact_p(x[:2], x[:2])


def test_exact_spearman_p_equals_scipys_permutation_test():
    from scipy import stats
    x, y = np.array([3.1, 2.2, 5.0, 4.4, 1.0]), np.array([0.1, 0.3, -0.2, 0.05, 0.2])
    peer = stats.permutation_test((x, y), lambda a, b: stats.spearmanr(a, b).statistic, permutation_type="pairings",
                                  n_resamples=np.inf).pvalue
    assert S.spearman_exact_p(x, y) == pytest.approx(peer)
    summary = S.summarize({f"r{i}": fake_table([a], [True]) for i, a in enumerate(x)},
                          gaps={f"r{i}": g for i, g in enumerate(y)})
    assert S.gap_relation(summary)["p_spearman"] == pytest.approx(peer)


def fake_summary(alphas, gaps):
    tables = {run: fake_table(a, [True] * len(a)) for run, a in alphas.items()}
    summary = S.summarize(tables, gaps=gaps)
    summary["mean_delta_alpha"] = summary["mean_alpha"] - summary["mean_alpha"].iloc[0]
    summary.insert(1, "baseline", summary["run"] == "sft")
    return summary


def test_findings_read_the_bands_and_the_gap_relation_from_the_summary():
    alphas = {"sft": [7, 8, 5, 3], "dpo": [6.5, 7, 4, 3], "js": [7, 7.5, 4.5, 3], "hmk": [5, 6, 3, 1.5],
              "over": [3, 2, 1.5, 1.8]}
    text = spectra_runs.findings(fake_summary(alphas, {"sft": math.nan, "dpo": 0.02, "js": 0.01, "hmk": 0.05, "over": 0.3}),
                      n_eval=256)
    assert "`hmk`: 75% in [2, 6], 25% below 2, 0% above 6; mean alpha 3.88, mean change -1.88" in text
    assert ("2 of 4 aligned runs have layers below 2 (over-fit risk): hmk, over; 2 of 4 have layers above 6 "
            "(under-trained): dpo, js") in text
    assert "at least half of the reference's layers are above 6" in text
    assert "Spearman -1.00 over 4 runs, negative" in text and "p = 0.08, not significant" in text
    assert "standard error up to 0.044" in text
    assert "the run with the largest gap, `over` (+0.300), has 50% of its reliable layers in [2, 6], within the other runs' range of 50% to 75%." in text


def test_findings_say_when_the_most_over_fit_run_sits_inside_the_healthy_band():
    # the situation notebook 09 measured: over-training pulls every alpha to ~2.4, inside [2, 6]
    alphas = {"sft": [3, 4.5, 7, 6.5], "dpo": [3, 4.4, 7.1, 5], "over": [2.3, 2.4, 2.5, 2.6]}
    text = spectra_runs.findings(fake_summary(alphas, {"sft": math.nan, "dpo": 0.0, "over": 0.25}))
    assert ("`over` (+0.250), has 100% of its reliable layers in [2, 6], as many as or more than any other aligned "
            "run: being inside the band did not rule out over-fitting here") in text
    healthy = spectra_runs.findings(fake_summary({"sft": [3, 4.5], "dpo": [3.2, 5]}, {"sft": math.nan, "dpo": 0.1}))
    assert "every aligned run keeps all its reliable layers in [2, 6]" in healthy and "at least half" not in healthy
    assert "only 1 run(s) have both a reliable mean alpha and a gap" in healthy
    under = spectra_runs.findings(fake_summary({"sft": [7, 8], "dpo": [3.2, 7]}, {"sft": math.nan, "dpo": 0.1}))
    assert "no aligned run has a reliable layer below 2 (over-fit risk); 1 of 1 have layers above 6" in under


def test_findings_refuse_to_answer_without_reliable_layers():
    tables = {"sft": fake_table([3.0, 5.0], [False, False]), "dpo": fake_table([2.5, 4.0], [False, False])}
    summary = S.summarize(tables, gaps={"sft": math.nan, "dpo": 0.2})
    text = spectra_runs.findings(summary)
    assert "neither question can be answered" in text and "3.0" not in text and "2.5" not in text
