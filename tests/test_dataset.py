"""dataset.py against docs/design.md §5: pairing, order, formats, preprocessing and every data error."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from conftest import SKY_DEPTH, synthetic_data
from dataset import (
    DataError,
    DepthEstimationUnreal,
    EpochBatches,
    EpochSampler,
    SplitCache,
    augment_pair,
    check_files,
    list_pairs,
    paste_patches,
    random_crops,
    read_depth,
    read_rgb,
    to_device_in_chunks,
)
from utils import UserError

SIZE = (18, 32)  # small native size: these tests are about files, not pixels


def write_rgb(root, split, stem, rgb, ext=".png", mode=None):
    folder = os.path.join(root, "rgb", split)
    os.makedirs(folder, exist_ok=True)
    image = Image.fromarray(rgb) if mode is None else Image.fromarray(rgb, mode)
    path = os.path.join(folder, stem + ext)
    image.save(path)
    return path


def write_depth(root, split, stem, depth):
    folder = os.path.join(root, "depth", split)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, stem + ".npy")
    np.save(path, depth)
    return path


def write_pair(root, split, stem, value, ext=".png", size=SIZE):
    """A pair whose RGB grey level and depth both encode `value`, to check pairing."""
    write_rgb(root, split, stem, np.full(size + (3,), value * 10, np.uint8), ext)
    write_depth(root, split, stem, np.full(size, float(value), np.float32))


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "data")


def test_pairs_by_stem_in_numeric_order(root):
    for stem, value in [("10", 3), ("2", 2), ("1", 1), ("b", 5), ("a", 4)]:
        write_pair(root, "train", stem, value)
    ds = DepthEstimationUnreal(root, "train", size=32)
    assert ds.names == ["1", "2", "10", "a", "b"]
    for i, value in enumerate([1, 2, 3, 4, 5]):
        rgb, depth = ds[i]
        assert torch.allclose(depth, torch.full_like(depth, float(value)))
        assert torch.allclose(rgb, torch.full_like(rgb, value * 10 / 255))


def test_accepts_jpeg_jpg_png_in_any_case(root):
    for i, ext in enumerate([".jpeg", ".jpg", ".png", ".JPG"]):
        write_pair(root, "val", str(i), i + 1, ext)
    os.makedirs(os.path.join(root, "rgb", "val", "notes"))  # folders and other files are ignored
    open(os.path.join(root, "rgb", "val", "README.txt"), "w").close()
    pairs = list_pairs(root, "val")
    assert [os.path.basename(p[1]) for p in pairs] == ["0.jpeg", "1.jpg", "2.png", "3.JPG"]
    ds = DepthEstimationUnreal(root, "val", size=32)
    for i in range(4):
        # A flat JPEG decodes to (nearly) its grey level.
        assert abs(float(ds[i][0].mean()) - (i + 1) * 10 / 255) < 2 / 255


def test_two_rgb_files_for_one_stem_is_an_error(root):
    write_pair(root, "train", "0", 1, ".png")
    write_rgb(root, "train", "0", np.zeros(SIZE + (3,), np.uint8), ".jpg")
    with pytest.raises(DataError, match=r"two RGB files for '0'.*0\.(jpg|png) and 0\.(jpg|png)"):
        list_pairs(root, "train")


def test_samples_shapes_dtypes_and_sky_clipping(tiny_data):
    ds = DepthEstimationUnreal(tiny_data, "train", native=True)
    assert len(ds) == 8
    rgb, depth, native = ds[0]
    assert rgb.shape == (3, 224, 224) and rgb.dtype == torch.float32
    assert depth.shape == (1, 224, 224) and depth.dtype == torch.float32
    assert native.shape == (1, 144, 256) and native.dtype == torch.float32
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1
    raw = np.load(os.path.join(tiny_data, "depth", "train", "0.npy"))
    assert (raw == SKY_DEPTH).any()  # the file really has sky
    np.testing.assert_array_equal(native[0].numpy(), np.clip(raw, 0, 20))
    # Bilinear weights sum to 1 only up to float32 rounding: 20 m may come out as 20.000002.
    assert float(native.max()) == 20.0 and 19.9 < float(depth.max()) <= 20.0 + 1e-4
    assert len(DepthEstimationUnreal(tiny_data, "test")[0]) == 2


def test_depth_is_clipped_then_resized_with_antialiasing(tiny_data):
    ds = DepthEstimationUnreal(tiny_data, "val")
    raw = torch.from_numpy(np.load(os.path.join(tiny_data, "depth", "val", "1.npy")))[None, None]
    expected = F.interpolate(raw.clamp(0, 20), size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(ds[1][1], expected[0], rtol=0, atol=1e-4)
    # Resizing the raw 100 m sky first would give other values near the horizon.
    other_order = F.interpolate(raw, size=(224, 224), mode="bilinear", align_corners=False, antialias=True).clamp(0, 20)
    assert (ds[1][1] - other_order[0]).abs().max() > 0.1


def test_rgb_is_scaled_to_unit_range_and_resized(tiny_data):
    ds = DepthEstimationUnreal(tiny_data, "val")
    with Image.open(os.path.join(tiny_data, "rgb", "val", "2.jpeg")) as im:
        raw = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255
    expected = F.interpolate(raw, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(ds[2][0], expected[0], rtol=0, atol=1e-4)


def test_missing_folder_names_it_and_the_fix(root):
    with pytest.raises(DataError, match=r"rgb[/\\]train.*not found.*synthetic\.py") as info:
        DepthEstimationUnreal(root, "train")
    assert isinstance(info.value, UserError)
    write_rgb(root, "train", "0", np.zeros(SIZE + (3,), np.uint8))
    with pytest.raises(DataError, match=r"depth[/\\]train.*not found"):
        list_pairs(root, "train")


def test_empty_split(root):
    os.makedirs(os.path.join(root, "rgb", "val"))
    os.makedirs(os.path.join(root, "depth", "val"))
    with pytest.raises(DataError, match=r"split 'val' is empty"):
        DepthEstimationUnreal(root, "val")


def test_unknown_split(root):
    with pytest.raises(DataError, match=r"unknown split 'dev'"):
        DepthEstimationUnreal(root, "dev")


def test_unpaired_files_listed_at_most_five(root):
    write_pair(root, "train", "0", 1)
    for i in range(1, 8):  # seven RGB files without depth
        write_rgb(root, "train", str(i), np.zeros(SIZE + (3,), np.uint8))
    write_depth(root, "train", "99", np.ones(SIZE, np.float32))
    with pytest.raises(DataError) as info:
        list_pairs(root, "train")
    message = str(info.value)
    assert "\n" not in message
    assert "7 RGB without depth (1, 2, 3, 4, 5)" in message
    assert "1 depth without RGB (99)" in message
    assert ", 6" not in message and ", 7" not in message


def test_depth_without_rgb_alone(root):
    write_pair(root, "test", "0", 1)
    write_depth(root, "test", "1", np.ones(SIZE, np.float32))
    with pytest.raises(DataError, match=r"1 depth without RGB \(1\)") as info:
        list_pairs(root, "test")
    assert "RGB without depth" not in str(info.value)


def test_unreadable_image_is_named(root):
    write_pair(root, "train", "0", 1, ".jpeg")
    path = os.path.join(root, "rgb", "train", "0.jpeg")
    with open(path, "rb") as f:
        head = f.read(200)
    with open(path, "wb") as f:  # a truncated JPEG
        f.write(head)
    with pytest.raises(DataError, match=r"cannot read image .*0\.jpeg"):
        DepthEstimationUnreal(root, "train")  # every file is decoded when the split opens
    ds = DepthEstimationUnreal(root, "train", check=False)
    with pytest.raises(DataError, match=r"cannot read image .*0\.jpeg"):
        ds[0]
    with open(path, "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*0\.jpeg"):
        read_rgb(path)


def test_unreadable_depth_is_named(root):
    path = write_depth(root, "train", "0", np.ones(SIZE, np.float32))
    with open(path, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match=r"depth .*0\.npy is not a NumPy \.npy file"):
        read_depth(path)
    np.save(path, np.array([{"a": 1}], dtype=object))  # pickled objects are refused, not run
    with pytest.raises(DataError, match=r"depth .*0\.npy holds Python objects"):
        read_depth(path)


@pytest.mark.parametrize("shape", [(18, 32, 3), (18,), (2, 18, 32)])
def test_wrong_shape_depth_is_named(root, shape):
    path = write_depth(root, "train", "0", np.ones(shape, np.float32))
    with pytest.raises(DataError, match=r"depth .*0\.npy has shape"):
        read_depth(path)


def test_depth_with_trailing_channel_and_other_dtypes_are_accepted(root):
    for dtype, metres in ((np.float64, 3), (np.float16, 3), (np.uint16, np.float32(3) / np.float32(1000))):
        path = write_depth(root, "train", "0", np.full(SIZE + (1,), 3, dtype))
        depth = read_depth(path)  # integers are value / --depth-scale, as a 16-bit PNG
        assert depth.shape == SIZE and depth.dtype == np.float32 and (depth == metres).all()


def test_the_first_bad_file_in_order_is_reported(root):
    for i in range(12):
        write_pair(root, "train", str(i), 1)
    for stem in ("10", "3"):  # 3 comes first in file order, though written last
        with open(os.path.join(root, "rgb", "train", stem + ".png"), "wb") as f:
            f.write(b"broken")
    with pytest.raises(DataError, match=r"cannot read image .*[/\\]3\.png"):
        DepthEstimationUnreal(root, "train")


@pytest.mark.parametrize("progress", [True, False])
def test_file_check_shows_a_bar_on_large_splits_unless_quiet(tiny_data, capsys, progress):
    # 600 checks of one real pair: over the 500 at which the bar appears, and fast.
    pair = list_pairs(tiny_data, "train")[0]
    check_files([pair] * 600, desc="checking train files", progress=progress)
    assert ("checking train files" in capsys.readouterr().err) == progress


# ------------------------------------------------------------------ augmentation (--augment)
def asymmetric_pair(b=16, h=24, w=40):
    """RGB with a left-to-right ramp and random texture; depth = 20 × its red channel."""
    g = torch.Generator().manual_seed(5)
    rgb = torch.rand(b, 3, h, w, generator=g) * 0.5 + torch.linspace(0, 0.5, w).view(1, 1, 1, w)
    return rgb, 20 * rgb[:, :1].clone()


def test_flip_keeps_an_asymmetric_pair_a_pair():
    rgb, depth = asymmetric_pair()
    out_rgb, out_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(0), max_scale=1.0, jitter=0.0)
    flipped = [torch.allclose(out_rgb[i], rgb[i].flip(-1), atol=1e-5) for i in range(len(rgb))]
    kept = [torch.allclose(out_rgb[i], rgb[i], atol=1e-5) for i in range(len(rgb))]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 0 < sum(flipped) < len(rgb)
    for i in range(len(rgb)):
        expected = depth[i].flip(-1) if flipped[i] else depth[i]
        torch.testing.assert_close(out_depth[i], expected, atol=2e-5, rtol=0)


def test_zoom_and_flip_move_rgb_and_depth_together_without_borders():
    rgb, depth = asymmetric_pair()
    out_rgb, out_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(1), jitter=0.0)
    assert out_rgb.shape == rgb.shape and out_depth.shape == depth.shape
    assert not torch.allclose(out_rgb, rgb)
    torch.testing.assert_close(out_depth, 20 * out_rgb[:, :1], atol=1e-4, rtol=0)
    const_rgb, const_depth = torch.full((4, 3, 24, 40), 0.5), torch.full((4, 1, 24, 40), 7.0)
    zoomed_rgb, zoomed_depth = augment_pair(const_rgb, const_depth, torch.Generator().manual_seed(2), max_scale=1.5,
                                            jitter=0.0)
    torch.testing.assert_close(zoomed_depth, const_depth)  # no black (zero) border anywhere
    torch.testing.assert_close(zoomed_rgb, const_rgb)


def test_a_closer_camera_divides_the_depth_by_the_zoom():
    """A red ramp from 0 to 1 across the picture spans 1 / s of that after a zoom by s: the depth, 10 m
    everywhere, must come out as 10 / s, the same s."""
    b, w = 8, 200
    rgb = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(b, 3, 8, w).contiguous()
    depth = torch.full((b, 1, 8, w), 10.0)
    kept_rgb, kept = augment_pair(rgb, depth, torch.Generator().manual_seed(6), max_scale=1.5, jitter=0.0)
    closer_rgb, closer = augment_pair(rgb, depth, torch.Generator().manual_seed(6), max_scale=1.5, jitter=0.0,
                                      scale_depth=True)
    assert torch.equal(closer_rgb, kept_rgb) and torch.allclose(kept, depth)
    inv_zoom = (closer_rgb[:, 0, 4, -1] - closer_rgb[:, 0, 4, 0]).abs()
    assert float(inv_zoom.min()) < 0.9 and float(inv_zoom.max()) <= 1  # some zoomed, none shrunk
    torch.testing.assert_close(closer[:, 0, 4, :], 10 * inv_zoom[:, None].expand(b, w), atol=0.1, rtol=0)
    assert float(closer.amax(dim=(1, 2, 3)).sub(closer.amin(dim=(1, 2, 3))).max()) < 1e-4  # still one depth each


def test_colour_jitter_changes_rgb_only():
    rgb, depth = asymmetric_pair()
    plain_rgb, plain_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(4), jitter=0.0)
    jit_rgb, jit_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(4), jitter=0.3)
    assert torch.equal(jit_depth, plain_depth)
    assert (jit_rgb - plain_rgb).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image jittered
    assert jit_rgb.min() >= 0 and jit_rgb.max() <= 1


def test_augmentation_is_deterministic_and_takes_single_samples():
    rgb, depth = asymmetric_pair(b=1)
    a = augment_pair(rgb[0], depth[0], torch.Generator().manual_seed(9))
    b = augment_pair(rgb[0], depth[0], torch.Generator().manual_seed(9))
    assert a[0].shape == (3, 24, 40) and a[1].shape == (1, 24, 40)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(9)
    c = augment_pair(rgb[0], depth[0])  # the global RNG, as the Trainer uses it
    assert torch.equal(a[0], c[0])


def changed_box(before, after):
    """(top, left, height, width) of the pixels where two (C, H, W) images differ; None when none differs."""
    rows, cols = torch.nonzero((before != after).any(0), as_tuple=True)
    if len(rows) == 0:
        return None
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1


def test_paste_moves_a_rectangle_of_the_neighbour_with_its_depth():
    rgb, depth = asymmetric_pair(b=6, h=24, w=40)
    out_rgb, out_depth = paste_patches(rgb, depth, torch.Generator().manual_seed(0), prob=1.0)
    torch.testing.assert_close(out_depth, 20 * out_rgb[:, :1])  # RGB and depth moved together
    moved = 0
    for i in range(len(rgb)):
        top, left, ph, pw = changed_box(rgb[i], out_rgb[i])
        assert 6 <= ph <= 12 and 10 <= pw <= 20  # a quarter to a half of each side
        patch = out_rgb[i, :, top:top + ph, left:left + pw]
        assert (patch != rgb[i, :, top:top + ph, left:left + pw]).any(0).all()  # the whole box replaced
        # The patch is found in the previous image (the last one for the first), at some place.
        source = rgb[i - 1].unfold(1, ph, 1).unfold(2, pw, 1)  # (3, H - ph + 1, W - pw + 1, ph, pw)
        found = torch.nonzero((source == patch[:, None, None]).flatten(3).all(3).all(0))
        assert len(found) == 1
        moved += tuple(found[0].tolist()) != (top, left)
    assert moved >= len(rgb) - 1  # cut at one place, pasted at another


def test_paste_probability_and_determinism():
    rgb, depth = asymmetric_pair(b=64, h=12, w=12)
    same = paste_patches(rgb, depth, torch.Generator().manual_seed(3), prob=0.0)
    assert torch.equal(same[0], rgb) and torch.equal(same[1], depth)
    half_a = paste_patches(rgb, depth, torch.Generator().manual_seed(3), prob=0.5)
    half_b = paste_patches(rgb, depth, torch.Generator().manual_seed(3), prob=0.5)
    assert torch.equal(half_a[0], half_b[0]) and torch.equal(half_a[1], half_b[1])
    pasted = sum(changed_box(rgb[i], half_a[0][i]) is not None for i in range(len(rgb)))
    assert 16 <= pasted <= 48
    one = paste_patches(rgb[:1], depth[:1], torch.Generator().manual_seed(3), prob=1.0)
    assert torch.equal(one[0], rgb[:1])  # nothing to paste from


def test_crops_cut_rgb_and_depth_at_one_place_per_image():
    rgb, depth = asymmetric_pair(b=32, h=24, w=40)
    out_rgb, out_depth = random_crops(rgb, depth, (8, 16), torch.Generator().manual_seed(0))
    assert out_rgb.shape == (32, 3, 8, 16) and out_depth.shape == (32, 1, 8, 16)
    places = set()
    for i in range(len(rgb)):
        windows = rgb[i].unfold(1, 8, 1).unfold(2, 16, 1)  # (3, 17, 25, 8, 16): every 8 x 16 window
        found = torch.nonzero((windows == out_rgb[i][:, None, None]).flatten(3).all(3).all(0))
        assert len(found) == 1
        top, left = found[0].tolist()
        assert torch.equal(out_depth[i], depth[i, :, top:top + 8, left:left + 16])  # the same window of the depth
        places.add((top, left))
    assert len(places) > 16  # drawn for each image
    again = random_crops(rgb, depth, (8, 16), torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out_rgb)
    whole = random_crops(rgb, depth, (24, 40), torch.Generator().manual_seed(0))
    assert torch.equal(whole[0], rgb) and torch.equal(whole[1], depth)
    with pytest.raises(ValueError, match="does not fit"):
        random_crops(rgb, depth, (32, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_on_cuda_matches_cpu():
    rgb, depth = asymmetric_pair()
    cpu = augment_pair(rgb, depth, torch.Generator().manual_seed(3))
    gpu = augment_pair(rgb.cuda(), depth.cuda(), torch.Generator().manual_seed(3))
    assert gpu[0].is_cuda
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-3, rtol=0)


# ------------------------------------------------------------------ data order and mean depth
def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    a = list(EpochSampler(10, seed=0, epoch=3))
    assert sorted(a) == list(range(10))
    assert list(EpochSampler(10, seed=0, epoch=3)) == a
    assert list(EpochSampler(10, seed=0, epoch=4)) != a
    assert list(EpochSampler(10, seed=1, epoch=3)) != a
    assert list(EpochSampler(10, seed=0, epoch=3, start=4)) == a[4:]
    assert list(EpochSampler(5, seed=0, epoch=0, shuffle=False)) == [0, 1, 2, 3, 4]


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


def test_mean_training_depth_is_the_clipped_mean(tiny_data):
    ds = DepthEstimationUnreal(tiny_data, "train")
    files = [np.load(os.path.join(tiny_data, "depth", "train", f"{i}.npy")) for i in range(8)]
    expected = np.mean([np.clip(d, 0, 20).astype(np.float64) for d in files])
    assert ds.mean_depth == pytest.approx(expected, rel=1e-6)
    # A split opened without the up-front check computes it on first use, to the same value.
    assert DepthEstimationUnreal(tiny_data, "train", check=False).mean_depth == ds.mean_depth


# ------------------------------------------------------------------ the decoded cache (SplitCache)
CPU = torch.device("cpu")


@pytest.fixture
def data(tmp_path):
    return synthetic_data(str(tmp_path / "data"), 6, 0)


def cache_files(directory):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "train-224x224-*")))


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
    assert len(glob.glob(str(tmp_path / "user" / "depthnet" / "*" / "train-224x224-*" / "rgb.npy"))) == 1
    forbid_building(monkeypatch)
    loaded = SplitCache.open(DepthEstimationUnreal(data, "train"))
    assert torch.equal(loaded.rgb, built.rgb) and torch.equal(loaded.depth, built.depth)


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


def cache_folder(data):
    (folder,) = glob.glob(os.path.join(data, ".cache", "train-224x224-*"))
    return folder


def object_array(path):
    np.save(path, np.array([np.zeros(3), "text"], dtype=object), allow_pickle=True)


def half_the_samples(folder):
    for name in ("rgb.npy", "depth.npy"):
        array = np.load(os.path.join(folder, name))
        np.save(os.path.join(folder, name), array[: len(array) // 2])


def another_size(folder):
    np.save(os.path.join(folder, "rgb.npy"), np.zeros((6, 3, 112, 112), np.uint8))
    np.save(os.path.join(folder, "depth.npy"), np.ones((6, 1, 112, 112), np.float16))
    meta = json.load(open(os.path.join(folder, "meta.json")))
    json.dump({**meta, "height": 112, "width": 112}, open(os.path.join(folder, "meta.json"), "w"))


def truncated(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


CACHE_DAMAGE = {
    "an object array in rgb.npy": lambda folder: object_array(os.path.join(folder, "rgb.npy")),
    "a list as meta.json": lambda folder: json.dump([1, 2], open(os.path.join(folder, "meta.json"), "w")),
    "half the samples": half_the_samples,
    "another spatial size": another_size,
    "float32 depth": lambda folder: np.save(os.path.join(folder, "depth.npy"),
                                            np.load(os.path.join(folder, "depth.npy")).astype(np.float32)),
    "a truncated rgb.npy": lambda folder: truncated(os.path.join(folder, "rgb.npy")),
    "a pickle as depth.npy": lambda folder: torch.save({"depth": torch.zeros(2)}, os.path.join(folder, "depth.npy")),
    "meta.json missing": lambda folder: os.remove(os.path.join(folder, "meta.json")),
    "a string as mean_depth": lambda folder: json.dump(
        {**json.load(open(os.path.join(folder, "meta.json"))), "mean_depth": "5"},
        open(os.path.join(folder, "meta.json"), "w")),
    "a file, not a folder": lambda folder: (shutil.rmtree(folder), open(folder, "w").close()),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_cache_not_as_written_is_named_removed_and_rebuilt(data, damage):
    built = SplitCache.open(DepthEstimationUnreal(data, "train", check=False))
    rgb, depth = built.rgb.clone(), built.depth.clone()
    del built
    folder = cache_folder(data)
    CACHE_DAMAGE[damage](folder)
    with pytest.warns(UserWarning, match=r"data cache .* is not usable \(.+\); rebuilding it"):
        cache = SplitCache.open(DepthEstimationUnreal(data, "train", check=False))
    assert torch.equal(cache.rgb, rgb) and torch.equal(cache.depth, depth)
    assert cache_folder(data) == folder and os.path.isfile(os.path.join(folder, "meta.json"))


def test_cache_is_written_to_disk_and_read_through_memory_maps(data):
    cache = SplitCache.open(DepthEstimationUnreal(data, "train"))
    folder = cache_folder(data)
    assert sorted(os.listdir(folder)) == ["depth.npy", "meta.json", "rgb.npy"]
    assert not glob.glob(os.path.join(data, ".cache", ".*"))  # no partial build left behind
    on_disk = np.load(os.path.join(folder, "rgb.npy"), mmap_mode="r")
    assert np.array_equal(on_disk, cache.rgb.numpy())
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["count"] == 6 and (meta["height"], meta["width"]) == (224, 224)
    assert meta["mean_depth"] == cache.mean_depth and meta["has_holes"] is False


def test_the_pixel_budget_is_part_of_the_cache_key(data):
    SplitCache.open(DepthEstimationUnreal(data, "train", check=False))
    with pytest.raises(DataError, match="more than the 100 pixels allowed"):
        SplitCache.open(DepthEstimationUnreal(data, "train", check=False, max_pixels=100))


def test_a_cache_that_does_not_fit_on_disk_is_said_and_the_files_are_read(data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    monkeypatch.setattr("dataset.CACHE_DISK_MARGIN", 1 << 60)
    with pytest.warns(UserWarning, match=r"no decoded cache .* GB on disk .* reads the files instead"):
        assert SplitCache.open(DepthEstimationUnreal(data, "train", check=False)) is None
    assert not glob.glob(os.path.join(data, ".cache", "*"))


def test_a_cache_is_copied_to_a_device_a_chunk_at_a_time(data, monkeypatch):
    cache = SplitCache.open(DepthEstimationUnreal(data, "train", check=False))
    monkeypatch.setattr("dataset.GPU_COPY_CHUNK", 4)  # 6 samples: a whole chunk, then a part
    copied = to_device_in_chunks(cache.depth, CPU)
    assert torch.equal(copied, cache.depth) and copied.data_ptr() != cache.depth.data_ptr()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_integer_npy_depth_is_value_over_depth_scale_as_a_png(tmp_path, dtype):
    millimetres = np.array([[0, 1, 999], [1500, 20000, 65535]])
    np.save(tmp_path / "d.npy", millimetres.astype(dtype))
    Image.fromarray(millimetres.astype(np.uint16)).save(tmp_path / "d.png")
    from_npy = read_depth(str(tmp_path / "d.npy"), depth_scale=1000.0)
    assert from_npy.dtype == np.float32
    assert np.array_equal(from_npy, read_depth(str(tmp_path / "d.png"), depth_scale=1000.0))
    assert np.array_equal(read_depth(str(tmp_path / "d.npy"), depth_scale=256.0),
                          millimetres.astype(np.float32) / np.float32(256.0))
