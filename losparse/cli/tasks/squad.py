"""Extractive question answering (SQuAD v1.1): data loading, windowed features, answer post-processing.

A context longer than the model's window is cut into overlapping windows ("features"), each holding
the question and a slice of the context; `doc_stride` tokens overlap between consecutive windows.
Training labels each window with the answer's token span (or the CLS token when the answer is not
fully inside it). At evaluation the model scores start/end tokens in every window, and
`postprocess_predictions` picks the best valid span over all windows of a question and maps it back
to the context's characters, which `losparse.cli.metrics.squad_metrics` compares with the references.

`QuestionAnsweringTrainer` turns that into a `Trainer.evaluate` returning `eval_exact_match` and
`eval_f1`; `losparse.compose_trainer(QuestionAnsweringTrainer, prune=..., distill=...)` adds pruning and
distillation to it like to any other Trainer subclass.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from transformers import Trainer
from transformers.trainer_utils import speed_metrics

from losparse.cli.metrics import squad_metrics
from losparse.cli.tasks.common import check_local_files, describe, is_blank, load_json
from losparse.core.errors import LoSparseUsageError
from losparse.training.preflight import check_max_length

logger = logging.getLogger("losparse")
SQUAD_TASKS = ("squad",)
DATA_EXTENSIONS = ("json", "jsonl")
EVAL_ONLY_COLUMNS = ("example_id", "offset_mapping")
EXPECTED_LAYOUT = (
    'expected the official layout {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", '
    '"answers": [{"text", "answer_start"}]}]}]}]} or one record per question with id, context, question and '
    'answers {"text": [...], "answer_start": [...]} (JSON list or JSON lines)'
)


@dataclass
class SquadDataArguments:
    """Which question-answering data to use and how to cut it into model windows."""

    task_name: str = field(
        default="squad",
        metadata={"help": f"Task ({', '.join(SQUAD_TASKS)}); selects the section of --config."},
    )
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Hub dataset with SQuAD columns, e.g. 'squad' (needs internet). Or use the file flags."},
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "Local training file (.json/.jsonl): official SQuAD JSON or one record per question."},
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Local validation file (same formats as --train_file)."}
    )
    max_seq_length: int = field(
        default=384, metadata={"help": "Tokens per window (question + context slice + special tokens)."}
    )
    doc_stride: int = field(
        default=128, metadata={"help": "Context tokens shared by two consecutive windows of a long context."}
    )
    max_answer_length: int = field(
        default=30, metadata={"help": "Longest answer, in tokens, that post-processing may predict."}
    )
    n_best_size: int = field(
        default=20, metadata={"help": "Start and end candidates per window searched by post-processing."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training questions."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N validation questions."}
    )

    def __post_init__(self) -> None:
        self.task_name = self.task_name.lower()
        if self.task_name not in SQUAD_TASKS:
            raise LoSparseUsageError(f"--task_name {self.task_name!r} is not known; choose one of: "
                                     f"{', '.join(SQUAD_TASKS)}")
        files = (self.train_file, self.validation_file)
        if self.dataset_name is not None and any(files):
            raise LoSparseUsageError("pass either --dataset_name or --train_file/--validation_file, not both")
        if self.dataset_name is None and not all(files):
            raise LoSparseUsageError("pass --dataset_name (e.g. squad) or both --train_file and --validation_file")
        check_local_files(self, DATA_EXTENSIONS)
        for flag in ("max_seq_length", "max_answer_length", "n_best_size", "max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise LoSparseUsageError(f"--{flag} {value} must be a positive integer")
        if not 0 <= self.doc_stride < self.max_seq_length:
            raise LoSparseUsageError(
                f"--doc_stride {self.doc_stride} must be in [0, --max_seq_length {self.max_seq_length})"
            )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _not_squad(flag: str, path: str, detail: str) -> LoSparseUsageError:
    return LoSparseUsageError(f"--{flag} {path!r} is not SQuAD-shaped: {EXPECTED_LAYOUT} ({detail})")


def _check_row(row: Any, where: str) -> dict[str, Any]:
    """One flattened question, type-checked; raises ValueError(detail) when it is not SQuAD-shaped."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} is not an object")
    missing = [key for key in ("id", "context", "question", "answers") if key not in row]
    if missing:
        raise ValueError(f"{where} has no {', '.join(repr(k) for k in missing)}")
    if not isinstance(row["context"], str) or not isinstance(row["question"], str):
        raise ValueError(f"{where}: context and question must be strings")
    answers = row["answers"]
    if not (isinstance(answers, Mapping) and isinstance(answers.get("text"), list)
            and isinstance(answers.get("answer_start"), list)
            and len(answers["text"]) == len(answers["answer_start"])):
        raise ValueError(f"{where}: answers must be {{'text': [...], 'answer_start': [...]}} of equal lengths")
    if not answers["text"]:
        raise ValueError(f"{where} (id {row['id']!r}) has no answer; unanswerable SQuAD v2 questions are not "
                         "supported")
    if not all(isinstance(t, str) for t in answers["text"]) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in answers["answer_start"]):
        raise ValueError(f"{where}: answer texts must be strings and answer_start integers")
    flat = {"id": str(row["id"]), "context": row["context"], "question": row["question"],
            "answers": {"text": list(answers["text"]), "answer_start": list(answers["answer_start"])}}
    if "title" in row:
        flat["title"] = str(row["title"])
    return flat


def _inside(base: str, path: str) -> str:
    """`data[0].paragraphs[1]` inside a JSON path, `line 3: paragraphs[1]` inside a line or record."""
    return f"{base}.{path}" if base.startswith("data[") else f"{base}: {path}"


def _flatten_official(articles: list[Any], wheres: list[str]) -> list[tuple[dict[str, Any], str]]:
    rows = []
    for article, article_at in zip(articles, wheres):
        if not isinstance(article, Mapping) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"{article_at} has no 'paragraphs' list")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = _inside(article_at, f"paragraphs[{p}]")
            if not isinstance(paragraph, Mapping) or not isinstance(paragraph.get("qas"), list):
                raise ValueError(f"{where} has no 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                if not isinstance(qa, Mapping) or not isinstance(qa.get("answers"), list):
                    raise ValueError(f"{where}.qas[{q}] has no 'answers' list")
                if not all(isinstance(ans, Mapping) and "text" in ans and "answer_start" in ans
                           for ans in qa["answers"]):
                    raise ValueError(f"{where}.qas[{q}].answers must be objects with 'text' and 'answer_start'")
                row = {"id": qa.get("id"), "title": article.get("title", ""), "context": paragraph.get("context"),
                       "question": qa.get("question"),
                       "answers": {"text": [ans["text"] for ans in qa["answers"]],
                                   "answer_start": [ans["answer_start"] for ans in qa["answers"]]}}
                row_at = f"{where}.qas[{q}]"
                rows.append((_check_row({k: v for k, v in row.items() if v is not None}, row_at), row_at))
    return rows


def _items(path: str, flag: str) -> tuple[list[Any], list[str]]:
    """The articles or records of a file, each with where it is (`data[3]`, `record 4`, `line 5`)."""
    document, locations = load_json(path, flag)
    if locations is not None:
        return document, locations
    if isinstance(document, Mapping):
        items = document.get("data")
        return items, [f"data[{i}]" for i in range(len(items))] if isinstance(items, list) else []
    if isinstance(document, list):
        return document, [f"record {i + 1}" for i in range(len(document))]
    return document, []


def _misaligned(row: dict[str, Any], first_only: bool) -> list[tuple[str, int, str]]:
    """(answer, answer_start, what the context holds there) for answers that answer_start does not point at."""
    pairs = list(zip(row["answers"]["text"], row["answers"]["answer_start"]))
    found = []
    for text, start in pairs[:1] if first_only else pairs:
        there = row["context"][start:start + len(text)] if start >= 0 else ""
        if there != text:
            found.append((text, start, there))
    return found


def _check_content(rows: list[tuple[dict[str, Any], str]], flag: str, path: str) -> None:
    """No empty context, question or answer; in a training file the first answer (the label) is where it says.

    A validation answer's answer_start is not used (metrics compare answer texts), so misaligned ones
    there are only counted and reported.
    """
    name = f"--{flag} {path!r}"
    training = flag == "train_file"
    misaligned = []
    for row, where in rows:
        for key in ("context", "question"):
            if is_blank(row[key]):
                raise LoSparseUsageError(f"{name} {where} (id {row['id']!r}) has an empty {key}")
        if any(is_blank(text) for text in row["answers"]["text"]):
            raise LoSparseUsageError(f"{name} {where} (id {row['id']!r}) has an empty answer text")
        bad = _misaligned(row, first_only=training)
        if bad and training:
            text, start, there = bad[0]
            raise LoSparseUsageError(
                f"{name} {where} (id {row['id']!r}): answer_start {start} points at {describe(there)} in the context, "
                f"not at the answer {describe(text)}; fix answer_start (it is the training label)"
            )
        misaligned += [(where, row["id"], *b) for b in bad]
    if misaligned:
        where, qid, text, start, there = misaligned[0]
        logger.warning("%s: %d answers whose answer_start does not point at their text (first: %s, id %r, "
                       "answer_start %d points at %s, not %s); kept, since evaluation compares answer texts only",
                       name, len(misaligned), where, qid, start, describe(there), describe(text))


def read_squad_file(path: str, flag: str = "train_file") -> list[dict[str, Any]]:
    """Flattened rows {id, title?, context, question, answers{text, answer_start}} of a local file.

    Detects the layout: the official nested SQuAD JSON, or one record per question (a JSON list,
    JSON lines, or {"data": [records]}). Raises `LoSparseUsageError` for anything else, for empty
    contexts, questions or answers, and for a training answer that answer_start does not point at.
    """
    items, wheres = _items(path, flag)
    if not isinstance(items, list) or not items:
        raise _not_squad(flag, path, "found no list of articles or records")
    try:
        if isinstance(items[0], Mapping) and "paragraphs" in items[0]:
            located = _flatten_official(items, wheres)
        else:
            located = [(_check_row(item, where), where) for item, where in zip(items, wheres)]
    except ValueError as exc:
        raise _not_squad(flag, path, str(exc)) from None
    if not located:
        raise _not_squad(flag, path, "it holds no questions")
    _check_content(located, flag, path)
    seen: set[str] = set()
    for row, where in located:
        if row["id"] in seen:
            raise LoSparseUsageError(f"--{flag} {path!r} {where} repeats the question id {row['id']!r}; ids must be "
                                     "unique (predictions are keyed by id)")
        seen.add(row["id"])
    return [row for row, _ in located]


def load_raw_datasets(data_args: SquadDataArguments, cache_dir: Optional[str] = None):
    """A DatasetDict(train, validation) with columns id, context, question, answers (and title if known).

    Runs before the model is loaded, so a malformed file fails fast with a `LoSparseUsageError`.
    """
    from datasets import Dataset, DatasetDict, load_dataset

    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, cache_dir=cache_dir)
        for split in ("train", "validation"):
            if split not in raw:
                raise LoSparseUsageError(f"--dataset_name {data_args.dataset_name!r} has no {split!r} split "
                                         f"(splits: {', '.join(raw)})")
            missing = {"id", "context", "question", "answers"} - set(raw[split].column_names)
            if missing:
                raise LoSparseUsageError(f"--dataset_name {data_args.dataset_name!r} is not SQuAD-shaped: its "
                                         f"{split} split lacks the columns {', '.join(sorted(missing))}")
        return DatasetDict(train=raw["train"], validation=raw["validation"])
    splits = {}
    for split, flag in (("train", "train_file"), ("validation", "validation_file")):
        rows = read_squad_file(getattr(data_args, flag), flag)
        if any("title" in row for row in rows):
            rows = [{"title": "", **row} for row in rows]
        splits[split] = Dataset.from_list(rows)
    return DatasetDict(splits)


def load_data(data_args: SquadDataArguments, model_args: Any, model_config: Any):
    """`load_raw_datasets`, then --max_seq_length checked against the model's positions (its `AutoConfig`)."""
    raw = load_raw_datasets(data_args, cache_dir=model_args.cache_dir)
    check_max_length("max_seq_length", data_args.max_seq_length, model_config, model_args.model_name_or_path)
    logger.info("Data: %d training and %d validation questions", len(raw["train"]), len(raw["validation"]))
    return raw


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

def _tokenize_windows(examples: Mapping[str, list], tokenizer: Any, max_seq_length: int, doc_stride: int):
    """Tokenize every (question, context) pair into overlapping padded windows.

    Returns (encoding, context_sequence_id). The question comes first unless the tokenizer pads on
    the left (then the context comes first so that truncation and padding stay on opposite ends).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise LoSparseUsageError("question answering needs a fast tokenizer (offset mappings); "
                                 f"{type(tokenizer).__name__} is not one")
    questions = [q.lstrip() for q in examples["question"]]
    room = max_seq_length - tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for qid, length in zip(examples["id"], lengths):
        if room - length <= doc_stride:
            raise LoSparseUsageError(
                f"question {qid!r} takes {length} tokens and leaves {room - length} context tokens per window of "
                f"--max_seq_length {max_seq_length}; --doc_stride {doc_stride} must be smaller than that: raise "
                "--max_seq_length or lower --doc_stride"
            )
    question_first = tokenizer.padding_side == "right"
    pair = (questions, examples["context"]) if question_first else (examples["context"], questions)
    encoding = tokenizer(
        *pair,
        truncation="only_second" if question_first else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    return encoding, 1 if question_first else 0


def prepare_train_features(examples: Mapping[str, list], tokenizer: Any, max_seq_length: int,
                           doc_stride: int) -> dict[str, list]:
    """Batched `datasets.map` function: questions -> training windows with answer token spans.

    Returns input_ids/attention_mask(/token_type_ids), each [num_windows][max_seq_length], plus
    start_positions and end_positions [num_windows]: the tokens holding the first answer's first
    and last characters, or the CLS index when the answer is not entirely inside the window.
    """
    encoding, context_id = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride)
    sample_of = encoding.pop("overflow_to_sample_mapping")
    offsets_per_window = encoding.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_per_window):
        input_ids = encoding["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        answers = examples["answers"][sample_of[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        context_tokens = [t for t, s in enumerate(encoding.sequence_ids(i)) if s == context_id]
        if (not context_tokens or offsets[context_tokens[0]][0] > start_char
                or offsets[context_tokens[-1]][1] < end_char):
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        starts.append(max(t for t in context_tokens if offsets[t][0] <= start_char))
        ends.append(min(t for t in context_tokens if offsets[t][1] >= end_char))
    encoding["start_positions"] = starts
    encoding["end_positions"] = ends
    return dict(encoding)


def prepare_validation_features(examples: Mapping[str, list], tokenizer: Any, max_seq_length: int,
                                doc_stride: int) -> dict[str, list]:
    """Batched `datasets.map` function: questions -> evaluation windows.

    Besides the model inputs ([num_windows][max_seq_length]) each window keeps `example_id` (the
    question id) and `offset_mapping` ([max_seq_length] of (start_char, end_char) into the context,
    None for tokens outside the context), which is all post-processing needs.
    """
    encoding, context_id = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride)
    sample_of = encoding.pop("overflow_to_sample_mapping")
    encoding["example_id"] = [examples["id"][s] for s in sample_of]
    encoding["offset_mapping"] = [
        [tuple(o) if s == context_id else None for o, s in zip(offsets, encoding.sequence_ids(i))]
        for i, offsets in enumerate(encoding["offset_mapping"])
    ]
    return dict(encoding)


def preprocess(raw, tokenizer: Any, data_args: SquadDataArguments) -> tuple[Any, Any, Any]:
    """(train_features, eval_features, eval_examples), after truncating the splits as asked."""
    train, examples = raw["train"], raw["validation"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        examples = examples.select(range(min(data_args.max_eval_samples, len(examples))))
    kwargs = dict(tokenizer=tokenizer, max_seq_length=data_args.max_seq_length, doc_stride=data_args.doc_stride)
    train_features = train.map(prepare_train_features, batched=True, fn_kwargs=kwargs,
                               remove_columns=train.column_names, desc="Tokenizing train")
    eval_features = examples.map(prepare_validation_features, batched=True, fn_kwargs=kwargs,
                                 remove_columns=examples.column_names, desc="Tokenizing validation")
    return train_features, eval_features, examples


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------

def _column(rows: Any, name: str) -> list:
    """A column of a `datasets.Dataset` or of a list of dicts, as a list."""
    if isinstance(rows, (list, tuple)):
        return [row[name] for row in rows]
    return list(rows[name])


def postprocess_predictions(examples: Any, features: Any, start_logits: np.ndarray, end_logits: np.ndarray,
                            n_best_size: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """Best answer text per question id, searched over all windows of the question.

    examples: rows with id and context; features: rows with example_id and offset_mapping, in the
    order of the logits; start_logits/end_logits: [num_features, seq_len]. For each window the
    n_best_size highest start and end tokens are paired; a pair is kept when both tokens lie in the
    context, end >= start and the span has at most max_answer_length tokens. The pair with the
    highest start + end logit over all windows wins; a question with no valid pair gets "".
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"got {len(start_logits)}/{len(end_logits)} start/end logit rows for "
                         f"{len(features)} features")
    windows: dict[str, list[int]] = defaultdict(list)
    for index, example_id in enumerate(_column(features, "example_id")):
        windows[example_id].append(index)
    offsets_per_window = _column(features, "offset_mapping")
    predictions: dict[str, str] = {}
    for example_id, context in zip(_column(examples, "id"), _column(examples, "context")):
        best_score, best_text = -math.inf, ""
        for index in windows.get(example_id, []):
            offsets = offsets_per_window[index]
            length = len(offsets)
            start_scores, end_scores = start_logits[index][:length], end_logits[index][:length]
            top_starts = np.argsort(start_scores)[::-1][:n_best_size]
            top_ends = np.argsort(end_scores)[::-1][:n_best_size]
            for start in top_starts:
                if offsets[start] is None:
                    continue
                for end in top_ends:
                    if offsets[end] is None or end < start or end - start + 1 > max_answer_length:
                        continue
                    score = float(start_scores[start] + end_scores[end])
                    if score > best_score:
                        best_score, best_text = score, context[offsets[start][0]:offsets[end][1]]
        predictions[example_id] = best_text
    return predictions


# ---------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------

class QuestionAnsweringTrainerMixin:
    """`evaluate()` for extractive QA: predict on the windows, post-process, score with SQuAD metrics.

    Extra keyword arguments:
      eval_examples: the raw validation questions (id, context, answers) that `eval_dataset` was
        built from by `prepare_validation_features`;
      n_best_size, max_answer_length: passed to `postprocess_predictions`.
    After `evaluate()`, `self.eval_predictions` holds {question id: predicted answer}.
    """

    def __init__(self, *args: Any, eval_examples: Any = None, n_best_size: int = 20, max_answer_length: int = 30,
                 **kwargs: Any) -> None:
        if kwargs.get("compute_metrics") is not None:
            raise ValueError("the question-answering trainer computes SQuAD metrics itself; do not pass "
                             "compute_metrics")
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.eval_predictions: Optional[dict[str, str]] = None

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Optional[list[str]] = None,
                 metric_key_prefix: str = "eval", eval_examples: Any = None) -> dict[str, float]:
        """Metrics {prefix_exact_match, prefix_f1, prefix_runtime, ...}, logged like `Trainer.evaluate`."""
        features = eval_dataset if eval_dataset is not None else self.eval_dataset
        examples = eval_examples if eval_examples is not None else self.eval_examples
        if features is None or examples is None:
            raise ValueError("evaluation needs eval_dataset (features) and eval_examples (the questions)")
        if isinstance(features, dict):
            raise ValueError("the question-answering trainer evaluates one dataset at a time")
        start_time = time.time()
        model_inputs = features.remove_columns([c for c in EVAL_ONLY_COLUMNS if c in features.column_names])
        output = self.evaluation_loop(self.get_eval_dataloader(model_inputs), description="Evaluation",
                                      prediction_loss_only=False, ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        start_logits, end_logits = output.predictions[:2]
        self.eval_predictions = postprocess_predictions(examples, features, start_logits, end_logits,
                                                        self.n_best_size, self.max_answer_length)
        references = dict(zip(_column(examples, "id"), (a["text"] for a in _column(examples, "answers"))))
        metrics = dict(output.metrics)
        for key, value in squad_metrics(self.eval_predictions, references).items():
            metrics[f"{metric_key_prefix}_{key}"] = value
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=len(features),
                                     num_steps=math.ceil(len(features) / total_batch_size)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class QuestionAnsweringTrainer(QuestionAnsweringTrainerMixin, Trainer):
    """`transformers.Trainer` whose `evaluate()` reports SQuAD exact match and F1."""
