"""Training checkpoints: everything needed to resume exactly, in tensors and primitives read
with `torch.load(weights_only=True)` (no code runs), written atomically."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontune.fileio import atomic_path

# 2: the training data's augmentation is seeded per image (PerImageSeeds), so a
# checkpoint no longer carries the RNG state of the epoch's start ("epoch_rng").
FORMAT_VERSION = 2
CHECKPOINT_NAME = "last.pt"
# Left in the checkpoint folder once a run is done: an empty folder (a DVC output) made
# `dvc repro` print "WARNING: 'outputs/finetune/checkpoints' is empty." every time.
NOTE_NAME = "README.txt"
_NOTE = (
    f"{CHECKPOINT_NAME} here is the checkpoint of an unfinished fine-tune: `dvc repro` resumes "
    "from it.\nThe finetune stage removes it once its outputs are written and logged.\n"
)
_PRIMITIVES = (bool, int, float, str, bytes, type(None), torch.Tensor, torch.Size)


def capture_rng() -> dict[str, Any]:
    """The state of every RNG training touches: torch (CPU, CUDA), NumPy, Python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    numpy = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    numpy |= {"has_gauss": int(has_gauss), "gauss": float(gauss)}
    python = {"version": version, "internal": list(internal), "gauss_next": gauss_next}
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": python}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states captured by `capture_rng`."""
    torch.set_rng_state(state["torch"])
    numpy, python = state["numpy"], state["python"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_loadable(value: Any, where: str = "checkpoint") -> None:
    """Refuse anything `torch.load(weights_only=True)` would not read back."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_loadable(key, where)
            _check_loadable(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_loadable(item, f"{where}[{i}]")
    elif not isinstance(value, _PRIMITIVES):
        raise TypeError(f"{where} is a {type(value).__name__}: store only tensors and primitives")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically; the previous one survives any failure."""
    payload = {"format_version": FORMAT_VERSION, **state}
    _check_loadable(payload)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """Read a checkpoint (tensors and primitives only), or None when there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def discard_checkpoint(checkpoint_dir: Path) -> None:
    """Remove a finished run's checkpoint, if any (a note stays). Called once the outputs
    are logged: a stage failing before that resumes at its end, while a rerun for new code
    (code is no part of a checkpoint's config) must not get the old model back."""
    if checkpoint_dir.is_dir():
        with atomic_path(checkpoint_dir / NOTE_NAME) as tmp:
            tmp.write_text(_NOTE, encoding="utf-8")
    (checkpoint_dir / CHECKPOINT_NAME).unlink(missing_ok=True)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two (nested) config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{sub}" for sub in config_differences(a, b)]
        elif a != b:
            diffs.append(key)
    return diffs


def resume_mismatch(
    saved: dict[str, Any], config: dict[str, Any], layout: list, cycle_steps: Sequence[int]
) -> str | None:
    """Why a run of `config` must not resume from the checkpoint `saved`, or None."""
    if (version := saved.get("format_version")) != FORMAT_VERSION:
        return f"it has checkpoint format {version}; this visiontune reads format {FORMAT_VERSION}"
    diffs = config_differences(saved.get("config", {}), config)
    if diffs:
        return f"its config differs in {', '.join(diffs[:8])}"
    if saved.get("param_groups") != layout:
        return "its param-group layout differs"
    if saved["schedule"]["cycle_steps"] != list(cycle_steps):
        return "its schedule differs (steps per epoch changed)"
    return None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event set on SIGTERM, to checkpoint and stop; the previous handler is back on exit."""
    event = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)
