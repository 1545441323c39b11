"""`StructuredLoSparseMethod`: the hooks of `--method structured_losparse` (see the package docstring)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any, Optional

from losparse.core.config import LoSparseConfig
from losparse.deploy.compact import format_report, parameter_report
from losparse.deploy.serialization import load, save
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.methods.base import register
from losparse.methods.decomposing import DecomposingMethod
from losparse.methods.structured.blocks import encoder_blocks, target_params
from losparse.methods.structured.method import StructuredMethod
from losparse.methods.structured.removal import widths_text
from losparse.methods.structured.serialization import (
    STRUCTURE_FILE,
    apply_structure,
    load_structured,
    read_structure,
    save_structured,
)
from losparse.methods.structured_losparse.stages import STAGE_DIR, TwoStageTrainer, first_stage_dir, stage_arguments
from losparse.methods.structured_losparse.widths import dense_target_params, protect_empty_layers

logger = logging.getLogger(__name__)


def first_stage_config(config: LoSparseConfig) -> LoSparseConfig:
    """The structured stage: `--method structured` to `structured_ratio` of the targeted weights."""
    return dataclasses.replace(config, method="structured", remaining_ratio=config.structured_ratio)


def second_stage_config(config: LoSparseConfig, structured_share: Optional[float] = None) -> LoSparseConfig:
    """The LoSparse stage: the survivors to remaining_ratio / structured_share, at most 1 (nothing structured left).

    `structured_share`: what the structured stage really kept (it falls short of `structured_ratio` by less
    than one head or neuron), so that the product is the run's `remaining_ratio`; default `structured_ratio`.
    """
    share = config.structured_ratio if structured_share is None else structured_share
    return dataclasses.replace(config, remaining_ratio=min(1.0, config.remaining_ratio / share), structured_ratio=1.0)


def prepare_second_stage(pruned: Any, config: LoSparseConfig) -> LoSparseConfig:
    """The LoSparse stage's config for what the structured stage kept, and its zero-width matrices set aside
    (in this order: the share is counted on the plain pruned model)."""
    stage = second_stage_config(config, achieved_share(pruned))
    protect_empty_layers(pruned)
    return stage


def achieved_share(model: Any) -> float:
    """Kept weights of the targeted matrices of a structurally pruned model / those of its dense architecture."""
    return target_params(encoder_blocks(model)) / dense_target_params(model.config)


@register("structured_losparse")
class StructuredLoSparseMethod(DecomposingMethod):
    """Structured stage, then the LoSparse stage; saved as a compact checkpoint of the smaller architecture."""

    saved_markers = (LOSPARSE_CONFIG_FILE, STRUCTURE_FILE)
    run_artifact_dirs = (STAGE_DIR,)

    def check(self, config: LoSparseConfig, model_name_or_path: str, auto_class: Any,
              cache_dir: Optional[str] = None, oneshot: bool = False) -> None:
        StructuredMethod().check(first_stage_config(config), model_name_or_path, auto_class, cache_dir=cache_dir)
        super().check(second_stage_config(config), model_name_or_path, auto_class, cache_dir=cache_dir)

    def checkpoint_config(self, config: LoSparseConfig) -> Optional[LoSparseConfig]:
        return None  # the LoSparse stage's ratio follows from the structure the first stage kept: its trainer checks

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        args = trainer_kwargs.pop("args")
        model = trainer_kwargs.pop("model")
        shared = dict(teacher_model=teacher_model, distill_args=distill_args,
                      allow_resume_config_change=allow_resume_config_change, **trainer_kwargs)
        first = StructuredMethod().make_trainer(trainer_class, first_stage_config(config), model=model,
                                                args=stage_arguments(args, first_stage_dir(args)), **shared)

        def build_second(pruned: Any, steps: int) -> Any:
            stage = prepare_second_stage(pruned, config)
            return DecomposingMethod.make_trainer(self, trainer_class, stage, model=pruned,
                                                  args=_with_max_steps(args, steps), lean_optimizer=lean_optimizer,
                                                  **shared)

        def finish_second(trainer: Any) -> None:
            trainer.model.losparse_config = config  # what finish_run records and saves: the run's own ratio

        return TwoStageTrainer(first, finish_first=_finish_first,
                               load_first=lambda: load_structured(first_stage_dir(args)).train(),
                               build_second=build_second, finish_second=finish_second,
                               first_fraction=config.structured_steps_fraction)

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        model = trainer.model
        save(model, output_dir, tokenizer=tokenizer, base_model=base_model)
        with open(os.path.join(output_dir, STRUCTURE_FILE), "w") as f:
            json.dump(model.structure, f, indent=2)
        return hybrid_report(model)

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        widths = widths_text(report)
        return (f"structured_losparse: heads/FFN width per layer {widths}; remaining ratio "
                f"{report['remaining_ratio']:.4f} of the dense targeted matrices ({report['structured_share']:.4f} "
                f"kept by the structured stage, then {report['losparse_remaining_ratio']:.4f} of that by LoSparse)\n"
                + format_report(report["losparse_stage"]))

    def load(self, path: str, device: Any = None, **kwargs: Any) -> Any:
        structure = read_structure(path)
        return load(path, device=device, reshape=lambda skeleton: _reshape(skeleton, structure), **kwargs)


def _reshape(skeleton: Any, structure: dict[str, Any]) -> None:
    apply_structure(skeleton, structure)
    protect_empty_layers(skeleton)


def _with_max_steps(args: Any, steps: int) -> Any:
    second = copy.copy(args)
    second.max_steps = steps
    return second


def _finish_first(trainer: Any) -> Any:
    """End of the structured stage: remove the pruned groups, save the smaller model (for a resume)."""
    facts = StructuredMethod().compact(trainer)
    model = trainer.model
    save_structured(model, trainer.args.output_dir)
    logger.info("structured stage done: %.4f of the targeted weights kept (masks), saved to %s",
                facts["mask_remaining_ratio"], trainer.args.output_dir)
    return model


def hybrid_report(model: Any) -> dict[str, Any]:
    """The compression report: counts of the compact layers against the *unpruned* architecture's matrices."""
    stage = parameter_report(model)
    dense = dense_target_params(model.config)
    layers = model.structure["layers"]
    return {
        "num_layers": len(layers), "target_dense_params": dense, "target_params": stage["target_params"],
        "remaining_ratio": stage["target_params"] / dense,
        "structured_share": stage["target_dense_params"] / dense, "losparse_remaining_ratio": stage["remaining_ratio"],
        "low_rank_share": stage["low_rank_share"] * stage["target_dense_params"] / dense,
        "sparse_share": stage["sparse_share"] * stage["target_dense_params"] / dense,
        "model_params_dense": stage["model_params_dense"] + dense - stage["target_dense_params"],
        "model_params": stage["model_params"],
        "heads": [layer["heads"] for layer in layers], "intermediate_sizes": [layer["intermediate_size"] for layer in layers],
        "note": "structured_losparse: whole heads and FFN neurons removed, then the survivors decomposed and pruned; "
                "ratio = kept weights of q, k, v, attention output, intermediate and output / their dense count",
        "losparse_stage": stage,
    }
