"""The one-shot table tool (benchmarks/clm_oneshot_table.py) on a tiny random Llama: its best-row summary, its
shell script, and the fine-tuning flags that moved to benchmarks/clm_recovery.py (tests/benchmarks/
test_clm_recovery.py). Every row end to end: tests/methods/oneshot/test_oneshot.py."""

import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT as REPO_ROOT
from test_oneshot import _sentences

from benchmarks import clm_oneshot_table
from losparse.core.errors import LoSparseUsageError

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = "the a big small cat dog bird fish sat ran on in mat log tree pond .".split()
SEQ_LEN = 32


def _tiny_llama_dir(directory: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # a confident random model: a high perplexity to recover from
    model.save_pretrained(directory)
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _tiny_llama_dir(str(tmp_path_factory.mktemp("table-llama")))


def write_corpus(directory, seed: int) -> str:
    """300 toy-grammar documents, one per line, in `directory`/corpus.txt."""
    path = directory / "corpus.txt"
    path.write_text("\n".join(_sentences(300, seed)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("table-text"), seed=3)


def _argv(llama_dir, corpus, output_dir, *extra):
    return ["--model_name_or_path", llama_dir, "--text_file", corpus, "--ratios", "0.8", "0.5",
            "--num_calibration_samples", "6", "--num_heldout_samples", "5", "--seq_len", str(SEQ_LEN),
            "--batch_size", "4", "--decode_batch_sizes", "--output_dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def table_run(llama_dir, corpus, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("table-oneshot")
    return output_dir, clm_oneshot_table.main(_argv(llama_dir, corpus, output_dir, "--rows", "losparse", "lowrank"))


def test_the_table_names_the_best_row_of_every_ratio(table_run):
    output_dir, result = table_run
    for ratio in result["ratios"]:
        cells = [c for c in result["cells"] if c["ratio"] == ratio]
        assert result["best"][f"{ratio:g}"] == min(cells, key=lambda c: c["perplexity"])["row"]
    table = (output_dir / clm_oneshot_table.TABLE_FILE).read_text()
    assert "Best row per ratio (lowest perplexity): " + "; ".join(
        f"ratio {r:g}: **{result['best'][f'{r:g}']}**" for r in result["ratios"]) in table
    assert json.loads((output_dir / clm_oneshot_table.JSON_FILE).read_text())["best"] == result["best"]


def test_fine_tuning_moved_to_the_recovery_tool_one_line(llama_dir, corpus, tmp_path):
    with pytest.raises(LoSparseUsageError, match=r"^--finetune_steps moved to its own tool .*: python -m "
                                                 r"benchmarks.clm_recovery \(scripts/clm_recovery.sh\)$"):
        clm_oneshot_table.main(_argv(llama_dir, corpus, tmp_path, "--finetune_steps", "20"))
    assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.mark.parametrize("script, module, env, extra", [
    ("clm_oneshot_table.sh", "benchmarks.clm_oneshot_table", {"LLMCOMPRESSOR_PYTHON": "/x/python"},
     ["--llmcompressor_python", "/x/python"]),
    ("clm_recovery.sh", "benchmarks.clm_recovery", {"STEPS": "0 25 100", "RATIOS": "0.5"},
     ["--steps", "0", "25", "100", "--ratios", "0.5"]),
])
def test_the_scripts_dry_run_prints_their_command(script, module, env, extra):
    out = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", script), "--seed", "1"],
                         env={**os.environ, "DRY_RUN": "1", "OUTPUT_DIR": "out/x", **env},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[1:] == ["-m", module, "--output_dir", "out/x", *extra, "--seed", "1"]


@pytest.mark.parametrize("batches", [[], [1, 8]])
def test_the_cost_table_has_as_many_cells_per_line_as_columns(batches):
    decode = {str(b): {"ms": 2.0, "dense_ms": 3.0, "reliable": True} for b in batches}
    result = {"dense": {"mb": 10.0}, "decode_batch_sizes": batches, "decode_new_tokens": 4, "threads": 1,
              "cells": [{"row": "lowrank", "ratio": 0.5, "storage": "compact", "mb": 5.0, "decode": decode}]}
    rows = [line for line in clm_oneshot_table.format_cost_table(result).splitlines() if line.startswith("|")]
    assert len(rows) == 3
    assert {line.count("|") for line in rows} == {5 + len(batches)}
