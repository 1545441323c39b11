"""`structured_decoder_oneshot`: FLAP / Wanda-sp style one-shot structured pruning of a Llama-family decoder.

The structured peer of one-shot LoSparse (`losparse.oneshot_compress`): no training, a few calibration
sequences decide which key/value groups (with their query heads) and FFN neurons of each layer stay
(`decoder_blocks`), and the rest is physically removed (`decoder_removal`), at the same remaining ratio of
the same 7 matrices.

Two passes over the blocks (each block's forward in chunks of `batch_size` sequences; only one block's
activations alive at a time):

  1. allocation, on the dense model: per block, the input statistics of o_proj and down_proj give every
     group its score (`decoder_scores`: FLAP's Var(x_j)·‖W[:, j]‖², standardised per layer and kind, or
     Wanda-sp's |W|·‖x‖); ONE global ranking under the parameter budget (`keep_within_budget`) fixes how
     many groups each sub-layer keeps, so the achieved ratio is within one group of the target;
  2. pruning, block by block on the outputs of the already-pruned earlier blocks (`recalibrate=True`): the
     attention's statistics are recorded again on the block's real (pruned-upstream) inputs, its best
     groups up to its allocated count are kept, the rest masked with FLAP's bias compensation (the removed
     channels' mean contribution W[:, R]·E[x_R] added to o_proj's bias, `decoder_masking`); then the MLP's
     statistics are recorded on the output of that pruned attention, and the same for the MLP; the pruned
     block's outputs are the next block's inputs.
Why two passes: a global ranking needs every layer's scores before any layer is cut, while the means the
compensation adds, and the choice of which groups fill a sub-layer's allocation, are only right for the
inputs the pruned model will really see. FLAP itself ('AL-AM') decides and compensates all from the dense
activations; `recalibrate=False` does exactly that (one pass, masks and means of pass 1).
"""

from __future__ import annotations

import logging
import time
from numbers import Real
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from losparse.core.errors import LoSparseUsageError
from losparse.methods.structured.decoder_blocks import (
    DecoderBlock,
    decoder_blocks,
    decoder_target_params,
    split_decoder_keep,
)
from losparse.methods.structured.decoder_calibration import (
    BlockState,
    ChannelStatistics,
    capture_block_inputs,
    record_inputs,
    run_block,
)
from losparse.methods.structured.decoder_masking import mask_attention, mask_mlp
from losparse.methods.structured.decoder_removal import remove_pruned_groups
from losparse.methods.structured.decoder_scores import (
    SCORES,
    attention_group_scores,
    keep_top,
    neuron_group_scores,
    select_decoder_groups,
)

logger = logging.getLogger("losparse")

Masks = list[tuple[torch.Tensor, torch.Tensor]]


def check_decoder_oneshot_arguments(calibration_input_ids: Any, remaining_ratio: Any, batch_size: Any,
                                    score: Any) -> None:
    """One-line usage errors for the arguments of `structured_decoder_oneshot`, before the model is touched."""
    if isinstance(remaining_ratio, bool) or not isinstance(remaining_ratio, Real) \
            or not 0.0 < float(remaining_ratio) <= 1.0:
        raise LoSparseUsageError(f"remaining_ratio {remaining_ratio!r} is out of range; it must be in (0, 1]")
    if score not in SCORES:
        raise LoSparseUsageError(f"score {score!r} is not known; choose one of: {', '.join(SCORES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LoSparseUsageError(f"batch_size {batch_size!r} must be a positive integer")
    if not isinstance(calibration_input_ids, torch.Tensor) or calibration_input_ids.dim() != 2 \
            or calibration_input_ids.numel() == 0 or calibration_input_ids.is_floating_point():
        shape = tuple(calibration_input_ids.shape) if isinstance(calibration_input_ids, torch.Tensor) else None
        raise LoSparseUsageError("structured decoder pruning needs calibration token ids of shape (num_samples, "
                                 f"seq_len), got {type(calibration_input_ids).__name__} of shape {shape}")


def _progress(blocks: list[DecoderBlock], desc: str, show: bool) -> Any:
    return tqdm(blocks, desc=desc, disable=not show)


def _dense_statistics(model: nn.Module, blocks: list[DecoderBlock], calibration_input_ids: torch.Tensor,
                      batch_size: int, show_progress: bool) -> list[tuple[ChannelStatistics, ChannelStatistics]]:
    """Pass 1: (o_proj input, down_proj input) statistics of every block on the dense model's activations."""
    states = capture_block_inputs(model, blocks[0].layer, calibration_input_ids, batch_size)
    collected = []
    for block in _progress(blocks, "structured decoder: scoring", show_progress):
        stats, states = record_inputs(block.layer, {"o": block.o_proj, "down": block.down_proj}, states)
        collected.append((stats["o"], stats["down"]))
    return collected


def _prune_block(block: DecoderBlock, counts: tuple[int, int], states: list[BlockState], score: str,
                 compensate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2 for one block: keep `counts` (kv groups, neurons), chosen and compensated on `states`."""
    stats, _ = record_inputs(block.layer, {"o": block.o_proj}, states)
    keep_kv = keep_top(attention_group_scores(block, stats["o"], score), counts[0])
    mask_attention(block, keep_kv, stats["o"].mean() if compensate else None)
    stats, _ = record_inputs(block.layer, {"down": block.down_proj}, states)  # after the attention's pruning
    keep_neurons = keep_top(neuron_group_scores(block, stats["down"], score), counts[1])
    mask_mlp(block, keep_neurons, stats["down"].mean() if compensate else None)
    return keep_kv, keep_neurons


def _prune_recalibrated(model: nn.Module, blocks: list[DecoderBlock], allocation: Masks,
                        calibration_input_ids: torch.Tensor, batch_size: int, score: str, compensate: bool,
                        show_progress: bool) -> Masks:
    """Pass 2: prune block by block to the allocated counts, each on the outputs of the pruned blocks before it."""
    states = capture_block_inputs(model, blocks[0].layer, calibration_input_ids, batch_size)
    masks = []
    for index, block in enumerate(_progress(blocks, "structured decoder: pruning", show_progress)):
        kv, neurons = allocation[index]
        masks.append(_prune_block(block, (int(kv.sum()), int(neurons.sum())), states, score, compensate))
        if index + 1 < len(blocks):
            states = run_block(block.layer, states)
    return masks


def _kept_params(blocks: list[DecoderBlock], masks: Masks) -> int:
    return sum(int(kv.sum()) * b.group_params + int(n.sum()) * b.neuron_params for b, (kv, n) in zip(blocks, masks))


def _report(blocks: list[DecoderBlock], masks: Masks, dense: tuple[int, int], model: nn.Module,
            options: dict[str, Any]) -> dict[str, Any]:
    """The compression report: achieved ratio and counts (from the masks), per-layer widths, the options used."""
    dense_target, dense_model = dense
    kept = _kept_params(blocks, masks)
    return {
        "method": "structured_decoder_oneshot", **options,
        "remaining_ratio": kept / dense_target, "num_layers": len(blocks),
        "target_dense_params": dense_target, "target_params": kept,
        "group_params": {"kv_group": blocks[0].group_params, "ffn_neuron": blocks[0].neuron_params},
        "model_params_dense": dense_model, "model_params": sum(p.numel() for p in model.parameters()),
        "kv_heads": [int(kv.sum()) for kv, _ in masks],
        "attention_heads": [int(kv.sum()) * blocks[0].queries_per_kv for kv, _ in masks],
        "intermediate_sizes": [int(n.sum()) for _, n in masks],
        "note": "ratio = kept weights of q, k, v, o, gate, up, down / their dense count; whole key/value groups "
                "(with their query heads) and FFN neurons removed",
    }


@torch.no_grad()
def structured_decoder_oneshot(model: nn.Module, calibration_input_ids: torch.Tensor, remaining_ratio: float,
                               batch_size: int = 8, score: str = "flap", show_progress: bool = True, *,
                               bias_compensation: bool = True, keep_one_per_sublayer: bool = True,
                               recalibrate: bool = True, remove: bool = True) -> dict[str, Any]:
    """Prune a Llama/Qwen2/Mistral decoder in place to `remaining_ratio` of its 7 targeted matrices; the report.

    calibration_input_ids: (num_samples, seq_len) token ids, packed without padding. `score`: "flap" | "wanda".
    `bias_compensation`: FLAP's b += W[:, R]·E[x_R]. `keep_one_per_sublayer`: every attention and MLP keeps at
    least its best group (False: sub-layers may be emptied). `recalibrate`: pass 2 on the pruned model's own
    activations (False: FLAP's one pass). `remove`: slice the pruned groups out (False: they stay masked, the
    masks in `model.decoder_keep` for `remove_pruned_groups`). Save the result with `save_structured`; it
    reloads with `losparse.load`. See the module docstring for the flow and `_report` for the report's fields.
    """
    check_decoder_oneshot_arguments(calibration_input_ids, remaining_ratio, batch_size, score)
    blocks = decoder_blocks(model)
    dense = decoder_target_params(blocks), sum(p.numel() for p in model.parameters())
    started, was_training = time.perf_counter(), model.training
    model.eval()
    try:
        stats = _dense_statistics(model, blocks, calibration_input_ids, batch_size, show_progress)
        scores = [(attention_group_scores(b, o, score), neuron_group_scores(b, d, score))
                  for b, (o, d) in zip(blocks, stats)]
        keep = select_decoder_groups(blocks, scores, score, float(remaining_ratio), keep_one_per_sublayer)
        masks = split_decoder_keep(blocks, keep)
        if recalibrate:
            masks = _prune_recalibrated(model, blocks, masks, calibration_input_ids, batch_size, score,
                                        bias_compensation, show_progress)
        else:
            for block, (kv, neurons), (o, d) in zip(blocks, masks, stats):
                mask_attention(block, kv, o.mean() if bias_compensation else None)
                mask_mlp(block, neurons, d.mean() if bias_compensation else None)
        model.decoder_keep = masks
        report = _report(blocks, masks, dense, model, {
            "score": score, "target_ratio": float(remaining_ratio), "bias_compensation": bias_compensation,
            "keep_one_per_sublayer": keep_one_per_sublayer, "recalibrated": recalibrate, "removed": remove,
            "calibration_tokens": int(calibration_input_ids.numel())})
        if remove:
            remove_pruned_groups(model)
            report["model_params"] = sum(p.numel() for p in model.parameters())
    finally:
        model.train(was_training)
    report["seconds"] = time.perf_counter() - started
    logger.info("structured decoder one-shot (%s): ratio %.4f (target %.4f) in %.1f s", score,
                report["remaining_ratio"], report["target_ratio"], report["seconds"])
    return report
