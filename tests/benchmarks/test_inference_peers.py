"""Peers in the inference benchmark (`--peers`, `--sweep`, `--plot`), on tiny-bert; no real timing."""

import copy
import json

import pytest
import torch

import losparse
from benchmarks import inference as inference_benchmark
from benchmarks.common import LinearCostCounter, build_model, compress_for_benchmark, random_inputs
from benchmarks.peers import build_peers, check_peer_outputs, peer_target_params
from losparse.methods.structured.blocks import encoder_blocks, group_sizes

# tiny-bert: hidden 64, 4 heads of 16, FFN 256, 2 layers
HEAD_GROUP = 4 * 64 * 16
LOW_RANK_UNIT = 64 + 256  # one more rank of the widest layer


@pytest.fixture(scope="module")
def pair():
    compact = build_model("tiny-bert", seed=0)
    compress_for_benchmark(compact, 0.3, 0.05, seed=0)
    dense = losparse.merge(copy.deepcopy(compact)).eval()
    return dense, compact


def test_peers_match_the_compact_size_within_one_group(pair):
    dense, compact = pair
    target = losparse.parameter_report(compact)["target_params"]
    peers = build_peers(dense, compact, seed=0)
    assert set(peers) == {"structured", "lowrank"}
    structured = peer_target_params("structured", peers["structured"])
    assert 0 <= target - structured < HEAD_GROUP
    assert abs(peer_target_params("lowrank", peers["lowrank"]) - target) <= LOW_RANK_UNIT
    assert not losparse.core.decompose.losparse_layers(peers["structured"])  # plain smaller nn.Linear layers
    assert losparse.parameter_report(peers["lowrank"])["sparse_share"] == 0.0
    inputs = random_inputs(compact, "classification", 2, 12)
    checks = check_peer_outputs(peers, inputs)
    assert all(c["finite"] and c["output_scale"] > 0 for c in checks.values())
    with torch.inference_mode():
        assert not torch.allclose(peers["structured"](**inputs).logits, dense(**inputs).logits)
    assert peer_target_params("structured", dense) == 2 * (4 * 64 * 64 + 2 * 64 * 256)  # the dense model is untouched


def test_cost_counter_handles_a_layer_with_every_head_removed(pair):
    from losparse.methods.structured.removal import build_structured_peer

    dense, _ = pair
    scores = torch.rand(group_sizes(encoder_blocks(dense)).shape, dtype=torch.float64)
    scores[:4] = -1.0  # all heads of layer 0 last
    peer = build_structured_peer(dense, 0.5, scores=scores)
    assert encoder_blocks(peer)[0].attention_output.in_features == 0
    inputs = random_inputs(peer, "classification", 2, 8)
    with torch.inference_mode(), LinearCostCounter(peer) as cost:
        logits = peer(**inputs).logits
    assert torch.isfinite(logits).all() and cost.flops > 0


def _run(tmp_path, *extra):
    argv = ["--arch", "tiny-bert", "--device", "cpu", "--remaining_ratio", "0.3", "--low_rank_ratio", "0.05",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "out.json"), *extra]
    return inference_benchmark.main(argv)


def test_sweep_with_peers_records_all_four_models_and_plots(tmp_path):
    plot = tmp_path / "speedup.png"
    rc = _run(tmp_path, "--peers", "--sweep", "--sweep_batch_sizes", "1,2", "--sweep_seq_lens", "8,16",
              "--plot", str(plot))
    assert rc == 0
    result = json.loads((tmp_path / "out.json").read_text())
    shapes = [(r["sweep_batch_size"], r["sweep_seq_len"]) for r in result["results"]]
    assert shapes == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for record in result["results"]:
        assert record["tokens_per_call"] == record["sweep_batch_size"] * record["sweep_seq_len"]
        for name in ("dense", "compact", "structured", "lowrank"):
            assert record[f"{name}_ms"] > 0
        for name in ("structured", "lowrank"):
            assert record[f"speedup_vs_{name}"] == pytest.approx(record[f"{name}_ms"] / record["compact_ms"])
    assert set(result["peers"]) == {"structured", "lowrank"}
    assert 0 <= -result["peers"]["structured"]["target_params_minus_compact"] < HEAD_GROUP
    assert abs(result["peers"]["lowrank"]["target_params_minus_compact"]) <= LOW_RANK_UNIT
    assert result["peers"]["structured"]["output_check"]["finite"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_plain_run_without_peers_keeps_two_models(tmp_path):
    assert _run(tmp_path, "--batch_size", "1", "--seq_len", "8") == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert "peers" not in result and "structured_ms" not in result["results"][0]


def test_bad_peer_and_sweep_flags(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("should have been refused before building the models")

    monkeypatch.setattr(inference_benchmark, "build_pair", refuse)
    assert inference_benchmark.main(["--arch", "tiny-bart", "--device", "cpu", "--peers"]) == 2
    assert "--peers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        inference_benchmark.main(["--arch", "tiny-bert", "--device", "cpu", "--plot", str(tmp_path / "p.png")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        inference_benchmark.main(["--arch", "tiny-bert", "--device", "cpu", "--sweep", "--sweep_seq_lens", "8,x"])


def test_contiguous_and_optimize_keep_the_output_check_and_are_recorded(tmp_path):
    assert _run(tmp_path, "--contiguous", "--optimize", "--batch_size", "2", "--seq_len", "8") == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["contiguous"]["contiguous_layers"] > 0  # the FFN input layers now slice
    assert sum(result["optimize"]["chosen"].values()) == 12  # every compact layer of tiny-bert got a form


def test_a_decoder_gets_the_structured_decoder_peer_timed_in_prefill_and_decode(tmp_path):
    argv = ["--arch", "tiny-llama", "--device", "cpu", "--remaining_ratio", "0.5", "--low_rank_ratio", "0.2",
            "--batch_size", "2", "--seq_len", "16", "--max_new_tokens", "4", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--peers", "--json", str(tmp_path / "out.json")]
    assert inference_benchmark.main(argv) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    workloads = {r["workload"] for r in result["results"]}
    assert {"prefill", "decode"} <= workloads
    for record in result["results"]:
        assert record["structured_ms"] > 0 and record["lowrank_ms"] > 0
    # one key/value group of tiny-llama: 4 matrices x 64 x 16; one FFN neuron: 3 x 64
    assert abs(result["peers"]["structured"]["target_params_minus_compact"]) < 4 * 64 * 16
