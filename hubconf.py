"""torch.hub entry points of this repository.

    torch.hub.load("OWNER/REPO", "depthnet", pretrained="OWNER/NAME")          code from GitHub, model from the Hub
    torch.hub.load("path/to/this/repo", "depthnet", source="local", pretrained="runs/X/best_pretrained")

The model is a model folder (`python main.py --export pretrained`, DepthNet.save_pretrained) or a Hugging Face
Hub id: JSON and safetensors only, so loading it runs no code of the folder's.
"""
dependencies = ["torch", "torchvision", "safetensors"]


def depthnet(pretrained=None, **kwargs):
    """DepthNet. pretrained: a model folder or a Hub id OWNER/NAME, loaded strictly and returned in eval mode
    (kwargs: DepthNet.from_pretrained's map_location, revision, cache_dir, token, local_files_only); None: a new
    network (kwargs: DepthNet's encoder, skips, init_depth, weights), with random weights unless weights="imagenet"
    is asked for, so that building it needs no network."""
    from model import DepthNet

    if pretrained is not None:
        return DepthNet.from_pretrained(pretrained, **kwargs)
    return DepthNet(**{"weights": None, **kwargs})
