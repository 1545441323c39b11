"""Peers for the inference benchmark: other compressed models of the same size as the LoSparse compact one.

`build_peers(dense, compact)` gives, at the compact model's *achieved* remaining ratio (kept weights of
the targeted matrices / their dense count):
  structured  the dense model with whole attention heads and FFN neurons removed (random scores, the
              global parameter-weighted rule; `losparse.methods.structured.build_structured_peer`) — plain
              smaller nn.Linear layers, hidden size and head size unchanged; for a Llama/Qwen2/Mistral decoder,
              the FLAP-style one-shot peer (`structured_decoder_oneshot`: key/value groups with their query heads
              and FFN neurons) calibrated on seeded random tokens (only its shapes matter for the timing);
  lowrank     `method="lowrank"` (Low-rank I): every targeted matrix replaced by U·V with the ranks that
              spend the whole budget (`allocate_ranks`), compacted.
Each lands within one group of the compact model's count (a head or neuron; one rank of one layer, or N ranks
under the compact model's `--align N`, which the low-rank peer follows).
The peers compute other functions than the dense model, so the benchmark checks only that their
outputs are finite; the timings compare like-sized models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from benchmarks.common import compress_for_benchmark
from losparse.core.errors import LoSparseUsageError
from losparse.deploy.compact import parameter_report
from losparse.methods.structured.blocks import check_supported, encoder_blocks, target_params
from losparse.methods.structured.decoder_blocks import SUPPORTED_DECODER_TYPES, decoder_blocks, decoder_target_params
from losparse.methods.structured.decoder_oneshot import structured_decoder_oneshot
from losparse.methods.structured.decoder_structure import is_decoder_model
from losparse.methods.structured.removal import build_structured_peer

PEER_NAMES = ("structured", "lowrank")


class PeerOutputsNotFinite(RuntimeError):
    pass


#: calibration of the decoder peer: (sequences, tokens) of seeded random ids
DECODER_PEER_CALIBRATION = (4, 64)


def check_peers_supported(model_or_config: Any) -> None:
    """A usage error unless peers can be built for this model (the structured peer needs a BERT-family encoder or a
    Llama-family decoder)."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) in SUPPORTED_DECODER_TYPES:
        return
    try:
        check_supported(model_or_config)
    except LoSparseUsageError as exc:
        raise LoSparseUsageError(f"--peers: {exc}") from None


def build_peers(dense_model: nn.Module, compact_model: nn.Module, seed: int = 0,
                svd_solver: str = "randomized") -> dict[str, nn.Module]:
    """{"structured": ..., "lowrank": ...} at the compact model's achieved ratio (fp32, eval, dense's device)."""
    check_peers_supported(dense_model)
    ratio = parameter_report(compact_model)["remaining_ratio"]
    structured = structured_peer(dense_model, ratio, seed).eval()
    lowrank = copy.deepcopy(dense_model)
    # low_rank_ratio is not used by method "lowrank" (its rank comes from remaining_ratio); any valid value.
    # Its ranks follow the compact model's --align, so both peers of a benchmark have the same kind of shapes.
    config = getattr(compact_model, "losparse_config", None)
    compress_for_benchmark(lowrank, ratio, ratio, seed=seed, svd_solver=svd_solver, method="lowrank",
                           align=config.align if config is not None else "auto")
    return {"structured": structured, "lowrank": lowrank.eval()}


def structured_peer(dense_model: nn.Module, ratio: float, seed: int) -> nn.Module:
    """The structured peer at `ratio` (see the module docstring); the dense model is left as it is."""
    if not is_decoder_model(dense_model):
        return build_structured_peer(dense_model, ratio, seed=seed)
    peer = copy.deepcopy(dense_model)
    device = next(peer.parameters()).device
    ids = torch.randint(0, peer.config.vocab_size, DECODER_PEER_CALIBRATION,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    structured_decoder_oneshot(peer, ids, ratio, batch_size=DECODER_PEER_CALIBRATION[0], show_progress=False)
    return peer


def peer_target_params(name: str, model: nn.Module) -> int:
    """Weights of the targeted matrices a peer holds now."""
    if name == "structured" and is_decoder_model(model):
        return decoder_target_params(decoder_blocks(model))
    if name == "structured":
        return target_params(encoder_blocks(model))
    return parameter_report(model)["target_params"]


def check_peer_outputs(peers: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Run each peer once (fp32): {name: {"finite": True, "output_scale": max |logit|}}.

    Raises PeerOutputsNotFinite if a peer's logits are not all finite.
    """
    checks = {}
    with torch.inference_mode():
        for name, model in peers.items():
            logits = model(**inputs).logits.float()
            if not bool(torch.isfinite(logits).all()):
                raise PeerOutputsNotFinite(f"the {name} peer computes non-finite outputs")
            checks[name] = {"finite": True, "output_scale": float(logits.abs().max())}
    return checks
