"""split_manifest: stratified, deterministic, keeps predefined splits, drops tiny classes."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from real_config import default_section

from visiontune.config import SplitParams
from visiontune.data.manifest import MANIFEST_COLUMNS
from visiontune.data.split import n_valid_for, split_manifest


def _manifest(counts: dict[str, int], hint: str = "") -> pd.DataFrame:
    rows = [
        (f"images/{label}/{i:03d}.jpg", label, hint, f"{label}{i}")
        for label, n in counts.items()
        for i in range(n)
    ]
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


COUNTS = {"cat": 50, "dog": 30, "golden retriever": 20, "NA": 10}


def test_stratified_per_class_proportions() -> None:
    split = split_manifest(_manifest(COUNTS), default_section(SplitParams, valid_pct=0.2, seed=0))
    valid_counts = split.valid["label"].value_counts().to_dict()
    assert valid_counts == {label: round(n * 0.2) for label, n in COUNTS.items()}
    assert len(split.train) + len(split.valid) == sum(COUNTS.values())
    assert set(split.train["path"]).isdisjoint(split.valid["path"])
    assert split.classes == sorted(COUNTS) and split.report["mode"] == "stratified"
    assert split.report["per_class"]["dog"] == {"train": 24, "valid": 6}


def test_same_seed_same_split_other_seed_other_split() -> None:
    manifest = _manifest(COUNTS)
    first = split_manifest(manifest, default_section(SplitParams, valid_pct=0.25, seed=7))
    shuffled = manifest.sample(frac=1, random_state=3)  # row order must not matter
    again = split_manifest(shuffled, default_section(SplitParams, valid_pct=0.25, seed=7))
    pd.testing.assert_frame_equal(first.train, again.train)
    pd.testing.assert_frame_equal(first.valid, again.valid)
    other = split_manifest(manifest, default_section(SplitParams, valid_pct=0.25, seed=8))
    assert set(other.valid["path"]) != set(first.valid["path"])
    assert list(first.train["path"]) == sorted(first.train["path"])


def test_adding_images_does_not_reshuffle_the_others() -> None:
    before = split_manifest(
        _manifest({"cat": 100}), default_section(SplitParams, valid_pct=0.2, seed=1)
    )
    after = split_manifest(
        _manifest({"cat": 101}), default_section(SplitParams, valid_pct=0.2, seed=1)
    )
    moved = set(before.valid["path"]) ^ set(after.valid["path"])
    assert len(moved) <= 2


def test_predefined_split_is_kept_and_test_rows_are_held_out() -> None:
    manifest = pd.concat(
        [
            _manifest({"cat": 8, "dog": 8}, "train"),
            _manifest({"cat": 3, "dog": 2}, "valid").assign(path=lambda f: "v/" + f["path"]),
            _manifest({"cat": 5}, "test").assign(path=lambda f: "t/" + f["path"]),
        ]
    )
    split = split_manifest(manifest, default_section(SplitParams, valid_pct=0.5, seed=0))
    assert split.report["mode"] == "predefined" and split.report["test_held_out"] == 5
    assert len(split.train) == 16 and len(split.valid) == 5
    assert all(p.startswith("v/") for p in split.valid["path"])
    assert not any(p.startswith("t/") for p in [*split.train["path"], *split.valid["path"]])

    ignored = split_manifest(
        manifest, default_section(SplitParams, valid_pct=0.5, seed=0, keep_predefined=False)
    )
    assert ignored.report["mode"] == "stratified" and len(ignored.valid) == 11


def test_train_hints_only_are_split_at_random() -> None:
    split = split_manifest(
        _manifest({"a": 10, "b": 10}, "train"), default_section(SplitParams, valid_pct=0.3, seed=0)
    )
    assert split.report["mode"] == "stratified" and len(split.valid) == 6


def test_tiny_classes_are_dropped_and_reported_and_pairs_keep_one_train_image() -> None:
    manifest = _manifest({"many": 10, "pair": 2, "single": 1})
    split = split_manifest(
        manifest, default_section(SplitParams, valid_pct=0.1, seed=0, min_per_class=2)
    )
    assert split.report["dropped_classes"] == {"single": 1}
    assert split.classes == ["many", "pair"]
    assert split.report["per_class"]["pair"] == {"train": 1, "valid": 1}
    strict = split_manifest(
        manifest, default_section(SplitParams, valid_pct=0.1, seed=0, min_per_class=5)
    )
    assert strict.report["dropped_classes"] == {"pair": 2, "single": 1}
    kept_single = split_manifest(
        manifest, default_section(SplitParams, valid_pct=0.1, seed=0, min_per_class=1)
    )
    assert kept_single.report["per_class"]["single"] == {"train": 1, "valid": 0}
    assert "class 'single' has no valid images" in kept_single.report["warnings"]


@pytest.mark.parametrize(
    ("n", "pct", "expected"), [(0, 0.2, 0), (1, 0.9, 0), (2, 0.1, 1), (2, 0.9, 1), (10, 0.2, 2)]
)
def test_n_valid_for(n: int, pct: float, expected: int) -> None:
    assert n_valid_for(n, pct) == expected


@settings(max_examples=40, deadline=None)
@given(
    counts=st.dictionaries(
        st.text("abcxyz ", min_size=1, max_size=4), st.integers(0, 30), min_size=1, max_size=5
    ),
    pct=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
)
def test_every_kept_class_has_train_images_and_nothing_is_lost(
    counts: dict[str, int], pct: float, seed: int
) -> None:
    manifest = _manifest(counts)
    split = split_manifest(
        manifest, default_section(SplitParams, valid_pct=pct, seed=seed, min_per_class=2)
    )
    kept = {label for label, n in counts.items() if n >= 2}
    assert set(split.classes) == kept
    assert set(split.train["label"]) == kept
    assert len(split.train) + len(split.valid) == sum(counts[label] for label in kept)
