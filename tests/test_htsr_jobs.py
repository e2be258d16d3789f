"""Notebook 09's trainings as `kdpo` command lines (spectra_runs.htsr_jobs) run by the sweep's driver."""
import dataclasses

import pandas as pd
import pytest

from kdpo_lab import cli, package_root, spectra_runs
from kdpo_lab.config import SFTConfig, TrainConfig

PATHS = ("output_dir", "model", "data", "resume", "progress")  # where a run goes and how it is driven, not what it is


def notebook_configs(runs, fast):
    """The configs notebook 09 built in Python before its runs became commands (its cell 11 and S dict, as they
    stood), written out independently of htsr_jobs: the settings the commands must reproduce."""
    S = (dict(d_model=64, n_layers=2, n_heads=2, vocab_size=512, sft_steps=30, dpo_steps=10, over_steps=0,
              max_train_pairs=256, max_eval_pairs=32) if fast else
         dict(d_model=384, n_layers=4, n_heads=6, vocab_size=1024, sft_steps=500, dpo_steps=200, over_steps=800,
              max_train_pairs=4096, max_eval_pairs=256))
    common = dict(max_train_pairs=S["max_train_pairs"], max_eval_pairs=S["max_eval_pairs"], seed=0, progress=False)
    variants = {"dpo": dict(divergence="kl"), "hybrid_rbf": dict(kernel="rbf", gamma=0.5),
                "js": dict(divergence="js"), "hmk": dict(kernel="hmk", gamma=0.5, eta=0.01)}
    if fast:
        variants = {"dpo": variants["dpo"]}
    dpo_args = dict(beta=0.1, learning_rate=1e-3 if fast else 1e-4, per_device_train_batch_size=16,
                    max_steps=S["dpo_steps"], warmup_steps=max(2, S["dpo_steps"] // 20))
    if S["over_steps"]:
        variants["dpo_seed1"] = dict(divergence="kl", seed=1)
        over = dict(divergence="kl", max_steps=S["over_steps"], max_train_pairs=256)
        variants["overtrained"] = dict(over, learning_rate=2e-3)
        variants["overtrained_lr5e-4"] = dict(over, learning_rate=5e-4)
        variants["high_lr_all_pairs"] = dict(over, learning_rate=2e-3, max_train_pairs=S["max_train_pairs"])
    out = {"sft": SFTConfig(output_dir=str(runs / "sft"), model="tiny-llama", d_model=S["d_model"], n_layers=S["n_layers"],
                            n_heads=S["n_heads"], vocab_size=S["vocab_size"], learning_rate=3e-3 if fast else 1e-3,
                            per_device_train_batch_size=32, max_steps=S["sft_steps"],
                            warmup_steps=max(2, S["sft_steps"] // 20), logging_steps=10, **common)}
    for name, args in variants.items():
        out[name] = TrainConfig(output_dir=str(runs / name), model=str(runs / "sft" / "model"), logging_steps=10,
                                eval_generate=0, **{**common, **dpo_args,
                                                    "save_steps": max(dpo_args["max_steps"], args.get("max_steps", 0)),
                                                    **args})
    return out


def parsed(job):
    """The config `kdpo` builds from a job's one command line, as a dict without its paths."""
    (argv,) = job.commands
    return {k: v for k, v in dataclasses.asdict(cli.parse_config(argv[0], argv[1:])).items() if k not in PATHS}


@pytest.mark.parametrize("fast", [False, True])
def test_the_commands_parse_to_the_notebooks_settings_reference_first(tmp_path, fast):
    jobs = spectra_runs.htsr_jobs(tmp_path, fast)
    expected = notebook_configs(tmp_path, fast)
    assert [j.name for j in jobs] == list(expected)  # the reference first, then the variants in the notebook's order
    assert [j.commands[0][0] for j in jobs] == ["sft"] + ["train"] * (len(jobs) - 1)
    for job in jobs:
        want = {k: v for k, v in dataclasses.asdict(expected[job.name]).items() if k not in PATHS}
        assert parsed(job) == want, job.name
        assert job.folder == tmp_path / job.name and job.line().startswith(f"kdpo {job.commands[0][0]} configs/htsr_")


def test_every_command_trains_from_the_reference_and_resumes(tmp_path):
    jobs = spectra_runs.htsr_jobs(tmp_path, fast=False)
    configs = {j.name: cli.parse_config(j.commands[0][0], j.commands[0][1:]) for j in jobs}
    assert configs["sft"].model == "tiny-llama"
    assert all(c.model == str(tmp_path / "sft" / "model") for n, c in configs.items() if n != "sft")
    assert all(c.resume and c.output_dir == str(tmp_path / n) for n, c in configs.items())


def test_a_folder_trained_with_other_settings_is_refused(tmp_path):
    (tmp_path / "sft").mkdir()
    fast_sft = spectra_runs.HTSR_FAST[0]
    SFTConfig.from_yaml(package_root() / "configs" / "htsr_sft.yaml", **fast_sft).save(tmp_path / "sft" / "config.yaml")
    with pytest.raises(ValueError, match="d_model: 64 != 384"):  # a fast run kept in KDPO_RUNS, then full mode
        spectra_runs.htsr_jobs(tmp_path, fast=False)
    assert spectra_runs.htsr_jobs(tmp_path, fast=True)[0].commands  # the same settings: resumed, not refused


def test_runs_made_in_another_checkout_are_reused_but_another_dataset_here_is_refused(tmp_path):
    (tmp_path / "sft").mkdir()
    path = tmp_path / "sft" / "config.yaml"
    sft = lambda data: SFTConfig.from_yaml(package_root() / "configs" / "htsr_sft.yaml", data=str(data)).save(path)
    sft("/elsewhere/kdpo_lab/data/suite")  # a teacher's checkout: that path does not exist here
    assert spectra_runs.htsr_jobs(tmp_path, fast=False)[0].commands
    other = tmp_path / "my_pairs"
    other.mkdir()
    sft(other)  # a dataset that exists here and is not the suite
    with pytest.raises(ValueError, match="data:"):
        spectra_runs.htsr_jobs(tmp_path, fast=False)


def test_negative_processes_are_refused_and_zero_needs_the_entry_point(tmp_path):
    with pytest.raises(ValueError, match="processes must be an integer >= 0"):
        spectra_runs.train_htsr_runs(tmp_path, fast=True, processes=-1)
    with pytest.raises(ValueError, match="in_process=kdpo_lab.cli.main"):
        spectra_runs.train_htsr_runs(tmp_path, fast=True, processes=0)


def test_fast_runs_train_through_the_driver_and_are_not_trained_again(tmp_path):
    folders = spectra_runs.train_htsr_runs(tmp_path, fast=True, processes=2)
    assert folders == [tmp_path / "sft", tmp_path / "dpo"]
    last = pd.read_json(tmp_path / "dpo" / "eval.jsonl", lines=True).iloc[-1]
    assert last["step"] == 10 and "pref/gap" in last
    assert all(spectra_runs.finished(f) for f in folders)
    assert spectra_runs.train_htsr_runs(tmp_path, fast=True) == folders
    for name in ("sft", "dpo"):  # each command ran once: the second call found the runs finished
        assert (tmp_path / f"{name}.log").read_text().count("$ kdpo ") == 1
