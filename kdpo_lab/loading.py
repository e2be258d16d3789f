"""From a run configuration to data and a model: read the splits, build or load model and tokenizer, tokenise."""
from pathlib import Path

import torch

from kdpo_lab import batching, formats, models
from kdpo_lab.config import CONFIG_MODELS


def read_pairs(cfg, split, limit=0):
    """Load one split as PreferencePairs (bad rows skipped and reported, or fatal with strict).

    A folder holds one file per split (train.jsonl, validation.jsonl, ...). A single file is split here:
    a seeded 10% (at most max_eval_pairs) is held out as "validation" (also used for "test")."""
    if Path(cfg.data).is_file():
        pairs, report = formats.load_pairs(cfg.data, strict=cfg.strict)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_held = max(1, min(cfg.max_eval_pairs, len(pairs) // 10))
        rows = order[n_held:] if split == "train" else order[:n_held]
        pairs = [pairs[i] for i in sorted(rows)][:limit or None]
    else:
        pairs, report = formats.load_pairs(cfg.data, split=split, strict=cfg.strict, limit=limit or None)
    if cfg.families:
        keep = set(cfg.families.split(","))
        pairs = [p for p in pairs if p.family in keep]
    return pairs, report


def encode(cfg, tokenizer, pairs, report, split):
    """Tokenise pairs; print the data report when anything was skipped or truncated."""
    features = batching.encode_pairs(pairs, tokenizer, max_length=cfg.max_length,
                                  max_prompt_length=cfg.max_prompt_length, report=report)
    if report.problems or report.n_prompt_truncated:
        print(report.summary())
    if not features:
        raise ValueError(f"{cfg.data} ({split}): no usable preference pairs")
    if len(features) != len(pairs):
        raise ValueError(f"{cfg.data} ({split}): encode_pairs kept {len(features)} of {len(pairs)} pairs")
    return features


def load_splits(cfg):
    """(model, tokenizer, train pairs and features, validation pairs and features)."""
    train_pairs, train_report = read_pairs(cfg, "train", cfg.max_train_pairs)
    eval_pairs, eval_report = read_pairs(cfg, "validation", cfg.max_eval_pairs)
    model, tokenizer = build_or_load(cfg, batching.sft_texts(train_pairs))
    train_feats = encode(cfg, tokenizer, train_pairs, train_report, "train")
    eval_feats = encode(cfg, tokenizer, eval_pairs, eval_report, "validation")
    return model, tokenizer, train_pairs, train_feats, eval_pairs, eval_feats


def build_or_load(cfg, train_texts=None):
    """Return (model, tokenizer) for cfg.model: built from a config, or loaded from a path / hub name."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    if cfg.model in CONFIG_MODELS:
        if cfg.tokenizer:
            tokenizer = models.load_tokenizer(cfg.tokenizer)
        else:
            tokenizer = models.build_tokenizer(train_texts, vocab_size=cfg.vocab_size)
        if cfg.model == "llama-7b-shape":
            config = models.llama_7b_config(scale=cfg.model_scale, vocab_size=len(tokenizer))
        else:
            config = models.tiny_config(cfg.model.split("-")[1], vocab_size=len(tokenizer), d_model=cfg.d_model,
                                        n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_len=cfg.max_length + 32)
        model = models.build_model(config, seed=cfg.seed, dtype=dtype)
    else:
        tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.model)
        model = models.load_model(cfg.model, dtype=cfg.dtype)
    if cfg.gradient_checkpointing:
        models.enable_gradient_checkpointing(model, lora=cfg.lora_r > 0)
    if cfg.lora_r:
        model = models.apply_lora(model, models.LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    return model, tokenizer
