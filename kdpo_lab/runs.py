"""Run folders written by `kdpo sft` / `kdpo train`: read one back and evaluate it (`kdpo eval RUN`).

A run folder holds config.yaml (the TrainConfig it ran with), model/ (weights and tokenizer),
metrics.jsonl, eval.jsonl and checkpoint/.
"""
import json
from pathlib import Path

from kdpo_lab import evaluation, models
from kdpo_lab.config import CONFIG_MODELS, TrainConfig
from kdpo_lab.loading import encode, read_pairs


def evaluate_run(run, split="test", n_generate=128):
    """Evaluate a folder written by `training.train` on a data split; writes RUN/eval_SPLIT.json.

    The reference is the run's starting model (`model` in its config.yaml); a LoRA run's reference is
    its base with adapters disabled."""
    run = Path(run)
    if not (run / "config.yaml").exists() or not (run / "model").exists():
        raise ValueError(f"{run}: not a finished run (expected config.yaml and model/ written by `kdpo train`)")
    cfg = TrainConfig.from_yaml(run / "config.yaml")
    tokenizer = models.load_tokenizer(run / "model")
    if (run / "model" / "adapter_config.json").exists():
        from peft import PeftModel
        model, ref_model = PeftModel.from_pretrained(models.load_model(cfg.model, dtype=cfg.dtype), run / "model"), None
    else:
        if cfg.model in CONFIG_MODELS:
            raise ValueError(f"{run}: trained from a random {cfg.model}; evaluate against a saved reference instead")
        model, ref_model = models.load_model(run / "model", dtype=cfg.dtype), models.load_model(cfg.model, dtype=cfg.dtype)
    pairs, report = read_pairs(cfg, split, cfg.max_eval_pairs)
    feats = encode(cfg, tokenizer, pairs, report, split)
    result = evaluation.evaluate(model, ref_model, tokenizer, pairs, feats, beta=cfg.beta, n_generate=n_generate, seed=cfg.seed)
    (run / f"eval_{split}.json").write_text(json.dumps(result, indent=1))
    return result
