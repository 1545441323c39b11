"""GLUE and GLUE-like sentence (pair) classification/regression: data, preprocessing, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import LoSparseUsageError
from .common import check_local_files, file_extension
from ..metrics import glue_metrics

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
        metadata={"help": "One or two text columns of local files. Default: sentence1/sentence2, sentence, or the "
                          "first one or two non-label columns."},
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
        check_local_files(self, DATA_EXTENSIONS)
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise LoSparseUsageError(f"--text_columns {self.text_columns} must name one or two columns")
        if self.max_seq_length < 8:
            raise LoSparseUsageError(f"--max_seq_length {self.max_seq_length} is too small; use at least 8")

    @property
    def uses_local_files(self) -> bool:
        return self.train_file is not None

    @property
    def metric_task(self) -> Optional[str]:
        """The GLUE task whose metric applies (None for a user's own data)."""
        return None if self.uses_local_files else self.task_name


def load_raw_datasets(data_args: GlueDataArguments, cache_dir: Optional[str] = None):
    """A DatasetDict with "train", "validation" (and "validation_mismatched" for MNLI)."""
    from datasets import DatasetDict, load_dataset

    if not data_args.uses_local_files:
        raw = load_dataset("nyu-mll/glue", data_args.task_name, cache_dir=cache_dir)
        if data_args.task_name == "mnli":
            raw = DatasetDict(train=raw["train"], validation=raw["validation_matched"],
                              validation_mismatched=raw["validation_mismatched"])
        return raw
    extension = file_extension(data_args.train_file)
    builder = "json" if extension in ("json", "jsonl") else "csv"
    raw = load_dataset(builder, data_files={"train": data_args.train_file, "validation": data_args.validation_file},
                       cache_dir=cache_dir)
    columns = raw["train"].column_names
    if data_args.label_column not in columns:
        raise LoSparseUsageError(
            f"--label_column {data_args.label_column!r} is not a column of {data_args.train_file} "
            f"(columns: {', '.join(columns)})"
        )
    if data_args.label_column != "label":
        raw = raw.rename_column(data_args.label_column, "label")
    return raw


def text_keys(raw, data_args: GlueDataArguments) -> tuple[str, Optional[str]]:
    if not data_args.uses_local_files:
        return GLUE_TASK_TO_KEYS[data_args.task_name]
    columns = [c for c in raw["train"].column_names if c != "label"]
    if data_args.text_columns:
        for column in data_args.text_columns:
            if column not in columns:
                raise LoSparseUsageError(
                    f"--text_columns {column!r} is not a column of {data_args.train_file} (columns: {', '.join(columns)})"
                )
        keys = list(data_args.text_columns)
    elif "sentence1" in columns and "sentence2" in columns:
        keys = ["sentence1", "sentence2"]
    elif "sentence" in columns:
        keys = ["sentence"]
    else:
        keys = columns[:2]
    return keys[0], (keys[1] if len(keys) > 1 else None)


def label_info(raw, data_args: GlueDataArguments) -> tuple[bool, Optional[list[Any]]]:
    """(is_regression, label_list) — label_list is None for regression."""
    if not data_args.uses_local_files:
        if data_args.task_name == "stsb":
            return True, None
        return False, list(raw["train"].features["label"].names)
    dtype = raw["train"].features["label"].dtype
    if dtype in ("float32", "float64"):
        return True, None
    return False, sorted(set(raw["train"]["label"]) | set(raw["validation"]["label"]))


def preprocess(raw, tokenizer, data_args: GlueDataArguments, label_list: Optional[list[Any]]):
    """Tokenize, map labels to ids and truncate the splits as asked."""
    first, second = text_keys(raw, data_args)
    label_to_id = {v: i for i, v in enumerate(label_list)} if (label_list and data_args.uses_local_files) else None

    def encode(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        if label_to_id is not None:
            encoded["label"] = [label_to_id[v] for v in batch["label"]]
        return encoded

    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    for split in list(raw.keys()):
        if split.startswith("validation") and data_args.max_eval_samples is not None:
            raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
    keep = {"label"}
    return raw.map(encode, batched=True, remove_columns=[c for c in raw["train"].column_names if c not in keep],
                   desc="Tokenizing")


def make_compute_metrics(task_name: Optional[str], is_regression: bool) -> Callable[[Any], dict[str, float]]:
    """`compute_metrics` for the Trainer: logits -> class ids (or scores) -> GLUE metric."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)
        return glue_metrics(task_name, predictions, eval_prediction.label_ids, is_regression=is_regression)

    return compute_metrics
