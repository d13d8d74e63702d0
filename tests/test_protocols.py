"""The peers' evaluation protocols (--protocol nyu, kitti, kitti-eigen; docs/benchmarks.md): known answers, the
crops' pixel counts, the clip, and the whole flow on NYU- and KITTI-shaped sets, recomputed from the saved
predictions by tests/reference.py's peer_metrics."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conventions import DepthConventions
from dataset import DepthEstimationUnreal
from evaluate import (
    PROTOCOL_KEYS,
    PROTOCOLS,
    clipped_prediction,
    evaluate_protocol,
    peer_errors,
    protocol_with_caps,
    scored_pixels,
)
from main import main
from reference import peer_metrics
from synthetic import generate_benchmark_set
from utils import UserError


def varied_depth(shape, low, high, seed=0):
    """A depth map of `shape` spread over (low, high) metres."""
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


@pytest.mark.parametrize("name", ["nyu", "kitti", "kitti-eigen"])
def test_a_prediction_ten_percent_too_far_gives_the_known_answers(name):
    protocol = PROTOCOLS[name]
    gt = varied_depth((480, 640) if name == "nyu" else (375, 1242), 0.5, protocol.max_depth / 1.2)
    mask = scored_pixels(gt, protocol)
    errors = peer_errors(gt[mask], clipped_prediction(1.1 * gt[mask], protocol))
    assert errors["abs_rel"] == pytest.approx(0.1, rel=1e-6)
    assert errors["rmse_log"] == pytest.approx(math.log(1.1), rel=1e-6)
    assert errors["log10"] == pytest.approx(math.log10(1.1), rel=1e-6)
    assert errors["delta1"] == 1.0 and errors["silog"] == pytest.approx(0.0, abs=1e-4)
    assert errors["rmse"] == pytest.approx(0.1 * math.sqrt(np.mean(gt[mask].astype(np.float64) ** 2)), rel=1e-6)


def test_the_crops_score_the_pixels_the_protocols_name():
    nyu = scored_pixels(np.full((480, 640), 5.0, np.float32), PROTOCOLS["nyu"])
    assert nyu.sum() == 426 * 560 and nyu[45, 41] and nyu[470, 600] and not nyu[44, 41] and not nyu[470, 601]
    kitti = np.full((375, 1242), 30.0, np.float32)
    garg = scored_pixels(kitti, PROTOCOLS["kitti"])  # rows 153:371, columns 44:1197
    eigen = scored_pixels(kitti, PROTOCOLS["kitti-eigen"])  # rows 124:342, columns 44:1197
    assert garg.sum() == 218 * 1153 and eigen.sum() == 218 * 1153
    assert np.flatnonzero(garg.any(1))[[0, -1]].tolist() == [153, 370]
    assert np.flatnonzero(eigen.any(1))[[0, -1]].tolist() == [124, 341]
    assert np.flatnonzero(garg.any(0))[[0, -1]].tolist() == [44, 1196]
    # The interval is open: depth exactly at a cap, or 0 (not measured), is not scored.
    kitti[200, 100], kitti[201, 100], kitti[202, 100] = 80.0, 1e-3, 0.0
    assert scored_pixels(kitti, PROTOCOLS["kitti"]).sum() == 218 * 1153 - 3
    assert scored_pixels(kitti, protocol_with_caps("kitti", max_depth=30.0)).sum() == 0  # 30 m is not below 30


def test_the_clip_sends_nan_to_the_minimum_and_inf_to_the_maximum():
    clipped = clipped_prediction(np.array([np.nan, np.inf, -np.inf, -2.0, 0.0, 5.0, 99.0]), PROTOCOLS["nyu"])
    assert clipped.dtype == np.float32  # as the peers clip
    assert clipped.tolist() == np.array([1e-3, 10.0, 1e-3, 1e-3, 1e-3, 5.0, 10.0], np.float32).tolist()


def test_a_ratio_on_a_delta_threshold_is_decided_as_the_peers_decide_it():
    # 6.4 m from a millimetre PNG, a prediction clipped to the 10 m cap: 10 / 6.4 is 1.25² exactly in float32
    # (not below it), just below it in float64.
    gt = np.full((480, 640), 6400, np.uint16).astype(np.float32) / 1000.0
    gt[240:] = 3.0
    pred = np.full_like(gt, 12.0)
    mask = scored_pixels(gt, PROTOCOLS["nyu"])
    ours = peer_errors(gt[mask], clipped_prediction(pred[mask], PROTOCOLS["nyu"]))
    theirs = peer_metrics(gt, pred, "nyu")
    assert ours["delta2"] == pytest.approx(float(theirs["delta2"]), abs=1e-12) == 0.0
    assert 10.0 / np.float64(gt[0, 0]) < 1.25**2  # float64 alone would have counted the top half


class ScaledTruth(nn.Module):
    """Predicts `factor` x a constant depth map whatever the image: with constant ground truth, the prediction
    resized to it is known exactly."""

    def __init__(self, depth, factor):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(depth * factor)))

    def forward(self, rgb):
        return self.value.expand(rgb.shape[0], 1, *rgb.shape[-2:])


@pytest.fixture(scope="module")
def constant_nyu(tmp_path_factory):
    """Two NYU-shaped pairs (480 x 640) whose depth is 4 m everywhere, listed in the peers' format."""
    root = tmp_path_factory.mktemp("constant_nyu")
    lines = []
    for i, scene in enumerate(("office", "kitchen")):
        os.makedirs(root / scene)
        Image.fromarray(np.full((480, 640, 3), 90, np.uint8)).save(root / scene / f"rgb_{i:05d}.jpg")
        Image.fromarray(np.full((480, 640), 4000, np.uint16)).save(root / scene / f"sync_depth_{i:05d}.png")
        lines.append(f"{scene}/rgb_{i:05d}.jpg {scene}/sync_depth_{i:05d}.png 518.8579\n")
    (root / "test.txt").write_text("".join(lines))
    return DepthEstimationUnreal(str(root), "test", size=32, conventions=DepthConventions(max_depth=10.0), native=True,
                                 progress=False)


def test_known_answers_through_the_whole_evaluation_and_median_scaling_gives_zero(constant_nyu, tmp_path):
    device = torch.device("cpu")
    metrics, rows = evaluate_protocol(ScaledTruth(4.0, 1.1), constant_nyu, device, PROTOCOLS["nyu"], progress=False)
    assert metrics["n_images"] == 2 and [r["name"] for r in rows] == ["office/rgb_00000", "kitchen/rgb_00001"]
    assert set(metrics) == set(PROTOCOL_KEYS)
    expected = {"rmse": 0.4, "abs_rel": 0.1, "sq_rel": 0.04, "rmse_log": math.log(1.1), "log10": math.log10(1.1),
                "silog": 0.0, "delta1": 1.0, "delta2": 1.0, "delta3": 1.0}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
    scaled, _ = evaluate_protocol(ScaledTruth(4.0, 1.1), constant_nyu, device, PROTOCOLS["nyu"], median_scale=True,
                                  save_dir=str(tmp_path / "pred"), progress=False)
    for key in ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "silog"):
        assert scaled[key] == pytest.approx(0.0, abs=1e-5), key
    assert scaled["delta1"] == 1.0
    saved = np.load(tmp_path / "pred" / "office" / "rgb_00000.npy")  # median-scaled, at the ground truth's size
    assert saved.dtype == np.float32 and saved.shape == (480, 640) and np.allclose(saved, 4.0)


def test_a_split_with_nothing_in_range_is_one_clear_error(constant_nyu):
    with pytest.raises(UserError, match="no image of the test split has ground truth that --protocol nyu scores"):
        evaluate_protocol(ScaledTruth(4.0, 1.0), constant_nyu, torch.device("cpu"),
                          protocol_with_caps("nyu", max_depth=3.0), progress=False)


# ------------------------------------------------------------------ the whole flow, on NYU- and KITTI-shaped sets
def read_list(path):
    """[(rgb, depth)] of a peers' list, written here apart from dataset.py: the None lines left out."""
    pairs = []
    with open(path) as f:
        for line in f:
            rgb, depth, _ = line.split()
            if depth != "None":
                pairs.append((rgb.lstrip("/"), depth.lstrip("/")))
    return pairs


def recomputed(data_dir, gt_dir, protocol, scale, predictions, median_scale):
    """The mean of peer_metrics over the test list's images, from the saved predictions and the depth PNGs."""
    per_image = []
    for rgb, depth in read_list(os.path.join(data_dir, "test.txt")):
        with Image.open(os.path.join(gt_dir, depth)) as im:
            gt = np.asarray(im).astype(np.float32) / scale
        pred = np.load(os.path.join(predictions, os.path.splitext(rgb)[0] + ".npy"))
        assert pred.dtype == np.float32 and pred.shape == gt.shape
        metrics = peer_metrics(gt, pred, protocol, median_scale)
        if metrics is not None:
            per_image.append(metrics)
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}, len(per_image)


@pytest.mark.slow
@pytest.mark.parametrize("kind, protocol, size, train_options", [
    ("nyu", "nyu", (120, 160), ["--image-size", "64", "96", "--max-depth", "10", "--depth-scale", "1000"]),
    ("kitti", "kitti", (64, 212), ["--image-size", "64", "224", "--max-depth", "80", "--depth-scale", "256"]),
])
def test_train_then_evaluate_a_benchmark_set_as_the_peers_score_it(tmp_path, capsys, kind, protocol, size,
                                                                   train_options):
    data_dir, gt_dir = generate_benchmark_set(tmp_path / kind, kind, 4, 4, *size, progress=False)
    run = tmp_path / "run"
    gt_option = ["--gt-dir", gt_dir] if gt_dir != data_dir else []
    assert main(["--data-dir", data_dir, *gt_option, *train_options, "--weights", "none", "--encoder", "resnet18",
                 "--max-steps", "3", "--batch-size", "2", "--workers", "0", "--quiet", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no val split" in out and "1 of 5 pairs have no ground truth (None); skipped" in out
    for median in ([], ["--median-scale"]):
        predictions, metrics_path = tmp_path / f"pred{len(median)}", tmp_path / f"metrics{len(median)}.json"
        assert main(["--eval", "--ckpt", str(run / "last.pt"), "--data-dir", data_dir, *gt_option, "--split", "test",
                     "--protocol", protocol, "--save-predictions", str(predictions), "--metrics-out",
                     str(metrics_path), "--device", "cpu", "--quiet", "--no-report", *median]) == 0
        printed = capsys.readouterr().out
        assert f"protocol {protocol}: " in printed and ("median-scaled" in printed) == bool(median)
        got = json.loads(metrics_path.read_text())
        reference, n_images = recomputed(data_dir, gt_dir, protocol, 1000.0 if kind == "nyu" else 256.0,
                                         predictions, bool(median))
        assert got["n_images"] == n_images == 4 and got["protocol"] == protocol
        for key, value in reference.items():
            assert got[key] == pytest.approx(value, rel=2e-4, abs=1e-9), key
    if kind == "kitti":  # one frame name in two drives: two files, in their drives' folders
        frames = [os.path.relpath(os.path.join(d, f), predictions) for d, _, files in os.walk(predictions)
                  for f in files]
        assert sum(f.endswith("0000002000.npy") for f in frames) == 2
        assert len(frames) == 4


def test_the_default_protocol_saves_its_predictions_at_the_ground_truths_size(tmp_path):
    from conftest import make_dataset
    from evaluate import evaluate

    root = make_dataset(tmp_path / "data", {"val": 3}, size=(24, 32), seed=1)
    dataset = DepthEstimationUnreal(root, "val", size=32, native=True, progress=False)
    model = ScaledTruth(7.0, 1.0)
    before = evaluate(model, dataset, torch.device("cpu"))
    after = evaluate(model, dataset, torch.device("cpu"), save_dir=str(tmp_path / "pred"))
    assert after == before  # saving changes no figure
    saved = sorted(os.listdir(tmp_path / "pred" / "rgb" / "val"))
    assert saved == ["0.npy", "1.npy", "2.npy"]
    depth = np.load(tmp_path / "pred" / "rgb" / "val" / "2.npy")
    assert depth.dtype == np.float32 and depth.shape == (24, 32) and np.allclose(depth, 7.0)


@pytest.mark.parametrize("args, message", [
    (["--protocol", "nyu"], "error: --protocol is for --eval"),
    (["--save-predictions", "p"], "error: --save-predictions is for --eval"),
    (["--eval", "--ckpt", "c.pt", "--median-scale"], "error: --median-scale is for --protocol nyu, kitti or"),
    (["--eval", "--ckpt", "c.pt", "--max-depth-eval", "5"], "error: --max-depth-eval is for --protocol nyu"),
    (["--eval", "--ckpt", "c.pt", "--protocol", "kitti", "--min-depth-eval", "5", "--max-depth-eval", "5"],
     "error: --min-depth-eval (5.0) must be below --max-depth-eval (5.0)"),
    (["--eval", "--ckpt", "c.pt", "--protocol", "kitti", "--max-depth-eval", "inf"],
     "error: --max-depth-eval must be a finite positive number"),
])
def test_the_protocol_options_are_checked_with_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_eval_reads_a_list_named_with_test_list_and_depth_under_gt_dir(checkpoint, tmp_path, capsys):
    frames, depth = tmp_path / "frames", tmp_path / "depth"
    for folder in ("drive_a", "drive_b"):  # one frame name in two folders
        os.makedirs(frames / folder)
        os.makedirs(depth / folder)
        Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(frames / folder / "0005.png")
        Image.fromarray(np.full((48, 64), 3 * 256, np.uint16)).save(depth / folder / "0005.png")
    listing = tmp_path / "lists" / "eigen_test.txt"
    os.makedirs(listing.parent)
    listing.write_text("drive_a/0005.png drive_a/0005.png 721.5377\ndrive_b/0005.png drive_b/0005.png 721.5377\n"
                       "drive_b/0009.png None 721.5377\n")
    predictions, metrics_path = tmp_path / "pred", tmp_path / "m.json"
    assert main(["--eval", "--ckpt", str(checkpoint), "--data-dir", str(frames), "--gt-dir", str(depth),
                 "--test-list", str(listing), "--split", "test", "--protocol", "kitti-eigen", "--depth-scale", "256",
                 "--save-predictions", str(predictions), "--metrics-out", str(metrics_path), "--workers", "0",
                 "--quiet", "--no-report"]) == 0
    assert "1 of 3 pairs have no ground truth (None); skipped" in capsys.readouterr().out
    got = json.loads(metrics_path.read_text())
    assert got["n_images"] == 2 and got["protocol"] == "kitti-eigen" and got["max_depth_eval"] == 80.0
    for folder in ("drive_a", "drive_b"):  # the two images are alike: each one's figure is the mean
        pred = np.load(predictions / folder / "0005.npy")
        reference = peer_metrics(np.full((48, 64), 3.0, np.float32), pred, "kitti-eigen")
        assert reference["abs_rel"] == pytest.approx(got["abs_rel"], rel=2e-4)
