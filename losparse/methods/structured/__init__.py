"""`--method structured`: structured pruning of whole attention heads and FFN neurons, the peer users would pick.

The model is not decomposed. Its prunable *groups* are, per encoder layer (BERT family):
  - a head h (head size d, hidden size H): rows h·d..(h+1)·d of query, key and value and the same
    columns of attention.output.dense — 4·H·d weights;
  - an FFN neuron j: row j of intermediate.dense and column j of output.dense — 2·H weights.
Together they cover exactly the matrices LoSparse targets, so the ratio means the same thing: kept
weights of the targeted matrices / their dense count (biases, embeddings, LayerNorm, head: not counted).

Importance is the project's sensitivity (or magnitude, `--importance`), per group: the sum of
|w·∂L/∂w| over the group's weights divided by its weight count (a per-parameter mean, so heads and
neurons compete on one scale), smoothed by an EMA with `beta1`. The schedule is `CubicSchedule`
(paper variant) from 1 to `remaining_ratio`; at each mask step the keep rule is the one of
`LoSparsePruner.update_masks`: rank all groups of all layers globally, keep the best ones whose
cumulative weights fit in p_t of the targeted weights.

Masking is by zeroing: after every optimizer step from t_i, the pruned groups' weights (and the biases
of their q/k/v/intermediate rows) are set to zero, so momentum or weight decay never revives them. The
zeroed output-side columns make a pruned group contribute exactly nothing, which is why
`remove_pruned_structures` (slicing the matrices) keeps the masked model's function exactly.

A layer whose heads are all pruned gets `NoSelfAttention` (returns a (B, L, 0) context; the output
dense of 0 inputs adds only its bias). The config of a pruned model still names the dense sizes, so a
pruned model is saved with `STRUCTURE_FILE` (kept heads and FFN width per layer) and reloaded with
`load_structured`; plain `from_pretrained` refuses it (shape mismatch), it never loads it wrongly.
MPNet (relative position bias per head, computed outside the layers) and DeBERTa are not supported.

Decoders (Llama, Qwen2, Mistral) have a one-shot structured peer in the `decoder_*` modules:
`structured_decoder_oneshot` (FLAP / Wanda-sp scores from calibration data, one global ranking of key/value
groups and FFN neurons, FLAP's bias compensation, physical removal); `save_structured` / `losparse.load`
save and reload the result (`decoder_structure`).
"""

from losparse.methods.structured.blocks import (
    SUPPORTED_MODEL_TYPES,
    EncoderBlock,
    NoSelfAttention,
    check_supported,
    encoder_blocks,
    group_sizes,
    select_groups,
    split_keep,
    target_params,
    zero_pruned,
)
from losparse.methods.structured.decoder_blocks import (
    SUPPORTED_DECODER_TYPES,
    DecoderBlock,
    EmptyAttention,
    check_decoder_supported,
    decoder_blocks,
    decoder_group_sizes,
    decoder_target_params,
)
from losparse.methods.structured.decoder_masking import mask_attention, mask_mlp
from losparse.methods.structured.decoder_oneshot import structured_decoder_oneshot
from losparse.methods.structured.decoder_removal import remove_pruned_groups
from losparse.methods.structured.decoder_structure import apply_decoder_structure, decoder_structure_of
from losparse.methods.structured.pruner import GroupImportance, StructuredPruner, check_structured_config
from losparse.methods.structured.removal import (
    build_structured_peer,
    remove_pruned_structures,
    structure_of,
    structured_report,
)
from losparse.methods.structured.serialization import STRUCTURE_FILE, load_structured, save_structured
from losparse.methods.structured.trainer import StructuredCallback, StructuredTrainerMixin, structured_trainer
