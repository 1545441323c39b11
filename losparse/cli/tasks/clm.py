"""Causal language modelling (Llama, Qwen2, Mistral, GPT-2, OPT, ...): data, packing, perplexity, generations.

In the style of transformers' `examples/pytorch/language-modeling/run_clm.py`: every document is
tokenized, followed by the EOS token, the token streams are concatenated and cut into blocks of
`--block_size` tokens (the remainder of each group of `GROUP_DOCUMENTS` documents is dropped), and
the labels are the inputs (the model shifts them). Every block is a full block, so no padding and no
attention mask tricks are needed, and the eval loss is the mean token loss over the validation blocks.

Everything here is offline except `load_raw_datasets` for `--dataset_name`, which downloads from the hub.
Local files are read by `tasks.common` (one-line errors naming the file and the line):

    .txt            one document per non-blank line (default), or the whole file (--txt_document file)
    .json / .jsonl  records with a text field (--text_column; default `text`, or the only field)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, Optional, Sequence

from losparse.cli.tasks.common import check_local_files, check_positive, read_table, read_text
from losparse.core.errors import LoSparseUsageError
from losparse.training.preflight import check_max_length, position_limit

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger("losparse")

DATA_EXTENSIONS = ("txt", "json", "jsonl")
DEFAULT_TEXT_COLUMN = "text"
#: The longest default block: transformers' run_clm.py uses min(1024, the model's positions) too.
DEFAULT_MAX_BLOCK_SIZE = 1024
#: Documents packed together at once; what is left over after their last full block is dropped.
GROUP_DOCUMENTS = 1000
DEFAULT_PROMPTS = ("The meaning of life is", "Once upon a time,", "The capital of France is")
GENERATIONS_FILE = "generations.json"


@dataclass
class CLMDataArguments:
    """Which text to train and evaluate on, and how it is cut into blocks."""

    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset (needs internet), e.g. wikitext; loaded with load_dataset."}
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Configuration of --dataset_name, e.g. wikitext-2-raw-v1."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "For a hub dataset without a validation split: the percentage of train held out."},
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "Local training text: .txt (see --txt_document), or .json/.jsonl records with a text field."},
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Local validation text (same formats); eval_loss and perplexity are on it."}
    )
    text_column: Optional[str] = field(
        default=None,
        metadata={"help": "Field of the text in .json/.jsonl files and hub datasets. Default: "
                          f"{DEFAULT_TEXT_COLUMN!r}, or the only field there is."},
    )
    txt_document: str = field(
        default="line",
        metadata={"help": "What one document of a .txt file is: 'line' (every non-blank line) or 'file' (the whole "
                          "file). Each document is followed by the EOS token before packing.",
                  "choices": ["line", "file"]},
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": f"Tokens per training/evaluation block. Default: min({DEFAULT_MAX_BLOCK_SIZE}, the model's "
                          "positions); it may not exceed the positions."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many training blocks."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many validation blocks."})

    def __post_init__(self) -> None:
        local = self.train_file is not None or self.validation_file is not None
        if self.dataset_name is not None and local:
            raise LoSparseUsageError("pass either --dataset_name or --train_file/--validation_file, not both")
        if self.dataset_name is None and not local:
            raise LoSparseUsageError("pass --dataset_name (a hub dataset) or --train_file and --validation_file")
        if local:
            if self.train_file is None:
                raise LoSparseUsageError("--train_file is required with local data")
            if self.validation_file is None:
                raise LoSparseUsageError("--validation_file is required with local data (perplexity is reported on it)")
            check_local_files(self, DATA_EXTENSIONS)
        check_positive(self, ("block_size", "max_train_samples", "max_eval_samples"))
        if not 0 < self.validation_split_percentage < 100:
            raise LoSparseUsageError(f"--validation_split_percentage {self.validation_split_percentage} must be "
                                     "between 1 and 99")

    @property
    def uses_local_files(self) -> bool:
        return self.dataset_name is None


@dataclass
class GenerationArguments:
    """Greedy generations of the saved model from fixed prompts, written to generations.json."""

    generation_prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        metadata={"help": "Prompts continued greedily by the compact model after the final evaluation."},
    )
    generation_max_new_tokens: int = field(
        default=32, metadata={"help": "New tokens per prompt; 0 writes no generations.json."}
    )

    def __post_init__(self) -> None:
        if self.generation_max_new_tokens < 0:
            raise LoSparseUsageError(f"--generation_max_new_tokens {self.generation_max_new_tokens} must be >= 0")


# ---------------------------------------------------------------------------------------------
# Raw text
# ---------------------------------------------------------------------------------------------

def _pick_column(columns: Sequence[str], requested: Optional[str], where: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise LoSparseUsageError(f"--text_column {requested!r} is not a column of {where} "
                                     f"(columns: {', '.join(columns)})")
        return requested
    if DEFAULT_TEXT_COLUMN in columns:
        return DEFAULT_TEXT_COLUMN
    if len(columns) == 1:
        return columns[0]
    raise LoSparseUsageError(f"{where} has no {DEFAULT_TEXT_COLUMN!r} column (columns: {', '.join(columns)}); "
                             "pass --text_column")


def read_documents(path: str, flag: str, text_column: Optional[str], txt_document: str = "line") -> list[str]:
    """The documents of one local file; a bad file, a missing column or an empty text is a usage error."""
    if path.lower().endswith(".txt"):
        text = read_text(path, flag)
        if txt_document == "file":
            return [text]
        return [line for line in text.splitlines() if line.strip()]
    table = read_table(path, flag)
    column = _pick_column(table.columns, text_column, table.name)
    return table.texts(column, "text")


def load_raw_datasets(data_args: CLMDataArguments, cache_dir: Optional[str] = None) -> "DatasetDict":
    """A DatasetDict with "train" and "validation", each one column "text" of documents.

    Local files go through `read_documents`. A hub dataset is loaded with `load_dataset`; without a
    validation split, the first --validation_split_percentage percent of train is held out (as in
    transformers' run_clm.py). Blank hub texts (wikitext's empty lines) are dropped.
    """
    from datasets import Dataset, DatasetDict, load_dataset

    raw = DatasetDict()
    if data_args.uses_local_files:
        for split, flag in (("train", "train_file"), ("validation", "validation_file")):
            documents = read_documents(getattr(data_args, flag), flag, data_args.text_column, data_args.txt_document)
            raw[split] = Dataset.from_dict({"text": documents})
        return raw
    name, config = data_args.dataset_name, data_args.dataset_config_name
    hub = load_dataset(name, config, cache_dir=cache_dir)
    if "validation" in hub:
        splits = {"train": hub["train"], "validation": hub["validation"]}
    else:
        percent = data_args.validation_split_percentage
        splits = {"validation": load_dataset(name, config, split=f"train[:{percent}%]", cache_dir=cache_dir),
                  "train": load_dataset(name, config, split=f"train[{percent}%:]", cache_dir=cache_dir)}
    for split in ("train", "validation"):
        dataset = splits[split]
        column = _pick_column(dataset.column_names, data_args.text_column, f"{name} ({split} split)")
        texts = [text for text in dataset[column] if isinstance(text, str) and text.strip()]
        if not texts:
            raise LoSparseUsageError(f"the {split} split of {name} holds no text in column {column!r}")
        raw[split] = Dataset.from_dict({"text": texts})
    return raw


def resolve_block_size(data_args: CLMDataArguments, model_config: Any, model_name_or_path: str) -> int:
    """--block_size, checked against the model's positions; default min(1024, positions)."""
    if data_args.block_size is not None:
        check_max_length("block_size", data_args.block_size, model_config, model_name_or_path)
        return data_args.block_size
    limit = position_limit(model_config)
    return min(DEFAULT_MAX_BLOCK_SIZE, limit[0]) if limit else DEFAULT_MAX_BLOCK_SIZE


# ---------------------------------------------------------------------------------------------
# Tokens and blocks
# ---------------------------------------------------------------------------------------------

def pack_token_ids(sequences: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate the sequences and cut them into full blocks of `block_size` (the remainder is dropped)."""
    stream = list(chain.from_iterable(sequences))
    usable = len(stream) // block_size * block_size
    return [stream[i:i + block_size] for i in range(0, usable, block_size)]


def tokenize_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of every document, each followed by EOS (unless the tokenizer already ends it with EOS)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts))["input_ids"]
    if eos is None:
        return [list(x) for x in ids]
    return [list(x) if x and x[-1] == eos else list(x) + [eos] for x in ids]


def make_blocks(raw: "DatasetDict", tokenizer: Any, block_size: int, data_args: CLMDataArguments,
                training_args: Any = None) -> "DatasetDict":
    """Every split as blocks: `input_ids`, `attention_mask` (all ones) and `labels` (= input_ids).

    Cut to --max_train_samples / --max_eval_samples blocks. A split too short for a single block is a
    usage error naming its file.
    """
    import contextlib

    def tokenize(batch: dict) -> dict:
        return {"input_ids": tokenize_documents(tokenizer, batch["text"])}

    def group(batch: dict) -> dict:
        blocks = pack_token_ids(batch["input_ids"], block_size)
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(block) for block in blocks]}

    names = {"train": "--train_file", "validation": "--validation_file"}
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    blocks = type(raw)()
    for split, dataset in raw.items():
        first = (training_args.main_process_first(desc=f"packing {split}") if training_args is not None
                 else contextlib.nullcontext())
        with first:
            tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names,
                                 desc=f"Tokenizing {split}")
            total = sum(len(ids) for ids in tokens["input_ids"])
            packed = tokens.map(group, batched=True, batch_size=GROUP_DOCUMENTS, remove_columns=tokens.column_names,
                                desc=f"Packing {split} into blocks of {block_size}")
        if len(packed) == 0:
            source = (f"{names[split]} {getattr(data_args, names[split][2:])!r}" if data_args.uses_local_files
                      else f"the {split} split of {data_args.dataset_name}")
            raise LoSparseUsageError(f"{source} holds {total} tokens (EOS included), not one block of --block_size "
                                     f"{block_size}; lower --block_size or add text")
        if limits[split] is not None:
            packed = packed.select(range(min(limits[split], len(packed))))
        blocks[split] = packed
    return blocks


# ---------------------------------------------------------------------------------------------
# Metrics and generations
# ---------------------------------------------------------------------------------------------

def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows a float (an untrained or broken model), not an exception."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy continuations, one prompt at a time (no padding): [{"prompt", "completion"}]."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    results = []
    try:
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            with torch.no_grad():
                output = model.generate(**encoded, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                        pad_token_id=pad)
            new_tokens = output[0, encoded["input_ids"].shape[1]:]
            results.append({"prompt": prompt, "completion": tokenizer.decode(new_tokens, skip_special_tokens=True)})
    finally:
        model.train(was_training)
    return results


def write_generations(path: str, generations: list[dict[str, str]], max_new_tokens: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"decoding": "greedy", "max_new_tokens": max_new_tokens, "generations": generations}, f,
                  indent=2, ensure_ascii=False)
