"""`visiontune predict` on real photos with a small constructed model file."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from real_config import default_raw, merge
from records import model_info

from visiontune.cli import main
from visiontune.data.images import open_rgb
from visiontune.data.transforms import DataConfig, create_eval_transform
from visiontune.models.classifier import (
    InferenceSettings,
    build_classifier,
    load_model_file,
    save_model_file,
)

CLASSES = ["cats", "dogs", "foxes"]
CFG = DataConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                 crop_pct=0.875)  # fmt: skip


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # As evaluate writes it: the centre crop and its mirror, fp32.
    inference = InferenceSettings(n_augment=1, zoom=1.15, precision="fp32")
    info = model_info(classes=CLASSES, data_config=CFG, inference=inference)
    model = build_classifier(info)
    with torch.no_grad():  # spread the untrained head's outputs so the ranking is clear-cut
        model.head[-1].weight.mul_(20)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model_file(path, model.eval(), info)
    return path


@pytest.fixture(scope="module")
def photos(dogscats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for kind in ("cats", "dogs"):
        (root / kind / "deeper").mkdir(parents=True)
        for i, src in enumerate(sorted((dogscats / "valid" / kind).glob("*.jpg"))[:2]):
            target = root / kind / ("deeper" if i else "") / src.name
            shutil.copy(src, target)
    (root / "cats" / "notes.txt").write_text("not an image, and not named like one")
    return root


def _direct_probs(model_path: Path, images: list[Path]) -> torch.Tensor:
    model, info = load_model_file(model_path)
    cfg = info.data_config
    # Decoded like the eval loaders: JPEG draft reduction down to the resize size.
    transform = create_eval_transform(cfg)
    x = torch.stack([transform(open_rgb(p, min_size=cfg.resize_size)) for p in images])
    with torch.no_grad():
        return model(x).softmax(1)


def test_predict_json_matches_direct_forward(model_file, photos, capsys):
    code = main(["predict", str(model_file), str(photos), "--format", "json", "--top-k", "2",
                 "--device", "cpu", "--no-tta"])  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    images = sorted(p for p in photos.rglob("*.jpg"))
    assert [Path(r["path"]) for r in rows] == images  # folders searched recursively, .txt skipped
    direct = _direct_probs(model_file, images)
    for row, expected in zip(rows, direct, strict=True):
        assert row["error"] is None and len(row["predictions"]) == 2
        probs = [p["probability"] for p in row["predictions"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert row["predictions"][0]["label"] == CLASSES[int(expected.argmax())]
        assert probs[0] == pytest.approx(float(expected.max()), abs=1e-5)


def test_predict_reports_unreadable_files_and_predicts_the_rest(model_file, photos, tmp_path,
                                                                capsys, repo_root):  # fmt: skip
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "readme.png"
    text.write_text("plain text with an image suffix")
    good = next(photos.rglob("*.jpg"))
    missing = tmp_path / "missing.jpg"
    code = main(["predict", str(model_file), str(empty), str(good), str(text), str(missing),
                 "--format", "csv", "--tta", "--params", str(repo_root / "params.yaml"),
                 "--device", "cpu"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {str(empty), str(text), str(missing)}
    assert "empty" in errors[str(empty)] and "not an image" in errors[str(text)]
    predicted = [r for r in rows if not r["error"]]
    assert [r["path"] for r in predicted] == [str(good)] * len(CLASSES)  # default top-3
    assert [int(r["rank"]) for r in predicted] == [1, 2, 3]
    assert sum(float(r["probability"]) for r in predicted) == pytest.approx(1, abs=1e-4)
    for path in errors:
        assert path in captured.err


def test_predict_fails_when_nothing_can_be_read(model_file, tmp_path, capsys):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert main(["predict", str(model_file), str(empty), "--device", "cpu"]) == 1
    assert "no image could be predicted" in capsys.readouterr().err


def test_predict_table_on_a_terminal(model_file, photos, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long paths at the default 80
    assert main(["predict", str(model_file), str(photos / "dogs"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "prediction" in out and "probability" in out
    assert out.count(".jpg") == 2


def _json_probs(model_file: Path, paths: list[str], *extra: str, capsys) -> dict[str, dict]:
    code = main(["predict", str(model_file), *paths, "--format", "json", "--top-k", "3",
                 "--device", "cpu", *extra])  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    return {Path(r["path"]).stem: {p["label"]: p["probability"] for p in r["predictions"]}
            for r in rows}  # fmt: skip


def test_tta_views_come_from_the_model_file_or_a_params_file(model_file, photos, tmp_path,
                                                             capsys):  # fmt: skip
    model_views = _json_probs(model_file, [str(photos)], capsys=capsys)
    assert _json_probs(model_file, [str(photos)], "--tta", capsys=capsys) == model_views
    plain = _json_probs(model_file, [str(photos)], "--no-tta", capsys=capsys)
    assert plain != model_views  # the model's mirror view counts by default
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            merge(default_raw(), {"tta": {"n_augment": 0}, "base": {"precision": "fp32"}})
        )
    )
    assert _json_probs(model_file, [str(photos)], "--params", str(params), capsys=capsys) == plain


def test_submission_has_an_id_and_a_column_per_class_and_skips_unreadable_files(
    model_file, photos, tmp_path, capsys
):
    test = tmp_path / "test"
    shutil.copytree(photos, test)
    (test / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out" / "submission.csv"
    code = main(["predict", str(model_file), str(test), "--submission", str(out),
                 "--device", "cpu"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 unreadable" in err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", *CLASSES]
    images = sorted(p for p in photos.rglob("*.jpg"))
    assert [r["id"] for r in rows] == [p.stem for p in images]  # file names without suffix
    expected = _json_probs(model_file, [str(photos)], capsys=capsys)  # same views, top-k
    for row in rows:
        assert sum(float(row[c]) for c in CLASSES) == pytest.approx(1, abs=1e-5)
        for name in CLASSES:
            assert float(row[name]) == pytest.approx(expected[row["id"]][name], abs=1e-5)

    relative = tmp_path / "relative.csv"
    main(["predict", str(model_file), str(test), "--submission", str(relative), "--id", "path",
          "--positive", "dogs", "--device", "cpu"])  # fmt: skip
    rows = list(csv.DictReader(relative.open()))
    assert list(rows[0]) == ["id", "dogs"]  # a binary task's p(class) column
    assert {r["id"] for r in rows} == {p.relative_to(photos).as_posix() for p in images}


def test_submission_of_an_empty_folder_is_a_header(model_file, tmp_path, capsys):
    (tmp_path / "test").mkdir()
    code = main(["predict", str(model_file), str(tmp_path / "test"), "--submission", "-",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out == "id," + ",".join(CLASSES) + "\n"


def test_predict_test_stage_writes_the_submission_or_a_header(model_file, photos, tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "stages" / "predict_test.py"
    spec = importlib.util.spec_from_file_location("stage_predict_test", script)
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge(default_raw(), {"tracking": {"enabled": False}})))
    common = ["--params", str(params), "--model", str(model_file)]
    out = tmp_path / "out"
    assert stage.main([*common, "--test", str(photos), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "submission.csv").open()))
    assert list(rows[0]) == ["id", *CLASSES] and len(rows) == 4
    none, missing = tmp_path / "none", str(tmp_path / "no_test")
    assert stage.main([*common, "--test", missing, "--out", str(none)]) == 0
    assert (none / "submission.csv").read_text() == "id," + ",".join(CLASSES) + "\n"
    # Without test images the stage never imports torch: most sources have none, and each
    # experiment that re-runs evaluate re-runs it.
    argv = [str(script), *common, "--test", missing, "--out", str(none)]
    code = (
        f"import runpy, sys; sys.argv = {argv!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_predicting_loads_neither_matplotlib_nor_scikit_learn() -> None:
    """`visiontune predict` and the served model import only what scoring a model needs: a
    lent GPU machine lacks matplotlib, scikit-learn alone took ~1.8 s of start-up, pandas 0.6 s."""
    code = (
        "import sys, visiontune.cli, visiontune.serving.predictor\n"
        "heavy = {'matplotlib', 'sklearn', 'mlflow', 'pandas'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_params_file_in_the_current_directory_changes_nothing(
    model_file, photos, tmp_path, capsys, monkeypatch
):
    """The model file alone decides the views: a params.yaml where predict runs is not read."""
    expected = _json_probs(model_file, [str(photos)], capsys=capsys)
    other = merge(default_raw(), {"tta": {"n_augment": 0}, "base": {"precision": "bf16"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.chdir(tmp_path)
    assert _json_probs(model_file, [str(photos)], capsys=capsys) == expected


def test_finetunes_file_is_refused_naming_the_one_evaluate_wrote(model_file, photos, tmp_path,
                                                                 capsys):  # fmt: skip
    model, info = load_model_file(model_file)
    finetuned = tmp_path / "model.safetensors"
    save_model_file(finetuned, model, dataclasses.replace(info, inference=None))
    assert main(["predict", str(finetuned), str(photos), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no inference settings" in err and "outputs/evaluate/model.safetensors" in err


def test_a_precision_the_host_lacks_falls_back_to_fp32_in_one_line(
    model_file, photos, tmp_path, capsys, monkeypatch
):
    from visiontune.serving import predictor

    monkeypatch.setattr(predictor, "cpu_supports_bf16", lambda: True)
    assert predictor.host_precision("bf16", "cpu") == ("bf16", None)
    monkeypatch.setattr(predictor, "cpu_supports_bf16", lambda: False)
    assert predictor.host_precision("fp16", "cpu")[0] == "fp32"
    model, info = load_model_file(model_file)
    bf16 = tmp_path / "bf16.safetensors"
    settings = dataclasses.replace(info.inference, precision="bf16")
    save_model_file(bf16, model, dataclasses.replace(info, inference=settings))
    fp32 = _json_probs(model_file, [str(photos)], capsys=capsys)
    code = main(["predict", str(bf16), str(photos), "--format", "json", "--top-k", "3",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "bf16" in line]
    assert notes == [
        "visiontune predict: the model was evaluated at bf16, which this CPU lacks: fp32 instead"
    ]
    rows = json.loads(captured.out)
    assert {Path(r["path"]).stem: {p["label"]: p["probability"] for p in r["predictions"]}
            for r in rows} == fp32  # fmt: skip
