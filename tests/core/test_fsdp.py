"""FSDP2 (fully_shard, 2 processes, gloo on CPU) prunes and saves exactly what one process does; bad backends refused.

tests/fsdp_worker.py trains a tiny Llama with a manual loop (accelerate ignores the Trainer's --fsdp on CPU,
which is why `check_training_backend` refuses it there): once plainly with batch 8, once under torchrun with
S sharded by rows over 2 ranks and batch 4 each.
"""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT as REPO_ROOT  # noqa: E402

import losparse
from losparse import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.training.trainer import check_training_backend

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = REPO_ROOT
COMPRESSIONS = ("rows-paper", "columns-reference")
RENDEZVOUS_ERRORS = ("Address already in use", "EADDRINUSE", "address already in use")


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one-process"), tmp_path_factory.mktemp("fsdp-two-processes")
    worker = os.path.join(HERE, "fsdp_worker.py")
    done = subprocess.run([sys.executable, worker, str(one)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for _ in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", _free_port(), worker, str(two)]
        done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
        # The free port is picked before torchrun binds it; another process may take it in between.
        if done.returncode == 0 or not any(text in done.stderr for text in RENDEZVOUS_ERRORS):
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return one, two


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_s_is_sharded_by_rows_and_unevenly_where_the_rows_do_not_divide(runs):
    _, two = runs
    rank0, rank1 = (_json(two / "rows-paper" / f"local-rows-rank{r}.json") for r in (0, 1))
    assert rank0["model.layers.0.mlp.gate_proj"] == 26 and rank1["model.layers.0.mlp.gate_proj"] == 25
    assert rank0["model.layers.0.self_attn.q_proj"] == rank1["model.layers.0.self_attn.q_proj"] == 16


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_both_ranks_prune_exactly_the_neurons_one_process_prunes(runs, name):
    one, two = runs
    single = _json(one / name / "masks-rank0.json")
    rank0, rank1 = (_json(two / name / f"masks-rank{r}.json") for r in (0, 1))
    assert rank0 == rank1 == single
    kept = sum(map(sum, single.values()))
    total = sum(map(len, single.values()))
    assert 0 < kept < 0.7 * total, "the run did not prune"


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_the_pruner_state_saved_by_rank_zero_holds_the_full_scores(runs, name):
    from safetensors.torch import load_file

    one, two = runs
    single = load_file(str(one / name / "pruner" / losparse.core.pruner.PRUNER_STATE_FILE))
    sharded = load_file(str(two / name / "pruner" / losparse.core.pruner.PRUNER_STATE_FILE))
    assert single.keys() == sharded.keys()
    assert single["neuron_ema"].shape == sharded["neuron_ema"].shape == (486 if name.startswith("columns") else 460,)
    assert (single["neuron_ema"] > 0).any()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_the_saved_compact_model_is_the_one_process_model(runs, name):
    one, two = runs
    single, sharded = (losparse.load(str(run / name / "model")) for run in (one, two))
    single_state, sharded_state = single.state_dict(), sharded.state_dict()
    assert single_state.keys() == sharded_state.keys()
    for key, value in single_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(sharded_state[key], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(sharded_state[key], value), key  # kept_index
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(sharded(tokens).logits, single(tokens).logits, rtol=1e-5, atol=1e-5)


def test_lpaf_and_the_uncertainty_term_are_refused_once_s_is_sharded(runs):
    _, two = runs
    refusals = _json(two / "refusals.json")
    assert refusals["lpaf"].startswith("entry-wise masks (LPAF's unstructured pruning) are not supported under FSDP")
    assert refusals["beta2"].startswith("--beta2 > 0 (the uncertainty term) is not supported under FSDP")


def _gpu_args(**fields):
    """TrainingArguments-like flags as seen on a GPU run (the CPU refusal is tested separately)."""
    return SimpleNamespace(**{"deepspeed": None, "use_cpu": False, "device": torch.device("cuda", 0), **fields})


def test_fsdp2_with_losparse_pruning_is_allowed_on_gpus():
    config = LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1)
    check_training_backend(_gpu_args(fsdp=True, fsdp_plugin_args={"fsdp_version": 2}, fsdp_config={}), config)
    check_training_backend(_gpu_args(fsdp=True, fsdp_plugin_args=None, fsdp_config={"version": 2}), config)


@pytest.mark.parametrize("args, config, message", [
    (_gpu_args(fsdp=True, fsdp_plugin_args={"fsdp_version": 1}), LoSparseConfig(),
     "--fsdp with fsdp_version 1 is not supported: FSDP1 flattens S"),
    (_gpu_args(fsdp=True, fsdp_config={"version": 2}), None, "--fsdp is not supported by this trainer"),
    (_gpu_args(fsdp=True, fsdp_config={}), LoSparseConfig(method="lpaf"),
     "--method lpaf: entry-wise masks (LPAF's unstructured pruning) are not supported under FSDP"),
    (_gpu_args(fsdp=True, fsdp_config={}), LoSparseConfig(beta2=0.85), "--beta2 > 0 (the uncertainty term)"),
    (_gpu_args(deepspeed="ds.json", fsdp=None), LoSparseConfig(), "--deepspeed is not supported: DeepSpeed frees"),
])
def test_backends_without_whole_rows_or_gradients_are_refused_in_one_line(args, config, message):
    with pytest.raises(LoSparseUsageError) as raised:
        check_training_backend(args, config)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_fsdp_on_cpu_is_refused_because_accelerate_would_silently_use_ddp(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", fsdp="full_shard",
                             fsdp_config={"fsdp_version": 2})
    with pytest.raises(LoSparseUsageError, match="--fsdp is not supported on CPU: accelerate applies FSDP only on "):
        check_training_backend(args, LoSparseConfig())
