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
import dataclasses
import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from kdpo_lab import data as kdata
from kdpo_lab import divergences, evaluation, kernels, models
from kdpo_lab.losses import kernel_dpo_loss


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run. YAML files in configs/ set these; the command line overrides them."""
    out_dir: str = _f("runs/dpo", "where the model, checkpoint, metrics.jsonl and config.yaml go")
    # data
    data: str = _f("data/suite", "a folder with train/validation files, one file (10% held out), or a hub dataset name")
    families: str = _f("", "comma-separated suite families to keep (empty: all)")
    max_train_pairs: int = _f(0, "use at most this many training pairs (0: all)")
    max_eval_pairs: int = _f(256, "held-out pairs for evaluation during and after training")
    max_length: int = _f(96, "prompt + response tokens; longer prompts are cut from the left")
    max_prompt_length: int = _f(64, "prompt tokens kept at most")
    strict: bool = _f(False, "stop at the first malformed data row instead of skipping and reporting it")
    # model
    model: str = _f("runs/sft", "policy start: a local path, a hub name, or tiny-llama / tiny-gpt2 / llama-7b-shape (built from a config)")
    tokenizer: str = _f("", "tokenizer path (default: the model's; built from the data for config models)")
    d_model: int = _f(128, "hidden size of config-built models")
    n_layers: int = _f(4, "layers of config-built models")
    n_heads: int = _f(4, "attention heads of config-built models")
    model_scale: float = _f(1.0, "llama-7b-shape only: shrink width and depth by this factor (CPU fast mode)")
    vocab_size: int = _f(1024, "BPE vocabulary built from the data for config models")
    lora_r: int = _f(0, "LoRA rank (0: train all weights). With LoRA the reference is the base, adapters off")
    lora_alpha: int = _f(16, "LoRA scaling alpha")
    dtype: str = _f("fp32", "weights dtype: fp32 or bf16")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    # loss
    beta: float = _f(0.1, "strength of the KL constraint; z = beta * (s_w - s_l) + ...")
    divergence: str = _f("kl", "kl, forward_kl, js, hellinger, renyi, bhattacharyya, wasserstein, alpha, chi2")
    divergence_form: str = _f("auto", "link (f'(pi/pi_ref) replaces the log-ratio), penalty (DPO + lam * token D), auto")
    lam: float = _f(0.1, "weight of the penalty form")
    order: float = _f(0.5, "Renyi order a (renyi only)")
    alpha: float = _f(0.5, "alpha of the alpha-divergence (alpha only; TRL's coef = 1 - alpha)")
    kernel: str = _f("", "kernel for the hybrid term: linear, polynomial, rbf, spectral, mahalanobis, hmk (empty: none)")
    gamma: float = _f(0.0, "weight of the kernel term gamma * (log K(e_x,e_w) - log K(e_x,e_l))")
    eta: float = _f(0.0, "HMK entropy bonus against kernel collapse")
    embeddings: str = _f("policy", "policy (own hidden states, with gradient) or encoder (frozen MiniLM: a fixed offset)")
    loss_type: str = _f("sigmoid", "sigmoid (DPO), hinge, ipo, cdpo, robust")
    label_smoothing: float = _f(0.0, "flip rate for cdpo / robust")
    # optimisation
    lr: float = _f(5e-5, "peak learning rate of the policy (tiny full fine-tuning: 5e-4 over-optimises, see README)")
    kernel_lr: float = _f(1e-2, "learning rate of the kernel's parameters (HMK weights, bandwidths)")
    batch_size: int = _f(16, "pairs per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimisation step")
    max_steps: int = _f(200, "optimisation steps")
    warmup_steps: int = _f(10, "linear warm-up steps, then cosine decay to 10% of lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    seed: int = _f(0, "seeds data order, initialisation and sampling")
    log_every: int = _f(10, "steps between metric lines")
    eval_every: int = _f(0, "steps between held-out evaluations (0: only at the end)")
    eval_generate: int = _f(0, "prompts to sample at each evaluation for reward, win-rate and KL (0: none)")
    save_every: int = _f(50, "steps between checkpoints")
    resume: bool = _f(False, "continue from OUT/checkpoint if it exists")
    progress: bool = _f(True, "show a progress bar")

    @classmethod
    def from_yaml(cls, path, **overrides):
        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def save(self, path):
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


CONFIG_MODELS = ("tiny-llama", "tiny-gpt2", "llama-7b-shape")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- data and model

def read_pairs(cfg, split, limit=0):
    """Load one split as PreferencePairs (bad rows skipped and reported, or fatal with strict).

    A folder holds one file per split (train.jsonl, validation.jsonl, ...). A single file is split here:
    a seeded 10% (at most max_eval_pairs) is held out as "validation" (also used for "test")."""
    if Path(cfg.data).is_file():
        pairs, report = kdata.load_pairs(cfg.data, strict=cfg.strict)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_held = max(1, min(cfg.max_eval_pairs, len(pairs) // 10))
        rows = order[n_held:] if split == "train" else order[:n_held]
        pairs = [pairs[i] for i in sorted(rows)][:limit or None]
    else:
        pairs, report = kdata.load_pairs(cfg.data, split=split, strict=cfg.strict, limit=limit or None)
    if cfg.families:
        keep = set(cfg.families.split(","))
        pairs = [p for p in pairs if p.family in keep]
    return pairs, report


def encode(cfg, tokenizer, pairs, report, split):
    """Tokenise pairs; print the data report when anything was skipped or truncated."""
    features = kdata.encode_pairs(pairs, tokenizer, max_length=cfg.max_length,
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
    model, tokenizer = build_or_load(cfg, kdata.sft_texts(train_pairs))
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
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    set_seed(cfg.seed)
    cfg.save(out / "config.yaml")
    return out, accelerator


def _batch(feats, idx, pad_id, device):
    """The collated [chosen; rejected] batch of pairs `idx`, on `device`."""
    return {k: v.to(device) for k, v in kdata.collate([feats[i] for i in idx], pad_id).items()}


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
        ref_w, ref_l = reference_logps(model, ref_model, train_feats, pad_id, 4 * cfg.batch_size)
    # the reference never changes: its log-probs of the pairs every evaluation scores are computed once
    n_eval = len(eval_feats)
    ref_eval = {"held_out": reference_logps(model, ref_model, eval_feats, pad_id, 4 * cfg.batch_size),
                "train": (ref_w[:n_eval], ref_l[:n_eval]) if ref_w is not None
                else reference_logps(model, ref_model, train_feats[:n_eval], pad_id, 4 * cfg.batch_size)}
    if kernel is not None:
        kernel.fit(_fit_embeddings(model, ref_model, train_feats, pad_id, device, enc_train))

    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
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
    global_batch = cfg.batch_size * cfg.grad_accum * world
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and accelerator.is_main_process),
               desc=f"train {cfg.divergence}" + (f"+{cfg.kernel}" if cfg.kernel else ""))
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            idx = batch_indices(len(train_feats), global_batch, step, cfg.seed)[rank::world]
            model.train()
            logs = []
            for micro in range(cfg.grad_accum):
                mb = idx[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]
                loss, metrics = _loss_on(mb, model, ref_model, kernel, div, cfg, train_feats, pad_id, device,
                                         ref_w, ref_l, enc_train, need_ref_logits)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss at step {step} (training pairs {mb}); metrics: "
                        f"{ {k: v.float().mean().item() for k, v in metrics.items()} }. "
                        f"Lower lr or beta, or use dtype=fp32; the last checkpoint is in {ckpt}")
                accelerator.backward(loss / cfg.grad_accum)
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
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                row = _summarise(logs, step, scheduler, time.perf_counter() - t0, kernel)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
                if accelerator.is_main_process:
                    _append_jsonl(out / "metrics.jsonl", row)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                _evaluate(accelerator, model, ref_model, tokenizer, eval_pairs, eval_feats, train_pairs, train_feats,
                          ref_eval, cfg, step, out)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
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


def sft(cfg: TrainConfig):
    """Supervised fine-tuning on prompt + chosen AND prompt + rejected, so that the reference puts mass on
    both (paper-notes: otherwise rho of a response the reference never produces is mostly noise).
    Uses lr, batch_size, max_steps, warmup_steps, seed and the model fields of cfg. Returns the folder."""
    out, accelerator = _start(cfg)
    model, tokenizer, _, train_feats, _, eval_feats = load_splits(cfg)
    pad_id, device = tokenizer.pad_token_id, accelerator.device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    world, rank = accelerator.num_processes, accelerator.process_index
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    for step in tqdm(range(cfg.max_steps), desc="sft", disable=not (cfg.progress and accelerator.is_main_process)):
        t0 = time.perf_counter()
        model.train()
        idx = batch_indices(len(train_feats), cfg.batch_size * world, step, cfg.seed)[rank::world]
        batch = _batch(train_feats, idx, pad_id, device)
        loss = models.sft_loss(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SFT loss at step {step} (training pairs {idx}); lower lr")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 and accelerator.is_main_process:
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
