"""Entry point: every option lives here, with the paper's values as defaults (docs/design.md §7, §9).

    python main.py                                  train (paper preset)
    python main.py --eval --ckpt runs/X/best.pt     evaluate a checkpoint (both protocols) and write reports
    python main.py --predict IMAGE_OR_DIR --ckpt runs/X/best.pt --out DIR    depth of any images
    python main.py --export torchscript --ckpt runs/X/best.pt --out FILE     export for deployment
    torchrun --nproc_per_node 4 main.py ...         train on 4 GPUs (--batch-size stays the global batch)
"""
import argparse
import os
import sys
import time

# Options about this machine or this invocation rather than the run: --resume never takes them from the checkpoint.
NOT_INHERITED = {"resume", "ckpt", "eval", "is_train", "demo", "split", "metrics_out", "quiet", "device", "workers",
                 "predict", "export", "out", "cmap", "png16", "ply", "flip", "fov", "npy", "report", "report_images",
                 "compile", "cuda_graphs"}

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
                           "or with split lists ROOT/{train,val,test}.txt of 'RGB_PATH DEPTH_PATH' lines "
                           "(default: data/DepthEstimationUnreal; data/synthetic with --demo)")
    data.add_argument("--split", default="val", choices=["train", "val", "test"], help="split that --eval scores")
    data.add_argument("--workers", type=int, default=2,
                      help="DataLoader worker processes (0: load in the main process)")
    data.add_argument("--image-size", type=int, nargs="+", default=224, metavar="SIZE",
                      help="network input: side S of a square, or height H and width W (multiples of 32); the paper "
                           "uses 224, smaller is for tests and laptops. --eval, --predict and --export use the "
                           "checkpoint's own unless this is given")
    data.add_argument("--max-depth", type=float, default=20.0,
                      help="depth is clipped to [0, MAX] metres (the paper's 20), and predictions to it; --eval, "
                           "--predict and --export use the checkpoint's own unless this is given")
    data.add_argument("--min-depth", type=float, default=1e-3,
                      help="ground truth at or below this (metres) is 'not measured' (0 in every common format) and "
                           "counts nowhere: not in the loss, the metrics or the baselines")
    data.add_argument("--max-pixels", type=int, default=4096 * 4096,
                      help="refuse images with more pixels than this (read from the file's header, before decoding): "
                           "data, --predict's images and video frames, the web page's uploads")
    data.add_argument("--depth-scale", type=float, default=1000.0,
                      help="a 16-bit depth PNG holds metres x this: 1000 (millimetres, NYU Depth v2), 256 (KITTI)")
    data.add_argument("--cache", default="auto", choices=["auto", "off"],
                      help="auto: decode the training split once into ROOT/.cache (uint8 RGB, float16 depth) and train "
                           "from it, held on the GPU when it fits; off: decode every epoch with the folder loader")

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


# --predict's options that app.py takes too, defined once in build_parser.
# The options app.py shares with --predict (their names, types, choices and defaults are defined once, in
# build_parser), with the page's own words for each.
APP_HELP = {
    "ckpt": "required: the checkpoint written by training to serve on the page (e.g. runs/demo/best.pt), a model "
            "folder (--export pretrained) or a Hugging Face Hub id OWNER/NAME; several: their depth averaged",
    "image_size": "network input, S or H W (multiples of 32); default: the size the checkpoint was trained at",
    "device": "where the model runs; auto: CUDA when there is one",
    "amp": "dtype the weights are cast to once; auto: bf16 where the hardware runs it, else fp32",
    "cmap": "matplotlib colormap of the depth picture and its colour bar",
    "fov": "starting value of the page's slider: the horizontal field of view (degrees) of the camera the point "
           "cloud is back-projected with",
    "flip": "show the mean of each photo's depth and, mirrored back, its mirror image's (two forward passes)",
    "max_pixels": "refuse uploads with more pixels than this, read from the file's header before decoding",
}
# Options the checkpoint records, which --eval, --predict and --export take from it unless typed.
FROM_CHECKPOINT = ("image_size", "max_depth", "min_depth", "depth_scale")


def build_app_parser():
    """Options of app.py, the web page to try a model: how to serve it, then --predict's own."""
    p = argparse.ArgumentParser(prog="app.py", formatter_class=HelpFormatter,
                                description="A web page to try a trained model: upload a photo, see its depth and "
                                            "a 3-D point cloud, download the depth (needs: pip install -r "
                                            "requirements-app.txt).")
    serve = p.add_argument_group("serving")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 makes the page reachable from other machines")
    serve.add_argument("--port", type=int, default=7860, help="port to listen on")
    serve.add_argument("--max-upload-mb", type=float, default=20.0,
                       help="uploads larger than this many megabytes are refused")
    shared = p.add_argument_group("the model and what the page does with it")
    for action in build_parser()._actions:
        if action.dest not in APP_HELP:
            continue
        if action.nargs == 0:  # a flag
            shared.add_argument(*action.option_strings, dest=action.dest, action="store_true",
                                help=APP_HELP[action.dest])
        else:
            # No default size: like --predict, the page feeds the model the size it was trained at unless told.
            shared.add_argument(*action.option_strings, dest=action.dest, type=action.type, choices=action.choices,
                                nargs=action.nargs, default=None if action.dest == "image_size" else action.default,
                                metavar=action.metavar, help=APP_HELP[action.dest], required=action.dest == "ckpt")
    return p


def parse_app_options(argv=None):
    parser = build_app_parser()
    opts = parser.parse_args(argv)
    if not 0 < opts.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {opts.port}")
    if not opts.max_upload_mb > 0:
        parser.error(f"--max-upload-mb must be positive, got {opts.max_upload_mb}")
    check_model_options(parser, opts, cmap=True)
    opts.image_size = input_size_option(opts.image_size)
    return opts


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
    if not 0 <= opts.min_depth < opts.max_depth:
        parser.error(f"--min-depth ({opts.min_depth}) must be at least 0 and below --max-depth ({opts.max_depth})")
    if not opts.max_pixels > 0:
        parser.error(f"--max-pixels must be positive, got {opts.max_pixels}")
    if not opts.depth_scale > 0:
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
    if opts.flip and not (opts.eval or opts.predict):
        parser.error("--flip is for --eval and --predict (training and --export run the model once per image)")
    if opts.tensorboard:
        from tblog import require_tensorboard

        require_tensorboard()  # now, not after the data set is checked and cached


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
    derived defaults (the checkpoint's own input size for --eval, --predict and --export; the data
    folder; the run folder) and the --demo preset. Options the user typed are never overridden.
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
    check_options(parser, opts)
    opts.image_size = input_size_option(opts.image_size)
    if opts.eval or opts.predict or opts.export:
        for key in set(FROM_CHECKPOINT) - explicit:
            setattr(opts, key, None)  # what the checkpoint was trained with (inference.load_trained)
    if opts.data_dir is None:
        opts.data_dir = os.path.join("data", "synthetic" if opts.demo else "DepthEstimationUnreal")
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


def run_eval(opts):
    from dataset import DepthEstimationUnreal
    from evaluate import evaluate, format_metrics, write_eval_report
    from hardware import select_amp_dtype
    from inference import load_trained, with_flip
    from utils import write_json_atomic

    model, size, device, trained_depth = load_trained(opts.ckpt, opts.device, opts.image_size, opts.channels_last)
    model = with_flip(model, opts.flip)
    depth = typed_or_trained(opts, trained_depth)
    # fp32 unless autocast is asked for by name (docs/design.md §8): "auto" would make the same
    # checkpoint score differently on different CPUs, and differ from what its training recorded.
    amp_dtype = select_amp_dtype(opts.amp, device) if opts.amp != "auto" else None
    dataset = DepthEstimationUnreal(opts.data_dir, opts.split, size=size, native=True, progress=not opts.quiet,
                                    max_pixels=opts.max_pixels, **depth)
    metrics, rows = evaluate(model, dataset, device, amp_dtype=amp_dtype, num_workers=opts.workers, per_image=True)
    named = f"checkpoint {opts.ckpt[0]}" if len(opts.ckpt) == 1 else f"the mean of checkpoints {', '.join(opts.ckpt)}"
    print(format_metrics(metrics, f"{opts.split} split of {opts.data_dir}, {named}"))
    if opts.metrics_out:
        write_json_atomic(metrics, opts.metrics_out)
        print(f"metrics written to {opts.metrics_out}")
    if opts.report:
        # An ensemble's reports go to --out, and no one run's training curves are theirs.
        run_dir = os.path.dirname(os.path.abspath(opts.ckpt[0])) if len(opts.ckpt) == 1 else None
        write_eval_report(model, dataset, rows, device, out_dir=opts.out or run_dir, run_dir=run_dir,
                          amp_dtype=amp_dtype, grid_rows=opts.report_images, cmap=opts.cmap)
    return metrics


def load_predictor_of(opts):
    """--predict's model of --ckpt: inference.load_predictor with the options that choose how it runs."""
    from inference import load_predictor

    trained = load_predictor(opts.ckpt, opts.device, opts.amp, opts.image_size, opts.channels_last, opts.flip)
    return trained, typed_or_trained(opts, trained.depth)["max_depth"]


def typed_or_trained(opts, trained_depth):
    """The depth conventions to use with a checkpoint: each typed option, else what the checkpoint was trained
    with (parse_options leaves the untyped ones None)."""
    return {k: trained_depth[k] if getattr(opts, k) is None else getattr(opts, k) for k in trained_depth}


def run_predict(opts):
    from predict import list_images, predict_files
    from utils import UserError
    from video import is_video

    if is_video(opts.predict):
        return run_predict_video(opts)
    if opts.npy:
        raise UserError("--npy is for --predict on a video; an image's depth is always written as NAME.npy")
    paths = list_images(opts.predict)
    (model, size, device, _), max_depth = load_predictor_of(opts)
    out = opts.out or "out"
    written, skipped = predict_files(model, paths, out, device, batch_size=opts.batch_size, num_workers=opts.workers,
                                     size=size, max_depth=max_depth, cmap=opts.cmap, png16=opts.png16, ply=opts.ply,
                                     hfov_deg=opts.fov, quiet=opts.quiet, max_pixels=opts.max_pixels)
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
    (model, size, device, _), max_depth = load_predictor_of(opts)
    out = opts.out or "out"
    frames, height, width = predict_video(model, opts.predict, out, device, size, batch_size=opts.batch_size,
                                          max_depth=max_depth, cmap=opts.cmap, npy=opts.npy, quiet=opts.quiet,
                                          max_pixels=opts.max_pixels)
    written = video_output_paths(opts.predict, out)
    print(f"wrote the depth of {frames} frame(s) of {width} x {height} to {written['mp4']}"
          + (f" and {written['npy']}" if opts.npy else ""))


def run_export(opts):
    from dataset import input_hw
    from export import export_model
    from inference import load_trained

    if opts.export == "pretrained":
        return run_export_pretrained(opts)
    model, size, _, _ = load_trained(opts.ckpt, "cpu", opts.image_size)
    out = opts.out or os.path.splitext(opts.ckpt[0])[0] + (".onnx" if opts.export == "onnx" else ".torchscript.pt")
    diff = export_model(model, opts.export, out, size=size)
    h, w = input_hw(size)
    print(f"{opts.export} model written to {out}: RGB in [0, 1] (B, 3, {h}, {w}) -> depth in metres (B, 1, {h}, {w}); "
          f"max |exported - eager| on random input: {diff:.2e}")


def run_export_pretrained(opts):
    from pretrained import export_pretrained

    ckpt = opts.ckpt[0]
    out = opts.out or os.path.splitext(os.path.normpath(ckpt))[0] + "_pretrained"
    typed = {k: getattr(opts, k) for k in ("min_depth", "max_depth", "depth_scale") if getattr(opts, k) is not None}
    export_pretrained(ckpt, out, size=opts.image_size, depth=typed)
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
