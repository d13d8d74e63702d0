"""train.py and the checkpoint helpers against SPEC §4 and §6: learning, schedule, checkpoints, resume."""
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_dataset

from dataset import DepthEstimationUnreal
from main import parse_options
from dataset import EpochSampler
from train import Trainer
from utils import CheckpointError, UserError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def make_trainer(data_dir, run_dir, *extra):
    """A CPU Trainer with random weights, no evaluation, pictures or progress bars unless asked."""
    opts = parse_options(["--data-dir", str(data_dir), "--run-dir", str(run_dir), "--weights", "none",
                          "--device", "cpu", "--amp", "off", "--batch-size", "2", "--workers", "0",
                          "--eval-every", "0", "--vis-every", "0", "--quiet", *extra])
    return Trainer(opts)


def test_loss_falls_on_one_fixed_batch(tiny_data, tmp_path):
    trainer = make_trainer(tiny_data, tmp_path / "run")
    rgb, depth = zip(*(trainer.train_set[i] for i in range(2)))
    rgb = F.interpolate(torch.stack(rgb), size=(64, 64), mode="bilinear", align_corners=False)
    depth = F.interpolate(torch.stack(depth), size=(64, 64), mode="bilinear", align_corners=False)
    losses = []
    for _ in range(20):
        parts, pred = trainer.process_batch(rgb, depth)
        losses.append(float(parts["loss"]))
        assert pred.shape == (2, 1, 64, 64) and not pred.requires_grad
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    assert trainer.scheduler.last_epoch == 20  # one scheduler step per optimiser step


def test_optimiser_and_cyclic_schedule_as_in_the_paper(tiny_data, tmp_path):
    trainer = make_trainer(tiny_data, tmp_path / "run")
    opt, sched = trainer.optimizer, trainer.scheduler
    assert isinstance(opt, torch.optim.Adam) and isinstance(sched, torch.optim.lr_scheduler.CyclicLR)
    group = opt.param_groups[0]
    assert len(opt.param_groups) == 1 and group["weight_decay"] == pytest.approx(1e-5)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]

    opt.step()  # no gradients yet: changes nothing, but orders the calls as training does
    seen = {}
    for step in range(4001):
        if step in (0, 1000, 3000, 4000):
            seen[step] = (sched.get_last_lr()[0], group["lr"], group["betas"][0])
        sched.step()
    expected = {0: (1e-3, 0.9), 1000: (5e-3, 0.8), 3000: (1e-3, 0.9), 4000: (3e-3, 0.85)}
    for step, (lr, beta1) in expected.items():
        assert seen[step][0] == pytest.approx(lr, rel=1e-6), step
        assert seen[step][1] == pytest.approx(lr, rel=1e-6), step
        assert seen[step][2] == pytest.approx(beta1, rel=1e-6), step


def test_non_finite_loss_skips_the_step_then_stops(tiny_data, tmp_path):
    trainer = make_trainer(tiny_data, tmp_path / "run", "--max-bad-steps", "2")
    rgb = torch.rand(2, 3, 64, 64)
    depth = torch.full((2, 1, 64, 64), float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert trainer.process_batch(rgb, depth) == (None, None)
    assert trainer.scheduler.last_epoch == 0
    for k, v in trainer.model.state_dict().items():
        if k in before and "running" not in k:  # BN statistics move in the forward pass; weights must not
            assert torch.equal(v, before[k]), k
    with pytest.warns(UserWarning), pytest.raises(UserError, match="2 non-finite losses in a row"):
        trainer.process_batch(rgb, depth)


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "config": {"lr": 1e-3, "name": "x", "flag": None},
           "metrics": {"rmse": 1.5}, "history": [1, 2.5, "three"]}
    save_checkpoint(obj, str(path))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["w"], obj["model"]["w"])
    assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in obj.items() if k != "model"}
    torch.load(path, weights_only=True)  # loadable by anyone with weights_only, as SPEC §6 promises

    # Overwriting goes through a temporary file too; a failed write leaves the old file intact.
    def failing_save(o, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", failing_save)
        with pytest.raises(CheckpointError, match="No space left on device.*previous file is intact"):
            save_checkpoint({"model": {}}, str(path))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(str(path))["step"] == 7


class NotATensor:
    pass


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    code = tmp_path / "code.pt"
    torch.save({"model": {}, "payload": NotATensor()}, code)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(str(code))
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(truncated))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(str(other))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    path = tmp_path / "rng.pt"
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"model": {}, "rng": rng_state()}, str(path))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(str(path))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_resume_restores_every_state_and_continues_identically(tiny_data, tmp_path):
    first = make_trainer(tiny_data, tmp_path / "a", "--max-steps", "2")
    first.train()
    ckpt = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    assert {"model", "optimizer", "scheduler", "epoch", "step", "config", "metrics"} <= set(ckpt)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 0, 2)  # stopped mid-epoch 1 of 4 batches
    assert json.loads(json.dumps(ckpt["config"])) == ckpt["config"]  # plain Python types

    resumed = make_trainer(tiny_data, tmp_path / "b", "--max-steps", "3", "--resume", str(tmp_path / "a" / "last.pt"))
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (2, 0, 2)
    assert resumed.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert resumed.scheduler.state_dict() == first.scheduler.state_dict()
    assert resumed.init_depth == first.init_depth
    assert_same_state(resumed.optimizer.state_dict(), first.optimizer.state_dict())
    assert_same_state(resumed.model.state_dict(), first.model.state_dict())

    # One more step after the resume = three steps without interruption.
    resumed.train()
    straight = make_trainer(tiny_data, tmp_path / "c", "--max-steps", "3")
    straight.train()
    assert resumed.step == straight.step == 3
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict(), atol=1e-5)
    assert_same_state(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), atol=1e-5)


def assert_same_state(a, b, atol=0.0):
    """Nested dicts/lists of tensors and plain values are equal (tensors within atol)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y, atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    else:
        assert a == b


def test_max_steps_at_an_epoch_end_still_evaluates(tmp_path):
    # Two images, batch 2: one step per epoch, so step 2 ends epoch 2 exactly.
    data = make_dataset(tmp_path / "data", {"train": 2, "val": 2}, size=(36, 64))
    trainer = make_trainer(data, tmp_path / "run", "--max-steps", "2", "--eval-every", "1")
    trainer.train()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 2, 0)
    assert os.path.isfile(tmp_path / "run" / "best.pt")


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    a = list(EpochSampler(10, seed=0, epoch=3))
    assert sorted(a) == list(range(10))
    assert list(EpochSampler(10, seed=0, epoch=3)) == a
    assert list(EpochSampler(10, seed=0, epoch=4)) != a
    assert list(EpochSampler(10, seed=1, epoch=3)) != a
    assert list(EpochSampler(10, seed=0, epoch=3, start=4)) == a[4:]
    assert list(EpochSampler(5, seed=0, epoch=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_mean_training_depth_is_the_clipped_mean(tiny_data):
    ds = DepthEstimationUnreal(tiny_data, "train")
    files = [np.load(os.path.join(tiny_data, "depth", "train", f"{i}.npy")) for i in range(8)]
    expected = np.mean([np.clip(d, 0, 20).astype(np.float64) for d in files])
    assert ds.mean_depth == pytest.approx(expected, rel=1e-6)
    # A split opened without the up-front check computes it on first use, to the same value.
    assert DepthEstimationUnreal(tiny_data, "train", check=False).mean_depth == ds.mean_depth


def test_cache_off_reads_each_depth_file_once_for_the_check_and_the_output_bias(tiny_data, tmp_path, monkeypatch):
    import dataset

    reads = []
    real_read_depth = dataset.read_depth
    monkeypatch.setattr(dataset, "read_depth", lambda path: reads.append(path) or real_read_depth(path))
    trainer = make_trainer(tiny_data, tmp_path / "run", "--cache", "off")
    assert sorted(reads) == sorted(depth for _, _, depth in trainer.train_set.pairs)
    files = [np.load(depth) for _, _, depth in trainer.train_set.pairs]
    expected = np.mean([np.clip(d, 0, 20).astype(np.float64) for d in files])
    assert trainer.init_depth == pytest.approx(expected, rel=1e-6)
    assert float(trainer.model.decoder.output_conv.bias.detach()) == pytest.approx(expected, rel=1e-6)


def test_train_step_driven_from_outside_matches_the_loop(tiny_data, tmp_path):
    """bench.py and ablate.py drive train_step themselves: an epoch of it must be the loop's epoch."""
    looped = make_trainer(tiny_data, tmp_path / "loop", "--epochs", "1", "--augment")
    looped.train()
    driven = make_trainer(tiny_data, tmp_path / "driven", "--epochs", "1", "--augment")
    steps = [driven.train_step(rgb, depth) for rgb, depth in driven.epoch_batches()]
    driven.finish_epoch()
    assert (driven.step, driven.epoch, driven.batch_in_epoch) == (looped.step, looped.epoch, 0) == (4, 1, 0)
    assert all(s.checked and set(s.parts) == {"loss", "rmse", "ssim"} for s in steps)
    assert steps[0].rgb.shape == (2, 3, 224, 224) and steps[0].pred.shape == (2, 1, 224, 224)
    assert driven.scheduler.last_epoch == looped.scheduler.last_epoch == 4
    assert_same_state(driven.model.state_dict(), looped.model.state_dict())
    assert_same_state(driven.optimizer.state_dict(), looped.optimizer.state_dict())
