"""`--method lpaf`: Low-Rank Prune-And-Factorize (Ren & Zhu 2023) — `factorize` (the algorithm), `pruner`
(its two-phase schedule inside one training run) and `method` (the run-script hooks)."""

from losparse.methods.lpaf.method import LpafMethod
from losparse.methods.lpaf.pruner import LpafPruner
