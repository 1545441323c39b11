"""The installable package: what `import losparse` costs, what it offers, and what the layout promises.

The import checks run in a fresh interpreter (this one has torch loaded already).
"""

import json
import os
import re
import subprocess
import sys

import pytest

import losparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _heavy_modules_after(statement: str) -> list[str]:
    proc = _python(f"{statement}\nimport json, sys\n"
                   "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_import_losparse_loads_neither_torch_nor_transformers():
    assert _heavy_modules_after("import losparse") == []


@pytest.mark.parametrize("module", ["losparse.cli.yaml_config", "losparse.core.errors", "reproduce.driver",
                                    "reproduce.report"])
def test_torch_free_modules_import_no_torch(module):
    assert _heavy_modules_after(f"import {module}") == []


def test_every_public_name_is_there_on_first_use():
    names = ", ".join(losparse.__all__)
    proc = _python(f"import losparse\nfrom losparse import {names}\n"
                   "missing = [n for n in losparse.__all__ if n not in dir(losparse)]\n"
                   "assert not missing, missing\n"
                   "assert losparse.apply is losparse.core.decompose.apply and losparse.load is losparse.loading.load\n"
                   "print(losparse.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == losparse.__version__
    assert {"LoSparseConfig", "apply", "LoSparseTrainer", "load", "save", "compact", "merge"} <= set(losparse.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        losparse.nothing_here  # noqa: B018


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_pyproject_dependencies_are_requirements_txt():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        requirements = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    project = _pyproject()["project"]
    assert project["dependencies"] == requirements
    assert "torch>=2.4" in requirements  # a lower bound only: the torch build installed first is kept
    assert _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"] == ["losparse", "losparse.*"]


def test_every_package_directory_is_found_by_the_install():
    """A directory of modules without __init__.py would be missing from `pip install .` (not from -e)."""
    for directory, dirs, files in os.walk(os.path.join(ROOT, "losparse")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, f"{os.path.relpath(directory, ROOT)} has no __init__.py"


def _python_files():
    for top in ("losparse", "benchmarks", "reproduce", "scripts", "tests"):
        for directory, _, files in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.join(directory, f) for f in files if f.endswith(".py"))
    yield from (os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py"))


#: the one sys.path edit allowed: a scripts/*.py wrapper putting the repository root first, so the repository
#: tooling (benchmarks/, reproduce/, outside the installed package) imports, and scripts/reproduce.py does not
#: shadow the `reproduce` package
SCRIPT_ROOT_LINE = "sys.path." + "insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))"


def test_no_sys_path_edits_and_no_script_imported_as_a_module():
    edit = re.compile(r"sys\.path\.(insert|append)\(")
    script_import = re.compile(r"^\s*(import|from) (run_glue|run_squad|run_summarization|run_clm)\b", re.M)
    for path in _python_files():
        with open(path) as f:
            text = f.read()
        where = os.path.relpath(path, ROOT)
        if where.startswith("scripts" + os.sep):
            text = text.replace(SCRIPT_ROOT_LINE, "")
        assert not edit.search(text), f"{where} edits sys.path; rely on the installed package instead"
        if where.startswith("tests"):
            assert not script_import.search(text), f"{where} imports a run script; use conftest.load_script"




def test_the_package_stays_small_and_its_functions_short():
    """The wheel holds the library only (tooling is in benchmarks/ and reproduce/): ≤ 12k lines, no function over
    60 lines, and no plotting dependency (matplotlib is the `plots` extra)."""
    import ast

    lines, long_functions = 0, []
    for directory, _, files in os.walk(os.path.join(ROOT, "losparse")):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            with open(path) as f:
                text = f.read()
            lines += text.count("\n")
            long_functions += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}"
                               for node in ast.walk(ast.parse(text))
                               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                               and node.end_lineno - node.lineno + 1 > 60]
    # 11.7k after the layout change; then the CoFi and hybrid folders, the one-shot solver and the decoder peer
    assert lines <= 16_500
    assert not long_functions, long_functions
    project = _pyproject()["project"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert project["optional-dependencies"]["plots"] == ["matplotlib>=3.7"]
