"""dvc.yaml tells the truth: every stage depends on its script, on every library module it
imports (directly, transitively, or lazily inside functions) and on the params sections it
reads — otherwise editing that code or param would never re-run the stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from visiontune.config import Params

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
STAGES = (
    "source_stamp",
    "fetch",
    "split",
    "precompute",
    "train_head",
    "lr_find",
    "finetune",
    "evaluate",
    "report",
)
# Tracking settings say where runs are logged, not what is computed: changing the store
# must not retrain anything, so stages deliberately do not depend on the `tracking` section.
NOT_A_DEPENDENCY = {"tracking"}
# How a stage is launched (torchrun or not, backend, timeout) does not change what it
# computes either; the launcher itself is part of `cmd`, which DVC compares. The one
# distributed key that does change results (finetune's sync_bn) is declared by key.
LAUNCH_ONLY = {"distributed"}


def _pipeline() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _package_of(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1])  # the package of both pkg/mod.py and pkg/__init__.py


def _imported_modules(path: Path) -> set[str]:
    """Every visiontune module a file imports, anywhere in it (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import, resolved against the file's package
                package = _package_of(path).split(".")
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    found: set[str] = set()
    for name in names:
        if not name.startswith("visiontune"):
            continue
        parts = name.split(".")
        # `import visiontune.a.b` also runs visiontune/__init__ and visiontune/a/__init__.
        for end in range(1, len(parts) + 1):
            if _module_file(".".join(parts[:end])):
                found.add(".".join(parts[:end]))
    return found


def _closure(script: Path) -> set[Path]:
    files = {script}
    todo = [script]
    while todo:
        for module in _imported_modules(todo.pop()):
            file = _module_file(module)
            if file and file not in files:
                files.add(file)
                todo.append(file)
    return files


def test_every_stage_is_declared_in_pipeline_order():
    assert list(_pipeline()) == list(STAGES)
    for name in STAGES:
        assert (REPO / "stages" / f"{name}.py").is_file()


@pytest.mark.parametrize("stage", STAGES)
def test_stage_depends_on_all_code_it_runs(stage: str):
    spec = _pipeline()[stage]
    deps = [REPO / dep for dep in spec.get("deps", [])]
    script = REPO / "stages" / f"{stage}.py"
    assert f"stages/{stage}.py" in spec["cmd"]
    missing = sorted(
        str(file.relative_to(REPO))
        for file in _closure(script)
        if not any(file == dep or dep in file.parents for dep in deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r} does not depend on {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_exactly_the_params_sections_it_reads(stage: str):
    spec = _pipeline()[stage]
    declared = {entry.split(".")[0] for entry in spec.get("params", [])}
    source = (REPO / "stages" / f"{stage}.py").read_text(encoding="utf-8")
    read = set(re.findall(r"\bparams\.(\w+)", source)) & set(Params.model_fields)
    assert declared - LAUNCH_ONLY == read - NOT_A_DEPENDENCY - LAUNCH_ONLY, (
        stage,
        sorted(declared),
        sorted(read),
    )


def test_finetune_depends_on_sync_bn_and_heavy_stages_take_the_launcher():
    pipeline = _pipeline()
    assert "distributed.sync_bn" in pipeline["finetune"]["params"]
    for stage in ("precompute", "finetune", "evaluate"):
        assert pipeline[stage]["cmd"].startswith("${distributed.launcher} stages/"), stage
        source = (REPO / "stages" / f"{stage}.py").read_text(encoding="utf-8")
        assert "init_from_environ(params.distributed" in source, stage
