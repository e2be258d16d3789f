"""Run folders written by `kdpo sft` / `kdpo train`: read one back and evaluate it (`kdpo eval RUN`).

A run folder holds config.yaml (the TrainConfig it ran with), model/ (weights and tokenizer),
metrics.jsonl, eval.jsonl, kdpo_run.json (the folder's format) and checkpoint-NNNNNN/ folders.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from kdpo_lab import evaluation, formats, models
from kdpo_lab.config import CONFIG_MODELS, TrainConfig, resolve
from kdpo_lab.loading import check_model_source, encode, read_pairs
from kdpo_lab.reference_cache import Cache, cached_pair_logps, cached_samples


@dataclass
class EvalRequest:
    """What `kdpo eval` evaluates: a split of the run's data (or of other data), with how many samples.
    data: a preference file or folder in any of formats.FORMATS (default: the run's own data; a single
    file other than the run's is evaluated whole, up to max_eval_pairs rows). reward_model: a
    sequence-classification model (path or hub name) for rm/* rewards and win-rate on any data."""
    split: str = "test"
    n_generate: int = 128
    data: str | None = None
    reward_model: str | None = None
    max_new_tokens: int = 32


def evaluate_run(run, request=None, **fields):
    """Evaluate a folder written by `training.train`; writes RUN/eval_SPLIT.json and returns the metrics.
    Pass an EvalRequest or its fields (split=..., n_generate=...).

    The reference is the run's starting model (`model` in its config.yaml); a LoRA run's reference is
    its base with adapters disabled. A reference in a local folder keeps its log-probs and samples of
    the split in its reference_cache/ (kdpo_lab.reference_cache), so the runs of one reference share them."""
    request = request or EvalRequest(**fields)
    run = Path(run)
    if not (run / "config.yaml").exists() or not (run / "model").exists():
        raise ValueError(f"{run}: not a finished run (expected config.yaml and model/ written by `kdpo train`)")
    cfg = TrainConfig.from_yaml(run / "config.yaml")
    cfg.output_dir = str(run)
    if request.reward_model:
        check_model_source(request.reward_model, "--reward-model")
    tokenizer = models.load_tokenizer(run / "model")
    if (run / "model" / "adapter_config.json").exists():
        from peft import PeftModel
        check_model_source(cfg.model)
        model, ref_model = PeftModel.from_pretrained(models.load_model(cfg.model, dtype=cfg.dtype), run / "model"), None
    else:
        if cfg.model in CONFIG_MODELS:
            raise ValueError(f"{run}: trained from a random {cfg.model}; evaluate against a saved reference instead")
        check_model_source(cfg.model)
        model, ref_model = models.load_model(run / "model", dtype=cfg.dtype), models.load_model(cfg.model, dtype=cfg.dtype)
    if cfg.max_length == "auto":  # the run's config.yaml keeps "auto"; the model's own limit is the best guess
        cfg.max_length = min(4096, getattr(model.config, "max_position_embeddings", 4096) - 32)
    pairs, report = _pairs(cfg, request)
    feats = encode(cfg, tokenizer, pairs, report, request.split)
    cache = Cache.open(cfg.model, cfg.dtype, next(ref_model.parameters()).device) if ref_model is not None else None
    ref_logps, ref_samples = _reference_outputs(cache, (model, ref_model, tokenizer), feats, request, cfg.seed)
    result = evaluation.evaluate(model, ref_model, tokenizer, pairs, feats, beta=cfg.beta, n_generate=request.n_generate,
                                 seed=cfg.seed, max_new_tokens=request.max_new_tokens, ref_logps=ref_logps,
                                 reward_model=request.reward_model, ref_samples=ref_samples)
    result["data"] = f"{request.data or cfg.data} ({request.split}, {len(pairs)} pairs)"
    (run / f"eval_{request.split}.json").write_text(json.dumps(result, indent=1))
    return result


def _reference_outputs(cache, models_, feats, request, seed):
    """(ref_logps, ref_samples) for evaluation.evaluate from the reference's cache; (None, None) without one
    (evaluate then computes them itself, the same way)."""
    if cache is None:
        return None, None
    model, ref_model, tokenizer = models_
    pad_id = tokenizer.pad_token_id
    ref_logps = cached_pair_logps(cache, feats, 32, lambda: evaluation.pair_logps(ref_model, feats, pad_id, 32))
    if request.n_generate <= 0:
        return ref_logps, None
    prompts = [f["prompt_ids"] for f in feats[:request.n_generate]]
    settings = {"seed": seed, "max_new_tokens": request.max_new_tokens, "batch_size": 32,
                "eos": tokenizer.eos_token_id, "pad": pad_id}
    samples = cached_samples(cache, prompts, settings, lambda: evaluation.reference_samples(
        model, ref_model, tokenizer, prompts, request.max_new_tokens, seed))
    return ref_logps, samples


def _pairs(cfg, request):
    """The pairs to evaluate: the run's held-out split, or another file read whole (up to max_eval_pairs).
    At least n_generate pairs of the split are read (`kdpo eval --n-generate 1000` scores 1,000 test
    prompts of a run trained with max_eval_pairs 256); which rows a single file holds out does not change."""
    if request.data is None or request.data == cfg.data:
        return read_pairs(cfg, request.split, max(cfg.max_eval_pairs, request.n_generate))
    cfg.data = request.data
    if Path(resolve(request.data)).is_file():
        pairs, report = formats.load_pairs(resolve(request.data), strict=cfg.strict, limit=cfg.max_eval_pairs)
        report.source = f"{request.data} (all rows)"
        return pairs, report
    return read_pairs(cfg, request.split, cfg.max_eval_pairs)
