"""The recovery rows of the one-shot table tool (benchmarks/clm_oneshot_table.py --finetune_steps).

A tiny random Llama on a toy grammar: three fine-tuning steps at a high learning rate are enough to move the
held-out perplexity a lot, so "after" differs measurably from "before". The in-memory fine-tuned model is
captured where run_clm.py hands it to `finish_run`, to compare it with what the table reports for the model
reloaded from disk.
"""

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT as REPO_ROOT
from test_oneshot import _sentences

import losparse
from benchmarks import clm_oneshot_table
from losparse.core.decompose import losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = "the a big small cat dog bird fish sat ran on in mat log tree pond .".split()
STEPS, BATCH, SEQ_LEN = 3, 2, 32


def _tiny_llama_dir(directory: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # a confident random model: a high perplexity to recover from
    model.save_pretrained(directory)
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _tiny_llama_dir(str(tmp_path_factory.mktemp("table-llama")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("table-text") / "corpus.txt"
    path.write_text("\n".join(_sentences(300, 3)) + "\n")
    return str(path)


def _heldout(llama_dir, corpus):
    """The table's held-out blocks, rebuilt here independently: 5 x 32 tokens of the held-out documents."""
    from transformers import AutoTokenizer

    from losparse.cli.oneshot import read_calibration_ids

    documents = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    _, heldout_docs = clm_oneshot_table.split_documents(documents, 6 / 11, 0)
    return read_calibration_ids(AutoTokenizer.from_pretrained(llama_dir), heldout_docs, 5, SEQ_LEN, 0)


def _argv(llama_dir, corpus, output_dir, *extra):
    return ["--model_name_or_path", llama_dir, "--text_file", corpus, "--ratios", "0.8", "0.5",
            "--num_calibration_samples", "6", "--num_heldout_samples", "5", "--seq_len", str(SEQ_LEN),
            "--batch_size", "4", "--finetune_steps", str(STEPS), "--finetune_batch_size", str(BATCH),
            "--learning_rate", "3e-3", "--output_dir", str(output_dir), *extra]


def _run_capturing(argv, heldout):
    """Run the tool; returns (result, captured): captured[run_clm output_dir] = (held-out loss of the in-memory
    trained model, its trainer, the classes of its LoSparse layers), captured["oneshot start"] = (held-out loss
    of the compact one-shot start the LoSparse fine-tune was given, None, None)."""
    run_clm = clm_oneshot_table.load_run_clm()
    finish_run = run_clm.finish_run
    trained = {}

    def capture(trainer, *args, **kwargs):
        model = trainer.model
        was_training = model.training
        kinds = {type(layer) for _, layer in losparse_layers(model)}  # before finish_run compacts the model
        trained[trainer.args.output_dir] = (clm_oneshot_table.heldout_loss(model, heldout, 4), trainer, kinds)
        model.train(was_training)
        return finish_run(trainer, *args, **kwargs)

    write_finetune_inputs = clm_oneshot_table.write_finetune_inputs

    def capture_start(*args, **kwargs):  # the work directory is gone after the run: look at the start now
        inputs = write_finetune_inputs(*args, **kwargs)
        if "oneshot" in inputs:
            trained["oneshot start"] = (clm_oneshot_table.heldout_loss(losparse.load(inputs["oneshot"]), heldout, 4),
                                        None, None)
        return inputs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_clm, "finish_run", capture)
        patch.setattr(clm_oneshot_table, "write_finetune_inputs", capture_start)
        return clm_oneshot_table.main(argv), trained


@pytest.fixture(scope="module")
def oneshot_run(llama_dir, corpus, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("table-oneshot")
    result, trained = _run_capturing(_argv(llama_dir, corpus, output_dir), _heldout(llama_dir, corpus))
    return output_dir, result, trained


def _rows(result):
    return {row["arm"]: row for row in result["finetune"]["rows"]}


def test_recovery_rows_are_in_the_markdown_and_the_json(oneshot_run):
    output_dir, result, trained = oneshot_run
    table = (output_dir / clm_oneshot_table.TABLE_FILE).read_text()
    on_disk = json.loads((output_dir / clm_oneshot_table.JSON_FILE).read_text())
    assert on_disk["finetune"] == result["finetune"]
    finetune = result["finetune"]
    assert (finetune["steps"], finetune["ratio"], finetune["start"]) == (STEPS, 0.5, "oneshot")
    assert finetune["tokens"] == STEPS * BATCH * SEQ_LEN == 192
    assert finetune["train_documents"] == result["calibration_documents"] and finetune["train_blocks"] > 0
    rows = _rows(result)
    assert [row["row"] for row in finetune["rows"]] == [f"one-shot LoSparse + {STEPS} fine-tuning steps",
                                                        f"dense + {STEPS} fine-tuning steps"]
    for row in rows.values():
        assert row["steps"] == STEPS and row["tokens"] == 192 and row["train_seconds"] > 0 and row["seconds"] > 0
        assert math.isfinite(row["train_loss"]) and row["epochs"] == pytest.approx(STEPS * BATCH
                                                                                   / finetune["train_blocks"])
        assert (f"| {row['row']} | {row['ratio']:g} | {row['start_perplexity']:.3f} | {row['perplexity']:.3f} | "
                f"{row['achieved_ratio']:.2f} | {row['train_loss']:.4f} |") in table
    # "before" is the start: the table's own one-shot cell at 0.5 and the dense row
    oneshot_cell = next(c for c in result["cells"] if c["row"] == "losparse" and c["ratio"] == 0.5)
    assert rows["losparse"]["start_perplexity"] == oneshot_cell["perplexity"]
    assert math.exp(trained["oneshot start"][0]) == pytest.approx(oneshot_cell["perplexity"], rel=1e-6)  # that model
    assert rows["dense"]["start_perplexity"] == result["dense"]["perplexity"]
    # three steps at lr 3e-3 on a toy grammar: both recover a lot (this can fail if no training happened)
    for row in rows.values():
        assert row["perplexity"] < 0.5 * row["start_perplexity"]
    # the work directory (dense export, one-shot start, text files) is gone; the fine-tuned models stay
    assert sorted(os.listdir(output_dir)) == sorted([clm_oneshot_table.TABLE_FILE, clm_oneshot_table.JSON_FILE,
                                                     "finetune-dense", "finetune-losparse-0.5"])


def test_the_reported_perplexity_is_the_reloaded_compact_models_and_equals_the_trained_one(oneshot_run, llama_dir,
                                                                                         corpus):
    _, result, trained = oneshot_run
    heldout = _heldout(llama_dir, corpus)
    for row in _rows(result).values():
        in_memory_loss, _, _ = trained[row["output_dir"]]
        assert row["eval_loss"] == pytest.approx(in_memory_loss, rel=1e-5)
    compact_dir = _rows(result)["losparse"]["output_dir"]
    reloaded = losparse.load(compact_dir)
    layers = losparse_layers(reloaded)
    assert layers and all(isinstance(layer, CompactLoSparseLinear) for _, layer in layers)
    with torch.no_grad():
        loss = reloaded(input_ids=heldout, labels=heldout).loss.item()
    assert _rows(result)["losparse"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_the_oneshot_start_keeps_its_budget_while_fine_tuning(oneshot_run):
    _, result, trained = oneshot_run
    row = _rows(result)["losparse"]
    oneshot_cell = next(c for c in result["cells"] if c["row"] == "losparse" and c["ratio"] == 0.5)
    assert row["achieved_ratio"] == pytest.approx(oneshot_cell["achieved_ratio"], abs=1e-12)
    assert row["achieved_ratio"] == pytest.approx(0.5, abs=0.02)
    assert row["low_rank_share"] == pytest.approx(oneshot_cell["low_rank_share"], abs=1e-12)
    _, trainer, kinds = trained[row["output_dir"]]
    assert not isinstance(trainer, losparse.LoSparseTrainerMixin)  # compact: no pruner, removed neurons stay out
    assert kinds == {CompactLoSparseLinear}
    assert losparse.parameter_report(losparse.load(row["output_dir"]))["remaining_ratio"] == row["achieved_ratio"]


def test_the_calibrated_start_is_run_clm_oneshot_do_train_and_ends_at_the_ratio(llama_dir, corpus, tmp_path):
    heldout = _heldout(llama_dir, corpus)
    result, trained = _run_capturing(_argv(llama_dir, corpus, tmp_path / "table", "--finetune_start", "calibrated",
                                           "--rows", "losparse"), heldout)
    row = _rows(result)["losparse"]
    assert row["row"] == f"calibrated LoSparse + {STEPS} fine-tuning steps" and row["start"] == "calibrated"
    in_memory_loss, trainer, kinds = trained[row["output_dir"]]
    assert isinstance(trainer, losparse.LoSparseTrainerMixin) and kinds == {LoSparseLinear}  # pruned on schedule
    assert row["eval_loss"] == pytest.approx(in_memory_loss, rel=1e-5)  # training form before, compact reloaded
    assert row["achieved_ratio"] == pytest.approx(0.5, abs=0.03)
    assert row["start_perplexity"] == result["dense"]["perplexity"]  # unpruned: U·V + S == W
    assert "run_clm.py --oneshot --do_train" in (tmp_path / "table" / clm_oneshot_table.TABLE_FILE).read_text()


@pytest.fixture
def no_model_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("no model weights should be loaded here")

    monkeypatch.setattr(clm_oneshot_table, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--finetune_ratio", "0.6"], "--finetune_ratio 0.6 is not one of --ratios 0.8 0.5: the fine-tune starts from "
                                  "that column's one-shot LoSparse model"),
    (["--rows", "plain_svd", "lowrank"], "--finetune_steps needs the losparse row (the fine-tune's start), but "
                                         "--rows is plain_svd lowrank"),
    (["--finetune_steps", "-1"], "--finetune_steps -1 must be >= 0 (0: no fine-tuning rows)"),
    (["--finetune_batch_size", "0"], "--finetune_batch_size 0 must be >= 1"),
    (["--learning_rate", "0"], "--learning_rate 0 must be a positive number"),
])
def test_bad_fine_tuning_flags_are_one_line_before_any_weights(llama_dir, corpus, tmp_path, capsys, no_model_loading,
                                                              extra, message):
    with pytest.raises(LoSparseUsageError, match="^" + re.escape(message) + "$"):
        clm_oneshot_table.main(_argv(llama_dir, corpus, tmp_path / "bad", *extra))
    with pytest.raises(SystemExit) as exit_info:
        clm_oneshot_table.cli(_argv(llama_dir, corpus, tmp_path / "bad", *extra))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: " + message
    assert not (tmp_path / "bad").exists()


def test_without_fine_tuning_the_ratio_flag_is_not_checked_and_defaults_are_documented():
    parser = clm_oneshot_table.build_parser()
    args = parser.parse_args(["--output_dir", "x", "--ratios", "0.8", "--text_file", __file__])
    assert (args.finetune_steps, args.finetune_ratio, args.finetune_start) == (0, 0.5, "oneshot")
    assert (args.finetune_batch_size, args.learning_rate) == (4, 1e-4)
    args.model_name_or_path = "unused"
    clm_oneshot_table.check_arguments(args)  # 0.5 is not a column, but nothing is fine-tuned
    snapped = parser.parse_args(["--output_dir", "x", "--finetune_steps", "1", "--finetune_ratio", "0.50000000001",
                                 "--text_file", __file__, "--model_name_or_path", "unused"])
    clm_oneshot_table.check_arguments(snapped)
    assert snapped.finetune_ratio == 0.5


def test_the_run_clm_commands_start_where_the_rows_say(tmp_path):
    args = clm_oneshot_table.build_parser().parse_args(["--output_dir", "x", "--finetune_steps", "7"])
    losparse_argv = clm_oneshot_table.finetune_command(args, "start", "out", "train.jsonl", "val.jsonl", "losparse")
    dense_argv = clm_oneshot_table.finetune_command(args, "dense", "out", "train.jsonl", "val.jsonl", "dense")
    args.finetune_start = "calibrated"
    calibrated_argv = clm_oneshot_table.finetune_command(args, "dense", "out", "train.jsonl", "val.jsonl", "losparse")

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    for argv in (losparse_argv, dense_argv, calibrated_argv):
        assert flag(argv, "--max_steps") == "7" and flag(argv, "--per_device_train_batch_size") == "4"
        assert flag(argv, "--block_size") == "256" and flag(argv, "--learning_rate") == "0.0001"
        assert flag(argv, "--seed") == "0" and flag(argv, "--train_file") == "train.jsonl"
    assert flag(dense_argv, "--method") == "finetune" and "--oneshot" not in losparse_argv
    assert flag(losparse_argv, "--remaining_ratio") == "0.5" and flag(losparse_argv, "--low_rank_ratio") == "0.3"
    assert flag(calibrated_argv, "--calibration_file") == "train.jsonl"
    assert flag(calibrated_argv, "--num_calibration_samples") == "32" and "--oneshot" in calibrated_argv
    # run_clm.py accepts them as they are
    run_clm = clm_oneshot_table.load_run_clm()
    from losparse.cli.run import parse_arguments

    train, validation = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    clm_oneshot_table.write_documents(str(train), ["a b, c", "line\nbreak"])
    clm_oneshot_table.write_documents(str(validation), ["x"])
    from losparse.cli.tasks.clm import read_documents

    assert read_documents(str(train), "train_file", None) == ["a b, c", "line\nbreak"]
    calibrated_argv = [str(train) if a == "train.jsonl" else str(validation) if a == "val.jsonl" else a
                       for a in calibrated_argv]
    parsed = parse_arguments((run_clm.ModelArguments, run_clm.clm.CLMDataArguments, run_clm.clm.GenerationArguments,
                              run_clm.LoSparseConfig, run_clm.OneShotArguments, run_clm.DistillationArguments,
                              run_clm.RunArguments, run_clm.TrainingArguments), calibrated_argv)
    assert parsed[4].oneshot and parsed[4].calibration_seq_len == 256 and parsed[7].max_steps == 7


def test_table_script_passes_finetune_steps_from_the_environment():
    root = REPO_ROOT
    out = subprocess.run(["bash", os.path.join(root, "scripts", "clm_oneshot_table.sh"), "--finetune_ratio", "0.6"],
                         env={**os.environ, "DRY_RUN": "1", "OUTPUT_DIR": "out/x", "FINETUNE_STEPS": "30"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[1:] == ["-m", "benchmarks.clm_oneshot_table", "--output_dir", "out/x", "--finetune_steps",
                               "30", "--finetune_ratio", "0.6"]


def test_the_table_names_the_best_row_of_every_ratio(oneshot_run):
    output_dir, result, _ = oneshot_run
    for ratio in result["ratios"]:
        cells = [c for c in result["cells"] if c["ratio"] == ratio]
        assert result["best"][f"{ratio:g}"] == min(cells, key=lambda c: c["perplexity"])["row"]
    table = (output_dir / clm_oneshot_table.TABLE_FILE).read_text()
    assert "Best row per ratio (lowest perplexity): " + "; ".join(
        f"ratio {r:g}: **{result['best'][f'{r:g}']}**" for r in result["ratios"]) in table
    assert json.loads((output_dir / clm_oneshot_table.JSON_FILE).read_text())["best"] == result["best"]
