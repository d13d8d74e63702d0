"""evaluate.py against docs/design.md §8: both protocols on hand-made predictions, checked independently."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import make_dataset, save_random_checkpoint
from dataset import DepthEstimationUnreal
from evaluate import METRIC_KEYS, compute_errors, evaluate, format_metrics
from inference import load
from main import main
from reference import masked_ssim, standard_metrics
from utils import UserError

N_IMAGES = 35  # two challenge batches: 32, then 3
NATIVE = (24, 32)


class ReplayModel(nn.Module):
    """Returns fixed predictions in call order, whatever the input: the model's output is known."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions
        self.size = predictions.shape[-1]
        self.next = 0
        self.anchor = nn.Parameter(torch.zeros(()))  # so .eval()/.train() and devices behave as usual

    def forward(self, rgb):
        assert rgb.shape[1:] == (3, self.size, self.size)
        batch = self.predictions[self.next : self.next + rgb.shape[0]]
        self.next += rgb.shape[0]
        return batch.to(rgb.device) + self.anchor


def known_predictions(n, seed=0):
    """(n, 1, 224, 224) maps spanning about -2..25 m, so both clamps of §5 matter.

    A smooth field plus texture, like a real prediction. Texture also keeps the local
    variances far above float32's rounding of E[x²] − μ² on 20 m values, which otherwise
    moves the data_range=1 SSIM (C2 = 9e-4) by ~5e-4 in any float32 implementation.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 7, 7, generator=g) * 27 - 2
    smooth = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False)
    return smooth + 0.5 * torch.randn(n, 1, 224, 224, generator=g)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """35 small pairs; a few depth maps have zero-depth patches, which the masked metrics skip."""
    root = make_dataset(tmp_path_factory.mktemp("eval_data"), {"val": N_IMAGES}, size=NATIVE, seed=3)
    for i in (0, 5, 33):
        path = os.path.join(root, "depth", "val", f"{i}.npy")
        depth = np.load(path)
        depth[-6:, :10] = 0.0
        np.save(path, depth)
    return root


def raw_depths(root, split, n):
    return [np.load(os.path.join(root, "depth", split, f"{i}.npy")) for i in range(n)]


def test_both_protocols_match_independent_computation(eval_data):
    dataset = DepthEstimationUnreal(eval_data, "val", native=True)
    preds = known_predictions(N_IMAGES)
    model = ReplayModel(preds).train()
    metrics, rows = evaluate(model, dataset, torch.device("cpu"), per_image=True)

    assert set(METRIC_KEYS) <= set(metrics) and metrics["n_images"] == N_IMAGES
    assert model.next == N_IMAGES and model.training  # every image once; training mode restored

    # Challenge protocol: 224 × 224 targets, batches of 32 then 3, raw predictions, batch means averaged.
    # Images 0, 5 and 33 have holes: in their batches only measured pixels and windows count.
    targets = torch.stack([dataset[i][1] for i in range(N_IMAGES)])
    measured = targets > 1e-3
    assert not measured[[0, 5, 33]].all() and measured[[1, 2, 34]].all()
    batches = [slice(0, 32), slice(32, N_IMAGES)]
    batch_rmse = [math.sqrt(float(((preds[b].double() - targets[b].double()) ** 2)[measured[b]].mean()))
                  for b in batches]
    batch_ssim = [np.mean([masked_ssim(preds[i, 0], targets[i, 0], measured[i, 0], 1.0, "same")
                           for i in range(N_IMAGES)[b]]) for b in batches]
    assert metrics["challenge_rmse"] == pytest.approx(np.mean(batch_rmse), abs=1e-4)
    assert metrics["challenge_ssim"] == pytest.approx(np.mean(batch_ssim), abs=1e-4)
    # A pooled mean over all 35 images would differ: the batch structure is really used.
    pooled = math.sqrt(float(((preds.double() - targets.double()) ** 2)[measured].mean()))
    assert abs(pooled - np.mean(batch_rmse)) > 1e-3

    # Standard protocol: native resolution, per image, then averaged.
    refs = [standard_metrics(gt, preds[i, 0].numpy()) for i, gt in enumerate(raw_depths(eval_data, "val", N_IMAGES))]
    for key in refs[0]:
        assert metrics[key] == pytest.approx(np.mean([r[key] for r in refs]), abs=1e-3), key
        per_image = [row[key] for row in rows]
        np.testing.assert_allclose(per_image, [r[key] for r in refs], atol=2e-3, err_msg=key)
    assert [row["name"] for row in rows] == [str(i) for i in range(N_IMAGES)]


def test_a_model_at_another_input_size_is_scored_at_224_by_the_challenge_protocol(eval_data):
    small = torch.nn.functional.interpolate(known_predictions(N_IMAGES, seed=4), size=(64, 64), mode="bilinear",
                                            align_corners=False)
    metrics = evaluate(ReplayModel(small), DepthEstimationUnreal(eval_data, "val", size=64, native=True),
                       torch.device("cpu"))
    # Reference: the ground truth as the 224 × 224 protocol preprocesses it, the prediction upsampled to it.
    targets = torch.stack([sample[1] for sample in DepthEstimationUnreal(eval_data, "val", size=224)])
    upsampled = torch.nn.functional.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False)
    measured = targets > 1e-3  # images 0, 5 and 33 have holes, which count nowhere
    batches = [slice(0, 32), slice(32, N_IMAGES)]
    batch_rmse = [math.sqrt(float(((upsampled[b].double() - targets[b].double()) ** 2)[measured[b]].mean()))
                  for b in batches]
    assert metrics["challenge_rmse"] == pytest.approx(np.mean(batch_rmse), abs=1e-4)
    # An upsampled prediction is smooth: float32's rounding of E[x²] − μ² (known_predictions) moves SSIM ~3e-4.
    assert metrics["challenge_ssim"] == pytest.approx(
        np.mean([np.mean([masked_ssim(upsampled[i, 0], targets[i, 0], measured[i, 0], 1.0, "same")
                          for i in range(N_IMAGES)[b]]) for b in batches]), abs=1e-3)


def test_images_of_different_sizes_are_scored_at_their_own_size(tmp_path):
    root = make_dataset(tmp_path / "a", {"val": 2}, size=(24, 32), seed=1)
    # Pair 2 is larger: the standard protocol must score it at 30 × 40.
    other = make_dataset(tmp_path / "b", {"val": 1}, size=(30, 40), seed=2)
    os.replace(os.path.join(other, "rgb", "val", "0.jpeg"), os.path.join(root, "rgb", "val", "2.jpeg"))
    os.replace(os.path.join(other, "depth", "val", "0.npy"), os.path.join(root, "depth", "val", "2.npy"))
    dataset = DepthEstimationUnreal(root, "val", native=True)
    preds = known_predictions(3, seed=1)
    metrics, rows = evaluate(ReplayModel(preds), dataset, torch.device("cpu"), per_image=True)
    for i, gt in enumerate(raw_depths(root, "val", 3)):
        ref = standard_metrics(gt, preds[i, 0].numpy())
        for key, value in ref.items():
            assert rows[i][key] == pytest.approx(value, abs=2e-3), (i, key)
    assert metrics["n_images"] == 3


def test_compute_errors_on_a_hand_made_case():
    gt = torch.full((1, 1, 12, 12), 4.0)
    gt[..., :6, :] = 0.0  # the top half not measured: counted by no metric
    pred = torch.full_like(gt, 5.0)
    m = compute_errors(gt, pred)
    # RMSE over the measured half only, where every error is 1 m (the holes' 5 m errors do not count).
    assert float(m["rmse"]) == pytest.approx(1.0)
    full = compute_errors(torch.full((1, 1, 12, 12), 4.0), torch.full((1, 1, 12, 12), 5.0))
    assert float(full["rmse"]) == pytest.approx(1.0) and float(full["ssim"]) < 1.0
    assert float(m["abs_rel"]) == pytest.approx(0.25)
    assert float(m["sq_rel"]) == pytest.approx(0.25)
    assert float(m["rmse_log"]) == pytest.approx(math.log(5 / 4))
    assert float(m["log10"]) == pytest.approx(math.log10(5 / 4))
    assert [float(m[f"delta{i}"]) for i in (1, 2, 3)] == [0.0, 1.0, 1.0]  # 1.25 is not < 1.25
    # Predictions are clamped: to [0, 20] for RMSE, to [1e-3, 20] for the ratios.
    far = compute_errors(torch.full((1, 1, 12, 12), 20.0), torch.full((1, 1, 12, 12), 50.0))
    assert float(far["rmse"]) == 0.0 and float(far["delta1"]) == 1.0
    near = compute_errors(torch.full((1, 1, 12, 12), 1.0), torch.full((1, 1, 12, 12), -3.0))
    assert float(near["rmse"]) == pytest.approx(1.0)
    assert float(near["abs_rel"]) == pytest.approx(1 - 1e-3)
    assert math.isfinite(float(near["rmse_log"]))


def test_format_metrics_lists_every_metric():
    metrics = {k: 0.5 for k in METRIC_KEYS}
    metrics["n_images"] = 7
    text = format_metrics(metrics, "title")
    assert text.splitlines()[0] == "title"
    for key in METRIC_KEYS[:-1]:
        assert key in text
    assert "(7 images)" in text


# ------------------------------------------------------------------ the reports of --eval
def test_eval_writes_grid_per_image_csv_and_curves(checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, {"val": 3}, ext=".png", size=(48, 64))
    run_dir = checkpoint.parent
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 1, "step": 4, "split": "val", "lr": 1e-3, "rmse": 5.0, "ssim": 0.2,
                            "challenge_rmse": 4.0, "challenge_ssim": 0.3}) + "\n")
    with open(run_dir / "train_log.jsonl", "w") as f:
        for step in (1, 2, 3, 4):
            record = {"step": step, "epoch": step / 4, "lr": 1e-3, "loss": 6.0 - step, "rmse": 5.0, "ssim": 0.1}
            f.write(json.dumps(record) + "\n")
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
        for name in ("metrics.jsonl", "train_log.jsonl", "report_val_grid.png", "report_val_per_image.csv",
                     "curves.png"):
            (run_dir / name).unlink(missing_ok=True)


class MeanOf(nn.Module):
    """The mean of two networks' outputs, written here apart from inference.Ensemble."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, rgb):
        return (self.a(rgb) + self.b(rgb)) / 2


def test_eval_of_several_checkpoints_scores_their_mean_and_reports_to_out(checkpoint, tmp_path):
    data = tmp_path / "data"
    make_dataset(data, {"val": 3}, ext=".png", size=(48, 64))
    other = save_random_checkpoint(tmp_path / "other.pt", seed=1)
    out, metrics_path = tmp_path / "report", tmp_path / "metrics.json"
    assert main(["--eval", "--ckpt", str(checkpoint), str(other), "--data-dir", str(data), "--workers", "0",
                 "--quiet", "--report-images", "2", "--out", str(out), "--metrics-out", str(metrics_path)]) == 0
    got = json.loads(metrics_path.read_text())
    a, b = (load(str(p), "cpu").net for p in (checkpoint, other))
    dataset = DepthEstimationUnreal(str(data), "val", size=64, native=True, progress=False)
    expected = evaluate(MeanOf(a, b), dataset, torch.device("cpu"))
    alone = evaluate(a, dataset, torch.device("cpu"))
    assert abs(alone["rmse"] - expected["rmse"]) > 1e-3  # the second network changed the result
    for key in ("rmse", "ssim", "abs_rel", "challenge_rmse"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5)
    assert sorted(os.listdir(out)) == ["report_val_grid.png", "report_val_per_image.csv"]  # no one run's curves
    assert not (checkpoint.parent / "report_val_per_image.csv").exists()


def test_checkpoints_trained_at_different_sizes_are_not_averaged(checkpoint, tmp_path):
    other = save_random_checkpoint(tmp_path / "wide.pt", seed=1, image_size=[64, 96])
    with pytest.raises(UserError, match="one input size"):
        load([str(checkpoint), str(other)], "cpu")
    assert load([str(checkpoint), str(other)], "cpu", size=64).size == 64  # fed one size, they average
