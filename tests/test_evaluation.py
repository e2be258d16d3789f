"""Facts about the evaluation helpers."""
import pytest
import torch

from kdpo_lab import evaluation


def test_memory_timeline_sees_the_peak_of_live_tensors():
    def f():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = torch.ones(512, 1024)   # 2 MiB, while a is alive: peak 6 MiB
        del a
        return b.sum()
    _, timeline, _ = evaluation.memory_timeline(f)
    assert timeline["allocated_mb"].max() == pytest.approx(6.0, abs=0.01)


def test_memory_timeline_refuses_a_function_that_allocates_nothing():
    with pytest.raises(ValueError):
        evaluation.memory_timeline(lambda: 1 + 1)


# ----------------------------------------------------------------------------------------------
# Evaluation on any data: what it computes, what it says it could not, and a reward model's win-rate

@pytest.fixture(scope="module")
def tiny():
    from kdpo_lab import batching, models, suite
    pairs = suite.load_suite("test", limit=12)[0]
    tokenizer = models.build_tokenizer(batching.sft_texts(suite.load_suite("train", limit=200)[0]), vocab_size=300)
    config = models.tiny_config("llama", vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2, max_len=128)
    policy = models.build_model(config, seed=0)
    ref = models.build_model(config, seed=1)
    feats = batching.encode_pairs(pairs, tokenizer, max_length=64)
    return policy, ref, tokenizer, pairs, feats, config


def _plain(pairs):
    from kdpo_lab.pairs import PreferencePair
    return [PreferencePair(p.prompt, p.chosen, p.rejected) for p in pairs]  # no family, no meta: not the suite


def test_on_data_outside_the_suite_it_reports_kl_and_lengths_and_says_why_rewards_are_missing(tiny):
    policy, ref, tokenizer, pairs, feats, _ = tiny
    result = evaluation.evaluate(policy, ref, tokenizer, _plain(pairs), feats, beta=0.1, n_generate=4, max_new_tokens=8)
    assert {"pref/accuracy", "pref/margin", "kl", "length/policy", "length/reference"} <= set(result)
    assert not any(k.startswith("reward/") or k == "winrate" for k in result)
    assert "only for the bundled suite" in result["unavailable"]["reward/*, winrate"]
    assert "--reward-model" in result["unavailable"]["rm/*"]
    assert 1 <= result["length/policy"] <= 8


def test_on_the_suite_exact_rewards_are_computed(tiny):
    policy, ref, tokenizer, pairs, feats, _ = tiny
    result = evaluation.evaluate(policy, ref, tokenizer, pairs, feats, beta=0.1, n_generate=4, max_new_tokens=8)
    assert 0 <= result["winrate"] <= 1 and "reward/*, winrate" not in result["unavailable"]


def test_a_reward_model_scores_each_text_as_it_would_alone_and_gives_a_win_rate(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    policy, ref, tokenizer, pairs, feats, config = tiny
    rm_config = LlamaConfig(**{**config.to_dict(), "num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    LlamaForSequenceClassification(rm_config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rm = evaluation.RewardModel(tmp_path / "rm", batch_size=4)
    responses = ["Four.", "I think cats are very lazy and they sleep all day.", "No.", "Blue."] * 2
    batched = rm.score(pairs[:8], responses)
    alone = torch.cat([rm.score([p], [y]) for p, y in zip(pairs[:8], responses)])
    assert torch.allclose(batched, alone, atol=1e-5) and batched.std() > 0
    result = evaluation.evaluate(policy, ref, tokenizer, _plain(pairs), feats, beta=0.1, n_generate=4,
                                 max_new_tokens=8, reward_model=rm)
    assert 0 <= result["rm/winrate"] <= 1 and "rm/*" not in result["unavailable"]


def test_kdpo_eval_reads_at_least_n_generate_pairs_of_the_split_without_moving_a_files_held_out_rows(tmp_path):
    from kdpo_lab import runs
    from kdpo_lab.config import TrainConfig
    from kdpo_lab.loading import read_pairs
    from kdpo_lab.suite import SUITE_DIR
    cfg = TrainConfig(data=str(SUITE_DIR), max_eval_pairs=8)
    pairs, _ = runs._pairs(cfg, runs.EvalRequest(split="test", n_generate=40))
    assert len(pairs) == 40
    one_file = TrainConfig(data=str(SUITE_DIR / "validation.jsonl"), max_eval_pairs=8)
    held, _ = read_pairs(one_file, "validation", 8)
    more, _ = runs._pairs(one_file, runs.EvalRequest(split="validation", n_generate=40))
    assert [p.prompt for p in more] == [p.prompt for p in held]  # a single file holds out the same 8 rows
