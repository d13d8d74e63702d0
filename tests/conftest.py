"""Shared test data: tiny RGB/depth pairs in the layout of docs/design.md §5.

`make_dataset` is importable (`from conftest import make_dataset`) for tests that need
their own variant; `tiny_data` is a session-wide read-only set (train 8, val 4, test 4).
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from losses import DepthLoss
from synthetic import generate_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One intra-op thread: the tests' tensors are tiny, and on a busy 2-core machine two OpenMP
# threads spin-wait on each other, several times slower than one. Subprocesses get the same via
# OMP_NUM_THREADS.
torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

SKY_DEPTH = 100.0


def pytest_collection_modifyitems(items):
    """The slow tests first, each file's order kept otherwise: side by side in several processes, the short
    tests then fill the gaps, rather than one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def make_pair(rng, size):
    """One (rgb HWC uint8, depth HW float32) scene: sky on top, a ground plane, a box.

    Structured rather than pure noise so that resizing, SSIM and training see edges and
    gradients; the RGB is a function of depth plus noise so the two stay related.
    """
    h, w = size
    rows = np.arange(h, dtype=np.float32)[:, None]
    horizon = int(h * rng.uniform(0.3, 0.45))
    # Ground plane: depth falls from ~18 m at the horizon to ~2 m at the bottom row.
    ground = 2.0 + 16.0 * (h - 1 - rows) / max(h - 1 - horizon, 1)
    depth = np.broadcast_to(ground, (h, w)).astype(np.float32).copy()
    depth[:horizon] = SKY_DEPTH
    # A box (a "building") standing on the ground at a constant depth.
    x0 = int(rng.integers(0, w // 2))
    x1 = x0 + int(rng.integers(w // 8, w // 2))
    y0 = int(rng.integers(horizon // 3, horizon + 1))
    depth[y0 : int(h * 0.8), x0:x1] = rng.uniform(4.0, 15.0)
    depth = np.minimum(depth + rng.normal(0, 0.05, depth.shape).astype(np.float32), SKY_DEPTH)
    depth[:horizon][depth[:horizon] > 20] = SKY_DEPTH  # sky stays exactly 100 m, as in the real data

    shade = np.clip(depth, 0, 20) / 20.0
    base = rng.uniform(0.2, 1.0, size=3)
    rgb = shade[..., None] * base * 200 + rng.normal(0, 8, (h, w, 3))
    rgb[:horizon] = [120, 170, 235]  # a sky colour
    return np.clip(rgb, 0, 255).astype(np.uint8), depth.astype(np.float32)


def make_dataset(root, splits=None, ext=".jpeg", size=(144, 256), seed=0):
    """Write ROOT/rgb/SPLIT/I{ext} and ROOT/depth/SPLIT/I.npy for I = 0..n-1; return str(root)."""
    splits = {"train": 8, "val": 4} if splits is None else splits
    rng = np.random.default_rng(seed)
    root = str(root)
    for split, n in splits.items():
        rgb_dir = os.path.join(root, "rgb", split)
        depth_dir = os.path.join(root, "depth", split)
        os.makedirs(rgb_dir, exist_ok=True)
        os.makedirs(depth_dir, exist_ok=True)
        for i in range(n):
            rgb, depth = make_pair(rng, size)
            Image.fromarray(rgb).save(os.path.join(rgb_dir, f"{i}{ext}"), quality=95)
            np.save(os.path.join(depth_dir, f"{i}.npy"), depth)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A read-only data set shared by the session: train 8, val 4, test 4 pairs of 144 × 256."""
    return make_dataset(tmp_path_factory.mktemp("tiny_data"), {"train": 8, "val": 4, "test": 4})


def synthetic_data(root, n_train, n_val):
    """A data set written by synthetic.py (street scenes for train, yard scenes for val, 144 × 256); str(root)."""
    generate_dataset(root, n_train, n_val, 0, progress=False)
    return str(root)


TRAINED_SIZE = 64  # the checkpoint's --image-size: small, so that the tests run fast on a CPU


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised DepthNet saved as a training run at --image-size 64 would: RUN/best.pt."""
    return save_random_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", seed=0)


def save_random_checkpoint(path, seed, image_size=TRAINED_SIZE, encoder="resnet18"):
    """A DepthNet initialised from `seed`, saved at `path` in the format training writes (its inference part:
    model_args, input_size, depth conventions, weights). ResNet-18: what uses a trained model does not
    depend on the encoder, and it is twice as fast as the paper's ResNet-34."""
    from checkpoint import save_checkpoint
    from conventions import PAPER
    from model import DepthNet

    torch.manual_seed(seed)
    model = DepthNet(weights=None, init_depth=10.0, encoder=encoder)
    save_checkpoint({"model_args": model.model_args, "input_size": image_size, "depth": PAPER.as_dict(),
                     "model": model.state_dict(), "metrics": {}}, str(path))
    return path


class LossWithNaNs(DepthLoss):
    """The real loss, except NaN on the listed calls (1-based): monkeypatch it over train.DepthLoss."""
    calls, bad_calls = 0, set()

    def forward(self, pred, target):
        LossWithNaNs.calls += 1
        loss, parts = super().forward(pred, target)
        return (loss * float("nan") if LossWithNaNs.calls in LossWithNaNs.bad_calls else loss), parts


def train_tiny_run(data_dir, run_dir, *extra):
    """Train a 64 × 64 model for 4 steps (2 epochs of 8 images), evaluating each epoch; returns run_dir."""
    from main import main

    argv = ["--data-dir", str(data_dir), "--run-dir", str(run_dir), "--weights", "none", "--image-size", "64",
            "--batch-size", "4", "--max-steps", "4", "--eval-every", "1", "--workers", "0", "--amp", "off", "--quiet",
            *extra]
    assert main(argv) == 0
    return run_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    """best.pt of a tiny trained run, for tests of what uses a trained model (read-only)."""
    return train_tiny_run(tiny_data, tmp_path_factory.mktemp("tiny_run"), "--vis-every", "0") / "best.pt"
