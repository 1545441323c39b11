"""How the gates enter a BERT-family forward: PyTorch hooks on the unchanged transformers modules.

The masked function is CoFi's model (`CoFiBertForSequenceClassification`), with one gate set z per forward:
    embeddings:  e → LN_kept(e·z_hidden)·z_hidden
    sub-layer:   y = W_o(x·z_width) ·z_layer ·z_hidden   (z_width: a head's d context dims, or an FFN neuron)
                 out = input                              if z_layer == 0 (removed: no residual, no LayerNorm)
                 out = LN_kept(dropout(y) + input)·z_hidden  otherwise
LN_kept normalises over the hidden dims whose gate is not 0 only (CoFi's `CoFiLayerNorm`), so the function is
exactly that of the model with those dims removed; every multiplication folds into a weight (`removal`).
Hooks leave the module tree and the state-dict keys as they are, so checkpoints are plain model weights.

`GateState.refresh` runs before every forward of the model (a forward pre-hook) and asks its provider for
the gates of this forward (None: no gating, e.g. before pruning starts).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from losparse.methods.structured.blocks import encoder_blocks

Gates = Mapping[str, Optional[torch.Tensor]]


class GateState:
    """The gates of the current forward, per layer, in the forms the hooks use.

    `provider(training)` returns {unit: (groups, size) tensor or None} or None. Per layer l: `width[kind][l]`
    (heads·d,) or (n,), `layer[kind][l]` (1,) and `skip[kind][l]` (bool); `hidden` (H,), `kept` (Hk,) indices
    or None when no hidden gate is 0.
    """

    def __init__(self, provider: Callable[[bool], Optional[Gates]], head_size: int, layers: int) -> None:
        self.provider, self.head_size, self.layers = provider, head_size, layers
        self.active = False
        self.hidden: Optional[torch.Tensor] = None
        self.kept: Optional[torch.Tensor] = None
        self.width: dict[str, list] = {"mha": [None] * layers, "ffn": [None] * layers}
        self.layer: dict[str, list] = {"mha": [None] * layers, "ffn": [None] * layers}
        self.skip: dict[str, list] = {"mha": [False] * layers, "ffn": [False] * layers}

    def refresh(self, training: bool) -> None:
        self.set(self.provider(training))

    def set(self, gates: Optional[Gates]) -> None:
        self.active = gates is not None
        gates = gates or {}
        hidden = gates.get("hidden")
        self.hidden = hidden.reshape(-1) if hidden is not None else None
        self.kept = None
        if self.hidden is not None and bool((self.hidden == 0).any()):
            self.kept = torch.nonzero(self.hidden != 0).flatten()
        heads = gates.get("head")
        self.width["mha"] = list(heads.repeat_interleave(self.head_size, dim=1)) if heads is not None else [None] * \
            self.layers
        self.width["ffn"] = list(gates["neuron"]) if gates.get("neuron") is not None else [None] * self.layers
        for kind, unit in (("mha", "mha_layer"), ("ffn", "ffn_layer")):
            value = gates.get(unit)
            self.layer[kind] = list(value) if value is not None else [None] * self.layers
            self.skip[kind] = [z == 0 for z in value.reshape(-1).tolist()] if value is not None else \
                [False] * self.layers


def _scale(x: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
    return x if z is None else x * z.to(x.dtype)


def kept_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, kept: torch.Tensor) -> torch.Tensor:
    """(..., H) LayerNorm over the dims `kept` only (0 elsewhere): what the norm of the removed model computes."""
    inner = F.layer_norm(x.index_select(-1, kept), (kept.numel(),), norm.weight[kept], norm.bias[kept], norm.eps)
    return x.new_zeros(x.shape[:-1] + (x.shape[-1],), dtype=inner.dtype).index_copy(-1, kept, inner)


def _norm_hooks(norm: nn.LayerNorm, state: GateState, scale_input: bool) -> list:
    def before(module, args):
        if state.active and scale_input and state.hidden is not None:
            return (_scale(args[0], state.hidden),) + tuple(args[1:])
        return None

    def after(module, args, output):
        if not state.active or state.hidden is None:
            return None
        if state.kept is not None:
            output = kept_layer_norm(args[0], module, state.kept)
        return _scale(output, state.hidden)

    return [norm.register_forward_pre_hook(before), norm.register_forward_hook(after)]


def _sublayer_hooks(residual: nn.Module, dense: nn.Linear, state: GateState, kind: str, index: int) -> list:
    def before_dense(module, args):
        z = state.width[kind][index] if state.active else None
        return None if z is None else (_scale(args[0], z),) + tuple(args[1:])

    def after_dense(module, args, output):
        if not state.active:
            return None
        return _scale(_scale(output, state.layer[kind][index]), state.hidden)

    def after_residual(module, args, output):
        return args[1] if state.active and state.skip[kind][index] else None

    return [dense.register_forward_pre_hook(before_dense), dense.register_forward_hook(after_dense),
            residual.register_forward_hook(after_residual)]


def install_gates(model: nn.Module, state: GateState) -> list:
    """Hook `state`'s gates into `model` (see the module docstring); returns the handles (`remove_gates`)."""
    handles = [model.register_forward_pre_hook(lambda module, args: state.refresh(module.training))]
    handles += _norm_hooks(model.base_model.embeddings.LayerNorm, state, scale_input=True)
    for index, block in enumerate(encoder_blocks(model, decomposed_ok=True)):
        attention, layer = block.layer.attention, block.layer
        handles += _sublayer_hooks(attention.output, block.attention_output, state, "mha", index)
        handles += _norm_hooks(attention.output.LayerNorm, state, scale_input=False)
        handles += _sublayer_hooks(layer.output, block.ffn_output, state, "ffn", index)
        handles += _norm_hooks(layer.output.LayerNorm, state, scale_input=False)
    return handles


def remove_gates(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
