"""Facts about the library functions notebook 08 calls instead of re-implementing them."""
import pytest
import torch

from kdpo_lab import models as M


def tiny_batch(n_pairs=2, T=10, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_pairs
    input_ids = torch.randint(6, vocab, (n, T), generator=g)
    attention_mask = torch.ones(n, T, dtype=torch.long)
    attention_mask[1, -2:] = 0
    response_mask = attention_mask.clone()
    response_mask[:, :3] = 0
    return {"input_ids": torch.where(attention_mask.bool(), input_ids, 0), "attention_mask": attention_mask,
            "response_mask": response_mask}


def tiny_model(seed=0):
    return M.build_model(M.tiny_config("llama", 300, d_model=32, n_layers=2, n_heads=2, max_len=32), seed=seed)


def test_dpo_on_batch_with_lora_moves_the_policy_and_leaves_the_reference_bitwise_the_base():
    batch = tiny_batch()
    base = tiny_model()
    with torch.no_grad():
        base_logps = M.sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["response_mask"])["logps"]
    model = M.apply_lora(base, M.LoraSettings(r=4, alpha=8))
    history = M.dpo_on_batch(model, batch, steps=5, lr=1e-2)
    assert len(history) == 5
    assert all(torch.equal(h["reference"], base_logps) for h in history)
    assert (history[-1]["policy"] - base_logps).abs().max() > 1e-3


def test_dpo_on_batch_raises_the_chosen_margin_it_trains_on():
    batch = tiny_batch(seed=1)
    model = M.apply_lora(tiny_model(seed=1), M.LoraSettings(r=4, alpha=8))
    history = M.dpo_on_batch(model, batch, steps=10, lr=1e-2)
    margin = lambda h: ((h["policy"] - h["reference"]).chunk(2)[0] - (h["policy"] - h["reference"]).chunk(2)[1]).mean()
    assert margin(history[-1]) > margin(history[0]) > 0


def test_dpo_on_batch_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        M.dpo_on_batch(tiny_model(), tiny_batch(), steps=0)


def test_bf16_log_softmax_error_exceeds_fp32_and_grows_with_length():
    err = M.logp_rounding_error([1, 16, 256], vocab_size=2000, reps=3)
    bf16, fp32 = err["log-softmax in bf16"], err["log-softmax in fp32 (sequence_logps)"]
    assert all(b > 100 * f for b, f in zip(bf16, fp32))
    assert bf16[-1] > bf16[0]
    assert max(fp32) < 1e-3


def test_logp_rounding_error_of_identical_logits_in_fp32_is_float32_round_off_only():
    # one token over a vocabulary of 2: the fp32 path differs from float64 by float32 rounding alone
    err = M.logp_rounding_error([1], vocab_size=2, reps=5)
    assert err["log-softmax in fp32 (sequence_logps)"][0] < 1e-6


def test_logp_rounding_error_rejects_empty_lengths_and_reps():
    with pytest.raises(ValueError, match="reps"):
        M.logp_rounding_error([4], reps=0)
    with pytest.raises(ValueError, match="length"):
        M.logp_rounding_error([0])


def test_shape_config_is_the_scaled_7b_shape():
    c = M.shape_config("llama-7b-shape", scale=1 / 4, vocab_size=1024)
    ref = M.llama_7b_config(1 / 4, vocab_size=1024)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == \
        (ref.hidden_size, ref.num_hidden_layers, ref.intermediate_size, 1024)


def test_memory_row_reads_memory_estimate_in_mebibytes():
    config = M.llama_7b_config(1 / 16, vocab_size=512)
    row = M.memory_row(config, lora_rank=8, batch=16, seq_len=64, gradient_checkpointing=True)
    est = M.memory_estimate(config, "bf16", lora_rank=8, batch=16, seq_len=64, gradient_checkpointing=True)
    assert row["estimate MB"] * 2**20 == pytest.approx(est["total"])
    assert (row["estimate MB"] - row["estimate without LoRA inputs MB"]) * 2**20 == pytest.approx(est["lora_inputs"])
    assert row["parameters"] == M.param_count(config) and row["hidden"] == config.hidden_size
