"""A trained model, in one place: `load` a checkpoint, a model folder or a Hub id (or several) and run it.

--eval, --predict (images and video), the web page and --export all get their model from
`load`, so that they cannot drift apart. Everything about the network comes from the
checkpoint (its architecture, input size, depth conventions and weights, the moving average
under --ema): nothing is typed again. What the user does type (--image-size, --min-depth,
--max-depth, --depth-scale) replaces the checkpoint's value here, and only here. Several
checkpoints make one model, their Ensemble, wherever one can be used except --export.
"""
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import input_size, model_args, network_state, trained_conventions
from dataset import input_hw, to_model_input
from hardware import autocast, select_amp_dtype, select_device
from model import build_trained
from pretrained import open_trained
from utils import UserError


def load(paths, device="auto", dtype=None, flip=False, size=None, conventions=None, channels_last=True):
    """The Predictor of checkpoint `paths` (one path, or several whose depth maps are averaged: an Ensemble).

    dtype: None runs the network in fp32 as it trained (what --eval scores); an --amp name
    ("auto", "bf16", "fp16", "off") casts a frozen copy's weights once (InferenceModel), the fast
    path of --predict and the page ("auto": bf16 where the hardware runs it). flip: each image's
    depth averaged with its mirror image's (--flip). size and conventions ({field: value}, None
    values ignored): what the user typed, over what the checkpoint was trained with.
    channels_last or contiguous: --eval takes training's layout, so that it computes exactly what
    the validation during training did.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    device = select_device(device) if isinstance(device, str) else device
    layout = torch.channels_last if channels_last else torch.contiguous_format
    nets, sizes, trained = [], [], []
    for path in paths:
        ckpt = open_trained(path)  # a checkpoint file, a model folder or a Hub id
        nets.append(build_trained(model_args(ckpt), network_state(ckpt), path).to(device, memory_format=layout).eval())
        sizes.append(size or input_size(ckpt))
        trained.append(trained_conventions(ckpt))
    check_members_agree(paths, sizes, trained)
    resolved = trained[0].typed_over(conventions, paths[0])
    amp_dtype = None if dtype is None else select_amp_dtype(dtype, device)
    if dtype is not None:
        nets = [InferenceModel(net, amp_dtype, channels_last=channels_last, copy_model=False) for net in nets]
    net = nets[0] if len(nets) == 1 else Ensemble(nets)
    return Predictor(FlipAveraged(net) if flip else net, sizes[0], device, resolved)


def check_members_agree(paths, sizes, conventions):
    """Checkpoints averaged pixel by pixel must agree on what a pixel means: one input size (unless `size`
    feeds them all one) and one set of depth conventions; otherwise a UserError names both files."""
    for path, size, convention in zip(paths[1:], sizes[1:], conventions[1:]):
        if input_hw(size) != input_hw(sizes[0]):
            raise UserError("{} was trained at {} x {} and {} at {} x {}: checkpoints averaged together need one input "
                            "size (--image-size feeds them all one)".format(path, *input_hw(size), paths[0],
                                                                            *input_hw(sizes[0])))
        if convention != conventions[0]:
            raise UserError(f"{path} was trained with the depth conventions {convention.as_dict()} and {paths[0]} "
                            f"with {conventions[0].as_dict()}: checkpoints averaged together must agree")


class Predictor:
    """A network ready to run: it, the input size to feed it (S or [H, W]), its device and the depth
    conventions its predictions are clamped by. `load` returns one; evaluate wraps a training network.

    amp_dtype: autocast for `predict` (None: as the network's own weights run).
    """

    def __init__(self, net, size, device, conventions, amp_dtype=None):
        self.net, self.size, self.device, self.conventions, self.amp_dtype = net, size, device, conventions, amp_dtype

    @torch.no_grad()
    def predict(self, rgb):
        """Raw fp32 depth (B, 1, H, W) of a (B, 3, H, W) batch on the device."""
        with autocast(rgb.device.type, self.amp_dtype):
            return self.net(rgb).float()

    @torch.no_grad()
    def depth_maps(self, rgb, sizes):
        """Depth in metres of a batch, each resized to its (H, W) in `sizes` and clamped to [0, max_depth] as
        the standard protocol does (docs/design.md §8): a list of float32 HW arrays."""
        depths = []
        for p, (h, w) in zip(self.predict(rgb), sizes):
            d = F.interpolate(p[None], size=(int(h), int(w)), mode="bilinear", align_corners=False)
            depths.append(d[0, 0].clamp_(0.0, self.conventions.max_depth).cpu().numpy())
        return depths

    def infer_image(self, rgb, shown=None):
        """Depth in metres of one HWC uint8 image at its own size, or at `shown` (H, W) for a photo decoded
        smaller (dataset.read_picture)."""
        return self.depth_maps(to_model_input(rgb, self.size)[None].to(self.device), [shown or rgb.shape[:2]])[0]


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

    def __init__(self, model, dtype=None, channels_last=True, copy_model=True):
        super().__init__()
        self.dtype = dtype or torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # copy_model=False: the caller hands `model` over (inference.load, which built it for this alone).
        net = copy.deepcopy(model) if copy_model else model
        self.net = net.eval().requires_grad_(False).to(self.dtype).to(memory_format=self.memory_format)
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
