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
    "source_stamp", "fetch", "split", "precompute", "audit", "train_head", "lr_find", "finetune",
    "evaluate", "report", "predict_test",
)  # fmt: skip
# Sections a stage reads that cannot change what it computes, each with its reason. DVC
# re-runs a stage when a params section it lists changes, so listing these would re-decode
# every image (and, via finetune's checkpoint config, restart a resumable fine-tune) for
# nothing.
NOT_A_DEPENDENCY = {
    # Where runs are logged, not what is computed: changing the store retrains nothing.
    "tracking": "where runs are logged",
    # Loader workers, their priority and allocator settings change speed only: every image
    # is decoded and augmented from its own seed whichever worker (or none) handles it
    # (tests/reliability/test_workers_invariance.py checks the bytes).
    "runtime": "how fast, never what: per-image seeding",
}
# How a stage is launched (torchrun or not, backend, timeout) does not change what it
# computes either; the launcher itself is part of `cmd`, which DVC compares. The one
# distributed key that does change results (finetune's sync_bn) is declared by key.
LAUNCH_ONLY = {"distributed"}
# Code a stage runs that cannot change its outputs, with the reason. Tracking reads the
# outputs once they are written and mirrors them into MLflow: editing it must not rerun
# fetch and retrain everything.
NOT_A_CODE_DEPENDENCY = {"visiontune.tracking": "mirrors written outputs into MLflow"}


def _pipeline() -> dict:
    """dvc.yaml's stages with its `vars` (the paths) substituted, as DVC reads them."""
    text = (REPO / "dvc.yaml").read_text()
    variables = {}
    for entry in yaml.safe_load(text).get("vars", []):
        variables.update(entry)

    def value(match: re.Match[str]) -> str:
        section, _, key = match.group(1).partition(".")
        return str(variables[section][key]) if section in variables else match.group(0)

    return yaml.safe_load(re.sub(r"\$\{([\w.]+)\}", value, text))["stages"]


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
        if not name.startswith("visiontune") or name.startswith(tuple(NOT_A_CODE_DEPENDENCY)):
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
    # And no more: editing code a stage does not run must not rerun it.
    runs = {str(file.relative_to(REPO)) for file in _closure(script)}
    code = [dep for dep in spec["deps"] if dep.startswith(("src/", "stages/"))]
    unused = [dep for dep in code if not any(f == dep or f.startswith(f"{dep}/") for f in runs)]
    assert not unused, f"dvc.yaml stage {stage!r} depends on code it does not run: {unused}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_exactly_the_params_sections_it_reads(stage: str):
    spec = _pipeline()[stage]
    declared = {entry.split(".")[0] for entry in spec.get("params", [])}
    source = (REPO / "stages" / f"{stage}.py").read_text(encoding="utf-8")
    read = set(re.findall(r"\bparams\.(\w+)", source)) & set(Params.model_fields)
    assert declared - LAUNCH_ONLY == read - set(NOT_A_DEPENDENCY) - LAUNCH_ONLY, (
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
        assert "setup=torch_stage" in source, stage  # joins torchrun's process group


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_depends_on_settings_that_cannot_change_its_outputs(stage: str):
    declared = {entry.split(".")[0] for entry in _pipeline()[stage].get("params", [])}
    assert not declared & set(NOT_A_DEPENDENCY), (stage, sorted(declared & set(NOT_A_DEPENDENCY)))


def test_finetune_checkpoint_config_leaves_out_the_runtime_section():
    """A checkpoint resumes only when its config matches: the speed knobs must not be in it."""
    source = (REPO / "src/visiontune/train/recipes.py").read_text(encoding="utf-8")
    start = source.index("def resume_config(")
    config = source[start : source.index("\n\n\ndef ", start)]
    assert "params.runtime" not in config and "params.tracking" not in config
    assert set(Params.model_fields["base"].annotation.model_fields) == {
        "seed",
        "device",
        "precision",
        "deterministic",
    }, "base goes into the checkpoint config whole: only what shapes the results"
