"""Several processes (DDP, gloo on CPU) take the same optimiser steps as one process with the same global batch.

In float32 the comparison cannot be tight: at initialisation this network is chaotic. A
1e-6 relative change of the input alone moves early-layer gradients by 1-2 % (ReLUs switch),
and Adam's first step, lr·g/|g|, turns any sign change of a near-zero gradient into a full
step. Convolutions of 2 and of 4 images differ in their last bits, so an fp32 DDP run and an
fp32 single run drift apart by exactly that much. The exact check therefore runs the real
Trainer in float64 (network and loss: the loss follows its input's precision), where the
same arithmetic agrees to ~1e-10, and the torchrun test checks the launch and the files.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import train
from checkpoint import load_checkpoint
from conftest import synthetic_data
from distributed import close_distributed
from main import parse_options
from model import DepthNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


def double_depthnet(*args, **kwargs):
    return DepthNet(*args, **kwargs).double()


def run_trainer(rank, world_size, port, data_dir, run_dir, out):
    """STEPS float64 steps of the real Trainer at 64 × 64; rank 0 saves the weights and optimiser state."""
    if world_size > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train.DepthNet = double_depthnet  # put back below: this also runs in the test process
    opts = parse_options(["--data-dir", data_dir, "--run-dir", run_dir, "--weights", "none", "--device", "cpu",
                          "--amp", "off", "--batch-size", "4", "--image-size", "64", "--workers", "0",
                          "--eval-every", "0", "--vis-every", "0", "--quiet", "--encoder", "resnet18"])
    try:
        trainer = train.Trainer(opts)
        for _, (rgb, depth) in zip(range(STEPS), trainer.epoch_batches()):
            assert trainer.train_step(rgb.double(), depth.double()) is not None
        trainer.save_checkpoint("last.pt")
        if trainer.dist.is_main:
            torch.save({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}, out)
    finally:
        train.DepthNet = DepthNet
        torch.set_num_threads(threads)
        close_distributed()


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one_in_float64(tmp_path):
    # 7 images in global batches of 4: 2 + 2 images per process, then 2 + 1. The uneven
    # split checks that the loss and BatchNorm weigh images, not processes.
    data = synthetic_data(str(tmp_path / "data"), 7, 0)
    mp.start_processes(run_trainer, args=(2, 29561, data, str(tmp_path / "two"), str(tmp_path / "two.pt")),
                       nprocs=2, start_method="spawn")
    run_trainer(0, 1, 0, data, str(tmp_path / "one"), str(tmp_path / "one.pt"))
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    # Only the first process writes files.
    expected_files = ["config.json", "last.pt", "vis"]
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one")) == expected_files

    torch.manual_seed(0)
    start = DepthNet(weights=None, init_depth=9.0, encoder="resnet18").double().state_dict()
    moved = max(float((one["model"][k] - start[k]).abs().max()) for k in start if "weight" in k)
    assert moved > 1e-3  # two Adam steps at lr 1e-3
    # Weights (and BatchNorm statistics) to 2e-7, 1e-4 of one Adam step; the few elements
    # that differ at all are those whose gradient is near zero, where Adam divides by it.
    for k, v in one["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["model"][k], v, rtol=1e-6, atol=2e-7, msg=k)
        else:
            assert torch.equal(two["model"][k], v), k
    # Adam's first moments, smooth in the gradients: equal to 1e-5 of each tensor's norm.
    for s_one, s_two in zip(one["optimizer"]["state"].values(), two["optimizer"]["state"].values()):
        assert int(s_one["step"]) == int(s_two["step"]) == STEPS
        m_one, m_two = s_one["exp_avg"], s_two["exp_avg"]
        assert float((m_two - m_one).norm()) <= 1e-5 * float(m_one.norm()) + 1e-15


def torchrun(data, run_dir, *extra):
    """main.py under torchrun, 2 CPU processes (gloo), in a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
           "--data-dir", data, "--run-dir", str(run_dir), "--weights", "none", "--device", "cpu", "--amp", "off",
           "--batch-size", "4", "--image-size", "64", "--eval-every", "0", "--workers", "0", "--deterministic",
           "--quiet", "--encoder", "resnet18", *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def worker_pid(agent_pid, rank):
    """The pid of the worker process of `rank` that torchrun's agent started (Linux: read from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if parent == agent_pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {agent_pid})")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_torchrun_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_ends_where_a_straight_run_does(
        tmp_path):
    """Two processes write one run; SIGTERM to rank 1 alone stops both at the same step with one last.pt; the
    resumed run then ends bit for bit where an uninterrupted one does."""
    data = synthetic_data(str(tmp_path / "data"), 8, 0)  # global batch 4: two steps per epoch
    total = 6

    straight = torchrun(data, tmp_path / "straight", "--max-steps", total, "--log-every", "1", "--vis-every", "0")
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-4000:]
    assert out.count("DepthNet (") == 1 and "x 2 processes" in out  # one summary line, from rank 0
    names = os.listdir(tmp_path / "straight")
    assert {"config.json", "last.pt", "train_log.jsonl"} <= set(names) and not [n for n in names if ".tmp" in n]
    # One log line per step, written by rank 0 only; the loss is the global batch's.
    records = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert records[0]["loss"] == pytest.approx(records[0]["rmse"] + 1 - records[0]["ssim"], rel=1e-5)
    reference = load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    assert (reference["step"], reference["epoch"], reference["batch_in_epoch"]) == (total, 3, 0)
    assert all(int(s["step"]) == total for s in reference["optimizer"]["state"].values())

    run = tmp_path / "stopped"
    stopped = torchrun(data, run, "--max-steps", "1000", "--log-every", "1", "--vis-every", "1")
    deadline = time.monotonic() + 600
    while not (run / "vis" / "train_step000002.png").exists():  # rank 0 has finished step 2
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.communicate()[1][-4000:]
        time.sleep(0.05)
    os.kill(worker_pid(stopped.pid, rank=1), signal.SIGTERM)
    out, err = stopped.communicate(timeout=600)  # would hang if rank 0 went on alone
    last = load_checkpoint(str(run / "last.pt"))
    assert 2 <= last["step"] < total, out
    assert out.count(f"stopped by SIGTERM at step {last['step']}") == 1  # said by rank 0, which got no signal
    assert stopped.returncode != 0  # both processes exit as killed by SIGTERM (143), which torchrun reports
    assert not [n for n in os.listdir(run) if ".tmp" in n]

    resumed = torchrun(data, run, "--resume", str(run / "last.pt"), "--max-steps", total, "--vis-every", "0")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-4000:]
    ended = load_checkpoint(str(run / "last.pt"))
    assert (ended["step"], ended["epoch"], ended["batch_in_epoch"]) == (total, 3, 0)
    for name, value in reference["model"].items():
        assert torch.equal(ended["model"][name], value), name
    for a, b in zip(reference["optimizer"]["state"].values(), ended["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
