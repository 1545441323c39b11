"""Physical removal of decoder groups, save and `losparse.load`: the removed and reloaded models compute what the
masked one did (logits and greedy generation with the KV cache), emptied sub-layers included."""

import copy
import json

import pytest
import torch
from test_decoder_oneshot import calibration_ids, tiny_decoder

import losparse
from losparse.methods.structured.decoder_blocks import EmptyAttention, decoder_blocks
from losparse.methods.structured.decoder_masking import mask_attention, mask_mlp
from losparse.methods.structured.decoder_oneshot import structured_decoder_oneshot
from losparse.methods.structured.decoder_removal import remove_pruned_groups
from losparse.methods.structured.serialization import STRUCTURE_FILE, save_structured

PROMPTS = calibration_ids(2, 10, seed=7)


def _logits(model):
    with torch.no_grad():
        return model(PROMPTS).logits


def _masked(kind, ratio=0.5, **options):
    model = tiny_decoder(kind, kv_heads=options.pop("kv_heads", 2))
    report = structured_decoder_oneshot(model, calibration_ids(), ratio, remove=False, show_progress=False, **options)
    return model, report


@pytest.mark.parametrize("kind, kv_heads", [("llama", 2), ("llama", 4), ("qwen2", 2), ("mistral", 2)])
def test_removed_model_gives_the_masked_logits(kind, kv_heads):
    masked, report = _masked(kind, kv_heads=kv_heads)
    removed = remove_pruned_groups(copy.deepcopy(masked))
    assert torch.allclose(_logits(removed), _logits(masked), atol=1e-5)
    for block, kv, size in zip(decoder_blocks(removed), report["kv_heads"], report["intermediate_sizes"]):
        attention, d, g = block.attention, block.head_dim, block.queries_per_kv
        assert (attention.q_proj.out_features, attention.k_proj.out_features) == (kv * g * d, kv * d)
        assert (attention.num_key_value_heads, attention.num_heads, attention.num_key_value_groups) == (kv, kv * g, g)
        assert block.layer.mlp.intermediate_size == size == block.down_proj.in_features
        assert block.o_proj.bias is not None and block.down_proj.bias is not None  # created by the compensation
    assert (kind != "qwen2") or decoder_blocks(removed)[0].attention.q_proj.bias is not None


def test_removal_without_masks_infers_them_from_the_zero_columns():
    masked, report = _masked("llama")
    masked.decoder_keep = None
    removed = remove_pruned_groups(copy.deepcopy(masked))
    assert [b.kv_groups for b in decoder_blocks(removed)] == report["kv_heads"]
    assert torch.allclose(_logits(removed), _logits(masked), atol=1e-5)


def test_greedy_generation_with_the_cache_is_unchanged_by_removal():
    masked, _ = _masked("qwen2")
    removed = remove_pruned_groups(copy.deepcopy(masked))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(removed.generate(PROMPTS[:1], **options), masked.generate(PROMPTS[:1], **options))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_save_and_losparse_load_give_the_same_logits(kind, tmp_path):
    model = tiny_decoder(kind)
    structured_decoder_oneshot(model, calibration_ids(), 0.5, show_progress=False)
    save_structured(model, str(tmp_path))
    structure = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert structure["kind"] == "decoder" and structure["layers"][0]["attention_output_bias"] is True
    reloaded = losparse.load(str(tmp_path))
    assert type(reloaded) is type(model)
    assert torch.allclose(_logits(reloaded), _logits(model), atol=1e-6)


def test_emptied_sub_layers_still_run_save_and_reload(tmp_path):
    """keep_one_per_sublayer=False at a tiny ratio empties attentions: zeros + the compensation bias remain."""
    masked, report = _masked("llama", ratio=0.02, keep_one_per_sublayer=False)
    assert 0 in report["kv_heads"]
    removed = remove_pruned_groups(copy.deepcopy(masked))
    assert any(isinstance(b.attention, EmptyAttention) for b in decoder_blocks(removed))
    assert torch.allclose(_logits(removed), _logits(masked), atol=1e-5)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(removed.generate(PROMPTS[:1], **options), masked.generate(PROMPTS[:1], **options))
    save_structured(removed, str(tmp_path))
    assert torch.allclose(_logits(losparse.load(str(tmp_path))), _logits(removed), atol=1e-6)


def test_an_emptied_mlp_leaves_its_bias():
    model = tiny_decoder("mistral")
    block = decoder_blocks(model)[1]
    mask_attention(block, torch.tensor([False, True]))
    mask_mlp(block, torch.zeros(64, dtype=torch.bool), torch.full((64,), 0.1))
    expected = _logits(model)
    remove_pruned_groups(model)
    assert decoder_blocks(model)[1].neurons == 0
    assert torch.allclose(_logits(model), expected, atol=1e-5)


def test_encoders_still_save_and_load_through_the_same_files(tmp_path):
    """The decoder branch of save_structured / load_structured leaves the encoder structure as it was."""
    from conftest import tiny_bert_classifier

    from losparse.methods.structured.removal import build_structured_peer

    peer = build_structured_peer(tiny_bert_classifier().eval(), 0.5)
    save_structured(peer, str(tmp_path))
    assert "kind" not in json.loads((tmp_path / STRUCTURE_FILE).read_text())
    ids = torch.randint(5, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(losparse.load(str(tmp_path))(input_ids=ids).logits, peer(input_ids=ids).logits, atol=1e-6)
