"""README stays true: it shows the two commands and documents every params key."""

from __future__ import annotations

from pathlib import Path

from visiontune.config import Params, flatten

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_readme_shows_the_two_commands():
    assert "make demo" in README
    assert "make test" in README


def test_every_params_key_is_documented():
    missing = [key for key in flatten(Params()) if f"`{key}`" not in README]
    assert not missing, f"README's parameter table lacks {missing}"
