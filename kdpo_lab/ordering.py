"""Batch order: which pairs form global batch `step`, a pure function of (n, batch, step, seed[, lengths]).

Every epoch draws a fresh seeded permutation of the n pairs and cuts it into n // batch batches (the
last n % batch pairs of the permutation wait for a later epoch). A step therefore fixes its batch, and a
resumed run continues exactly where a killed one stopped, with no sampler state to save.

Length grouping (HF transformers' `group_by_length`, there with "megabatches" of 50 batches): with
`lengths` given, the permutation is cut into windows of `window` batches; inside a window the pairs are
sorted by length (longest first, ties in permutation order) and cut into batches, and the window's
batches are put in a seeded random order. Each epoch still uses exactly the same pairs as without
lengths, each once; a batch then holds pairs of similar length, so right-padding to its longest row
wastes little (measured in bench/). The price is less random batch composition: within a window, which
pairs share a batch is decided by length, not by chance. window = 1 gives the plain batches (each
in length order).
"""
import torch

WINDOW = 8  # batches per length-grouping window (HF uses 50; 8 keeps more randomness, see the bench)


def batch_indices(n, batch, step, seed, lengths=None, window=WINDOW):
    """Indices of the pairs in global batch `step` (a list of `batch` ints in [0, n)).

    lengths: None (plain seeded order, as training always did) or one length per pair, e.g.
    `pair_lengths(features)`, to group pairs of similar length (see the module docstring)."""
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"lengths must hold one length per pair: {n} pairs, got {len(lengths)} lengths")
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if lengths is None:
        return order[k * batch:(k + 1) * batch].tolist()
    w, j = divmod(k, window)
    first, last = w * window, min((w + 1) * window, per_epoch)  # this window's batches
    members = order[first * batch:last * batch]
    by_length = torch.as_tensor(lengths)[members].sort(descending=True, stable=True).indices
    batches = members[by_length].reshape(last - first, batch)
    shuffle = torch.randperm(last - first, generator=torch.Generator().manual_seed(
        (seed * 100_003 + epoch) * 1_000_003 + w))
    return batches[shuffle[j]].tolist()


def pair_lengths(features):
    """Row width of each pair in a collated batch: prompt + the longer of its two responses."""
    return [len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features]
