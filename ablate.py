"""Ablation of the paper's future work: each change alone, then the best combination.

    python ablate.py                                           the budget of docs/ablation.md
    python ablate.py --steps 20 --variants paper,+skips --out runs/ablation-tiny

Every variant trains with main.py's Trainer from the same seed, for the same number of
steps at the same batch and image size, on the same synthetic data set (generated into
--data-dir when absent), with random encoder weights unless --weights says otherwise (no
download); then it is scored on val under the standard protocol. The learning-rate cycle is
scaled to the budget as --demo scales it: two triangular2 cycles, rising for a sixth of the
steps and falling for a third, the paper's 1 : 2 ratio.

"best" combines every single change that beat the paper preset's val RMSE (of the encoders,
only the best one), so it runs after the singles and needs "paper" among the variants.

Writes OUT/ablation.md (the table), OUT/ablation.png (val RMSE and SSIM per variant) and
OUT/ablation.json (every metric of every variant), rewritten after each variant, and keeps
each variant's run folder in OUT/runs/NAME (config.json; last.pt only with --keep-checkpoints).
"""
import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from dataset import DepthEstimationUnreal, list_pairs
from demo import epochs_for_steps, scaled_cycle
from evaluate import evaluate
from hardware import select_device, synchronize
from main import parse_options
from model import count_parameters
from plots import plot_ablation
from synthetic import ensure_dataset
from train import Trainer
from utils import Interrupted, atomic_path, run_as_program, write_json_atomic

# Each single change, as the main.py options that turn it on ({...}: filled from ablate's options).
SINGLES = {
    "paper": [],
    "+skips": ["--skips"],
    "+augment": ["--augment"],
    "+resnet18": ["--encoder", "resnet18"],
    "+resnet50": ["--encoder", "resnet50"],
    "+efficientnet_b0": ["--encoder", "efficientnet_b0"],
    "+convnext_tiny": ["--encoder", "convnext_tiny"],
    "+grad": ["--grad-weight", "{grad_weight}"],
    "+silog": ["--silog-weight", "{silog_weight}"],
}
BEST = "best"
DEFAULT_VARIANTS = "paper,+skips,+augment,+resnet50,+efficientnet_b0,+convnext_tiny,+grad,+silog,best"


def build_parser():
    p = argparse.ArgumentParser(description="Train the paper preset, each future-work change alone and the best "
                                            "combination with one budget; write a table and a chart.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from: {', '.join(SINGLES)}, {BEST}")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per variant")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--image-size", type=int, default=64, help="square network input, a multiple of 32")
    p.add_argument("--data-dir", default=os.path.join("data", "ablation"),
                   help="data set to train and validate on; a synthetic one is generated there when absent")
    p.add_argument("--synth-train", type=int, default=300,
                   help="training scenes to synthesise when --data-dir is absent")
    p.add_argument("--synth-val", type=int, default=60,
                   help="validation scenes to synthesise when --data-dir is absent")
    p.add_argument("--out", default=os.path.join("runs", "ablation"), help="output folder")
    p.add_argument("--grad-weight", type=float, default=1.0, help="edge-loss weight of the +grad variant")
    p.add_argument("--silog-weight", type=float, default=1.0, help="SILog weight of the +silog variant")
    p.add_argument("--weights", default="none",
                   help="encoder initialisation for every variant (imagenet, none or PATH)")
    p.add_argument("--seed", type=int, default=0, help="seed of every variant (and of the synthetic data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    p.add_argument("--amp", default="off", choices=["auto", "off", "bf16", "fp16"], help="autocast dtype for training")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--keep-checkpoints", action="store_true", help="write each variant's last.pt (hundreds of MB each)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in SINGLES and v != BEST]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(SINGLES)}, {BEST}")
    if BEST in names and "paper" not in names:
        parser.error(f"'{BEST}' is chosen against the paper preset: add 'paper' to --variants")
    if not names:
        parser.error("--variants is empty")
    for name, value in {"--steps": args.steps, "--batch-size": args.batch_size, "--synth-train": args.synth_train,
                        "--synth-val": args.synth_val}.items():
        if value < 1:
            parser.error(f"{name} must be positive, got {value}")
    # Singles in the order given (duplicates dropped), the combination last: it needs their results.
    args.variants = list(dict.fromkeys(v for v in names if v != BEST)) + ([BEST] if BEST in names else [])
    return args


def variant_options(name, args):
    return [part.format(grad_weight=args.grad_weight, silog_weight=args.silog_weight) for part in SINGLES[name]]


def run_folder(args, name):
    return os.path.join(args.out, "runs", name.lstrip("+"))


def common_options(args, name):
    """main.py options shared by every variant: the budget, the data and the run folder."""
    epochs = epochs_for_steps(args.steps, len(list_pairs(args.data_dir, "train")), args.batch_size)
    step_size_up, step_size_down = scaled_cycle(args.steps)
    argv = ["--data-dir", args.data_dir, "--run-dir", run_folder(args, name), "--weights", args.weights,
            "--seed", str(args.seed), "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
            "--max-steps", str(args.steps), "--epochs", str(epochs),
            "--step-size-up", str(step_size_up), "--step-size-down", str(step_size_down),
            "--eval-every", "0", "--vis-every", "0", "--workers", str(args.workers), "--device", args.device,
            "--amp", args.amp]
    return argv + (["--quiet"] if args.quiet else [])


class AblationTrainer(Trainer):
    """A Trainer that writes checkpoints only with --keep-checkpoints (an ablation needs scores, not
    hundreds of MB per variant), and keeps those writes off the clock so images/s measures training."""

    keep_checkpoints = False
    save_seconds = 0.0
    replaces_old_runs = True  # each variant's folder is the ablation's own

    def save_checkpoint(self, name, metrics=None):
        if self.keep_checkpoints:
            start = time.perf_counter()
            super().save_checkpoint(name, metrics)
            self.save_seconds += time.perf_counter() - start


def train_variant(name, options, args):
    """Train one variant with the common budget; its val metrics, size and training time as one dict."""
    opts = parse_options(common_options(args, name) + options)
    trainer = AblationTrainer(opts)
    trainer.keep_checkpoints = args.keep_checkpoints
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start - trainer.save_seconds
    if trainer.stop_signal:
        raise Interrupted(signal.Signals[trainer.stop_signal])
    val = DepthEstimationUnreal(args.data_dir, "val", size=args.image_size, native=True,
                               progress=not args.quiet)
    metrics = evaluate(trainer.scored_model, val, trainer.device, num_workers=args.workers)
    total, trainable = count_parameters(trainer.model)
    return {**metrics, "options": " ".join(options) or "(paper preset)", "params": total, "trainable": trainable,
            "steps": trainer.step, "train_seconds": seconds}


def measure_speed(variants, args, rounds=3, steps=2):
    """{variant: training images/s}: full Trainer steps (augmentation included) on one real batch.

    A machine shared with other work changes speed from minute to minute, so the wall time
    of runs minutes apart cannot be compared; here the variants take turns, `rounds` times,
    each timing `steps` steps after one warm-up step, and the median round counts.
    """
    seconds = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in tqdm(range(rounds), desc="speed", disable=args.quiet):
            for name, options in variants.items():
                # The trained run's folder stays as training left it.
                opts = parse_options(common_options(args, name) + options + ["--quiet", "--run-dir", scratch])
                trainer = AblationTrainer(opts)
                rgb, depth = next(trainer.epoch_batches())
                for i in range(steps + 1):
                    if i == 1:  # after one warm-up step
                        synchronize(trainer.device)
                        start = time.perf_counter()
                    trainer.train_step(rgb, depth)
                synchronize(trainer.device)
                seconds[name].append((time.perf_counter() - start) / steps)
                del trainer
    return {name: args.batch_size / statistics.median(s) for name, s in seconds.items()}


def choose_combination(results):
    """The singles that beat the paper preset's val RMSE; of the encoders only the best one."""
    paper = results["paper"]["rmse"]
    better = [n for n in results if n != "paper" and n != BEST and results[n]["rmse"] < paper]
    encoders = sorted((n for n in better if "--encoder" in SINGLES[n]), key=lambda n: results[n]["rmse"])
    return [n for n in better if n not in encoders or n == encoders[0]]


def budget_text(args):
    n_train, n_val = (len(list_pairs(args.data_dir, s)) for s in ("train", "val"))
    step_size_up, step_size_down = scaled_cycle(args.steps)
    return (f"{args.steps} steps × batch {args.batch_size} ({args.steps * args.batch_size} training images) at "
            f"{args.image_size} × {args.image_size}, seed {args.seed}, encoder weights `{args.weights}`, "
            f"autocast `{args.amp}`; CyclicLR 1e-3 → 5e-3, up {step_size_up} / down {step_size_down} steps; "
            f"data `{args.data_dir}` ({n_train} train / {n_val} val images); "
            f"device `{select_device(args.device)}`, {torch.get_num_threads()} CPU thread(s)")


def format_table(results, combination):
    """The markdown table: one row per variant, RMSE change relative to the paper preset."""
    paper = results.get("paper", {}).get("rmse")
    lines = ["| variant | options | val RMSE | vs paper | SSIM | AbsRel | δ1 | parameters | train images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        change = f"{(r['rmse'] - paper) / paper * 100:+.1f} %" if paper else "–"
        label = f"best ({' '.join(combination)})" if name == BEST else name
        speed = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "(measured last)"
        lines.append(f"| {label} | `{r['options']}` | {r['rmse']:.3f} | {change} | {r['ssim']:.3f} | "
                     f"{r['abs_rel']:.3f} | "
                     f"{r['delta1']:.3f} | {r['params'] / 1e6:.1f} M | {speed} |")
    return "\n".join(lines)


def write_report(args, results, combination, note, minutes):
    budget = budget_text(args)
    text = "\n".join([
        "# Ablation: the paper's future work, one change at a time", "",
        f"Budget (the same for every variant): {budget}. Whole ablation: {minutes:.1f} min.", "",
        format_table(results, combination), "",
        "Standard protocol on val (native 144 × 256, every metric per image, then averaged). "
        "train images/s: full training steps (forward, loss, backward, Adam, augmentation) on one batch of the "
        "budget's size, the variants taking turns three times after training, median round; each variant's "
        "training wall time is in ablation.json.", "",
    ] + ([note, ""] if note else []))
    with atomic_path(os.path.join(args.out, "ablation.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    write_json_atomic({"budget": budget, "variants": args.variants, "combination": combination, "results": results},
                      os.path.join(args.out, "ablation.json"))
    plot_ablation(results, os.path.join(args.out, "ablation.png"), reference="paper", combined=BEST)


def run_ablation(args):
    """Train every variant in turn, rewriting the report after each, then time them; returns {variant: row}."""
    start = time.perf_counter()
    ensure_dataset(args.data_dir, args.synth_train, args.synth_val, 0, seed=args.seed, progress=not args.quiet)
    results, combination, note, trained = {}, [], "", {}
    for name in args.variants:
        if name == BEST:
            combination = choose_combination(results)
            if len(combination) < 2:
                note = ("best: no combination to train, since "
                        f"{'only ' + combination[0] if combination else 'no single change'} "
                        f"beat the paper preset at this budget.")
                print(note)
                continue
            options = [part for n in combination for part in variant_options(n, args)]
        else:
            options = variant_options(name, args)
        print(f"\n=== {name}: {' '.join(options) or 'paper preset'}", flush=True)
        results[name] = train_variant(name, options, args)
        trained[name] = options
        print(f"=== {name}: val RMSE {results[name]['rmse']:.3f}, SSIM {results[name]['ssim']:.3f}", flush=True)
        write_report(args, results, combination, note, (time.perf_counter() - start) / 60)
    print("\n=== training speed, the variants taking turns", flush=True)
    for name, rate in measure_speed(trained, args).items():
        results[name]["images_per_s"] = rate
    if BEST in results:
        gain = (results["paper"]["rmse"] - results[BEST]["rmse"]) / results["paper"]["rmse"] * 100
        note = (f"best combination ({' + '.join(combination)}): val RMSE {results[BEST]['rmse']:.3f} against the paper "
                f"preset's {results['paper']['rmse']:.3f}, {gain:.1f} % lower.")
    write_report(args, results, combination, note, (time.perf_counter() - start) / 60)
    print(f"\n{format_table(results, combination)}\n{note}\nwritten to {os.path.join(args.out, 'ablation.md')}")
    return results


def main(argv=None):
    args = parse_args(argv)

    def ablation():
        run_ablation(args)

    return run_as_program(ablation, "the variants finished before are in their run folders, no report was written")


if __name__ == "__main__":
    sys.exit(main())
