"""SQuAD pipeline: windowed features, n-best post-processing, data layouts, run_squad end to end (offline)."""

from __future__ import annotations

import json
import os
import random

import datasets
import numpy as np
import pytest
import torch
from conftest import ROOT as REPO_ROOT
from conftest import WORDS, load_script, tiny_bert_config, write_vocab

import losparse
from losparse import LoSparseUsageError
from losparse.cli.run import run_main
from losparse.cli.tasks import squad

run_squad = load_script("run_squad.py")

MAX_LEN, STRIDE = 16, 4  # question "movie" + 3 special tokens -> 12 context tokens per window, 4 shared


def make_tokenizer(directory: str, padding_side: str = "right"):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=write_vocab(os.path.join(directory, "vocab.txt")), do_lower_case=True)
    tokenizer.padding_side = padding_side
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("qa-tok")))


@pytest.fixture(scope="module")
def tiny_qa_dir(tmp_path_factory) -> str:
    """A local BertForQuestionAnswering checkpoint with a working WordPiece tokenizer."""
    from transformers import BertForQuestionAnswering

    directory = str(tmp_path_factory.mktemp("tiny-bert-qa"))
    torch.manual_seed(0)
    BertForQuestionAnswering(tiny_bert_config()).save_pretrained(directory)
    make_tokenizer(directory).save_pretrained(directory)
    return directory


def long_example(answer_words: slice = slice(10, 14)) -> dict[str, list]:
    """One question over 20 one-token words; with MAX_LEN/STRIDE the windows hold words 0-11 and 8-19."""
    words = WORDS[:20]
    context = " ".join(words)
    answer = " ".join(words[answer_words])
    return {"id": ["q1"], "question": ["movie"], "context": [context],
            "answers": [{"text": [answer], "answer_start": [context.index(answer)]}]}


def token_at(offsets: list, char: int, end: bool = False) -> int:
    """Index of the context token starting (or, with end=True, ending) at character `char`."""
    return next(t for t, o in enumerate(offsets) if o is not None and o[1 if end else 0] == char)


# --------------------------------------------------------------------------------------------
# (a) features and post-processing
# --------------------------------------------------------------------------------------------

def test_train_labels_point_at_the_answer_only_in_the_window_holding_all_of_it(tokenizer) -> None:
    example = long_example()  # answer = words 10-13: cut by window 1 (words 0-11), whole in window 2
    features = squad.prepare_train_features(example, tokenizer, MAX_LEN, STRIDE)
    assert len(features["input_ids"]) == 2 and all(len(ids) == MAX_LEN for ids in features["input_ids"])
    assert (features["start_positions"][0], features["end_positions"][0]) == (0, 0)  # CLS
    start, end = features["start_positions"][1], features["end_positions"][1]
    span = tokenizer.decode(features["input_ids"][1][start:end + 1])
    assert span == example["answers"][0]["text"][0] == "poor sad hate worst"


def test_answer_across_two_windows_is_read_from_the_window_holding_all_of_it(tokenizer) -> None:
    example = long_example()
    features = squad.prepare_validation_features(example, tokenizer, MAX_LEN, STRIDE)
    assert features["example_id"] == ["q1", "q1"]
    offsets = features["offset_mapping"]
    assert offsets[0][:3] == [None, None, None] and offsets[0][-1] is None  # CLS movie SEP ... SEP
    start_char = example["answers"][0]["answer_start"][0]
    start, end = np.zeros((2, MAX_LEN)), np.zeros((2, MAX_LEN))
    # window 1 can only offer the cut span "poor sad" (its last two tokens); window 2 holds all four words
    start[0, token_at(offsets[0], start_char)] = 5.0
    end[0, MAX_LEN - 2] = 3.0
    start[1, token_at(offsets[1], start_char)] = 6.0
    end[1, token_at(offsets[1], start_char + len("poor sad hate worst"), end=True)] = 6.0
    predictions = squad.postprocess_predictions([{"id": "q1", "context": example["context"][0]}],
                                                [{"example_id": e, "offset_mapping": o}
                                                 for e, o in zip(features["example_id"], offsets)],
                                                start, end, n_best_size=20, max_answer_length=30)
    assert predictions == {"q1": "poor sad hate worst"}
    start[0, token_at(offsets[0], start_char)] = 50.0  # now the cut span of window 1 scores best
    as_dataset = datasets.Dataset.from_dict(features)  # post-processing reads Datasets and lists of dicts alike
    predictions = squad.postprocess_predictions([{"id": "q1", "context": example["context"][0]}], as_dataset,
                                                start, end, n_best_size=20, max_answer_length=30)
    assert predictions == {"q1": "poor sad"}


def test_postprocess_rejects_out_of_context_reversed_and_too_long_spans() -> None:
    context = "aa bb cc dd ee"
    # tokens: CLS, question, SEP, aa, bb, cc, dd, ee, SEP
    offsets = [None, None, None, (0, 2), (3, 5), (6, 8), (9, 11), (12, 14), None]
    features = [{"example_id": "q", "offset_mapping": offsets}]
    examples = [{"id": "q", "context": context}]

    def best(start: list, end: list, **kwargs) -> str:
        return squad.postprocess_predictions(examples, features, np.array([start]), np.array([end]), **kwargs)["q"]

    start = [9.0, 8.0, 0, 0, 0, 0, 7.0, 0, 0]
    end = [9.0, 0, 0, 9.5, 0, 0, 0, 8.0, 9.0]
    # CLS..CLS = 18 and CLS..SEP = 18 lie outside the context, dd..aa = 16.5 ends before it starts:
    # the best legal span is dd..ee = 7 + 8 = 15
    assert best(start, end) == "dd ee"
    # the two best starts are CLS and the question token: nothing legal is left
    assert best(start, end, n_best_size=2) == ""

    start = [0, 0, 0, 5.0, 0, 0, 1.0, 0, 0]
    end = [0, 0, 0, 0, 0, 0, 0, 5.0, 0]
    # aa..ee = 10 holds 5 tokens; without it the best is dd..ee = 1 + 5 = 6
    assert best(start, end, max_answer_length=5) == "aa bb cc dd ee"
    assert best(start, end, max_answer_length=4) == "dd ee"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_labels_and_postprocessing_round_trip(tmp_path, padding_side: str) -> None:
    tokenizer = make_tokenizer(str(tmp_path), padding_side)
    example = long_example(slice(2, 5))
    train = squad.prepare_train_features(example, tokenizer, MAX_LEN, STRIDE)
    features = squad.prepare_validation_features(example, tokenizer, MAX_LEN, STRIDE)
    start, end = np.zeros((2, MAX_LEN)), np.zeros((2, MAX_LEN))
    for i, (s, e) in enumerate(zip(train["start_positions"], train["end_positions"])):
        start[i, s] = end[i, e] = 1.0
    rows = [{"example_id": e, "offset_mapping": o} for e, o in zip(features["example_id"], features["offset_mapping"])]
    predictions = squad.postprocess_predictions([{"id": "q1", "context": example["context"][0]}], rows, start, end)
    assert predictions == {"q1": "fine nice happy"}


def test_doc_stride_too_large_for_a_long_question_is_a_usage_error(tokenizer) -> None:
    example = long_example()
    example["question"] = ["the good movie was very fine"]  # 6 tokens + 3 special -> 7 context tokens
    with pytest.raises(LoSparseUsageError, match="--doc_stride 8 must be smaller"):
        squad.prepare_train_features(example, tokenizer, MAX_LEN, 8)


# --------------------------------------------------------------------------------------------
# (b) loading
# --------------------------------------------------------------------------------------------

def squad_rows(n_contexts: int = 4, per_context: int = 6, seed: int = 0) -> list[dict]:
    """Flattened questions over random contexts of 30-40 words; answers are 1-3 word spans."""
    rng = random.Random(seed)
    rows = []
    for c in range(n_contexts):
        words = [rng.choice(WORDS) for _ in range(rng.randint(30, 40))]
        context = " ".join(words)
        for q in range(per_context):
            first = rng.randrange(len(words) - 3)
            answer_words = words[first:first + rng.randint(1, 3)]
            start = len(" ".join(words[:first])) + (1 if first else 0)
            answer = " ".join(answer_words)
            assert context[start:start + len(answer)] == answer
            rows.append({"id": f"c{c}q{q}", "title": f"title {c}", "context": context,
                         "question": " ".join(rng.sample(WORDS, 3)),
                         "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def write_official(path: str, rows: list[dict]) -> str:
    articles: dict[str, dict] = {}
    for row in rows:
        article = articles.setdefault(row["title"], {"title": row["title"], "paragraphs": []})
        if not article["paragraphs"] or article["paragraphs"][-1]["context"] != row["context"]:
            article["paragraphs"].append({"context": row["context"], "qas": []})
        article["paragraphs"][-1]["qas"].append({
            "id": row["id"], "question": row["question"],
            "answers": [{"text": t, "answer_start": s}
                        for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]})
    with open(path, "w") as f:
        json.dump({"version": "1.1", "data": list(articles.values())}, f)
    return path


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("squad-data")
    rows = squad_rows()
    with open(directory / "flat.json", "w") as f:
        json.dump(rows, f)
    return {"official": write_official(str(directory / "official.json"), rows),
            "jsonl": write_jsonl(str(directory / "flat.jsonl"), rows), "json": str(directory / "flat.json")}


def test_official_and_flattened_layouts_load_to_the_same_rows(squad_files) -> None:
    loaded = []
    for train, validation in (("official", "jsonl"), ("json", "official")):
        args = squad.SquadDataArguments(train_file=squad_files[train], validation_file=squad_files[validation])
        raw = squad.load_raw_datasets(args)
        assert set(raw) == {"train", "validation"}
        loaded += [raw["train"].to_list(), raw["validation"].to_list()]
    assert all(rows == loaded[0] for rows in loaded)
    assert loaded[0][0] == {"id": "c0q0", **{k: v for k, v in squad_rows()[0].items() if k != "id"}}
    assert len(loaded[0]) == 24


def test_hub_dataset_path_checks_the_columns(monkeypatch) -> None:
    rows = squad_rows(n_contexts=1, per_context=2)
    hub = {"squad": datasets.DatasetDict(train=datasets.Dataset.from_list(rows),
                                         validation=datasets.Dataset.from_list(rows)),
           "sst2": datasets.DatasetDict(train=datasets.Dataset.from_list(rows),
                                        validation=datasets.Dataset.from_list([{"sentence": "a", "label": 0}]))}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, cache_dir=None: hub[name])
    raw = squad.load_raw_datasets(squad.SquadDataArguments(dataset_name="squad"))
    assert raw["validation"].to_list() == rows
    with pytest.raises(LoSparseUsageError, match="validation split lacks the columns answers, context, id, question"):
        squad.load_raw_datasets(squad.SquadDataArguments(dataset_name="sst2"))


@pytest.mark.parametrize("document", [
    {"version": "1.1"},
    [{"sentence": "good movie", "label": 1}],
    {"data": [{"title": "t", "paragraphs": [{"context": "good movie", "qas": [{"id": "1", "question": "q"}]}]}]},
    [{"id": "1", "context": "c", "question": "q", "answers": {"text": ["c"]}}],
])
def test_a_file_that_is_not_squad_shaped_is_a_usage_error(tmp_path, document) -> None:
    path = str(tmp_path / "bad.json")
    with open(path, "w") as f:
        json.dump(document, f)
    args = squad.SquadDataArguments(train_file=path, validation_file=path)
    with pytest.raises(LoSparseUsageError, match=r"--train_file .*bad\.json' is not SQuAD-shaped: expected"):
        squad.load_raw_datasets(args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "pass --dataset_name"),
    (dict(train_file="missing.json", validation_file="missing.json"), "does not exist"),
    (dict(dataset_name="squad", doc_stride=384), r"--doc_stride 384 must be in \[0, --max_seq_length 384\)"),
    (dict(dataset_name="squad", max_answer_length=0), "--max_answer_length 0 must be a positive integer"),
    (dict(dataset_name="squad", task_name="squad_v2"), "--task_name 'squad_v2' is not known; choose one of: squad"),
])
def test_data_arguments_are_checked(kwargs, message) -> None:
    with pytest.raises(LoSparseUsageError, match=message):
        squad.SquadDataArguments(**kwargs)


def test_data_arguments_reject_other_extensions(tmp_path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("id,context\n")
    with pytest.raises(LoSparseUsageError, match=r"must end in one of: \.json, \.jsonl"):
        squad.SquadDataArguments(train_file=str(path), validation_file=str(path))


# --------------------------------------------------------------------------------------------
# (c) end to end, (d) bad input
# --------------------------------------------------------------------------------------------

def test_run_squad_end_to_end_and_reload_reproduces_the_metrics(tmp_path, tiny_qa_dir, squad_files) -> None:
    from transformers import AutoTokenizer, TrainingArguments, default_data_collator

    output_dir = str(tmp_path / "out")
    run_squad.main([
        "--model_name_or_path", tiny_qa_dir, "--train_file", squad_files["official"],
        "--validation_file", squad_files["jsonl"], "--output_dir", output_dir,
        "--max_seq_length", "32", "--doc_stride", "16", "--max_steps", "6", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--remaining_ratio", "0.3",
        "--low_rank_ratio", "0.1", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    with open(os.path.join(output_dir, "all_results.json")) as f:
        results = json.load(f)
    assert 0.0 <= results["eval_exact_match"] <= results["eval_f1"] <= 100.0
    assert results["compression"]["remaining_ratio"] == pytest.approx(0.3, abs=0.01)
    assert results["task_name"] == "squad" and results["method"] == "losparse"
    with open(os.path.join(output_dir, "eval_predictions.json")) as f:
        saved_predictions = json.load(f)
    assert len(saved_predictions) == 24

    model = losparse.load(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    data_args = squad.SquadDataArguments(train_file=squad_files["official"], validation_file=squad_files["jsonl"],
                                         max_seq_length=32, doc_stride=16)
    _, features, examples = squad.preprocess(squad.load_raw_datasets(data_args), tokenizer, data_args)
    assert len(features) > len(examples)  # long contexts span several windows
    trainer = squad.QuestionAnsweringTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path / "re"), report_to="none",
                                            per_device_eval_batch_size=16, disable_tqdm=True),
        eval_dataset=features, eval_examples=examples, data_collator=default_data_collator)
    metrics = trainer.evaluate()
    assert metrics["eval_exact_match"] == results["eval_exact_match"]
    assert metrics["eval_f1"] == results["eval_f1"]
    assert trainer.eval_predictions == saved_predictions


def test_not_squad_shaped_file_exits_2_with_one_line_before_loading_the_model(tmp_path, tiny_qa_dir, capsys,
                                                                             monkeypatch) -> None:
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model or tokenizer was loaded before the data was checked")

    monkeypatch.setattr(run_squad.AutoModelForQuestionAnswering, "from_pretrained", must_not_load)
    monkeypatch.setattr(run_squad.AutoTokenizer, "from_pretrained", must_not_load)
    path = tmp_path / "sst.json"
    path.write_text(json.dumps([{"sentence": "good movie", "label": 1}]))
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_squad.main, ["--model_name_or_path", tiny_qa_dir, "--train_file", str(path),
                                  "--validation_file", str(path), "--output_dir", str(tmp_path / "out"),
                                  "--report_to", "none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --train_file") and "is not SQuAD-shaped" in err and "\n" not in err


def test_config_yaml_needs_no_task_name(tmp_path, squad_files, capsys) -> None:
    config = os.path.join(REPO_ROOT, "configs", "squad",
                          "bert-base-uncased.yaml")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(SystemExit):  # parsing (YAML incl. tasks.squad.ratios.0.2) succeeded; the output dir fails
        run_main(run_squad.main, ["--config", config, "--remaining_ratio", "0.2", "--train_file", squad_files["json"],
                                  "--validation_file", squad_files["json"], "--output_dir", str(busy)])
    assert "exists and is not empty" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# (e) bad data never gets past the front door: one line, exit 2, before the weights load
# --------------------------------------------------------------------------------------------

CONTEXT = "good movie bad plot"
GOOD_ROW = {"id": "q1", "context": CONTEXT, "question": "movie", "answers": {"text": ["bad plot"], "answer_start": [11]}}


def _row(**changes) -> str:
    return json.dumps({**GOOD_ROW, **changes}) + "\n"


@pytest.fixture
def no_qa_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was refused")

    monkeypatch.setattr(run_squad.AutoModelForQuestionAnswering, "from_pretrained", refuse)


BAD_SQUAD = [
    ("unreadable", b"\x80abc", [], "--train_file '{train}' cannot be read: it is not UTF-8 text (byte 0 is b'\\x80')"),
    ("empty file", "\n", [], "--train_file '{train}' is empty"),
    ("bad JSON line", _row() + '{"id": "q2",\n', [],
     "--train_file '{train}' line 2 is not JSON: Expecting property name enclosed in double quotes (column 13)"),
    ("empty question", _row() + _row(id="q2", question=""), [], "--train_file '{train}' line 2 (id 'q2') has an empty question"),
    ("empty context", _row(context="  "), [], "--train_file '{train}' line 1 (id 'q1') has an empty context"),
    ("answer_start off the answer", _row(answers={"text": ["bad plot"], "answer_start": [10]}), [],
     "--train_file '{train}' line 1 (id 'q1'): answer_start 10 points at ' bad plo' in the context, not at the answer "
     "'bad plot'; fix answer_start (it is the training label)"),
    ("answer_start past the context", _row(answers={"text": ["bad plot"], "answer_start": [40]}), [],
     "--train_file '{train}' line 1 (id 'q1'): answer_start 40 points at '' in the context, not at the answer "
     "'bad plot'; fix answer_start (it is the training label)"),
    ("--max_seq_length above the positions", _row(), ["--max_seq_length", "128", "--doc_stride", "32"],
     "--max_seq_length 128 is more than the 64 positions of --model_name_or_path '{model}' (max_position_embeddings "
     "64); pass --max_seq_length 64 or less"),
    ("--max_train_samples 0", _row(), ["--max_train_samples", "0"], "--max_train_samples 0 must be a positive integer"),
    ("warm-up not below the steps", _row(), ["--max_steps", "2", "--pruning_warmup_steps", "2"],
     "the pruning warm-up of 2 optimizer steps (--pruning_warmup_steps 2) is not shorter than the run's 2 optimizer "
     "steps (--max_steps 2); lower it or train longer"),
    ("--num_train_epochs 0", _row(), ["--num_train_epochs", "0"],
     "--num_train_epochs 0 trains for no optimizer step; pass a positive --num_train_epochs or --max_steps"),
]


@pytest.mark.parametrize("case, train, extra, message", BAD_SQUAD, ids=[c[0] for c in BAD_SQUAD])
def test_bad_squad_data_is_one_line_before_the_weights_load(tmp_path, tiny_qa_dir, capsys, no_qa_weights, case, train,
                                                            extra, message) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(train) if isinstance(train, bytes) else path.write_text(train)
    validation = write_jsonl(str(tmp_path / "validation.jsonl"), [GOOD_ROW])
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_squad.main, ["--model_name_or_path", tiny_qa_dir, "--train_file", str(path), "--validation_file",
                                  validation, "--output_dir", str(tmp_path / "out"), "--max_seq_length", "32",
                                  "--doc_stride", "16", "--report_to", "none", "--use_cpu", "true", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err == "error: " + message.format(train=path, model=tiny_qa_dir)


def test_answer_start_in_the_official_layout_names_the_question(tmp_path) -> None:
    rows = squad_rows(n_contexts=1, per_context=2)
    rows[1]["answers"]["answer_start"][0] += 1
    path = write_official(str(tmp_path / "train.json"), rows)
    with pytest.raises(LoSparseUsageError, match=r"^--train_file '.*train\.json' data\[0\]\.paragraphs\[0\]\.qas\[1\] "
                                                 r"\(id 'c0q1'\): answer_start \d+ points at "):
        squad.read_squad_file(path, "train_file")


def test_misaligned_validation_answers_are_counted_and_kept(tmp_path, caplog) -> None:
    """Evaluation compares answer texts only, so a wrong answer_start there is reported, not refused."""
    path = write_jsonl(str(tmp_path / "dev.jsonl"), [GOOD_ROW, {**GOOD_ROW, "id": "q2", "answers": {
        "text": ["bad plot", "plot"], "answer_start": [11, 3]}}])
    caplog.set_level("WARNING", logger="losparse")
    rows = squad.read_squad_file(path, "validation_file")
    assert len(rows) == 2
    assert ("dev.jsonl': 1 answers whose answer_start does not point at their text (first: line 2, id 'q2', "
            "answer_start 3 points at 'd mo', not 'plot'); kept") in caplog.text
