"""Training: an SFT stage for the reference and the DPO-Kernels loop, one readable loop on accelerate.

The same code runs on a CPU, one GPU, or many (`accelerate launch -m kdpo_lab.cli train ...` with
DDP, FSDP or DeepSpeed). One optimisation step:

    batch  = pairs[order[step]]                 order = a seeded permutation per epoch (resumable)
    logps  = one forward of [chosen; rejected]  (2B rows, response tokens summed)
    ref    = precomputed once (or a no-grad forward when the penalty form needs reference logits)
    e_x, e_w, e_l = pooled hidden states        (policy's own, with gradient) or a frozen encoder
    loss   = kernel_dpo_loss(...)               kdpo_lab.losses
    AdamW on the policy (and on the kernel's parameters, lr `kernel_lr`), warm-up + cosine schedule.

A checkpoint (`OUT/checkpoint/`) holds model, optimiser, scheduler, kernel, RNG and the step; the data
position follows from the step, so `resume=True` continues exactly where a killed run stopped.
Metrics go to `OUT/metrics.jsonl` (one JSON object per logged step, `pandas.read_json(lines=True)`).
"""
import json
import math
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from kdpo_lab import batching, divergences, evaluation, kernels, models
from kdpo_lab.config import SFTConfig, TrainConfig
from kdpo_lab.loading import load_splits
from kdpo_lab.losses import kernel_dpo_loss


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _divergence(cfg):
    params = {"renyi": {"order": cfg.order}, "alpha": {"alpha": cfg.alpha}}.get(cfg.divergence, {})
    return divergences.get(cfg.divergence, **params)


def _needs_ref_logits(cfg):
    div = _divergence(cfg)
    return cfg.divergence_form == "penalty" or (cfg.divergence_form == "auto" and not div.has_link)


# ----------------------------------------------------------------------------- forward pieces

def batch_forward(model, batch, need_hidden, need_logits):
    return models.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                 return_hidden=need_hidden, return_logits=need_logits)


def reference_logps(model, ref_model, features, pad_id, batch_size):
    """Sequence log-probs of chosen and rejected under the reference, once for the whole set: [n], [n]."""
    with models.reference_context(model, ref_model) as ref:
        ref.eval()
        return evaluation.pair_logps(ref, features, pad_id, batch_size)


def encoder_embeddings(pairs, encoder):
    """Frozen-encoder embeddings of (prompt, chosen, rejected) for every pair: [n, 3, d]."""
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    return encoder(texts).reshape(len(pairs), 3, -1)


# ----------------------------------------------------------------------------- the loop

def lr_lambda(cfg):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def batch_indices(n, batch, step, seed):
    """Indices of global batch `step`: a fresh seeded permutation each epoch, so a step fixes the position."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch:(k + 1) * batch].tolist()


def _start(cfg):
    """Output folder, accelerator and seeds: the first lines of every run."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    set_seed(cfg.seed)
    cfg.save(out / "config.yaml")
    return out, accelerator


def _batch(feats, idx, pad_id, device):
    """The collated [chosen; rejected] batch of pairs `idx`, on `device`."""
    return {k: v.to(device) for k, v in batching.collate([feats[i] for i in idx], pad_id).items()}


def _save_model(accelerator, model, tokenizer, out, merge=False):
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if merge and models.is_peft(unwrapped):
            unwrapped = models.merge_lora(unwrapped, inplace=True)
        unwrapped.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")


def train(cfg: TrainConfig, ref_model=None):
    """Train a policy with the DPO-Kernels loss. Returns the output folder (a Path)."""
    out, accelerator = _start(cfg)

    model, tokenizer, train_pairs, train_feats, eval_pairs, eval_feats = load_splits(cfg)
    pad_id = tokenizer.pad_token_id
    if ref_model is None and cfg.lora_r == 0:
        ref_model = models.frozen_copy(model)  # with LoRA the reference is the base, adapters disabled
    device = accelerator.device
    model.to(device)
    if ref_model is not None:
        ref_model.to(device).eval().requires_grad_(False)

    div = _divergence(cfg)
    need_ref_logits = _needs_ref_logits(cfg)
    kernel = kernels.get(cfg.kernel).to(device) if cfg.kernel else None
    encoder = models.SentenceEncoder() if kernel is not None and cfg.embeddings == "encoder" else None
    enc_train = encoder_embeddings(train_pairs, encoder) if encoder else None
    ref_w = ref_l = None
    if not need_ref_logits:
        ref_w, ref_l = reference_logps(model, ref_model, train_feats, pad_id, 4 * cfg.per_device_train_batch_size)
    # the reference never changes: its log-probs of the pairs every evaluation scores are computed once
    n_eval = len(eval_feats)
    ref_eval = {"held_out": reference_logps(model, ref_model, eval_feats, pad_id, 4 * cfg.per_device_train_batch_size),
                "train": (ref_w[:n_eval], ref_l[:n_eval]) if ref_w is not None
                else reference_logps(model, ref_model, train_feats[:n_eval], pad_id, 4 * cfg.per_device_train_batch_size)}
    if kernel is not None:
        kernel.fit(_fit_embeddings(model, ref_model, train_feats, pad_id, device, enc_train))

    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if kernel is not None and any(p.requires_grad for p in kernel.parameters()):
        params.append({"params": [p for p in kernel.parameters() if p.requires_grad], "lr": cfg.kernel_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if kernel is not None:
        accelerator.register_for_checkpointing(kernel)

    step = 0
    ckpt = out / "checkpoint"
    if cfg.resume and (ckpt / "state.json").exists():
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / "state.json").read_text())["step"]
        for log in ("metrics.jsonl", "eval.jsonl"):
            _truncate_metrics(out / log, step)
        accelerator.print(f"resumed from {ckpt} at step {step}")
    else:  # a fresh run: logs of an earlier run in the same folder would mix with this one's
        for log in ("metrics.jsonl", "eval.jsonl"):
            (out / log).unlink(missing_ok=True)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and accelerator.is_main_process),
               desc=f"train {cfg.divergence}" + (f"+{cfg.kernel}" if cfg.kernel else ""))
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            idx = batch_indices(len(train_feats), global_batch, step, cfg.seed)[rank::world]
            model.train()
            logs = []
            for micro in range(cfg.gradient_accumulation_steps):
                mb = idx[micro * cfg.per_device_train_batch_size:(micro + 1) * cfg.per_device_train_batch_size]
                loss, metrics = _loss_on(mb, model, ref_model, kernel, div, cfg, train_feats, pad_id, device,
                                         ref_w, ref_l, enc_train, need_ref_logits)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss at step {step} (training pairs {mb}); metrics: "
                        f"{ {k: v.float().mean().item() for k, v in metrics.items()} }. "
                        f"Lower lr or beta, or use dtype=fp32; the last checkpoint is in {ckpt}")
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
                logs.append(metrics)
            if kernel is not None and world > 1:
                for p in kernel.parameters():
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, "mean")
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if kernel is not None:
                kernel.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                row = _summarise(logs, step, scheduler, time.perf_counter() - t0, kernel)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
                if accelerator.is_main_process:
                    _append_jsonl(out / "metrics.jsonl", row)
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
                _evaluate(accelerator, model, ref_model, tokenizer, eval_pairs, eval_feats, train_pairs, train_feats,
                          ref_eval, cfg, step, out)
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                _save_checkpoint(accelerator, ckpt, step)
    except KeyboardInterrupt:
        _save_checkpoint(accelerator, ckpt, step)
        accelerator.print(f"interrupted: saved step {step} to {ckpt}; continue with resume=true")
        raise
    finally:
        bar.close()

    _evaluate(accelerator, model, ref_model, tokenizer, eval_pairs, eval_feats, train_pairs, train_feats, ref_eval,
              cfg, step, out)
    _save_model(accelerator, model, tokenizer, out)
    if kernel is not None and accelerator.is_main_process:
        torch.save(kernel.state_dict(), out / "kernel.pt")
    return out


def sft(cfg: SFTConfig):
    """Supervised fine-tuning on prompt + chosen AND prompt + rejected, so that the reference puts mass on
    both (paper-notes: otherwise rho of a response the reference never produces is mostly noise).
    Uses lr, batch_size, max_steps, warmup_steps, seed and the model fields of cfg. Returns the folder."""
    out, accelerator = _start(cfg)
    model, tokenizer, _, train_feats, _, eval_feats = load_splits(cfg)
    pad_id, device = tokenizer.pad_token_id, accelerator.device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    world, rank = accelerator.num_processes, accelerator.process_index
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    for step in tqdm(range(cfg.max_steps), desc="sft", disable=not (cfg.progress and accelerator.is_main_process)):
        t0 = time.perf_counter()
        model.train()
        idx = batch_indices(len(train_feats), cfg.per_device_train_batch_size * world, step, cfg.seed)[rank::world]
        batch = _batch(train_feats, idx, pad_id, device)
        loss = models.sft_loss(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SFT loss at step {step} (training pairs {idx}); lower lr")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.logging_steps == 0 and accelerator.is_main_process:
            _append_jsonl(out / "metrics.jsonl", {"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                                                  "time/step_s": time.perf_counter() - t0,
                                                  "memory/peak_mb": peak_memory_mb()})
    model.eval()
    with torch.no_grad():
        batch = _batch(eval_feats, range(min(64, len(eval_feats))), pad_id, device)
        held_out = models.sft_loss(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).item()
    if accelerator.is_main_process:
        _append_jsonl(out / "metrics.jsonl", {"step": cfg.max_steps, "eval/loss": held_out})
    _save_model(accelerator, model, tokenizer, out, merge=True)
    return out


def _loss_on(mb, model, ref_model, kernel, div, cfg, feats, pad_id, device, ref_w, ref_l, enc, need_ref_logits):
    batch = _batch(feats, mb, pad_id, device)
    need_hidden = kernel is not None and enc is None
    out = batch_forward(model, batch, need_hidden, need_ref_logits)
    pi_w, pi_l = out["logps"].float().chunk(2)
    penalty_args = {}
    if need_ref_logits:
        with torch.no_grad(), models.reference_context(model, ref_model) as ref:
            ref_out = batch_forward(ref, batch, False, True)
        rw, rl = ref_out["logps"].float().chunk(2)
        penalty_args = dict(pi_logits=out["logits"].float(), ref_logits=ref_out["logits"].float(),
                            response_mask=out["mask"])
    else:
        rw, rl = ref_w[mb].to(device), ref_l[mb].to(device)
    emb = {}
    if kernel is not None:
        e_x, e_w, e_l = models.pair_embeddings(out["hidden"], batch["prompt_mask"], batch["response_mask"]) if enc is None else enc[mb].to(device).unbind(1)
        emb = dict(kernel=kernel, gamma=cfg.gamma, eta=cfg.eta, e_x=e_x.float(), e_w=e_w.float(), e_l=e_l.float())
    n_w, n_l = out["n_tokens"].float().chunk(2)
    loss, metrics = kernel_dpo_loss(pi_w, pi_l, rw, rl, beta=cfg.beta, divergence=div,
                                    divergence_form=cfg.divergence_form, lam=cfg.lam, loss_type=cfg.loss_type,
                                    label_smoothing=cfg.label_smoothing, len_w=n_w, len_l=n_l,
                                    **penalty_args, **emb)
    metrics["loss"] = loss.detach()
    return loss.mean(), metrics


@torch.no_grad()
def _fit_embeddings(model, ref_model, feats, pad_id, device, enc, n=256):
    """Embeddings to fit a kernel's data-dependent defaults (bandwidth, covariance): reference, no grad."""
    if enc is not None:
        return enc[:n].reshape(-1, enc.shape[-1])
    rows = []
    with models.reference_context(model, ref_model) as ref:
        for i in range(0, min(n, len(feats)), 32):
            batch = _batch(feats, range(i, min(i + 32, len(feats))), pad_id, device)
            out = batch_forward(ref, batch, True, False)
            rows.extend(t.float() for t in models.pair_embeddings(out["hidden"], batch["prompt_mask"], batch["response_mask"]))
    return torch.cat(rows)


def _summarise(logs, step, scheduler, seconds, kernel):
    row = {"step": step, "lr": scheduler.get_last_lr()[0], "time/step_s": seconds, "memory/peak_mb": peak_memory_mb()}
    for key in logs[0]:
        row[key] = float(torch.cat([m[key].float().reshape(-1) for m in logs]).mean())
    if kernel is not None and hasattr(kernel, "weights"):
        row.update({f"hmk/{k}": v for k, v in kernel.weights().items()})
    return row


def _append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path, step):
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _save_checkpoint(accelerator, ckpt, step):
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        (ckpt / "state.json").write_text(json.dumps({"step": step}))


def _evaluate(accelerator, model, ref_model, tokenizer, eval_pairs, eval_feats, train_pairs, train_feats, ref_eval,
              cfg, step, out):
    """Held-out metrics (and samples), plus accuracy on as many training pairs: the generalisation gap."""
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    result = evaluation.evaluate(unwrapped, ref_model, tokenizer, eval_pairs, eval_feats, beta=cfg.beta,
                                 n_generate=cfg.eval_generate, seed=cfg.seed, ref_logps=ref_eval["held_out"])
    n = len(eval_feats)
    on_train = evaluation.preference_metrics(unwrapped, ref_model, train_feats[:n], train_pairs[:n], cfg.beta,
                                             tokenizer.pad_token_id, ref_logps=ref_eval["train"])
    result["pref/train_accuracy"] = on_train["pref/accuracy"]
    result["pref/gap"] = on_train["pref/accuracy"] - result["pref/accuracy"]
    result["step"] = step
    _append_jsonl(out / "eval.jsonl", result)
