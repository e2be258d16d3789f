"""The run configuration: every knob of `kdpo sft` and `kdpo train`, and the named config-built models.

A YAML file in configs/ sets the fields; `--field value` on the command line overrides the file.
"""
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


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


@dataclass
class SFTConfig:
    """Every knob of `kdpo sft` (the reference's supervised fine-tuning); `kdpo train` adds the loss's.
    YAML files in configs/ set these; the command line overrides them. Names follow TRL / HF
    TrainingArguments where they have the same idea (learning_rate, per_device_train_batch_size, ...)."""
    output_dir: str = _f("runs/sft", "where the model, checkpoint, metrics.jsonl and config.yaml go")
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
    # optimisation
    learning_rate: float = _f(5e-5, "peak learning rate of the policy (tiny full fine-tuning: 5e-4 over-optimises, see README)")
    per_device_train_batch_size: int = _f(16, "pairs per micro-batch per process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimisation step")
    max_steps: int = _f(200, "optimisation steps")
    warmup_steps: int = _f(10, "linear warm-up steps, then cosine decay to 10% of lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    seed: int = _f(0, "seeds data order, initialisation and sampling")
    logging_steps: int = _f(10, "steps between metric lines")
    save_steps: int = _f(50, "steps between checkpoints")
    resume: bool = _f(False, "continue from OUT/checkpoint if it exists")
    progress: bool = _f(True, "show a progress bar")

    @classmethod
    def from_yaml(cls, path, **overrides):
        values = rename_old_fields(yaml.safe_load(Path(path).read_text()) or {}, str(path))
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**{**values, **rename_old_fields(overrides, "command line")})

    def save(self, path):
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


@dataclass
class TrainConfig(SFTConfig):
    """Every knob of `kdpo train`: SFTConfig's plus the DPO-Kernels loss and evaluation."""
    output_dir: str = _f("runs/dpo", "where the model, checkpoint, metrics.jsonl and config.yaml go")
    # loss
    beta: float = _f(0.1, "strength of the KL constraint; z = beta * (s_w - s_l) + ...")
    divergence: str = _f("kl", "kl, forward_kl, js, hellinger, renyi, bhattacharyya, wasserstein, alpha, chi2")
    divergence_form: str = _f("auto", "link (f'(pi/pi_ref) replaces the log-ratio), penalty (DPO + lam * token D), auto")
    lam: float = _f(0.1, "weight of the penalty form")
    order: float = _f(0.3, "Renyi order a (renyi only; 0.3 keeps it distinct from Hellinger = alpha 0.5)")
    alpha: float = _f(0.3, "alpha of the alpha-divergence (alpha only; TRL's coef = 1 - alpha; 0.5 would be Hellinger)")
    kernel: str = _f("", "kernel for the hybrid term: linear, polynomial, rbf, spectral, mahalanobis, hmk (empty: none)")
    gamma: float = _f(0.0, "weight of the kernel term gamma * (log K(e_x,e_w) - log K(e_x,e_l))")
    eta: float = _f(0.0, "HMK entropy bonus against kernel collapse")
    embeddings: str = _f("policy", "policy (own hidden states, with gradient) or encoder (frozen MiniLM: a fixed offset)")
    loss_type: str = _f("sigmoid", "sigmoid (DPO), hinge, ipo, cdpo, robust")
    label_smoothing: float = _f(0.0, "flip rate for cdpo / robust")
    # optimisation and evaluation
    kernel_lr: float = _f(1e-2, "learning rate of the HMK mixture weights (the only trained kernel parameters; scales are fixed by fit)")
    eval_steps: int = _f(0, "steps between held-out evaluations (0: only at the end)")
    eval_generate: int = _f(0, "prompts to sample at each evaluation for reward, win-rate and KL (0: none)")


CONFIG_MODELS = ("tiny-llama", "tiny-gpt2", "llama-7b-shape")
