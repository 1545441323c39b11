"""Shared readers (losparse/cli/tasks/common.py) and the GLUE column and label rules, without any model."""

from __future__ import annotations

import json
import types

import pytest

from losparse import LoSparseUsageError
from losparse.cli.tasks import common, glue


def table_of(tmp_path, name: str, text: str) -> common.Table:
    path = tmp_path / name
    path.write_text(text)
    return common.read_table(str(path), "train_file")


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("name, text, rows, locations", [
    ("a.csv", "\ufeffsentence,label\n\ngood movie,1\n\"bad,\nplot\",0\n", [{"sentence": "good movie", "label": "1"},
                                                                         {"sentence": "bad,\nplot", "label": "0"}],
     ["line 3", "line 5"]),
    ("a.jsonl", '{"text": "x", "label": 1}\n\n{"text": "y"}\n', [{"text": "x", "label": 1}, {"text": "y"}],
     ["line 1", "line 3"]),
    ("a.json", '[{"text": "x"}, {"text": "y", "label": 2}]', [{"text": "x"}, {"text": "y", "label": 2}],
     ["record 1", "record 2"]),
    ("a.json", '{"data": [{"text": "x"}]}', [{"text": "x"}], ["record data[0]"]),
    ("a.json", '{"text": "x"}\n{"text": "y"}\n', [{"text": "x"}, {"text": "y"}], ["line 1", "line 2"]),
])
def test_read_table_keeps_where_each_row_came_from(tmp_path, name, text, rows, locations) -> None:
    table = table_of(tmp_path, name, text)
    assert table.rows == rows and table.locations == locations
    assert table.where(len(rows) - 1) == f"--train_file '{tmp_path / name}' {locations[-1]}"


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "a,b\n1,2\n1,2,3\n", "line 3 has 3 fields but the header has 2 (a, b)"),
    ("a.csv", "a,a\n1,2\n", "line 1: the header names the column 'a' twice"),
    ("a.csv", "a,\n1,2\n", "line 1: header field 2 is empty; name every column"),
    ("a.json", '{"text": "x"', "is not valid JSON: Expecting ',' delimiter at line 1 column 13"),
    ("a.json", "[\n  {\"text\": \"x\"},\n  {\"text\" \"y\"}\n]", "is not valid JSON: Expecting ':' delimiter at line 3"),
    ("a.json", '{"text": "x", "label": 1}', "holds one JSON object; expected JSON lines"),
    ("a.jsonl", '{"text": "x"}\n[1, 2]\n', "line 2 is a JSON list, not an object with one value per column"),
    ("a.jsonl", "\n\n  \n", "is empty"),
    ("a.json", "[]", "holds no records"),
])
def test_read_table_refuses_bad_files_naming_the_line(tmp_path, name, text, message) -> None:
    with pytest.raises(LoSparseUsageError) as error:
        table_of(tmp_path, name, text)
    assert str(error.value).startswith(f"--train_file '{tmp_path / name}' ") and message in str(error.value)


def test_texts_refuse_empty_and_non_text_cells(tmp_path) -> None:
    table = table_of(tmp_path, "a.jsonl", jsonl([{"text": "x"}, {"text": 5}, {}]))
    with pytest.raises(LoSparseUsageError, match=r"line 2: the text column 'text' holds 5, not text"):
        table.texts("text")
    table.rows[1]["text"] = "y"
    with pytest.raises(LoSparseUsageError, match=r"line 3: the text column 'text' is empty"):
        table.texts("text")


@pytest.mark.parametrize("rows, requested, expected", [
    ([{"id": 1, "group": "a", "text": "good movie", "label": 1}], None, ("text",)),
    ([{"premise": "a b", "hypothesis": "c", "sentence": "d", "label": 1}], None, ("premise", "hypothesis")),
    ([{"Question1": "a b", "Question2": "c", "label": 1}], None, ("Question1", "Question2")),
    ([{"question": "a b", "sentence": "c", "label": 1}], None, ("question", "sentence")),
    ([{"review_id": "r1", "score": "5", "body_text": "good movie", "label": 1}], None, ("body_text",)),
    ([{"text": 3, "review": "good", "label": 1}], None, ("review",)),  # a numeric `text` is no text column
    ([{"a": "x", "b": "y", "label": 1}], ["b", "a"], ("b", "a")),
])
def test_text_columns_prefer_known_names_and_never_ids_or_numbers(tmp_path, rows, requested, expected) -> None:
    table = table_of(tmp_path, "a.jsonl", jsonl(rows))
    assert glue.choose_text_columns(table, "label", requested) == expected


def test_an_all_numbers_csv_column_is_not_text(tmp_path) -> None:
    table = table_of(tmp_path, "a.csv", "code,sentence,label\n12,good movie,1\n7,bad plot,0\n")
    assert not glue.is_text_column(table, "code") and glue.is_text_column(table, "sentence")
    table = table_of(tmp_path, "b.csv", "code,label\n12,1\n")
    with pytest.raises(LoSparseUsageError, match="and no column holds text"):
        glue.choose_text_columns(table, "label", None)


def args(tmp_path, train: str, validation: str, **kwargs) -> glue.GlueDataArguments:
    (tmp_path / "train.csv").write_text(train)
    (tmp_path / "validation.csv").write_text(validation)
    return glue.GlueDataArguments(train_file=str(tmp_path / "train.csv"),
                                  validation_file=str(tmp_path / "validation.csv"), **kwargs)


def model_config(num_labels: int = 2, head: bool = True, label2id=None):
    from transformers import BertConfig

    config = BertConfig(num_labels=num_labels, architectures=["BertForSequenceClassification"] if head else None)
    if label2id:
        config.label2id, config.id2label = label2id, {i: k for k, i in label2id.items()}
    return config


MODEL = types.SimpleNamespace(model_name_or_path="some/model", cache_dir=None, ignore_mismatched_sizes=False)


@pytest.mark.parametrize("labels, config, names, ids, regression", [
    (["spam", "ham", "spam"], model_config(), ["ham", "spam"], [1, 0, 1], False),
    (["2", "10", "2"], model_config(), ["2", "10"], [0, 1, 0], False),  # numbers sort as numbers
    (["0.5", "1", "2.25"], model_config(1), None, [0.5, 1.0, 2.25], True),
    (["pos", "neg"], model_config(label2id={"POS": 0, "NEG": 1}), ["pos", "neg"], [0, 1], False),  # head's order
    (["a", "b", "c"], model_config(head=False), ["a", "b", "c"], [0, 1, 2], False),  # no trained head: any count
])
def test_labels_become_ids_with_their_names(tmp_path, labels, config, names, ids, regression) -> None:
    data_args = args(tmp_path, "sentence,label\n" + "".join(f"good movie,{v}\n" for v in labels),
                     "sentence,label\nbad plot,%s\n" % labels[0])
    data = glue.load_data(data_args, MODEL, config)
    assert data.label_list == names and data.is_regression == regression
    assert data.raw["train"]["label"] == ids


def test_a_single_label_is_refused(tmp_path) -> None:
    data_args = args(tmp_path, "sentence,label\ngood,yes\nbad,yes\n", "sentence,label\nok,yes\n")
    with pytest.raises(LoSparseUsageError, match=r"has a single label, 'yes' \(column 'label'\); classification needs"):
        glue.load_data(data_args, MODEL, model_config())


def test_samples_are_cut_after_the_whole_file_is_checked(tmp_path) -> None:
    data_args = args(tmp_path, "sentence,label\ngood,1\nbad,0\nfine,1\n,0\n", "sentence,label\nok,1\n",
                     max_train_samples=2)
    with pytest.raises(LoSparseUsageError, match="line 5: the text column 'sentence' is empty"):
        glue.load_data(data_args, MODEL, model_config())
    (tmp_path / "train.csv").write_text("sentence,label\ngood,1\nbad,0\nfine,2\n")
    data = glue.load_data(data_args, MODEL, model_config(3))
    assert len(data.raw["train"]) == 2 and data.label_list == ["0", "1", "2"]  # labels from the whole file


def test_hub_glue_task_keeps_its_columns_labels_and_checks_the_head(monkeypatch) -> None:
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                                  "idx": datasets.Value("int32")})
    split = datasets.Dataset.from_dict({"premise": ["a b", "c"], "hypothesis": ["d", "e f"], "label": [0, 2],
                                        "idx": [0, 1]}, features=features)
    hub = datasets.DatasetDict(train=split, validation_matched=split, validation_mismatched=split)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    data_args = glue.GlueDataArguments(task_name="mnli", max_train_samples=1)
    data = glue.load_data(data_args, MODEL, model_config(3))
    assert data.text_keys == ("premise", "hypothesis") and data.label_list == ["entailment", "neutral", "contradiction"]
    assert set(data.raw) == {"train", "validation", "validation_mismatched"} and len(data.raw["train"]) == 1
    with pytest.raises(LoSparseUsageError, match=r"the data has 3 labels \(entailment, neutral, contradiction\) but "
                                                 r"the classification head of --model_name_or_path 'some/model' has 2"):
        glue.load_data(data_args, MODEL, model_config(2))
