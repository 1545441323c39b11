"""losparse.optimize (losparse/deploy/dispatch.py): per-layer forms give the compact model's outputs, forced forms, the report, save/load, bad input.

No assertion depends on which form is faster here: only on what each form computes and records.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import losparse
from conftest import compress_randomly, random_tiny_model
from losparse.core.decompose import losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear
from losparse.deploy.dispatch import DispatchedCompactLinear, apply_forms, choose_form, form_of, format_optimize_report
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE, check_checkpoint

TOKENS = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
INPUTS = {"input_ids": TOKENS}
FAST = {"repeats": 2, "warmup": 1, "rounds": 1}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture
def bert() -> nn.Module:
    return compress_randomly(random_tiny_model("tiny-bert"), 0.3, 0.05)


def forms_of(model: nn.Module) -> dict[str, str]:
    return {name: form_of(layer) for name, layer in losparse_layers(model)}


def test_measured_choice_keeps_outputs_and_reports_every_layer(bert):
    names = [name for name, _ in losparse_layers(bert)]
    reference = logits(bert)
    report = losparse.optimize(bert, INPUTS, **FAST)
    torch.testing.assert_close(logits(bert), reference, rtol=1e-5, atol=1e-6)
    assert [row["name"] for row in report["layers"]] == names
    assert report["forms"] == ["compact", "dense"] and "triton" in report["skipped_forms"]  # CPU here
    for row in report["layers"]:
        assert set(row["times_ms"]) == {"compact", "dense"} and all(t > 0 for t in row["times_ms"].values())
        assert row["input_shape"] == [2, 12, row["shape"][1]]
        assert row["form"] in ("compact", "dense")
        assert row["extra_params"] == (row["shape"][0] * row["shape"][1] if row["form"] == "dense" else 0)
    assert bert.losparse_forms == forms_of(bert) == {row["name"]: row["form"] for row in report["layers"]}
    assert report["total_extra_params"] == sum(row["extra_params"] for row in report["layers"])
    assert sum(report["chosen"].values()) == len(names)
    table = format_optimize_report(report)
    assert all(name in table for name in names) and "skipped triton" in table


@pytest.mark.parametrize("forced", ["dense", "compact"])
def test_forced_forms(bert, forced):
    reference = logits(bert)
    report = losparse.optimize(bert, INPUTS, forms=(forced,), **FAST)
    torch.testing.assert_close(logits(bert), reference, rtol=1e-5, atol=1e-6)
    assert set(forms_of(bert).values()) == {forced}
    layer_types = {type(layer) for _, layer in losparse_layers(bert)}
    assert layer_types == ({DispatchedCompactLinear} if forced == "dense" else {CompactLoSparseLinear})
    dense_params = sum(row["shape"][0] * row["shape"][1] for row in report["layers"])
    assert report["total_extra_params"] == (dense_params if forced == "dense" else 0)
    # optimize again on an optimized model: it starts from the compact tensors and can undo the choice
    other = "compact" if forced == "dense" else "dense"
    losparse.optimize(bert, INPUTS, forms=(other,), **FAST)
    assert set(forms_of(bert).values()) == {other}
    torch.testing.assert_close(logits(bert), reference, rtol=1e-5, atol=1e-6)


def test_dispatched_layer_shares_compact_tensors_and_merges(bert):
    compact_state = {k: v.clone() for k, v in bert.state_dict().items()}
    reference = logits(bert)
    losparse.optimize(bert, INPUTS, forms=("dense",), **FAST)
    assert bert.state_dict().keys() == compact_state.keys()  # the merged matrix is not saved
    for key, value in bert.state_dict().items():
        assert torch.equal(value, compact_state[key])
    report = losparse.parameter_report(bert)
    assert report["num_layers"] == 12 and report["remaining_ratio"] < 0.35
    losparse.merge(bert)
    assert not losparse_layers(bert) and not hasattr(bert, "losparse_forms")
    assert type(bert.bert.encoder.layer[0].intermediate.dense) is nn.Linear
    torch.testing.assert_close(logits(bert), reference, rtol=1e-5, atol=1e-5)


def test_dense_form_follows_changes_of_the_compact_tensors(bert):
    """make_contiguous after optimize, and load_state_dict into an optimized model, rebuild the merged matrix."""
    reference = logits(bert)
    losparse.optimize(bert, INPUTS, forms=("dense",), **FAST)
    report = losparse.make_contiguous(bert)
    assert report["num_permuted"] == 2
    torch.testing.assert_close(logits(bert), reference, rtol=1e-5, atol=1e-6)
    other = compress_randomly(random_tiny_model("tiny-bert", seed=1), 0.3, 0.05)  # other weights, same kept counts
    other_logits = logits(other)
    bert.load_state_dict(other.state_dict())
    torch.testing.assert_close(logits(bert), other_logits, rtol=1e-5, atol=1e-6)
    assert set(forms_of(bert).values()) == {"dense"}


def test_save_load_reapplies_recorded_forms(bert, tmp_path):
    reference = logits(bert)
    names = [name for name, _ in losparse_layers(bert)]
    chosen = {name: ("dense" if i % 2 else "compact") for i, name in enumerate(names)}
    losparse.optimize(bert, INPUTS, forms=("dense",), **FAST)
    apply_forms(bert, chosen)  # a known mix of forms, whatever this machine measures
    path = str(tmp_path / "ckpt")
    losparse.save(bert, path)
    with open(os.path.join(path, LOSPARSE_CONFIG_FILE)) as f:
        assert json.load(f)["forms"] == chosen
    assert check_checkpoint(path).forms == chosen
    loaded = losparse.load(path)
    assert forms_of(loaded) == chosen == loaded.losparse_forms
    torch.testing.assert_close(logits(loaded), reference, rtol=1e-5, atol=1e-6)
    plain = losparse.load(path, optimize=False)
    assert set(forms_of(plain).values()) == {"compact"}
    torch.testing.assert_close(logits(plain), reference, rtol=1e-5, atol=1e-6)
    measured = losparse.load(path, optimize=True, example_inputs=INPUTS)
    assert [row["name"] for row in measured.losparse_optimize_report["layers"]] == names
    assert forms_of(measured) == measured.losparse_forms
    torch.testing.assert_close(logits(measured), reference, rtol=1e-5, atol=1e-6)


def test_checkpoint_without_forms_loads_compact(bert, tmp_path):
    path = str(tmp_path / "old")
    losparse.save(bert, path)
    with open(os.path.join(path, LOSPARSE_CONFIG_FILE)) as f:
        assert "forms" not in json.load(f)
    loaded = losparse.load(path)
    assert set(forms_of(loaded).values()) == {"compact"} and not hasattr(loaded, "losparse_forms")
    assert check_checkpoint(path).forms is None
    with pytest.raises(LoSparseUsageError, match="records no forms"):
        losparse.load(path, optimize=True)


def edit_manifest(path: str, **fields) -> None:
    file = os.path.join(path, LOSPARSE_CONFIG_FILE)
    with open(file) as f:
        meta = json.load(f)
    meta.update(fields)
    with open(file, "w") as f:
        json.dump(meta, f)


def test_manifest_forms_are_validated(bert, tmp_path):
    path = str(tmp_path / "bad")
    losparse.save(bert, path)
    name = next(iter(dict(losparse_layers(bert))))
    edit_manifest(path, forms={name: "fast"})
    with pytest.raises(LoSparseUsageError, match=r"forms\[.*'fast', not one of compact, dense, triton"):
        losparse.load(path)
    edit_manifest(path, forms={"bert.pooler.dense": "dense"})
    with pytest.raises(LoSparseUsageError, match="'bert.pooler.dense', which is not in layers"):
        losparse.load(path)
    edit_manifest(path, forms=["dense"])
    with pytest.raises(LoSparseUsageError, match="forms must be an object"):
        check_checkpoint(path)
    # a recorded triton form where the kernel cannot run (no CUDA here) falls back to the same function
    reference = logits(bert)
    edit_manifest(path, forms={name: "triton"})
    loaded = losparse.load(path)
    assert loaded.losparse_forms[name] == "compact"
    torch.testing.assert_close(logits(loaded), reference, rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_usage_error(bert):
    with pytest.raises(LoSparseUsageError, match="'fast' is not one of compact, dense, triton"):
        losparse.optimize(bert, INPUTS, forms=("compact", "fast"))
    with pytest.raises(LoSparseUsageError, match="non-empty sequence"):
        losparse.optimize(bert, INPUTS, forms="dense")
    with pytest.raises(LoSparseUsageError, match="no form can run here"):
        losparse.optimize(bert, INPUTS, forms=("triton",))
    with pytest.raises(LoSparseUsageError, match="repeats=0"):
        losparse.optimize(bert, INPUTS, repeats=0)
    with pytest.raises(LoSparseUsageError, match="example_inputs"):
        losparse.optimize(bert, {})
    with pytest.raises(LoSparseUsageError, match="losparse.compact"):
        losparse.optimize(random_tiny_model("tiny-bert"), INPUTS)
    assert set(forms_of(bert).values()) == {"compact"}  # nothing replaced by a refused call


def test_gpt2_and_llama_dense_choice_after_permutation():
    """Dense form of Conv1D-made layers (GPT-2) and of a permuted Llama: same logits."""
    import transformers

    config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    gpt2 = compress_randomly(transformers.GPT2LMHeadModel(config).eval(), 0.3, 0.05)
    llama = compress_randomly(random_tiny_model("tiny-llama", num_layers=1), 0.3, 0.05)
    losparse.make_contiguous(llama)
    for model in (gpt2, llama):
        reference = logits(model)
        losparse.optimize(model, INPUTS, forms=("compact", "dense"), dense_margin=0.0, **FAST)
        losparse.optimize(model, INPUTS, forms=("dense",), **FAST)
        torch.testing.assert_close(logits(model), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("times, expected", [
    ({"compact": 1.0, "dense": 0.97}, "compact"),  # within the 5 % margin: the smaller form
    ({"compact": 1.0, "dense": 0.90}, "dense"),
    ({"compact": 1.0, "triton": 0.99, "dense": 1.2}, "compact"),  # triton within the tie margin
    ({"compact": 1.0, "triton": 0.80, "dense": 0.78}, "triton"),
    ({"compact": 1.0, "triton": 0.80, "dense": 0.70}, "dense"),
    ({"dense": 3.0}, "dense"),
    ({"triton": 3.0}, "triton"),
])
def test_choose_form(times, expected):
    assert choose_form(times) == expected


def test_triton_form_plumbing_with_a_stand_in_kernel(bert, monkeypatch, tmp_path):
    """The triton form's measuring, correctness check and dispatch, with the kernel replaced by stand-ins (no
    CUDA here): a correct one can be chosen and runs in the layers; a wrong one is rejected with the reason."""
    import losparse.deploy.dispatch as optimize_module

    calls = []

    def correct_kernel(layer, x):
        calls.append(layer)
        return CompactLoSparseLinear.forward(layer, x)

    monkeypatch.setattr(optimize_module, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(optimize_module, "_FUSED_FORWARD", correct_kernel)
    reference = logits(bert)
    report = losparse.optimize(bert, INPUTS, forms=("triton",), **FAST)
    assert set(forms_of(bert).values()) == {"triton"} and report["total_extra_params"] == 0
    calls.clear()
    torch.testing.assert_close(logits(bert), reference, rtol=1e-5, atol=1e-6)
    assert len(calls) == report["num_layers"]  # the forward really went through the kernel
    losparse.save(bert, str(tmp_path))
    assert set(losparse.load(str(tmp_path)).losparse_forms.values()) == {"triton"}

    monkeypatch.setattr(optimize_module, "_FUSED_FORWARD", lambda layer, x: torch.zeros_like(layer.forward(x)))
    report = losparse.optimize(bert, INPUTS, forms=("compact", "triton"), **FAST)
    assert set(forms_of(bert).values()) == {"compact"}
    assert all("differs from compact" in row["rejected"]["triton"] for row in report["layers"])
    with pytest.raises(LoSparseUsageError, match="no form of .* computes"):
        losparse.optimize(bert, INPUTS, forms=("triton",), **FAST)
