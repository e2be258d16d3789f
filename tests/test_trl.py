"""kdpo_lab.trl: DPO-Kernels inside TRL's DPOTrainer, for scripts that already use TRL."""
import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from kdpo_lab import checkpoint, models, suite  # noqa: E402
from kdpo_lab.trl import KernelDPOConfig, KernelDPOTrainer  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def setup():
    rows = [p.to_dict() for p in suite.load_suite("train", limit=32)[0]]
    texts = [r["prompt"] + " " + r[k] for r in rows for k in ("chosen", "rejected")]
    tokenizer = models.build_tokenizer(texts, vocab_size=300)
    config = models.tiny_config("llama", vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2, max_len=128)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    return tokenizer, config, data


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
               logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, beta=0.1,
               dataloader_num_workers=0, **kw)


def _train(trainer_cls, args, setup, peft_config=None, with_ref=True):
    tokenizer, config, data = setup
    model = models.build_model(config, seed=0)
    ref = models.frozen_copy(model) if with_ref else None
    trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=peft_config)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return trainer, losses


def test_without_a_kernel_and_with_kl_it_logs_the_losses_of_trls_own_dpo_trainer(setup, tmp_path):
    _, theirs = _train(DPOTrainer, _args(DPOConfig, tmp_path / "trl"), setup)
    _, ours = _train(KernelDPOTrainer, _args(KernelDPOConfig, tmp_path / "ours"), setup)
    assert len(ours) == len(theirs) == STEPS
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert theirs[-1] != pytest.approx(theirs[0], abs=1e-3)  # the runs moved: equal losses are not a constant


def test_trls_f_divergence_setting_is_honoured_and_matches_trl(setup, tmp_path):
    kw = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    _, theirs = _train(DPOTrainer, _args(DPOConfig, tmp_path / "trl", **kw), setup)
    trainer, ours = _train(KernelDPOTrainer, _args(KernelDPOConfig, tmp_path / "ours", **kw), setup)
    assert trainer.args.divergence == "alpha" and trainer.args.divergence_params["alpha"] == pytest.approx(0.7)
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_a_divergence_that_contradicts_f_divergence_type_is_an_error_naming_both(tmp_path):
    with pytest.raises(ValueError, match="divergence='js'.*contradicts f_divergence_type='forward_kl'"):
        _args(KernelDPOConfig, tmp_path, divergence="js", f_divergence_type="forward_kl")


def test_with_a_kernel_the_kernels_parameters_train(setup, tmp_path):
    args = _args(KernelDPOConfig, tmp_path, kernel="hmk", gamma=0.5, eta=0.01)
    tokenizer, config, data = setup
    model = models.build_model(config, seed=0)
    trainer = KernelDPOTrainer(model=model, ref_model=models.frozen_copy(model), args=args, train_dataset=data,
                               processing_class=tokenizer)
    before = {k: v.clone() for k, v in trainer.kernel.state_dict().items()}
    trainer.train()
    after = trainer.kernel.state_dict()
    assert not torch.equal(before["tau_logits"], after["tau_logits"])
    kernel_group = [g for g in trainer.optimizer.param_groups if any(p is after_p for p in g["params"]
                                                                     for after_p in trainer.kernel.parameters())]
    assert len(kernel_group) == 1 and kernel_group[0]["initial_lr"] == args.kernel_lr
    assert any("kernel/margin" in row for row in trainer.state.log_history)
    trainer.save_model(str(tmp_path / "saved"))  # the kernel as safetensors + JSON, read back in one call
    loaded = checkpoint.load_kernel(tmp_path / "saved").state_dict()
    assert all(torch.equal(loaded[k], v.cpu()) for k, v in after.items())


def test_lora_without_a_reference_model_trains_with_a_kernel(setup, tmp_path):
    from peft import LoraConfig
    args = _args(KernelDPOConfig, tmp_path, kernel="rbf", gamma=0.5)
    trainer, losses = _train(KernelDPOTrainer, args, setup, with_ref=False,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None and len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_precomputed_reference_log_probs_give_the_same_losses(setup, tmp_path):
    _, live = _train(KernelDPOTrainer, _args(KernelDPOConfig, tmp_path / "live", kernel="rbf", gamma=0.5), setup)
    _, pre = _train(KernelDPOTrainer, _args(KernelDPOConfig, tmp_path / "pre", kernel="rbf", gamma=0.5,
                                            precompute_ref_log_probs=True), setup)
    assert pre == pytest.approx(live, abs=1e-5)


def test_the_penalty_form_trains_with_reference_logits(setup, tmp_path):
    trainer, losses = _train(KernelDPOTrainer, _args(KernelDPOConfig, tmp_path, divergence="hellinger",
                                                     divergence_form="penalty", lam=0.1), setup)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(row.get("divergence/penalty", -1) >= 0 for row in trainer.state.log_history)
