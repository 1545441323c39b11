"""Which decoder groups to keep: per-group calibration scores, one global ranking, the parameter budget.

Scores are read on the output side of each sub-layer, where a group's whole contribution enters the
residual stream: the input channels j of o_proj (a key/value group owns the G·d channels of its query
heads) and of down_proj (an FFN neuron owns one channel). With W the (H, in) weight and x_j the channel's
calibration inputs:

  flap   (FLAP, An et al. 2024, its WIFV metric)  s_j = Var_tokens(x_j) · ‖W[:, j]‖²₂
         Removing channel j and adding its mean contribution W[:, j]·E[x_j] to the bias (see
         `decoder_masking`) leaves an error whose expected energy is exactly Var(x_j)·‖W[:, j]‖² (for one
         channel; the cross terms of several are ignored): the score is the loss the compensated removal costs.
  wanda  (Wanda-sp)                               s_j = Σ_i |W_ij| · ‖x_j‖₂
         Wanda's |weight| × input norm, summed over the output rows (no compensation assumed).

A group's score is the sum over its channels. To rank heads and neurons in ONE ranking, 'flap' is
standardised per layer and matrix kind, as FLAP's 'AL-AM' structure does (its `standarlization`, axis 1
of the (layers, channels) stack): within each layer's attention and each layer's MLP, subtract the mean
and divide by the standard deviation, so the z-scores of both kinds share one scale and the budget,
not the raw magnitudes of the two matrices, decides how many of each survive. 'wanda' groups compete by
their score per weight (the sum divided by the group's weight count, like `--method structured`'s
importance), without standardisation.

The keep rule is `losparse.core.pruner.keep_within_budget`: the best groups whose cumulative weights fit in
`remaining_ratio` of the targeted weights, so the achieved ratio falls short of the target by less than one group.
By default every sub-layer keeps at least its best group (its ranking score is set to +inf): FLAP allows
emptying a whole attention or MLP, but an emptied attention turns the layer into a fixed bias there and
its removal is rarely worth the risk one-shot; `keep_one_per_sublayer=False` allows it (`EmptyAttention`).
"""

from __future__ import annotations

import torch

from losparse.core.errors import LoSparseUsageError
from losparse.core.pruner import keep_within_budget
from losparse.methods.structured.decoder_blocks import DecoderBlock, decoder_group_sizes
from losparse.methods.structured.decoder_calibration import ChannelStatistics

SCORES = ("flap", "wanda")


def channel_scores(weight: torch.Tensor, stats: ChannelStatistics, score: str) -> torch.Tensor:
    """Per input channel of an output-side linear, weight (out, in): 'flap' Var(x_j)·‖W[:, j]‖², 'wanda'
    ‖x_j‖·Σ_i |W_ij| (in,), float64."""
    w = weight.detach().to(device=stats.sum.device, dtype=torch.float64)
    if score == "flap":
        return stats.variance() * w.square().sum(dim=0)
    return stats.norm() * w.abs().sum(dim=0)


def attention_group_scores(block: DecoderBlock, stats: ChannelStatistics, score: str) -> torch.Tensor:
    """(kv_groups,): the channel scores of o_proj summed over each key/value group's G·d columns."""
    return channel_scores(block.o_proj.weight, stats, score).view(block.kv_groups, block.group_width).sum(dim=1)


def neuron_group_scores(block: DecoderBlock, stats: ChannelStatistics, score: str) -> torch.Tensor:
    """(neurons,): the channel scores of down_proj, one per FFN neuron."""
    return channel_scores(block.down_proj.weight, stats, score)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std (unbiased, as torch.std); x − mean where the std is 0 or undefined (≤ 1 entry)."""
    centred = x - x.mean() if x.numel() else x
    std = x.std() if x.numel() > 1 else x.new_zeros(())
    return centred / std if bool(std > 0) else centred


def ranking_scores(blocks: list[DecoderBlock], scores: list[tuple[torch.Tensor, torch.Tensor]],
                   score: str) -> torch.Tensor:
    """One flat vector (layout of `decoder_group_sizes`) on which all groups of all layers compete."""
    parts = []
    for block, (kv, neurons) in zip(blocks, scores):
        if score == "flap":
            parts += [standardise(kv), standardise(neurons)]
        else:
            parts += [kv / block.group_params, neurons / block.neuron_params]
    return torch.cat(parts)


def select_decoder_groups(blocks: list[DecoderBlock], scores: list[tuple[torch.Tensor, torch.Tensor]], score: str,
                          remaining_ratio: float, keep_one_per_sublayer: bool = True) -> torch.Tensor:
    """Flat keep mask: the best-ranked groups whose weights fit in `remaining_ratio` of all targeted weights."""
    sizes = decoder_group_sizes(blocks)
    ranking = ranking_scores(blocks, scores, score).to(torch.float64).cpu()
    if keep_one_per_sublayer:
        forced, offset = [], 0
        for (kv, neurons) in scores:
            for part in (kv, neurons):
                if part.numel():
                    forced.append(offset + int(torch.argmax(part.cpu())))
                offset += part.numel()
        least = float(sizes[forced].sum())
        if least > remaining_ratio * float(sizes.sum()) + 0.5:
            raise LoSparseUsageError(
                f"remaining_ratio {remaining_ratio!r} is below {least / float(sizes.sum()):.4f}, the least that keeps "
                "one key/value group and one FFN neuron per layer; pass keep_one_per_sublayer=False to allow less")
        ranking[forced] = float("inf")
    return keep_within_budget(ranking, sizes, remaining_ratio)


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of the k highest scores (ties: the earlier entry wins)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.cpu(), descending=True, stable=True)[:k]] = True
    return keep
