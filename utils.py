"""Small helpers: errors for the user, seeding and RNG state, atomic files and checkpoints."""
import contextlib
import json
import os
import pickle
import random
import tempfile
import warnings

import numpy as np
import torch


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


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, fsync, then rename over it; raises OSError.

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
        if not isinstance(err, OSError) and isinstance(err.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None  # torch.save's zip writer, closing, turns Ctrl-C into a RuntimeError
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(obj, path):
    """atomic_save, with a one-line CheckpointError when the file cannot be written."""
    try:
        atomic_save(obj, path)
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; "
                              "the previous file is intact") from None


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
        raise CheckpointError(f"checkpoint {path} not found; give a file written by training (e.g. runs/NAME/last.pt "
                              "or best.pt)")
    ckpt = torch_load_safely(path, map_location, mmap)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return ckpt


def load_resumable(path):
    """A checkpoint with everything a resumed run needs, or a CheckpointError saying what is missing."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("optimizer", "scheduler", "epoch", "step", "init_depth", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} holds no training state ({', '.join(missing)} missing): "
                              "--resume needs a last.pt or best.pt written by training")
    return ckpt


def torch_load_safely(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True) whose failures are one-line CheckpointErrors naming `path`."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to our error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is truncated or corrupt (UnpicklingError: {first_line(err)}); use another "
                                  "file") from None
        raise CheckpointError(f"refused to load {path}: it holds something other than tensors and plain types "
                              f"({unpickler_reason(err)}); loading it could run code, so only load files you "
                              "trust") from None
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
