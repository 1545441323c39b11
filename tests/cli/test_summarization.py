"""Summarization pipeline: Lead-3 and ROUGE glue, end to end on a tiny local BART, bad input."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT as REPO_ROOT
from conftest import load_script

import losparse
from losparse.cli.metrics import rouge_scores
from losparse.cli.run import parse_arguments, run_main
from losparse.cli.tasks import summarization
from losparse.core.errors import LoSparseUsageError

run_summarization = load_script("run_summarization.py")

ROOT = REPO_ROOT
NAMES = "Anna Ben Carla Dev Emil Fay Gus Hana".split()
PLACES = "the market,the harbour,the library,the museum,the farm,the school".split(",")
ITEMS = "bread,apples,a map,a book,fresh fish,a red kite".split(",")
WEATHER = "sunny,cold,windy,rainy".split(",")


def _pairs(n: int = 24) -> list[dict]:
    """Made-up articles whose first sentence carries most of the summary."""
    rows = []
    for i in range(n):
        name, place, item = NAMES[i % 8], PLACES[i % 6], ITEMS[(i * 5) % 6]
        text = (f"{name} visited {place} on day {i % 7}. The weather was {WEATHER[i % 4]}. "
                f"{name} bought {item} there. Later {name} walked home.")
        rows.append({"text": text, "summary": f"{name} bought {item} at {place}."})
    return rows


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("summaries")
    rows = _pairs()
    return _write_jsonl(directory / "train.jsonl", rows[:16]), _write_jsonl(directory / "validation.jsonl", rows[16:])


@pytest.fixture(scope="module")
def tiny_bart_dir(tmp_path_factory) -> str:
    """A local BART directory (config, weights, byte-level BPE tokenizer trained on the toy corpus)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    directory = str(tmp_path_factory.mktemp("tiny-bart"))
    bpe = ByteLevelBPETokenizer()
    corpus = [value for row in _pairs() for value in row.values()]
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(directory)
    with open(os.path.join(directory, "vocab.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(directory, "merges.txt")) as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    tokenizer = BartTokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(directory)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


def _argv(model_dir, files, output_dir, *extra) -> list[str]:
    train, validation = files
    return ["--model_name_or_path", model_dir, "--train_file", train, "--validation_file", validation,
            "--output_dir", str(output_dir), "--max_source_length", "32", "--max_target_length", "12",
            "--num_beams", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
            "--use_cpu", "true", *extra]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the run loads a tokenizer or model weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("no model should be loaded here")

    monkeypatch.setattr(run_summarization.AutoModelForSeq2SeqLM, "from_pretrained", refuse)
    monkeypatch.setattr(run_summarization.AutoTokenizer, "from_pretrained", refuse)


def test_lead3_scores_by_hand():
    from datasets import Dataset

    dataset = Dataset.from_dict({
        "article": ["The cat sat. It purred. Dogs barked. Birds sang.", "Rain fell today."],
        "highlights": ["The cat sat. It purred. Dogs barked.", "Sun shone today."],
    })
    # Pair 1: Lead-3 drops "Birds sang." and equals the reference (100). Pair 2: "rain fell today" vs
    # "sun shone today": one shared unigram of three (F = 1/3), no shared bigram, LCS 1 (F = 1/3).
    scores = summarization.lead3_scores(dataset, "article", "highlights")
    third = 100 / 3
    assert scores == pytest.approx({"rouge1": (100 + third) / 2, "rouge2": 50.0, "rougeL": (100 + third) / 2,
                                    "rougeLsum": (100 + third) / 2})


def test_compute_metrics_decodes_generated_ids_and_ignores_minus_100(tiny_bart_dir):
    from transformers import AutoTokenizer, EvalPrediction

    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    generated_texts = ["Anna bought bread", "Ben walked home at the farm"]
    references = ["Anna bought bread", "Ben bought apples"]

    def padded(texts, width):
        rows = tokenizer(texts)["input_ids"]
        out = np.full((len(rows), width), -100, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out, [len(row) for row in rows]

    generated, lengths = padded(generated_texts, 40)
    generated[0, lengths[0]:lengths[0] + 2] = tokenizer.pad_token_id
    labels, _ = padded(references, 30)
    metrics = summarization.make_compute_metrics(tokenizer)(EvalPrediction(predictions=generated, label_ids=labels))
    assert metrics == pytest.approx({**rouge_scores(generated_texts, references), "gen_len": float(np.mean(lengths))})
    assert metrics["rouge1"] < 100.0 < metrics["rouge1"] * 2


def test_end_to_end_compresses_encoder_decoder_and_reloads(tiny_bart_dir, data_files, tmp_path):
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    output_dir = tmp_path / "out"
    results = run_summarization.main(_argv(tiny_bart_dir, data_files, output_dir, "--remaining_ratio", "0.5",
                                           "--low_rank_ratio", "0.3", "--num_train_epochs", "2"))
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_gen_len"):
        assert on_disk[key] == pytest.approx(results[key])
    assert on_disk["compression"]["remaining_ratio"] == pytest.approx(0.5, abs=0.02)

    layers = list(json.loads((output_dir / "losparse_config.json").read_text())["layers"])
    assert any(".encoder.layers.0.self_attn." in n for n in layers)
    assert any(".decoder.layers.0.self_attn." in n for n in layers)
    assert any(".decoder.layers.0.encoder_attn." in n for n in layers)
    assert any(n.endswith("encoder.layers.0.fc1") for n in layers)
    assert len(layers) == 6 + 10
    assert not any("lm_head" in n or "shared" in n or "embed" in n for n in layers)

    model = losparse.load(str(output_dir))
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    data_args = summarization.SummarizationDataArguments(train_file=data_files[0], validation_file=data_files[1],
                                                         max_source_length=32, max_target_length=12)
    raw = summarization.load_raw_datasets(data_args)
    validation = summarization.preprocess(raw, tokenizer, data_args)["validation"]
    collate = DataCollatorForSeq2Seq(tokenizer, model=model)
    regenerated, losses = [], []
    for start in range(0, len(validation), 4):  # the run's eval batches: two full batches of 4
        batch = collate([validation[i] for i in range(start, start + 4)])
        with torch.no_grad():
            losses.append(model(**batch).loss.item())
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       num_beams=2, max_length=12)
        regenerated += [" ".join(text.splitlines()) for text in summarization.decode_ids(tokenizer, generated)]
    # A model this small and this briefly trained writes much the same summary for every article, so the
    # matching loss is what shows the weights (tied lm_head included) survived the round trip exactly.
    assert np.mean(losses) == pytest.approx(on_disk["eval_loss"], rel=1e-5)
    written = (output_dir / "generated_predictions.txt").read_text(encoding="utf-8").split("\n")
    assert written[-1] == "" and len(written) == len(validation) + 1
    assert regenerated == written[:-1]


def test_lead3_needs_no_model(data_files, tmp_path, no_model_loading):
    output_dir = tmp_path / "lead3"
    results = run_summarization.main(["--validation_file", data_files[1], "--lead3", "--output_dir", str(output_dir)])
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk == results
    assert on_disk["eval_samples"] == 8
    # Every toy article opens with the facts of its summary, so Lead-3 overlaps it well.
    assert 40.0 < on_disk["eval_rouge1"] < 100.0
    assert {"eval_rouge2", "eval_rougeL", "eval_rougeLsum"} <= set(on_disk)


def test_missing_column_is_one_line_before_any_model(tiny_bart_dir, data_files, tmp_path, capsys,
                                                     no_model_loading):
    argv = _argv(tiny_bart_dir, data_files, tmp_path / "bad", "--text_column", "nope")
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_summarization.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "--text_column 'nope' is not a column of" in err and "(columns: text, summary)" in err


@pytest.mark.parametrize("kwargs, fragment", [
    ({"dataset_name": "gigaword"}, "--dataset_name 'gigaword' is not known; choose one of: xsum, cnn_dailymail"),
    ({}, "pass --dataset_name (xsum, cnn_dailymail) or --train_file and --validation_file"),
    ({"task_name": "mnli"}, "--task_name 'mnli' is not a summarization dataset"),
    ({"train_file": "no/such.jsonl", "validation_file": "no/such.jsonl"},
     "--train_file 'no/such.jsonl' does not exist"),
    ({"validation_file": "VALID"}, "--train_file is required with local data"),
    ({"train_file": "TXT", "validation_file": "VALID"}, "must end in one of: .csv, .json, .jsonl"),
    ({"dataset_name": "xsum", "validation_file": "VALID"}, "not both"),
    ({"dataset_name": "xsum", "num_beams": 0}, "--num_beams 0 must be >= 1"),
])
def test_bad_data_arguments(kwargs, fragment, data_files, tmp_path):
    txt = tmp_path / "train.txt"
    txt.write_text("x\n")
    paths = {"VALID": data_files[1], "TXT": str(txt)}
    kwargs = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(LoSparseUsageError) as error:
        summarization.SummarizationDataArguments(**kwargs)
    assert fragment in str(error.value)


def test_paper_config_resolves_for_xsum(tmp_path):
    model_args, data_args, losparse_config, _, training_args = parse_arguments(
        (run_summarization.SummarizationModelArguments, summarization.SummarizationDataArguments,
         losparse.LoSparseConfig, losparse.cli.run.RunArguments, run_summarization.SummarizationTrainingArguments),
        ["--config", os.path.join(ROOT, "configs", "summarization", "bart-large-xsum.yaml"), "--task_name", "xsum",
         "--remaining_ratio", "0.3", "--output_dir", str(tmp_path / "x"), "--use_cpu", "true"],
    )
    assert model_args.model_name_or_path == "facebook/bart-large"
    assert (data_args.dataset_name, data_args.text_column, data_args.summary_column) == ("xsum", "document", "summary")
    assert (data_args.num_beams, data_args.max_target_length, data_args.val_max_target_length) == (8, 62, 62)
    assert losparse_config.low_rank_ratio == 0.2 and losparse_config.beta1 == 0.85
    assert training_args.predict_with_generate is True


# Bad data never gets past the front door: one line, exit 2, before any tokenizer or weights load.
GOOD_JSONL = json.dumps({"text": "Anna visited the farm.", "summary": "Anna at the farm."}) + "\n"
BAD_SUMMARIES = [
    ("unreadable", ("train.jsonl", b"\xc3\x28 broken"), [],
     "--train_file '{train}' cannot be read: it is not UTF-8 text (byte 0 is b'\\xc3')"),
    ("empty file", ("train.jsonl", ""), [], "--train_file '{train}' is empty"),
    ("header only", ("train.csv", "text,summary\n"), [], "--train_file '{train}' has a header line (text, summary) but no rows"),
    ("bad JSON line", ("train.jsonl", GOOD_JSONL * 2 + "not json\n"), [],
     "--train_file '{train}' line 3 is not JSON: Expecting value (column 1)"),
    ("missing column", ("train.csv", "article,summary\nA day.,A.\n"), [],
     "--text_column 'text' is not a column of --train_file '{train}' (columns: article, summary)"),
    ("empty article", ("train.csv", "text,summary\nA day.,A.\n,B.\n"), [],
     "--train_file '{train}' line 3: the article column 'text' is empty"),
    ("empty summary", ("train.jsonl", GOOD_JSONL + json.dumps({"text": "B.", "summary": None}) + "\n"), [],
     "--train_file '{train}' line 2: the summary column 'summary' is empty"),
    ("--max_source_length above the positions", ("train.jsonl", GOOD_JSONL), ["--max_source_length", "1024"],
     "--max_source_length 1024 is more than the 64 positions of --model_name_or_path '{model}' "
     "(max_position_embeddings 64); pass --max_source_length 64 or less"),
    ("--val_max_target_length above the positions", ("train.jsonl", GOOD_JSONL), ["--val_max_target_length", "65"],
     "--val_max_target_length 65 is more than the 64 positions of --model_name_or_path '{model}' "
     "(max_position_embeddings 64); pass --val_max_target_length 64 or less"),
    ("--max_train_samples 0", ("train.jsonl", GOOD_JSONL), ["--max_train_samples", "0"],
     "--max_train_samples 0 must be >= 1"),
    ("warm-up + final not below the steps", ("train.jsonl", GOOD_JSONL * 8), ["--pruning_final_steps", "2"],
     "pruning warm-up (0 steps, --pruning_warmup_ratio 0.1 of the run) + final phase (2 steps, "
     "--pruning_final_steps 2) must be fewer than the run's 2 optimizer steps (1 epoch x 2 optimizer steps per "
     "epoch: 8 training examples in batches of 4); lower --pruning_warmup_steps/--pruning_final_steps (or their "
     "_ratio forms) or train longer"),
    ("--num_train_epochs 0", ("train.jsonl", GOOD_JSONL), ["--num_train_epochs", "0"],
     "--num_train_epochs 0 trains for no optimizer step; pass a positive --num_train_epochs or --max_steps"),
]


@pytest.mark.parametrize("case, train, extra, message", BAD_SUMMARIES, ids=[c[0] for c in BAD_SUMMARIES])
def test_bad_data_is_one_line_before_any_model(tiny_bart_dir, data_files, tmp_path, capsys, no_model_loading, case,
                                               train, extra, message):
    path = tmp_path / train[0]
    path.write_bytes(train[1]) if isinstance(train[1], bytes) else path.write_text(train[1])
    argv = _argv(tiny_bart_dir, (str(path), data_files[1]), tmp_path / "out", "--num_train_epochs", "1", *extra)
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_summarization.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err == "error: " + message.format(train=path, model=tiny_bart_dir)


def test_lead3_refuses_an_empty_article_too(tmp_path, capsys, no_model_loading):
    path = tmp_path / "validation.csv"
    path.write_text("text,summary\nA day.,A.\n  ,B.\n")
    with pytest.raises(SystemExit):
        run_main(run_summarization.main, ["--validation_file", str(path), "--lead3", "--output_dir", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip() == f"error: --validation_file '{path}' line 3: the article column 'text' is empty"


def test_final_evaluation_generates_without_changing_a_loss_only_trainer(tiny_bart_dir, data_files, tmp_path):
    """--predict_with_generate false: evaluations during training report the loss only, the final pass still
    generates, and the training trainer is not changed after it was built (the pass gets its own)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir)
    data_args = summarization.SummarizationDataArguments(train_file=data_files[0], validation_file=data_files[1],
                                                         max_source_length=32, max_target_length=12)
    raw = summarization.load_raw_datasets(data_args)
    validation = summarization.preprocess(raw, tokenizer, data_args)["validation"]
    args = run_summarization.SummarizationTrainingArguments(
        output_dir=str(tmp_path), predict_with_generate=False, generation_max_length=12, generation_num_beams=2,
        per_device_eval_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model)
    compute_metrics = summarization.make_compute_metrics(tokenizer)
    trainer = Seq2SeqTrainer(model=model, args=args, data_collator=collator, processing_class=tokenizer,
                             eval_dataset=validation)
    during_training = trainer.evaluate()
    assert "eval_loss" in during_training and "eval_rouge1" not in during_training

    metrics = run_summarization.evaluate_with_generation(trainer, validation, tokenizer, collator, compute_metrics)
    assert {"eval_loss", "eval_rouge1", "eval_rougeL", "eval_gen_len"} <= set(metrics)
    assert trainer.args is args and args.predict_with_generate is False and trainer.compute_metrics is None
    assert trainer.state.log_history[-1]["eval_rouge1"] == metrics["eval_rouge1"]     # logged by the trainer
    written = (tmp_path / run_summarization.PREDICTIONS_FILE).read_text(encoding="utf-8").split("\n")
    assert len(written) == len(validation) + 1
