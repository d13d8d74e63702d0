"""Figures and depth pictures: colourised depth, training visualisations, the prediction grid, training curves."""
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, never a window: works on servers and in CI
import numpy as np  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from utils import atomic_path  # noqa: E402

# Where the ground truth has no measurement: a mid grey, which no depth colour map here uses for a depth.
HOLE_COLOUR = (0.55, 0.55, 0.55)


def with_holes(depth, min_depth):
    """`depth` as a masked array whose unmeasured pixels (≤ min_depth) draw in HOLE_COLOUR; None: no mask."""
    return depth if min_depth is None else np.ma.masked_where(np.asarray(depth) <= min_depth, depth)


def hole_cmap(cmap):
    """The colour map `cmap`, drawing masked (unmeasured) pixels in HOLE_COLOUR."""
    return matplotlib.colormaps[cmap].with_extremes(bad=HOLE_COLOUR)


def colorize_depth(depth, vmin, vmax, cmap="magma", rows=256):
    """HW depth → HWC uint8 colour image, [vmin, vmax] spanning the colour map.

    Through the map's table of colours as uint8 (colour_table), `rows` rows at a time: the same
    colours as calling the colour map on the whole picture, whose float64 RGBA copy of a 48 MP
    photo alone would take 1.5 GB. NaN, which the colour map draws as its "bad" colour, is black.
    """
    depth = np.asarray(depth)
    table, levels = colour_table(cmap)
    out = np.empty(depth.shape + (3,), np.uint8)
    span = np.float32(max(vmax - vmin, 1e-6))
    for start in range(0, depth.shape[0], rows):
        part = depth[start:start + rows].astype(np.float32, copy=False)
        # As Colormap.__call__ indexes: floor(norm · N), norm = 1 taking the last colour.
        norm = np.minimum(np.clip((part - np.float32(vmin)) / span, 0, 1) * np.float32(levels), levels - 1)
        index = np.where(np.isnan(norm), levels, norm).astype(np.intp)
        out[start:start + rows] = table[index]
    return out


def colour_table(cmap):
    """((N + 1, 3) uint8 colours of the colour map's N levels, then black for NaN; N)."""
    colour_map = matplotlib.colormaps[cmap]
    levels = colour_map.N
    table = (colour_map(np.arange(levels))[:, :3] * 255).round().astype(np.uint8)
    return np.concatenate([table, np.zeros((1, 3), np.uint8)]), levels


def pyplot():
    """matplotlib.pyplot, imported by the figures that need it: colorize_depth, all that --predict draws, needs
    only a colour map, and pyplot would add about a quarter of a second to every --predict."""
    import matplotlib.pyplot

    return matplotlib.pyplot


def to_numpy_image(t):
    """(3, H, W) or (1, H, W) tensor → HWC or HW numpy array."""
    t = t.detach().float().cpu()
    return t.permute(1, 2, 0).numpy() if t.shape[0] == 3 else t[0].numpy()


def visualize_img(rgb, gt, pred, path, title=None, cmap="magma", min_depth=None):
    """Save RGB | ground truth | prediction, both depths on one colour scale with a colour bar; with
    min_depth, the ground truth's unmeasured pixels in HOLE_COLOUR."""
    rgb, gt, pred = to_numpy_image(rgb), to_numpy_image(gt), to_numpy_image(pred)
    vmax = float(max(gt.max(), pred.max(), 1e-3))
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 4.2), constrained_layout=True)
    axes[0].imshow(np.clip(rgb, 0, 1))
    axes[0].set_title("RGB")
    axes[1].imshow(with_holes(gt, min_depth), cmap=hole_cmap(cmap), vmin=0, vmax=vmax)
    axes[1].set_title("ground truth")
    im = axes[2].imshow(pred, cmap=cmap, vmin=0, vmax=vmax)
    axes[2].set_title("prediction")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1:], shrink=0.8, label="depth (m)")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path):
    """Write a figure atomically (temporary file, then rename) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        pyplot().close(fig)


def plot_prediction_grid(samples, path, max_depth, cmap="magma", min_depth=None, error_cmap="viridis"):
    """One row per (title, rgb HWC, gt HW, pred HW): RGB | ground truth | prediction | |error|.

    Depths share one fixed scale [0, max_depth] so rows compare; errors share one scale too.
    With min_depth, unmeasured ground truth and its error show in HOLE_COLOUR.
    """
    if not samples:
        raise ValueError("plot_prediction_grid needs at least one sample")
    height, width = samples[0][2].shape
    panel_w = float(np.clip(width / 110, 2.0, 3.0))  # at 100 dpi a 256-pixel-wide image shows at about its own size
    panel_h = panel_w * height / width
    errors = [with_holes(np.abs(pred - gt), None) if min_depth is None
              else np.ma.masked_where(gt <= min_depth, np.abs(pred - gt)) for _, _, gt, pred in samples]
    err_max = float(max(max(float(e.max()) if e.count() else 0.0 for e in map(np.ma.asarray, errors)), 1e-3))
    n = len(samples)
    fig = pyplot().figure(figsize=(4 * panel_w + 0.5, n * (panel_h + 0.25) + 1.0), constrained_layout=True)
    # The colour bars get a row of their own, so every image row keeps the same layout.
    grid = fig.add_gridspec(n + 1, 4, height_ratios=[panel_h] * n + [0.12])
    for row, ((title, rgb, gt, pred), err) in enumerate(zip(samples, errors)):
        panels = [(rgb, {}), (with_holes(gt, min_depth), {"cmap": hole_cmap(cmap), "vmin": 0, "vmax": max_depth}),
                  (pred, {"cmap": cmap, "vmin": 0, "vmax": max_depth}),
                  (err, {"cmap": hole_cmap(error_cmap), "vmin": 0, "vmax": err_max})]
        for col, (image, style) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            shown = ax.imshow(image, **style)
            ax.set_xticks([])  # frameless, but unlike axis("off") this keeps the row label
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if row == 0:
                ax.set_title(("RGB", "ground truth", "prediction", "absolute error")[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
            if col == 2:
                depth_im = shown
        err_im = shown
    fig.colorbar(depth_im, cax=fig.add_subplot(grid[n, 1:3]), orientation="horizontal", label="depth (m)")
    fig.colorbar(err_im, cax=fig.add_subplot(grid[n, 3]), orientation="horizontal", label="error (m)")
    save_figure(fig, path)


def read_jsonl(path):
    """The JSON objects of a .jsonl file, one per line; [] if it does not exist.

    A line that does not parse is skipped: a run killed mid-write leaves a partial last line.
    """
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def last_per_step(records):
    """Records sorted by step, keeping the last one of each step.

    A resumed run logs again the steps after its checkpoint: the later record is the one that counts.
    """
    return sorted({r["step"]: r for r in records if "step" in r}.values(), key=lambda r: r["step"])


def plot_training_curves(run_dir, path):
    """loss, RMSE, SSIM and lr against step (bottom axis) and epoch (top axis) from a run's logs.

    Reads RUN/train_log.jsonl (training batches at log steps) and RUN/metrics.jsonl (one
    record per evaluation). Returns False, writing nothing, when the run has neither.
    """
    train = last_per_step(read_jsonl(os.path.join(run_dir, "train_log.jsonl")))
    val = last_per_step(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
    if not train and not val:
        return False

    def series(records, key):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [
        ("loss (α·RMSE + β·(1 − SSIM))", [(train, "loss", "train batch")]),
        ("RMSE (m)", [(train, "rmse", "train batch"), (val, "challenge_rmse", "val, challenge protocol"),
                      (val, "rmse", "val, standard protocol")]),
        ("SSIM", [(train, "ssim", "train batch"), (val, "challenge_ssim", "val, challenge protocol"),
                  (val, "ssim", "val, standard protocol")]),
        # The lr between evaluations is not a straight line: take it from the training log when there is one.
        ("learning rate", [(train, "lr", "train")] if train else [(val, "lr", "at evaluation")]),
    ]
    to_epoch, to_step = step_epoch_maps(train + val)
    fig, axes = pyplot().subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (label, lines) in zip(axes.flat, panels):
        for records, key, name in lines:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if records is val else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if label.startswith(("loss", "RMSE")):
            ax.set_yscale("log")  # early, unclamped predictions can be off by orders of magnitude
            ax.yaxis.set_major_formatter(LogFormatter())  # plain 5, 6, 7 and 10, 100 rather than 5×10⁰
            ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        if to_epoch:
            ax.secondary_xaxis("top", functions=(to_epoch, to_step)).set_xlabel("epoch")
    # An offset label ("1e-3" above the axis) would collide with the epoch axis.
    axes[1, 1].ticklabel_format(axis="y", style="plain", useOffset=False)
    fig.suptitle(f"training curves of {os.path.basename(os.path.normpath(run_dir))}")
    save_figure(fig, path)
    return True


def step_epoch_maps(records):
    """(step → epoch, epoch → step) interpolating the records' (step, epoch) pairs; (None, None) with fewer than two."""
    pairs = sorted({r["step"]: float(r["epoch"]) for r in records if "epoch" in r}.items())
    pairs = [(0, 0.0)] + [p for p in pairs if p[0] > 0]
    if len(pairs) < 2:
        return None, None
    steps = np.array([p[0] for p in pairs], dtype=np.float64)
    epochs = np.maximum.accumulate(np.array([p[1] for p in pairs], dtype=np.float64))
    return (lambda s: np.interp(s, steps, epochs)), (lambda e: np.interp(e, epochs, steps))


def plot_ablation(results, path, reference, combined):
    """Bars of val RMSE (lower is better) and SSIM (higher is better) per variant of {name: metrics};
    the `reference` variant in grey, the `combined` one in orange."""
    names = list(results)
    colours = ["tab:gray" if n == reference else "tab:orange" if n == combined else "tab:blue" for n in names]
    fig, axes = pyplot().subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 3), 4.2), constrained_layout=True)
    for ax, key, title in ((axes[0], "rmse", "val RMSE (m), lower is better"),
                           (axes[1], "ssim", "val SSIM, higher is better")):
        values = [results[n][key] for n in names]
        bars = ax.bar(range(len(names)), values, color=colours)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_title(title)
    save_figure(fig, path)
