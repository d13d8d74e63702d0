"""graphstep.GraphedStep: the training step with no host work inside computes what the eager step computes,
and torch.compile traces it whole (the CPU half of capturing it in a CUDA graph)."""
import math

import pytest
import torch

import main
from conftest import make_dataset
from graphstep import GraphedStep, cyclic_schedule_of
from train import Trainer

SIZE = 32


def make_trainer(data, run_dir, *extra):
    return Trainer(main.parse_options([
        "--data-dir", data, "--run-dir", str(run_dir), "--weights", "none", "--image-size", str(SIZE),
        "--batch-size", "4", "--workers", "0", "--amp", "off", "--quiet", "--device", "cpu", "--eval-every", "0",
        "--vis-every", "0", "--step-size-up", "2", "--step-size-down", "3", "--encoder", "resnet18", *extra]))


def graphed(trainer):
    return GraphedStep(trainer.model, trainer._loss_fn, trainer.optimizer, trainer.scheduler, trainer.amp_dtype,
                       trainer.opts.channels_last, (4, SIZE, SIZE), trainer.ema, trainer.opts.ema)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("graph_data"), {"train": 8}, size=(36, 48))


def max_difference(a, b):
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("--ema", "0.9"), ("--adamw", "--weight-decay", "0.1", "--train-stem")])
def test_graphed_steps_equal_eager_steps(data, tmp_path, extra):
    """4 steps (two epochs, through the peak of the cyclic schedule), from the same weights and batches.

    In float64: Adam's first steps move each weight by about lr times the sign of its gradient, so the
    rounding of fp32 in near-zero gradients would make the two runs drift apart by whole steps."""
    eager, other = make_trainer(data, tmp_path / "eager", *extra), make_trainer(data, tmp_path / "graphed", *extra)
    for trainer in (eager, other):
        trainer.model.double().train()
        trainer._build_weight_average()  # --ema: the average as a float64 copy
    assert max_difference(eager.model.state_dict().values(), other.model.state_dict().values()) == 0
    step = graphed(other)
    eager_losses, graphed_losses = [], []
    for _ in range(2):
        batches = [(rgb.double(), depth.double()) for rgb, depth in eager.epoch_batches()]
        for rgb, depth in batches:
            eager_losses.append(float(eager.train_step(rgb, depth).parts["loss"]))
            step.rgb.copy_(rgb)
            step.depth.copy_(depth)
            loss, parts, pred = step.step(step.rgb, step.depth)
            graphed_losses.append(float(loss))
            assert pred.shape == (4, 1, SIZE, SIZE) and set(parts) == {"loss", "rmse", "ssim"}
        eager.finish_epoch()
    assert eager.step == 4 and float(step.steps) == float(step.applied) == 4
    for a, b in zip(eager_losses, graphed_losses):
        assert b == pytest.approx(a, rel=1e-9)
    # An Adam step moves a weight by up to lr = 1e-3 or more: a slip in the formula would show far above this.
    assert max_difference(eager.model.parameters(), other.model.parameters()) < 1e-7
    assert max_difference(eager.model.buffers(), other.model.buffers()) < 1e-7  # BatchNorm's statistics too
    if "--ema" in extra:
        assert max_difference(eager.ema.state_dict().values(), other.ema.state_dict().values()) < 1e-7

    # Written back, the state is what the eager optimiser and schedule hold: a checkpoint saves it alike.
    step.write_back(other.optimizer, other.scheduler)
    assert other.scheduler.last_epoch == eager.scheduler.last_epoch == 4
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(eager.optimizer.param_groups[0]["lr"])
    assert other.optimizer.param_groups[0]["betas"][0] == pytest.approx(eager.optimizer.param_groups[0]["betas"][0])
    for p, q in zip(eager.optimizer.param_groups[0]["params"], other.optimizer.param_groups[0]["params"]):
        assert float(eager.optimizer.state[p]["step"]) == float(other.optimizer.state[q]["step"]) == 4
        assert torch.allclose(eager.optimizer.state[p]["exp_avg"], other.optimizer.state[q]["exp_avg"], atol=1e-5)


def test_a_non_finite_loss_changes_no_weight_but_counts_as_a_step(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run", "--ema", "0.9")
    trainer.model.train()
    step = graphed(trainer)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    ema_before = {k: v.clone() for k, v in trainer.ema.named_parameters()}
    step.rgb.uniform_()
    step.depth.fill_(float("nan"))
    loss, _, _ = step.step(step.rgb, step.depth)
    # The schedule and the average move on (as the eager step counts it); Adam's own count does not.
    assert not math.isfinite(float(loss)) and float(step.steps) == 1 and float(step.applied) == 0
    assert all(torch.equal(p, before[k]) for k, p in trainer.model.named_parameters())
    assert all(torch.equal(p, ema_before[k]) for k, p in trainer.ema.named_parameters())
    assert all(float(m.abs().max()) == 0 for m in step.exp_avg.values())


def test_the_schedule_on_the_device_is_cyclic_lr(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run")
    schedule = cyclic_schedule_of(trainer.scheduler)
    for k in range(16):
        lr, beta1 = schedule.at(torch.tensor(float(k)))
        assert float(lr) == pytest.approx(trainer.optimizer.param_groups[0]["lr"], rel=1e-6), k
        assert float(beta1) == pytest.approx(trainer.optimizer.param_groups[0]["betas"][0], rel=1e-6), k
        trainer.scheduler.step()


@pytest.mark.slow
def test_the_step_compiles_whole_without_a_graph_break(data, tmp_path):
    """torch.compile(fullgraph=True) fails on any graph break: a host read, a branch on a value, an untraceable
    call. This is the half of being capturable that a CPU can check."""
    trainer = make_trainer(data, tmp_path / "run", "--encoder", "resnet18", "--ema", "0.9")
    trainer.model.train()
    step = graphed(trainer)
    compiled = torch.compile(step.step, fullgraph=True, backend="eager")  # Dynamo alone finds graph breaks
    rgb, depth = next(iter(trainer.epoch_batches()))
    step.rgb.copy_(rgb)
    step.depth.copy_(depth)
    loss, parts, _ = compiled(step.rgb, step.depth)
    assert math.isfinite(float(loss)) and float(step.applied) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_train_as_the_eager_step_does(tmp_path):
    """200 steps with --cuda-graphs and without, from one seed: the same losses to rounding, the same val
    metrics to 1e-3 m, and a checkpoint that resumes either way."""
    import json

    from dataset import DepthEstimationUnreal
    from evaluate import evaluate

    data = make_dataset(tmp_path / "data", {"train": 64, "val": 8}, size=(72, 128))
    losses, metrics = {}, {}
    for name, extra in (("eager", ()), ("graphed", ("--cuda-graphs",))):
        run_dir = tmp_path / name
        trainer = Trainer(main.parse_options([
            "--data-dir", data, "--run-dir", str(run_dir), "--weights", "none", "--image-size", "64",
            "--batch-size", "8", "--max-steps", "200", "--epochs", "25", "--eval-every", "0", "--vis-every", "0",
            "--log-every", "1", "--amp", "off", "--device", "cuda", "--deterministic", "--quiet", "--ema", "0.99",
            *extra]))
        trainer.fit()
        assert trainer.step == 200
        losses[name] = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        val = DepthEstimationUnreal(data, "val", size=64, native=True)
        metrics[name] = evaluate(trainer.scored_model, val, trainer.device)
    assert len(losses["graphed"]) == len(losses["eager"]) == 200
    assert losses["graphed"][0] == pytest.approx(losses["eager"][0], rel=1e-5)
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-3)
    for key in ("rmse", "challenge_rmse"):
        assert metrics["graphed"][key] == pytest.approx(metrics["eager"][key], abs=1e-3), key
    resumed = Trainer(main.parse_options(["--resume", str(tmp_path / "graphed" / "last.pt"), "--max-steps", "208"]))
    resumed.fit()
    assert resumed.step == 208


def test_cuda_graphs_are_refused_where_they_cannot_run(data, tmp_path, capsys):
    common = ["--data-dir", data, "--run-dir", str(tmp_path / "run"), "--weights", "none", "--image-size", "32",
              "--cuda-graphs", "--quiet"]
    assert main.main(common + ["--device", "cpu"]) == 1
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    for extra, needle in ((["--compile"], "choose one of --cuda-graphs and --compile"),
                          (["--amp", "fp16"], "--cuda-graphs runs in fp32 or bf16")):
        with pytest.raises(SystemExit):
            main.main(common + extra)
        assert needle in capsys.readouterr().err
