"""Facts about kdpo_lab.selection: metrics on synthetic inputs with a known answer, the reference pass,
the ranked table, the recalled rule of thumb and the validation helper."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kdpo_lab import data, kernels, models, selection as S


pytestmark = pytest.mark.usefixtures("one_thread")


def closer_chosen(n=200, d=16, seed=0, gap=1.0):
    """Prompts with chosen responses nearer than rejected ones (noise 0.3 vs 0.3 + gap)."""
    g = torch.Generator().manual_seed(seed)
    e_x = torch.randn(n, d, generator=g)
    return e_x, e_x + 0.3 * torch.randn(n, d, generator=g), e_x + (0.3 + gap) * torch.randn(n, d, generator=g)


# ---------------------------------------------------------------- pure metrics

def test_auc_matches_its_definition_and_scipy():
    pos, neg = np.array([0.1, 0.4, 0.4, 0.9]), np.array([0.0, 0.4, 0.5])
    by_hand = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert S.auc(pos, neg) == pytest.approx(by_hand)
    from scipy.stats import mannwhitneyu
    assert S.auc(pos, neg) == pytest.approx(mannwhitneyu(pos, neg).statistic / 12)
    assert S.auc([2, 3], [0, 1]) == 1.0 and S.auc([0, 1], [2, 3]) == 0.0


@pytest.mark.parametrize("name", kernels.PAPER_FOUR)
def test_every_kernel_separates_chosen_nearer_the_prompt(name):
    e_x, e_w, e_l = closer_chosen()
    kernel = kernels.get(name).fit(torch.cat([e_x, e_w, e_l]))
    sep = S.kernel_separation(kernel, e_x, e_w, e_l)
    assert sep["auc"] > 0.9 and sep["accuracy"] > 0.9 and sep["gap"] > 1


def test_separation_is_at_chance_when_chosen_and_rejected_are_exchangeable():
    e_x, e_w, e_l = closer_chosen(n=400, gap=0.0)  # both at noise 0.3
    sep = S.kernel_separation(kernels.get("rbf").fit(torch.cat([e_x, e_w, e_l])), e_x, e_w, e_l)
    assert abs(sep["auc"] - 0.5) < 0.07 and abs(sep["gap"]) < 0.15


def test_normalised_gap_is_mean_over_std():
    assert S.normalised_gap(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)
    assert S.normalised_gap(torch.ones(5)) == 0.0


def test_global_share_tells_the_toy_local_pairs_from_the_global_ones():
    e_x, e_w, e_l, is_local = kernels.toy_embedding_pairs(n=400, seed=0)
    local = S.global_share(e_x[is_local], e_w[is_local], e_l[is_local], k=2)
    glob = S.global_share(e_x[~is_local], e_w[~is_local], e_l[~is_local], k=2)
    assert local < 0.05 and glob > 0.3  # global pairs: chosen moves h, rejected g, by the same chord


def test_anisotropy_is_zero_for_isotropic_data_and_near_one_for_a_line():
    g = torch.Generator().manual_seed(0)
    assert S.anisotropy(torch.randn(20000, 8, generator=g)) < 0.05
    line = torch.randn(500, 1, generator=g) * torch.ones(1, 8) + torch.tensor([3.0] + [0.0] * 7)
    assert S.anisotropy(line + 1e-3 * torch.randn(500, 8, generator=g)) > 0.8


def test_support_overlap_is_one_for_equal_sets_zero_for_disjoint_and_skips_position_zero():
    idx = torch.arange(12).reshape(1, 3, 4)  # one pair: 3 positions, k = 4
    mask = torch.ones(2, 3, dtype=torch.bool)
    same = torch.cat([idx, idx.flip(-1)])  # same sets in another order
    assert S.support_overlap(same, mask) == 1.0
    disjoint = torch.cat([idx, idx + 100])
    assert S.support_overlap(disjoint, mask) == 0.0
    half = torch.cat([idx, torch.where(torch.arange(4) < 2, idx, idx + 100)])  # 2 of 4 shared: 2 / 6
    assert S.support_overlap(half, mask) == pytest.approx(1 / 3)
    disjoint[1, 0] = idx[0, 0]  # position 0 is not counted
    assert S.support_overlap(disjoint, mask) == 0.0


def test_coverage_counts_response_tokens_inside_the_top_k():
    topk = torch.tensor([[[1, 2], [3, 4], [5, 6]]])
    tokens = torch.tensor([[2, 9, 5]])
    mask = torch.tensor([[True, True, False]])
    assert S.coverage(tokens, topk, mask) == 0.5


def test_excess_kurtosis_is_zero_for_a_gaussian_and_large_for_heavy_tails():
    g = np.random.default_rng(0)
    assert abs(S.excess_kurtosis(g.normal(size=200000))) < 0.05
    assert S.excess_kurtosis(g.standard_t(5, size=200000)) > 3  # t_5: excess kurtosis 6


def test_drift_is_the_per_token_shortfall_of_the_chosen():
    logp_w, logp_l = torch.tensor([-10.0, -30.0]), torch.tensor([-20.0, -10.0])
    n = torch.tensor([10.0, 10.0])
    assert S.drift(logp_w, logp_l, n, n) == pytest.approx((0 + 2.0) / 2)


# ---------------------------------------------------------------- the divergence scores

FEATURES = {"overlap": 0.8, "coverage": 0.9, "kurtosis": 0.0, "drift": 0.0}


def test_light_tails_and_no_drift_rank_kl_first_among_the_links():
    table = S.divergence_table(FEATURES).set_index("divergence")
    links = table.loc[list(S.DAMPING), "divergence_score"]
    assert links.idxmax() == "kl" and links.is_unique
    assert table.loc["kl", "divergence_score"] == pytest.approx(0.8)


def test_heavy_tails_move_the_choice_to_a_damping_link():
    table = S.divergence_table({**FEATURES, "kurtosis": 30.0}).set_index("divergence")
    assert table.loc[list(S.DAMPING), "divergence_score"].idxmax() == "js"  # wanted damping 30/33 ~ 0.91


def test_low_support_overlap_ranks_wasserstein_first():
    table = S.divergence_table({**FEATURES, "overlap": 0.1}).set_index("divergence")
    assert table.divergence_score.idxmax() == "wasserstein"
    assert table.divergence_score.between(0, 1).all()


# ---------------------------------------------------------------- the reference pass and the table

def fake_feats(n=12, seed=0, vocab=60):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    return [{"prompt_ids": draw(2, 6), "chosen_ids": draw(2, 9), "rejected_ids": draw(2, 9),
             "family": ("a", "b")[i % 2], "index": i} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_ref():
    model = models.build_model(models.tiny_config("llama", 60, d_model=32, n_layers=2, n_heads=2, max_len=32), seed=0)
    feats = fake_feats()
    return model, feats, S.reference_features(model, feats, pad_id=0, batch_size=5, top_k=4)


def test_reference_features_agree_with_one_batch_of_sequence_logps(tiny_ref):
    model, feats, ref = tiny_ref
    batch = data.collate(feats, 0)
    with torch.no_grad():
        out = models.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                    return_hidden=True)
        e_x, e_w, e_l = models.pair_embeddings(out["hidden"], batch["prompt_mask"], batch["response_mask"])
    n = len(feats)
    torch.testing.assert_close(ref.logp_w, out["logps"][:n])
    torch.testing.assert_close(ref.logp_l, out["logps"][n:])
    torch.testing.assert_close(ref.e_x, e_x)
    torch.testing.assert_close(ref.e_l, e_l)
    torch.testing.assert_close(ref.n_w, torch.tensor([len(f["chosen_ids"]) for f in feats], dtype=torch.float32))
    torch.testing.assert_close(ref.token_logps.sum(1), out["logps"])  # left-aligned tokens sum to the sequence
    assert ref.mask.sum(1).tolist() == out["n_tokens"].tolist()
    assert ref.topk_idx.shape[-1] == 4 and ref.families[:2] == ["a", "b"]


def test_reference_top_k_holds_the_largest_log_probs_in_order(tiny_ref):
    _, _, ref = tiny_ref
    top = ref.topk_logps[ref.mask]
    assert (top.diff(dim=-1) <= 0).all() and (top.exp().sum(-1) <= 1 + 1e-5).all()
    assert (ref.token_logps[ref.mask] <= top[:, 0] + 1e-5).all()
    first_chosen = ref.tokens[: len(ref.e_x), :].gather(1, torch.zeros(len(ref.e_x), 1, dtype=torch.long))
    assert (first_chosen.squeeze(1) == torch.tensor([f["chosen_ids"][0] for f in tiny_ref[1]])).all()


def test_select_pairs_ranks_all_28_pairs_overall_and_per_family(tiny_ref):
    sel = S.select_pairs(tiny_ref[2], spectral_k=4, min_pairs=6)
    assert set(sel.tables) == {"all", "a", "b"}
    for group, table in sel.tables.items():
        assert len(table) == 28 and set(zip(table.kernel, table.divergence)) == set(S.PAIRS)
        assert table.score.is_monotonic_decreasing and table.score.between(0, 1).all()
        assert table.reason.str.len().min() > 20
        assert sel.recommended[group] == (table.kernel[0], table.divergence[0])


def test_the_pair_score_is_the_geometric_mean_of_its_halves():
    kernel_rows = pd.DataFrame({"kernel": ["rbf", "spectral"], "kernel_score": [0.9, 0.4], "kernel_reason": ["k1", "k2"]})
    div_rows = pd.DataFrame({"divergence": ["kl", "js"], "divergence_score": [0.5, 1.0], "divergence_reason": ["d1", "d2"]})
    table = S.rank_pairs(kernel_rows, div_rows)
    assert list(zip(table.kernel, table.divergence))[0] == ("rbf", "js")
    assert table.score[0] == pytest.approx(math.sqrt(0.9)) and table.reason[0] == "k1; d2"


def test_rule_of_thumb_is_labelled_and_follows_the_recalled_rule():
    local = pd.DataFrame({"global_share": [0.1]})
    pick = S.rule_of_thumb({**FEATURES, "overlap": 0.2}, local)
    assert (pick["kernel"], pick["divergence"]) == ("rbf", "wasserstein")
    assert pick["label"] == "recalled from secondary summaries, unverified"
    assert S.rule_of_thumb({**FEATURES, "kurtosis": 9.0}, local)["divergence"] == "renyi"
    assert S.rule_of_thumb(FEATURES, pd.DataFrame({"global_share": [0.8]}))["kernel"] == "polynomial"


# ---------------------------------------------------------------- validation

def test_validation_of_a_perfect_score_has_spearman_one_and_no_regret():
    table = pd.DataFrame({"kernel": ["rbf"] * 6, "divergence": list("abcdef"), "score": np.linspace(1, 0, 6)})
    results = table.assign(result=np.linspace(0.9, 0.1, 6)).drop(columns="score")
    v = S.validate(table, results, n_boot=200)
    assert v["spearman"] == pytest.approx(1.0) and v["regret"] == 0.0 and v["low"] == pytest.approx(1.0)


def test_validation_of_a_reversed_score_has_spearman_minus_one_and_the_full_regret():
    table = pd.DataFrame({"kernel": ["rbf"] * 6, "divergence": list("abcdef"), "score": np.linspace(1, 0, 6)})
    results = table.assign(result=np.linspace(0.1, 0.9, 6)).drop(columns="score")
    v = S.validate(table, results, n_boot=200)
    assert v["spearman"] == pytest.approx(-1.0) and v["regret"] == pytest.approx(0.8)
    assert v["recommended"] == ("rbf", "a") and v["best"] == ("rbf", "f")
    with pytest.raises(ValueError, match="at least 3"):
        S.validate(table, results.iloc[:2])


# ---------------------------------------------------------------- the toy grid (kept for the quickstart)

def test_pair_grid_has_a_row_per_pair():
    grid = S.pair_grid(S.toy_batch(b=16))
    assert len(grid) == 28 and grid.loss.notna().all()


def test_validation_of_equal_results_has_no_correlation_and_no_interval_but_a_regret_of_zero():
    import math
    import warnings
    import pandas as pd
    table = pd.DataFrame({"kernel": ["rbf", "rbf", "spectral", "spectral"], "divergence": ["kl", "js"] * 2,
                          "score": [0.4, 0.3, 0.2, 0.1]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said as NaN, without scipy's ConstantInputWarning
        out = S.validate(table, table[["kernel", "divergence"]].assign(result=0.5))
    assert math.isnan(out["spearman"]) and math.isnan(out["low"]) and math.isnan(out["high"]) and out["regret"] == 0
