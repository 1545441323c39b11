"""Old import paths (before the package was laid out by role) that keep working for one release.

`import losparse.export` still works: a finder on `sys.meta_path` answers the old dotted name with the
module that now holds its code, after a `DeprecationWarning` that names the new path. Only names that
nothing in the package defines any more reach the finder. Tooling that left the wheel
(`losparse.tools.*`, `losparse.report`) resolves to `benchmarks.*` / `reproduce.*` of a source checkout.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Optional

#: old dotted name (a module or a package prefix) -> where it lives now
MOVED = {
    "losparse.checkpoint": "losparse.core.checkpoint",
    "losparse.config": "losparse.core.config",
    "losparse.decompose": "losparse.core.decompose",
    "losparse.errors": "losparse.core.errors",
    "losparse.families": "losparse.core.families",
    "losparse.functional": "losparse.core.functional",
    "losparse.importance": "losparse.core.importance",
    "losparse.layers": "losparse.core.layers",
    "losparse.pruner": "losparse.core.pruner",
    "losparse.schedule": "losparse.core.schedule",
    "losparse.sharding": "losparse.core.sharding",
    "losparse.shrink": "losparse.core.shrink",
    "losparse.trainer": "losparse.training.trainer",
    "losparse.distill": "losparse.training.distill",
    "losparse.preflight": "losparse.training.preflight",
    "losparse.export": "losparse.deploy",
    "losparse.dispatch": "losparse.deploy.dispatch",
    "losparse.permute": "losparse.deploy.permute",
    "losparse.onnx_export": "losparse.deploy.onnx",
    "losparse.kernels": "losparse.deploy.kernels",
    "losparse.structured": "losparse.methods.structured",
    "losparse.lpaf": "losparse.methods.lpaf.factorize",
    "losparse.lpaf_pruner": "losparse.methods.lpaf.pruner",
    "losparse.oneshot": "losparse.methods.oneshot",
    "losparse.yaml_config": "losparse.cli.yaml_config",
    "losparse.metrics": "losparse.cli.metrics",
    "losparse.tasks": "losparse.cli.tasks",
    "losparse.report": "reproduce.report",
    "losparse.tools": "benchmarks",
    "losparse.tools.benchmark": "benchmarks.common",
    "losparse.tools.inference_benchmark": "benchmarks.inference",
    "losparse.tools.training_benchmark": "benchmarks.training",
    "losparse.tools.memory_benchmark": "benchmarks.memory",
    "losparse.tools.onnx_benchmark": "benchmarks.onnx_runtime",
    "losparse.tools.component_profile": "benchmarks.component_profile",
    "losparse.tools.frontier": "benchmarks.frontier",
    "losparse.tools.peers": "benchmarks.peers",
    "losparse.tools.clm_oneshot_table": "benchmarks.clm_oneshot_table",
    "losparse.tools.plots": "benchmarks.plots",
    "losparse.tools.lpaf_experiment": "benchmarks.lpaf_experiment",
    "losparse.tools.reproduce": "reproduce.driver",
    "losparse.tools.paper_results": "reproduce.paper_results",
    "losparse.tools.report": "reproduce.report",
    "losparse.tools.results": "reproduce.results",
}


def new_name(old: str) -> Optional[str]:
    """Where `old` lives now: an exact entry, else the longest moved package prefix (`losparse.tasks.glue`)."""
    if old in MOVED:
        return MOVED[old]
    prefixes = [name for name in MOVED if old.startswith(name + ".")]
    if not prefixes:
        return None
    prefix = max(prefixes, key=len)
    return MOVED[prefix] + old[len(prefix):]


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        try:
            module = importlib.import_module(self.target)
        except ModuleNotFoundError as exc:
            if exc.name and self.target.startswith(exc.name):
                raise ModuleNotFoundError(
                    f"{spec.name} moved to {self.target}, which is repository tooling outside the installed "
                    "package: run it from a source checkout (the repository root on sys.path)", name=spec.name
                ) from None
            raise
        self._spec = module.__spec__  # the import system overwrites it with the alias's spec: restored below
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers the old dotted names of `MOVED` (and only those) with the module that replaced them."""

    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        warnings.warn(f"{fullname} is deprecated and will be removed in the next release; import "
                      f"{target_name} instead", DeprecationWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(target_name))


def install() -> None:
    """Put the finder first on `sys.meta_path`, once: it answers only the old names, which no file has any
    more, and answering `losparse.tasks.glue` before the path finder keeps one module object per file."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
