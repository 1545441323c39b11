"""`--method structured`: head/FFN-neuron masks, physical removal, save/load, the trainer and run_glue."""

import json
import os

import pytest
import torch
from conftest import ToyDataset, load_script, tiny_bert_classifier, trainer_args
from torch import nn

from losparse import LoSparseConfig, LoSparseUsageError
from losparse.methods.structured.blocks import encoder_blocks, group_sizes, select_groups, target_params
from losparse.methods.structured.pruner import GroupImportance, StructuredPruner
from losparse.methods.structured.removal import build_structured_peer, remove_pruned_structures
from losparse.methods.structured.serialization import STRUCTURE_FILE, load_structured, save_structured
from losparse.methods.structured.trainer import structured_trainer


def _classifier(model_type: str, seed: int = 0) -> nn.Module:
    import transformers

    config_class, model_class = {
        "bert": ("BertConfig", "BertForSequenceClassification"),
        "roberta": ("RobertaConfig", "RobertaForSequenceClassification"),
        "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification"),
        "electra": ("ElectraConfig", "ElectraForSequenceClassification"),
    }[model_type]
    config = getattr(transformers, config_class)(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=48,
                                                 max_position_embeddings=40, num_labels=3, pad_token_id=1)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


def _inputs(batch: int = 3, length: int = 9) -> dict:
    ids = torch.randint(5, 60, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding must be handled alike by both models
    return {"input_ids": ids, "attention_mask": mask}


def _config(**values) -> LoSparseConfig:
    return LoSparseConfig(method="structured", **values)


def _masked(model, kept, all_heads_of_layer0=False):
    pruner = StructuredPruner(model, total_steps=100, config=_config(remaining_ratio=kept))
    scores = torch.rand(pruner.sizes.shape, generator=torch.Generator().manual_seed(3))
    if all_heads_of_layer0:
        scores[:4] = -1.0
    pruner.update_masks(kept, scores=scores)
    return pruner


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra"])
def test_removal_keeps_the_masked_function_and_counts(model_type):
    model = _classifier(model_type)
    dense_target = target_params(encoder_blocks(model))
    pruner = _masked(model, 0.35, all_heads_of_layer0=True)
    with torch.no_grad():
        masked = model(**_inputs()).logits
    remove_pruned_structures(model)
    with torch.no_grad():
        removed = model(**_inputs()).logits
    torch.testing.assert_close(removed, masked, atol=1e-6, rtol=1e-5)
    blocks = encoder_blocks(model)
    assert not blocks[0].has_attention and blocks[0].attention_output.in_features == 0
    kept = target_params(blocks)
    assert kept == pytest.approx(pruner.achieved_kept_fraction() * dense_target)
    biggest_group = 4 * 32 * 8
    assert 0 <= 0.35 * dense_target - kept < biggest_group


def test_masking_zeroes_exactly_the_pruned_groups():
    model = _classifier("bert")
    pruner = _masked(model, 0.5)
    (heads0, neurons0), _ = model.structured_keep
    block = encoder_blocks(model)[0]
    for h in range(4):
        rows = slice(8 * h, 8 * h + 8)
        zero = not bool(heads0[h])
        for linear in block.qkv:
            assert bool((linear.weight[rows] == 0).all()) == zero
            assert bool((linear.bias[rows] == 0).all()) == zero
        assert bool((block.attention_output.weight[:, rows] == 0).all()) == zero
    assert torch.equal((block.ffn_output.weight != 0).any(dim=0), neurons0)
    assert torch.equal((block.intermediate.weight != 0).any(dim=1), neurons0)
    assert 0 < pruner.achieved_kept_fraction() <= 0.5


def test_select_groups_is_the_global_parameter_weighted_prefix():
    sizes = torch.tensor([4.0, 1.0, 1.0, 4.0, 2.0], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.1, 0.5, 0.7])
    # best first: 0 (4), 1 (5), 4 (7) fit in 0.6·12 = 7.2; 3 would make 11
    assert select_groups(scores, sizes, 0.6).tolist() == [True, True, False, False, True]
    assert not select_groups(scores, sizes, 0.2).any()
    assert select_groups(scores, sizes, 1.0).all()


def test_group_sensitivity_is_the_per_weight_mean_of_w_times_grad():
    model = _classifier("bert").train()
    blocks = encoder_blocks(model)
    importance = GroupImportance(blocks, "sensitivity", beta1=0.5)
    model(**_inputs(), labels=torch.tensor([0, 1, 2])).loss.backward()
    importance.update()
    b = blocks[1]
    rows = slice(8, 16)  # head 1 of layer 1
    total = sum((q.weight[rows] * q.weight.grad[rows]).abs().sum() for q in b.qkv)
    total = total + (b.attention_output.weight[:, rows] * b.attention_output.weight.grad[:, rows]).abs().sum()
    offset = blocks[0].heads + blocks[0].neurons
    torch.testing.assert_close(importance.ema[offset + 1], 0.5 * total.float() / (4 * 32 * 8))
    j = 7  # FFN neuron 7 of layer 1
    neuron = ((b.intermediate.weight[j] * b.intermediate.weight.grad[j]).abs().sum()
              + (b.ffn_output.weight[:, j] * b.ffn_output.weight.grad[:, j]).abs().sum())
    torch.testing.assert_close(importance.ema[offset + 4 + j], 0.5 * neuron.float() / (2 * 32))
    assert group_sizes(blocks).numel() == importance.ema.numel() == 2 * (4 + 48)


def test_save_load_round_trip_and_plain_from_pretrained_refuses(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _classifier("roberta")
    _masked(model, 0.4, all_heads_of_layer0=True)
    remove_pruned_structures(model)
    save_structured(model, str(tmp_path))
    assert json.loads((tmp_path / STRUCTURE_FILE).read_text())["layers"][0]["heads"] == 0
    reloaded = load_structured(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_inputs()).logits, model(**_inputs()).logits, atol=0, rtol=0)
    with pytest.raises(Exception, match="size"):
        AutoModelForSequenceClassification.from_pretrained(str(tmp_path))


def test_pruner_schedule_state_and_resume(tmp_path):
    model = tiny_bert_classifier().train()
    config = _config(remaining_ratio=0.3, pruning_warmup_steps=2, pruning_final_steps=3, pruning_interval=2)
    pruner = StructuredPruner(model, total_steps=12, config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = ToyDataset(n=16)
    for step in range(1, 13):
        batch = data[slice(step % 2 * 8, step % 2 * 8 + 8)]
        model(**batch).loss.backward()
        optimizer.step()
        pruner.step(step)
        optimizer.zero_grad()
        if step == 6:
            pruner.save(str(tmp_path))
    achieved = pruner.achieved_kept_fraction()
    assert 0.3 - 2048 / 16384 < achieved <= 0.3  # within one group (a head: 4·32·16 of 16384 weights)
    for block, (heads, neurons) in zip(pruner.blocks, model.structured_keep):
        assert (block.ffn_output.weight[:, ~neurons] == 0).all()  # re-zeroed after the optimizer's last step
    restored = StructuredPruner(tiny_bert_classifier(), total_steps=12, config=config)
    assert restored.load(str(tmp_path)) and restored.last_step == 6
    assert not StructuredPruner(tiny_bert_classifier(), 12, config).load(str(tmp_path / "nothing"))


def test_trainer_prunes_while_training_and_resumes_the_same_run(tmp_path):
    from transformers import Trainer

    from losparse.core.checkpoint import PRUNER_STATE_FILE

    config = _config(remaining_ratio=0.5, pruning_warmup_ratio=0.1, pruning_final_ratio=0.2)

    def make(output_dir, **overrides):
        return structured_trainer(Trainer)(
            model=tiny_bert_classifier(), args=trainer_args(output_dir, **overrides),
            train_dataset=ToyDataset(), structured_config=config)

    trainer = make(tmp_path / "full", save_strategy="steps", save_steps=8)
    trainer.train()
    assert trainer.pruner.last_step == trainer.state.max_steps == 16
    assert 0.5 - 2048 / 16384 < trainer.pruner.achieved_kept_fraction() <= 0.5
    assert structured_trainer(Trainer) is type(trainer)
    checkpoint = tmp_path / "full" / "checkpoint-8"
    assert (checkpoint / PRUNER_STATE_FILE).is_file()
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.pruner.keep, trainer.pruner.keep)
    torch.testing.assert_close(resumed.pruner.importance.ema, trainer.pruner.importance.ema, atol=1e-6, rtol=1e-4)


def test_usage_errors():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    mpnet = MPNetForSequenceClassification(MPNetConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))
    with pytest.raises(LoSparseUsageError, match="model type 'mpnet'"):
        StructuredPruner(mpnet, 10, _config())
    with pytest.raises(LoSparseUsageError, match="pruning_variant"):
        StructuredPruner(tiny_bert_classifier(), 10, _config(pruning_variant="reference"))
    with pytest.raises(LoSparseUsageError, match="kept_fraction"):
        build_structured_peer(tiny_bert_classifier(), 0.0)


def test_peer_matches_the_ratio_and_given_scores_decide():
    dense = tiny_bert_classifier().eval()
    peer = build_structured_peer(dense, 0.4, seed=1)
    assert 0 <= 0.4 * 16384 - target_params(encoder_blocks(peer)) < 2048
    assert target_params(encoder_blocks(dense)) == 16384  # the dense model is left alone
    sizes = group_sizes(encoder_blocks(dense))
    scores = torch.zeros(sizes.shape, dtype=torch.float64)
    scores[2 + 64:2 + 64 + 2] = 1.0  # both heads of layer 1 first
    chosen = build_structured_peer(dense, 0.3, scores=scores)
    assert [b.heads for b in encoder_blocks(chosen)] == [0, 2]


def test_run_glue_structured_end_to_end(tiny_bert_dir, sentiment_files, tmp_path):
    run_glue = load_script("run_glue.py")
    train, validation = sentiment_files
    output_dir = tmp_path / "out"
    results = run_glue.main([
        "--model_name_or_path", tiny_bert_dir, "--train_file", train, "--validation_file", validation,
        "--output_dir", str(output_dir), "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
        "--learning_rate", "2e-3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--use_cpu", "true", "--max_seq_length", "32", "--method", "structured", "--remaining_ratio", "0.5"])
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["method"] == "structured" and on_disk["eval_accuracy"] == results["eval_accuracy"]
    report = on_disk["compression"]
    assert 0.5 - 2048 / 16384 < report["remaining_ratio"] <= 0.5
    assert report["remaining_ratio"] == pytest.approx(report["mask_remaining_ratio"])
    assert report["model_params"] < report["model_params_dense"]
    assert {"model.safetensors", STRUCTURE_FILE, "config.json", "tokenizer.json"} <= set(os.listdir(output_dir))
    model = load_structured(str(output_dir))
    assert target_params(encoder_blocks(model)) == report["target_params"]


def test_run_glue_structured_refuses_unsupported_model_before_loading(tmp_path, sentiment_files):
    from transformers import DebertaV2Config

    run_glue = load_script("run_glue.py")
    model_dir = tmp_path / "deberta"
    DebertaV2Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32).save_pretrained(str(model_dir))
    with pytest.raises(LoSparseUsageError, match="deberta-v2"):
        run_glue.main(["--model_name_or_path", str(model_dir), "--train_file", sentiment_files[0],
                       "--validation_file", sentiment_files[1], "--output_dir", str(tmp_path / "o"),
                       "--method", "structured", "--use_cpu", "true", "--report_to", "none"])
