"""Checkpoints are complete-or-absent, a resume picks the newest complete one and refuses other settings."""

import json
import os
import shutil

import pytest
import transformers.trainer
from conftest import ToyDataset, assert_same_training_state
from test_trainer import CONFIG, _args, _final_state, _model

import losparse
from losparse import LoSparseConfig, LoSparseTrainer, LoSparseUsageError
from losparse.core.checkpoint import (
    check_same_compression,
    last_complete_checkpoint,
    missing_files,
    resolve_resume_checkpoint,
)
from losparse.training.trainer import declare_loss_kwargs, loss_uses_num_items

SAVE = dict(save_strategy="steps", save_steps=4, save_total_limit=1)


class Crash(RuntimeError):
    """Stands for a kill -9 in the middle of a checkpoint save."""


def _straight_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight")
    trainer = LoSparseTrainer(model=_model(), args=_args(directory, **SAVE), train_dataset=ToyDataset(),
                              losparse_config=LoSparseConfig(**CONFIG))
    trainer.train()
    return _final_state(trainer)


@pytest.fixture(scope="module")
def straight_state(tmp_path_factory):
    return _straight_run(tmp_path_factory)


def _crash_second_save_at(monkeypatch, target, name):
    """Patch `target.name` so that its call during the save of checkpoint-8 raises `Crash`."""
    original = getattr(target, name)

    def crashing(*args, **kwargs):
        if any("checkpoint-8" in str(a) for a in list(args) + list(kwargs.values())) or (
                name == "rotate_checkpoints" and os.path.isdir(os.path.join(kwargs.get("output_dir", ""), "checkpoint-8"))):
            raise Crash(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, crashing)


# Every write a checkpoint save makes, in the order the Trainer makes them; the last one is the rotation.
SAVE_POINTS = [
    (transformers.trainer.Trainer, "_save"),                       # model weights
    (losparse.LoSparsePruner, "save"),                               # pruner state
    (transformers.trainer.Trainer, "_save_optimizer_and_scheduler"),
    (transformers.trainer.Trainer, "_save_rng_state"),
    (transformers.trainer.TrainerState, "save_to_json"),
    (transformers.trainer, "rotate_checkpoints"),                   # deleting checkpoint-4
]


@pytest.mark.parametrize("target,name", SAVE_POINTS, ids=[name for _, name in SAVE_POINTS])
def test_a_crash_anywhere_in_a_save_leaves_a_resumable_run_on_the_same_trajectory(tmp_path, monkeypatch,
                                                                                  straight_state, target, name):
    config = LoSparseConfig(**CONFIG)
    with monkeypatch.context() as patch:
        _crash_second_save_at(patch, target, name)
        crashed = LoSparseTrainer(model=_model(), args=_args(tmp_path, **SAVE), train_dataset=ToyDataset(),
                                  losparse_config=config)
        with pytest.raises(Crash):
            crashed.train()
    checkpoint = last_complete_checkpoint(str(tmp_path), needs_pruner=True)
    assert checkpoint is not None, os.listdir(tmp_path)
    expected_step = 8 if name == "rotate_checkpoints" else 4
    assert checkpoint.endswith(f"checkpoint-{expected_step}")

    resumed = LoSparseTrainer(model=_model(seed=7), args=_args(tmp_path, **SAVE), train_dataset=ToyDataset(),
                              losparse_config=config)
    resumed.train(resume_from_checkpoint=True)
    assert_same_training_state(_final_state(resumed), straight_state)


def test_the_pruner_state_is_written_before_the_trainer_state(tmp_path, monkeypatch):
    order = []
    original_pruner_save = losparse.LoSparsePruner.save
    original_state_save = transformers.trainer.TrainerState.save_to_json
    monkeypatch.setattr(losparse.LoSparsePruner, "save",
                        lambda self, d: (order.append("pruner"), original_pruner_save(self, d))[1])
    monkeypatch.setattr(transformers.trainer.TrainerState, "save_to_json",
                        lambda self, p: (order.append("trainer_state"), original_state_save(self, p))[1])
    LoSparseTrainer(model=_model(), args=_args(tmp_path, save_strategy="steps", save_steps=8),
                    train_dataset=ToyDataset(), losparse_config=LoSparseConfig(**CONFIG)).train()
    assert order[:2] == ["pruner", "trainer_state"]


def _fake_checkpoint(directory, files):
    os.makedirs(directory, exist_ok=True)
    for name in files:
        with open(os.path.join(directory, name), "w") as f:
            f.write("{}")
    return str(directory)


COMPLETE = ["trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "losparse_pruner.json",
            "losparse_pruner.safetensors"]


def test_true_picks_the_newest_complete_checkpoint_and_names_the_skipped_one(tmp_path, caplog):
    _fake_checkpoint(tmp_path / "checkpoint-10", COMPLETE)
    _fake_checkpoint(tmp_path / "checkpoint-20", [f for f in COMPLETE if f != "losparse_pruner.json"])
    _fake_checkpoint(tmp_path / "checkpoint-9", COMPLETE)
    with caplog.at_level("WARNING", logger="losparse.core.checkpoint"):
        chosen = resolve_resume_checkpoint("true", str(tmp_path), needs_pruner=True)
    assert chosen == str(tmp_path / "checkpoint-10")
    assert "checkpoint-20" in caplog.text and "losparse_pruner.json" in caplog.text
    # A fine-tuning run (no pruner) may use checkpoint-20.
    assert resolve_resume_checkpoint(True, str(tmp_path), needs_pruner=False) == str(tmp_path / "checkpoint-20")


@pytest.mark.parametrize("files,message", [
    ([f for f in COMPLETE if f != "trainer_state.json"], "looks like a model directory"),
    ([f for f in COMPLETE if f != "losparse_pruner.safetensors"], "lacks losparse_pruner.safetensors"),
    ([f for f in COMPLETE if f != "optimizer.pt"], "lacks optimizer.pt"),
])
def test_an_explicit_incomplete_checkpoint_is_refused_naming_what_it_lacks(tmp_path, files, message):
    path = _fake_checkpoint(tmp_path / "checkpoint-3", files)
    with pytest.raises(LoSparseUsageError, match=message):
        resolve_resume_checkpoint(path, str(tmp_path), needs_pruner=True)


def test_true_without_any_complete_checkpoint_is_refused(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-3", ["model.safetensors"])
    with pytest.raises(LoSparseUsageError, match="no complete checkpoint"):
        resolve_resume_checkpoint(True, str(tmp_path), needs_pruner=True)
    assert missing_files(str(tmp_path / "checkpoint-3"), needs_pruner=False, needs_optimizer=False) == [
        "trainer_state.json"]


def _checkpoint_with_config(tmp_path, max_steps=8, **overrides):
    values = {**LoSparseConfig(**CONFIG).to_dict(), **overrides}
    path = _fake_checkpoint(tmp_path / "checkpoint-4", COMPLETE)
    with open(os.path.join(path, "losparse_pruner.json"), "w") as f:
        json.dump({"last_step": 4, "kept_fraction": 1.0, "config": values}, f)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"max_steps": max_steps}, f)
    return path


@pytest.mark.parametrize("changed,expected", [
    (dict(remaining_ratio=0.2), "--remaining_ratio: checkpoint 0.2, this run 0.3"),
    (dict(method="itp"), "--method: checkpoint 'itp', this run 'losparse'"),
    (dict(pruning_final_steps=5), "--pruning_final_steps: checkpoint 5, this run 3"),
    (dict(low_rank_ratio=0.05), "--low_rank_ratio: checkpoint 0.05, this run 0.1"),
])
def test_resuming_other_compression_settings_is_refused_naming_both_values(tmp_path, changed, expected):
    path = _checkpoint_with_config(tmp_path, **changed)
    with pytest.raises(LoSparseUsageError) as error:
        check_same_compression(path, LoSparseConfig(**CONFIG), max_steps=8)
    assert expected in str(error.value) and "--allow_resume_config_change" in str(error.value)
    check_same_compression(path, LoSparseConfig(**CONFIG), max_steps=8, allow_change=True)


def test_resuming_with_other_total_steps_is_refused_and_init_only_fields_are_ignored(tmp_path):
    path = _checkpoint_with_config(tmp_path, max_steps=8, svd_solver="exact")
    check_same_compression(path, LoSparseConfig(**CONFIG), max_steps=8)
    with pytest.raises(LoSparseUsageError, match=r"max_steps\): checkpoint 8, this run 16"):
        check_same_compression(path, LoSparseConfig(**CONFIG), max_steps=16)


def test_the_trainer_refuses_a_resume_with_more_epochs(tmp_path):
    # 64 examples / batch 8 = 8 optimizer steps per epoch: 16 steps for 2 epochs, 24 for 3.
    trainer = LoSparseTrainer(model=_model(), args=_args(tmp_path, save_strategy="steps", save_steps=4),
                              train_dataset=ToyDataset(), losparse_config=LoSparseConfig(**CONFIG))
    trainer.train()
    shutil.rmtree(tmp_path / "checkpoint-16")
    longer = LoSparseTrainer(model=_model(), args=_args(tmp_path, num_train_epochs=3), train_dataset=ToyDataset(),
                             losparse_config=LoSparseConfig(**CONFIG))
    with pytest.raises(LoSparseUsageError, match=r"checkpoint 16, this run 24"):
        longer.train(resume_from_checkpoint=True)


def test_models_whose_loss_is_a_batch_mean_do_not_take_num_items_in_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    bert = _model()
    assert not loss_uses_num_items(bert)
    declare_loss_kwargs(bert)
    assert bert.accepts_loss_kwargs is False
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert loss_uses_num_items(llama)


def test_a_checkpoint_from_before_a_field_existed_is_compared_with_that_fields_default(tmp_path):
    path = _checkpoint_with_config(tmp_path)
    with open(os.path.join(path, "losparse_pruner.json")) as f:
        meta = json.load(f)
    del meta["config"]["pruning_variant"]
    with open(os.path.join(path, "losparse_pruner.json"), "w") as f:
        json.dump(meta, f)
    check_same_compression(path, LoSparseConfig(**CONFIG), max_steps=8)
    with pytest.raises(LoSparseUsageError, match="--pruning_variant: checkpoint 'paper', this run 'reference'"):
        check_same_compression(path, LoSparseConfig(**CONFIG, pruning_variant="reference"), max_steps=8)


def test_a_checkpoint_from_before_align_existed_resumes_as_align_1_only(tmp_path):
    """Such a checkpoint names no `align`: its shapes were never aligned, so it matches --align 1, not the default."""
    path = _checkpoint_with_config(tmp_path)
    meta_path = os.path.join(path, "losparse_pruner.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["config"]["align"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    check_same_compression(path, LoSparseConfig(**{**CONFIG, "align": "1"}), max_steps=8)
    with pytest.raises(LoSparseUsageError, match="align"):
        check_same_compression(path, LoSparseConfig(**{**CONFIG, "align": "auto"}), max_steps=8)
