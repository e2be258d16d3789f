"""Preference data in one import, for notebooks and scripts: `from kdpo_lab import data`.

The library itself imports the modules below directly; each holds one idea:
    pairs     PreferencePair, and the Problem / DataReport / DataError that reading data produces
    suite     the synthetic suite (four families) and its exact ground-truth rewards
    formats   readers of public preference files (text, HH-RLHF, messages, ShareGPT), with validation
    batching  prompt rendering, tokenisation with truncation, and the [chosen; rejected] collate
"""
from kdpo_lab.batching import collate, encode_pairs, render_prompt, sft_texts
from kdpo_lab.formats import FORMATS, detect_format, load_pairs, plain_chat
from kdpo_lab.pairs import SPLITS, DataError, DataReport, PreferencePair, Problem
from kdpo_lab.suite import (FAMILIES, SUITE_DIR, generate_suite, load_suite, make_suite, make_world, pair_rewards,
                            reward, write_jsonl)

__all__ = ["collate", "encode_pairs", "render_prompt", "sft_texts", "FORMATS", "detect_format", "load_pairs",
           "plain_chat", "SPLITS", "DataError", "DataReport", "PreferencePair", "Problem", "FAMILIES", "SUITE_DIR",
           "generate_suite", "load_suite", "make_suite", "make_world", "pair_rewards", "reward", "write_jsonl"]
