"""Faults during training: signals, kills, full disks and non-finite losses never cost the run.

Real training subprocesses are stopped by SIGINT (sent to the process group, as a terminal
does), SIGTERM and SIGKILL at different moments; the run directory must always hold a loadable
last.pt that --resume continues from. In deterministic CPU mode a resumed run must end bit for
bit where an uninterrupted one does. A second Ctrl-C, full disks, writers killed mid-save and
non-finite losses are checked in this process.
"""
import contextlib
import errno
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main
import train
from checkpoint import load_checkpoint, save_checkpoint
from conftest import REPO, LossWithNaNs
from train import Trainer
from utils import CheckpointError

N_TRAIN, BATCH = 8, 2  # 4 steps per epoch
STEPS_PER_EPOCH = N_TRAIN // BATCH
TOTAL = 6  # T: the straight run's length; it crosses the epoch boundary at step 4
STOP_AT = 3  # N: where the --max-steps run stops, mid-epoch
# Subprocesses and this process must use one thread each: CPU kernels may split work (and
# so round) differently with another thread count, and 2 cores are shared by the suite.
ENV = dict(os.environ, OMP_NUM_THREADS="1")
WAIT_S = 240


def write_dataset(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", 2)):
        os.makedirs(os.path.join(root, "rgb", split))
        os.makedirs(os.path.join(root, "depth", split))
        for i in range(n):
            depth = rng.uniform(1.0, 30.0, (48, 64)).astype(np.float32)
            rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(os.path.join(root, "rgb", split, f"{i}.jpeg"))
            np.save(os.path.join(root, "depth", split, f"{i}.npy"), depth)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("faults_data") / "data"))


def training_args(data, run_dir, *extra):
    """One configuration for every run here; the CyclicLR turns within it so the lr changes each step."""
    return [str(a) for a in (
        "--data-dir", data, "--run-dir", run_dir, "--weights", "none", "--device", "cpu", "--workers", "0",
        "--batch-size", BATCH, "--image-size", "64", "--encoder", "resnet18", "--amp", "off", "--deterministic",
        "--seed", "3",
        "--step-size-up", "2", "--step-size-down", "3", "--eval-every", "0", "--vis-every", "0", "--quiet", *extra)]


@contextlib.contextmanager
def like_the_subprocesses():
    """In-process training on one thread; the global switches that --deterministic sets are put back after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(autouse=True)
def one_thread_deterministic():
    """Every in-process run here trains as the subprocesses do, and leaves torch's switches as it found them."""
    with like_the_subprocesses():
        yield


def train_here(args):
    trainer = Trainer(main.parse_options([str(a) for a in args]))
    trainer.fit()
    return trainer


def assert_same_training_state(a, b):
    """Weights, optimiser, schedule, position and RNG state of two checkpoints are identical."""
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"])
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert_equal_nested(a["optimizer"], b["optimizer"])
    assert a["scheduler"] == b["scheduler"]
    assert_equal_nested(a["rng"], b["rng"])


def assert_equal_nested(x, y, where="state"):
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_equal_nested(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_equal_nested(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def straight(data, tmp_path_factory, *extra):
    """The reference: TOTAL steps without interruption, in this process."""
    run_dir = tmp_path_factory.mktemp("straight")
    with like_the_subprocesses():
        train_here(training_args(data, run_dir, "--max-steps", TOTAL, *extra))
    return load_checkpoint(str(run_dir / "last.pt"))


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """TOTAL steps from the decoded cache (the default)."""
    return straight(data, tmp_path_factory)


@pytest.fixture(scope="module")
def straight_run_cache_off(data, tmp_path_factory):
    """TOTAL steps from the folder loader (--cache off), which decodes every file every epoch."""
    return straight(data, tmp_path_factory, "--cache", "off")


# ------------------------------------------------------------------ training subprocesses
def start_training(args, new_group=False):
    """main.py in a subprocess; new_group puts it and its DataLoader workers in a process group of their own."""
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=ENV, text=True,
                            start_new_session=new_group,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(proc, run_dir, step):
    """Block until the run has saved its visualisation of `step` (written right after that step)."""
    png = os.path.join(run_dir, "vis", f"train_step{step:06d}.png")
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(png):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before step {step}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} after {WAIT_S} s")
        time.sleep(0.02)


def finish(proc):
    out, err = proc.communicate(timeout=WAIT_S)
    assert "Traceback" not in err, err
    return proc.returncode, out, err


def checkpoint_temps(run_dir):
    return glob.glob(os.path.join(run_dir, ".*.tmp"))


@pytest.fixture(scope="module")
def sigint_run(data, tmp_path_factory):
    """A run stopped by Ctrl-C in its first epoch, before any checkpoint existed.

    As a terminal does, the SIGINT goes to the whole process group: the two DataLoader workers of
    the folder loader (--cache off; the cache needs none) get it too, and must leave it to training.
    """
    run_dir = str(tmp_path_factory.mktemp("sigint"))
    proc = start_training(training_args(data, run_dir, "--max-steps", "1000", "--vis-every", "1", "--workers", "2",
                                        "--cache", "off"), new_group=True)
    wait_for_step(proc, run_dir, 2)
    assert not os.path.exists(os.path.join(run_dir, "last.pt"))
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc)
    return run_dir, code, out, err


@pytest.mark.slow
def test_sigint_writes_a_resumable_checkpoint_and_says_how_to_resume(sigint_run):
    run_dir, code, out, err = sigint_run
    assert code == 128 + signal.SIGINT, err  # a clean stop, but not a finished run
    ckpt = load_checkpoint(os.path.join(run_dir, "last.pt"))
    # The step under way when the signal came is finished, then training stops mid-epoch.
    assert 2 <= ckpt["step"] < STEPS_PER_EPOCH and ckpt["batch_in_epoch"] == ckpt["step"] and ckpt["epoch"] == 0
    assert f"stopped by SIGINT at step {ckpt['step']}" in out
    assert out.count("SIGINT received") == 1  # said by the main process only, not by each worker
    assert f"python main.py --resume {os.path.join(run_dir, 'last.pt')}" in out
    assert ckpt["config"]["batch_size"] == BATCH and ckpt["config"]["max_steps"] == 1000
    assert checkpoint_temps(run_dir) == []


def test_resume_from_sigint_checkpoint_matches_an_uninterrupted_run(sigint_run, straight_run_cache_off, tmp_path):
    """Training with --cache off, stopped, then resumed: bit for bit where an uninterrupted --cache off run ends."""
    run_dir = sigint_run[0]
    interrupted = load_checkpoint(os.path.join(run_dir, "last.pt"))
    assert interrupted["step"] < TOTAL
    # Only the resume path and the stop are typed: every other option comes from the checkpoint.
    trainer = train_here(["--resume", os.path.join(run_dir, "last.pt"), "--max-steps", TOTAL,
                          "--run-dir", tmp_path, "--vis-every", "0", "--workers", "0"])
    assert trainer.opts.batch_size == BATCH and trainer.opts.image_size == 64 and trainer.opts.deterministic
    assert trainer.opts.cache == "off" and trainer.cache is None
    assert_same_training_state(load_checkpoint(str(tmp_path / "last.pt")), straight_run_cache_off)


def test_stop_with_max_steps_then_resume_is_bit_exact(data, straight_run, tmp_path):
    train_here(training_args(data, tmp_path, "--max-steps", STOP_AT))
    stopped = load_checkpoint(str(tmp_path / "last.pt"))
    assert stopped["step"] == STOP_AT and stopped["batch_in_epoch"] == STOP_AT
    train_here(["--resume", str(tmp_path / "last.pt"), "--max-steps", TOTAL, "--workers", "0"])
    resumed = load_checkpoint(str(tmp_path / "last.pt"))
    assert (resumed["step"], resumed["epoch"]) == (TOTAL, 1)
    assert_same_training_state(resumed, straight_run)


@pytest.mark.slow
def test_sigterm_and_sigkill_at_other_moments_leave_a_checkpoint_that_resumes(sigint_run, tmp_path):
    """From the SIGINT checkpoint: SIGTERM in epoch 2, then SIGKILL just after the end-of-epoch save."""
    run_dir = str(tmp_path / "run")
    last = os.path.join(run_dir, "last.pt")

    # SIGTERM (what `kill` and job schedulers send), in the second epoch: a clean, resumable stop.
    proc = start_training(["--resume", os.path.join(sigint_run[0], "last.pt"), "--run-dir", run_dir, "--vis-every", "1",
                           "--workers", "0"])
    wait_for_step(proc, run_dir, STEPS_PER_EPOCH + 1)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, err
    assert load_checkpoint(last)["step"] > STEPS_PER_EPOCH

    # SIGKILL cannot be caught: the last completed save, at the end of epoch 2, must load and resume.
    proc = start_training(["--resume", last, "--vis-every", "1", "--workers", "0"])
    wait_for_step(proc, run_dir, 2 * STEPS_PER_EPOCH + 1)
    proc.kill()
    proc.communicate(timeout=WAIT_S)
    ckpt = load_checkpoint(last)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (2 * STEPS_PER_EPOCH, 2, 0)
    train_here(["--resume", last, "--max-steps", 2 * STEPS_PER_EPOCH + 1, "--vis-every", "0", "--workers", "0"])
    assert load_checkpoint(last)["step"] == 2 * STEPS_PER_EPOCH + 1
    assert checkpoint_temps(run_dir) == []


class SignalAfterStep:
    """Sends this process SIGINT `times` times right after optimiser step `after_step`."""

    def __init__(self, trainer, after_step, times):
        self.trainer, self.after_step, self.times = trainer, after_step, times
        self.update = trainer._forward_backward_update
        trainer._forward_backward_update = self.step

    def step(self, rgb, depth):
        result = self.update(rgb, depth)
        if self.trainer.step + 1 == self.after_step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)  # handled before the next line runs, after this step
        return result


@pytest.mark.parametrize("while_saving", [True, False])
def test_second_ctrl_c(data, tmp_path, capsys, monkeypatch, while_saving):
    """Again while last.pt is written: the file is finished first. Again before that: stop at once, write nothing."""
    trainer = Trainer(main.parse_options(training_args(data, tmp_path, "--max-steps", "100")))
    SignalAfterStep(trainer, after_step=2, times=1 if while_saving else 2)
    # Not always Python's default_int_handler: a shell starting pytest in the background makes it SIG_IGN.
    handler_before = signal.getsignal(signal.SIGINT)
    if while_saving:
        real_save = torch.save

        def save_while_signalled(obj, f, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, inside the checkpoint writer
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save_while_signalled)
        trainer.fit()
        assert "still writing a checkpoint; stopping once it is complete" in capsys.readouterr().out
        assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 2
    else:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        assert not os.path.exists(tmp_path / "last.pt")
    assert checkpoint_temps(str(tmp_path)) == []
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handlers are put back


# ------------------------------------------------------------------ writing checkpoints
WRITER_KILLED_MID_SAVE = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    from checkpoint import save_checkpoint

    def slow_save(obj, f):
        f.write(b"PK" + bytes(1 << 20))  # the first part of a new checkpoint
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

    torch.save = slow_save
    save_checkpoint({{"model": {{"w": torch.ones(3)}}}}, {path!r})
""")


def test_writer_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 7}, path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER_KILLED_MID_SAVE.format(repo=REPO, path=path)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    proc.kill()
    proc.communicate(timeout=WAIT_S)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and torch.equal(ckpt["model"]["w"], torch.zeros(3))
    leftovers = checkpoint_temps(str(tmp_path))
    assert len(leftovers) == 1 and os.path.getsize(leftovers[0]) > 1 << 20  # the killed writer's
    train.remove_checkpoint_temps(str(tmp_path))  # as a Trainer does when it opens the run directory
    assert checkpoint_temps(str(tmp_path)) == [] and os.path.exists(path)


def write_then_fail(errnum):
    def fake_save(obj, f):
        f.write(b"PK" + bytes(1000))
        raise OSError(errnum, os.strerror(errnum))
    return fake_save


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 7}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", write_then_fail(errno.ENOSPC))
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {path}: No space left on device; "
                                              "the previous file is intact"):
        save_checkpoint({"model": {"w": torch.ones(3)}, "step": 8}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def test_full_disk_during_training_is_one_error_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", write_then_fail(errno.ENOSPC))
    code = main.main(training_args(data, tmp_path, "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == (f"error: could not write checkpoint {tmp_path / 'last.pt'}: "
                           "No space left on device; the previous file is intact")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "train_log.jsonl", "vis"]  # the log of step 1 stays


def test_full_disk_while_saving_a_figure_is_one_error_line(data, tmp_path, monkeypatch, capsys):
    def no_space(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fname)

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", no_space)
    code = main.main(training_args(data, tmp_path, "--max-steps", "1", "--vis-every", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: ") and "No space left on device" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path / "vis") == []  # the half-written figure is removed


# ------------------------------------------------------------------ non-finite losses
def test_non_finite_losses_are_skipped_then_stop_the_run(data, tmp_path, monkeypatch, capsys):
    # Batch 2 is bad (its update skipped); epoch 1 ends and is saved after 4 steps, 3 of them applied;
    # batches 6, 7, 8 are bad.
    LossWithNaNs.calls, LossWithNaNs.bad_calls = 0, {2, 6, 7, 8}
    monkeypatch.setattr(train, "DepthLoss", LossWithNaNs)
    with pytest.warns(UserWarning, match="non-finite loss") as warned:
        code = main.main(training_args(data, tmp_path, "--max-steps", "100", "--max-bad-steps", "3"))
    assert [str(w.message).split(": ", 1)[1] for w in warned if "non-finite" in str(w.message)] == [
        "step skipped (1 in a row)", "step skipped (1 in a row)", "step skipped (2 in a row)",
        "step skipped (3 in a row)"]
    err = capsys.readouterr().err.strip()
    last = tmp_path / "last.pt"
    assert code == 1
    assert err == ("error: 3 non-finite losses in a row at step 8: training stopped; the last good checkpoint is "
                   f"{last}. "
                   "Try a lower --lr or --max-lr, or --amp off")
    ckpt = load_checkpoint(str(last))
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (4, 1, 0)
    # Skipped batches took no optimiser step: Adam counted exactly the good ones.
    assert all(int(s["step"]) == 3 for s in ckpt["optimizer"]["state"].values())
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
