"""One LoSparse training run for tests/test_distributed.py, launched by torchrun (N processes) or plainly (1).

    python tests/distributed_worker.py OUT_DIR PER_DEVICE_BATCH [--method losparse]

Tiny BERT without dropout, so a 2-process run with per-device batch 4 sees exactly the batches of a
1-process run with batch 8 (accelerate shards one seeded batch order across the ranks). Rank 0 writes
`result.json` (logged losses and grad norms, eval loss, masks); every rank writes its masks so the test
can check that the ranks agree.
"""

from __future__ import annotations

import json
import os
import sys

import torch

# Run as a script (plainly or by torchrun), so its own directory, tests/, is first on sys.path; losparse
# is the installed package (or PYTHONPATH, which tests/test_distributed.py sets to the repository root).
from conftest import ToyDataset, tiny_bert_config
from transformers import BertForSequenceClassification, TrainingArguments

from losparse import LoSparseConfig, LoSparsePruner, LoSparseTrainer
from losparse.core.decompose import losparse_layers


def record_pruner_saves(output_dir: str) -> None:
    """Append 'rank directory' to saves.log at every pruner save, so the test can count who saved."""
    original = LoSparsePruner.save

    def save(self, directory):
        with open(os.path.join(output_dir, "saves.log"), "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {os.path.basename(directory)}\n")
        original(self, directory)

    LoSparsePruner.save = save


def main() -> None:
    output_dir, batch_size = sys.argv[1], int(sys.argv[2])
    os.makedirs(output_dir, exist_ok=True)
    record_pruner_saves(output_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=8,
        num_train_epochs=2, learning_rate=1e-3, max_grad_norm=0.5, report_to="none", save_strategy="steps",
        save_steps=8, logging_steps=1, seed=0, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )
    config = LoSparseConfig(remaining_ratio=0.3, low_rank_ratio=0.1, pruning_warmup_steps=2, pruning_final_steps=3,
                            pruning_interval=2)
    trainer = LoSparseTrainer(model=model, args=args, train_dataset=ToyDataset(), eval_dataset=ToyDataset(n=32, seed=1),
                              losparse_config=config)
    trainer.train()
    metrics = trainer.evaluate()
    masks = {name: layer.sparse_mask.tolist() for name, layer in losparse_layers(model)}
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(output_dir, f"masks-rank{rank}.json"), "w") as f:
        json.dump(masks, f)
    if trainer.is_world_process_zero():
        logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_loss" not in entry]
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump({"world_size": args.world_size, "losses": [e["loss"] for e in logs],
                       "grad_norms": [e["grad_norm"] for e in logs], "eval_loss": metrics["eval_loss"],
                       "masks": masks}, f)


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # A clean shutdown: gloo's threads torn down at interpreter exit can abort the process
        # ("terminate called without an active exception") after all the work is done.
        dist.barrier()
        dist.destroy_process_group()
