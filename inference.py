"""A trained model, in one place: load a checkpoint for inference and run it on a batch or an image.

--eval, --predict (images and video), the web page and --export all get their model here, so
that they cannot drift apart. Everything about the network comes from the checkpoint (its
architecture, input size and weights, the moving average under --ema): nothing is typed again.
Several checkpoints make one model, their Ensemble, wherever one can be used except --export.
"""
import copy
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import input_size, trained_depth
from dataset import MAX_DEPTH, input_hw, to_model_input
from hardware import autocast, select_amp_dtype, select_device
from model import DepthNet
from utils import UserError


class Trained(NamedTuple):
    """A trained model ready to run: the network, the input size to feed it (S or (H, W)), its device, and
    the depth conventions it was trained with ({min_depth, max_depth, depth_scale})."""

    model: nn.Module
    size: object
    device: torch.device
    depth: dict


def load_trained(paths, device="auto", size=None, channels_last=True):
    """Trained(the DepthNet of `paths`, or their Ensemble, in eval mode on its device, input size, device, depth
    conventions).

    paths: one checkpoint, or several whose depth maps are averaged (an Ensemble). size: the input
    size to feed it; None: the size it was trained at. channels_last or contiguous: --eval takes
    training's layout, so that it computes exactly what the validation during training did.
    """
    members = load_members(paths, device, size, channels_last)
    return members[0]._replace(model=averaged([m.model for m in members]))


def load_predictor(paths, device="auto", amp="auto", size=None, channels_last=True, flip=False):
    """load_trained for --predict, video and the web page: the fast path, an InferenceModel whose weights are
    cast once to the --amp dtype (auto: bf16 where the hardware runs it, else fp32). Depth then differs from
    fp32 by about a centimetre. flip: averaged with the mirror image's (--flip)."""
    members = load_members(paths, device, size, channels_last)
    dtype = select_amp_dtype(amp, members[0].device)
    model = averaged([InferenceModel(m.model, dtype, channels_last=channels_last) for m in members])
    return members[0]._replace(model=with_flip(model, flip))


def load_members(paths, device, size, channels_last):
    """A Trained for each checkpoint in `paths` (one path or several), each on `device` in eval mode.

    Several are averaged pixel by pixel, so they must agree on what a pixel means: the same input size
    (unless `size` feeds them all one) and the same depth conventions; otherwise a UserError names both.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    device = select_device(device) if isinstance(device, str) else device
    members = []
    for path in paths:
        model, ckpt = DepthNet.from_checkpoint(path)
        model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
        members.append(Trained(model, size or input_size(ckpt), device, trained_depth(ckpt)))
    first = members[0]
    for path, member in zip(paths[1:], members[1:]):
        if input_hw(member.size) != input_hw(first.size):
            raise UserError("{} was trained at {} x {} and {} at {} x {}: checkpoints averaged together need one input "
                            "size (--image-size feeds them all one)".format(path, *input_hw(member.size), paths[0],
                                                                            *input_hw(first.size)))
        if member.depth != first.depth:
            raise UserError(f"{path} was trained with the depth conventions {member.depth} and {paths[0]} with "
                            f"{first.depth}: checkpoints averaged together must agree")
    return members


def averaged(models):
    """The one model, or the Ensemble of several."""
    return models[0] if len(models) == 1 else Ensemble(models)


def with_flip(model, flip):
    """The model, or with --flip the mean of its depth for each image and for its mirror image."""
    return FlipAveraged(model) if flip else model


@torch.no_grad()
def predict_batch(model, rgb, amp_dtype=None):
    """Raw fp32 predictions of a batch, optionally computed under autocast."""
    with autocast(rgb.device.type, amp_dtype):
        return model(rgb).float()


@torch.no_grad()
def predict_depth(model, inputs, sizes, amp_dtype=None, max_depth=MAX_DEPTH):
    """Depth in metres of a (B, 3, H, W) batch, each resized to its (H, W) in `sizes` and clamped to
    [0, max_depth] as the standard protocol does (docs/design.md §8): a list of float32 HW arrays."""
    pred = predict_batch(model, inputs, amp_dtype)
    depths = []
    for p, (h, w) in zip(pred, sizes):
        d = F.interpolate(p[None], size=(int(h), int(w)), mode="bilinear", align_corners=False)
        depths.append(d[0, 0].clamp_(0.0, max_depth).cpu().numpy())
    return depths


def infer_image(model, rgb, size, device, max_depth=MAX_DEPTH, shown=None):
    """Depth in metres of one HWC uint8 image at its own size, or at `shown` (H, W) for a photo decoded smaller
    (dataset.read_picture): predict_depth for a batch of one."""
    inputs = to_model_input(rgb, size)[None].to(device)
    return predict_depth(model, inputs, [shown or rgb.shape[:2]], max_depth=max_depth)[0]


class FullPrecision(nn.Module):
    """Runs `layer` in fp32, whatever the dtype of its input."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer.float()

    def forward(self, x):
        return self.layer(x.float())


class InferenceModel(nn.Module):
    """A frozen copy of a DepthNet for prediction: weights cast once to `dtype`, NHWC layout.

    Takes and returns float32 like DepthNet (RGB in [0, 1] → metres). Casting the weights
    once is faster than autocast, which casts every weight again on every call (bench.py
    measures this path against the fp32 model). The decoder's last two layers, which make
    the single-channel depth map and cost a few MFLOP, stay in fp32: in bf16 the depth itself
    would be rounded to 8 significant bits (6 cm steps at 10 m). Predictions then differ from
    fp32 by the bf16 rounding of the features, about a centimetre. --predict runs this;
    evaluation scores the fp32 model (docs/design.md §8).
    """

    def __init__(self, model, dtype=None, channels_last=True):
        super().__init__()
        self.dtype = dtype or torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = copy.deepcopy(model).eval().requires_grad_(False).to(self.dtype).to(memory_format=self.memory_format)
        if self.dtype != torch.float32:
            decoder = self.net.decoder
            decoder[-2], decoder[-1] = FullPrecision(decoder[-2]), decoder[-1].float()

    def train(self, mode=True):
        return super().train(False)  # BatchNorm keeps its statistics: this copy never trains

    def forward(self, rgb):
        return self.net(rgb.to(self.dtype).contiguous(memory_format=self.memory_format)).float()


class Ensemble(nn.Module):
    """The mean depth map of several trained models (--ckpt A.pt B.pt ...): one forward pass per model.

    Networks trained from different seeds make partly different errors, and their mean is the
    simplest ensemble. On the real val, ten runs of the --demo preset averaged score 4 % below their
    mean run and level with the best of them (docs/real.md): the runs share most of their errors.
    """

    def __init__(self, models):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, rgb):
        return torch.stack([member(rgb) for member in self.members]).mean(0)


class FlipAveraged(nn.Module):
    """Test-time flipping: the mean of a model's depth for an image and, mirrored back, for its mirror image.

    A scene seen in a mirror has the mirrored depth map, so the two passes are two estimates of
    one map whose errors differ; their mean is the usual test-time augmentation of monocular
    depth (AdaBins evaluates so; Monodepth2's post-processing adds ramps at the edges). Two
    forward passes per image. Opt-in (--flip): the paper's protocol scores one pass.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, rgb):
        return 0.5 * (self.model(rgb) + self.model(rgb.flip(-1)).flip(-1))
