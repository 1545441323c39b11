"""What the run scripts share: argument parsing with YAML tables, one-line errors, output handling.

Configuration has one source of truth per concern — a dataclass (`LoSparseConfig`, the task's data
arguments, `TrainingArguments`, ...). A `--config FILE.yaml` fills them and explicit CLI flags win:
the YAML is turned into flags placed *before* the user's, and argparse keeps the last value given.

Every YAML key must be a field of one of the script's dataclasses; the table layout and its
resolution order are `losparse.cli.yaml_config`'s (the one resolver, shared with scripts/reproduce.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import datasets
import torch
import transformers
from transformers import HfArgumentParser, set_seed

from losparse.cli.yaml_config import resolve_yaml_config, to_flags
from losparse.core.checkpoint import check_same_compression, list_checkpoints, resolve_resume_checkpoint
from losparse.core.errors import LoSparseUsageError
from losparse.core.sharding import is_fsdp_model, unshard_model
from losparse.deploy.serialization import load
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.methods import get_method, run_artifact_dirs
from losparse.training.distill import load_teacher
from losparse.training.pickles import check_checkpoint_pickles, check_model_weights, unsafe_pickle_error

logger = logging.getLogger("losparse")


@dataclass
class ModelArguments:
    """Which pretrained model to start from (a hub name for users with internet, or a local directory)."""

    model_name_or_path: str = field(metadata={"help": "Hub model id or local directory with config + weights."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models/datasets are cached."})


@dataclass
class RunArguments:
    """Arguments about the run itself rather than the model, data or compression."""

    config: Optional[str] = field(
        default=None,
        metadata={"help": "YAML hyperparameter table (see configs/); explicit CLI flags override its values."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into an existing non-empty --output_dir: the previous run's model, results "
                          "and checkpoints there are removed first (other files are kept)."},
    )
    allow_resume_config_change: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint even though its compression settings (ratio, method, schedule, total "
                          "steps) differ from this run's; by default that is refused."},
    )
    lean_optimizer: bool = field(
        default=False,
        metadata={"help": "Keep the AdamW moments of the sparse parts S in bf16 (stochastic rounding; S itself and "
                          "everything else stay as they are): LoSparse fine-tuning then needs less memory than dense "
                          "fine-tuning. Changes the trajectory slightly (README: Memory)."},
    )


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit: the way every bad input ends."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_main(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> Any:
    """Call an entry script's `main`, turning usage errors into one line and exit code 2."""
    try:
        return main(argv)
    except LoSparseUsageError as exc:
        fail(str(exc))


def _field_names(dataclass_types: Sequence[type]) -> set[str]:
    return {f.name for t in dataclass_types for f in dataclasses.fields(t)}


def _gives_flag(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def parse_arguments(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None,
                    description: Optional[str] = None) -> tuple:
    """Parse CLI flags (plus an optional `--config` YAML) into instances of `dataclass_types`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    task_defaults = [f.default for t in dataclass_types for f in dataclasses.fields(t)
                     if f.name == "task_name" and isinstance(f.default, str)]
    pre.add_argument("--task_name", default=task_defaults[0] if task_defaults else None)
    pre.add_argument("--remaining_ratio", type=float)
    known, _ = pre.parse_known_args(argv)
    yaml_flags: list[str] = []
    if known.config:
        values = resolve_yaml_config(known.config, known.task_name, known.remaining_ratio,
                                     _field_names(dataclass_types))
        yaml_flags = to_flags(values)
    wants_help = _gives_flag(argv, "--help") or _gives_flag(argv, "-h")
    if "output_dir" in _field_names(dataclass_types) and not wants_help and not _gives_flag(yaml_flags + argv,
                                                                                             "--output_dir"):
        # transformers 5 would default it to ./trainer_output and fill the current directory with checkpoints.
        raise LoSparseUsageError("--output_dir is required (where the compressed model, results and checkpoints go)")
    parser = HfArgumentParser(dataclass_types, description=description)
    try:
        return parser.parse_args_into_dataclasses(args=yaml_flags + argv, look_for_args_file=False)
    except LoSparseUsageError:
        raise
    except ValueError as exc:
        raise LoSparseUsageError(str(exc).strip().splitlines()[0]) from None


def check_output_dir(output_dir: Optional[str], overwrite: bool, resume_from_checkpoint: Optional[str]) -> None:
    """Refuse to write into a non-empty directory unless asked to (or resuming a run there)."""
    if not output_dir:
        raise LoSparseUsageError("--output_dir is required")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise LoSparseUsageError(f"--output_dir {output_dir!r} is an existing file, not a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite and not resume_from_checkpoint:
        raise LoSparseUsageError(
            f"--output_dir {output_dir!r} exists and is not empty; pass --overwrite_output_dir to write into it, "
            "--resume_from_checkpoint to continue a run there, or choose another directory"
        )


#: What a run writes into its output_dir; `--overwrite_output_dir` removes these first, so no loader ever
#: picks up an artifact of the previous run (e.g. an old compact model beside a new dense one).
RUN_ARTIFACTS = ("losparse_config.json", "losparse_model.safetensors", "all_results.json", "generations.json",
                 "structured_pruning.json", "cofi_pruning.json")


def remove_stale_artifacts(output_dir: str) -> list[str]:
    """Delete what an earlier run left in `output_dir` that this run will not overwrite (our files only)."""
    removed = []
    for name in RUN_ARTIFACTS:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    for checkpoint in list_checkpoints(output_dir) + [os.path.join(output_dir, d) for d in run_artifact_dirs()
                                                      if os.path.isdir(os.path.join(output_dir, d))]:
        shutil.rmtree(checkpoint)
        removed.append(os.path.basename(checkpoint))
    return removed


def _parent_command_line() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def _flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def check_launch(training_args: Any, script: str = "run_glue.py") -> None:
    """Refuse multi-process launches that would not be one distributed run.

    - `torchrun --nproc_per_node N` on a machine without GPUs and without `--use_cpu true`: the
      processes never join one process group, so N full runs would race on one output_dir.
    - `accelerate launch --cpu --num_processes N`: accelerate starts a single process and ignores N.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and training_args.world_size == 1:
        raise LoSparseUsageError(
            f"{world_size} processes were launched (WORLD_SIZE={world_size}) but they are not one distributed run "
            "(no GPU, and --use_cpu is not set), so each would train the whole model into the same --output_dir; "
            f"on CPUs run: torchrun --nproc_per_node {world_size} {script} ... --use_cpu true"
        )
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and world_size == 1:
        parent = _parent_command_line()
        requested = _flag_value(parent, "--num_processes")
        if any("accelerate" in part for part in parent[:3]) and requested and requested.isdigit() and int(requested) > 1:
            raise LoSparseUsageError(
                f"accelerate launch --cpu starts one process and ignores --num_processes {requested}; for "
                f"{requested} CPU processes run: torchrun --nproc_per_node {requested} {script} ... --use_cpu true"
            )


def resolve_resume(model_args: Any, losparse_config: Any, run_args: Any, training_args: Any) -> None:
    """Check `--resume_from_checkpoint` before anything loads, and pin `true` to one complete checkpoint.

    The checkpoint must be complete (see `losparse.core.checkpoint`), its pickles (optimizer, scheduler, RNG
    states, ...) loadable with torch's safe loader (`losparse.training.pickles`), and written with the same
    compression settings (the total-steps comparison follows in the trainer, once the data size is known).
    """
    spec = losparse_config.method_spec
    needs_pruner = (spec.decomposes or spec.prunes_structures) and not os.path.isfile(
        os.path.join(model_args.model_name_or_path, LOSPARSE_CONFIG_FILE))
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir,
                                           needs_pruner=needs_pruner, needs_optimizer=not training_args.save_only_model)
    training_args.resume_from_checkpoint = checkpoint
    if checkpoint is not None:
        check_checkpoint_pickles(checkpoint)  # a pickle the safe loader refuses: one line now, not a traceback later
    if checkpoint is not None and needs_pruner:
        recorded_as = get_method(losparse_config.method).checkpoint_config(losparse_config)
        if recorded_as is not None:
            check_same_compression(checkpoint, recorded_as, allow_change=run_args.allow_resume_config_change)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)


def setup_logging(training_args: Any) -> None:
    """Readable logs on stdout; only the main process talks at INFO level under DDP."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level)
    logging.getLogger("losparse").setLevel(level)
    transformers.utils.logging.set_verbosity(max(level, training_args.get_process_log_level()))
    if training_args.disable_tqdm:

        datasets.disable_progress_bars()


def start_run(model_args: Any, losparse_config: Any, run_args: Any, training_args: Any, auto_class: Any,
              oneshot: bool = False) -> None:
    """Everything before data and weights are loaded: the checks that need neither, logging, seeding. `oneshot`:
    the run compresses from calibration data first (`--oneshot`)."""
    check_launch(training_args, script=os.path.basename(sys.argv[0]) or "run_glue.py")
    check_output_dir(training_args.output_dir, run_args.overwrite_output_dir, training_args.resume_from_checkpoint)
    setup_logging(training_args)  # before the resume check, which logs the incomplete checkpoints it skips
    resolve_resume(model_args, losparse_config, run_args, training_args)
    if training_args.dataloader_pin_memory and not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # no accelerator: pinning does nothing but warn every run
    get_method(losparse_config.method).check(losparse_config, model_args.model_name_or_path, auto_class,
                                             cache_dir=model_args.cache_dir, oneshot=oneshot)
    if run_args.overwrite_output_dir and not training_args.resume_from_checkpoint and training_args.should_save:
        removed = remove_stale_artifacts(training_args.output_dir)
        if removed:
            logger.info("--overwrite_output_dir: removed the previous run's %s", ", ".join(removed))
    set_seed(training_args.seed)


def load_models(auto_class: Any, model_args: Any, distill_args: Any = None, **model_kwargs: Any) -> tuple[Any, Any]:
    """The student and, when distilling, the frozen teacher.

    A `--model_name_or_path` that is a LoSparse compact checkpoint is loaded as such (`losparse.load`):
    training then continues on the compressed model, which is the distillation "after" stage. Where
    that model was compressed from (`model.compressed_from`) comes from the checkpoint's own manifest
    (`base_model`); a checkpoint written before the manifest recorded it falls back to the
    `model_name_or_path` of the all_results.json beside it.
    """
    path = model_args.model_name_or_path
    distills = distill_args is not None and distill_args.enabled
    # Pickled weights the safe loader refuses: one line before anything loads (and never run).
    check_model_weights(path, "--model_name_or_path")
    if distills:
        check_model_weights(distill_args.teacher_model_name_or_path, "--teacher_model_name_or_path")
    if os.path.isfile(os.path.join(path, LOSPARSE_CONFIG_FILE)):
        model = load(path).train()
        previous = os.path.join(path, "all_results.json")
        if model.compressed_from is None and os.path.isfile(previous):
            with open(previous) as f:
                model.compressed_from = json.load(f).get("model_name_or_path")
    elif distills and distill_args.distill_stage == "after":
        raise LoSparseUsageError(
            f"--distill_stage after trains an already compressed model, but --model_name_or_path {path!r} is not a "
            "LoSparse checkpoint (the output_dir of a compression run)"
        )
    else:
        try:
            model = auto_class.from_pretrained(path, cache_dir=model_args.cache_dir, **model_kwargs)
        except (pickle.UnpicklingError, RuntimeError) as exc:  # a hub model's pickle, refused by torch itself
            error = unsafe_pickle_error(exc, "--model_name_or_path", path)
            if error is None:
                raise
            raise error from None
    teacher = None
    if distills:
        teacher = load_teacher(distill_args.teacher_model_name_or_path, auto_class, cache_dir=model_args.cache_dir)
    return model, teacher


def make_trainer(trainer_class: type, losparse_config: Any, distill_args: Any = None, teacher_model: Any = None,
                 allow_resume_config_change: bool = False, lean_optimizer: bool = False,
                 **trainer_kwargs: Any) -> Any:
    """The run's trainer, built once by the method's own hook (`CompressionMethod.make_trainer`).

    `lean_optimizer`: AdamW with bf16 moments for S (`losparse.training.optim.LeanAdamW`), for pruning runs.
    """
    return get_method(losparse_config.method).make_trainer(
        trainer_class, losparse_config, teacher_model=teacher_model, distill_args=distill_args,
        allow_resume_config_change=allow_resume_config_change, lean_optimizer=lean_optimizer, **trainer_kwargs)


def finish_run(trainer: Any, tokenizer: Any, evaluate: Callable[[], dict[str, float]], losparse_config: Any,
               train_metrics: dict[str, float], extra_results: Optional[dict[str, Any]] = None,
               distill_args: Any = None) -> dict[str, Any]:
    """Compact the trained model, evaluate it, save it with its tokenizer, write all_results.json.

    The reported eval metrics are those of the compacted model, i.e. of exactly what is saved. The method
    of the model (a model that arrived compressed reports the config it was compressed with) compacts and
    saves it through its hooks; all_results.json holds the method and its config, `extra_results`, the
    training metrics (prefixed train_), the eval metrics, the compression report and, when the run evaluated
    while training, `eval_history` (the Trainer's eval log entries: step, eval_loss, ...).
    """
    model = trainer.model
    history = [entry for entry in trainer.state.log_history if "eval_loss" in entry]  # evaluations while training
    losparse_config = getattr(model, "losparse_config", losparse_config)
    method = get_method(losparse_config.method)
    if is_fsdp_model(model):  # FSDP2: every rank gathers the full tensors before compaction (collective)
        unshard_model(model)
    facts = method.compact(trainer)
    metrics = evaluate()
    if not trainer.is_world_process_zero():
        return metrics
    extra_results = dict(extra_results or {})
    report = method.save(trainer, trainer.args.output_dir, tokenizer,
                         getattr(model, "compressed_from", None) or extra_results.get("model_name_or_path"), facts)
    if getattr(model, "compressed_from", None):
        extra_results.update(model_name_or_path=model.compressed_from,
                             student_checkpoint=extra_results.get("model_name_or_path"))
    results = {
        "method": losparse_config.method, "losparse_config": losparse_config.to_dict(),
        "distillation": distill_args.to_dict() if distill_args is not None and distill_args.enabled else None,
        **extra_results, "seed": trainer.args.seed,
        **{k if k.startswith("train") else f"train_{k}": v for k, v in train_metrics.items()},
        **metrics, "compression": report,
    }
    if history:  # --eval_strategy steps: the curve during training (the final metrics above are the saved model's)
        results["eval_history"] = history
    write_json(os.path.join(trainer.args.output_dir, "all_results.json"), results)
    summary = method.format_report(report)
    if summary:
        logger.info(summary)
    trainer.log_metrics("eval", metrics)
    logger.info("Saved the model and all_results.json to %s", trainer.args.output_dir)
    return results
