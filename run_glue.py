#!/usr/bin/env python
"""Compress a transformer on a GLUE task (or your own CSV/JSON) with LoSparse, then save it compact.

    python run_glue.py --model_name_or_path bert-base-uncased --task_name rte \
        --remaining_ratio 0.2 --low_rank_ratio 0.02 --output_dir out/rte
    python run_glue.py --config configs/glue/deberta-v3-base.yaml --task_name mnli --remaining_ratio 0.2 \
        --output_dir out/mnli-20

`--config` fills every argument from a YAML table; explicit flags win. Run `--help` for all flags.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from losparse import LoSparseConfig
from losparse.cli.oneshot import OneShotArguments, calibrated_init, check_oneshot_plan, read_calibration_ids
from losparse.cli.run import RunArguments, finish_run, load_models, make_trainer, parse_arguments, run_main, start_run
from losparse.cli.tasks import glue
from losparse.training.distill import DistillationArguments
from losparse.training.preflight import check_compression_plan, load_model_config

logger = logging.getLogger("losparse")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    model_args, data_args, losparse_config, oneshot_args, distill_args, run_args, training_args = parse_arguments(
        (glue.GlueModelArguments, glue.GlueDataArguments, LoSparseConfig, OneShotArguments, DistillationArguments,
         RunArguments, TrainingArguments),
        argv,
        description=__doc__.split("\n\n")[0],
    )
    start_run(model_args, losparse_config, run_args, training_args,
              AutoModelForSequenceClassification, oneshot=oneshot_args.oneshot)

    # Everything that can be checked without the weights is checked before they load.
    model_config = load_model_config(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    data = glue.load_data(data_args, model_args, model_config)
    check_compression_plan(losparse_config, model_args.model_name_or_path, AutoModelForSequenceClassification,
                           model_config, len(data.raw["train"]), training_args, num_labels=data.num_labels)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir)
    datasets = glue.preprocess(data, tokenizer, data_args)
    calibration_ids = None
    if oneshot_args.oneshot:
        # --oneshot here is the calibrated start of fine-tuning (--init oneshot): activation-aware U·V and
        # S = W - U·V from the training texts (or --calibration_file), then LoSparse prunes S on its schedule.
        check_oneshot_plan(oneshot_args, losparse_config, model_args.model_name_or_path,
                           AutoModelForSequenceClassification, model_config, fine_tune=True)
        texts = [" ".join(str(row[key]) for key in data.text_keys if key) for row in data.raw["train"]]
        calibration_ids = read_calibration_ids(tokenizer, oneshot_args.calibration_file or texts,
                                               oneshot_args.num_calibration_samples, oneshot_args.calibration_seq_len,
                                               seed=training_args.seed)

    model, teacher = load_models(AutoModelForSequenceClassification, model_args, distill_args, **data.model_kwargs(),
                                 ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
    glue.record_labels(model.config, data)
    if oneshot_args.oneshot:
        calibrated_init(model, losparse_config, tokenizer, oneshot_args, calibration_input_ids=calibration_ids,
                        prune=False)
    trainer = make_trainer(
        Trainer, losparse_config, distill_args, teacher,
        allow_resume_config_change=run_args.allow_resume_config_change,
        lean_optimizer=run_args.lean_optimizer, model=model, args=training_args,
        train_dataset=datasets["train"], eval_dataset=datasets["validation"], processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=glue.make_compute_metrics(data_args.metric_task, data.is_regression, data.num_labels),
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    def evaluate() -> dict:
        metrics = trainer.evaluate()
        if "validation_mismatched" in datasets:
            metrics.update(trainer.evaluate(datasets["validation_mismatched"], metric_key_prefix="eval_mismatched"))
        return metrics

    return finish_run(trainer, tokenizer, evaluate, losparse_config, train_result.metrics, distill_args=distill_args,
                      extra_results={"task_name": data_args.task_name,
                                     "model_name_or_path": model_args.model_name_or_path,
                                     "oneshot": oneshot_args.to_dict() if oneshot_args.oneshot else None})


if __name__ == "__main__":
    run_main(main)
