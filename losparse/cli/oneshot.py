"""`--oneshot` in the run scripts: its arguments, the calibration text, and the checks made before weights load.

The algorithm itself is `losparse.methods.oneshot.algorithm` (`oneshot_compress`); this module turns the
run's flags and text into its calibration token ids.
"""


from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from losparse.cli.tasks.clm import pack_token_ids, read_documents, tokenize_documents
from losparse.cli.tasks.common import check_local_files
from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError

logger = logging.getLogger("losparse")

CALIBRATION_EXTENSIONS = ("txt", "json", "jsonl")
#: --calibration_seq_len when not given (capped at the model's positions)
DEFAULT_CALIBRATION_SEQ_LEN = 512


from losparse.methods import get_method, method_for_directory
from losparse.methods.oneshot.algorithm import LOWRANK_CHOICES, PRUNE_SCOPES, SCORE_CHOICES, SOLVER_CHOICES
from losparse.methods.oneshot.reconstruction import DEFAULT_ITERATIONS, SPLITS
from losparse.training.preflight import (
    check_low_rank_share,
    check_max_length,
    position_limit,
    target_shapes,
)


@dataclass
class OneShotArguments:
    """One-shot compression from calibration data (losparse.methods.oneshot), instead of fine-tuning or as its start."""

    oneshot: bool = field(
        default=False,
        metadata={"help": "Compress from calibration data, no fine-tuning: activation-aware U·V, S = W - U·V pruned "
                          "once by calibration scores. With --do_train (method losparse): the unpruned calibrated "
                          "decomposition starts ordinary LoSparse fine-tuning, which prunes on its schedule. run_glue.py: always "
                          "that calibrated start (the calibration text defaults to the training sentences)."},
    )
    calibration_file: Optional[str] = field(
        default=None,
        metadata={"help": "Calibration text (.txt one document per line, .json/.jsonl records with a text field). "
                          "Default: the training split."},
    )
    num_calibration_samples: int = field(
        default=128, metadata={"help": "Calibration sequences (packed blocks of --calibration_seq_len tokens)."}
    )
    calibration_seq_len: Optional[int] = field(
        default=None, metadata={"help": "Tokens per calibration sequence; default min(512, the model's positions). "
                                        "An explicit value above the model's positions is refused."}
    )
    oneshot_solver: str = field(
        default="reconstruct",
        metadata={"help": "'reconstruct': U·V and the kept rows of S solved for the calibration error (alternating "
                          "SVD and row selection, then the closed-form fit); 'select': S = W - U·V with rows cut by "
                          "--oneshot_scores, no compensation (the earlier one-shot).", "choices": list(SOLVER_CHOICES)},
    )
    oneshot_iters: int = field(
        default=DEFAULT_ITERATIONS,
        metadata={"help": "Alternations of the reconstruct solver after its first selection (0: select once from "
                          "the plain whitened SVD, then fit)."},
    )
    oneshot_split: str = field(
        default="auto",
        metadata={"help": "Reconstruct solver, method losparse: 'auto' = each matrix picks its rank and kept rows of S "
                          "within its share of --remaining_ratio (least calibration error); 'fixed' = the rank from "
                          "--low_rank_ratio, S gets the rest.", "choices": list(SPLITS)},
    )
    oneshot_compensate: bool = field(
        default=True,
        metadata={"help": "Reconstruct solver, --oneshot_prune_scope block: fit each block to the dense model's "
                          "outputs from the compressed model's inputs (closed-form target W·Hᵀ·G̃⁻¹)."},
    )
    oneshot_lowrank: str = field(
        default="activation",
        metadata={"help": "Low-rank part: 'activation' = SVD of W whitened by the Cholesky factor of the calibration "
                          "inputs' second moments (SVD-LLM), 'plain' = SVD of W.",
                  "choices": list(LOWRANK_CHOICES)},
    )
    oneshot_scores: str = field(
        default="activation",
        metadata={"help": "Neuron scores of S: 'activation' = sum of |S_ij|·rms(x_j) over the neuron, 'magnitude' = "
                          "sum of |S_ij|.", "choices": list(SCORE_CHOICES)},
    )
    oneshot_prune_scope: str = field(
        default="global",
        metadata={"help": "'global': one threshold over all blocks after all are scored; 'block': prune each block "
                          "to the kept fraction before calibrating the next.", "choices": list(PRUNE_SCOPES)},
    )
    oneshot_batch_size: int = field(
        default=8, metadata={"help": "Calibration sequences per forward chunk (memory, not results)."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.oneshot_iters, int) or self.oneshot_iters < 0:
            raise LoSparseUsageError(f"--oneshot_iters {self.oneshot_iters!r} must be >= 0")
        for name in ("num_calibration_samples", "calibration_seq_len", "oneshot_batch_size"):
            value = getattr(self, name)
            if name == "calibration_seq_len" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise LoSparseUsageError(f"--{name} {value!r} must be >= 1")
        for name, choices in (("oneshot_solver", SOLVER_CHOICES), ("oneshot_split", SPLITS),
                              ("oneshot_lowrank", LOWRANK_CHOICES),
                              ("oneshot_scores", SCORE_CHOICES),
                              ("oneshot_prune_scope", PRUNE_SCOPES)):
            if getattr(self, name) not in choices:
                raise LoSparseUsageError(f"--{name} {getattr(self, name)!r} is not known; choose one of: "
                                         f"{', '.join(choices)}")
        if self.calibration_file is not None:
            check_local_files(self, CALIBRATION_EXTENSIONS, flags=("calibration_file",))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------

def read_calibration_ids(tokenizer: Any, path_or_texts: Union[str, Sequence[str]], num_samples: int, seq_len: int,
                         seed: int = 0, text_column: Optional[str] = None,
                         source: Optional[str] = None) -> torch.Tensor:
    """(num_samples, seq_len) token ids: documents + EOS packed into blocks, a seeded choice of the blocks.

    `path_or_texts`: a .txt/.json/.jsonl/.csv file (read by `tasks.clm.read_documents`) or the documents.
    Too little text for `num_samples` blocks is a usage error saying how many tokens were found and needed
    (`source` names the text in it).
    """
    if num_samples < 1 or seq_len < 1:
        raise LoSparseUsageError(f"calibration needs >= 1 sample of >= 1 token (got {num_samples} x {seq_len})")
    if isinstance(path_or_texts, str):
        source = source or f"--calibration_file {path_or_texts!r}"
        documents = read_documents(path_or_texts, "calibration_file", text_column)
    else:
        source = source or "the calibration text (the training split)"
        documents = [text for text in path_or_texts if isinstance(text, str) and text.strip()]
    ids = tokenize_documents(tokenizer, documents) if documents else []
    blocks = pack_token_ids(ids, seq_len)
    if len(blocks) < num_samples:
        found = sum(len(x) for x in ids)
        raise LoSparseUsageError(
            f"{source} holds {found} tokens (EOS included), fewer than the {num_samples * seq_len} needed for "
            f"--num_calibration_samples {num_samples} x --calibration_seq_len {seq_len}; lower them or add text")
    chosen = sorted(random.Random(seed).sample(range(len(blocks)), num_samples))
    return torch.tensor([blocks[i] for i in chosen], dtype=torch.long)


def calibrated_init(model: nn.Module, config: LoSparseConfig, tokenizer: Any, oneshot_args: OneShotArguments,
                    default_texts: Optional[Sequence[str]] = None, seed: int = 0,
                    calibration_input_ids: Optional[torch.Tensor] = None, prune: bool = True) -> nn.Module:
    """The entry the run scripts use for `--oneshot` / `--init oneshot`: calibration ids, then the method's
    one-shot form (`CompressionMethod.oneshot`: `oneshot_compress` for losparse/lowrank/itp,
    `structured_decoder_oneshot` for structured).

    Calibration text: `--calibration_file`, else `default_texts` (the training split). Pass
    `calibration_input_ids` when they were read earlier (run scripts read them before the weights load,
    so bad calibration input fails fast). `prune=False` is the fine-tuning start (`--init oneshot`,
    `--oneshot --do_train`): for losparse, activation-aware U·V, S = W − U·V unpruned, in training form, so
    `cli.make_trainer` composes the pruning trainer and LoSparse prunes S on its schedule; structured pruning
    has no such start (it prunes once, the smaller model then trains as it is).
    """
    if calibration_input_ids is None:
        source = oneshot_args.calibration_file or default_texts
        if source is None:
            raise LoSparseUsageError("one-shot compression needs --calibration_file (no training text to default to)")
        calibration_input_ids = read_calibration_ids(tokenizer, source, oneshot_args.num_calibration_samples,
                                                     oneshot_args.calibration_seq_len, seed)
    return get_method(config.method).oneshot(model, config, calibration_input_ids, oneshot_args, prune=prune)


def check_oneshot_plan(oneshot_args: OneShotArguments, config: LoSparseConfig, model_name_or_path: str,
                       auto_class: Any, model_config: Any, fine_tune: bool = False) -> float:
    """What a `--oneshot` run can check before the weights load (a usage error each); returns p_T.

    The method's own checks (`CompressionMethod.check_oneshot`: a one-shot form exists, and for `fine_tune`,
    `--oneshot --do_train`, a start that can train), a dense starting model, calibration sequences within the
    model's positions, and for the decomposing methods a low-rank part that leaves something for S.
    """
    get_method(config.method).check_oneshot(config, model_config, oneshot_args, fine_tune)
    saved_by = method_for_directory(model_name_or_path) if os.path.isdir(model_name_or_path) else None
    if saved_by is not None:
        raise LoSparseUsageError(f"--oneshot needs a dense model, but --model_name_or_path {model_name_or_path!r} is "
                                 f"already compressed (saved by --method {saved_by.names[0]})")
    if oneshot_args.calibration_seq_len is None:
        limit = position_limit(model_config)
        oneshot_args.calibration_seq_len = min(DEFAULT_CALIBRATION_SEQ_LEN, limit[0]) if limit else \
            DEFAULT_CALIBRATION_SEQ_LEN
    check_max_length("calibration_seq_len", oneshot_args.calibration_seq_len, model_config, model_name_or_path)
    if not config.method_spec.decomposes:
        return float(config.remaining_ratio)
    shapes = target_shapes(auto_class, model_config, config)
    if not config.method_spec.has_sparse:
        return 0.0
    return check_low_rank_share(shapes, config, model_name_or_path)
