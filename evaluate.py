"""Evaluation under both protocols of docs/design.md §8, in one pass over a split, or under one of the
peers' NYU Depth v2 and KITTI protocols (docs/benchmarks.md).

challenge_*: the paper's and the course's numbers: 224 × 224, batches of 32 in file
order, raw predictions, per-batch RMSE and template SSIM averaged over batches. A model
trained at another --image-size is scored at 224 × 224 too (its prediction resized).
standard: at the ground truth's own resolution, every metric per image, then averaged.
nyu, kitti, kitti-eigen (--protocol): as BTS, AdaBins and ZoeDepth score, on the ground truth as
its file holds it: the pixels inside the protocol's crop whose depth lies in its open interval,
the prediction at the ground truth's size clipped into that interval, every metric per image,
then the mean over the images.
"""
import csv
import os
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from conventions import PAPER
from dataset import clip_depth, read_depth, read_pair, resize_depth, to_model_input
from inference import Predictor
from losses import (
    loss_data_range,
    masked_ssim_per_image,
    rmse,
    squared_error_sums,
    ssim,
    ssim_map,
    ssim_sums,
)
from plots import plot_prediction_grid, plot_training_curves
from utils import UserError, atomic_path

METRIC_KEYS = ("rmse", "ssim", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3",
               "challenge_rmse", "challenge_ssim", "n_images")
# What the peers' protocols report, in their tables' order.
PROTOCOL_KEYS = ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3", "n_images")
CHALLENGE_BATCH = 32
# The challenge protocol's resolution. A model trained at another --image-size is scored there
# too, its prediction resized bilinearly, so that challenge_* figures always compare.
CHALLENGE_SIZE = 224


def compute_errors(gt, pred, max_depth=PAPER.max_depth, min_depth=PAPER.min_depth):
    """Standard metrics of each image of (B, 1, H, W) gt and pred (same size) as (B,) tensors.

    pred is clamped to [0, max_depth] for RMSE/SSIM and to [min_depth, max_depth] for the
    ratio and log metrics. Only measured pixels (gt > min_depth) count: for RMSE and SSIM
    every pixel when the ground truth has no hole (the paper's protocol), else the measured
    pixels, and SSIM from mask-weighted window statistics (losses.masked_ssim_per_image). An
    image with nothing measured gets NaN, which evaluate() leaves out.
    """
    gt, pred = gt.float(), pred.float().clamp(0, max_depth)
    dims = (1, 2, 3)
    measured = gt > min_depth
    valid = measured.float()
    n = valid.sum(dims)
    if bool(measured.all()):
        out = {"rmse": ((gt - pred) ** 2).mean(dims).sqrt(),
               "ssim": ssim_map(pred, gt, data_range=max_depth, padding="valid").mean(dims)}
    else:
        per_image, scored = masked_ssim_per_image(pred, gt, measured, max_depth, "valid")
        out = {"rmse": (((gt - pred) ** 2) * valid).sum(dims).div(n).sqrt(),
               "ssim": torch.where(scored, per_image, torch.full_like(per_image, float("nan")))}
    g = gt.clamp_min(min_depth)  # masked pixels are zeroed by `valid`; this only keeps them finite
    p = pred.clamp(min_depth, max_depth)

    def masked_mean(x):
        return (x * valid).sum(dims) / n.clamp_min(1)

    ratio = torch.maximum(g / p, p / g)
    out["abs_rel"] = masked_mean((g - p).abs() / g)
    out["sq_rel"] = masked_mean((g - p) ** 2 / g)
    out["rmse_log"] = masked_mean((g.log() - p.log()) ** 2).sqrt()
    out["log10"] = masked_mean((g.log10() - p.log10()).abs())
    # In float64 and about the mean (the variance's two-pass form): E[e²] - E[e]² in float32 cancels.
    log_error = p.double().log() - g.double().log()
    centred = log_error - masked_mean(log_error)[:, None, None, None]
    out["silog"] = (masked_mean(centred**2).sqrt() * 100).float()
    for i in (1, 2, 3):
        out[f"delta{i}"] = masked_mean((ratio < 1.25**i).float())
    if not bool((n > 0).all()):
        out = {k: torch.where(n > 0, v, torch.full_like(v, float("nan"))) for k, v in out.items()}
    return out


def collate_with_native(batch):
    """Stack the input-size tensors; keep native-resolution depths as a list (sizes may differ)."""
    rgb, depth, native = zip(*batch)
    return torch.stack(rgb), torch.stack(depth), list(native)


@torch.no_grad()
def evaluate(model, dataset, device, amp_dtype=None, num_workers=0, per_image=False, save_dir=None):
    """Both protocols on `dataset` (a DepthEstimationUnreal with native=True), at its depth range.

    Returns the metrics dict (METRIC_KEYS), plus a list of per-image metric dicts when per_image.
    An image with no measured pixel is reported once and left out of every figure; n_images
    counts the images scored. save_dir: write each prediction there (save_prediction).
    """
    was_training = model.training
    model.eval()
    max_depth, min_depth = dataset.max_depth, dataset.min_depth
    predictor = Predictor(model, dataset.size, device, dataset.conventions, amp_dtype)
    loader = DataLoader(dataset, batch_size=CHALLENGE_BATCH, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_with_native, pin_memory=device.type == "cuda")
    challenge, per_metric = [], {}
    start = 0
    for rgb, depth, natives in loader:
        rgb, depth = rgb.to(device, non_blocking=True), depth.to(device, non_blocking=True)
        pred = predictor.predict(rgb)
        if save_dir is not None:
            for i, (p, native) in enumerate(zip(pred, natives)):
                full = F.interpolate(p[None], size=native.shape[-2:], mode="bilinear", align_corners=False)
                save_prediction(full[0, 0].cpu().numpy(), dataset, start + i, save_dir)
        start += len(natives)
        challenge.append(challenge_scores(*challenge_pair(pred, depth, natives, min_depth), max_depth, min_depth))
        for gt, p in group_by_size(natives, pred, device):
            resized = F.interpolate(p, size=gt.shape[-2:], mode="bilinear", align_corners=False)
            for k, v in compute_errors(gt, resized, max_depth, min_depth).items():
                per_metric.setdefault(k, []).append(v)
    model.train(was_training)
    per_metric = {k: torch.cat(v).cpu() for k, v in per_metric.items()}
    scored = torch.isfinite(per_metric["rmse"])
    if not bool(scored.all()):
        names = [n for n, ok in zip(dataset.names, scored.tolist()) if not ok]
        # A warning: said once per run, not at every validation of a training run.
        warnings.warn(f"{len(names)} image(s) of the {dataset.split} split have no measured depth and are left out: "
                      f"{some_names(names)}", stacklevel=2)
    # An image whose every SSIM window is too sparsely measured has no SSIM, only the other metrics.
    no_ssim = int((scored & ~torch.isfinite(per_metric["ssim"])).sum()) if "ssim" in per_metric else 0
    if no_ssim:
        warnings.warn(f"{no_ssim} image(s) of the {dataset.split} split have too few measured pixels for any SSIM "
                      "window: their SSIM is left out of its mean, their other metrics count", stacklevel=2)
    metrics = {k: float(v[scored].nanmean()) for k, v in per_metric.items()}
    rmses, ssims = zip(*challenge)
    metrics["challenge_rmse"] = float(torch.stack([r for r in rmses if r is not None]).mean())
    metrics["challenge_ssim"] = float(torch.stack([s for s in ssims if s is not None]).mean())
    metrics["n_images"] = int(scored.sum())
    if not per_image:
        return metrics
    rows = [{"name": name, **{k: float(v[i]) for k, v in per_metric.items()}}
            for i, name in enumerate(dataset.names) if scored[i]]
    return metrics, rows


class Protocol(NamedTuple):
    """One of the peers' evaluation protocols: the crop (box: the ground truth's (H, W) to the rows and columns
    scored, top, bottom, left, right, as Python slices take them), its words, and the depth interval scored."""

    name: str
    crop: str
    box: Callable
    min_depth: float
    max_depth: float


def nyu_eigen_box(height, width):
    """Eigen et al.'s crop of NYU Depth v2's 480 × 640 ground truth: the border its RGB frames lack."""
    return 45, 471, 41, 601


def garg_box(height, width):
    """Garg et al.'s crop of KITTI's full-size ground truth, as fractions of its height and width."""
    return int(0.40810811 * height), int(0.99189189 * height), int(0.03594771 * width), int(0.96405229 * width)


def kitti_eigen_box(height, width):
    """Eigen et al.'s crop of KITTI's full-size ground truth, as fractions of its height and width."""
    return int(0.3324324 * height), int(0.91351351 * height), int(0.0359477 * width), int(0.96405229 * width)


PROTOCOLS = {
    "nyu": Protocol("nyu", "Eigen crop (rows 45:471, columns 41:601)", nyu_eigen_box, 1e-3, 10.0),
    "kitti": Protocol("kitti", "Garg crop of the full-size ground truth", garg_box, 1e-3, 80.0),
    "kitti-eigen": Protocol("kitti-eigen", "Eigen crop of the full-size ground truth", kitti_eigen_box, 1e-3, 80.0),
}


def protocol_with_caps(name, min_depth=None, max_depth=None):
    """PROTOCOLS[name], its depth interval replaced where --min-depth-eval or --max-depth-eval is given."""
    protocol = PROTOCOLS[name]
    return protocol._replace(min_depth=protocol.min_depth if min_depth is None else float(min_depth),
                             max_depth=protocol.max_depth if max_depth is None else float(max_depth))


def scored_pixels(gt, protocol):
    """The (H, W) mask of a ground truth's pixels a protocol scores: inside its crop, depth in its open interval."""
    top, bottom, left, right = protocol.box(*gt.shape)
    inside = np.zeros(gt.shape, dtype=bool)
    inside[top:bottom, left:right] = True
    return inside & (gt > protocol.min_depth) & (gt < protocol.max_depth)


def median_scaled(pred, gt, mask):
    """The prediction times median(gt) / median(pred) over the scored pixels (Monodepth2's scaling of relative
    depth); numpy's median, which takes the mean of the two middle values of an even count."""
    return pred * (np.median(gt[mask].astype(np.float64)) / np.median(pred[mask].astype(np.float64)))


def clipped_prediction(pred, protocol):
    """Scored predictions clipped into the protocol's interval (NaN to its minimum, inf to its maximum), in
    float32 as the peers' scripts clip them."""
    low, high = np.float32(protocol.min_depth), np.float32(protocol.max_depth)
    return np.clip(np.nan_to_num(pred.astype(np.float32), nan=low, posinf=high, neginf=low), low, high)


def peer_errors(gt, pred):
    """The peers' metrics of one image from its scored pixels (1-D float32 gt and clipped prediction).

    The ratios that delta1..3 compare with 1.25^i are taken in float32, as the peers take them: a prediction
    clipped to a cap over millimetre ground truth can land exactly on a threshold (10 m / 6.4 m = 1.25²),
    where float64 would decide otherwise. The other metrics are sums, taken in float64; silog, 100
    sqrt(E[e²] - E[e]²) of e = ln pred - ln gt (lambda 1), about the mean, which is the same quantity
    without float32's cancellation.
    """
    gt32, pred32 = gt.astype(np.float32), pred.astype(np.float32)
    ratio = np.maximum(gt32 / pred32, pred32 / gt32)
    gt, pred = gt32.astype(np.float64), pred32.astype(np.float64)
    log_error = np.log(pred) - np.log(gt)
    out = {"rmse": np.sqrt(np.mean((gt - pred) ** 2)),
           "abs_rel": np.mean(np.abs(gt - pred) / gt),
           "sq_rel": np.mean((gt - pred) ** 2 / gt),
           "rmse_log": np.sqrt(np.mean(log_error**2)),
           "log10": np.mean(np.abs(np.log10(pred) - np.log10(gt))),
           "silog": 100 * np.sqrt(np.mean((log_error - log_error.mean()) ** 2))}
    for i in (1, 2, 3):
        out[f"delta{i}"] = np.mean(ratio < 1.25**i)
    return {k: float(v) for k, v in out.items()}


class GroundTruthPairs(Dataset):
    """(network input, ground truth as its file holds it (HW float32 metres), index) of each pair of a
    DepthEstimationUnreal: the peers' protocols cap the depth themselves, not at the training range."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        _, rgb_path, depth_path = self.dataset.pairs[index]
        rgb, depth = read_pair(rgb_path, depth_path, self.dataset.depth_scale, self.dataset.max_pixels)
        return to_model_input(rgb, self.dataset.size), depth, index


def collate_ground_truth(batch):
    """Stack the inputs; keep the ground truths (of any size) and indices as lists."""
    inputs, depths, indices = zip(*batch)
    return torch.stack(inputs), list(depths), list(indices)


@torch.no_grad()
def evaluate_protocol(model, dataset, device, protocol, amp_dtype=None, num_workers=0, median_scale=False,
                      save_dir=None, progress=True):
    """A peers' protocol (a Protocol) on `dataset`: (metrics (PROTOCOL_KEYS), per-image rows).

    Each prediction is resized to its ground truth's size (bilinear, half-pixel centres), optionally
    median-scaled, saved (save_dir), then its scored pixels clipped into the interval; every metric is
    taken per image, then averaged over the images. An image with no scored pixel is left out and
    reported; n_images counts the images scored.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(GroundTruthPairs(dataset), batch_size=CHALLENGE_BATCH, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_ground_truth)
    rows, empty = [], []
    predictor = Predictor(model, dataset.size, device, dataset.conventions, amp_dtype)
    for rgb, gts, indices in tqdm(loader, desc=f"evaluating ({protocol.name})", leave=False, disable=not progress):
        pred = predictor.predict(rgb.to(device))
        for p, gt, index in zip(pred, gts, indices):
            full = F.interpolate(p[None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            mask = scored_pixels(gt, protocol)
            if median_scale and mask.any():
                full = median_scaled(full, gt, mask).astype(np.float32)
            if save_dir is not None:
                save_prediction(full, dataset, index, save_dir)
            if not mask.any():
                empty.append(dataset.names[index])
                continue
            rows.append({"name": dataset.names[index],
                         **peer_errors(gt[mask], clipped_prediction(full[mask], protocol))})
    model.train(was_training)
    if empty:
        print(f"{len(empty)} image(s) of the {dataset.split} split have no ground truth inside the {protocol.name} "
              f"crop and ({protocol.min_depth:g}, {protocol.max_depth:g}) m, and are left out: {some_names(empty)}")
    if not rows:
        raise UserError(f"no image of the {dataset.split} split has ground truth that --protocol {protocol.name} "
                        f"scores (inside its crop, in ({protocol.min_depth:g}, {protocol.max_depth:g}) m): check "
                        "--depth-scale, --min-depth-eval and --max-depth-eval")
    metrics = {k: float(np.mean([row[k] for row in rows])) for k in PROTOCOL_KEYS if k != "n_images"}
    metrics["n_images"] = len(rows)
    return metrics, rows


def protocol_line(protocol, n_images, median_scale=False):
    """One line naming a peers' protocol and its conventions, for the printout of --eval."""
    low, high = f"{protocol.min_depth:g}", f"{protocol.max_depth:g}"
    scaled = ", median-scaled" if median_scale else ""
    return (f"protocol {protocol.name}: {protocol.crop}, ground truth in ({low}, {high}) m; prediction resized to the "
            f"ground truth (bilinear){scaled}, clipped to [{low}, {high}] (NaN to {low}, inf to {high}); every metric "
            f"per image, then the mean over {n_images} images; silog x100, lambda 1")


def unreal_line(dataset, n_images):
    """One line naming this repository's two protocols and their conventions, for the printout of --eval."""
    return (f"protocol unreal: standard (the ground truth's size, depth clipped to [0, {dataset.max_depth:g}] m, "
            f"at or below {dataset.min_depth:g} m not measured; per image, the mean over {n_images} images) and "
            f"challenge ({CHALLENGE_SIZE} x {CHALLENGE_SIZE}, per batch of {CHALLENGE_BATCH})")


def prediction_path(save_dir, root, rgb_path):
    """DIR/<the RGB path relative to the data root, its extension replaced by .npy>; an RGB file outside the root
    keeps its whole path below DIR. Folders are kept: KITTI's frame names repeat across drives."""
    relative = os.path.relpath(os.path.abspath(rgb_path), os.path.abspath(root))
    if relative.startswith(os.pardir):
        relative = os.path.splitdrive(os.path.abspath(rgb_path))[1].lstrip("/\\")
    return os.path.join(save_dir, os.path.splitext(relative)[0] + ".npy")


def save_prediction(depth, dataset, index, save_dir):
    """Write one prediction (HW, metres) as float32 .npy at prediction_path, atomically."""
    path = prediction_path(save_dir, dataset.root, dataset.pairs[index][1])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(depth, dtype=np.float32))


def some_names(names, shown=5):
    """The first `shown` of a list of image names, and "..." when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def challenge_scores(pred, gt, max_depth, min_depth):
    """(RMSE, loss SSIM) of one batch under the challenge protocol, over its measured pixels when it has
    holes; (None, None) for a batch with nothing measured. The SSIM's data range is the loss's."""
    data_range = loss_data_range(max_depth)
    measured = gt > min_depth
    if bool(measured.all()):
        return rmse(pred, gt), ssim(pred, gt, data_range=data_range, padding="same")
    if not bool(measured.any()):
        return None, None
    total, count = squared_error_sums(pred, gt, measured)
    sim_total, images = ssim_sums(pred, gt, data_range, "same", measured)
    return torch.sqrt(total / count), (sim_total / images if images > 0 else None)


def challenge_pair(pred, depth, natives, min_depth=PAPER.min_depth):
    """(prediction, ground truth) at CHALLENGE_SIZE: as they are when the model runs at that size; else
    the ground truth preprocessed at that size from the native depth, and the prediction resized."""
    if tuple(depth.shape[-2:]) == (CHALLENGE_SIZE, CHALLENGE_SIZE):
        return pred, depth
    gt = torch.stack([resize_depth(n, CHALLENGE_SIZE, min_depth) for n in natives]).to(pred.device)
    return F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False), gt


def group_by_size(natives, pred, device):
    """Yield (gt, pred) batches of equal native size, in the original order when all sizes agree."""
    if all(n.shape == natives[0].shape for n in natives):
        yield torch.stack(natives).to(device), pred
        return
    for i, n in enumerate(natives):
        yield n[None].to(device), pred[i : i + 1]


def format_metrics(metrics, title=None):
    """A two-row text table of the metrics a protocol reports."""
    keys = [k for k in METRIC_KEYS if k != "n_images" and k in metrics]
    head = " ".join(f"{k:>14}" for k in keys)
    vals = " ".join(f"{metrics[k]:>14.4f}" for k in keys)
    lines = [title] if title else []
    return "\n".join(lines + [head, vals, f"({metrics['n_images']} images)"])


def write_per_image_csv(rows, path):
    """evaluate(..., per_image=True)'s rows as a CSV: name, then the standard metrics, one line per image."""
    keys = ["name"] + [k for k in METRIC_KEYS if rows and k in rows[0]]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        # 7 significant digits: all that the float32 metrics hold
        writer.writerows({k: f"{v:.7g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)


def predict_samples(model, dataset, indices, device, amp_dtype=None):
    """(name, rgb, ground truth, prediction) at native resolution for images `indices` of a DepthEstimationUnreal."""
    raws = [dataset.load_raw(i) for i in indices]
    inputs = torch.stack([to_model_input(rgb, dataset.size) for rgb, _ in raws]).to(device)
    predictor = Predictor(model, dataset.size, device, dataset.conventions, amp_dtype)
    preds = predictor.depth_maps(inputs, [gt.shape for _, gt in raws])
    return [(dataset.names[i], rgb, gt, pred) for i, (rgb, gt), pred in zip(indices, raws, preds)]


class FixedMapModel(torch.nn.Module):
    """Predicts one depth map for every image: the constant and per-row baselines."""

    def __init__(self, depth_map):
        super().__init__()
        self.register_buffer("depth_map", depth_map.reshape(1, 1, *depth_map.shape[-2:]).float())

    def forward(self, rgb):
        return self.depth_map.expand(rgb.shape[0], -1, -1, -1)


def baseline_models(train_set, cache=None):
    """The predictors that see no image, fitted on a training split's preprocessed depth, over its
    measured pixels.

    constant mean: one value everywhere; per-row mean: each row's mean (depth mostly
    grows with height in the image); mean map: each pixel's mean over the split. With the
    split's decoded cache (dataset.SplitCache) its depth maps are used rather than decoding
    every file again; their float16 rounding moves the maps by well under a centimetre.
    """
    total, count = depth_sums(train_set, cache)
    if bool((count == len(train_set)).all()):  # no holes: plain means, as the paper's baselines
        mean_map = total / len(train_set)
        constant, rows = float(mean_map.mean()), mean_map.mean(dim=-1, keepdim=True)
    else:
        constant = float(total.sum() / count.sum())
        rows = total.sum(-1, keepdim=True) / count.sum(-1, keepdim=True).clamp_min(1)
        rows = torch.where(count.sum(-1, keepdim=True) > 0, rows, torch.full_like(rows, constant))
        mean_map = torch.where(count > 0, total / count.clamp_min(1), rows.expand_as(total))
    return {"constant mean": FixedMapModel(torch.full_like(mean_map, constant)),
            "per-row mean": FixedMapModel(rows.expand_as(mean_map)),
            "mean map": FixedMapModel(mean_map)}


def depth_sums(train_set, cache=None, chunk=256):
    """(Σ depth, number of measured values) per pixel (1, H, W) of the split's preprocessed depth maps, from
    the cache when there is one. Holes hold 0, so the first sum is that of the measured pixels."""
    if cache is not None:
        parts = [(d.float().sum(0), (d > train_set.min_depth).float().sum(0))
                 for d in (cache.depth[i:i + chunk] for i in range(0, len(cache), chunk))]
        return sum(p[0] for p in parts).cpu(), sum(p[1] for p in parts).cpu()
    total, count = 0, 0
    for _, _, depth_path in train_set.pairs:
        d = clip_depth(read_depth(depth_path, train_set.depth_scale), train_set.min_depth, train_set.max_depth)
        d = resize_depth(torch.from_numpy(d)[None], train_set.size, train_set.min_depth)
        total, count = total + d, count + (d > train_set.min_depth).float()
    return total, count


def write_eval_report(model, dataset, rows, device, out_dir, run_dir, amp_dtype=None, grid_rows=6, cmap="magma"):
    """The reports of --eval, into out_dir: report_SPLIT_per_image.csv (`rows` of evaluate(..., per_image=True)),
    report_SPLIT_grid.png (`grid_rows` images spread evenly over the split, 0: none) and curves.png, the
    training curves of run_dir (the checkpoint's run; None: none) when it has logs."""
    split = dataset.split
    csv_path = os.path.join(out_dir, f"report_{split}_per_image.csv")
    write_per_image_csv(rows, csv_path)
    worst = sorted(rows, key=lambda r: r["rmse"], reverse=True)[:5]
    print(f"per-image metrics: {csv_path}; highest RMSE: "
          + ", ".join(f"{r['name']} ({r['rmse']:.2f} m)" for r in worst))
    if grid_rows > 0:
        picked = np.unique(np.linspace(0, len(rows) - 1, min(grid_rows, len(rows))).round().astype(int))
        index_of = {name: i for i, name in enumerate(dataset.names)}  # rows leave out images with no measured pixel
        indices = [index_of[rows[i]["name"]] for i in picked]
        predictions = predict_samples(model, dataset, indices, device, amp_dtype)
        samples = [(f"{name}\nRMSE {rows[i]['rmse']:.2f} m", rgb, gt, pred)
                   for i, (name, rgb, gt, pred) in zip(picked, predictions)]
        grid_path = os.path.join(out_dir, f"report_{split}_grid.png")
        plot_prediction_grid(samples, grid_path, dataset.max_depth, cmap, dataset.min_depth)
        print(f"prediction grid: {grid_path}")
    if run_dir is None:
        return
    curves_path = os.path.join(out_dir, "curves.png")
    if plot_training_curves(run_dir, curves_path):
        print(f"training curves: {curves_path}")
    else:
        print(f"no training curves: {run_dir} has no metrics.jsonl or train_log.jsonl")
