"""Using a trained model: --predict (files per image, point clouds), reports after --eval, curves, --export."""
import csv
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from export import export_model  # noqa: E402
from main import load_model, main, parse_options  # noqa: E402
from model import DepthNet  # noqa: E402
from predict import depth_to_points, predict_depth, write_ply  # noqa: E402
from plots import plot_training_curves, step_epoch_maps  # noqa: E402
from utils import UserError, save_checkpoint  # noqa: E402


# ------------------------------------------------------------------ helpers
TRAINED_SIZE = 64  # the checkpoint's --image-size: small, so that the tests run fast on a CPU


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised DepthNet saved as a training run at --image-size 64 would: RUN/best.pt."""
    path = tmp_path_factory.mktemp("run") / "best.pt"
    torch.manual_seed(0)
    model = DepthNet(weights=None, init_depth=10.0)
    save_checkpoint({"model": model.state_dict(), "init_depth": 10.0, "config": {"image_size": TRAINED_SIZE}, "metrics": {}},
                    str(path))
    return path


def write_split(root, split, n, height=48, width=64, seed=0):
    """n random RGB PNG / depth .npy pairs in the data set's layout."""
    rng = np.random.default_rng(seed)
    for kind in ("rgb", "depth"):
        os.makedirs(os.path.join(root, kind, split), exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(os.path.join(root, "rgb", split, f"{i}.png"))
        np.save(os.path.join(root, "depth", split, f"{i}.npy"), rng.uniform(0.5, 40.0, (height, width)).astype(np.float32))


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


# ------------------------------------------------------------------ --predict
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
               "--batch-size", "2", "--workers", "0", "--quiet"])
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
    model, _ = DepthNet.from_checkpoint(str(checkpoint))
    with Image.open(src / "odd.jpg") as im:
        decoded = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    rgb = TF.resize(decoded, [TRAINED_SIZE, TRAINED_SIZE], antialias=True)
    with torch.no_grad():
        expected = F.interpolate(model.eval()(rgb[None]), size=(500, 741), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.load(out / "odd.npy"), expected[0, 0].clamp(0, 20).numpy(), atol=1e-4)


def test_predict_depth_resizes_back_and_clamps_to_max_depth():
    red = torch.linspace(0, 1, 64).repeat(3, 64, 1)[None]  # a left-to-right ramp in every channel
    (depth,) = predict_depth(Ramp(), red, [(30, 50)], max_depth=20.0)
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


def test_inference_uses_the_trained_image_size_unless_typed(checkpoint):
    assert load_model(parse_options(["--predict", "x.png", "--ckpt", str(checkpoint)]))[1] == TRAINED_SIZE
    assert load_model(parse_options(["--export", "onnx", "--ckpt", str(checkpoint), "--image-size", "96"]))[1] == 96


@pytest.mark.parametrize("argv", [["--predict", "x.png"], ["--export", "torchscript"]])
def test_predict_and_export_need_a_checkpoint(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "needs --ckpt PATH" in capsys.readouterr().err


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


# ------------------------------------------------------------------ reports after --eval, curves
def test_eval_writes_grid_per_image_csv_and_curves(checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    write_split(str(data), "val", 3)
    run_dir = checkpoint.parent
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 1, "step": 4, "split": "val", "lr": 1e-3, "rmse": 5.0, "ssim": 0.2,
                            "challenge_rmse": 4.0, "challenge_ssim": 0.3}) + "\n")
    with open(run_dir / "train_log.jsonl", "w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, "epoch": step / 4, "lr": 1e-3, "loss": 6.0 - step, "rmse": 5.0, "ssim": 0.1}) + "\n")
    metrics_path = tmp_path / "metrics.json"
    try:
        rc = main(["--eval", "--ckpt", str(checkpoint), "--data-dir", str(data), "--workers", "0",
                   "--report-images", "2", "--metrics-out", str(metrics_path)])
        assert rc == 0
        with open(run_dir / "report_val_per_image.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["name"] for r in rows] == ["0", "1", "2"]
        metrics = json.loads(metrics_path.read_text())
        for key in ("rmse", "ssim", "abs_rel", "delta1"):  # the standard protocol averages the per-image values
            assert np.mean([float(r[key]) for r in rows]) == pytest.approx(metrics[key], rel=1e-5)
        for name in ("report_val_grid.png", "curves.png"):
            with Image.open(run_dir / name) as im:
                im.verify()
        assert "highest RMSE" in capsys.readouterr().out
    finally:  # other tests share the run folder
        for name in ("metrics.jsonl", "train_log.jsonl", "report_val_grid.png", "report_val_per_image.csv", "curves.png"):
            (run_dir / name).unlink(missing_ok=True)


def test_training_curves_from_logs_of_a_resumed_and_killed_run(tmp_path):
    records = [{"step": s, "epoch": s / 10, "lr": 1e-3, "loss": 1.0, "rmse": 1.0, "ssim": 0.5} for s in (10, 20, 30, 20, 30)]
    lines = [json.dumps(r) for r in records] + ['{"step": 40, "epo']  # resumed at step 10, then killed mid-write
    (tmp_path / "train_log.jsonl").write_text("\n".join(lines))
    assert plot_training_curves(str(tmp_path), str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size[0] > 500 and im.size[1] > 300
    assert not plot_training_curves(str(tmp_path / "empty"), str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_step_epoch_axis_interpolates_both_ways():
    to_epoch, to_step = step_epoch_maps([{"step": 100, "epoch": 1.0}, {"step": 300, "epoch": 2.0}])
    assert to_epoch(50) == pytest.approx(0.5) and to_epoch(200) == pytest.approx(1.5)
    assert to_step(1.5) == pytest.approx(200)
    assert step_epoch_maps([]) == (None, None)


def test_training_writes_train_log_and_curves(tmp_path):
    data = tmp_path / "data"
    write_split(str(data), "train", 2)
    run_dir = tmp_path / "run"
    assert main(["--data-dir", str(data), "--weights", "none", "--image-size", "64", "--batch-size", "1", "--max-steps", "1", "--log-every", "1",
                 "--eval-every", "0", "--vis-every", "0", "--workers", "0", "--amp", "off", "--quiet",
                 "--run-dir", str(run_dir)]) == 0
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 0.5)]  # one of the epoch's two batches
    assert math.isfinite(records[0]["loss"]) and records[0]["loss"] == pytest.approx(records[0]["rmse"] + 1 - records[0]["ssim"], rel=1e-5)
    with Image.open(run_dir / "curves.png") as im:
        im.verify()


# ------------------------------------------------------------------ --export
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*deprecated")
def test_export_torchscript_matches_eager(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.torchscript.pt"
    assert main(["--export", "torchscript", "--ckpt", str(checkpoint), "--out", str(out)]) == 0
    assert "max |exported - eager|" in capsys.readouterr().out
    exported = torch.jit.load(str(out))
    model, _ = DepthNet.from_checkpoint(str(checkpoint))
    x = torch.rand(2, 3, TRAINED_SIZE, TRAINED_SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.eval()(x), rtol=0, atol=1e-4)


def test_export_onnx_matches_eager(tmp_path):
    for package in ("onnx", "onnxscript"):
        pytest.importorskip(package)
    ort = pytest.importorskip("onnxruntime")
    model = DepthNet(weights=None, init_depth=10.0).eval()
    out = tmp_path / "model.onnx"
    export_model(model, "onnx", str(out), size=64)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"rgb": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=0, atol=1e-4)


def test_export_onnx_without_its_packages_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(UserError, match="pip install onnx onnxscript onnxruntime"):
        export_model(nn.Conv2d(3, 1, 1), "onnx", str(tmp_path / "m.onnx"), size=32)
    assert list(tmp_path.iterdir()) == []


def test_export_that_does_not_match_leaves_no_file(tmp_path):
    with pytest.raises(UserError, match="differs from the eager model"):
        export_model(nn.Conv2d(3, 1, 1), "torchscript", str(tmp_path / "m.pt"), size=32, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
