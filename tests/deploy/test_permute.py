"""make_contiguous: FFN neurons renumbered so kept sets form one block; same function, slice path, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import losparse
from conftest import compress_randomly, random_tiny_model
from losparse.core.decompose import decompose_linear, losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear
from losparse.deploy.permute import make_contiguous, make_group_contiguous

TOKENS = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def compact_model(arch: str, prune_dim: str = "rows", **config) -> nn.Module:
    return compress_randomly(random_tiny_model(arch), 0.3, 0.05, prune_dim=prune_dim, **config)


def tiny_gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return compress_randomly(transformers.GPT2LMHeadModel(config).eval(), 0.3, 0.05)


class IndexOpCounter:
    """Counts Tensor.index_add_ / index_select calls (the indexed path) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("index_add_", "index_select"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            self.calls += 1
            return original(tensor, *args, **kwargs)
        return wrapper


def ffn_layers(model: nn.Module, suffixes: tuple[str, ...]) -> dict[str, CompactLoSparseLinear]:
    return {name: layer for name, layer in losparse_layers(model) if name.endswith(suffixes)}


@pytest.mark.parametrize("arch, prune_dim, suffixes", [
    ("tiny-bert", "rows", ("intermediate.dense",)),
    ("tiny-bert", "columns", ("layer.0.output.dense", "layer.1.output.dense")),
    ("tiny-llama", "rows", ("gate_proj", "up_proj")),
    ("tiny-llama", "columns", ("down_proj",)),
])
def test_same_logits_and_contiguous_ffn(arch, prune_dim, suffixes, tmp_path, monkeypatch):
    model = compact_model(arch, prune_dim)
    targets = ffn_layers(model, suffixes)
    assert targets and all(layer.kept_start is None for layer in targets.values())  # random scores scatter them
    before = logits(model)
    report = make_contiguous(model)
    after = logits(model)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert report["num_permuted"] == 2
    for name, layer in targets.items():
        start, count = layer.kept_start, layer.num_kept
        assert start is not None and 0 < count < (layer.out_features if prune_dim == "rows" else layer.in_features)
        assert torch.equal(layer.kept_index, torch.arange(start, start + count))
        assert name in report["contiguous_layers"]
    # the fast path: no indexed op in a contiguous layer; the counter does see one in an attention layer
    counter = IndexOpCounter(monkeypatch)
    layer = next(iter(targets.values()))
    with torch.no_grad():
        layer(torch.randn(3, layer.in_features))
        assert counter.calls == 0
        attention = next(m for n, m in losparse_layers(model) if "attn" in n or "attention" in n)
        attention(torch.randn(3, attention.in_features))
    assert counter.calls == 1
    # save -> load keeps the permuted indices, finds them contiguous again, computes the same
    monkeypatch.undo()
    losparse.save(model, str(tmp_path))
    loaded = losparse.load(str(tmp_path))
    torch.testing.assert_close(logits(loaded), after, rtol=1e-5, atol=1e-6)
    loaded_layers = dict(losparse_layers(loaded))
    for name, layer in targets.items():
        assert loaded_layers[name].kept_start == layer.kept_start


def test_gated_ffn_orders_gate_only_both_up_only():
    model = compact_model("tiny-llama")
    mlp = model.model.layers[0].mlp
    gate_before = set(mlp.gate_proj.kept_index.tolist())
    up_before = set(mlp.up_proj.kept_index.tolist())
    make_contiguous(model)
    gate, up = mlp.gate_proj, mlp.up_proj
    assert gate.kept_start == 0
    assert up.kept_start == len(gate_before - up_before)  # [gate only | both | up only | neither]
    assert gate.num_kept + up.num_kept - len(gate_before & up_before) == len(gate_before | up_before)


def test_gpt2_conv1d():
    model = tiny_gpt2()
    before = logits(model)
    report = make_contiguous(model)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-6)
    assert report["contiguous_layers"] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert all(layer.dense_type == "conv1d" for _, layer in losparse_layers(model))


@pytest.mark.parametrize("prune_dim, target", [("rows", "intermediate"), ("columns", r"output\.dense")])
def test_plain_linear_neighbour(prune_dim, target):
    """Only one side of the FFN compressed: the other, a plain nn.Linear, is permuted with it."""
    model = compact_model("tiny-bert", prune_dim, target_modules=[rf".*layer\.\d+\.{target}.*"])
    layer = model.bert.encoder.layer[0]
    plain = layer.output.dense if prune_dim == "rows" else layer.intermediate.dense
    assert type(plain) is nn.Linear
    before = logits(model)
    report = make_contiguous(model)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-6)
    assert len(report["contiguous_layers"]) == 2 and not report["indexed_layers"]


def random_compact(linear: nn.Linear, prune_dim: str, keep: float, seed: int) -> CompactLoSparseLinear:
    layer = decompose_linear(linear, 0.1, prune_dim)
    generator = torch.Generator().manual_seed(seed)
    layer.sparse_mask.copy_(torch.rand(layer.sparse_mask.shape, generator=generator) < keep)
    layer.sparse.data.mul_(layer.sparse_mask.unsqueeze(1 if prune_dim == "rows" else 0))
    return CompactLoSparseLinear.from_losparse(layer)


@pytest.mark.parametrize("gate_dim, up_dim, down_dim", [
    ("rows", "rows", "rows"), ("rows", "columns", "columns"), ("columns", "rows", "rows"),
    ("columns", "columns", "columns"), ("rows", "rows", "columns"),
])
def test_every_prune_dim_combination(gate_dim, up_dim, down_dim):
    """A gated FFN with each mix of prune_dims: same function, and the (up to two) first kept sets contiguous."""
    torch.manual_seed(0)
    hidden, inner = 24, 40
    gate = random_compact(nn.Linear(hidden, inner), gate_dim, 0.4, 1)
    up = random_compact(nn.Linear(hidden, inner), up_dim, 0.5, 2)
    down = random_compact(nn.Linear(inner, hidden), down_dim, 0.3, 3)

    def ffn(x):
        return down(nn.functional.silu(gate(x)) * up(x))

    x = torch.randn(5, hidden)
    with torch.no_grad():
        before = ffn(x)
        entry = make_group_contiguous({"gate": gate, "up": up}, "down", down)
        torch.testing.assert_close(ffn(x), before, rtol=1e-5, atol=1e-6)
    sets = list(entry["kept_sets"])  # the sets on the intermediate dimension: rows of gate/up, columns of down
    assert sets == [name for name, dim in (("gate", gate_dim), ("up", up_dim)) if dim == "rows"] + (
        ["down"] if down_dim == "columns" else [])
    assert entry["permuted"] == bool(sets)
    for name in sets[:2]:
        assert entry["kept_sets"][name]["contiguous_after"]
    for layer in (gate, up, down):  # still what load accepts: unique and increasing
        assert bool((layer.kept_index[1:] > layer.kept_index[:-1]).all())


def test_load_state_dict_refreshes_layout():
    """A permuted state dict loaded into an unpermuted model: kept_start follows the new indices."""
    permuted = compact_model("tiny-bert")
    make_contiguous(permuted)
    fresh = compact_model("tiny-bert")
    fresh.load_state_dict(permuted.state_dict())
    torch.testing.assert_close(logits(fresh), logits(permuted), rtol=1e-5, atol=1e-6)
    assert fresh.bert.encoder.layer[0].intermediate.dense.kept_start is not None


def test_usage_errors():
    trained = random_tiny_model("tiny-bert")
    losparse.apply(trained, losparse.LoSparseConfig(remaining_ratio=0.3))
    with pytest.raises(LoSparseUsageError, match="losparse.compact"):
        make_contiguous(trained)
    with pytest.raises(LoSparseUsageError, match="no LoSparse layers"):
        make_contiguous(random_tiny_model("tiny-bert"))
    bart = compress_randomly(random_tiny_model("tiny-bart"), 0.3, 0.05)
    bart.config.model_type = "not-a-family"
    with pytest.raises(LoSparseUsageError, match="'not-a-family'.*known: bart"):
        make_contiguous(bart)
