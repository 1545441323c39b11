"""`StructuredMethod`: the hooks of `--method structured` (whole heads and FFN neurons, BERT family)."""

from __future__ import annotations

from typing import Any, Optional

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.methods.base import CompressionMethod, register
from losparse.methods.structured.blocks import check_supported
from losparse.methods.structured.pruner import check_structured_config
from losparse.methods.structured.removal import remove_pruned_structures, structured_report, widths_text
from losparse.methods.structured.serialization import STRUCTURE_FILE, load_structured, save_structured
from losparse.methods.structured.trainer import structured_trainer
from losparse.training.compose import compose_trainer
from losparse.training.preflight import load_model_config


@register("structured")
class StructuredMethod(CompressionMethod):
    """Prune heads and neurons on LoSparse's schedule, slice them out, save a plain smaller model."""

    saved_markers = (STRUCTURE_FILE,)

    def check(self, config: LoSparseConfig, model_name_or_path: str, auto_class: Any,
              cache_dir: Optional[str] = None) -> None:
        check_structured_config(config)
        check_supported(load_model_config(model_name_or_path, cache_dir=cache_dir))

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        distill = teacher_model is not None
        if distill:
            trainer_kwargs.update(teacher_model=teacher_model, distill_args=distill_args)
        base = compose_trainer(trainer_class, distill=distill)
        return structured_trainer(base)(structured_config=config, allow_resume_config_change=allow_resume_config_change,
                                        **trainer_kwargs)

    def compact(self, trainer: Any) -> dict[str, Any]:
        mask_ratio = trainer.pruner.achieved_kept_fraction() if trainer.pruner is not None else 1.0
        remove_pruned_structures(trainer.model)
        return {"mask_remaining_ratio": mask_ratio}

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        report = {**structured_report(trainer.model, trainer.dense_target_params, trainer.dense_model_params), **facts}
        save_structured(trainer.model, output_dir, tokenizer=tokenizer)
        return report

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        widths = widths_text(report)
        return (f"structured: {report['num_layers']} layers pruned to remaining ratio {report['remaining_ratio']:.4f} "
                f"of the targeted matrices (heads/FFN width per layer: {widths}); whole model "
                f"{report['model_params_dense']:,} -> {report['model_params']:,} params")

    def load(self, path: str, device: Any = None, **kwargs: Any) -> Any:
        if kwargs:
            raise LoSparseUsageError(f"losparse.load({path!r}): a structurally pruned model takes no "
                                     f"{', '.join(sorted(kwargs))}")
        return load_structured(path, device=device)
