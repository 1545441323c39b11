"""`structured_decoder_oneshot`: FLAP / Wanda-sp groups of Llama-family decoders, the budget, bias compensation,
the refusals. Tiny random Llama / Qwen2 / Mistral models (hidden 32, 2 layers, 4 query / 2 key-value heads)."""

import copy

import pytest
import torch
from torch import nn

from losparse import LoSparseUsageError
from losparse.methods.structured.decoder_blocks import decoder_blocks, decoder_target_params
from losparse.methods.structured.decoder_calibration import (
    ChannelStatistics,
    capture_block_inputs,
    record_inputs,
    run_block,
)
from losparse.methods.structured.decoder_masking import compensate_bias, mask_attention, mask_mlp
from losparse.methods.structured.decoder_oneshot import structured_decoder_oneshot

VOCAB = 64


def tiny_decoder(kind: str = "llama", seed: int = 0, kv_heads: int = 2) -> nn.Module:
    """A random two-layer decoder: hidden 32, 4 query heads of 8, `kv_heads` key/value heads, FFN 64."""
    import transformers

    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=kv_heads,
                                                 intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


def calibration_ids(samples: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))


def test_groups_cover_the_seven_matrices_with_qwen2_biases():
    model = tiny_decoder("qwen2")
    blocks = decoder_blocks(model)
    dense = sum(m.weight.numel() for b in blocks for m in (*b.qkv, b.o_proj, *b.gate_up, b.down_proj))
    assert decoder_target_params(blocks) == dense
    block = blocks[0]
    assert (block.kv_groups, block.queries_per_kv, block.head_dim) == (2, 2, 8)
    assert block.group_params == (2 * 2 + 2) * 8 * 32 and block.neuron_params == 3 * 32
    assert all(m.bias is not None for m in block.qkv) and block.o_proj.bias is None


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_achieved_ratio_is_within_one_group_of_the_target(kind, ratio):
    model = tiny_decoder(kind)
    blocks = decoder_blocks(model)
    dense, largest = decoder_target_params(blocks), blocks[0].group_params
    report = structured_decoder_oneshot(model, calibration_ids(), ratio, batch_size=4, show_progress=False)
    assert report["target_params"] <= ratio * dense + 0.5
    assert ratio * dense - report["target_params"] < largest
    assert report["target_params"] == decoder_target_params(decoder_blocks(model))  # counted from the tensors
    assert report["remaining_ratio"] == pytest.approx(report["target_params"] / dense)
    assert report["kv_heads"] == [b.kv_groups for b in decoder_blocks(model)]
    assert min(report["kv_heads"]) >= 1 and min(report["intermediate_sizes"]) >= 1  # one group per sub-layer kept
    assert report["attention_heads"] == [2 * k for k in report["kv_heads"]]


@pytest.mark.parametrize("score, recalibrate", [("wanda", True), ("flap", False), ("wanda", False)])
def test_wanda_scores_and_flap_single_pass(score, recalibrate):
    model = tiny_decoder("llama", kv_heads=4)  # plain multi-head attention too
    dense = decoder_target_params(decoder_blocks(model))
    report = structured_decoder_oneshot(model, calibration_ids(), 0.6, score=score, recalibrate=recalibrate,
                                        show_progress=False)
    assert 0.6 * dense - report["target_params"] < decoder_blocks(model)[0].group_params
    assert (report["score"], report["recalibrated"]) == (score, recalibrate)
    assert torch.isfinite(model(calibration_ids(2, 8, seed=5)).logits).all()


def test_compensation_removes_the_mean_of_the_error():
    """b += W[:, R]·E[x_R]: the compensated output error has zero mean over the calibration inputs."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 4, bias=False)
    x = torch.randn(200, 6) + torch.tensor([0.0, 2.0, 0.0, -1.0, 0.5, 0.0])
    stats = ChannelStatistics(6, "cpu")
    stats.add(x)
    dense = linear(x)
    removed = torch.tensor([False, True, False, True, True, False])
    with torch.no_grad():
        compensate_bias(linear, removed, stats.mean())
        linear.weight[:, removed] = 0.0
    error = linear(x) - dense
    assert linear.bias is not None
    assert error.mean(dim=0).abs().max() < 1e-5


def _block_error(model: nn.Module, compensate: bool) -> float:
    """Calibration output error (Σ squared) of block 0 with half its groups masked, with or without compensation."""
    blocks = decoder_blocks(model)
    states = capture_block_inputs(model, blocks[0].layer, calibration_ids(), 4)
    stats, dense = record_inputs(blocks[0].layer, {"o": blocks[0].o_proj, "down": blocks[0].down_proj}, states)
    pruned = copy.deepcopy(model)
    block = decoder_blocks(pruned)[0]
    mask_attention(block, torch.tensor([True, False]), stats["o"].mean() if compensate else None)
    mask_mlp(block, torch.arange(64) % 2 == 0, stats["down"].mean() if compensate else None)
    outputs = run_block(block.layer, states)
    return sum(float((o - d).square().sum()) for (o, _), (d, _) in zip(outputs, dense))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bias_compensation_lowers_the_block_output_error(kind):
    model = tiny_decoder(kind)
    with_compensation, without = _block_error(model, True), _block_error(model, False)
    assert with_compensation < 0.95 * without


def test_bias_compensation_lowers_the_model_output_error():
    model = tiny_decoder("llama")
    ids = calibration_ids()
    with torch.no_grad():
        dense = model(ids).logits
    errors = []
    for compensate in (True, False):
        pruned = copy.deepcopy(model)
        structured_decoder_oneshot(pruned, ids, 0.6, bias_compensation=compensate, show_progress=False)
        with torch.no_grad():
            errors.append(float((pruned(ids).logits - dense).square().mean()))
    assert errors[0] < errors[1]


def _one_line_error(call) -> str:
    with pytest.raises(LoSparseUsageError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unsupported_family_is_refused_in_one_line():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    message = _one_line_error(lambda: structured_decoder_oneshot(gpt2, calibration_ids(), 0.5, show_progress=False))
    assert "'gpt2'" in message and "llama, qwen2, mistral" in message


@pytest.mark.parametrize("ratio", [0, 1.5, -0.2, float("nan"), "0.5", True])
def test_bad_ratio_is_refused_in_one_line_naming_it(ratio):
    model = tiny_decoder()
    message = _one_line_error(lambda: structured_decoder_oneshot(model, calibration_ids(), ratio,
                                                                 show_progress=False))
    assert message.startswith(f"remaining_ratio {ratio!r} ")
    assert decoder_target_params(decoder_blocks(model)) == 9216 * 2  # untouched


@pytest.mark.parametrize("kwargs, expected", [
    ({"score": "magnitude"}, "score 'magnitude' is not known; choose one of: flap, wanda"),
    ({"batch_size": 0}, "batch_size 0 must be a positive integer"),
    ({"calibration_input_ids": torch.zeros(0, 4, dtype=torch.long)}, "calibration token ids"),
    ({"remaining_ratio": 0.01}, "the least that keeps one key/value group and one FFN neuron per layer"),
])
def test_bad_options_are_refused_in_one_line(kwargs, expected):
    arguments = {"calibration_input_ids": calibration_ids(), "remaining_ratio": 0.5, **kwargs}
    model = tiny_decoder()
    assert expected in _one_line_error(lambda: structured_decoder_oneshot(model, show_progress=False, **arguments))
