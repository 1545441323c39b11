"""Reorder FFN neurons so that the kept neurons of each compact layer form one contiguous block.

An FFN computes down(act(up(x))) with an elementwise activation (gated: act(gate(x)) * up(x)), so
numbering its intermediate neurons differently changes nothing, provided the producers' output rows
(U rows, S_kept rows, bias) and the consumer's input columns (V columns, S_kept columns) move together.
`make_contiguous` picks the numbering that puts every kept set living on the intermediate dimension
into one range [a, a+m): a rows-pruned producer's (`intermediate.dense`, `gate_proj`, `up_proj`, `fc1`,
`c_fc`, `wi`) and a columns-pruned consumer's (`output.dense`, `down_proj`, `fc2`, `c_proj`, `wo`).
`CompactLoSparseLinear` then replaces its index_add/index_select by a slice (`kept_start`).

Order of the neurons: with one kept set A, [A, rest]; with two (gate and up of a gated FFN, both rows-
pruned), [A only, both, B only, neither], which makes A = the first two groups and B = the middle two.
Within each group the original order is kept, so kept indices stay increasing (what `losparse.load`
checks). A third kept set (a mixed prune_dim that `compact` never produces from one config) keeps its
indexed path; the report says which sets ended contiguous.

What is deliberately not permuted:
  * kept sets on the hidden (residual) dimension: the output of `output.dense` / `down_proj` and the
    input of the FFN's first layer are shared by the whole residual stream, every layer and the
    embeddings, so one numbering would have to serve all of their kept sets at once; they keep the
    indexed add.
  * attention. Permuting dims inside one head is function-preserving (v rows with o columns; the same
    permutation of q and k rows keeps q·kᵀ), and heads as a whole may be reordered, but a kept set spread
    over h heads becomes contiguous only per head: one block needs every head but the two at its ends to
    be fully kept or fully pruned, which pruning by a global threshold does not give. Per-head blocks of
    different lengths would need a segmented add, which the forward does not have. Rotary embeddings
    (Llama, Qwen2, Mistral) rotate pairs of q/k dims together, which forbids most permutations of q/k.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from losparse.core.decompose import losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear, dense_type_of

#: One FFN relative to the module that holds it: (producer paths, consumer path).
FfnSpec = tuple[tuple[str, ...], str]
_BERT_FFN: tuple[FfnSpec, ...] = ((("intermediate.dense",), "output.dense"),)
_LLAMA_FFN: tuple[FfnSpec, ...] = ((("gate_proj", "up_proj"), "down_proj"),)
_FC_FFN: tuple[FfnSpec, ...] = ((("fc1",), "fc2"),)
#: model_type -> the FFN layouts of that family (module names as in `losparse.core.families`).
FFN_LAYOUTS: dict[str, tuple[FfnSpec, ...]] = {
    "bert": _BERT_FFN, "roberta": _BERT_FFN, "xlm-roberta": _BERT_FFN, "electra": _BERT_FFN,
    "deberta-v2": _BERT_FFN, "mpnet": _BERT_FFN,
    "llama": _LLAMA_FFN, "qwen2": _LLAMA_FFN, "mistral": _LLAMA_FFN,
    "bart": _FC_FFN, "opt": _FC_FFN,
    "t5": ((("wi",), "wo"), (("wi_0", "wi_1"), "wo")),
    "gpt2": ((("c_fc",), "c_proj"),),
}


def _is_contiguous(index: torch.Tensor) -> bool:
    if index.numel() == 0:
        return True
    start = int(index[0])
    return bool((index == torch.arange(start, start + index.numel(), device=index.device)).all())


def _output_kept(module: nn.Module) -> Optional[torch.Tensor]:
    """Kept indices of `module` on its output dimension, or None (not compact, or pruned on its input)."""
    if isinstance(module, CompactLoSparseLinear) and module.prune_dim == "rows":
        return module.kept_index
    return None


def _input_kept(module: nn.Module) -> Optional[torch.Tensor]:
    if isinstance(module, CompactLoSparseLinear) and module.prune_dim == "columns":
        return module.kept_index
    return None


def _neuron_order(masks: list[torch.Tensor]) -> torch.Tensor:
    """perm with new neuron j = old neuron perm[j]: the first two kept sets contiguous (module docstring)."""
    if len(masks) == 1:
        group = (~masks[0]).long()  # kept 0, pruned 1
    else:
        a, b = masks[0], masks[1]
        group = torch.full_like(a, 3, dtype=torch.long)
        group[a & ~b] = 0
        group[a & b] = 1
        group[~a & b] = 2
    return torch.argsort(group, stable=True)


def _renumbered(kept: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new kept_index in increasing order, order) where order reorders the stored S neurons to match."""
    new_index = inverse[kept]
    order = torch.argsort(new_index)
    return new_index[order], order


@torch.no_grad()
def _permute_outputs(module: nn.Module, perm: torch.Tensor, inverse: torch.Tensor) -> None:
    """Renumber the output neurons of a producer: new output j = old output perm[j]."""
    if isinstance(module, CompactLoSparseLinear):
        rank = module.rank
        if module.prune_dim == "rows":
            module.low_rank_u.copy_(module.low_rank_u[perm])
            if module.num_kept:
                new_index, order = _renumbered(module.kept_index, inverse)
                module.fused_weight[rank:] = module.fused_weight[rank:][order]
                module.kept_index.copy_(new_index)
        else:
            module.fused_weight.copy_(module.fused_weight[perm])
    elif dense_type_of(module) == "conv1d":  # weight stored (in, out)
        module.weight.copy_(module.weight[:, perm])
    else:
        module.weight.copy_(module.weight[perm])
    if module.bias is not None:
        module.bias.copy_(module.bias[perm])


@torch.no_grad()
def _permute_inputs(module: nn.Module, perm: torch.Tensor, inverse: torch.Tensor) -> None:
    """Renumber the input neurons of a consumer the same way as its producers' outputs."""
    if isinstance(module, CompactLoSparseLinear):
        rank = module.rank
        if module.prune_dim == "rows":
            module.fused_weight.copy_(module.fused_weight[:, perm])
        else:
            module.low_rank_v.copy_(module.low_rank_v[:, perm])
            if module.num_kept:
                new_index, order = _renumbered(module.kept_index, inverse)
                module.fused_weight[:, rank:] = module.fused_weight[:, rank:][:, order]
                module.kept_index.copy_(new_index)
    elif dense_type_of(module) == "conv1d":
        module.weight.copy_(module.weight[perm])
    else:
        module.weight.copy_(module.weight[:, perm])


def _check_member(name: str, module: nn.Module) -> None:
    if isinstance(module, LoSparseLinear):
        raise LoSparseUsageError(f"{name} is a training LoSparseLinear; make_contiguous permutes compact layers: "
                                 "call losparse.compact(model) first")
    if not isinstance(module, CompactLoSparseLinear) and dense_type_of(module) is None:
        raise LoSparseUsageError(f"{name} is a {type(module).__name__}; make_contiguous permutes "
                                 "CompactLoSparseLinear, nn.Linear and Conv1D layers only")


@torch.no_grad()
def make_group_contiguous(producers: dict[str, nn.Module], consumer_name: str,
                          consumer: nn.Module) -> dict[str, Any]:
    """Permute one FFN (producers' outputs = consumer's inputs) so its kept sets on that dimension are contiguous.

    producers: name -> layer computing the intermediate neurons (outputs, all of the same size n);
    consumer: the layer reading them (inputs of size n). Each may be a `CompactLoSparseLinear` of either
    prune_dim, an `nn.Linear` or a GPT-2 `Conv1D`. Returns this group's report entry.
    """
    for name, module in [*producers.items(), (consumer_name, consumer)]:
        _check_member(name, module)
    sizes = {name: (module.out_features if isinstance(module, CompactLoSparseLinear) else
                    (module.nf if dense_type_of(module) == "conv1d" else module.out_features))
             for name, module in producers.items()}
    consumer_in = consumer.in_features if isinstance(consumer, CompactLoSparseLinear) else (
        consumer.nx if dense_type_of(consumer) == "conv1d" else consumer.in_features)
    neurons = consumer_in
    if any(size != neurons for size in sizes.values()):
        raise LoSparseUsageError(f"FFN {consumer_name}: producer outputs {sizes} do not match its {neurons} inputs")
    kept_sets = {name: _output_kept(module) for name, module in producers.items()}
    kept_sets[consumer_name] = _input_kept(consumer)
    kept_sets = {name: index for name, index in kept_sets.items() if index is not None and index.numel()}
    entry: dict[str, Any] = {"producers": list(producers), "consumer": consumer_name, "neurons": neurons,
                             "permuted": False, "kept_sets": {}}
    before = {name: _is_contiguous(index) for name, index in kept_sets.items()}
    if kept_sets and not all(before.values()):
        device = next(iter(kept_sets.values())).device
        masks = []
        for index in kept_sets.values():
            mask = torch.zeros(neurons, dtype=torch.bool, device=device)
            mask[index] = True
            masks.append(mask)
        perm = _neuron_order(masks)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(neurons, device=device)
        for module in producers.values():
            _permute_outputs(module, perm.to(_device_of(module)), inverse.to(_device_of(module)))
        _permute_inputs(consumer, perm.to(_device_of(consumer)), inverse.to(_device_of(consumer)))
        entry["permuted"] = True
    for name, module in [*producers.items(), (consumer_name, consumer)]:
        if isinstance(module, CompactLoSparseLinear):
            module.refresh_layout()
    for name in kept_sets:
        module = consumer if name == consumer_name else producers[name]
        entry["kept_sets"][name] = {"kept": module.num_kept, "contiguous_before": before[name],
                                    "contiguous_after": module.kept_start is not None}
    return entry


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _ffn_groups(model: nn.Module, layouts: tuple[FfnSpec, ...]) -> list[tuple[dict[str, nn.Module], str, nn.Module]]:
    """Every FFN of the model: the modules holding all names of one layout."""
    groups = []
    for parent_name, parent in model.named_modules():
        for producer_paths, consumer_path in layouts:
            try:
                members = [parent.get_submodule(path) for path in (*producer_paths, consumer_path)]
            except AttributeError:
                continue
            prefix = f"{parent_name}." if parent_name else ""
            producers = {prefix + path: module for path, module in zip(producer_paths, members)}
            groups.append((producers, prefix + consumer_path, members[-1]))
    return groups


@torch.no_grad()
def make_contiguous(model: nn.Module) -> dict[str, Any]:
    """Renumber every FFN's intermediate neurons so that their kept sets are contiguous; in place, same outputs.

    The model must be compact (`losparse.compact`) and of a family in `FFN_LAYOUTS`. Returns a report:
    `groups` (per FFN: producers, consumer, neurons, whether it was permuted and per kept set its size and
    whether it is contiguous before/after), `contiguous_layers` (the layers whose forward now slices),
    `indexed_layers` (compact layers still on the indexed path, e.g. attention and residual-side sets)
    and `note` (why those are left, see the module docstring).
    """
    layers = losparse_layers(model)
    if not layers:
        raise LoSparseUsageError("the model has no LoSparse layers: make_contiguous runs on a compacted model "
                                 "(losparse.apply, train, losparse.compact)")
    for name, layer in layers:
        _check_member(name, layer)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FFN_LAYOUTS:
        raise LoSparseUsageError(f"make_contiguous: model type {model_type!r} has no known FFN layout "
                                 f"(known: {', '.join(sorted(FFN_LAYOUTS))})")
    groups = [make_group_contiguous(producers, consumer_name, consumer)
              for producers, consumer_name, consumer in _ffn_groups(model, FFN_LAYOUTS[model_type])]
    compact_layers = [(name, layer) for name, layer in losparse_layers(model) if layer.num_kept]
    return {
        "model_type": model_type,
        "groups": groups,
        "num_permuted": sum(group["permuted"] for group in groups),
        "contiguous_layers": [name for name, layer in compact_layers if layer.kept_start is not None],
        "indexed_layers": [name for name, layer in compact_layers if layer.kept_start is None],
        "note": "attention and residual-side kept sets keep the indexed add (see losparse.deploy.permute)",
    }
