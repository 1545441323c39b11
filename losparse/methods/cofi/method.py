"""`CofiMethod`: the hooks of `--method cofi` (CoFi: hidden dims, sub-layers, heads and FFN neurons; BERT family)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.methods.base import CompressionMethod, register
from losparse.methods.cofi.removal import remove_pruned_units
from losparse.methods.cofi.serialization import COFI_FILE, load_cofi, save_cofi
from losparse.methods.cofi.trainer import cofi_trainer
from losparse.methods.cofi.units import check_cofi_config, check_family
from losparse.methods.structured.removal import structured_report, widths_text
from losparse.training.preflight import load_model_config


@register("cofi")
class CofiMethod(CompressionMethod):
    """Learn L0 gates under a Lagrangian size constraint, remove what they zero, save a plain smaller model."""

    #: the manifest beside a saved model that says it is this method's output (`losparse.load` dispatches on it)
    saved_marker = COFI_FILE
    saved_markers = (COFI_FILE,)

    def check(self, config: LoSparseConfig, model_name_or_path: str, auto_class: Any,
              cache_dir: Optional[str] = None, oneshot: bool = False) -> None:
        check_cofi_config(config)
        check_family(load_model_config(model_name_or_path, cache_dir=cache_dir))

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        return cofi_trainer(trainer_class)(cofi_config=config, teacher_model=teacher_model, distill_args=distill_args,
                                           allow_resume_config_change=allow_resume_config_change, **trainer_kwargs)

    def compact(self, trainer: Any) -> dict[str, Any]:
        return remove_pruned_units(trainer.pruner)

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        model = trainer.model
        report = {**structured_report(model, trainer.dense_target_params, trainer.dense_model_params), **facts}
        report.update(hidden_size=model.structure["hidden_size"],
                      attention_layers=[layer["attention"] for layer in model.structure["layers"]],
                      ffn_layers=[layer["ffn"] for layer in model.structure["layers"]],
                      note="cofi: hidden dims, MHA/FFN sub-layers, heads and FFN neurons removed; ratio = kept weights "
                           "of q, k, v, attention output, intermediate and output matrices / their dense count")
        save_cofi(model, output_dir, tokenizer=tokenizer)
        return report

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        widths = widths_text(report)
        forced = sum(report.get("forced_units", {}).values())
        return (f"cofi: {report['num_layers']} layers pruned to remaining ratio {report['remaining_ratio']:.4f} of "
                f"the targeted matrices (hidden {report['hidden_size']}; heads/FFN width per layer: {widths}"
                f"{f'; {forced} units removed to meet the budget' if forced else ''}); whole model "
                f"{report['model_params_dense']:,} -> {report['model_params']:,} params")

    def load(self, path: str, device: Any = None, **kwargs: Any) -> nn.Module:
        """The model saved by `save` (see `load_cofi`); it takes no other options."""
        if kwargs:
            raise LoSparseUsageError(f"losparse.load({path!r}): a CoFi-pruned model takes no "
                                     f"{', '.join(sorted(kwargs))}")
        return load_cofi(path, device=device)
