"""From a run configuration to data and a model: read the splits, build or load model and tokenizer, tokenise.

Rows that do not fit max_length are cut (prompt from the left, responses from the right) or, when the
cut responses become identical, skipped. The terminal gets one line per split (`DataReport.headline`:
how many rows were skipped or cut, token-length percentiles, and the max_length that would keep 95%
of the tokens); every row's problem goes to OUTPUT_DIR/data_report.txt.
"""
import math
from pathlib import Path

import torch

from kdpo_lab import batching, formats, models
from kdpo_lab.config import CONFIG_MODELS, resolve
from kdpo_lab.pairs import DataReport, length_for_token_share

AUTO_MAX = 4096   # --max-length auto never goes above this
TOKEN_SHARE = 0.95


def read_pairs(cfg, split, limit=0):
    """Load one split as PreferencePairs (bad rows skipped and reported, or fatal with strict).

    A folder holds one file per split (train.jsonl, validation.jsonl, ...). A single file is split here:
    a seeded 10% (at most max_eval_pairs) is held out as "validation" (also used for "test")."""
    data = resolve(cfg.data)
    if Path(data).is_file():
        pairs, report = formats.load_pairs(data, strict=cfg.strict)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_held = max(1, min(cfg.max_eval_pairs, len(pairs) // 10))
        rows = order[n_held:] if split == "train" else order[:n_held]
        pairs = [pairs[i] for i in sorted(rows)][:limit or None]
    else:
        pairs, report = formats.load_pairs(data, split=split, strict=cfg.strict, limit=limit or None)
    if cfg.families:
        keep = set(cfg.families.split(","))
        pairs = [p for p in pairs if p.family in keep]
    report.source = f"{cfg.data} ({split})"
    return pairs, report


def encode(cfg, tokenizer, pairs, report, split):
    """Tokenise pairs; one line on the terminal when rows were skipped or cut, every row's problem in
    OUTPUT_DIR/data_report.txt. Never fails for dropped rows, only when none is left.
    `pairs` is updated in place to the pairs that were encoded, so pairs[i] and features[i] stay aligned."""
    features = batching.encode_pairs(pairs, tokenizer, max_length=cfg.max_length,
                                     max_prompt_length=cfg.max_prompt_length, report=report)
    report.n_used = len(features)
    pairs[:] = [pairs[f["index"]] for f in features]
    for i, f in enumerate(features):
        f["index"] = i
    headline = report.headline(cfg.max_length, TOKEN_SHARE)
    if headline:
        path = Path(cfg.output_dir) / "data_report.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(report.summary() + "\n")
        print(f"{headline}. Every row: {path}")
    if not features:
        raise ValueError(f"{cfg.data} ({split}): no usable preference pairs (see {cfg.output_dir}/data_report.txt)")
    return features


def auto_lengths(cfg, tokenizer, pairs):
    """(max_length, max_prompt_length) for max_length="auto": the lengths that keep 95% of the training
    tokens of whole sequences and of prompts (max_length at most AUTO_MAX; the prompt share at least
    cfg.max_prompt_length and at most half of max_length)."""
    report = DataReport()
    feats = batching.encode_pairs(pairs, tokenizer, max_length=10**9, report=report)
    max_length = min(AUTO_MAX, length_for_token_share(report.lengths, TOKEN_SHARE))
    prompt = length_for_token_share([len(f["prompt_ids"]) for f in feats], TOKEN_SHARE)
    return max_length, max(1, min(max(cfg.max_prompt_length, prompt), max_length // 2))


def load_splits(cfg):
    """(model, tokenizer, train pairs and features, validation pairs and features).
    Starts OUTPUT_DIR/data_report.txt afresh; resolves max_length="auto" (cfg is updated)."""
    (Path(cfg.output_dir) / "data_report.txt").unlink(missing_ok=True)
    train_pairs, train_report = read_pairs(cfg, "train", cfg.max_train_pairs)
    eval_pairs, eval_report = read_pairs(cfg, "validation", cfg.max_eval_pairs)
    tokenizer = build_tokenizer(cfg, batching.sft_texts(train_pairs))
    if cfg.max_length == "auto":
        cfg.max_length, cfg.max_prompt_length = auto_lengths(cfg, tokenizer, train_pairs)
        print(f"max_length auto: {cfg.max_length} (max_prompt_length {cfg.max_prompt_length}) keeps "
              f"{TOKEN_SHARE:.0%} of the training tokens")
    model = build_model(cfg, tokenizer)
    train_feats = encode(cfg, tokenizer, train_pairs, train_report, "train")
    eval_feats = encode(cfg, tokenizer, eval_pairs, eval_report, "validation")
    return model, tokenizer, train_pairs, train_feats, eval_pairs, eval_feats


def check_model_source(name, field="model"):
    """A local folder that exists, a config model, or something shaped like a hub name; else one ValueError."""
    path = Path(name)
    if name in CONFIG_MODELS or path.exists():
        return
    if path.is_absolute() or name.startswith(".") or len(path.parts) > 2:
        hint = " (run `kdpo sft configs/sft_tiny.yaml` first)" if "sft" in name else ""
        raise ValueError(f"{field}: no such folder {name}{hint}; give a model folder, a hub name or one of "
                         f"{', '.join(CONFIG_MODELS)}")


def build_tokenizer(cfg, train_texts=None):
    """cfg.tokenizer, else the model's, else (config models) a BPE trained on train_texts."""
    if cfg.tokenizer:
        check_model_source(cfg.tokenizer, "tokenizer")
        return models.load_tokenizer(cfg.tokenizer)
    if cfg.model in CONFIG_MODELS:
        return models.build_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    check_model_source(cfg.model)
    return models.load_tokenizer(cfg.model)


def build_model(cfg, tokenizer):
    """The policy for cfg.model: built from a config (sized to the tokenizer and max_length) or loaded."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    if cfg.model in CONFIG_MODELS:
        if cfg.model == "llama-7b-shape":
            config = models.llama_7b_config(scale=cfg.model_scale, vocab_size=len(tokenizer))
        else:
            config = models.tiny_config(cfg.model.split("-")[1], vocab_size=len(tokenizer), d_model=cfg.d_model,
                                        n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_len=cfg.max_length + 32)
        model = models.build_model(config, seed=cfg.seed, dtype=dtype)
    else:
        check_model_source(cfg.model)
        model = models.load_model(cfg.model, dtype=cfg.dtype)
    if cfg.gradient_checkpointing:
        models.enable_gradient_checkpointing(model, lora=cfg.lora_r > 0)
    if cfg.lora_r:
        model = models.apply_lora(model, models.LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    return model


def build_or_load(cfg, train_texts=None):
    """Return (model, tokenizer) for cfg.model: built from a config, or loaded from a path / hub name."""
    tokenizer = build_tokenizer(cfg, train_texts)
    return build_model(cfg, tokenizer), tokenizer


def pair_offsets(cfg, pairs):
    """ODPO offsets delta [n] for `pairs` (Amini et al. 2024, "Direct Preference Optimization with an
    Offset": delta = alpha * log of the score gap), or None when cfg sets no offset:
        delta_i = cfg.offset + cfg.odpo_alpha * log(max(score_chosen_i - score_rejected_i, 1e-3))
    The scores come from the rows' score_chosen / score_rejected fields (UltraFeedback-binarized has them;
    kept in pair.meta by formats). A gap below 1e-3 (ties, or a row scored the wrong way) is floored
    there: the principled choice for log of a non-positive gap the paper leaves undefined."""
    if not cfg.offset and not cfg.odpo_alpha:
        return None
    delta = torch.full((len(pairs),), float(cfg.offset))
    if cfg.odpo_alpha:
        missing = [p.source for p in pairs if not {"score_chosen", "score_rejected"} <= set(p.meta)]
        if missing:
            raise ValueError(f"odpo_alpha needs score_chosen and score_rejected in every row; {len(missing)} rows "
                             f"lack them (first: {missing[0]})")
        gaps = [float(p.meta["score_chosen"]) - float(p.meta["score_rejected"]) for p in pairs]
        delta += cfg.odpo_alpha * torch.tensor([math.log(max(g, 1e-3)) for g in gaps])
    return delta
