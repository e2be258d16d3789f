"""Speed of kdpo_lab, measured (never asserted in a test): prints markdown tables.

    .venv/bin/python bench/bench.py --threads 1           # the full tables (10-20 minutes on 2 busy CPU cores)
    .venv/bin/python bench/bench.py --threads 1 --quick   # fewer sizes, repeats, rounds and steps

1. Loss only: forward + backward of the preference loss from per-token log-probs, ours
   (`losses.kernel_dpo_loss`) against TRL 1.16's own loss code (`DPOTrainer._compute_loss`, fed the same
   per-token log-probs by a stub model), for link-form divergences, the hybrid kernel loss, HMK and the
   Wasserstein penalty (which needs [2B, T, V] logits).
2. Training step: one optimisation step of a tiny Llama built from a config (`training.train`, its own
   per-step timer in metrics.jsonl) for several losses, and TRL's DPOTrainer on the same model size and data.
3. Long responses: the same step with ~256-token responses (DPO against the Wasserstein penalty).

Variants are interleaved (round-robin, so a load change on a shared machine hits all of them alike); every
figure is a median after warm-up of the process's CPU time (time spent descheduled by other jobs on a shared
machine is not counted; wall time is shown for the loss). CPU only: no GPU figure is measured here.
See bench/README.md.
"""
import argparse
import json
import math
import os
import random

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

from kdpo_lab import batching, divergences, kernels, loading, models, ordering, suite, training
from kdpo_lab.config import TrainConfig
from kdpo_lab.losses import kernel_dpo_loss


def machine():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    import transformers
    import trl
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = ("" if torch.cuda.is_available() else
           "\n- CPU only: no GPU measured (no GPU figure: tokens per second on a GPU, model FLOPs utilisation)")
    return (f"- machine: {platform.node()}, {cores} cores available, load average (1/5/15 min) {load}\n"
            f"- torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}, "
            f"trl {trl.__version__}, python {platform.python_version()}\n"
            f"- device: {device}{gpu}")


def interleaved_ms(fns, repeats, warmup=2, budget_s=20.0):
    """{name: (median wall ms, median CPU ms, repeats)} of the calls fns[name]() made round-robin: `warmup`
    rounds untimed, then `repeats` timed rounds (fewer, at least 3, when a round would exceed budget_s)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    per_round = (time.perf_counter() - t0) / max(1, warmup)
    repeats = max(3, min(repeats, int(budget_s / max(per_round, 1e-9))))
    wall, cpu = defaultdict(list), defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {name: (1e3 * statistics.median(wall[name]), 1e3 * statistics.median(cpu[name]), repeats) for name in fns}


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
        "HMK (eta 0.01)": (dict(kernel=kernels.get("hmk").fit(e), gamma=0.5, eta=0.01), None),
        "Wasserstein penalty": (dict(divergence="wasserstein", divergence_form="penalty", lam=0.1), None),
        "Wasserstein, embedding ground": (dict(divergence=divergences.get("wasserstein", token_embeddings=torch.randn(
            512, 64, generator=torch.Generator().manual_seed(2))), divergence_form="penalty", lam=0.1), None),
    }


def bench_losses(sizes, repeats, T=32, V=512, d=256):
    rows = []
    for B in sizes:
        x = loss_inputs(B, T, V, d)
        fns = {}
        for name, (kw_ours, kw_trl) in loss_variants(d).items():
            fns[name] = ours(x, **kw_ours)
            if kw_trl is not None:
                fns["TRL " + name] = trl(x, **kw_trl)
        timed = interleaved_ms(fns, repeats)
        base = timed["DPO (kl link)"][1]
        for name in loss_variants(d):
            wall, cpu, n = timed[name]
            cpu_trl = timed["TRL " + name][1] if "TRL " + name in timed else float("nan")
            rows.append({"loss": name, "B pairs": B, "kdpo_lab CPU ms": cpu, "kdpo_lab wall ms": wall,
                         "TRL CPU ms": cpu_trl, "kdpo_lab / TRL": cpu / cpu_trl, "x DPO (ours)": cpu / base,
                         "repeats": n})
    return rows


# ------------------------------------------------------------------------------------------ 2. training step

STEP_VARIANTS = {
    "DPO (kl)": dict(divergence="kl"),
    "DPO (kl), length-grouped": dict(divergence="kl"),
    "hybrid RBF": dict(kernel="rbf", gamma=0.5),
    "HMK": dict(kernel="hmk", gamma=0.5, eta=0.01),
    "JS link": dict(divergence="js"),
    "Wasserstein penalty": dict(divergence="wasserstein", divergence_form="penalty", lam=0.1),
}
MODEL = dict(model="tiny-llama", d_model=256, n_layers=4, n_heads=4, vocab_size=1024)


def step_config(out, steps, data=None, max_length=96, **loss):
    return TrainConfig(output_dir=str(out), data=str(data or suite.SUITE_DIR), max_train_pairs=256, max_eval_pairs=8,
                       per_device_train_batch_size=8, max_steps=steps, warmup_steps=1, logging_steps=1, save_steps=10**6,
                       eval_generate=0, progress=False, learning_rate=5e-4, seed=0, max_length=max_length, **MODEL,
                       **loss)


def ours_step(name, loss, out, steps, warmup, data=None, max_length=96):
    """CPU times (s) of the steps of one training.train run after `warmup` steps."""
    import pandas as pd
    grouped = "length-grouped" in name
    run = training.train(step_config(out, steps, data, max_length, group_by_length=grouped, **loss))
    # time/step_cpu_s: the process's CPU time per step; on a shared machine descheduled time is no step's cost
    return list(pd.read_json(run / "metrics.jsonl", lines=True)["time/step_cpu_s"].iloc[warmup:]), run


TRL_FP32 = "TRL DPOTrainer (sigmoid, precomputed reference; fp32, as ours)"
TRL_BF16 = "TRL DPOTrainer, its CPU default (bf16 autocast)"


def bench_steps(variants, steps, warmup, rounds, tmp, with_trl=True, data=None, max_length=96):
    """Median step ms per variant, the variants run round-robin `rounds` times (each run: `steps` steps, the
    first `warmup` untimed); TRL's DPOTrainer takes its turns in every round, in fp32 as ours (`bf16=False`:
    the comparison on the same model, data, batch and precision) and at its own CPU default (DPOConfig's
    bf16=True: autocast), for information. "x TRL" is against the fp32 row."""
    times, runs, trl_info = defaultdict(list), {}, ""
    for r in range(rounds):
        for name, loss in variants.items():
            t, runs[name] = ours_step(name, loss, Path(tmp) / f"{name.split()[0]}{r}", steps, warmup, data, max_length)
            times[f"kdpo_lab {name}"] += t
        for label, bf16 in ((TRL_FP32, False), (TRL_BF16, True)) if with_trl else ():
            try:
                t, trl_info = trl_step(steps, warmup, runs[next(iter(variants))], max_length, bf16)
                times[label] += t
            except Exception as error:  # report, do not hide: the table says why the row is missing
                trl_info = f"TRL DPOTrainer failed: {type(error).__name__}: {error}"
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    base = med[f"kdpo_lab {next(iter(variants))}"]
    trl_ms = med.get(TRL_FP32, float("nan"))
    rows = [{"training": k, "step CPU ms": v, "x DPO (ours)": v / base, "x TRL": v / trl_ms,
             "steps timed": len(times[k])} for k, v in med.items()]
    return rows, runs, trl_info or "not run (--skip-trl-trainer)"


def token_lengths(out):
    """Mean tokens per sequence (prompt + response) and mean padded width of 8-pair batches over one epoch, in the
    plain and the length-grouped order, our tokenisation."""
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    tok = models.load_tokenizer(out / "model")
    pairs, report = loading.read_pairs(cfg, "train", cfg.max_train_pairs)
    feats = loading.encode(cfg, tok, pairs, report, "train")
    seqs = [len(f["prompt_ids"]) + len(f[k]) for f in feats for k in ("chosen_ids", "rejected_ids")]
    lengths, n, b = ordering.pair_lengths(feats), len(feats), cfg.per_device_train_batch_size
    width = lambda ls: statistics.mean(max(lengths[i] for i in ordering.batch_indices(n, b, s, cfg.seed, ls))
                                       for s in range(n // b))
    return (f"{sum(seqs) / len(seqs):.1f} tokens per sequence, padded batch width {width(None):.1f} "
            f"(length-grouped: {width(lengths):.1f})")


def trl_step(steps, warmup, out, max_length=96, bf16=False):
    """TRL's DPOTrainer on the same Llama config, tokenizer and pairs (prompt rendered with the same chat
    template), 8 pairs per step, reference log-probs precomputed (as kdpo_lab does). ref_model must be
    given explicitly for a model built from a config (anchor-notes). bf16: DPOConfig's bf16, which TRL
    turns on by default, on CPU too (autocast); kdpo_lab trains in fp32 unless asked."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
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
            self.t0 = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.process_time() - self.t0)

    args = DPOConfig(output_dir=str(out.parent / "trl"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=5e-4, beta=0.1, logging_steps=10**6, save_strategy="no", report_to="none",
                     use_cpu=True, precompute_ref_log_probs=True, max_length=cfg.max_length, disable_tqdm=True,
                     dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", bf16=bf16)
    trainer = DPOTrainer(model=model, ref_model=models.frozen_copy(model), args=args, train_dataset=dataset,
                         processing_class=tok, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict
    trainer.train()
    rows = trainer.train_dataset
    seqs = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    return times[warmup:], f"{sum(seqs) / len(seqs):.1f} tokens per sequence"


# ------------------------------------------------------------------------------------------ main

def long_response_data(folder, n=96, chars=760, seed=0):
    """A suite-like data folder whose responses run to ~256 tokens (`chars` characters, ~3 per token): each
    chosen / rejected response is its own suite response followed by other suite responses of the same kind
    (chosen after chosen), cut to `chars` characters."""
    rows = [json.loads(line) for line in (Path(suite.SUITE_DIR) / "train.jsonl").read_text().splitlines()[:2000]]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("validation", 16), ("test", 16)):
        out = []
        for row in rng.sample(rows, count):
            row = dict(row)
            for key in ("chosen", "rejected"):
                while len(row[key]) < chars:
                    row[key] += " " + rng.choice(rows)[key]
                row[key] = row[key][:chars]
            out.append(json.dumps(row))
        (folder / f"{split}.jsonl").write_text("\n".join(out) + "\n")
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, repeats, rounds and steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-trl-trainer", action="store_true", help="do not time TRL's DPOTrainer step")
    parser.add_argument("--skip-long", action="store_true", help="skip table 3 (256-token responses)")
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
          f"variants interleaved, median of {repeats} rounds after 2 warm-up rounds\n")
    rows = bench_losses([64] if quick else [64, 512], repeats)
    print(table(rows, ["loss", "B pairs", "kdpo_lab CPU ms", "kdpo_lab wall ms", "TRL CPU ms", "kdpo_lab / TRL",
                       "x DPO (ours)", "repeats"]))

    steps, warmup, rounds = (8, 3, 2) if quick else (12, 3, 3)
    print(f"\n## 2. One training step: tiny Llama (d = 256, 4 layers, 4 heads, BPE vocabulary <= 1024), 8 pairs, "
          f"AdamW; {rounds} interleaved round(s) of {steps} steps per variant, median of steps {warmup + 1}..{steps} "
          f"of every round\n")
    with tempfile.TemporaryDirectory(prefix="kdpo_bench_") as tmp:
        rows, runs, trl_len = bench_steps(STEP_VARIANTS, steps, warmup, rounds, tmp, with_trl=not args.skip_trl_trainer)
        print(table(rows, ["training", "step CPU ms", "x DPO (ours)", "x TRL", "steps timed"]))
        print(f"\nsequence lengths: kdpo_lab {token_lengths(runs['DPO (kl)'])}; TRL {trl_len}")
        if args.skip_long:
            return 0
        long_steps, long_warmup = (5, 2) if quick else (8, 2)
        print(f"\n## 3. Long responses (~256 tokens): as table 2, max_length 400; {rounds} interleaved round(s) of "
              f"{long_steps} steps, median of steps {long_warmup + 1}..{long_steps}\n")
        data = long_response_data(Path(tmp) / "long_data")
        variants = {k: STEP_VARIANTS[k] for k in ("DPO (kl)", "DPO (kl), length-grouped", "Wasserstein penalty")}
        rows, runs, _ = bench_steps(variants, long_steps, long_warmup, rounds, Path(tmp) / "long", with_trl=False,
                                    data=data, max_length=400)
        print(table(rows, ["training", "step CPU ms", "x DPO (ours)", "steps timed"]))
        print(f"\nsequence lengths: kdpo_lab {token_lengths(runs['DPO (kl)'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
