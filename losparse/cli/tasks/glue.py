"""GLUE and GLUE-like sentence (pair) classification/regression: data, preprocessing, metrics.

Local files are read and validated by `losparse.cli.tasks.common` and decided on here, all before the
model's weights are loaded (see `load_data`):

- text columns: `--text_columns`, else a known pair (`sentence1`/`sentence2`, `premise`/`hypothesis`,
  `question1`/`question2`, `question`/`sentence`, ...), else a known single name (`sentence`, `text`,
  `review`, `content`, ...), else the one column left that holds text and is not id-like; anything
  more ambiguous is refused rather than guessed;
- labels: float labels mean regression; otherwise the sorted label values (numbers or names) get
  ids 0..n-1 and keep their names in the config's `id2label`, unless the checkpoint's classification
  head already names the same labels (then its ids are kept, as transformers' run_glue.py does).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from losparse.cli.metrics import glue_metrics
from losparse.cli.run import ModelArguments
from losparse.cli.tasks.common import (
    Table,
    check_local_files,
    check_positive,
    describe,
    is_blank,
    json_type,
    number_kind,
    read_table,
)
from losparse.core.errors import LoSparseUsageError
from losparse.training.preflight import check_max_length, is_compact_checkpoint

logger = logging.getLogger("losparse")

#: Text columns of each GLUE task in the hub's "glue" dataset.
GLUE_TASK_TO_KEYS: dict[str, tuple[str, Optional[str]]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
DATA_EXTENSIONS = ("csv", "json", "jsonl")
#: Column pairs (then single columns) recognised as the text of a local file, in order of preference.
KNOWN_TEXT_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                    ("question", "sentence"), ("question", "passage"), ("text_a", "text_b"), ("text", "text_pair"))
KNOWN_TEXT_COLUMNS = ("sentence", "text", "review", "content", "document", "comment", "tweet", "utterance",
                      "question")
ID_LIKE_COLUMN = re.compile(r"(^|_)(id|idx|index|key|uid|guid|uuid)$|[a-z]Id$", re.IGNORECASE)
LABELS_SHOWN = 12


@dataclass
class GlueModelArguments(ModelArguments):
    """`ModelArguments` plus what only classification needs."""

    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a checkpoint's classification head whose number of labels differs from "
                          "the data's (passed to from_pretrained)."},
    )


@dataclass
class GlueDataArguments:
    """Which data to train and evaluate on: a GLUE task by name, or local CSV/JSON files."""

    task_name: Optional[str] = field(
        default=None,
        metadata={"help": f"GLUE task ({', '.join(GLUE_TASK_TO_KEYS)}); also selects the section of --config."},
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Local training file (.csv, .json, .jsonl)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local validation file (same format)."})
    text_columns: Optional[list[str]] = field(
        default=None,
        metadata={"help": "One or two text columns of local files. Default: a known pair (sentence1/sentence2, "
                          "premise/hypothesis, question1/question2, question/sentence, ...), else a known name "
                          "(sentence, text, review, content, ...), else the only text column that is not id-like."},
    )
    label_column: str = field(default="label", metadata={"help": "Label column of local files."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate each evaluation set."})

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
        if self.task_name is not None and self.task_name not in GLUE_TASK_TO_KEYS and self.train_file is None:
            raise LoSparseUsageError(
                f"--task_name {self.task_name!r} is not a GLUE task ({', '.join(GLUE_TASK_TO_KEYS)}); for your own "
                "data pass --train_file and --validation_file"
            )
        if self.task_name is None and (self.train_file is None or self.validation_file is None):
            raise LoSparseUsageError("pass --task_name (a GLUE task) or both --train_file and --validation_file")
        if self.train_file is not None and self.validation_file is None:
            raise LoSparseUsageError("--validation_file is required with --train_file")
        check_local_files(self, DATA_EXTENSIONS)
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise LoSparseUsageError(f"--text_columns {self.text_columns} must name one or two columns")
        if self.max_seq_length < 8:
            raise LoSparseUsageError(f"--max_seq_length {self.max_seq_length} is too small; use at least 8")
        check_positive(self, ("max_train_samples", "max_eval_samples"))

    @property
    def uses_local_files(self) -> bool:
        return self.train_file is not None

    @property
    def metric_task(self) -> Optional[str]:
        """The GLUE task whose metric applies (None for a user's own data)."""
        return None if self.uses_local_files else self.task_name


@dataclass
class GlueData:
    """The validated splits of a run and what was decided about them (logged by `load_data`)."""

    raw: Any  # DatasetDict: train, validation (+ validation_mismatched for MNLI), text columns and "label"
    text_keys: tuple[str, Optional[str]]
    is_regression: bool
    label_list: Optional[list[str]]  # label names in id order; None for regression

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_list)

    def model_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that make the head fit these labels."""
        return {"num_labels": self.num_labels,
                "problem_type": "regression" if self.is_regression else "single_label_classification"}


# ---------------------------------------------------------------------------------------------
# Columns and labels of local files
# ---------------------------------------------------------------------------------------------

def is_text_column(table: Table, column: str) -> bool:
    """Every filled cell is a string and at least one does not read as a number ("12" is no text)."""
    values = [row.get(column) for row in table.rows if not is_blank(row.get(column))]
    return (bool(values) and all(isinstance(v, str) for v in values)
            and any(number_kind(v, from_csv=True) == "text" for v in values))


def choose_text_columns(table: Table, label_column: str, requested: Optional[list[str]]) -> tuple[str, ...]:
    """The text column(s) of the training file: requested, known by name, or the one obvious candidate."""
    if requested:
        for column in requested:
            if column not in table.columns:
                raise LoSparseUsageError(f"--text_columns {column!r} is not a column of {table.name} (columns: "
                                         f"{table.column_list()})")
        return tuple(requested)
    by_name = {c.lower(): c for c in table.columns if c != label_column and is_text_column(table, c)}
    for first, second in KNOWN_TEXT_PAIRS:
        if first in by_name and second in by_name:
            return by_name[first], by_name[second]
    for name in KNOWN_TEXT_COLUMNS:
        if name in by_name:
            return (by_name[name],)
    candidates = [c for c in by_name.values() if not ID_LIKE_COLUMN.search(c)]
    if len(candidates) == 1:
        return (candidates[0],)
    found = f"the columns that hold text are {', '.join(candidates)}" if candidates else "no column holds text"
    raise LoSparseUsageError(
        f"cannot tell the text column(s) of {table.name}: none is named like sentence1/sentence2, sentence, text, "
        f"review, ... and {found} (columns: {table.column_list()}); pass --text_columns COLUMN [COLUMN]"
    )


def _label_value(table: Table, index: int, column: str) -> tuple[str, Any]:
    """('number' | 'text', the label of row `index` as a number or a stripped name)."""
    value = table.rows[index].get(column)
    if is_blank(value):
        raise LoSparseUsageError(f"{table.where(index)} has an empty label (column {column!r})")
    if isinstance(value, bool):
        return "text", str(value).lower()
    if not isinstance(value, (str, int, float)):
        raise LoSparseUsageError(f"{table.where(index)}: the label {describe(value)} is a JSON {json_type(value)}; "
                                 "labels are numbers or class names")
    kind = table.kind(value)
    if kind == "int":
        return "number", int(value)
    if kind == "float":
        return "number", float(value)
    return "text", value.strip()


def read_labels(tables: list[Table], column: str) -> list[list[Any]]:
    """The label of every row of every table; numbers mixed with names are a usage error naming both rows."""
    labels, first_of_kind = [], {}
    for table in tables:
        values = []
        for index in range(len(table.rows)):
            kind, value = _label_value(table, index, column)
            first_of_kind.setdefault(kind, (table.where(index), value))
            values.append(value)
        labels.append(values)
    if len(first_of_kind) > 1:
        (number_at, number), (text_at, text) = first_of_kind["number"], first_of_kind["text"]
        raise LoSparseUsageError(f"the label column {column!r} mixes numbers and text: {number_at} has {number!r} but "
                                 f"{text_at} has {text!r}; use class names or numbers, not both")
    return labels


def _label_names(values: list[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:LABELS_SHOWN])
    return shown + (f", ... ({len(values)} in all)" if len(values) > LABELS_SHOWN else "")


def checkpoint_head(model_config: Any) -> bool:
    """Whether the checkpoint holds a trained sequence-classification head (its architectures say so)."""
    return any(a.endswith("ForSequenceClassification") for a in getattr(model_config, "architectures", None) or ())


def order_labels(labels: list[Any], model_config: Any) -> list[Any]:
    """Sorted labels, or the checkpoint head's own order when that head names exactly these labels."""
    ordered = sorted(set(labels))
    names = {str(v).lower(): v for v in ordered}
    head = {str(k).lower(): i for k, i in (getattr(model_config, "label2id", None) or {}).items()}
    default = {f"label_{i}" for i in range(len(head))}
    if checkpoint_head(model_config) and set(head) == set(names) and set(head) != default:
        return [names[name] for name in sorted(head, key=head.get)]
    return ordered


def check_head(num_labels: int, label_list: Optional[list[str]], model_config: Any, model_name_or_path: str,
               ignore_mismatched_sizes: bool) -> None:
    """A trained head with another number of outputs cannot be loaded as it is: say so before loading it."""
    head = getattr(model_config, "num_labels", None)
    if not checkpoint_head(model_config) or head == num_labels:
        return
    if ignore_mismatched_sizes and not is_compact_checkpoint(model_name_or_path):
        logger.warning("The classification head of %s has %d outputs and the data %d: --ignore_mismatched_sizes "
                       "re-initialises it", model_name_or_path, head, num_labels)
        return
    data = ("is regression (float labels, 1 output)" if label_list is None
            else f"has {num_labels} labels ({_label_names(label_list)})")
    fix = ("a LoSparse checkpoint keeps its head: train it on data with its labels"
           if is_compact_checkpoint(model_name_or_path)
           else f"pass --ignore_mismatched_sizes to re-initialise the head with {num_labels} outputs")
    raise LoSparseUsageError(f"the data {data} but the classification head of --model_name_or_path "
                             f"{model_name_or_path!r} has {head} outputs (num_labels in its config); {fix}")


def _read_local_tables(data_args: GlueDataArguments) -> tuple[Table, Table]:
    train = read_table(data_args.train_file, "train_file")
    validation = read_table(data_args.validation_file, "validation_file")
    if train.format != validation.format:
        names = {"csv": "CSV", "json": "JSON"}
        raise LoSparseUsageError(f"{train.name} is {names[train.format]} but {validation.name} is "
                                 f"{names[validation.format]}; use one format for both")
    for table in (train, validation):
        table.require_column(data_args.label_column, "label")
    return train, validation


def _label_ids(labels: list[list[Any]], train: Table, validation: Table, label_column: str,
               model_config: Any) -> tuple[list[list[int]], list[str]]:
    """Class ids of both splits and the label names in id order (sorted, or the checkpoint head's order)."""
    ordered = order_labels(labels[0] + labels[1], model_config)
    if len(ordered) < 2:
        raise LoSparseUsageError(f"{train.name} has a single label, {ordered[0]!r} (column {label_column!r}); "
                                 "classification needs two or more")
    unseen = sorted(set(labels[1]) - set(labels[0]), key=str)
    if unseen:
        logger.warning("Labels of %s never seen in training: %s", validation.name, _label_names(unseen))
    ids = {value: i for i, value in enumerate(ordered)}
    return [[ids[v] for v in split] for split in labels], [str(v) for v in ordered]


def _local_splits(data_args: GlueDataArguments, model_config: Any, model_name_or_path: str,
                  ignore_mismatched_sizes: bool) -> tuple[dict[str, dict[str, list]], tuple[str, ...], bool,
                                                          Optional[list[str]]]:
    train, validation = _read_local_tables(data_args)
    keys = choose_text_columns(train, data_args.label_column, data_args.text_columns)
    for column in keys:
        validation.require_column(column, "text")
    texts = [{column: table.texts(column) for column in keys} for table in (train, validation)]
    labels = read_labels([train, validation], data_args.label_column)
    is_regression = any(isinstance(v, float) for split in labels for v in split)
    if is_regression:
        targets, label_list = [[float(v) for v in split] for split in labels], None
    else:
        targets, label_list = _label_ids(labels, train, validation, data_args.label_column, model_config)
    check_head(1 if is_regression else len(label_list), label_list, model_config, model_name_or_path,
               ignore_mismatched_sizes)
    columns = [{**t, "label": split} for t, split in zip(texts, targets)]
    return {"train": columns[0], "validation": columns[1]}, keys, is_regression, label_list


def _cut(columns: dict[str, list], limit: Optional[int]) -> dict[str, list]:
    return columns if limit is None else {k: v[:limit] for k, v in columns.items()}


def _load_local(data_args: GlueDataArguments, model_config: Any, model_args: Any) -> GlueData:
    from datasets import Dataset, DatasetDict

    splits, keys, is_regression, label_list = _local_splits(
        data_args, model_config, model_args.model_name_or_path, getattr(model_args, "ignore_mismatched_sizes", False))
    raw = DatasetDict(
        train=Dataset.from_dict(_cut(splits["train"], data_args.max_train_samples)),
        validation=Dataset.from_dict(_cut(splits["validation"], data_args.max_eval_samples)),
    )
    return GlueData(raw, (keys[0], keys[1] if len(keys) > 1 else None), is_regression, label_list)


def _load_hub(data_args: GlueDataArguments, model_config: Any, model_args: Any) -> GlueData:
    from datasets import DatasetDict, load_dataset

    raw = load_dataset("nyu-mll/glue", data_args.task_name, cache_dir=model_args.cache_dir)
    if data_args.task_name == "mnli":
        raw = DatasetDict(train=raw["train"], validation=raw["validation_matched"],
                          validation_mismatched=raw["validation_mismatched"])
    is_regression = data_args.task_name == "stsb"
    label_list = None if is_regression else list(raw["train"].features["label"].names)
    check_head(1 if is_regression else len(label_list), label_list, model_config, model_args.model_name_or_path,
               getattr(model_args, "ignore_mismatched_sizes", False))
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    for split in list(raw.keys()):
        if split.startswith("validation") and data_args.max_eval_samples is not None:
            raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
    return GlueData(raw, GLUE_TASK_TO_KEYS[data_args.task_name], is_regression, label_list)


def load_data(data_args: GlueDataArguments, model_args: Any, model_config: Any) -> GlueData:
    """Read, validate and decide on the data (columns, labels, head, lengths): no weights are needed.

    `model_config` is the checkpoint's `AutoConfig`: it gives the position limit that
    --max_seq_length must respect and the classification head the labels must fit.
    """
    loader = _load_local if data_args.uses_local_files else _load_hub
    data = loader(data_args, model_config, model_args)
    check_max_length("max_seq_length", data_args.max_seq_length, model_config, model_args.model_name_or_path)
    first, second = data.text_keys
    labels = ("regression (float labels)" if data.is_regression
              else ", ".join(f"{name} -> {i}" for i, name in enumerate(data.label_list[:LABELS_SHOWN]))
              + (", ..." if len(data.label_list) > LABELS_SHOWN else ""))
    logger.info("Data: text column(s) %s; labels: %s; %d training and %d validation examples",
                first if second is None else f"{first}, {second}", labels, len(data.raw["train"]),
                len(data.raw["validation"]))
    return data


# ---------------------------------------------------------------------------------------------
# Tokens and metrics
# ---------------------------------------------------------------------------------------------

def preprocess(data: GlueData, tokenizer: Any, data_args: GlueDataArguments):
    """Tokenize every split (labels are already ids, or floats for regression)."""
    first, second = data.text_keys

    def encode(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        encoded["label"] = batch["label"]
        return encoded

    return data.raw.map(encode, batched=True, remove_columns=data.raw["train"].column_names, desc="Tokenizing")


def record_labels(model_config: Any, data: GlueData) -> None:
    """Keep the label names in the saved config (`id2label`), e.g. {0: 'ham', 1: 'spam'}."""
    if data.label_list is not None:
        model_config.label2id = {name: i for i, name in enumerate(data.label_list)}
        model_config.id2label = dict(enumerate(data.label_list))


def make_compute_metrics(task_name: Optional[str], is_regression: bool,
                         num_labels: Optional[int] = None) -> Callable[[Any], dict[str, float]]:
    """`compute_metrics` for the Trainer: logits -> class ids (or scores) -> GLUE metric.

    A user's own binary task (`task_name` None, `num_labels` 2) reports F1 of label id 1 besides accuracy.
    """

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)
        return glue_metrics(task_name, predictions, eval_prediction.label_ids, is_regression=is_regression,
                            num_labels=num_labels)

    return compute_metrics
