"""Every registered model family, end to end on a tiny random model.

apply -> forward == dense -> a few training steps that prune -> compact == masked -> merge (the dense
type each layer replaced, through save_pretrained/from_pretrained) -> save -> load == compact, and for
families that generate, greedy `generate` with the KV cache on the compact and reloaded models equals
the masked model's uncached generation. A family added to `losparse.core.families` must add its tiny config
to TINY below (the test fails until it does).
"""

import copy

import pytest
import torch

import losparse
from losparse import CompactLoSparseLinear, LoSparseConfig, LoSparseLinear, LoSparsePruner
from losparse.core.families import FAMILIES, ModelFamily, family_of, register
from losparse.core.layers import dense_type_of

VOCAB = 100
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
DECODER = dict(SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)

#: model_type -> (transformers config class, its values): hidden 32, 2 layers (1 + 1 for encoder-decoders).
TINY = {
    "bert": ("BertConfig", SMALL),
    "roberta": ("RobertaConfig", dict(SMALL, pad_token_id=1)),
    "xlm-roberta": ("XLMRobertaConfig", dict(SMALL, pad_token_id=1)),
    "electra": ("ElectraConfig", dict(SMALL, embedding_size=32)),
    "deberta-v2": ("DebertaV2Config", dict(SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                           position_buckets=8, max_relative_positions=16)),
    "mpnet": ("MPNetConfig", SMALL),
    "bart": ("BartConfig", dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                decoder_ffn_dim=64, max_position_embeddings=64)),
    "t5": ("T5Config", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                            num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                            decoder_start_token_id=0)),
    "llama": ("LlamaConfig", DECODER),
    "qwen2": ("Qwen2Config", DECODER),
    "mistral": ("MistralConfig", DECODER),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                              eos_token_id=2)),
}
AUTO_CLASS = {"encoder": "AutoModelForSequenceClassification", "decoder": "AutoModelForCausalLM",
              "encoder-decoder": "AutoModelForSeq2SeqLM"}
CONFIG = dict(remaining_ratio=0.5, low_rank_ratio=0.1, pruning_warmup_steps=1, pruning_final_steps=1,
              pruning_interval=1)
TRAIN_STEPS = 3
NEW_TOKENS = 4


def _auto_class(family: ModelFamily):
    import transformers

    return getattr(transformers, AUTO_CLASS[family.kind])


def _build(family: ModelFamily):
    import transformers

    config_class, values = TINY[family.model_type]
    config = getattr(transformers, config_class)(**values)
    assert config.model_type == family.model_type
    torch.manual_seed(0)
    return _auto_class(family).from_config(config).eval()


def _inputs(family: ModelFamily) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family.kind == "encoder":
        return inputs, torch.tensor([0, 1])
    if family.kind == "decoder":
        return inputs, ids
    targets = torch.randint(3, VOCAB, (2, 5), generator=generator)
    return dict(inputs, decoder_input_ids=targets), targets


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def _generate(model, inputs, use_cache: bool) -> torch.Tensor:
    prompt = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    return model.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          num_beams=1, use_cache=use_cache)


def _train_and_prune(model, inputs, labels) -> None:
    """A hand-driven loop: optimizer step, then the pruner, as `LoSparseCallback` does it."""
    pruner = LoSparsePruner(model, total_steps=TRAIN_STEPS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(1, TRAIN_STEPS + 1):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        pruner.step(step)
        optimizer.zero_grad()
    layers = [m for m in model.modules() if isinstance(m, LoSparseLinear)]
    assert any(not bool(layer.sparse_mask.all()) for layer in layers), "no neuron was pruned"
    assert pruner.achieved_kept_fraction() == pytest.approx(pruner.final_kept_fraction, abs=0.05)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _assert_dense_again(model, dense_types: dict[str, str]) -> None:
    """After merge: no LoSparse layer is left, and each target is the dense type it was."""
    assert not losparse.core.decompose.losparse_layers(model)
    for name, dense_type in dense_types.items():
        assert dense_type_of(model.get_submodule(name)) == dense_type, name


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_end_to_end(model_type, tmp_path):
    family = FAMILIES[model_type]
    assert model_type in TINY, f"a registered family needs a tiny config in TINY ({__file__})"
    model = _build(family)
    assert family_of(model) is family
    inputs, labels = _inputs(family)
    dense = _logits(model, inputs)

    # apply: every target is the family's dense type; outputs unchanged; heads and embeddings stay dense
    config = LoSparseConfig(**CONFIG)
    dense_types = {name: dense_type_of(m) for name, m in losparse.find_target_modules(model, config)}
    assert set(dense_types.values()) == {"conv1d" if family.conv1d else "linear"}
    losparse.apply(model, config)
    layers = dict(losparse.core.decompose.losparse_layers(model))
    assert set(layers) == set(dense_types)
    assert not any("embed" in name or "head" in name or "classifier" in name for name in layers)
    _close(_logits(model, inputs), dense)

    # the distillation groups of the family are the ones its outputs give
    from losparse.training.distill import hidden_state_groups

    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
    assert tuple(name for name, _ in hidden_state_groups(outputs)) == family.hidden_state_groups

    _train_and_prune(model, inputs, labels)
    masked = _logits(model, inputs)
    reference_tokens = _generate(model, inputs, use_cache=False) if family.generates else None

    losparse.compact(model)
    assert all(isinstance(m, CompactLoSparseLinear) for _, m in losparse.core.decompose.losparse_layers(model))
    _close(_logits(model, inputs), masked)
    if family.generates:
        assert torch.equal(_generate(model, inputs, use_cache=True), reference_tokens)

    # merge gives the dense types back, and transformers' own class loads what save_pretrained writes
    merged = losparse.merge(copy.deepcopy(model))
    _assert_dense_again(merged, dense_types)
    _close(_logits(merged, inputs), masked)
    merged.save_pretrained(tmp_path / "merged")
    plain = _auto_class(family).from_pretrained(tmp_path / "merged").eval()
    _close(_logits(plain, inputs), masked)

    path = losparse.save(model, str(tmp_path / "compact"))
    loaded = losparse.load(path)
    _close(_logits(loaded, inputs), masked)
    if family.generates:
        assert torch.equal(_generate(loaded, inputs, use_cache=True), reference_tokens)
    losparse.merge(loaded)
    _assert_dense_again(loaded, dense_types)
    _close(_logits(loaded, inputs), masked)


# --- the registry -------------------------------------------------------------------------------------

#: The patterns of the families that predate the registry, exactly as `decompose.py` had them.
_BERT_LIKE = (r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
              r"|intermediate\.dense|output\.dense)")
LEGACY_PATTERNS = {
    "bert": [_BERT_LIKE],
    "roberta": [_BERT_LIKE],
    "xlm-roberta": [_BERT_LIKE],
    "electra": [_BERT_LIKE],
    "deberta-v2": [
        r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)"
        r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
    ],
    "mpnet": [r"(.*\.)?encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)"],
    "bart": [
        r"(.*\.)?(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
    ],
    "t5": [
        r"(.*\.)?(encoder|decoder)\.block\.\d+\.layer\.\d+\."
        r"((SelfAttention|EncDecAttention)\.(q|k|v|o)|DenseReluDense\.(wi|wo|wi_0|wi_1))"
    ],
    "llama": [
        r"(.*\.)?layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    ],
}


@pytest.mark.parametrize("model_type", sorted(LEGACY_PATTERNS))
def test_patterns_of_the_first_families_are_unchanged(model_type):
    assert list(FAMILIES[model_type].target_modules) == LEGACY_PATTERNS[model_type]


def test_register_refuses_a_duplicate_or_a_broken_entry():
    with pytest.raises(ValueError, match="already registered"):
        register(FAMILIES["bert"])
    with pytest.raises(ValueError, match="kind"):
        register(ModelFamily("new-type", "New", "vision", (r"x",)))
    with pytest.raises(ValueError, match="at least one"):
        register(ModelFamily("new-type", "New", "encoder", ()))
    assert "new-type" not in FAMILIES


def test_unregistered_model_type_is_a_usage_error_naming_the_families():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(losparse.LoSparseUsageError, match="no built-in target list for model type None .*gpt2"):
        losparse.find_target_modules(model, LoSparseConfig())


# --- the `weight` stand-in ----------------------------------------------------------------------------

def _layers():
    torch.manual_seed(0)
    layer = LoSparseLinear(12, 10, rank=2)
    with torch.no_grad():
        layer.sparse.normal_()
    layer.set_sparse_mask(torch.rand(10) > 0.5)
    return layer, CompactLoSparseLinear.from_losparse(layer)


@pytest.mark.parametrize("form", ["training", "compact"])
def test_weight_reads_like_the_dense_weight_but_is_no_parameter(form):
    layer = _layers()[form == "compact"]
    names = set(layer.state_dict())
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    assert weight.shape == (10, 12) and weight.dtype == torch.float32 and weight.device == layer.bias.device
    assert weight.stride() == (0, 0) and not weight.requires_grad and bool(weight.isnan().all())
    assert "weight" not in names and "weight" not in dict(layer.named_parameters())
    assert set(layer.state_dict()) == names
    with pytest.raises(RuntimeError):
        weight.normal_()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    with torch.device("meta"):
        assert LoSparseLinear(12, 10, rank=2).weight.device.type == "meta"


def test_weight_of_a_conv1d_layer_has_the_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    from losparse.core.decompose import decompose_linear

    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs, weight (12, 10)
    layer = decompose_linear(conv, low_rank_ratio=0.2)
    assert (layer.out_features, layer.in_features, layer.dense_type) == (10, 12, "conv1d")
    assert layer.weight.shape == conv.weight.shape
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        _close(layer(x), conv(x))
        compact = CompactLoSparseLinear.from_losparse(layer)
        assert compact.dense_type == "conv1d" and compact.weight.shape == conv.weight.shape
        _close(compact(x), conv(x))
