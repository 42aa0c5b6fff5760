"""The GPU check's run: the pipeline's stages as the stage scripts call the library, each
timed, with the time its loaders kept it waiting and its peak GPU memory, in a record that
is written after every section (bench/gpu_check.py runs them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Check:
    """The run's record, written after every section so that a run cut short still tells
    how far it got. A failed section records its traceback and the run goes on with the
    sections that do not need it."""

    def __init__(self, path: Path, budget_s: float, around_steps: int) -> None:
        self.path, self.budget_s = path, budget_s
        # Steps of the limits measured again before and after a stage (0: not again).
        self.around_steps = around_steps
        self.started = time.monotonic()
        self.record: dict[str, Any] = {"ok": False, "errors": {}, "skipped": {}}

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextlib.contextmanager
    def section(self, name: str, optional: bool = False) -> Iterator[bool]:
        """Yields whether to run the section (False: an optional one past the time budget)."""
        if optional and self.elapsed > self.budget_s:
            self.record["skipped"][name] = f"past the {self.budget_s:.0f} s budget"
            say(f"{name}: skipped, past the {self.budget_s:.0f} s budget")
            yield False
            return
        say(f"{name} ...")
        try:
            yield True
        except Exception:
            self.record["errors"][name] = traceback.format_exc()[-4000:]
            say(f"{name} FAILED:\n{traceback.format_exc()}")
        self.write()

    def write(self) -> None:
        from visiontune.fileio import write_json

        self.record["wall_s"] = self.elapsed
        write_json(self.path, self.record)


def write_split(data_root: Path, params: Any, out: Path) -> dict[str, Any]:
    """train.csv, valid.csv and classes.json of a folder-per-class `data_root` (train/ and
    valid/ folders), split by the library as the split stage does; `data.max_per_class`
    keeps that many seeded picks per class and folder, as the fetch stage does."""
    import pandas as pd

    from visiontune.data.images import is_image_name
    from visiontune.data.manifest import SPLIT_COLUMNS, seeded_rank, write_classes, write_table
    from visiontune.data.split import split_manifest

    rows = [
        {"path": str(path.relative_to(data_root)), "label": path.parent.name, "split_hint": hint}
        for hint in ("train", "valid")
        for path in sorted((data_root / hint).glob("*/*"))
        if is_image_name(path.name)
    ]
    manifest = pd.DataFrame(rows, columns=["path", "label", "split_hint"])
    if params.data.max_per_class:
        rank = manifest["path"].map(lambda path: seeded_rank(params.base.seed, path))
        picked = manifest.assign(rank=rank).sort_values("rank")
        manifest = picked.groupby(["label", "split_hint"]).head(params.data.max_per_class)
    split = split_manifest(manifest, params.split)
    write_table(out / "train.csv", split.train, SPLIT_COLUMNS)
    write_table(out / "valid.csv", split.valid, SPLIT_COLUMNS)
    write_classes(out / "classes.json", split.classes)
    return {"train": len(split.train), "valid": len(split.valid), "classes": split.classes}


def limit_around(probe: Any, limits: dict[str, Any], stage: str, when: str, steps: int) -> None:
    """The stage's limit measured again `when` it runs (bench/limits.py); 0 steps: not."""
    if steps <= 0:
        return
    measured = probe.around(stage, steps=steps)
    limits.setdefault("adjacent", {}).setdefault(stage, {})[when] = measured
    say(f"  {measured['limit']} limit {when} {stage}: {measured['images_per_s']:.1f} img/s")


def run_stages(check: Check, params: Any, work: Path, image_root: Path, probe: Any) -> None:
    """precompute → train_head → lr_find → fine-tune → evaluate, as the stage scripts call
    the library."""
    from gpu_probes import GpuMemory, timed_loaders, wait_share

    import visiontune.evaluate.evaluation as evaluation_module
    import visiontune.precompute as precompute_module
    from visiontune.data.manifest import SPLIT_COLUMNS, read_classes, read_table
    from visiontune.evaluate.evaluation import evaluate_model
    from visiontune.features import load_features, save_features
    from visiontune.models.classifier import load_model_file
    from visiontune.precompute import precompute_features
    from visiontune.runtime import resolve_runtime, seed_everything
    from visiontune.train.head import save_head
    from visiontune.train.head_choice import head_record, train_head_on_features

    record, limits = check.record, check.record["limits"]
    stages: dict[str, Any] = record.setdefault("stages", {})
    runtime = resolve_runtime(params.base, params.runtime)
    memory = GpuMemory(runtime.device)
    steps = check.around_steps
    split = work / "split"
    train_csv, valid_csv = split / "train.csv", split / "valid.csv"
    classes = read_classes(split / "classes.json")

    with check.section("precompute"):
        limit_around(probe, limits, "precompute", "before", steps)
        memory.reset()
        start = time.perf_counter()
        with timed_loaders(precompute_module) as passes:
            features, stats = precompute_features(
                params.model, params.base, params.precompute, runtime_params=params.runtime,
                train_csv=train_csv,
                valid_csv=valid_csv, classes=classes, image_root=image_root,
            )  # fmt: skip
        stages["precompute"] = {
            "wall_s": time.perf_counter() - start,
            **stats,
            **memory.read(),
            "data_wait": wait_share(passes),
        }
        save_features(work / "features.safetensors", features)
        features = load_features(work / "features.safetensors", features.fingerprint)
        limit_around(probe, limits, "precompute", "after", steps)
    if "precompute" in record["errors"]:
        return

    with check.section("train_head"):
        start = time.perf_counter()
        source = None if params.head.init == "random" else features.source
        head = train_head_on_features(features, params.head, params.base.seed, source)
        stages["train_head"] = {"wall_s": time.perf_counter() - start, **head.metrics}
        save_head(work / "head.safetensors", head.head, head_record(features, params.head, head))
    if "train_head" in record["errors"]:
        return

    with check.section("lr_find"):
        stages["lr_find"] = run_lr_find(params, runtime, work, image_root)
    if "lr_find" in record["errors"]:
        return
    lr = stages["lr_find"]["lr"] if params.finetune.lr == "auto" else params.finetune.lr

    with check.section("finetune"):
        limit_around(probe, limits, "finetune", "before", steps)
        stages["finetune"] = run_finetune(params, runtime, work, image_root, lr, "checkpoints")
        limit_around(probe, limits, "finetune", "after", steps)
    if "finetune" in record["errors"]:
        return

    with check.section("evaluate"):
        limit_around(probe, limits, "evaluate", "before", steps)
        seed_everything(params.base.seed, params.base.deterministic)
        model, info = load_model_file(work / "model.safetensors", map_location=runtime.device)
        valid = read_table(valid_csv, SPLIT_COLUMNS)
        memory.reset()
        start = time.perf_counter()
        with timed_loaders(evaluation_module) as passes:
            result = evaluate_model(model, info, valid, image_root, params.tta, runtime)
        stages["evaluate"] = {
            "wall_s": time.perf_counter() - start,
            **result.metrics,
            **memory.read(),
            "data_wait": wait_share(passes),
        }
        limit_around(probe, limits, "evaluate", "after", steps)

    # The fp16 path (GradScaler) that `auto` does not take on a bf16 GPU: one epoch.
    if runtime.device.type != "cuda":
        record["skipped"]["finetune_fp16"] = "fp16 autocast on a CPU is emulated: seconds a step"
        return
    with check.section("finetune_fp16", optional=True) as run:
        if run:
            fp16 = dataclasses.replace(runtime, amp_dtype=torch.float16)
            one = params.finetune.model_copy(update={"n_cycles": 1, "cycle_len": 1})
            stages["finetune_fp16"] = run_finetune(
                params, fp16, work, image_root, lr, "checkpoints-fp16", one, keep_model=False
            )


def run_lr_find(params: Any, runtime: Any, work: Path, image_root: Path) -> dict[str, Any]:
    """The lr_find stage's library calls: the LR range test on the whole network."""
    from gpu_probes import GpuMemory, timed_loaders, wait_share

    import visiontune.train.recipes as recipes_module
    from visiontune.data.manifest import read_split
    from visiontune.runtime import seed_everything
    from visiontune.train.recipes import create_train_dataset, load_classifier, resolve_finetune

    seed_everything(params.base.seed, params.base.deterministic)
    model, info, _ = load_classifier(params.model, work / "head.safetensors")
    ft = resolve_finetune(params.finetune, info)
    train = read_split(work / "split" / "train.csv", image_root)
    dataset = create_train_dataset(train, info.classes, info.data_config, ft.augment)
    memory = GpuMemory(runtime.device)
    memory.reset()
    start = time.perf_counter()
    with timed_loaders(recipes_module) as passes:
        found = recipes_module.run_lr_find(
            model, dataset, ft, params.lr_find, runtime, seed=params.base.seed
        )
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "method": params.lr_find.method,
        "lr": found.suggestion(params.lr_find.method),
        "suggestions": found.suggestions,
        "lr_ratios": list(ft.lr_ratios),
        "iterations": len(found.curve),
        "stopped_early": found.stopped_early,
        "images_per_s": len(found.curve) * params.lr_find.batch_size / wall,
        **memory.read(),
        "data_wait": wait_share(passes),
    }


def run_finetune(
    params: Any,
    runtime: Any,
    work: Path,
    image_root: Path,
    lr: float,
    checkpoints: str,
    ft: Any = None,
    keep_model: bool = True,
) -> dict[str, Any]:
    """The finetune stage's library calls at top-group LR `lr`, with the time each epoch
    waited for its loader."""
    from gpu_probes import GpuMemory, timed_loaders, wait_share

    import visiontune.train.epoch as epoch_module
    from visiontune.data.manifest import read_split
    from visiontune.models.classifier import save_model_file
    from visiontune.runtime import seed_everything
    from visiontune.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from visiontune.train.loop import finetune
    from visiontune.train.recipes import (
        create_train_dataset,
        create_valid_loader,
        load_classifier,
        resolve_finetune,
    )

    seed_everything(params.base.seed, params.base.deterministic)
    model, info, _ = load_classifier(params.model, work / "head.safetensors")
    ft = resolve_finetune(ft or params.finetune, info)
    info = dataclasses.replace(info, mirror=ft.augment.flip is True)
    train = read_split(work / "split" / "train.csv", image_root)
    valid = read_split(work / "split" / "valid.csv", image_root)
    dataset = create_train_dataset(train, info.classes, info.data_config, ft.augment)
    valid_loader = create_valid_loader(
        valid, info.classes, info.data_config, ft.batch_size, runtime, params.base.seed
    )
    memory = GpuMemory(runtime.device)
    memory.reset()
    start = time.perf_counter()
    with timed_loaders(epoch_module) as passes:
        result = finetune(
            model, dataset, valid_loader, ft, runtime, lr=lr, seed=params.base.seed,
            checkpoint_dir=work / checkpoints, config={"precision": runtime.precision},
            log=lambda line: say(f"  {line}"),
        )  # fmt: skip
    wall = time.perf_counter() - start
    history = result.history.to_dict(orient="records")
    # Each epoch's own clock (history.seconds): the loop times its steps, not its validation.
    waits = wait_share(passes, [row["seconds"] for row in history])
    saved = load_checkpoint(work / checkpoints / CHECKPOINT_NAME) or {}
    if keep_model:
        save_model_file(work / "model.safetensors", result.model, info)
    return {
        "wall_s": wall,
        "precision": runtime.precision,
        "lr": lr,
        "lr_ratios": list(ft.lr_ratios),
        **result.metrics,
        "epoch_images_per_s": [row["images_per_s"] for row in history],
        "history": history,
        # GradScaler's loss scale after the last step (an empty state: it was off).
        "grad_scaler_scale": (saved.get("scaler") or {}).get("scale"),
        **memory.read(),
        "data_wait": waits,
    }
