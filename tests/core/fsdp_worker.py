"""LoSparse pruning of a tiny Llama under FSDP2, for tests/test_fsdp.py: torchrun (2 processes) or plainly (1).

    python tests/fsdp_worker.py OUT_DIR          # one process, plain model, batch 8
    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR   # fully_shard, gloo, batch 4 per rank

A manual training loop (forward, backward, AdamW step, `LoSparsePruner.step`, zero_grad): accelerate
ignores the Trainer's `--fsdp` on CPU (see `losparse.training.trainer.check_training_backend`), so FSDP2 is applied
here with `fully_shard` directly, per decoder layer and at the root, as accelerate does on GPUs. Each rank
takes its half of the same seeded batch of 8, so both runs follow the same gradients.

Two compressions run one after the other: rows + the paper variant, columns + the reference variant (the
windowed importance). The intermediate size 51 makes gate/up_proj shard unevenly (26 + 25 rows). Every rank
writes its masks (`<name>/masks-rank<r>.json`) and, sharded, how many rows of each S it holds; rank 0 saves
the pruner state (`<name>/pruner`) and, after `unshard_model`, the compact model (`<name>/model`), so the
test can compare masks, scores, tensors and logits with the one-process run. Sharded runs end by recording
the one-line refusals of LPAF and β2 > 0 (`refusals.json`).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from losparse import LoSparseConfig, apply, compact, save
from losparse.core.decompose import losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.pruner import LoSparsePruner
from losparse.core.sharding import is_fsdp_model, is_sharded, unshard_model
from losparse.methods.lpaf.pruner import LpafPruner

COMPRESSIONS = {
    "rows-paper": {"prune_dim": "rows", "pruning_variant": "paper"},
    "columns-reference": {"prune_dim": "columns", "pruning_variant": "reference"},
}
STEPS, BATCH, SEQUENCE, VOCAB = 8, 8, 8, 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=51, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def batches() -> torch.Tensor:
    """(STEPS, BATCH, SEQUENCE) token ids, the same on every rank."""
    return torch.randint(0, VOCAB, (STEPS, BATCH, SEQUENCE), generator=torch.Generator().manual_seed(1))


def shard(model: LlamaForCausalLM) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def train(name: str, output_dir: str, rank: int, world_size: int) -> None:
    model = tiny_llama()
    config = LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, pruning_warmup_steps=1, pruning_final_steps=2,
                            pruning_interval=2, **COMPRESSIONS[name])
    apply(model, config)
    directory = os.path.join(output_dir, name)
    os.makedirs(directory, exist_ok=True)
    if world_size > 1:
        shard(model)
        assert all(is_sharded(layer.sparse) for _, layer in losparse_layers(model))
        with open(os.path.join(directory, f"local-rows-rank{rank}.json"), "w") as f:
            json.dump({layer_name: layer.sparse.to_local().shape[0] for layer_name, layer in losparse_layers(model)}, f)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = LoSparsePruner(model, total_steps=STEPS, config=config)
    per_rank = BATCH // world_size
    for step, tokens in enumerate(batches(), start=1):
        tokens = tokens[rank * per_rank:(rank + 1) * per_rank]
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        pruner.step(step)
        optimizer.zero_grad()
    if rank == 0:
        pruner.save(os.path.join(directory, "pruner"))
    masks = {layer_name: layer.sparse_mask.tolist() for layer_name, layer in losparse_layers(model)}
    with open(os.path.join(directory, f"masks-rank{rank}.json"), "w") as f:
        json.dump(masks, f)
    if is_fsdp_model(model):
        unshard_model(model)
    compact(model)
    if rank == 0:
        save(model, os.path.join(directory, "model"))


def refusals(output_dir: str, rank: int) -> None:
    """The importance modes without a sharded form must be refused once S is sharded: record the messages."""
    messages = {}
    for name, config in {"lpaf": LoSparseConfig(method="lpaf", remaining_ratio=0.5, low_rank_ratio=0.1),
                         "beta2": LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, beta2=0.85)}.items():
        model = tiny_llama()
        apply(model, config)
        shard(model)
        try:
            (LpafPruner if name == "lpaf" else LoSparsePruner)(model, total_steps=STEPS, config=config)
            messages[name] = None
        except LoSparseUsageError as error:
            messages[name] = str(error)
    if rank == 0:
        with open(os.path.join(output_dir, "refusals.json"), "w") as f:
            json.dump(messages, f)


def main() -> None:
    output_dir = sys.argv[1]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    for name in COMPRESSIONS:
        train(name, output_dir, rank, world_size)
    if world_size > 1:
        refusals(output_dir, rank)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
