"""utils.py: atomic checkpoints loaded with weights_only=True, their errors, RNG state."""
import os
import random

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from utils import CheckpointError, rng_state, set_rng_state


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "config": {"lr": 1e-3, "name": "x", "flag": None},
           "metrics": {"rmse": 1.5}, "history": [1, 2.5, "three"]}
    save_checkpoint(obj, str(path))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["w"], obj["model"]["w"])
    assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in obj.items() if k != "model"}
    torch.load(path, weights_only=True)  # loadable by anyone with weights_only, as docs/design.md §9 promises

    # Overwriting goes through a temporary file too; a failed write leaves the old file intact.
    def failing_save(o, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", failing_save)
        with pytest.raises(CheckpointError, match="No space left on device.*previous file is intact"):
            save_checkpoint({"model": {}}, str(path))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(str(path))["step"] == 7


class NotATensor:
    pass


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    code = tmp_path / "code.pt"
    torch.save({"model": {}, "payload": NotATensor()}, code)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(str(code))
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(truncated))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(str(other))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    path = tmp_path / "rng.pt"
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"model": {}, "rng": rng_state()}, str(path))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(str(path))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
