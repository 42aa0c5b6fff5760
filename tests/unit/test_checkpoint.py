"""Checkpoints: safe to load (weights_only), atomic, RNG round trip, config comparison."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from visiontune.train.checkpoint import (
    CHECKPOINT_NAME,
    NOTE_NAME,
    capture_rng,
    config_differences,
    discard_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    stop_on_signals,
)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in NumPy's state
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"rng": capture_rng(), "step": 7})
    expected = draws()
    state = load_checkpoint(path)  # torch.load(weights_only=True) inside
    restore_rng(state["rng"])
    assert draws() == expected
    assert state["step"] == 7


def test_optimizer_and_model_state_survive(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    state = load_checkpoint(path)
    clone = torch.nn.Linear(4, 2)
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1e-3)
    clone.load_state_dict(state["model"])
    clone_opt.load_state_dict(state["optimizer"])
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters(), strict=True)
    )
    p, q = next(iter(opt.state.values())), next(iter(clone_opt.state.values()))
    assert torch.equal(p["exp_avg"], q["exp_avg"])


def test_missing_checkpoint_is_none_and_failed_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "last.pt"
    assert load_checkpoint(path) is None
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError, match=r"\['step'\] is a object"):
        save_checkpoint(path, {"step": object()})  # weights_only could not load it
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_discarded_checkpoint_leaves_a_note_not_an_empty_folder(tmp_path):
    # DVC warns about an empty output folder on every `dvc repro`.
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"step": 3})
    discard_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [NOTE_NAME]
    discard_checkpoint(tmp_path)  # none left to remove: no error
    assert [p.name for p in tmp_path.iterdir()] == [NOTE_NAME]


def test_config_differences_name_nested_keys():
    saved = {"finetune": {"lr": 0.01, "augment": {"flip": True}}, "seed": 1}
    current = {"finetune": {"lr": 0.02, "augment": {"flip": False}}, "seed": 1, "new": 3}
    assert config_differences(saved, current) == ["finetune.augment.flip", "finetune.lr", "new"]
    assert config_differences(saved, saved) == []


def test_sigterm_sets_the_stop_event_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) is before
