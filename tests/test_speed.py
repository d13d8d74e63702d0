"""The fast training path: sync-free skipping of non-finite steps, the summed loss, bench.py, CUDA behaviour."""
import json

import pytest
from conftest import synthetic_data
import torch

import bench
import train
from losses import DepthLoss, silog_per_image, ssim, ssim_map
from main import parse_options
from model import DepthNet, InferenceModel
from train import Trainer
from utils import UserError, load_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(str(tmp_path_factory.mktemp("speed") / "data"), 8, 2)


def make_trainer(data_dir, run_dir, *extra, device="cpu"):
    opts = parse_options(["--data-dir", data_dir, "--run-dir", str(run_dir), "--weights", "none", "--device", device,
                          "--amp", "off", "--batch-size", "2", "--workers", "0", "--eval-every", "0", "--vis-every", "0",
                          "--image-size", "64", "--quiet", *extra])
    return Trainer(opts)


def adam_steps(trainer):
    return {int(s["step"]) for s in trainer.optimizer.state.values()}


def test_loss_from_sums_equals_the_plain_formulas_with_their_gradients():
    """DepthLoss computes every term from sums and counts (what processes add up); it must equal the
    plain per-batch formulas, written here with torch's means, and give the same gradients."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 40, 40, generator=gen) * 20
    pred = (target + torch.randn(3, 1, 40, 40, generator=gen)).requires_grad_()

    def plain(pred, grad_weight=0.0, silog_weight=0.0):
        terms = {"rmse": torch.sqrt(torch.nn.functional.mse_loss(pred, target)),
                 "ssim": ssim_map(pred, target, data_range=1.0, padding="same").mean()}
        total = terms["rmse"] + 1 - terms["ssim"]
        if grad_weight:
            terms["grad"] = (pred.diff(dim=-1) - target.diff(dim=-1)).abs().mean() + \
                (pred.diff(dim=-2) - target.diff(dim=-2)).abs().mean()
            total = total + grad_weight * terms["grad"]
        if silog_weight:
            terms["silog"] = silog_per_image(pred, target).mean()
            total = total + silog_weight * terms["silog"]
        return total, {"loss": total, **terms}

    for weights in ({}, {"grad_weight": 0.5, "silog_weight": 0.3}):
        expected, expected_parts = plain(pred, **weights)
        (g_expected,) = torch.autograd.grad(expected, pred)
        got, got_parts = DepthLoss(**weights)(pred, target)
        (g_got,) = torch.autograd.grad(got, pred)
        assert got_parts.keys() == expected_parts.keys()
        for k in expected_parts:
            assert float(got_parts[k]) == pytest.approx(float(expected_parts[k].detach()), rel=1e-6), k
        torch.testing.assert_close(g_got, g_expected, rtol=1e-4, atol=1e-9)


def test_loss_runs_in_float64_for_float64_predictions():
    """At least fp32, never below: bf16 predictions get an fp32 loss, float64 ones keep float64."""
    target = torch.rand(2, 1, 32, 32, dtype=torch.float64) * 20
    loss, _ = DepthLoss(grad_weight=1.0, silog_weight=1.0)(target + 0.5, target)
    assert loss.dtype == torch.float64
    loss, _ = DepthLoss()(target.bfloat16(), target.float())
    assert loss.dtype == torch.float32


class LossWithNaNs(DepthLoss):
    """The real loss, except NaN on the listed calls (1-based)."""
    calls, bad_calls = 0, set()

    def forward(self, pred, target):
        LossWithNaNs.calls += 1
        loss, parts = super().forward(pred, target)
        return (loss * float("nan") if LossWithNaNs.calls in LossWithNaNs.bad_calls else loss), parts


def test_gpu_way_skips_on_the_device_and_recounts_at_the_check(data, tmp_path, monkeypatch):
    """The GPU's deferred reading of losses, exercised on the CPU: 4 batches, the 2nd one bad."""
    monkeypatch.setattr(train, "DepthLoss", LossWithNaNs)
    LossWithNaNs.calls, LossWithNaNs.bad_calls = 0, {2}
    trainer = make_trainer(data, tmp_path / "run", "--epochs", "1", "--log-every", "100")
    trainer.sync_free = True
    rgb, depth = next(trainer.epoch_batches())
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    LossWithNaNs.calls = 1
    parts, _ = trainer.process_batch(rgb, depth)  # bad, but not read yet: returns as usual
    assert parts is not None and trainer.scheduler.last_epoch == 1
    for k, v in trainer.model.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BatchNorm statistics move in the forward pass
            assert torch.equal(v, weights[k]), k  # ...but no weight did
    assert adam_steps(trainer) == {0} and trainer.unchecked_losses

    trainer = make_trainer(data, tmp_path / "run2", "--epochs", "1", "--log-every", "100")
    trainer.sync_free = True
    LossWithNaNs.calls = 0
    with pytest.warns(UserWarning, match=r"non-finite loss \(nan\) at step 2: step skipped \(1 in a row\)"):
        trainer.train()
    assert trainer.step == 3 and trainer.scheduler.last_epoch == 3 and adam_steps(trainer) == {3}
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 + 4e-3 * 3 / 1000)  # CyclicLR at step 3
    assert load_checkpoint(str(tmp_path / "run2" / "last.pt"))["step"] == 3

    trainer = make_trainer(data, tmp_path / "run3", "--epochs", "1", "--log-every", "100", "--max-bad-steps", "2")
    trainer.sync_free = True
    LossWithNaNs.calls, LossWithNaNs.bad_calls = 0, {2, 3}
    with pytest.warns(UserWarning), pytest.raises(UserError, match="2 non-finite losses in a row at step 2"):
        trainer.train()  # read at the epoch's end: the error comes late, but it comes
    assert not (tmp_path / "run3" / "last.pt").exists()


def test_inference_model_is_a_low_precision_frozen_copy():
    torch.manual_seed(0)
    model = DepthNet(weights=None, init_depth=8.0).eval()
    fast = InferenceModel(model, torch.bfloat16)
    rgb = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(rgb), fast(rgb)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert next(fast.parameters()).dtype == torch.bfloat16
    assert fast.net.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    # bf16 keeps 8 significant bits: predictions of about 8 m agree to a few centimetres.
    assert float((got - expected).abs().max()) < 0.1 and not torch.equal(got, expected)
    fast.train()
    assert not fast.net.training  # its BatchNorm statistics never move
    with torch.no_grad():
        model.decoder.output_conv.bias += 1.0  # the copy shares nothing with the original
        assert torch.equal(fast(rgb), got)


def test_ssim_implementations_of_bench_agree_with_losses():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 48, 64, generator=gen) * 20
    y = (x + torch.randn(2, 1, 48, 64, generator=gen)).clamp(0, 20)
    expected = float(ssim(x, y, data_range=1.0, padding="same"))
    for name, fn in bench.SSIM_VARIANTS.items():
        assert float(fn(x, y)) == pytest.approx(expected, abs=1e-5), name


def test_bench_writes_its_report(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--images", "2", "--rounds", "1",
                "--inference-reps", "1", "--inference-batch", "2", "--workers", "0", "--out", str(out)])
    r = json.loads(out.read_text())
    for name in ("baseline", "ours"):
        assert r["train"][name]["steps"] == 1 and r["train"][name]["img_s"] > 0
        assert 0 < r["train"][name]["fraction_of_peak"] < 1
        assert r["inference"][name]["latency_ms_batch1"] > 0 and r["inference"][name]["img_s_batchN"] > 0
    assert r["train_speedup"] == pytest.approx(r["train"]["ours"]["img_s"] / r["train"]["baseline"]["img_s"])
    # ResNet-34 to layer4 is 3.6 GFLOPs at 224 × 224; the decoder's full-resolution layers add more.
    assert 7e9 < r["flops"]["forward_per_image"] < 10e9
    assert r["flops"]["train_per_image"] == 3 * r["flops"]["forward_per_image"]
    acc = r["accuracy"]
    assert acc["n_images"] == 2 and acc["abs_diff"]["rmse"] < 0.05 * acc["fp32"]["rmse"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_on_gpu_and_steps_without_host_sync(data, tmp_path):
    trainer = make_trainer(data, tmp_path / "run", "--amp", "auto", "--image-size", "224", "--log-every", "1000",
                           device="cuda")
    assert trainer.sync_free and trainer.cache.rgb.device.type == "cuda" and trainer.cache.depth.device.type == "cuda"
    batches = trainer.epoch_batches()
    trainer.process_batch(*next(batches))  # warm-up: lazy initialisation, cudnn autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rgb, depth in batches:
            assert trainer.process_batch(rgb, depth)[0] is not None
        trainer.epoch, trainer.batch_in_epoch = 1, 0
        for rgb, depth in trainer.epoch_batches():  # a new epoch, with --augment's work on the batches
            assert trainer.process_batch(*trainer.augment_batch(rgb, depth))[0] is not None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer.step = 8
    assert trainer.check_steps() and trainer.step == 8 and adam_steps(trainer) == {8}
