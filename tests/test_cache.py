"""The decoded data cache (dataset.SplitCache) and the batch plan it shares with the folder loader."""
import glob
import os

import numpy as np
import pytest
from conftest import synthetic_data
import torch
from torch.utils.data import DataLoader

from dataset import DepthEstimationUnreal, EpochBatches, EpochSampler, SplitCache

CPU = torch.device("cpu")


@pytest.fixture
def data(tmp_path):
    return synthetic_data(str(tmp_path / "data"), 6, 0)


def cache_files(directory):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "train-224-*.pt")))


def forbid_building(monkeypatch):
    def fail(cls, *args, **kwargs):
        pytest.fail("an up-to-date cache was rebuilt")

    monkeypatch.setattr(SplitCache, "build", classmethod(fail))


def test_cache_holds_the_folder_samples_up_to_uint8_and_float16_rounding(data):
    ds = DepthEstimationUnreal(data, "train")
    cache = SplitCache.open(ds)
    assert cache.rgb.dtype == torch.uint8 and tuple(cache.rgb.shape) == (6, 3, 224, 224)
    assert cache.depth.dtype == torch.float16 and tuple(cache.depth.shape) == (6, 1, 224, 224)
    for i in range(len(ds)):
        rgb, depth = ds[i]
        assert (cache.rgb[i].float() / 255 - rgb).abs().max() <= 0.5 / 255 + 1e-6
        # float16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of it.
        assert ((cache.depth[i].float() - depth).abs() <= depth.abs() * 2**-11 + 1e-7).all()
        assert float(cache.depth[i].max()) == pytest.approx(20.0, abs=0.01)  # the sky, clipped as in the folder samples
    assert cache.mean_depth == pytest.approx(ds.mean_depth, rel=1e-12)


def test_cache_is_reused_until_a_file_changes(data, monkeypatch):
    SplitCache.open(DepthEstimationUnreal(data, "train"))
    cache_dir = os.path.join(data, ".cache")
    first = cache_files(cache_dir)
    assert len(first) == 1

    with monkeypatch.context() as m:
        forbid_building(m)
        SplitCache.open(DepthEstimationUnreal(data, "train"))

    path = os.path.join(data, "depth", "train", "3.npy")
    np.save(path, np.full((144, 256), 7.0, np.float32))  # same size on disk: only the mtime tells
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = SplitCache.open(DepthEstimationUnreal(data, "train"))
    assert torch.all(changed.depth[3] == 7.0)
    second = cache_files(cache_dir)
    assert len(second) == 1 and second != first  # the stale cache is gone


def test_unwritable_data_folder_falls_back_to_the_user_cache(data, tmp_path, monkeypatch):
    open(os.path.join(data, ".cache"), "w").close()  # a file where the cache folder would go
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    built = SplitCache.open(DepthEstimationUnreal(data, "train"))
    assert len(glob.glob(str(tmp_path / "user" / "depthnet" / "*" / "train-224-*.pt"))) == 1
    forbid_building(monkeypatch)
    loaded = SplitCache.open(DepthEstimationUnreal(data, "train"))
    assert torch.equal(loaded.rgb, built.rgb) and torch.equal(loaded.depth, built.depth)


def test_epoch_batches_follow_epoch_sampler_and_split_across_ranks():
    n, batch = 11, 4
    plan = EpochBatches(n, batch, seed=3)
    plan.set_epoch(2, start_batch=1)
    folder = [b.tolist() for b in DataLoader(range(n), batch_size=batch, sampler=EpochSampler(n, 3, 2, start=batch))]
    assert list(plan) == folder and len(folder) == 2

    full = EpochBatches(n, batch, seed=3)
    ranks = [EpochBatches(n, batch, seed=3, rank=r, world_size=2) for r in range(2)]
    for p in (full, *ranks):
        p.set_epoch(2)
    assert [a + b for a, b in zip(*ranks)] == list(full)
    assert [len(b) for b in ranks[0]] == [2, 2, 2] and [len(b) for b in ranks[1]] == [2, 2, 1]

    # A last global batch with fewer images than processes is dropped on every rank.
    short = [EpochBatches(9, batch, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(p) for p in short] == [2, 2]


def test_cache_and_folder_loader_give_the_same_batches(data):
    ds = DepthEstimationUnreal(data, "train")
    cache = SplitCache.open(ds).place(CPU)
    plan = EpochBatches(len(ds), 2, seed=0)
    plan.set_epoch(1, start_batch=1)  # as a resumed run would start
    folder = list(DataLoader(ds, batch_sampler=plan))
    cached = list(cache.batches(list(plan), CPU))
    assert len(folder) == len(cached) == 2
    for (rgb_f, depth_f), (rgb_c, depth_c) in zip(folder, cached):
        assert rgb_c.dtype == depth_c.dtype == torch.float32
        assert rgb_c.shape == rgb_f.shape and depth_c.shape == depth_f.shape
        assert (rgb_c - rgb_f).abs().max() <= 0.5 / 255 + 1e-6
        assert ((depth_c - depth_f).abs() <= depth_f * 2**-11 + 1e-7).all()
