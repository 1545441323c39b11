"""`losparse.load` on crafted or corrupt checkpoints: one `LoSparseUsageError` naming file and field,
raised before any tensor sized by the checkpoint is allocated; a sound checkpoint still loads exactly."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import losparse
from losparse import LoSparseConfig, LoSparsePruner
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE, WEIGHTS_FILE

QUERY = "bert.encoder.layer.0.attention.self.query"
FFN_OUT = "bert.encoder.layer.1.output.dense"  # 64 -> 32: out and in differ


def _compact_model(model_class="BertForSequenceClassification", prune_dim="rows", method="losparse", seed=0):
    """A tiny BERT, decomposed, pruned with random scores and compacted."""
    import transformers
    from conftest import tiny_bert_config

    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(tiny_bert_config()).eval()
    losparse.apply(model, LoSparseConfig(method=method, remaining_ratio=0.4, low_rank_ratio=0.1, prune_dim=prune_dim))
    pruner = LoSparsePruner(model, total_steps=10)
    if pruner.importance is not None:
        pruner.importance.neuron_ema.copy_(torch.rand_like(pruner.importance.neuron_ema))
    pruner.update_masks(pruner.final_kept_fraction)
    return losparse.compact(model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One sound compact checkpoint; every test corrupts its own copy."""
    return losparse.save(_compact_model(), str(tmp_path_factory.mktemp("sound") / "compact"))


@pytest.fixture
def checkpoint(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


def _edit_manifest(directory, edit):
    path = os.path.join(directory, LOSPARSE_CONFIG_FILE)
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def _edit_weights(directory, edit):
    path = os.path.join(directory, WEIGHTS_FILE)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _set(*keys_and_value):
    """An edit setting meta[k1][k2]... = value."""
    *keys, value = keys_and_value

    def edit(meta):
        for key in keys[:-1]:
            meta = meta[key]
        meta[keys[-1]] = value
    return edit


def _delete(*keys):
    def edit(meta):
        for key in keys[:-1]:
            meta = meta[key]
        del meta[keys[-1]]
    return edit


def _kept(layer, values):
    def edit(tensors):
        tensors[f"{layer}.kept_index"] = torch.tensor(values, dtype=torch.long)
    return edit


def _put(name, tensor):
    def edit(tensors):
        tensors[name] = tensor
    return edit


def _nan_in(name):
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    return edit


#: case -> (edit of the manifest dict, expected message fragment[, file named if not the manifest]).
#: A manifest consistent with config.json but not with the weights is reported on the weights file.
MANIFEST_CASES = {
    "format_version_2": (_set("format_version", 2), "format_version 2 is not supported"),
    "format_version_bool": (_set("format_version", True), "format_version must be an integer, not True"),
    "format_version_missing": (_delete("format_version"), "format_version is missing"),
    "model_class_other_type": (_set("model_class", "GPT2Model"), "model_class 'GPT2Model' is not a transformers"),
    "model_class_arbitrary": (_set("model_class", "AutoTokenizer"), "model_class 'AutoTokenizer' is not"),
    "model_class_not_str": (_set("model_class", ["os", "system"]), "model_class must be a string"),
    "dtype_unknown": (_set("dtype", "int8"), "dtype 'int8' is not one of"),
    "dtype_attribute": (_set("dtype", "nn"), "dtype 'nn' is not one of"),
    "losparse_config_bad": (_set("losparse_config", "remaining_ratio", 7), "losparse_config: --remaining_ratio 7"),
    "losparse_config_type": (_set("losparse_config", "beta1", "x"), "losparse_config:"),
    "layers_not_object": (_set("layers", [1, 2]), "layers must be an object"),
    "layer_unknown_name": (_set("layers", "bert.encoder.layer.7.output.dense", {}),
                           "layers['bert.encoder.layer.7.output.dense']: the model of config.json has no linear"),
    "layer_not_linear": (_set("layers", "bert.encoder.layer.0", {}), "layers['bert.encoder.layer.0']: the model"),
    "layer_not_object": (_set("layers", QUERY, 3), f"layers['{QUERY}'] must be an object"),
    "layer_missing_field": (_delete("layers", QUERY, "rank"), f"layers['{QUERY}'] lacks rank"),
    "layer_unknown_field": (_set("layers", QUERY, "device", "cuda"), f"layers['{QUERY}'] has unknown field(s) device"),
    "rank_negative": (_set("layers", QUERY, "rank", -1), f"layers['{QUERY}'].rank -1 is not in [0, 32]"),
    "rank_too_big": (_set("layers", FFN_OUT, "rank", 33), f"layers['{FFN_OUT}'].rank 33 is not in [0, 32]"),
    "rank_string": (_set("layers", QUERY, "rank", "4"), f"layers['{QUERY}'].rank must be an integer, not '4'"),
    "rank_float": (_set("layers", QUERY, "rank", 4.0), f"layers['{QUERY}'].rank must be an integer"),
    "rank_bool": (_set("layers", QUERY, "rank", True), f"layers['{QUERY}'].rank must be an integer"),
    "rank_off_by_one": (lambda m: m["layers"][QUERY].update(rank=m["layers"][QUERY]["rank"] - 1),
                        f"{QUERY}.fused_weight has shape [", WEIGHTS_FILE),
    "num_kept_too_big": (_set("layers", QUERY, "num_kept", 33), f"layers['{QUERY}'].num_kept 33 is not in [0, 32]"),
    "num_kept_off_by_one": (lambda m: m["layers"][QUERY].update(num_kept=m["layers"][QUERY]["num_kept"] + 1),
                            f"{QUERY}.fused_weight has shape [", WEIGHTS_FILE),
    "prune_dim_unknown": (_set("layers", QUERY, "prune_dim", "diagonal"), f"layers['{QUERY}'].prune_dim 'diagonal'"),
    "prune_dim_swapped": (_set("layers", QUERY, "prune_dim", "columns"), f"{QUERY}.low_rank_v is missing",
                          WEIGHTS_FILE),
    "bias_wrong": (_set("layers", QUERY, "bias", False), f"layers['{QUERY}'].bias is False, but the layer"),
    "shape_from_manifest": (lambda m: m["layers"][QUERY].update(in_features=20000, out_features=20000),
                            f"layers['{QUERY}'].out_features x in_features is 20000x20000, but config.json"),
    # Provenance fields (optional within format 1): typed, and the summaries must agree with losparse_config.
    "base_model_not_str": (_set("base_model", ["a"]), "base_model must be a string or null, not ['a']"),
    "losparse_version_not_str": (_set("losparse_version", 1), "losparse_version must be a string or null"),
    "method_disagrees": (_set("method", "itp"), "method 'itp' disagrees with losparse_config.method 'losparse'"),
    "ratio_disagrees": (_set("remaining_ratio", 0.5), "remaining_ratio 0.5 disagrees with losparse_config"),
    "ratio_bool": (_set("low_rank_ratio", True), "low_rank_ratio must be a number or null, not True"),
    "achieved_ratio_str": (_set("achieved_remaining_ratio", "0.4"), "achieved_remaining_ratio must be a number"),
}

WEIGHTS_CASES = {
    "kept_index_duplicates": (_kept(QUERY, [0, 0, 1, 2]), f"{QUERY}.kept_index has duplicate entries"),
    "kept_index_unsorted": (_kept(QUERY, [3, 1, 2, 0]), f"{QUERY}.kept_index is not in increasing order"),
    "kept_index_too_high": (_kept(QUERY, [0, 1, 2, 32]), f"{QUERY}.kept_index has entries outside [0, 32)"),
    "kept_index_negative": (_kept(QUERY, [-1, 0, 1, 2]), f"{QUERY}.kept_index has entries outside [0, 32)"),
    "kept_index_int32": (lambda t: t.update({f"{QUERY}.kept_index": t[f"{QUERY}.kept_index"].int()}),
                         f"{QUERY}.kept_index has dtype I32, expected I64"),
    "weight_integer": (lambda t: t.update({f"{QUERY}.bias": t[f"{QUERY}.bias"].long()}),
                       f"{QUERY}.bias has dtype I64, expected F16 or BF16 or F32 or F64"),
    "tensor_missing": (lambda t: t.pop(f"{QUERY}.bias"), f"{QUERY}.bias is missing"),
    "tensor_extra": (_put("bert.encoder.layer.0.extra", torch.zeros(3)), "bert.encoder.layer.0.extra is not a tensor"),
    "tensor_shape": (_put("bert.embeddings.LayerNorm.weight", torch.ones(33)),
                     "bert.embeddings.LayerNorm.weight has shape [33], but"),
    "non_finite": (_nan_in("classifier.weight"), "classifier.weight has non-finite values"),
}


def _with_kept_count(case, count):
    """kept_index edits replace the tensor: keep num_kept and fused_weight in line so only the values are wrong."""
    def edit(directory):
        def weights(tensors):
            case(tensors)
            rank = tensors[f"{QUERY}.low_rank_u"].shape[1]
            fused = tensors[f"{QUERY}.fused_weight"]
            padding = torch.zeros(max(0, rank + count - fused.shape[0]), fused.shape[1])
            tensors[f"{QUERY}.fused_weight"] = torch.cat([fused, padding])[: rank + count].clone()
        _edit_weights(directory, weights)
        _edit_manifest(directory, _set("layers", QUERY, "num_kept", count))
    return edit


def _assert_load_fails(directory, file, fragment):
    with pytest.raises(losparse.LoSparseUsageError) as info:
        losparse.load(str(directory))
    message = str(info.value)
    assert f"{file}: " in message and fragment in message, message


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_corrupt_manifest_field_is_one_usage_error(checkpoint, case):
    edit, fragment, *file = MANIFEST_CASES[case]
    _edit_manifest(checkpoint, edit)
    _assert_load_fails(checkpoint, file[0] if file else LOSPARSE_CONFIG_FILE, fragment)


@pytest.mark.parametrize("case", sorted(WEIGHTS_CASES))
def test_corrupt_weights_are_one_usage_error(checkpoint, case):
    edit, fragment = WEIGHTS_CASES[case]
    if case.startswith("kept_index") and case != "kept_index_int32":
        _with_kept_count(edit, 4)(checkpoint)
    else:
        _edit_weights(checkpoint, edit)
    _assert_load_fails(checkpoint, WEIGHTS_FILE, fragment)


def _write(directory, file, content):
    with open(os.path.join(directory, file), "wb") as f:
        f.write(content)


def _truncate(directory, file):
    path = os.path.join(directory, file)
    with open(path, "rb") as f:
        content = f.read()
    _write(directory, file, content[:-10])


FILE_CASES = {
    "manifest_not_json": (lambda d: _write(d, LOSPARSE_CONFIG_FILE, b'{"format_version": 1,'),
                          LOSPARSE_CONFIG_FILE, "is not valid JSON"),
    "manifest_not_utf8": (lambda d: _write(d, LOSPARSE_CONFIG_FILE, b"\xff\xfe{}"), LOSPARSE_CONFIG_FILE,
                          "is not valid JSON"),
    "manifest_list": (lambda d: _write(d, LOSPARSE_CONFIG_FILE, b"[1, 2]"), LOSPARSE_CONFIG_FILE,
                      "must hold a JSON object, not list"),
    "manifest_nan": (lambda d: _write(d, LOSPARSE_CONFIG_FILE, b'{"format_version": NaN}'), LOSPARSE_CONFIG_FILE,
                     "NaN is not a JSON number"),
    "manifest_repeated_key": (lambda d: _write(d, LOSPARSE_CONFIG_FILE, b'{"layers": {}, "layers": {}}'),
                              LOSPARSE_CONFIG_FILE, "key 'layers' appears twice"),
    "weights_garbage": (lambda d: _write(d, WEIGHTS_FILE, b"not a safetensors file"), WEIGHTS_FILE,
                        "is not a readable safetensors file"),
    "weights_truncated": (lambda d: _truncate(d, WEIGHTS_FILE), WEIGHTS_FILE, "is not a readable safetensors file"),
    "config_not_json": (lambda d: _write(d, "config.json", b"{oops"), "config.json", "is not a usable transformers"),
    "config_other_shape": (lambda d: _set_config(d, hidden_size=48),
                           LOSPARSE_CONFIG_FILE, "but config.json makes this layer 48x48"),
    "generation_config_not_json": (lambda d: _write(d, "generation_config.json", b"{oops"), "generation_config.json",
                                   "is not a usable generation config"),
}


def _set_config(directory, **values):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(values)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_unreadable_file_is_one_usage_error(checkpoint, case):
    corrupt, file, fragment = FILE_CASES[case]
    corrupt(checkpoint)
    _assert_load_fails(checkpoint, file, fragment)


@pytest.mark.parametrize("missing", ["config.json", LOSPARSE_CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file_is_named(checkpoint, missing):
    os.remove(os.path.join(checkpoint, missing))
    with pytest.raises(losparse.LoSparseUsageError, match=f"is not a LoSparse checkpoint: {missing} missing"):
        losparse.load(str(checkpoint))


def test_duplicate_kept_index_is_refused_not_computed_wrong(checkpoint):
    """The worst case before: duplicates loaded silently and the layer computed garbage."""
    _with_kept_count(_kept(QUERY, [5, 5, 6, 7]), 4)(checkpoint)
    with pytest.raises(losparse.LoSparseUsageError, match=f"{WEIGHTS_FILE}: {QUERY}.kept_index has duplicate"):
        losparse.load(str(checkpoint))


def test_huge_manifest_shape_fails_before_any_allocation(checkpoint, monkeypatch):
    """20000x20000 for a 32x32 layer: refused from the model config, no real tensor of that size is made."""
    _edit_manifest(checkpoint, lambda m: m["layers"][QUERY].update(in_features=20000, out_features=20000))
    big = []

    def recording(factory):
        def wrapper(*args, **kwargs):
            tensor = factory(*args, **kwargs)
            if tensor.device.type != "meta" and max(tensor.shape, default=0) >= 20000:
                big.append(tuple(tensor.shape))
            return tensor
        return wrapper

    for name in ("zeros", "empty", "ones"):
        monkeypatch.setattr(torch, name, recording(getattr(torch, name)))
    with pytest.raises(Exception) as info:
        losparse.load(str(checkpoint))
    assert big == [], f"allocated {big} from an unchecked manifest field"
    assert isinstance(info.value, losparse.LoSparseUsageError)
    assert "20000x20000, but config.json makes this layer 32x32" in str(info.value)


@pytest.mark.parametrize("model_class,prune_dim,method", [
    ("BertForSequenceClassification", "columns", "losparse"),
    ("BertForMaskedLM", "rows", "losparse"),   # tied embeddings: one name per tied group on disk
    ("BertForSequenceClassification", "rows", "itp"),      # rank 0: zero-size U, V
    ("BertForSequenceClassification", "rows", "lowrank"),  # no S: zero-size kept_index
])
def test_sound_checkpoints_still_round_trip_exactly(tmp_path, model_class, prune_dim, method):
    model = _compact_model(model_class, prune_dim, method)
    ids = torch.randint(0, 30, (2, 9))
    reloaded = losparse.load(losparse.save(model, str(tmp_path / "compact")))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    checked = losparse.deploy.validation.check_checkpoint(str(tmp_path / "compact"))
    assert checked.model_class is type(model) and set(checked.layers) == {
        n for n, m in model.named_modules() if isinstance(m, losparse.CompactLoSparseLinear)}
