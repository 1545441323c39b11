"""`CofiLoSparseMethod`: the hooks of `--method cofi_losparse` (see the package docstring)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.decompose import apply
from losparse.core.errors import LoSparseUsageError
from losparse.deploy.compact import compact, format_report, parameter_report
from losparse.deploy.serialization import load, save
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.methods.base import register
from losparse.methods.cofi.method import CofiMethod
from losparse.methods.cofi.removal import remove_pruned_units, slice_units
from losparse.methods.cofi.serialization import COFI_FILE, keep_of_structure, read_cofi_structure
from losparse.methods.cofi_losparse.pruner import DEFAULT_UNITS, check_prune_dim, combination_units, sparse_stage_config
from losparse.methods.cofi_losparse.trainer import cofi_losparse_trainer
from losparse.methods.decomposing import DecomposingMethod
from losparse.methods.structured.blocks import encoder_blocks
from losparse.methods.structured.removal import widths_text
from losparse.training.preflight import check_targets_before_loading


@register("cofi_losparse")
class CofiLoSparseMethod(DecomposingMethod):
    """Decompose, train CoFi's layer/head gates and LoSparse's S pruning together, remove, compact."""

    saved_markers = (LOSPARSE_CONFIG_FILE, COFI_FILE)

    def check(self, config: LoSparseConfig, model_name_or_path: str, auto_class: Any,
              cache_dir: Optional[str] = None, oneshot: bool = False) -> None:
        if config.shrink_sparse:
            raise LoSparseUsageError("--shrink_sparse is not available with --method cofi_losparse (CoFi slices S's "
                                     "rows with its heads at the end); drop it")
        combination_units(config)
        check_prune_dim(config)
        CofiMethod().check(config, model_name_or_path, auto_class, cache_dir=cache_dir)
        check_targets_before_loading(model_name_or_path, auto_class, sparse_stage_config(config), cache_dir=cache_dir)

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        model = trainer_kwargs["model"]
        apply(model, sparse_stage_config(config))
        model.losparse_config = config  # what checkpoints, all_results.json and the saved manifest record
        return cofi_losparse_trainer(trainer_class)(
            cofi_config=config, teacher_model=teacher_model, distill_args=distill_args,
            allow_resume_config_change=allow_resume_config_change, **trainer_kwargs)

    def compact(self, trainer: Any) -> dict[str, Any]:
        pruner = trainer.pruner
        pruner.finalize()
        facts = {"sparse_kept_fraction": pruner.sparse_kept_fraction()}
        pruner.sparse_pruner.apply_masks()
        facts.update(remove_pruned_units(pruner))
        compact(trainer.model)
        return facts

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        model = trainer.model
        save(model, output_dir, tokenizer=tokenizer, base_model=base_model)
        with open(os.path.join(output_dir, COFI_FILE), "w") as f:
            json.dump(model.structure, f, indent=2)
        return {**combination_report(model, trainer.dense_target_params, trainer.dense_model_params), **facts}

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        widths = widths_text(report)
        return (f"cofi_losparse: hidden {report['hidden_size']}, heads/FFN width per layer {widths}; remaining "
                f"ratio {report['remaining_ratio']:.4f} of the dense targeted matrices (CoFi's structure keeps "
                f"{report['mask_remaining_ratio']:.4f}, LoSparse {report['sparse_kept_fraction']:.4f} of its S)\n"
                + format_report(report["losparse_layers"]))

    def load(self, path: str, device: Any = None, **kwargs: Any) -> nn.Module:
        structure = read_cofi_structure(path)
        return load(path, device=device, reshape=lambda skeleton: slice_units(
            skeleton, keep_of_structure(structure, skeleton.config)), **kwargs)


def combination_report(model: nn.Module, dense_target_params: int, dense_model_params: int) -> dict[str, Any]:
    """Counts of the compact layers against the *unpruned* matrices; the structure CoFi left."""
    layers = parameter_report(model)
    structure = model.structure
    return {
        "num_layers": len(encoder_blocks(model, decomposed_ok=True)), "target_dense_params": dense_target_params,
        "target_params": layers["target_params"], "remaining_ratio": layers["target_params"] / dense_target_params,
        "model_params": layers["model_params"], "model_params_dense": dense_model_params, "hidden_size": structure["hidden_size"],
        "heads": [layer["heads"] for layer in structure["layers"]],
        "intermediate_sizes": [layer["intermediate_size"] for layer in structure["layers"]],
        "attention_layers": [layer["attention"] for layer in structure["layers"]],
        "ffn_layers": [layer["ffn"] for layer in structure["layers"]], "default_units": DEFAULT_UNITS,
        "note": "cofi_losparse: sub-layers and heads removed by CoFi's gates, then S's pruned rows by compaction; ratio "
                "= kept weights (U, V, kept S rows) of q, k, v, attention output, intermediate, output / dense count",
        "losparse_layers": layers,
    }
