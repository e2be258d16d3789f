"""Speed of kdpo_lab, measured (never asserted in a test): prints markdown tables.

    .venv/bin/python bench/bench.py            # the full tables (a few minutes on 2 CPU cores)
    .venv/bin/python bench/bench.py --quick    # fewer sizes and repeats (1-2 minutes)

1. Loss only: forward + backward of the preference loss from per-token log-probs, ours
   (`losses.kernel_dpo_loss`) against TRL 1.16's own loss code (`DPOTrainer._compute_loss`, fed the same
   per-token log-probs by a stub model), for link-form divergences, the hybrid kernel loss, HMK and the
   Wasserstein penalty (which needs [2B, T, V] logits).
2. Training step: one optimisation step of a tiny Llama built from a config (`training.train`, its own
   per-step timer in metrics.jsonl) for several losses, and TRL's DPOTrainer on the same model size and data.

Every figure is the median of several repeats after warm-up. See bench/README.md for what the columns mean.
"""
import argparse
import math
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from TRL / datasets (read when tqdm is imported)
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from kdpo_lab import batching, divergences, kernels, loading, models, suite, training
from kdpo_lab.config import TrainConfig
from kdpo_lab.losses import kernel_dpo_loss


def machine():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    import transformers
    import trl
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"- machine: {platform.node()}, {cores} cores available, load average (1/5/15 min) {load}\n"
            f"- torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}, "
            f"trl {trl.__version__}, python {platform.python_version()}\n"
            f"- device: {device}")


def median_ms(fn, repeats, warmup=2, budget_s=10.0):
    """Median wall time of fn() in ms over `repeats` calls after `warmup` calls, and the repeats made:
    fewer (at least 3) when one call is so slow that `repeats` would exceed budget_s."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = (time.perf_counter() - t0) / max(1, warmup)
    repeats = max(3, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), repeats


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(x):
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


# ------------------------------------------------------------------------------------------ 1. loss only

def loss_inputs(B, T, V, d, seed=0):
    """Per-token log-probs [2B, T-1] (grad), completion mask [2B, T], reference sums [B], embeddings, logits."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 4, T - 1, (2 * B,), generator=g)
    mask = (torch.arange(T)[None, :] >= T - 1 - lengths[:, None]).long()  # completion at the end of each row
    mask[:, 0] = 0
    token_logps = -2 * torch.rand(2 * B, T - 1, generator=g)
    ref = (token_logps * mask[:, 1:]).sum(-1) + torch.randn(2 * B, generator=g)  # log-ratios of a few nats
    return SimpleNamespace(
        token_logps=token_logps.requires_grad_(True), mask=mask, ref_w=ref[:B], ref_l=ref[B:],
        e=[torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).requires_grad_(True) for _ in range(3)],
        pi_logits=torch.randn(2 * B, T - 1, V, generator=g).requires_grad_(True),
        ref_logits=torch.randn(2 * B, T - 1, V, generator=g))


def ours(x, **kw):
    """kdpo_lab: mask and sum the per-token log-probs, then kernel_dpo_loss; forward + backward."""
    def step():
        logps = (x.token_logps * x.mask[:, 1:]).sum(-1)
        pi_w, pi_l = logps.chunk(2)
        extra = {}
        if kw.get("kernel") is not None:
            extra = dict(e_x=x.e[0], e_w=x.e[1], e_l=x.e[2])
        if kw.get("divergence_form") == "penalty":
            extra.update(pi_logits=x.pi_logits, ref_logits=x.ref_logits, response_mask=x.mask[:, 1:].float())
        loss, _ = kernel_dpo_loss(pi_w, pi_l, x.ref_w, x.ref_l, beta=0.1, **kw, **extra)
        loss.mean().backward()
    return step


def trl(x, f_divergence_type="reverse_kl", coef=0.5):
    """TRL 1.16's DPOTrainer._compute_loss on the same inputs: a stub model returns the (masked) per-token
    log-probs as its fused LM head would; precomputed reference log-probs; forward + backward."""
    from trl import DPOTrainer

    n, t = x.token_logps.shape[0], x.mask.shape[1]

    def model(**kwargs):
        return SimpleNamespace(log_probs=x.token_logps * x.mask[:, 1:], entropy=torch.zeros(n, t - 1),
                               mean_logits=torch.zeros(n, t - 1), is_top1=torch.zeros(n, t - 1, dtype=torch.bool))
    model.training = True
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda v: v, gather_for_metrics=lambda v: v)
    inputs = {"input_ids": torch.zeros(n, t, dtype=torch.long), "attention_mask": torch.ones(n, t, dtype=torch.long),
              "completion_mask": x.mask, "ref_chosen_logps": x.ref_w, "ref_rejected_logps": x.ref_l}

    def step():
        me = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                             precompute_ref_logps=True, f_divergence_type=f_divergence_type,
                             f_alpha_divergence_coef=coef, loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1,
                             label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
                             _total_train_tokens=0, _tp_size=1)
        DPOTrainer._compute_loss(me, model, inputs, return_outputs=False).backward()
    return step


def loss_variants(d):
    e = torch.nn.functional.normalize(torch.randn(512, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    return {
        "DPO (kl link)": (dict(divergence="kl"), dict(f_divergence_type="reverse_kl")),
        "JS link": (dict(divergence="js"), dict(f_divergence_type="js_divergence")),
        "alpha link (0.5)": (dict(divergence=divergences.get("alpha", alpha=0.5)),
                             dict(f_divergence_type="alpha_divergence", coef=0.5)),
        "hybrid RBF": (dict(kernel=kernels.get("rbf").fit(e), gamma=0.5), None),
        "HMK (eta 0.01)": (dict(kernel=kernels.get("hmk", dim=d).fit(e), gamma=0.5, eta=0.01), None),
        "Wasserstein penalty": (dict(divergence="wasserstein", divergence_form="penalty", lam=0.1), None),
    }


def bench_losses(sizes, repeats, T=32, V=512, d=256):
    rows = []
    for B in sizes:
        x = loss_inputs(B, T, V, d)
        base = None
        for name, (kw_ours, kw_trl) in loss_variants(d).items():
            ms, n = median_ms(ours(x, **kw_ours), repeats)
            base = base or ms
            ms_trl, _ = median_ms(trl(x, **kw_trl), repeats) if kw_trl is not None else (float("nan"), 0)
            rows.append({"loss": name, "B pairs": B, "kdpo_lab ms": ms, "TRL ms": ms_trl,
                         "kdpo_lab / TRL": ms / ms_trl, "x DPO (ours)": ms / base, "repeats": n})
    return rows


# ------------------------------------------------------------------------------------------ 2. training step

STEP_VARIANTS = {
    "DPO (kl)": dict(divergence="kl"),
    "hybrid RBF": dict(kernel="rbf", gamma=0.5),
    "HMK": dict(kernel="hmk", gamma=0.5, eta=0.01),
    "JS link": dict(divergence="js"),
    "Wasserstein penalty": dict(divergence="wasserstein", divergence_form="penalty", lam=0.1),
}
MODEL = dict(model="tiny-llama", d_model=256, n_layers=4, n_heads=4, vocab_size=1024)


def step_config(out, steps, **loss):
    return TrainConfig(output_dir=str(out), data=str(suite.SUITE_DIR), max_train_pairs=256, max_eval_pairs=8,
                                per_device_train_batch_size=8, max_steps=steps, warmup_steps=1, logging_steps=1, save_steps=10**6,
                                eval_generate=0, progress=False, learning_rate=5e-4, seed=0, **MODEL, **loss)


def bench_steps(steps, warmup, tmp, with_trl=True):
    import pandas as pd
    rows, lengths = [], None
    for name, loss in STEP_VARIANTS.items():
        out = training.train(step_config(Path(tmp) / name.split()[0], steps, **loss))
        times = pd.read_json(out / "metrics.jsonl", lines=True)["time/step_s"].iloc[warmup:]
        rows.append({"training": f"kdpo_lab {name}", "step ms": 1e3 * times.median(), "steps timed": len(times)})
        lengths = lengths or token_lengths(out)
    base = rows[0]["step ms"]
    for row in rows:
        row["x DPO (ours)"] = row["step ms"] / base
    if not with_trl:
        return rows, lengths, "not run (--skip-trl-trainer)"
    try:
        trl_ms, n, trl_lengths = trl_step(steps, warmup, tmp)
        rows.append({"training": "TRL DPOTrainer (sigmoid, precomputed reference)", "step ms": trl_ms,
                     "steps timed": n, "x DPO (ours)": trl_ms / base})
    except Exception as error:  # report, do not hide: the table says why the row is missing
        trl_lengths = f"TRL DPOTrainer failed: {type(error).__name__}: {error}"
    return rows, lengths, trl_lengths


def token_lengths(out):
    """Mean tokens per sequence (prompt + response) and mean padded width of 8-pair batches, our tokenisation."""
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    tok = models.load_tokenizer(out / "model")
    pairs, report = loading.read_pairs(cfg, "train", cfg.max_train_pairs)
    feats = loading.encode(cfg, tok, pairs, report, "train")
    seqs = [len(f["prompt_ids"]) + len(f[k]) for f in feats for k in ("chosen_ids", "rejected_ids")]
    widths = [batching.collate(feats[i:i + 8], tok.pad_token_id)["input_ids"].shape[1] for i in range(0, len(feats), 8)]
    return f"{sum(seqs) / len(seqs):.1f} tokens per sequence, padded batch width {sum(widths) / len(widths):.1f}", tok, pairs


def trl_step(steps, warmup, tmp):
    """TRL's DPOTrainer on the same Llama config, tokenizer and pairs (prompt rendered with the same chat
    template), 8 pairs per step, reference log-probs precomputed (as kdpo_lab does). ref_model must be
    given explicitly for a model built from a config (anchor-notes)."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    out = Path(tmp) / "DPO"
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    tok = models.load_tokenizer(out / "model")
    pairs, _ = loading.read_pairs(cfg, "train", cfg.max_train_pairs)
    dataset = datasets.Dataset.from_list([{"prompt": batching.render_prompt(p, tok), "chosen": p.chosen,
                                           "rejected": p.rejected} for p in pairs])
    model = models.build_model(models.tiny_config("llama", tokenizer=tok, d_model=MODEL["d_model"],
                                                  n_layers=MODEL["n_layers"], n_heads=MODEL["n_heads"],
                                                  max_len=cfg.max_length + 32), seed=0)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    args = DPOConfig(output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=5e-4, beta=0.1, logging_steps=10**6, save_strategy="no", report_to="none",
                     use_cpu=True, precompute_ref_log_probs=True, max_length=cfg.max_length, disable_tqdm=True,
                     dataloader_num_workers=0, seed=0, lr_scheduler_type="constant")
    trainer = DPOTrainer(model=model, ref_model=models.frozen_copy(model), args=args, train_dataset=dataset,
                         processing_class=tok, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict
    trainer.train()
    rows = trainer.train_dataset
    seqs = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    return 1e3 * statistics.median(times[warmup:]), len(times[warmup:]), f"{sum(seqs) / len(seqs):.1f} tokens per sequence"


# ------------------------------------------------------------------------------------------ main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, repeats and steps (1-2 minutes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-trl-trainer", action="store_true", help="do not time TRL's DPOTrainer step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames (gradient -> activation checkpointing)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quick = args.quick
    print(f"# kdpo_lab benchmark{' (--quick)' if quick else ''}\n\n{machine()}\n")

    repeats = 5 if quick else 15
    print(f"## 1. Loss only: forward + backward, T = 32 tokens, V = 512 (penalty), d = 256 (kernels); "
          f"median of {repeats} after 2 warm-up runs\n")
    rows = bench_losses([64] if quick else [64, 512], repeats)
    print(table(rows, ["loss", "B pairs", "kdpo_lab ms", "TRL ms", "kdpo_lab / TRL", "x DPO (ours)", "repeats"]))

    steps, warmup = (8, 3) if quick else (20, 5)
    print(f"\n## 2. One training step: tiny Llama (d = 256, 4 layers, 4 heads, BPE vocabulary <= 1024), 8 pairs, "
          f"AdamW; median of steps {warmup + 1}..{steps}\n")
    with tempfile.TemporaryDirectory(prefix="kdpo_bench_") as tmp:
        rows, (ours_len, _, _), trl_len = bench_steps(steps, warmup, tmp, with_trl=not args.skip_trl_trainer)
        print(table(rows, ["training", "step ms", "x DPO (ours)", "steps timed"]))
        print(f"\nsequence lengths: kdpo_lab {ours_len}; TRL {trl_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
