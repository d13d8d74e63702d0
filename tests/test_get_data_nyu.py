"""get_data.py nyu on a small file of the labelled .mat's HDF5 structure, written here, never the network."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import get_data
from conftest import REPO, SUBPROCESS_ENV
from dataset import list_split, read_depth

h5py = pytest.importorskip("h5py", reason="get_data.py nyu needs h5py: pip install -r requirements-nyu.txt")
scipy_io = pytest.importorskip("scipy.io", reason="get_data.py nyu needs scipy: pip install -r requirements-nyu.txt")

SCENES = ("kitchen", "bathroom", "office", "bathroom")
TEST_FRAMES = (2, 4)  # splits.mat numbers frames from 1


@pytest.fixture(scope="module")
def nyu_files(tmp_path_factory):
    """(labelled .mat, splits.mat, the frames' RGB (N, 480, 640, 3), raw depth (N, 480, 640)) of four frames, laid
    out as the published files are: MATLAB's column order (images (N, 3, 640, 480) in HDF5), scene types as
    references to UTF-16 strings, the split as a MATLAB v5 file."""
    folder = tmp_path_factory.mktemp("nyu_files")
    rng = np.random.default_rng(0)
    n = len(SCENES)
    # Smooth pictures (a colour per frame, a horizontal ramp) that JPEG keeps to within a few levels.
    ramp = np.linspace(0, 60, 640)[None, None, :, None]
    rgb = (rng.integers(100, 190, (n, 1, 1, 3)) + ramp + np.zeros((n, 480, 640, 3))).astype(np.uint8)
    raw = rng.uniform(0.5, 9.0, (n, 480, 640)).astype(np.float32)
    raw[:, :20] = 0.0  # rows the Kinect did not measure
    with h5py.File(folder / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = rgb.transpose(0, 3, 2, 1)
        f["rawDepths"] = raw.transpose(0, 2, 1)
        f["depths"] = np.maximum(raw, 1.0).transpose(0, 2, 1)  # the filled depth, which the split does not use
        refs = f.create_dataset("sceneTypes", (1, n), dtype=h5py.ref_dtype)
        for i, scene in enumerate(SCENES):
            refs[0, i] = f.create_dataset(f"#refs#/{i}", data=np.array([[ord(c)] for c in scene], np.uint16)).ref
    scipy_io.savemat(folder / "splits.mat", {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2], [4]])})
    return folder / "nyu_depth_v2_labeled.mat", folder / "splits.mat", rgb, raw


def test_writes_the_test_frames_as_the_peers_official_split(nyu_files, tmp_path):
    mat, splits, rgb, raw = nyu_files
    out = tmp_path / "data" / "nyu"
    # splits.mat through a URL (downloaded beside --out and kept), the .mat as a local path.
    count = get_data.fetch_nyu(str(out), str(mat), splits.as_uri(), expected=2, progress=False)
    assert count == 2 and sorted(os.listdir(tmp_path / "data")) == ["nyu", "splits.mat"]
    assert (out / "test.txt").read_text() == ("bathroom/rgb_00001.jpg bathroom/sync_depth_00001.png 518.8579\n"
                                              "bathroom/rgb_00003.jpg bathroom/sync_depth_00003.png 518.8579\n")
    listed = list_split(str(out), "test")
    assert [name for name, _, _ in listed.pairs] == ["bathroom/rgb_00001", "bathroom/rgb_00003"]
    assert listed.focals == [518.8579, 518.8579]
    for (_, rgb_path, depth_path), frame in zip(listed.pairs, (1, 3)):
        with Image.open(depth_path) as im:
            assert im.mode.startswith("I;16") and im.size == (640, 480)
            millimetres = np.asarray(im)
        assert np.array_equal(millimetres, np.floor(raw[frame] * np.float32(1000)).astype(np.uint16))
        assert np.allclose(read_depth(depth_path, 1000.0), raw[frame], atol=1e-3)  # metres, 0 where not measured
        with Image.open(rgb_path) as im:
            picture = np.asarray(im.convert("RGB")).astype(np.int16)
        assert picture[:4].max() < 30 and picture[:, 636:].max() < 30  # the white border painted black
        assert np.abs(picture[16:464, 16:624] - rgb[frame, 16:464, 16:624]).max() < 8


def test_a_wrong_test_count_or_a_bad_file_writes_nothing(nyu_files, tmp_path):
    mat, splits, _, _ = nyu_files
    with pytest.raises(get_data.FetchError, match="lists 2 test images, 654 expected"):
        get_data.fetch_nyu(str(tmp_path / "nyu"), str(mat), str(splits), progress=False)
    with pytest.raises(get_data.FetchError, match="is not NYU Depth v2's labelled .mat"):
        get_data.fetch_nyu(str(tmp_path / "nyu"), str(splits), str(splits), expected=2, progress=False)
    assert os.listdir(tmp_path) == []


def test_without_h5py_one_line_names_the_extras(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "h5py.py").write_text("raise ImportError('blocked', name='h5py')\n")
    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(blocker)}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "get_data.py"), "nyu", "--out", str(tmp_path / "nyu"),
                           "--quiet"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: python get_data.py nyu needs h5py: pip install -r requirements-nyu.txt. "
                                   f"Nothing was written to {tmp_path / 'nyu'}")
