"""DepthNet: a ResNet-34 encoder with a frozen stem and a transposed-convolution decoder.

The layout follows the paper (Table I) as its author's code built it (SPEC §1):
BatchNorm + ReLU only after the first four transposed convolutions; the 1 × 1
convolutions, the fifth transposed convolution and the output convolution are plain.
"""
import os

import torch
import torch.nn as nn
import torchvision

from utils import CheckpointError, UserError, load_checkpoint, torch_load_safely

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# conv1, bn1, relu, maxpool: the first four children of a torchvision ResNet.
FROZEN_STEM_CHILDREN = 4


def up_block(in_ch, out_ch, norm_act=True):
    """A ×2 transposed convolution (k4 s2 p1), optionally followed by BatchNorm + ReLU."""
    layers = [nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)]
    if norm_act:
        layers += [nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Decoder(nn.Sequential):
    """512 × 7 × 7 → 1 × 224 × 224, exactly SPEC §1's table."""

    def __init__(self, in_ch=512):
        super().__init__(
            up_block(in_ch, 256),
            up_block(256, 128),
            nn.Conv2d(128, 128, kernel_size=1),
            up_block(128, 64),
            up_block(64, 32),
            nn.Conv2d(32, 32, kernel_size=1),
            up_block(32, 1, norm_act=False),
            nn.Conv2d(1, 1, kernel_size=1),
        )

    @property
    def output_conv(self):
        return self[-1]


def build_resnet34(weights):
    """torchvision ResNet-34 with ImageNet weights, a local state dict, or random weights.

    weights: None / "none" (random), "imagenet" (IMAGENET1K_V1 from torchvision's
    cache, downloading if allowed) or a path to a ResNet-34 state dict.
    """
    if weights in (None, "none"):
        return torchvision.models.resnet34(weights=None)
    if weights == "imagenet":
        try:
            return torchvision.models.resnet34(weights=torchvision.models.ResNet34_Weights.IMAGENET1K_V1)
        except Exception as err:  # URLError, socket errors, SSL errors: all mean "not cached, offline"
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise UserError(
                f"could not load ImageNet weights for ResNet-34 (not in {cache} and download failed: "
                f"{type(err).__name__}); use --weights none for random initialisation, or "
                f"--weights PATH with a ResNet-34 state dict"
            ) from None
    if not os.path.isfile(weights):
        raise UserError(f"--weights {weights}: no such file (expected 'imagenet', 'none' or a path)")
    net = torchvision.models.resnet34(weights=None)
    state = torch_load_safely(weights)
    if not isinstance(state, dict):
        raise UserError(f"--weights {weights} is not a state dict (it holds a {type(state).__name__})")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"{weights} is not a ResNet-34 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net


class DepthNet(nn.Module):
    """RGB in [0, 1] (B, 3, H, W), H and W multiples of 32 → depth in metres (B, 1, H, W)."""

    def __init__(self, weights=None, init_depth=0.0):
        super().__init__()
        resnet = build_resnet34(weights)
        # Everything up to layer4; avgpool and fc are for classification only.
        self.encoder = nn.Sequential(*list(resnet.children())[:-2])
        self.decoder = Decoder(512)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.stem.parameters():
            p.requires_grad_(False)
        # Without this the output starts near 0 m and Adam needs hundreds of steps
        # (about lr per step) just to reach the data's scale.
        nn.init.constant_(self.decoder.output_conv.bias, float(init_depth))

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """A trained DepthNet from a checkpoint of this project; (model, checkpoint dict)."""
        ckpt = load_checkpoint(path, map_location)
        model = cls(weights=None, init_depth=ckpt.get("init_depth", 0.0))
        load_weights(model, ckpt["model"], path)
        return model, ckpt

    @property
    def stem(self):
        return self.encoder[:FROZEN_STEM_CHILDREN]

    def train(self, mode=True):
        super().train(mode)
        # "Frozen" means the stem's BatchNorm statistics stay fixed too.
        self.stem.eval()
        return self

    def forward(self, rgb):
        x = (rgb - self.mean) / self.std
        return self.decoder(self.encoder(x))


def load_weights(model, state, source):
    """load_state_dict that names the differing keys when a checkpoint is of another architecture."""
    expected, given = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} holds another architecture: {len(missing)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"{source} holds another architecture: {'; '.join(shapes[:3]) or err}") from None


def count_parameters(model):
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
