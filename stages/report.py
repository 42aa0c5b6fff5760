"""report: confusion matrix, most confused pairs, top losses and LR plots from the TTA output."""

from __future__ import annotations

import pandas as pd

from visiontune.evaluate.report import build_report, read_probabilities
from visiontune.fileio import read_json, write_json
from visiontune.models.classifier import load_model_file
from visiontune.stagekit import Stage, StageError, run_stage

PATHS = {
    "evaluate": "evaluate output folder",
    "model": "fine-tuned model file",
    "prepared": "folder the image paths are under",
    "lr_find": "lr_find output folder",
    "steps": "finetune's per-step LRs (steps.csv)",
    "out": "output folder",
}


def report(stage: Stage):
    params, paths = stage.params, stage.paths
    model, info = load_model_file(paths.model)
    probabilities = paths.evaluate / "probabilities.csv"
    probs, labels, images, classes = read_probabilities(
        probabilities, paths.evaluate / "predictions.csv"
    )
    if classes != info.classes:
        raise StageError(f"{probabilities} has other classes than {paths.model}")
    files = build_report(
        paths.out,
        probs,
        labels,
        images,
        classes,
        paths.prepared,
        info.data_config,
        model,
        read_json(paths.evaluate / "metrics.json"),
        params.report,
        lr_curve=pd.read_csv(paths.lr_find / "curve.csv"),
        lr_suggestion=read_json(paths.lr_find / "suggestion.json").get("lr"),
        steps=pd.read_csv(paths.steps),
    )
    write_json(paths.out / "config.json", {"report": params.report})
    print(f"report: {files.report} ({len(files.images())} figures, {len(classes)} classes)")
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("report", report, PATHS, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
