"""`compose_trainer`: any task trainer plus LoSparse pruning and/or knowledge distillation, as one class.

There is one way to add pruning and/or distillation to a task trainer (`Trainer`, `Seq2SeqTrainer`,
`losparse.cli.tasks.squad.QuestionAnsweringTrainer`, your own subclass):

    compose_trainer(base, prune=True, distill=False)   # class LoSparse<Base>(LoSparseTrainerMixin, base)
    compose_trainer(base, prune=True, distill=True)    # class LoSparseDistillation<Base>(LoSparseTrainerMixin,
                                                       #       DistillationTrainerMixin, base)
    compose_trainer(base, prune=False, distill=True)   # class Distillation<Base>(DistillationTrainerMixin, base)

The classes are cached (the same arguments give the same class); `LoSparseTrainer` and
`LoSparseSeq2SeqTrainer` are `compose_trainer(Trainer, prune=True)` and `(Seq2SeqTrainer, prune=True)`.
"""

from __future__ import annotations

import functools

from transformers import Seq2SeqTrainer, Trainer

from losparse.core.errors import LoSparseUsageError
from losparse.training.distill import DistillationTrainerMixin
from losparse.training.trainer import LoSparseTrainerMixin


def compose_trainer(base: type, *, prune: bool = False, distill: bool = False) -> type:
    """`base` (a `transformers.Trainer` subclass) with LoSparse pruning and/or knowledge distillation.

    The one way to build these classes (see the module docstring): the bases are
    `(LoSparseTrainerMixin, DistillationTrainerMixin, base)`, leaving out the mixins not asked for, and the
    name says what was composed, e.g. `LoSparseDistillationSeq2SeqTrainer`. Neither flag: `base` itself.
    The same arguments always give the same class.
    """
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise LoSparseUsageError(f"compose_trainer needs a transformers.Trainer subclass, not {base!r}")
    return _compose(base, bool(prune), bool(distill))


@functools.lru_cache(maxsize=None)
def _compose(base: type, prune: bool, distill: bool) -> type:
    if issubclass(base, (LoSparseTrainerMixin, DistillationTrainerMixin)):
        raise LoSparseUsageError(
            f"{base.__name__} already holds a LoSparse mixin; pass the plain task trainer (Trainer, Seq2SeqTrainer, "
            "QuestionAnsweringTrainer, ...) and say what to add with prune= and distill="
        )
    if not (prune or distill):
        return base
    mixins: tuple[type, ...] = (LoSparseTrainerMixin,) if prune else ()
    if distill:
        mixins += (DistillationTrainerMixin,)
    name = ("LoSparse" if prune else "") + ("Distillation" if distill else "") + base.__name__
    added = " and ".join(part for part, wanted in (("LoSparse pruning (see `LoSparseTrainerMixin`)", prune),
                                                   ("knowledge distillation (see `DistillationTrainerMixin`)", distill))
                         if wanted)
    return type(name, (*mixins, base), {"__module__": __name__, "__qualname__": name,
                                         "__doc__": f"`{base.__module__}.{base.__qualname__}` + {added}."})


#: `transformers.Trainer` + LoSparse pruning.
LoSparseTrainer = compose_trainer(Trainer, prune=True)
#: `transformers.Seq2SeqTrainer` + LoSparse pruning.
LoSparseSeq2SeqTrainer = compose_trainer(Seq2SeqTrainer, prune=True)
