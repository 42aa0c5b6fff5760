"""docs/data.md followed as written, in a new shell, on its own user's clone: the first stages
alone, in-place changes, unprotect and gc, and fetch in a temp experiment (DVC's copy of the
repo) reading the shipped relative mirror. Its own project, so that it runs beside the long
README chain of tests/test_walkthrough.py, which needs none of it. Tracking is off here (a
documented key): this page checks data, the README chain checks MLflow in every DVC mode,
and tracking costs ~2 s of imports and store calls in each of the page's stage runs."""

from __future__ import annotations

import pytest
import yaml
from doc_pages import bash_lines, blocks, normalize, page, shown_commands
from project_copy import deep_merge
from shell import user_project
from test_walkthrough import WALK, validate_yaml

pytestmark = pytest.mark.slow


def test_data_page(tmp_path) -> None:
    shell = user_project(tmp_path, deep_merge(WALK, {"tracking": {"enabled": False}}))
    project = shell.cwd
    shell.run("source .venv/bin/activate")  # the README's, before any page's dvc
    for line in bash_lines("data.md"):
        result = shell.run(line)
        if line.startswith("dvc exp run --temp"):
            assert f"found in {project.resolve()}, the repo DVC was run from" in result.stdout
            assert "fetch: 16 images in 2 classes" in result.stdout
        if line.startswith("dvc repro -f fetch"):
            assert "Running stage 'fetch'" in result.stdout
            assert "Running stage 'split'" not in result.stdout
    # The page's inline commands, in its order: the stamp, status, unprotect, gc.
    fenced = {c for line in bash_lines("data.md") for c in normalize(line)}
    for command in shown_commands()["data.md"]:
        if command not in fenced:
            shell.run(command, stdin="y\n")  # `dvc gc -w` asks first
    assert all(p.stat().st_nlink == 1 for p in (project / "data/prepared/images").rglob("*.jpg"))
    shipped = yaml.safe_load((project / "params.yaml").read_text())
    for block in blocks(page("data.md")):
        if block.language == "yaml":
            validate_yaml(block, shipped)
    assert set(shown_commands()["data.md"]) <= shell.ran
