"""Tokenisation and collation of preference pairs.

Tokenisation (`render_prompt`, `encode_pairs`, `collate`). The prompt is rendered with the
tokenizer's chat template when it has one, otherwise with the plain template
    "User:\\n{prompt}\\nAssistant:\\n"
Each response is tokenised on its own and ends with EOS. `collate` builds ONE batch of 2B rows,
chosen rows first, right-padded, with masks aligned to input_ids (the shift convention):
    logits[:, t] predict input_ids[:, t+1]
    log pi(y|x) = sum_t response_mask[:, t] * log softmax(logits[:, t-1])[input_ids[:, t]]
so response_mask marks the predicted response tokens (EOS included) and response_mask[:, 0] = 0.
"""
import json

import torch

from kdpo_lab.formats import plain_chat
from kdpo_lab.pairs import DataReport, Problem

# ----------------------------------------------------------------------------------------------
# Rendering and tokenisation

def render_prompt(pair, tokenizer=None):
    """The prompt text the model sees: the tokenizer's chat template (with the generation prompt)
    when it has one, else plain_chat. A plain-text prompt is one user message."""
    messages = pair.prompt_messages or [{"role": "user", "content": pair.prompt}]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_chat(messages)


def sft_texts(pairs, tokenizer=None):
    """render_prompt + response for the chosen AND the rejected response of every pair: the corpus
    for the reference's SFT stage (so pi_ref puts mass on both) and for training a tokenizer."""
    texts = []
    for p in pairs:
        x = render_prompt(p, tokenizer)
        texts += [x + p.chosen, x + p.rejected]
    return texts


def _ids(tokenizer, texts, add_special_tokens):
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def encode_pairs(pairs, tokenizer, max_length=128, max_prompt_length=None, truncation="left",
                 report=None, strict=False):
    """Tokenise pairs -> [{"prompt_ids", "chosen_ids", "rejected_ids", "family", "index"}].

    prompt_ids = tokens of render_prompt(pair, tokenizer) (special tokens come from the chat
    template when there is one, otherwise from the tokenizer); each response's ids are its own
    tokens followed by EOS. Lengths: let L = the longer response (chosen or rejected).
    - The prompt is cut to max_prompt_length tokens if given, and to max_length - L so that both
      full responses fit: truncation="left" keeps its end (the part next to the response; a
      leading BOS is kept), "right" keeps its start. Each touched row counts in
      report.n_prompt_truncated.
    - If L > max_length - 1 (no room for even one prompt token), the row is a problem: strict ->
      DataError; otherwise the prompt keeps max(1, max_length // 2) tokens and the responses are cut
      from the right to fill the rest (their EOS is lost), the row is kept and recorded in
      report.problems and report.n_response_truncated. If the cut responses become identical the
      row is skipped (report.n_skipped_after_cut).
    report: pass the loader's DataReport to add these counts, problems and the untruncated lengths
        (prompt + response tokens of every sequence, report.lengths) to it.
    Returns features for `collate`; "index" is the pair's position in `pairs`.
    """
    if truncation not in ("left", "right"):
        raise ValueError(f"truncation must be 'left' or 'right'; got {truncation!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}")
    if max_prompt_length is not None and (not isinstance(max_prompt_length, int) or max_prompt_length < 1):
        raise ValueError(f"max_prompt_length must be a positive integer or None; got {max_prompt_length!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: responses must end with EOS")
    report = report if report is not None else DataReport(source="encode_pairs")
    templated = bool(getattr(tokenizer, "chat_template", None))
    keys = [json.dumps(p.prompt_messages or p.prompt) for p in pairs]
    unique = {k: p for k, p in zip(keys, pairs)}  # render and tokenise each distinct prompt once
    ids = _ids(tokenizer, [render_prompt(p, tokenizer) for p in unique.values()], add_special_tokens=not templated)
    by_key = dict(zip(unique, ids))
    prompts = [by_key[k] for k in keys]
    chosen = _ids(tokenizer, [p.chosen for p in pairs], add_special_tokens=False)
    rejected = _ids(tokenizer, [p.rejected for p in pairs], add_special_tokens=False)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    features = []
    for i, p in enumerate(pairs):
        file, _, row = p.source.rpartition(":") if p.source else ("<pairs>", "", "")
        file, row = file or p.source, int(row) if row.isdigit() else i + 1
        x, yw, yl = prompts[i], chosen[i] + [eos], rejected[i] + [eos]
        report.lengths += [len(x) + len(yw), len(x) + len(yl)]
        L = max(len(yw), len(yl))
        if L > max_length - 1:
            longer = "chosen" if len(yw) >= len(yl) else "rejected"
            report.add(Problem(file, row, longer, f"response of {L} tokens does not fit max_length="
                                    f"{max_length} with the prompt; responses truncated from the right"), strict)
            report.n_response_truncated += 1
            room = max_length - min(len(x), max(1, max_length // 2))
            yw, yl = yw[:room], yl[:room]
            if yw == yl:
                report.problems.append(Problem(file, row, "rejected", "identical to 'chosen' after truncation; "
                                                                      "row skipped"))
                report.n_skipped_after_cut += 1
                continue
        keep = min(len(x), max_length - max(len(yw), len(yl)), max_prompt_length or len(x))
        if keep < len(x):
            report.n_prompt_truncated += 1
            x = _cut_prompt(x, keep, truncation, bos)
        features.append({"prompt_ids": x, "chosen_ids": yw, "rejected_ids": yl, "family": p.family, "index": i})
    return features


def _cut_prompt(x, keep, truncation, bos):
    """The first (truncation="right") or last ("left", keeping a leading BOS) `keep` prompt tokens."""
    if truncation == "right":
        return x[:keep]
    if bos is not None and x[0] == bos and keep > 1:
        return [bos] + x[len(x) - keep + 1:]
    return x[len(x) - keep:]


def collate(features, pad_id):
    """Features -> one batch of 2B rows for a single forward pass (chosen rows 0..B-1, then the
    rejected rows B..2B-1, same pair order), right-padded to the longest row T:
        input_ids      [2B, T] long  prompt_ids + response_ids, then pad_id
        attention_mask [2B, T] long  1 on real tokens
        prompt_mask    [2B, T] long  1 on the prompt tokens (positions 0 .. |x|-1)
        response_mask  [2B, T] long  1 on the response tokens incl. EOS (positions |x| .. |x|+|y|-1):
                                     the tokens whose log-probs are summed, predicted by the logits
                                     one position earlier; response_mask[:, 0] = 0
        labels         [2B, T] long  input_ids where response_mask, else -100 (transformers' loss
                                     convention; the model shifts internally)
    """
    if pad_id is None:
        raise ValueError("pad_id is None: give the tokenizer's pad_token_id (or eos_token_id)")
    if not features:
        raise ValueError("features is empty")
    rows = [(list(f["prompt_ids"]), list(f["chosen_ids"])) for f in features]
    rows += [(list(f["prompt_ids"]), list(f["rejected_ids"])) for f in features]
    if any(not x for x, _ in rows):
        raise ValueError("every feature needs at least one prompt token (the first response token is "
                         "predicted from the last prompt token)")
    T = max(len(x) + len(y) for x, y in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    prompt_mask, response_mask = torch.zeros_like(attention_mask), torch.zeros_like(attention_mask)
    for i, (x, y) in enumerate(rows):
        n = len(x) + len(y)
        input_ids[i, :n] = torch.tensor(x + y, dtype=torch.long)
        attention_mask[i, :n] = 1
        prompt_mask[i, :len(x)] = 1
        response_mask[i, len(x):n] = 1
    labels = torch.where(response_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask,
            "response_mask": response_mask, "labels": labels}


def device_batch(features, idx, pad_id, device):
    """collate of features[i] for i in idx, every tensor moved to `device`."""
    return {k: v.to(device) for k, v in collate([features[i] for i in idx], pad_id).items()}
