"""`--method cofi` end to end: flags, refusals before loading, save/load, run_glue with and without a teacher."""

import json
import os

import pytest
import torch
from cofi_testing import batch, config, gated_pruner, single_thread, tiny  # noqa: F401 (an autouse fixture)
from conftest import ToyDataset, load_script, tiny_bert_classifier, trainer_args
from transformers import AutoModelForSequenceClassification, Trainer

import losparse
from losparse import LoSparseConfig, LoSparseUsageError
from losparse.cli.run import run_main
from losparse.methods import get_method
from losparse.methods.cofi.removal import remove_pruned_units
from losparse.methods.cofi.serialization import COFI_FILE, load_cofi, save_cofi
from losparse.methods.cofi.trainer import cofi_trainer
from losparse.methods.structured.blocks import encoder_blocks, target_params
from losparse.training.distill import DistillationArguments

run_glue = load_script("run_glue.py")


def _argv(model_dir, files, output_dir, *extra):
    train, validation = files
    return ["--model_name_or_path", model_dir, "--train_file", train, "--validation_file", validation,
            "--output_dir", str(output_dir), "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
            "--max_seq_length", "32", "--method", "cofi", *extra]


@pytest.mark.parametrize("values, fragment", [
    ({"cofi_units": "hidden,heads"}, "--cofi_units 'hidden,heads': unknown unit 'heads'"),
    ({"cofi_units": "head,head"}, "--cofi_units 'head,head': a unit repeats"),
    ({"reg_learning_rate": 0.0}, "--reg_learning_rate 0.0 is not allowed"),
    ({"lagrangian_warmup_epochs": -1.0}, "--lagrangian_warmup_epochs -1.0 is not allowed"),
    ({"cofi_finetune_epochs": float("nan")}, "--cofi_finetune_epochs nan is not allowed"),
    ({"lagrangian_warmup_steps": -3}, "--lagrangian_warmup_steps -3 is not allowed"),
])
def test_bad_flags_name_the_value(values, fragment):
    with pytest.raises(LoSparseUsageError) as error:
        LoSparseConfig(method="cofi", **values)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the bad input should have been rejected before loading")

    monkeypatch.setattr(run_glue.glue, "load_data", refuse)
    monkeypatch.setattr(run_glue.AutoModelForSequenceClassification, "from_pretrained", refuse)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unsupported_family_is_refused_before_the_weights_load(family, tmp_path, sentiment_files, capsys, no_loading):
    from transformers import GPT2Config, LlamaConfig

    model_dir = tmp_path / family
    small = {"vocab_size": 40, "num_hidden_layers": 1, "num_attention_heads": 2}
    (GPT2Config(n_embd=16, **small) if family == "gpt2" else LlamaConfig(hidden_size=16, intermediate_size=32,
                                                                         **small)).save_pretrained(str(model_dir))
    with pytest.raises(SystemExit):
        run_main(run_glue.main, _argv(str(model_dir), sentiment_files, tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --method cofi supports") and f"model type '{family}'" in err
    assert len(err.splitlines()) == 1


def test_bad_unit_on_the_command_line_is_one_line_before_loading(tiny_bert_dir, sentiment_files, tmp_path, capsys,
                                                                 no_loading):
    with pytest.raises(SystemExit):
        run_main(run_glue.main, _argv(tiny_bert_dir, sentiment_files, tmp_path / "o", "--cofi_units", "hidden,layer"))
    assert capsys.readouterr().err.strip().startswith("error: --cofi_units 'hidden,layer': unknown unit 'layer'")


def test_trainer_refusals(tmp_path):
    def make(values=None, **kwargs):
        return cofi_trainer(Trainer)(model=tiny_bert_classifier(), args=trainer_args(tmp_path), cofi_config=config(
            **(values or {})), train_dataset=ToyDataset(), **kwargs)

    with pytest.raises(LoSparseUsageError, match="must be below --num_train_epochs 2"):
        make({"cofi_prefinetune_epochs": 1, "cofi_finetune_epochs": 1})
    teacher = tiny_bert_classifier(seed=1)
    mapped = DistillationArguments(teacher_model_name_or_path="t", alpha_layer=0.9, layer_map=["0:0"])
    with pytest.raises(LoSparseUsageError, match="drop --layer_map"):
        make(teacher_model=teacher, distill_args=mapped)
    with pytest.raises(LoSparseUsageError, match="a teacher_model needs distill_args"):
        make(teacher_model=teacher)
    with pytest.raises(LoSparseUsageError, match="with --method cofi"):
        cofi_trainer(Trainer)(model=tiny_bert_classifier(), args=trainer_args(tmp_path),
                              cofi_config=LoSparseConfig(method="structured"))


def test_save_load_round_trip_and_plain_from_pretrained_refuses(tmp_path):
    model = tiny("roberta")
    pruner = gated_pruner(model, seed=1)
    remove_pruned_units(pruner)
    save_cofi(model, str(tmp_path))
    manifest = json.loads((tmp_path / COFI_FILE).read_text())
    assert manifest["hidden_size"] < 32 and not manifest["layers"][0]["attention"] and not manifest["layers"][1]["ffn"]
    for reloaded in (load_cofi(str(tmp_path)), get_method("cofi").load(str(tmp_path)), losparse.load(str(tmp_path))):
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch()).logits, model(**batch()).logits, atol=0, rtol=0)
    with pytest.raises(Exception, match="size"):
        AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    with pytest.raises(LoSparseUsageError, match="holds no cofi_pruning.json"):
        load_cofi(str(tmp_path / "nothing"))


def test_run_glue_cofi_end_to_end(tiny_bert_dir, sentiment_files, tmp_path):
    output_dir = tmp_path / "out"
    results = run_glue.main(_argv(tiny_bert_dir, sentiment_files, output_dir, "--num_train_epochs", "2",
                                  "--remaining_ratio", "0.4", "--cofi_finetune_epochs", "0.5",
                                  "--lagrangian_warmup_epochs", "0.5", "--reg_learning_rate", "0.05"))
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["method"] == "cofi" and on_disk["eval_accuracy"] == results["eval_accuracy"]
    report = on_disk["compression"]
    assert 0.4 - 4 * 32 * 16 / 16384 < report["remaining_ratio"] <= 0.4
    assert report["remaining_ratio"] == pytest.approx(report["mask_remaining_ratio"])
    assert report["model_params"] < report["model_params_dense"]
    assert {"model.safetensors", COFI_FILE, "config.json", "tokenizer.json"} <= set(os.listdir(output_dir))
    model = load_cofi(str(output_dir))
    assert target_params(encoder_blocks(model)) == report["target_params"]


def test_run_glue_cofi_distils_from_a_teacher(tiny_bert_dir, sentiment_files, tmp_path):
    output_dir = tmp_path / "distilled"
    run_glue.main(_argv(tiny_bert_dir, sentiment_files, output_dir, "--num_train_epochs", "1",
                        "--remaining_ratio", "0.5", "--teacher_model_name_or_path", tiny_bert_dir,
                        "--alpha_output", "0.1", "--alpha_layer", "0.9", "--logging_steps", "4"))
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["distillation"]["alpha_layer"] == 0.9 and on_disk["compression"]["remaining_ratio"] <= 0.5
    assert load_cofi(str(output_dir)) is not None


def test_hidden_dims_of_an_unknown_head_are_refused_and_the_other_units_work():
    from losparse.methods.cofi.pruner import CofiPruner

    masked_lm = tiny("bert", "ForMaskedLM")
    with pytest.raises(LoSparseUsageError, match="not of BertForMaskedLM; drop 'hidden'"):
        CofiPruner(masked_lm, config())
    assert set(CofiPruner(masked_lm, config(cofi_units="head,neuron")).masks) == {"head", "neuron"}
