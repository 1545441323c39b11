#!/usr/bin/env python
"""Compress a seq2seq model (BART, T5) for summarization with LoSparse, then save it compact.

    python run_summarization.py --config configs/summarization/bart-large-xsum.yaml --task_name xsum \
        --remaining_ratio 0.3 --output_dir out/xsum-30
    python run_summarization.py --model_name_or_path facebook/bart-large --train_file train.jsonl \
        --validation_file val.jsonl --remaining_ratio 0.5 --low_rank_ratio 0.4 --num_beams 8 --output_dir out/mine
    python run_summarization.py --dataset_name cnn_dailymail --lead3 --output_dir out/lead3-cnn

`--config` fills every argument from a YAML table; explicit flags win. Run `--help` for all flags.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from losparse import LoSparseConfig, LoSparseUsageError
from losparse.cli.run import (
    ModelArguments,
    RunArguments,
    check_output_dir,
    finish_run,
    load_models,
    make_trainer,
    parse_arguments,
    run_main,
    setup_logging,
    start_run,
    write_json,
)
from losparse.cli.tasks import summarization
from losparse.training.distill import DistillationArguments
from losparse.training.preflight import check_compression_plan, load_model_config

logger = logging.getLogger("losparse")
PREDICTIONS_FILE = "generated_predictions.txt"


@dataclass
class SummarizationModelArguments(ModelArguments):
    """`ModelArguments` where the model is optional: the Lead-3 baseline needs none."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub model id or local directory with config + weights (not needed with --lead3)."},
    )


@dataclass
class SummarizationTrainingArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` that generate when evaluating by default: ROUGE needs generated text."""

    predict_with_generate: bool = field(
        default=True,
        metadata={"help": "Generate summaries (and report ROUGE) in evaluations during training; false reports the "
                          "loss only there. The final evaluation always generates."},
    )


def run_lead3(data_args: summarization.SummarizationDataArguments, model_args: ModelArguments,
              output_dir: str) -> dict:
    """Score the first three sentences of each validation article; write all_results.json."""
    raw = summarization.load_raw_datasets(data_args, cache_dir=model_args.cache_dir)
    validation = raw["validation"]
    scores = summarization.lead3_scores(validation, data_args.text_column, data_args.summary_column)
    results = {"method": "lead3", "task_name": data_args.task_name, "dataset_name": data_args.dataset_name,
               "eval_samples": len(validation), **{f"eval_{k}": v for k, v in scores.items()}}
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "all_results.json"), results)
    logger.info("Lead-3 on %d articles: %s", len(validation),
                ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return results


def evaluate_with_generation(trainer: Seq2SeqTrainer, dataset, tokenizer, data_collator, compute_metrics) -> dict:
    """One generation pass over `dataset`: the ROUGE metrics (logged by `trainer`) and PREDICTIONS_FILE.

    Generation settings come from `trainer.args`. A trainer built with `--predict_with_generate false`
    (loss-only evaluations during training) is not switched over: the pass runs on a generating
    `Seq2SeqTrainer` built for it, over the same model.
    """
    generator = trainer
    if not trainer.args.predict_with_generate:
        generator = Seq2SeqTrainer(
            model=trainer.model, args=dataclasses.replace(trainer.args, predict_with_generate=True, report_to="none"),
            data_collator=data_collator, processing_class=tokenizer, compute_metrics=compute_metrics)
    output = generator.predict(dataset, metric_key_prefix="eval")
    trainer.log(output.metrics)
    if trainer.is_world_process_zero():
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        summarization.write_predictions(os.path.join(trainer.args.output_dir, PREDICTIONS_FILE),
                                        summarization.decode_ids(tokenizer, output.predictions))
    return output.metrics


def main(argv: Optional[Sequence[str]] = None) -> dict:
    model_args, data_args, losparse_config, distill_args, run_args, training_args = parse_arguments(
        (SummarizationModelArguments, summarization.SummarizationDataArguments, LoSparseConfig, DistillationArguments,
         RunArguments, SummarizationTrainingArguments), argv, description=__doc__.split("\n\n")[0],
    )
    if data_args.lead3:
        check_output_dir(training_args.output_dir, run_args.overwrite_output_dir, None)
        setup_logging(training_args)
        return run_lead3(data_args, model_args, training_args.output_dir)
    if model_args.model_name_or_path is None:
        raise LoSparseUsageError("--model_name_or_path is required (only --lead3 runs without a model)")
    start_run(model_args, losparse_config, run_args, training_args, AutoModelForSeq2SeqLM)

    # Everything that can be checked without the weights is checked before they load.
    model_config = load_model_config(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    raw = summarization.load_data(data_args, model_args, model_config)
    check_compression_plan(losparse_config, model_args.model_name_or_path, AutoModelForSeq2SeqLM, model_config,
                           len(raw["train"]), training_args)
    if model_config.model_type == "t5" and not data_args.source_prefix:
        logger.warning("T5 was trained with task prefixes: consider --source_prefix 'summarize: '")
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir)
    tokenized = summarization.preprocess(raw, tokenizer, data_args)

    model, teacher = load_models(AutoModelForSeq2SeqLM, model_args, distill_args)
    # Generation settings go into the arguments before the trainer is built; nothing is changed on it later.
    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.val_max_target_length
    if data_args.num_beams is not None:
        training_args.generation_num_beams = data_args.num_beams
    compute_metrics = summarization.make_compute_metrics(tokenizer)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model)
    trainer = make_trainer(
        Seq2SeqTrainer, losparse_config, distill_args, teacher,
        allow_resume_config_change=run_args.allow_resume_config_change,
        lean_optimizer=run_args.lean_optimizer, model=model, args=training_args,
        train_dataset=tokenized["train"], eval_dataset=tokenized["validation"], processing_class=tokenizer,
        data_collator=collator, compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    def evaluate() -> dict:
        return evaluate_with_generation(trainer, tokenized["validation"], tokenizer, collator, compute_metrics)

    return finish_run(trainer, tokenizer, evaluate, losparse_config, train_result.metrics, distill_args=distill_args,
                      extra_results={
        "task_name": data_args.task_name, "dataset_name": data_args.dataset_name,
        "model_name_or_path": model_args.model_name_or_path,
        "generation_max_length": training_args.generation_max_length,
        "generation_num_beams": training_args.generation_num_beams,
    })


if __name__ == "__main__":
    run_main(main)
