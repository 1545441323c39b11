"""Tests for losparse.cli.metrics; expected values are computed by hand in comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from losparse.cli.metrics import (
    GLUE_TASK_METRICS,
    accuracy,
    binary_f1,
    exact_match_score,
    f1_score,
    glue_metrics,
    lead_n,
    matthews_corrcoef,
    normalize_answer,
    rouge_scores,
    split_sentences,
    squad_metrics,
)

# --------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------

# preds vs refs, position by position:
#   0: 1/1 TP   1: 0/0 TN   2: 1/0 FP   3: 1/1 TP   4: 0/1 FN   5: 1/1 TP
# => TP=3, TN=1, FP=1, FN=1
PREDS = [1, 0, 1, 1, 0, 1]
REFS = [1, 0, 0, 1, 1, 1]


def test_accuracy_and_binary_f1_by_hand() -> None:
    # accuracy = (TP+TN)/N = 4/6
    assert accuracy(PREDS, REFS) == pytest.approx(4 / 6)
    # F1 = 2TP / (2TP + FP + FN) = 6 / 8
    assert binary_f1(PREDS, REFS) == pytest.approx(0.75)


def test_binary_f1_no_positives_is_zero() -> None:
    # TP = FP = FN = 0 -> 0/0 -> defined as 0.0
    assert binary_f1([0, 0], [0, 0]) == 0.0


def _mcc_2x2(tp: int, tn: int, fp: int, fn: int) -> float:
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def test_matthews_binary_by_hand() -> None:
    # TP=3, TN=1, FP=1, FN=1:
    # (3*1 - 1*1) / sqrt((3+1)(3+1)(1+1)(1+1)) = 2 / sqrt(64) = 0.25
    assert matthews_corrcoef(PREDS, REFS) == pytest.approx(0.25)
    assert matthews_corrcoef(PREDS, REFS) == pytest.approx(_mcc_2x2(3, 1, 1, 1))


def test_matthews_binary_less_round_case() -> None:
    # Confusion matrix TP=6, TN=3, FP=1, FN=2 (12 examples):
    # (6*3 - 1*2) / sqrt((6+1)(6+2)(3+1)(3+2)) = 16 / sqrt(1120) = 0.478091...
    refs = [1] * 6 + [0] * 3 + [0] * 1 + [1] * 2
    preds = [1] * 6 + [0] * 3 + [1] * 1 + [0] * 2
    expected = 16 / math.sqrt(1120)
    assert _mcc_2x2(6, 3, 1, 2) == pytest.approx(expected)
    assert matthews_corrcoef(preds, refs) == pytest.approx(expected)
    assert matthews_corrcoef(preds, refs) == pytest.approx(0.4780914437)


def test_matthews_multiclass_by_hand() -> None:
    # refs [0,1,2,0], preds [0,2,2,0]
    # t (ref counts) = [2,1,1], p (pred counts) = [2,0,2], c (correct) = 3, s = 4
    # num = c*s - p.t = 12 - (4+0+2) = 6
    # den = sqrt((s^2 - p.p)(s^2 - t.t)) = sqrt((16-8)(16-6)) = sqrt(80)
    assert matthews_corrcoef([0, 2, 2, 0], [0, 1, 2, 0]) == pytest.approx(6 / math.sqrt(80))


def test_matthews_extremes_and_zero_denominator() -> None:
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # constant prediction 1: TN = FN = 0, so the factor (TN+FN) is 0 -> defined as 0.0
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0


def test_pearson_and_spearman_by_hand() -> None:
    # x = [1,2,3,4], y = x^2 = [1,4,9,16]: strictly increasing -> spearman 1.
    # dx = [-1.5,-0.5,0.5,1.5], dy = [-6.5,-3.5,1.5,8.5]
    # sum dx*dy = 9.75+1.75+0.75+12.75 = 25; sum dx^2 = 5; sum dy^2 = 129
    # pearson = 25 / sqrt(5*129) = 25 / sqrt(645) = 0.984374...
    out = glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0])
    assert set(out) == {"pearson", "spearmanr"}
    assert out["spearmanr"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(25 / math.sqrt(645))
    assert out["pearson"] < 1.0


def test_regression_without_task_name() -> None:
    # y reversed: ranks perfectly opposite -> spearman -1; also linear -> pearson -1
    out = glue_metrics(None, np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]), is_regression=True)
    assert out == pytest.approx({"pearson": -1.0, "spearmanr": -1.0})


def test_classification_without_task_name_is_accuracy() -> None:
    out = glue_metrics(None, PREDS, REFS)
    assert out == pytest.approx({"accuracy": 4 / 6})
    assert glue_metrics(None, [0, 2, 1], [0, 2, 2], num_labels=3) == pytest.approx({"accuracy": 2 / 3})


def test_own_binary_task_reports_f1_of_label_id_1_too() -> None:
    # TP 3 (positions 0, 3, 5), FP 1 (position 2), FN 1 (position 4): F1 = 6 / 8
    out = glue_metrics(None, PREDS, REFS, num_labels=2)
    assert out == pytest.approx({"accuracy": 4 / 6, "f1": 0.75})
    # a model that always predicts the majority class gets its accuracy but an F1 of 0
    assert glue_metrics(None, [0] * 4, [0, 0, 0, 1], num_labels=2) == pytest.approx({"accuracy": 0.75, "f1": 0.0})


@pytest.mark.parametrize(
    ("task", "keys"),
    [
        ("cola", {"matthews_correlation"}),
        ("sst2", {"accuracy"}),
        ("mnli", {"accuracy"}),
        ("mnli_mismatched", {"accuracy"}),
        ("mnli_matched", {"accuracy"}),
        ("qnli", {"accuracy"}),
        ("rte", {"accuracy"}),
        ("wnli", {"accuracy"}),
        ("mrpc", {"accuracy", "f1"}),
        ("qqp", {"accuracy", "f1"}),
        ("stsb", {"pearson", "spearmanr"}),
    ],
)
def test_every_glue_task_key_set(task: str, keys: set[str]) -> None:
    assert set(GLUE_TASK_METRICS[task]) == keys
    out = glue_metrics(task, np.array(PREDS), np.array(REFS))
    assert set(out) == keys
    for value in out.values():
        assert type(value) is float  # plain Python float, not np.float64
        assert -1.0 <= value <= 1.0


def test_glue_task_table_is_exactly_the_glue_tasks() -> None:
    assert set(GLUE_TASK_METRICS) == {
        "cola", "sst2", "mnli", "mnli_mismatched", "mnli_matched",
        "qnli", "rte", "wnli", "mrpc", "qqp", "stsb",
    }


def test_mrpc_values_by_hand() -> None:
    # same vectors as above: accuracy 4/6, F1 6/8
    out = glue_metrics("mrpc", PREDS, REFS)
    assert out == pytest.approx({"accuracy": 4 / 6, "f1": 0.75})


def test_unknown_task_raises_with_names() -> None:
    with pytest.raises(ValueError, match=r"'sst-2'.*cola.*stsb"):
        glue_metrics("sst-2", PREDS, REFS)


def test_glue_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="length"):
        glue_metrics("sst2", [0, 1, 1], [0, 1])


def test_glue_rejects_logits_and_fractional_class_ids() -> None:
    with pytest.raises(ValueError, match="1-D"):
        glue_metrics("sst2", np.zeros((3, 2)), [0, 1, 1])
    with pytest.raises(ValueError, match="class ids"):
        glue_metrics("sst2", [0.2, 0.9], [0, 1])
    # integral floats are fine
    assert glue_metrics("sst2", [0.0, 1.0], [0, 1]) == {"accuracy": 1.0}


# --------------------------------------------------------------------------
# SQuAD v1.1
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Cat", "cat"),  # case + leading article
        ("an apple a day", "apple day"),  # articles as whole words
        ("theater and anthem", "theater and anthem"),  # not inside words
        ("  Hello,   World!  ", "hello world"),  # punctuation + whitespace
        ("A.B.C.", "abc"),  # punctuation deleted, not replaced by a space
        # order matters: punctuation goes before articles, so "the-end" -> "theend"
        # (removing articles first would have given "end")
        ("the-end", "theend"),
        ("the", ""),
        ("THE\tDog\n", "dog"),
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match() -> None:
    assert exact_match_score("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match_score("Eiffel", "eiffel tower") == 0.0


def test_f1_partial_overlap_by_hand() -> None:
    # pred "the cat sat" -> [cat, sat]; truth "a cat sat down" -> [cat, sat, down]
    # overlap 2; P = 2/2 = 1; R = 2/3; F1 = 2*1*(2/3) / (1 + 2/3) = 4/5
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert exact_match_score("the cat sat", "a cat sat down") == 0.0


def test_f1_counts_clipped_overlap() -> None:
    # pred [cat, cat, cat], truth [cat]: overlap min(3,1) = 1
    # P = 1/3, R = 1; F1 = 2*(1/3)*1 / (4/3) = 1/2
    assert f1_score("cat cat cat", "cat") == pytest.approx(0.5)


def test_f1_no_overlap_and_empty() -> None:
    assert f1_score("dog", "cat") == 0.0
    # both normalise to "" -> EM 1 but F1 0 (v1.1 script: no common tokens -> 0)
    assert exact_match_score("the", "a") == 1.0
    assert f1_score("the", "a") == 0.0


def test_squad_metrics_by_hand() -> None:
    references = {
        "q1": ["Paris"],
        "q2": ["the cat sat", "a cat sat down"],
        "q3": ["42"],
    }
    predictions = {
        "q1": "paris.",  # EM 1, F1 1
        # pred [cat, sat, on, mat]
        #   vs [cat, sat]:       overlap 2, P=2/4, R=1   -> F1 = 2*(1/2)/(3/2) = 2/3
        #   vs [cat, sat, down]: overlap 2, P=2/4, R=2/3 -> F1 = 2*(1/3)/(7/6) = 4/7
        #   max = 2/3; EM 0
        "q2": "cat sat on the mat",
        # q3 missing -> 0
    }
    out = squad_metrics(predictions, references)
    # EM = 100 * (1 + 0 + 0)/3 ; F1 = 100 * (1 + 2/3 + 0)/3
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (5 / 3) / 3)


def test_squad_max_over_ground_truths() -> None:
    # second ground truth matches exactly -> EM 100, F1 100
    out = squad_metrics({"q": "cat sat down"}, {"q": ["the cat sat", "A cat sat down."]})
    assert out == pytest.approx({"exact_match": 100.0, "f1": 100.0})


def test_squad_missing_prediction_counts_zero() -> None:
    out = squad_metrics({}, {"q1": ["x"], "q2": ["y"]})
    assert out == {"exact_match": 0.0, "f1": 0.0}


def test_squad_errors() -> None:
    with pytest.raises(ValueError, match="'q9'"):
        squad_metrics({"q1": "x", "q9": "y"}, {"q1": ["x"]})
    with pytest.raises(ValueError):
        squad_metrics({}, {})
    with pytest.raises(ValueError):
        squad_metrics({"q1": "x"}, {"q1": []})
    with pytest.raises(TypeError):
        squad_metrics({"q1": "x"}, {"q1": "x"})  # type: ignore[dict-item]


# --------------------------------------------------------------------------
# Sentence splitting and ROUGE
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        (
            "Hello world. This is a test! Is it? Yes.",
            ["Hello world.", "This is a test!", "Is it?", "Yes."],
        ),
        # no whitespace after "3." -> no split; digit after ". " -> split
        ("Pi is 3.14 today. 2 cats came.", ["Pi is 3.14 today.", "2 cats came."]),
        # lowercase after ". " -> no split
        ("He said no. then he left.", ["He said no. then he left."]),
        # closing quote after the terminator; opening quote starts a sentence
        ('She said "Hi." Then left.', ['She said "Hi."', "Then left."]),
        ('It ended. "Why?" he asked.', ["It ended.", '"Why?" he asked.']),
        # newlines always split; blank lines and surrounding space dropped
        ("Line one\nline two\n\n   \n", ["Line one", "line two"]),
        ("  One.   Two.  ", ["One.", "Two."]),
        ("", []),
    ],
)
def test_split_sentences(text: str, sentences: list[str]) -> None:
    assert split_sentences(text) == sentences


def test_lead_n() -> None:
    text = "A one. B two. C three. D four."
    assert lead_n(text) == "A one. B two. C three."
    assert lead_n(text, n=1) == "A one."
    assert lead_n(text, n=10) == text
    assert lead_n(text, n=0) == ""
    assert lead_n("First line\nSecond line\nThird\nFourth") == "First line Second line Third"
    with pytest.raises(ValueError):
        lead_n(text, n=-1)


def test_rouge_by_hand() -> None:
    # pred [mat, the, cat] (3 tokens), ref [the, cat, on, the, mat] (5 tokens)
    # ROUGE-1: overlap mat+the+cat = 3; P = 3/3, R = 3/5 -> F = 2*0.6/1.6 = 0.75
    # ROUGE-2: pred {mat-the, the-cat}, ref {the-cat, cat-on, on-the, the-mat}
    #          overlap 1; P = 1/2, R = 1/4 -> F = 2*(1/8)/(3/4) = 1/3
    # ROUGE-L: LCS = "the cat" = 2; P = 2/3, R = 2/5 -> F = 2*(4/15)/(16/15) = 1/2
    # ROUGE-Lsum: single sentence -> same as ROUGE-L
    out = rouge_scores(["mat the cat"], ["the cat on the mat"], use_stemmer=False)
    assert out == pytest.approx(
        {"rouge1": 75.0, "rouge2": 100 / 3, "rougeL": 50.0, "rougeLsum": 50.0}
    )
    assert all(type(v) is float for v in out.values())


def test_rouge_is_mean_over_pairs() -> None:
    # pair 1 as above; pair 2 identical -> 100 everywhere
    out = rouge_scores(
        ["mat the cat", "a b c"], ["the cat on the mat", "a b c"], use_stemmer=False
    )
    assert out == pytest.approx(
        {
            "rouge1": (75 + 100) / 2,
            "rouge2": (100 / 3 + 100) / 2,
            "rougeL": (50 + 100) / 2,
            "rougeLsum": (50 + 100) / 2,
        }
    )


def test_rouge_stemmer() -> None:
    # Porter: "cats" -> "cat", "running" -> "run" (tokens of length <= 3 are not stemmed)
    assert rouge_scores(["cats running"], ["cat run"], use_stemmer=False)["rouge1"] == 0.0
    assert rouge_scores(["cats running"], ["cat run"], use_stemmer=True)["rouge1"] == pytest.approx(100.0)


def test_rouge_lsum_uses_sentences() -> None:
    # Same two sentences in swapped order.
    # rougeL over the flat token lists [the cat sat the dog ran] vs
    # [the dog ran the cat sat]: LCS = 3 of 6 -> 50.
    # rougeLsum: each reference sentence is fully covered by the matching
    # prediction sentence -> union-LCS hits 6 of 6 -> 100.
    out = rouge_scores(["The cat sat. The dog ran."], ["The dog ran. The cat sat."])
    assert set(out) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert 0.0 <= out["rougeLsum"] <= 100.0
    assert out["rougeL"] == pytest.approx(50.0)
    assert out["rougeLsum"] == pytest.approx(100.0)


def test_rouge_errors() -> None:
    with pytest.raises(ValueError):
        rouge_scores([], [])
    with pytest.raises(ValueError):
        rouge_scores(["a"], ["a", "b"])
    with pytest.raises(TypeError):
        rouge_scores("a b", "a b")  # type: ignore[arg-type]
