"""Abstractive summarization (XSum, CNN/DailyMail, or your own CSV/JSON): data, preprocessing, metrics.

The paper compresses BART-large on XSum and CNN/DailyMail and reports ROUGE-1/2/L. Everything
here is offline except `load_raw_datasets` for a named dataset, which downloads it from the hub:

    xsum           -> load_dataset("EdinburghNLP/xsum")                 columns document / summary
    cnn_dailymail  -> load_dataset("abisee/cnn_dailymail", "3.0.0")     columns article / highlights

ROUGE comes from `losparse.cli.metrics.rouge_scores` (rouge_score F-measures in percent, stemming on,
rougeLsum over newline-joined sentences), so fine-tuned models and the Lead-3 baseline are scored
by the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from losparse.cli.metrics import lead_n, rouge_scores
from losparse.cli.tasks.common import check_local_files, read_table
from losparse.core.errors import LoSparseUsageError
from losparse.training.preflight import check_max_length

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

logger = logging.getLogger("losparse")


@dataclass(frozen=True)
class HubDataset:
    """Where a named dataset lives on the hub and which columns hold the article and its summary."""

    path: str
    config: Optional[str]
    text_column: str
    summary_column: str


#: Named datasets: --dataset_name (or --task_name) -> hub location and default columns.
SUMMARIZATION_DATASETS: dict[str, HubDataset] = {
    "xsum": HubDataset("EdinburghNLP/xsum", None, "document", "summary"),
    "cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
}
LOCAL_TEXT_COLUMN = "text"
LOCAL_SUMMARY_COLUMN = "summary"
DATA_EXTENSIONS = ("csv", "json", "jsonl")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class SummarizationDataArguments:
    """Which articles and reference summaries to train and evaluate on, and how long they may be."""

    task_name: Optional[str] = field(
        default=None,
        metadata={"help": f"Selects the section of --config ({', '.join(SUMMARIZATION_DATASETS)}); without "
                          "--dataset_name or local files it also names the dataset."},
    )
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": f"Hub dataset: {', '.join(f'{k} ({v.path})' for k, v in SUMMARIZATION_DATASETS.items())}."},
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Local training file (.csv, .json, .jsonl), one article/summary pair a row."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Local validation file (same format); ROUGE is reported on it."}
    )
    text_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column of the articles. Default: document (xsum), article (cnn_dailymail), "
                          f"{LOCAL_TEXT_COLUMN} (local files)."},
    )
    summary_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column of the reference summaries. Default: summary (xsum), highlights "
                          f"(cnn_dailymail), {LOCAL_SUMMARY_COLUMN} (local files)."},
    )
    max_source_length: int = field(default=1024, metadata={"help": "Article tokens kept after truncation."})
    max_target_length: int = field(default=128, metadata={"help": "Summary tokens kept for training labels."})
    val_max_target_length: Optional[int] = field(
        default=None,
        metadata={"help": "Summary tokens kept for validation labels, and the generation max_length. "
                          "Default: --max_target_length."},
    )
    num_beams: Optional[int] = field(
        default=None,
        metadata={"help": "Beam size for evaluation (sets --generation_num_beams). Default: the model's "
                          "generation config. The paper uses 8."},
    )
    source_prefix: Optional[str] = field(
        default=None, metadata={"help": "Text put before every article, e.g. 'summarize: ' for T5."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the validation set."})
    lead3: bool = field(
        default=False,
        metadata={"help": "Only report the Lead-3 baseline (first three sentences of each article) on the "
                          "validation set, scored by the same ROUGE code, and exit: no model, no training."},
    )

    def __post_init__(self) -> None:
        names = ", ".join(SUMMARIZATION_DATASETS)
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
        if self.dataset_name is not None:
            self.dataset_name = self.dataset_name.lower()
            if self.dataset_name not in SUMMARIZATION_DATASETS:
                raise LoSparseUsageError(f"--dataset_name {self.dataset_name!r} is not known; choose one of: {names} "
                                         "(or pass --train_file and --validation_file)")
        local = self.train_file is not None or self.validation_file is not None
        if self.task_name is not None and self.task_name not in SUMMARIZATION_DATASETS and not local:
            raise LoSparseUsageError(f"--task_name {self.task_name!r} is not a summarization dataset ({names}); for "
                                     "your own data pass --train_file and --validation_file")
        if self.dataset_name is not None and local:
            raise LoSparseUsageError("pass either --dataset_name or --train_file/--validation_file, not both")
        if self.dataset_name is None and not local:
            if self.task_name is None:
                raise LoSparseUsageError(f"pass --dataset_name ({names}) or --train_file and --validation_file")
            self.dataset_name = self.task_name
        if local:
            self._check_files()
        for flag in ("max_source_length", "max_target_length", "val_max_target_length", "num_beams",
                     "max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise LoSparseUsageError(f"--{flag} {value} must be >= 1")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length
        spec = SUMMARIZATION_DATASETS.get(self.dataset_name) if self.dataset_name else None
        if self.text_column is None:
            self.text_column = spec.text_column if spec else LOCAL_TEXT_COLUMN
        if self.summary_column is None:
            self.summary_column = spec.summary_column if spec else LOCAL_SUMMARY_COLUMN

    def _check_files(self) -> None:
        if self.validation_file is None:
            raise LoSparseUsageError("--validation_file is required with local data (ROUGE is reported on it)")
        if self.train_file is None and not self.lead3:
            raise LoSparseUsageError("--train_file is required with local data (only --lead3 runs without it)")
        check_local_files(self, DATA_EXTENSIONS)

    @property
    def uses_local_files(self) -> bool:
        return self.dataset_name is None


def _read_local(data_args: SummarizationDataArguments) -> "DatasetDict":
    """The local files' article and summary columns; a bad file, a missing column or an empty cell is a
    usage error naming the file and the line."""
    from datasets import Dataset, DatasetDict

    raw = DatasetDict()
    for split, flag in (("train", "train_file"), ("validation", "validation_file")):
        path = getattr(data_args, flag)
        if path is None:
            continue
        table = read_table(path, flag)
        for column_flag, what in (("text_column", "article"), ("summary_column", "summary")):
            column = getattr(data_args, column_flag)
            if column not in table.columns:
                raise LoSparseUsageError(f"--{column_flag} {column!r} is not a column of {table.name} "
                                         f"(columns: {table.column_list()})")
        raw[split] = Dataset.from_dict({data_args.text_column: table.texts(data_args.text_column, "article"),
                                        data_args.summary_column: table.texts(data_args.summary_column, "summary")})
    return raw


def load_raw_datasets(data_args: SummarizationDataArguments, cache_dir: Optional[str] = None) -> "DatasetDict":
    """A DatasetDict with "validation" (and "train" unless a local --lead3 run has no training file).

    Both splits are already cut to --max_train_samples / --max_eval_samples, so the Lead-3
    baseline, the ROUGE of the model and generated_predictions.txt all see the same articles.
    Raises `LoSparseUsageError` if --text_column or --summary_column is missing from a split, and
    for a local file that cannot be read or has an empty article or summary.
    """
    from datasets import DatasetDict, load_dataset

    if data_args.uses_local_files:
        raw = _read_local(data_args)
    else:
        spec = SUMMARIZATION_DATASETS[data_args.dataset_name]
        hub = load_dataset(spec.path, spec.config, cache_dir=cache_dir)
        raw = DatasetDict(train=hub["train"], validation=hub["validation"])
        for split, dataset in raw.items():
            for flag in ("text_column", "summary_column"):
                column = getattr(data_args, flag)
                if column not in dataset.column_names:
                    raise LoSparseUsageError(f"--{flag} {column!r} is not a column of {spec.path} ({split} split) "
                                             f"(columns: {', '.join(dataset.column_names)})")
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    for split, limit in limits.items():
        if split in raw and limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def check_lengths(data_args: SummarizationDataArguments, model_config: Any, model_name_or_path: str) -> None:
    """Source and target token limits must fit the model's positions (read from its `AutoConfig`)."""
    for flag in ("max_source_length", "max_target_length", "val_max_target_length"):
        check_max_length(flag, getattr(data_args, flag), model_config, model_name_or_path)


def load_data(data_args: SummarizationDataArguments, model_args: Any, model_config: Any) -> "DatasetDict":
    """`load_raw_datasets`, then `check_lengths`: everything about the data that needs no weights."""
    raw = load_raw_datasets(data_args, cache_dir=model_args.cache_dir)
    check_lengths(data_args, model_config, model_args.model_name_or_path)
    logger.info("Data: articles from column %r, summaries from %r; %s", data_args.text_column,
                data_args.summary_column, ", ".join(f"{len(d)} {split}" for split, d in raw.items()))
    return raw


def preprocess(raw: "DatasetDict", tokenizer: Any, data_args: SummarizationDataArguments) -> "DatasetDict":
    """Tokenize every split: `input_ids`/`attention_mask` from the (prefixed) articles, `labels` from the summaries.

    Sources are cut at --max_source_length tokens, training labels at --max_target_length and
    validation labels at --val_max_target_length. Nothing is padded here: `DataCollatorForSeq2Seq`
    pads each batch (labels with -100, so padding never counts in the loss).
    """
    prefix = data_args.source_prefix or ""
    text_column, summary_column = data_args.text_column, data_args.summary_column

    def encoder(max_target_length: int) -> Callable[[dict], dict]:
        def encode(batch: dict) -> dict:
            sources = [prefix + (text or "") for text in batch[text_column]]
            targets = [summary or "" for summary in batch[summary_column]]
            encoded = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
            labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)
            encoded["labels"] = labels["input_ids"]
            return encoded

        return encode

    lengths = {"train": data_args.max_target_length, "validation": data_args.val_max_target_length}
    tokenized = type(raw)()
    for split, dataset in raw.items():
        tokenized[split] = dataset.map(encoder(lengths.get(split, data_args.val_max_target_length)), batched=True,
                                       remove_columns=dataset.column_names, desc=f"Tokenizing {split}")
    return tokenized


def decode_ids(tokenizer: Any, ids: Any) -> list[str]:
    """Token ids (batch, length) -> stripped texts, special tokens dropped.

    -100 (the Trainer's padding of labels and of generated sequences of different lengths) is
    mapped to the pad token first, since it is no token id.
    """
    ids = np.asarray(ids)
    ids = np.where(ids == -100, tokenizer.pad_token_id, ids)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def make_compute_metrics(tokenizer: Any) -> Callable[[Any], dict[str, float]]:
    """`compute_metrics` for a `Seq2SeqTrainer` with `predict_with_generate`.

    Takes generated ids (n, gen_len) and labels (n, label_len), both possibly -100-padded, and
    returns ROUGE-1/2/L/Lsum F-measures in percent plus `gen_len`: the mean number of
    non-padding generated tokens (special tokens included), as in HF's summarization example.
    """

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        generated = eval_prediction.predictions
        generated = np.asarray(generated[0] if isinstance(generated, tuple) else generated)
        predictions = decode_ids(tokenizer, generated)
        references = decode_ids(tokenizer, eval_prediction.label_ids)
        metrics = rouge_scores(predictions, references)
        non_pad = (generated != tokenizer.pad_token_id) & (generated != -100)
        metrics["gen_len"] = float(np.mean(non_pad.sum(axis=-1)))
        return metrics

    return compute_metrics


def lead3_scores(dataset: "Dataset", text_column: str, summary_column: str) -> dict[str, float]:
    """ROUGE (percent) of the Lead-3 baseline: each article's first three sentences as its summary.

    Sentences come from `losparse.cli.metrics.split_sentences` (via `lead_n`), and scoring is the
    `rouge_scores` used for model outputs, so the numbers are directly comparable.
    """
    predictions = [lead_n(text or "", 3) for text in dataset[text_column]]
    references = [summary or "" for summary in dataset[summary_column]]
    return rouge_scores(predictions, references)


def write_predictions(path: str, predictions: Sequence[str]) -> None:
    """One summary per line; line breaks inside a summary (CNN/DM highlights) become spaces."""
    with open(path, "w", encoding="utf-8") as f:
        for prediction in predictions:
            f.write(" ".join(prediction.splitlines()) + "\n")
