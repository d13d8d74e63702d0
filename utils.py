"""Small helpers: errors for the user and how an entry point reports them, seeding and RNG state, atomic files.

NumPy and torch are imported inside the functions that use them: the entry points import this
module before they parse options, and `--help` should not wait for torch.
"""
import contextlib
import json
import os
import random
import signal
import sys
import tempfile


class UserError(Exception):
    """A mistake the user can fix (bad data, option or file): main.py prints it as one line."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used, with a message saying why."""


def user_error_message(err):
    """The one line to print for an error the user can fix; None for a bug, whose traceback should show."""
    if isinstance(err, UserError):
        text = str(err).strip()
        if "Original Traceback" in text:  # raised in a DataLoader worker: torch prepends that traceback
            text = text.splitlines()[-1].split(": ", 1)[-1]  # "dataset.DataError: <our message>"
        return text
    if isinstance(err, OSError) and err.filename is not None:  # full disk, permissions, a vanished file
        return f"{err.filename}: {err.strerror}"
    return None


def print_user_error(err):
    """For an error the user can fix: print its one `error:` line and return the exit status 1; a bug is raised.

    The entry points (main.py, app.py, bench.py, ablate.py) end this way."""
    message = user_error_message(err)
    if message is None:
        raise err
    print(f"error: {message}", file=sys.stderr)
    return 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with the signal's number, so that the program exits as that signal's would (130, 143)."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signum)
        self.signum = int(signum)


def raise_interrupt(signum, frame):
    """A signal handler that makes SIGTERM stop a program as Ctrl-C does (with its own exit status)."""
    raise Interrupted(signum)


class StopRequest:
    """While installed (`with`), SIGINT and SIGTERM ask a loop to stop at its next safe point instead of at once.

    The first signal records its name in `signal` and prints `announce` (None: nothing); a second
    one interrupts at once (KeyboardInterrupt), unless `protected` is set (a checkpoint is being
    written): the loop then stops as soon as that is complete. Forked DataLoader workers, which
    Ctrl-C reaches too (it goes to the whole process group), ignore both.
    """

    def __init__(self, announce=None):
        self.signal, self.protected, self.announce = None, False, announce

    def __enter__(self):
        self._pid = os.getpid()
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return
        if self.signal is not None:
            if self.protected:
                print(f"{signal.Signals(signum).name} received: still writing a checkpoint; stopping once it is "
                      "complete", flush=True)
                return
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.signal} received: {self.announce}", flush=True)


def stop_status(interrupt):
    """The exit status of a program stopped by `interrupt` (a KeyboardInterrupt, an Interrupted, or a signal
    name such as the Trainer's stop_signal): 128 + the signal's number, as a shell reports a killed process."""
    if isinstance(interrupt, str):
        return 128 + signal.Signals[interrupt].value
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def run_as_program(work, stopped):
    """Run work() as an entry point's whole program and return its exit status (work's own, else 0).

    SIGTERM stops it as Ctrl-C does; a mistake the user can fix ends in one `error:` line and status 1
    (a bug keeps its traceback); a stop ends in one line saying `stopped` and status 130 or 143.
    """
    previous_sigterm = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return work() or 0
    except Exception as err:
        return print_user_error(err)
    except KeyboardInterrupt as stop:
        print(f"error: interrupted; {stopped}", file=sys.stderr)
        return stop_status(stop)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def make_output_folder(path, option="--out"):
    """os.makedirs, or a one-line UserError naming the option that chose the folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {path}: {err.strerror}; choose another {option}") from None


def write_probe(folder):
    """Write and remove a small file in `folder`, which must exist: OSError if it cannot be written to (a
    permission or mode bit alone does not tell, for root, on read-only mounts or full disks)."""
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
        f.write("ok")
    os.remove(probe)


def output_paths(input_path, out_dir, suffixes):
    """{kind: path in out_dir} of the files written for one input: its stem plus each kind's suffix."""
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(input_path))[0])
    return {kind: stem + suffix for kind, suffix in suffixes.items()}


def seed_everything(seed, deterministic=False):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state():
    """Every RNG the training loop touches, as types that load with weights_only=True."""
    import numpy as np
    import torch

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
    import numpy as np
    import torch

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
    import torch

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




def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask




def write_json_atomic(obj, path):
    """json.dump to a temporary file, then rename: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)








def first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else "no message"




@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to: renamed over `path` on success, removed on failure.

    The temporary name keeps the extension, so writers that choose the format from it
    (savefig, PIL, np.save) still do.
    """
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: give the path of a file to write")
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
