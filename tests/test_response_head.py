"""models.sequence_logps applies the output layer only at response positions: same log-probs and
gradients as the full logits (float32 tolerance), and the full logits where a model transforms them."""
import pytest
import torch

from kdpo_lab import models as M


pytestmark = pytest.mark.usefixtures("one_thread")


def padded_batch(n=6, T=14, vocab=200, seed=0):
    """Right-padded rows of different lengths, prompts of 2-5 tokens, responses after them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
    prompt = torch.randint(2, 6, (n,), generator=g)
    pos = torch.arange(T)
    attention_mask = (pos < lengths[:, None]).long()
    response_mask = attention_mask * (pos >= prompt[:, None]).long()
    input_ids = torch.where(attention_mask.bool(), torch.randint(6, vocab, (n, T), generator=g), 0)
    return input_ids, attention_mask, response_mask


def full_logits_logps(model, ids, am, rm):
    """The reference computation: log-softmax of the full shifted logits, gathered and masked."""
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
    picked = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (picked * rm[:, 1:]).sum(-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_response_only_head_gives_the_full_logits_logps_and_gradients(arch):
    model = M.build_model(M.tiny_config(arch, vocab_size=200, d_model=32, n_layers=2, n_heads=2, max_len=32), seed=1)
    assert M._head_on_positions(model)
    ids, am, rm = padded_batch()
    fast = M.sequence_logps(model, ids, am, rm)["logps"]
    grads_fast = torch.autograd.grad(fast.sum(), list(model.parameters()))
    slow = full_logits_logps(model, ids, am, rm)
    grads_slow = torch.autograd.grad(slow.sum(), list(model.parameters()))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_returned_logits_are_the_models_at_response_positions_and_zero_elsewhere():
    model = M.build_model(M.tiny_config("llama", vocab_size=200, d_model=32, n_layers=2, n_heads=2, max_len=32))
    ids, am, rm = padded_batch(seed=2)
    out = M.sequence_logps(model, ids, am, rm, return_logits=True)
    full = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    on = rm[:, 1:].bool()
    torch.testing.assert_close(out["logits"][on], full[on], atol=1e-5, rtol=1e-5)
    assert (out["logits"][~on] == 0).all()
    assert (out["token_logps"][~on] == 0).all() and (out["token_logps"][on] < 0).all()
    torch.testing.assert_close(out["logps"], full_logits_logps(model, ids, am, rm), atol=1e-5, rtol=1e-5)


def test_a_model_with_logit_soft_capping_takes_the_full_logits():
    model = M.build_model(M.tiny_config("llama", vocab_size=200, d_model=32, n_layers=2, n_heads=2, max_len=32))
    model.config.final_logit_softcapping = 30.0
    assert not M._head_on_positions(model)
