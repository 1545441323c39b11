"""The recovery curves tool (benchmarks/clm_recovery.py) end to end on a tiny random Llama and a toy grammar."""

import json
import math
import os

import pytest
from test_clm_oneshot_table import _tiny_llama_dir, write_corpus

import losparse
from benchmarks import clm_recovery
from benchmarks.clm_oneshot_table import heldout_loss
from losparse.core.errors import LoSparseUsageError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("recovery-text"), seed=5)


def _argv(model_dir, corpus, output_dir, *extra):
    return ["--model_name_or_path", model_dir, "--text_file", corpus, "--output_dir", str(output_dir),
            "--ratios", "0.5", "--steps", "0", "2", "4", "--train_batch_size", "2", "--learning_rate", "3e-3",
            "--num_calibration_samples", "8", "--num_heldout_samples", "4", "--seq_len", "32", "--batch_size", "4",
            *extra]


@pytest.fixture(scope="module")
def recovery(tmp_path_factory, corpus):
    model_dir = _tiny_llama_dir(str(tmp_path_factory.mktemp("recovery-llama")))
    output_dir = tmp_path_factory.mktemp("recovery-out")
    return model_dir, output_dir, clm_recovery.main(_argv(model_dir, corpus, output_dir))


def test_every_row_has_its_curve_and_training_recovers(recovery):
    _, output_dir, result = recovery
    cells = {cell["row"]: cell for cell in result["cells"]}
    assert set(cells) == {"losparse", "calibrated", "structured", "dense"}
    for row in ("losparse", "structured", "dense"):
        assert [p["steps"] for p in cells[row]["points"]] == [0, 2, 4]
        assert cells[row]["points"][-1]["perplexity"] < cells[row]["points"][0]["perplexity"]
    assert [p["steps"] for p in cells["calibrated"]["points"]] == [2, 4]  # one run per step count, no step 0
    assert [p["tokens"] for p in cells["dense"]["points"]] == [0, 2 * 2 * 32, 4 * 2 * 32]
    for row in ("losparse", "calibrated", "structured"):
        assert cells[row]["achieved_ratio"] == pytest.approx(0.5, abs=0.1)
    assert {"clm_recovery.md", "clm_recovery.json", "clm_recovery.png"} <= set(os.listdir(output_dir))
    assert "| losparse | 0.5 |" in (output_dir / "clm_recovery.md").read_text()


def test_the_last_point_is_the_saved_model_evaluated_on_the_heldout_blocks(recovery):
    _, output_dir, result = recovery
    from transformers import AutoTokenizer

    from losparse.cli.tasks import clm

    run_dir = str(output_dir / "runs" / "structured-0.5" / "trained")
    model = losparse.load(run_dir)
    inputs = output_dir / "inputs"
    data_args = clm.CLMDataArguments(train_file=str(inputs / "train.jsonl"),
                                     validation_file=str(inputs / "heldout.jsonl"), max_eval_samples=4)
    blocks = clm.make_blocks(clm.load_raw_datasets(data_args), AutoTokenizer.from_pretrained(run_dir), 32,
                             data_args)["validation"]
    import torch

    loss = heldout_loss(model, torch.tensor(blocks["input_ids"]), 4)
    cell = next(c for c in result["cells"] if c["row"] == "structured")
    assert math.exp(loss) == pytest.approx(cell["points"][-1]["perplexity"], rel=1e-4)


def test_the_losparse_curve_starts_at_the_oneshot_model(recovery):
    _, output_dir, result = recovery
    oneshot = json.loads((output_dir / "runs" / "losparse-0.5" / "oneshot" / "all_results.json").read_text())
    cell = next(c for c in result["cells"] if c["row"] == "losparse")
    assert cell["points"][0]["eval_loss"] == pytest.approx(oneshot["eval_loss"], rel=1e-5)


def test_a_rerun_reuses_the_finished_cells(recovery, corpus, monkeypatch):
    model_dir, output_dir, result = recovery
    monkeypatch.setattr(clm_recovery, "_run", lambda argv: pytest.fail("a kept cell was run again"))
    again = clm_recovery.main(_argv(model_dir, corpus, output_dir))
    assert [c["points"] for c in again["cells"]] == [c["points"] for c in result["cells"]]


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0", "3", "4"], "--steps 0 3 4: every positive step must be a multiple of the smallest (3), the "
                                 "evaluation interval"),
    (["--steps", "0"], "--steps 0: steps must be >= 0 and one of them > 0"),
    (["--ratios", "1.5"], "--ratios 1.5 is out of range; every ratio must be in (0, 1)"),
    (["--learning_rate", "0"], "--learning_rate 0 must be a positive number"),
])
def test_bad_flags_are_one_line(tmp_path, corpus, extra, message):
    with pytest.raises(LoSparseUsageError) as error:
        clm_recovery.main(_argv(str(tmp_path), corpus, tmp_path / "out", *extra))
    assert str(error.value) == message
