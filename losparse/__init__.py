"""LoSparse: structured compression of transformers by low-rank plus sparse approximation.

Public API (PEFT-like):
    config = LoSparseConfig(remaining_ratio=0.2, low_rank_ratio=0.05)
    model = apply(model, config)                      # W -> U·V + S, outputs unchanged
    trainer = LoSparseTrainer(model=model, args=..., ...); trainer.train()   # prunes S while training
    compose_trainer(Seq2SeqTrainer, prune=True, distill=True)   # any task trainer + pruning/distillation
    compact(model); save(model, "out"); model = load("out")
    merge(model)                                      # back to a plain dense transformers model
    parameter_report(model)

The names are imported lazily (PEP 562, as transformers does): `import losparse` loads neither torch
nor transformers; the first use of a name imports the module that defines it. So torch-free tools
(`losparse.cli.yaml_config`, `reproduce.driver --dry_run`) stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from losparse import _moved
from losparse._version import __version__

_moved.install()

#: public name -> the module that defines it
_EXPORTS = {
    "LoSparseConfig": "losparse.core.config",
    "LoSparseUsageError": "losparse.core.errors",
    "LoSparseLinear": "losparse.core.layers",
    "CompactLoSparseLinear": "losparse.core.layers",
    "LoSparsePruner": "losparse.core.pruner",
    "apply": "losparse.core.decompose",
    "find_target_modules": "losparse.core.decompose",
    "rank_for_ratio": "losparse.core.decompose",
    "LoSparseCallback": "losparse.training.trainer",
    "LoSparseTrainer": "losparse.training.compose",
    "LoSparseTrainerMixin": "losparse.training.trainer",
    "LoSparseSeq2SeqTrainer": "losparse.training.compose",
    "compose_trainer": "losparse.training.compose",
    "compact": "losparse.deploy.compact",
    "merge": "losparse.deploy.compact",
    "parameter_report": "losparse.deploy.compact",
    "format_report": "losparse.deploy.compact",
    "save": "losparse.deploy.serialization",
    "load": "losparse.loading",
    "make_contiguous": "losparse.deploy.permute",
    "optimize": "losparse.deploy.dispatch",
    "format_optimize_report": "losparse.deploy.dispatch",
    "export_onnx": "losparse.deploy.onnx",
    "oneshot_compress": "losparse.methods.oneshot.algorithm",
    "get_method": "losparse.methods",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first use, and keep the value as a module attribute."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static analysers and IDEs see
    from losparse.core.config import LoSparseConfig
    from losparse.core.decompose import apply, find_target_modules, rank_for_ratio
    from losparse.core.errors import LoSparseUsageError
    from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear
    from losparse.core.pruner import LoSparsePruner
    from losparse.deploy.compact import compact, format_report, merge, parameter_report
    from losparse.deploy.dispatch import format_optimize_report, optimize
    from losparse.deploy.onnx import export_onnx
    from losparse.deploy.permute import make_contiguous
    from losparse.deploy.serialization import save
    from losparse.loading import load
    from losparse.methods import get_method
    from losparse.methods.oneshot.algorithm import oneshot_compress
    from losparse.training.compose import LoSparseSeq2SeqTrainer, LoSparseTrainer, compose_trainer
    from losparse.training.trainer import LoSparseCallback, LoSparseTrainerMixin
