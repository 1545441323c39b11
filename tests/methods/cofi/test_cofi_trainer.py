"""The CoFi trainer: the three stages, the optimizer without embeddings, the checkpointed state and resuming."""

import json

import pytest
import torch
from cofi_testing import config, single_thread, tiny  # noqa: F401 (an autouse fixture)
from conftest import ToyDataset, tiny_bert_classifier, trainer_args
from transformers import Trainer, TrainerCallback

from losparse.core.checkpoint import PRUNER_META_FILE, PRUNER_STATE_FILE
from losparse.methods.cofi.pruner import CofiPruner
from losparse.methods.cofi.trainer import cofi_trainer

CONFIG = {"remaining_ratio": 0.5, "cofi_prefinetune_epochs": 0.5, "cofi_finetune_epochs": 0.5,
          "lagrangian_warmup_steps": 4, "reg_learning_rate": 0.05}


class Recorder(TrainerCallback):
    """Per optimizer step: the stage the step ran in and a copy of the neurons' log α after it."""

    def __init__(self):
        self.trainer, self.steps = None, []

    def on_step_end(self, args, state, control, **kwargs):
        pruner = self.trainer.pruner
        self.steps.append((state.global_step, pruner.masks["neuron"].log_alpha.detach().clone(), pruner.stage()))


def _trainer(output_dir, **overrides):
    return cofi_trainer(Trainer)(model=tiny_bert_classifier(), args=trainer_args(output_dir, **overrides),
                                 train_dataset=ToyDataset(), cofi_config=config(**CONFIG))


def test_stages_optimizer_and_final_gates(tmp_path):
    trainer = _trainer(tmp_path)
    recorder = Recorder()
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    embeddings = trainer.model.bert.embeddings.word_embeddings.weight.detach().clone()
    trainer.train()
    pruner = trainer.pruner
    assert (pruner.total_steps, pruner.prefinetune_steps, pruner.prune_end) == (16, 4, 12)
    alphas = {step: alpha for step, alpha, _ in recorder.steps}
    assert torch.equal(alphas[4], alphas[1])  # pre-fine-tune: the gates are not trained
    assert not torch.equal(alphas[5], alphas[4]) and not torch.equal(alphas[12], alphas[11])
    assert torch.equal(alphas[16], alphas[12])  # fine-tune: fixed
    assert [stage for _, _, stage in recorder.steps] == ["prefinetune"] * 3 + ["prune"] * 8 + ["finetune"] * 5
    assert pruner.final_gates is not None and 0 < pruner.achieved_kept_fraction() <= 0.5
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for n, p in trainer.model.named_parameters() if "embeddings" in n)
    assert torch.equal(trainer.model.bert.embeddings.word_embeddings.weight, embeddings)
    assert pruner.last_terms["cofi_target_sparsity"] == pytest.approx(0.5)


def test_plan_splits_max_steps_in_the_epochs_proportions():
    pruner = CofiPruner(tiny(), config(cofi_prefinetune_epochs=1, cofi_finetune_epochs=1, lagrangian_warmup_epochs=2))
    pruner.plan(total_steps=100, num_train_epochs=4)
    assert (pruner.prefinetune_steps, pruner.prune_steps, pruner.lagrangian.warmup_steps) == (25, 50, 50)


def test_resume_mid_pruning_continues_the_same_trajectory(tmp_path):
    full = _trainer(tmp_path / "full", save_strategy="steps", save_steps=8)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-8"
    assert (checkpoint / PRUNER_STATE_FILE).is_file()
    meta = json.loads((checkpoint / PRUNER_META_FILE).read_text())
    assert meta["kind"] == "cofi" and meta["last_step"] == 8 and meta["config"]["method"] == "cofi"
    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = full.pruner, resumed.pruner
    for unit in a.masks:
        torch.testing.assert_close(b.masks[unit].log_alpha, a.masks[unit].log_alpha, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.final_gates[unit], a.final_gates[unit], atol=1e-5, rtol=1e-5)
    for name in ("lambda_1", "lambda_2"):
        torch.testing.assert_close(getattr(b.lagrangian, name), getattr(a.lagrangian, name), atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
