"""predict.py: --predict's files per image (any size and mode), resizing back, point clouds."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import hardware
from conftest import TRAINED_SIZE, save_random_checkpoint
from conventions import DepthConventions
from inference import Predictor, load
from main import main
from predict import depth_to_points, write_ply


def read_ply(path):
    """Vertices of a binary little-endian PLY as a structured array, parsed from the header (no ply library)."""
    with open(path, "rb") as f:
        assert f.readline() == b"ply\n"
        assert f.readline() == b"format binary_little_endian 1.0\n"
        count, fields = None, []
        types = {"float": "<f4", "uchar": "u1"}
        while (line := f.readline().decode("ascii").split()) != ["end_header"]:
            if line[:2] == ["element", "vertex"]:
                count = int(line[2])
            elif line[0] == "property":
                fields.append((line[2], types[line[1]]))
        vertices = np.frombuffer(f.read(), dtype=fields)
    assert len(vertices) == count
    return vertices


class Ramp(nn.Module):
    """A stand-in network whose output is known exactly: 60 × red − 20, in [−20, 40] m."""

    def forward(self, rgb):
        return rgb[:, :1] * 60.0 - 20.0


def test_predict_folder_any_size_and_mode_skips_corrupt_file(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(1)
    src, out = tmp_path / "images", tmp_path / "out"
    src.mkdir()
    originals = {
        "odd": rng.integers(0, 256, (500, 741, 3), dtype=np.uint8),
        "alpha": rng.integers(0, 256, (37, 53, 4), dtype=np.uint8),
        "gray": rng.integers(0, 256, (64, 48), dtype=np.uint8),
    }
    Image.fromarray(originals["odd"]).save(src / "odd.jpg", quality=95)
    Image.fromarray(originals["alpha"]).save(src / "alpha.png")
    Image.fromarray(originals["gray"]).save(src / "gray.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")

    rc = main(["--predict", str(src), "--ckpt", str(checkpoint), "--out", str(out), "--png16", "--ply",
               "--batch-size", "2", "--workers", "0", "--quiet", "--amp", "off"])  # fp32: compared with eager below
    err = capsys.readouterr().err
    assert rc == 1, "a skipped file makes the exit status non-zero"
    assert "broken.png" in err and "1 of 4" in err
    assert not any(p.name.startswith("broken") for p in out.iterdir())

    for name, image in originals.items():
        h, w = image.shape[:2]
        depth = np.load(out / f"{name}.npy")
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert depth.min() >= 0.0 and depth.max() <= 20.0
        with Image.open(out / f"{name}.png") as png:
            assert png.size == (w, h) and png.mode == "RGB"
        with Image.open(out / f"{name}_mm.png") as png16:
            assert png16.size == (w, h) and png16.mode.startswith("I;16")
            np.testing.assert_array_equal(np.asarray(png16), np.round(depth * 1000).astype(np.uint16))
        vertices = read_ply(out / f"{name}.ply")
        assert len(vertices) == h * w  # every predicted depth is > 0 here
        np.testing.assert_allclose(-vertices["z"], depth.reshape(-1), rtol=1e-6)

    # The prediction is the network's output on the training preprocessing (at the checkpoint's size), resized back.
    model = load(str(checkpoint), "cpu").net
    with Image.open(src / "odd.jpg") as im:
        decoded = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    rgb = TF.resize(decoded, [TRAINED_SIZE, TRAINED_SIZE], antialias=True)
    with torch.no_grad():
        expected = F.interpolate(model.eval()(rgb[None]), size=(500, 741), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.load(out / "odd.npy"), expected[0, 0].clamp(0, 20).numpy(), atol=1e-4)


def test_depth_maps_resize_back_and_clamp_to_max_depth():
    red = torch.linspace(0, 1, 64).repeat(3, 64, 1)[None]  # a left-to-right ramp in every channel
    (depth,) = Predictor(Ramp(), 64, torch.device("cpu"), DepthConventions(max_depth=20.0)).depth_maps(red, [(30, 50)])
    raw = F.interpolate(red[:, :1] * 60 - 20, size=(30, 50), mode="bilinear", align_corners=False)[0, 0]
    assert depth.shape == (30, 50)
    np.testing.assert_allclose(depth, raw.clamp(0, 20).numpy(), atol=1e-5)
    assert depth.min() == 0.0 and depth.max() == 20.0  # both ends are clamped


def test_predict_refuses_to_overwrite_inputs(checkpoint, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    assert main(["--predict", str(tmp_path), "--ckpt", str(checkpoint), "--out", str(tmp_path), "--quiet"]) == 1
    assert "overwrite the input image" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_point_cloud_follows_the_pinhole_intrinsics(tmp_path):
    depth = np.full((4, 6), 2.0, np.float32)
    depth[3, 5] = 0.0  # no depth, no point
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    write_ply(tmp_path / "c.ply", rgb, depth, hfov_deg=90.0)
    v = read_ply(tmp_path / "c.ply")
    assert len(v) == 23
    # f = (6 / 2) / tan(45°) = 3; the top-left pixel's centre is 2.5 px left of and 1.5 px above the centre.
    assert (v["x"][0], v["y"][0], v["z"][0]) == pytest.approx((-2.5 / 3 * 2, 1.5 / 3 * 2, -2.0))
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), rgb.reshape(-1, 3)[:23])
    # a narrower field of view means a longer focal length, so a point lies closer to the axis
    assert abs(depth_to_points(depth, 60.0)[0, 0]) < abs(depth_to_points(depth, 90.0)[0, 0])


@pytest.mark.parametrize("has_bf16", [True, False])
def test_predict_runs_bf16_weights_where_the_hardware_runs_bf16(checkpoint, tmp_path, monkeypatch, has_bf16):
    """--amp auto: InferenceModel's bf16 weights on hardware with bf16 instructions, fp32 elsewhere."""
    monkeypatch.setattr(hardware, "cpu_runs_bf16", lambda: has_bf16)
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(image)
    common = ["--predict", str(image), "--ckpt", str(checkpoint), "--device", "cpu", "--workers", "0", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "auto")]) == 0
    assert main(common + ["--out", str(tmp_path / "fp32"), "--amp", "off"]) == 0
    auto, fp32 = np.load(tmp_path / "auto" / "a.npy"), np.load(tmp_path / "fp32" / "a.npy")
    if has_bf16:
        assert not np.array_equal(auto, fp32) and np.abs(auto - fp32).max() < 0.1
    else:
        np.testing.assert_array_equal(auto, fp32)


def test_predict_with_several_checkpoints_writes_the_mean_of_their_depth(checkpoint, tmp_path):
    """--ckpt A B: an ensemble, each pixel's depth the mean of the two models' (fp32 here)."""
    other = save_random_checkpoint(tmp_path / "other.pt", seed=1)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 72, 3), dtype=np.uint8)).save(folder / "a.png")
    common = ["--predict", str(folder), "--device", "cpu", "--workers", "0", "--quiet", "--amp", "off"]
    for name, ckpts in (("one", [checkpoint]), ("other", [other]), ("both", [checkpoint, other])):
        assert main(common + ["--ckpt", *map(str, ckpts), "--out", str(tmp_path / name)]) == 0
    one, two = np.load(tmp_path / "one" / "a.npy"), np.load(tmp_path / "other" / "a.npy")
    assert np.abs(one - two).max() > 0.01  # two different networks
    np.testing.assert_allclose(np.load(tmp_path / "both" / "a.npy"), 0.5 * (one + two), atol=1e-4)


def test_predict_flip_averages_the_image_and_its_mirror(checkpoint, tmp_path):
    """--flip: the depth of an image and, mirrored back, that of its mirror image, averaged (fp32 here)."""
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    rgb.save(folder / "a.png")
    rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "b.png")
    common = ["--predict", str(folder), "--ckpt", str(checkpoint), "--device", "cpu", "--workers", "0", "--quiet",
              "--amp", "off"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "flip"), "--flip"]) == 0
    a, b = np.load(tmp_path / "one" / "a.npy"), np.load(tmp_path / "one" / "b.npy")
    assert np.abs(a - b[:, ::-1]).max() > 0.01  # the network alone is not mirror-symmetric
    np.testing.assert_allclose(np.load(tmp_path / "flip" / "a.npy"), 0.5 * (a + b[:, ::-1]), atol=1e-4)
