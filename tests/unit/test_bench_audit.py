"""The audit benchmark's planting (bench/audit.py): flips land in another class, near-copies
exist and are recorded, and the truth it returns is the truth it wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from audit import plant, score


def _jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), (shade, 255 - shade, 90)).save(path, "JPEG")


def _truth_on_disk(dest: Path) -> dict:
    return json.loads(dest.with_name(f"{dest.name}.truth.json").read_text())


def test_plant_in_class_folders(tmp_path: Path) -> None:
    for i, split in enumerate(("train", "train", "valid", "valid")):
        for j in range(10):
            label = ("cats", "dogs")[i % 2]
            _jpeg(tmp_path / "src" / split / label / f"{label}{i}_{j}.jpg", 20 * i + j)
    dest = tmp_path / "photos"
    truth = plant(tmp_path / "src", dest, seed=0, flip=0.25, dups=100, crop=0.05)

    assert len(truth["flips"]) == 10 and len(truth["duplicates"]) == 4
    for rel, label in truth["flips"].items():  # moved into the other class's folder
        assert (dest / rel).is_file() and Path(rel).parent.name not in (label, "photos")
        assert not (dest / Path(rel).parent.parent / label / Path(rel).name).exists()
    for original, copy in truth["duplicates"]:
        assert Path(copy).parent.name == Path(original).parent.name
        assert Path(copy).parts[0] in ("train", "valid") and Path(copy).name.startswith("nearcopy")
        assert (dest / copy).read_bytes() != (dest / original).read_bytes()
        with Image.open(dest / copy) as image:
            assert image.format == "JPEG"
    assert len(list(dest.rglob("*.jpg"))) == 44
    assert truth["data"] == {"source": str(dest), "labels": None}
    assert _truth_on_disk(dest) == json.loads(json.dumps(truth))


def test_plant_with_a_labels_csv(tmp_path: Path) -> None:
    ids = [f"img{i:02d}" for i in range(30)]
    for i, image_id in enumerate(ids):
        _jpeg(tmp_path / "src" / "train" / f"{image_id}.jpg", 8 * i)
    breeds = {image_id: ("pug", "boxer", "beagle")[i % 3] for i, image_id in enumerate(ids)}
    pd.DataFrame({"id": ids, "breed": list(breeds.values())}).to_csv(
        tmp_path / "src" / "labels.csv", index=False
    )
    dest = tmp_path / "photos"
    truth = plant(tmp_path / "src", dest, seed=1, flip=0.2, dups=100, crop=0.0)

    labels = dict(pd.read_csv(dest / "labels.csv", dtype=str).itertuples(index=False))
    assert len(truth["flips"]) == 6 and len(truth["duplicates"]) == 3 and len(labels) == 33
    for rel, label in truth["flips"].items():  # the file stays, its CSV label changes
        assert breeds[Path(rel).stem] == label != labels[Path(rel).stem]
        assert labels[Path(rel).stem] in ("pug", "boxer", "beagle")
    for original, copy in truth["duplicates"]:
        assert (dest / copy).is_file() and Path(copy).parent == Path(original).parent
        assert labels[Path(copy).stem] == labels[Path(original).stem] == breeds[Path(original).stem]
    assert truth["data"] == {
        "source": str(dest), "labels": "labels.csv", "id_column": "id", "label_column": "breed"
    }  # fmt: skip
    assert _truth_on_disk(dest) == json.loads(json.dumps(truth))


def test_score_counts_planted_and_other_findings(tmp_path: Path) -> None:
    rows = [("label", "a.jpg", ""), ("label", "b.jpg", ""), ("duplicate", "d.jpg", "c.jpg"),
            ("duplicate", "e.jpg", "f.jpg"), ("outlier", "a.jpg", "")]  # fmt: skip
    pd.DataFrame(rows, columns=["kind", "path", "other_path"]).to_csv(tmp_path / "f.csv")
    truth = {"flips": {"a.jpg": "x", "z.jpg": "y"}, "duplicates": [("c.jpg", "d.jpg")]}
    result = score(tmp_path / "f.csv", truth, images=500)
    assert result["label_recall"] == result["label_precision"] == 0.5
    assert result["duplicates_found"] == 1.0 and result["other_pairs_per_1000"] == 2.0
