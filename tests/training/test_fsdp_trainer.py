"""`run_clm.py --fsdp` through the Trainer and accelerate's FSDP2 (2 processes, gloo, CPU) = one process.

tests/fsdp_trainer_worker.py lets accelerate apply FSDP on CPU (it does so only on accelerators); everything
else is the production path. One process trains with batch 4; two FSDP ranks with batch 2 each, so both see the
same examples per step. The saved compact models must hold the same kept neurons and the same tensors, and the
reported perplexity must agree. Six steps of 4 stay inside the first epoch of the 27 training blocks (an epoch's
last, partial batch would be padded differently by one process and by two), and the 6 evaluation blocks split
3 + 3 over the ranks, so no rank's batch is padded with repeated blocks.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT as REPO_ROOT
from safetensors.torch import load_file
from test_clm import _argv, _save_model, data_files  # noqa: F401  (fixture)
from test_fsdp import RENDEZVOUS_ERRORS, _env, _free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = REPO_ROOT
FSDP_CONFIG = json.dumps({"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                          "reshard_after_forward": True})


def _run(command):
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_files):  # noqa: F811
    model_dir = _save_model(tmp_path_factory.mktemp("tiny-llama-fsdp"), "llama")
    one, two = tmp_path_factory.mktemp("one") / "out", tmp_path_factory.mktemp("two") / "out"
    losparse_flags = ["--remaining_ratio", "0.5", "--low_rank_ratio", "0.1", "--max_steps", "6",
                      "--pruning_warmup_steps", "1", "--pruning_final_steps", "2", "--pruning_interval", "2",
                      "--seed", "0", "--logging_steps", "1"]
    worker = os.path.join(HERE, "fsdp_trainer_worker.py")
    _run([sys.executable, os.path.join(ROOT, "run_clm.py"), *_argv(model_dir, data_files, one), *losparse_flags])
    for _ in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", _free_port(), worker, *_argv(model_dir, data_files, two),
                   *losparse_flags, "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3",
                   "--fsdp", "full_shard",
                   "--fsdp_config", FSDP_CONFIG]
        done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
        if done.returncode == 0 or not any(text in done.stderr for text in RENDEZVOUS_ERRORS):
            break
    assert done.returncode == 0, done.stderr[-4000:]
    return one, two, done.stderr


def test_the_run_really_was_sharded_by_accelerates_fsdp2(runs):
    _, two, _ = runs
    for rank in (0, 1):
        seen = json.loads((two / f"fsdp-rank{rank}.json").read_text())
        assert seen["fsdp_module"] and seen["sharded_sparse"] > 0
        assert seen["sharded_sparse"] == seen["sparse_layers"]


def test_two_fsdp_ranks_save_the_same_compact_model_as_one_process(runs):
    one, two, _ = runs
    first, second = (load_file(str(d / "losparse_model.safetensors")) for d in (one, two))
    assert first.keys() == second.keys()
    kept = [k for k in first if k.endswith("kept_index") or "kept" in k]
    assert kept, "the compact model holds no kept-neuron indices"
    for name in first:
        if first[name].dtype in (torch.int64, torch.int32, torch.bool):
            assert torch.equal(first[name], second[name]), name
        else:
            torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5, msg=name)


def test_both_report_the_same_perplexity_and_ratio(runs):
    one, two, _ = runs
    a, b = (json.loads((d / "all_results.json").read_text()) for d in (one, two))
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["compression"]["remaining_ratio"] == pytest.approx(a["compression"]["remaining_ratio"])
    assert 0.4 < a["compression"]["remaining_ratio"] < 0.6
