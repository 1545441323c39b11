"""`StructuredMethod`: the hooks of `--method structured`.

Encoders (BERT family): whole heads and FFN neurons pruned on LoSparse's schedule while training, then sliced out.
Decoders (Llama, Qwen2, Mistral): one-shot only (`--oneshot`, `structured_decoder_oneshot`: FLAP-style key/value
groups and FFN neurons from calibration data, removed at once); with `--do_train` the smaller model then
fine-tunes as it is. Both save a plain smaller model with its structure (`save_structured`).
"""

from __future__ import annotations

from typing import Any, Optional

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.methods.base import CompressionMethod, register
from losparse.methods.structured.blocks import SUPPORTED_MODEL_TYPES, check_supported
from losparse.methods.structured.decoder_blocks import SUPPORTED_DECODER_TYPES, check_decoder_supported
from losparse.methods.structured.decoder_oneshot import structured_decoder_oneshot
from losparse.methods.structured.decoder_structure import is_decoder_model
from losparse.methods.structured.pruner import check_structured_config
from losparse.methods.structured.removal import remove_pruned_structures, structured_report, widths_text
from losparse.methods.structured.serialization import STRUCTURE_FILE, load_structured, save_structured
from losparse.methods.structured.trainer import structured_trainer
from losparse.training.compose import compose_trainer
from losparse.training.preflight import load_model_config
from losparse.training.trainer import declare_loss_kwargs

#: where a decoder pruned by `oneshot` keeps its compression report until `save`
ONESHOT_REPORT_ATTRIBUTE = "structured_oneshot_report"


@register("structured")
class StructuredMethod(CompressionMethod):
    """Prune heads and neurons (encoders: on LoSparse's schedule; decoders: one shot), slice them out, save a
    plain smaller model."""

    saved_markers = (STRUCTURE_FILE,)

    def check(self, config: LoSparseConfig, model_name_or_path: str, auto_class: Any,
              cache_dir: Optional[str] = None, oneshot: bool = False) -> None:
        check_structured_config(config)
        model_config = load_model_config(model_name_or_path, cache_dir=cache_dir)
        if getattr(model_config, "model_type", None) in SUPPORTED_DECODER_TYPES and not oneshot:
            raise LoSparseUsageError(
                f"--method structured prunes a {model_config.model_type} decoder in one shot from calibration data: "
                "add --oneshot (and --do_train to fine-tune the pruned model); pruning while training is for "
                f"encoder models of type {', '.join(SUPPORTED_MODEL_TYPES)}")
        if not oneshot:
            check_supported(model_config)

    def check_oneshot(self, config: LoSparseConfig, model_config: Any, options: Any, fine_tune: bool) -> None:
        try:
            check_decoder_supported(model_config)
        except LoSparseUsageError as exc:
            raise LoSparseUsageError(f"--oneshot --method structured: {exc} (encoders prune while training: drop "
                                     "--oneshot)") from None

    def oneshot(self, model: Any, config: LoSparseConfig, calibration_input_ids: Any, options: Any,
                prune: bool = True) -> Any:
        """FLAP-style one-shot pruning to `remaining_ratio`, removed at once (`prune` is ignored: there is no
        unpruned start that training would prune); the report waits on the model for `save`."""
        report = structured_decoder_oneshot(model, calibration_input_ids, config.remaining_ratio,
                                            batch_size=options.oneshot_batch_size)
        setattr(model, ONESHOT_REPORT_ATTRIBUTE, report)
        return model

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        distill = teacher_model is not None
        if distill:
            trainer_kwargs.update(teacher_model=teacher_model, distill_args=distill_args)
        base = compose_trainer(trainer_class, distill=distill)
        if is_decoder_model(trainer_kwargs["model"]):
            if not hasattr(trainer_kwargs["model"], ONESHOT_REPORT_ATTRIBUTE):
                raise LoSparseUsageError("--method structured: a decoder is pruned by --oneshot before it trains")
            declare_loss_kwargs(trainer_kwargs["model"])
            return base(**trainer_kwargs)  # already pruned: the smaller model trains as it is
        return structured_trainer(base)(structured_config=config, allow_resume_config_change=allow_resume_config_change,
                                        **trainer_kwargs)

    def compact(self, trainer: Any) -> dict[str, Any]:
        if is_decoder_model(trainer.model):
            return {}
        mask_ratio = trainer.pruner.achieved_kept_fraction() if trainer.pruner is not None else 1.0
        remove_pruned_structures(trainer.model)
        return {"mask_remaining_ratio": mask_ratio}

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        model = trainer.model
        if is_decoder_model(model):
            report = {**getattr(model, ONESHOT_REPORT_ATTRIBUTE), **facts}
        else:
            report = {**structured_report(model, trainer.dense_target_params, trainer.dense_model_params), **facts}
        save_structured(model, output_dir, tokenizer=tokenizer)
        return report

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        if "kv_heads" in report:
            widths = ", ".join(f"{k}kv/{n}" for k, n in zip(report["kv_heads"], report["intermediate_sizes"]))
        else:
            widths = widths_text(report)
        return (f"structured: {report['num_layers']} layers pruned to remaining ratio {report['remaining_ratio']:.4f} "
                f"of the targeted matrices (per layer: {widths}); whole model "
                f"{report['model_params_dense']:,} -> {report['model_params']:,} params")

    def load(self, path: str, device: Any = None, **kwargs: Any) -> Any:
        if kwargs:
            raise LoSparseUsageError(f"losparse.load({path!r}): a structurally pruned model takes no "
                                     f"{', '.join(sorted(kwargs))}")
        return load_structured(path, device=device)
