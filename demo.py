"""The offline quickstart behind `python main.py --demo`.

Synthesise a data set if there is none, train briefly (the paper's model, loss and optimiser with
the additions of DEMO_RECIPE), then score it on val and test against the constant-mean, per-row-mean
and mean-map baselines, under both protocols.
"""
import math
import os
import time

from conventions import DepthConventions
from dataset import DepthEstimationUnreal, input_hw, list_pairs, read_rgb, split_exists
from evaluate import baseline_models, evaluate
from model import encoder_spec, imagenet_weights_path
from synthetic import IMAGE_HW, ensure_dataset
from train import Trainer
from utils import atomic_path, stop_status, write_json_atomic

TABLE_KEYS = ("rmse", "ssim", "abs_rel", "delta1", "challenge_rmse", "challenge_ssim")


def scaled_cycle(steps):
    """(step_size_up, step_size_down) of a CyclicLR sized for a run of `steps` optimiser steps.

    The paper's cycle rises for 1000 steps and falls for 2000; scaled, it keeps that 1 : 2
    ratio and fits two whole triangular2 cycles into the run, which so ends at the base rate.
    """
    return max(1, steps // 6), max(1, steps // 3)


def epochs_for_steps(steps, train_pairs, batch_size):
    """Enough whole epochs for `steps` optimiser steps (--max-steps then ends the run), so that the
    progress bar counts real epochs."""
    return math.ceil(steps / math.ceil(train_pairs / batch_size))


# The best recipe measured for ten minutes of 2 CPU cores on the real set (docs/real.md, chosen on one half of
# its val): options beyond the paper's model that --demo turns on unless typed, on any data set and device.
DEMO_RECIPE = {"skips": True, "augment": True, "paste": 0.5, "silog_weight": 0.5}
# The recipe's learning rates: half the paper's, after scaling them to the batch.
DEMO_LR_FACTOR = 0.5
# Input and steps on a CPU: about 128 × 128 pixels (a step costs half of one at 224 × 224, and val gains more
# from the steps than it loses from the resolution), shaped like the training images (cpu_input_size; docs/real.md);
# 1,600 steps at 96 × 160 take about the time of 1,300 at 128 × 128. A GPU keeps the paper's 224 × 224.
CPU_SIZE, CPU_STEPS, GPU_STEPS = 128, 1600, 3000


def demo_preset(opts, explicit, paper_batch_size):
    """{option: value} that size a short run on whatever device there is; `explicit`: the options typed,
    which the preset never overrides.

    The paper's model, loss and optimiser, with DEMO_RECIPE's additions, at cpu_input_size on a CPU. The
    CyclicLR cycle is scaled to the run (scaled_cycle). Both learning rates scale linearly with
    the batch against the paper's (Goyal et al., 2017): at the CPU's batch of 8 the paper's 1e-3 …
    5e-3 makes the from-scratch network's validation score swing by 0.5 m between evaluations;
    then DEMO_LR_FACTOR halves them, which the real set's val preferred.
    Without cached ImageNet weights, which an offline machine cannot download, the encoder starts
    from random weights.
    """
    import torch

    cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    steps = opts.demo_steps or (GPU_STEPS if cuda else CPU_STEPS)
    step_size_up, step_size_down = scaled_cycle(steps)
    preset = {"batch_size": 32 if cuda else 8, "max_steps": steps, "step_size_up": step_size_up,
              "step_size_down": step_size_down, "eval_every": 2, "vis_every": max(1, steps // 6),
              "run_dir": os.path.join("runs", "demo"), **DEMO_RECIPE}
    # Listed once: the CPU's input shape and the epoch count both come from the training split.
    pairs = list_pairs(opts.data_dir, "train") if split_exists(opts.data_dir, "train") else None
    if not cuda and "image_size" not in explicit:
        preset["image_size"] = cpu_input_size(pairs, opts.max_pixels)
    preset = {k: v for k, v in preset.items() if k not in explicit}
    batch_size, max_steps = preset.get("batch_size", opts.batch_size), preset.get("max_steps", opts.max_steps)
    for key in ("lr", "max_lr"):
        if key not in explicit:
            preset[key] = getattr(opts, key) * batch_size / paper_batch_size * DEMO_LR_FACTOR
    if "epochs" not in explicit:
        scenes = len(pairs) if pairs is not None else opts.demo_train  # those it has, or those it will synthesise
        preset["epochs"] = epochs_for_steps(max_steps, scenes, batch_size)
    if opts.weights == "imagenet" and not imagenet_weights_cached(opts.encoder):
        print(f"ImageNet weights for {encoder_spec(opts.encoder).title} are not cached and this may be offline: "
              "the demo starts from random weights")
        preset["weights"] = "none"
    return preset


def cpu_input_size(pairs, max_pixels):
    """[H, W], multiples of 32, of about CPU_SIZE² pixels in the shape of the first training image: 96 × 160 for
    DepthEstimationUnreal's 144 × 256, 128 × 128 for square images. Squashing 144 × 256 into a square would
    give the network shapes it never meets in a real picture, and the pixels cost the same.

    pairs: list_pairs of the training split, or None for the scenes the demo will synthesise. The image is
    read as training reads it (upright by its EXIF orientation; a damaged file is an ImageError naming it)."""
    height, width = read_rgb(pairs[0][1], max_pixels).shape[:2] if pairs else IMAGE_HW
    shape = math.sqrt(height / width)
    return [32 * max(1, round(CPU_SIZE * shape / 32)), 32 * max(1, round(CPU_SIZE / shape / 32))]


def recipe_line(opts):
    """What the demo trained, in one line, and where the paper's own preset is."""
    additions = [name for name, on in (("skips", opts.skips), ("augmentation", opts.augment),
                                       (f"copy-paste (p = {opts.paste:g})", opts.paste),
                                       (f"SILog (weight {opts.silog_weight:g})", opts.silog_weight),
                                       (f"edge loss (weight {opts.grad_weight:g})", opts.grad_weight)) if on]
    if opts.crop:
        additions.append("{} × {} windows".format(*opts.crop))
    size = "{} × {}".format(*input_hw(opts.image_size))
    model = " + ".join([f"paper model ({encoder_spec(opts.encoder).title})", *additions])
    return (f"trained: {model} at {size}, {opts.max_steps} steps of batch {opts.batch_size}, learning rates "
            f"{opts.lr:.3g} … {opts.max_lr:.3g}; `python main.py` trains the paper's own preset")


def imagenet_weights_cached(encoder="resnet34"):
    """True when torchvision would load the encoder's ImageNet weights without a download."""
    return os.path.isfile(imagenet_weights_path(encoder))


def score_table(model, baselines, opts, device):
    """{split: {name: metrics}} for the trained model and each baseline, on the val and test splits there are."""
    results = {}
    workers = opts.workers
    for split in (s for s in ("val", "test") if split_exists(opts.data_dir, s)):
        dataset = DepthEstimationUnreal(opts.data_dir, split, size=opts.image_size, native=True,
                                        progress=not opts.quiet, conventions=DepthConventions.of(opts))
        results[split] = {"model": evaluate(model, dataset, device, num_workers=workers)}
        for name, baseline in baselines.items():
            results[split][name] = evaluate(baseline.to(device), dataset, device, num_workers=workers)
    return results


def format_results(results):
    """A markdown table: one row per split and predictor."""
    lines = ["| split | predictor | " + " | ".join(TABLE_KEYS) + " |", "|---|---|" + "---|" * len(TABLE_KEYS)]
    for split, rows in results.items():
        for name, m in rows.items():
            lines.append(f"| {split} | {name} | " + " | ".join(f"{m[k]:.3f}" for k in TABLE_KEYS) + " |")
    return "\n".join(lines)


def run_demo(opts):
    """opts: main.py's options with the demo preset applied (demo_preset). Returns the exit status: 0, or
    that of the signal that stopped training (130, 143), which then ends the demo."""
    start = time.time()
    ensure_dataset(opts.data_dir, opts.demo_train, opts.demo_val, opts.demo_test, seed=opts.seed,
                   progress=not opts.quiet)
    trainer = Trainer(opts)
    trainer.fit()
    if trainer.stop_signal:  # a stop is a stop: no scores of a half-trained model (last.pt is written)
        return stop_status(trainer.stop_signal)
    baselines = baseline_models(trainer.train_set, trainer.cache)
    results = score_table(trainer.scored_model, baselines, opts, trainer.device)
    table = format_results(results)
    minutes = (time.time() - start) / 60
    summary = {"results": results, "steps": trainer.step, "device": str(trainer.device), "minutes": minutes}
    write_json_atomic(summary, os.path.join(opts.run_dir, "demo_results.json"))
    with atomic_path(os.path.join(opts.run_dir, "demo_results.md")) as tmp, open(tmp, "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\n\n{recipe_line(opts)}\n"
          "standard protocol: rmse … delta1 at 144 × 256; challenge_*: the paper's protocol at 224 × 224")
    print(f"demo finished in {minutes:.1f} min on {trainer.device}; outputs in {opts.run_dir}")
    return 0
