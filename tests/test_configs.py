"""Every shipped GLUE table resolves, for every task and ratio, into run_glue's dataclasses."""

import glob

import pytest
import yaml
from transformers import TrainingArguments

from losparse import LoSparseConfig
from losparse.cli import ModelArguments, RunArguments, parse_arguments
from losparse.tasks.glue import GlueDataArguments

TYPES = (ModelArguments, GlueDataArguments, LoSparseConfig, RunArguments, TrainingArguments)
GLUE_TABLES = sorted(glob.glob("configs/glue/*.yaml"))


def _cells():
    for path in GLUE_TABLES:
        with open(path) as f:
            table = yaml.safe_load(f)
        for task, section in table["tasks"].items():
            for ratio in section["ratios"]:
                yield path, task, ratio


def test_the_paper_tables_are_shipped():
    assert GLUE_TABLES == ["configs/glue/bert-base-uncased.yaml", "configs/glue/deberta-v3-base.yaml"]


@pytest.mark.parametrize("path,task,ratio", list(_cells()))
def test_every_cell_parses(path, task, ratio):
    model, data, config, run, training = parse_arguments(
        TYPES, ["--config", path, "--task_name", task, "--remaining_ratio", str(ratio), "--output_dir", "x"])
    assert config.remaining_ratio == ratio
    assert 0 < config.low_rank_ratio < ratio
    assert isinstance(training.learning_rate, float) and training.learning_rate < 1e-2
    assert training.max_grad_norm == 0.0
    assert config.pruning_warmup_steps is not None and config.pruning_final_steps is not None


def test_a_table_9_cell():
    *_, config, _, training = parse_arguments(TYPES, [
        "--config", "configs/glue/deberta-v3-base.yaml", "--task_name", "mnli", "--remaining_ratio", "0.2",
        "--output_dir", "x"])
    assert (training.num_train_epochs, training.learning_rate) == (8, 9e-5)
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 256
    assert (config.pruning_warmup_steps, config.pruning_final_steps, config.beta1, config.low_rank_ratio) == (
        675, 3375, 0.85, 0.05)


@pytest.mark.parametrize("path", sorted(glob.glob("configs/distillation/*.yaml")))
def test_distillation_tables_parse_with_a_teacher(path):
    from losparse.distill import DistillationArguments

    types = (ModelArguments, GlueDataArguments, LoSparseConfig, DistillationArguments, RunArguments,
             TrainingArguments)
    with open(path) as f:
        tasks = [t for t in yaml.safe_load(f)["tasks"] if t != "squad"]
    for task in tasks:
        *_, distill, _, training = parse_arguments(types, [
            "--config", path, "--task_name", task, "--output_dir", "x", "--teacher_model_name_or_path", "teacher"])
        assert distill.distill_stage == "after" and distill.enabled
        assert training.num_train_epochs == 50
