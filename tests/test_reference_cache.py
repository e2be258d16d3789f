"""Facts about the reference cache: runs are bit-identical with and without it, and a stale entry is never read."""
import threading

import pandas as pd
import pytest
import torch
from accelerate import Accelerator

from kdpo_lab import evaluation, loading, models, reference_cache, runs, training
from kdpo_lab.config import SFTConfig, TrainConfig
from kdpo_lab.reference_cache import Cache

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=300, max_train_pairs=96, max_eval_pairs=8,
            per_device_train_batch_size=4, max_length=64, max_prompt_length=40, progress=False)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref") / "sft"
    cfg = SFTConfig(output_dir=str(folder), model="tiny-llama", max_steps=3, **BASE)
    training.sft(cfg)
    return folder


def dpo(folder, sft, monkeypatch, cache, **kw):
    monkeypatch.setenv(reference_cache.ENV, "1" if cache else "0")
    cfg = TrainConfig(output_dir=str(folder), model=str(sft / "model"), max_steps=4, eval_steps=2, eval_generate=4,
                      save_steps=2, logging_steps=1, learning_rate=1e-3, warmup_steps=1, **{**BASE, **kw})
    run = training.train(cfg)
    runs.evaluate_run(run, split="test", n_generate=6)
    return run


def outputs(run):
    """Everything a run reports, less the clocks: metrics, evaluations, test evaluation, weights, RNG state."""
    from safetensors.torch import load_file
    metrics = pd.read_json(run / "metrics.jsonl", lines=True)
    metrics = metrics.drop(columns=[c for c in metrics if c.startswith(("time/", "memory/"))])
    rng = torch.load(run / "checkpoint-000004" / "random_states_0.pkl", weights_only=False)["torch_manual_seed"]
    return (metrics.to_dict("records"), (run / "eval.jsonl").read_text(), (run / "eval_test.json").read_text(),
            {k: v.tolist() for k, v in load_file(str(run / "model" / "model.safetensors")).items()}, rng.tolist())


@pytest.mark.parametrize("kw", [{}, {"kernel": "rbf", "gamma": 0.5}], ids=["dpo", "rbf"])
def test_a_run_and_its_test_evaluation_are_bit_identical_with_and_without_the_cache(tmp_path, sft, monkeypatch, kw):
    cache = sft / "reference_cache"
    for entry in cache.glob("*"):
        entry.unlink()
    without = outputs(dpo(tmp_path / "off", sft, monkeypatch, False, **kw))
    assert not cache.exists() or not any(cache.iterdir())
    building = outputs(dpo(tmp_path / "build", sft, monkeypatch, True, **kw))
    names = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert {"pair_logps", "samples"} <= set(names) and (("embeddings" in names) == bool(kw))
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()}
    reading = outputs(dpo(tmp_path / "read", sft, monkeypatch, True, **kw))
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()} == written  # only read
    assert building == without
    assert reading == without


def test_the_reference_log_probs_are_computed_only_for_batches_a_step_reaches(tmp_path, sft, monkeypatch):
    cfg = TrainConfig(output_dir=str(tmp_path / "r"), model=str(sft / "model"), max_steps=3, **BASE)
    model, tokenizer, train_pairs, train_feats, eval_pairs, eval_feats = loading.load_splits(cfg)
    ref = models.frozen_copy(model)
    held_out = training.DPOEvaluation(cfg, Accelerator(), ref, tokenizer,
                                      (train_pairs, train_feats), (eval_pairs, eval_feats))
    bs = 4 * cfg.per_device_train_batch_size
    used = training.used_pairs(cfg, train_feats, 1)
    assert len(used) == 3 * cfg.per_device_train_batch_size  # the first epoch: no pair twice
    w, l = training.reference_train_logps(held_out, model, train_feats, set(used), bs)
    all_w, all_l = evaluation.pair_logps(ref, train_feats, tokenizer.pad_token_id, bs)
    computed = w.isfinite()
    assert computed[used].all() and not computed.all()  # some batch of 16 holds no used pair
    assert torch.equal(w[computed], all_w[computed]) and torch.equal(l[computed], all_l[computed])
    assert (computed == l.isfinite()).all()


def test_replayed_samples_leave_torchs_generator_as_sampling_left_it(sft):
    model, tokenizer = models.load_model(sft / "model", dtype="fp32"), models.load_tokenizer(sft / "model")
    prompts = [[5, 6, 7], [8, 9]]
    drawn = evaluation.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 8, seed=3)
    after = torch.rand(4)
    torch.manual_seed(123)
    replayed = evaluation.Samples.from_tensors(drawn.to_tensors())
    assert replayed.replay(2) == drawn.responses
    assert torch.equal(torch.rand(4), after)
    with pytest.raises(ValueError, match="ref_samples"):
        replayed.replay(3)


def test_sampling_aside_does_not_move_torchs_generator(sft):
    model, tokenizer = models.load_model(sft / "model", dtype="fp32"), models.load_tokenizer(sft / "model")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    evaluation.reference_samples(model, model, tokenizer, [[5, 6, 7]], 8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_changed_reference_or_key_is_a_different_entry_and_a_mismatched_file_is_never_read(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "model.safetensors").write_bytes(b"weights v1")
    cache = Cache.open(ref, "fp32", "cpu")
    assert cache.folder == ref / "reference_cache"
    key = {"feats": "abc", "batch_size": 4}
    cache.save("pair_logps", key, {"chosen": torch.ones(3)})
    assert torch.equal(Cache.open(ref, "fp32", "cpu").load("pair_logps", key)["chosen"], torch.ones(3))
    assert cache.load("pair_logps", {**key, "batch_size": 8}) is None
    assert Cache.open(ref, "bf16", "cpu").load("pair_logps", key) is None
    (ref / "model.safetensors").write_bytes(b"weights v2")
    assert Cache.open(ref, "fp32", "cpu").load("pair_logps", key) is None
    # a file under another key's name (copied, or a digest collision) is refused by its stored key
    other = {**key, "batch_size": 2}
    cache.path("pair_logps", key).rename(cache.path("pair_logps", other))
    assert cache.load("pair_logps", other) is None


def test_a_torn_entry_counts_as_missing_and_is_rebuilt(tmp_path):
    cache = Cache(tmp_path, {"reference": "x"})
    cache.path("e", {}).write_bytes(b"\x00\x01 not safetensors")
    calls = []
    cache.get_or_compute("e", {}, lambda: calls.append(1) or {"v": torch.arange(3)})
    assert calls == [1] and torch.equal(cache.load("e", {})["v"], torch.arange(3))


def test_concurrent_writers_of_one_entry_leave_one_whole_file_and_no_temporary(tmp_path):
    cache = Cache(tmp_path, {"reference": "x"})
    value = {"v": torch.arange(100_000, dtype=torch.float32)}
    threads = [threading.Thread(target=cache.save, args=("e", {}, value)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in tmp_path.iterdir()] == [cache.path("e", {}).name]
    assert torch.equal(cache.load("e", {})["v"], value["v"])


def test_the_cache_is_off_with_the_environment_variable_and_for_a_config_model(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.setenv(reference_cache.ENV, "0")
    assert Cache.open(tmp_path / "m", "fp32", "cpu") is None
    monkeypatch.setenv(reference_cache.ENV, "1")
    assert Cache.open("tiny-llama", "fp32", "cpu") is None
    assert Cache.open(tmp_path / "m", "fp32", "cpu") is not None


WORKER = '''
import os, sys
from kdpo_lab import cli
for command in " ".join(sys.argv[1:]).split(" THEN "):
    setting, *argv = command.split()
    os.environ["KDPO_REFERENCE_CACHE"] = setting
    cli.main(argv)
'''


def test_two_processes_give_the_same_evaluations_with_and_without_the_cache(tmp_path, sft):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "worker.py").write_text(WORKER)
    (sft / "reference_cache").mkdir(exist_ok=True)
    for entry in (sft / "reference_cache").glob("*"):
        entry.unlink()
    options = ["--model", str(sft / "model"), "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
               "--vocab-size", "300", "--max-train-pairs", "96", "--max-eval-pairs", "8", "--max-length", "64",
               "--max-prompt-length", "40", "--per-device-train-batch-size", "2", "--max-steps", "4",
               "--eval-steps", "2", "--eval-generate", "4", "--logging-steps", "1", "--progress", "false"]
    names = ("off", "build", "read")
    commands = [f"{'0' if n == 'off' else '1'} train --output-dir {tmp_path / n} {' '.join(options)}" for n in names]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(tmp_path / "worker.py"), *" THEN ".join(commands).split()], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = list((sft / "reference_cache").iterdir())
    assert sum(p.name.startswith("samples") for p in entries) == 2  # one per process's share of the prompts
    read_started = (tmp_path / "read" / "kdpo_run.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns < read_started for p in entries)  # the third run only read
    evals = [(tmp_path / n / "eval.jsonl").read_text() for n in names]
    assert evals[0].count("\n") == 2 and evals[1] == evals[0] and evals[2] == evals[0]
