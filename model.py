"""DepthNet: a ResNet-34 encoder with a frozen stem and a transposed-convolution decoder.

The layout follows the paper (Table I) as its author's code built it (docs/design.md §1):
BatchNorm + ReLU only after the first four transposed convolutions; the 1 × 1
convolutions, the fifth transposed convolution and the output convolution are plain.
"""
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from checkpoint import DEFAULT_INPUT_SIZE, torch_load_safely, trained_network_state
from conventions import PAPER, DepthConventions
from utils import CheckpointError, UserError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# conv1, bn1, relu, maxpool: the first four children of a torchvision ResNet.
FROZEN_STEM_CHILDREN = 4


@dataclass(frozen=True)
class EncoderSpec:
    """How to cut one torchvision classifier into a DepthNet encoder.

    The encoder is an nn.Sequential (`trunk` cuts it from the classifier); `stem` counts its
    leading children that stay frozen; `taps` are the children whose outputs are the skip
    features, deepest first as the decoder takes them (1/16, 1/8, 1/4 and 1/2 of the input
    size; None where the network has no such stage), with `skip_channels` channels;
    `out_channels` leave the last child, at 1/32.
    """

    title: str
    build: str
    weights: str
    trunk: Callable
    stem: int
    taps: tuple
    skip_channels: tuple
    out_channels: int
    classifier: str


def resnet_trunk(net):
    """Everything up to layer4; avgpool and fc are for classification only."""
    return nn.Sequential(*list(net.children())[:-2])


def efficientnet_trunk(net):
    """features[0:8], up to 320 channels at 1/32; features[8] is a 1 × 1 widening to 1280
    channels that only the classifier needs, and would make the decoder's first layer 4× larger."""
    return net.features[:8]


def convnext_trunk(net):
    return net.features


# build: the torchvision.models function; torchvision is imported when a network is built, not with this
# module, since it loads Pillow and its transforms, which a network does not need.
ENCODERS = {
    "resnet18": EncoderSpec("ResNet-18", "resnet18", "ResNet18_Weights", resnet_trunk, FROZEN_STEM_CHILDREN,
                            (6, 5, 4, 2), (256, 128, 64, 64), 512, "fc."),
    "resnet34": EncoderSpec("ResNet-34", "resnet34", "ResNet34_Weights", resnet_trunk, FROZEN_STEM_CHILDREN,
                            (6, 5, 4, 2), (256, 128, 64, 64), 512, "fc."),
    "resnet50": EncoderSpec("ResNet-50", "resnet50", "ResNet50_Weights", resnet_trunk, FROZEN_STEM_CHILDREN,
                            (6, 5, 4, 2), (1024, 512, 256, 64), 2048, "fc."),
    # features[0] is the stem (conv + BN + SiLU); features[1] still runs at 1/2.
    "efficientnet_b0": EncoderSpec("EfficientNet-B0", "efficientnet_b0", "EfficientNet_B0_Weights",
                                   efficientnet_trunk, 1,
                                   (5, 3, 2, 1), (112, 40, 24, 16), 320, "classifier."),
    # features[0] is the 4 × 4 stride-4 patchify stem: ConvNeXt has no 1/2-resolution stage.
    "convnext_tiny": EncoderSpec("ConvNeXt-Tiny", "convnext_tiny", "ConvNeXt_Tiny_Weights", convnext_trunk, 1,
                                 (5, 3, 1, None), (384, 192, 96, 0), 768, "classifier."),
}


def encoder_spec(name):
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def imagenet_weights(name):
    """The torchvision weights enum entry that --weights imagenet loads for an encoder."""
    import torchvision

    return getattr(torchvision.models, encoder_spec(name).weights).IMAGENET1K_V1


def build_classifier(spec, weights=None):
    """The torchvision classifier of an EncoderSpec, with a torchvision weights enum entry or random weights."""
    import torchvision

    return getattr(torchvision.models, spec.build)(weights=weights)


def imagenet_weights_path(name):
    """Where torchvision's hub cache keeps (or would download) an encoder's ImageNet weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(imagenet_weights(name).url))


def up_block(in_ch, out_ch, norm_act=True):
    """A ×2 transposed convolution (k4 s2 p1), optionally followed by BatchNorm + ReLU."""
    layers = [nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)]
    if norm_act:
        layers += [nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Decoder(nn.Sequential):
    """512 × 7 × 7 → 1 × 224 × 224, exactly the table of docs/design.md §1 (with the defaults).

    in_ch follows the encoder's output channels. skip_channels (at 1/16, 1/8, 1/4, 1/2 of
    the input size) widen the inputs of the layers listed in SKIP_INPUTS: the first layer
    after each ×2 step that reaches that resolution, so every skip is concatenated to the
    decoder's features of the same size. Concatenation rather than addition: encoder and
    decoder widths differ (64 vs 32 at 1/2 for ResNets, 24 vs 64 at 1/4 for EfficientNet),
    and concatenation needs no extra projection to match them.
    """

    SKIP_INPUTS = (1, 2, 4, 5)

    def __init__(self, in_ch=512, skip_channels=(0, 0, 0, 0)):
        s16, s8, s4, s2 = skip_channels
        super().__init__(
            up_block(in_ch, 256),
            up_block(256 + s16, 128),
            nn.Conv2d(128 + s8, 128, kernel_size=1),
            up_block(128, 64),
            up_block(64 + s4, 32),
            nn.Conv2d(32 + s2, 32, kernel_size=1),
            up_block(32, 1, norm_act=False),
            nn.Conv2d(1, 1, kernel_size=1),
        )

    @property
    def output_conv(self):
        return self[-1]

    def forward(self, x, skips=None):
        """skips: None, or the (1/16, 1/8, 1/4, 1/2) encoder features, None where absent."""
        if skips is None:
            return super().forward(x)
        skip_at = dict(zip(self.SKIP_INPUTS, skips))
        for i, layer in enumerate(self):
            if skip_at.get(i) is not None:
                x = torch.cat([x, skip_at[i]], dim=1)
            x = layer(x)
        return x


def build_backbone(name, weights):
    """A torchvision classifier `name` with ImageNet weights, a local state dict, or random weights.

    weights: None / "none" (random), "imagenet" (IMAGENET1K_V1 from torchvision's
    cache, downloading if allowed) or a path to a state dict of that network.
    """
    spec = encoder_spec(name)
    if weights in (None, "none"):
        return build_classifier(spec)
    if weights == "imagenet":
        cached = imagenet_weights_path(name)
        was_cached = os.path.isfile(cached)
        try:
            return build_classifier(spec, imagenet_weights(name))
        except Exception as err:  # no network, a refused download, a damaged cached file...
            cause = f"{type(err).__name__}: {first_line(err)}"
            where = (f"the cached file {cached} could not be read ({cause}); delete it to download it again"
                     if was_cached else f"it is not in {cached} and the download failed ({cause})")
            raise UserError(f"could not load ImageNet weights for {spec.title}: {where}; use --weights none for "
                            f"random initialisation, or --weights PATH with a {spec.title} state dict") from None
    if not os.path.isfile(weights):
        raise UserError(f"--weights {weights}: no such file (expected 'imagenet', 'none' or a path)")
    net = build_classifier(spec)
    state = torch_load_safely(weights)
    if not isinstance(state, dict):
        raise UserError(f"--weights {weights} is not a state dict (it holds a {type(state).__name__})")
    state = {k: v for k, v in state.items() if not k.startswith(spec.classifier)}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(spec.classifier)]
    unexpected = [k for k in state if k not in expected]
    # Same names, other shapes: e.g. a ResNet-18 file given for a ResNet-50.
    reshaped = [k for k, v in state.items() if k in expected and getattr(v, "shape", None) != expected[k].shape]
    if missing or unexpected or reshaped:
        raise UserError(f"{weights} is not a {spec.title} state dict: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}"
                        + (f", other shapes {reshaped[:5]}" if reshaped else ""))
    net.load_state_dict(state, strict=False)
    return net


class DepthNet(nn.Module):
    """RGB in [0, 1] (B, 3, H, W), H and W multiples of 32 → depth in metres (B, 1, H, W).

    encoder: a key of ENCODERS (default the paper's resnet34); skips: concatenate the
    encoder's 1/16 … 1/2 features into the decoder (U-Net style). With the defaults the
    module tree, parameter names and forward pass are the paper's (docs/design.md §1-§4).
    """

    def __init__(self, weights=None, init_depth=0.0, encoder="resnet34", skips=False, train_stem=False):
        super().__init__()
        spec = encoder_spec(encoder)
        self.encoder_name, self.skips = encoder, bool(skips)
        # What DepthNet(**model_args) rebuilds this network from: the checkpoint stores it beside the weights.
        self.model_args = {"encoder": encoder, "skips": self.skips, "init_depth": float(init_depth)}
        is_file = weights not in (None, "none", "imagenet") and os.path.isfile(weights)
        pretrained = trained_network_state(weights) if is_file else None
        self.encoder = spec.trunk(build_backbone(encoder, None if pretrained is not None else weights))
        self.decoder = Decoder(spec.out_channels, spec.skip_channels if self.skips else (0, 0, 0, 0))
        # Plain attributes, not modules or buffers: the state dict of the default model stays the paper's.
        self.stem_children, self.skip_taps = spec.stem, spec.taps
        self.register_buffer("mean", channel_constant(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", channel_constant(IMAGENET_STD), persistent=False)
        # Not part of model_args: a trained stem changes how the network trains, not what it is.
        self.frozen_stem = not train_stem
        if self.frozen_stem:
            for p in self.stem.parameters():
                p.requires_grad_(False)
            self.stem.eval()  # frozen from the start: a fresh model is in training mode, its stem never is
        # Without this the output starts near 0 m and Adam needs hundreds of steps
        # (about lr per step) just to reach the data's scale.
        nn.init.constant_(self.decoder.output_conv.bias, float(init_depth))
        if pretrained is not None:  # fine-tuning: encoder and decoder both start from a trained run
            load_weights(self, pretrained, weights)

    @classmethod
    def from_pretrained(cls, name_or_path, *, map_location="cpu", **hub_options):
        """A trained DepthNet in eval mode from a model folder (--export pretrained, save_pretrained) or a Hugging
        Face Hub id OWNER/NAME; hub_options: huggingface_hub's revision, cache_dir, token, local_files_only,
        force_download. Loading is strict and runs no code (JSON and safetensors only). The network's
        input_size and depth_conventions (a DepthConventions) are those recorded in its config.json."""
        from pretrained import read_pretrained

        ckpt = read_pretrained(name_or_path, **hub_options)
        model = build_trained(ckpt["model_args"], ckpt["model"], name_or_path).to(map_location).eval()
        model.input_size, model.depth_conventions = ckpt["input_size"], DepthConventions.from_dict(ckpt["depth"])
        model.model_card = ckpt["card"]  # saved again by save_pretrained and push_to_hub
        return model

    def save_pretrained(self, save_directory, *, input_size=None, depth_conventions=None, push_to_hub=False,
                        repo_id=None, **push_options):
        """Write the network as a model folder that from_pretrained, --ckpt and torch.hub load: config.json,
        model.safetensors and a README.md model card. input_size, depth_conventions ({field: value}): what it was
        trained with (default: what from_pretrained read, else the paper's 224 and 0-20 m); the model card is the one
        from_pretrained read, else one that says no training is recorded. push_to_hub: then upload the folder to
        repo_id (default: the folder's name); returns the commit's URL, else None."""
        from modelcard import model_card
        from pretrained import write_pretrained

        size = input_size or getattr(self, "input_size", DEFAULT_INPUT_SIZE)
        depth = getattr(self, "depth_conventions", PAPER).overridden(**(depth_conventions or {})).as_dict()
        state = self.state_dict()
        card = getattr(self, "model_card", None) or model_card({}, save_directory, self.model_args, size, depth)
        write_pretrained(save_directory, self.model_args, size, depth, state, card)
        if push_to_hub:
            return self.push_to_hub(repo_id or os.path.basename(os.path.abspath(save_directory)), input_size=size,
                                    depth_conventions=depth, **push_options)
        return None

    def push_to_hub(self, repo_id, *, input_size=None, depth_conventions=None, private=None, token=None,
                    commit_message="Upload DepthNet", branch=None, create_pr=None):
        """Create (or reuse) the Hub model repository repo_id and upload the network's model folder to it in one
        commit, as huggingface_hub's PyTorchModelHubMixin.push_to_hub does; returns the commit's URL."""
        from pretrained import require_hub

        hub = require_hub()
        api = hub.HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "model")
            self.save_pretrained(folder, input_size=input_size, depth_conventions=depth_conventions)
            return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                     commit_message=commit_message, revision=branch, create_pr=create_pr)

    @property
    def stem(self):
        return self.encoder[:self.stem_children]

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_stem:  # "frozen" means the stem's BatchNorm statistics stay fixed too
            self.stem.eval()
        return self

    def forward(self, rgb):
        x = (rgb - self.mean) / self.std
        if not self.skips:
            return self.decoder(self.encoder(x))
        features = {}
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            if i in self.skip_taps:
                features[i] = x
        return self.decoder(x, [features.get(t) for t in self.skip_taps])


def channel_constant(values):
    """A (1, 3, 1, 1) tensor of per-channel values, to broadcast over (B, 3, H, W) images."""
    return torch.tensor(values).view(1, 3, 1, 1)


def build_trained(args, state, source):
    """DepthNet(**args) holding the weights `state`, without drawing the random weights they replace: it is
    built on the meta device and the loaded tensors are assigned to it (loading stays strict)."""
    with torch.device("meta"):
        model = DepthNet(weights=None, **args)
    load_weights(model, state, source, assign=True)
    device = next(iter(state.values())).device  # map_location's: the normalisation goes where the weights are
    model.mean, model.std = (channel_constant(v).to(device) for v in (IMAGENET_MEAN, IMAGENET_STD))  # not in state
    return model


def load_weights(model, state, source, assign=False):
    """load_state_dict that names the differing keys when a checkpoint is of another architecture.
    assign: take the tensors of `state` as the model's own (a model built on the meta device)."""
    expected, given = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} holds another architecture: {len(missing)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as err:
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"{source} holds another architecture: {'; '.join(shapes[:3]) or err}") from None


def count_parameters(model):
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
