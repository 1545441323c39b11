"""The compression methods, registered by name: `get_method(name)` gives the hooks the run scripts call.

Each folder is one method (see `base.CompressionMethod` for the lifecycle):
    losparse/    decompose W = U·V + S, prune S's neurons while training (also itp, movement, lowrank, ...)
    lpaf/        prune entries, then factorise into U·V (Low-Rank Prune-And-Factorize)
    structured/  whole attention heads and FFN neurons (BERT family), physically removed
    structured_losparse/  structured first, then LoSparse on the survivors (two stages, one run)
    cofi/        CoFi: L0 gates on hidden dims, sub-layers, heads and FFN neurons (BERT family), removed
    finetune/    nothing compressed (the dense reference)
    oneshot/     compression from calibration data without training (decoder LMs)
The rows of the method table, as data, are `losparse.core.methods`.
"""

# the method table, as data (its home before the methods became folders)
from losparse.core.methods import METHOD_SPECS, METHODS, MethodSpec, final_kept_fraction, rank_ratio
from losparse.methods.base import (
    REGISTRY,
    CompressionMethod,
    get_method,
    method_for_directory,
    register,
    run_artifact_dirs,
)
from losparse.methods.cofi.method import CofiMethod
from losparse.methods.cofi_losparse import CofiLoSparseMethod
from losparse.methods.finetune import FinetuneMethod
from losparse.methods.losparse import LoSparseMethod
from losparse.methods.lpaf import LpafMethod
from losparse.methods.structured.method import StructuredMethod
from losparse.methods.structured_losparse import StructuredLoSparseMethod
