"""predict_test: the submission table for the unlabelled test images fetch held out.

id (file name without extension) + one probability column per class, from evaluate's
model file with the views and precision evaluate scored, as the registered model
predicts. A source without a test folder gives a file with the header alone.
"""

from __future__ import annotations

from visiontune.evaluate.predict import find_inputs, image_ids, write_submission
from visiontune.fileio import atomic_open
from visiontune.models.classifier import load_model_file
from visiontune.runtime import loader_workers
from visiontune.serving.predictor import (
    create_views,
    inference_settings,
    predicting_runtime,
)
from visiontune.stagekit import Stage, run_stage

PATHS = {"model": "evaluate's model file", "test": "held-out test images (fetch's test/)",
         "out": "output folder (submission.csv)"}  # fmt: skip


def predict_test(stage: Stage):
    params, paths = stage.params, stage.paths
    model, info = load_model_file(paths.model)
    settings = inference_settings(info, str(paths.model))
    found = find_inputs([paths.test] if paths.test.is_dir() else [])
    # Decoding in loader workers, as the CLI does: a test set may hold 10^5 photos.
    workers = loader_workers(params.runtime.num_workers)
    runtime, note = predicting_runtime(settings.precision, params.base.device, workers)
    if note:
        print(f"predict_test: {note}")
    with atomic_open(paths.out / "submission.csv", newline="") as out:
        summary = write_submission(
            model.to(runtime.device), info, found.files, image_ids(found, "stem"), runtime,
            create_views(info, settings), out, batch_size=params.tta.batch_size,
        )  # fmt: skip
    for error in summary.errors:
        print(f"predict_test: {error.path}: {error.error} (left out)")
    where = paths.test if paths.test.is_dir() else "no test folder: header only"
    print(f"predict_test: {summary.rows} test images predicted ({where})")
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("predict_test", predict_test, PATHS, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
