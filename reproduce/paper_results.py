"""The paper's published numbers, as data: Tables 1–5 and 7 of LoSparse (Li et al., ICML 2023), §4.

Transcribed by hand from the paper's text (Tables 1–5 in §4.1, §4.2, §4.3 and §4.5, Table 7 in §4.6) exactly as
printed: percentages, same digits, no rounding or rescaling. `reproduce.report` puts our runs beside
these numbers.

Layout of every table (a plain dict):
    id, title, source    where the numbers come from (table number, section, caption)
    decimals             how many decimals the paper prints (used when rendering ours)
    columns              list of {"key", "model", "task", "header", "metrics"}: one per result column;
                         `metrics` names the printed numbers in order, with the keys our all_results.json
                         uses without the "eval_" prefix (MNLI m / mm = accuracy / mismatched_accuracy,
                         MRPC and QQP Acc / F1 = accuracy / f1, STS-B P / S Corr = pearson / spearmanr,
                         SQuAD EM / F1 = exact_match / f1, R-1/2/L = rouge1 / rouge2 / rougeL)
    results              {(method, ratio): {column key: value}} in the paper's row order, where
                         method is our --method name (finetune = the paper's 100% rows, lead3 = Lead-3),
                         ratio is the remaining ratio as a fraction (None for Lead-3, which has none), and
                         value is a float (one printed number), a tuple (a printed "a / b" pair or
                         "R-1/R-2/R-L" triple, kept whole), or None where the paper prints N.A. (the
                         model did not converge). A column missing from a row is not reported there.
    row_labels           optional display names of rows, as in the paper
    distillation         optional: True = the table's compressed rows are distilled runs (Tables 5, 7)
    methods              optional: the only compressed methods the table matches (finetune always matches)

Notes on the transcription:
  * Table 1 / Table 2: "N.A." covers the whole cell, also for a pair (e.g. MNLI m / mm) -> None.
  * Table 3: the full-model rows print one EM / F1 pair under the 5% column; it is the unpruned
    model, stored as ratio 1.0. Movement is reported for BERT-base only; its 5% cell is N.A.
  * Table 4: the caption says XSum, but the table has XSum and CNN/DailyMail. The BART-large row has
    ratio "-" in the paper; it is the fine-tuned full model, stored as ("finetune", 1.0). R-L is compared
    with our rougeL (our rougeLsum is collected too and shows in the generic table).
  * Table 5 (distillation, 20%): MNLI is printed as one number for the DeBERTa teacher (90.5) and ITP
    (85.9) but as "84.6 / 84.7" for LoSparse; single numbers are kept single (compared with matched
    accuracy). The teacher's SQuAD 87.6 / 93.5 and SST-2 96.1 differ from the 87.7 / 93.5 (Table 3)
    and 95.3 (Table 1) printed elsewhere; each table is kept as printed.
  * Table 7 (CoFi, CoFi + LoSparse at 10%, distilled): two decimals as printed. MNLI is one "Acc" (CoFi's
    metric is the matched accuracy, `mnli/acc`), compared with our matched accuracy. The BERT-base row is
    the fine-tuned teacher (our finetune cell, ratio 1.0); its 84.41 / 72.56 / 91.54 differ from Table 2's
    84.5 / 70.5 / 91.3 (another fine-tune); each is kept as printed.
"""

from __future__ import annotations

from typing import Any, Optional, Union

PaperValue = Union[None, float, tuple]

MNLI = ("accuracy", "mismatched_accuracy")
ACC = ("accuracy",)
ACC_F1 = ("accuracy", "f1")
CORR = ("pearson", "spearmanr")
MCC = ("matthews_correlation",)
EM_F1 = ("exact_match", "f1")
ROUGE = ("rouge1", "rouge2", "rougeL")

DEBERTA = "deberta-v3-base"
BERT = "bert-base-uncased"
BART = "bart-large"

#: Short model names (basename of model_name_or_path, lower case) that count as the paper's models.
MODEL_ALIASES: dict[str, tuple[str, ...]] = {
    DEBERTA: ("deberta-v3-base",),
    BERT: ("bert-base-uncased", "bert-base"),
    BART: ("bart-large",),
}

#: Display names of our --method values, with the paper's names.
METHOD_LABELS: dict[str, str] = {
    "finetune": "Fine-tune (full model)",
    "losparse": "LoSparse",
    "itp": "ITP",
    "movement": "Movement",
    "lowrank": "Low-rank I",
    "lowrank_prune_all": "Low-rank II",
    "lpaf": "LPAF",
    "structured": "Structured (heads, FFN)",
    "structured_losparse": "Structured → LoSparse",
    "cofi": "CoFi",
    "cofi_losparse": "CoFi + LoSparse",
    "lead3": "Lead-3",
}


def _col(key: str, model: str, task: str, header: str, metrics: tuple) -> dict[str, Any]:
    return {"key": key, "model": model, "task": task, "header": header, "metrics": metrics}


# --------------------------------------------------------------------------------------------------
# Table 1 (§4.1): pruned DeBERTaV3-base on the GLUE development sets.
# --------------------------------------------------------------------------------------------------
TABLE_1: dict[str, Any] = {
    "id": "1",
    "title": "Pruned DeBERTaV3-base on the GLUE development sets",
    "source": "Table 1, §4.1: \"Results of pruned DeBERTaV3-base models on GLUE development set.\"",
    "decimals": 1,
    "columns": [
        _col("mnli", DEBERTA, "mnli", "MNLI m / mm", MNLI),
        _col("rte", DEBERTA, "rte", "RTE Acc", ACC),
        _col("qnli", DEBERTA, "qnli", "QNLI Acc", ACC),
        _col("mrpc", DEBERTA, "mrpc", "MRPC Acc / F1", ACC_F1),
        _col("qqp", DEBERTA, "qqp", "QQP Acc / F1", ACC_F1),
        _col("sst2", DEBERTA, "sst2", "SST-2 Acc", ACC),
        _col("cola", DEBERTA, "cola", "CoLA Mcc", MCC),
        _col("stsb", DEBERTA, "stsb", "STS-B P / S Corr", CORR),
    ],
    "results": {
        ("finetune", 1.0): {"mnli": (90.5, 90.6), "rte": 82.0, "qnli": 94.0, "mrpc": (89.5, 93.3),
                            "qqp": (92.4, 89.8), "sst2": 95.3, "cola": 69.2, "stsb": (91.6, 91.1)},
        ("movement", 0.2): {"mnli": None, "rte": 61.2, "qnli": 86.0, "mrpc": (79.2, 85.0),
                            "qqp": None, "sst2": 89.4, "cola": None, "stsb": (84.3, 84.3)},
        ("itp", 0.2): {"mnli": (82.8, 82.5), "rte": None, "qnli": 87.8, "mrpc": (82.0, 87.0),
                       "qqp": (90.0, 86.4), "sst2": 90.8, "cola": 49.0, "stsb": (87.4, 87.0)},
        ("losparse", 0.2): {"mnli": (84.5, 83.8), "rte": 68.0, "qnli": 88.6, "mrpc": (85.0, 89.4),
                            "qqp": (90.6, 87.2), "sst2": 91.7, "cola": 50.0, "stsb": (88.8, 88.5)},
        ("movement", 0.15): {"mnli": None, "rte": 59.0, "qnli": None, "mrpc": (78.5, 84.3),
                             "qqp": None, "sst2": 89.0, "cola": None, "stsb": (83.9, 83.9)},
        ("itp", 0.15): {"mnli": (81.7, 81.3), "rte": None, "qnli": 85.4, "mrpc": (80.5, 86.3),
                        "qqp": (89.1, 85.2), "sst2": 89.3, "cola": 45.8, "stsb": (86.8, 86.3)},
        ("losparse", 0.15): {"mnli": (83.3, 82.9), "rte": 66.9, "qnli": 87.6, "mrpc": (83.6, 88.0),
                             "qqp": (90.3, 87.0), "sst2": 90.4, "cola": 46.8, "stsb": (87.7, 87.3)},
        ("movement", 0.1): {"mnli": None, "rte": None, "qnli": None, "mrpc": (77.0, 83.4),
                            "qqp": None, "sst2": 88.0, "cola": None, "stsb": None},
        ("itp", 0.1): {"mnli": (79.7, 79.6), "rte": None, "qnli": 82.3, "mrpc": (78.5, 84.3),
                       "qqp": (88.3, 84.4), "sst2": 88.3, "cola": 38.0, "stsb": (86.3, 86.0)},
        ("losparse", 0.1): {"mnli": (81.7, 81.8), "rte": 66.0, "qnli": 86.1, "mrpc": (82.3, 87.4),
                            "qqp": (89.5, 86.0), "sst2": 89.2, "cola": 40.0, "stsb": (87.2, 87.0)},
    },
    "row_labels": {("finetune", 1.0): "DeBERTaV3-base"},
}

# --------------------------------------------------------------------------------------------------
# Table 2 (§4.1): pruned BERT-base on MNLI, RTE and QNLI (GLUE development sets).
# --------------------------------------------------------------------------------------------------
TABLE_2: dict[str, Any] = {
    "id": "2",
    "title": "Pruned BERT-base on MNLI, RTE and QNLI (GLUE development sets)",
    "source": "Table 2, §4.1: \"Results of pruned BERT-base models on some of GLUE development sets.\"",
    "decimals": 1,
    "columns": [
        _col("mnli", BERT, "mnli", "MNLI m / mm", MNLI),
        _col("rte", BERT, "rte", "RTE Acc", ACC),
        _col("qnli", BERT, "qnli", "QNLI Acc", ACC),
    ],
    "results": {
        ("finetune", 1.0): {"mnli": (84.5, 84.6), "rte": 70.5, "qnli": 91.3},
        ("movement", 0.2): {"mnli": (77.0, 76.9), "rte": None, "qnli": 84.7},
        ("itp", 0.2): {"mnli": (80.1, 79.8), "rte": 64.4, "qnli": 86.5},
        ("losparse", 0.2): {"mnli": (80.4, 80.3), "rte": 65.2, "qnli": 86.9},
        ("movement", 0.15): {"mnli": (76.1, 76.5), "rte": None, "qnli": 83.9},
        ("itp", 0.15): {"mnli": (79.1, 79.0), "rte": 63.2, "qnli": 85.0},
        ("losparse", 0.15): {"mnli": (79.4, 79.2), "rte": 64.3, "qnli": 85.9},
        ("movement", 0.1): {"mnli": (73.6, 74.1), "rte": None, "qnli": 82.2},
        ("itp", 0.1): {"mnli": (77.7, 78.3), "rte": 61.8, "qnli": 83.9},
        ("losparse", 0.1): {"mnli": (78.3, 77.8), "rte": 63.0, "qnli": 84.8},
    },
    "row_labels": {("finetune", 1.0): "BERT-base"},
}

# --------------------------------------------------------------------------------------------------
# Table 3 (§4.2): SQuAD v1.1, EM / F1, DeBERTaV3-base and BERT-base, ratios 5%–50%.
# --------------------------------------------------------------------------------------------------
TABLE_3: dict[str, Any] = {
    "id": "3",
    "title": "DeBERTaV3-base and BERT-base on SQuAD v1.1 (EM / F1)",
    "source": "Table 3, §4.2: \"Results with DeBERTaV3-base and BERT-base on SQuAD v1.1.\"",
    "decimals": 1,
    "columns": [
        _col(DEBERTA, DEBERTA, "squad", "DeBERTaV3-base EM / F1", EM_F1),
        _col(BERT, BERT, "squad", "BERT-base EM / F1", EM_F1),
    ],
    "results": {
        ("finetune", 1.0): {DEBERTA: (87.7, 93.5), BERT: (80.9, 88.2)},
        ("movement", 0.05): {BERT: None},
        ("itp", 0.05): {DEBERTA: (65.2, 76.1), BERT: (54.0, 67.3)},
        ("losparse", 0.05): {DEBERTA: (69.3, 79.1), BERT: (57.6, 70.6)},
        ("movement", 0.1): {BERT: (51.4, 64.6)},
        ("itp", 0.1): {DEBERTA: (70.9, 80.3), BERT: (62.5, 74.2)},
        ("losparse", 0.1): {DEBERTA: (72.9, 82.8), BERT: (65.2, 76.8)},
        ("movement", 0.2): {BERT: (63.3, 74.5)},
        ("itp", 0.2): {DEBERTA: (75.0, 83.9), BERT: (66.8, 78.0)},
        ("losparse", 0.2): {DEBERTA: (76.8, 85.8), BERT: (69.7, 80.4)},
        ("movement", 0.3): {BERT: (68.8, 79.0)},
        ("itp", 0.3): {DEBERTA: (78.2, 86.2), BERT: (72.3, 82.4)},
        ("losparse", 0.3): {DEBERTA: (80.2, 88.0), BERT: (73.0, 82.9)},
        ("movement", 0.4): {BERT: (73.0, 82.4)},
        ("itp", 0.4): {DEBERTA: (80.5, 87.5), BERT: (74.5, 84.2)},
        ("losparse", 0.4): {DEBERTA: (82.1, 89.4), BERT: (74.6, 84.2)},
        ("movement", 0.5): {BERT: (76.2, 84.1)},
        ("itp", 0.5): {DEBERTA: (81.5, 89.6), BERT: (76.0, 85.1)},
        ("losparse", 0.5): {DEBERTA: (82.3, 90.3), BERT: (75.8, 85.1)},
    },
    "row_labels": {("finetune", 1.0): "Full model (DeBERTaV3-base / BERT-base)"},
}

# --------------------------------------------------------------------------------------------------
# Table 4 (§4.3): BART-large on XSum and CNN/DailyMail, ROUGE-1/2/L.
# --------------------------------------------------------------------------------------------------
TABLE_4: dict[str, Any] = {
    "id": "4",
    "title": "BART-large on XSum and CNN/DailyMail (R-1 / R-2 / R-L)",
    "source": "Table 4, §4.3: \"Results with BART-large on XSum. ... We report R-1/2/L.\" (test sets, §4.3)",
    "decimals": 2,
    "columns": [
        _col("xsum", BART, "xsum", "XSum R-1 / R-2 / R-L", ROUGE),
        _col("cnn_dailymail", BART, "cnn_dailymail", "CNN/DailyMail R-1 / R-2 / R-L", ROUGE),
    ],
    "results": {
        ("lead3", None): {"xsum": (16.30, 1.60, 11.95), "cnn_dailymail": (40.42, 17.62, 36.67)},
        ("finetune", 1.0): {"xsum": (45.14, 22.27, 37.25), "cnn_dailymail": (44.16, 21.28, 40.90)},
        ("itp", 0.5): {"xsum": (38.42, 16.32, 31.43), "cnn_dailymail": (40.76, 18.30, 37.65)},
        ("losparse", 0.5): {"xsum": (39.18, 16.91, 31.62), "cnn_dailymail": (41.54, 19.04, 38.58)},
        ("itp", 0.4): {"xsum": (36.71, 14.96, 29.86), "cnn_dailymail": (40.52, 18.10, 37.31)},
        ("losparse", 0.4): {"xsum": (38.30, 16.02, 30.72), "cnn_dailymail": (41.42, 19.00, 38.47)},
        ("itp", 0.3): {"xsum": (34.42, 13.15, 27.99), "cnn_dailymail": (40.35, 17.98, 37.15)},
        ("losparse", 0.3): {"xsum": (37.41, 15.42, 30.02), "cnn_dailymail": (41.21, 18.84, 38.21)},
    },
    "row_labels": {("lead3", None): "Lead-3", ("finetune", 1.0): "BART-large"},
}

# --------------------------------------------------------------------------------------------------
# Table 5 (§4.5): layer-wise distillation from fine-tuned DeBERTaV3-base into a 20% DeBERTaV3-base.
# --------------------------------------------------------------------------------------------------
TABLE_5: dict[str, Any] = {
    "id": "5",
    "title": "Distilling fine-tuned DeBERTaV3-base into DeBERTaV3-base compressed to 20%",
    "source": "Table 5, §4.5: \"Results of distilling the fined-tuned DeBERTaV3-base to the compressed "
              "DeBERTaV3-base on MNLI, SQuAD, SST-2, and RTE.\"",
    "decimals": 1,
    "distillation": True,
    "columns": [
        _col("mnli", DEBERTA, "mnli", "MNLI (m / mm)", MNLI),
        _col("squad", DEBERTA, "squad", "SQuAD EM / F1", EM_F1),
        _col("sst2", DEBERTA, "sst2", "SST-2 Acc", ACC),
        _col("rte", DEBERTA, "rte", "RTE Acc", ACC),
    ],
    "results": {
        ("finetune", 1.0): {"mnli": 90.5, "squad": (87.6, 93.5), "sst2": 96.1, "rte": 82.0},
        ("itp", 0.2): {"mnli": 85.9, "squad": (77.9, 87.2), "sst2": 92.0, "rte": 58.1},
        ("losparse", 0.2): {"mnli": (84.6, 84.7), "squad": (81.0, 89.8), "sst2": 93.2, "rte": 71.1},
    },
    "row_labels": {("finetune", 1.0): "DeBERTa-base (teacher)"},
}

# --------------------------------------------------------------------------------------------------
# Table 7 (§4.6, Appendix F): CoFi and CoFi + LoSparse on BERT-base at 10%, distilled from the BERT-base row.
# --------------------------------------------------------------------------------------------------
TABLE_7: dict[str, Any] = {
    "id": "7",
    "title": "CoFi and CoFi + LoSparse, BERT-base compressed to 10% (distilled from the fine-tuned BERT-base)",
    "source": "Table 7, §4.6: \"Embed LoSparse into CoFi. The compression ratio is 10%. BERT-base indicates the "
              "fine-tuning results and is also the teacher model for knowledge distillation.\"",
    "decimals": 2,
    "distillation": True,
    "methods": ("cofi", "cofi_losparse"),
    "columns": [
        _col("mnli", BERT, "mnli", "MNLI Acc", ACC),
        _col("mrpc", BERT, "mrpc", "MRPC Acc / F1", ACC_F1),
        _col("rte", BERT, "rte", "RTE Acc", ACC),
        _col("qnli", BERT, "qnli", "QNLI Acc", ACC),
        _col("sst2", BERT, "sst2", "SST-2 Acc", ACC),
    ],
    "results": {
        ("finetune", 1.0): {"mnli": 84.41, "mrpc": (87.74, 91.35), "rte": 72.56, "qnli": 91.54, "sst2": 92.43},
        ("cofi", 0.1): {"mnli": 80.00, "mrpc": (84.07, 88.50), "rte": 67.51, "qnli": 86.67, "sst2": 90.60},
        ("cofi_losparse", 0.1): {"mnli": 82.56, "mrpc": (85.54, 89.45), "rte": 68.23, "qnli": 89.66,
                                 "sst2": 91.51},
    },
    "row_labels": {("finetune", 1.0): "BERT-base (teacher)"},
}

TABLES: dict[str, dict[str, Any]] = {"1": TABLE_1, "2": TABLE_2, "3": TABLE_3, "4": TABLE_4, "5": TABLE_5,
                                     "7": TABLE_7}


def as_tuple(value: PaperValue) -> Optional[tuple]:
    """A printed cell as a tuple of numbers (a single number becomes a 1-tuple); None stays None."""
    if value is None:
        return None
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def canonical_model(name: Optional[str]) -> Optional[str]:
    """The paper model a short model name stands for (see MODEL_ALIASES), else the name itself."""
    if name is None:
        return None
    low = name.lower()
    for model, aliases in MODEL_ALIASES.items():
        if low in aliases:
            return model
    return low


def paper_value(table_id: str, method: str, ratio: Optional[float], key: str) -> PaperValue:
    """The printed cell of `table_id` for (method, ratio) and column `key`.

    Raises KeyError when the paper does not report that cell (different from N.A., which is None).
    """
    results = TABLES[str(table_id)]["results"]
    for (m, r), row in results.items():
        if m == method and _same_ratio(r, ratio):
            return row[key]
    raise KeyError((table_id, method, ratio, key))


def paper_points(model: Optional[str], task: Optional[str], metric: str, method: str,
                 distillation: bool = False) -> list[tuple[Optional[float], Optional[float]]]:
    """All (ratio, value) the paper prints for one model / task / metric / method (N.A. as None).

    Looks through Tables 1–4 (or Tables 5 and 7 with distillation=True); a single number in a pair column
    counts for the first metric only.
    """
    model = canonical_model(model)
    points = []
    for table in TABLES.values():
        if bool(table.get("distillation")) != distillation:
            continue
        for column in table["columns"]:
            if column["task"] != task or metric not in column["metrics"]:
                continue
            if method != "lead3" and column["model"] != model:
                continue
            index = column["metrics"].index(metric)
            for (m, ratio), row in table["results"].items():
                if m != method or column["key"] not in row:
                    continue
                cell = as_tuple(row[column["key"]])
                if cell is None:
                    points.append((ratio, None))
                elif index < len(cell):
                    points.append((ratio, float(cell[index])))
    return points


def _same_ratio(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) < 1e-6
