"""losparse.training.preflight computes what the Trainer, CubicSchedule and the pruner would decide, without weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_bert_config

from losparse import LoSparseConfig, LoSparseUsageError
from losparse.core.decompose import apply
from losparse.core.layers import LoSparseLinear
from losparse.core.pruner import target_budget
from losparse.core.schedule import CubicSchedule, resolve_steps
from losparse.training import preflight


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


@pytest.mark.parametrize("examples, batch, accumulation, epochs, drop_last, max_steps", [
    (20, 4, 2, 2, False, -1),
    (21, 4, 1, 1.5, False, -1),
    (21, 4, 3, 3, True, -1),
    (5, 8, 4, 1, False, -1),
    (20, 4, 1, 1, False, 7),
])
def test_optimizer_steps_are_the_trainers(tiny_model, tmp_path, examples, batch, accumulation, epochs, drop_last,
                                          max_steps) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, use_cpu=True,
                             gradient_accumulation_steps=accumulation, num_train_epochs=epochs, max_steps=max_steps,
                             dataloader_drop_last=drop_last, report_to="none")
    dataset = Dataset.from_dict({"input_ids": [[2, 5, 3]] * examples, "labels": [0] * examples})
    trainer = Trainer(model=tiny_model, args=args, train_dataset=dataset)
    expected = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    assert preflight.optimizer_steps(examples, args).total_steps == expected


def test_too_few_examples_for_one_batch_with_drop_last(tmp_path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, dataloader_drop_last=True,
                             use_cpu=True, report_to="none")
    with pytest.raises(LoSparseUsageError, match="5 training examples make no full batch of 8 per device"):
        preflight.optimizer_steps(5, args)


def test_schedule_check_refuses_exactly_what_cubic_schedule_refuses() -> None:
    plans = [preflight.TrainingPlan(total, "test") for total in (1, 2, 5, 10)]
    for plan, warmup, final in itertools.product(plans, (None, 0, 1, 4, 9), (None, 0, 1, 5)):
        config = LoSparseConfig(pruning_warmup_steps=warmup, pruning_final_steps=final)
        try:
            preflight.check_schedule(config, plan)
            refused = False
        except LoSparseUsageError:
            refused = True
        try:
            CubicSchedule(total_steps=plan.total_steps,
                          warmup_steps=resolve_steps(warmup, config.pruning_warmup_ratio, plan.total_steps),
                          final_steps=resolve_steps(final, config.pruning_final_ratio, plan.total_steps),
                          final_fraction=0.5)
            schedule_refuses = False
        except LoSparseUsageError:
            schedule_refuses = True
        assert refused == schedule_refuses, (plan.total_steps, warmup, final)


@pytest.mark.parametrize("method, remaining, low_rank", [
    ("losparse", 0.3, 0.1), ("losparse", 0.2, 0.05), ("lowrank", 0.3, 0.1), ("lowrank_prune_all", 0.2, 0.1),
    ("itp", 0.3, 0.1),
])
def test_low_rank_budget_matches_the_decomposed_model(method, remaining, low_rank) -> None:
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    config = LoSparseConfig(method=method, remaining_ratio=remaining, low_rank_ratio=low_rank)
    shapes = preflight.target_shapes(AutoModelForSequenceClassification, tiny_bert_config(), config)
    model = apply(BertForSequenceClassification(tiny_bert_config()), config)
    layers = [m for m in model.modules() if isinstance(m, LoSparseLinear)]
    budget = target_budget(layers, config)
    assert shapes == [(m.out_features, m.in_features) for m in layers]
    assert preflight.low_rank_budget(shapes, config) == pytest.approx(
        (budget["low_rank_share"], budget["final_kept_fraction"]))


def test_position_limits_from_the_config() -> None:
    from transformers import BartConfig, BertConfig, DebertaV2Config, RobertaConfig, T5Config

    assert preflight.position_limit(BertConfig()) == (512, "max_position_embeddings 512")
    assert preflight.position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == (
        512, "max_position_embeddings 514 minus the padding offset 2")
    assert preflight.position_limit(BartConfig())[0] == 1024
    assert preflight.position_limit(T5Config()) is None
    assert preflight.position_limit(DebertaV2Config(position_biased_input=False)) is None
    preflight.check_max_length("max_seq_length", 512, BertConfig(), "m")
    with pytest.raises(LoSparseUsageError, match=r"^--max_seq_length 513 is more than the 512 positions of "):
        preflight.check_max_length("max_seq_length", 513, BertConfig(), "m")
