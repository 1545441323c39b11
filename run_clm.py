#!/usr/bin/env python
"""Compress a causal language model (Llama, Qwen2, Mistral, GPT-2, OPT) with LoSparse, then save it compact.

    python run_clm.py --config configs/clm/smollm2-135m.yaml --output_dir out/smollm2-50
    python run_clm.py --model_name_or_path ./my-llama --train_file train.txt --validation_file val.jsonl \
        --block_size 512 --remaining_ratio 0.5 --low_rank_ratio 0.3 --output_dir out/mine
    python run_clm.py --model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --method finetune --output_dir out/gpt2-dense

`--config` fills every argument from a YAML table; explicit flags win. Run `--help` for all flags.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from losparse import LoSparseConfig
from losparse.cli.oneshot import OneShotArguments, calibrated_init, check_oneshot_plan, read_calibration_ids
from losparse.cli.run import (
    ModelArguments,
    RunArguments,
    finish_run,
    load_models,
    make_trainer,
    parse_arguments,
    run_main,
    start_run,
)
from losparse.cli.tasks import clm
from losparse.deploy.compact import compact
from losparse.training.distill import DistillationArguments
from losparse.training.preflight import check_compression_plan, load_model_config

logger = logging.getLogger("losparse")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    (model_args, data_args, generation_args, losparse_config, oneshot_args, distill_args, run_args,
     training_args) = parse_arguments(
        (ModelArguments, clm.CLMDataArguments, clm.GenerationArguments, LoSparseConfig, OneShotArguments,
         DistillationArguments, RunArguments, TrainingArguments), argv, description=__doc__.split("\n\n")[0],
    )
    start_run(model_args, losparse_config, run_args, training_args, AutoModelForCausalLM, oneshot=oneshot_args.oneshot)

    # Everything that can be checked without the weights is checked before they load.
    model_config = load_model_config(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    block_size = clm.resolve_block_size(data_args, model_config, model_args.model_name_or_path)
    raw = clm.load_raw_datasets(data_args, cache_dir=model_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir)
    blocks = clm.make_blocks(raw, tokenizer, block_size, data_args, training_args)
    logger.info("Data: %s, packed into blocks of %d tokens: %d training and %d validation blocks",
                ", ".join(f"{len(d)} {split} documents" for split, d in raw.items()), block_size,
                len(blocks["train"]), len(blocks["validation"]))
    calibration_ids = None
    if oneshot_args.oneshot:
        # One-shot: compressed from calibration data, no training; with --do_train the calibrated decomposition
        # (unpruned) is the start of ordinary LoSparse fine-tuning, which prunes on its schedule.
        check_oneshot_plan(oneshot_args, losparse_config, model_args.model_name_or_path, AutoModelForCausalLM,
                           model_config, fine_tune=training_args.do_train)
        calibration_ids = read_calibration_ids(tokenizer, oneshot_args.calibration_file or raw["train"]["text"],
                                               oneshot_args.num_calibration_samples, oneshot_args.calibration_seq_len,
                                               seed=training_args.seed, text_column=data_args.text_column)
    train = not oneshot_args.oneshot or training_args.do_train
    if train:
        check_compression_plan(losparse_config, model_args.model_name_or_path, AutoModelForCausalLM, model_config,
                               len(blocks["train"]), training_args, unit=f"training blocks of {block_size} tokens")

    model, teacher = load_models(AutoModelForCausalLM, model_args, distill_args)
    if oneshot_args.oneshot:
        calibrated_init(model, losparse_config, tokenizer, oneshot_args, calibration_input_ids=calibration_ids,
                        prune=not train)
        if not train:
            compact(model)
    # No metric needs the logits (vocabulary x block x blocks): evaluations keep the loss only.
    training_args.prediction_loss_only = True
    trainer = make_trainer(
        Trainer, losparse_config, distill_args, teacher,
        allow_resume_config_change=run_args.allow_resume_config_change,
        lean_optimizer=run_args.lean_optimizer, model=model, args=training_args,
        train_dataset=blocks["train"], eval_dataset=blocks["validation"], processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    train_metrics = {}
    if train:
        train_metrics = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics

    def evaluate() -> dict:
        metrics = trainer.evaluate()
        metrics["perplexity"] = clm.perplexity(metrics["eval_loss"])
        if trainer.is_world_process_zero() and generation_args.generation_max_new_tokens > 0:
            generations = clm.generate_greedy(trainer.model, tokenizer, generation_args.generation_prompts,
                                              generation_args.generation_max_new_tokens)
            os.makedirs(training_args.output_dir, exist_ok=True)
            clm.write_generations(os.path.join(training_args.output_dir, clm.GENERATIONS_FILE), generations,
                                  generation_args.generation_max_new_tokens)
            for item in generations:
                logger.info("Generation: %r -> %r", item["prompt"], item["completion"])
        return metrics

    return finish_run(trainer, tokenizer, evaluate, losparse_config, train_metrics, distill_args=distill_args,
                      extra_results={
        "dataset_name": data_args.dataset_name, "dataset_config_name": data_args.dataset_config_name,
        "model_name_or_path": model_args.model_name_or_path, "block_size": block_size,
        "train_blocks": len(blocks["train"]), "eval_blocks": len(blocks["validation"]),
        "oneshot": oneshot_args.to_dict() if oneshot_args.oneshot else None,
    })


if __name__ == "__main__":
    run_main(main)
