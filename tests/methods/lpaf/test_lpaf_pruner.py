"""`--method lpaf` end to end on a tiny BERT: prune entries, factorise, mixed ranks, compact to pure U·V."""

import os
import shutil

import pytest
import torch
from conftest import ToyDataset, assert_same_training_state, tiny_bert_classifier, trainer_args

import losparse
from losparse import LoSparseConfig, LoSparseTrainer, LoSparseUsageError
from losparse.core.decompose import allocate_ranks, lpaf_max_ranks
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear
from losparse.methods.lpaf.factorize import svd_factors, weighted_reconstruction_error
from losparse.methods.lpaf.pruner import LpafPruner

CONFIG = dict(method="lpaf", remaining_ratio=0.3, pruning_warmup_steps=1, pruning_final_steps=2, pruning_interval=2)
TOTAL_STEPS = 16  # ToyDataset: 64 examples, batch 8, 2 epochs


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoSparseLinear)]


def _inputs():
    data = ToyDataset(n=8, seed=5)
    return {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids)}


def test_apply_wraps_for_unstructured_pruning_without_changing_the_model():
    dense = tiny_bert_classifier().eval()
    model = tiny_bert_classifier().eval()
    losparse.apply(model, LoSparseConfig(**CONFIG))
    layers = _layers(model)
    assert layers and all(layer.prune_dim == "entries" for layer in layers)
    assert all(layer.sparse_mask.shape == (layer.out_features, layer.in_features) for layer in layers)
    assert all(not layer.low_rank_u.any() and not layer.low_rank_v.any() for layer in layers)
    shapes = [(layer.out_features, layer.in_features) for layer in layers]
    assert [layer.rank for layer in layers] == lpaf_max_ranks(shapes, allocate_ranks(shapes, 0.3), 2.0)
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).logits, dense(**_inputs()).logits)


class _Recorder(LpafPruner):
    """Keeps what the test needs to see at each phase."""

    def factorize(self):
        self.before_factorize = [(layer.sparse.detach().clone(), layer.sparse_mask.clone()) for layer in self.layers]
        self.kept_at_factorize = self.achieved_kept_fraction()
        report = super().factorize()
        self.factors = [(layer.low_rank_u.detach().clone(), layer.low_rank_v.detach().clone()) for layer in self.layers]
        return report

    def set_ranks(self, step):
        super().set_ranks(step)
        self.__dict__.setdefault("rank_history", {})[step] = [layer.current_rank for layer in self.layers]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = LoSparseTrainer(model=tiny_bert_classifier(), args=trainer_args(tmp_path_factory.mktemp("lpaf")),
                              train_dataset=ToyDataset(), losparse_config=LoSparseConfig(**CONFIG), pruner_class=_Recorder)
    trainer.train()
    return trainer


def test_pruning_phase_reaches_the_budget_with_entry_masks(trained):
    pruner = trained.pruner
    assert pruner.prune_steps == 8
    total = sum(layer.sparse_mask.numel() for layer in pruner.layers)
    assert abs(pruner.kept_at_factorize - 0.3) <= 1.0 / total
    # unstructured: the kept entries are spread over rows, not whole rows
    mask = pruner.before_factorize[0][1]
    assert 0 < int(mask.sum(dim=1).max()) < mask.shape[1] or int(mask.sum(dim=1).min()) > 0


def test_sparsity_aware_svd_fits_the_kept_entries_better_than_plain_svd(trained):
    pruner = trained.pruner
    wins = 0
    for (pruned, mask), (u, v), rank in zip(pruner.before_factorize, pruner.factors, pruner.max_ranks):
        weights = mask.to(pruned.dtype)
        pu, pv = svd_factors(pruned, rank)
        aware = weighted_reconstruction_error(pruned, weights, u, v)
        plain = weighted_reconstruction_error(pruned, weights, pu, pv)
        assert aware <= plain * (1 + 1e-6)
        wins += aware < plain * 0.99
    assert wins == len(pruner.layers)
    assert pruner.factorization_report["masked_error_vs_plain_svd_median"] < 1.0


def test_after_factorising_s_is_gone_and_ranks_anneal_to_the_target(trained):
    pruner = trained.pruner
    for layer in pruner.layers:
        assert not layer.sparse_active and not layer.sparse.requires_grad and not layer.sparse.any()
    history = pruner.rank_history
    drawn = [ranks for step, ranks in history.items() if pruner.prune_steps < step <= TOTAL_STEPS]
    assert any(any(k > r for k, r in zip(ranks, pruner.target_ranks)) for ranks in drawn), "no mixed ranks drawn"
    for ranks in drawn:
        assert all(r <= k <= top for k, r, top in zip(ranks, pruner.target_ranks, pruner.max_ranks))
    final_phase = [history[step] for step in range(TOTAL_STEPS - pruner.finetune_final_steps + 1, TOTAL_STEPS + 2)]
    assert all(ranks == pruner.target_ranks for ranks in final_phase)


def test_compacts_to_pure_low_rank_at_the_target_ratio_and_reloads(trained, tmp_path):
    model = trained.model.eval()
    with torch.no_grad():
        before = model(**_inputs()).logits
    losparse.compact(model)
    compact_layers = [m for m in model.modules() if isinstance(m, CompactLoSparseLinear)]
    assert compact_layers and all(layer.num_kept == 0 for layer in compact_layers)
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).logits, before, atol=1e-5, rtol=1e-4)
    report = losparse.parameter_report(model)
    assert report["sparse_share"] == 0.0
    slack = sum(layer["in_features"] + layer["out_features"] for layer in report["layers"])
    assert abs(report["target_params"] - 0.3 * report["target_dense_params"]) <= slack
    losparse.save(model, str(tmp_path / "out"))
    loaded = losparse.load(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs()).logits, before, atol=1e-5, rtol=1e-4)
    merged = losparse.merge(loaded)
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs()).logits, before, atol=1e-4, rtol=1e-4)


def _state(trainer):
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


@pytest.mark.parametrize("checkpoint_step", [4, 12], ids=["in-pruning", "in-mixed-rank"])
def test_resume_continues_the_same_trajectory(tmp_path, checkpoint_step):
    config = LoSparseConfig(**CONFIG)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = LoSparseTrainer(pruner_class=LpafPruner, model=tiny_bert_classifier(), train_dataset=ToyDataset(), losparse_config=config,
                               args=trainer_args(straight_dir, save_strategy="steps", save_steps=checkpoint_step))
    straight.train()
    expected = _state(straight)
    shutil.copytree(straight_dir / f"checkpoint-{checkpoint_step}", resumed_dir / f"checkpoint-{checkpoint_step}")
    resumed = LoSparseTrainer(pruner_class=LpafPruner, model=tiny_bert_classifier(seed=7), train_dataset=ToyDataset(), losparse_config=config,
                              args=trainer_args(resumed_dir))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.pruner.factorized
    assert [layer.current_rank for layer in resumed.pruner.layers] == resumed.pruner.target_ranks
    assert_same_training_state(_state(resumed), expected)


@pytest.mark.parametrize("importance,metric", [("first_order", "movement"), ("magnitude", "magnitude"),
                                               ("sensitivity", "sensitivity")])
def test_importance_variants_map_to_the_tracked_metric(importance, metric):
    model = tiny_bert_classifier()
    losparse.apply(model, LoSparseConfig(**CONFIG, lpaf_importance=importance))
    assert LpafPruner(model, TOTAL_STEPS).importance.metric == metric


@pytest.mark.parametrize("overrides,message", [
    (dict(lpaf_importance="taylor"), "--lpaf_importance 'taylor'"),
    (dict(lpaf_factorization="qr"), "--lpaf_factorization 'qr'"),
    (dict(lpaf_prune_fraction=1.0), "--lpaf_prune_fraction 1.0"),
    (dict(lpaf_max_rank_factor=0.5), "--lpaf_max_rank_factor 0.5"),
    (dict(pruning_variant="reference"), "--pruning_variant 'reference' is not available with --method lpaf"),
])
def test_bad_lpaf_settings_are_one_line_errors(overrides, message):
    with pytest.raises(LoSparseUsageError, match=message.replace("(", r"\(")):
        LoSparseConfig(**{**CONFIG, **overrides})


def test_a_run_too_short_for_both_phases_is_refused():
    model = tiny_bert_classifier()
    losparse.apply(model, LoSparseConfig(**CONFIG))
    with pytest.raises(LoSparseUsageError, match="both need at least one"):
        LpafPruner(model, 1)


def test_plain_factorization_uses_the_svd_of_the_pruned_matrix(tmp_path):
    model = tiny_bert_classifier()
    trainer = LoSparseTrainer(pruner_class=LpafPruner, model=model, args=trainer_args(tmp_path, max_steps=4), train_dataset=ToyDataset(),
                              losparse_config=LoSparseConfig(**{**CONFIG, "lpaf_factorization": "plain",
                                                                "pruning_final_steps": 0}))
    trainer.train()
    assert trainer.pruner.factorization_report["masked_error_vs_plain_svd_median"] == pytest.approx(1.0)
    assert os.path.isdir(tmp_path)


def test_run_glue_method_lpaf_end_to_end(tiny_bert_dir, sentiment_files, tmp_path):
    import json

    from conftest import load_script

    run_glue = load_script("run_glue.py")
    train, validation = sentiment_files
    output_dir = tmp_path / "out"
    results = run_glue.main(["--model_name_or_path", tiny_bert_dir, "--train_file", train, "--validation_file",
                             validation, "--output_dir", str(output_dir), "--num_train_epochs", "2",
                             "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--report_to", "none",
                             "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
                             "--max_seq_length", "64", "--method", "lpaf", "--remaining_ratio", "0.2"])
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["method"] == "lpaf" and on_disk["eval_accuracy"] == results["eval_accuracy"]
    report = on_disk["compression"]
    assert report["sparse_share"] == 0.0
    slack = sum(layer["in_features"] + layer["out_features"] for layer in report["layers"])
    assert abs(report["target_params"] - 0.2 * report["target_dense_params"]) <= slack
    model = losparse.load(str(output_dir))
    assert all(m.num_kept == 0 for m in model.modules() if isinstance(m, CompactLoSparseLinear))


def test_the_plain_pruner_refuses_an_lpaf_model_and_names_the_one_it_needs(tmp_path):
    with pytest.raises(LoSparseUsageError, match="pruner_class=LpafPruner"):
        LoSparseTrainer(model=tiny_bert_classifier(), args=trainer_args(tmp_path, max_steps=2), train_dataset=ToyDataset(),
                        losparse_config=LoSparseConfig(**CONFIG)).train()
