"""DepthNet against docs/design.md §1-§4: decoder layout, frozen stem, normalisation, output bias, --weights."""
import os
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

from checkpoint import save_checkpoint
from inference import FlipAveraged, InferenceModel, load
from losses import DepthLoss
from model import ENCODERS, DepthNet, imagenet_weights_path, load_weights
from utils import CheckpointError, UserError

# The table of docs/design.md §1, one row per layer: (kind, out channels, out size, followed by BN + ReLU).
DECODER_TABLE = [
    ("up", 256, 14, True),
    ("up", 128, 28, True),
    ("1x1", 128, 28, False),
    ("up", 64, 56, True),
    ("up", 32, 112, True),
    ("1x1", 32, 112, False),
    ("up", 1, 224, False),
    ("1x1", 1, 224, False),  # the output, in metres
]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return DepthNet(weights=None, init_depth=0.0)


def leaves(module):
    """Modules without children, in registration order (= forward order for nested Sequentials)."""
    return [m for m in module.modules() if not list(m.children())]


def group_rows(layers):
    """Split the decoder's leaf layers into table rows: a convolution plus what follows it."""
    rows = []
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            rows.append([layer])
        else:
            rows[-1].append(layer)
    return rows


def test_decoder_matches_spec_table_layer_by_layer(net):
    layers = leaves(net.decoder)
    rows = group_rows(layers)
    assert len(rows) == len(DECODER_TABLE)
    x = torch.randn(2, 512, 7, 7)
    in_ch = 512
    with torch.no_grad():
        for row, (kind, out_ch, size, norm_act) in zip(rows, DECODER_TABLE):
            conv = row[0]
            if kind == "up":
                assert type(conv) is nn.ConvTranspose2d
                assert (conv.kernel_size, conv.stride, conv.padding) == ((4, 4), (2, 2), (1, 1))
            else:
                assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
            assert (conv.in_channels, conv.out_channels) == (in_ch, out_ch)
            assert conv.bias is not None
            followers = [type(m) for m in row[1:]]
            assert followers == ([nn.BatchNorm2d, nn.ReLU] if norm_act else [])
            if norm_act:
                assert row[1].num_features == out_ch
            for layer in row:
                x = layer(x)
                assert x.shape == (2, out_ch, size, size)
            in_ch = out_ch
        # The walk above is the decoder's own forward order.
        net.eval()
        x = torch.randn(2, 512, 7, 7)
        walked = x
        for layer in layers:
            walked = layer(walked)
        assert torch.equal(walked, net.decoder(x))


def test_decoder_output_conv_is_last_layer(net):
    assert net.decoder.output_conv is leaves(net.decoder)[-1]


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(net, batch):
    net.train(batch > 1)  # batch 1 in eval mode, batch 3 through training-mode BatchNorm
    with torch.no_grad():
        out = net(torch.rand(batch, 3, 224, 224))
    assert out.shape == (batch, 1, 224, 224)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_encoder_is_resnet34_without_pool_and_fc(net):
    names = [n for n, _ in net.encoder.named_children()]
    assert names == ["0", "1", "2", "3", "4", "5", "6", "7"]
    assert not any(isinstance(m, (nn.Linear, nn.AdaptiveAvgPool2d)) for m in net.encoder.modules())
    net.eval()
    with torch.no_grad():
        assert net.encoder(torch.rand(1, 3, 224, 224)).shape == (1, 512, 7, 7)


def test_stem_frozen_and_everything_else_trainable():
    torch.manual_seed(0)
    model = DepthNet(weights=None, init_depth=5.0)
    conv1, bn1 = model.encoder[0], model.encoder[1]
    assert isinstance(conv1, nn.Conv2d) and isinstance(bn1, nn.BatchNorm2d)
    frozen = {id(p) for p in list(conv1.parameters()) + list(bn1.parameters())}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) not in frozen), name

    def stem_state():
        return {f"{name}.{k}": v.clone() for name, m in (("conv1", conv1), ("bn1", bn1))
                for k, v in m.state_dict().items()}

    stem_before = stem_state()
    other_bn = model.encoder[4][0].bn1  # layer1's first BatchNorm: its statistics must move
    other_before = other_bn.running_mean.clone()
    dec_before = model.decoder[0][0].weight.clone()

    model.train()
    assert not bn1.training and model.decoder[0][1].training
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(torch.rand(2, 3, 64, 64))
    out.mean().backward()
    opt.step()

    stem_after = stem_state()
    assert "bn1.running_mean" in stem_after and "bn1.num_batches_tracked" in stem_after
    for k, v in stem_after.items():
        assert torch.equal(v, stem_before[k]), k
    assert conv1.weight.grad is None
    assert not torch.equal(other_bn.running_mean, other_before)
    assert not torch.equal(model.decoder[0][0].weight, dec_before)


def test_train_stem_trains_conv1_and_moves_bn1_statistics():
    torch.manual_seed(0)
    model = DepthNet(weights=None, init_depth=5.0, train_stem=True)
    conv1, bn1 = model.encoder[0], model.encoder[1]
    assert all(p.requires_grad for p in model.parameters())
    weight_before, mean_before = conv1.weight.clone(), bn1.running_mean.clone()
    model.eval().train()
    assert bn1.training
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    opt.step()
    assert not torch.equal(conv1.weight, weight_before)
    assert not torch.equal(bn1.running_mean, mean_before)
    assert set(model.model_args) == {"encoder", "skips", "init_depth"}, "the same network: its checkpoint is unchanged"


def test_stem_stays_in_eval_mode_after_eval_then_train(net):
    net.eval()
    net.train()
    assert net.training and not net.encoder[1].training and net.encoder[4].training


def test_imagenet_normalisation_inside_the_model(net):
    net.eval()
    x = torch.rand(2, 3, 64, 96)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net.decoder(net.encoder((x - mean) / std))
        unnormalised = net.decoder(net.encoder(x))
        out = net(x)
    assert out.shape == (2, 1, 64, 96)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - unnormalised).abs().max() > 1e-3


def test_output_bias_is_init_depth():
    model = DepthNet(weights=None, init_depth=7.25).eval()
    assert model.decoder.output_conv.bias.item() == pytest.approx(7.25)
    with torch.no_grad():
        model.decoder.output_conv.weight.zero_()
        out = model(torch.rand(1, 3, 64, 64))
    torch.testing.assert_close(out, torch.full_like(out, 7.25))


def test_load_restores_weights_and_init_depth(tmp_path, net):

    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": net.state_dict(), "init_depth": 3.5}, str(path))
    loaded = load(str(path), "cpu").net
    assert loaded.model_args["init_depth"] == 3.5
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_weights_names_keys_of_another_architecture(net):
    state = dict(net.state_dict())
    state.pop("decoder.7.bias")
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"decoder\.7\.bias.*head\.weight"):
        load_weights(net, state, "other.pt")
    state = dict(net.state_dict())
    state["decoder.7.weight"] = torch.zeros(2, 1, 1, 1)
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_weights(net, state, "other.pt")


def test_weights_training_checkpoint_starts_encoder_and_decoder(tmp_path, net):

    path = tmp_path / "best.pt"
    save_checkpoint({"model": net.state_dict(), "config": {"encoder": "resnet34"}, "init_depth": 3.5}, str(path))
    torch.manual_seed(5)  # another random draw than net's: equality below can only come from the file
    model = DepthNet(weights=str(path), init_depth=9.0)
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(not p.requires_grad for p in model.stem.parameters()), "the stem stays frozen when fine-tuning"
    # A checkpoint of another architecture is refused with its differing keys named.
    with pytest.raises(CheckpointError, match=r"best\.pt holds another architecture"):
        DepthNet(weights=str(path), skips=True)


def test_weights_missing_file_is_user_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=r"nope\.pth.*no such file"):
        DepthNet(weights=str(missing))


def test_weights_state_dict_file_loads(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet34(weights=None)
    path = tmp_path / "r34.pth"
    torch.save(reference.state_dict(), path)
    model = DepthNet(weights=str(path))
    ref_state = reference.state_dict()
    for k, v in model.encoder.state_dict().items():
        # encoder children are numbered 0..7 in place of conv1, bn1, relu, maxpool, layer1..4
        assert torch.equal(v, ref_state[encoder_key_to_resnet(k)]), k


def encoder_key_to_resnet(key):
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    index, rest = key.split(".", 1)
    return f"{names[int(index)]}.{rest}"


def test_weights_state_dict_of_another_network_is_user_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="not a ResNet-34 state dict"):
        DepthNet(weights=str(path))


def test_weights_corrupt_file_is_user_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(UserError, match=r"broken\.pth"):
        DepthNet(weights=str(path))


def test_weights_imagenet_offline_is_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    # torch.hub downloads through its own `urlopen`; torchvision calls torch.hub.
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(UserError) as info:
        DepthNet(weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "--weights none" in message and "URLError" in message and "no network in this test" in message
    assert "the download failed" in message and "ImageNet weights for ResNet-34" in message  # the encoder named


def test_weights_imagenet_from_a_damaged_cached_file_names_the_file_and_the_real_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = imagenet_weights_path("resnet34")
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as f:
        f.write(b"PK\x03\x04 half a download")
    with pytest.raises(UserError) as info:
        DepthNet(weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert f"the cached file {cached} could not be read" in message and "delete it" in message
    cause = message.split("could not be read (", 1)[1]
    assert cause.split(":", 1)[0] in ("RuntimeError", "UnpicklingError", "EOFError", "BadZipFile") and len(cause) > 40


def test_weights_file_holding_no_dict_is_user_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match=r"tensor\.pth.*not a state dict"):
        DepthNet(weights=str(path))


def test_importing_the_model_loads_no_plotting_library_pillow_or_data_layer():
    """Building a network needs no matplotlib, no Pillow and no data code: model.py (and what it imports) loads
    none of them, so that the network is a module of its own (torchvision, which loads Pillow, comes only when
    a network is built)."""
    import subprocess
    import sys

    from conftest import REPO, SUBPROCESS_ENV

    code = "import sys, model; print(*(m in sys.modules for m in ('matplotlib', 'PIL', 'dataset', 'torchvision')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"] * 4


@pytest.mark.parametrize("encoder", ["resnet34", "efficientnet_b0"])
def test_a_freshly_built_model_keeps_its_stem_statistics_on_a_training_forward(encoder):
    """Whoever builds the model, without calling .train() first: the stem's BatchNorm statistics stay put."""
    torch.manual_seed(0)
    model = DepthNet(weights=None, encoder=encoder)
    assert model.training
    stem_before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    stem_prefixes = tuple(f"encoder.{i}." for i in range(model.stem_children))
    others_before = {k: v.clone() for k, v in model.state_dict().items()
                     if "running_mean" in k and not k.startswith(stem_prefixes)}
    model(torch.rand(2, 3, 64, 64))
    assert any("running_mean" in k for k in stem_before)
    for k, v in model.stem.state_dict().items():
        assert torch.equal(v, stem_before[k]), k
    moved = [k for k, v in model.state_dict().items() if k in others_before and not torch.equal(v, others_before[k])]
    assert moved, "the other BatchNorm layers do train"


# ------------------------------------------------------------------ encoders and skips (beyond the paper)
SIZE = 64


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
    loaded = load(path, "cpu", channels_last=False).net  # the layout the model above computes in
    assert loaded.encoder_name == "efficientnet_b0" and loaded.skips
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_without_architecture_config_is_the_paper_model(tmp_path):
    model = DepthNet()
    path = str(tmp_path / "old.pt")
    save_checkpoint({"model": model.state_dict(), "config": {"lr": 1e-3}}, path)
    loaded = load(path, "cpu").net
    assert loaded.encoder_name == "resnet34" and not loaded.skips


# ------------------------------------------------------------------ InferenceModel
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
    # The depth map itself is made in fp32: it is not rounded to bf16's 3 cm steps at 8 m.
    assert fast.net.decoder.output_conv.weight.dtype == torch.float32
    assert not torch.equal(got, got.bfloat16().float())
    assert float((got - expected).abs().mean()) < 0.01
    fast.train()
    assert not fast.net.training  # its BatchNorm statistics never move
    with torch.no_grad():
        model.decoder.output_conv.bias += 1.0  # the copy shares nothing with the original
        assert torch.equal(fast(rgb), got)



class ColumnRamp(nn.Module):
    """A stand-in network that is not mirror-symmetric: red channel plus the column index."""

    def forward(self, rgb):
        return rgb[:, :1] + torch.arange(rgb.shape[-1], dtype=rgb.dtype)


def test_flip_averaged_is_the_mean_of_the_pass_and_the_mirrored_pass(net):
    x = torch.rand(2, 3, 4, 6)
    # red + the mean of a column's index and its mirror's: red + (W - 1) / 2 at every pixel
    torch.testing.assert_close(FlipAveraged(ColumnRamp())(x), x[:, :1] + 2.5)
    # whatever the network, the averaged one mirrors its output when the input is mirrored
    rgb = torch.rand(1, 3, 64, 96)
    flipped = FlipAveraged(net.eval())
    with torch.no_grad():
        torch.testing.assert_close(flipped(rgb.flip(-1)), flipped(rgb).flip(-1))
        assert not torch.allclose(net(rgb.flip(-1)), net(rgb).flip(-1), atol=1e-3)  # which the network alone does not
