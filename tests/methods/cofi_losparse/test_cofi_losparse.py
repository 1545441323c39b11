"""`--method cofi_losparse`: survivors, the survivor-relative S budget, removal = gated function, reload, resume."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from cofi_testing import batch, single_thread, tiny  # noqa: F401 (an autouse fixture)
from conftest import ToyDataset, load_script, tiny_bert_classifier, trainer_args
from transformers import Trainer

import losparse
from losparse import LoSparseConfig, LoSparseUsageError
from losparse.core.decompose import apply, losparse_layers
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.methods import get_method, method_for_directory
from losparse.methods.cofi.serialization import COFI_FILE
from losparse.methods.cofi_losparse import CofiLoSparseMethod, CofiLoSparsePruner, alive_neurons, neuron_roles
from losparse.methods.cofi_losparse.pruner import sparse_stage_config
from losparse.methods.cofi_losparse.trainer import cofi_losparse_trainer


def _config(**values):
    return LoSparseConfig(method="cofi_losparse", **{"remaining_ratio": 0.25, "structured_ratio": 0.5,
                                                     "low_rank_ratio": 0.05, "svd_solver": "randomized", **values})


def _decomposed(model, config):
    apply(model, sparse_stage_config(config))
    model.losparse_config = config
    return model


def _gated(config, seed=0):
    """A decomposed tiny BERT with a planned pruner: MHA sub-layer 0 removed, some heads and hidden dims off."""
    model = _decomposed(tiny(seed=seed), config)
    pruner = CofiLoSparsePruner(model, config)
    pruner.plan(total_steps=20, num_train_epochs=1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in pruner.masks.values():
            mask.log_alpha.copy_(torch.randn(mask.log_alpha.shape, generator=generator) * 3)
        pruner.masks["mha_layer"].log_alpha[0] = -5.0
        pruner.masks["mha_layer"].log_alpha[1] = 4.0
        pruner.masks["ffn_layer"].log_alpha.fill_(4.0)
    pruner.invalidate()
    return model, pruner


def test_survivors_follow_the_gates():
    config = _config(cofi_units="hidden,mha_layer,head,ffn_layer")
    model, pruner = _gated(config)
    gates = pruner.deterministic_gates()
    layers = pruner.sparse_pruner.layers
    alive = torch.split(alive_neurons(neuron_roles(model, layers), layers, gates, 8), [m.out_features for m in layers])
    by_name = dict(zip([name for name, _ in losparse_layers(model)], alive))
    layer0, layer1 = "bert.encoder.layer.0.", "bert.encoder.layer.1."
    assert not by_name[layer0 + "attention.self.query"].any() and not by_name[layer0 + "attention.output.dense"].any()
    heads = gates["head"][1] != 0
    assert torch.equal(by_name[layer1 + "attention.self.key"], heads.repeat_interleave(8))
    assert torch.equal(by_name[layer1 + "output.dense"], gates["hidden"].reshape(-1) != 0)
    assert by_name[layer1 + "intermediate.dense"].all()
    gates = {**gates, "head": torch.zeros_like(gates["head"])}  # no head left: the attention output computes nothing
    alive = alive_neurons(neuron_roles(model, layers), layers, gates, 8)
    by_name = dict(zip([name for name, _ in losparse_layers(model)], torch.split(alive, [m.out_features for m in layers])))
    assert not by_name[layer1 + "attention.output.dense"].any() and by_name[layer1 + "output.dense"].any()


def test_the_sparse_budget_is_a_share_of_the_survivors():
    model, pruner = _gated(_config())
    sparse = pruner.sparse_pruner
    alive = pruner.surviving_neurons()
    assert not alive.all()
    sparse.update_masks(0.3)
    masks = torch.cat([layer.sparse_mask for layer in sparse.layers])
    assert not (masks & ~alive).any()  # nothing of a removed structure is kept
    alive_size = float((alive.double() * sparse.neuron_sizes).sum())
    kept = float((masks.double() * sparse.neuron_sizes).sum())
    assert 0.3 * alive_size - 64 < kept <= 0.3 * alive_size  # within one neuron (rows of 32 or 48)
    assert pruner.sparse_kept_fraction() == pytest.approx(kept / alive_size)


def test_removal_and_reload_keep_the_gated_function(tmp_path):
    config = _config(cofi_units="hidden,mha_layer,head,ffn_layer")
    model, pruner = _gated(config, seed=1)
    pruner.final_gates = {unit: gate for unit, gate in pruner.deterministic_gates().items()}
    pruner.sparse_pruner.update_masks(0.4)
    with torch.no_grad():
        gated = model(**batch()).logits
    trainer = SimpleNamespace(model=model, pruner=pruner, dense_target_params=pruner.shape.dense_params,
                              dense_model_params=sum(p.numel() for p in model.parameters()))
    method = get_method("cofi_losparse")
    facts = method.compact(trainer)
    assert not any(type(layer).__name__ == "LoSparseLinear" for _, layer in losparse_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, gated, atol=1e-5, rtol=1e-4)
    report = method.save(trainer, str(tmp_path), None, None, facts)
    assert {LOSPARSE_CONFIG_FILE, COFI_FILE} <= set(os.listdir(tmp_path))
    assert isinstance(method_for_directory(str(tmp_path)), CofiLoSparseMethod)
    reloaded = losparse.load(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch()).logits, gated, atol=1e-5, rtol=1e-4)
    assert report["attention_layers"] == [False, True] and report["hidden_size"] < 32
    assert report["remaining_ratio"] == pytest.approx(report["target_params"] / pruner.shape.dense_params)
    assert "cofi_losparse" in method.format_report(report)


def test_bad_settings_are_one_line():
    with pytest.raises(LoSparseUsageError, match="drop 'neuron'"):
        CofiLoSparsePruner(_decomposed(tiny(), _config()), _config(cofi_units="head,neuron"))
    with pytest.raises(LoSparseUsageError, match="--prune_dim columns"):
        CofiLoSparsePruner(_decomposed(tiny(), _config()), _config(prune_dim="columns"))
    with pytest.raises(LoSparseUsageError, match="structured_ratio 0.1 is below"):
        _config(structured_ratio=0.1)


CONFIG = {"remaining_ratio": 0.3, "structured_ratio": 0.6, "cofi_finetune_epochs": 0.5,
          "lagrangian_warmup_steps": 4, "reg_learning_rate": 0.05, "pruning_warmup_steps": 2,
          "pruning_final_steps": 2, "pruning_interval": 2}


def _trainer(output_dir, **overrides):
    config = _config(**CONFIG)
    model = _decomposed(tiny_bert_classifier(), config)
    return cofi_losparse_trainer(Trainer)(model=model, args=trainer_args(output_dir, **overrides),
                                          train_dataset=ToyDataset(), cofi_config=config)


def test_training_ends_on_budget_and_resume_continues_the_same_trajectory(tmp_path):
    full = _trainer(tmp_path / "full", save_strategy="steps", save_steps=6)
    full.train()
    pruner = full.pruner
    assert pruner.final_gates is not None and pruner.sparse_pruner.schedule.total_steps == pruner.prune_end == 12
    assert 0 < pruner.achieved_kept_fraction() <= 0.6
    # S re-budgeted on the final survivors: LoSparse's share of them is its p_T, within one row (32 or 64 weights)
    assert pruner.sparse_kept_fraction() == pytest.approx(pruner.sparse_pruner.final_kept_fraction, abs=0.03)
    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    for unit in pruner.masks:
        torch.testing.assert_close(resumed.pruner.masks[unit].log_alpha, pruner.masks[unit].log_alpha,
                                   atol=1e-5, rtol=1e-5)
    for a, b in zip(pruner.sparse_pruner.layers, resumed.pruner.sparse_pruner.layers):
        assert torch.equal(a.sparse_mask, b.sparse_mask)


def test_run_glue_end_to_end(tiny_bert_dir, sentiment_files, tmp_path):
    run_glue = load_script("run_glue.py")
    train, validation = sentiment_files
    output_dir = tmp_path / "out"
    results = run_glue.main([
        "--model_name_or_path", tiny_bert_dir, "--train_file", train, "--validation_file", validation,
        "--output_dir", str(output_dir), "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
        "--learning_rate", "2e-3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--use_cpu", "true", "--max_seq_length", "32", "--method", "cofi_losparse", "--remaining_ratio", "0.25",
        "--structured_ratio", "0.5", "--cofi_finetune_epochs", "0.5", "--lagrangian_warmup_epochs", "0.5",
        "--reg_learning_rate", "0.05", "--svd_solver", "randomized"])
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["method"] == "cofi_losparse" and on_disk["losparse_config"]["remaining_ratio"] == 0.25
    assert on_disk["eval_accuracy"] == results["eval_accuracy"]
    report = on_disk["compression"]
    assert report["mask_remaining_ratio"] <= 0.5 and report["remaining_ratio"] < 0.3
    model = losparse.load(str(output_dir))
    assert sum(p.numel() for p in model.parameters()) == report["model_params"]


def test_bad_flags_are_refused_before_the_weights_load(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    method = get_method("cofi_losparse")
    for values, match in (({"prune_dim": "columns"}, "--prune_dim columns"), ({"cofi_units": "neuron"}, "drop 'neuron'"),
                          ({"shrink_sparse": True}, "--shrink_sparse")):
        with pytest.raises(LoSparseUsageError, match=match):
            method.check(_config(**values), tiny_bert_dir, AutoModelForSequenceClassification)
