"""Small helpers: seeding and RNG state, atomic checkpoints, depth colourisation and figures."""
import json
import os
import pickle
import random
import tempfile
import warnings

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
    write_text_atomic(json.dumps(obj, indent=2), path)


def write_text_atomic(text, path):
    """Write a text file through a temporary file and a rename: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
