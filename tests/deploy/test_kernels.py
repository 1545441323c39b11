"""The Triton forward of the compact layer equals the layer's own forward.

Runs on CPU tensors through triton's interpreter: the module fixture sets TRITON_INTERPRET=1 before
the kernels are built (triton decides when a kernel is decorated whether it compiles or interprets)
and restores the environment afterwards, so other tests (torch.compile on a GPU) still compile. Shapes
are tiny and not multiples of the 16-wide interpreter tiles, so every masked edge is exercised.
"""

import importlib
import os
import sys

import pytest
import torch

from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear
from losparse.deploy.kernels import fused_compact_forward, kept_position, triton_available

KERNELS = "losparse.deploy.kernels.compact_kernels"


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    """Build the kernels in interpreter mode for this module, and drop them afterwards."""
    import losparse.deploy.kernels as package

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop(KERNELS, None)
    package.__dict__.pop("compact_kernels", None)
    kernels = importlib.import_module(KERNELS)
    try:
        yield kernels
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
        sys.modules.pop(KERNELS, None)  # the next user builds compiled kernels
        package.__dict__.pop("compact_kernels", None)


def _layer(in_features, out_features, rank, num_kept, bias=True, prune_dim="rows", dtype=torch.float32, seed=0):
    """A compact layer with random weights and a random sorted set of kept neurons."""
    torch.manual_seed(seed)
    layer = CompactLoSparseLinear(in_features, out_features, rank, num_kept, bias=bias, prune_dim=prune_dim)
    neurons = out_features if prune_dim == "rows" else in_features
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()
        layer.kept_index.copy_(torch.randperm(neurons)[:num_kept].sort().values)
    return layer.to(dtype).eval()


def test_the_interpreter_is_what_runs_here(interpreted_kernels):
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert triton_available()
    assert interpreted_kernels.INTERPRETED
    assert type(interpreted_kernels.gemm_nt.fn).__name__ == "InterpretedFunction"
    layer = _layer(8, 9, 2, 3)
    assert fused_compact_forward(layer, torch.randn(2, 8)).device.type == "cpu"  # CPU tensors in, CPU out


# (in, out, rank k, kept m): odd sizes, k = 0, m = 0, m = all neurons, both empty, more than one tile
SHAPES = [(17, 23, 5, 7), (8, 9, 0, 3), (8, 9, 3, 0), (9, 8, 4, 8), (8, 8, 0, 0), (33, 40, 18, 21)]


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
@pytest.mark.parametrize("in_features,out_features,rank,num_kept", SHAPES)
def test_fp32_equals_the_layer(prune_dim, in_features, out_features, rank, num_kept):
    if prune_dim == "columns":  # kept input neurons: at most in_features
        num_kept = min(num_kept, in_features)
    layer = _layer(in_features, out_features, rank, num_kept, prune_dim=prune_dim)
    x = torch.randn(2, 7, in_features)  # 3-D: flattened to 14 rows inside
    y = fused_compact_forward(layer, x)
    assert y.shape == (2, 7, out_features) and y.dtype == torch.float32
    if rank + num_kept == 0:  # nothing but the bias (layers.py's columns forward cannot cat zero parts)
        expected = layer.bias.expand(2, 7, out_features)
    else:
        expected = layer(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
def test_without_bias_and_with_2d_and_4d_inputs(prune_dim):
    layer = _layer(12, 10, 3, 4, bias=False, prune_dim=prune_dim)
    for shape in [(5, 12), (2, 1, 3, 12), (1, 12)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(fused_compact_forward(layer, x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
def test_non_contiguous_input(prune_dim):
    layer = _layer(11, 13, 3, 5, prune_dim=prune_dim)
    x = torch.randn(11, 6, 3).permute(2, 1, 0)  # (3, 6, 11), last dimension strided
    assert not x.is_contiguous()
    torch.testing.assert_close(fused_compact_forward(layer, x), layer(x), atol=1e-5, rtol=1e-5)
    sliced = torch.randn(4, 22)[:, ::2]  # a 2-D view with stride 2 along the features
    torch.testing.assert_close(fused_compact_forward(layer, sliced), layer(sliced), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_fp32(prune_dim, dtype):
    layer = _layer(24, 20, 6, 9, prune_dim=prune_dim)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        reference = layer(x)  # fp32 truth
    half_layer = layer.to(dtype)
    y = fused_compact_forward(half_layer, x.to(dtype))
    assert y.dtype == dtype
    # both the kernel and torch's half forward round z and y to `dtype`: a few ulps at |y| ~ 10
    scale = float(reference.abs().max())
    torch.testing.assert_close(y.float(), reference, atol=0.02 * scale, rtol=0)
    torch.testing.assert_close(y.float(), half_layer(x.to(dtype)).float(), atol=0.02 * scale, rtol=0)


def test_kept_position_is_the_inverse_of_kept_index_and_is_cached():
    layer = _layer(8, 10, 2, 4)
    with torch.no_grad():
        layer.kept_index.copy_(torch.tensor([1, 4, 5, 9]))
    position = kept_position(layer)
    assert position.tolist() == [-1, 0, -1, -1, 1, 2, -1, -1, -1, 3]
    assert kept_position(layer) is position  # cached
    assert "_triton_kept_position" not in layer.state_dict()
    with torch.no_grad():
        layer.kept_index.copy_(torch.tensor([0, 2, 3, 7]))  # in place: the version counter moves
    assert kept_position(layer).tolist() == [0, -1, 1, 2, -1, -1, -1, 3, -1, -1]
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused_compact_forward(layer, x), layer(x), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_usage_errors():
    layer = _layer(8, 9, 2, 3)
    with pytest.raises(LoSparseUsageError, match="last dimension must be in_features=8"):
        fused_compact_forward(layer, torch.randn(2, 7))
    with pytest.raises(LoSparseUsageError, match="allowed: float32, bfloat16, float16"):
        fused_compact_forward(layer, torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(LoSparseUsageError, match="differs from the layer"):
        fused_compact_forward(layer, torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(LoSparseUsageError, match="only CompactLoSparseLinear"):
        fused_compact_forward(torch.nn.Linear(8, 9), torch.randn(2, 8))


def test_empty_batch_gives_an_empty_output():
    layer = _layer(8, 9, 2, 3)
    assert fused_compact_forward(layer, torch.randn(0, 4, 8)).shape == (0, 4, 9)
