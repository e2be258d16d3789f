"""Held-out evaluation during training, on every process.

Under FSDP or DeepSpeed the wrapped model's forward must run on every process, so evaluation does
too: accelerate deals the evaluation batches out and `gather_for_metrics` joins them back in order.
On one process every number equals `evaluation.evaluate`'s (a test checks it).
"""
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from kdpo_lab import batching, evaluation, models
from kdpo_lab.reference_cache import cached_pair_logps, cached_samples

NEW_TOKENS = 32  # tokens sampled per response at each evaluation during training


def gathered(accelerator, n, batch_size, fn):
    """fn(indices) -> tuple of per-item tensors, for items 0..n-1, on every process: accelerate's
    prepare_data_loader deals the batches out (each process runs as many), gather_for_metrics joins them
    back in order (dropping the padding of the last round). One process: fn on the batches, in order."""
    loader = prepare_data_loader(DataLoader(range(n), batch_size=batch_size, collate_fn=list),
                                 num_processes=accelerator.num_processes, process_index=accelerator.process_index)
    parts = []
    for idx in loader:
        out = accelerator.gather_for_metrics(tuple(t.to(accelerator.device) for t in fn(idx)))
        parts.append([t.cpu() for t in out])
    return [torch.cat(column) for column in zip(*parts)]


def pair_logps(accelerator, model, feats, pad_id, batch_size):
    """evaluation.pair_logps on every process: ([n], [n]) sequence log-probs of chosen and rejected."""
    return gathered(accelerator, len(feats), batch_size,
                    lambda idx: evaluation.pair_logps(model, [feats[i] for i in idx], pad_id, batch_size))


def combine_sampled(parts):
    """Sampled metrics of several processes' shards, [(result, counts)], as one: each mean weighted by the
    pairs behind it (counts[""] in all, counts[family] for a key ending in "/family"); n_generated
    summed; what is not a number (samples, unavailable, the reward model's name) from the first shard."""
    if len(parts) == 1:
        return parts[0][0]
    out = {}
    for key in dict.fromkeys(k for result, _ in parts for k in result):
        values = [(counts, result[key]) for result, counts in parts if key in result]
        if not isinstance(values[0][1], (int, float)):
            out[key] = values[0][1]
        elif key == "n_generated":
            out[key] = sum(v for _, v in values)
        else:
            family = key.rsplit("/", 1)[-1] if key.rsplit("/", 1)[-1] in values[0][0] else ""
            weights = [(counts.get(family, 0), v) for counts, v in values]
            out[key] = sum(w * v for w, v in weights) / sum(w for w, _ in weights)
    return out


class DPOEvaluation:
    """Held-out metrics of a DPO run, computed on every process (FSDP needs the wrapped model's forward):
    preference accuracy and margins on held-out pairs and on as many training pairs (the gap), and, with
    eval_generate, sampled reward, win-rate and KL. Each process samples a contiguous share of the
    prompts; on one process the numbers are exactly evaluation.evaluate's.

    cache: the reference's kdpo_lab.reference_cache.Cache, or None: the reference's log-probs and
    samples are then read from it when another run of the same reference computed them (the same numbers)."""

    def __init__(self, cfg, accelerator, ref_model, tokenizer, train, held_out, cache=None):
        self.cfg, self.acc, self.ref_model, self.tokenizer = cfg, accelerator, ref_model, tokenizer
        (self.train_pairs, self.train_feats), (self.pairs, self.feats) = train, held_out
        self.cache, self.ref = cache, {}

    def reference_logps(self, model, feats, batch_size):
        """The reference's (chosen, rejected) log-probs of feats (model: the policy, for LoRA's reference)."""
        def compute():
            with models.reference_context(model, self.ref_model) as ref:
                ref.eval()
                return pair_logps(self.acc, ref, feats, self.tokenizer.pad_token_id, batch_size)
        return cached_pair_logps(self.cache, feats, batch_size, compute, self.acc)

    def precompute_reference(self, model, train_ref):
        """The reference never changes: its log-probs of the pairs every evaluation scores, once."""
        n, bs = len(self.feats), 4 * self.cfg.per_device_train_batch_size
        self.ref["held_out"] = self.reference_logps(model, self.feats, bs)
        self.ref["train"] = ((train_ref[0][:n], train_ref[1][:n]) if train_ref is not None
                             else self.reference_logps(model, self.train_feats[:n], bs))

    def run(self, run):
        """Evaluate the current policy: the row that training appends to OUT/eval.jsonl."""
        cfg, pad_id, n = self.cfg, self.tokenizer.pad_token_id, len(self.feats)
        run.model.eval()
        result = evaluation.preference_summary(*pair_logps(self.acc, run.model, self.feats, pad_id, 32), self.ref["held_out"],
                                    self.pairs, cfg.beta)
        if cfg.eval_generate > 0:
            result.update(self.sampled(run.unwrapped))
        on_train = evaluation.preference_summary(*pair_logps(self.acc, run.model, self.train_feats[:n], pad_id, 32),
                                      self.ref["train"], self.train_pairs[:n], cfg.beta)
        result["pref/train_accuracy"] = on_train["pref/accuracy"]
        result["pref/gap"] = on_train["pref/accuracy"] - result["pref/accuracy"]
        result["step"] = run.step
        return result

    def sampled(self, model):
        """Reward, win-rate and KL of sampled responses (evaluation.evaluate) on this process's share of
        the first eval_generate prompts, combined across processes. Sampling needs the whole model on
        each process (DDP; not FSDP or ZeRO-3)."""
        n, world, rank = min(self.cfg.eval_generate, len(self.feats)), self.acc.num_processes, self.acc.process_index
        lo, hi = n * rank // world, n * (rank + 1) // world
        part = []
        if hi > lo:
            pairs, ref = self.pairs[lo:hi], tuple(r[lo:hi] for r in self.ref["held_out"])
            samples = None
            if self.cache is not None:
                samples = self.reference_samples(model, [f["prompt_ids"] for f in self.feats[lo:hi]], NEW_TOKENS)
            result = evaluation.evaluate(model, self.ref_model, self.tokenizer, pairs, self.feats[lo:hi],
                                         beta=self.cfg.beta, n_generate=hi - lo, seed=self.cfg.seed,
                                         max_new_tokens=NEW_TOKENS, ref_logps=ref, ref_samples=samples)
            counts = {"": hi - lo}
            for p in pairs:
                counts[p.family or "all"] = counts.get(p.family or "all", 0) + 1
            part = [({k: v for k, v in result.items() if not k.startswith("pref/")}, counts)]
        parts = self.acc.gather_for_metrics(part, use_gather_object=True) if world > 1 else part
        return combine_sampled(parts)

    def reference_samples(self, model, prompts, max_new_tokens):
        """The reference's samples of `prompts` as evaluation.evaluate draws them, through the cache."""
        settings = {"seed": self.cfg.seed, "max_new_tokens": max_new_tokens, "batch_size": 32,
                    "eos": self.tokenizer.eos_token_id, "pad": self.tokenizer.pad_token_id}
        return cached_samples(self.cache, prompts, settings, lambda: evaluation.reference_samples(
            model, self.ref_model, self.tokenizer, prompts, max_new_tokens, self.cfg.seed))


@torch.no_grad()
def held_out_sft_loss(run, feats):
    """The SFT loss (mean negative log-likelihood per response token) of held-out pairs, on every process."""
    run.model.eval()

    def per_pair(idx):
        batch = batching.device_batch(feats, idx, run.pad_id, run.accelerator.device)
        out = models.sequence_logps(run.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        return (*out["logps"].chunk(2), *out["n_tokens"].chunk(2))
    w, l, n_w, n_l = gathered(run.accelerator, len(feats), -(-len(feats) // run.accelerator.num_processes), per_pair)
    return (-torch.cat([w, l]).sum() / torch.cat([n_w, n_l]).sum().clamp_min(1)).item()
