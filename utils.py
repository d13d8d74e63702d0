"""Small helpers: seeding and RNG state, atomic files and checkpoints, depth colourisation and figures."""
import contextlib
import json
import os
import pickle
import random
import tempfile
import warnings

import matplotlib

matplotlib.use("Agg")  # files only, never a window: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


class UserError(Exception):
    """A mistake the user can fix (bad data, option or file): main.py prints it as one line."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used, with a message saying why."""


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state():
    """Every RNG the training loop touches, as types that load with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj, path):
    """torch.save to a temporary file beside `path`, fsync, then rename over it.

    A crash, a kill or a full disk mid-write leaves the previous file at `path` untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; the previous file is intact") from None
        if isinstance(err.__context__, KeyboardInterrupt):  # torch.save's zip writer, closing, turns Ctrl-C into a RuntimeError
            raise KeyboardInterrupt from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_checkpoint_temps(directory):
    """Delete the temporary files (.NAME.pt.XXXX.tmp) of writers killed mid-save: each is a checkpoint's size."""
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(".tmp") and ".pt." in name:
            os.remove(os.path.join(directory, name))


def write_json_atomic(obj, path):
    """json.dump to a temporary file, then rename: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def load_checkpoint(path, map_location="cpu", mmap=False):
    """torch.load with weights_only=True: a checkpoint can hold tensors and plain types, never code.

    mmap=True maps the tensors instead of reading them: cheap when only the config is needed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; give a file written by training (e.g. runs/NAME/last.pt or best.pt)")
    ckpt = torch_load_safely(path, map_location, mmap)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return ckpt


def torch_load_safely(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True) whose failures are one-line CheckpointErrors naming `path`."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to our error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is truncated or corrupt (UnpicklingError: {first_line(err)}); use another file") from None
        raise CheckpointError(f"refused to load {path}: it holds something other than tensors and plain types "
                              f"({unpickler_reason(err)}); loading it could run code, so only load files you trust") from None
    except Exception as err:  # a damaged file can fail in many ways (RuntimeError, EOFError, KeyError, ...)
        if mmap and "mmap" in str(err):  # not a zip-format file: read it whole, which also vets it
            return torch_load_safely(path, map_location, mmap=False)
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {first_line(err)}); "
                              "use another file (a run keeps both last.pt and best.pt)") from None


def first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else "no message"


def unpickler_reason(err):
    """The line of torch's long weights_only message that says what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.rstrip(".")
    return "see torch.load's weights_only documentation"


def colorize_depth(depth, vmin=0.0, vmax=20.0, cmap="magma"):
    """HW depth → HWC uint8 colour image."""
    depth = np.asarray(depth, dtype=np.float32)
    norm = np.clip((depth - vmin) / max(vmax - vmin, 1e-6), 0, 1)
    return (matplotlib.colormaps[cmap](norm)[..., :3] * 255).round().astype(np.uint8)


def to_numpy_image(t):
    """(3, H, W) or (1, H, W) tensor → HWC or HW numpy array."""
    t = t.detach().float().cpu()
    return t.permute(1, 2, 0).numpy() if t.shape[0] == 3 else t[0].numpy()


def visualize_img(rgb, gt, pred, path, title=None, cmap="magma"):
    """Save RGB | ground truth | prediction, both depths on one colour scale with a colour bar."""
    rgb, gt, pred = to_numpy_image(rgb), to_numpy_image(gt), to_numpy_image(pred)
    vmax = float(max(gt.max(), pred.max(), 1e-3))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), constrained_layout=True)
    axes[0].imshow(np.clip(rgb, 0, 1))
    axes[0].set_title("RGB")
    axes[1].imshow(gt, cmap=cmap, vmin=0, vmax=vmax)
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
        plt.close(fig)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to: renamed over `path` on success, removed on failure.

    The temporary name keeps the extension, so writers that choose the format from it
    (savefig, PIL, np.save) still do.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plot_prediction_grid(samples, path, max_depth=20.0, cmap="magma", error_cmap="viridis"):
    """One row per (title, rgb HWC, gt HW, pred HW): RGB | ground truth | prediction | |error|.

    Depths share one fixed scale [0, max_depth] so rows compare; errors share one scale too.
    """
    if not samples:
        raise ValueError("plot_prediction_grid needs at least one sample")
    height, width = samples[0][2].shape
    panel_w = float(np.clip(width / 110, 2.0, 3.0))  # at 100 dpi a 256-pixel-wide image shows at about its own size
    panel_h = panel_w * height / width
    errors = [np.abs(pred - gt) for _, _, gt, pred in samples]
    err_max = float(max(max(e.max() for e in errors), 1e-3))
    n = len(samples)
    fig = plt.figure(figsize=(4 * panel_w + 0.5, n * (panel_h + 0.25) + 1.0), constrained_layout=True)
    # The colour bars get a row of their own, so every image row keeps the same layout.
    grid = fig.add_gridspec(n + 1, 4, height_ratios=[panel_h] * n + [0.12])
    for row, ((title, rgb, gt, pred), err) in enumerate(zip(samples, errors)):
        panels = [(rgb, {}), (gt, {"cmap": cmap, "vmin": 0, "vmax": max_depth}),
                  (pred, {"cmap": cmap, "vmin": 0, "vmax": max_depth}), (err, {"cmap": error_cmap, "vmin": 0, "vmax": err_max})]
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
    """Records sorted by step, keeping the last one of each step: a resumed run repeats the steps after its checkpoint."""
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
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
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
    axes[1, 1].ticklabel_format(axis="y", style="plain", useOffset=False)  # an offset label would collide with the epoch axis
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
