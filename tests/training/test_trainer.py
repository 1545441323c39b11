import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import ToyDataset, assert_same_training_state, tiny_bert_classifier, trainer_args

import losparse
from losparse import LoSparseConfig, LoSparseTrainer, LoSparseTrainerMixin, LoSparseUsageError, compose_trainer
from losparse.training.trainer import check_training_backend


def _model(seed=0):
    return tiny_bert_classifier(seed)


_args = trainer_args


CONFIG = dict(remaining_ratio=0.3, low_rank_ratio=0.1, pruning_warmup_steps=2, pruning_final_steps=3,
              pruning_interval=2)


def test_pruner_runs_once_per_optimizer_step_with_accumulation(tmp_path):
    trainer = LoSparseTrainer(model=_model(), args=_args(tmp_path, gradient_accumulation_steps=2),
                              train_dataset=ToyDataset(), losparse_config=LoSparseConfig(**CONFIG))
    calls = []
    original = losparse.LoSparsePruner.step

    def spy(self, step):
        calls.append(step)
        original(self, step)

    losparse.LoSparsePruner.step = spy
    try:
        trainer.train()
    finally:
        losparse.LoSparsePruner.step = original
    # 64 examples / batch 8 = 8 micro-batches per epoch, accumulation 2 -> 4 optimizer steps, 2 epochs.
    assert calls == list(range(1, 9))
    assert trainer.state.global_step == 8


def test_training_ends_at_the_target_ratio_and_pruned_rows_stay_zero(tmp_path):
    trainer = LoSparseTrainer(model=_model(), args=_args(tmp_path), train_dataset=ToyDataset(),
                              losparse_config=LoSparseConfig(**CONFIG))
    trainer.train()
    pruner = trainer.pruner
    assert pruner.kept_fraction == pytest.approx(pruner.final_kept_fraction)
    biggest_neuron = 64 / pruner.total_sparse_params
    assert pruner.achieved_kept_fraction() == pytest.approx(pruner.final_kept_fraction, abs=biggest_neuron)
    for layer in pruner.layers:
        # weight decay and Adam momentum act on every step; the re-applied mask keeps pruned rows at zero.
        assert torch.count_nonzero(layer.sparse[~layer.sparse_mask]) == 0
    report = losparse.parameter_report(trainer.model)
    assert report["remaining_ratio"] == pytest.approx(0.3, abs=0.01)


def test_low_rank_factors_keep_training(tmp_path):
    model = _model()
    losparse.apply(model, LoSparseConfig(**CONFIG))
    layer = model.bert.encoder.layer[0].attention.self.query
    u_before = layer.low_rank_u.detach().clone()
    LoSparseTrainer(model=model, args=_args(tmp_path), train_dataset=ToyDataset()).train()
    assert not torch.equal(layer.low_rank_u, u_before)


def _final_state(trainer):
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


def test_resume_continues_the_same_pruning_trajectory(tmp_path):
    config = LoSparseConfig(**CONFIG)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = LoSparseTrainer(model=_model(), args=_args(straight_dir, save_strategy="steps", save_steps=4),
                               train_dataset=ToyDataset(), losparse_config=config)
    straight.train()
    expected = _final_state(straight)
    checkpoint = straight_dir / "checkpoint-4"
    assert (checkpoint / losparse.core.pruner.PRUNER_STATE_FILE).is_file()
    shutil.copytree(checkpoint, resumed_dir / "checkpoint-4")
    before = sorted(os.listdir(resumed_dir / "checkpoint-4"))

    resumed = LoSparseTrainer(model=_model(seed=123), args=_args(resumed_dir), train_dataset=ToyDataset(),
                              losparse_config=config)
    resumed.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-4"))
    assert resumed.pruner.importance.num_updates == straight.pruner.importance.num_updates
    torch.testing.assert_close(resumed.pruner.importance.scores(), straight.pruner.importance.scores())
    assert_same_training_state(_final_state(resumed), expected)
    assert sorted(os.listdir(resumed_dir / "checkpoint-4")) == before, "the resumed checkpoint was modified"


def test_resume_from_a_checkpoint_without_pruner_state_is_refused(tmp_path):
    source = tmp_path / "source"
    LoSparseTrainer(model=_model(), args=_args(source, save_strategy="steps", save_steps=4),
                    train_dataset=ToyDataset(), losparse_config=LoSparseConfig(**CONFIG)).train()
    plain = tmp_path / "checkpoint-4"
    shutil.copytree(source / "checkpoint-4", plain)
    for name in (losparse.core.pruner.PRUNER_STATE_FILE, losparse.core.pruner.PRUNER_META_FILE):
        os.remove(plain / name)
    trainer = LoSparseTrainer(model=_model(), args=_args(tmp_path), train_dataset=ToyDataset(),
                              losparse_config=LoSparseConfig(**CONFIG))
    with pytest.raises(LoSparseUsageError, match="lacks losparse_pruner.safetensors, losparse_pruner.json"):
        trainer.train(resume_from_checkpoint=str(plain))


def test_deepspeed_and_fsdp_are_refused_up_front():
    with pytest.raises(LoSparseUsageError, match="--deepspeed is not supported"):
        check_training_backend(SimpleNamespace(deepspeed="ds.json", fsdp=None))
    with pytest.raises(LoSparseUsageError, match="--fsdp is not supported"):
        check_training_backend(SimpleNamespace(deepspeed=None, fsdp=["full_shard"]))


def test_trainer_needs_a_decomposed_model_or_a_config(tmp_path):
    with pytest.raises(LoSparseUsageError, match="has no LoSparse layers"):
        LoSparseTrainer(model=_model(), args=_args(tmp_path), train_dataset=ToyDataset())


# ------------------------------------------------------------------------------------------------
# Composition: compose_trainer is the one way to build the classes; the caller applies once.

def test_compose_trainer_gives_one_cached_class_per_combination_with_the_documented_mro():
    from transformers import Seq2SeqTrainer, Trainer

    from losparse.cli.tasks.squad import QuestionAnsweringTrainer
    from losparse.training.distill import DistillationTrainerMixin
    from losparse.training.trainer import PruningTrainerMixin

    assert compose_trainer(Trainer, prune=True) is LoSparseTrainer
    assert compose_trainer(Seq2SeqTrainer, prune=True) is losparse.LoSparseSeq2SeqTrainer
    assert compose_trainer(Trainer) is Trainer                       # nothing to add: the base itself
    assert LoSparseTrainer.__name__ == "LoSparseTrainer" and LoSparseTrainer.__module__ == "losparse.training.compose"
    assert LoSparseTrainer.__mro__[1:4] == (LoSparseTrainerMixin, PruningTrainerMixin, Trainer)
    both = compose_trainer(Seq2SeqTrainer, prune=True, distill=True)
    assert both is compose_trainer(Seq2SeqTrainer, distill=True, prune=True)
    assert both.__name__ == "LoSparseDistillationSeq2SeqTrainer"
    assert both.__mro__[1:5] == (LoSparseTrainerMixin, PruningTrainerMixin, DistillationTrainerMixin, Seq2SeqTrainer)
    qa = compose_trainer(QuestionAnsweringTrainer, distill=True)
    assert qa.__name__ == "DistillationQuestionAnsweringTrainer"
    assert qa.__mro__[1:3] == (DistillationTrainerMixin, QuestionAnsweringTrainer)
    with pytest.raises(LoSparseUsageError, match="already holds a LoSparse mixin"):
        compose_trainer(LoSparseTrainer, distill=True)
    with pytest.raises(LoSparseUsageError, match="Trainer subclass"):
        compose_trainer(object, prune=True)


def test_trainers_take_model_and_args_by_keyword_only(tmp_path):
    from transformers import Trainer

    model = _model()
    losparse.apply(model, LoSparseConfig(**CONFIG))
    for cls in (LoSparseTrainer, compose_trainer(Trainer, distill=True),
                compose_trainer(Trainer, prune=True, distill=True)):
        with pytest.raises(LoSparseUsageError, match="by keyword only: pass model=..., args=..."):
            cls(model, _args(tmp_path))


def test_apply_is_called_once_by_the_caller(tmp_path, monkeypatch):
    from transformers import Trainer

    from losparse.cli.run import make_trainer

    calls, original = [], losparse.core.decompose.apply

    def counting_apply(model, config):
        calls.append(model)
        return original(model, config)

    monkeypatch.setattr(losparse.core.decompose, "apply", counting_apply)
    monkeypatch.setattr(losparse.training.trainer, "apply", counting_apply)
    monkeypatch.setattr(losparse.methods.decomposing, "apply", counting_apply)
    config = LoSparseConfig(**CONFIG)

    # The run scripts: make_trainer is the caller; the trainer it builds does not apply again.
    model = _model()
    trainer = make_trainer(Trainer, config, model=model, args=_args(tmp_path), train_dataset=ToyDataset(),
                           allow_resume_config_change=True)
    assert calls == [model] and type(trainer) is LoSparseTrainer
    assert trainer.losparse_callback.allow_config_change is True
    # BERT's loss is a per-batch mean: declared before the Trainer read it in __init__.
    assert model.accepts_loss_kwargs is False and trainer.model_accepts_loss_kwargs is False

    # A library user applies, then builds: no second call.
    calls.clear()
    model = _model()
    losparse.core.decompose.apply(model, config)
    LoSparseTrainer(model=model, args=_args(tmp_path), train_dataset=ToyDataset())
    assert calls == [model]
    # ... or lets the constructor be the one caller, which refuses a model that was already decomposed.
    calls.clear()
    fresh = _model()
    LoSparseTrainer(model=fresh, args=_args(tmp_path), train_dataset=ToyDataset(), losparse_config=config)
    assert calls == [fresh]
    with pytest.raises(LoSparseUsageError, match="already decomposed"):
        LoSparseTrainer(model=model, args=_args(tmp_path), train_dataset=ToyDataset(), losparse_config=config)
    assert calls == [fresh]
