"""run_clm.py on the Trainer's own FSDP2 path, on CPU with gloo, for tests/test_fsdp_trainer.py.

    torchrun --nproc_per_node 2 tests/fsdp_trainer_worker.py RUN_CLM_ARGS... --fsdp true --fsdp_config '{...}'

accelerate 1.x turns `--fsdp` into its FSDP distributed type only for GPUs and other accelerators; on CPU it
silently falls back to DDP, which is why `losparse.training.trainer.check_training_backend` refuses `--fsdp` there.
This worker lifts exactly those two limits — accelerate's state takes the FSDP plugin the Trainer built,
and LoSparse's predicate `fsdp_applies_on` says yes — and changes nothing else, so the run goes through the
same code as on GPUs: the Trainer builds the plugin from `--fsdp_config`, accelerate's `prepare` applies
`fully_shard` per decoder layer and at the root, the LoSparse callback scores the row shards, and
`finish_run` unshards, compacts and saves.
"""

from __future__ import annotations

import os
import sys


def allow_fsdp_on_cpu() -> None:
    import accelerate.state
    from accelerate.utils import DistributedType

    import losparse.training.trainer

    original_init = accelerate.state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = init
    losparse.training.trainer.fsdp_applies_on = lambda args: True


def record_what_training_sees() -> None:
    """At train begin (the model is prepared), write `fsdp-rank<r>.json` into the output dir: whether the model is
    an FSDP2 module and how many S parameters are DTensors, so the test knows the run really was sharded."""
    import json

    import losparse.training.trainer
    from losparse.core.decompose import losparse_layers
    from losparse.core.sharding import is_sharded

    callback = losparse.training.trainer.LoSparseCallback
    original = callback.on_train_begin

    def on_train_begin(self, args, state, control, **kwargs):
        result = original(self, args, state, control, **kwargs)
        layers = [layer for _, layer in losparse_layers(self.model) if layer.sparse is not None]
        from torch.distributed.fsdp import FSDPModule

        seen = {"fsdp_module": isinstance(self.model, FSDPModule), "sparse_layers": len(layers),
                "sharded_sparse": sum(is_sharded(layer.sparse) for layer in layers)}
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, f"fsdp-rank{args.process_index}.json"), "w") as f:
            json.dump(seen, f)
        return result

    callback.on_train_begin = on_train_begin


def main() -> None:
    import runpy

    import torch.distributed as dist

    allow_fsdp_on_cpu()
    record_what_training_sees()
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "run_clm.py")
    sys.argv = [script, *sys.argv[1:]]
    try:
        runpy.run_path(script, run_name="__main__")  # exactly `python run_clm.py ARGS`
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
