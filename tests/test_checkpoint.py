"""Facts about checkpoints: a save killed half-way costs nothing, resume is exact, the kernel is safetensors."""
import json
import os
import signal
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kdpo_lab import checkpoint, kernels, training
from kdpo_lab.config import SFTConfig, TrainConfig

TINY = dict(model="tiny-llama", d_model=32, n_layers=2, n_heads=2, vocab_size=300, max_train_pairs=48,
            max_eval_pairs=8, per_device_train_batch_size=4, max_length=64, max_prompt_length=40,
            learning_rate=1e-3, warmup_steps=1, logging_steps=1, progress=False)
ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, name, cls=TrainConfig, **kw):
    return cls(output_dir=str(tmp_path / name), **{**TINY, **kw})


def weights(run):
    """Every tensor a run leaves: its model (or LoRA adapter) and its kernel."""
    files = [*sorted((run / "model").glob("*.safetensors")), *sorted(run.glob("kernel.safetensors"))]
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def rows(run, name):
    df = pd.read_json(run / name, lines=True)
    return df.drop(columns=[c for c in df if c.startswith(("time/", "memory/"))])


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    for name in ("metrics.jsonl", "eval.jsonl"):
        if (a / name).exists() or (b / name).exists():
            pd.testing.assert_frame_equal(rows(a, name), rows(b, name))


class Killed(BaseException):
    """What the save hook raises: like SystemExit, no `except Exception` in the loop catches it."""


def die_half_way_through(monkeypatch, at_step):
    """Make the save of `at_step` stop after its files are written but before it is published, with its
    model file cut in half (what a kill while writing weights leaves)."""
    publish = checkpoint.publish

    def torn(tmp, step):
        if step == at_step:
            for f in Path(tmp).glob("*.safetensors"):
                f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
            raise Killed(f"killed while saving step {step}")
        return publish(tmp, step)
    monkeypatch.setattr(checkpoint, "publish", torn)
    return publish


# Pairwise cover of kernel {none, rbf, hmk} x form {link, penalty} x LoRA {off, on} x evaluation {off, on}:
# every pair of values of any two factors occurs in some row.
CASES = [("", "link", 0, False), ("", "penalty", 4, True), ("rbf", "link", 4, False),
         ("rbf", "penalty", 0, True), ("hmk", "link", 0, True), ("hmk", "penalty", 4, False)]


def test_the_cases_cover_every_pair_of_options():
    for i, j in combinations(range(4), 2):
        values = [sorted({c[i] for c in CASES}), sorted({c[j] for c in CASES})]
        assert {(c[i], c[j]) for c in CASES} == {(a, b) for a in values[0] for b in values[1]}


@pytest.mark.parametrize("kernel,form,lora_r,evaluate", CASES,
                         ids=[f"{k or 'none'}-{f}-lora{r}-eval{int(e)}" for k, f, r, e in CASES])
def test_a_save_killed_half_way_resumes_to_the_same_weights_and_metrics(tmp_path, monkeypatch, kernel, form,
                                                                        lora_r, evaluate):
    kw = dict(max_steps=4, save_steps=2, kernel=kernel, gamma=0.5 if kernel else 0.0,
              eta=0.01 if kernel == "hmk" else 0.0, divergence_form=form, lora_r=lora_r,
              eval_steps=1 if evaluate else 0, eval_generate=2 if evaluate else 0)
    straight = training.train(tiny(tmp_path, "straight", **kw))
    publish = die_half_way_through(monkeypatch, at_step=4)
    with pytest.raises(Killed):
        training.train(tiny(tmp_path, "killed", **kw))
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "killed")] == ["checkpoint-000002"]
    monkeypatch.setattr(checkpoint, "publish", publish)
    resumed = training.train(tiny(tmp_path, "killed", resume=True, **kw))
    assert_same_run(straight, resumed)


def test_sft_resumes_exactly_with_gradient_accumulation(tmp_path, monkeypatch):
    kw = dict(max_steps=4, save_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    straight = training.sft(tiny(tmp_path, "straight", SFTConfig, **kw))
    publish = die_half_way_through(monkeypatch, at_step=4)
    with pytest.raises(Killed):
        training.sft(tiny(tmp_path, "killed", SFTConfig, **kw))
    monkeypatch.setattr(checkpoint, "publish", publish)
    resumed = training.sft(tiny(tmp_path, "killed", SFTConfig, resume=True, **kw))
    assert_same_run(straight, resumed)


KILLER = """
import os, signal, sys
import accelerate.checkpointing as ac
from kdpo_lab import training
from kdpo_lab.config import TrainConfig
save, calls = ac.save, []

def save_then_die(obj, path, *args, **kwargs):  # kill -9 while the second checkpoint's weights are written
    save(obj, path, *args, **kwargs)
    calls.append(path)
    if "checkpoint-000004" in str(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
ac.save = save_then_die
training.train(TrainConfig(**{cfg}))
"""


def test_a_process_killed_with_sigkill_while_writing_weights_resumes_exactly(tmp_path):
    kw = dict(max_steps=6, save_steps=2, kernel="hmk", gamma=0.5, eta=0.01, eval_steps=2)
    straight = training.train(tiny(tmp_path, "straight", **kw))
    cfg = {**TINY, **kw, "output_dir": str(tmp_path / "killed")}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER.format(cfg=repr(cfg))], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-000004.tmp").exists()  # torn, and never published
    resumed = training.train(tiny(tmp_path, "killed", resume=True, **kw))
    assert_same_run(straight, resumed)


def test_resume_takes_the_newest_complete_checkpoint_says_which_and_keeps_two(tmp_path, capsys):
    cfg = tiny(tmp_path, "run", max_steps=6, save_steps=2)
    run = training.train(cfg)
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-000004", "checkpoint-000006"]
    assert json.loads((run / checkpoint.RUN_FILE).read_text()) == {"format": checkpoint.FORMAT}
    (run / "checkpoint-000008.tmp").mkdir()  # a save that never finished
    capsys.readouterr()
    training.train(tiny(tmp_path, "run", max_steps=8, save_steps=2, resume=True))
    assert f"resumed from {run / 'checkpoint-000006'}" in capsys.readouterr().out
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-000006", "checkpoint-000008"]
    assert not list(run.glob("*.tmp"))


def test_a_run_folder_of_the_old_format_is_refused_on_resume_in_one_line(tmp_path):
    old = tmp_path / "old"
    (old / "checkpoint").mkdir(parents=True)
    (old / "checkpoint" / "state.json").write_text('{"step": 3}')
    with pytest.raises(ValueError, match=r"before run-folder format 2.*resume=false") as info:
        training.train(tiny(tmp_path, "old", max_steps=1, resume=True))
    assert "\n" not in str(info.value)


def test_a_fresh_run_removes_the_checkpoints_of_an_earlier_run_in_its_folder(tmp_path):
    training.train(tiny(tmp_path, "run", max_steps=4, save_steps=2))
    run = training.train(tiny(tmp_path, "run", max_steps=2, save_steps=1))
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-000001", "checkpoint-000002"]


@pytest.mark.parametrize("name", ["linear", "polynomial", "rbf", "spectral", "mahalanobis", "hmk"])
def test_a_fitted_kernel_round_trips_through_safetensors_and_json(tmp_path, name):
    torch.manual_seed(0)
    params = {"degree": 3} if name == "polynomial" else {}
    kernel = kernels.get(name, **params).fit(torch.randn(64, 8))
    for p in kernel.parameters():  # move away from the initial values
        p.data.add_(0.1 * torch.randn_like(p))
    checkpoint.save_kernel(kernel, tmp_path, params)
    loaded = checkpoint.load_kernel(tmp_path)
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    a, b = kernel.state_dict(), loaded.state_dict()
    assert type(loaded) is type(kernel) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same numbers; a saved tensor is contiguous, so a matmul may round differently in the last bit
    torch.testing.assert_close(loaded.log_kernel(x, y), kernel.log_kernel(x, y), rtol=1e-6, atol=1e-7)
    assert {n for n, _ in loaded.named_parameters()} == {n for n, _ in kernel.named_parameters()}
    assert (tmp_path / "kernel.safetensors").exists() and json.loads((tmp_path / "kernel.json").read_text())["name"] == name
