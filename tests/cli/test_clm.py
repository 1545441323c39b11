"""Causal LMs (run_clm.py): packing, end to end on a tiny local Llama and GPT-2, bad input before any weights."""

import glob
import json
import math
import os
import random

import pytest
import torch
from conftest import ROOT as REPO_ROOT
from conftest import load_script

import losparse
from losparse.cli.run import parse_arguments, run_main
from losparse.cli.tasks import clm
from losparse.core.errors import LoSparseUsageError
from losparse.training.trainer import declare_loss_kwargs

run_clm = load_script("run_clm.py")

ROOT = REPO_ROOT
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = ("the a cat dog bird fish sat ran flew swam on in under over mat log tree pond big small red blue "
         "and then it was very happy sad day night . ,").split()
TYPES = (losparse.cli.run.ModelArguments, clm.CLMDataArguments, clm.GenerationArguments, losparse.LoSparseConfig,
         losparse.training.distill.DistillationArguments, losparse.cli.run.RunArguments, run_clm.TrainingArguments)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _save_model(directory, model_type: str) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(vocab_size=len(SPECIAL) + len(WORDS), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids))
    model.save_pretrained(str(directory))
    _tokenizer().save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal, verb, where = rng.choice(["cat", "dog", "bird", "fish"]), rng.choice(["sat", "ran"]), \
            rng.choice(["mat", "log", "tree", "pond"])
        rows.append(f"the {rng.choice(['big', 'small'])} {animal} {verb} on the {where} .")
    return rows


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clm-data")
    train = directory / "train.txt"
    train.write_text("\n".join(_sentences(48, 0)) + "\n")
    validation = directory / "validation.jsonl"
    validation.write_text("".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(_sentences(12, 1))))
    return str(train), str(validation)


def _argv(model_dir, data_files, output_dir, *extra):
    return ["--model_name_or_path", model_dir, "--train_file", data_files[0], "--validation_file", data_files[1],
            "--output_dir", str(output_dir), "--block_size", "16", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--learning_rate", "3e-3", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
            "--generation_prompts", "the cat", "a big dog ran", "--generation_max_new_tokens", "6", *extra]


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no model weights should be loaded here")

    monkeypatch.setattr(run_clm.AutoModelForCausalLM, "from_pretrained", refuse)


def test_pack_token_ids_concatenates_and_drops_the_remainder():
    assert clm.pack_token_ids([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert clm.pack_token_ids([[1, 2]], 4) == []


def test_documents_end_with_eos_and_blocks_are_their_labels(tiny_llama_dir, data_files):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert clm.tokenize_documents(tokenizer, ["the cat sat", "a dog"]) == [[4, 6, 10, 3], [5, 7, 3]]
    data_args = clm.CLMDataArguments(train_file=data_files[0], validation_file=data_files[1], max_eval_samples=2)
    raw = clm.load_raw_datasets(data_args)
    assert len(raw["train"]) == 48 and raw["validation"][0]["text"] == _sentences(12, 1)[0]
    blocks = clm.make_blocks(raw, tokenizer, 16, data_args)
    tokens = sum(len(s.split()) + 1 for s in _sentences(48, 0))
    assert len(blocks["train"]) == tokens // 16 and len(blocks["validation"]) == 2
    row = blocks["train"][0]
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) == 16 and set(row["attention_mask"]) == {1}
    assert row["input_ids"].count(tokenizer.eos_token_id) >= 1


def test_txt_whole_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\n\nline two\n")
    assert clm.read_documents(str(path), "train_file", None, "line") == ["line one", "line two"]
    assert clm.read_documents(str(path), "train_file", None, "file") == ["line one\n\nline two\n"]


def test_perplexity_is_guarded():
    assert clm.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert clm.perplexity(1e6) == float("inf")


def _validation_loss(model, blocks, batch_size=4):
    """The Trainer's eval_loss: per-batch mean token loss, averaged with batch sizes as weights."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        rows = [blocks[i] for i in range(start, min(start + batch_size, len(blocks)))]
        batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            total += model(**batch).loss.item() * len(rows)
        count += len(rows)
    return total / count


def _check_run(model_dir, data_files, output_dir, results, compressed: bool):
    from transformers import AutoTokenizer

    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["perplexity"] == pytest.approx(math.exp(on_disk["eval_loss"]))
    assert on_disk["eval_loss"] == pytest.approx(results["eval_loss"])
    assert on_disk["block_size"] == 16 and on_disk["eval_blocks"] == len(_sentences(12, 1)) * 9 // 16
    model = losparse.load(str(output_dir)) if compressed else run_clm.AutoModelForCausalLM.from_pretrained(
        str(output_dir))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    data_args = clm.CLMDataArguments(train_file=data_files[0], validation_file=data_files[1])
    blocks = clm.make_blocks(clm.load_raw_datasets(data_args), tokenizer, 16, data_args)["validation"]
    reloaded = _validation_loss(model, blocks)
    assert math.exp(reloaded) == pytest.approx(on_disk["perplexity"], rel=1e-4)
    written = json.loads((output_dir / clm.GENERATIONS_FILE).read_text())
    assert [g["prompt"] for g in written["generations"]] == ["the cat", "a big dog ran"]
    assert written["generations"] == clm.generate_greedy(model, tokenizer, ["the cat", "a big dog ran"], 6)
    assert all(g["completion"] for g in written["generations"])
    return on_disk


def test_end_to_end_compresses_llama_and_the_reloaded_model_has_its_perplexity(tiny_llama_dir, data_files,
                                                                              tmp_path):
    output_dir = tmp_path / "out"
    results = run_clm.main(_argv(tiny_llama_dir, data_files, output_dir, "--remaining_ratio", "0.5",
                                 "--low_rank_ratio", "0.2", "--num_train_epochs", "3"))
    on_disk = _check_run(tiny_llama_dir, data_files, output_dir, results, compressed=True)
    assert on_disk["compression"]["remaining_ratio"] == pytest.approx(0.5, abs=0.03)
    layers = list(json.loads((output_dir / "losparse_config.json").read_text())["layers"])
    assert len(layers) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in layers)
    # Three epochs on a tiny grammar beat the random start (perplexity ~ the vocabulary size, 37).
    assert on_disk["perplexity"] < 30


def test_end_to_end_gpt2_conv1d(tiny_gpt2_dir, data_files, tmp_path):
    output_dir = tmp_path / "gpt2"
    results = run_clm.main(_argv(tiny_gpt2_dir, data_files, output_dir, "--remaining_ratio", "0.5",
                                 "--low_rank_ratio", "0.2", "--num_train_epochs", "2"))
    on_disk = _check_run(tiny_gpt2_dir, data_files, output_dir, results, compressed=True)
    assert on_disk["compression"]["num_layers"] > 0


def test_finetune_saves_a_plain_model(tiny_llama_dir, data_files, tmp_path):
    output_dir = tmp_path / "ft"
    results = run_clm.main(_argv(tiny_llama_dir, data_files, output_dir, "--method", "finetune",
                                 "--num_train_epochs", "1"))
    assert not (output_dir / "losparse_config.json").exists()
    on_disk = _check_run(tiny_llama_dir, data_files, output_dir, results, compressed=False)
    assert on_disk["method"] == "finetune" and on_disk["compression"]["remaining_ratio"] == 1.0


def test_distillation_while_pruning_reports_the_plain_lm_loss(tiny_llama_dir, data_files, tmp_path):
    """With a teacher the training loss has distillation terms; eval_loss (and so perplexity) stays the LM loss."""
    output_dir = tmp_path / "kd"
    results = run_clm.main(_argv(tiny_llama_dir, data_files, output_dir, "--remaining_ratio", "0.5",
                                 "--low_rank_ratio", "0.2", "--num_train_epochs", "2",
                                 "--teacher_model_name_or_path", tiny_llama_dir, "--alpha_output", "1.0",
                                 "--alpha_layer", "1.0"))
    on_disk = _check_run(tiny_llama_dir, data_files, output_dir, results, compressed=True)
    assert on_disk["distillation"]["teacher_model_name_or_path"] == tiny_llama_dir


GOOD = json.dumps({"text": "the cat sat on the mat ."}) + "\n"
BAD_INPUT = [
    ("missing file", ("train.txt", None), [], "--train_file '{train}' does not exist"),
    ("wrong extension", ("train.csv", "text\nx\n"), [],
     "--train_file '{train}' must end in one of: .txt, .json, .jsonl"),
    ("empty file", ("train.txt", "\n  \n"), [], "--train_file '{train}' is empty"),
    ("unreadable", ("train.txt", b"\xc3\x28 broken"), [],
     "--train_file '{train}' cannot be read: it is not UTF-8 text (byte 0 is b'\\xc3')"),
    ("bad JSON line", ("train.jsonl", GOOD * 2 + "{oops\n"), [],
     "--train_file '{train}' line 3 is not JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("missing text column", ("train.jsonl", json.dumps({"body": "x", "id": 1}) + "\n"), [],
     "--train_file '{train}' has no 'text' column (columns: body, id); pass --text_column"),
    ("named column missing", ("train.jsonl", GOOD), ["--text_column", "body"],
     "--text_column 'body' is not a column of --train_file '{train}' (columns: text)"),
    ("empty text", ("train.jsonl", GOOD + json.dumps({"text": "  "}) + "\n"), [],
     "--train_file '{train}' line 2: the text column 'text' is empty"),
    ("block_size above the positions", ("train.jsonl", GOOD), ["--block_size", "128"],
     "--block_size 128 is more than the 64 positions of --model_name_or_path '{model}' "
     "(max_position_embeddings 64); pass --block_size 64 or less"),
    ("max_train_samples 0", ("train.jsonl", GOOD), ["--max_train_samples", "0"], "--max_train_samples 0 must be >= 1"),
    ("too little text for a block", ("train.jsonl", GOOD), [],
     "--train_file '{train}' holds 8 tokens (EOS included), not one block of --block_size 16; lower --block_size "
     "or add text"),
    ("schedule infeasible", ("train.jsonl", GOOD * 16), ["--pruning_final_steps", "2"],
     "pruning warm-up (0 steps, --pruning_warmup_ratio 0.1 of the run) + final phase (2 steps, "
     "--pruning_final_steps 2) must be fewer than the run's 2 optimizer steps (1 epoch x 2 optimizer steps per "
     "epoch: 8 training blocks of 16 tokens in batches of 4); lower --pruning_warmup_steps/--pruning_final_steps "
     "(or their _ratio forms) or train longer"),
]


@pytest.mark.parametrize("case, train, extra, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_before_any_weights(tiny_llama_dir, data_files, tmp_path, capsys, no_model_loading,
                                                  case, train, extra, message):
    path = tmp_path / train[0]
    if isinstance(train[1], bytes):
        path.write_bytes(train[1])
    elif train[1] is not None:
        path.write_text(train[1])
    argv = _argv(tiny_llama_dir, (str(path), data_files[1]), tmp_path / "out", "--num_train_epochs", "1", *extra)
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_clm.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err == "error: " + message.format(train=path, model=tiny_llama_dir)


@pytest.mark.parametrize("kwargs, fragment", [
    ({}, "pass --dataset_name (a hub dataset) or --train_file and --validation_file"),
    ({"dataset_name": "wikitext", "train_file": "x.txt"}, "not both"),
    ({"train_file": "TRAIN"}, "--validation_file is required with local data"),
    ({"dataset_name": "wikitext", "block_size": 0}, "--block_size 0 must be >= 1"),
    ({"dataset_name": "wikitext", "validation_split_percentage": 0}, "--validation_split_percentage 0"),
])
def test_bad_data_arguments(kwargs, fragment, data_files):
    kwargs = {k: data_files[0] if v == "TRAIN" else v for k, v in kwargs.items()}
    with pytest.raises(LoSparseUsageError) as error:
        clm.CLMDataArguments(**kwargs)
    assert fragment in str(error.value)


def test_hub_dataset_without_validation_split_holds_out_train(monkeypatch):
    """The hub path (mocked load_dataset): a train-only dataset is split by --validation_split_percentage."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        texts = ["", "the cat sat .", "  ", "a dog ran ."]
        if split is None:
            return datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": texts}))
        return datasets.Dataset.from_dict({"text": texts[:2] if split.startswith("train[:") else texts[2:]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = clm.load_raw_datasets(clm.CLMDataArguments(dataset_name="toy", dataset_config_name="raw",
                                                     validation_split_percentage=10))
    assert calls == [("toy", "raw", None), ("toy", "raw", "train[:10%]"), ("toy", "raw", "train[10%:]")]
    assert raw["validation"]["text"] == ["the cat sat ."] and raw["train"]["text"] == ["a dog ran ."]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "clm", "*.yaml"))))
def test_shipped_clm_configs_parse(path, tmp_path):
    model_args, data_args, generation_args, config, _, _, training = parse_arguments(
        TYPES, ["--config", path, "--output_dir", str(tmp_path / "x"), "--use_cpu", "true"])
    assert model_args.model_name_or_path
    assert data_args.dataset_name or data_args.train_file
    assert data_args.block_size and data_args.block_size <= 2048
    assert 0 < config.low_rank_ratio < config.remaining_ratio <= 1
    assert generation_args.generation_prompts and generation_args.generation_max_new_tokens > 0


def test_a_clm_config_is_shipped():
    assert os.path.isfile(os.path.join(ROOT, "configs", "clm", "smollm2-135m.yaml"))


def test_gpt2_gets_the_causal_loss_type_so_the_trainer_counts_shifted_labels(tiny_gpt2_dir, tiny_llama_dir):
    """transformers names no loss type for GPT2LMHeadModel: the Trainer would divide each block's summed loss
    by all its labels (B) instead of the B - 1 predicted ones."""
    gpt2 = run_clm.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    llama = run_clm.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert gpt2.loss_type is None
    declare_loss_kwargs(gpt2)
    declare_loss_kwargs(llama)
    assert gpt2.loss_type == "ForCausalLM" and llama.loss_type == "ForCausalLM"


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_lpaf_compresses_a_causal_lm_to_pure_low_rank(model, tiny_llama_dir, tiny_gpt2_dir, data_files, tmp_path):
    model_dir = tiny_llama_dir if model == "llama" else tiny_gpt2_dir
    output_dir = tmp_path / f"lpaf-{model}"
    results = run_clm.main(_argv(model_dir, data_files, output_dir, "--method", "lpaf", "--remaining_ratio", "0.5",
                                 "--num_train_epochs", "2"))
    on_disk = _check_run(model_dir, data_files, output_dir, results, compressed=True)
    report = on_disk["compression"]
    assert on_disk["method"] == "lpaf" and report["sparse_share"] == 0.0
    slack = sum(layer["in_features"] + layer["out_features"] for layer in report["layers"])
    assert abs(report["target_params"] - 0.5 * report["target_dense_params"]) <= slack
