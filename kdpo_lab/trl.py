"""DPO-Kernels inside TRL: for people whose training script already uses TRL's DPOTrainer (TRL 1.16).

Change two names and add the loss's fields:

    from kdpo_lab.trl import KernelDPOConfig, KernelDPOTrainer        # was: from trl import DPOConfig, DPOTrainer
    args = KernelDPOConfig(output_dir="out", kernel="rbf", gamma=0.5, divergence="js", ...)
    trainer = KernelDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()                                                  # trainer.kernel: the kernel being trained

Everything else is TRL's: datasets, tokenisation, PEFT (`peft_config=`, reference = adapters off),
`precompute_ref_log_probs`, logging, checkpoints. Only the loss changes: `losses.kernel_dpo_loss`

    z = beta * (s(rho_w) - s(rho_l)) + gamma * (log K(e_x, e_w) - log K(e_x, e_l))

with rho the policy / reference log-ratio summed over completion tokens (TRL's), s the divergence's
link score, and e_x, e_w, e_l the policy's own last hidden states mean-pooled over the prompt, the
chosen and the rejected completion (with gradient). The kernel is calibrated (`Kernel.fit`) on the
first training batch's embeddings (all processes' batches), when the policy still equals the reference;
its parameters train in their own optimiser group at `kernel_lr`, on the same schedule as the model,
their gradients averaged across processes. The penalty form of a
divergence (Wasserstein, or divergence_form="penalty") needs the reference's next-token logits at every
step, so it needs a reference model (or PEFT) and does not combine with precomputed log-probs.

With kernel="" and divergence="kl" the loss is TRL's DPO loss (tests/test_trl.py checks that the logged
losses match TRL's own DPOTrainer step by step).

TRL's `f_divergence_type` / `f_alpha_divergence_coef` are honoured: forward_kl -> "forward_kl",
js_divergence -> "js", alpha_divergence with coefficient c -> "alpha" with alpha = 1 - c (TRL 1.x's
convention, see losses.py). Setting both `divergence` and a different `f_divergence_type` is an error.
Loss types: sigmoid, sigmoid_norm (LN-DPO), hinge, ipo (per-token averaged, as TRL), robust.
"""
import contextlib
import json
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from kdpo_lab import checkpoint, divergences, kernels, models
from kdpo_lab.losses import kernel_dpo_loss

TRL_DIVERGENCES = {"reverse_kl": "kl", "forward_kl": "forward_kl", "js_divergence": "js",
                   "alpha_divergence": "alpha"}
LOSS_TYPES = {"sigmoid": ("sigmoid", False), "sigmoid_norm": ("sigmoid", True), "hinge": ("hinge", False),
              "ipo": ("ipo", True), "robust": ("robust", False)}
"""TRL loss_type -> (kdpo_lab loss_type, length_normalize)."""


def _mapping(name, value):
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{name} must be a JSON object such as '{{\"sigma\": 0.5}}'; got {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of parameter names to values; got {value!r}")
    return value


@dataclass
class KernelDPOConfig(DPOConfig):
    """TRL's DPOConfig plus the DPO-Kernels loss's fields (kdpo_lab's names, as in `kdpo train`)."""
    kernel: str = field(default="", metadata={"help": "kernel of the hybrid term: linear, polynomial, rbf, spectral, "
                                                      "mahalanobis, hmk (empty: none)"})
    kernel_params: dict | str | None = field(default=None, metadata={
        "help": "the kernel's parameters, passed to kernels.get(kernel, **params) (a JSON object on the command line)"})
    gamma: float = field(default=0.0, metadata={"help": "weight of the kernel term, >= 0"})
    eta: float = field(default=0.0, metadata={"help": "HMK entropy bonus against kernel collapse, >= 0"})
    divergence: str = field(default="kl", metadata={"help": "kl, forward_kl, js, hellinger, renyi, bhattacharyya, "
                                                            "wasserstein, alpha, chi2"})
    divergence_params: dict | str | None = field(default=None, metadata={
        "help": "the divergence's parameters, e.g. {\"alpha\": 0.3}, {\"order\": 0.5}, {\"k\": 16} (JSON on the "
                "command line)"})
    divergence_form: str = field(default="auto", metadata={"help": "link, penalty or auto (link where it exists)"})
    lam: float = field(default=0.1, metadata={"help": "weight of the penalty form, >= 0"})
    kernel_lr: float = field(default=1e-2, metadata={"help": "learning rate of the kernel's parameters"})

    def __post_init__(self):
        super().__post_init__()
        self.kernel_params = _mapping("kernel_params", self.kernel_params)
        self.divergence_params = _mapping("divergence_params", self.divergence_params)
        self._resolve_divergence()
        if self.kernel and self.kernel not in kernels.NAMES:
            raise ValueError(f"kernel must be one of {', '.join(kernels.NAMES)} or empty; got {self.kernel!r}")
        if not self.kernel and (self.gamma or self.eta or self.kernel_params):
            raise ValueError("gamma, eta and kernel_params belong to the kernel term: set kernel= or leave them unset")
        for name in ("gamma", "eta", "lam"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if not self.kernel_lr > 0:
            raise ValueError(f"kernel_lr must be > 0; got {self.kernel_lr!r}")
        if self.divergence_form not in ("auto", "link", "penalty"):
            raise ValueError(f"divergence_form must be auto, link or penalty; got {self.divergence_form!r}")
        if len(self.loss_type) != 1 or self.loss_type[0] not in LOSS_TYPES:
            raise ValueError(f"KernelDPOConfig supports one loss_type among {', '.join(LOSS_TYPES)}; got "
                             f"{self.loss_type} (use TRL's DPOConfig for the others)")
        for name in ("ld_alpha",):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported by KernelDPOTrainer; leave it None")
        if self.use_weighting:
            raise ValueError("use_weighting (WPO) is not supported by KernelDPOTrainer; leave it False")
        div = divergences.get(self.divergence, **self.divergence_params)
        if self.divergence_form == "link" and not div.has_link:
            raise ValueError(f"divergence {self.divergence!r} has no link form; use divergence_form='penalty' or 'auto'")

    def _resolve_divergence(self):
        """Bring TRL's f_divergence_type and our divergence to one setting, or say which to use."""
        if self.divergence not in divergences.NAMES:
            raise ValueError(f"divergence must be one of {', '.join(divergences.NAMES)}; got {self.divergence!r}")
        if self.f_divergence_type not in TRL_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {', '.join(TRL_DIVERGENCES)}; got "
                             f"{self.f_divergence_type!r}")
        theirs = TRL_DIVERGENCES[self.f_divergence_type]
        if theirs == "alpha" and abs(self.f_alpha_divergence_coef - 1.0) < 1e-6:
            theirs = "kl"  # TRL falls back to reverse KL at coefficient 1
        if self.f_divergence_type == "reverse_kl" or theirs == "kl":
            return
        if self.divergence == "kl":  # TRL's setting alone: adopt it
            self.divergence = theirs
            if theirs == "alpha":
                self.divergence_params = {**self.divergence_params, "alpha": 1.0 - self.f_alpha_divergence_coef}
            return
        same = self.divergence == theirs and (
            theirs != "alpha" or abs(self.divergence_params.get("alpha", 0.5) - (1.0 - self.f_alpha_divergence_coef)) < 1e-9)
        if not same:
            raise ValueError(
                f"divergence={self.divergence!r} {self.divergence_params or ''} contradicts f_divergence_type="
                f"{self.f_divergence_type!r} (f_alpha_divergence_coef={self.f_alpha_divergence_coef}); set only one: "
                f"divergence (kdpo_lab's names; TRL's {self.f_divergence_type} is divergence={theirs!r}"
                + (f" with divergence_params={{'alpha': {1.0 - self.f_alpha_divergence_coef}}}" if theirs == "alpha" else "")
                + ") or f_divergence_type")


class KernelDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer computing kdpo_lab's `kernel_dpo_loss`; `trainer.kernel` is the kernel (or None)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        if not isinstance(cfg, KernelDPOConfig):
            raise ValueError(f"KernelDPOTrainer needs args=KernelDPOConfig(...); got {type(cfg).__name__}")
        self.divergence = divergences.get(cfg.divergence, **cfg.divergence_params)
        self.penalty = cfg.divergence_form == "penalty" or (cfg.divergence_form == "auto" and not self.divergence.has_link)
        self.loss_type, self.length_normalize = LOSS_TYPES[cfg.loss_type[0]]
        self.kernel = None
        self._kernel_fitted = False
        if cfg.kernel:
            self.kernel = kernels.get(cfg.kernel, **cfg.kernel_params).to(self.args.device)
        if self.penalty and self.ref_model is None and not models.is_peft(self.model):
            raise ValueError(f"the penalty form of {cfg.divergence!r} needs the reference's logits at every step: pass "
                             "ref_model=... (or train a PEFT adapter), and leave precompute_ref_log_probs off")

    # --------------------------------------------------------------------------------------- optimiser

    def create_optimizer(self, model=None):
        """TRL's optimiser, plus a group for the kernel's parameters at kernel_lr (no weight decay)."""
        optimizer = super().create_optimizer(model)
        params = [p for p in self.kernel.parameters() if p.requires_grad] if self.kernel is not None else []
        if params and not any(p is params[0] for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": params, "lr": self.args.kernel_lr, "weight_decay": 0.0})
        return optimizer

    def training_step(self, *args, **kwargs):
        """TRL's step; with several processes, the kernel's gradients are averaged across them (the kernel is
        not part of the model that accelerate wraps). Averaging after every micro-batch is exact: the part
        already averaged is the same on every process."""
        loss = super().training_step(*args, **kwargs)
        if self.kernel is not None and self.accelerator.num_processes > 1:
            for p in self.kernel.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, "mean")
        return loss

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if self.kernel is not None and self.args.should_save:
            checkpoint.save_kernel(self.kernel, output_dir or self.args.output_dir, dict(self.args.kernel_params))

    # --------------------------------------------------------------------------------------- loss

    @contextlib.contextmanager
    def _hidden_states(self, model, wanted):
        """Capture the backbone's last hidden state [2B, T, H] during a forward (TRL's fused LM head hides it)."""
        box = []
        if not wanted:
            yield box
            return
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if models.is_peft(unwrapped) else unwrapped
        handle = base.base_model.register_forward_hook(lambda module, args, out: box.append(out[0]))
        try:
            yield box
        finally:
            handle.remove()

    def _logits(self, model, hidden):
        """Next-token logits [2B, T-1, V] from last hidden states (for the penalty form)."""
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_output_embeddings()(hidden[:, :-1])

    def _reference(self, model_kwargs, labels, seq_len, inputs):
        """Reference (chosen, rejected) log-probs, and its logits when the penalty form needs them."""
        if self.precompute_ref_logps and not self.penalty:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], None
        if self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            ref, adapter = self.model, use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None)
        else:
            ref, adapter = self.ref_model, contextlib.nullcontext()
        with torch.no_grad(), adapter, self._hidden_states(ref, self.penalty) as hidden:
            out = ref(**model_kwargs, labels=labels, fused_lm_head=True)
        logps = out.log_probs[:, -seq_len:].sum(dim=1)
        ref_w, ref_l = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_w, ref_l = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return ref_w, ref_l, self._logits(ref, hidden[-1]) if self.penalty else None

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        seq_len = shift_mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        need_hidden = self.kernel is not None or self.penalty
        with self._hidden_states(model, need_hidden) as hidden:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        pi_w, pi_l = logps.chunk(2, dim=0)
        ref_w, ref_l, ref_logits = self._reference(model_kwargs, labels, seq_len, inputs)

        extra = {}
        if self.penalty:
            extra.update(pi_logits=self._logits(model, hidden[-1]).float(), ref_logits=ref_logits.float(),
                         response_mask=shift_mask.float())
        if self.kernel is not None:
            prompt_mask = inputs["attention_mask"] * (1 - completion_mask)
            e_x, e_w, e_l = (e.float() for e in models.pair_embeddings(hidden[-1], prompt_mask, completion_mask))
            if not self._kernel_fitted and mode == "train":
                self.kernel.fit(self.accelerator.gather(torch.cat([e_x, e_w, e_l]).detach()))  # same fit everywhere
                self._kernel_fitted = True
            extra.update(kernel=self.kernel, gamma=self.args.gamma, eta=self.args.eta, e_x=e_x, e_w=e_w, e_l=e_l)
        len_w, len_l = completion_mask.sum(dim=1).float().chunk(2, dim=0)
        loss, metrics = kernel_dpo_loss(
            pi_w, pi_l, ref_w, ref_l, beta=self.beta, divergence=self.divergence,
            divergence_form=self.args.divergence_form, lam=self.args.lam, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, length_normalize=self.length_normalize, len_w=len_w, len_l=len_l,
            **extra)
        loss = loss.mean()
        self._log_metrics(mode, metrics, pi_w, pi_l, inputs)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_metrics(self, mode, metrics, pi_w, pi_l, inputs):
        """TRL's reward and log-prob metrics, plus the kernel's and the penalty's (means over the global batch)."""
        gather = self.accelerator.gather_for_metrics
        for key, value in metrics.items():
            if key != "logit/z":
                self._metrics[mode][key].append(gather(value.float().reshape(-1)).mean().item())
        self._metrics[mode]["logps/chosen"].append(gather(pi_w.detach()).mean().item())
        self._metrics[mode]["logps/rejected"].append(gather(pi_l.detach()).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if self.kernel is not None and hasattr(self.kernel, "weights"):
            for key, value in self.kernel.weights().items():
                self._metrics[mode][f"hmk/{key}"].append(value)


__all__ = ["KernelDPOConfig", "KernelDPOTrainer"]
