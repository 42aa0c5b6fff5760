"""evaluate: loss and accuracy of the fine-tuned model on the validation images, plain and TTA.

It writes the model file to use (`model.safetensors`), with the views and precision scored
here recorded in it: `visiontune predict` and the registered model predict as evaluate scored.
"""

from __future__ import annotations

from dataclasses import replace

from visiontune.data.manifest import SPLIT_COLUMNS, read_table, valid_edit_counts
from visiontune.distributed import torch_stage
from visiontune.evaluate.evaluation import evaluate_model
from visiontune.fileio import write_csv, write_json
from visiontune.models.classifier import InferenceSettings, load_model_file, save_model_file
from visiontune.stagekit import Stage, run_stage

PATHS = {
    "model": "fine-tuned model file",
    "valid": "validation table",
    "prepared": "folder the image paths are under",
    "out": "output folder",
}


def evaluate(stage: Stage):
    params, paths, runtime, dist = stage.params, stage.paths, stage.runtime, stage.dist
    model, info = load_model_file(paths.model, map_location=runtime.device)
    valid = read_table(paths.valid, SPLIT_COLUMNS)
    # Under torchrun each rank scores its share of the images; rank 0 writes the outputs.
    result = evaluate_model(model, info, valid, paths.prepared, params.tta, runtime, dist)
    if not dist.is_main:
        return None
    out = paths.out
    # Images a person excluded or relabelled (data.exclude/relabel) change what it measures.
    edited = valid_edit_counts(paths.prepared / "edits.csv", valid["path"])
    write_json(out / "metrics.json", {**result.metrics, **edited})
    write_csv(out / "predictions.csv", result.predictions)
    write_csv(out / "per_class.csv", result.per_class)
    write_csv(out / "probabilities.csv", result.probabilities)
    ran = {"device": str(runtime.device), "precision": runtime.precision}
    config = {"base": params.base, "tta": params.tta, "views": list(result.views)}
    write_json(out / "config.json", {**config, "runtime": {**ran, "world_size": dist.world_size}})
    scored = InferenceSettings(params.tta.n_augment, params.tta.zoom, runtime.precision)
    save_model_file(out / "model.safetensors", model, replace(info, inference=scored))
    stage.register_model = out / "model.safetensors"
    m = result.metrics
    print(
        f"evaluate: {m['n_images']} images, accuracy {m['accuracy']:.4f} (loss {m['loss']:.4f}), "
        f"TTA x{m['n_views']} {m['accuracy_tta']:.4f} (loss {m['loss_tta']:.4f}), "
        f"gain {m['tta_gain'] * 100:+.2f} pts (+{m['tta_images_gained']}/-{m['tta_images_lost']} "
        f"images, p = {m['tta_gain_p']:.2g}), {m['images_per_s']:.1f} img/s"
    )
    if any(edited.values()):
        print(
            f"evaluate: valid set edited by you: {edited['valid_excluded']} excluded, "
            f"{edited['valid_relabelled']} relabelled ({edited['excluded_unsplit']} excluded "
            "before the split); compare accuracies only between runs with the same edits"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", evaluate, PATHS, setup=torch_stage, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
