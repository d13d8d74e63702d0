"""The model card (README.md) of a model folder: what the model is, how it was trained, its last validation
figures with their protocol, how to load it, its licence and its limits. The Hugging Face Hub reads the YAML
block at the top (licence, library, task, tags) and shows the rest as the model's page."""
import json
import os

from dataset import input_hw
from evaluate import METRIC_KEYS
from model import encoder_spec

# Options of how the run went rather than of what it trained (besides main.NOT_INHERITED, about the invocation).
NOT_TRAINING = {"data_dir", "run_dir", "tensorboard", "vis_every", "log_every", "eval_every", "demo_train", "demo_val",
                "demo_test", "cache", "channels_last", "max_pixels"}
CHALLENGE = tuple(k for k in METRIC_KEYS if k.startswith("challenge_"))
STANDARD = tuple(k for k in METRIC_KEYS if k not in CHALLENGE and k != "n_images")


def model_card(ckpt, source, args, size, depth):
    """README.md of the model folder exported from checkpoint `ckpt` (read from `source`)."""
    h, w = input_hw(size)
    encoder = encoder_spec(args["encoder"]).title
    config = ckpt.get("config") or {}
    sections = [
        front_matter(),
        f"# DepthNet ({encoder} encoder{', skip connections' if args['skips'] else ''})\n",
        what_it_is(encoder, args, h, w, depth),
        "## How it was trained\n\n" + training(ckpt, config),
        "## Validation\n\n" + validation(ckpt, source, depth),
        how_to_load(),
        "## Licence\n\nMIT, as the code that trained it: see the repository's LICENSE file.\n",
        limits(config, h, w, depth),
    ]
    return "\n".join(sections)


def front_matter():
    return ("---\nlicense: mit\nlibrary_name: pytorch\npipeline_tag: depth-estimation\n"
            "tags:\n- monocular-depth-estimation\n- safetensors\n---\n")


def what_it_is(encoder, args, h, w, depth):
    skips = (" The encoder's 1/16, 1/8, 1/4 and 1/2-resolution features are concatenated into the decoder (U-Net "
             "style)." if args["skips"] else "")
    return ("Supervised monocular depth estimation: one RGB image in, depth in metres out. An ImageNet-style "
            f"{encoder} encoder with a frozen stem and a transposed-convolution decoder.{skips}\n\n"
            f"- input: RGB in [0, 1], shape (B, 3, {h}, {w}) (the size it was trained at; any multiple of 32 runs); "
            "ImageNet normalisation happens inside the network\n"
            f"- output: depth in metres, shape (B, 1, {h}, {w}); predictions are clamped to "
            f"[0, {depth['max_depth']:g}] m, the range it was trained on\n"
            "- files: `config.json` (architecture, input size, depth range and the scale of 16-bit depth PNGs, "
            f"{depth['depth_scale']:g} per metre), `model.safetensors` (fp32 weights, no optimiser state)\n")


def training(ckpt, config):
    if not config:
        return "This checkpoint records no training run (saved from code).\n"
    data = os.path.basename(os.path.normpath(config.get("data_dir") or "")) or "unknown"
    steps = f"{ckpt['step']:,} optimiser steps" if "step" in ckpt else "an unrecorded number of steps"
    epochs = f" ({ckpt['epoch']} epoch{'s' if ckpt['epoch'] != 1 else ''})" if "epoch" in ckpt else ""
    weights = ("the moving average of the weights (`--ema " f"{config['ema']:g}`)" if config.get("ema")
               else "the trained weights")
    return (f"On the training split of `{data}` (the data folder's name), for {steps}{epochs}; these are "
            f"{weights}. The options that differ from the repository's defaults (the paper's preset):\n\n"
            f"```\npython main.py {training_options(config)}\n```\n")


def training_options(config):
    """The command-line options of the run that differ from main.py's defaults."""
    from main import NOT_INHERITED, build_parser

    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    flags = {a.dest: a for a in parser._actions}
    words = []
    for key in sorted(config):
        if key in NOT_TRAINING | NOT_INHERITED or key not in defaults or config[key] == defaults[key]:
            continue
        words.append(option_words(flags[key], config[key]))
    return " ".join(words) or "(the defaults)"


def option_words(action, value):
    """How `value` is typed for `action` on the command line."""
    name = action.option_strings[0]
    if isinstance(value, bool):
        return name if value else f"--no-{name[2:]}"
    if isinstance(value, (list, tuple)):
        return f"{name} {' '.join(map(str, value))}"
    if isinstance(value, str) and os.sep in value:  # a file of the training machine (--weights PATH): its name only
        return f"{name} {os.path.basename(value)}"
    return f"{name} {value}"


def validation(ckpt, source, depth):
    metrics, step = last_metrics(ckpt, source)
    if not metrics:
        return "No validation figures are recorded for these weights.\n"
    where = f"on the val split of the training data ({metrics.get('n_images', '?')} images) at step {step}"
    return (f"The last validation of these weights, {where}. Two protocols, always reported together:\n\n"
            "- **standard**: each image at its ground truth's own resolution, the prediction resized to it and "
            f"clamped to [0, {depth['max_depth']:g}] m; only measured pixels (ground truth above "
            f"{depth['min_depth']:g} m) count; every metric per image, then averaged over the images.\n\n"
            + table(metrics, STANDARD) +
            "\n- **challenge** (the paper's and the course's): 224 x 224, batches of 32 in file order, raw "
            "predictions; per batch the RMSE over its pixels and SSIM, averaged over batches.\n\n"
            + table(metrics, CHALLENGE))


def table(metrics, keys):
    """A Markdown table of the `keys` that `metrics` holds: one row of names, one of values."""
    keys = [k for k in keys if k in metrics]
    return (f"| {' | '.join(keys)} |\n|{'---|' * len(keys)}\n| "
            f"{' | '.join(f'{metrics[k]:.4f}' for k in keys)} |\n")


def last_metrics(ckpt, source):
    """(metrics, step) of the last validation of the checkpoint's weights: the checkpoint's own (best.pt), else
    the last line at or before its step of metrics.jsonl beside it (last.pt); ({}, None) when there is none."""
    if ckpt.get("metrics"):
        return ckpt["metrics"], ckpt.get("step")
    path = os.path.join(os.path.dirname(os.path.abspath(source)), "metrics.jsonl")
    if "step" not in ckpt or not os.path.isfile(path):
        return {}, None
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    earlier = [r for r in records if r.get("step", 0) <= ckpt["step"] and r.get("split", "val") == "val"]
    return (earlier[-1], earlier[-1]["step"]) if earlier else ({}, None)


def how_to_load():
    return ("## Load it\n\nWith the repository's code (`pip install -r requirements.txt`), from this folder or "
            "its Hub id:\n\n"
            "```python\nfrom model import DepthNet\n"
            "net = DepthNet.from_pretrained(\"OWNER/NAME\")  # or a local folder; in eval mode\n"
            "depth = net(rgb)  # (B, 3, H, W) in [0, 1] -> metres (B, 1, H, W)\n```\n\n"
            "or `torch.hub.load(\"OWNER/REPO\", \"depthnet\", pretrained=\"OWNER/NAME\")`, or on the command line "
            "`python main.py --predict IMAGE --ckpt OWNER/NAME --out out`. Loading reads JSON and safetensors "
            "only: it runs no code from the folder.\n")


def limits(config, h, w, depth):
    data = os.path.basename(os.path.normpath(config.get("data_dir") or "")) or "its training data"
    return ("## Limits\n\n"
            f"- It knows only the kind of scene it was trained on (`{data}`); other kinds of place (indoor rooms for a "
            "model of streets, close-ups, aerial views) are out of its range.\n"
            f"- Depth is metric for the camera of its training data and capped at {depth['max_depth']:g} m; another "
            "camera's field of view or height scales the answer.\n"
            f"- It sees every image at {h} x {w}, so fine detail and thin objects are lost; depth edges are soft.\n"
            "- Not for safety-critical use: it gives no confidence and fails silently on unfamiliar input.\n")
