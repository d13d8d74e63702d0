"""losses.py against docs/design.md §6: SSIM in both modes, RMSE and the paper's loss."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from losses import DepthLoss, gradient_loss, rmse, silog_loss, silog_per_image, ssim, ssim_map
from reference import skimage_ssim, template_ssim

H, W = 40, 56


def depth_pairs():
    """(name, gt, pred) float32 HW maps in metres, 0..20: random and structured."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float32)
    gradient = 20 * rows / (H - 1)
    blocks = np.full((H, W), 20.0, np.float32)
    blocks[5:25, 8:30] = 6.0
    blocks[20:38, 35:50] = 12.5
    noisy = np.clip(blocks + rng.normal(0, 1.0, (H, W)), 0, 20).astype(np.float32)
    scene = np.clip(gradient + (blocks - 20) * 0.5, 0, 20).astype(np.float32)
    return [
        ("random", rng.uniform(0, 20, (H, W)).astype(np.float32), rng.uniform(0, 20, (H, W)).astype(np.float32)),
        ("gradient vs flipped", gradient, gradient[::-1].copy()),
        ("gradient vs columns", gradient, (20 * cols / (W - 1)).astype(np.float32)),
        ("blocks vs noisy blocks", blocks, noisy),
        ("scene vs smoothed", scene, ndimage.gaussian_filter(scene, 2.0).astype(np.float32)),
        ("scene vs shifted", scene, np.clip(scene + 1.5, 0, 20).astype(np.float32)),
    ]


def as_batch(*maps):
    return torch.from_numpy(np.stack(maps)[:, None])


@pytest.mark.parametrize("name,gt,pred", depth_pairs(), ids=[p[0] for p in depth_pairs()])
def test_valid_ssim_equals_skimage_per_image(name, gt, pred):
    ours = float(ssim(as_batch(pred), as_batch(gt), data_range=20, padding="valid"))
    ref = skimage_ssim(pred, gt, 20)
    assert abs(ours - ref) < 1e-4, (ours, ref)
    assert ref < 0.999  # no case is trivially equal


def test_valid_ssim_of_a_batch_is_the_mean_over_images():
    pairs = depth_pairs()
    preds = as_batch(*[p for _, _, p in pairs])
    gts = as_batch(*[g for _, g, _ in pairs])
    refs = [skimage_ssim(p, g, 20) for _, g, p in pairs]
    assert float(ssim(preds, gts, data_range=20, padding="valid")) == pytest.approx(np.mean(refs), abs=1e-4)
    per_image = ssim_map(preds, gts, data_range=20, padding="valid").mean(dim=(1, 2, 3))
    np.testing.assert_allclose(per_image.numpy(), refs, atol=1e-4)


@pytest.mark.parametrize("name,gt,pred", depth_pairs(), ids=[p[0] for p in depth_pairs()])
def test_loss_ssim_equals_template_formula(name, gt, pred):
    x, y = as_batch(pred), as_batch(gt)
    assert float(ssim(x, y, data_range=1.0, padding="same")) == pytest.approx(template_ssim(x, y), abs=1e-4)


def test_loss_ssim_of_a_batch_equals_template_on_the_batch():
    pairs = depth_pairs()
    x = as_batch(*[p for _, _, p in pairs])
    y = as_batch(*[g for _, g, _ in pairs])
    assert float(ssim(x, y)) == pytest.approx(template_ssim(x, y), abs=1e-4)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_any_batch_size_gives_the_mean_of_single_images(batch, padding):
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 1, 24, 32, generator=g) * 20
    y = (x + torch.randn(batch, 1, 24, 32, generator=g)).clamp(0, 20)
    singles = [float(ssim(x[i : i + 1], y[i : i + 1], 20.0, padding)) for i in range(batch)]
    assert float(ssim(x, y, 20.0, padding)) == pytest.approx(np.mean(singles), abs=1e-6)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("data_range", [1.0, 20.0])
def test_identical_inputs_give_one(padding, data_range):
    x = torch.rand(3, 1, 32, 32) * 20
    assert float(ssim(x, x.clone(), data_range, padding)) == pytest.approx(1.0, abs=1e-5)
    flat = torch.full((1, 1, 16, 16), 7.0)
    assert float(ssim(flat, flat.clone(), data_range, padding)) == pytest.approx(1.0, abs=1e-5)


def test_ssim_map_shapes():
    x, y = torch.rand(2, 1, 30, 40), torch.rand(2, 1, 30, 40)
    assert ssim_map(x, y, padding="same").shape == (2, 1, 30, 40)
    assert ssim_map(x, y, padding="valid").shape == (2, 1, 20, 30)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_ssim_gradient_is_finite_and_nonzero(padding):
    y = torch.rand(2, 1, 32, 32) * 20
    x = (y + torch.randn_like(y)).requires_grad_(True)
    ssim(x, y, 20.0 if padding == "valid" else 1.0, padding).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ssim_runs_in_fp32_under_autocast():
    y = torch.rand(2, 1, 32, 32) * 20
    x = y + 0.1 * torch.randn_like(y)
    expected = float(ssim(x, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32
    # bf16 inputs round the maps themselves; fp32 statistics keep the result close.
    assert float(got) == pytest.approx(expected, abs=1e-2)


def test_ssim_rejects_bad_arguments():
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="padding"):
        ssim(x, x, padding="reflect")
    with pytest.raises(ValueError, match="shape"):
        ssim(x, torch.rand(1, 1, 16, 17))
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))


def test_rmse_over_every_pixel_of_the_batch():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.ones_like(pred)
    assert float(rmse(pred, target)) == pytest.approx(math.sqrt((0 + 1 + 4 + 9) / 4))
    # Pooled over the batch's pixels, not a mean of per-image RMSEs (which would be 1.0).
    pred = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    assert float(rmse(pred, torch.zeros_like(pred))) == pytest.approx(math.sqrt(2.0))


def test_depth_loss_is_rmse_plus_one_minus_ssim():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 32, 32, generator=g) * 20
    pred = (target + torch.randn(2, 1, 32, 32, generator=g)).requires_grad_(True)
    total, parts = DepthLoss()(pred, target)
    err = math.sqrt(float(((pred.detach() - target) ** 2).mean()))
    sim = template_ssim(pred.detach(), target)
    assert float(parts["rmse"]) == pytest.approx(err, rel=1e-5)
    assert float(parts["ssim"]) == pytest.approx(sim, abs=1e-4)
    assert float(total.detach()) == pytest.approx(err + 1 - sim, abs=1e-4)
    assert float(parts["loss"]) == float(total.detach())
    assert not any(v.requires_grad for v in parts.values())
    total.backward()
    assert torch.isfinite(pred.grad).all()

    weighted, _ = DepthLoss(alpha=2.0, beta=0.5)(pred.detach(), target)
    assert float(weighted) == pytest.approx(2 * err + 0.5 * (1 - sim), abs=1e-4)


# ------------------------------------------------------------------ edge and SILog terms (beyond the paper)
def maps(seed, shape=(2, 1, 16, 20)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 19 + 0.5


def test_gradient_loss_against_numpy():
    pred, gt = maps(0), maps(1)
    p, t = pred.numpy(), gt.numpy()
    expected = (np.abs(np.diff(p, axis=3) - np.diff(t, axis=3)).mean()
                + np.abs(np.diff(p, axis=2) - np.diff(t, axis=2)).mean())
    assert float(gradient_loss(pred, gt)) == pytest.approx(expected, rel=1e-5)
    assert float(gradient_loss(gt, gt)) == 0.0
    assert float(gradient_loss(gt + 3.0, gt)) == pytest.approx(0.0, abs=1e-5)  # an offset has no edges


def test_silog_against_numpy_and_its_mask():
    pred, gt = maps(2), maps(3)
    gt[0, 0, :4] = 0.0  # missing ground truth
    expected = []
    for p, t in zip(pred.numpy(), gt.numpy()):
        valid = t > 1e-3
        d = np.log(p[valid]) - np.log(t[valid])
        expected.append(np.sqrt((d**2).mean() - 0.85 * d.mean() ** 2))
    assert float(silog_loss(pred, gt)) == pytest.approx(np.mean(expected), rel=1e-5)
    changed = pred.clone()
    changed[0, 0, :4] = 7.0  # where gt is missing, the prediction does not matter
    assert float(silog_loss(changed, gt)) == pytest.approx(float(silog_loss(pred, gt)), rel=1e-6)


def test_silog_is_zero_on_identical_maps_with_finite_gradients_and_scale_invariant_at_lambda_one():
    pred, gt = maps(4), maps(5)
    same = gt.clone().requires_grad_(True)
    value = silog_loss(same, gt)
    value.backward()
    assert float(value.detach()) < 1e-5 and torch.isfinite(same.grad).all()
    assert float(silog_loss(pred, gt)) > 0.1
    base = float(silog_loss(pred, gt, lam=1.0))
    for c in (0.3, 2.0, 5.0):
        assert float(silog_loss(pred * c, gt, lam=1.0)) == pytest.approx(base, rel=1e-4)
    assert float(silog_loss(pred * 2.0, gt)) != pytest.approx(float(silog_loss(pred, gt)), rel=1e-3)


def test_depth_loss_with_zero_weights_is_the_papers_and_adds_weighted_terms_otherwise():
    pred, gt = maps(6), maps(7)
    paper_total, paper_parts = DepthLoss()(pred, gt)
    expected = rmse(pred, gt) + (1 - ssim(pred, gt, data_range=1.0, padding="same"))
    assert torch.equal(paper_total, expected)
    assert list(paper_parts) == ["loss", "rmse", "ssim"]
    total, parts = DepthLoss(grad_weight=0.5, silog_weight=2.0)(pred, gt)
    assert set(parts) == {"loss", "rmse", "ssim", "grad", "silog"}
    torch.testing.assert_close(total, expected + 0.5 * gradient_loss(pred, gt) + 2.0 * silog_loss(pred, gt))
    assert float(DepthLoss(grad_weight=1, silog_weight=1)(gt, gt)[1]["grad"]) == 0.0


# ------------------------------------------------------------------ the loss from sums and counts
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
