"""The reference's outputs that every run of one reference recomputes identically, computed once.

All runs of a sweep seed start from the same SFT model, and the reference never changes during a run:
its log-probs of the training and held-out pairs, its embeddings for fitting a kernel, and its sampled
responses on the evaluation prompts are the same numbers in every run. They are kept next to the
reference, in `<sft run>/reference_cache/` (or `<model folder>/reference_cache/` for a folder that is
not a kdpo run), one safetensors file per entry.

An entry is named by the SHA-256 of everything it depends on (its key):
    the reference's files (every file of the model folder, by content), the dtype it is loaded in,
    the device type, the number of processes, the torch and transformers versions;
    the token ids it is computed from (prompt, chosen and rejected ids of exactly the pairs used, in
    order: this covers the data files, split, indices, tokenizer, max_length and max_prompt_length);
    the batch size (padding width changes the last bits of a forward) and, for samples, the seed,
    max_new_tokens and the special token ids.
Change any of these and the name changes, so a stale entry is never read; the full key is also kept in
the file's metadata and compared on reading. A cached value is exactly what the computation returned
(the same code computes it on a miss), so a run's numbers are bit-identical with and without the cache
(tests/test_reference_cache.py). KDPO_REFERENCE_CACHE=0 turns the cache off.

Writing: into a temporary file in the same folder, then os.replace (atomic on POSIX): a reader sees a
whole entry or none. Two processes that build the same entry at once each write their own temporary
file and the last rename wins; both hold the same numbers. An unreadable entry counts as missing and is
rebuilt; a folder that cannot be written (read-only reference) only costs the saving.

Samples carry the global generators' states right after sampling: `evaluation.generate` reseeds torch's
global generator, so replaying cached samples also restores that state, and whatever draws from the
global generator afterwards (a checkpoint's saved RNG state, the next run's sampling) sees the same
numbers as without the cache.
"""
import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, safe_open, save_file

from kdpo_lab.evaluation import Samples

ENV = "KDPO_REFERENCE_CACHE"
FOLDER = "reference_cache"
_SKIP = {FOLDER}  # never part of the reference's fingerprint


def enabled():
    """False when KDPO_REFERENCE_CACHE=0."""
    return os.environ.get(ENV, "1") != "0"


def digest(value):
    """SHA-256 (hex) of a JSON-able value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(path):
    """SHA-256 of every file under a model folder (relative name and bytes), reference_cache/ excluded."""
    h = hashlib.sha256()
    path = Path(path)
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not _SKIP & set(p.relative_to(path).parts)):
        h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def features_digest(feats):
    """SHA-256 of the token ids of encoded pairs (prompt, chosen, rejected), in order."""
    h = hashlib.sha256()
    for f in feats:
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(json.dumps(f[name]).encode() + b";")
        h.update(b"|")
    return h.hexdigest()


def prompts_digest(prompts):
    return hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()


def location(model_path):
    """The cache folder of a reference loaded from `model_path`, or None when it is not a local folder:
    `<run>/reference_cache` for the model/ folder of a kdpo run (it holds kdpo_run.json), else
    `<model_path>/reference_cache`."""
    path = Path(str(model_path))
    if not path.is_dir():
        return None
    run = path.parent
    return (run if (run / "kdpo_run.json").exists() else path) / FOLDER


@dataclass
class Cache:
    """The entries of one reference. `base`: what every entry depends on (see the module docstring)."""
    folder: Path
    base: dict

    @classmethod
    def open(cls, model_path, dtype, device, num_processes=1, **extra):
        """The cache of the reference in `model_path` as loaded (dtype, device), or None (off, or not a
        folder). extra: any other setting the reference's outputs depend on (e.g. gradient_checkpointing)."""
        folder = location(model_path) if enabled() else None
        if folder is None:
            return None
        base = {"reference": folder_digest(model_path), "dtype": str(dtype), "device": torch.device(device).type,
                "processes": num_processes, "torch": torch.__version__, "transformers": transformers.__version__,
                "tf32": torch.backends.cuda.matmul.allow_tf32, **extra}
        return cls(folder, base)

    def path(self, name, key):
        return self.folder / f"{name}-{digest({'name': name, **self.base, **key})[:40]}.safetensors"

    def load(self, name, key):
        """The entry's tensors, or None when it is missing, unreadable or written for another key."""
        path = self.path(name, key)
        try:
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("key")
            if stored != json.dumps({"name": name, **self.base, **key}, sort_keys=True, default=str):
                return None
            return load_file(str(path))
        except Exception:  # missing, or torn by something other than this module: rebuild it
            return None

    def save(self, name, key, tensors):
        """Write the entry atomically (temporary file, then os.replace); a failed write only warns."""
        path = self.path(name, key)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"key": json.dumps({"name": name, **self.base, **key}, sort_keys=True, default=str)}
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"reference cache: could not write {path} ({e}); continuing without it")

    def get_or_compute(self, name, key, compute, accelerator=None):
        """The entry's tensors, computed by compute() (a dict of tensors) and saved when missing.

        With an accelerator of several processes, compute() may be collective (every process must call
        it): the entry counts as found only when every process found it, and the main process writes it."""
        found = self.load(name, key)
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([float(found is not None)], device=accelerator.device)
            if not bool(accelerator.gather(flag).min() > 0):
                found = None
        if found is not None:
            return found
        tensors = compute()
        if accelerator is None or accelerator.is_main_process:
            self.save(name, key, tensors)
        return tensors


# ----------------------------------------------------------------------------- what is cached

def cached_pair_logps(cache, feats, batch_size, compute, accelerator=None):
    """(chosen, rejected) reference log-probs of feats: compute() -> ([n], [n]), through the cache when given."""
    if cache is None:
        return compute()
    key = {"feats": features_digest(feats), "n": len(feats), "batch_size": batch_size}
    out = cache.get_or_compute("pair_logps", key, lambda: dict(zip(("chosen", "rejected"), compute())), accelerator)
    return out["chosen"], out["rejected"]


def cached_embeddings(cache, feats, batch_size, compute, accelerator=None):
    """The reference's pooled embeddings of feats (training._fit_embeddings), through the cache when given."""
    if cache is None:
        return compute()
    key = {"feats": features_digest(feats), "n": len(feats), "batch_size": batch_size}
    return cache.get_or_compute("embeddings", key, lambda: {"embeddings": compute()}, accelerator)["embeddings"]


def cached_samples(cache, prompts, settings, compute):
    """The reference's sampled responses (evaluation.Samples) to `prompts`: compute() -> Samples.
    settings: a dict of what sampling depends on besides the prompts (seed, max_new_tokens, token ids)."""
    if cache is None:
        return compute()
    key = {"prompts": prompts_digest(prompts), "n": len(prompts), **settings}
    found = cache.load("samples", key)
    if found is None:
        samples = compute()
        cache.save("samples", key, samples.to_tensors())
        return samples
    return Samples.from_tensors(found)
