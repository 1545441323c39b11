"""`--shrink_sparse` (losparse.core.shrink): S narrows to its kept neurons at mask updates, the run stays the same."""

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyDataset, assert_same_training_state, tiny_bert_classifier, trainer_args
from torch import nn
from transformers import TrainerCallback

import losparse
from losparse import LoSparseConfig, LoSparsePruner, LoSparseTrainer, LoSparseUsageError
from losparse.core.functional import losparse_linear
from losparse.core.shrink import (
    check_shrink_backend,
    monotone_update_masks,
    narrow_layer,
    narrow_to_checkpoint,
    shrink_pruned,
    sparse_state_numel,
)
from losparse.training.optim import LeanAdamW, lean_optimizer_cls_and_kwargs

# 32 examples / batch 8, 2 epochs = 8 optimizer steps; S is pruned from step 1 on, masks are recomputed at
# every step, the last 2 at the target.
CONFIG = dict(remaining_ratio=0.3, low_rank_ratio=0.1, pruning_warmup_steps=1, pruning_final_steps=2,
              pruning_interval=1)
TOTAL_STEPS = 8


def _data():
    return ToyDataset(n=32)


def _batch():
    data = ToyDataset(n=8, seed=5)
    return {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids)}


def _args(output_dir, **overrides):
    # no clipping: a shrunk run's global grad norm leaves out the dropped neurons' gradients (module docstring)
    values = dict(max_grad_norm=0.0, logging_steps=1)
    values.update(overrides)
    return trainer_args(output_dir, **values)


class MonotoneEmulation(LoSparsePruner):
    """No physical shrink: the same monotone masks by −inf scores for pruned neurons through `update_masks`."""

    def update_masks(self, kept_fraction, scores=None):
        if scores is not None:
            return super().update_masks(kept_fraction, scores)
        alive = torch.cat([layer.sparse_mask for layer in self.layers])
        scores = self.importance.scores().clone()
        scores[~alive] = float("-inf")
        super().update_masks(kept_fraction, scores)
        for layer, was_alive in zip(self.layers, torch.split(alive, self.importance.num_neurons)):
            layer.set_sparse_mask(layer.sparse_mask & was_alive)


class Recorder(TrainerCallback):
    """After each optimizer step (after the LoSparse callback): S entries, optimizer-state entries, alive count."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.rows = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        layers = self.trainer.pruner.layers
        counts = sparse_state_numel(layers, optimizer)
        counts["alive_params"] = sum(int(layer.sparse_mask.sum()) * layer.neuron_size for layer in layers)
        counts["stored_rows_match"] = all(
            layer.sparse.shape[layer.neuron_axis] == int(layer.sparse_mask.sum()) for layer in layers)
        self.rows.append(counts)


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _outputs(model):
    model.eval()
    with torch.no_grad():
        return model(**_batch()).logits


def _run(tmp_path, shrink=True, emulate=False, seed=0, record=False, trainer_kwargs=None, **config):
    values = {**CONFIG, "shrink_sparse": shrink, **config}
    losparse_config = LoSparseConfig(**values)
    model = tiny_bert_classifier(seed)
    losparse.apply(model, losparse_config)
    kwargs = dict(trainer_kwargs or {})
    args = kwargs.pop("args", None) or _args(tmp_path)
    trainer = LoSparseTrainer(model=model, args=args, train_dataset=_data(), **kwargs)
    if emulate:
        trainer.losparse_callback.pruner = MonotoneEmulation(model, TOTAL_STEPS, losparse_config)
    recorder = None
    if record:
        recorder = Recorder(trainer)
        trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


@pytest.fixture(scope="module")
def shrunk_and_emulated(tmp_path_factory):
    """The shrink run (checkpoint at step 8, for the resume test) and its unshrunk monotone emulation."""
    directory = tmp_path_factory.mktemp("shrunk")
    shrunk, recorder = _run(directory, shrink=True, record=True, trainer_kwargs={
        "args": _args(directory, save_strategy="steps", save_steps=4)})
    emulated, _ = _run(tmp_path_factory.mktemp("emulated"), shrink=False, emulate=True)
    return shrunk, recorder, emulated


# ------------------------------------------------------------------------------------------------
# (1) a shrink run == the unshrunk run with the same monotone masks

def test_shrunk_run_equals_the_unshrunk_run_with_monotone_masks(shrunk_and_emulated):
    shrunk, _, emulated = shrunk_and_emulated
    assert len(_losses(shrunk)) == TOTAL_STEPS
    torch.testing.assert_close(torch.tensor(_losses(shrunk)), torch.tensor(_losses(emulated)), atol=1e-5, rtol=1e-5)
    kept_somewhere = False
    for a, b in zip(shrunk.pruner.layers, emulated.pruner.layers):
        assert torch.equal(a.sparse_mask, b.sparse_mask)
        assert a.shrunk and not b.shrunk
        assert torch.equal(a.sparse_alive_index, a.kept_neuron_index())
        torch.testing.assert_close(a.full_sparse(), b.sparse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.low_rank_u, b.low_rank_u, atol=1e-5, rtol=1e-5)
        kept_somewhere |= bool(a.sparse_mask.any())
    assert kept_somewhere
    torch.testing.assert_close(_outputs(shrunk.model), _outputs(emulated.model), atol=1e-5, rtol=1e-5)
    # the scores of the alive neurons agree (dead ones are never ranked: −inf)
    alive = torch.cat([layer.sparse_mask for layer in shrunk.pruner.layers])
    torch.testing.assert_close(shrunk.pruner.importance.scores()[alive], emulated.pruner.importance.scores()[alive],
                               atol=1e-6, rtol=1e-4)
    assert shrunk.pruner.achieved_kept_fraction() == pytest.approx(shrunk.pruner.final_kept_fraction, abs=0.02)


def test_masks_are_monotone_even_where_the_plain_rule_would_revive_a_neuron():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 64))
    config = LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, target_modules=["0", "1"], shrink_sparse=True)
    losparse.apply(model, config)
    pruner = LoSparsePruner(model, total_steps=100, config=config)
    pruner.update_masks(1.0)
    first = torch.arange(pruner.neuron_sizes.numel(), dtype=torch.float32)
    pruner.importance.neuron_ema.copy_(first)
    monotone_update_masks(pruner, 0.5)
    before = torch.cat([layer.sparse_mask for layer in pruner.layers])
    # reversed scores: the plain rule would keep the neurons pruned a moment ago
    pruner.importance.neuron_ema.copy_(-first)
    monotone_update_masks(pruner, 0.5)
    after = torch.cat([layer.sparse_mask for layer in pruner.layers])
    assert not bool((after & ~before).any())
    assert after.sum() == before.sum()  # the budget did not fall, and only alive neurons compete
    assert pruner.shrink_pending
    # reference keep rule too: a -inf threshold would keep every neuron; the dead ones stay dead
    ref_config = LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, target_modules=["0", "1"],
                                shrink_sparse=True, pruning_variant="reference")
    pruner.config = ref_config
    monotone_update_masks(pruner, 0.5)
    assert not bool((torch.cat([layer.sparse_mask for layer in pruner.layers]) & ~after).any())


# ------------------------------------------------------------------------------------------------
# (2) what S and its optimizer state hold falls at each mask update, to alive neurons × neuron size

def test_stored_sparse_params_and_optimizer_state_fall_with_the_alive_count(shrunk_and_emulated):
    _, recorder, _ = shrunk_and_emulated
    rows = recorder.rows
    assert len(rows) == TOTAL_STEPS
    for row in rows:
        assert row["stored_rows_match"]
        assert row["sparse_params"] == row["alive_params"]
        assert row["sparse_optimizer_state"] == 2 * row["alive_params"]  # exp_avg + exp_avg_sq
    params = [row["sparse_params"] for row in rows]
    assert all(later <= earlier for earlier, later in zip(params, params[1:]))
    assert len(set(params)) >= 4  # it really fell, at several mask updates


def test_lean_optimizer_columns_and_uncertainty_states_narrow_too(tmp_path):
    losparse_config = LoSparseConfig(**CONFIG, shrink_sparse=True, prune_dim="columns", beta2=0.85)
    model = tiny_bert_classifier(0)
    losparse.apply(model, losparse_config)
    args = _args(tmp_path)
    trainer = LoSparseTrainer(model=model, args=args, train_dataset=_data(),
                              optimizer_cls_and_kwargs=lean_optimizer_cls_and_kwargs(model, args))
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    optimizer = losparse.core.shrink.base_optimizer(trainer.optimizer)
    assert isinstance(optimizer, LeanAdamW)
    for row in recorder.rows:
        assert row["stored_rows_match"] and row["sparse_params"] == row["alive_params"]
        assert row["sparse_optimizer_state"] == 2 * row["alive_params"]
    assert recorder.rows[-1]["sparse_params"] < recorder.rows[0]["sparse_params"]
    for i, layer in enumerate(trainer.pruner.layers):
        assert layer.sparse.shape == (layer.out_features, int(layer.sparse_mask.sum()))
        assert optimizer.state[layer.sparse]["exp_avg"].dtype == torch.bfloat16
        assert trainer.pruner.importance.entry_ema[i].shape == layer.sparse.shape
    _check_compaction(trainer.model, tmp_path)


def test_custom_loop_narrows_amsgrad_state_and_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 64))
    config = LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, target_modules=["0", "1"], shrink_sparse=True,
                            pruning_warmup_steps=0, pruning_final_steps=0, pruning_interval=1)
    losparse.apply(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    pruner = LoSparsePruner(model, total_steps=4, config=config)
    x = torch.randn(8, 16)
    narrowed = []
    for step in range(1, 5):
        model(x).pow(2).mean().backward()
        optimizer.step()
        pruner.step(step)
        narrowed.append(shrink_pruned(pruner, optimizer))
        for layer in pruner.layers:
            alive = int(layer.sparse_mask.sum())
            state = optimizer.state[layer.sparse]
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert state[key].shape == (alive, 16)
            assert layer.sparse.grad.shape == (alive, 16)
        optimizer.zero_grad()
    assert sum(narrowed) >= 2
    assert sum(layer.sparse.numel() for layer in pruner.layers) < 16 * 16 + 64 * 16


# ------------------------------------------------------------------------------------------------
# (3) compaction (and save/load, merge) of a shrunk model give its outputs

def test_compact_merge_and_save_of_a_shrunk_model_keep_its_outputs(tmp_path, shrunk_and_emulated):
    _check_compaction(shrunk_and_emulated[0].model, tmp_path)  # rows; columns: the LeanAdamW test above


def _check_compaction(model, tmp_path):
    assert all(layer.shrunk for _, layer in losparse.core.decompose.losparse_layers(model))
    expected = _outputs(model)
    compacted = losparse.compact(copy.deepcopy(model))
    torch.testing.assert_close(_outputs(compacted), expected, atol=1e-5, rtol=1e-5)
    report = losparse.parameter_report(model)
    assert report == losparse.parameter_report(compacted)
    torch.testing.assert_close(_outputs(losparse.merge(copy.deepcopy(model))), expected, atol=1e-5, rtol=1e-5)
    losparse.save(model, str(tmp_path / "saved"))
    torch.testing.assert_close(_outputs(losparse.load(str(tmp_path / "saved"))), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# (4) resume after some shrinking continues the same trajectory

def test_resume_from_a_shrunk_checkpoint_reproduces_the_uninterrupted_run(tmp_path, shrunk_and_emulated):
    straight = shrunk_and_emulated[0]
    resumed_dir = tmp_path / "resumed"
    checkpoint = Path(straight.args.output_dir) / "checkpoint-4"
    alive = losparse.core.shrink.checkpoint_alive_indices(str(checkpoint))
    assert len(alive) == len(straight.pruner.layers)  # it had shrunk by step 4
    later = [(alive[name].numel(), layer.sparse.shape[layer.neuron_axis])
             for name, layer in losparse.core.decompose.losparse_layers(straight.model)]
    assert all(at_4 >= at_end for at_4, at_end in later) and any(at_4 > at_end for at_4, at_end in later)
    shutil.copytree(checkpoint, resumed_dir / "checkpoint-4")
    expected = {name: tensor.detach().clone() for name, tensor in straight.model.state_dict().items()}

    model = tiny_bert_classifier(123)
    losparse.apply(model, LoSparseConfig(**CONFIG, shrink_sparse=True))
    resumed = LoSparseTrainer(model=model, args=_args(resumed_dir), train_dataset=_data())
    resumed.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-4"))
    actual = {name: tensor.detach().clone() for name, tensor in resumed.model.state_dict().items()}
    assert actual.keys() == expected.keys()
    assert any(name.endswith("sparse_alive_index") for name in actual)
    for name in actual:
        assert actual[name].shape == expected[name].shape, name
    assert_same_training_state(actual, expected)
    torch.testing.assert_close(_losses(resumed)[-1], _losses(straight)[-1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# (5) refusals

def test_shrink_is_refused_for_methods_without_a_neuron_pruned_s():
    for method in ("lpaf", "structured", "lowrank", "finetune"):
        with pytest.raises(LoSparseUsageError, match=f"--shrink_sparse is not available with --method {method}"):
            LoSparseConfig(method=method, remaining_ratio=0.3, low_rank_ratio=0.1, shrink_sparse=True)
    for method in ("losparse", "itp", "movement", "lowrank_prune_all"):
        assert LoSparseConfig(method=method, remaining_ratio=0.3, low_rank_ratio=0.1, shrink_sparse=True).shrink_sparse


def test_shrink_is_refused_under_ddp_fsdp_and_deepspeed(tmp_path):
    check_shrink_backend(SimpleNamespace(world_size=1, fsdp=None, deepspeed=None))
    for args, name in ((SimpleNamespace(world_size=2, fsdp=None, deepspeed=None), "DDP"),
                       (SimpleNamespace(world_size=1, fsdp=["full_shard"], deepspeed=None), "FSDP"),
                       (SimpleNamespace(world_size=1, fsdp=None, deepspeed="ds.json"), "DeepSpeed")):
        with pytest.raises(LoSparseUsageError, match=f"needs a single training process, not {name}"):
            check_shrink_backend(args)


def test_a_shrunk_checkpoint_needs_shrink_and_dropped_neurons_never_return(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    losparse.apply(model, LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, target_modules=["0"]))
    layer = model[0]
    narrow_layer(layer, torch.tensor([1, 3, 5]))
    with pytest.raises(LoSparseUsageError, match="cannot come back"):
        narrow_layer(layer, torch.tensor([1, 2]))
    with pytest.raises(LoSparseUsageError, match="increasing"):
        narrow_layer(layer, torch.tensor([5, 3]))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = nn.Sequential(nn.Linear(16, 16))
    losparse.apply(fresh, LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, target_modules=["0"]))
    with pytest.raises(LoSparseUsageError, match="resume it with --shrink_sparse"):
        narrow_to_checkpoint(fresh, str(tmp_path), LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1))
    assert narrow_to_checkpoint(fresh, str(tmp_path)) == 1
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_an_optimizer_with_non_elementwise_state_is_refused():
    model = nn.Sequential(nn.Linear(16, 16))
    losparse.apply(model, LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1, target_modules=["0"]))
    layer = model[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.state[layer.sparse]["row_statistic"] = torch.zeros(16, 1)
    with pytest.raises(LoSparseUsageError, match="cannot be narrowed"):
        narrow_layer(layer, torch.tensor([0, 1]), optimizer)


# ------------------------------------------------------------------------------------------------
# the op itself

@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("strategy", ["auto", "merged", "factored"])
def test_shrunk_op_equals_the_dense_linear_with_zero_neurons(axis, rank, strategy):
    torch.manual_seed(axis * 10 + rank)
    out_f, in_f = 7, 5
    alive = torch.tensor([0, 2, 3]) if axis == 0 else torch.tensor([1, 4])
    x = torch.randn(2, 4, in_f, dtype=torch.float64, requires_grad=True)
    u = torch.randn(out_f, rank, dtype=torch.float64, requires_grad=True) if rank else None
    v = torch.randn(rank, in_f, dtype=torch.float64, requires_grad=True) if rank else None
    s = torch.randn(*((3, in_f) if axis == 0 else (out_f, 2)), dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    y = losparse_linear(x, u, v, s, b, strategy=strategy, alive_index=alive, neuron_axis=axis, out_features=out_f)
    weight = torch.zeros(out_f, in_f, dtype=torch.float64).index_add(axis, alive, s) + (u @ v if rank else 0)
    expected = F.linear(x, weight, b)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    inputs = [t for t in (x, u, v, s, b) if t is not None]
    upstream = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_shrunk_op_under_bf16_autocast_matches_the_dense_linear():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    u, v = torch.randn(10, 2, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    s = torch.randn(4, 8, requires_grad=True)
    alive = torch.tensor([1, 2, 6, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = losparse_linear(x, u, v, s, None, alive_index=alive, neuron_axis=0, out_features=10)
        weight = (u @ v).float().index_add(0, alive, s)
        expected = F.linear(x, weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert s.grad.dtype == torch.float32 and s.grad.shape == (4, 8)


# ------------------------------------------------------------------------------------------------
# the memory benchmark's shrink path (tiny shape)

def test_memory_benchmark_shows_memory_falling_with_the_kept_fraction(tmp_path, capsys):
    import json

    from benchmarks import memory as mb

    path = tmp_path / "memory.json"
    assert mb.main(["--preset", "tiny", "--batch_size", "2", "--seq_len", "16", "--paths", "losparse-lean-bf16m",
                    "--pruned_paths", "", "--no_oneshot", "--shrink_fractions", "0.5,0.2,final",
                    "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    unshrunk = results["losparse-lean-bf16m"]
    shrunk = [row for name, row in results.items() if "(shrunk to" in name]
    assert len(shrunk) == 3
    assert [round(row["kept_fraction"], 1) for row in shrunk[:2]] == [0.5, 0.2]
    peaks = [unshrunk["peak_bytes"]] + [row["peak_bytes"] for row in shrunk]
    starts = [unshrunk["start_bytes"]] + [row["start_bytes"] for row in shrunk]
    assert all(b < a for a, b in zip(starts, starts[1:]))
    assert all(b <= a for a, b in zip(peaks, peaks[1:])) and peaks[-1] < peaks[0]
    full_sparse = shrunk[0]["sparse_param_bytes"] / shrunk[0]["kept_fraction"]
    for row in shrunk:  # S itself is kept fraction × its full size (4 bytes per entry)
        assert row["sparse_param_bytes"] == pytest.approx(row["kept_fraction"] * full_sparse, rel=1e-6)
    for bad in ("0.2,0.5", "1.5", "final,0.2", "x"):
        assert mb.main(["--preset", "tiny", "--shrink_fractions", bad]) == 2
    assert "--shrink_fractions" in capsys.readouterr().out
