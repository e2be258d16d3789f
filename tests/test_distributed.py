"""Two processes train exactly like one at the same global batch (CPU, gloo, a real torchrun launch).

The 2-process run takes 2 pairs per micro-batch and the 1-process run 4, both with 2 accumulation
steps: the same 8 pairs per optimiser step. What must agree:
* the first step's gradients, of the policy and of the HMK kernel (averaged across processes by hand,
  it is outside the prepared model), to float32 tolerance: ||g2 - g1|| <= 1e-5 ||g1||. The two runs
  sum the same terms in another order (and DDP averages in float32), so they differ by a few ulps:
  the measured ratio is about 1e-7, the tolerance 100 times that;
* the learning rate at every step, exactly (the schedule counts optimiser steps, not processes);
* the weights after 10 steps, HMK included, within 1e-3 of the size of the update: ||w2 - w1|| <=
  1e-3 ||w1 - w0||. Adam divides by sqrt(v), which amplifies the ulp-level differences of small
  gradients a little at each step; measured: about 1e-5 of the update. A schedule stepped once per
  process (the bug this guards against) leaves them 0.4 apart, 400 times the tolerance;
* SFT's loss and weights likewise (its loss is normalised by the global batch's token count).
"""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kdpo_lab import cli, training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-llama", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--vocab-size", "300",
        "--max-train-pairs", "48", "--max-eval-pairs", "8", "--max-length", "64", "--max-prompt-length", "40",
        "--learning-rate", "1e-3", "--warmup-steps", "2", "--logging-steps", "1", "--progress", "false",
        "--gradient-accumulation-steps", "2"]
DPO = ["--kernel", "hmk", "--gamma", "0.5", "--eta", "0.01", "--max-steps", "10", "--save-steps", "5",
       "--eval-steps", "5", "--eval-generate", "4"]
SFT = ["--max-steps", "4", "--save-steps", "2"]

WORKER = '''
import sys
import torch
from kdpo_lab import cli, training

step = training._optimizer_step

def record_first_step(run):  # the gradients every process holds before the first step, and the weights
    if run.step == 0:
        named = list(run.unwrapped.named_parameters()) + [("kernel." + n, p) for n, p in
                                                          (run.kernel.named_parameters() if run.kernel else [])]
        torch.save({"grads": {n: p.grad.clone() for n, p in named if p.grad is not None},
                    "weights": {n: p.detach().clone() for n, p in named}},
                   run.out / f"first_step_rank{run.accelerator.process_index}.pt")
    step(run)

training._optimizer_step = record_first_step
# the launch (the lines above also run in the test's process)
import atexit, os, pathlib  # registered before any run's handler, so it runs after them (last in, first out)
said = pathlib.Path(__file__).parent / f"exit_rank{os.environ['RANK']}.txt"  # one file per rank: no interleaving
atexit.register(lambda: said.write_text(f"process group alive at exit: {torch.distributed.is_initialized()}"))
for command in " ".join(sys.argv[1:]).split(" THEN "):
    cli.main(command.split())
'''


def commands(out, batch):
    per_device = ["--per-device-train-batch-size", str(batch)]
    return [["sft", "--output-dir", str(out / "sft"), *TINY, *SFT, *per_device],
            ["train", "--output-dir", str(out / "dpo"), *TINY, *DPO, *per_device]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two runs (SFT, then DPO with HMK) on 2 processes and on 1, at a global batch of 8 pairs."""
    tmp = tmp_path_factory.mktemp("distributed")
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = commands(tmp / "two", batch=2)
    args = " THEN ".join(" ".join(c) for c in two).split()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(worker), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    namespace = {}
    exec(WORKER.split("# the launch")[0], namespace)  # the same recording, in this process
    original, training._optimizer_step = training._optimizer_step, namespace["training"]._optimizer_step
    try:
        for command in commands(tmp / "one", batch=4):
            cli.main(command)
    finally:
        training._optimizer_step = original
    return tmp / "one", tmp / "two"


def relative(a, b, names):
    """||b - a|| / ||a|| over the tensors `names` of two dicts."""
    diff = sum(((a[n] - b[n]).double() ** 2).sum() for n in names) ** 0.5
    return float(diff / sum((a[n].double() ** 2).sum() for n in names) ** 0.5)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_take_the_first_step_with_the_gradients_of_one(runs, stage):
    one, two = (torch.load(r / stage / "first_step_rank0.pt") for r in runs)
    rank1 = torch.load(runs[1] / stage / "first_step_rank1.pt")
    g1, g2 = one["grads"], two["grads"]
    assert g1.keys() == g2.keys() == rank1["grads"].keys()
    assert all(torch.equal(g2[n], rank1["grads"][n]) for n in g2)  # every process steps with the same gradient
    policy = [n for n in g1 if not n.startswith("kernel.")]
    assert relative(g1, g2, policy) < 1e-5
    if stage == "dpo":
        kernel = [n for n in g1 if n.startswith("kernel.")]
        assert kernel and relative(g1, g2, kernel) < 1e-5


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_follow_the_learning_rate_schedule_of_one(runs, stage):
    m1, m2 = (pd.read_json(r / stage / "metrics.jsonl", lines=True) for r in runs)
    steps = m1["step"].notna() & m1["lr"].notna()
    assert list(m1.loc[steps, "lr"]) == list(m2.loc[steps, "lr"]) and steps.sum() == len(m2["lr"].dropna())
    pd.testing.assert_series_equal(m1["loss"], m2["loss"], rtol=1e-4)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_end_with_the_weights_of_one(runs, stage):
    w0 = torch.load(runs[0] / stage / "first_step_rank0.pt")["weights"]
    w1, w2 = (load_file(str(r / stage / "model" / "model.safetensors")) for r in runs)
    names = list(w1)  # ||w2 - w1|| / ||w1 - w0||: the difference as a fraction of the update
    assert relative({n: w1[n] - w0[n] for n in names}, {n: w2[n] - w0[n] for n in names}, names) < 1e-3
    if stage == "dpo":
        k0 = {n[len("kernel."):]: v for n, v in w0.items() if n.startswith("kernel.")}
        k1, k2 = (load_file(str(r / stage / "kernel.safetensors")) for r in runs)
        learned = [n for n in k0 if not torch.equal(k1[n], k0[n])]
        assert learned and relative({n: k1[n] - k0[n] for n in learned}, {n: k2[n] - k0[n] for n in learned},
                                    learned) < 1e-3


def test_two_processes_evaluate_every_held_out_pair_like_one(runs):
    e1, e2 = (pd.read_json(r / "dpo" / "eval.jsonl", lines=True) for r in runs)
    assert list(e1["step"]) == list(e2["step"]) == [5, 10]
    for key in ("pref/accuracy", "pref/train_accuracy"):
        assert list(e1[key]) == list(e2[key])
    pd.testing.assert_series_equal(e1["pref/margin"], e2["pref/margin"], rtol=1e-3)
    assert e2["kl"].notna().all()  # sampled metrics: each process samples its share of the prompts


def test_every_process_destroys_its_process_group_before_it_exits(runs):
    # alive at exit, gloo's threads can outlive the interpreter and abort a finished run (exit -6)
    said = [(runs[1].parent / f"exit_rank{rank}.txt").read_text() for rank in (0, 1)]
    assert said == ["process group alive at exit: False"] * 2


def test_both_processes_write_one_checkpoint_folder_per_save(runs):
    assert sorted(p.name for p in (runs[1] / "dpo").glob("checkpoint-*")) == ["checkpoint-000005",
                                                                              "checkpoint-000010"]
    assert {p.name for p in (runs[1] / "dpo" / "checkpoint-000010").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
