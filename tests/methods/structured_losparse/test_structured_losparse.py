"""`--method structured_losparse`: the two stages' arithmetic, the saved model, run_glue end to end and resume."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import compress_randomly, load_script, tiny_bert_classifier

import losparse
from losparse import LoSparseConfig, LoSparseUsageError
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.methods import get_method, method_for_directory
from losparse.methods.structured.blocks import encoder_blocks, group_sizes, target_params
from losparse.methods.structured.removal import build_structured_peer
from losparse.methods.structured.serialization import STRUCTURE_FILE
from losparse.methods.structured_losparse import (
    StructuredLoSparseMethod,
    ZeroWidthLinear,
    dense_target_params,
    protect_empty_layers,
    split_steps,
)
from losparse.methods.structured_losparse.method import first_stage_config, prepare_second_stage, second_stage_config

TINY_DENSE = 16384  # 2 layers x (4·32² + 2·32·64): tests/conftest.py tiny_bert_config


def _inputs():
    ids = torch.randint(5, 30, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hybrid(**values):
    return LoSparseConfig(method="structured_losparse", **values)


def test_stage_configs_multiply_to_the_run_ratio():
    config = _hybrid(remaining_ratio=0.1, structured_ratio=0.4, low_rank_ratio=0.05)
    first, second = first_stage_config(config), second_stage_config(config)
    assert (first.method, first.remaining_ratio) == ("structured", 0.4)
    assert second.method == "structured_losparse" and second.remaining_ratio == pytest.approx(0.25)
    assert second.structured_ratio == 1.0 and second_stage_config(second) == second  # nothing structured left
    # the structured stage keeps a little less than asked (whole heads): LoSparse makes up for it
    assert second_stage_config(config, 0.3125).remaining_ratio == pytest.approx(0.32)


@pytest.mark.parametrize("total, fraction, expected", [(10, 0.5, (5, 5)), (3, 0.9, (2, 1)), (7, 0.01, (1, 6))])
def test_split_steps_gives_both_stages_steps_and_keeps_the_budget(total, fraction, expected):
    assert split_steps(total, fraction) == expected


@pytest.mark.parametrize("values, match", [
    (dict(remaining_ratio=0.3, structured_ratio=0.2), "structured_ratio 0.2 is below"),
    (dict(remaining_ratio=0.1, structured_ratio=0.5, low_rank_ratio=0.2), "low_rank_ratio 0.2 must be below"),
    (dict(structured_ratio=1.5), "structured_ratio 1.5 is out of range"),
    (dict(structured_steps_fraction=1.0), "structured_steps_fraction 1.0"),
])
def test_bad_settings_are_one_line(values, match):
    with pytest.raises(LoSparseUsageError, match=match):
        _hybrid(**values)
    with pytest.raises(LoSparseUsageError, match="at least 2 optimizer steps"):
        split_steps(1, 0.5)


def test_zero_width_layers_are_kept_out_of_the_decomposition():
    model = tiny_bert_classifier().eval()
    scores = torch.rand(group_sizes(encoder_blocks(model)).shape, generator=torch.Generator().manual_seed(0))
    scores[:2] = -1.0  # both heads of layer 0 go first
    pruned = build_structured_peer(model, 0.5, scores=scores)
    reference = pruned(**_inputs()).logits
    assert protect_empty_layers(pruned) == ["bert.encoder.layer.0.attention.output.dense"]
    assert isinstance(pruned.bert.encoder.layer[0].attention.output.dense, ZeroWidthLinear)
    torch.testing.assert_close(pruned(**_inputs()).logits, reference)
    assert dense_target_params(pruned.config) == TINY_DENSE == target_params(encoder_blocks(tiny_bert_classifier()))


def test_the_second_stage_is_sized_on_what_the_first_kept_even_with_a_layer_without_heads():
    model = tiny_bert_classifier().eval()
    scores = torch.rand(group_sizes(encoder_blocks(model)).shape, generator=torch.Generator().manual_seed(0))
    scores[:2] = -1.0  # both heads of layer 0 go first
    pruned = build_structured_peer(model, 0.5, scores=scores)
    kept = target_params(encoder_blocks(pruned)) / TINY_DENSE
    stage = prepare_second_stage(pruned, _hybrid(remaining_ratio=0.25, structured_ratio=0.5))
    assert stage.remaining_ratio == pytest.approx(0.25 / kept)
    assert isinstance(pruned.bert.encoder.layer[0].attention.output.dense, ZeroWidthLinear)


def test_saved_hybrid_reloads_through_the_one_loader_with_the_same_function(tmp_path):
    model = tiny_bert_classifier().eval()
    scores = torch.rand(group_sizes(encoder_blocks(model)).shape, generator=torch.Generator().manual_seed(2))
    scores[:2] = -1.0
    pruned = build_structured_peer(model, 0.5, scores=scores)
    protect_empty_layers(pruned)
    compress_randomly(pruned, 0.5, 0.05)
    pruned.losparse_config = _hybrid(remaining_ratio=0.25, structured_ratio=0.5)
    method = get_method("structured_losparse")
    report = method.save(SimpleNamespace(model=pruned), str(tmp_path), None, None, {})
    assert {LOSPARSE_CONFIG_FILE, STRUCTURE_FILE} <= set(os.listdir(tmp_path))
    assert isinstance(method_for_directory(str(tmp_path)), StructuredLoSparseMethod)
    loaded = losparse.load(str(tmp_path))
    torch.testing.assert_close(loaded(**_inputs()).logits, pruned(**_inputs()).logits, atol=1e-5, rtol=1e-4)
    assert report["target_dense_params"] == TINY_DENSE
    assert report["remaining_ratio"] == pytest.approx(report["target_params"] / TINY_DENSE)
    assert report["remaining_ratio"] < 0.5 * report["structured_share"] + 0.05
    assert report["heads"][0] == 0 and "structured_losparse" in method.format_report(report)


def _run_glue(tiny_bert_dir, sentiment_files, output_dir, *extra):
    run_glue = load_script("run_glue.py")
    train, validation = sentiment_files
    return run_glue.main([
        "--model_name_or_path", tiny_bert_dir, "--train_file", train, "--validation_file", validation,
        "--output_dir", str(output_dir), "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
        "--learning_rate", "2e-3", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3",
        "--use_cpu", "true", "--max_seq_length", "32", "--method", "structured_losparse", "--remaining_ratio", "0.25",
        "--structured_ratio", "0.5", "--svd_solver", "randomized", *extra])


def test_run_glue_end_to_end_and_resume_continues_the_same_run(tiny_bert_dir, sentiment_files, tmp_path):
    full = tmp_path / "full"
    results = _run_glue(tiny_bert_dir, sentiment_files, full, "--save_strategy", "steps", "--save_steps", "6")
    on_disk = json.loads((full / "all_results.json").read_text())
    assert on_disk["method"] == "structured_losparse" and on_disk["losparse_config"]["remaining_ratio"] == 0.25
    assert on_disk["train_first_stage_steps"] == 12 and on_disk["eval_accuracy"] == results["eval_accuracy"]
    report = on_disk["compression"]
    assert report["target_dense_params"] == TINY_DENSE and abs(report["remaining_ratio"] - 0.25) < 0.01
    assert 0.5 - 2048 / TINY_DENSE < report["structured_share"] <= 0.5
    model = losparse.load(str(full))
    assert sum(p.numel() for p in model.parameters()) == report["model_params"]
    resumed = tmp_path / "resumed"
    _run_glue(tiny_bert_dir, sentiment_files, resumed, "--save_strategy", "steps", "--save_steps", "6")
    again = _run_glue(tiny_bert_dir, sentiment_files, resumed, "--resume_from_checkpoint",
                      str(resumed / "checkpoint-6"), "--save_strategy", "no")
    assert again["eval_accuracy"] == results["eval_accuracy"]
    assert json.loads((resumed / "all_results.json").read_text())["compression"] == report


def test_unsupported_family_is_refused_before_loading(tmp_path, sentiment_files):
    from transformers import DebertaV2Config

    model_dir = tmp_path / "deberta"
    DebertaV2Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32).save_pretrained(str(model_dir))
    with pytest.raises(LoSparseUsageError, match="deberta-v2"):
        _run_glue(str(model_dir), sentiment_files, tmp_path / "o")


def test_a_bad_split_on_the_command_line_is_refused_before_loading(tmp_path, sentiment_files):
    with pytest.raises(LoSparseUsageError, match="--structured_ratio 0.2 is below --remaining_ratio 0.3"):
        _run_glue(str(tmp_path / "no-such-model"), sentiment_files, tmp_path / "o", "--remaining_ratio", "0.3",
                  "--structured_ratio", "0.2")


def test_overwrite_removes_an_earlier_first_stage(tmp_path):
    from losparse.cli.run import remove_stale_artifacts
    from losparse.methods.structured_losparse import STAGE_DIR

    (tmp_path / STAGE_DIR).mkdir()
    (tmp_path / STAGE_DIR / "model.safetensors").write_bytes(b"old")
    assert STAGE_DIR in remove_stale_artifacts(str(tmp_path)) and not (tmp_path / STAGE_DIR).exists()
