"""Offline task metrics: GLUE, SQuAD v1.1 and ROUGE.

Why this module exists: the usual sources of these metrics need the network
(``evaluate.load`` fetches metric scripts, ``nltk.sent_tokenize`` needs the
``punkt`` data).  Everything here runs offline, on numpy, scipy and
``rouge_score`` only, and follows the published definitions so that numbers
are comparable with the ones reported by Hugging Face's example scripts:

* GLUE: same metric names and keys as HF's ``glue`` metric, values in [0, 1]
  (correlations in [-1, 1]), not percent.
* SQuAD v1.1: the official evaluation script's normalisation, exact match and
  token F1, reported in percent.
* ROUGE: ``rouge_score.rouge_scorer.RougeScorer`` F-measures, averaged over
  pairs and reported in percent, with sentences joined by ``"\\n"`` for
  ``rougeLsum`` as in HF's summarization example.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "GLUE_TASK_METRICS",
    "accuracy",
    "binary_f1",
    "matthews_corrcoef",
    "glue_metrics",
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "squad_metrics",
    "split_sentences",
    "lead_n",
    "rouge_scores",
]

# --------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------

#: Metrics reported for each GLUE task, as in GLUE and HF's ``glue`` metric.
GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mnli": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
}

_CLASSIFICATION_DEFAULT: tuple[str, ...] = ("accuracy",)
_BINARY_DEFAULT: tuple[str, ...] = ("accuracy", "f1")
_REGRESSION_DEFAULT: tuple[str, ...] = ("pearson", "spearmanr")


def _as_1d_pair(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    """Convert to 1-D numpy arrays of equal, non-zero length (else ValueError)."""
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.ndim != 1 or refs.ndim != 1:
        raise ValueError(
            "predictions and references must be 1-D "
            f"(got shapes {preds.shape} and {refs.shape}); "
            "for classification pass class ids, e.g. logits.argmax(-1)"
        )
    if preds.shape[0] != refs.shape[0]:
        raise ValueError(
            f"predictions and references differ in length: {preds.shape[0]} != {refs.shape[0]}"
        )
    if preds.shape[0] == 0:
        raise ValueError("predictions and references are empty")
    return preds, refs


def _as_class_ids(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as int64 class ids; ValueError if any is not integral."""
    if np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_:
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0):
        return values.astype(np.int64)
    raise ValueError(
        f"{name} must be integer class ids for classification "
        f"(got dtype {values.dtype}); pass is_regression=True for float targets"
    )


def accuracy(predictions: Any, references: Any) -> float:
    """Fraction of positions where ``predictions[i] == references[i]``."""
    preds, refs = _as_1d_pair(predictions, references)
    return float(np.mean(preds == refs))


def binary_f1(predictions: Any, references: Any, positive_label: int = 1) -> float:
    """F1 of the positive class: ``2*TP / (2*TP + FP + FN)``; 0.0 if that is 0/0.

    Same as sklearn's ``f1_score(average="binary", pos_label=1)``, which GLUE
    uses for MRPC and QQP.
    """
    preds, refs = _as_1d_pair(predictions, references)
    pred_pos = preds == positive_label
    ref_pos = refs == positive_label
    tp = int(np.sum(pred_pos & ref_pos))
    fp = int(np.sum(pred_pos & ~ref_pos))
    fn = int(np.sum(~pred_pos & ref_pos))
    denominator = 2 * tp + fp + fn
    return 2.0 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: Any, references: Any) -> float:
    """Matthews correlation coefficient (multiclass form, as in sklearn).

    With confusion matrix ``C`` (rows = reference, columns = prediction),
    ``t_k`` the reference count of class k, ``p_k`` the predicted count,
    ``c = trace(C)`` and ``s = N``::

        MCC = (c*s - sum_k p_k*t_k) / sqrt((s^2 - sum_k p_k^2) * (s^2 - sum_k t_k^2))

    For two classes this equals ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.
    Returns 0.0 when the denominator is 0 (e.g. a constant prediction).
    """
    preds, refs = _as_1d_pair(predictions, references)
    classes, inverse = np.unique(np.concatenate([refs, preds]), return_inverse=True)
    n = refs.shape[0]
    ref_idx, pred_idx = inverse[:n], inverse[n:]
    # Floats throughout: the integer products overflow int64 on large eval sets.
    t = np.bincount(ref_idx, minlength=classes.size).astype(np.float64)
    p = np.bincount(pred_idx, minlength=classes.size).astype(np.float64)
    c = float(np.sum(ref_idx == pred_idx))
    s = float(n)
    numerator = c * s - float(np.dot(p, t))
    denominator = np.sqrt((s * s - float(np.dot(p, p))) * (s * s - float(np.dot(t, t))))
    return float(numerator / denominator) if denominator > 0 else 0.0


def glue_metrics(
    task_name: str | None,
    predictions: Any,
    references: Any,
    is_regression: bool = False,
    num_labels: int | None = None,
) -> dict[str, float]:
    """Compute the GLUE metrics of ``task_name`` (keys as in HF's ``glue`` metric).

    * cola -> ``matthews_correlation``
    * sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli -> ``accuracy``
    * mrpc, qqp -> ``accuracy`` and ``f1`` (binary F1 of class 1)
    * stsb -> ``pearson`` and ``spearmanr`` (scipy.stats)
    * ``None`` (a user's own dataset) -> ``accuracy``, plus ``f1`` (of class
      id 1) when ``num_labels == 2`` — accuracy alone hides a model that always
      predicts the majority class of an imbalanced binary task — or
      ``pearson`` and ``spearmanr`` when ``is_regression``.

    For a named task the GLUE definition fixes the metrics and ``is_regression``
    is not consulted.  Classification predictions must be class ids (not
    logits); regression predictions are floats.  Values are plain floats, not
    percent.  A correlation of constant input is undefined and comes back as
    nan (scipy's behaviour).  Raises ValueError for an unknown task, empty or
    mismatched inputs, or non-integer class ids.
    """
    if task_name is None:
        if is_regression:
            metric_names = _REGRESSION_DEFAULT
        else:
            metric_names = _BINARY_DEFAULT if num_labels == 2 else _CLASSIFICATION_DEFAULT
    elif task_name in GLUE_TASK_METRICS:
        metric_names = GLUE_TASK_METRICS[task_name]
    else:
        raise ValueError(
            f"Unknown GLUE task_name {task_name!r}; expected None or one of "
            f"{sorted(GLUE_TASK_METRICS)}"
        )

    preds, refs = _as_1d_pair(predictions, references)
    if metric_names == _REGRESSION_DEFAULT:
        preds = preds.astype(np.float64)
        refs = refs.astype(np.float64)
        return {
            "pearson": float(stats.pearsonr(preds, refs)[0]),
            "spearmanr": float(stats.spearmanr(preds, refs)[0]),
        }

    preds = _as_class_ids(preds, "predictions")
    refs = _as_class_ids(refs, "references")
    compute = {
        "accuracy": accuracy,
        "f1": binary_f1,
        "matthews_correlation": matthews_corrcoef,
    }
    return {name: compute[name](preds, refs) for name in metric_names}


# --------------------------------------------------------------------------
# SQuAD v1.1 (official evaluation definitions)
# --------------------------------------------------------------------------

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Normalise an answer as the official SQuAD v1.1 script does.

    In this order: lowercase; delete every ``string.punctuation`` character;
    replace the whole words ``a``/``an``/``the`` by a space; collapse runs of
    whitespace to single spaces and strip the ends.
    """
    text = s.lower()
    text = text.translate(_PUNCTUATION_TABLE)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between normalised answers (official SQuAD v1.1).

    Tokens are the whitespace-split normalised strings; ``overlap`` is the
    size of the multiset intersection; ``P = overlap/len(pred)``,
    ``R = overlap/len(truth)``, ``F1 = 2PR/(P+R)``; 0.0 when ``overlap`` is 0
    (including when either side normalises to nothing).
    """
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    overlap = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
) -> dict[str, float]:
    """SQuAD v1.1 ``exact_match`` and ``f1`` in percent.

    For each question id in ``references`` take the max of the score over its
    ground-truth answers, average over all reference ids, multiply by 100.
    An id missing from ``predictions`` scores 0 (as in the official script).
    Raises ValueError if ``predictions`` has ids not in ``references``, if
    ``references`` is empty, or if a question has no ground truths.
    """
    if not references:
        raise ValueError("references is empty")
    unknown = [qid for qid in predictions if qid not in references]
    if unknown:
        shown = ", ".join(repr(q) for q in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ValueError(f"predictions has ids not in references: {shown}{more}")

    exact_total = 0.0
    f1_total = 0.0
    for qid, ground_truths in references.items():
        if isinstance(ground_truths, str):
            raise TypeError(f"references[{qid!r}] must be a list of answers, not a str")
        if len(ground_truths) == 0:
            raise ValueError(f"references[{qid!r}] has no ground-truth answers")
        if qid not in predictions:
            continue  # official behaviour: unanswered question scores 0
        prediction = predictions[qid]
        exact_total += max(exact_match_score(prediction, gt) for gt in ground_truths)
        f1_total += max(f1_score(prediction, gt) for gt in ground_truths)

    n = len(references)
    return {"exact_match": 100.0 * exact_total / n, "f1": 100.0 * f1_total / n}


# --------------------------------------------------------------------------
# Sentence splitting and ROUGE
# --------------------------------------------------------------------------

# Candidate boundary: a terminator, optional closing quotes/brackets, then
# whitespace.  Whether it is a real boundary depends on the next character.
_BOUNDARY_RE = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")
_OPENING_QUOTES = "\"'\u201c\u2018"


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with a simple deterministic rule.

    Used instead of ``nltk.sent_tokenize`` because the ``punkt`` data cannot
    be downloaded.  Rule: every line break is a boundary; within a line, a
    boundary follows ``.``, ``!`` or ``?`` (plus any closing quotes or
    brackets) and whitespace, when the next character is an uppercase letter,
    a digit or an opening quote.  Sentences are stripped and empty ones
    dropped.  Abbreviations such as "Mr. Smith" are split (known limitation).
    """
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _BOUNDARY_RE.finditer(line):
            end = match.end()
            if end >= len(line):
                break  # trailing whitespace; the rest is handled below
            nxt = line[end]
            if nxt.isupper() or nxt.isdigit() or nxt in _OPENING_QUOTES:
                sentences.append(line[start:end])
                start = end
        sentences.append(line[start:])
    return [s.strip() for s in sentences if s.strip()]


def lead_n(text: str, n: int = 3) -> str:
    """First ``n`` sentences of ``text`` (by :func:`split_sentences`) joined by a space.

    The standard Lead-3 extractive summarisation baseline for n=3.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return " ".join(split_sentences(text)[:n])


_ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F-measures (percent) over prediction/reference pairs.

    Keys ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``, each
    ``100 * mean_i F_i`` from ``rouge_score.rouge_scorer.RougeScorer``.  As in
    HF's summarization example, both sides are first rewritten as their
    :func:`split_sentences` joined by ``"\\n"``; that only affects
    ``rougeLsum`` (summary-level LCS over newline-separated sentences), since
    the ROUGE tokenizer treats newlines like any other separator.
    Raises ValueError for empty inputs or mismatched lengths.
    """
    from rouge_score import rouge_scorer  # imported lazily: only ROUGE needs it

    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a str")
    if len(predictions) == 0 or len(references) == 0:
        raise ValueError("predictions and references must be non-empty")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} != {len(references)}"
        )

    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        pred_text = "\n".join(split_sentences(prediction))
        ref_text = "\n".join(split_sentences(reference))
        # RougeScorer.score takes (target, prediction).
        scores = scorer.score(ref_text, pred_text)
        for key in _ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}
