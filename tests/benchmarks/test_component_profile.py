"""The per-component profile (`benchmarks.component_profile`, scripts/profile_components.py) on tiny-bert.

The attribution is checked for consistency (components add up to the profiled wall time), for what
must be zero (no scatter in a dense model) and non-zero, and on a hand-made model whose every op has
a known component. Timings themselves are not asserted.
"""

import json

import pytest
import torch
from conftest import load_script
from torch import nn

from benchmarks import component_profile
from benchmarks import inference as inference_benchmark
from benchmarks.component_profile import COMPONENTS, SiteRanges, attribute_call, classify, root_events, site_of
from losparse.core.layers import CompactLoSparseLinear

FAST = ["--arch", "tiny-bert", "--batch_size", "2", "--seq_len", "16", "--warmup", "1", "--repeats", "3",
        "--timing_repeats", "3"]


@pytest.fixture(scope="module")
def script():
    return load_script("scripts/profile_components.py")


@pytest.fixture(scope="module")
def indexed_run(script, tmp_path_factory):
    """One run without --contiguous: (exit code, JSON result, the report printed from that JSON, output dir)."""
    out = tmp_path_factory.mktemp("profile")
    code = script.main(FAST + ["--json", str(out / "p.json"), "--plot", str(out / "p.png")])
    with open(out / "p.json") as f:
        result = json.load(f)
    return code, result, component_profile.format_report(result), out


def test_components_add_up_to_the_profiled_time(indexed_run):
    code, result, _, _ = indexed_run
    assert code == 0
    assert list(result["models"]) == ["dense", "compact", "structured", "lowrank"]
    for name, model in result["models"].items():
        assert set(model["components_ms"]) == set(COMPONENTS)
        total = sum(model["components_ms"].values())
        assert total == pytest.approx(model["components_sum_ms"])
        assert total == pytest.approx(model["profiled_ms"], rel=0.01), name
        assert 0 < total <= model["profiled_wall_ms"] * 1.01, name  # the ops run inside the profiled calls
        assert model["profiled_calls"] == 3 and model["unprofiled_ms"] > 0
        assert model["profiler_overhead"] == pytest.approx(model["profiled_ms"] / model["unprofiled_ms"] - 1)
        assert model["components_ms"]["gemm_attention"] > 0 and model["components_ms"]["gemm_ffn"] > 0
        assert sum(d["ms"] for d in model["detail"]) == pytest.approx(total)
        assert len(model["profiled_calls_ms"]) == 3 and set(model["components_median_ms"]) == set(COMPONENTS)
        assert min(model["profiled_calls_ms"]) <= model["profiled_ms"] <= max(model["profiled_calls_ms"])
    assert result["unattributed_ms"] == pytest.approx(0.0, abs=1e-3)


def test_scatter_is_losparse_only(indexed_run):
    _, result, _, _ = indexed_run
    components = {name: m["components_ms"] for name, m in result["models"].items()}
    assert components["dense"]["scatter"] == 0.0
    assert components["structured"]["scatter"] == 0.0
    assert components["lowrank"]["scatter"] == 0.0  # no kept S rows, nothing to scatter
    assert components["compact"]["scatter"] > 0.0
    compact_scatter_ops = {d["op"] for d in result["models"]["compact"]["detail"] if d["component"] == "scatter"}
    assert "aten::index_add_" in compact_scatter_ops
    # 2 layers x 6 matrices, each one GEMM in dense and two in the compact / low-rank forms
    linear_calls = {name: sum(d["calls"] for d in m["detail"] if d["op"] == "aten::linear" and d["site"] != "head")
                    for name, m in result["models"].items()}
    assert linear_calls["dense"] == 12 and linear_calls["compact"] == 24 and linear_calls["lowrank"] == 24
    assert linear_calls["structured"] <= 12
    assert result["models"]["structured"]["target_params"] <= result["models"]["compact"]["target_params"]


def test_report_table_json_and_plot(indexed_run):
    _, result, printed, out = indexed_run
    for label in COMPONENTS.values():
        assert f"| {label} |" in printed
    assert "compact − structured" in printed and "profiler overhead" in printed
    gap = result["models"]["compact"]["components_sum_ms"] - result["models"]["structured"]["components_sum_ms"]
    assert "| **sum of components** |" in printed
    assert result["gaps"] and abs(result["gaps"][0]["gap_ms"]) >= abs(result["gaps"][-1]["gap_ms"])
    assert sum(g["gap_ms"] for g in component_profile.gap_rows(result, 10_000)) == pytest.approx(gap, abs=1e-6)
    with open(out / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["plot"] == str(out / "p.png")
    assert result["command"][0] == "scripts/profile_components.py" and result["torch_threads"] == 1


def test_contiguous_ffn_layers_slice_instead_of_index(script, tmp_path):
    # after --: a flag of the inference benchmark's parser, passed on unchanged
    assert script.main(FAST + ["--contiguous", "--json", str(tmp_path / "c.json"), "--", "--tgt_len", "8"]) == 0
    with open(tmp_path / "c.json") as f:
        result = json.load(f)
    assert result["passthrough"] == ["--tgt_len", "8"] and result["command"][-3:] == ["--", "--tgt_len", "8"]
    assert result["benchmark_args"]["tgt_len"] == 8 and result["benchmark_args"]["contiguous"] is True
    assert result["engineering"]["contiguous"]["contiguous_layers"] > 0
    sliced = result["engineering"]["contiguous"]["contiguous_layers"]
    ffn_scatter_calls = {d["op"]: d["calls"] for d in result["models"]["compact"]["detail"]
                         if d["component"] == "scatter" and d["site"] == "ffn"}
    # each sliced layer narrows and adds; the other FFN layers (2 layers x up/down) keep the indexed add
    assert ffn_scatter_calls["aten::narrow"] == sliced and ffn_scatter_calls["aten::add_"] == sliced
    assert ffn_scatter_calls.get("aten::index_add_", 0) == 2 * 2 - sliced
    assert result["models"]["dense"]["components_ms"]["scatter"] == 0.0


class _Toy(nn.Module):
    """embeddings-free block: attention.query (dense), intermediate (compact, scattered rows), gelu, norm + residual."""

    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.query = nn.Linear(8, 8)
        self.intermediate = CompactLoSparseLinear(8, 8, rank=2, num_kept=3)
        with torch.no_grad():
            self.intermediate.kept_index.copy_(torch.tensor([0, 3, 5]))
            self.intermediate.fused_weight.normal_()
            self.intermediate.low_rank_u.normal_()
        self.intermediate.refresh_layout()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        h = self.attention.query(x)
        return self.norm(x + torch.nn.functional.gelu(self.intermediate(h)))


def test_attribution_of_a_known_model():
    model = _Toy().eval()
    x = torch.randn(4, 8)
    with torch.inference_mode(), SiteRanges(model):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            with torch.profiler.record_function(component_profile.RANGE_PREFIX + "forward:toy:0"):
                model(x)
    (root,) = list(root_events(profiler.events()))
    call = attribute_call(root)
    assert call.model == "toy"
    by_op = {(c, s, o): count for (c, s, o), (_, count) in call.ops.items()}
    assert by_op[("gemm_attention", "attention", "aten::linear")] == 1
    assert by_op[("gemm_ffn", "ffn", "aten::linear")] == 2  # [V; S_kept] and U
    assert by_op[("scatter", "ffn", "aten::index_add_")] == 1
    assert by_op[("activation", "-", "aten::gelu")] == 1
    assert by_op[("norm_residual", "-", "aten::add")] == 1
    assert by_op[("norm_residual", "-", "aten::layer_norm")] == 1
    assert call.components["attention_core"] == 0.0 and call.components["gemm_head"] == 0.0
    assert sum(call.components.values()) == pytest.approx(call.root_us, rel=1e-6)


def test_sites_and_components_by_name():
    assert site_of("bert.encoder.layer.3.attention.self.query") == "attention"
    assert site_of("bert.encoder.layer.3.attention.output.dense") == "attention"
    assert site_of("bert.encoder.layer.3.intermediate.dense") == "ffn"
    assert site_of("bert.encoder.layer.3.output.dense") == "ffn"
    assert site_of("bert.pooler.dense") == "head" and site_of("classifier") == "head"
    assert classify("ffn", "aten::index_add_") == "scatter"
    assert classify("ffn", "aten::linear") == "gemm_ffn"
    assert classify(None, "aten::add") == "norm_residual"
    assert classify("embeddings", "aten::add") == "other"  # the embedding sums are not residual adds
    assert classify(None, "aten::index_select") == "other"  # a gather outside a LoSparse layer is not scatter
    assert classify(None, "aten::scaled_dot_product_attention") == "attention_core"


@pytest.mark.parametrize("flags, message", [
    (["--arch", "no-such-arch"],
     "--arch 'no-such-arch' is not one of bert-base, llama-7b-layer, tiny-bert, tiny-llama"),
    (["--arch", "tiny-bart"], "structured peer cannot be built"),
    (["--arch", "tiny-bert", "--remaining_ratio", "0"], "--remaining_ratio 0 must be in (0, 1]"),
    (["--arch", "tiny-bert", "--remaining_ratio", "1.5"], "--remaining_ratio 1.5 must be in (0, 1]"),
    (["--arch", "tiny-bert", "--remaining_ratio", "0.04"], "--low_rank_ratio 0.05 must be below"),
    (["--arch", "tiny-bert", "--batch_size", "0"], "--batch_size 0 must be >= 1"),
    (["--arch", "tiny-bert", "--seq_len", "4096"], "exceeds tiny-bert's 512 positions"),
    (["--arch", "tiny-bert", "--threads", "zero"], "--threads 'zero'"),
])
def test_bad_input_is_refused_before_any_model_is_built(script, monkeypatch, capsys, flags, message):
    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(inference_benchmark, "build_pair", must_not_build)
    assert script.main(flags) == 2
    assert message in capsys.readouterr().err


def test_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert "--contiguous" in capsys.readouterr().out
