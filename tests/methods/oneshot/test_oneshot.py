"""One-shot compression from calibration data (losparse.methods.oneshot), run_clm --oneshot and the comparison table tool.

The tiny random models get anisotropic inputs (each norm layer's channels scaled by exp(N(0, 1))) and a
sharpened LM head, so that activation-aware decomposition has something real to exploit and the
held-out loss against the dense model's own predictions separates the variants.
"""

import copy
import json
import math
import os
import random
import re

import pytest
import torch
from conftest import ROOT as REPO_ROOT
from conftest import load_script

import losparse
from benchmarks import clm_oneshot_rows, clm_oneshot_table
from losparse.cli import oneshot as oneshot_cli
from losparse.cli.run import run_main
from losparse.core.decompose import svd_split
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import LoSparseLinear, dense_weight_of
from losparse.methods.oneshot import algorithm as oneshot

run_clm = load_script("run_clm.py")

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = ("the a cat dog bird fish sat ran flew swam on in under over mat log tree pond big small red blue "
         "and then it was very happy sad day night . ,").split()
VOCAB = len(SPECIAL) + len(WORDS)


def _tiny_model(kind: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                parameter.mul_(torch.exp(torch.randn(parameter.shape, generator=generator)))
        model.lm_head.weight.mul_(5.0)  # GPT-2 ties it to the embeddings: scaled inputs as well
    return model.eval()


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(len(SPECIAL), VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loss_against(model, dense_logits, ids) -> float:
    """Held-out cross-entropy against the dense model's greedy next tokens (a random model has no real labels)."""
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = dense_logits[:, :-1].argmax(-1)
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def _config(**overrides):
    values = dict(remaining_ratio=0.5, low_rank_ratio=0.3)
    values.update(overrides)
    return losparse.LoSparseConfig(**values)


def _layer_inputs(model, name, ids):
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    _logits(model, ids)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in captured]).double()


# ---------------------------------------------------------------------------------------------
# (a) activation-aware beats plain SVD
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, layer", [("llama", "model.layers.0.self_attn.q_proj"),
                                         ("llama", "model.layers.1.mlp.down_proj"),
                                         ("gpt2", "transformer.h.0.mlp.c_fc"),
                                         ("gpt2", "transformer.h.1.attn.c_attn")])
def test_whitened_low_rank_beats_plain_svd_on_the_calibration_reconstruction(kind, layer):
    model = _tiny_model(kind)
    calibration = _ids(8, 32, seed=1)
    stats = oneshot.collect_statistics(model, _config(), calibration, batch_size=3, show_progress=False)
    x = _layer_inputs(model, layer, calibration)
    assert stats[layer].tokens == x.shape[0]
    assert torch.allclose(stats[layer].gram, x.T @ x, rtol=1e-4, atol=1e-3)
    weight = dense_weight_of(model.get_submodule(layer)).detach()
    rank = 4

    def error(u, v):
        return torch.linalg.norm(x @ weight.double().T - x @ (u @ v).double().T).item()

    plain = error(*svd_split(weight, rank, "exact", "cpu"))
    whitened = error(*oneshot.activation_aware_split(weight, stats[layer].second_moment(), rank))
    assert whitened < 0.8 * plain


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_activation_aware_oneshot_has_lower_held_out_loss_than_plain_svd_oneshot(kind):
    dense = _tiny_model(kind)
    calibration, heldout = _ids(16, 32, seed=10), _ids(16, 32, seed=11)
    reference = _logits(dense, heldout)
    losses = {}
    for lowrank in ("activation", "plain"):
        model = oneshot.oneshot_compress(copy.deepcopy(dense), _config(), calibration, lowrank=lowrank,
                                         scores="activation", show_progress=False, solver="select")
        losses[lowrank] = _loss_against(model, reference, heldout)
    dense_loss = _loss_against(dense, reference, heldout)
    # the extra loss over the dense model is at most 60% of plain SVD's (measured: ~25-50%)
    assert losses["activation"] - dense_loss < 0.6 * (losses["plain"] - dense_loss)


def test_rank_deficient_statistics_are_damped_and_zero_statistics_fall_back_to_plain_svd():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 10, generator=generator)
    x = torch.randn(3, 10, generator=generator)  # 3 tokens for 10 channels: rank 3
    x[:, 4] = 0.0  # a dead channel
    u, v = oneshot.activation_aware_split(weight, x.T @ x / 3, 3)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    # rank 3 from 3 tokens: the calibration outputs are (almost) reproduced
    assert torch.linalg.norm(x @ (weight - u @ v).T) < 0.05 * torch.linalg.norm(x @ weight.T)
    plain = svd_split(weight, 3, "exact", "cpu")
    for shape in ((12, 10), (10, 12)):  # the tall-side SVD gives apply's factors, wide or tall
        matrix = torch.randn(*shape, generator=generator)
        ours, reference = oneshot.plain_split(matrix, 4), svd_split(matrix, 4, "exact", "cpu")
        assert torch.allclose(ours[0] @ ours[1], reference[0] @ reference[1], atol=1e-5)
    fallback = oneshot.activation_aware_split(weight, torch.zeros(10, 10), 3)
    assert torch.allclose(fallback[0] @ fallback[1], plain[0] @ plain[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (b) exact before pruning, (c) ratio, (d) compact/save/load
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("lowrank", ["activation", "plain"])
def test_before_pruning_the_oneshot_model_computes_the_dense_model(kind, lowrank):
    dense = _tiny_model(kind)
    ids = _ids(4, 16, seed=3)
    model = oneshot.oneshot_compress(copy.deepcopy(dense), _config(), _ids(6, 16, seed=2), lowrank=lowrank,
                                     prune=False, batch_size=4, show_progress=False)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoSparseLinear)]
    assert len(layers) == (14 if kind == "llama" else 8)
    for name, layer in layers:
        assert layer.sparse_mask.all() and layer.rank > 0
        assert torch.allclose(layer.effective_weight(), dense_weight_of(dense.get_submodule(name)), atol=1e-5)
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-4)
    assert model.losparse_config.method == "losparse"


@pytest.mark.parametrize("method, scope", [("losparse", "global"), ("losparse", "block"), ("itp", "global"),
                                           ("lowrank", "global")])
def test_achieved_remaining_ratio_is_the_target(method, scope):
    model = oneshot.oneshot_compress(_tiny_model("llama"), _config(method=method, remaining_ratio=0.6), _ids(6, 16, 4),
                                     prune_scope=scope, show_progress=False)
    report = losparse.parameter_report(model)
    largest_neuron = max(layer["in_features"] for layer in report["layers"])
    # whole neurons up to the budget: under it by less than one neuron per matrix (the reconstruct solver gives
    # every matrix its own share of the ratio)
    groups = len(report["layers"])
    assert 0.6 - groups * largest_neuron / report["target_dense_params"] <= report["remaining_ratio"] <= 0.6 + 1e-9
    if method == "lowrank":
        assert report["sparse_share"] == 0.0
    if method == "itp":
        assert report["low_rank_share"] == 0.0
    if scope == "block":  # every block keeps the same share of its S
        kept = {}
        for layer in report["layers"]:
            block = layer["name"].split(".")[2]
            kept.setdefault(block, [0, 0])
            kept[block][0] += layer["sparse_params"]
            kept[block][1] += layer["sparse_neurons"] * layer["in_features"]
        shares = [a / b for a, b in kept.values()]
        assert max(shares) - min(shares) < 0.05


def test_global_pruning_keeps_the_best_scored_neurons_across_blocks():
    model = oneshot.oneshot_compress(_tiny_model("llama"), _config(method="itp"), _ids(6, 16, 5), scores="magnitude",
                                     show_progress=False, solver="select")
    dense = _tiny_model("llama")
    kept_scores, pruned_scores = [], []
    for name, layer in model.named_modules():
        if isinstance(layer, LoSparseLinear):
            score = dense_weight_of(dense.get_submodule(name)).abs().sum(1) / layer.in_features ** 0  # row sums
            kept_scores.append(score[layer.sparse_mask])
            pruned_scores.append(score[~layer.sparse_mask])
    assert torch.cat(pruned_scores).max() <= torch.cat(kept_scores).min() + 1e-6
    assert {name.split(".")[2] for name, layer in model.named_modules()
            if isinstance(layer, LoSparseLinear) and not layer.sparse_mask.all()} == {"0", "1"}


def test_a_factor_cache_slices_the_larger_rank_into_the_same_model():
    dense = _tiny_model("llama")
    calibration, ids = _ids(6, 16, 13), _ids(3, 12, 14)
    statistics = oneshot.collect_statistics(dense, _config(), calibration, show_progress=False)
    cache = {}
    oneshot.oneshot_compress(copy.deepcopy(dense), _config(method="lowrank", remaining_ratio=0.8), statistics=statistics,
                             factor_cache=cache, show_progress=False, solver="select")
    cached = oneshot.oneshot_compress(copy.deepcopy(dense), _config(), statistics=statistics, factor_cache=cache,
                                      show_progress=False, solver="select")
    fresh = oneshot.oneshot_compress(copy.deepcopy(dense), _config(), calibration, show_progress=False,
                                     solver="select")
    assert len(cache) == 14 and all(u.shape[1] > 8 for u, _ in cache.values())
    assert torch.allclose(_logits(cached, ids), _logits(fresh, ids), atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compact_save_load_gives_the_same_logits(kind, tmp_path):
    model = oneshot.oneshot_compress(_tiny_model(kind), _config(), _ids(6, 16, 6), show_progress=False)
    ids = _ids(3, 12, seed=7)
    before = _logits(model, ids)
    losparse.compact(model)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)
    losparse.save(model, str(tmp_path / "m"))
    loaded = losparse.load(str(tmp_path / "m")).eval()
    assert torch.allclose(_logits(loaded, ids), before, atol=1e-5)
    assert losparse.parameter_report(loaded)["remaining_ratio"] == pytest.approx(
        losparse.parameter_report(model)["remaining_ratio"])
    merged = losparse.merge(loaded)
    assert torch.allclose(_logits(merged, ids), before, atol=1e-4)


def test_oneshot_model_continues_with_losparse_fine_tuning():
    """An uncompacted one-shot model is an ordinary LoSparse model: the pruner and trainer take it as is."""
    model = oneshot.oneshot_compress(_tiny_model("llama"), _config(), _ids(6, 16, 8), prune=False, show_progress=False)
    pruner = losparse.LoSparsePruner(model, total_steps=10)
    assert pruner.final_kept_fraction == pytest.approx(0.5 - losparse.parameter_report(model)["low_rank_share"])
    loss = model(input_ids=_ids(2, 8, 9), labels=_ids(2, 8, 9)).loss
    loss.backward()
    assert all(layer.sparse.grad is not None for layer in pruner.layers)


# ---------------------------------------------------------------------------------------------
# Arguments and calibration text
# ---------------------------------------------------------------------------------------------

class _Tokenizer:
    eos_token_id = 3

    def __call__(self, texts):
        return {"input_ids": [[4 + len(word) for word in text.split()] for text in texts]}


def test_read_calibration_ids_packs_a_seeded_choice_of_blocks(tmp_path):
    path = tmp_path / "cal.txt"
    path.write_text("\n".join(["a bb ccc"] * 10) + "\n")  # 10 documents x 4 tokens (EOS included)
    ids = oneshot_cli.read_calibration_ids(_Tokenizer(), str(path), 3, 8, seed=1)
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [5, 6, 7, 3, 5, 6, 7, 3]
    assert torch.equal(ids, oneshot_cli.read_calibration_ids(_Tokenizer(), ["a bb ccc"] * 10, 3, 8, seed=1))
    with pytest.raises(LoSparseUsageError) as error:
        oneshot_cli.read_calibration_ids(_Tokenizer(), str(path), 6, 8)
    assert str(error.value) == (f"--calibration_file {str(path)!r} holds 40 tokens (EOS included), fewer than the 48 "
                                "needed for --num_calibration_samples 6 x --calibration_seq_len 8; lower them or add "
                                "text")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_calibration_samples": 0}, "--num_calibration_samples 0 must be >= 1"),
    ({"calibration_seq_len": -1}, "--calibration_seq_len -1 must be >= 1"),
    ({"oneshot_lowrank": "asvd"}, "--oneshot_lowrank 'asvd' is not known; choose one of: activation, plain"),
    ({"oneshot_scores": "grad"}, "--oneshot_scores 'grad' is not known; choose one of: activation, magnitude"),
    ({"oneshot_solver": "exact"}, "--oneshot_solver 'exact' is not known; choose one of: reconstruct, select"),
    ({"oneshot_split": "half"}, "--oneshot_split 'half' is not known; choose one of: auto, fixed"),
    ({"oneshot_iters": -1}, "--oneshot_iters -1 must be >= 0"),
    ({"calibration_file": "missing.txt"}, "--calibration_file 'missing.txt' does not exist"),
])
def test_bad_oneshot_arguments(kwargs, message):
    with pytest.raises(LoSparseUsageError) as error:
        oneshot_cli.OneShotArguments(oneshot=True, **kwargs)
    assert str(error.value) == message


def test_methods_without_a_oneshot_form_are_refused():
    with pytest.raises(LoSparseUsageError, match="--oneshot has no form for --method movement"):
        oneshot.oneshot_compress(_tiny_model("llama"), _config(method="movement"), _ids(2, 8, 0))


# ---------------------------------------------------------------------------------------------
# (e, f) run_clm --oneshot
# ---------------------------------------------------------------------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"the {rng.choice(['big', 'small'])} {rng.choice(['cat', 'dog', 'bird', 'fish'])} "
            f"{rng.choice(['sat', 'ran'])} on the {rng.choice(['mat', 'log', 'tree', 'pond'])} ." for _ in range(n)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("oneshot-llama")
    _tiny_model("llama").save_pretrained(str(directory))
    _tokenizer().save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("oneshot-data")
    train, validation = directory / "train.txt", directory / "validation.txt"
    train.write_text("\n".join(_sentences(60, 0)) + "\n")  # 540 tokens
    validation.write_text("\n".join(_sentences(12, 1)) + "\n")
    return str(train), str(validation)


def _argv(model_dir, files, output_dir, *extra):
    return ["--model_name_or_path", model_dir, "--train_file", files[0], "--validation_file", files[1],
            "--output_dir", str(output_dir), "--block_size", "16", "--per_device_eval_batch_size", "4",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
            "--remaining_ratio", "0.5", "--low_rank_ratio", "0.3", "--oneshot", "--num_calibration_samples", "8",
            "--calibration_seq_len", "32", "--generation_prompts", "the cat", "--generation_max_new_tokens", "4",
            *extra]


def _reloaded_loss(output_dir, files) -> float:
    from transformers import AutoTokenizer

    from losparse.cli.tasks import clm

    model = losparse.load(str(output_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    data_args = clm.CLMDataArguments(train_file=files[0], validation_file=files[1])
    blocks = clm.make_blocks(clm.load_raw_datasets(data_args), tokenizer, 16, data_args)["validation"]
    batch = torch.tensor(blocks["input_ids"])
    losses = []
    with torch.no_grad():
        for start in range(0, len(batch), 4):
            chunk = batch[start:start + 4]
            losses.append((model(input_ids=chunk, labels=chunk).loss.item(), len(chunk)))
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


@pytest.fixture(scope="module")
def oneshot_run(llama_dir, text_files, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("oneshot-run")
    return output_dir, run_clm.main(_argv(llama_dir, text_files, output_dir, "--overwrite_output_dir"))


def test_run_clm_oneshot_end_to_end(oneshot_run, text_files):
    output_dir, results = oneshot_run
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["perplexity"] == pytest.approx(math.exp(on_disk["eval_loss"]))
    assert on_disk["eval_loss"] == pytest.approx(results["eval_loss"])
    assert math.exp(_reloaded_loss(output_dir, text_files)) == pytest.approx(on_disk["perplexity"], rel=1e-4)
    assert on_disk["oneshot"]["num_calibration_samples"] == 8 and not any(k.startswith("train_") and k != "train_blocks"
                                                                         for k in on_disk)
    assert on_disk["compression"]["remaining_ratio"] == pytest.approx(0.5, abs=0.03)
    generations = json.loads((output_dir / "generations.json").read_text())["generations"]
    assert [g["prompt"] for g in generations] == ["the cat"]


def test_run_clm_oneshot_do_train_is_losparse_fine_tuning_from_the_calibrated_start(llama_dir, text_files, tmp_path,
                                                                                     oneshot_run):
    results = run_clm.main(_argv(llama_dir, text_files, tmp_path / "oneshot-ft", "--do_train", "--num_train_epochs",
                                 "2", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3"))
    before = oneshot_run[1]
    assert "train_loss" in results and results["oneshot"]["oneshot"]
    assert results["compression"]["remaining_ratio"] == pytest.approx(0.5, abs=0.03)
    assert results["eval_loss"] < before["eval_loss"]  # the toy grammar is learnable in two epochs


def test_make_trainer_prunes_a_calibrated_start_without_decomposing_it_again(tmp_path):
    from transformers import Trainer, TrainingArguments

    from losparse.cli.run import make_trainer

    model = oneshot.oneshot_compress(_tiny_model("llama"), _config(), _ids(6, 16, 12), prune=False,
                                     show_progress=False)
    calibrated_u = model.model.layers[0].self_attn.q_proj.low_rank_u.detach().clone()
    trainer = make_trainer(Trainer, _config(), model=model,
                           args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert isinstance(trainer, losparse.LoSparseTrainerMixin)
    assert torch.equal(trainer.model.model.layers[0].self_attn.q_proj.low_rank_u, calibrated_u)
    compact = losparse.compact(oneshot.oneshot_compress(_tiny_model("llama"), _config(), _ids(6, 16, 12),
                                                        show_progress=False))
    trainer = make_trainer(Trainer, _config(), model=compact,
                           args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert not isinstance(trainer, losparse.LoSparseTrainerMixin)  # a compact model trains as it is


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no model weights should be loaded here")

    monkeypatch.setattr(run_clm.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--num_calibration_samples", "0"], "--num_calibration_samples 0 must be >= 1"),
    (["--prune_dim", "columns"], "--oneshot_solver reconstruct keeps whole rows of S, but --prune_dim is 'columns'; "
                                 "use --prune_dim rows or --oneshot_solver select"),
    (["--calibration_seq_len", "65"], "--calibration_seq_len 65 is more than the 64 positions of --model_name_or_path "
                                      "'{model}' (max_position_embeddings 64); pass --calibration_seq_len 64 or less"),
    (["--num_calibration_samples", "40"], "the calibration text (the training split) holds 540 tokens (EOS included), "
                                          "fewer than the 1280 needed for --num_calibration_samples 40 x "
                                          "--calibration_seq_len 32; lower them or add text"),
    (["--method", "finetune"], "--oneshot has no form for --method finetune; choose one of: itp, losparse, lowrank, "
                                "structured"),
    (["--method", "itp", "--do_train"], "--oneshot --do_train starts LoSparse fine-tuning from the calibrated "
                                        "decomposition and needs --method losparse (got itp); drop --do_train for a "
                                        "one-shot itp model"),
])
def test_bad_oneshot_input_is_one_line_before_any_weights(llama_dir, text_files, tmp_path, capsys, no_model_loading,
                                                         extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run_main(run_clm.main, _argv(llama_dir, text_files, tmp_path / "bad", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err == "error: " + message.format(model=llama_dir)


# ---------------------------------------------------------------------------------------------
# The comparison table tool
# ---------------------------------------------------------------------------------------------

def test_table_tool_fills_every_cell_and_its_dense_row_is_the_dense_model(llama_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(_sentences(200, 3)) + "\n")
    all_rows = list(clm_oneshot_rows.ROWS)
    result = clm_oneshot_table.main(["--model_name_or_path", llama_dir, "--text_file", str(text),
                                     "--ratios", "0.8", "0.5", "--num_calibration_samples", "6",
                                     "--num_heldout_samples", "5", "--seq_len", "32", "--batch_size", "4",
                                     "--rows", *all_rows, "--decode_batch_sizes", "1", "2",
                                     "--decode_new_tokens", "3", "--output_dir", str(tmp_path / "table")])
    table = (tmp_path / "table" / clm_oneshot_table.TABLE_FILE).read_text()
    on_disk = json.loads((tmp_path / "table" / clm_oneshot_table.JSON_FILE).read_text())
    assert on_disk["dense"] == result["dense"]
    perplexity_table = table.split("Best row per ratio")[0]
    rows = [line for line in perplexity_table.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert [line.split(" | ")[0][2:] for line in rows] == ["dense", *all_rows]
    for line in rows:  # every cell: "perplexity (achieved ratio)"
        cells = [cell.strip() for cell in line.strip("| ").split(" | ")[2:]]
        assert len(cells) == 2 and all(re.fullmatch(r"\d+\.\d{3} \(\d\.\d{2}\)", cell) for cell in cells)
    assert {(c["row"], c["ratio"]) for c in on_disk["cells"]} == {(r, x) for r in all_rows for x in (0.8, 0.5)}
    group = 4 * 16 * 32 / (14 * 32 * 64 / 2)  # the structured row's largest group (a kv head) as a share
    for cell in on_disk["cells"]:
        tolerance = group if cell["row"] == "structured" else 0.05
        assert math.isfinite(cell["perplexity"]) and cell["achieved_ratio"] == pytest.approx(cell["ratio"],
                                                                                          abs=tolerance)
        assert f"{cell['perplexity']:.3f} ({cell['achieved_ratio']:.2f})" in table
        assert cell["mb"] > 0 and set(cell["decode"]) == {"1", "2"}
        assert all(math.isfinite(d["ms"]) and math.isfinite(d["dense_ms"]) for d in cell["decode"].values())
    sizes = {(c["row"], c["ratio"]): c["mb"] for c in on_disk["cells"]}
    assert sizes[("oats", 0.5)] >= on_disk["dense"]["mb"] * 0.99  # dense storage, said so
    assert sizes[("structured", 0.5)] < on_disk["dense"]["mb"] and sizes[("losparse", 0.5)] < on_disk["dense"]["mb"]
    assert set(on_disk["best"]) == {"0.8", "0.5"} and "Size and decode latency" in table
    # the dense row is the dense model's held-out perplexity, computed here independently
    from transformers import AutoModelForCausalLM, AutoTokenizer

    documents = text.read_text().splitlines()
    _, heldout_docs = clm_oneshot_table.split_documents(documents, 6 / 11, 0)
    heldout = oneshot_cli.read_calibration_ids(AutoTokenizer.from_pretrained(llama_dir), heldout_docs, 5, 32, 0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        loss = model(input_ids=heldout, labels=heldout).loss.item()
    assert on_disk["dense"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert f"{math.exp(loss):.3f} (1.00)" in rows[0]
    # one-shot LoSparse beats plain-SVD one-shot at the same budget on this model, too
    cells = {(c["row"], c["ratio"]): c["perplexity"] for c in on_disk["cells"]}
    assert cells[("losparse", 0.5)] <= cells[("plain_svd", 0.5)] * 1.05


def test_table_script_dry_run_prints_the_command():
    import subprocess

    root = REPO_ROOT
    out = subprocess.run(["bash", os.path.join(root, "scripts", "clm_oneshot_table.sh"), "--ratios", "0.8"],
                         env={**os.environ, "DRY_RUN": "1", "OUTPUT_DIR": "out/x", "MODEL": "m"},
                         capture_output=True, text=True, check=True).stdout
    python = os.environ.get("PYTHON", "python3")  # the script runs ${PYTHON:-python3}, as CI sets it
    assert out.split() == [python, "-m", "benchmarks.clm_oneshot_table", "--output_dir", "out/x",
                           "--model_name_or_path", "m", "--ratios", "0.8"]


def test_table_tool_defaults_point_at_the_smollm2_asset_and_are_cpu_sized():
    args = clm_oneshot_table.build_parser().parse_args(["--output_dir", "x"])
    assert args.ratios == [0.8, 0.6, 0.5] and args.num_calibration_samples * args.seq_len == 32 * 256
    assert args.num_heldout_samples * args.seq_len == 40 * 256
    assert args.text_file.endswith(os.path.join("movie-sentiment", "train.csv"))
    assert clm_oneshot_table.SMOLLM2_GGUF == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_run_glue_oneshot_is_a_calibrated_start_of_fine_tuning(tiny_bert_dir, sentiment_files, tmp_path):
    import json

    from conftest import load_script

    run_glue = load_script("run_glue.py")
    train, validation = sentiment_files
    output_dir = tmp_path / "glue-oneshot"
    results = run_glue.main(["--model_name_or_path", tiny_bert_dir, "--train_file", train, "--validation_file",
                             validation, "--output_dir", str(output_dir), "--num_train_epochs", "2",
                             "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--report_to", "none",
                             "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
                             "--max_seq_length", "64", "--remaining_ratio", "0.3", "--low_rank_ratio", "0.1",
                             "--oneshot", "--num_calibration_samples", "4", "--calibration_seq_len", "16"])
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    assert on_disk["oneshot"]["num_calibration_samples"] == 4 and on_disk["eval_accuracy"] == results["eval_accuracy"]
    assert on_disk["compression"]["remaining_ratio"] == pytest.approx(0.3, abs=0.01)
    assert on_disk["train_loss"] > 0


@pytest.mark.parametrize("positions, expected", [(64, 64), (2048, 512)])
def test_calibration_seq_len_defaults_to_512_capped_at_the_positions(positions, expected):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               max_position_embeddings=positions, vocab_size=VOCAB)
    args = oneshot_cli.OneShotArguments()
    assert args.calibration_seq_len is None
    oneshot_cli.check_oneshot_plan(args, _config(), "tiny", AutoModelForCausalLM, model_config)
    assert args.calibration_seq_len == expected
    explicit = oneshot_cli.OneShotArguments(calibration_seq_len=positions + 1)
    with pytest.raises(LoSparseUsageError, match=f"--calibration_seq_len {positions + 1} is more than"):
        oneshot_cli.check_oneshot_plan(explicit, _config(), "tiny", AutoModelForCausalLM, model_config)


@pytest.mark.parametrize("extra, message", [
    (["--llmcompressor_python", "/nonexistent/python"],
     "--llmcompressor_python '/nonexistent/python' does not exist (see benchmarks/llmcompressor_row.py for the venv "
     "it needs)"),
    (["--decode_new_tokens", "1"], "--decode_new_tokens 1 must be >= 2 (per token = (N - 1 tokens) / (N - 1))"),
])
def test_table_tool_refuses_bad_peer_and_timing_flags_in_one_line(extra, message, tmp_path):
    args = clm_oneshot_table.build_parser().parse_args(["--output_dir", str(tmp_path), *extra])
    with pytest.raises(LoSparseUsageError) as error:
        clm_oneshot_table.check_arguments(args)
    assert str(error.value) == message


def test_external_rows_are_formatted_as_an_unstructured_dense_storage_reference():
    result = {"external": {"llmcompressor_version": "0.14.0.1", "rows": [
        {"row": "llmcompressor_sparsegpt", "remaining_ratio": 0.4998, "perplexity": 150.25}]}}
    text = clm_oneshot_table.format_external_table(result)
    assert "| llmcompressor_sparsegpt | 0.50 | 150.250 |" in text and "dense model's" in text


def test_run_clm_structured_oneshot_saves_a_smaller_model_that_reloads_with_its_perplexity(llama_dir, text_files,
                                                                                         tmp_path):
    output_dir = tmp_path / "structured"
    results = run_clm.main(_argv(llama_dir, text_files, output_dir, "--method", "structured"))
    compression = json.loads((output_dir / "all_results.json").read_text())["compression"]
    assert compression["method"] == "structured_decoder_oneshot" and compression["removed"]
    assert compression["remaining_ratio"] == pytest.approx(0.5, abs=0.1)
    assert compression["model_params"] < compression["model_params_dense"]
    assert (output_dir / "structured_pruning.json").is_file()
    assert math.exp(_reloaded_loss(output_dir, text_files)) == pytest.approx(results["perplexity"], rel=1e-4)


def test_run_clm_structured_oneshot_do_train_fine_tunes_the_pruned_model(llama_dir, text_files, tmp_path):
    before = run_clm.main(_argv(llama_dir, text_files, tmp_path / "before", "--method", "structured"))
    results = run_clm.main(_argv(llama_dir, text_files, tmp_path / "after", "--method", "structured", "--do_train",
                                 "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
                                 "--learning_rate", "3e-3", "--eval_strategy", "steps", "--eval_steps", "8"))
    assert "train_loss" in results and results["eval_loss"] < before["eval_loss"]
    history = results["eval_history"]  # 33 blocks / 4 = 9 steps an epoch: steps 8, 16 and the last (18)
    assert [entry["step"] for entry in history] == [8, 16, 18] and history[-1]["eval_loss"] < before["eval_loss"]
    assert results["compression"]["target_params"] == before["compression"]["target_params"]  # budget kept
    assert math.exp(_reloaded_loss(tmp_path / "after", text_files)) == pytest.approx(results["perplexity"], rel=1e-4)


def test_run_clm_structured_on_a_decoder_needs_oneshot_one_line(llama_dir, text_files, tmp_path, capsys,
                                                                no_model_loading):
    argv = [a for a in _argv(llama_dir, text_files, tmp_path / "bad", "--method", "structured", "--do_train")
            if a != "--oneshot"]
    with pytest.raises(SystemExit):
        run_main(run_clm.main, argv)
    err = capsys.readouterr().err.strip()
    assert err == ("error: --method structured prunes a llama decoder in one shot from calibration data: add --oneshot "
                   "(and --do_train to fine-tune the pruned model); pruning while training is for encoder models of "
                   "type " + ", ".join(losparse.methods.structured.SUPPORTED_MODEL_TYPES))


def test_oneshot_needs_a_dense_model_not_a_structured_one(llama_dir, text_files, tmp_path, capsys):
    run_clm.main(_argv(llama_dir, text_files, tmp_path / "pruned", "--method", "structured"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_main(run_clm.main, _argv(str(tmp_path / "pruned"), text_files, tmp_path / "again"))
    assert capsys.readouterr().err.strip() == (f"error: --oneshot needs a dense model, but --model_name_or_path "
                                               f"{str(tmp_path / 'pruned')!r} is already compressed (saved by "
                                               "--method structured)")


def test_structured_oneshot_refuses_an_encoder_one_line():
    from transformers import BertConfig

    from losparse.core.config import LoSparseConfig
    from losparse.methods import get_method

    with pytest.raises(losparse.LoSparseUsageError, match=r"^--oneshot --method structured: structured decoder "
                       r"pruning supports model types llama, qwen2, mistral; got model type 'bert' \(encoders prune "
                       r"while training: drop --oneshot\)$"):
        get_method("structured").check_oneshot(LoSparseConfig(method="structured"), BertConfig(), None, False)
