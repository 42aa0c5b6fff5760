"""README and docs/ stay true: a short README in the promised order, every params key in the
parameter reference, every relative link pointing at a file (and heading) that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from visiontune.config import flatten, load_params, parse_params

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ["parameters", "data", "tracking", "use-the-model", "scaling", "reproducibility", "design"]
PAGES = [ROOT / "README.md", *(ROOT / "docs" / f"{name}.md" for name in DOCS)]


def test_readme_is_short_enough_to_read_top_to_bottom():
    lines = README.splitlines()
    assert len(lines) <= 200, f"README has {len(lines)} lines"
    wide = [f"{n}: {line}" for n, line in enumerate(lines, 1) if len(line) > 100]
    assert not wide, "README lines over 100 characters:\n" + "\n".join(wide)


def test_readme_sections_come_in_the_order_a_newcomer_needs():
    headings = re.findall(r"(?m)^## (.+)$", README)
    assert headings == [
        "The two commands",
        "What you get",
        "Training on your own photos",
        "Comparing experiments",
        "Predicting",
        "More",
    ]
    assert "make demo" in README and "make test" in README
    assert "fetch → split → precompute → train_head → lr_find → finetune → evaluate" in README


def test_readme_links_every_docs_page():
    for name in DOCS:
        assert f"(docs/{name}.md)" in README, name
    assert set(DOCS) == {p.stem for p in (ROOT / "docs").glob("*.md")}


# Keys whose reference row describes the shipped value in words rather than writing it.
DESCRIBED_VALUES = {"data.source", "data.mirrors"}


def _reference_rows() -> dict[str, str]:
    """docs/parameters.md's table: each key → the value it says params.yaml ships.

    A row may name several keys: `a`, `b` | 1, 2 (one value each) or | 0.05 (the same).
    """
    reference = (ROOT / "docs" / "parameters.md").read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for keys, value in re.findall(r"(?m)^\| (`[^|]+`) \| ([^|]*) \|", reference):
        names = re.findall(r"`([^`]+)`", keys)
        values = [v.strip() for v in value.split(",")]
        for i, name in enumerate(names):
            rows[name] = values[i] if len(values) == len(names) else value.strip()
    return rows


def _shipped() -> dict:
    return flatten(load_params(ROOT / "params.yaml"))


def test_every_params_key_is_in_the_parameter_reference():
    missing = [key for key in _shipped() if key not in _reference_rows()]
    assert not missing, f"docs/parameters.md lacks {missing}"


def test_the_parameter_reference_names_only_keys_that_exist():
    stale = [key for key in _reference_rows() if key not in _shipped()]
    assert not stale, f"docs/parameters.md documents keys params.yaml does not have: {stale}"


def test_the_parameter_reference_shows_the_values_params_yaml_ships():
    """The reference's value column is a copy of params.yaml; it must not drift from it."""
    documented = _reference_rows()
    wrong = []
    for key, value in _shipped().items():
        if key in DESCRIBED_VALUES:
            continue
        written = yaml.safe_load(documented[key])
        if isinstance(written, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?e[-+]?\d+", written):
            written = float(written)  # YAML 1.1 reads 1.0e-4 as a string
        if written != value:
            wrong.append(f"{key}: documented {documented[key]!r}, params.yaml {value!r}")
    assert not wrong, "docs/parameters.md disagrees with params.yaml:\n" + "\n".join(wrong)


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_existing_files_and_headings(page: Path):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: broken link {target}"
        if anchor:
            headings = re.findall(r"(?m)^#+ (.+)$", resolved.read_text(encoding="utf-8"))
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no #{anchor}"


def test_make_help_lists_the_targets():
    # `make help` reads the Makefile only (no setup), as the README tells a newcomer.
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for target in ("setup", "demo", "test", "test-fast", "lint", "bench", "ui"):
        assert re.search(rf"(?m)^  {target} ", shown), target


def _yaml_fences() -> list[tuple[str, str]]:
    return [
        (page.name, body)
        for page in PAGES
        for body in re.findall(r"(?ms)^```yaml\n(.*?)^```", page.read_text(encoding="utf-8"))
    ]


@pytest.mark.parametrize(("page", "snippet"), _yaml_fences())
def test_every_params_snippet_passes_the_params_loader(page: str, snippet: str) -> None:
    """A `params.yaml` snippet a page shows, put into the shipped params, loads as is."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in yaml.safe_load(snippet).items():
        shipped[section].update(values)
    parse_params(shipped)
