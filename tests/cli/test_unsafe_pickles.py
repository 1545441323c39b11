"""Pickle files that torch's safe loader refuses end a run with one line and exit 2, and never run (issue #25).

Every crafted pickle here would create a marker file when unpickled the unsafe way; each test checks that
the marker is never written, that the message names the file, and that no traceback reaches the user.
"""

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import compress_randomly, load_script, random_tiny_model
from test_run_glue import no_loading  # noqa: F401  (fixture: fail if the run loads data or a model)
from transformers import AutoModelForSequenceClassification

import losparse
from losparse.cli.run import ModelArguments, load_models, run_main
from losparse.training.distill import load_teacher
from losparse.training.pickles import check_checkpoint_pickles, checkpoint_pickle_files

run_glue = load_script("run_glue.py")
run_squad = load_script("run_squad.py")


class _WritesMarker:
    """Unpickled unsafely, this opens (creates) `marker`: the stand-in for any code a crafted pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_crafted(path, marker, zip_format=False):
    """A crafted pickle at `path`: a raw pickle (protocol 4, as a hand-made file) or one in torch's zip format."""
    payload = {"state": _WritesMarker(marker)}
    if zip_format:
        torch.save(payload, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=4)
    return str(path)


def crafted_model_dir(source, directory, marker, zip_format=False):
    """A copy of model directory `source` whose weights are a crafted pytorch_model.bin (no model.safetensors)."""
    shutil.copytree(source, directory)
    os.remove(os.path.join(directory, "model.safetensors"))
    return os.path.dirname(write_crafted(os.path.join(directory, "pytorch_model.bin"), marker, zip_format))


def _argv(model_dir, files, output_dir, *extra):
    train, validation = files
    return ["--model_name_or_path", str(model_dir), "--train_file", train, "--validation_file", validation,
            "--output_dir", str(output_dir), "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
            "--learning_rate", "2e-3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
            "--use_cpu", "true", "--max_seq_length", "64", *extra]


def refused(main, argv, capsys):
    """Run an entry script as the command line does; its one-line error (without 'error: '), after exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err[len("error: "):]


def assert_names_the_unsafe_pickle(message, path):
    assert f"{path} is a pickle that cannot be loaded safely" in message, message
    assert "convert it to safetensors" in message and "weights_only=False" in message, message


def test_the_crafted_pickle_would_run_code(tmp_path):
    """The fixture is live: an unsafe `pickle.load` does create the marker (so its absence below means something)."""
    marker = tmp_path / "marker"
    with open(write_crafted(tmp_path / "crafted.bin", marker), "rb") as f:
        pickle.load(f)  # noqa: S301  (deliberately unsafe, on our own harmless file)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# Model weights: --model_name_or_path, --teacher_model_name_or_path
# --------------------------------------------------------------------------------------------

def test_a_crafted_model_pickle_is_one_line(tiny_bert_dir, sentiment_files, tmp_path, capsys):
    marker = tmp_path / "marker"
    model_dir = crafted_model_dir(tiny_bert_dir, str(tmp_path / "model"), marker)
    message = refused(run_glue.main, _argv(model_dir, sentiment_files, tmp_path / "out"), capsys)
    assert message.startswith(f"--model_name_or_path {model_dir!r}: ")
    assert_names_the_unsafe_pickle(message, os.path.join(model_dir, "pytorch_model.bin"))
    assert "Unsupported operand 149" in message
    assert not marker.exists()
    assert not (tmp_path / "out" / "all_results.json").exists()


def test_a_crafted_teacher_pickle_is_one_line(tiny_bert_dir, sentiment_files, tmp_path, capsys):
    marker = tmp_path / "marker"
    teacher_dir = crafted_model_dir(tiny_bert_dir, str(tmp_path / "teacher"), marker, zip_format=True)
    message = refused(run_glue.main, _argv(tiny_bert_dir, sentiment_files, tmp_path / "out",
                                           "--teacher_model_name_or_path", teacher_dir, "--alpha_output", "1.0"),
                      capsys)
    assert message.startswith(f"--teacher_model_name_or_path {teacher_dir!r}: ")
    assert_names_the_unsafe_pickle(message, os.path.join(teacher_dir, "pytorch_model.bin"))
    assert "io.open" in message  # torch's reason, shortened: "Unsupported global: GLOBAL io.open"
    assert not marker.exists()


def test_a_crafted_model_pickle_through_run_squad(tiny_bert_dir, tmp_path, capsys):
    marker = tmp_path / "marker"
    model_dir = crafted_model_dir(tiny_bert_dir, str(tmp_path / "model"), marker)
    context = "the movie was good and the plot was fun"
    rows = [{"id": f"q{i}", "title": "t", "context": context, "question": "was the movie good",
             "answers": {"text": ["good"], "answer_start": [context.index("good")]}} for i in range(4)]
    data = tmp_path / "squad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    message = refused(run_squad.main, [
        "--model_name_or_path", model_dir, "--train_file", str(data), "--validation_file", str(data),
        "--output_dir", str(tmp_path / "out"), "--max_seq_length", "32", "--doc_stride", "8", "--max_steps", "2",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true"], capsys)
    assert_names_the_unsafe_pickle(message, os.path.join(model_dir, "pytorch_model.bin"))
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_safe_legacy_pytorch_model_bin_still_loads(tiny_bert_dir, tmp_path, zip_format):
    """A plain state dict in pytorch_model.bin (no safetensors) loads as student and as teacher, unchanged."""
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    model_dir = tmp_path / "legacy"
    shutil.copytree(tiny_bert_dir, model_dir)
    os.remove(model_dir / "model.safetensors")
    torch.save(reference.state_dict(), str(model_dir / "pytorch_model.bin"),
               _use_new_zipfile_serialization=zip_format)
    model, _ = load_models(AutoModelForSequenceClassification, ModelArguments(model_name_or_path=str(model_dir)))
    teacher = load_teacher(str(model_dir), AutoModelForSequenceClassification)
    for loaded in (model, teacher):
        for name, tensor in reference.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name


# --------------------------------------------------------------------------------------------
# --resume_from_checkpoint: the checkpoint's pickles are tried in the preflight, before the model is built
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tiny_bert_dir, sentiment_files, tmp_path_factory):
    """A real LoSparse training checkpoint (checkpoint-4 of a 4-step run), made once for the module."""
    output_dir = tmp_path_factory.mktemp("resume") / "out"
    run_glue.main(_argv(tiny_bert_dir, sentiment_files, output_dir, "--remaining_ratio", "0.3", "--low_rank_ratio",
                        "0.1", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "4"))
    return str(output_dir / "checkpoint-4")


def test_a_real_checkpoint_passes_the_check(checkpoint):
    names = [os.path.basename(path) for path in checkpoint_pickle_files(checkpoint)]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(names)
    assert "training_args.bin" not in names  # pickled TrainingArguments: written, never read back on resume
    check_checkpoint_pickles(checkpoint)  # the RNG state's numpy arrays pass, as in the Trainer


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"])
def test_a_crafted_checkpoint_pickle_is_one_line_before_loading(checkpoint, tiny_bert_dir, sentiment_files, tmp_path,
                                                                capsys, no_loading, name):
    marker = tmp_path / "marker"
    copy = str(tmp_path / "checkpoint-4")
    shutil.copytree(checkpoint, copy)
    write_crafted(os.path.join(copy, name), marker, zip_format=name == "scheduler.pt")
    message = refused(run_glue.main, _argv(tiny_bert_dir, sentiment_files, tmp_path / "out", "--remaining_ratio",
                                           "0.3", "--low_rank_ratio", "0.1", "--max_steps", "4",
                                           "--resume_from_checkpoint", copy), capsys)
    assert message.startswith(f"--resume_from_checkpoint {copy!r}: ")
    assert_names_the_unsafe_pickle(message, os.path.join(copy, name))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# losparse.load reads only its safetensors file: pickles beside a compact checkpoint are never opened
# --------------------------------------------------------------------------------------------

def test_losparse_load_never_opens_pickles_beside_the_checkpoint(tmp_path):
    model = compress_randomly(random_tiny_model("tiny-bert"), remaining_ratio=0.5, low_rank_ratio=0.1)
    path = losparse.save(model, str(tmp_path / "compact"))
    marker = tmp_path / "marker"
    for name in ("pytorch_model.bin", "optimizer.pt", "rng_state.pth"):
        write_crafted(os.path.join(path, name), marker)
    loaded = losparse.load(path)
    assert not marker.exists()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
