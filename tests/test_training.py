"""Facts about training as a user runs it: resume is exact, bad data and NaN are caught, every path runs."""
import json

import pandas as pd
import pytest
import torch

from kdpo_lab import cli, loading, runs, training
from kdpo_lab.pairs import DataError
from kdpo_lab.config import TrainConfig

TINY = dict(model="tiny-llama", d_model=32, n_layers=2, n_heads=2, vocab_size=300, max_train_pairs=48,
            max_eval_pairs=8, per_device_train_batch_size=4, max_length=64, max_prompt_length=40, learning_rate=1e-3, warmup_steps=1,
            logging_steps=1, progress=False)


def tiny(tmp_path, name, **kw):
    return TrainConfig(output_dir=str(tmp_path / name), **{**TINY, **kw})


def params(run):
    from safetensors.torch import load_file
    return load_file(str(run / "model" / "model.safetensors"))


def metric_rows(run):
    df = pd.read_json(run / "metrics.jsonl", lines=True)
    return df.drop(columns=[c for c in df if c.startswith(("time/", "memory/"))])


def test_dpo_fits_its_training_pairs_and_writes_what_it_promises(tmp_path):
    # one full batch of 8 pairs, seen every step: the loss on it must fall
    run = training.train(tiny(tmp_path, "dpo", max_steps=12, learning_rate=3e-3, max_train_pairs=8, per_device_train_batch_size=8, eval_generate=4))
    m = pd.read_json(run / "metrics.jsonl", lines=True)
    assert list(m["step"]) == list(range(1, 13))
    assert m["loss"].iloc[-3:].mean() < m["loss"].iloc[:3].mean()
    ev = pd.read_json(run / "eval.jsonl", lines=True).iloc[-1]
    assert {"pref/accuracy", "kl", "reward/policy", "winrate"} <= set(ev.index)
    assert (run / "model" / "config.json").exists() and (run / "config.yaml").exists()


def test_a_non_finite_loss_stops_training_with_the_step_and_pairs(tmp_path, monkeypatch):
    original = training.kernel_dpo_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        return loss * float("nan"), metrics
    monkeypatch.setattr(training, "kernel_dpo_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="step 0.*training pairs"):
        training.train(tiny(tmp_path, "nan", max_steps=2))


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}


def test_bad_rows_are_reported_with_file_row_and_field_and_strict_makes_them_fatal(tmp_path, capsys):
    folder = tmp_path / "mydata"
    folder.mkdir()
    rows = [GOOD] * 20 + [{**GOOD, "chosen": ""}] + [GOOD] * 5
    write_rows(folder / "train.jsonl", rows)
    write_rows(folder / "validation.jsonl", [GOOD] * 4)
    training.train(tiny(tmp_path, "lenient", data=str(folder), max_steps=1, max_train_pairs=0))
    assert "train.jsonl row 21" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"train.jsonl row 21, field 'chosen'"):
        training.train(tiny(tmp_path, "strict", data=str(folder), max_steps=1, max_train_pairs=0, strict=True))


def test_penalty_form_trains_with_per_step_reference_logits(tmp_path):
    run = training.train(tiny(tmp_path, "wasserstein", divergence="wasserstein", lam=0.1, max_steps=2))
    m = pd.read_json(run / "metrics.jsonl", lines=True)
    assert (m["divergence/penalty"] >= 0).all() and m["loss"].notna().all()


def test_frozen_encoder_embeddings_train_the_kernel_term(tmp_path):
    run = training.train(tiny(tmp_path, "encoder", kernel="rbf", gamma=0.5, embeddings="encoder", max_steps=2))
    m = pd.read_json(run / "metrics.jsonl", lines=True)
    assert m["kernel/margin"].notna().all()


def test_the_gpu_recipe_runs_on_cpu_at_tiny_scale(tmp_path):
    # LoRA + bf16 + gradient checkpointing on a 7B-shaped Llama (width and depth scaled down): the reference is
    # the base with adapters disabled, so only one copy of the weights exists.
    cfg = tiny(tmp_path, "lora", model="llama-7b-shape", model_scale=1 / 32, dtype="bf16", lora_r=4,
               gradient_checkpointing=True, max_steps=2, kernel="rbf", gamma=0.5)
    run = training.train(cfg)
    assert (run / "model" / "adapter_config.json").exists()
    m = pd.read_json(run / "metrics.jsonl", lines=True)
    assert m["loss"].notna().all()


def test_sft_then_dpo_then_eval_from_the_command_line(tmp_path, capsys):
    base = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--vocab-size", "300", "--max-train-pairs", "48",
            "--max-eval-pairs", "8", "--batch-size", "4", "--max-length", "64", "--progress", "false"]
    cli.main(["sft", "--out-dir", str(tmp_path / "sft"), "--model", "tiny-llama", "--max-steps", "3", *base])
    cli.main(["train", "--out-dir", str(tmp_path / "dpo"), "--model", str(tmp_path / "sft" / "model"),
              "--max-steps", "2", "--divergence", "js", *base])
    result = runs.evaluate_run(tmp_path / "dpo", split="test", n_generate=4)
    assert 0 <= result["pref/accuracy"] <= 1 and 0 <= result["winrate"] <= 1
    assert (tmp_path / "dpo" / "eval_test.json").exists()


def test_train_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in ("--beta", "--divergence", "--kernel", "--gamma", "--eta", "--resume", "--lora-r", "--strict"):
        assert field in text


def test_unknown_config_keys_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("betta: 0.1\n")
    with pytest.raises(ValueError, match="betta"):
        TrainConfig.from_yaml(path)


def test_the_math_demo_covers_all_28_pairs(tmp_path):
    cli.main(["demo", "--out", str(tmp_path)])
    grid = pd.read_csv(tmp_path / "pair_grid.csv")
    assert len(grid) == 28 and grid[["loss", "grad_weight"]].notna().all().all()
    assert (tmp_path / "pair_grid.png").exists()


def hh_row(i):
    return {"chosen": f"\n\nHuman: What is {i} plus {i}?\n\nAssistant: It is {2 * i}.",
            "rejected": f"\n\nHuman: What is {i} plus {i}?\n\nAssistant: It is {2 * i + 1}."}


def ultrafeedback_row(i):
    prompt = f"Name a number bigger than {i}."
    return {"prompt": prompt,
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{i + 1} is bigger."}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{i - 1} is bigger."}]}


def sharegpt_row(i):
    return {"conversations": [{"from": "human", "value": f"Spell the number {i}."}],
            "chosen": {"from": "gpt", "value": f"It is written {i}."},
            "rejected": {"from": "gpt", "value": "I do not know."}}


@pytest.mark.parametrize("make_row", [hh_row, ultrafeedback_row, sharegpt_row], ids=["hh-rlhf", "ultrafeedback", "sharegpt"])
def test_a_public_format_file_trains_without_edits(tmp_path, make_row):
    path = write_rows(tmp_path / "prefs.jsonl", [make_row(i) for i in range(40)])
    run = training.train(tiny(tmp_path, "public", data=str(path), max_steps=2, max_train_pairs=0))
    m = pd.read_json(run / "metrics.jsonl", lines=True)
    ev = pd.read_json(run / "eval.jsonl", lines=True).iloc[-1]
    assert m["loss"].notna().all() and 0 <= ev["pref/accuracy"] <= 1


def test_a_single_file_is_split_into_disjoint_train_and_held_out_pairs(tmp_path):
    path = write_rows(tmp_path / "prefs.jsonl", [hh_row(i) for i in range(50)])
    cfg = tiny(tmp_path, "split", data=str(path), max_train_pairs=0)
    train_pairs, _ = loading.read_pairs(cfg, "train")
    held, _ = loading.read_pairs(cfg, "validation")
    assert len(train_pairs) == 45 and len(held) == 5
    assert not {p.prompt for p in train_pairs} & {p.prompt for p in held}


def test_a_fresh_run_in_an_old_folder_starts_clean_logs(tmp_path):
    cfg = tiny(tmp_path, "again", max_steps=2, eval_steps=1)
    training.train(cfg)
    run = training.train(cfg)
    ev = pd.read_json(run / "eval.jsonl", lines=True)
    assert list(ev["step"]) == [1, 2]


def test_the_quickstart_in_fast_mode_writes_every_table_and_figure(tmp_path):
    from kdpo_lab import quickstart
    table = quickstart.run(tmp_path, fast=True)
    assert list(table["variant"]) == list(quickstart.VARIANTS)
    for name in ("results.csv", "results.md", "training_curves.png", "reward_vs_kl.png", "winrate_by_family.png",
                 "pair_grid.png", "samples.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "results.md").read_text().startswith("| variant |")
