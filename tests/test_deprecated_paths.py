"""The import paths of the flat layout keep working for one release, each with a DeprecationWarning."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from losparse import _moved

ROOT = __file__.rsplit("/tests/", 1)[0]


def _forget_old_names() -> None:
    """Drop the aliases earlier tests imported, so the next import goes through the finder (and warns) again."""
    for name in [name for name in sys.modules if _moved.new_name(name) is not None]:
        del sys.modules[name]


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_every_old_path_imports_the_module_that_replaced_it(old):
    new = importlib.import_module(_moved.MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*import {_moved.MOVED[old]} instead"):
        module = importlib.import_module(old)
    assert module is new
    assert module.__spec__.name == new.__name__  # the real module keeps its own spec


@pytest.mark.parametrize("statement, name, new", [
    ("from losparse.export import compact, load, save", "load", "losparse.deploy.serialization"),
    ("from losparse.structured import remove_pruned_structures", "remove_pruned_structures",
     "losparse.methods.structured.removal"),
    ("from losparse.oneshot import oneshot_compress", "oneshot_compress", "losparse.methods.oneshot.algorithm"),
    ("from losparse.tools.benchmark import interleaved_latency_ms", "interleaved_latency_ms", "benchmarks.common"),
    ("from losparse.tasks.glue import GlueDataArguments", "GlueDataArguments", "losparse.cli.tasks.glue"),
])
def test_old_from_imports_give_the_same_objects(statement, name, new):
    _forget_old_names()
    namespace: dict = {}
    with pytest.warns(DeprecationWarning):
        exec(statement, namespace)
    assert namespace[name] is getattr(importlib.import_module(new), name)


def test_a_submodule_of_a_moved_package_is_one_module_object():
    _forget_old_names()
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("losparse.tasks.squad")
    assert old is importlib.import_module("losparse.cli.tasks.squad")


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("losparse.no_such_module")


def test_the_warning_names_the_new_path_in_a_fresh_interpreter():
    code = "import warnings; warnings.simplefilter('error'); import losparse.export"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "losparse.export is deprecated" in result.stderr and "losparse.deploy" in result.stderr
