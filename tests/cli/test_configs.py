"""Every shipped GLUE table resolves, for every task and ratio, into run_glue's dataclasses."""

import glob

import pytest
import yaml
from transformers import TrainingArguments

from losparse import LoSparseConfig
from losparse.cli.run import ModelArguments, RunArguments, parse_arguments
from losparse.cli.tasks.glue import GlueDataArguments

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
    from losparse.training.distill import DistillationArguments

    types = (ModelArguments, GlueDataArguments, LoSparseConfig, DistillationArguments, RunArguments,
             TrainingArguments)
    with open(path) as f:
        tasks = [t for t in yaml.safe_load(f)["tasks"] if t != "squad"]
    for task in tasks:
        *_, distill, _, training = parse_arguments(types, [
            "--config", path, "--task_name", task, "--output_dir", "x", "--teacher_model_name_or_path", "teacher"])
        assert distill.distill_stage == "after" and distill.enabled
        assert training.num_train_epochs == 50


# ---------------------------------------------------------------------------------------------------------
# Every cell of every shipped table can start on its real dataset: t_i + t_f < T.
# ---------------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402

from losparse.cli.yaml_config import resolve_yaml_config  # noqa: E402
from losparse.core.schedule import CubicSchedule, resolve_steps  # noqa: E402

# Real train-split sizes (examples). SQuAD v1.1: 87,599 questions. The Trainer steps over windows of 384 tokens
# with stride 128, and every question gives at least one window, so the question count is a lower bound on the
# number of training features (88,524 with the uncased BERT WordPiece vocabulary, as logged by the Hugging Face
# question-answering example notebook); more windows only mean more steps, so a cell feasible here is feasible.
TRAIN_EXAMPLES = {
    "mnli": 392_702, "qqp": 363_846, "qnli": 104_743, "sst2": 67_349, "cola": 8_551, "stsb": 5_749,
    "mrpc": 3_668, "rte": 2_490, "squad": 87_599, "xsum": 204_045, "cnn_dailymail": 287_113,
}
PAPER_TABLES = sorted(glob.glob("configs/*/*.yaml"))
_DEFAULTS = {f.name: f.default for t in (LoSparseConfig, TrainingArguments) for f in dataclasses.fields(t)
             if f.default is not dataclasses.MISSING}


class _AnyKey:
    """Key checking is the other tests' job (they parse every cell into the scripts' dataclasses)."""

    def __contains__(self, key):
        return True


def _table_cells():
    for path in PAPER_TABLES:
        with open(path) as f:
            table = yaml.safe_load(f)
        for task, section in (table.get("tasks") or {None: {}}).items():
            for ratio in (section or {}).get("ratios") or [None]:
                yield path, task, ratio


def total_optimizer_steps(values: dict, train_examples: int) -> int:
    """The Trainer's max_steps on one device: epochs × ceil(ceil(examples / batch) / accumulation)."""
    batches = math.ceil(train_examples / values.get("per_device_train_batch_size", _DEFAULTS["per_device_train_batch_size"]))
    accumulation = values.get("gradient_accumulation_steps", _DEFAULTS["gradient_accumulation_steps"])
    steps_per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(values.get("num_train_epochs", _DEFAULTS["num_train_epochs"]) * steps_per_epoch)


def test_total_steps_match_the_issue_arithmetic():
    xsum = {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1}
    assert total_optimizer_steps({**xsum, "num_train_epochs": 10}, 204_045) == 63_770  # < 12,800 + 51,200
    assert total_optimizer_steps({**xsum, "num_train_epochs": 12}, 204_045) == 76_524
    mnli = {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 8, "num_train_epochs": 8}
    assert total_optimizer_steps(mnli, 392_702) == 8 * 1534


@pytest.mark.parametrize("path,task,ratio", list(_table_cells()))
def test_every_cell_fits_its_real_dataset(path, task, ratio):
    values = resolve_yaml_config(path, task, ratio, _AnyKey())
    if task is None:  # the quickstart: t_i and t_f are fractions of the run, feasible for any length
        lengths = range(1, 5000)
    else:
        lengths = [total_optimizer_steps(values, TRAIN_EXAMPLES[task])]
    for total in lengths:
        warmup = resolve_steps(values.get("pruning_warmup_steps"),
                               values.get("pruning_warmup_ratio", _DEFAULTS["pruning_warmup_ratio"]), total)
        final = resolve_steps(values.get("pruning_final_steps"),
                              values.get("pruning_final_ratio", _DEFAULTS["pruning_final_ratio"]), total)
        assert warmup + final < total, f"{path} {task} {ratio}: t_i {warmup} + t_f {final} >= T {total}"
        for variant in ("paper", "reference"):
            CubicSchedule(total, warmup, final, 0.1, values.get("pruning_interval", 10), variant=variant)


@pytest.mark.parametrize("path", PAPER_TABLES)
def test_paper_tables_use_the_reference_arithmetic(path):
    with open(path) as f:
        table = yaml.safe_load(f)
    # the quickstart is ours; LPAF has no reference code to imitate (and refuses the reference variant)
    expected = "paper" if path.startswith(("configs/quickstart/", "configs/lpaf/")) else "reference"
    assert table.get("pruning_variant", "paper") == expected
    assert LoSparseConfig().pruning_variant == "paper"  # the default everywhere else


def test_summarization_tables_follow_section_4_3():
    for path, task in (("configs/summarization/bart-large-xsum.yaml", "xsum"),
                       ("configs/summarization/bart-large-cnn.yaml", "cnn_dailymail")):
        values = resolve_yaml_config(path, task, 0.3, _AnyKey())
        assert values["num_train_epochs"] == 12
        assert (values["pruning_warmup_steps"], values["pruning_final_steps"]) == (12_800, 51_200)


LPAF_TABLES = {"configs/lpaf/bert-base-uncased-glue.yaml": "configs/glue/bert-base-uncased.yaml",
               "configs/lpaf/bert-base-uncased-squad.yaml": "configs/squad/bert-base-uncased.yaml"}


def _lpaf_cells():
    for path, losparse_table in LPAF_TABLES.items():
        with open(path) as f:
            table = yaml.safe_load(f)
        for task, section in table["tasks"].items():
            for ratio in section["ratios"]:
                yield path, losparse_table, task, ratio


@pytest.mark.parametrize("path,losparse_table,task,ratio", list(_lpaf_cells()))
def test_lpaf_presets_cover_the_losparse_cells_with_the_same_recipe(path, losparse_table, task, ratio):
    from losparse.cli.tasks.squad import SquadDataArguments

    data_type = SquadDataArguments if task == "squad" else GlueDataArguments
    types = (ModelArguments, data_type, LoSparseConfig, RunArguments, TrainingArguments)
    task_flags = ["--dataset_name", "squad"] if task == "squad" else ["--task_name", task]

    def parse(table):
        return parse_arguments(types, ["--config", table, *task_flags, "--remaining_ratio", str(ratio),
                                       "--output_dir", "x"])

    *_, lpaf, _, lpaf_training = parse(path)
    *_, ours, _, ours_training = parse(losparse_table)
    assert lpaf.method == "lpaf" and ours.method == "losparse" and lpaf.remaining_ratio == ratio
    for name in ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "max_grad_norm"):
        assert getattr(lpaf_training, name) == getattr(ours_training, name), name
