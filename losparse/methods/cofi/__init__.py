"""`--method cofi`: CoFi (Xia et al., ACL 2022), coarse- and fine-grained L0 pruning of a BERT-family encoder.

Hard-concrete gates (`masks`) on the hidden dims (one set shared by all layers), each MHA and FFN sub-layer,
each head and each FFN neuron (`units`, `--cofi_units`) enter the forward through hooks (`hooks`). Their
expected kept size (`size`) is held to the target by a Lagrangian (`lagrangian`) whose λ are trained by
gradient ascent; an optional teacher adds CoFi's distillation (`distill`). One run has three stages
(pre-fine-tune, pruning, fine-tune with the gates fixed; `pruner`); at the end of pruning the ratio asked
for is met (`budget`). Removal folds the final gates into the weights and slices out what they zero
(`removal`); the output is a plain smaller model, saved with its structure (`serialization`). See docs/cofi.md.
"""

from losparse.methods.cofi.budget import meet_budget
from losparse.methods.cofi.distill import LayerProjection, layer_alignment, layer_loss, teacher_layers
from losparse.methods.cofi.hooks import GateState, install_gates, kept_layer_norm, remove_gates
from losparse.methods.cofi.lagrangian import Lagrangian
from losparse.methods.cofi.masks import HardConcreteMask
from losparse.methods.cofi.method import CofiMethod
from losparse.methods.cofi.pruner import CofiPruner
from losparse.methods.cofi.removal import (
    Keep,
    SkippedSublayer,
    cofi_structure,
    fold_gates,
    keep_from_gates,
    remove_pruned_units,
    slice_units,
)
from losparse.methods.cofi.serialization import COFI_FILE, load_cofi, save_cofi
from losparse.methods.cofi.size import counted_size, expected_sparsity, kept_size
from losparse.methods.cofi.trainer import CofiCallback, CofiTrainerMixin, cofi_trainer
from losparse.methods.cofi.units import COFI_UNITS, Shape, check_cofi_config, model_shape, parse_units
