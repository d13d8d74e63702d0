"""Training on one's own data: 16-bit PNG depth, holes, split lists, any size, its own depth range."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import app
import main as entry
from checkpoint import load_checkpoint
from conftest import make_pair
from dataset import (
    DataError,
    DepthEstimationUnreal,
    clip_depth,
    list_pairs,
    read_depth,
    resize_depth,
    resize_to,
)
from evaluate import baseline_models, compute_errors, evaluate
from losses import DepthLoss, masked_ssim_per_image
from reference import masked_ssim
from synthetic import OwnDataForm, generate_dataset
from train import Trainer


def write_png16(path, millimetres):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(millimetres, dtype=np.uint16)).save(path)


def own_dataset(root, sizes, holes=0.3, holes_top=0.2, seed=0, scale=1000.0):
    """Pairs of the given (H, W) sizes per split, depth as 16-bit PNG (value / scale m) with holes, listed in
    SPLIT.txt under odd names with a comment and a blank line; returns str(root)."""
    rng = np.random.default_rng(seed)
    root = str(root)
    for split, split_sizes in sizes.items():
        lines = ["# RGB_PATH DEPTH_PATH", ""]
        for i, size in enumerate(split_sizes):
            rgb, depth = make_pair(rng, size)
            depth = np.where(depth > 50, 0.0, depth)  # sky: no return, as a sensor records it
            depth[: int(holes_top * size[0])] = 0.0
            depth[rng.random(depth.shape) < holes] = 0.0
            name = f"{split}_shots/img-{i:03d}.v2"
            os.makedirs(os.path.join(root, f"{split}_shots"), exist_ok=True)
            Image.fromarray(rgb).save(os.path.join(root, name + ".jpg"), quality=95)
            write_png16(os.path.join(root, "gt", split, f"d{i}.png"), np.round(depth * scale))
            lines.append(f"{name}.jpg gt/{split}/d{i}.png  # pair {i}")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("scale", [1000.0, 256.0])
def test_png_depth_is_value_over_the_depth_scale(tmp_path, scale):
    values = np.array([[0, 1, 2560], [5000, 65535, 12345]], dtype=np.uint16)
    write_png16(str(tmp_path / "d.png"), values)
    depth = read_depth(str(tmp_path / "d.png"), scale)
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, values.astype(np.float64) / scale, rtol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_an_8_bit_or_colour_png_is_not_depth(tmp_path, mode):
    Image.new(mode, (8, 6)).save(tmp_path / "d.png")
    with pytest.raises(DataError, match="8-bit or colour picture.*not depth"):
        read_depth(str(tmp_path / "d.png"))


def test_split_lists_with_odd_names_comments_and_blank_lines(tmp_path):
    root = own_dataset(tmp_path, {"train": [(48, 64), (40, 72)]})
    pairs = list_pairs(root, "train")
    assert [name for name, _, _ in pairs] == ["train_shots/img-000.v2", "train_shots/img-001.v2"]
    assert all(os.path.isfile(p) for _, rgb, depth in pairs for p in (rgb, depth))


def test_a_listed_file_that_is_missing_names_the_list_and_line(tmp_path):
    root = own_dataset(tmp_path, {"train": [(48, 64), (48, 64)]})
    os.remove(os.path.join(root, "gt", "train", "d1.png"))
    with pytest.raises(DataError, match=r"train\.txt line 4: .*d1\.png not found"):
        list_pairs(root, "train")
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("only_one_path.jpg\n")
    with pytest.raises(DataError, match=r"train\.txt line 1: expected two paths"):
        list_pairs(root, "train")


# ------------------------------------------------------------------ holes
def test_resizing_a_map_with_holes_invents_no_depth():
    depth = torch.zeros(1, 40, 60)
    depth[:, :, :30] = 5.0  # the left half measured at 5 m, the right half never
    depth[:, :10, :30] = 9.0
    resized = resize_depth(depth, (16, 24))
    values = set(np.unique(resized.numpy().round(4)).tolist())
    blended = [v for v in values if v not in (0.0,) and not 5.0 <= v <= 9.0]
    assert not blended, f"depths between a measurement and a hole: {blended}"
    assert (resized[..., :11] > 0).all() and (resized[..., 13:] == 0).all()


def test_a_map_without_holes_resizes_exactly_as_the_paper():
    depth = torch.rand(1, 36, 64) * 19 + 0.5
    assert torch.equal(resize_depth(depth, 32), resize_to(depth, 32))


def test_mean_depth_and_holes_come_from_measured_pixels_only(tmp_path):
    root = own_dataset(tmp_path, {"train": [(48, 64), (40, 72), (48, 64)]})
    split = DepthEstimationUnreal(root, "train", size=32)
    maps = [clip_depth(read_depth(d), 1e-3, 20.0) for _, _, d in split.pairs]
    measured = np.concatenate([m[m > 1e-3] for m in maps])
    assert split.has_holes
    assert split.mean_depth == pytest.approx(float(measured.astype(np.float64).mean()), rel=1e-9)


def test_the_loss_gradient_at_unmeasured_pixels_is_exactly_zero():
    torch.manual_seed(0)
    target = torch.rand(2, 1, 32, 48) * 15 + 1
    target[:, :, :6] = 0.0  # top rows never measured
    target[torch.rand_like(target) < 0.3] = 0.0
    pred = (torch.rand(2, 1, 32, 48) * 15 + 1).requires_grad_()
    loss, _ = DepthLoss(grad_weight=0.5, silog_weight=0.5, min_depth=1e-3)(pred, target)
    loss.backward()
    holes = target <= 1e-3
    assert torch.all(pred.grad[holes] == 0)
    assert (pred.grad[~holes] != 0).float().mean() > 0.9  # the measured pixels do steer the prediction


def test_the_masked_rmse_equals_the_plain_one_where_nothing_is_missing():
    torch.manual_seed(1)
    target, pred = torch.rand(2, 1, 32, 32) * 19 + 0.5, torch.rand(2, 1, 32, 32) * 19 + 0.5
    _, plain = DepthLoss()(pred, target)
    _, masked = DepthLoss(min_depth=1e-3)(pred, target)
    assert float(masked["rmse"]) == pytest.approx(float(plain["rmse"]), rel=1e-6)


def test_every_metric_against_an_independent_masked_computation():
    rng = np.random.default_rng(3)
    gt = rng.uniform(1, 19, (3, 1, 30, 40)).astype(np.float32)
    gt[:, :, :8] = 0.0
    gt[rng.random(gt.shape) < 0.2] = 0.0
    gt[2] = 0.0  # an image with nothing measured
    pred = rng.uniform(0.5, 25, gt.shape).astype(np.float32)
    out = compute_errors(torch.from_numpy(gt), torch.from_numpy(pred), max_depth=20.0, min_depth=1e-3)
    for i in range(2):
        m = gt[i, 0] > 1e-3
        g, p = gt[i, 0][m].astype(np.float64), np.clip(pred[i, 0], 0, 20)[m].astype(np.float64)
        pl = np.clip(p, 1e-3, 20)
        ratio = np.maximum(g / pl, pl / g)
        expected = {"rmse": np.sqrt(np.mean((g - p) ** 2)), "abs_rel": np.mean(np.abs(g - pl) / g),
                    "sq_rel": np.mean((g - pl) ** 2 / g), "rmse_log": np.sqrt(np.mean((np.log(g) - np.log(pl)) ** 2)),
                    "log10": np.mean(np.abs(np.log10(g) - np.log10(pl))), "delta1": np.mean(ratio < 1.25),
                    "delta2": np.mean(ratio < 1.25**2), "delta3": np.mean(ratio < 1.25**3),
                    "ssim": masked_ssim(np.clip(pred[i, 0], 0, 20), gt[i, 0], m, 20.0)}
        for key, value in expected.items():
            assert float(out[key][i]) == pytest.approx(value, rel=1e-4, abs=1e-5), (i, key)
    assert all(np.isnan(float(v[2])) for v in out.values()), "an image with nothing measured has no metrics"


def test_an_image_with_nothing_measured_is_reported_once_and_left_out(tmp_path):
    root = own_dataset(tmp_path, {"train": [(48, 64)] * 2, "val": [(48, 64)] * 3})
    write_png16(os.path.join(root, "gt", "val", "d1.png"), np.zeros((48, 64)))
    val = DepthEstimationUnreal(root, "val", size=32, native=True)
    model = baseline_models(DepthEstimationUnreal(root, "train", size=32))["mean map"]
    with pytest.warns(UserWarning) as caught:
        metrics, rows = evaluate(model, val, torch.device("cpu"), per_image=True)
    said = [str(w.message) for w in caught if "no measured depth" in str(w.message)]
    assert said == ["1 image(s) of the val split have no measured depth and are left out: val_shots/img-001.v2"]
    assert metrics["n_images"] == 2 and len(rows) == 2 and all(np.isfinite(metrics[k]) for k in metrics)


def test_baselines_are_fitted_on_measured_pixels(tmp_path):
    root = own_dataset(tmp_path, {"train": [(32, 32)] * 3}, holes=0.25, holes_top=0.0)
    train = DepthEstimationUnreal(root, "train", size=32)
    maps = np.stack([clip_depth(read_depth(d), 1e-3, 20.0) for _, _, d in train.pairs]).astype(np.float64)
    measured = maps > 1e-3
    baselines = baseline_models(train)
    assert float(baselines["constant mean"].depth_map[0, 0, 0, 0]) == pytest.approx(maps[measured].mean(), rel=1e-5)
    seen = measured.any(0)
    expected = (maps * measured).sum(0)[seen] / measured.sum(0)[seen]
    np.testing.assert_allclose(baselines["mean map"].depth_map[0, 0].numpy()[seen], expected, rtol=1e-5)


# ------------------------------------------------------------------ end to end
def train_args(data, run, *extra):
    return ["--data-dir", data, "--run-dir", str(run), "--weights", "none", "--batch-size", "2", "--workers", "0",
            "--amp", "off", "--quiet", "--device", "cpu", "--vis-every", "0", "--encoder", "resnet18", *extra]


def test_own_data_trains_evaluates_and_predicts_at_its_own_sizes(tmp_path):
    data = own_dataset(tmp_path / "data", {"train": [(48, 80), (60, 96), (48, 80), (60, 96)],
                                          "val": [(48, 80), (60, 96)]})
    run = tmp_path / "run"
    assert entry.main(train_args(data, run, "--image-size", "32", "64", "--max-depth", "10", "--max-steps", "2",
                                 "--eval-every", "1")) == 0
    ckpt = load_checkpoint(str(run / "best.pt"))
    assert ckpt["input_size"] == [32, 64] and ckpt["depth"]["max_depth"] == 10.0
    assert entry.main(["--eval", "--ckpt", str(run / "best.pt"), "--data-dir", data, "--quiet", "--workers", "0",
                       "--metrics-out", str(tmp_path / "m.json"), "--no-report"]) == 0
    from_eval = json.load(open(tmp_path / "m.json"))
    trained = entry.parse_options(["--eval", "--ckpt", str(run / "best.pt")])
    assert trained.max_depth is None and trained.image_size is None, "taken from the checkpoint"
    from conventions import DepthConventions
    from inference import load

    model = load(str(run / "best.pt"), "cpu").net
    at_10 = evaluate(model, DepthEstimationUnreal(data, "val", size=[32, 64], native=True,
                                               conventions=DepthConventions(max_depth=10.0)),
                     torch.device("cpu"))
    at_20 = evaluate(model, DepthEstimationUnreal(data, "val", size=[32, 64], native=True,
                                               conventions=DepthConventions(max_depth=20.0)),
                     torch.device("cpu"))
    assert from_eval == pytest.approx(at_10) and from_eval["rmse"] != pytest.approx(at_20["rmse"])

    out = tmp_path / "pred"
    assert entry.main(["--predict", os.path.join(data, "val_shots"), "--ckpt", str(run / "best.pt"), "--out",
                       str(out), "--quiet", "--workers", "0"]) == 0
    depths = {name: np.load(out / f"{name}.npy") for name in ("img-000.v2", "img-001.v2")}
    assert depths["img-000.v2"].shape == (48, 80) and depths["img-001.v2"].shape == (60, 96)
    assert all(0 <= d.min() and d.max() <= 10.0 for d in depths.values())

    exported = tmp_path / "model.torchscript.pt"
    assert entry.main(["--export", "torchscript", "--ckpt", str(run / "best.pt"), "--out", str(exported)]) == 0
    with torch.no_grad():
        assert torch.jit.load(str(exported))(torch.rand(1, 3, 32, 64)).shape == (1, 1, 32, 64)

    page = app.DepthPage(app.parse_options(["--ckpt", str(run / "best.pt"), "--device", "cpu"]))
    try:
        rgb = np.array(Image.open(os.path.join(data, "val_shots", "img-001.v2.jpg")).convert("RGB"))
        depth = page.predict(rgb)
        assert page.max_depth == 10.0 and depth.shape == (60, 96) and depth.max() <= 10.0
    finally:
        page.close()


@pytest.mark.slow
def test_holes_are_never_learned_as_targets(tmp_path):
    """The top rows are never measured: training must not pull the prediction there towards their 0."""
    data = own_dataset(tmp_path / "data", {"train": [(64, 64)] * 8}, holes=0.3, holes_top=0.25)
    trainer = Trainer(entry.parse_options(train_args(data, tmp_path / "run", "--image-size", "64", "--max-steps", "12",
                                                     "--eval-every", "0", "--batch-size", "4")))
    assert trainer._loss_fn.min_depth == pytest.approx(1e-3), "a data set with holes trains on the masked loss"
    trainer.fit()
    rgb = torch.stack([trainer.train_set[i][0] for i in range(4)])
    with torch.no_grad():
        pred = trainer.model.eval()(rgb)
    assert float(pred[:, :, :16].mean()) > 3.0  # the holes' 0 m would pull it towards 0


def test_depth_estimation_unreal_keeps_the_paper_path(tiny_data, tmp_path):
    """Without holes nothing is masked: the plain loss, the paper's resize, the plain metrics, bit for bit."""
    trainer = Trainer(entry.parse_options(train_args(tiny_data, tmp_path / "run", "--image-size", "64",
                                                     "--max-steps", "1", "--eval-every", "0")))
    assert trainer._loss_fn.min_depth is None and not trainer.train_set.has_holes
    assert trainer._loss_fn.data_range == 1.0
    rgb, depth = trainer.train_set[0]
    native = torch.from_numpy(trainer.train_set.load_raw(0)[1])[None]
    assert torch.equal(depth, resize_to(native, 64))
    gt, pred = native[None], native[None] * 0.9 + 0.3
    errors = compute_errors(gt, pred)
    assert torch.equal(errors["rmse"], ((gt - pred.clamp(0, 20)) ** 2).mean((1, 2, 3)).sqrt())


def test_masked_ssim_of_a_fully_measured_image_is_the_plain_ssim_away_from_borders():
    torch.manual_seed(2)
    x, y = torch.rand(1, 1, 24, 24) * 10, torch.rand(1, 1, 24, 24) * 10
    per_image, scored = masked_ssim_per_image(x, y, torch.ones_like(x, dtype=torch.bool), 20.0, "valid")
    from losses import ssim

    assert bool(scored) and float(per_image) == pytest.approx(float(ssim(x, y, 20.0, "valid")), rel=1e-5)


def test_synthetic_writes_the_worked_example(tmp_path):
    form = OwnDataForm(lists=True, png16=True, holes=0.3, holes_top=0.2)
    generate_dataset(tmp_path, 3, 2, 0, height=96, width=160, form=form)
    pairs = list_pairs(str(tmp_path), "train")
    assert [n for n, _, _ in pairs] == [f"images/train/scene_{i:05d}" for i in range(3)]
    with Image.open(pairs[0][2]) as im:
        assert im.mode.startswith("I;16") and im.size == (160, 96)
    depth = read_depth(pairs[0][2])
    assert (depth[:19] == 0).all() and 0.2 < (depth[19:] == 0).mean() < 0.6
    assert DepthEstimationUnreal(str(tmp_path), "val", size=32).has_holes


def test_the_depth_options_default_to_the_papers_conventions():
    from conventions import DepthConventions

    opts = entry.parse_options([])
    assert DepthConventions.of(opts) == DepthConventions(min_depth=1e-3, max_depth=20.0, depth_scale=1000.0)
