#!/usr/bin/env python
"""Compress a transformer on SQuAD v1.1 (or your own SQuAD-format JSON) with LoSparse, then save it compact.

    python run_squad.py --model_name_or_path bert-base-uncased --dataset_name squad \
        --remaining_ratio 0.2 --low_rank_ratio 0.05 --output_dir out/squad
    python run_squad.py --config configs/squad/bert-base-uncased.yaml --remaining_ratio 0.2 \
        --dataset_name squad --output_dir out/squad-20
    python run_squad.py --model_name_or_path ./my-model --train_file train-v1.1.json \
        --validation_file dev-v1.1.json --remaining_ratio 0.3 --output_dir out/mine

`--config` fills every argument from a YAML table; explicit flags win. Reports eval_exact_match and
eval_f1 (percent) of the compact model in all_results.json and writes eval_predictions.json
({question id: answer}). Run `--help` for all flags.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from transformers import AutoModelForQuestionAnswering, AutoTokenizer, TrainingArguments, default_data_collator

from losparse import LoSparseConfig
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
from losparse.cli.tasks import squad
from losparse.training.distill import DistillationArguments
from losparse.training.preflight import check_compression_plan, load_model_config

logger = logging.getLogger("losparse")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    model_args, data_args, losparse_config, distill_args, run_args, training_args = parse_arguments(
        (ModelArguments, squad.SquadDataArguments, LoSparseConfig, DistillationArguments, RunArguments,
         TrainingArguments), argv,
        description=__doc__.split("\n\n")[0],
    )
    start_run(model_args, losparse_config, run_args, training_args, AutoModelForQuestionAnswering)

    # Everything that can be checked without the weights is checked before they load; the schedule
    # needs the number of training windows, so the data is tokenized first.
    model_config = load_model_config(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    raw = squad.load_data(data_args, model_args, model_config)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir)
    train_features, eval_features, eval_examples = squad.preprocess(raw, tokenizer, data_args)
    check_compression_plan(losparse_config, model_args.model_name_or_path, AutoModelForQuestionAnswering,
                           model_config, len(train_features), training_args, unit="training windows")

    model, teacher = load_models(AutoModelForQuestionAnswering, model_args, distill_args)

    trainer = make_trainer(
        squad.QuestionAnsweringTrainer, losparse_config, distill_args, teacher,
        allow_resume_config_change=run_args.allow_resume_config_change,
        lean_optimizer=run_args.lean_optimizer, model=model, args=training_args,
        train_dataset=train_features, eval_dataset=eval_features, eval_examples=eval_examples,
        n_best_size=data_args.n_best_size, max_answer_length=data_args.max_answer_length,
        processing_class=tokenizer, data_collator=default_data_collator,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    def evaluate() -> dict:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            os.makedirs(training_args.output_dir, exist_ok=True)
            with open(os.path.join(training_args.output_dir, "eval_predictions.json"), "w") as f:
                json.dump(trainer.eval_predictions, f, indent=2)
        return metrics

    return finish_run(trainer, tokenizer, evaluate, losparse_config, train_result.metrics, distill_args=distill_args,
                      extra_results={"task_name": data_args.task_name,
                                     "model_name_or_path": model_args.model_name_or_path})


if __name__ == "__main__":
    run_main(main)
