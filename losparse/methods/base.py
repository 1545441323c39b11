"""What every compression method provides to the run scripts: one lifecycle, looked up by name.

The run scripts know no method by name. They call, in this order (`losparse.cli.run`):

    method = get_method(config.method)
    method.check(config, model_name_or_path, auto_class, oneshot=...)  # before any weights load: refuse early
    method.check_oneshot(config, model_config, fine_tune)  # --oneshot only, also before the weights
    method.oneshot(model, config, calibration_ids, options, prune)   # --oneshot only: compress from calibration
    trainer = method.make_trainer(trainer_class, config, ...)  # the method's Trainer, built once
    trainer.train()
    facts = method.compact(trainer)      # physically remove what was pruned (all ranks)
    ...evaluate the compacted model...
    report = method.save(trainer, output_dir, tokenizer, base_model, facts)   # rank 0
    method.format_report(report)         # the log line(s) of what was built

A method is a class registered under the names of the rows of `losparse.core.methods.METHOD_SPECS` it runs
(`@register("losparse", "itp", ...)`); a new method is a new folder with one such class, never a branch in
shared code. Hooks a method does not need keep the defaults below.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError

#: method name -> the registered class (filled by `register`)
REGISTRY: dict[str, type["CompressionMethod"]] = {}


class CompressionMethod:
    """The hooks of one method (see the module docstring). Stateless: one instance serves any run."""

    #: the table rows this class runs (set by `register`)
    names: tuple[str, ...] = ()
    #: the files a directory this method saved always holds (beside config.json); `losparse.load` picks the
    #: method whose markers are all present, the one with the most markers first
    saved_markers: tuple[str, ...] = ()
    #: directories a run of this method leaves in its output directory besides checkpoints (removed by
    #: --overwrite_output_dir, so a new run never builds on them)
    run_artifact_dirs: tuple[str, ...] = ()
    #: which of `names` have the one-shot form `oneshot` gives (empty: all of them, if it is overridden)
    oneshot_names: tuple[str, ...] = ()

    def check(self, config: LoSparseConfig, model_name_or_path: str, auto_class: Any,
              cache_dir: Optional[str] = None, oneshot: bool = False) -> None:
        """Usage errors found from the config and the model's config alone (no weights loaded yet). `oneshot`:
        the run compresses from calibration data (`--oneshot`) before any training."""

    def check_oneshot(self, config: LoSparseConfig, model_config: Any, options: Any, fine_tune: bool) -> None:
        """Usage errors of `--oneshot` for this method (`options`: the run's `OneShotArguments`; `fine_tune`: the
        one-shot model then trains, `--oneshot --do_train`), before the weights load. Default: no one-shot form."""
        raise LoSparseUsageError(f"--oneshot has no form for --method {config.method}; choose one of: "
                                 + ", ".join(oneshot_method_names()))

    def oneshot(self, model: Any, config: LoSparseConfig, calibration_input_ids: Any, options: Any,
                prune: bool = True) -> Any:
        """Compress `model` in place from calibration token ids (num_samples, seq_len); returns it. `prune=False`:
        only the calibrated start that training then prunes (a method without one prunes anyway)."""
        raise LoSparseUsageError(f"--oneshot has no form for --method {config.method}")

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        """The run's trainer: `trainer_class` composed with what the method needs, built once."""
        raise NotImplementedError

    def compact(self, trainer: Any) -> dict[str, Any]:
        """Make the trained model its smallest exact form, in place; returns facts for the report."""
        return {}

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        """Write the compressed model (and tokenizer) to `output_dir`; returns the compression report."""
        raise NotImplementedError

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        """A readable summary of `report` for the log (None: nothing to say)."""
        return None

    def checkpoint_config(self, config: LoSparseConfig) -> Optional[LoSparseConfig]:
        """The config the run's checkpoints record, which a resume is compared with before anything loads; None
        when only the trainer can know it (a staged method's later stage): its callback compares it then."""
        return config

    def load(self, path: str, device: Any = None, **kwargs: Any) -> Any:
        """Rebuild the model this method saved in `path` (see `saved_markers`), in eval mode."""
        raise NotImplementedError(f"{type(self).__name__} saves nothing of its own to load")


def register(*names: str) -> Callable[[type[CompressionMethod]], type[CompressionMethod]]:
    """Class decorator: run the table rows `names` with this class."""
    def decorate(cls: type[CompressionMethod]) -> type[CompressionMethod]:
        for name in names:
            if name in REGISTRY and REGISTRY[name] is not cls:
                raise ValueError(f"method {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
            REGISTRY[name] = cls
        cls.names = tuple(names)
        return cls
    return decorate


def method_for_directory(path: str) -> Optional[CompressionMethod]:
    """The registered method whose `saved_markers` are all in `path` (the most specific one), or None."""
    candidates = {cls for cls in REGISTRY.values() if cls.saved_markers
                  and all(os.path.isfile(os.path.join(path, marker)) for marker in cls.saved_markers)}
    if not candidates:
        return None
    return max(candidates, key=lambda cls: (len(cls.saved_markers), cls.__name__))()


def oneshot_method_names() -> list[str]:
    """The registered names with a one-shot form (a class overriding `oneshot`, limited by its `oneshot_names`)."""
    return sorted(name for name, cls in REGISTRY.items() if cls.oneshot is not CompressionMethod.oneshot
                  and name in (cls.oneshot_names or cls.names))


def run_artifact_dirs() -> tuple[str, ...]:
    """Every registered method's `run_artifact_dirs`."""
    return tuple(sorted({d for cls in REGISTRY.values() for d in cls.run_artifact_dirs}))


def get_method(name: str) -> CompressionMethod:
    """The registered method `name` (an instance); a usage error naming the known ones otherwise."""
    if name not in REGISTRY:
        raise LoSparseUsageError(f"--method {name!r} is not known; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()
