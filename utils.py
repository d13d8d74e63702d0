"""Small helpers: seeding and RNG state, atomic checkpoints, depth colourisation and figures."""
import json
import os
import pickle
import random
import tempfile
import zipfile

import matplotlib

matplotlib.use("Agg")  # files only, never a window: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
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

    A crash or a full disk mid-write leaves the previous file at `path` untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; the previous file is intact") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def write_json_atomic(obj, path):
    """json.dump to a temporary file, then rename: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_text_atomic(text, path):
    """Write a text file through a temporary file and a rename: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: a checkpoint can hold tensors and plain types, never code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; pass --ckpt with a file written by training (e.g. runs/NAME/best.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refused to load {path}: it holds objects other than tensors and plain types ({first}); only load checkpoints you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}); use another checkpoint, e.g. best.pt or last.pt") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return ckpt


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
