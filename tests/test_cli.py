"""The `kdpo` command as a user meets it: every mistake is one line and a non-zero exit, never a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpo_lab import cli
from kdpo_lab.config import SFTConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}
BAD_ROWS = {
    "missing_field": json.dumps({"prompt": "x", "chosen": "y"}).encode(),
    "empty_chosen": json.dumps({**GOOD, "chosen": ""}).encode(),
    "chosen_equals_rejected": json.dumps({**GOOD, "rejected": "Four."}).encode(),
    "number_as_text": json.dumps({**GOOD, "chosen": 4}).encode(),
    "invalid_utf8": b'{"prompt": "a\xff\xfe b", "chosen": "c", "rejected": "d"}',
    "broken_json": b'{"prompt": "a", "chosen": "c", "rejected": ',
}
TINY = ["--model", "tiny-llama", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--vocab-size", "300",
        "--max-steps", "1", "--max-train-pairs", "16", "--max-eval-pairs", "4", "--progress", "false"]


def bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good * 10 + BAD_ROWS[kind] + b"\n" + good * 10)
    return path


def one_line_error(argv, capsys, tmp_path):
    """Run `kdpo ARGV` in-process; assert a non-zero exit and exactly one line on stderr; return that line."""
    code = cli.main([*argv[:1], *(["--output-dir", str(tmp_path / "out")] if argv[0] in ("sft", "train") else []),
                     *argv[1:]])
    err = [line for line in capsys.readouterr().err.splitlines() if "(TRL's name)" not in line]
    assert code != 0 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_a_malformed_row_under_strict_is_one_line_naming_file_and_row(tmp_path, capsys, kind):
    line = one_line_error(["sft", "--data", str(bad_file(tmp_path, kind)), "--strict", "true", *TINY], capsys, tmp_path)
    assert f"{kind}.jsonl row 11" in line


@pytest.mark.parametrize("option, value, says", [
    ("--dtype", "fp16", "dtype fp16 is not supported"),
    ("--embeddings", "Encoder", "embeddings must be one of policy, encoder; got 'Encoder'"),
    ("--divergence", "klx", "divergence must be one of kl,"),
    ("--kernel", "gaussian", "kernel must be one of"),
    ("--loss-type", "dpo", "loss_type must be one of sigmoid"),
    ("--beta", "-1", "beta must be > 0"),
    ("--label-smoothing", "0.5", "label_smoothing must be in [0, 0.5)"),
    ("--max-steps", "ten", "--max-steps: invalid int value: 'ten'"),
    ("--max-length", "4", "max_length must be >= 8"),
    ("--kernel-params", "{sigma: 1}", "kernel_params must be a JSON object"),
    ("--model", "/no/such/model", "model: no such folder /no/such/model"),
    ("--max-stepz", "3", "unrecognized arguments: --max-stepz"),
])
def test_a_bad_option_is_one_line_naming_it(tmp_path, capsys, option, value, says):
    assert says in one_line_error(["train", option, value], capsys, tmp_path)


def test_a_bad_yaml_value_or_key_or_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: fast\n")
    assert "learning_rate must be a number; got 'fast'" in one_line_error(["train", str(bad)], capsys, tmp_path)
    bad.write_text("betta: 0.1\n")
    assert "unknown config keys ['betta']" in one_line_error(["train", str(bad)], capsys, tmp_path)
    assert "config file nowhere.yaml does not exist" in one_line_error(["train", "nowhere.yaml"], capsys, tmp_path)


def test_eval_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert "not a finished run" in one_line_error(["eval", str(tmp_path)], capsys, tmp_path)


def test_debug_and_kdpo_debug_show_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="beta must be > 0"):
        cli.main(["train", "--beta", "-1", "--debug"])
    monkeypatch.setenv("KDPO_DEBUG", "1")
    with pytest.raises(ValueError, match="beta must be > 0"):
        cli.main(["train", "--beta", "-1"])


def test_the_installed_command_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDPO_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "kdpo_lab.cli", "sft", "--dtype", "fp16"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: dtype fp16 is not supported")


def test_yaml_sets_fields_and_the_command_line_overrides_them(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.2, "lr": 1e-4, "kernel": "rbf", "kernel_params": {"sigma": 0.5}}))
    cfg = cli.parse_config("train", [str(path), "--beta", "0.3", "--gamma", "0.5", "--batch-size", "4"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.beta, cfg.learning_rate, cfg.gamma, cfg.per_device_train_batch_size) == (0.3, 1e-4, 0.5, 4)
    assert cfg.kernel_params == {"sigma": 0.5}
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 2 and all("(TRL's name); the old name still works" in n for n in notices)


def test_the_shipped_configs_load_from_any_folder_and_use_trls_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, command in (("sft_tiny.yaml", "sft"), ("dpo_tiny.yaml", "train"), ("llama7b_lora.yaml", "train")):
        cli.parse_config(command, [f"configs/{name}"])
    assert capsys.readouterr().err == ""  # no old name in a shipped config


def test_sft_help_lists_no_loss_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--learning-rate" in text and "--resume" in text
    assert not any(word in text for word in ("beta", "gamma", "kernel", "divergence"))


def test_every_config_field_is_an_option_with_help():
    parser, _ = cli._config_parser("train")
    options = {o for a in parser._actions for o in a.option_strings}
    assert all(f"--{f.replace('_', '-')}" in options for f in TrainConfig.__dataclass_fields__)
    assert all(a.help for a in parser._actions)
    assert set(SFTConfig.__dataclass_fields__) < set(TrainConfig.__dataclass_fields__)
