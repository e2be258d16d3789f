"""Run configurations: TRL's field names, and the old names still accepted with a notice."""
import pytest
import yaml

from kdpo_lab import cli
from kdpo_lab.config import RENAMED, SFTConfig, TrainConfig


def test_old_field_names_in_yaml_load_under_trl_names_with_one_notice_each(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"out_dir": "runs/x", "lr": 3e-4, "batch_size": 8, "grad_accum": 2}))
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.output_dir, cfg.learning_rate, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == \
        ("runs/x", 3e-4, 8, 2)
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 4 and all("(TRL's name); the old name still works" in n for n in notices)


def test_an_old_and_a_new_name_for_the_same_field_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"lr": 3e-4, "learning_rate": 1e-4}))
    with pytest.raises(ValueError, match="both 'lr' and its new name 'learning_rate'"):
        TrainConfig.from_yaml(path)


def test_old_option_names_on_the_command_line_become_trl_names():
    argv = cli._renamed_options(["train", "c.yaml", "--lr", "1e-3", "--batch-size=4", "--beta", "0.2"])
    assert argv == ["train", "c.yaml", "--learning-rate", "1e-3", "--per-device-train-batch-size=4", "--beta", "0.2"]


def test_sft_config_has_no_loss_fields_and_train_config_has_all_of_sfts():
    sft, train = set(SFTConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    assert sft < train and not {"beta", "gamma", "kernel", "divergence", "eta"} & sft
    assert not set(RENAMED) & train and set(RENAMED.values()) <= train
