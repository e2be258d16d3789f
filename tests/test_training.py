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


OPTIMIZER_STEP = training._optimizer_step  # the unpatched step (a second patch must not wrap the first)


def first_step_gradients(monkeypatch, stage, cfg):
    """The policy's gradients at the first optimiser step of `stage` (training.sft or training.train)."""
    grads, step = {}, OPTIMIZER_STEP

    def record(run):
        if run.step == 0:
            grads.update({n: p.grad.clone() for n, p in run.unwrapped.named_parameters() if p.grad is not None})
        step(run)
    monkeypatch.setattr(training, "_optimizer_step", record)
    stage(cfg)
    return grads


@pytest.mark.parametrize("stage", ["sft", "train"])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path, monkeypatch, stage):
    # 2 micro-batches of 4 pairs = 1 batch of 8. Responses of very different lengths, so that SFT's mean per
    # token of the whole batch differs from the mean of the two micro-batches' means (it must not use those)
    rows = [{"prompt": f"Count to {i}.", "chosen": " ".join(map(str, range(1 + 3 * i))), "rejected": "No."}
            for i in range(16)]
    data = write_rows(tmp_path / "lengths.jsonl", rows)
    fn = getattr(training, stage)
    kw = dict(data=str(data), max_train_pairs=0, max_steps=1)
    whole = first_step_gradients(monkeypatch, fn, tiny(tmp_path, "whole", per_device_train_batch_size=8, **kw))
    split = first_step_gradients(monkeypatch, fn, tiny(tmp_path, "split", per_device_train_batch_size=4,
                                                       gradient_accumulation_steps=2, **kw))
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)


def test_training_evaluation_equals_evaluation_evaluate_on_one_process(tmp_path):
    from kdpo_lab import evaluation, models
    cfg = tiny(tmp_path, "ev", max_steps=2, eval_generate=4)
    run = training.train(cfg)
    reference, tokenizer, train_pairs, train_feats, eval_pairs, eval_feats = loading.load_splits(cfg)
    policy = models.load_model(run / "model", dtype="fp32")
    expected = evaluation.evaluate(policy, reference, tokenizer, eval_pairs, eval_feats, beta=cfg.beta, n_generate=4,
                                   seed=cfg.seed)
    n = len(eval_feats)
    on_train = evaluation.preference_metrics(policy, reference, train_feats[:n], train_pairs[:n], cfg.beta,
                                             tokenizer.pad_token_id)
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert row["pref/train_accuracy"] == on_train["pref/accuracy"]
    assert {k: row[k] for k in expected} == expected


def test_metric_rows_also_go_to_accelerates_trackers(tmp_path, monkeypatch):
    from accelerate import Accelerator
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append((step, values)))
    run = training.train(tiny(tmp_path, "log", max_steps=2))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sent = [(s, v) for s, v in logged if "metrics/loss" in v]
    assert [s for s, _ in sent] == [r["step"] for r in rows] == [1, 2]
    assert all(v["metrics/loss"] == r["loss"] and v["metrics/lr"] == r["lr"] for (_, v), r in zip(sent, rows))
    assert any("eval/pref/accuracy" in v for _, v in logged)


def test_report_to_a_tracker_that_is_not_installed_is_refused_in_one_line(tmp_path):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    missing = [str(t) for t in LoggerType if str(t) != "all" and t not in get_available_trackers()]
    cfg = tiny(tmp_path, "tb", max_steps=1)
    cfg.report_to = missing[0]  # read with getattr(cfg, "report_to", "none") until TrainConfig has the field
    with pytest.raises(ValueError, match=f"report_to: {missing[0]} not installed") as info:
        training.trackers(cfg)
    assert "\n" not in str(info.value)
    cfg.report_to = "none"
    assert training.trackers(cfg) is None


def test_the_model_is_written_before_the_final_evaluation(tmp_path, monkeypatch):
    def broken(self, run):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(training.DPOEvaluation, "run", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        training.train(tiny(tmp_path, "saved", max_steps=2, kernel="rbf", gamma=0.5))
    assert (tmp_path / "saved" / "model" / "model.safetensors").exists()
    assert (tmp_path / "saved" / "kernel.safetensors").exists() and (tmp_path / "saved" / "kernel.json").exists()


def test_mixed_precision_left_behind_by_another_trainer_in_this_process_does_not_leak_into_a_run(tmp_path):
    # TRL's DPOTrainer on CPU leaves accelerate's shared state at bf16 mixed precision; a later run in the same
    # process (a notebook using both) must train exactly as in a fresh process, not under autocast.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    recipe = dict(model="llama-7b-shape", model_scale=1 / 32, dtype="bf16", lora_r=4, max_steps=2, kernel="rbf", gamma=0.5)
    fresh = metric_rows(training.train(tiny(tmp_path, "fresh", **recipe)))
    AcceleratorState._reset_state()
    Accelerator(mixed_precision="bf16", cpu=True)
    try:
        after = metric_rows(training.train(tiny(tmp_path, "after", **recipe)))
    finally:
        AcceleratorState._reset_state()
    pd.testing.assert_frame_equal(after, fresh)
