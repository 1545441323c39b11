import json
import os

import numpy as np
import pytest
import torch

import losparse
import run_glue
from losparse.cli import run_main


def _argv(model_dir, files, output_dir, *extra):
    train, validation = files
    return ["--model_name_or_path", model_dir, "--train_file", train, "--validation_file", validation,
            "--output_dir", str(output_dir), "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
            "--learning_rate", "2e-3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
            "--use_cpu", "true", *extra]


def _accuracy_of(model, tokenizer, csv_path):
    import csv

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).numpy()
    return float(np.mean(predictions == np.array([int(r["label"]) for r in rows])))


def test_end_to_end_trains_compacts_saves_and_reloads(tiny_bert_dir, sentiment_files, tmp_path):
    from transformers import AutoTokenizer

    output_dir = tmp_path / "out"
    results = run_glue.main(_argv(tiny_bert_dir, sentiment_files, output_dir, "--remaining_ratio", "0.3",
                                  "--low_rank_ratio", "0.1"))
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["eval_accuracy"] == results["eval_accuracy"]
    report = on_disk["compression"]
    assert report["remaining_ratio"] == pytest.approx(0.3, abs=0.01)
    assert report["model_params"] < report["model_params_dense"]
    assert {"losparse_model.safetensors", "losparse_config.json", "config.json", "tokenizer.json"} <= set(
        os.listdir(output_dir))
    model = losparse.load(str(output_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    assert _accuracy_of(model, tokenizer, sentiment_files[1]) == on_disk["eval_accuracy"]
    assert on_disk["train_loss"] < 0.69, "the toy task is learnable: training should lower the loss"


def test_config_table_and_finetune_method(tiny_bert_dir, sentiment_files, tmp_path):
    table = tmp_path / "table.yaml"
    table.write_text("learning_rate: 2e-3\nnum_train_epochs: 1\nmax_grad_norm: 0.0\n")
    output_dir = tmp_path / "dense"
    argv = _argv(tiny_bert_dir, sentiment_files, output_dir, "--config", str(table), "--method", "finetune")
    index = argv.index("--num_train_epochs")
    del argv[index:index + 2]
    results = run_glue.main(argv)
    assert results["compression"]["remaining_ratio"] == 1.0
    assert results["epoch"] == 1.0  # from the table, as no flag overrides it
    assert (output_dir / "model.safetensors").is_file()


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the run gets as far as loading data or a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input should have been rejected before loading")

    monkeypatch.setattr(run_glue.glue, "load_raw_datasets", refuse)
    monkeypatch.setattr(run_glue.AutoModelForSequenceClassification, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--remaining_ratio", "1.5"], "--remaining_ratio 1.5 is out of range; it must be in (0, 1]"),
        (["--remaining_ratio", "0"], "--remaining_ratio 0.0 is out of range"),
        (["--remaining_ratio", "0.1", "--low_rank_ratio", "0.2"], "--low_rank_ratio 0.2 must be below"),
        (["--config", "no/such.yaml"], "--config 'no/such.yaml' does not exist"),
        (["--method", "magic"], "--method 'magic' is not known; choose one of: losparse, finetune"),
        (["--target_modules", r"nothing\.matches"], "no module matches the targets"),
        (["--svd_device", "cuda:7"], "--svd_device 'cuda:7'"),
        (["--task_name", "mnlii", "--no-files"], "--task_name 'mnlii' is not a GLUE task"),
    ],
)
def test_bad_input_exits_with_one_line_before_loading(tiny_bert_dir, sentiment_files, tmp_path, capsys, no_loading,
                                                      extra, fragment):
    argv = _argv(tiny_bert_dir, sentiment_files, tmp_path / "out", *[e for e in extra if e != "--no-files"])
    if "--no-files" in extra:
        index = argv.index("--train_file")
        del argv[index:index + 4]
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_glue.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert fragment in err


def test_unknown_key_in_config(tiny_bert_dir, sentiment_files, tmp_path, capsys, no_loading):
    table = tmp_path / "bad.yaml"
    table.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(SystemExit):
        run_main(run_glue.main, _argv(tiny_bert_dir, sentiment_files, tmp_path / "out", "--config", str(table)))
    assert "unknown key 'learning_rat'" in capsys.readouterr().err


def test_existing_output_dir_is_not_overwritten(tiny_bert_dir, sentiment_files, tmp_path, capsys, no_loading):
    output_dir = tmp_path / "precious"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_glue.main, _argv(tiny_bert_dir, sentiment_files, output_dir))
    assert exit_info.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (output_dir / "notes.txt").read_text() == "keep me"


def test_distillation_during_pruning_and_as_a_second_stage(tiny_bert_dir, sentiment_files, tmp_path):
    first = tmp_path / "during"
    results = run_glue.main(_argv(tiny_bert_dir, sentiment_files, first, "--remaining_ratio", "0.3",
                                  "--low_rank_ratio", "0.1", "--teacher_model_name_or_path", tiny_bert_dir,
                                  "--alpha_output", "1.0", "--alpha_layer", "1.0"))
    assert results["distillation"]["alpha_layer"] == 1.0
    assert results["compression"]["remaining_ratio"] == pytest.approx(0.3, abs=0.01)

    second = tmp_path / "after"
    after = run_glue.main(_argv(str(first), sentiment_files, second, "--method", "finetune",
                                "--distill_stage", "after", "--teacher_model_name_or_path", tiny_bert_dir,
                                "--alpha_layer", "2.0", "--num_train_epochs", "1"))
    # The second stage trains the compressed model as it is: same structure, same ratio, method kept.
    assert after["method"] == "losparse"
    assert after["compression"]["target_params"] == results["compression"]["target_params"]
    before_weights = losparse.load(str(first)).state_dict()
    after_weights = losparse.load(str(second)).state_dict()
    assert any(not torch.equal(before_weights[k], after_weights[k]) for k in before_weights if "fused_weight" in k)


def test_second_stage_needs_a_compressed_checkpoint(tiny_bert_dir, sentiment_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main(run_glue.main, _argv(tiny_bert_dir, sentiment_files, tmp_path / "x", "--method", "finetune",
                                      "--distill_stage", "after", "--teacher_model_name_or_path", tiny_bert_dir,
                                      "--alpha_layer", "1.0"))
    assert "is not a LoSparse checkpoint" in capsys.readouterr().err
