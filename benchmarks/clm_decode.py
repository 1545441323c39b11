"""Decode latency of causal LMs in one process: ms per new token at a batch size, interleaved with a reference.

Per token = (time of `generate` with N new tokens − time with 1) / (N − 1): the prompt's prefill and the fixed
costs cancel, what is left is one cached decode step. Greedy, eager, exactly N tokens (`min_new_tokens`), the
same random prompt for every model. The candidate and the reference run round-robin
(`common.interleaved_latency_ms`), so load from elsewhere slows both; `common.judge_timing` says whether the
numbers can be trusted (load average, spread).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import interleaved_latency_ms, judge_timing, load_average


def _generate(model: Any, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> Any:
    return lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id,
                                  disable_compile=True)


def decode_latency(models: dict[str, Any], batch_size: int, prompt_len: int = 32, new_tokens: int = 16,
                   repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """{name: ms per decode step} for each model (batch `batch_size`), plus "reliable" and "warning" (None when reliable).

    `models`: name -> causal LM (eval mode, same vocabulary). Warm-up: one call of each workload.
    """
    any_model = next(iter(models.values()))
    vocab = any_model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator)
    pad = any_model.config.eos_token_id if isinstance(any_model.config.eos_token_id, int) else 0
    fns = {}
    for name, model in models.items():
        fns[f"{name}/1"] = _generate(model, prompt, 1, pad)
        fns[f"{name}/{new_tokens}"] = _generate(model, prompt, new_tokens, pad)
    load_before = load_average()
    times = interleaved_latency_ms(fns, warmup=1, repeats=repeats)
    verdict = judge_timing({name: t["times_ms"] for name, t in times.items()}, load_before, load_average())
    result: dict[str, Any] = {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
                              "reliable": verdict.reliable, "warning": verdict.warning}
    for name in models:
        many, one = times[f"{name}/{new_tokens}"]["median_ms"], times[f"{name}/1"]["median_ms"]
        result[name] = (many - one) / (new_tokens - 1)
    return result
