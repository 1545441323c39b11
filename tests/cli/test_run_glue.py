import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import load_script

import losparse
from losparse.cli.run import run_main

run_glue = load_script("run_glue.py")


def _argv(model_dir, files, output_dir, *extra):
    train, validation = files
    return ["--model_name_or_path", model_dir, "--train_file", train, "--validation_file", validation,
            "--output_dir", str(output_dir), "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
            "--learning_rate", "2e-3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
            "--use_cpu", "true", "--max_seq_length", "64", *extra]


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

    monkeypatch.setattr(run_glue.glue, "load_data", refuse)
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


# --------------------------------------------------------------------------------------------
# Bad data never gets past the front door: one line, exit 2, before the weights load
# --------------------------------------------------------------------------------------------

SENTENCES = ["good movie", "bad plot", "great actor", "awful scene", "fun story", "dull film"]


def _csv(*rows: str) -> str:
    return "\n".join(rows) + "\n"


GOOD_CSV = _csv("sentence,label", *(f"{s},{i % 2}" for i, s in enumerate(SENTENCES)))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the run loads model weights (reading configs and tokenizers is allowed)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was refused")

    monkeypatch.setattr(run_glue.AutoModelForSequenceClassification, "from_pretrained", refuse)


def refused(main, argv, capsys) -> str:
    """Run an entry script like the command line does; return its one-line error (without 'error: ')."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err[len("error: "):]


# (case, train file name and text, validation file name and text, extra flags, exact message)
BAD_DATA = [
    ("unreadable", ("train.csv", b"\xff\xfe\x00junk"), ("validation.csv", GOOD_CSV), [],
     "--train_file '{train}' cannot be read: it is not UTF-8 text (byte 0 is b'\\xff')"),
    ("empty file", ("train.csv", ""), ("validation.csv", GOOD_CSV), [], "--train_file '{train}' is empty"),
    ("header only", ("train.csv", "sentence,label\n"), ("validation.csv", GOOD_CSV), [],
     "--train_file '{train}' has a header line (sentence, label) but no rows"),
    ("bad JSON line", ("train.jsonl", '{"sentence": "good movie", "label": 1}\n{"sentence": "bad plot", "label": 0}\n'
                       '{sentence: "x", "label": 1}\n'), ("validation.jsonl", '{"sentence": "good", "label": 1}\n'), [],
     "--train_file '{train}' line 3 is not JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("formats differ", ("train.csv", GOOD_CSV), ("validation.jsonl", '{"sentence": "good", "label": 1}\n'), [],
     "--train_file '{train}' is CSV but --validation_file '{validation}' is JSON; use one format for both"),
    ("columns differ", ("train.csv", GOOD_CSV), ("validation.csv", _csv("text,label", "good movie,1")), [],
     "--validation_file '{validation}' has no text column 'sentence' (columns: text, label)"),
    ("label column missing", ("train.csv", GOOD_CSV), ("validation.csv", _csv("sentence", "good movie")), [],
     "--validation_file '{validation}' has no label column 'label' (columns: sentence)"),
    ("mixed label types", ("train.csv", _csv("sentence,label", "good movie,0", "bad plot,1", "fun story,pos")),
     ("validation.csv", GOOD_CSV), [],
     "the label column 'label' mixes numbers and text: --train_file '{train}' line 2 has 0 but --train_file "
     "'{train}' line 4 has 'pos'; use class names or numbers, not both"),
    ("labels do not fit the head", ("train.csv", _csv("sentence,label", "good movie,pos", "bad plot,neg", "a film,neu")),
     ("validation.csv", _csv("sentence,label", "good,pos")), [],
     "the data has 3 labels (neg, neu, pos) but the classification head of --model_name_or_path '{model}' has 2 "
     "outputs (num_labels in its config); pass --ignore_mismatched_sizes to re-initialise the head with 3 outputs"),
    ("empty regression label", ("train.csv", _csv("sentence,label", "good movie,4.5", "bad plot,", "fun story,3.0")),
     ("validation.csv", GOOD_CSV), [], "--train_file '{train}' line 3 has an empty label (column 'label')"),
    ("empty text cell", ("train.jsonl", '{"sentence": "good movie", "label": 1}\n{"sentence": " ", "label": 0}\n'),
     ("validation.jsonl", '{"sentence": "good", "label": 1}\n'), [],
     "--train_file '{train}' line 2: the text column 'sentence' is empty"),
    ("no text column to be sure of", ("train.csv", _csv("id,a,b,label", "1,good movie,bad plot,1")),
     ("validation.csv", _csv("id,a,b,label", "2,fun story,dull film,0")), [],
     "cannot tell the text column(s) of --train_file '{train}': none is named like sentence1/sentence2, sentence, "
     "text, review, ... and the columns that hold text are a, b (columns: id, a, b, label); pass --text_columns "
     "COLUMN [COLUMN]"),
    ("--max_train_samples 0", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV), ["--max_train_samples", "0"],
     "--max_train_samples 0 must be >= 1"),
    ("--max_eval_samples 0", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV), ["--max_eval_samples", "0"],
     "--max_eval_samples 0 must be >= 1"),
    ("--max_eval_samples -3", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV), ["--max_eval_samples", "-3"],
     "--max_eval_samples -3 must be >= 1"),
    ("--text_columns missing", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV), ["--text_columns", "review"],
     "--text_columns 'review' is not a column of --train_file '{train}' (columns: sentence, label)"),
    ("--max_seq_length above the positions", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV),
     ["--max_seq_length", "1024"],
     "--max_seq_length 1024 is more than the 64 positions of --model_name_or_path '{model}' (max_position_embeddings "
     "64); pass --max_seq_length 64 or less"),
    ("warm-up not below the steps", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV),
     ["--max_steps", "4", "--pruning_warmup_steps", "4"],
     "the pruning warm-up of 4 optimizer steps (--pruning_warmup_steps 4) is not shorter than the run's 4 optimizer "
     "steps (--max_steps 4); lower it or train longer"),
    ("warm-up + final not below the steps", ("train.csv", _csv("sentence,label", *(f"{SENTENCES[i % 6]},{i % 2}"
                                                                                   for i in range(20)))),
     ("validation.csv", GOOD_CSV),
     ["--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
      "--pruning_warmup_steps", "2", "--pruning_final_ratio", "0.6"],
     "pruning warm-up (2 steps, --pruning_warmup_steps 2) + final phase (4 steps, --pruning_final_ratio 0.6 of the "
     "run) must be fewer than the run's 6 optimizer steps (2 epochs x 3 optimizer steps per epoch: 20 training "
     "examples in batches of 4, 2 batches per optimizer step); lower --pruning_warmup_steps/--pruning_final_steps "
     "(or their _ratio forms) or train longer"),
    ("--num_train_epochs 0", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV), ["--num_train_epochs", "0"],
     "--num_train_epochs 0 trains for no optimizer step; pass a positive --num_train_epochs or --max_steps"),
    ("low-rank share leaves nothing for S", ("train.csv", GOOD_CSV), ("validation.csv", GOOD_CSV),
     ["--remaining_ratio", "0.06", "--low_rank_ratio", "0.05"],
     "--low_rank_ratio 0.05 leaves nothing for the sparse part: with ranks rounded up the low-rank share of the 12 "
     "target matrices of --model_name_or_path '{model}' is 0.0781 >= --remaining_ratio 0.06; lower --low_rank_ratio"),
]


def _write(path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("case, train, validation, extra, message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_one_line_before_the_weights_load(tiny_bert_dir, tmp_path, capsys, no_weights, case, train,
                                                      validation, extra, message):
    files = (_write(tmp_path / train[0], train[1]), _write(tmp_path / validation[0], validation[1]))
    argv = _argv(tiny_bert_dir, files, tmp_path / "out", *extra)
    expected = message.format(train=files[0], validation=files[1], model=tiny_bert_dir)
    assert refused(run_glue.main, argv, capsys) == expected


def test_string_labels_known_text_column_and_f1(tiny_bert_dir, tmp_path, caplog):
    """id/group/text/label JSONL: trains on `text` (not id, group), maps spam/ham to ids, keeps their names."""
    rows = [{"id": i, "group": "ab"[i % 2], "text": SENTENCES[i % 6], "label": ("ham", "spam")[i % 2 == 0]}
            for i in range(24)]
    train = _write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:16]))
    validation = _write(tmp_path / "validation.jsonl", "".join(json.dumps(r) + "\n" for r in rows[16:]))
    output_dir = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="losparse")
    results = run_glue.main(_argv(tiny_bert_dir, (train, validation), output_dir, "--max_steps", "3",
                                  "--remaining_ratio", "0.3", "--low_rank_ratio", "0.1"))
    assert {"eval_accuracy", "eval_f1"} <= set(results)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    assert "Data: text column(s) text; labels: ham -> 0, spam -> 1; 16 training and 8 validation examples" \
        in caplog.text


def test_ignore_mismatched_sizes_reinitialises_the_head(tiny_bert_dir, tmp_path):
    rows = _csv("sentence,label", *(f"{s},{('neg', 'neu', 'pos')[i % 3]}" for i, s in enumerate(SENTENCES)))
    files = (_write(tmp_path / "train.csv", rows), _write(tmp_path / "validation.csv", rows))
    results = run_glue.main(_argv(tiny_bert_dir, files, tmp_path / "out", "--method", "finetune", "--max_steps", "1",
                                  "--ignore_mismatched_sizes", "true"))
    assert "eval_accuracy" in results and "eval_f1" not in results  # F1 is for binary tasks
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
