"""train.py against docs/design.md §7 and §9: learning, schedule, resume, the step API, options beyond the paper."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main
import train
from checkpoint import load_checkpoint
from conftest import LossWithNaNs, make_dataset, synthetic_data
from inference import load
from main import parse_options
from synthetic import generate_dataset
from train import Trainer
from utils import UserError


def make_trainer(data_dir, run_dir, *extra):
    """A CPU Trainer with random weights, no evaluation, pictures or progress bars unless asked; ResNet-18 at
    64 x 64, since what is tested here is the loop, not the paper's network or size."""
    opts = parse_options(["--data-dir", str(data_dir), "--run-dir", str(run_dir), "--weights", "none",
                          "--device", "cpu", "--amp", "off", "--batch-size", "2", "--workers", "0",
                          "--eval-every", "0", "--vis-every", "0", "--quiet", "--encoder", "resnet18",
                          "--image-size", "64", *extra])
    return Trainer(opts)


def test_loss_falls_on_one_fixed_batch(tiny_data, tmp_path):
    trainer = make_trainer(tiny_data, tmp_path / "run", "--encoder", "resnet34")  # the paper's network learns
    rgb, depth = zip(*(trainer.train_set[i] for i in range(2)))
    rgb = F.interpolate(torch.stack(rgb), size=(64, 64), mode="bilinear", align_corners=False)
    depth = F.interpolate(torch.stack(depth), size=(64, 64), mode="bilinear", align_corners=False)
    losses = []
    for _ in range(20):
        done = trainer.train_step(rgb, depth)
        parts, pred = done.parts, done.pred
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


def test_resume_restores_every_state_and_continues_identically(tiny_data, tmp_path):
    first = make_trainer(tiny_data, tmp_path / "a", "--max-steps", "2")
    first.fit()
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
    resumed.fit()
    straight = make_trainer(tiny_data, tmp_path / "c", "--max-steps", "3")
    straight.fit()
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
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 2, 0)
    assert os.path.isfile(tmp_path / "run" / "best.pt")


def test_cache_off_reads_each_depth_file_once_for_the_check_and_the_output_bias(tiny_data, tmp_path, monkeypatch):
    import dataset

    reads = []
    real_read_depth = dataset.read_depth
    monkeypatch.setattr(dataset, "read_depth", lambda path, *args: reads.append(path) or real_read_depth(path, *args))
    trainer = make_trainer(tiny_data, tmp_path / "run", "--cache", "off")
    assert sorted(reads) == sorted(depth for _, _, depth in trainer.train_set.pairs)
    files = [np.load(depth) for _, _, depth in trainer.train_set.pairs]
    expected = np.mean([np.clip(d, 0, 20).astype(np.float64) for d in files])
    assert trainer.init_depth == pytest.approx(expected, rel=1e-6)
    assert float(trainer.model.decoder.output_conv.bias.detach()) == pytest.approx(expected, rel=1e-6)


def test_train_step_driven_from_outside_matches_the_loop(tiny_data, tmp_path):
    """bench.py and ablate.py drive train_step themselves: an epoch of it must be the loop's epoch."""
    looped = make_trainer(tiny_data, tmp_path / "loop", "--epochs", "1", "--augment")
    looped.fit()
    driven = make_trainer(tiny_data, tmp_path / "driven", "--epochs", "1", "--augment")
    steps = [driven.train_step(rgb, depth) for rgb, depth in driven.epoch_batches()]
    driven.finish_epoch()
    assert (driven.step, driven.epoch, driven.batch_in_epoch) == (looped.step, looped.epoch, 0) == (4, 1, 0)
    assert all(set(s.parts) == {"loss", "rmse", "ssim"} for s in steps)
    assert steps[0].rgb.shape == (2, 3, 64, 64) and steps[0].pred.shape == (2, 1, 64, 64)
    assert driven.scheduler.last_epoch == looped.scheduler.last_epoch == 4
    assert_same_state(driven.model.state_dict(), looped.model.state_dict())
    assert_same_state(driven.optimizer.state_dict(), looped.optimizer.state_dict())


# ------------------------------------------------------------------ options beyond the paper, logs
SIZE = 64


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond_data")
    generate_dataset(root, 4, 2, 0, seed=0, height=64, width=96, progress=False)
    return str(root)


def test_trainer_with_every_option_trains_and_checkpoints_the_architecture(small_data, tmp_path):
    opts = main.parse_options([
        "--data-dir", small_data, "--run-dir", str(tmp_path / "run"), "--weights", "none", "--encoder", "resnet18",
        "--skips", "--augment", "--max-zoom", "2", "--zoom-closer", "--paste", "1", "--adamw", "--grad-weight", "0.5",
        "--silog-weight", "2", "--train-stem", "--image-size", str(SIZE), "--crop", "32", "64",
        "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--vis-every", "2", "--workers", "0",
        "--amp", "off", "--quiet"])
    trainer = Trainer(opts)
    rgb, depth = next(iter(trainer.epoch_batches()))
    assert rgb.shape == (2, 3, SIZE, SIZE)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.model.encoder[0].weight.requires_grad  # --train-stem
    augmented = trainer._augment_batch(rgb, depth)
    assert augmented[0].shape == (2, 3, 32, SIZE) and augmented[1].shape == (2, 1, 32, SIZE)  # --crop
    assert torch.equal(trainer._augment_batch(rgb, depth)[0], augmented[0])  # a function of (seed, step): resumable
    trainer.step = 1
    assert not torch.equal(trainer._augment_batch(rgb, depth)[0], augmented[0])
    trainer.step = 0
    _, parts, pred = trainer._forward_backward_update(*augmented)
    assert set(parts) == {"loss", "rmse", "ssim", "grad", "silog"}
    assert pred.shape == (2, 1, 32, SIZE)
    trainer.fit()
    assert trainer.step == 2
    assert os.path.isfile(tmp_path / "run" / "vis" / "train_step000002.png")
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ckpt["config"]["encoder"] == "resnet18" and ckpt["config"]["skips"] is True
    assert ckpt["input_size"] == SIZE  # the whole input, which prediction uses; the crop is training's alone
    model = load(str(tmp_path / "run" / "last.pt"), "cpu").net
    assert model.encoder_name == "resnet18" and model.skips


def test_training_writes_train_log_and_curves(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, {"train": 2}, ext=".png", size=(48, 64))
    run_dir = tmp_path / "run"
    assert main.main(["--data-dir", str(data), "--weights", "none", "--image-size", "64", "--batch-size", "1",
                      "--max-steps", "1", "--log-every", "1", "--eval-every", "0", "--vis-every", "0", "--workers", "0",
                      "--amp", "off", "--quiet", "--run-dir", str(run_dir)]) == 0
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 0.5)]  # one of the epoch's two batches
    assert math.isfinite(records[0]["loss"])
    assert records[0]["loss"] == pytest.approx(records[0]["rmse"] + 1 - records[0]["ssim"], rel=1e-5)
    with Image.open(run_dir / "curves.png") as im:
        im.verify()


# ------------------------------------------------------------------ the GPU's deferred loss check
@pytest.fixture(scope="module")
def synthetic_64(tmp_path_factory):
    """8 training and 2 validation scenes written by synthetic.py."""
    return synthetic_data(str(tmp_path_factory.mktemp("synthetic") / "data"), 8, 2)


def adam_steps(trainer):
    return {int(s["step"]) for s in trainer.optimizer.state.values()}


def test_gpu_way_reads_losses_late_and_counts_every_step(synthetic_64, tmp_path, monkeypatch):
    """The GPU's late reading of losses, exercised on the CPU: 4 batches, the 2nd one bad."""
    monkeypatch.setattr(train, "DepthLoss", LossWithNaNs)
    LossWithNaNs.calls, LossWithNaNs.bad_calls = 0, {2}
    trainer = make_trainer(synthetic_64, tmp_path / "run", "--image-size", "64", "--epochs", "1", "--log-every", "100")
    trainer._read_at_once = False
    batches = trainer.epoch_batches()
    trainer.train_step(*next(batches))  # step 1: read at once, as the first step is logged
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(*next(batches))  # bad, and not read yet: counted as every step is
    assert trainer.step == trainer.scheduler.last_epoch == 2 and len(trainer._unread_losses) == 1
    for k, v in trainer.model.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BatchNorm statistics move in the forward pass
            assert torch.equal(v, weights[k]), k  # ...but no weight did
    assert adam_steps(trainer) == {1}
    with pytest.warns(UserWarning, match=r"non-finite loss \(nan\) at step 2: step skipped \(1 in a row\)"):
        trainer.check_losses()

    trainer = make_trainer(synthetic_64, tmp_path / "run2", "--image-size", "64", "--epochs", "1", "--log-every", "100")
    trainer._read_at_once = False
    LossWithNaNs.calls = 0
    with pytest.warns(UserWarning, match=r"non-finite loss \(nan\) at step 2: step skipped \(1 in a row\)"):
        trainer.fit()
    assert trainer.step == 4 and trainer.scheduler.last_epoch == 4 and adam_steps(trainer) == {3}
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 + 4e-3 * 4 / 1000)  # CyclicLR at step 4
    assert load_checkpoint(str(tmp_path / "run2" / "last.pt"))["step"] == 4

    trainer = make_trainer(synthetic_64, tmp_path / "run3", "--image-size", "64", "--epochs", "1", "--log-every", "100",
                           "--max-bad-steps", "2")
    trainer._read_at_once = False
    LossWithNaNs.calls, LossWithNaNs.bad_calls = 0, {2, 3}
    with pytest.warns(UserWarning), pytest.raises(UserError, match="2 non-finite losses in a row at step 3"):
        trainer.fit()  # read at the epoch's end: the error comes late, but it comes
    assert not (tmp_path / "run3" / "last.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_on_gpu_and_steps_without_host_sync(synthetic_64, tmp_path):
    trainer = make_trainer(synthetic_64, tmp_path / "run", "--device", "cuda", "--amp", "auto", "--image-size", "224",
                           "--log-every", "1000")
    assert not trainer._read_at_once
    assert trainer.cache.rgb.device.type == "cuda" and trainer.cache.depth.device.type == "cuda"
    batches = trainer.epoch_batches()
    trainer.train_step(*next(batches))  # warm-up: lazy initialisation, cudnn autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rgb, depth in batches:
            assert trainer.train_step(rgb, depth) is not None
        trainer.epoch, trainer.batch_in_epoch = 1, 0
        for rgb, depth in trainer.epoch_batches():  # a new epoch, with --augment's work on the batches
            trainer._forward_backward_update(*trainer._augment_batch(rgb, depth))
            trainer._advance_schedule()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer.check_losses()
    assert not trainer._bad_steps and adam_steps(trainer) == {8}


def test_best_checkpoint_records_exactly_what_eval_of_it_reports(tmp_path):
    """Validation during training scores as --eval does (fp32, training's layout), even when training runs in bf16."""
    data = make_dataset(tmp_path / "data", {"train": 2, "val": 3}, size=(36, 64))
    trainer = make_trainer(data, tmp_path / "run", "--amp", "bf16", "--image-size", "64", "--max-steps", "2",
                           "--eval-every", "1")
    trainer.fit()
    best = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and best["metrics"] in [{k: r[k] for k in best["metrics"]} for r in logged]
    out = tmp_path / "eval.json"
    assert main.main(["--eval", "--ckpt", str(tmp_path / "run" / "best.pt"), "--data-dir", data, "--metrics-out",
                      str(out), "--workers", "0", "--device", "cpu", "--no-report", "--quiet"]) == 0
    assert json.loads(out.read_text()) == best["metrics"]




def test_ema_is_the_moving_average_of_the_trained_weights(tiny_data, tmp_path):
    """--ema 0.9: after step n the average is d·average + (1 − d)·weights, d = min(0.9, (1 + n) / (10 + n))."""
    trainer = make_trainer(tiny_data, tmp_path / "run", "--image-size", str(SIZE), "--ema", "0.9", "--epochs", "1")
    floats = [k for k, t in trainer.model.state_dict().items() if t.is_floating_point()]
    expected = {k: trainer.model.state_dict()[k].clone().double() for k in floats}
    for n, (rgb, depth) in enumerate(trainer.epoch_batches()):
        trainer.train_step(rgb, depth)
        d = min(0.9, (1 + n) / (10 + n))
        trained = trainer.model.state_dict()
        expected = {k: d * expected[k] + (1 - d) * trained[k].double() for k in floats}
    assert n == 3 and trainer.step == 4
    averaged = trainer.ema.state_dict()
    for k in floats:
        torch.testing.assert_close(averaged[k].double(), expected[k], rtol=1e-5, atol=1e-6)
    moved = [k for k in floats if not torch.equal(averaged[k], trainer.model.state_dict()[k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)
    assert trainer.scored_model is trainer.ema and not trainer.ema.training


@pytest.mark.slow
def test_ema_is_what_validation_scores_saves_and_resumes(tmp_path):
    """best.pt's metrics are the average's, and --eval of best.pt reports them; a resume continues the average."""
    data = make_dataset(tmp_path / "data", {"train": 4, "val": 3}, size=(36, 64))
    common = ("--image-size", str(SIZE), "--ema", "0.5", "--eval-every", "1")
    trainer = make_trainer(data, tmp_path / "run", *common, "--max-steps", "2")
    trainer.fit()
    best = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert best["ema"].keys() == best["model"].keys()
    assert any(not torch.equal(best["ema"][k], best["model"][k]) for k in best["model"])
    out = tmp_path / "eval.json"
    assert main.main(["--eval", "--ckpt", str(tmp_path / "run" / "best.pt"), "--data-dir", data, "--metrics-out",
                      str(out), "--workers", "0", "--device", "cpu", "--no-report", "--quiet"]) == 0
    assert json.loads(out.read_text()) == best["metrics"]
    raw = train.evaluate(trainer.model, trainer.val_set, trainer.device)
    assert raw["rmse"] != best["metrics"]["rmse"]  # the trained weights themselves score otherwise

    resumed = make_trainer(data, tmp_path / "b", *common, "--max-steps", "4", "--resume",
                           str(tmp_path / "run" / "last.pt"))
    assert_same_state(resumed.ema.state_dict(), trainer.ema.state_dict())
    resumed.fit()
    straight = make_trainer(data, tmp_path / "c", *common, "--max-steps", "4")
    straight.fit()
    assert_same_state(resumed.ema.state_dict(), straight.ema.state_dict(), atol=1e-5)


@pytest.mark.slow
def test_compiled_training_takes_the_eager_steps_and_saves_plain_weights(tmp_path):
    """--compile: torch.compile of the model (about a minute of compiling on 2 CPU cores, once).

    Inductor fuses and reorders the fp32 arithmetic, so the runs agree to rounding, not bit for bit:
    the first step's loss (same weights, same batch) to 1e-5; after that, Adam turns rounding in
    near-zero gradients into whole steps of size lr, so the weights are compared by the direction
    in which training moved them. The checkpoint holds the plain module's keys: --eval, --predict
    and --resume load it uncompiled.
    """
    data = make_dataset(tmp_path / "data", {"train": 4, "val": 2}, size=(36, 64))
    start = make_trainer(data, tmp_path / "start", "--image-size", str(SIZE)).model.state_dict()
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        trainer = make_trainer(data, tmp_path / name, "--image-size", str(SIZE), "--epochs", "1", *extra)
        losses = [float(trainer.train_step(rgb, depth).parts["loss"]) for rgb, depth in trainer.epoch_batches()]
        trainer.finish_epoch()
        trainer.save_checkpoint("last.pt")
        runs[name] = (trainer, losses)
    (eager, eager_losses), (compiled, compiled_losses) = runs["eager"], runs["compiled"]
    assert hasattr(compiled._net, "_orig_mod") and not hasattr(eager._net, "_orig_mod")
    assert compiled.step == eager.step == 2
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-5)
    assert compiled_losses[1] == pytest.approx(eager_losses[1], rel=1e-3)

    saved = load_checkpoint(str(tmp_path / "compiled" / "last.pt"))["model"]
    assert saved.keys() == start.keys()
    trained = [k for k, p in eager.model.named_parameters() if p.requires_grad]
    moved = {name: torch.cat([(state[k] - start[k]).double().flatten() for k in trained])
             for name, state in (("eager", eager.model.state_dict()), ("compiled", saved))}
    assert moved["compiled"].abs().max() > 1e-3  # it trained
    assert F.cosine_similarity(moved["compiled"], moved["eager"], dim=0) > 0.95
