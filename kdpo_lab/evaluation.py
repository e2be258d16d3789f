"""What alignment did, measured: held-out preference accuracy, KL to the reference, exact rewards.

* Preference accuracy and margins: on held-out pairs, the fraction with rho_w > rho_l and the mean of
  beta * (rho_w - rho_l) (TRL's rewards/accuracies and rewards/margins).
* KL(pi || pi_ref), estimated by Monte Carlo on sampled responses: KL = E_{y ~ pi}[log pi(y|x) -
  log pi_ref(y|x)] (sequence level, unbiased; not the DPO margin relabelled as KL).
* Response lengths (tokens) of the policy's and the reference's samples.
* Ground-truth reward of sampled responses (the suite's exact reward functions, no judge model) for the
  policy and for the reference, and the win-rate P(r(y_pi) > r(y_ref)) + P(tie)/2, per family; only on
  the suite's rows. On any data, the same reward and win-rate from a sequence-classification reward
  model when one is given (rm/*). `evaluate` lists what it could not compute under "unavailable".
"""
from collections import defaultdict
from dataclasses import dataclass

import torch

from kdpo_lab import batching, suite
from kdpo_lab import models


@torch.no_grad()
def pair_logps(model, feats, pad_id, batch_size=32):
    """Sequence log-probs of the chosen and the rejected response of every pair: ([n], [n]) on the CPU."""
    device = next(model.parameters()).device
    ws, ls = [], []
    for i in range(0, len(feats), batch_size):
        batch = {k: v.to(device) for k, v in batching.collate(feats[i:i + batch_size], pad_id).items()}
        w, l = models.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                     batch["response_mask"])["logps"].float().chunk(2)
        ws.append(w.cpu())
        ls.append(l.cpu())
    return torch.cat(ws), torch.cat(ls)


@torch.no_grad()
def preference_metrics(model, ref_model, feats, pairs, beta, pad_id, ref_logps=None, batch_size=32):
    """Held-out accuracy (rho_w > rho_l) and mean margin beta * (rho_w - rho_l), overall and per family.

    ref_logps: the reference's (chosen, rejected) log-probs of these pairs when already computed (the
    reference does not change during training, so the trainer computes them once)."""
    model.eval()
    pw, pl = pair_logps(model, feats, pad_id, batch_size)
    if ref_logps is None:
        with models.reference_context(model, ref_model) as ref:
            ref_logps = pair_logps(ref, feats, pad_id, batch_size)
    return preference_summary(pw, pl, ref_logps, pairs, beta)


def preference_summary(pw, pl, ref_logps, pairs, beta):
    """preference_metrics from log-probs already computed: pw, pl the policy's and ref_logps the
    reference's (chosen, rejected) sequence log-probs, [n] each."""
    rho_w, rho_l = pw - ref_logps[0], pl - ref_logps[1]
    correct = (rho_w > rho_l).float()
    result = {"pref/accuracy": correct.mean().item(), "pref/margin": (beta * (rho_w - rho_l)).mean().item()}
    for family, rows in _by_family(pairs).items():
        result[f"pref/accuracy/{family}"] = correct[rows].mean().item()
    return result


@torch.no_grad()
def generate(model, prompt_ids, eos_id, pad_id, max_new_tokens=32, temperature=1.0, seed=0, batch_size=32):
    """Sample one response per prompt (lists of token ids in, lists of response token ids out, eos kept)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    model.eval()
    responses = []
    for i in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk], device=device)  # left pad
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
        for row in out[:, width:].tolist():
            responses.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return responses


@dataclass
class Samples:
    """Sampled responses (lists of token ids, eos kept) and torch's generator states right after
    sampling: `replay` returns the responses and leaves the generators as sampling them would have
    (`generate` reseeds the global generator with `seed`, then draws). cuda_rng_state: the state of the
    CUDA device the model sampled on (`cuda_device`), when it did."""
    responses: list
    seed: int
    rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None = None
    cuda_device: int = 0

    def replay(self, n):
        """The n responses, with the generators left as drawing them left them."""
        if len(self.responses) != n:
            raise ValueError(f"ref_samples: {len(self.responses)} responses for {n} prompts")
        torch.manual_seed(self.seed)  # every device, as generate does
        torch.set_rng_state(self.rng_state)
        if self.cuda_rng_state is not None:
            torch.cuda.set_rng_state(self.cuda_rng_state, self.cuda_device)
        return self.responses

    def to_tensors(self):
        """A dict of tensors (for safetensors): responses flattened with their lengths."""
        out = {"tokens": torch.tensor([t for r in self.responses for t in r], dtype=torch.long),
               "lengths": torch.tensor([len(r) for r in self.responses], dtype=torch.long),
               "seed": torch.tensor([self.seed]), "rng_state": self.rng_state,
               "cuda_device": torch.tensor([self.cuda_device])}
        if self.cuda_rng_state is not None:
            out["cuda_rng_state"] = self.cuda_rng_state
        return out

    @classmethod
    def from_tensors(cls, t):
        tokens, responses, start = t["tokens"].tolist(), [], 0
        for n in t["lengths"].tolist():
            responses.append(tokens[start:start + n])
            start += n
        return cls(responses, int(t["seed"]), t["rng_state"], t.get("cuda_rng_state"), int(t["cuda_device"]))


def sample(model, prompt_ids, eos_id, pad_id, max_new_tokens=32, seed=0):
    """generate(...), with the generator states it leaves behind (Samples)."""
    responses = generate(model, prompt_ids, eos_id, pad_id, max_new_tokens, seed=seed)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    return Samples(responses, seed, torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None,
                   device.index or 0 if cuda else 0)


def reference_samples(model, ref_model, tokenizer, prompt_ids, max_new_tokens=32, seed=0):
    """The reference's Samples of prompt_ids, as `evaluate` draws them, computed aside: torch's generator
    states are restored afterwards (torch.random.fork_rng), so computing them early changes nothing."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with models.reference_context(model, ref_model) as ref:
            return sample(ref, prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens, seed)


@torch.no_grad()
def sequence_logps_of(model, prompt_ids, response_ids, pad_id, batch_size=32):
    """log pi(y|x) summed over response tokens, for lists of prompt and response token ids."""
    device = next(model.parameters()).device
    result = []
    for i in range(0, len(prompt_ids), batch_size):
        rows = [list(p) + list(r) for p, r in zip(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        resp = torch.zeros_like(attn)
        for j, (p, r) in enumerate(zip(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size])):
            resp[j, len(p):len(p) + len(r)] = 1
        result.append(models.sequence_logps(model, ids, attn, resp)["logps"].float().cpu())
    return torch.cat(result)


class RewardModel:
    """A sequence-classification reward model (a local folder or a hub name): score(pairs, responses)
    -> [n] rewards, the first logit of "rendered prompt + response". The prompt is rendered with the
    reward model's own chat template when it has one (batching.render_prompt), so a chat-tuned reward
    model sees what it was trained on."""

    def __init__(self, name_or_path, batch_size=16, max_length=1024):
        from transformers import AutoModelForSequenceClassification
        self.name = str(name_or_path)
        self.tokenizer = models.load_tokenizer(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score(self, pairs, responses):
        texts = [batching.render_prompt(p, self.tokenizer) + y for p, y in zip(pairs, responses)]
        device = next(self.model.parameters()).device
        scores = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length).to(device)
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores)


def is_suite(pairs):
    """True when every pair is a row of the synthetic suite (a known family and its meta): exact rewards exist."""
    return all(p.family in suite.FAMILIES and p.meta for p in pairs)


def win_rate(r_pi, r_ref):
    """P(r(y_pi) > r(y_ref)) + P(tie) / 2 per prompt: [n]."""
    return (r_pi > r_ref).float() + 0.5 * (r_pi == r_ref).float()


def evaluate(model, ref_model, tokenizer, pairs, feats, beta, n_generate=0, seed=0, max_new_tokens=32, ref_logps=None,
             reward_model=None, ref_samples=None):
    """Metrics of a policy against its reference, on any preference data:
    - always: preference accuracy and implicit reward margins (pref/*);
    - with n_generate > 0, on sampled responses: KL(pi || pi_ref) (Monte Carlo, sequence level),
      response lengths in tokens (length/*), and rewards and win-rate: exact ones (reward/*, winrate)
      when the pairs are the suite's, a reward model's (rm/*) when `reward_model` is given
      (a RewardModel or a path / hub name).
    result["unavailable"] names each metric that could not be computed, and why.
    ref_logps: precomputed reference (chosen, rejected) log-probs of `feats`, if any.
    ref_samples: the reference's Samples of the first n_generate prompts (`reference_samples` with the
    same seed and max_new_tokens), if already drawn; replayed, they give exactly the same result."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    result = preference_metrics(model, ref_model, feats, pairs, beta, pad_id, ref_logps=ref_logps)
    unavailable = {}
    if n_generate <= 0:
        unavailable["kl, length/*, reward/*, winrate, rm/*"] = "no responses sampled (n_generate = 0)"
        result["unavailable"] = unavailable
        return result
    pairs, feats = pairs[:n_generate], feats[:n_generate]
    prompts = [f["prompt_ids"] for f in feats]
    y_pi = generate(model, prompts, eos_id, pad_id, max_new_tokens, seed=seed)
    with models.reference_context(model, ref_model) as ref:
        y_ref = ref_samples.replay(len(prompts)) if ref_samples is not None else generate(ref, prompts, eos_id, pad_id,
                                                                              max_new_tokens, seed=seed)
        ref_logp = sequence_logps_of(ref, prompts, y_pi, pad_id)
    pi_logp = sequence_logps_of(model, prompts, y_pi, pad_id)
    text_pi = tokenizer.batch_decode(y_pi, skip_special_tokens=True)
    text_ref = tokenizer.batch_decode(y_ref, skip_special_tokens=True)
    kl = pi_logp - ref_logp
    result.update({"kl": kl.mean().item(), "length/policy": sum(map(len, y_pi)) / len(y_pi),
                   "length/reference": sum(map(len, y_ref)) / len(y_ref), "n_generated": len(y_pi)})
    groups = _by_family(pairs)
    for family, rows in groups.items():
        result[f"kl/{family}"] = kl[rows].mean().item()
    if is_suite(pairs):
        r_pi = torch.tensor([suite.reward(p, t) for p, t in zip(pairs, text_pi)])
        r_ref = torch.tensor([suite.reward(p, t) for p, t in zip(pairs, text_ref)])
        win = win_rate(r_pi, r_ref)
        result.update({"reward/policy": r_pi.mean().item(), "reward/reference": r_ref.mean().item(),
                       "winrate": win.mean().item()})
        for family, rows in groups.items():
            result[f"reward/policy/{family}"] = r_pi[rows].mean().item()
            result[f"reward/reference/{family}"] = r_ref[rows].mean().item()
            result[f"winrate/{family}"] = win[rows].mean().item()
    else:
        unavailable["reward/*, winrate"] = ("exact rewards exist only for the bundled suite's rows (family and meta); "
                                            "give a reward model (kdpo eval --reward-model) for rm/*")
    if reward_model is not None:
        rm = reward_model if isinstance(reward_model, RewardModel) else RewardModel(reward_model)
        s_pi, s_ref = rm.score(pairs, text_pi), rm.score(pairs, text_ref)
        result.update({"rm/model": rm.name, "rm/reward_policy": s_pi.mean().item(),
                       "rm/reward_reference": s_ref.mean().item(), "rm/winrate": win_rate(s_pi, s_ref).mean().item()})
    else:
        unavailable["rm/*"] = "no reward model given (kdpo eval --reward-model PATH_OR_HUB_NAME)"
    result["unavailable"] = unavailable
    result["samples"] = [{"prompt": p.prompt, "policy": a, "reference": b} for p, a, b in
                         zip(pairs[:8], text_pi[:8], text_ref[:8])]
    return result


def _by_family(pairs):
    groups = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[p.family or "all"].append(i)
    return dict(groups)


def memory_timeline(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) under the torch profiler and return (result, timeline, step_ends).

    timeline: DataFrame with columns t_s (seconds since the first event) and allocated_mb: CPU tensor
        memory allocated during the call and not yet freed, after each allocation or free (tensors
        alive before the call are not counted). This is the CPU analogue of
        torch.cuda.memory_allocated(); process RSS (training's memory/peak_mb on CPU) also counts the
        interpreter, libraries and allocator caches.
    step_ends: t_s at the end of each optimizer step (the profiler's "Optimizer.step#..." ranges). The
        peak of a steady-state training step is max(allocated_mb) between two consecutive step ends.
    CPU only (on a GPU use torch.cuda.max_memory_allocated); every op is recorded, so fn runs slower.
    Sets KINETO_LOG_LEVEL=6 unless already set (silences the profiler's start/stop lines on stderr).
    """
    import os

    import pandas as pd

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    cpu = torch.autograd.DeviceType.CPU
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    events = list(prof.profiler.kineto_results.events())
    memory = sorted(((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == cpu), key=lambda x: x[0])
    if not memory:
        raise ValueError("memory_timeline: fn allocated no CPU tensors")
    t0 = min(min(t for t, _ in memory), min(e.start_ns() for e in events))
    timeline = pd.DataFrame({"t_s": [(t - t0) / 1e9 for t, _ in memory],
                             "allocated_mb": pd.Series([n for _, n in memory]).cumsum() / 2**20})
    step_ends = sorted((e.end_ns() - t0) / 1e9 for e in events if e.name().startswith("Optimizer.step#"))
    return result, timeline, step_ends
