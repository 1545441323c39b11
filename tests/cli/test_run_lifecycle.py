"""A run's output directory, resume and end of run, as a user meets them on the command line."""

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import ROOT as REPO_ROOT
from conftest import load_script
from test_run_glue import _argv, no_loading, refused  # noqa: F401  (fixture)

import losparse
from losparse.cli.run import remove_stale_artifacts

run_glue = load_script("run_glue.py")

ROOT = REPO_ROOT
SHORT = ("--num_train_epochs", "1")


def _short(argv):
    index = argv.index("--num_train_epochs")
    return argv[:index] + list(SHORT) + argv[index + 2:]


def test_a_missing_output_dir_is_refused(tiny_bert_dir, sentiment_files, tmp_path, capsys, no_loading):
    argv = _argv(tiny_bert_dir, sentiment_files, tmp_path / "out")
    index = argv.index("--output_dir")
    del argv[index:index + 2]
    assert refused(run_glue.main, argv, capsys).startswith("--output_dir is required")


def test_an_output_dir_that_is_a_file_is_refused(tiny_bert_dir, sentiment_files, tmp_path, capsys, no_loading):
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    message = refused(run_glue.main, _argv(tiny_bert_dir, sentiment_files, existing, "--overwrite_output_dir", "true"),
                      capsys)
    assert message == f"--output_dir {str(existing)!r} is an existing file, not a directory"
    assert existing.read_text() == "mine"


def test_resuming_from_a_model_directory_is_refused(tiny_bert_dir, sentiment_files, tmp_path, capsys, no_loading):
    message = refused(run_glue.main, _argv(tiny_bert_dir, sentiment_files, tmp_path / "out",
                                           "--resume_from_checkpoint", tiny_bert_dir), capsys)
    assert "lacks trainer_state.json" in message and "looks like a model directory" in message


def test_help_lists_every_method_without_formatting_errors():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "run_glue.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "plain full fine-tuning (the 100% rows)" in text
    assert "--allow_resume_config_change" in done.stdout and "Traceback" not in done.stderr


def test_overwriting_removes_the_previous_runs_artifacts_and_keeps_other_files(tmp_path):
    for name in ("losparse_config.json", "losparse_model.safetensors", "all_results.json", "notes.txt"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints-of-mine").mkdir()
    removed = remove_stale_artifacts(str(tmp_path))
    assert sorted(removed) == ["all_results.json", "checkpoint-5", "losparse_config.json",
                               "losparse_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoints-of-mine", "notes.txt"]


def test_a_dense_run_over_an_old_compressed_output_saves_a_dense_model(tiny_bert_dir, sentiment_files, tmp_path,
                                                                       capsys):
    output_dir = tmp_path / "out"
    run_glue.main(_short(_argv(tiny_bert_dir, sentiment_files, output_dir, "--remaining_ratio", "0.3",
                               "--low_rank_ratio", "0.1")))
    assert (output_dir / "losparse_config.json").is_file()
    run_glue.main(_short(_argv(tiny_bert_dir, sentiment_files, output_dir, "--method", "finetune",
                               "--overwrite_output_dir", "true")))
    assert not (output_dir / "losparse_config.json").exists()
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["method"] == "finetune"
    # The final metrics are printed, not only written to all_results.json.
    out = capsys.readouterr().out
    assert "***** eval metrics *****" in out and "eval_accuracy" in out


def test_a_run_resumed_with_true_continues_from_the_newest_complete_checkpoint(tiny_bert_dir, sentiment_files,
                                                                              tmp_path, caplog):
    output_dir = tmp_path / "out"
    saving = ("--save_strategy", "steps", "--save_steps", "12")
    argv = _argv(tiny_bert_dir, sentiment_files, output_dir, "--remaining_ratio", "0.3", "--low_rank_ratio", "0.1")
    index = argv.index("--save_strategy")
    argv = argv[:index] + argv[index + 2:] + list(saving)
    straight = run_glue.main(argv)
    # 96 examples / batch 8 = 12 steps per epoch, 3 epochs: checkpoints 12, 24 and 36. Break the newest two.
    os.remove(output_dir / "checkpoint-36" / "trainer_state.json")
    os.remove(output_dir / "checkpoint-24" / losparse.core.pruner.PRUNER_META_FILE)
    os.remove(output_dir / "all_results.json")
    with caplog.at_level(logging.WARNING, logger="losparse.core.checkpoint"):
        resumed = run_glue.main(argv + ["--resume_from_checkpoint", "true"])
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-36" in caplog.text
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)


def test_a_resume_with_another_ratio_is_refused(tiny_bert_dir, sentiment_files, tmp_path, capsys):
    output_dir = tmp_path / "out"
    argv = _argv(tiny_bert_dir, sentiment_files, output_dir, "--remaining_ratio", "0.3", "--low_rank_ratio", "0.1")
    index = argv.index("--save_strategy")
    argv = _short(argv[:index] + argv[index + 2:] + ["--save_strategy", "steps", "--save_steps", "6"])
    run_glue.main(argv)
    capsys.readouterr()
    changed = [a if a != "0.3" else "0.2" for a in argv] + ["--resume_from_checkpoint", "true"]
    message = refused(run_glue.main, changed, capsys)
    assert "--remaining_ratio: checkpoint 0.3, this run 0.2" in message


def test_pruning_methods_without_svd_do_not_claim_an_svd(caplog):
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    with caplog.at_level(logging.INFO, logger="losparse.core.decompose"):
        losparse.apply(BertForSequenceClassification(tiny_bert_config()),
                       losparse.LoSparseConfig(method="itp", remaining_ratio=0.3))
    assert "no low-rank part, no SVD" in caplog.text and "SVD:" not in caplog.text
