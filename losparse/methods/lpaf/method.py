"""`LpafMethod`: LoSparse's lifecycle with LPAF's pruner (entry pruning, then factorisation into U·V)."""

from __future__ import annotations

from losparse.methods.base import register
from losparse.methods.decomposing import DecomposingMethod
from losparse.methods.lpaf.pruner import LpafPruner


@register("lpaf")
class LpafMethod(DecomposingMethod):
    """Decompose with entry masks, prune then factorise during training (`LpafPruner`), compact, save as U·V."""

    pruner_class = LpafPruner
