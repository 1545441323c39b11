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
(`losparse.yaml_config`, `losparse.tools.reproduce --dry_run`) stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "LoSparseConfig": "config",
    "LoSparseUsageError": "errors",
    "LoSparseLinear": "layers",
    "CompactLoSparseLinear": "layers",
    "LoSparsePruner": "pruner",
    "LoSparseCallback": "trainer",
    "LoSparseTrainer": "trainer",
    "LoSparseTrainerMixin": "trainer",
    "LoSparseSeq2SeqTrainer": "trainer",
    "compose_trainer": "trainer",
    "apply": "decompose",
    "compact": "export",
    "merge": "export",
    "save": "export",
    "load": "export",
    "parameter_report": "export",
    "format_report": "export",
    "find_target_modules": "decompose",
    "rank_for_ratio": "decompose",
    "make_contiguous": "permute",
    "optimize": "dispatch",
    "format_optimize_report": "dispatch",
    "export_onnx": "onnx_export",
    "oneshot_compress": "oneshot",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first use, and keep the value as a module attribute."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static analysers and IDEs see
    from .config import LoSparseConfig
    from .decompose import apply, find_target_modules, rank_for_ratio
    from .errors import LoSparseUsageError
    from .export import compact, format_report, load, merge, parameter_report, save
    from .layers import CompactLoSparseLinear, LoSparseLinear
    from .dispatch import format_optimize_report, optimize
    from .oneshot import oneshot_compress
    from .onnx_export import export_onnx
    from .permute import make_contiguous
    from .pruner import LoSparsePruner
    from .trainer import (LoSparseCallback, LoSparseSeq2SeqTrainer, LoSparseTrainer, LoSparseTrainerMixin,
                          compose_trainer)
