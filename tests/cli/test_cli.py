import textwrap

import pytest
from transformers import TrainingArguments

from losparse import LoSparseConfig, LoSparseUsageError
from losparse.cli.run import ModelArguments, RunArguments, parse_arguments
from losparse.cli.tasks.glue import GlueDataArguments
from losparse.cli.yaml_config import coerce_number

TYPES = (ModelArguments, GlueDataArguments, LoSparseConfig, RunArguments, TrainingArguments)


def _write(tmp_path, text):
    path = tmp_path / "table.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


TABLE = """
    model_name_or_path: some/model
    max_grad_norm: 0.0
    tasks:
      rte:
        learning_rate: 1e-4          # PyYAML reads this as the string '1e-4'
        num_train_epochs: 20
        pruning_warmup_steps: 25
        ratios:
          0.2: {beta1: 0.75, low_rank_ratio: 0.02}
          0.1: {beta1: 0.85, low_rank_ratio: 0.02}
"""


def test_yaml_fills_the_dataclasses_and_cli_wins(tmp_path):
    table = _write(tmp_path, TABLE)
    model, data, config, run, training = parse_arguments(
        TYPES, ["--config", table, "--task_name", "rte", "--remaining_ratio", "0.2", "--output_dir", "x",
                "--num_train_epochs", "3"])
    assert model.model_name_or_path == "some/model"
    assert training.learning_rate == 1e-4 and isinstance(training.learning_rate, float)
    assert training.max_grad_norm == 0.0
    assert training.num_train_epochs == 3  # CLI wins over the table's 20
    assert (config.remaining_ratio, config.low_rank_ratio, config.beta1) == (0.2, 0.02, 0.75)
    assert config.pruning_warmup_steps == 25
    assert run.config == table


def test_ratio_section_follows_the_ratio(tmp_path):
    table = _write(tmp_path, TABLE)
    *_, config, _, _ = parse_arguments(TYPES, ["--config", table, "--task_name", "rte", "--remaining_ratio", "0.1",
                                               "--output_dir", "x"])
    assert config.beta1 == 0.85


@pytest.mark.parametrize("value,expected", [("1e-4", 1e-4), ("3", 3), ("-2.5E+3", -2500.0), ("abc", "abc"),
                                            ("1e", "1e"), (0.5, 0.5)])
def test_coerce_number(value, expected):
    assert coerce_number(value) == expected


@pytest.mark.parametrize(
    "table, argv, fragment",
    [
        (TABLE, ["--task_name", "mnli", "--remaining_ratio", "0.2"], "--task_name 'mnli' is not in --config"),
        (TABLE, ["--task_name", "rte", "--remaining_ratio", "0.3"], "--remaining_ratio 0.3 has no entry"),
        ("learning_rat: 0.1\n", [], "unknown key 'learning_rat'"),
        ("tasks: {rte: {bogus: 1}}\n", ["--task_name", "rte"], "unknown key 'bogus'.*tasks.rte"),
        ("[1, 2\n", [], "is not valid YAML"),
    ],
)
def test_bad_tables_are_reported(tmp_path, table, argv, fragment):
    path = _write(tmp_path, table)
    with pytest.raises(LoSparseUsageError, match=fragment):
        parse_arguments(TYPES, ["--config", path, "--model_name_or_path", "m", "--output_dir", "x",
                                "--train_file", __file__.replace(".py", ".csv")] + argv)


def test_missing_config_file(tmp_path):
    with pytest.raises(LoSparseUsageError, match="does not exist"):
        parse_arguments(TYPES, ["--config", str(tmp_path / "nope.yaml"), "--model_name_or_path", "m"])
