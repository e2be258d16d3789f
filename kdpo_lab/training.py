"""Training: an SFT stage for the reference and the DPO-Kernels loop, one loop on accelerate for both.

The same code runs on a CPU, one GPU, or many (`accelerate launch -m kdpo_lab.cli train ...` with
DDP, FSDP or DeepSpeed). One optimisation step of `train`:

    batch  = pairs[order[step]]                 order = a seeded permutation per epoch (resumable);
                                                each process takes every world-th pair of the global batch
    logps  = one forward of [chosen; rejected]  (2B rows, response tokens summed)
    ref    = precomputed once, only for pairs some step reaches, and shared by every run of the same
             reference through its cache (kdpo_lab.reference_cache); or a no-grad forward when the
             penalty form needs reference logits
    e_x, e_w, e_l = pooled hidden states        (policy's own, with gradient) or a frozen encoder
    loss   = kernel_dpo_loss(...)               kdpo_lab.losses
    AdamW on the policy; the kernel's parameters (lr `kernel_lr`) have their own AdamW; warm-up + cosine.

Accumulation is accelerate's own (`Accelerator(gradient_accumulation_steps=...)` and
`accelerator.accumulate`), so DeepSpeed and FSDP step their engines once per optimiser step. The
learning-rate schedule counts optimiser steps: it is not passed to `accelerator.prepare` (whose
wrapper would step it once per process) but stepped here, once per optimiser step, as transformers'
Trainer does. The kernel lives outside the prepared model (it is tiny and replicated): its gradients
are averaged across processes by one all-reduce before each step. Two processes therefore take the
same steps as one process at the same global batch (tests/test_distributed.py).

Checkpoints (`OUT/checkpoint-000150/`, the last two kept) are written by kdpo_lab.checkpoint so that a
kill cannot tear them; the data position follows from the step, so `resume=True` continues exactly
where a killed run stopped. Metrics go to `OUT/metrics.jsonl` and `OUT/eval.jsonl` (one JSON object
per logged step, `pandas.read_json(lines=True)`), and to accelerate's trackers with `report_to`.
"""
import atexit
import dataclasses
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from tqdm.auto import tqdm

from kdpo_lab import batching, checkpoint, divergences, kernels, loading, models, ordering
from kdpo_lab.held_out import DPOEvaluation, held_out_sft_loss
from kdpo_lab.config import SFTConfig, TrainConfig  # noqa: F401  (notebooks import TrainConfig from here)
from kdpo_lab.config import CONFIG_MODELS
from kdpo_lab.reference_cache import Cache, cached_embeddings
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


def lr_lambda(cfg):
    """The learning-rate factor after `step` optimiser steps: linear warm-up, cosine decay to 10%."""
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


# ----------------------------------------------------------------------------- the run and its loop

@dataclass
class Run:
    """What a run carries from step to step. `model` is the prepared one (DDP/FSDP/DeepSpeed-wrapped
    when launched so); the kernel and its optimiser are None without a learnable kernel."""
    cfg: SFTConfig
    accelerator: Accelerator
    out: Path
    model: torch.nn.Module
    tokenizer: object
    feats: list
    optimizer: object
    scheduler: object
    kernel: object = None
    kernel_optimizer: object = None
    kernel_scheduler: object = None
    step: int = 0

    @property
    def pad_id(self):
        return self.tokenizer.pad_token_id

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def global_batch(self):
        """The pairs of global batch `step` (kdpo_lab.ordering: a pure function of the step, so resume is exact)."""
        acc, cfg = self.accelerator, self.cfg
        size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        lengths = ordering.pair_lengths(self.feats) if cfg.group_by_length else None
        return ordering.batch_indices(len(self.feats), size, self.step, cfg.seed, lengths=lengths)

    def my_indices(self):
        """This process's share of global batch `step`: every world-th pair (same pairs as one process)."""
        acc = self.accelerator
        return self.global_batch()[acc.process_index::acc.num_processes]


def _start(cfg):
    """Accelerator, output folder and seeds: the first lines of every run. The output folder is
    checked (format, resume) on every process before the main process touches it."""
    out = Path(cfg.output_dir)
    # An Accelerator made earlier in this process (TRL's DPOTrainer makes one with bf16 mixed precision on
    # CPU) leaves its AcceleratorState behind, and a new Accelerator inherits it silently: autocast and fp32
    # outputs in a run that asked for neither. Start from what this process was launched with, as
    # transformers' Trainer does before making its own; the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=trackers(cfg), project_dir=str(out))
    destroy_process_group_at_exit()
    checkpoint.check_folder(out, cfg.resume)
    if accelerator.is_main_process:
        checkpoint.prepare_folder(out, cfg.resume)
    _save_config(accelerator, cfg, out)
    set_seed(cfg.seed)
    if accelerator.log_with:
        accelerator.init_trackers("kdpo_lab", config=dataclasses.asdict(cfg))
    return out, accelerator


def _save_config(accelerator, cfg, out):
    if accelerator.is_main_process:
        cfg.save(out / "config.yaml")
    accelerator.wait_for_everyone()


def _optimizers(accelerator, model, cfg, kernel=None):
    """(model, optimizer, scheduler, kernel optimizer, kernel scheduler): AdamW for the policy, prepared
    with it; the schedule, and AdamW for a learnable kernel, registered for checkpointing but not prepared."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    accelerator.register_for_checkpointing(scheduler)
    trainable = [p for p in kernel.parameters() if p.requires_grad] if kernel is not None else []
    if not trainable:
        return model, optimizer, scheduler, None, None
    k_opt = torch.optim.AdamW(trainable, lr=cfg.kernel_lr, weight_decay=cfg.weight_decay)
    k_sched = torch.optim.lr_scheduler.LambdaLR(k_opt, lr_lambda(cfg))
    accelerator.register_for_checkpointing(k_opt, k_sched)
    return model, optimizer, scheduler, k_opt, k_sched


def _fit(run, task):
    """The loop both stages share: from run.step to max_steps, one optimiser step per global batch,
    with logs, evaluations (task.after_step) and checkpoints; a checkpoint is saved on Ctrl-C."""
    cfg, acc = run.cfg, run.accelerator
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=task.name,
               disable=not (cfg.progress and acc.is_main_process))
    try:
        while run.step < cfg.max_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            logs = _accumulate(run, task)
            _optimizer_step(run)
            run.step += 1
            bar.update(1)
            if run.step % cfg.logging_steps == 0 or run.step == cfg.max_steps:
                row = summarise(run, logs, time.perf_counter() - t0, time.process_time() - c0)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                write_row(run, "metrics.jsonl", row)
            task.after_step(run)
            if run.step % cfg.save_steps == 0 or run.step == cfg.max_steps:
                save_checkpoint(run)
    except KeyboardInterrupt:
        save_checkpoint(run)
        acc.print(f"interrupted: saved step {run.step} to {run.out}; continue with resume=true")
        raise
    finally:
        bar.close()


def _accumulate(run, task):
    """Gradients of one global batch, the same on every process: this process's micro-batches under
    accelerator.accumulate (no sync until the last; accelerator.backward divides by the accumulation
    steps), then the kernel's gradients averaged across processes."""
    run.model.train()
    idx, B = run.my_indices(), run.cfg.per_device_train_batch_size
    logs = []
    for micro in range(run.cfg.gradient_accumulation_steps):
        mb = idx[micro * B:(micro + 1) * B]
        with run.accelerator.accumulate(run.model):
            loss, metrics = task.loss(run, mb)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at step {run.step} (training pairs {mb}); metrics: "
                    f"{ {k: v.float().mean().item() for k, v in metrics.items()} }. Lower the learning rate "
                    f"(or beta), or use dtype=fp32; the last checkpoint is in {checkpoint.latest(run.out)}")
            run.accelerator.backward(loss)
        logs.append(metrics)
    if not run.accelerator.sync_gradients:
        raise RuntimeError("accelerate did not mark the last micro-batch for gradient sync")
    if run.kernel_optimizer is not None and run.accelerator.num_processes > 1:
        for p in run.kernel.parameters():  # outside the prepared model: averaged here, as DDP does
            if p.grad is not None:
                p.grad = run.accelerator.reduce(p.grad, "mean")
    return logs


def _optimizer_step(run):
    """Clip the policy's gradients, step both optimisers, then the schedules (once per optimiser step)."""
    acc = run.accelerator
    acc.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
    run.optimizer.step()
    if run.kernel_optimizer is not None:
        run.kernel_optimizer.step()
    if not acc.optimizer_step_was_skipped:
        run.scheduler.step()
        if run.kernel_scheduler is not None:
            run.kernel_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.kernel_optimizer is not None:
        run.kernel_optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run):
    """Save the run's state into OUT/checkpoint-STEP.tmp on every process, then publish it (rename)."""
    acc, out = run.accelerator, run.out
    if (out / checkpoint.folder_name(run.step)).exists():
        return  # this step is already saved (a resumed run at its checkpoint)
    acc.wait_for_everyone()
    if acc.is_main_process:
        checkpoint.empty_temp_folder(out, run.step)
    acc.wait_for_everyone()
    tmp = checkpoint.temp_folder(out, run.step)
    acc.save_state(str(tmp))
    if acc.is_main_process and run.kernel is not None:
        checkpoint.save_kernel(run.kernel, tmp, run.cfg.kernel_params)
    acc.wait_for_everyone()
    if acc.is_main_process:
        checkpoint.publish(tmp, run.step)
    acc.wait_for_everyone()


def _resume(run):
    """Load the newest complete checkpoint when cfg.resume (and one exists); else start clean logs."""
    acc, out = run.accelerator, run.out
    folder = checkpoint.latest(out) if run.cfg.resume else None
    if folder is None:
        if acc.is_main_process:
            checkpoint.clear_logs(out)
        acc.wait_for_everyone()
        return
    acc.load_state(str(folder))
    if run.kernel is not None:
        run.kernel.load_state_dict(load_file(str(folder / "kernel.safetensors")))
    run.step = checkpoint.step_of(folder)
    if acc.is_main_process:
        checkpoint.truncate_logs(out, run.step)
    acc.wait_for_everyone()
    acc.print(f"resumed from {folder} (the newest complete checkpoint) at step {run.step}")


def _save_model(run, merge=False):
    """The trained weights (and tokenizer) in OUT/model, gathered with accelerator.get_state_dict (FSDP,
    DeepSpeed ZeRO-3 shard them); the kernel in OUT/kernel.safetensors + kernel.json."""
    acc = run.accelerator
    state = acc.get_state_dict(run.model)
    if acc.is_main_process:
        unwrapped = run.unwrapped
        if merge and models.is_peft(unwrapped):
            models.merge_lora(unwrapped, inplace=True).save_pretrained(run.out / "model")
        else:
            unwrapped.save_pretrained(run.out / "model", state_dict=state)
        run.tokenizer.save_pretrained(run.out / "model")
        if run.kernel is not None:
            checkpoint.save_kernel(run.kernel, run.out, run.cfg.kernel_params)
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------- DPO-Kernels

def _divergence(cfg):
    return divergences.get(cfg.divergence, **cfg.divergence_kwargs())


def _needs_ref_logits(cfg):
    div = _divergence(cfg)
    return cfg.divergence_form == "penalty" or (cfg.divergence_form == "auto" and not div.has_link)


def batch_forward(model, batch, need_hidden, need_logits):
    return models.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                 return_hidden=need_hidden, return_logits=need_logits)


def encoder_embeddings(pairs, encoder):
    """Frozen-encoder embeddings of (prompt, chosen, rejected) for every pair: [n, 3, d]."""
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    return encoder(texts).reshape(len(pairs), 3, -1)


class DPOTask:
    """The DPO-Kernels loss on one micro-batch, and the held-out evaluation between steps."""
    name = "train"

    def __init__(self, cfg, ref_model, ref_logps, enc, held_out, offsets=None):
        self.cfg, self.ref_model, self.enc, self.held_out, self.offsets = cfg, ref_model, enc, held_out, offsets
        self.div, self.need_ref_logits = _divergence(cfg), _needs_ref_logits(cfg)
        self.ref_w, self.ref_l = ref_logps if ref_logps is not None else (None, None)

    def loss(self, run, mb):
        cfg, device = self.cfg, run.accelerator.device
        batch = batching.device_batch(run.feats, mb, run.pad_id, device)
        need_hidden = run.kernel is not None and self.enc is None
        out = batch_forward(run.model, batch, need_hidden, self.need_ref_logits)
        pi_w, pi_l = out["logps"].float().chunk(2)
        penalty_args = {}
        if self.need_ref_logits:  # the unwrapped model: a LoRA reference disables its adapters
            with torch.no_grad(), models.reference_context(run.unwrapped, self.ref_model) as ref:
                ref_out = batch_forward(ref, batch, False, True)
            rw, rl = ref_out["logps"].float().chunk(2)
            penalty_args = dict(pi_logits=out["logits"].float(), ref_logits=ref_out["logits"].float(),
                                response_mask=out["mask"])
        else:
            rw, rl = self.ref_w[mb].to(device), self.ref_l[mb].to(device)
        emb = {}
        if run.kernel is not None:
            if self.enc is None:
                e_x, e_w, e_l = models.pair_embeddings(out["hidden"], batch["prompt_mask"], batch["response_mask"])
            else:
                e_x, e_w, e_l = self.enc[mb].to(device).unbind(1)
            emb = dict(kernel=run.kernel, gamma=cfg.gamma, eta=cfg.eta, e_x=e_x.float(), e_w=e_w.float(),
                       e_l=e_l.float())
        n_w, n_l = out["n_tokens"].float().chunk(2)
        loss, metrics = kernel_dpo_loss(pi_w, pi_l, rw, rl, beta=cfg.beta, divergence=self.div,
                                        divergence_form=cfg.divergence_form, lam=cfg.lam, loss_type=cfg.loss_type,
                                        label_smoothing=cfg.label_smoothing, len_w=n_w, len_l=n_l,
                                        length_normalize=cfg.length_normalize,
                                        offset=None if self.offsets is None else self.offsets[mb].to(device),
                                        **penalty_args, **emb)
        metrics["loss"] = loss.detach()
        return loss.mean(), metrics

    def after_step(self, run):
        if self.cfg.eval_steps and run.step % self.cfg.eval_steps == 0 and run.step < self.cfg.max_steps:
            write_row(run, "eval.jsonl", self.held_out.run(run))


@torch.no_grad()
def _fit_embeddings(model, ref_model, feats, pad_id, device, enc, n=256, cache=None):
    """Embeddings to fit a kernel's data-dependent defaults (bandwidth, covariance): reference, no grad."""
    if enc is not None:
        return enc[:n].reshape(-1, enc.shape[-1])

    def compute():
        rows = []
        with models.reference_context(model, ref_model) as ref:
            for i in range(0, min(n, len(feats)), 32):
                batch = batching.device_batch(feats, range(i, min(i + 32, len(feats))), pad_id, device)
                out = batch_forward(ref, batch, True, False)
                rows.extend(t.float() for t in models.pair_embeddings(out["hidden"], batch["prompt_mask"],
                                                                      batch["response_mask"]))
        return torch.cat(rows)
    return cached_embeddings(cache, feats[:n], 32, compute).to(device)


def used_pairs(cfg, feats, world):
    """The training pairs some step of a run reaches (steps 0 .. max_steps-1), sorted."""
    size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    lengths = ordering.pair_lengths(feats) if cfg.group_by_length else None
    return sorted({i for step in range(cfg.max_steps)
                   for i in ordering.batch_indices(len(feats), size, step, cfg.seed, lengths=lengths)})


def reference_train_logps(held_out, model, feats, needed, batch_size):
    """The reference's (chosen, rejected) log-probs of the training pairs, computed only for the batches
    of `batch_size` consecutive pairs that hold a needed pair, in exactly those batches (so each number
    equals the one computed over all pairs); the other pairs are NaN: a step reaching one would stop
    with a non-finite loss instead of training on a wrong number."""
    chunks = sorted({i // batch_size for i in needed})
    sub = [f for c in chunks for f in feats[c * batch_size:(c + 1) * batch_size]]  # only the last chunk may be short
    w, l = held_out.reference_logps(model, sub, batch_size)
    rows = torch.cat([torch.arange(c * batch_size, min((c + 1) * batch_size, len(feats))) for c in chunks])
    full = torch.full((2, len(feats)), float("nan"), dtype=w.dtype)
    full[0, rows], full[1, rows] = w, l
    return full[0], full[1]


def reference_cache(cfg, accelerator, ref_model_given):
    """The reference's Cache when the reference is cfg.model's folder as loaded (not a LoRA base or a
    reference passed in), else None."""
    if ref_model_given or cfg.lora_r or cfg.model in CONFIG_MODELS:
        return None
    return Cache.open(cfg.model, cfg.dtype, accelerator.device, accelerator.num_processes,
                      gradient_checkpointing=cfg.gradient_checkpointing)


def train(cfg: TrainConfig, ref_model=None):
    """Train a policy with the DPO-Kernels loss. Returns the output folder (a Path)."""
    out, accelerator = _start(cfg)
    model, tokenizer, train_pairs, train_feats, eval_pairs, eval_feats = load_splits(cfg)
    _save_config(accelerator, cfg, out)  # again: load_splits resolved max_length "auto"
    ref_given = ref_model is not None
    if ref_model is None and cfg.lora_r == 0:
        ref_model = models.frozen_copy(model)  # with LoRA the reference is the base, adapters disabled
    device = accelerator.device
    model.to(device)
    if ref_model is not None:
        ref_model.to(device).eval().requires_grad_(False)

    kernel = kernels.get(cfg.kernel, **cfg.kernel_params).to(device) if cfg.kernel else None
    encoder = models.SentenceEncoder() if kernel is not None and cfg.embeddings == "encoder" else None
    enc_train = encoder_embeddings(train_pairs, encoder) if encoder else None
    cache = reference_cache(cfg, accelerator, ref_given)
    held_out = DPOEvaluation(cfg, accelerator, ref_model, tokenizer, (train_pairs, train_feats),
                             (eval_pairs, eval_feats), cache)
    ref_logps = None
    if not _needs_ref_logits(cfg):  # the reference never changes: its log-probs are computed once, for the pairs used
        needed = set(used_pairs(cfg, train_feats, accelerator.num_processes))
        needed |= set(range(min(len(eval_feats), len(train_feats))))  # the evaluation's training pairs
        ref_logps = reference_train_logps(held_out, model, train_feats, needed, 4 * cfg.per_device_train_batch_size)
    held_out.precompute_reference(model, ref_logps)
    if kernel is not None:
        kernel.fit(_fit_embeddings(model, ref_model, train_feats, tokenizer.pad_token_id, device, enc_train,
                                   cache=cache))

    model, optimizer, scheduler, k_opt, k_sched = _optimizers(accelerator, model, cfg, kernel)
    run = Run(cfg, accelerator, out, model, tokenizer, train_feats, optimizer, scheduler, kernel, k_opt, k_sched)
    _resume(run)
    _fit(run, DPOTask(cfg, ref_model, ref_logps, enc_train, held_out, loading.pair_offsets(cfg, train_pairs)))
    _save_model(run)  # before the final evaluation: an evaluation that fails never costs the run
    write_row(run, "eval.jsonl", held_out.run(run))
    _finish_trackers(accelerator)
    return out


# ----------------------------------------------------------------------------- SFT

class SFTTask:
    """Supervised fine-tuning on prompt + chosen AND prompt + rejected, the mean negative log-likelihood
    per response token of the whole global batch.

    Each micro-batch's loss is its summed token log-likelihood divided by the token count of the global
    batch (known from the features before any forward), times world * accumulation steps to undo DDP's
    and accelerate's averaging: the gradient is that of the global token mean, whatever the split
    (transformers' Trainer normalises the same way since 4.46, `num_items_in_batch`). On one process
    without accumulation this is exactly models.sft_loss."""
    name = "sft"

    def loss(self, run, mb):
        cfg, acc = run.cfg, run.accelerator
        everyone = run.global_batch()
        tokens = sum(len(run.feats[i]["chosen_ids"]) + len(run.feats[i]["rejected_ids"]) for i in everyone)
        batch = batching.device_batch(run.feats, mb, run.pad_id, acc.device)
        out = models.sequence_logps(run.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        loss = -out["logps"].sum() / max(tokens, 1) * (acc.num_processes * cfg.gradient_accumulation_steps)
        return loss, {"loss": loss.detach().reshape(1)}

    def after_step(self, run):
        pass


def sft(cfg: SFTConfig):
    """Supervised fine-tuning of the reference, so that it puts mass on both responses (otherwise
    rho of a response the reference never produces is mostly noise). Shares train's loop:
    accumulation, checkpoints and resume. LoRA adapters are merged into the saved model. Returns the folder."""
    out, accelerator = _start(cfg)
    model, tokenizer, _, train_feats, _, eval_feats = load_splits(cfg)
    _save_config(accelerator, cfg, out)  # again: load_splits resolved max_length "auto"
    model.to(accelerator.device)
    model, optimizer, scheduler, _, _ = _optimizers(accelerator, model, cfg)
    run = Run(cfg, accelerator, out, model, tokenizer, train_feats, optimizer, scheduler)
    _resume(run)
    _fit(run, SFTTask())
    _save_model(run, merge=True)
    write_row(run, "metrics.jsonl", {"step": cfg.max_steps, "eval/loss": held_out_sft_loss(run, eval_feats[:64])})
    _finish_trackers(accelerator)
    return out


# ----------------------------------------------------------------------------- metrics

def trackers(cfg):
    """accelerate's `log_with` for cfg.report_to (TRL's option): "none", "all" (every tracker installed),
    or comma-separated names such as "tensorboard"; metrics also always go to the JSONL files."""
    report_to = cfg.report_to
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    if not names or names == ["all"]:
        return names or None
    from accelerate.tracking import get_available_trackers
    available = sorted(str(t) for t in get_available_trackers())
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"report_to: {', '.join(missing)} not installed (installed trackers: "
                         f"{', '.join(available) or 'none'}); install it or use report_to=none")
    return names


def destroy_process_group_at_exit():
    """Destroy torch's process group when this process exits, if it has one. A run does not destroy it
    itself (one launch may run sft, then train), and a process that exits with it alive can abort after
    its work is done: gloo's threads outlive the interpreter ("terminate called without an active
    exception", exit -6, about one 2-process launch in ten here). atexit runs while Python is whole."""
    if torch.distributed.is_initialized():
        atexit.unregister(_destroy_process_group)  # registered once, however many runs this process starts
        atexit.register(_destroy_process_group)


def _destroy_process_group():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _finish_trackers(accelerator):
    """accelerator.end_training() without its destroy_process_group: one launch may run sft, then train."""
    for tracker in accelerator.trackers:
        tracker.finish()


def summarise(run, logs, seconds, cpu_seconds):
    """One metrics row: each per-example metric averaged over the global batch (all processes); the
    step's wall time and this process's CPU time (the fair clock on a shared machine)."""
    row = {"step": run.step, "lr": run.scheduler.get_last_lr()[0], "time/step_s": seconds,
           "time/step_cpu_s": cpu_seconds, "memory/peak_mb": peak_memory_mb()}
    for key in logs[0]:
        values = run.accelerator.gather(torch.cat([m[key].float().reshape(-1) for m in logs]))
        row[key] = float(values.mean())
    if run.kernel is not None and hasattr(run.kernel, "weights"):
        row.update({f"hmk/{k}": v for k, v in run.kernel.weights().items()})
    return row


def write_row(run, name, row):
    """Append a row to OUT/name (main process) and send its numbers to the trackers."""
    if run.accelerator.is_main_process:
        checkpoint.append_jsonl(run.out / name, row)
    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    run.accelerator.log({f"{Path(name).stem}/{k}": v for k, v in numbers.items()}, step=row["step"])
