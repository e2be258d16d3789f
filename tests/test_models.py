"""Facts about kdpo_lab.models: tokenizer, configs, parameter arithmetic, LoRA reference, log-probs,
embeddings. Tiny shapes only; nothing downloads."""
import copy

import pytest
import torch

from kdpo_lab import models as M

TEXTS = [
    "The capital of France is Paris.",
    "Q: what is 2 + 3? A: 5",
    "Never share your password with anyone.",
    "Write a haiku about autumn leaves.",
    "Olá, naïve café ✓ 数学",
] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return M.build_tokenizer(TEXTS, vocab_size=300)


def tiny(arch="llama", seed=0, dtype=torch.float32, vocab=300, d=32, layers=2, heads=2):
    return M.build_model(M.tiny_config(arch, vocab, d_model=d, n_layers=layers, n_heads=heads,
                                       max_len=32), seed=seed, dtype=dtype).eval()


def batch(n=4, T=12, vocab=300, seed=0):
    """Right-padded rows: prompt of 3-4 tokens, response up to the row's length, then padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(6, vocab, (n, T), generator=g)
    lengths = torch.tensor([T, T - 2, T - 4, T - 1][:n] + [T] * max(0, n - 4))
    pos = torch.arange(T)
    attention_mask = (pos < lengths[:, None]).long()
    prompt_len = torch.tensor([3, 4, 3, 4][:n] + [3] * max(0, n - 4))
    prompt_mask = (pos < prompt_len[:, None]).long()
    response_mask = attention_mask * (1 - prompt_mask)
    input_ids = torch.where(attention_mask.bool(), input_ids, 0)
    return input_ids, attention_mask, response_mask, prompt_mask


def perturb_lora(model, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_round_trips_any_text(tokenizer):
    for text in TEXTS[:5] + ["unseen words: zebra quokka ∑ 🙂"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_has_special_tokens_and_adds_none_itself(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (M.PAD, M.BOS, M.EOS)
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    ids = tokenizer("hello")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert len(tokenizer) <= 300


def test_chat_template_has_one_bos_and_eos_per_message(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|user|>\nWhat is 2 + 3?<|eos|><|assistant|>\n5<|eos|>"
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 2
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)


def test_tokenizer_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = M.load_tokenizer(tmp_path)
    assert loaded(TEXTS[4])["input_ids"] == tokenizer(TEXTS[4])["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        M.build_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="single string"):
        M.build_tokenizer("just one string")


# --- configs and parameter arithmetic --------------------------------------------------------

def test_param_count_of_llama2_7b_is_6_74_billion():
    assert M.param_count(M.llama_7b_config()) == 6_738_415_616


def test_param_count_matches_meta_device_build_of_llama2_7b_and_gpt2_small():
    for cfg in [M.llama_7b_config(), M.tiny_config("gpt2", 50257, 768, 12, 12, max_len=1024)]:
        with torch.device("meta"):
            model = M.build_model(cfg)
        assert M.param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert M.param_count(M.tiny_config("gpt2", 50257, 768, 12, 12, max_len=1024)) == 124_439_808


@pytest.mark.parametrize("arch", M.ARCHS)
def test_param_count_and_lora_count_match_built_tiny_models(arch):
    cfg = M.tiny_config(arch, 300, d_model=32, n_layers=2, n_heads=2, max_len=32)
    model = M.build_model(cfg)
    assert M.param_count(cfg) == sum(p.numel() for p in model.parameters())
    peft_model = M.apply_lora(model, M.LoraSettings(r=4))
    assert M.n_trainable(peft_model) == M.lora_param_count(cfg, 4)


def test_llama_7b_config_scale_keeps_proportions():
    full = M.llama_7b_config()
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads,
            full.intermediate_size, full.vocab_size) == (4096, 32, 32, 11008, 32000)
    for s in [1 / 16, 1 / 4, 1 / 2]:
        c = M.llama_7b_config(s)
        assert c.hidden_size / c.num_hidden_layers == 128
        assert c.hidden_size // c.num_attention_heads == 128
        assert c.intermediate_size / c.hidden_size == pytest.approx(11008 / 4096, rel=0.01)
    with pytest.raises(ValueError, match="scale"):
        M.llama_7b_config(0)


def test_scaled_llama_7b_builds_and_trains_one_step():
    cfg = M.llama_7b_config(1 / 32, vocab_size=300, max_len=32)
    model = M.build_model(cfg)
    ids, am, rm, _ = batch()
    out = M.sequence_logps(model, ids, am, rm)
    out["logps"].sum().backward()
    assert torch.isfinite(out["logps"]).all()
    assert all(p.grad is not None for p in model.parameters())


def test_memory_estimate_closed_form_for_7b():
    cfg = M.llama_7b_config()
    P = 6_738_415_616
    full = M.memory_estimate(cfg, "bf16", optimizer="adamw", batch=2, seq_len=512)
    assert full["weights"] == 2 * P and full["grads"] == 2 * P and full["optimizer"] == 4 * P
    lora = M.memory_estimate(cfg, "bf16", lora_rank=8, batch=2, seq_len=512)
    Pt = M.lora_param_count(cfg, 8)
    assert Pt == 8 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) == 19_988_480  # peft's figure
    assert lora["weights"] == 2 * P + 4 * Pt and lora["grads"] == 4 * Pt
    assert lora["optimizer"] == 8 * Pt
    assert full["reference"] == 2 * P and lora["reference"] == 0  # LoRA's reference is the base, adapters off
    assert full["lora_inputs"] == 0
    assert lora["lora_inputs"] == 32 * 2 * 512 * (6 * 4096 + 11008) * 4  # fp32 inputs of q k v o gate up down
    for est in (full, lora):
        parts = ("weights", "reference", "grads", "optimizer", "activations", "lora_inputs")
        assert est["total"] == sum(est[k] for k in parts)
    ckpt = M.memory_estimate(cfg, "bf16", lora_rank=8, batch=2, seq_len=512, gradient_checkpointing=True)
    assert ckpt["activations"] < lora["activations"] / 5
    double = M.memory_estimate(cfg, "bf16", lora_rank=8, batch=4, seq_len=512)
    assert double["activations"] == 2 * lora["activations"]
    with pytest.raises(ValueError, match="dtype"):
        M.memory_estimate(cfg, "int3")
    assert ckpt["lora_inputs"] == lora["lora_inputs"] // 32  # one layer at a time under checkpointing
    assert M.memory_estimate(cfg, "fp32", lora_rank=8)["lora_inputs"] == 0  # the cast is a no-op in fp32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_estimate_counts_the_fp32_inputs_peft_feeds_its_adapters(arch):
    # peer check: every adapted map's input, as peft casts it for lora_A in a bf16 model, summed
    model = M.apply_lora(tiny(arch, dtype=torch.bfloat16), M.LoraSettings(r=4))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for name, m in model.named_modules() if name.endswith("lora_A.default")]
    ids, am, rm, _ = batch(n=3, T=10)
    M.sequence_logps(model, ids, am, rm)
    for h in hooks:
        h.remove()
    assert seen and all(x.dtype == torch.float32 for x in seen)
    est = M.memory_estimate(model.config, "bf16", lora_rank=4, batch=3, seq_len=10)
    assert sum(x.numel() * 4 for x in seen) == est["lora_inputs"]


# --- sequence log-probs ----------------------------------------------------------------------

def naive_logps(model, input_ids, response_mask):
    """Peer: re-run the model on each prefix and read off the next-token log-prob."""
    out = []
    for row, rmask in zip(input_ids, response_mask):
        total = 0.0
        for t in range(1, len(row)):
            if rmask[t]:
                logits = model(input_ids=row[None, :t]).logits[0, -1]
                total += torch.log_softmax(logits.double(), -1)[row[t]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", M.ARCHS)
def test_sequence_logps_equals_naive_prefix_loop(arch):
    model = tiny(arch)
    ids, am, rm, _ = batch(n=3, T=10)
    with torch.no_grad():
        out = M.sequence_logps(model, ids, am, rm)
        expected = naive_logps(model, ids, rm)
    assert torch.allclose(out["logps"].double(), expected, atol=1e-4)
    assert torch.equal(out["n_tokens"], rm.sum(1).float())


def test_sft_loss_equals_transformers_loss_with_labels_off_response_ignored():
    model = tiny("llama")
    ids, am, rm, _ = batch()
    labels = torch.where(rm.bool(), ids, -100)
    with torch.no_grad():
        ours = M.sft_loss(model, ids, am, rm)
        theirs = model(input_ids=ids, attention_mask=am, labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sequence_logps_ignores_padding_tokens():
    model = tiny("llama")
    ids, am, rm, _ = batch()
    other = torch.where(am.bool(), ids, 7)
    with torch.no_grad():
        a = M.sequence_logps(model, ids, am, rm)["logps"]
        b = M.sequence_logps(model, other, am, rm)["logps"]
    assert torch.allclose(a, b, atol=1e-5)


def test_sequence_logps_in_bf16_is_float32_and_close_to_fp32():
    model = tiny("llama")
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids, am, rm, _ = batch()
    with torch.no_grad():
        lo = M.sequence_logps(model_bf16, ids, am, rm, return_logits=True)
        hi = M.sequence_logps(model, ids, am, rm)
    assert lo["logps"].dtype == torch.float32 and lo["logits"].dtype == torch.bfloat16
    expected = (torch.log_softmax(lo["logits"].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
                * lo["mask"]).sum(-1)
    assert torch.allclose(lo["logps"], expected, atol=1e-4)
    assert torch.allclose(lo["logps"], hi["logps"], rtol=0.05, atol=0.5)


def test_sequence_logps_returns_shifted_logits_and_hidden_with_gradient():
    model = tiny("llama")
    ids, am, rm, _ = batch()
    out = M.sequence_logps(model, ids, am, rm, return_hidden=True, return_logits=True)
    N, T = ids.shape
    assert out["logits"].shape == (N, T - 1, 300) and out["mask"].shape == (N, T - 1)
    assert out["hidden"].shape == (N, T, 32) and out["hidden"].requires_grad
    token = torch.log_softmax(out["logits"], -1).gather(-1, ids[:, 1:, None])[..., 0] * out["mask"]
    assert torch.allclose(token, out["token_logps"], atol=1e-5)


def test_sequence_logps_rejects_a_response_mask_on_the_first_token():
    model = tiny("llama")
    ids, am, rm, _ = batch()
    rm[:, 0] = 1
    with pytest.raises(ValueError, match="first token"):
        M.sequence_logps(model, ids, am, rm)
    with pytest.raises(ValueError, match="same shape"):
        M.sequence_logps(model, ids, am[:, :-1], rm)


# --- LoRA, reference, bf16, gradient checkpointing -------------------------------------------

def test_lora_reference_is_exactly_the_base_model():
    base = tiny("llama")
    policy = M.apply_lora(copy.deepcopy(base), M.LoraSettings(r=4))
    ids, am, rm, _ = batch()
    with torch.no_grad():
        base_logps = M.sequence_logps(base, ids, am, rm)["logps"]
        assert torch.equal(M.sequence_logps(policy, ids, am, rm)["logps"], base_logps)  # B = 0
        perturb_lora(policy)
        policy_logps = M.sequence_logps(policy, ids, am, rm)["logps"]
    assert (policy_logps - base_logps).abs().min() > 1e-3
    ref = M.reference_forward(policy, ids, am, rm)
    assert torch.equal(ref["logps"], base_logps)
    assert not ref["logps"].requires_grad
    # adapters are back on after the context
    assert torch.equal(M.sequence_logps(policy, ids, am, rm)["logps"].detach(), policy_logps)


def test_reference_context_uses_ref_model_or_refuses():
    model, ref = tiny("llama", seed=0), tiny("llama", seed=1)
    with M.reference_context(model, ref) as r:
        assert r is ref and not torch.is_grad_enabled()
    with pytest.raises(ValueError, match="ref_model"):
        with M.reference_context(model):
            pass
    frozen = M.frozen_copy(model)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), frozen.parameters()))


def test_bf16_lora_with_gradient_checkpointing_trains_only_adapters():
    model = tiny("llama", dtype=torch.bfloat16)
    model.train()
    M.enable_gradient_checkpointing(model, lora=True)
    model = M.apply_lora(model, M.LoraSettings(r=4, alpha=8))
    assert model.base_model.model.is_activation_checkpointing
    ids, am, rm, _ = batch()
    out = M.sequence_logps(model, ids, am, rm, return_hidden=True)
    assert torch.isfinite(out["logps"]).all()
    (out["logps"].sum() + out["hidden"].float().sum()).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_gradient_checkpointing_does_not_change_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny("llama").train()
        if ckpt:
            M.enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing and not model.config.use_cache
        ids, am, rm, _ = batch()
        M.sequence_logps(model, ids, am, rm)["logps"].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_merge_lora_gives_a_plain_model_with_the_same_outputs():
    policy = M.apply_lora(tiny("llama"), M.LoraSettings(r=4))
    perturb_lora(policy)
    merged = M.merge_lora(policy)
    assert not M.is_peft(merged) and M.is_peft(policy)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids, am, rm, _ = batch()
    with torch.no_grad():
        a = M.sequence_logps(policy, ids, am, rm)["logps"]
        b = M.sequence_logps(merged, ids, am, rm)["logps"]
    assert torch.allclose(a, b, atol=1e-4)


def test_load_model_from_a_local_folder_in_each_dtype_and_with_lora(tmp_path, tokenizer):
    cfg = M.tiny_config("llama", tokenizer=tokenizer, d_model=32, n_layers=2, n_heads=2, max_len=32)
    assert cfg.vocab_size == len(tokenizer) and cfg.pad_token_id == tokenizer.pad_token_id
    model = M.build_model(cfg, seed=3).eval()
    model.save_pretrained(tmp_path)
    ids, am, rm, _ = batch(vocab=len(tokenizer))
    loaded = M.load_model(tmp_path, dtype="fp32").eval()
    with torch.no_grad():
        assert torch.equal(M.sequence_logps(model, ids, am, rm)["logps"],
                           M.sequence_logps(loaded, ids, am, rm)["logps"])
    assert next(M.load_model(tmp_path, dtype="bf16").parameters()).dtype == torch.bfloat16
    lora = M.load_model(tmp_path, dtype="fp32", lora=M.LoraSettings(r=2), gradient_checkpointing=True)
    assert M.is_peft(lora) and M.n_trainable(lora) == M.lora_param_count(cfg, 2)
    assert lora.base_model.model.is_activation_checkpointing
    with pytest.raises(ValueError, match="dtype"):
        M.load_model(tmp_path, dtype="int8")


def test_build_model_is_seeded():
    a, b, c = tiny(seed=0), tiny(seed=0), tiny(seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


# --- embeddings ------------------------------------------------------------------------------

def test_pooled_embeddings_is_normalised_masked_mean():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    e = M.pooled_embeddings(hidden, mask)
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1, 1:4].mean(0), hidden[2].mean(0)])
    assert torch.allclose(e, expected / expected.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3))
    # masked positions do not matter
    assert torch.equal(M.pooled_embeddings(torch.where(mask[..., None].bool(), hidden, 99.0), mask), e)


def test_pooled_embeddings_of_an_empty_mask_is_zero_without_nan():
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]])
    e = M.pooled_embeddings(hidden, mask)
    assert torch.equal(e[0], torch.zeros(3))
    e.sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.equal(hidden.grad[0], torch.zeros(4, 3))


def test_pair_embeddings_carry_gradient_into_the_policy():
    model = tiny("llama")
    ids, am, rm, pm = batch(n=4)
    out = M.sequence_logps(model, ids, am, rm, return_hidden=True)
    e_x, e_w, e_l = M.pair_embeddings(out["hidden"], pm, rm)
    assert e_x.shape == e_w.shape == e_l.shape == (2, 32)
    assert torch.allclose(e_l, M.pooled_embeddings(out["hidden"][2:], rm[2:]))
    ((e_x * e_w).sum() - (e_x * e_l).sum()).backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="2B"):
        M.pair_embeddings(out["hidden"][:3], pm[:3], rm[:3])


@pytest.fixture(scope="module")
def encoder():
    return M.SentenceEncoder(batch_size=2)


def test_sentence_encoder_gives_unit_384d_embeddings_without_grad(encoder):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply.",
             "The capital of France is Paris.", "Paris is France's capital city."]
    e = encoder(texts)
    assert e.shape == (5, 384) and not e.requires_grad
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[3, 4] > sim[3, 2] + 0.3  # paraphrases are closer
    one_by_one = torch.cat([encoder([t]) for t in texts])  # batching (padding) does not matter
    assert torch.allclose(one_by_one, e, atol=1e-5)
    with pytest.raises(ValueError, match="list"):
        encoder("a single string")
