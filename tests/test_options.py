"""The options beyond the paper (issue 8): --encoder, --skips, --augment, --grad-weight, --silog-weight.

Each builds, trains a step and gives the documented shapes; augmentation keeps RGB and
depth aligned and never jitters depth; the loss terms match independent computations; and
with every option off the paper preset is unchanged.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torchvision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import main  # noqa: E402
from dataset import augment_pair  # noqa: E402
from losses import DepthLoss, gradient_loss, rmse, silog_loss, ssim  # noqa: E402
from model import ENCODERS, DepthNet  # noqa: E402
from synthetic import generate_dataset  # noqa: E402
from train import Trainer  # noqa: E402
from utils import UserError, load_checkpoint, save_checkpoint  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond_data")
    generate_dataset(root, 4, 2, 0, seed=0, height=64, width=96, progress=False)
    return str(root)


# ------------------------------------------------------------------ model
def test_encoder_names_in_main_match_model():
    assert main.ENCODER_NAMES == tuple(ENCODERS)


def test_defaults_keep_the_paper_preset():
    opts = main.parse_options([])
    assert (opts.encoder, opts.skips, opts.augment, opts.grad_weight, opts.silog_weight, opts.image_size) == \
        ("resnet34", False, False, 0.0, 0.0, 224)


def test_default_model_is_the_papers_resnet34_with_the_same_initialisation():
    torch.manual_seed(3)
    model = DepthNet()
    torch.manual_seed(3)
    resnet = torchvision.models.resnet34(weights=None)
    encoder_state = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    names = list(model.state_dict())
    assert names[: len(encoder_state)] == [f"encoder.{i}" + k[k.index("."):] for i, k in
                                           zip(index_children(resnet, encoder_state), encoder_state)]
    assert all(n.startswith("decoder.") for n in names[len(encoder_state):])
    for (_, a), b in zip(list(model.state_dict().items())[: len(encoder_state)], encoder_state.values()):
        assert torch.equal(a, b)
    assert not model.skips and model.decoder[0][0].in_channels == 512


def index_children(resnet, state):
    """Position of each key's top-level child in the ResNet: the encoder.N prefix it must get."""
    order = [name for name, _ in resnet.named_children()]
    return [order.index(k.split(".")[0]) for k in state]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_each_encoder_with_skips_trains_a_step_and_keeps_its_stem_frozen(name):
    torch.manual_seed(0)
    spec = ENCODERS[name]
    model = DepthNet(encoder=name, skips=True, init_depth=8.0)
    assert model.decoder[0][0].in_channels == spec.out_channels
    # The declared taps are where the encoder reaches 1/16, 1/8, 1/4 and 1/2 of the input, with those channels.
    x, shapes = torch.rand(1, 3, SIZE, SIZE), {}
    with torch.no_grad():
        for i, layer in enumerate(model.eval().encoder):
            x = layer(x)
            shapes[i] = tuple(x.shape[1:])
    assert shapes[len(model.encoder) - 1] == (spec.out_channels, SIZE // 32, SIZE // 32)
    for tap, channels, scale in zip(spec.taps, spec.skip_channels, (16, 8, 4, 2)):
        assert channels == 0 if tap is None else shapes[tap] == (channels, SIZE // scale, SIZE // scale)

    model.train()
    stem_before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    decoder_before = model.decoder[0][0].weight.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pred = model(torch.rand(2, 3, SIZE, SIZE))
    assert pred.shape == (2, 1, SIZE, SIZE)
    loss, _ = DepthLoss(grad_weight=1.0, silog_weight=1.0)(pred, torch.rand(2, 1, SIZE, SIZE) * 20)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, model.stem.state_dict()[k]) for k, v in stem_before.items())  # BN statistics too
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert not torch.equal(decoder_before, model.decoder[0][0].weight)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_each_encoder_without_skips_gives_full_size_depth(name):
    model = DepthNet(encoder=name).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, SIZE, 96)).shape == (1, 1, SIZE, 96)


def test_unknown_encoder_is_a_user_error():
    with pytest.raises(UserError, match="unknown encoder 'vgg16'"):
        DepthNet(encoder="vgg16")


def test_offline_imagenet_error_names_the_encoder(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(UserError, match="could not load ImageNet weights for EfficientNet-B0"):
        DepthNet(weights="imagenet", encoder="efficientnet_b0")


def test_weights_path_loads_that_encoders_state_dict(tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    path = str(tmp_path / "r18.pth")
    torch.save(net.state_dict(), path)
    model = DepthNet(weights=path, encoder="resnet18")
    assert torch.equal(model.encoder[4][0].conv1.weight, net.layer1[0].conv1.weight)
    with pytest.raises(UserError, match="is not a ResNet-50 state dict.*other shapes"):
        DepthNet(weights=path, encoder="resnet50")


def test_checkpoint_rebuilds_encoder_and_skips(tmp_path):
    torch.manual_seed(0)
    model = DepthNet(encoder="efficientnet_b0", skips=True, init_depth=4.0).eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "init_depth": 4.0,
                     "config": {"encoder": "efficientnet_b0", "skips": True}}, path)
    loaded, _ = DepthNet.from_checkpoint(path)
    loaded.eval()
    assert loaded.encoder_name == "efficientnet_b0" and loaded.skips
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_without_architecture_config_is_the_paper_model(tmp_path):
    model = DepthNet()
    path = str(tmp_path / "old.pt")
    save_checkpoint({"model": model.state_dict(), "config": {"lr": 1e-3}}, path)
    loaded, _ = DepthNet.from_checkpoint(path)
    assert loaded.encoder_name == "resnet34" and not loaded.skips


def test_trainer_with_every_option_trains_and_checkpoints_the_architecture(small_data, tmp_path):
    opts = main.parse_options([
        "--data-dir", small_data, "--run-dir", str(tmp_path / "run"), "--weights", "none", "--encoder", "resnet18",
        "--skips", "--augment", "--grad-weight", "0.5", "--silog-weight", "2", "--image-size", str(SIZE),
        "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--vis-every", "2", "--workers", "0",
        "--amp", "off", "--quiet"])
    trainer = Trainer(opts)
    rgb, depth = next(iter(trainer.make_loader()))
    assert rgb.shape == (2, 3, SIZE, SIZE)
    augmented = trainer.augment_batch(rgb, depth)
    assert torch.equal(trainer.augment_batch(rgb, depth)[0], augmented[0])  # a function of (seed, step): resumable
    trainer.step = 1
    assert not torch.equal(trainer.augment_batch(rgb, depth)[0], augmented[0])
    trainer.step = 0
    parts, pred = trainer.process_batch(*augmented)
    assert set(parts) == {"loss", "rmse", "ssim", "grad", "silog"}
    assert pred.shape == (2, 1, SIZE, SIZE)
    trainer.train()
    assert trainer.step == 2
    assert os.path.isfile(tmp_path / "run" / "vis" / "train_step000002.png")
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ckpt["config"]["encoder"] == "resnet18" and ckpt["config"]["skips"] is True
    model, _ = DepthNet.from_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert model.encoder_name == "resnet18" and model.skips


def test_bad_option_values_are_rejected(capsys):
    for argv in (["--image-size", "100"], ["--grad-weight", "-1"], ["--encoder", "vgg16"]):
        with pytest.raises(SystemExit):
            main.parse_options(argv)
    assert "--image-size must be a positive multiple of 32" in capsys.readouterr().err


# ------------------------------------------------------------ augmentation
def asymmetric_pair(b=16, h=24, w=40):
    """RGB with a left-to-right ramp and random texture; depth = 20 × its red channel."""
    g = torch.Generator().manual_seed(5)
    rgb = torch.rand(b, 3, h, w, generator=g) * 0.5 + torch.linspace(0, 0.5, w).view(1, 1, 1, w)
    return rgb, 20 * rgb[:, :1].clone()


def test_flip_keeps_an_asymmetric_pair_a_pair():
    rgb, depth = asymmetric_pair()
    out_rgb, out_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(0), max_scale=1.0, jitter=0.0)
    flipped = [torch.allclose(out_rgb[i], rgb[i].flip(-1), atol=1e-5) for i in range(len(rgb))]
    kept = [torch.allclose(out_rgb[i], rgb[i], atol=1e-5) for i in range(len(rgb))]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 0 < sum(flipped) < len(rgb)
    for i in range(len(rgb)):
        expected = depth[i].flip(-1) if flipped[i] else depth[i]
        torch.testing.assert_close(out_depth[i], expected, atol=2e-5, rtol=0)


def test_zoom_and_flip_move_rgb_and_depth_together_without_borders():
    rgb, depth = asymmetric_pair()
    out_rgb, out_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(1), jitter=0.0)
    assert out_rgb.shape == rgb.shape and out_depth.shape == depth.shape
    assert not torch.allclose(out_rgb, rgb)
    torch.testing.assert_close(out_depth, 20 * out_rgb[:, :1], atol=1e-4, rtol=0)
    const_rgb, const_depth = torch.full((4, 3, 24, 40), 0.5), torch.full((4, 1, 24, 40), 7.0)
    zoomed_rgb, zoomed_depth = augment_pair(const_rgb, const_depth, torch.Generator().manual_seed(2), max_scale=1.5, jitter=0.0)
    torch.testing.assert_close(zoomed_depth, const_depth)  # no black (zero) border anywhere
    torch.testing.assert_close(zoomed_rgb, const_rgb)


def test_colour_jitter_changes_rgb_only():
    rgb, depth = asymmetric_pair()
    plain_rgb, plain_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(4), jitter=0.0)
    jit_rgb, jit_depth = augment_pair(rgb, depth, torch.Generator().manual_seed(4), jitter=0.3)
    assert torch.equal(jit_depth, plain_depth)
    assert (jit_rgb - plain_rgb).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image jittered
    assert jit_rgb.min() >= 0 and jit_rgb.max() <= 1


def test_augmentation_is_deterministic_and_takes_single_samples():
    rgb, depth = asymmetric_pair(b=1)
    a = augment_pair(rgb[0], depth[0], torch.Generator().manual_seed(9))
    b = augment_pair(rgb[0], depth[0], torch.Generator().manual_seed(9))
    assert a[0].shape == (3, 24, 40) and a[1].shape == (1, 24, 40)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(9)
    c = augment_pair(rgb[0], depth[0])  # the global RNG, as the Trainer uses it
    assert torch.equal(a[0], c[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_on_cuda_matches_cpu():
    rgb, depth = asymmetric_pair()
    cpu = augment_pair(rgb, depth, torch.Generator().manual_seed(3))
    gpu = augment_pair(rgb.cuda(), depth.cuda(), torch.Generator().manual_seed(3))
    assert gpu[0].is_cuda
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-3, rtol=0)


# ------------------------------------------------------------------ losses
def maps(seed, shape=(2, 1, 16, 20)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 19 + 0.5


def test_gradient_loss_against_numpy():
    pred, gt = maps(0), maps(1)
    p, t = pred.numpy(), gt.numpy()
    expected = np.abs(np.diff(p, axis=3) - np.diff(t, axis=3)).mean() + np.abs(np.diff(p, axis=2) - np.diff(t, axis=2)).mean()
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
