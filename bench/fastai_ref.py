"""The same recipe through fastai, as a reference: same split, backbone weights, head, epochs.

Runs in its own venv (bench/.venv-fastai, which sees the project's torch through a .pth so
torch stays the pinned build); `bench/run.py` calls it after the visiontune pipeline ran in
a project copy and reads the JSON it writes.
Usage: python bench/fastai_ref.py --project <copy> --out result.json [--precision auto|fp32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn


def build_learner(project: Path, precision: str):
    """A fastai Learner over the project's split with visiontune's backbone and head."""
    from fastai.callback.channelslast import ChannelsLast
    from fastai.data.transforms import ColSplitter
    from fastai.vision.all import (
        Callback,
        CategoryBlock,
        ColReader,
        CrossEntropyLossFlat,
        DataBlock,
        ImageBlock,
        Learner,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        params,
    )

    from visiontune.config import load_params
    from visiontune.data.manifest import read_classes, read_split
    from visiontune.models.backbone import create_backbone, resolve_data_config
    from visiontune.models.head import create_head
    from visiontune.runtime import resolve_runtime

    class CpuAutocast(Callback):
        """fastai's MixedPrecision hard-codes CUDA autocast; this is its CPU equivalent."""

        order = 10

        def __init__(self, dtype: torch.dtype) -> None:
            self.dtype = dtype

        def before_batch(self) -> None:
            self.ctx = torch.autocast(device_type="cpu", dtype=self.dtype)
            self.ctx.__enter__()

        def after_loss(self) -> None:
            self.ctx.__exit__(None, None, None)

        def after_pred(self) -> None:
            # Loss in fp32 (as visiontune and fastai's MixedPrecision do).
            self.learn.pred = self.learn.pred.float()

    cfg = load_params(project / "params.yaml")
    runtime = resolve_runtime(cfg.base, cfg.runtime)
    image_root = project / "data" / "prepared"
    train = read_split(project / "data" / "split" / "train.csv", image_root)
    valid = read_split(project / "data" / "split" / "valid.csv", image_root)
    frame = pd.concat(
        [train.assign(is_valid=False), valid.assign(is_valid=True)], ignore_index=True
    )
    classes = read_classes(project / "data" / "split" / "classes.json")

    body, weights = create_backbone(cfg.model.backbone, cfg.model.weights)
    data_cfg = resolve_data_config(body, cfg.model)
    aug = cfg.finetune.augment
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=classes)),
        get_x=ColReader("path"),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        # fastai's presizing: crop to the resize size on the item, augment+crop on the batch.
        item_tfms=Resize(data_cfg.resize_size),
        batch_tfms=[
            *aug_transforms(
                size=data_cfg.image_size,
                max_rotate=aug.rotate_deg,
                max_zoom=aug.max_zoom,
                max_lighting=max(aug.brightness, aug.contrast),
                do_flip=aug.flip is not False,  # auto: fastai's own default, flip
            ),
            Normalize.from_stats(list(data_cfg.mean), list(data_cfg.std)),
        ],
    )
    dls = block.dataloaders(
        frame, bs=cfg.finetune.batch_size, num_workers=runtime.num_workers, device="cpu"
    )
    head = create_head(int(body.num_features), len(classes), cfg.head.hidden, cfg.head.dropout)
    model = nn.Sequential(body, head)
    cbs = []
    amp = precision != "fp32" and runtime.amp_dtype is not None
    if amp:
        cbs = [ChannelsLast(), CpuAutocast(runtime.amp_dtype)]
    learn = Learner(
        dls,
        model,
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        splitter=lambda m: [params(m[0]), params(m[1])],
        cbs=cbs,
    )
    info = {
        "backbone": cfg.model.backbone,
        "weights": weights.source,
        "image_size": data_cfg.image_size,
        "precision": runtime.precision if amp else "fp32",
        "channels_last": amp,
        "batch_size": cfg.finetune.batch_size,
        "train_images": len(train),
        "valid_images": len(valid),
    }
    return learn, cfg, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--base-lr", type=float, default=2.0e-3, help="fastai's default")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.project / "src"))
    import fastai
    from fastai.vision.all import accuracy

    start = time.perf_counter()
    learn, cfg, info = build_learner(args.project, args.precision)
    setup_s = time.perf_counter() - start
    epochs = cfg.finetune.epochs
    start = time.perf_counter()
    with learn.no_bar():
        learn.fine_tune(epochs, base_lr=args.base_lr, freeze_epochs=args.freeze_epochs)
    fit_s = time.perf_counter() - start
    history = [
        dict(zip(learn.recorder.metric_names[1:-1], (float(v) for v in row), strict=False))
        for row in learn.recorder.values
    ]
    start = time.perf_counter()
    preds, targs = learn.get_preds(ds_idx=1)
    plain = float(accuracy(preds, targs))
    with learn.no_bar():
        tta_preds, tta_targs = learn.tta(ds_idx=1)
    tta_s = time.perf_counter() - start
    result = {
        **info,
        "fastai_version": fastai.__version__,
        "epochs": epochs,
        "freeze_epochs": args.freeze_epochs,
        "base_lr": args.base_lr,
        "setup_s": setup_s,
        "fit_s": fit_s,
        "evaluate_tta_s": tta_s,
        "total_s": setup_s + fit_s + tta_s,
        "accuracy": plain,
        "accuracy_tta": float(accuracy(tta_preds, tta_targs)),
        "history": history,
    }
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
