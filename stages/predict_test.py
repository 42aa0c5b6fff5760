"""predict_test: the submission table for the unlabelled test images fetch held out.

`visiontune predict MODEL data/prepared/test --submission FILE` as a stage: id (file name
without extension) + one probability column per class, with the model's own TTA views.
A source without a test folder gives a file with the header alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from visiontune.cli import main as cli_main
from visiontune.fileio import atomic_open
from visiontune.models.classifier import read_model_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="outputs/finetune/model.safetensors")
    parser.add_argument("--test", default="data/prepared/test", help="held-out test images")
    parser.add_argument("--out", default="outputs/predict_test/submission.csv")
    args = parser.parse_args(argv)
    if Path(args.test).is_dir():
        return cli_main(["predict", args.model, args.test, "--submission", args.out])
    classes = read_model_info(Path(args.model)).classes
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out) as out:
        out.write(",".join(["id", *classes]) + "\n")
    print(f"predict_test: no test folder {args.test} (the source has no unlabelled test/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
