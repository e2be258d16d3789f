"""Batch order: the plain order is training's, length grouping keeps each epoch's pairs and exact resume."""
import random

import pytest
import torch

from kdpo_lab import ordering


def plain_batch_indices(n, batch, step, seed):
    """training.batch_indices as it was before kdpo_lab.ordering (copied, to pin the plain order)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch:(k + 1) * batch].tolist()


def random_lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 200) for _ in range(n)]


@pytest.mark.parametrize("n, batch, seed", [(256, 8, 0), (101, 7, 3), (5, 8, 1), (64, 64, 2)])
def test_without_lengths_the_order_is_trainings_plain_order(n, batch, seed):
    for step in range(3 * max(1, n // batch) + 2):
        assert ordering.batch_indices(n, batch, step, seed) == plain_batch_indices(n, batch, step, seed)


def test_window_of_one_batch_gives_the_plain_batches():
    lengths = random_lengths(100)
    for step in range(30):
        assert sorted(ordering.batch_indices(100, 8, step, 0, lengths, window=1)) == sorted(plain_batch_indices(100, 8, step, 0))


@pytest.mark.parametrize("window", [1, 3, 8, 50])
def test_grouped_epoch_uses_the_plain_epochs_pairs_each_once(window):
    n, batch, lengths = 203, 8, random_lengths(203, seed=1)
    per_epoch = n // batch
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        grouped = [i for s in steps for i in ordering.batch_indices(n, batch, s, 4, lengths, window)]
        plain = [i for s in steps for i in plain_batch_indices(n, batch, s, 4)]
        assert len(grouped) == len(set(grouped)) == per_epoch * batch
        assert set(grouped) == set(plain)


def test_grouped_batch_depends_only_on_its_step_so_resume_is_exact():
    n, batch, lengths = 150, 6, random_lengths(150, seed=2)
    forward = [ordering.batch_indices(n, batch, s, 7, lengths) for s in range(60)]
    backward = [ordering.batch_indices(n, batch, s, 7, lengths) for s in reversed(range(60))][::-1]
    assert forward == backward
    assert forward[:25] != [ordering.batch_indices(n, batch, s, 8, lengths) for s in range(25)]  # the seed matters


def test_batches_of_a_window_hold_consecutive_length_ranges():
    n, batch, window = 160, 8, 4
    lengths = random_lengths(n, seed=3)
    batches = [ordering.batch_indices(n, batch, s, 0, lengths, window) for s in range(window)]
    ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))


def test_grouping_cuts_the_padded_width():
    n, batch, lengths = 512, 8, random_lengths(512, seed=4)
    width = lambda **kw: sum(max(lengths[i] for i in ordering.batch_indices(n, batch, s, 0, **kw)) for s in range(64))
    assert width(lengths=lengths, window=8) < 0.75 * width()


def test_pair_length_is_prompt_plus_the_longer_response():
    features = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9]},
                {"prompt_ids": [1], "chosen_ids": [4, 5, 6], "rejected_ids": [7]}]
    assert ordering.pair_lengths(features) == [7, 4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0), "batch"),
    (dict(window=0), "window"),
    (dict(lengths=[3, 4]), "one length per pair"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(n=10, batch=2, step=0, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        ordering.batch_indices(**args)
