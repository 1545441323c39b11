"""--align N: ranks and kept-neuron counts on multiples of N, the parameter budget still met."""

import copy
import math

import pytest
import torch
from torch import nn

import losparse
from losparse import LoSparseConfig, LoSparseUsageError
from losparse.core import decompose
from losparse.core.decompose import allocate_ranks, matrix_alignments, plan_ranks, rank_for_ratio, resolve_align
from losparse.core.layers import LoSparseLinear
from losparse.core.pruner import LoSparsePruner, keep_within_budget

# (in, out) of the stack; 40 and 100 are not multiples of 8, so some layers end in a smaller group
WIDTHS = (64, 96, 128, 40, 100)


class Stack(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture(autouse=True)
def quick_factors(monkeypatch):
    """Seeded random U, V instead of the SVD: these tests check shapes and masks (S = W − U·V either way)."""

    def factors(weight, rank, *args, **kwargs):
        generator = torch.Generator().manual_seed(weight.shape[0] * 7919 + weight.shape[1])
        out_features, in_features = weight.shape
        return (0.1 * torch.randn(out_features, rank, generator=generator).to(weight.dtype),
                0.1 * torch.randn(rank, in_features, generator=generator).to(weight.dtype))

    monkeypatch.setattr(decompose, "svd_split", factors)


def _config(**overrides) -> LoSparseConfig:
    values = dict(remaining_ratio=0.4, low_rank_ratio=0.1, target_module_types=["Linear"], svd_solver="exact")
    values.update(overrides)
    return LoSparseConfig(**values)


def _decomposed(seed: int = 0, **overrides) -> nn.Module:
    return losparse.apply(Stack(seed), _config(**overrides))


def _layers(model: nn.Module) -> list[LoSparseLinear]:
    return [m for m in model.modules() if isinstance(m, LoSparseLinear)]


def _random_masks(model: nn.Module, seed: int = 0, kept_fraction=None) -> LoSparsePruner:
    pruner = LoSparsePruner(model, total_steps=10)
    scores = torch.rand(pruner.neuron_sizes.shape, generator=torch.Generator().manual_seed(seed))
    pruner.update_masks(pruner.final_kept_fraction if kept_fraction is None else kept_fraction, scores=scores)
    return pruner


def _kept(layer: LoSparseLinear) -> int:
    return int(layer.sparse_mask.sum())


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("bad", [0, -3, "x", "", "8.5", "0", "-3", "auto8", True])
def test_bad_align_values_are_refused_naming_the_value(bad):
    with pytest.raises(LoSparseUsageError, match=r"--align .* is not allowed; use 'auto' or a positive integer"):
        LoSparseConfig(align=bad)
    with pytest.raises(LoSparseUsageError, match=repr(bad).replace("(", r"\(")):
        LoSparseConfig(align=bad)


def test_align_is_stored_as_text_and_defaults_to_auto():
    assert LoSparseConfig().align == "auto"
    assert LoSparseConfig(align=8).align == "8"  # Python and YAML give ints
    assert LoSparseConfig(align=" 16 ").align == "16"
    assert LoSparseConfig.from_dict(LoSparseConfig(align="4").to_dict()).align == "4"


def test_a_config_recorded_before_align_existed_means_no_alignment():
    values = LoSparseConfig(align="8").to_dict()
    del values["align"]
    assert LoSparseConfig.from_dict(values).align == "1"
    assert LoSparseConfig.from_dict({**values, "align": "auto"}).align == "auto"


def test_the_cli_parses_align():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser((LoSparseConfig,)).parse_args_into_dataclasses(["--align", "8"])
    assert config.align == "8"
    (config,) = HfArgumentParser((LoSparseConfig,)).parse_args_into_dataclasses([])
    assert config.align == "auto"


def test_auto_resolves_per_device_and_only_aligns_large_matrices(monkeypatch):
    if not torch.cuda.is_available():
        assert resolve_align(LoSparseConfig()) == 8
    assert resolve_align(LoSparseConfig(svd_device="cpu")) == 8
    assert resolve_align(LoSparseConfig(align="3")) == 3
    shapes = [(128, 128), (64, 512), (127, 4096), (1024, 3072)]
    assert matrix_alignments(shapes, LoSparseConfig(svd_device="cpu")) == [8, 1, 1, 8]
    assert matrix_alignments(shapes, LoSparseConfig(align="8")) == [8, 8, 8, 8]  # explicit: every matrix
    assert matrix_alignments(shapes, LoSparseConfig(align="1")) == [1, 1, 1, 1]
    monkeypatch.setattr(decompose, "resolve_svd_device", lambda *args: torch.device("cuda", 0))
    assert resolve_align(LoSparseConfig()) == 16
    assert matrix_alignments(shapes, LoSparseConfig()) == [1, 1, 1, 16]  # 16·16 = 256 > 128
    # LPAF: its ranks come from its own pruner and its masks are per entry
    assert matrix_alignments(shapes, LoSparseConfig(method="lpaf", align="8")) == [1, 1, 1, 1]


def test_auto_is_kept_in_the_model_config_and_the_decomposition_logs_the_resolved_number(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="losparse.core.decompose"):
        model = losparse.apply(Stack(), _config(align="4"))
    assert "--align 4: ranks and kept-neuron counts of 4 of 4 matrices are multiples of 4" in caplog.text
    auto = losparse.apply(Stack(), _config())
    assert auto.losparse_config.align == "auto"  # resolved the same way wherever it is read (see the README)
    assert model.losparse_config.align == "4"


# ------------------------------------------------------------------------------------------------- ranks


def test_rank_for_ratio_rounds_to_the_nearest_multiple():
    # ideal 0.1·768·768/1536 = 38.4 -> 40 (nearest multiple of 8), 32 for 16 (38.4/16 = 2.4)
    assert rank_for_ratio(768, 768, 0.1) == 39
    assert rank_for_ratio(768, 768, 0.1, align=8) == 40
    assert rank_for_ratio(768, 768, 0.1, align=16) == 32
    assert rank_for_ratio(768, 3072, 0.01, align=16) == 16  # ideal 6.1: at least one multiple
    assert rank_for_ratio(40, 12, 1.0, align=16) == 12  # capped at min(out, in)
    for out_features, in_features in [(40, 96), (128, 40), (100, 128), (3072, 768)]:
        for ratio in (0.01, 0.05, 0.1, 0.3):
            assert rank_for_ratio(out_features, in_features, ratio, align=1) == max(1, min(
                math.ceil(ratio * out_features * in_features / (out_features + in_features)),
                out_features, in_features))


def test_low_rank_ratio_ranks_are_multiples_and_the_sparse_budget_absorbs_them():
    model = _decomposed(align="8")
    layers = _layers(model)
    assert [layer.rank for layer in layers] == plan_ranks([(l.out_features, l.in_features) for l in layers],
                                                          model.losparse_config)
    assert all(layer.rank % 8 == 0 for layer in layers)
    pruner = _random_masks(model)
    dense = sum(l.in_features * l.out_features for l in layers)
    low_rank = sum(l.rank * (l.in_features + l.out_features) for l in layers)
    assert pruner.final_kept_fraction == pytest.approx(0.4 - low_rank / dense)
    kept = sum(_kept(l) * l.neuron_size for l in layers)
    assert (low_rank + kept) / dense <= 0.4 + 1e-9


@pytest.mark.parametrize("align", [1, 4, 8, 16])
def test_whole_budget_ranks_are_multiples_and_never_exceed_the_budget(align):
    shapes = [(768, 768), (3072, 768), (768, 3072), (384, 1536), (100, 40)]
    for share in (0.05, 0.1, 0.2, 0.5):
        aligns = [align] * len(shapes)
        ranks = allocate_ranks(shapes, share, aligns)
        cost = sum(k * (o + i) for k, (o, i) in zip(ranks, shapes))
        budget = share * sum(o * i for o, i in shapes)
        assert cost <= budget + 1e-6
        assert all(k % align == 0 or k == min(shape) for k, shape in zip(ranks, shapes))
        # within one step of `align` ranks per layer of the budget (one pass hands out at most one step per layer)
        assert budget - cost < sum(align * sum(shape) for shape in shapes)
        if align == 1:
            assert ranks == allocate_ranks(shapes, share)


def test_lowrank_method_ranks_follow_align():
    model = _decomposed(method="lowrank", remaining_ratio=0.3, align="8")
    assert all(layer.rank % 8 == 0 for layer in _layers(model))
    report = losparse.parameter_report(model)
    assert report["remaining_ratio"] <= 0.3 + 1e-9


# --------------------------------------------------------------------------------------- kept neurons


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
@pytest.mark.parametrize("align", [4, 8])
def test_each_layer_keeps_a_multiple_of_n_and_the_ratio_is_within_one_group_per_layer(variant, prune_dim, align):
    model = _decomposed(align=str(align), pruning_variant=variant, prune_dim=prune_dim)
    for fraction in (0.05, 0.2, 0.5, 0.9):
        pruner = _random_masks(model, seed=3, kept_fraction=fraction)
        layers = pruner.layers
        counts = [_kept(layer) for layer in layers]
        assert all(c % align == 0 or c == layer.sparse_mask.numel() for c, layer in zip(counts, layers)), counts
        assert any(0 < c < layer.sparse_mask.numel() for c, layer in zip(counts, layers))
        achieved = pruner.achieved_kept_fraction()
        one_group_per_layer = sum(align * layer.neuron_size for layer in layers) / pruner.total_sparse_params
        if variant == "paper":  # the best groups that fit: never above the budget
            assert fraction - one_group_per_layer <= achieved <= fraction + 1e-9
        else:  # every group scoring at least the k-th smallest entry: never below it
            assert fraction - 1e-9 <= achieved <= fraction + one_group_per_layer


def test_kept_groups_are_the_best_neurons_of_their_layer():
    model = _decomposed(align="8")
    pruner = LoSparsePruner(model, total_steps=10)
    scores = torch.rand(pruner.neuron_sizes.shape, generator=torch.Generator().manual_seed(5))
    pruner.update_masks(0.3, scores=scores)
    for layer, layer_scores in zip(pruner.layers, torch.split(scores, pruner.importance.num_neurons)):
        kept = layer.sparse_mask
        if 0 < int(kept.sum()) < kept.numel():
            assert layer_scores[kept].min() >= layer_scores[~kept].max()


def test_a_group_ranks_by_the_mean_of_its_members():
    # two layers of 16 rows of 16 (256 parameters each) at align 8; keeping half of S keeps two groups of 8
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    losparse.apply(model, LoSparseConfig(method="itp", remaining_ratio=0.5, target_module_types=["Linear"], align="8"))
    pruner = LoSparsePruner(model, total_steps=10)
    a = torch.tensor([1.0] * 4 + [0.8] * 4 + [0.1] * 8)  # groups: mean 0.9, mean 0.1

    b = torch.tensor([0.85] * 4 + [0.0] * 12)  # groups: mean 0.425 (four 0.85, four 0.0), mean 0.0
    pruner.update_masks(0.5, scores=torch.cat([a, b]))
    assert pruner.layers[0].sparse_mask.tolist() == [True] * 8 + [False] * 8
    assert pruner.layers[1].sparse_mask.tolist() == [True] * 8 + [False] * 8
    per_neuron = keep_within_budget(torch.cat([a, b]), pruner.neuron_sizes, 0.5)
    assert int(per_neuron[:16].sum()) == 12  # without alignment: 12 of a (down into its 0.1s), 4 of b

    a = torch.tensor([1.0] * 4 + [0.8] * 4 + [0.3] * 8)  # groups: mean 0.9, mean 0.3
    b = torch.tensor([2.0] + [0.0] * 15)  # the best neuron, but its group's mean is 0.25
    pruner.update_masks(0.5, scores=torch.cat([a, b]))
    assert pruner.layers[0].sparse_mask.all() and not pruner.layers[1].sparse_mask.any()


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_align_1_is_the_per_neuron_rule(variant):
    model = _decomposed(align="1", pruning_variant=variant)
    pruner = LoSparsePruner(model, total_steps=10)
    assert pruner.neuron_groups is None
    scores = torch.rand(pruner.neuron_sizes.shape, generator=torch.Generator().manual_seed(1))
    for fraction in (0.1, 0.3, 0.7):
        pruner.update_masks(fraction, scores=scores)
        masks = torch.cat([layer.sparse_mask for layer in pruner.layers])
        if variant == "paper":
            expected = keep_within_budget(scores, pruner.neuron_sizes, fraction)
        else:  # every neuron scoring at least the k-th smallest entry score
            entry_scores = torch.repeat_interleave(scores, pruner.neuron_sizes.long())
            k = int(entry_scores.numel() * (1 - fraction))
            expected = scores >= torch.kthvalue(entry_scores, k).values
        assert torch.equal(masks, expected)
    reference = [rank_for_ratio(layer.out_features, layer.in_features, 0.1) for layer in pruner.layers]
    assert [layer.rank for layer in pruner.layers] == reference


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_auto_changes_nothing_on_a_tiny_model(variant):
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    results = []
    for align in ("auto", "1"):
        torch.manual_seed(0)
        model = BertForSequenceClassification(tiny_bert_config())
        losparse.apply(model, LoSparseConfig(remaining_ratio=0.3, low_rank_ratio=0.05, align=align,
                                             pruning_variant=variant))
        pruner = _random_masks(model, seed=2)
        results.append(([l.rank for l in pruner.layers], torch.cat([l.sparse_mask for l in pruner.layers])))
        if align == "auto":
            assert pruner.neuron_groups is None
    (ranks_auto, masks_auto), (ranks_off, masks_off) = results
    assert ranks_auto == ranks_off and torch.equal(masks_auto, masks_off)


def test_auto_aligns_only_the_large_layers_of_a_mixed_model():
    # under auto on the CPU a 128 x 256 layer gets 8 (128 >= 16·8); a 40 x 256 one stays exact
    wide = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 40))
    losparse.apply(wide, _config(svd_device="cpu"))
    pruner = _random_masks(wide, seed=4, kept_fraction=0.3)
    first, last = pruner.layers
    assert first.rank % 8 == 0 and _kept(first) % 8 == 0
    assert last.rank == rank_for_ratio(40, 256, 0.1)


# ------------------------------------------------------------------------------------------ end to end


def test_compact_model_computes_what_the_masked_model_does_with_align_8():
    model = _decomposed(align="8").eval()
    _random_masks(model, seed=6)
    x = torch.randn(5, WIDTHS[0], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        masked = model(x)
        compact = losparse.compact(copy.deepcopy(model))
        out = compact(x)
    assert torch.allclose(out, masked, atol=1e-5)
    for layer in compact.modules():
        if isinstance(layer, losparse.core.layers.CompactLoSparseLinear):
            assert layer.rank % 8 == 0
            assert layer.num_kept % 8 == 0 or layer.num_kept == layer.out_features


@pytest.mark.parametrize("solver, split", [("select", "auto"), ("reconstruct", "auto"), ("reconstruct", "fixed")])
def test_oneshot_gives_aligned_ranks_and_counts(solver, split):
    from transformers import LlamaConfig, LlamaForCausalLM

    from losparse.methods.oneshot import algorithm as oneshot

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    ids = torch.randint(4, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    config = LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.2, align="8")
    oneshot.oneshot_compress(model, config, ids, show_progress=False, solver=solver, split=split)
    layers = _layers(model)
    assert layers and all(layer.rank % 8 == 0 for layer in layers)
    counts = [_kept(layer) for layer in layers]
    assert all(c % 8 == 0 or c == layer.sparse_mask.numel() for c, layer in zip(counts, layers))
    if split == "auto":  # the fixed split's aligned ranks leave these tiny matrices no room for S rows
        assert any(0 < c < layer.sparse_mask.numel() for c, layer in zip(counts, layers))
    assert losparse.parameter_report(losparse.compact(model))["remaining_ratio"] <= 0.5 + 1e-9


def test_inference_benchmark_builds_aligned_models_and_refuses_bad_align():
    from benchmarks import inference as inference_benchmark
    from benchmarks.common import build_model, compress_for_benchmark
    from benchmarks.peers import build_peers

    args = inference_benchmark.parse_args(["--arch", "tiny-bert", "--device", "cpu", "--align", "8"])
    assert args.align == "8"
    with pytest.raises(SystemExit):
        inference_benchmark.parse_args(["--arch", "tiny-bert", "--device", "cpu", "--align", "0"])
    compact = build_model("tiny-bert", seed=0)
    compress_for_benchmark(compact, 0.3, 0.05, seed=0, align=args.align)
    layers = [m for m in compact.modules() if isinstance(m, losparse.core.layers.CompactLoSparseLinear)]
    assert all(layer.rank % 8 == 0 and layer.num_kept % 8 == 0 for layer in layers)
    dense = losparse.merge(copy.deepcopy(compact)).eval()
    lowrank = build_peers(dense, compact, seed=0)["lowrank"]  # the low-rank peer follows the compact model's align
    assert all(m.rank % 8 == 0 for m in lowrank.modules() if isinstance(m, losparse.core.layers.CompactLoSparseLinear))
