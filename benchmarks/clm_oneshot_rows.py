"""The rows of `benchmarks.clm_oneshot_table`: one way each to compress a causal LM one-shot, at one ratio.

Every row takes a fresh copy of the dense model, the calibration ids and the dense model's calibration statistics
(shared by the rows that calibrate on the dense activations), and returns the compressed model plus what the
table reports of it. Rows (JSON names):

  losparse         one-shot LoSparse, the default solver: U·V and the kept rows of S solved for the calibration
                   error (`losparse.methods.oneshot.reconstruction`, global scope), compact
  losparse_block   the same solved block by block on the compressed model's inputs, compensated to the dense
                   outputs (--oneshot_prune_scope block)
  losparse_select  the earlier one-shot LoSparse: S = W − U·V, rows cut by |S_ij|·rms(x_j) (--oneshot_solver select)
  svd_llm          SVD-LLM: whitened truncation of every matrix to the whole ratio, block by block with the
                   closed-form update to the dense outputs (method lowrank, block scope, compensated)
  lowrank          whitened truncation from the dense statistics, no update (SVD-LLM without it)
  oats             OATS: L + unstructured S on the input-norm-scaled weight (`oneshot.oats`); dense storage
  structured       FLAP-style structured pruning of key/value groups and FFN neurons with bias compensation,
                   physically removed (`losparse.methods.structured.structured_decoder_oneshot`)
  itp, plain_svd   S = W rows only; plain SVD + magnitude scores (select solver)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from losparse.core.config import LoSparseConfig
from losparse.core.decompose import require_targets
from losparse.deploy.compact import compact, parameter_report
from losparse.methods.oneshot.algorithm import oneshot_compress
from losparse.methods.oneshot.oats import DEFAULT_ITERATIONS as OATS_ITERATIONS
from losparse.methods.oneshot.oats import DEFAULT_RANK_SHARE, oats_compress
from losparse.methods.oneshot.reconstruction import DEFAULT_ITERATIONS
from losparse.methods.structured import structured_decoder_oneshot


@dataclass
class RowContext:
    """What every row may use: the dense model, calibration ids (n, seq_len), the dense statistics, options."""

    model: Any
    calibration: torch.Tensor
    statistics: dict
    low_rank_fraction: float
    batch_size: int
    iterations: int = DEFAULT_ITERATIONS
    oats_rank_share: float = DEFAULT_RANK_SHARE
    oats_iterations: int = OATS_ITERATIONS
    factor_cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A table row: its description, its storage kind ("compact", "plain" or "dense-masked") and its builder
    `build(context, ratio) -> (model, facts)`."""

    description: str
    storage: str
    build: Callable[[RowContext, float], tuple[Any, dict[str, Any]]]


def _config(method: str, ratio: float, context: RowContext) -> LoSparseConfig:
    return LoSparseConfig(method=method, remaining_ratio=ratio, low_rank_ratio=context.low_rank_fraction * ratio)


def _losparse_row(method: str, **options: Any) -> Callable[[RowContext, float], tuple[Any, dict[str, Any]]]:
    """A row of `oneshot_compress` with `options`; global-scope rows reuse the dense statistics."""

    def build(context: RowContext, ratio: float) -> tuple[Any, dict[str, Any]]:
        model = copy.deepcopy(context.model)
        config = _config(method, ratio, context)
        extra = dict(options)
        if extra.get("prune_scope", "global") == "global":
            extra["statistics"] = context.statistics
        else:
            extra["calibration_input_ids"] = context.calibration
        if extra.get("solver") == "select":
            extra["factor_cache"] = context.factor_cache
        else:
            extra.setdefault("iterations", context.iterations)
        oneshot_compress(model, config, batch_size=context.batch_size, show_progress=False, **extra)
        history = [h[-1] for h in getattr(model, "oneshot_history", []) if h]
        compact(model)
        report = parameter_report(model)
        return model, {"achieved_ratio": report["remaining_ratio"], "low_rank_share": report["low_rank_share"],
                       "objective": sum(history) if history else None}

    return build


def _oats(context: RowContext, ratio: float) -> tuple[Any, dict[str, Any]]:
    model = copy.deepcopy(context.model)
    layers = dict(require_targets(model, _config("lowrank", ratio, context)))
    rms = {name: context.statistics[name].channel_rms() for name in layers}
    report = oats_compress(model, layers, rms, ratio, context.oats_rank_share, context.oats_iterations)
    return model, {"achieved_ratio": report["remaining_ratio"], "low_rank_share": None,
                   "objective": report["error_share"]}


def _structured(context: RowContext, ratio: float) -> tuple[Any, dict[str, Any]]:
    model = copy.deepcopy(context.model)
    report = structured_decoder_oneshot(model, context.calibration, ratio, batch_size=context.batch_size,
                                        show_progress=False)
    return model, {"achieved_ratio": report["remaining_ratio"], "low_rank_share": 0.0, "objective": None}


ROWS: dict[str, Row] = {
    "losparse": Row("one-shot LoSparse: U·V and kept S rows solved for the calibration error", "compact",
                    _losparse_row("losparse")),
    "losparse_block": Row("the same, block by block, compensated to the dense outputs", "compact",
                          _losparse_row("losparse", prune_scope="block")),
    "losparse_select": Row("earlier one-shot LoSparse: S = W − U·V, rows cut by score", "compact",
                           _losparse_row("losparse", solver="select")),
    "svd_llm": Row("SVD-LLM: whitened truncation + closed-form update, block by block", "compact",
                   _losparse_row("lowrank", prune_scope="block")),
    "lowrank": Row("whitened truncation from the dense statistics (no update)", "compact",
                   _losparse_row("lowrank")),
    "oats": Row("OATS: low rank + unstructured S (stored dense)", "dense-masked", _oats),
    "structured": Row("FLAP-style KV groups + FFN neurons removed, bias compensated", "plain", _structured),
    "itp": Row("S = W, rows cut by calibration error", "compact", _losparse_row("itp")),
    "plain_svd": Row("plain SVD U·V + magnitude-scored S", "compact",
                     _losparse_row("losparse", solver="select", lowrank="plain", scores="magnitude")),
}
DEFAULT_ROWS = ("losparse", "svd_llm", "lowrank", "oats", "structured")  # --rows adds the others
#: rows that need the dense statistics' largest ranks first (the factor cache slices smaller ranks)
CACHE_ROWS = ("losparse_select", "plain_svd")


def low_rank_share(row: str, ratio: float, low_rank_fraction: float) -> float:
    """The order key of the grid: rows sharing the factor cache run with their largest ranks first."""
    if row not in CACHE_ROWS:
        return -1.0
    return low_rank_fraction * ratio

