"""Removal = the masked function (atol 1e-5), with a removed sub-layer of each kind and removed hidden dims."""

import pytest
import torch
from cofi_testing import batch, gated_pruner, single_thread, tiny  # noqa: F401 (an autouse fixture)

from losparse.methods.cofi.removal import SkippedSublayer, remove_pruned_units
from losparse.methods.structured.blocks import encoder_blocks


@pytest.mark.parametrize("model_type, head", [
    ("bert", "ForSequenceClassification"), ("roberta", "ForSequenceClassification"),
    ("xlm-roberta", "ForSequenceClassification"), ("electra", "ForSequenceClassification"),
    ("bert", "ForTokenClassification"), ("roberta", "ForQuestionAnswering"),
])
def test_removal_computes_what_the_gated_model_computes(model_type, head):
    model = tiny(model_type, head)
    pruner = gated_pruner(model, seed=1)
    pruner.finalize()  # the deterministic gates, forced to the budget: what the model computes from now on
    gates = pruner.final_gates
    assert (gates["hidden"] == 0).any() and ((gates["hidden"] > 0) & (gates["hidden"] < 1)).any()
    assert float(gates["mha_layer"][0]) == 0 and float(gates["ffn_layer"][1]) == 0
    with torch.no_grad():
        masked = model(**batch(), output_hidden_states=True)
    remove_pruned_units(pruner)
    with torch.no_grad():
        removed = model(**batch(), output_hidden_states=True)
    kept = torch.nonzero(gates["hidden"].reshape(-1)).flatten()
    for name in ("logits", "start_logits", "end_logits"):
        if getattr(masked, name, None) is not None:
            assert getattr(masked, name).abs().max() > 1e-2
            torch.testing.assert_close(getattr(removed, name), getattr(masked, name), atol=1e-5, rtol=1e-5)
    for before, after in zip(masked.hidden_states, removed.hidden_states):
        torch.testing.assert_close(after, before[..., kept], atol=1e-5, rtol=1e-5)
        assert (before[..., gates["hidden"].reshape(-1) == 0] == 0).all()
    blocks = encoder_blocks(model)
    assert isinstance(blocks[0].layer.attention.output, SkippedSublayer) and blocks[0].heads == 0
    assert isinstance(blocks[1].layer.output, SkippedSublayer) and blocks[1].neurons == 0
    assert model.structure["hidden_size"] == kept.numel() < 32
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert not pruner.handles and not any("cofi" in getattr(h, "__module__", "") for h in hooks)


def test_a_subset_of_units_gates_only_those():
    model = tiny()
    pruner = gated_pruner(model, seed=4, cofi_units="head,neuron")
    assert set(pruner.masks) == {"head", "neuron"}
    pruner.finalize()
    with torch.no_grad():
        masked = model(**batch()).logits
    remove_pruned_units(pruner)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, masked, atol=1e-5, rtol=1e-5)
    structure = model.structure
    assert structure["hidden_size"] == 32 and all(layer["attention"] and layer["ffn"] for layer in structure["layers"])
    assert sum(layer["heads"] for layer in structure["layers"]) < 8
