"""The memory-lean LoSparse op, `LeanAdamW` and the memory benchmark (tiny models only)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import memory as mb
from losparse.core.errors import LoSparseUsageError
from losparse.core.functional import losparse_linear
from losparse.core.layers import LoSparseLinear
from losparse.training.optim import LeanAdamW, lean_optimizer_cls_and_kwargs, stochastic_round_


def _factors(dtype: torch.dtype, rank: int = 3, sparse: bool = True, out_features: int = 6, in_features: int = 5,
             seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()
    u = make(out_features, rank) if rank else None
    v = make(rank, in_features) if rank else None
    s = make(out_features, in_features) if sparse else None
    return u, v, s, make(out_features)


def _reference(x, u, v, s, b):
    if s is None:
        weight = u @ v
    elif u is None:
        weight = s
    else:
        weight = torch.addmm(s, u, v)
    return F.linear(x, weight, b)


@pytest.mark.parametrize("strategy", ["merged", "factored", "auto"])
@pytest.mark.parametrize("rank,sparse", [(3, True), (0, True), (3, False)])
def test_gradcheck_float64(strategy, rank, sparse):
    u, v, s, b = _factors(torch.float64, rank, sparse)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: losparse_linear(*a, strategy=strategy), (x, u, v, s, b))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("strategy", ["merged", "factored"])
@pytest.mark.parametrize("frozen", ["none", "sparse", "input", "low_rank"])
def test_gradients_equal_old_forward(dtype, tolerance, strategy, frozen):
    tensors = [*_factors(dtype, seed=1), torch.randn(4, 2, 5, dtype=dtype, requires_grad=True)]
    u, v, s, b, x = tensors
    if frozen == "sparse":
        s.requires_grad_(False)
    elif frozen == "input":
        x.requires_grad_(False)
    elif frozen == "low_rank":
        u.requires_grad_(False)
        v.requires_grad_(False)
    upstream = torch.randn(4, 2, 6, dtype=dtype)
    wanted = [t for t in (x, u, v, s, b) if t.requires_grad]
    expected = torch.autograd.grad((_reference(x, u, v, s, b) * upstream).sum(), wanted)
    lean_out = losparse_linear(x, u, v, s, b, strategy=strategy)
    torch.testing.assert_close(lean_out, _reference(x, u, v, s, b), atol=tolerance, rtol=tolerance)
    got = torch.autograd.grad((lean_out * upstream).sum(), wanted)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, atol=tolerance, rtol=tolerance)


def test_bf16_and_autocast_match_old_forward():
    u, v, s, b = (t.detach().bfloat16().requires_grad_() for t in _factors(torch.float32))
    x = torch.randn(7, 5, dtype=torch.bfloat16)
    torch.testing.assert_close(losparse_linear(x, u, v, s, b), _reference(x, u, v, s, b), atol=0.05, rtol=0.02)
    u, v, s, b = _factors(torch.float32, seed=2)
    x = torch.randn(7, 5)
    results = []
    for function in (losparse_linear, _reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = function(x, u, v, s, b)
        grads = torch.autograd.grad(y.float().sum(), (u, v, s, b))
        results.append((y, grads))
    (y_lean, g_lean), (y_old, g_old) = results
    assert y_lean.dtype == y_old.dtype == torch.bfloat16
    torch.testing.assert_close(y_lean, y_old, atol=0.05, rtol=0.02)
    for g, e in zip(g_lean, g_old):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=0.05, rtol=0.02)


def test_layer_forward_uses_the_lean_op_and_keeps_active_rank():
    torch.manual_seed(0)
    layer = LoSparseLinear(5, 6, rank=3).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    layer.active_rank = 2
    x = torch.randn(3, 5, dtype=torch.float64)
    expected = F.linear(x, layer.effective_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected)
    grads = torch.autograd.grad(layer(x).sum(), [layer.sparse, layer.low_rank_u])
    reference = torch.autograd.grad(F.linear(x, layer.effective_weight(), layer.bias).sum(),
                                    [layer.sparse, layer.low_rank_u])
    for g, e in zip(grads, reference):
        torch.testing.assert_close(g, e)
    assert grads[1][:, 2].abs().max() == 0  # the inactive column gets no gradient


def test_lean_op_saves_no_weight_sized_tensor():
    u, v, s, b = _factors(torch.float32, out_features=64, in_features=48)
    x = torch.randn(4, 48, requires_grad=True)  # inside a network: W_eff is saved for the input's gradient
    for function, keeps_weight in ((losparse_linear, False), (_reference, True)):
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            function(x, u, v, s, b)
        new_weight_sized = [t for t in saved if t.numel() == 64 * 48 and t.data_ptr() != s.data_ptr()]  # W or Wᵀ
        assert bool(new_weight_sized) == keeps_weight


def test_usage_errors():
    u, v, s, b = _factors(torch.float32)
    with pytest.raises(LoSparseUsageError, match="strategy"):
        losparse_linear(torch.randn(2, 5), u, v, s, b, strategy="fast")
    with pytest.raises(LoSparseUsageError, match="both"):
        losparse_linear(torch.randn(2, 5), u, None, s, b)
    with pytest.raises(LoSparseUsageError, match="preset"):
        mb.check_args(mb.parse_args(["--preset", "llama-9b"]))
    with pytest.raises(LoSparseUsageError, match="GPU only"):
        mb.check_args(mb.parse_args(["--preset", "llama-7b-shape"]))


def test_lean_adamw_equals_torch_adamw_without_low_precision_params():
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(2)]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=True)
    lean_opt = LeanAdamW(mine, lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(4):
        for p, q in zip(ref, mine):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        torch_opt.step()
        lean_opt.step()
    for p, q in zip(ref, mine):
        assert torch.equal(p, q)


def test_lean_adamw_bf16_moments_track_fp32_and_survive_state_dict():
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(64, 32))
    lean = torch.nn.Parameter(ref.detach().clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-3)
    lean_opt = LeanAdamW([lean], lr=1e-3, low_precision_params=[lean], chunk_bytes=1024)
    for _ in range(50):
        ref.grad = torch.randn_like(ref) * 0.1 + 0.02
        lean.grad = ref.grad.clone()
        torch_opt.step()
        lean_opt.step()
    state = lean_opt.state[lean]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    moved = (ref.detach() - lean.detach()).abs().max()
    assert 0 < moved < 0.05 * 50 * 1e-3  # different, but within 5 % of the largest possible movement
    relative = ((state["exp_avg_sq"].float() - torch_opt.state[ref]["exp_avg_sq"]).abs()
                / torch_opt.state[ref]["exp_avg_sq"]).mean()
    assert relative < 0.03
    restored = LeanAdamW([lean], lr=1e-3, low_precision_params=[lean])
    restored.load_state_dict(lean_opt.state_dict())
    assert restored.state[lean]["exp_avg_sq"].dtype == torch.bfloat16


def test_stochastic_rounding_is_unbiased():
    value = torch.full((200_000,), 1.0 + 2.0 ** -10)  # a quarter of the way between two bf16 values
    target = torch.empty_like(value, dtype=torch.bfloat16)
    stochastic_round_(target, value, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs(float(target.float().mean()) - float(value[0])) < 2e-5


def test_lean_optimizer_cls_and_kwargs_selects_sparse_parameters():
    from transformers import TrainingArguments

    model = torch.nn.Sequential(LoSparseLinear(4, 3, rank=1), torch.nn.Linear(3, 2))
    args = TrainingArguments(output_dir="/tmp/unused", learning_rate=3e-4, optim="adamw_torch", report_to=[])
    cls, kwargs = lean_optimizer_cls_and_kwargs(model, args)
    assert cls is LeanAdamW and kwargs["lr"] == 3e-4 and kwargs["fused"] is False
    assert [id(p) for p in kwargs["low_precision_params"]] == [id(model[0].sparse)]
    with pytest.raises(LoSparseUsageError, match="optim"):
        lean_optimizer_cls_and_kwargs(model, TrainingArguments(output_dir="/tmp/unused", optim="sgd", report_to=[]))


def test_tracker_counts_a_known_allocation_exactly():
    tracker = mb.MemoryTracker()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)
        view = a[10:20]
        assert tracker.current == 4000  # the view shares a's storage
        b = torch.empty(250, dtype=torch.float64)
        assert tracker.current == 6000
        del b
        assert tracker.current == 4000
        with tracker.phase("square"):
            c = a * a
            del c
    assert tracker.peak == 8000 and tracker.phase_peaks["square"] == 8000
    del view, a
    assert tracker.current == 0


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "memory.json"
    pruned = "losparse-old,losparse-lean,losparse-lean-bf16m"
    assert mb.main(["--preset", "tiny", "--batch_size", "2", "--seq_len", "32", "--pruned_paths", pruned,
                    "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_benchmark_main_writes_json_and_lean_is_leaner(tiny_report):
    results = tiny_report["results"]
    dense = results["dense"]["peak_bytes"]
    for suffix in ("", " (pruned)"):
        old = results[f"losparse-old{suffix}"]["peak_bytes"]
        lean = results[f"losparse-lean{suffix}"]["peak_bytes"]
        lean_bf16m = results[f"losparse-lean-bf16m{suffix}"]["peak_bytes"]
        assert old > lean > lean_bf16m
        assert lean_bf16m <= dense
    assert results["oneshot"]["peak_bytes"] < dense
    assert set(tiny_report["extrapolation"]["predicted_peak_gb"]) == set(mb.EXTRAPOLATION_SHAPES)


def test_old_forward_saves_one_weight_per_layer_more(tiny_report):
    """old − lean at the forward's end is at least the saved W_eff of every targeted layer (fp32)."""
    results = tiny_report["results"]
    config = mb.llama_config("tiny")
    weights = mb.parameter_split(config)["targeted"] * 4
    gap = results["losparse-old"]["phase_peak_bytes"]["forward"] - results["losparse-lean"]["phase_peak_bytes"]["forward"]
    assert gap >= weights


def test_extrapolation_orders_paths():
    table = mb.extrapolate(tokens=2048, autocast=True, low_rank_ratio=0.05)["predicted_peak_gb"]["llama-7b"]
    assert table["losparse-old"] >= table["losparse-lean"] > table["losparse-lean-bf16m"]
    assert table["oneshot"] < table["dense"]


def test_lean_optimizer_flag_builds_the_trainer_with_bf16_s_moments(tmp_path):
    from conftest import ToyDataset, tiny_bert_classifier, trainer_args
    from transformers import Trainer

    import losparse
    from losparse.cli.run import make_trainer
    from losparse.training.optim import LeanAdamW

    trainer = make_trainer(Trainer, losparse.LoSparseConfig(remaining_ratio=0.3, low_rank_ratio=0.1), lean_optimizer=True,
                           model=tiny_bert_classifier(), args=trainer_args(tmp_path, max_steps=2),
                           train_dataset=ToyDataset())
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, LeanAdamW)
    sparse = [m.sparse for m in trainer.model.modules() if isinstance(m, losparse.LoSparseLinear)]
    assert sparse and all(optimizer.state[p]["exp_avg"].dtype == torch.bfloat16 for p in sparse)
