"""The run configuration: every knob of `kdpo sft` and `kdpo train`, and the named config-built models.

A YAML file in configs/ sets the fields; `--field value` on the command line overrides the file
(`cli` merges the two with `transformers.HfArgumentParser`). A config is checked when it is built
(`__post_init__`): each choice against its choices and each number against its range, so a bad value
is one ValueError naming the field and what it accepts, before any data or model is touched.
"""
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdpo_lab import divergences, kernels, package_root
from kdpo_lab.losses import LOSS_TYPES

CONFIG_MODELS = ("tiny-llama", "tiny-gpt2", "llama-7b-shape")
DTYPES = ("fp32", "bf16")
DIVERGENCE_FORMS = ("auto", "link", "penalty")
EMBEDDINGS = ("policy", "encoder")


def _f(default, help):
    return field(default=default, metadata={"help": help})


RENAMED = {"out_dir": "output_dir", "lr": "learning_rate", "batch_size": "per_device_train_batch_size",
           "grad_accum": "gradient_accumulation_steps", "log_every": "logging_steps", "eval_every": "eval_steps",
           "save_every": "save_steps"}
"""Old field names (before TRL's names were adopted) and their new names: still accepted, with a notice."""


def rename_old_fields(values, where):
    """values with old field names replaced by TRL's names; one notice per old name on stderr."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old in out:
            print(f"{where}: '{old}' is now '{new}' (TRL's name); the old name still works", file=sys.stderr)
            if new in out:
                raise ValueError(f"{where}: both '{old}' and its new name '{new}' are set; keep '{new}'")
            out[new] = out.pop(old)
    return out


# ----------------------------------------------------------------------------------------------
# Checks: each raises ValueError with one line naming the field and what it accepts


def _as(name, value, kind):
    """value as int / float / bool / str (YAML may give "5e-5" as text), else ValueError naming the field."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false; got {value!r}")
    if kind in (int, float):
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number) or (kind is int and number != int(number)):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}; got {value!r}")
        return int(number) if kind is int else number
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text; got {value!r}")
    return value


def _choice(name, value, choices):
    if value not in choices:
        shown = ", ".join(repr(c) if c == "" else c for c in choices)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")


def _range(name, value, low=None, high=None, low_open=False):
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        bounds = (f"> {low}" if low_open else f">= {low}") if high is None else \
            f"in {'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}; got {value!r}")


def _mapping(name, value):
    """A dict from YAML, or a JSON object given as text on the command line."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} must be a JSON object such as '{{\"sigma\": 0.5}}'; got {value!r} ({e.msg})") \
                from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of parameter names to values; got {value!r}")
    return value


@dataclass
class SFTConfig:
    """Every knob of `kdpo sft` (the reference's supervised fine-tuning); `kdpo train` adds the loss's.
    YAML files in configs/ set these; the command line overrides them. Names follow TRL / HF
    TrainingArguments where they have the same idea (learning_rate, per_device_train_batch_size, ...)."""
    output_dir: str = _f("runs/sft", "where the model, checkpoint, metrics.jsonl, config.yaml and data_report.txt go")
    # data
    data: str = _f("data/suite", "a folder with train/validation files, one file (10% held out), or a hub dataset name")
    families: str = _f("", "comma-separated suite families to keep (empty: all)")
    max_train_pairs: int = _f(0, "use at most this many training pairs (0: all)")
    max_eval_pairs: int = _f(256, "held-out pairs for evaluation during and after training")
    # str because it also takes "auto"; an integer after checking
    max_length: str = _f(96, "prompt + response tokens (>= 8), or auto: the length that keeps 95% of the "
                             "training tokens (at most 4096). Longer prompts are cut from the left, then "
                             "responses from the right")
    max_prompt_length: int = _f(64, "prompt tokens kept at most (cut from the left)")
    strict: bool = _f(False, "stop at the first malformed data row instead of skipping and reporting it")
    # model
    model: str = _f("runs/sft", "policy start: a local path, a hub name, or tiny-llama / tiny-gpt2 / llama-7b-shape (built from a config)")
    tokenizer: str = _f("", "tokenizer path (default: the model's; built from the data for config models)")
    d_model: int = _f(128, "hidden size of config-built models")
    n_layers: int = _f(4, "layers of config-built models")
    n_heads: int = _f(4, "attention heads of config-built models (must divide d_model)")
    model_scale: float = _f(1.0, "llama-7b-shape only: shrink width and depth by this factor, in (0, 1] (CPU fast mode)")
    vocab_size: int = _f(1024, "BPE vocabulary built from the data for config models")
    lora_r: int = _f(0, "LoRA rank (0: train all weights). With LoRA the reference is the base, adapters off")
    lora_alpha: int = _f(16, "LoRA scaling alpha")
    dtype: str = _f("fp32", "weights dtype: fp32 or bf16 (fp16 weights are refused: without loss scaling their "
                            "updates underflow and overflow; use bf16)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    # optimisation
    learning_rate: float = _f(5e-5, "peak learning rate of the policy (tiny full fine-tuning: 5e-4 over-optimises, see README)")
    per_device_train_batch_size: int = _f(16, "pairs per micro-batch per process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimisation step")
    group_by_length: bool = _f(False, "batch pairs of similar length together (HF's name; kdpo_lab.ordering): about 30% faster steps on the suite, less random batches")
    max_steps: int = _f(200, "optimisation steps")
    warmup_steps: int = _f(10, "linear warm-up steps, then cosine decay to 10% of lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    seed: int = _f(0, "seeds data order, initialisation and sampling")
    logging_steps: int = _f(10, "steps between metric lines")
    report_to: str = _f("none", "where metrics also go, as in TRL: none, all, or comma-separated trackers (tensorboard, wandb, ...); needs the tracker installed")
    save_steps: int = _f(50, "steps between checkpoints")
    resume: bool = _f(False, "continue from OUT/checkpoint if it exists")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            kind = {"int": int, "float": float, "bool": bool}.get(getattr(f.type, "__name__", f.type), str)
            if f.name in ("max_length", "kernel_params", "divergence_params"):
                continue
            setattr(self, f.name, _as(f.name, getattr(self, f.name), kind))
        if str(self.max_length).lower() == "auto":
            self.max_length = "auto"
        else:
            self.max_length = _as("max_length", self.max_length, int)
            _range("max_length", self.max_length, 8)
        for name in ("output_dir", "data", "model"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        for name in ("max_eval_pairs", "max_prompt_length", "d_model", "n_layers", "n_heads", "vocab_size",
                     "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                     "logging_steps", "save_steps"):
            _range(name, getattr(self, name), 1)
        for name in ("max_train_pairs", "lora_r", "warmup_steps", "weight_decay"):
            _range(name, getattr(self, name), 0)
        for name in ("learning_rate", "max_grad_norm"):
            _range(name, getattr(self, name), 0, low_open=True)
        _range("model_scale", self.model_scale, 0, 1, low_open=True)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model; got d_model={self.d_model}, n_heads={self.n_heads}")
        if self.dtype == "fp16":
            raise ValueError("dtype fp16 is not supported: fp16 weights need loss scaling to train; use bf16 "
                             "(same memory) or fp32")
        _choice("dtype", self.dtype, DTYPES)

    @classmethod
    def from_yaml(cls, path, **overrides):
        """The config in a YAML file, with `overrides` (field=value) on top; old names accepted."""
        values = read_yaml(path)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**{**values, **rename_old_fields(overrides, "command line")})

    def save(self, path):
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def read_yaml(path):
    """The field values in a YAML config file (old names renamed, with a notice), or a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist (shipped configs: {', '.join(shipped_configs())})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
    return rename_old_fields(values, str(path))


@dataclass
class TrainConfig(SFTConfig):
    """Every knob of `kdpo train`: SFTConfig's plus the DPO-Kernels loss and evaluation."""
    output_dir: str = _f("runs/dpo", "where the model, checkpoint, metrics.jsonl, config.yaml and data_report.txt go")
    # loss
    beta: float = _f(0.1, "strength of the KL constraint, > 0; z = beta * (s_w - s_l) + ...")
    divergence: str = _f("kl", "kl, forward_kl, js, hellinger, renyi, bhattacharyya, wasserstein, alpha, chi2")
    divergence_form: str = _f("auto", "link (f'(pi/pi_ref) replaces the log-ratio), penalty (DPO + lam * token D), auto")
    lam: float = _f(0.1, "weight of the penalty form, >= 0")
    order: float = _f(0.3, "Renyi order a (renyi only; > 0, not 1; 0.3 keeps it distinct from Hellinger = alpha 0.5)")
    alpha: float = _f(0.3, "alpha of the alpha-divergence (alpha only, in (0, 1); TRL's coef = 1 - alpha; 0.5 is Hellinger)")
    divergence_params: str = _f("", "other parameters of the divergence as a JSON object, e.g. wasserstein "
                                    "'{\"k\": 16, \"epsilon\": 0.05}' (YAML: a mapping)")
    kernel: str = _f("", "kernel for the hybrid term: linear, polynomial, rbf, spectral, mahalanobis, hmk (empty: none)")
    kernel_params: str = _f("", "the kernel's parameters as a JSON object, passed to kernels.get(kernel, **params), "
                                "e.g. '{\"sigma\": 0.5}' for rbf, '{\"degree\": 3}' for polynomial (YAML: a mapping)")
    gamma: float = _f(0.0, "weight of the kernel term gamma * (log K(e_x,e_w) - log K(e_x,e_l)), >= 0")
    eta: float = _f(0.0, "HMK entropy bonus against kernel collapse, >= 0")
    embeddings: str = _f("policy", "policy (own hidden states, with gradient) or encoder (frozen MiniLM: a fixed offset)")
    loss_type: str = _f("sigmoid", "sigmoid (DPO), hinge, ipo, cdpo, robust")
    label_smoothing: float = _f(0.0, "flip rate for cdpo / robust, in [0, 0.5)")
    length_normalize: bool = _f(False, "LN-DPO: divide each response's score by its token count (TRL's sigmoid_norm)")
    offset: float = _f(0.0, "ODPO: a constant offset delta subtracted from the preference logit z")
    odpo_alpha: float = _f(0.0, "ODPO: per-pair offset delta = odpo_alpha * log(score_chosen - score_rejected) "
                                "from the data's score_chosen / score_rejected fields (0: none)")
    # optimisation and evaluation
    kernel_lr: float = _f(1e-2, "learning rate of the HMK mixture weights (the only trained kernel parameters: scales are fixed by fit), > 0")
    eval_steps: int = _f(0, "steps between held-out evaluations (0: only at the end)")
    eval_generate: int = _f(0, "prompts to sample at each evaluation for KL, lengths, reward and win-rate (0: none)")

    def __post_init__(self):
        super().__post_init__()
        _choice("divergence", self.divergence, divergences.NAMES)
        _choice("divergence_form", self.divergence_form, DIVERGENCE_FORMS)
        _choice("kernel", self.kernel, ("",) + kernels.NAMES)
        _choice("embeddings", self.embeddings, EMBEDDINGS)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _range("beta", self.beta, 0, low_open=True)
        _range("kernel_lr", self.kernel_lr, 0, low_open=True)
        for name in ("lam", "gamma", "eta", "eval_steps", "eval_generate", "odpo_alpha"):
            _range(name, getattr(self, name), 0)
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5); got {self.label_smoothing!r}")
        self.divergence_params = _mapping("divergence_params", self.divergence_params)
        self.kernel_params = _mapping("kernel_params", self.kernel_params)
        div = divergences.get(self.divergence, **self.divergence_kwargs())  # checks the parameters
        if self.divergence_form == "link" and not div.has_link:
            raise ValueError(f"divergence_form link: {self.divergence} has no link form; use penalty or auto")
        if self.kernel:
            kernels.get(self.kernel, **self.kernel_params)  # checks the parameters
        elif self.gamma or self.eta or self.kernel_params:
            raise ValueError("gamma, eta and kernel_params belong to the kernel term: set kernel (e.g. --kernel rbf) "
                             "or leave them unset")

    def divergence_kwargs(self):
        """Keyword arguments of divergences.get(self.divergence, ...): order / alpha, then divergence_params."""
        own = {"renyi": {"order": self.order}, "alpha": {"alpha": self.alpha}}.get(self.divergence, {})
        return {**own, **self.divergence_params}


def shipped_configs():
    return sorted(p.name for p in (package_root() / "configs").glob("*.yaml"))


def resolve(path):
    """A path as given when it exists; else, for data/... and configs/..., the copy shipped with kdpo_lab
    (so the README's commands work from any folder and from an installed package)."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parts[:1] not in (("data",), ("configs",)):
        return str(path)
    shipped = package_root() / given
    return str(shipped) if shipped.exists() else str(path)
