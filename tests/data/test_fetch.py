"""prepare_dataset on each source kind: folders, labels CSV, archives, URL, mirrors, real photos."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from datagen import NASTY
from real_config import default_section

from visiontune.config import DEMO_MIRROR, DEMO_SOURCE, DataParams, load_params
from visiontune.data.archive import UnsafeArchiveError
from visiontune.data.manifest import read_manifest, read_table
from visiontune.data.prepare import prepare_dataset
from visiontune.data.sources import SourceError, pick_mirror
from visiontune.locations import Locator


def _prepare(tmp_path: Path, **params) -> tuple[dict, pd.DataFrame, dict[str, str], Path]:
    out = tmp_path / "prepared"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # data.mirrors keeps its shipped default (the demo URL → ../shared/data/dogscats).
    summary = prepare_dataset(
        default_section(DataParams, **params),
        out,
        tmp_path / "downloads",
        Locator.for_stage(Path.cwd(), None),
        seed=0,
        progress=False,
    )
    manifest = read_manifest(out / "manifest.csv")
    rejects = read_table(out / "rejects.csv", ("path", "reason"))
    return summary, manifest, dict(zip(rejects["path"], rejects["reason"], strict=True)), out


@pytest.fixture
def folder_dataset(tmp_path: Path, nasty_dir: Path, make_jpeg: Callable[..., Path]) -> Path:
    """train/valid folders of classes, with the whole nasty corpus in one class."""
    root = tmp_path / "src" / "my data"
    seed = 0
    for split, n in (("train", 4), ("validation", 2)):
        for label in ("cats", "golden retriever"):
            for i in range(n):
                seed += 1
                make_jpeg(root / split / label / f"{label[0]}{i}.jpg", seed=seed)
    shutil.copytree(nasty_dir, root / "train" / "nasty")
    make_jpeg(root / "train" / "lonely" / "only one.jpg", seed=1001)
    (root / "valid" / "empty class").mkdir(parents=True)
    shutil.copyfile(root / "train/cats/c0.jpg", root / "train/cats/copy of c0.jpg")
    shutil.copyfile(root / "train/cats/c1.jpg", root / "validation/golden retriever/mixup.jpg")
    (root / "train/cats/notes.txt").write_text("photographer: me")
    (root / "train/cats/.DS_Store").write_bytes(b"\0\0")
    (root / "README.md").write_text("my data set")
    make_jpeg(root / "stray.jpg", seed=1002)
    make_jpeg(root / "train" / "no class.jpg", seed=1003)
    return root


def test_folder_source_accepts_or_rejects_every_file_with_a_reason(
    folder_dataset: Path, tmp_path: Path, nasty_max_pixels: int
) -> None:
    summary, manifest, rejects, out = _prepare(
        tmp_path, source=str(folder_dataset), max_image_pixels=nasty_max_pixels
    )
    by_path = manifest.set_index("path")
    # The nasty corpus: each file accepted (label nasty) or rejected with its reason.
    for name, (_, expected) in NASTY.items():
        rel = f"train/nasty/{name}"
        if expected is None:
            assert by_path.loc[f"images/{rel}", "label"] == "nasty", name
            assert (out / "images" / rel).read_bytes() == (folder_dataset / rel).read_bytes()
        else:
            assert expected in rejects[rel], (name, rejects.get(rel))
    assert rejects["train/cats/copy of c0.jpg"] == "duplicate of train/cats/c0.jpg"
    assert "images/train/cats/c0.jpg" in by_path.index
    for conflicting in ("train/cats/c1.jpg", "validation/golden retriever/mixup.jpg"):
        assert "conflicting labels" in rejects[conflicting]
        assert f"images/{conflicting}" not in by_path.index
    assert "not an image file name" in rejects["train/cats/notes.txt"]
    assert "not inside a class folder" in rejects["stray.jpg"]
    assert "split folder 'train'" in rejects["train/no class.jpg"]
    assert not any(".DS_Store" in p or "README" in p for p in [*rejects, *by_path.index])

    assert by_path.loc["images/train/lonely/only one.jpg", "label"] == "lonely"
    hints = manifest.groupby("label")["split_hint"].agg(lambda s: sorted(set(s)))
    assert hints["golden retriever"] == ["train", "valid"] and hints["lonely"] == ["train"]
    assert sorted(set(manifest["label"])) == ["cats", "golden retriever", "lonely", "nasty"]
    assert summary["classes"] == 4 and not (out / "classes.json").exists()  # split's alone
    assert summary["empty_classes"] == ["empty class"]
    assert summary["images"] == len(manifest) and summary["rejected"] == len(rejects)
    assert summary["rejected_by_kind"]["duplicate"] == 1
    assert list(manifest["path"]) == sorted(manifest["path"])
    # Every file under the source is in exactly one of the two tables (junk aside).
    files = {
        p.relative_to(folder_dataset).as_posix()
        for p in folder_dataset.rglob("*")
        if p.is_file() and p.name not in (".DS_Store", "README.md")
    }
    accepted = {p.removeprefix("images/") for p in manifest["path"]}
    assert accepted.isdisjoint(rejects) and accepted | set(rejects) == files


@pytest.fixture
def csv_dataset(tmp_path: Path, make_jpeg: Callable[..., Path]) -> Path:
    root = tmp_path / "csvset"
    names = ["img 1.jpg", "b.jpg", "c.jpg", "orphan.jpg", "dup.jpg", "nolabel.jpg", "na.jpg"]
    for i, name in enumerate(names):
        make_jpeg(root / "pictures" / name, seed=2000 + i)
    (root / "pictures" / "broken.jpg").write_bytes(b"")
    (root / "labels.csv").write_text(
        "file,class\n"
        "img 1.jpg,golden retriever\n"  # id with extension, class with a space
        "b,cat\n"  # id without extension
        "c,cat\n"
        "c,cat\n"  # repeated id, same label
        "ghost,cat\n"  # no such image
        "dup,cat\n"
        "dup,dog\n"  # conflicting labels
        "nolabel,\n"  # missing label cell
        "pictures/na.jpg,NA\n"  # relative path id; 'NA' is a class name, not a missing value
        "broken,cat\n"
        ",cat\n",  # missing id
        encoding="utf-8",
    )
    return root


def test_labels_csv_source(csv_dataset: Path, tmp_path: Path) -> None:
    summary, manifest, rejects, _ = _prepare(
        tmp_path,
        source=str(csv_dataset),
        labels="labels.csv",
        id_column="file",
        label_column="class",
    )
    assert dict(zip(manifest["path"], manifest["label"], strict=True)) == {
        "images/pictures/img 1.jpg": "golden retriever",
        "images/pictures/b.jpg": "cat",
        "images/pictures/c.jpg": "cat",
        "images/pictures/na.jpg": "NA",
    }
    assert "no such image" in rejects["ghost"]
    assert "conflicting labels" in rejects["pictures/dup.jpg"]
    assert "empty label" in rejects["pictures/nolabel.jpg"]
    assert rejects["pictures/orphan.jpg"] == "not listed in labels.csv"
    assert "repeated id" in rejects["labels.csv:5"]
    assert rejects["labels.csv:12"] == "empty id"
    assert "empty file" in rejects["pictures/broken.jpg"]
    assert summary["source"]["layout"] == "labels_csv" and summary["classes"] == 3


def test_labels_csv_with_wrong_columns_is_a_clear_error(csv_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"no column\(s\) id, label.*file, class"):
        _prepare(tmp_path, source=str(csv_dataset), labels="labels.csv")
    with pytest.raises(SourceError, match=r"data\.labels not found"):
        _prepare(tmp_path, source=str(csv_dataset), labels="nope.csv")


def _archive(root: Path, dest: Path) -> Path:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if dest.name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w") as archive:
            for path in files:
                archive.write(path, Path("wrapper", path.relative_to(root)).as_posix())
    else:
        with tarfile.open(dest, "w:gz") as archive:
            archive.add(root, arcname="wrapper")
    return dest


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archives_give_the_same_dataset_as_the_folder(
    folder_dataset: Path, tmp_path: Path, suffix: str
) -> None:
    _, plain_manifest, plain_rejects, _ = _prepare(tmp_path / "a", source=str(folder_dataset))
    archive = _archive(folder_dataset, tmp_path / f"data{suffix}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    summary, manifest, rejects, _ = _prepare(tmp_path / "b", source=str(archive), sha256=digest)
    pd.testing.assert_frame_equal(manifest, plain_manifest)
    assert rejects == plain_rejects
    assert summary["source"]["kind"] == "archive" and summary["source"]["archive_sha256"] == digest
    assert not list((tmp_path / "b" / "downloads").iterdir()), "extraction scratch removed"


def test_labels_csv_inside_an_archive(csv_dataset: Path, tmp_path: Path) -> None:
    archive = _archive(csv_dataset, tmp_path / "csv.zip")
    _, manifest, _, _ = _prepare(
        tmp_path, source=str(archive), labels="labels.csv", id_column="file", label_column="class"
    )
    assert len(manifest) == 4


def test_unsafe_archive_source_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("cats/a.jpg", b"x")
        archive.writestr("../../escaped.jpg", b"x")
    with pytest.raises(UnsafeArchiveError, match="path traversal"):
        _prepare(tmp_path, source=str(tmp_path / "evil.zip"))
    assert not list(tmp_path.rglob("escaped.jpg"))


def test_url_source_is_downloaded_once_or_read_from_its_mirror(
    folder_dataset: Path, tmp_path: Path, server
) -> None:
    server.payload = _archive(folder_dataset, tmp_path / "served.zip").read_bytes()
    _, expected, _, _ = _prepare(tmp_path / "a", source=str(folder_dataset))
    missing_mirror = str(tmp_path / "no such mirror")
    for _ in range(2):
        summary, manifest, _, _ = _prepare(
            tmp_path / "b", source=server.url, mirrors={server.url: [missing_mirror]}
        )
        pd.testing.assert_frame_equal(manifest, expected)
        assert summary["source"]["used"] == server.url and summary["source"]["kind"] == "url"
        assert missing_mirror in summary["source"]["reason"]
    assert server.requests == 1, "the second run uses the cached download"
    assert "already downloaded" in summary["source"]["reason"]

    mirrors = {server.url: [missing_mirror, str(folder_dataset)]}
    summary, _, _, _ = _prepare(tmp_path / "c", source=server.url, mirrors=mirrors)
    assert summary["source"]["used"] == str(folder_dataset)
    assert summary["source"]["kind"] == "directory" and server.requests == 1
    assert "local copy of" in summary["source"]["reason"]


def test_a_mirror_stands_in_only_for_the_url_it_copies(
    folder_dataset: Path, csv_dataset: Path, tmp_path: Path, server
) -> None:
    # The trap of a list of mirrors: the first existing one won over any source.
    decoy = tmp_path / "demo mirror"
    shutil.copytree(folder_dataset / "train" / "cats", decoy / "decoy")
    mirrors = {"https://example.com/demo.zip": [str(decoy)]}
    csv_params = {"labels": "labels.csv", "id_column": "file", "label_column": "class"}
    summary, manifest, _, _ = _prepare(
        tmp_path / "a", source=str(csv_dataset), mirrors=mirrors, **csv_params
    )
    assert summary["source"]["used"] == str(csv_dataset) and "decoy" not in set(manifest["label"])
    assert summary["source"]["reason"] == "data.source, used as given"
    archive = _archive(folder_dataset, tmp_path / "mine.zip")
    summary, manifest, _, _ = _prepare(tmp_path / "b", source=str(archive), mirrors=mirrors)
    assert summary["source"]["kind"] == "archive" and "decoy" not in set(manifest["label"])
    # Another URL is downloaded, not replaced by the demo URL's mirror.
    server.payload = archive.read_bytes()
    summary, manifest, _, _ = _prepare(tmp_path / "c", source=server.url, mirrors=mirrors)
    assert summary["source"]["used"] == server.url and "decoy" not in set(manifest["label"])
    assert server.requests == 1


def test_the_shipped_demo_source_reads_its_mirror_offline(
    repo_root: Path, dogscats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make demo` from the repo root: the demo URL, no download, the sample photos.
    monkeypatch.chdir(repo_root)
    data = load_params(repo_root / "params.yaml").data
    assert data.source == DEMO_SOURCE and data.mirrors == {DEMO_SOURCE: (DEMO_MIRROR,)}
    here = Locator.for_stage(repo_root, None)
    mirror = pick_mirror(data.source, data.mirrors, here)
    assert mirror is not None and mirror.path.resolve() == dogscats.resolve()
    assert pick_mirror(str(dogscats.parent / "dogbreeds"), data.mirrors, here) is None


def test_missing_source_names_every_place_looked_in(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"data.source not found: photos \(looked for "
                       rf"{tmp_path}/photos\)"):  # fmt: skip
        _prepare(tmp_path, source="photos")


def test_max_per_class_is_a_seeded_deterministic_subset(
    folder_dataset: Path, tmp_path: Path
) -> None:
    def subset(seed: int) -> list[str]:
        out = tmp_path / f"s{seed}"
        out.mkdir(exist_ok=True)
        params = default_section(DataParams, source=str(folder_dataset), max_per_class=2)
        here = Locator.for_stage(tmp_path, None)
        summary = prepare_dataset(params, out, tmp_path / "dl", here, seed=seed, progress=False)
        assert summary["skipped_by_max_per_class"] > 0
        frame = read_manifest(out / "manifest.csv")
        assert frame.groupby(["label", "split_hint"]).size().max() == 2
        return list(frame["path"])

    first = subset(0)
    assert subset(0) == first
    assert any(subset(seed) != first for seed in (1, 2, 3))


def test_real_dogscats_folders(dogscats: Path, tmp_path: Path) -> None:
    summary, manifest, rejects, out = _prepare(tmp_path, source=str(dogscats), max_per_class=5)
    assert summary["classes"] == 2 and len(manifest) == 20 and not rejects
    counts = manifest.groupby(["label", "split_hint"]).size().to_dict()
    assert counts == {(c, s): 5 for c in ("cats", "dogs") for s in ("train", "valid")}
    assert all((out / p).is_file() for p in manifest["path"])


def test_real_dogbreeds_labels_csv(dogbreeds: Path, tmp_path: Path) -> None:
    labels = pd.read_csv(dogbreeds / "labels.csv", dtype=str)
    summary, manifest, rejects, _ = _prepare(
        tmp_path,
        source=str(dogbreeds),
        labels="labels.csv",
        label_column="breed",
        max_per_class=2,
    )
    # Only the subset is decoded; every listed image is labelled, none is unlabelled.
    assert not rejects and summary["classes"] == labels["breed"].nunique() == 120
    assert summary["images"] + summary["skipped_by_max_per_class"] == len(labels)
    assert len(manifest) == 240 and set(manifest["split_hint"]) == {"train"}
    truth = dict(zip("images/train/" + labels["id"] + ".jpg", labels["breed"], strict=True))
    assert all(
        truth[p] == label for p, label in zip(manifest["path"], manifest["label"], strict=True)
    )


@pytest.mark.parametrize("layout", ["folders", "labels_csv"])
def test_an_unlabelled_test_folder_beside_train_is_held_out(
    layout: str, tmp_path: Path, make_jpeg: Callable[..., Path]
) -> None:
    """Kaggle's layout: labelled train/, unlabelled test/ (kept whole, not rejected)."""
    root = tmp_path / layout
    for i, label in enumerate(["cat", "cat", "dog", "dog"]):
        folder = root / "train" / label if layout == "folders" else root / "train"
        make_jpeg(folder / f"{label}{i}.jpg", seed=3000 + i)
    for i in range(3):
        make_jpeg(root / "test" / f"{i:04d}.jpg", seed=3100 + i)
    (root / "test" / "broken.jpg").write_bytes(b"")  # predicted (and reported) later
    params = {"source": str(root)}
    if layout == "labels_csv":
        (root / "labels.csv").write_text("id,label\ncat0,cat\ncat1,cat\ndog2,dog\ndog3,dog\n")
        params["labels"] = "labels.csv"
    summary, manifest, rejects, out = _prepare(tmp_path, **params)
    assert len(manifest) == 4 and not rejects
    assert summary["held_out_test"] == 4
    held = sorted(p.name for p in (out / "test").iterdir())
    assert held == ["0000.jpg", "0001.jpg", "0002.jpg", "broken.jpg"]


def test_each_file_is_read_once_and_only_the_kept_ones_are_decoded(
    dogscats: Path, tmp_path: Path, monkeypatch
) -> None:
    """The bytes read are hashed, checked and written; files past max_per_class are hashed
    only; a chosen file that turns out unreadable, or an identical copy, is replaced by the
    group's next-ranked file."""
    from visiontune.data import prepare

    source = tmp_path / "photos"
    for label in ("cats", "dogs"):
        (source / label).mkdir(parents=True)
        for photo in sorted((dogscats / "train" / label).glob("*.jpg"))[:8]:
            shutil.copy(photo, source / label / photo.name)
    reads: list[str] = []
    decoded: list[str] = []
    real_read, real_inspect = Path.read_bytes, prepare.inspect_image
    monkeypatch.setattr(Path, "read_bytes", lambda p: reads.append(p.name) or real_read(p))
    monkeypatch.setattr(prepare, "sha256_file", lambda p: reads.append(Path(p).name)
                        or hashlib.sha256(real_read(Path(p))).hexdigest())  # fmt: skip
    monkeypatch.setattr(prepare, "inspect_image", lambda data, *a, name=None: decoded.append(name)
                        or real_inspect(data, *a, name=name))  # fmt: skip
    summary, manifest, _, out = _prepare(tmp_path, source=str(source), max_per_class=3)
    assert summary["images"] == 6 and summary["skipped_by_max_per_class"] == 10
    assert sorted(reads) == sorted(p.name for p in source.rglob("*.jpg"))  # each once
    assert sorted(Path(d).name for d in decoded) == sorted(Path(p).name for p in manifest["path"])
    for path in manifest["path"]:
        assert (out / path).read_bytes() == (source / path.removeprefix("images/")).read_bytes()

    # The first-ranked cat made unreadable, the second a copy of a dog: both replaced.
    cats = [Path(p).name for p in manifest["path"] if "/cats/" in p]
    dog = next(p for p in manifest["path"] if "/dogs/" in p)
    (source / "cats" / cats[0]).write_bytes(b"\xff\xd8 not a jpeg")
    (source / "cats" / cats[1]).write_bytes((source / dog.removeprefix("images/")).read_bytes())
    monkeypatch.undo()
    summary, manifest, rejects, out = _prepare(tmp_path, source=str(source), max_per_class=3)
    assert summary["per_class"] == {"cats": 3, "dogs": 3}
    assert f"cats/{cats[0]}" in rejects and "conflicting labels" in rejects[f"cats/{cats[1]}"]
    assert not (out / "images" / "cats" / cats[0]).exists()
    assert not (out / "images" / "cats" / cats[1]).exists()
    assert dog not in set(manifest["path"])  # its copy's label conflicts: neither is kept
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == sorted(
        manifest["path"]
    )
