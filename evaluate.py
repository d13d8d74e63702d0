"""Evaluation under both protocols of docs/design.md §8, in one pass over a split.

challenge_*: the paper's and the course's numbers: 224 × 224, batches of 32 in file
order, raw predictions, per-batch RMSE and template SSIM averaged over batches. A model
trained at another --image-size is scored at 224 × 224 too (its prediction resized).
standard: at the ground truth's own resolution, every metric per image, then averaged.
"""
import csv
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset import MAX_DEPTH, read_depth, resize_to_square, to_model_input
from inference import predict_batch, predict_depth
from losses import MIN_DEPTH, rmse, ssim, ssim_map
from plots import plot_prediction_grid, plot_training_curves
from utils import atomic_path

METRIC_KEYS = ("rmse", "ssim", "abs_rel", "sq_rel", "rmse_log", "log10", "delta1", "delta2", "delta3",
               "challenge_rmse", "challenge_ssim", "n_images")
CHALLENGE_BATCH = 32
# The challenge protocol's resolution. A model trained at another --image-size is scored there
# too, its prediction resized bilinearly, so that challenge_* figures always compare.
CHALLENGE_SIZE = 224


def compute_errors(gt, pred, max_depth=MAX_DEPTH):
    """Standard metrics of each image of (B, 1, H, W) gt and pred (same size) as (B,) tensors.

    pred is clamped to [0, max_depth] for RMSE/SSIM and to [MIN_DEPTH, max_depth] for the
    ratio and log metrics, which use only pixels with gt > MIN_DEPTH (1 mm).
    """
    gt, pred = gt.float(), pred.float().clamp(0, max_depth)
    dims = (1, 2, 3)
    out = {
        "rmse": ((gt - pred) ** 2).mean(dims).sqrt(),
        "ssim": ssim_map(pred, gt, data_range=max_depth, padding="valid").mean(dims),
    }
    valid = (gt > MIN_DEPTH).float()
    n = valid.sum(dims).clamp_min(1)
    g = gt.clamp_min(MIN_DEPTH)  # masked pixels are zeroed by `valid`; this only keeps them finite
    p = pred.clamp(MIN_DEPTH, max_depth)

    def masked_mean(x):
        return (x * valid).sum(dims) / n

    ratio = torch.maximum(g / p, p / g)
    out["abs_rel"] = masked_mean((g - p).abs() / g)
    out["sq_rel"] = masked_mean((g - p) ** 2 / g)
    out["rmse_log"] = masked_mean((g.log() - p.log()) ** 2).sqrt()
    out["log10"] = masked_mean((g.log10() - p.log10()).abs())
    for i in (1, 2, 3):
        out[f"delta{i}"] = masked_mean((ratio < 1.25**i).float())
    return out


def collate_with_native(batch):
    """Stack the 224 × 224 tensors; keep native-resolution depths as a list (sizes may differ)."""
    rgb, depth, native = zip(*batch)
    return torch.stack(rgb), torch.stack(depth), list(native)


@torch.no_grad()
def evaluate(model, dataset, device, amp_dtype=None, num_workers=0, per_image=False, max_depth=MAX_DEPTH):
    """Both protocols on `dataset` (a DepthEstimationUnreal with native=True).

    Returns the metrics dict (METRIC_KEYS), plus a list of per-image metric dicts when per_image.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=CHALLENGE_BATCH, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_with_native, pin_memory=device.type == "cuda")
    challenge_rmse, challenge_ssim, per_metric = [], [], {}
    for rgb, depth, natives in loader:
        rgb, depth = rgb.to(device, non_blocking=True), depth.to(device, non_blocking=True)
        pred = predict_batch(model, rgb, amp_dtype)
        challenge_pred, challenge_gt = challenge_pair(pred, depth, natives)
        challenge_rmse.append(rmse(challenge_pred, challenge_gt))
        challenge_ssim.append(ssim(challenge_pred, challenge_gt, data_range=1.0, padding="same"))
        for gt, p in group_by_size(natives, pred, device):
            resized = F.interpolate(p, size=gt.shape[-2:], mode="bilinear", align_corners=False)
            for k, v in compute_errors(gt, resized, max_depth).items():
                per_metric.setdefault(k, []).append(v)
    model.train(was_training)
    per_metric = {k: torch.cat(v).cpu() for k, v in per_metric.items()}
    metrics = {k: float(v.mean()) for k, v in per_metric.items()}
    metrics["challenge_rmse"] = float(torch.stack(challenge_rmse).mean())
    metrics["challenge_ssim"] = float(torch.stack(challenge_ssim).mean())
    metrics["n_images"] = len(dataset)
    if not per_image:
        return metrics
    rows = [{"name": name, **{k: float(v[i]) for k, v in per_metric.items()}} for i, name in enumerate(dataset.names)]
    return metrics, rows


def challenge_pair(pred, depth, natives):
    """(prediction, ground truth) at CHALLENGE_SIZE: as they are when the model runs at that size; else
    the ground truth preprocessed at that size from the native depth, and the prediction resized."""
    if depth.shape[-1] == CHALLENGE_SIZE:
        return pred, depth
    gt = torch.stack([resize_to_square(n, CHALLENGE_SIZE) for n in natives]).to(pred.device)
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
    """The predictors that see no image, fitted on a training split's preprocessed depth.

    constant mean: one value everywhere; per-row mean: each row's mean (depth mostly
    grows with height in the image); mean map: each pixel's mean over the split. With the
    split's decoded cache (dataset.SplitCache) its depth maps are used rather than decoding
    every file again; their float16 rounding moves the maps by well under a centimetre.
    """
    mean_map = mean_depth_map(train_set, cache)
    rows = mean_map.mean(dim=-1, keepdim=True).expand_as(mean_map)
    return {"constant mean": FixedMapModel(torch.full_like(mean_map, float(mean_map.mean()))),
            "per-row mean": FixedMapModel(rows),
            "mean map": FixedMapModel(mean_map)}


def mean_depth_map(train_set, cache=None, chunk=256):
    """The per-pixel mean (1, S, S) of the split's preprocessed depth, from the cache when there is one."""
    if cache is not None:
        total = sum(cache.depth[i:i + chunk].float().sum(0) for i in range(0, len(cache), chunk))
        return total.cpu() / len(cache)
    total = None
    for _, _, depth_path in train_set.pairs:
        d = torch.from_numpy(read_depth(depth_path)).clamp(0, train_set.max_depth)[None]
        d = resize_to_square(d, train_set.size)
        total = d if total is None else total + d
    return total / len(train_set)


def write_eval_report(model, dataset, rows, device, out_dir, run_dir, amp_dtype=None, grid_rows=6, cmap="magma"):
    """The reports of --eval, into out_dir: report_SPLIT_per_image.csv (`rows` of evaluate(..., per_image=True)),
    report_SPLIT_grid.png (`grid_rows` images spread evenly over the split, 0: none) and curves.png, the
    training curves of run_dir (the checkpoint's run) when it has logs."""
    split = dataset.split
    csv_path = os.path.join(out_dir, f"report_{split}_per_image.csv")
    write_per_image_csv(rows, csv_path)
    worst = sorted(rows, key=lambda r: r["rmse"], reverse=True)[:5]
    print(f"per-image metrics: {csv_path}; highest RMSE: "
          + ", ".join(f"{r['name']} ({r['rmse']:.2f} m)" for r in worst))
    if grid_rows > 0:
        indices = np.unique(np.linspace(0, len(rows) - 1, min(grid_rows, len(rows))).round().astype(int))
        predictions = predict_samples(model, dataset, indices, device, amp_dtype)
        samples = [(f"{name}\nRMSE {rows[i]['rmse']:.2f} m", rgb, gt, pred)
                   for i, (name, rgb, gt, pred) in zip(indices, predictions)]
        grid_path = os.path.join(out_dir, f"report_{split}_grid.png")
        plot_prediction_grid(samples, grid_path, dataset.max_depth, cmap)
        print(f"prediction grid: {grid_path}")
    curves_path = os.path.join(out_dir, "curves.png")
    if plot_training_curves(run_dir, curves_path):
        print(f"training curves: {curves_path}")
    else:
        print(f"no training curves: {run_dir} has no metrics.jsonl or train_log.jsonl")
