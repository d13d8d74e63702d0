"""Evaluation under both protocols of docs/design.md §8, in one pass over a split.

challenge_*: the paper's and the course's numbers: 224 × 224, batches of 32 in file
order, raw predictions, per-batch RMSE and template SSIM averaged over batches. A model
trained at another --image-size is scored at 224 × 224 too (its prediction resized).
standard: at the ground truth's own resolution, every metric per image, then averaged.
"""
import csv
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset import MAX_DEPTH, clip_depth, read_depth, resize_depth, to_model_input
from inference import predict_batch, predict_depth
from losses import (
    MIN_DEPTH,
    loss_data_range,
    masked_ssim_per_image,
    rmse,
    squared_error_sums,
    ssim,
    ssim_map,
    ssim_sums,
)
from plots import plot_prediction_grid, plot_training_curves
from utils import atomic_path

METRIC_KEYS = ("rmse", "ssim", "abs_rel", "sq_rel", "rmse_log", "log10", "delta1", "delta2", "delta3",
               "challenge_rmse", "challenge_ssim", "n_images")
CHALLENGE_BATCH = 32
# The challenge protocol's resolution. A model trained at another --image-size is scored there
# too, its prediction resized bilinearly, so that challenge_* figures always compare.
CHALLENGE_SIZE = 224


def compute_errors(gt, pred, max_depth=MAX_DEPTH, min_depth=MIN_DEPTH):
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
def evaluate(model, dataset, device, amp_dtype=None, num_workers=0, per_image=False):
    """Both protocols on `dataset` (a DepthEstimationUnreal with native=True), at its depth range.

    Returns the metrics dict (METRIC_KEYS), plus a list of per-image metric dicts when per_image.
    An image with no measured pixel is reported once and left out of every figure; n_images
    counts the images scored.
    """
    was_training = model.training
    model.eval()
    max_depth, min_depth = dataset.max_depth, dataset.min_depth
    loader = DataLoader(dataset, batch_size=CHALLENGE_BATCH, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_with_native, pin_memory=device.type == "cuda")
    challenge, per_metric = [], {}
    for rgb, depth, natives in loader:
        rgb, depth = rgb.to(device, non_blocking=True), depth.to(device, non_blocking=True)
        pred = predict_batch(model, rgb, amp_dtype)
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
                      + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""), stacklevel=2)
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


def challenge_pair(pred, depth, natives, min_depth=MIN_DEPTH):
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
    """A two-row text table of both protocols."""
    keys = [k for k in METRIC_KEYS if k != "n_images"]
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
    preds = predict_depth(model, inputs, [gt.shape for _, gt in raws], amp_dtype, dataset.max_depth)
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
