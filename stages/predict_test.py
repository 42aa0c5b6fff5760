"""predict_test: the submission table for the unlabelled test images fetch held out.

id (file name without extension) + one probability column per class, from evaluate's model
file with the views and precision evaluate scored, as the registered model predicts. Without
a test folder (most sources) it writes the header alone, from the model's record and without
importing torch: every experiment that re-runs evaluate re-runs this stage.
"""

from __future__ import annotations

from visiontune.evaluate.submission import submission_writer
from visiontune.fileio import atomic_open
from visiontune.models.record import read_model_info
from visiontune.stagekit import Stage, run_stage

PATHS = {
    "model": "evaluate's model file",
    "test": "held-out test images (fetch's test/)",
    "out": "output folder (submission.csv)",
}


def predict_test(stage: Stage):
    params, paths = stage.params, stage.paths
    if not paths.test.is_dir():
        with atomic_open(paths.out / "submission.csv") as out:
            submission_writer(out, read_model_info(paths.model).classes)
        print("predict_test: 0 test images predicted (no test folder: header only)")
        return paths.out
    from visiontune.evaluate.predict import find_inputs, image_ids, write_submission
    from visiontune.models.classifier import load_model_file
    from visiontune.runtime import loader_workers
    from visiontune.serving.predictor import create_views, inference_settings, predicting_runtime

    model, info = load_model_file(paths.model)
    settings = inference_settings(info, str(paths.model))
    found = find_inputs([paths.test])
    # Decoding in loader workers, as the CLI does: a test set may hold 10^5 photos.
    workers = loader_workers(params.runtime.num_workers)
    runtime, note = predicting_runtime(settings.precision, params.base.device, workers)
    if note:
        print(f"predict_test: {note}")
    model, views = model.to(runtime.device), create_views(info, settings)
    ids = image_ids(found, "stem")
    with atomic_open(paths.out / "submission.csv") as out:
        summary = write_submission(
            model, info, found.files, ids, runtime, views, out, batch_size=params.tta.batch_size
        )
    for error in summary.errors:
        print(f"predict_test: {error.path}: {error.error} (left out)")
    print(f"predict_test: {summary.rows} test images predicted ({paths.test})")
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("predict_test", predict_test, PATHS, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
