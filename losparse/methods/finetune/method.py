"""`FinetuneMethod`: nothing compressed; the task trainer (with distillation if asked) and `save_pretrained`."""

from __future__ import annotations

from typing import Any, Optional

from losparse.core.config import LoSparseConfig
from losparse.methods.base import CompressionMethod, register
from losparse.training.compose import compose_trainer
from losparse.training.trainer import declare_loss_kwargs


@register("finetune")
class FinetuneMethod(CompressionMethod):
    """The dense baseline: the model trains and is saved as the plain transformers model it is."""

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        declare_loss_kwargs(trainer_kwargs["model"])
        if teacher_model is not None:
            trainer_kwargs.update(teacher_model=teacher_model, distill_args=distill_args)
        return compose_trainer(trainer_class, distill=teacher_model is not None)(**trainer_kwargs)

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        trainer.model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        total = sum(p.numel() for p in trainer.model.parameters())
        return {"remaining_ratio": 1.0, "model_params": total, "model_params_dense": total, "num_layers": 0}

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        return f"finetune: dense model saved as it is ({report['model_params']:,} params)"
