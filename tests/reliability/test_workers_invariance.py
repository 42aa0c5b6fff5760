"""`runtime` settings change speed, never results: the same feature cache, byte for byte,
decoded in the main process or by two workers. That is why `runtime` is no DVC dep and no
part of a checkpoint's config (tests/unit/test_dvc_yaml.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from real_config import default_params

from visiontune.features import save_features
from visiontune.precompute import precompute_features

PER_CLASS = 3  # per class and split: 12 real photos in all


@pytest.fixture(scope="module")
def tables(dogscats: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("split")
    paths = []
    for split in ("train", "valid"):
        rows = [
            {"path": str(photo.relative_to(dogscats)), "label": kind}
            for kind in ("cats", "dogs")
            for photo in sorted((dogscats / split / kind).glob("*.jpg"))[:PER_CLASS]
        ]
        pd.DataFrame(rows).to_csv(where / f"{split}.csv", index=False)
        paths.append(where / f"{split}.csv")
    return paths[0], paths[1]


def _feature_bytes(num_workers: int, tables, dogscats: Path, out: Path) -> bytes:
    params = default_params(
        {
            "base": {"device": "cpu", "precision": "fp32"},
            "runtime": {"num_workers": num_workers},
            "model": {"image_size": 64},
            "precompute": {"batch_size": 4},
        }
    )
    features, _ = precompute_features(
        params.model,
        params.base,
        params.precompute,
        runtime_params=params.runtime,
        train_csv=tables[0],
        valid_csv=tables[1],
        classes=["cats", "dogs"],
        image_root=dogscats,
    )
    save_features(out, features)
    return out.read_bytes()


def test_precomputed_features_are_byte_identical_with_0_or_2_workers(
    tables, dogscats: Path, tmp_path: Path
) -> None:
    in_process = _feature_bytes(0, tables, dogscats, tmp_path / "w0.safetensors")
    two_workers = _feature_bytes(2, tables, dogscats, tmp_path / "w2.safetensors")
    assert in_process == two_workers
