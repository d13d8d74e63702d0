"""dataset.py against SPEC §2: pairing, order, formats, preprocessing and every data error."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SKY_DEPTH
from PIL import Image

from dataset import DataError, DepthEstimationUnreal, check_files, list_pairs, read_depth, read_rgb
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
    with pytest.raises(DataError, match=r"cannot read depth .*0\.npy"):
        read_depth(path)
    np.save(path, np.array([{"a": 1}], dtype=object))  # pickled objects are refused, not run
    with pytest.raises(DataError, match=r"cannot read depth .*0\.npy"):
        read_depth(path)


@pytest.mark.parametrize("shape", [(18, 32, 3), (18,), (2, 18, 32)])
def test_wrong_shape_depth_is_named(root, shape):
    path = write_depth(root, "train", "0", np.ones(shape, np.float32))
    with pytest.raises(DataError, match=r"depth .*0\.npy has shape"):
        read_depth(path)


def test_depth_with_trailing_channel_and_other_dtypes_are_accepted(root):
    for dtype in (np.float64, np.float16, np.uint16):
        path = write_depth(root, "train", "0", np.full(SIZE + (1,), 3, dtype))
        depth = read_depth(path)
        assert depth.shape == SIZE and depth.dtype == np.float32 and (depth == 3).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_depth_is_rejected_and_named(root, bad):
    write_pair(root, "val", "0", 1)
    depth = np.ones(SIZE, np.float32)
    depth[3, 4] = bad
    write_depth(root, "val", "7", depth)
    write_rgb(root, "val", "7", np.zeros(SIZE + (3,), np.uint8))
    with pytest.raises(DataError, match=r"depth .*7\.npy contains NaN or inf"):
        DepthEstimationUnreal(root, "val")
    ds = DepthEstimationUnreal(root, "val", check=False)
    ds[0]  # the good pair loads
    with pytest.raises(DataError, match=r"depth .*7\.npy contains NaN or inf"):
        ds[1]


def test_rgb_and_depth_size_mismatch(root):
    write_rgb(root, "train", "0", np.zeros((18, 32, 3), np.uint8))
    write_depth(root, "train", "0", np.ones((18, 30), np.float32))
    with pytest.raises(DataError, match=r"0\.png is 32×18 but .*0\.npy is 30×18"):
        DepthEstimationUnreal(root, "train")
    with pytest.raises(DataError, match=r"0\.png is 32×18 but .*0\.npy is 30×18"):
        DepthEstimationUnreal(root, "train", check=False)[0]


def test_the_first_bad_file_in_order_is_reported(root):
    for i in range(12):
        write_pair(root, "train", str(i), 1)
    for stem in ("10", "3"):  # 3 comes first in file order, though written last
        with open(os.path.join(root, "rgb", "train", stem + ".png"), "wb") as f:
            f.write(b"broken")
    with pytest.raises(DataError, match=r"cannot read image .*[/\\]3\.png"):
        DepthEstimationUnreal(root, "train")


def test_grayscale_and_rgba_are_converted(root):
    grey = np.arange(18 * 32, dtype=np.uint8).reshape(SIZE)
    write_rgb(root, "train", "0", grey, mode="L")
    rgba = np.zeros(SIZE + (4,), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 128
    write_rgb(root, "train", "1", rgba, mode="RGBA")
    for stem in ("0", "1"):
        write_depth(root, "train", stem, np.ones(SIZE, np.float32))
    ds = DepthEstimationUnreal(root, "train", size=32)
    rgb0, _ = ds.load_raw(0)
    assert rgb0.shape == SIZE + (3,) and rgb0.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb0[..., c], grey)
    rgb1, _ = ds.load_raw(1)
    assert rgb1.shape == SIZE + (3,)
    assert (rgb1 == [10, 20, 30]).all()
    assert ds[0][0].shape == ds[1][0].shape == (3, 32, 32)


@pytest.mark.parametrize("progress", [True, False])
def test_file_check_shows_a_bar_on_large_splits_unless_quiet(tiny_data, capsys, progress):
    # 600 checks of one real pair: over the 500 at which the bar appears, and fast.
    pair = list_pairs(tiny_data, "train")[0]
    check_files([pair] * 600, desc="checking train files", progress=progress)
    assert ("checking train files" in capsys.readouterr().err) == progress
