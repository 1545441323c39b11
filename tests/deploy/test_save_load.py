"""`save` and `load` beyond validation: `load` (which builds no dense model, see test_load_memory.py)
gives exactly what the old dense-then-swap loader gave; `dtype=`/`device=`; `save` leaves the caller's model alone and records
where the model came from; checkpoints written before those manifest fields existed still load."""

import json
import os

import pytest
import torch

import losparse
from losparse import CompactLoSparseLinear, LoSparseConfig
from losparse.core.decompose import losparse_layers, set_submodule
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE, OPTIONAL_FIELDS, WEIGHTS_FILE, check_checkpoint


def _old_load(path):
    """The loader `load` replaced: the dense model with random weights, compact layers swapped in, then
    the file loaded over it. Kept here as the reference for what `load` must produce."""
    from safetensors.torch import load_model

    checked = check_checkpoint(path)
    model = checked.model_class(checked.model_config)
    for name, spec in checked.layers.items():
        set_submodule(model, name, CompactLoSparseLinear(**spec))
    model.to(dtype=checked.dtype)
    load_model(model, os.path.join(path, WEIGHTS_FILE), strict=True)
    return model.eval()


def _tiny(kind):
    """A tiny random model of `kind` and inputs for it."""
    import transformers
    from conftest import tiny_bert_config

    if kind == "bert-mlm":  # tied embeddings; position_ids and token_type_ids are non-persistent buffers
        return transformers.BertForMaskedLM(tiny_bert_config()), {"input_ids": torch.randint(0, 30, (2, 9))}
    if kind == "llama":  # rotary inv_freq: a floating non-persistent buffer
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 64, (2, 9))}
    if kind == "bart":  # encoder, decoder and LM head share one embedding; a generation config
        config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                         decoder_ffn_dim=32, max_position_embeddings=32)
        return transformers.BartForConditionalGeneration(config), {
            "input_ids": torch.randint(4, 64, (2, 9)), "decoder_input_ids": torch.randint(4, 64, (2, 5))}
    if kind == "gpt2":  # Conv1D layers
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 64, (2, 9))}
    raise ValueError(kind)


def _compact(kind, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model, inputs = _tiny(kind)
    losparse.apply(model.eval(), LoSparseConfig(remaining_ratio=0.4, low_rank_ratio=0.1))
    for _, layer in losparse_layers(model):  # keep every other neuron of S
        mask = torch.zeros_like(layer.sparse_mask)
        mask[::2] = True
        layer.set_sparse_mask(mask)
    return losparse.compact(model).to(dtype), inputs


def _tied_groups(model):
    groups = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(sorted(names) for names in groups.values())


@pytest.mark.parametrize("kind", ["bert-mlm", "llama", "bart", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_gives_exactly_what_the_dense_loading_path_gave(tmp_path, kind, dtype):
    model, inputs = _compact(kind, dtype)
    path = losparse.save(model, str(tmp_path / "ckpt"))
    old, new = _old_load(path), losparse.load(path)
    old_buffers, new_buffers = dict(old.named_buffers()), dict(new.named_buffers())
    assert old_buffers.keys() == new_buffers.keys()
    for name, buffer in old_buffers.items():  # non-persistent ones included: recomputed, not read from the file
        assert new_buffers[name].dtype == buffer.dtype and torch.equal(new_buffers[name], buffer), name
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(new_state[k], v) and new_state[k].dtype == v.dtype for k, v in old_state.items())
    assert _tied_groups(new) == _tied_groups(old)  # tied weights are one parameter, as in the saved model
    assert all(p.requires_grad for p in new.parameters()) and not new.training
    assert not any(t.is_meta for t in [*new.parameters(), *new.buffers()])
    with torch.no_grad():
        assert torch.equal(new(**inputs).logits, old(**inputs).logits)
        assert torch.equal(new(**inputs).logits, model(**inputs).logits)


def test_load_dtype_and_device(tmp_path):
    model, inputs = _compact("bert-mlm")
    path = losparse.save(model, str(tmp_path / "ckpt"))
    with torch.no_grad():
        expected = model(**inputs).logits
    for dtype, atol in ((torch.bfloat16, 5e-2), ("float16", 5e-3), (torch.float64, 1e-5)):
        loaded = losparse.load(path, device="cpu", dtype=dtype)
        wanted = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        assert {p.dtype for p in loaded.parameters()} == {wanted}
        layer = loaded.bert.encoder.layer[0].attention.self.query
        assert layer.kept_index.dtype == torch.int64 and loaded.bert.embeddings.position_ids.dtype == torch.int64
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits.float(), expected, atol=atol, rtol=0)
    with pytest.raises(losparse.LoSparseUsageError, match="load\\(dtype=torch.int8\\): expected one of"):
        losparse.load(path, dtype=torch.int8)


def test_load_refuses_a_weight_that_overflows_the_requested_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    path = losparse.save(_compact("bert-mlm")[0], str(tmp_path / "ckpt"))
    weights = os.path.join(path, WEIGHTS_FILE)
    tensors = load_file(weights)
    tensors["cls.predictions.transform.dense.weight"][0, 0] = 1e6
    save_file(tensors, weights)
    assert losparse.load(path).cls.predictions.transform.dense.weight[0, 0] == 1e6
    with pytest.raises(losparse.LoSparseUsageError, match="cls.predictions.transform.dense.weight of .* overflows torch.float16"):
        losparse.load(path, dtype=torch.float16)


@pytest.mark.parametrize("compact_first", [True, False])
def test_save_leaves_the_callers_model_untouched(tmp_path, compact_first):
    torch.manual_seed(0)
    model, _ = _tiny("bart")
    losparse.apply(model, LoSparseConfig(remaining_ratio=0.4, low_rank_ratio=0.1))
    if compact_first:
        losparse.compact(model)
    config, generation = model.config.to_dict(), model.generation_config.to_dict()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert config.get("architectures") is None
    path = losparse.save(model, str(tmp_path / "ckpt"))
    assert model.config.to_dict() == config and model.generation_config.to_dict() == generation
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v)
                                                              for k, v in state.items())
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["BartForConditionalGeneration"]


def test_manifest_records_where_the_model_came_from(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    losparse.apply(model, LoSparseConfig(remaining_ratio=0.4, low_rank_ratio=0.1))
    first = losparse.save(model, str(tmp_path / "first"))
    with open(os.path.join(first, LOSPARSE_CONFIG_FILE)) as f:
        meta = json.load(f)
    assert meta["format_version"] == 1 and meta["losparse_version"] == losparse.__version__
    assert meta["base_model"] == tiny_bert_dir
    assert (meta["method"], meta["remaining_ratio"], meta["low_rank_ratio"]) == ("losparse", 0.4, 0.1)
    assert meta["achieved_remaining_ratio"] == meta["parameter_report"]["remaining_ratio"]
    checked = check_checkpoint(first)
    assert (checked.base_model, checked.losparse_version) == (tiny_bert_dir, losparse.__version__)
    loaded = losparse.load(first)
    assert loaded.compressed_from == tiny_bert_dir
    # Re-saving the loaded compact model (e.g. after distillation) still names the dense model, not `first`.
    assert check_checkpoint(losparse.save(loaded, str(tmp_path / "second"))).base_model == tiny_bert_dir
    assert check_checkpoint(losparse.save(loaded, str(tmp_path / "third"), base_model="org/x")).base_model == "org/x"


def _as_written_before_provenance(path):
    """Strip the manifest fields added within format 1: what the first writer of format 1 produced."""
    manifest = os.path.join(path, LOSPARSE_CONFIG_FILE)
    with open(manifest) as f:
        meta = json.load(f)
    with open(manifest, "w") as f:
        json.dump({k: v for k, v in meta.items() if k not in OPTIONAL_FIELDS}, f)
    return path


def test_a_format_1_checkpoint_without_provenance_loads(tmp_path):
    model, inputs = _compact("bert-mlm")
    path = _as_written_before_provenance(losparse.save(model, str(tmp_path / "old")))
    checked = check_checkpoint(path)
    assert checked.base_model is None and checked.losparse_version is None
    loaded = losparse.load(path)
    assert loaded.compressed_from is None
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_load_models_takes_compressed_from_from_the_manifest(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    from losparse.cli.run import ModelArguments, load_models

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    losparse.apply(model, LoSparseConfig(remaining_ratio=0.4, low_rank_ratio=0.1))
    path = losparse.save(model, str(tmp_path / "compact"))
    with open(os.path.join(path, "all_results.json"), "w") as f:
        json.dump({"model_name_or_path": "from-all-results"}, f)
    student, _ = load_models(AutoModelForSequenceClassification, ModelArguments(path))
    assert student.compressed_from == tiny_bert_dir and student.training
    # Written before the manifest recorded it: all_results.json beside the checkpoint is the fallback.
    _as_written_before_provenance(path)
    student, _ = load_models(AutoModelForSequenceClassification, ModelArguments(path))
    assert student.compressed_from == "from-all-results"
    os.remove(os.path.join(path, "all_results.json"))
    assert load_models(AutoModelForSequenceClassification, ModelArguments(path))[0].compressed_from is None

