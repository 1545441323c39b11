"""The decompose → prune S → compact recipe (methods losparse, itp, movement, lowrank, lowrank_prune_all)."""

from losparse.methods.losparse.method import LoSparseMethod
