"""Entry point: every option lives here, with the paper's values as defaults (docs/design.md §7, §9).

    python main.py                                  train (paper preset)
    python main.py --eval --ckpt runs/X/best.pt     evaluate a checkpoint (both protocols) and write reports
    python main.py --predict IMAGE_OR_DIR --ckpt runs/X/best.pt --out DIR    depth of any images
    python main.py --export torchscript --ckpt runs/X/best.pt --out FILE     export for deployment
    torchrun --nproc_per_node 4 main.py ...         train on 4 GPUs (--batch-size stays the global batch)
"""
import argparse
import math
import os
import sys
import time

from conventions import PAPER

# Options about this machine or this invocation rather than the run: --resume never takes them from the checkpoint.
NOT_INHERITED = {"resume", "ckpt", "eval", "is_train", "demo", "split", "metrics_out", "quiet", "device", "workers",
                 "predict", "export", "out", "cmap", "png16", "ply", "flip", "fov", "npy", "report", "report_images",
                 "compile", "cuda_graphs", "protocol", "min_depth_eval", "max_depth_eval", "median_scale",
                 "save_predictions"}

# model.ENCODERS' keys, spelled out so that --help needs no torch import (a test keeps them equal).
ENCODER_NAMES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "convnext_tiny")


def str2bool(value):
    """For the course template's --is_train, whose type=bool made '--is_train False' true."""
    v = value.lower()
    if v in ("1", "true", "yes", "y"):
        return True
    if v in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none to show or the help already names it."""

    def _get_help_string(self, action):
        # `is`, not `in (None, False)`: 0 and 0.0 equal False, and their defaults should show.
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="Monocular depth estimation: ResNet-34 encoder + transposed-convolution decoder.",
        formatter_class=HelpFormatter)
    mode = p.add_argument_group("what to do (default: train)")
    one_of = mode.add_mutually_exclusive_group()
    one_of.add_argument("--eval", action="store_true",
                        help="evaluate --ckpt on --split, print both protocols' metrics and write the reports "
                             "(see --report)")
    one_of.add_argument("--demo", action="store_true",
                        help="offline quickstart: synthesise data if absent, train briefly, evaluate against baselines")
    one_of.add_argument("--predict", default=None, metavar="IMAGE_DIR_OR_VIDEO",
                        help="predict with --ckpt the depth of an image, or of every .jpeg/.jpg/.png in a folder, "
                             "writing NAME.npy (metres) and NAME.png (colourised) per image to --out; of a video file "
                             "(.mp4, .mov, ...), writing NAME_depth.mp4, RGB and depth side by side "
                             "(needs: pip install -r requirements-video.txt)")
    one_of.add_argument("--export", default=None, choices=["torchscript", "onnx", "pretrained"],
                        help="export --ckpt to --out for deployment, checked against the eager model (onnx needs: pip "
                             "install onnx onnxscript onnxruntime); pretrained: a model folder to share "
                             "(config.json, model.safetensors, README.md), which --ckpt, DepthNet.from_pretrained "
                             "and torch.hub load")
    mode.add_argument("--is_train", type=str2bool, default=None, metavar="BOOL",
                      help="course-template alias: '--is_train false' is --eval")

    data = p.add_argument_group("data")
    data.add_argument("--data-dir", "--data_dir", default=None,
                      help="ROOT with rgb/{train,val,test}/*.jpeg and depth/{train,val,test}/*.npy (or 16-bit .png), "
                           "or with split lists ROOT/{train,val,test}.txt of 'RGB DEPTH [FOCAL]' lines (docs/data.md) "
                           "(default: data/DepthEstimationUnreal; data/synthetic with --demo)")
    data.add_argument("--split", default="val", choices=["train", "val", "test"], help="split that --eval scores")
    for split in ("train", "val", "test"):
        data.add_argument(f"--{split}-list", default=None, metavar="FILE",
                          help=f"the {split} split's list, read instead of ROOT/{split}.txt: 'RGB DEPTH [FOCAL]' a "
                               "line as BTS, AdaBins and ZoeDepth ship them, RGB relative to --data-dir, DEPTH to "
                               "--gt-dir, None for a frame without ground truth (skipped)")
    data.add_argument("--gt-dir", default=None, metavar="DIR",
                      help="the folder the depth paths of split lists are relative to, as KITTI's annotated depth "
                           "lives apart from its frames (default: --data-dir)")
    data.add_argument("--workers", type=int, default=2,
                      help="DataLoader worker processes (0: load in the main process)")
    data.add_argument("--image-size", type=int, nargs="+", default=224, metavar="SIZE",
                      help="network input: side S of a square, or height H and width W (multiples of 32); the paper "
                           "uses 224, smaller is for tests and laptops. --eval, --predict and --export use the "
                           "checkpoint's own unless this is given")
    data.add_argument("--max-depth", type=float, default=PAPER.max_depth,
                      help="depth is clipped to [0, MAX] metres (the paper's 20), and predictions to it; --eval, "
                           "--predict and --export use the checkpoint's own unless this is given")
    data.add_argument("--min-depth", type=float, default=PAPER.min_depth,
                      help="ground truth at or below this (metres) is 'not measured' (0 in every common format) and "
                           "counts nowhere: not in the loss, the metrics or the baselines")
    data.add_argument("--max-pixels", type=int, default=4096 * 4096,
                      help="refuse images with more pixels than this (read from the file's header, before decoding): "
                           "data, --predict's images and video frames, the web page's uploads; a larger JPEG given to "
                           "--predict or the page is decoded at the largest of 1/2, 1/4, 1/8 of its size that fits, "
                           "its depth given at its own size")
    data.add_argument("--depth-scale", type=float, default=PAPER.depth_scale,
                      help="a 16-bit depth PNG holds metres x this: 1000 (millimetres, NYU Depth v2), 256 (KITTI)")
    data.add_argument("--cache", default="auto", choices=["auto", "off"],
                      help="auto: decode the training split once into ROOT/.cache (uint8 RGB, float16 depth, on disk, "
                           "read through memory maps) and train from it, copied to the GPU when it fits; where no "
                           "cache folder has the disk space, the files are read as with off; off: decode every epoch "
                           "with the folder loader")

    model = p.add_argument_group("model")
    model.add_argument("--weights", default="imagenet",
                       help="initialisation: imagenet (the encoder's torchvision IMAGENET1K_V1), none (random), PATH "
                            "to a state dict of the --encoder network, or PATH to a checkpoint written by training "
                            "(best.pt, last.pt), which starts encoder and decoder alike (fine-tuning)")

    beyond = p.add_argument_group("beyond the paper (its future work; all off by default, so the paper preset is "
                                  "unchanged)")
    beyond.add_argument("--encoder", default="resnet34", choices=ENCODER_NAMES,
                        help="torchvision encoder; the decoder adapts to its channels and its stem stays frozen")
    beyond.add_argument("--train-stem", action="store_true",
                        help="train the encoder's stem too (a ResNet's conv1 and bn1), which the paper freezes: "
                             "frozen, a stem of --weights none stays a random filter bank")
    beyond.add_argument("--skips", action=argparse.BooleanOptionalAction, default=False,
                        help="U-Net-style skip connections: the encoder's 1/16, 1/8, 1/4 and 1/2-resolution features "
                             "are concatenated into the decoder")
    beyond.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                        help="paired training augmentation: horizontal flip and zoom-and-crop (x1 to --max-zoom, no "
                             "borders) on RGB and depth alike, brightness/contrast/saturation jitter (+-20%%) on RGB "
                             "only")
    beyond.add_argument("--max-zoom", type=float, default=1.25,
                        help="--augment's largest zoom; larger moves the horizon and the objects further")
    beyond.add_argument("--zoom-closer", action="store_true",
                        help="--augment's zoom by s divides the depth by s (a camera s times closer) instead of "
                             "keeping it (a narrower field of view)")
    beyond.add_argument("--paste", type=float, default=0.0, metavar="PROB",
                        help="copy-paste: with this probability a training image gets a rectangle of another one, "
                             "RGB and depth together, moved to a random place; 0: off")
    beyond.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="train on random H x W windows of the --image-size input (multiples of 32); val, test "
                             "and prediction see the whole input, objects at the size training saw them")
    beyond.add_argument("--grad-weight", type=float, default=0.0,
                        help="weight of the image-gradient (edge) loss: L1 of the depth maps' x/y finite differences")
    beyond.add_argument("--silog-weight", type=float, default=0.0,
                        help="weight of the scale-invariant log loss (SILog, lambda 0.85)")
    beyond.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                        help="keep an exponential moving average of the weights with this decay per step (e.g. "
                             "0.995) and evaluate, keep as best.pt and predict with it; 0: off")

    optim = p.add_argument_group("optimisation (paper §III-C, §III-D, Table III)")
    optim.add_argument("--epochs", "--max_epochs", type=int, default=100, help="training epochs")
    optim.add_argument("--batch-size", "--batch_size", type=int, default=32,
                       help="images per optimiser step, over all processes under torchrun (and per batch of --predict)")
    optim.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate = CyclicLR base_lr")
    optim.add_argument("--max-lr", type=float, default=5e-3, help="CyclicLR max_lr")
    optim.add_argument("--step-size-up", type=int, default=1000, help="CyclicLR optimiser steps from base to max lr")
    optim.add_argument("--step-size-down", type=int, default=2000,
                       help="CyclicLR optimiser steps from max back to base lr")
    optim.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay")
    optim.add_argument("--adamw", action="store_true",
                       help="AdamW: --weight-decay shrinks the weights apart from the gradient (decoupled)")
    optim.add_argument("--alpha", type=float, default=1.0, help="weight of RMSE in the loss")
    optim.add_argument("--beta", type=float, default=1.0, help="weight of (1 - SSIM) in the loss")
    optim.add_argument("--max-steps", type=int, default=None,
                       help="stop when the global optimiser step reaches N (after writing last.pt)")
    optim.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")

    run = p.add_argument_group("run, logging and checkpoints")
    run.add_argument("--run-dir", "--ckpt_dir", default=None, help="output folder (default: runs/YYYYmmdd-HHMMSS)")
    run.add_argument("--eval-every", "--evaluate_every", type=int, default=2,
                     help="evaluate on val every N epochs (0: never)")
    run.add_argument("--vis-every", "--visualize_every", type=int, default=100,
                     help="save a visualisation every N steps (0: never)")
    run.add_argument("--log-every", type=int, default=10, help="update the progress bar's loss/lr every N steps")
    run.add_argument("--resume", default=None, metavar="PATH", help="continue training from a checkpoint (last.pt)")
    run.add_argument("--ckpt", "--ckpt_file", default=None, metavar="PATH", nargs="+",
                     help="checkpoint to evaluate, predict with or export: a file written by training, a model "
                          "folder (--export pretrained) or a Hugging Face Hub id OWNER/NAME; several (--eval, "
                          "--predict): an ensemble, their depth maps averaged")
    run.add_argument("--metrics-out", default=None, metavar="PATH",
                     help="with --eval: also write the metrics as one JSON object")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log the training and val scalars, pictures and options to RUN_DIR/tb for TensorBoard "
                          "(needs: pip install -r requirements-tensorboard.txt)")

    bench = p.add_argument_group("the peers' evaluation protocols (--eval; docs/benchmarks.md)")
    bench.add_argument("--protocol", default="unreal", choices=["unreal", "nyu", "kitti", "kitti-eigen"],
                       help="unreal: this repository's two protocols (standard and challenge); nyu: the Eigen crop of "
                            "NYU Depth v2, depth in (1e-3, 10) m; kitti: the Garg crop, (1e-3, 80) m; kitti-eigen: "
                            "KITTI's Eigen crop, (1e-3, 80) m; the last three as BTS, AdaBins and ZoeDepth score")
    bench.add_argument("--min-depth-eval", type=float, default=None, metavar="METRES",
                       help="--protocol nyu/kitti/kitti-eigen: score ground truth above this (default: the protocol's "
                            "1e-3)")
    bench.add_argument("--max-depth-eval", type=float, default=None, metavar="METRES",
                       help="--protocol nyu/kitti/kitti-eigen: score ground truth below this (default: the protocol's "
                            "10 or 80)")
    bench.add_argument("--median-scale", action="store_true",
                       help="--protocol nyu/kitti/kitti-eigen: multiply each prediction by median(gt) / median(pred) "
                            "over its scored pixels before the clip, as Monodepth2 scores relative depth")
    bench.add_argument("--save-predictions", default=None, metavar="DIR",
                       help="--eval: write each prediction at its ground truth's size, float32 metres, before the "
                            "protocol's clip (after --median-scale), to DIR/RGB_PATH.npy (the RGB path relative to "
                            "--data-dir, its extension replaced)")

    demo = p.add_argument_group("the --demo preset (the paper's model, loss and optimiser with skips, "
                                "augmentation, copy-paste and a SILog term, sized for a CPU)")
    demo.add_argument("--demo-steps", type=int, default=None,
                      help="optimiser steps (default: 1600 on CPU, at about 128 x 128 pixels in the images' shape; "
                           "3000 on CUDA); the CyclicLR cycle is scaled to fit, and the learning rates to the batch "
                           "and halved (× batch / 64)")
    demo.add_argument("--demo-train", type=int, default=1000, help="synthetic training scenes to generate if absent")
    demo.add_argument("--demo-val", type=int, default=50,
                      help="synthetic validation scenes (a different kind of place)")
    demo.add_argument("--demo-test", type=int, default=50, help="synthetic test scenes")

    use = p.add_argument_group("using a trained model (--predict, --export, reports of --eval)")
    use.add_argument("--out", default=None, metavar="PATH",
                     help="--predict: output folder (default: out); --export: output file (default: the checkpoint's "
                          "path with .torchscript.pt or .onnx), or folder for pretrained (default: the checkpoint's "
                          "path with _pretrained); --eval: folder for the reports (default: the checkpoint's "
                          "folder; a model folder's or Hub id's reports need --out)")
    use.add_argument("--cmap", default="magma", help="matplotlib colormap of the depth PNGs and of the report grid")
    use.add_argument("--png16", action="store_true",
                     help="--predict: also write NAME_mm.png, the depth as a 16-bit PNG in millimetres")
    use.add_argument("--ply", action="store_true",
                     help="--predict: also write NAME.ply, a coloured point cloud (opens in MeshLab, Open3D)")
    use.add_argument("--npy", action="store_true",
                     help="--predict of a video: also write NAME_depth.npy, every frame's depth in metres as one "
                          "float16 (frames, H, W) array")
    use.add_argument("--fov", type=float, default=90.0,
                     help="--ply: horizontal field of view (degrees) of the pinhole camera. The real data set's is not "
                          "published; 90 is Unreal Engine's camera default (the synthetic generator draws 60-90)")
    use.add_argument("--flip", action="store_true",
                     help="--eval, --predict, app.py: average the depth of each image with that of its mirror image, "
                          "mirrored back (test-time augmentation; two forward passes)")
    use.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                     help="--eval: write report_SPLIT_grid.png, report_SPLIT_per_image.csv and curves.png (see --out)")
    use.add_argument("--report-images", type=int, default=6,
                     help="--eval: rows of the report grid, spread evenly over the split")

    hw = p.add_argument_group("hardware and reproducibility")
    hw.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when there is one")
    hw.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                    help="autocast dtype; auto: bf16 on GPUs and on CPUs with bf16 instructions, else fp32")
    hw.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="NHWC memory layout (faster convolutions on CPU and GPU)")
    hw.add_argument("--compile", action="store_true",
                    help="torch.compile the model (a minute of compiling, then faster steps)")
    hw.add_argument("--cuda-graphs", action="store_true",
                    help="capture the training step in a CUDA graph and replay it, so that the GPU does not wait for "
                         "kernel launches (one process on CUDA, fp32 or bf16; an epoch's last, smaller batch is "
                         "skipped)")
    hw.add_argument("--seed", type=int, default=0, help="seed for weights, data order and every RNG")
    hw.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume on CPU)")
    return p


# Options the checkpoint records. Untyped, --eval, --predict and --export leave them None, meaning
# "the checkpoint's own": inference.load resolves them, in that one place.
FROM_CHECKPOINT = ("image_size", "max_depth", "min_depth", "depth_scale")


def input_size_option(values):
    """--image-size as the code takes it: S (an int) for one number, [H, W] for two; None stays None."""
    if values is None or isinstance(values, int):
        return values
    return values[0] if len(values) == 1 else list(values)


def off_the_32_grid(sides):
    """True if a side is not a positive multiple of 32, which the encoder's five halvings need."""
    return any(v < 32 or v % 32 for v in sides)


def check_model_options(parser, opts, cmap):
    """--image-size, --fov and (when `cmap`, which costs a matplotlib import) --cmap, for main.py and app.py."""
    sides = [opts.image_size] if isinstance(opts.image_size, int) else opts.image_size
    if sides is not None and (len(sides) > 2 or off_the_32_grid(sides)):
        parser.error("--image-size must be a positive multiple of 32 (the encoder downsamples by 32), S or H W; got "
                     f"{' '.join(map(str, sides))}")
    if not 0 < opts.fov < 180:
        parser.error(f"--fov must be between 0 and 180 degrees, got {opts.fov}")
    if cmap:
        import matplotlib

        if opts.cmap not in matplotlib.colormaps:
            parser.error(f"--cmap {opts.cmap}: not a matplotlib colormap (e.g. magma, viridis, plasma, turbo, gray)")


def check_options(parser, opts):
    """Reject out-of-range values with one line naming the option."""
    positive = {"--epochs": opts.epochs, "--batch-size": opts.batch_size, "--lr": opts.lr, "--max-lr": opts.max_lr,
                "--step-size-up": opts.step_size_up, "--step-size-down": opts.step_size_down,
                "--log-every": opts.log_every, "--max-bad-steps": opts.max_bad_steps}
    for name, value in positive.items():
        if not value > 0:
            parser.error(f"{name} must be positive, got {value}")
    for name, value in {"--weight-decay": opts.weight_decay, "--eval-every": opts.eval_every,
                        "--grad-weight": opts.grad_weight, "--silog-weight": opts.silog_weight,
                        "--vis-every": opts.vis_every, "--workers": opts.workers,
                        "--report-images": opts.report_images}.items():
        if value < 0:
            parser.error(f"{name} must be zero or positive, got {value}")
    # With --eval, --predict and --export, the depth options not typed are None: the checkpoint's (inference.load
    # checks --min-depth against its maximum).
    depth = {"--min-depth": opts.min_depth, "--max-depth": opts.max_depth, "--depth-scale": opts.depth_scale}
    for name, value in depth.items():
        if value is not None and not math.isfinite(value):
            parser.error(f"{name} must be a finite number, got {value}")
    if opts.min_depth is not None and not 0 <= opts.min_depth:
        parser.error(f"--min-depth must be at least 0, got {opts.min_depth}")
    if None not in (opts.min_depth, opts.max_depth) and not opts.min_depth < opts.max_depth:
        parser.error(f"--min-depth ({opts.min_depth}) must be below --max-depth ({opts.max_depth})")
    if opts.max_depth is not None and not opts.max_depth > 0:
        parser.error(f"--max-depth must be positive, got {opts.max_depth}")
    if not opts.max_pixels > 0:
        parser.error(f"--max-pixels must be positive, got {opts.max_pixels}")
    if opts.depth_scale is not None and not opts.depth_scale > 0:
        parser.error(f"--depth-scale must be positive, got {opts.depth_scale}")
    if not opts.max_zoom >= 1:
        parser.error(f"--max-zoom must be at least 1 (1: no zoom), got {opts.max_zoom}")
    if opts.crop is not None and off_the_32_grid(opts.crop):
        parser.error(f"--crop must be two positive multiples of 32 (H W), got {' '.join(map(str, opts.crop))}")
    if not 0 <= opts.paste <= 1:
        parser.error(f"--paste is a probability from 0 to 1, got {opts.paste}")
    if not 0 <= opts.ema < 1:
        parser.error(f"--ema must be at least 0 and below 1 (0: off), got {opts.ema}")
    if opts.max_lr < opts.lr:
        parser.error(f"--max-lr ({opts.max_lr}) must be at least --lr ({opts.lr})")
    for name, value in {"--max-steps": opts.max_steps, "--demo-steps": opts.demo_steps, "--demo-train": opts.demo_train,
                        "--demo-val": opts.demo_val, "--demo-test": opts.demo_test}.items():
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if opts.eval and (opts.predict or opts.export):
        parser.error("choose one of --eval (or --is_train false), --predict and --export")
    for flag, value in (("--eval", opts.eval), ("--predict", opts.predict), ("--export", opts.export)):
        if value and not opts.ckpt:
            parser.error(f"{flag} needs --ckpt PATH (a checkpoint written by training, e.g. runs/NAME/best.pt, or a "
                         "model folder)")
    repeated = repeated_paths(opts.ckpt or [])
    if repeated:
        parser.error(f"--ckpt names {repeated} more than once: an ensemble averages different checkpoints")
    if opts.ckpt and len(opts.ckpt) > 1:
        if not (opts.eval or opts.predict):
            parser.error("several --ckpt are averaged by --eval and --predict; --export writes one checkpoint's model")
        if opts.eval and opts.report and not opts.out:
            parser.error("--eval of several --ckpt writes its reports to --out DIR (or add --no-report): "
                         "no one run's folder is theirs")
    if opts.eval and opts.report and not opts.out and opts.ckpt and published(opts.ckpt[0]):
        parser.error(f"--eval of {opts.ckpt[0]}, a model folder or Hub id, writes its reports to --out DIR (or add "
                     "--no-report): it is no training run's folder")
    check_model_options(parser, opts, cmap=bool(opts.eval or opts.predict))
    if opts.cuda_graphs and opts.compile:
        parser.error("choose one of --cuda-graphs and --compile (each removes the launch overhead its own way)")
    if opts.cuda_graphs and opts.amp == "fp16":
        parser.error("--cuda-graphs runs in fp32 or bf16: fp16's GradScaler changes its scale on the host")
    check_protocol_options(parser, opts)
    if opts.flip and not (opts.eval or opts.predict):
        parser.error("--flip is for --eval and --predict (training and --export run the model once per image)")
    if opts.tensorboard:
        from tblog import require_tensorboard

        require_tensorboard()  # now, not after the data set is checked and cached


def check_protocol_options(parser, opts):
    """The options of the peers' protocols: with --eval, and the caps and median scaling with a named protocol."""
    named = opts.protocol != "unreal"
    given = {"--protocol": named, "--save-predictions": opts.save_predictions, "--median-scale": opts.median_scale,
             "--min-depth-eval": opts.min_depth_eval is not None, "--max-depth-eval": opts.max_depth_eval is not None}
    for name, value in given.items():
        if value and not opts.eval:
            parser.error(f"{name} is for --eval")
    for name in ("--median-scale", "--min-depth-eval", "--max-depth-eval"):
        if given[name] and not named:
            parser.error(f"{name} is for --protocol nyu, kitti or kitti-eigen; the default protocol scores the "
                         "checkpoint's depth range")
    low, high = opts.min_depth_eval, opts.max_depth_eval
    if low is not None and not (low >= 0 and math.isfinite(low)):
        parser.error(f"--min-depth-eval must be a finite number of metres, at least 0; got {low}")
    if high is not None and not (high > 0 and math.isfinite(high)):
        parser.error(f"--max-depth-eval must be a finite positive number of metres; got {high}")
    if low is not None and high is not None and not low < high:
        parser.error(f"--min-depth-eval ({low}) must be below --max-depth-eval ({high})")


def without_val(opts, explicit):
    """Whether training should go on without validation: --eval-every left at its default, and a data set that
    has a training split but no val split (the peers' lists ship train and test only)."""
    if opts.eval or opts.predict or opts.export or opts.demo or "eval_every" in explicit or opts.eval_every == 0:
        return False
    from dataset import split_exists

    return split_exists(opts.data_dir, "train", opts.train_list) and not split_exists(opts.data_dir, "val",
                                                                                      opts.val_list)


def repeated_paths(paths):
    """The first path of `paths` that names the same file as an earlier one (by resolved path), else None."""
    seen = set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            return path
        seen.add(real)
    return None


def published(ckpt):
    """True if --ckpt `ckpt` is a model folder or a Hub id, not a checkpoint file (pretrained.py knows)."""
    from pretrained import is_published

    return is_published(ckpt)


def typed_options(argv):
    """The dests of the options on the command line, including those given their default value."""
    parser, untouched = build_parser(), object()
    # argparse fills in defaults only for names the namespace lacks: a marker in each shows what was typed.
    namespace = argparse.Namespace(**{dest: untouched for dest in vars(parser.parse_args([]))})
    return {k for k, v in vars(parser.parse_args(argv, namespace)).items() if v is not untouched}


def inherited_options(opts, explicit):
    """{option: value} that a resumed run takes from its checkpoint's config: every option of the run
    not typed again, so that `python main.py --resume runs/X/last.pt` continues with the same data,
    batch size, schedule, seed and run directory. Options typed with it win, and are listed."""
    from checkpoint import run_config

    config = run_config(opts.resume)
    inheritable = {k for k in config if k in vars(opts) and k not in NOT_INHERITED}
    changed = sorted(k for k in inheritable & explicit if config[k] != getattr(opts, k))
    if changed:
        listed = ", ".join("--{} {} (was {})".format(k.replace("_", "-"), getattr(opts, k), config[k]) for k in changed)
        print(f"resuming {opts.resume} with changed options: {listed}")
    return {k: config[k] for k in inheritable - explicit}


def parse_options(argv=None):
    """The options that run, settled here once: nothing changes them afterwards, and config.json is them.

    In order: --resume's inherited options, the checks, the course template's --is_train, the
    derived defaults (the data folder, the run folder) and the --demo preset. Options the user
    typed are never overridden. One documented exception: for --eval, --predict and --export the
    options of FROM_CHECKPOINT that were not typed are None, "the checkpoint's own", which only
    the checkpoint can tell; inference.load resolves them, in that one place.
    """
    parser = build_parser()
    opts = parser.parse_args(argv)
    typed = typed_options(argv)
    explicit = set(typed)  # the options typed or inherited, so that presets and resumes never override them
    if opts.resume:
        inherited = inherited_options(opts, explicit)
        vars(opts).update(inherited)
        explicit |= set(inherited)
    if opts.is_train is False:
        opts.eval = True
    if opts.eval or opts.predict or opts.export:
        for key in set(FROM_CHECKPOINT) - explicit:
            setattr(opts, key, None)  # the checkpoint's own, resolved by inference.load
    check_options(parser, opts)
    opts.image_size = input_size_option(opts.image_size)
    if opts.data_dir is None:
        opts.data_dir = os.path.join("data", "synthetic" if opts.demo else "DepthEstimationUnreal")
    if without_val(opts, explicit):
        print(f"{opts.data_dir} has no val split (no val.txt, rgb/val or --val-list): training without validation, "
              "so the run writes last.pt and no best.pt")
        opts.eval_every = 0
    if opts.demo:
        from demo import demo_preset

        vars(opts).update(demo_preset(opts, explicit, paper_batch_size=parser.get_default("batch_size")))
    # After the demo preset, which may turn --augment on: without it these two would change nothing, silently.
    for name, given in (("--max-zoom", "max_zoom" in typed), ("--zoom-closer", opts.zoom_closer)):
        if given and not opts.augment and not (opts.eval or opts.predict or opts.export):
            parser.error(f"{name} changes --augment's zoom: add --augment")
    if opts.crop and opts.image_size is not None:
        from dataset import input_hw  # torch, imported only when a crop must be checked against the input

        size = input_hw(opts.image_size)
        if any(c > s for c, s in zip(opts.crop, size)):
            parser.error("--crop {} {} must fit in --image-size {} {}".format(*opts.crop, *size))
    if opts.run_dir is None:
        opts.run_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return opts


def load_model(opts, amp=None):
    """inference.load of --ckpt with the options that choose how it runs and those typed over the checkpoint's."""
    from inference import load

    return load(opts.ckpt, opts.device, amp, flip=opts.flip, size=opts.image_size, conventions=typed_conventions(opts),
                channels_last=opts.channels_last)


def typed_conventions(opts):
    """The depth options as typed over a checkpoint's conventions: {field: value}, None where not typed."""
    from conventions import FIELDS

    return {k: getattr(opts, k) for k in FIELDS}


def run_eval(opts):
    from dataset import DepthEstimationUnreal, split_files
    from evaluate import format_metrics, write_eval_report
    from hardware import select_amp_dtype
    from utils import make_output_folder, write_json_atomic

    trained = load_model(opts)
    report_dir = run_dir = None
    if opts.report:
        # An ensemble's reports go to --out, and no one run's training curves are theirs.
        run_dir = os.path.dirname(os.path.abspath(opts.ckpt[0])) if len(opts.ckpt) == 1 else None
        report_dir = opts.out or run_dir
        check_writable_folder(report_dir, "--out")  # before the evaluation, not after it
    if opts.metrics_out:
        check_writable_folder(os.path.dirname(os.path.abspath(opts.metrics_out)), "--metrics-out")
    # fp32 unless autocast is asked for by name (docs/design.md §8): "auto" would make the same
    # checkpoint score differently on different CPUs, and differ from what its training recorded.
    amp_dtype = select_amp_dtype(opts.amp, trained.device) if opts.amp != "auto" else None
    dataset = DepthEstimationUnreal(opts.data_dir, opts.split, size=trained.size, conventions=trained.conventions,
                                    native=True, progress=not opts.quiet, max_pixels=opts.max_pixels,
                                    **split_files(opts, opts.split))
    if opts.save_predictions:
        make_output_folder(opts.save_predictions, "--save-predictions")
    metrics, rows, protocol = score_split(opts, trained.net, dataset, trained.device, amp_dtype)
    named = f"checkpoint {opts.ckpt[0]}" if len(opts.ckpt) == 1 else f"the mean of checkpoints {', '.join(opts.ckpt)}"
    print(protocol)
    print(format_metrics(metrics, f"{opts.split} split of {opts.data_dir}, {named}"))
    if opts.save_predictions:
        print(f"predictions written to {opts.save_predictions} (float32 metres, at the ground truth's size)")
    if opts.metrics_out:
        write_json_atomic(metrics, opts.metrics_out)
        print(f"metrics written to {opts.metrics_out}")
    if opts.report:
        write_eval_report(trained.net, dataset, rows, trained.device, out_dir=report_dir, run_dir=run_dir,
                          amp_dtype=amp_dtype, grid_rows=opts.report_images, cmap=opts.cmap)
    return metrics


def check_writable_folder(path, option):
    """Create `path` if needed and write a probe file there; a UserError naming `option` if that fails."""
    from utils import UserError, make_output_folder, write_probe

    make_output_folder(path, option)
    try:
        write_probe(path)
    except OSError as err:
        raise UserError(f"cannot write to {path}: {err.strerror or err}; choose another {option}") from None


def score_split(opts, model, dataset, device, amp_dtype):
    """(metrics, per-image rows, the line naming the protocol) of --eval under --protocol."""
    from evaluate import evaluate, evaluate_protocol, protocol_line, protocol_with_caps, unreal_line

    if opts.protocol == "unreal":
        metrics, rows = evaluate(model, dataset, device, amp_dtype=amp_dtype, num_workers=opts.workers,
                                 per_image=True, save_dir=opts.save_predictions)
        return metrics, rows, unreal_line(dataset, metrics["n_images"])
    protocol = protocol_with_caps(opts.protocol, opts.min_depth_eval, opts.max_depth_eval)
    metrics, rows = evaluate_protocol(model, dataset, device, protocol, amp_dtype=amp_dtype, num_workers=opts.workers,
                                      median_scale=opts.median_scale, save_dir=opts.save_predictions,
                                      progress=not opts.quiet)
    settings = {"protocol": protocol.name, "min_depth_eval": protocol.min_depth,
                "max_depth_eval": protocol.max_depth, "median_scale": opts.median_scale}
    return {**settings, **metrics}, rows, protocol_line(protocol, metrics["n_images"], opts.median_scale)


def run_predict(opts):
    from predict import list_images, predict_files
    from utils import UserError
    from video import is_video

    if is_video(opts.predict):
        return run_predict_video(opts)
    if opts.npy:
        raise UserError("--npy is for --predict on a video; an image's depth is always written as NAME.npy")
    paths = list_images(opts.predict)
    predictor = load_model(opts, amp=opts.amp)
    out = opts.out or "out"
    written, skipped = predict_files(predictor, paths, out, batch_size=opts.batch_size, num_workers=opts.workers,
                                     cmap=opts.cmap, png16=opts.png16, ply=opts.ply, hfov_deg=opts.fov,
                                     quiet=opts.quiet, max_pixels=opts.max_pixels)
    if len(paths) == 1 and skipped:
        raise UserError(skipped[0][1])
    print(f"wrote the depth of {written} image(s) to {out}")
    if skipped:
        raise UserError(f"{len(skipped)} of {len(paths)} image(s) could not be read and were skipped (see above)")


def run_predict_video(opts):
    from utils import UserError
    from video import predict_video, video_output_paths

    if opts.png16 or opts.ply:
        raise UserError("--png16 and --ply are for images; for a video, --npy writes every frame's depth")
    out = opts.out or "out"
    frames, height, width = predict_video(load_model(opts, amp=opts.amp), opts.predict, out,
                                          batch_size=opts.batch_size, cmap=opts.cmap, npy=opts.npy, quiet=opts.quiet,
                                          max_pixels=opts.max_pixels)
    written = video_output_paths(opts.predict, out)
    print(f"wrote the depth of {frames} frame(s) of {width} x {height} to {written['mp4']}"
          + (f" and {written['npy']}" if opts.npy else ""))


def run_export(opts):
    from dataset import input_hw
    from export import export_model
    from inference import load

    if opts.export == "pretrained":
        return run_export_pretrained(opts)
    trained = load(opts.ckpt, "cpu", size=opts.image_size)
    size = trained.size
    out = opts.out or os.path.splitext(opts.ckpt[0])[0] + (".onnx" if opts.export == "onnx" else ".torchscript.pt")
    diff = export_model(trained.net, opts.export, out, size=size)
    h, w = input_hw(size)
    print(f"{opts.export} model written to {out}: RGB in [0, 1] (B, 3, {h}, {w}) -> depth in metres (B, 1, {h}, {w}); "
          f"max |exported - eager| on random input: {diff:.2e}")


def run_export_pretrained(opts):
    from pretrained import export_pretrained

    ckpt = opts.ckpt[0]
    out = opts.out or os.path.splitext(os.path.normpath(ckpt))[0] + "_pretrained"
    export_pretrained(ckpt, out, size=opts.image_size, depth=typed_conventions(opts))
    print(f"model folder written to {out}: config.json, model.safetensors, README.md; load it with --ckpt {out}, "
          f"DepthNet.from_pretrained({out!r}) or torch.hub")


def run_train(opts):
    from distributed import close_distributed
    from train import Trainer
    from utils import stop_status

    try:
        trainer = Trainer(opts)
        trainer.fit()
    finally:
        close_distributed()
    # Stopped by a signal: exit as a killed process would (130, 143), though last.pt is
    # written, so that `python main.py && python main.py --eval ...` does not go on.
    return stop_status(trainer.stop_signal) if trainer.stop_signal else 0





def run(argv):
    """Parse the options and do what they say; returns the exit status."""
    opts = parse_options(argv)
    if opts.demo:
        from demo import run_demo

        return run_demo(opts)
    if opts.eval:
        run_eval(opts)
    elif opts.predict:
        run_predict(opts)
    elif opts.export:
        run_export(opts)
    else:
        return run_train(opts)
    return 0


def main(argv=None):
    from utils import run_as_program

    # Training installs its own handlers, which finish the step and write last.pt first.
    return run_as_program(lambda: run(argv), "files already written are intact, none is left half-written")


if __name__ == "__main__":
    sys.exit(main())
