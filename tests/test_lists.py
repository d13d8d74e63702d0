"""Split lists in the peers' format (docs/data.md): RGB DEPTH [FOCAL] a line, None for no ground truth, paths
relative to their roots even with a leading `/`, depth under --gt-dir, the list named directly, and the bad
lines, encodings, quoting and duplicates."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SUBPROCESS_ENV
from dataset import DataError, DepthEstimationUnreal, list_split, read_depth


def write_pair(root, rgb_rel, depth_root, depth_rel, size=(24, 32), depth_m=3.0):
    """An RGB JPEG at root/rgb_rel and a 16-bit millimetre depth PNG at depth_root/depth_rel."""
    rgb_path, depth_path = os.path.join(root, rgb_rel), os.path.join(depth_root, depth_rel)
    for path in (rgb_path, depth_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), 120, np.uint8)).save(rgb_path)
    Image.fromarray(np.full(size, depth_m * 1000, np.uint16)).save(depth_path)
    return rgb_path, depth_path


def write_list(path, text, encoding="utf-8"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


@pytest.fixture
def peers_set(tmp_path):
    """KITTI-like: RGB under raw/, depth under gt/, two drives with one frame name, a None line, a leading `/`."""
    raw, gt = tmp_path / "raw", tmp_path / "gt"
    for drive in ("drive_0001", "drive_0002"):
        write_pair(raw, f"{drive}/image_02/data/0000000005.png", gt, f"{drive}/proj_depth/0000000005.png")
    write_pair(raw, "drive_0002/image_02/data/0000000009.png", gt, "drive_0002/proj_depth/0000000009.png")
    os.remove(gt / "drive_0002/proj_depth/0000000009.png")  # the frame without ground truth
    write_list(raw / "test.txt",
               "/drive_0001/image_02/data/0000000005.png /drive_0001/proj_depth/0000000005.png 721.5377\n"
               "drive_0002/image_02/data/0000000009.png None 721.5377\n"
               "drive_0002/image_02/data/0000000005.png drive_0002/proj_depth/0000000005.png 707.0493\n")
    return str(raw), str(gt)


def test_the_peers_lines_are_read_with_their_focal_and_depth_under_gt_dir(peers_set, capsys):
    raw, gt = peers_set
    listed = list_split(raw, "test", gt_root=gt)
    assert [name for name, _, _ in listed.pairs] == ["drive_0001/image_02/data/0000000005",
                                                     "drive_0002/image_02/data/0000000005"]
    assert listed.focals == [721.5377, 707.0493] and listed.without_gt == 1
    assert listed.pairs[0][1] == os.path.join(raw, "drive_0001/image_02/data/0000000005.png")  # the leading `/`
    assert listed.pairs[1][2] == os.path.join(gt, "drive_0002/proj_depth/0000000005.png")
    assert "test.txt: 1 of 3 pairs have no ground truth (None); skipped" in capsys.readouterr().out
    split = DepthEstimationUnreal(raw, "test", size=32, gt_root=gt, progress=False)
    assert len(split) == 2 and split.focals == [721.5377, 707.0493]
    assert capsys.readouterr().out == ""  # said once, however often the list is read


def test_without_gt_dir_the_depth_is_looked_for_under_the_data_root(peers_set):
    raw, gt = peers_set
    with pytest.raises(DataError, match=r"test\.txt line 1: depth file .*proj_depth/0000000005\.png not found "
                                        r"\(depth paths are relative to --data-dir \(--gt-dir DIR gives them another "
                                        r"root\), here .*raw\)"):
        list_split(raw, "test")


def test_a_list_named_directly_and_an_absolute_path_that_exists(tmp_path):
    rgb, depth = write_pair(tmp_path / "data", "a/x.jpg", tmp_path / "elsewhere", "a/x.png")
    elsewhere = write_list(tmp_path / "lists" / "mine.txt", f"a/x.jpg {depth}\n")  # absolute, outside the root
    listed = list_split(str(tmp_path / "data"), "train", listing=elsewhere)
    assert listed.pairs == [("a/x", rgb, depth)] and listed.focals == [None]


@pytest.mark.parametrize("line, message", [
    ("a/x.jpg a/x.png 518.8 extra", r"line 2: expected two paths and an optional focal length.*got 4 field\(s\)"
                                    r".*Quote a path that holds spaces"),
    ("a/x.jpg a/x.png f=518", r"line 2: the third field 'f=518' is not a focal length"),
    ("a/x.jpg a/x.png nan", r"line 2: the third field 'nan' is not a focal length"),
    ("a/y.jpg a/x.png", r"line 2: RGB file .*a/y\.jpg not found"),
    ("a/x.jpg a/eight_bit.png", r"line 2: depth .*eight_bit\.png is an 8-bit or colour PNG \(mode L\).*16-bit"),
    ('"a/x.jpg a/x.png', r"line 2: a double quote is not closed"),
])
def test_a_bad_line_names_the_list_the_line_and_the_fix(tmp_path, line, message):
    root = tmp_path / "data"
    write_pair(root, "a/x.jpg", root, "a/x.png")
    Image.fromarray(np.full((24, 32), 40, np.uint8)).save(root / "a" / "eight_bit.png")
    write_list(root / "val.txt", f"# the peers' format\n{line}\n")
    with pytest.raises(DataError, match=r"val\.txt " + message):
        list_split(str(root), "val")


def test_a_folder_or_a_link_loop_in_a_list_is_named_as_what_it_is(tmp_path):
    root = tmp_path / "data"
    write_pair(root, "a/x.jpg", root, "a/x.png")
    os.makedirs(root / "a" / "folder.png")
    os.symlink(root / "a" / "loop.png", root / "a" / "loop.png")
    for name, words in (("folder.png", "it is a folder, not a file"), ("loop.png", "leads back to itself")):
        write_list(root / "val.txt", f"a/x.jpg a/{name}\n")
        with pytest.raises(DataError, match=r"val\.txt line 1: depth .*" + name + ".* cannot be read: .*" + words):
            list_split(str(root), "val")


def test_the_same_pair_written_three_ways_is_a_duplicate(tmp_path):
    root = tmp_path / "data"
    write_pair(root, "images/x.jpg", root, "depth/x.png")
    for spelling in ("./images/x.jpg", "images/sub/../x.jpg", "/images/x.jpg"):
        os.makedirs(root / "images" / "sub", exist_ok=True)
        write_list(root / "val.txt", f"images/x.jpg depth/x.png\n{spelling} depth/x.png\n")
        with pytest.raises(DataError, match=r"val\.txt line 2: .* is listed twice \(first on line 1"):
            list_split(str(root), "val")


def test_two_files_of_one_name_are_refused(tmp_path):
    root = tmp_path / "data"
    write_pair(root, "a/x.jpg", root, "a/x.png")
    write_pair(root, "a/x.jpeg", root, "a/y.png")
    write_list(root / "val.txt", "a/x.jpg a/x.png\na/x.jpeg a/y.png\n")
    with pytest.raises(DataError, match=r"line 2: a/x\.jpeg has the name 'a/x' of the pair on line 1"):
        list_split(str(root), "val")


def test_utf8_with_a_byte_order_mark_and_quoted_paths_with_spaces(tmp_path):
    root = tmp_path / "data"
    rgb, depth = write_pair(root, "my shots/café 1.jpg", root, "depth maps/café 1.png")
    write_list(root / "val.txt", b"\xef\xbb\xbf" + '"my shots/café 1.jpg" "depth maps/café 1.png" 500 # ok\n'.encode())
    listed = list_split(str(root), "val")
    assert listed.pairs == [("my shots/café 1", rgb, depth)] and listed.focals == [500.0]
    write_list(root / "val.txt", "my shots/café 1.jpg depth maps/café 1.png\n")  # unquoted: six fields
    with pytest.raises(DataError, match="got 6 field.*Quote a path that holds spaces"):
        list_split(str(root), "val")


def test_a_byte_that_is_not_utf8_is_one_line_with_its_line_number(tmp_path):
    root = tmp_path / "data"
    write_pair(root, "a/x.jpg", root, "a/x.png")
    write_list(root / "val.txt", "a/x.jpg a/x.png\n# caf\xe9, saved by an old editor\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"val\.txt line 2: byte 0xe9 \(column 6\) is not UTF-8; save the list as "
                                        "UTF-8"):
        list_split(str(root), "val")
    os.replace(root / "val.txt", root / "train.txt")  # what training reads first
    proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--data-dir", str(root), "--weights",
                           "none", "--image-size", "32", "--max-steps", "1", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "train.txt line 2: byte 0xe9" in proc.stderr
    # A list of nothing but frames without ground truth leaves nothing to train on.
    write_list(root / "val.txt", "a/x.jpg None 518.8579\n")
    with pytest.raises(DataError, match="lists no pairs with ground truth"):
        list_split(str(root), "val")


def test_a_depth_png_read_through_a_list_is_metres(peers_set):
    raw, gt = peers_set
    _, _, depth_path = list_split(raw, "test", gt_root=gt).pairs[0]
    assert np.allclose(read_depth(depth_path, 1000.0), 3.0)


@pytest.mark.parametrize("kind", ["nyu", "kitti"])
def test_synthetic_benchmark_sets_are_written_as_the_peers_ship_them(tmp_path, kind, capsys):
    from synthetic import main as synthetic_main

    synthetic_main(["--benchmark", kind, "--out", str(tmp_path / kind), "--train", "2", "--test", "3",
                    "--height", "24", "--width", "40"])
    data_dir, gt_dir = (tmp_path / kind, tmp_path / kind) if kind == "nyu" else (tmp_path / kind / "raw",
                                                                                 tmp_path / kind / "gt")
    assert f"--data-dir {data_dir}" in capsys.readouterr().out
    train = (data_dir / "train.txt").read_text().splitlines()
    test = (data_dir / "test.txt").read_text().splitlines()
    assert (len(train), len(test)) == (3, 4) and train[-1].split()[1] == test[-1].split()[1] == "None"
    assert train[0].startswith("/") and all(len(line.split()) == 3 for line in train + test)
    listed = list_split(str(data_dir), "test", gt_root=str(gt_dir))
    assert len(listed.pairs) == 3 and listed.without_gt == 1
    assert all(str(depth).startswith(str(gt_dir)) for _, _, depth in listed.pairs)
    if kind == "kitti":  # one frame number in both drives
        frames = [os.path.basename(rgb) for _, rgb, _ in listed.pairs]
        assert frames[0] == frames[2] == "0000002000.png" and listed.pairs[0][1] != listed.pairs[2][1]
        assert listed.focals == [721.5377] * 3
        assert (read_depth(listed.pairs[0][2], 256.0) == 0).mean() > 0.5  # LiDAR-sparse
