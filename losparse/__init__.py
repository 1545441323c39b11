"""LoSparse: structured compression of transformers by low-rank plus sparse approximation.

Public API (PEFT-like):
    config = LoSparseConfig(remaining_ratio=0.2, low_rank_ratio=0.05)
    model = apply(model, config)                      # W -> U·V + S, outputs unchanged
    trainer = LoSparseTrainer(model=model, args=..., ...); trainer.train()   # prunes S while training
    compact(model); save(model, "out"); model = load("out")
    merge(model)                                      # back to a plain dense transformers model
    parameter_report(model)
"""

from .config import LoSparseConfig
from .decompose import apply, find_target_modules, rank_for_ratio
from .errors import LoSparseUsageError
from .export import compact, format_report, load, merge, parameter_report, save
from .layers import CompactLoSparseLinear, LoSparseLinear
from .pruner import LoSparsePruner
from .trainer import LoSparseCallback, LoSparseSeq2SeqTrainer, LoSparseTrainer, LoSparseTrainerMixin

__version__ = "0.1.0"

__all__ = [
    "LoSparseConfig",
    "LoSparseUsageError",
    "LoSparseLinear",
    "CompactLoSparseLinear",
    "LoSparsePruner",
    "LoSparseCallback",
    "LoSparseTrainer",
    "LoSparseTrainerMixin",
    "LoSparseSeq2SeqTrainer",
    "apply",
    "compact",
    "merge",
    "save",
    "load",
    "parameter_report",
    "format_report",
    "find_target_modules",
    "rank_for_ratio",
]
