"""Speed benchmark: our training and inference pipeline against a plain baseline, in one run.

    python bench.py                                   whatever device there is; writes bench.json
    python bench.py --device cuda --batch-size 32 --steps 100 --warmup 30 --compile
    python bench.py --ssim-variants                   only time the ways of computing SSIM

Baseline: the plain way to train this network: a DataLoader decoding every sample with PIL,
fp32, eager, contiguous memory, plain Adam, SSIM with five 2-D 11 × 11 convolutions.
Ours: train.Trainer's own step: the decoded cache (on the GPU when it fits), channels_last,
autocast (--amp auto), SSIM by banded matrix products, fused Adam, no host synchronisation
per step; for inference inference.InferenceModel (weights cast once to bf16, channels_last).

Both are measured in the same process. On CPUs, where other work makes timings noisy,
they alternate in --rounds rounds; on GPUs they run one after the other so that each one's
peak memory is its own. Without --data-dir synthetic.py writes a small data set of street
scenes to a temporary folder (no file of the real data set is needed for speed).
FLOPs: torch.utils.flop_counter on one forward pass; training counts 3 × forward
(backward ≈ 2 × forward), leaving out the loss (< 0.2 %) and the optimiser.
"""
import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from dataset import DepthEstimationUnreal
from evaluate import evaluate
from hardware import select_amp_dtype, select_device, synchronize
from inference import InferenceModel
from losses import gaussian_blur_maps, gaussian_taps, rmse
from main import parse_options
from model import DepthNet
from pretrained import export_pretrained
from synthetic import generate_dataset
from train import Trainer
from utils import atomic_path, write_json_atomic

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, most specific
# name first. The baseline's convolutions run in TF32 on these GPUs (cudnn.allow_tf32 is on
# by default), ours in bf16.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5}),
    ("H100", {"bf16": 989.4, "tf32": 494.7}),
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5}),
    ("H200", {"bf16": 989.4, "tf32": 494.7}),
    ("A100", {"bf16": 312.0, "tf32": 156.0}),
)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def build_parser():
    p = argparse.ArgumentParser(description="Training and inference speed: our pipeline against a plain baseline.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when there is one")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps of ours (default: 6 on CPU, 100 on CUDA)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="timed training steps of the baseline (default: as --steps on CPU, 40 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on CPU, 30 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: 8 on CPU, 32 on CUDA)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternate baseline and ours in this many rounds (default: 3 on CPU, 1 on CUDA)")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="ours: autocast dtype, as in main.py")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the model (compiling is in the warm-up)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="ours: the training step captured in a CUDA graph (main.py --cuda-graphs; capture is in the "
                        "warm-up)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers (baseline; cache build)")
    p.add_argument("--data-dir", default=None, help="data set to read; default: generate one in a temporary folder")
    p.add_argument("--images", type=int, default=None,
                   help="training images to generate (default: 64 on CPU, 2048 on CUDA)")
    p.add_argument("--inference-reps", type=int, default=None,
                   help="timed batch-1 inference calls (default: 10 CPU, 50 CUDA); a fifth of them at "
                        "--inference-batch")
    p.add_argument("--inference-batch", type=int, default=32, help="batch size of the inference throughput figure")
    p.add_argument("--ssim-variants", action="store_true",
                   help="only compare the SSIM implementations (forward + backward)")
    p.add_argument("--predict-cli", action="store_true",
                   help="only time `python main.py --predict` itself, as users run it, against the same command "
                        "with --amp off --no-channels-last (fp32, contiguous), and one image with the checkpoint's "
                        "model folder (--export pretrained) against `import torch, torchvision`")
    p.add_argument("--cli-images", type=int, default=32, help="--predict-cli: images in the folder predicted")
    p.add_argument("--cli-reps", type=int, default=3, help="--predict-cli: runs of each command (median)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="only profile this many of our training steps with torch.profiler (after --warmup); "
                        "writes a per-op table beside --out")
    p.add_argument("--out", default="bench.json", help="JSON file for the results")
    return p


# ------------------------------------------------------------------ SSIM implementations
def ssim_2d(x, y, data_range=1.0):
    """The plain reference: each of the five statistics blurred by its own 2-D 11 × 11 convolution."""
    g = gaussian_taps(device=x.device)
    window = torch.outer(g, g).view(1, 1, 11, 11)
    mu_x, mu_y, e_xx, e_yy, e_xy = (F.conv2d(t, window, padding=5) for t in (x, y, x * x, y * y, x * y))
    return ssim_from_stats(torch.cat([mu_x, mu_y, e_xx, e_yy, e_xy], dim=1), data_range)


def ssim_from_stats(stats, data_range=1.0):
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(1, dim=1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * (e_xy - mu_x * mu_y) + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (e_xx - mu_x * mu_x + e_yy - mu_y * mu_y + c2)
    return (num / den).mean()


def five_maps(x, y):
    return torch.cat([x, y, x * x, y * y, x * y], dim=1)


def ssim_2d_grouped(x, y):
    """One grouped 2-D convolution over the five stacked statistics."""
    g = gaussian_taps(device=x.device)
    window = torch.outer(g, g).view(1, 1, 11, 11).expand(5, 1, 11, 11)
    return ssim_from_stats(F.conv2d(five_maps(x, y), window, padding=5, groups=5))


def ssim_separable(x, y):
    """Two 1-D grouped convolutions (rows, then columns) over the five stacked statistics."""
    g = gaussian_taps(device=x.device)
    maps = F.conv2d(five_maps(x, y), g.view(1, 1, 1, -1).expand(5, 1, 1, -1), padding=(0, 5), groups=5)
    return ssim_from_stats(F.conv2d(maps, g.view(1, 1, -1, 1).expand(5, 1, -1, 1), padding=(5, 0), groups=5))


def ssim_banded(x, y):
    """losses.py's way: both blur passes as products with banded Gaussian matrices."""
    return ssim_from_stats(gaussian_blur_maps(five_maps(x, y), "same"))


SSIM_VARIANTS = {
    "2d_five_convs (baseline)": ssim_2d,
    "2d_grouped": ssim_2d_grouped,
    "separable_grouped": ssim_separable,
    "banded_matmul (losses.py)": ssim_banded,
}


def bench_ssim_variants(device, batch_size, rounds):
    """Forward + backward time of each SSIM variant on (B, 1, 224, 224) depth maps, interleaved."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, 1, 224, 224, generator=gen) * 20).to(device).requires_grad_()
    y = (torch.rand(batch_size, 1, 224, 224, generator=gen) * 20).to(device)
    with torch.no_grad():
        reference = float(ssim_2d(x, y))
    times = {name: [] for name in SSIM_VARIANTS}
    results = {}
    for name, fn in SSIM_VARIANTS.items():
        value = fn(x, y)
        value.backward()  # also the warm-up (cudnn autotuning, allocator)
        results[name] = {"abs_diff_to_2d": abs(float(value.detach()) - reference)}
    for _ in range(rounds):
        for name, fn in SSIM_VARIANTS.items():
            synchronize(device)
            t = time.perf_counter()
            fn(x, y).backward()
            x.grad = None
            synchronize(device)
            times[name].append(time.perf_counter() - t)
    for name in SSIM_VARIANTS:
        results[name]["ms"] = 1e3 * statistics.median(times[name])
    return {"batch_size": batch_size, "rounds": rounds, "variants": results}


# ------------------------------------------------------------------ training pipelines
class BaselineTraining:
    """The plain pipeline: per-sample PIL decoding, fp32, eager, contiguous, 2-D SSIM, plain Adam."""

    name = "baseline"

    def __init__(self, data_dir, device, batch_size, workers, init_depth):
        torch.backends.cudnn.benchmark = False
        torch.manual_seed(0)
        self.device = device
        self.model = DepthNet(weights=None, init_depth=init_depth).to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)
        self.scheduler = torch.optim.lr_scheduler.CyclicLR(self.optimizer, base_lr=1e-3, max_lr=5e-3, step_size_up=1000,
                                                           step_size_down=2000, mode="triangular2")
        self.loader = DataLoader(DepthEstimationUnreal(data_dir, "train"), batch_size=batch_size, shuffle=True,
                                 drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0)
        self.batches = iter(self.loader)
        self.batch_size = batch_size

    def step(self):
        try:
            rgb, depth = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            rgb, depth = next(self.batches)
        rgb, depth = rgb.to(self.device, non_blocking=True), depth.to(self.device, non_blocking=True)
        pred = self.model(rgb)
        loss = rmse(pred, depth) + (1 - ssim_2d(pred, depth))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def finish(self):
        pass

    def close(self):
        del self.batches, self.loader


class OurTraining:
    """train.Trainer's step on its own data path, driven one step at a time."""

    name = "ours"

    def __init__(self, data_dir, device, batch_size, workers, amp, compile_model, run_dir, cuda_graphs=False):
        argv = ["--data-dir", data_dir, "--weights", "none", "--batch-size", str(batch_size), "--eval-every", "0",
                "--vis-every", "0", "--run-dir", run_dir, "--quiet", "--device", device.type, "--amp", amp,
                "--workers", str(workers)] + (["--compile"] if compile_model else []) + \
            (["--cuda-graphs"] if cuda_graphs else [])
        start = time.perf_counter()
        self.trainer = Trainer(parse_options(argv))
        self.setup_s = time.perf_counter() - start
        self.batches = self.trainer.epoch_batches()
        self.batch_size = batch_size

    def step(self):
        try:
            rgb, depth = next(self.batches)
        except StopIteration:
            self.trainer.finish_epoch()
            self.batches = self.trainer.epoch_batches()
            rgb, depth = next(self.batches)
        done = self.trainer.train_step(rgb, depth)
        return done.parts["loss"] if done is not None else torch.tensor(float("nan"))

    def finish(self):
        self.trainer.check_losses()

    def close(self):
        del self.batches


def time_training(runners, device, warmup, steps, rounds):
    """{name: {img_s, step_ms, ...}}: `steps[name]` timed steps each, alternating in `rounds` rounds."""
    out = {}
    for r in runners:
        start = time.perf_counter()
        for _ in range(warmup):
            r.step()
        r.finish()
        synchronize(device)
        out[r.name] = {"warmup_s": time.perf_counter() - start, "seconds": 0.0, "steps": 0}
    for k in range(rounds):
        for r in runners:
            n = steps[r.name] // rounds + (k < steps[r.name] % rounds)
            if n == 0:
                continue
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                loss = r.step()
            r.finish()
            synchronize(device)
            out[r.name]["seconds"] += time.perf_counter() - start
            out[r.name]["steps"] += n
            out[r.name]["last_loss"] = float(loss)
    for r in runners:
        res = out[r.name]
        res["batch_size"] = r.batch_size
        res["img_s"] = res["steps"] * r.batch_size / res["seconds"]
        res["step_ms"] = 1e3 * res["seconds"] / res["steps"]
    return out


def peak_memory(device):
    """Bytes: the CUDA allocator's peak on GPUs, else the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory_kind": "process peak RSS (ru_maxrss), cumulative over the run"}


def bench_training(args, device, data_dir, run_dir):
    init_depth = DepthEstimationUnreal(data_dir, "train").mean_depth
    steps = {"baseline": args.baseline_steps, "ours": args.steps}

    def make(name):
        if name == "baseline":
            return BaselineTraining(data_dir, device, args.batch_size, args.workers, init_depth)
        return OurTraining(data_dir, device, args.batch_size, args.workers, args.amp, args.compile, run_dir,
                           args.cuda_graphs)

    if device.type == "cuda":
        results, trainer = {}, None
        for name in ("baseline", "ours"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            runner = make(name)
            results.update(time_training([runner], device, args.warmup, steps, rounds=1))
            results[name].update(peak_memory(device))
            if name == "ours":
                results[name]["setup_s"] = runner.setup_s
                trainer = runner.trainer
            runner.close()
            del runner
        return results, trainer
    runners = [make("baseline"), make("ours")]
    results = time_training(runners, device, args.warmup, steps, args.rounds)
    results["ours"]["setup_s"] = runners[1].setup_s
    results["ours"].update(peak_memory(device))
    return results, runners[1].trainer


# ------------------------------------------------------------------ inference
def bench_inference(device, amp_dtype, compile_model, reps, batch_size=32):
    """Median latency at batch 1 and throughput at `batch_size`, alternating calls.

    Baseline: the fp32 model as trained. Ours: inference.InferenceModel, weights cast once to the
    autocast dtype, channels_last (compiled with --compile). Inputs already on the device.
    """
    torch.manual_seed(0)
    baseline = DepthNet(weights=None).to(device).eval()
    ours = InferenceModel(baseline, amp_dtype)
    ours_fn = torch.compile(ours) if compile_model else ours

    def run(name, x):
        with torch.no_grad():
            return baseline(x) if name == "baseline" else ours_fn(x)

    out = {"baseline": {}, "ours": {}}
    for b in (1, batch_size):
        x = torch.rand(b, 3, 224, 224, device=device)
        for name in out:
            for _ in range(3 if device.type == "cuda" or compile_model else 1):  # warm-up (and compiling this shape)
                run(name, x)
        synchronize(device)
        times = {name: [] for name in out}
        for _ in range(reps if b == 1 else max(2, reps // 5)):
            for name in out:
                synchronize(device)
                t = time.perf_counter()
                run(name, x)
                synchronize(device)
                times[name].append(time.perf_counter() - t)
        for name in out:
            if b == 1:
                out[name]["latency_ms_batch1"] = 1e3 * statistics.median(times[name])
            else:
                out[name]["img_s_batchN"] = b * len(times[name]) / sum(times[name])
                out[name]["batch_N"] = b
    return out


# ------------------------------------------------------------------ the --predict command
def save_untrained_checkpoint(data_dir, device, run_dir):
    """A checkpoint as training writes it (weights, optimiser, schedule): its size is part of the load time."""
    trainer = Trainer(parse_options(["--data-dir", data_dir, "--run-dir", run_dir, "--weights", "none", "--quiet",
                                     "--device", device.type, "--eval-every", "0", "--vis-every", "0",
                                     "--workers", "0"]))
    trainer.save_checkpoint("best.pt")
    return os.path.join(run_dir, "best.pt")


def run_timed(cmd):
    """Wall seconds of one command; its output in the error if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return seconds


def bench_predict_cli(args, device):
    """`python main.py --predict` as users run it, on one image and on a folder, against the same command
    with --amp off --no-channels-last; `python -c "import torch"` and `"import torchvision"` beside them
    are the floor of any command that builds the model. The commands alternate, --cli-reps times each;
    medians."""
    main_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py")
    variants = {"baseline": ["--amp", "off", "--no-channels-last"], "ours": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data_dir = os.path.join(tmp, "data")
        generate_dataset(data_dir, 2, args.cli_images, 0, workers=max(1, args.workers), progress=False)
        ckpt = save_untrained_checkpoint(data_dir, device, os.path.join(tmp, "run"))
        model_folder = os.path.join(tmp, "model")
        export_pretrained(ckpt, model_folder)
        folder = os.path.join(data_dir, "rgb", "val")
        targets = {"one_image": os.path.join(folder, sorted(os.listdir(folder))[0]), "folder": folder}
        floors = {"import_torch": "import torch", "import_torchvision": "import torchvision",
                  "import_torch_torchvision": "import torch, torchvision"}
        times = {k: [] for k in floors} | {f"{v}/{t}": [] for v in variants for t in targets} | {"model_folder": []}
        for rep in range(args.cli_reps):
            for k, code in floors.items():
                times[k].append(run_timed([sys.executable, "-c", code]))
            for v, extra in variants.items():
                for t, target in targets.items():
                    out = os.path.join(tmp, f"out-{v}-{t}-{rep}")
                    times[f"{v}/{t}"].append(run_timed([sys.executable, main_py, "--predict", target, "--ckpt", ckpt,
                                                        "--out", out, "--device", device.type, "--quiet", *extra]))
            # The model folder of the same weights (--export pretrained): no optimiser state to read past.
            times["model_folder"].append(run_timed([sys.executable, main_py, "--predict", targets["one_image"],
                                                    "--ckpt", model_folder, "--out", os.path.join(tmp, f"out-m-{rep}"),
                                                    "--device", device.type, "--quiet"]))
        n = len(os.listdir(folder))
        result = {"images_in_folder": n, "reps": args.cli_reps, "checkpoint_bytes": os.path.getsize(ckpt),
                  "runs_s": times} | {f"{k}_s": statistics.median(times[k]) for k in floors}
        for v in variants:
            one, many = (statistics.median(times[f"{v}/{t}"]) for t in targets)
            result[v] = {"one_image_s": one, "folder_s": many, "per_extra_image_ms": 1e3 * (many - one) / (n - 1),
                         "options": " ".join(variants[v]) or "(defaults)"}
    for key in ("one_image_s", "folder_s", "per_extra_image_ms"):
        result[f"{key}_ratio"] = result["ours"][key] / result["baseline"][key]
    # One image against the floor, per interleaved repetition (each pair ran moments apart), then the median.
    floor = times["import_torch_torchvision"]
    result["model_folder_one_image_s"] = statistics.median(times["model_folder"])
    for name, runs in (("checkpoint", times["ours/one_image"]), ("model_folder", times["model_folder"])):
        result[f"{name}_over_import_floor"] = statistics.median(t / f for t, f in zip(runs, floor))
    return result


def print_predict_cli(r):
    print(f"\n{r['device_name']} | torch {r['torch']} | python main.py --predict, median of {r['cli']['reps']} runs")
    print(f"{'':30}{'baseline':>12}{'ours':>12}{'ours/baseline':>16}")
    c = r["cli"]
    for label, key in (("one image, s (whole process)", "one_image_s"),
                       (f"folder of {c['images_in_folder']}, s", "folder_s"),
                       ("each further image, ms", "per_extra_image_ms")):
        b, o = c["baseline"][key], c["ours"][key]
        print(f"{label:30}{b:>12.4g}{o:>12.4g}{o / b:>16.3f}")
    print(f"python -c 'import torch' alone: {c['import_torch_s']:.2f} s, 'import torchvision' "
          f"{c['import_torchvision_s']:.2f} s; checkpoint {c['checkpoint_bytes'] / 1e6:.0f} MB")
    print(f"one image over 'import torch, torchvision' ({c['import_torch_torchvision_s']:.2f} s), median of the "
          f"runs' ratios: the checkpoint {c['checkpoint_over_import_floor']:.3f}, its model folder (--export "
          f"pretrained, {c['model_folder_one_image_s']:.2f} s) {c['model_folder_over_import_floor']:.3f}")


# ------------------------------------------------------------------ profile
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
              "cudaMemcpy", "aten::item", "aten::_local_scalar_dense")


def device_time_us(event):
    # Renamed from self_cuda_time_total in newer PyTorch.
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def profile_training(args, device, data_dir, run_dir, table_path):
    """torch.profiler over --profile of our steps after --warmup: per step, wall time, the device's busy
    time, kernel launches and host-device synchronisations; per-op tables in `table_path`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    runner = OurTraining(data_dir, device, args.batch_size, args.workers, args.amp, args.compile, run_dir,
                         args.cuda_graphs)
    for _ in range(args.warmup):
        runner.step()
    runner.finish()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.profile):
            runner.step()
        runner.finish()
        synchronize(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    n = args.profile
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    result = {
        "steps": n, "batch_size": args.batch_size, "wall_ms_per_step": 1e3 * wall / n,
        "device_busy_ms_per_step": sum(device_time_us(e) for e in kernels) / 1e3 / n,
        "kernels_per_step": sum(e.count for e in kernels) / n,
        "kernel_launch_calls_per_step": sum(e.count for e in events if e.key in LAUNCH_CALLS) / n,
        "host_sync_calls_per_step": {e.key: e.count / n for e in events if e.key in SYNC_CALLS},
        "host_op_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / n
                                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]},
        "device_op_ms_per_step": {e.key: device_time_us(e) / 1e3 / n
                                  for e in sorted(kernels, key=lambda e: -device_time_us(e))[:25]},
    }
    with atomic_path(table_path) as tmp, open(tmp, "w") as f:
        f.write(f"{n} training steps of batch {args.batch_size}, {wall:.3f} s\n\nby host (self CPU) time:\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40))
        if kernels:
            f.write("\n\nby device time:\n")
            f.write(events.table(sort_by="self_device_time_total", row_limit=40))
    runner.close()
    return result


def print_profile(r):
    p = r["profile"]
    print(f"\n{r['device_name']} | torch {r['torch']} | {p['steps']} steps of batch {p['batch_size']}")
    print(f"wall {p['wall_ms_per_step']:.2f} ms a step; device busy {p['device_busy_ms_per_step']:.2f} ms; "
          f"{p['kernels_per_step']:.0f} kernels ({p['kernel_launch_calls_per_step']:.0f} launch calls) a step")
    print("host-device synchronisations a step: " +
          (", ".join(f"{k} {v:g}" for k, v in p["host_sync_calls_per_step"].items()) or "none"))
    for k, v in list(p["host_op_ms_per_step"].items())[:10]:
        print(f"  host {v:8.3f} ms  {k}")
    for k, v in list(p["device_op_ms_per_step"].items())[:10]:
        print(f"  device {v:6.3f} ms  {k[:90]}")


# ------------------------------------------------------------------ FLOPs and peaks
def forward_flops():
    """FLOPs of one 224 × 224 forward pass (multiply-adds count 2), counted on the meta device."""
    with torch.device("meta"):
        model = DepthNet(weights=None).eval()
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


# A measured peak below the truth makes the network's fraction of it absurd: a convolutional network's
# training step reaches well under this share of a matmul's FLOP/s, so a higher figure is reported as
# a failed peak measurement rather than as a fraction.
PLAUSIBLE_FRACTION = 0.8


def matmul_flops(device, dtype, sizes=None, rounds=5, reps=3):
    """The device's practical peak in `dtype`: the best FLOP/s of square matrix products over several
    sizes, each warmed up and then timed `rounds` times. One timing of one size moved by 4× between
    runs on a 2-core machine (caches, frequency, other processes); the best of many does not."""
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (1024, 1536, 2048))
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: the first call selects kernels and touches the memory
        synchronize(device)
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            synchronize(device)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def device_peaks(device, ours_dtype):
    """{"baseline": FLOP/s, "ours": FLOP/s, "source": ...}: data-sheet peaks on known GPUs, else measured matmuls."""
    ours_name = DTYPE_NAMES[ours_dtype]
    measured = {"fp32": matmul_flops(device, torch.float32)}
    if ours_dtype is not None:
        measured[ours_name] = matmul_flops(device, ours_dtype)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_TFLOPS:
            if key in gpu:
                ours = table["bf16" if ours_dtype is not None else "tf32"]
                return {"baseline": table["tf32"] * 1e12, "ours": ours * 1e12,
                        "source": f"data sheet, {key} dense tensor cores (baseline TF32, ours {ours_name})",
                        "measured_matmul_flops": measured}
    return {"baseline": measured["fp32"], "ours": measured.get(ours_name, measured["fp32"]),
            "source": "measured: the best of 5 timings of square matmuls of 3 sizes, in each pipeline's dtype",
            "measured_matmul_flops": measured}


# ------------------------------------------------------------------ accuracy
def compare_metrics(trainer, data_dir, device):
    """Our trained weights scored by the fp32 pipeline and as our inference path runs them."""
    val = DepthEstimationUnreal(data_dir, "val", native=True)
    fp32_model = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format)
    reference = evaluate(fp32_model, val, device, amp_dtype=None)
    fast = evaluate(InferenceModel(trainer.model, trainer.amp_dtype), val, device, amp_dtype=None)
    keys = [k for k in reference if k != "n_images"]
    abs_diff = {k: abs(reference[k] - fast[k]) for k in keys}
    rel_diff = {k: abs_diff[k] / max(abs(reference[k]), 1e-6) for k in keys}
    return {"fp32": reference, "ours": fast, "abs_diff": abs_diff, "rel_diff": rel_diff, "n_images": len(val)}


# ------------------------------------------------------------------ report
def fill_defaults(args, device):
    cuda = device.type == "cuda"
    args.steps = args.steps or (100 if cuda else 6)
    args.baseline_steps = args.baseline_steps or (40 if cuda else args.steps)
    args.warmup = args.warmup if args.warmup is not None else (30 if cuda else 2)
    args.batch_size = args.batch_size or (32 if cuda else 8)
    args.rounds = args.rounds or (1 if cuda else 3)
    args.images = args.images or (2048 if cuda else 64)
    args.inference_reps = args.inference_reps or (50 if cuda else 10)
    return args


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def bench_data(args, tmp, n_val):
    """--data-dir, or --images street scenes and `n_val` yard scenes written by synthetic.py into `tmp`."""
    if args.data_dir:
        return args.data_dir
    data_dir = os.path.join(tmp, "data")
    generate_dataset(data_dir, args.images, n_val, 0, workers=max(1, args.workers), progress=False)
    return data_dir


def run_header(device):
    """What every report starts with: the device, the torch version and the command that produced it."""
    return {"device": device.type, "device_name": device_description(device), "torch": torch.__version__,
            "command": " ".join(["python"] + sys.argv)}


def print_summary(r):
    t, i = r["train"], r["inference"]
    print(f"\n{r['device_name']} | torch {r['torch']} | batch {r['config']['batch_size']} | ours: autocast "
          f"{r['config']['ours_dtype']}, "
          f"{'compiled' if r['config']['compile'] else 'CUDA graph' if r['config'].get('cuda_graphs') else 'eager'}")
    print(f"{'':24}{'baseline':>14}{'ours':>14}{'ours/baseline':>16}")
    rows = [("train img/s", t["baseline"]["img_s"], t["ours"]["img_s"]),
            ("inference ms, batch 1", i["baseline"]["latency_ms_batch1"], i["ours"]["latency_ms_batch1"]),
            (f"inference img/s, b {i['ours']['batch_N']}", i["baseline"]["img_s_batchN"], i["ours"]["img_s_batchN"]),
            ("peak TFLOP/s", t["baseline"]["peak_flops"] / 1e12, t["ours"]["peak_flops"] / 1e12)]
    for label, b, o in rows:
        print(f"{label:24}{b:>14.4g}{o:>14.4g}{o / b:>16.3f}")
    fractions = [t[name]["fraction_of_peak"] for name in ("baseline", "ours")]
    print("train fraction of peak  " + "".join(f"{f:>14.3f}" if f is not None else f"{'(no peak)':>14}"
                                                  for f in fractions)
          + ("" if None not in fractions else f"  (above {PLAUSIBLE_FRACTION}: the peak measured too low)"))
    print(f"forward {r['flops']['forward_per_image'] / 1e9:.2f} GFLOP/image, training ≈ 3× that; "
          f"peak: {r['peak_flops']['source']}")
    if "accuracy" in r:
        a = r["accuracy"]
        print(f"the trained weights on {a['n_images']} val images, fp32 vs ours: rmse {a['fp32']['rmse']:.4f} vs "
              f"{a['ours']['rmse']:.4f} m, ssim {a['fp32']['ssim']:.4f} vs {a['ours']['ssim']:.4f}, "
              f"delta1 {a['fp32']['delta1']:.4f} vs {a['ours']['delta1']:.4f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = select_device(args.device)
    args = fill_defaults(args, device)
    if args.ssim_variants:
        result = {**run_header(device),
                  "ssim": bench_ssim_variants(device, args.batch_size, max(5, args.rounds * 3))}
        for name, v in result["ssim"]["variants"].items():
            print(f"{name:32} {v['ms']:9.2f} ms   |ssim - 2d| {v['abs_diff_to_2d']:.1e}")
        write_json(result, args.out)
        return result

    if args.predict_cli:
        result = {**run_header(device), "cli": bench_predict_cli(args, device)}
        print_predict_cli(result)
        write_json(result, args.out)
        return result
    if args.profile:
        result = run_header(device)
        table = os.path.splitext(args.out)[0] + "_ops.txt"
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            data_dir = bench_data(args, tmp, n_val=2)
            result["profile"] = profile_training(args, device, data_dir, os.path.join(tmp, "run"), table)
        print_profile(result)
        write_json(result, args.out)
        print(f"per-op tables written to {table}")
        return result

    amp_dtype = select_amp_dtype(args.amp, device)
    result = {
        **run_header(device),
        "config": {"batch_size": args.batch_size, "steps": args.steps, "baseline_steps": args.baseline_steps,
                   "warmup": args.warmup, "rounds": args.rounds, "compile": args.compile,
                   "cuda_graphs": args.cuda_graphs,
                   "ours_dtype": DTYPE_NAMES[amp_dtype], "workers": args.workers,
                   "data": args.data_dir or
                           f"generated: {args.images} train / {min(32, args.images)} val pairs of 144 × 256"},
    }
    # FLOPs and peaks first: the training figures' fraction of peak needs them.
    fwd = forward_flops()
    result["flops"] = {"forward_per_image": fwd, "train_per_image": 3 * fwd,
                       "counting": "FlopCounterMode on one forward pass; training = 3 × forward"}
    result["peak_flops"] = peaks = device_peaks(device, amp_dtype)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data_dir = bench_data(args, tmp, n_val=min(32, args.images))
        train, trainer = bench_training(args, device, data_dir, os.path.join(tmp, "run"))
        for name in ("baseline", "ours"):
            train[name]["achieved_flops"] = 3 * fwd * train[name]["img_s"]
            fraction = train[name]["achieved_flops"] / peaks[name]
            train[name]["peak_flops"] = peaks[name]
            # None: the peak was measured too low to divide by (see PLAUSIBLE_FRACTION)
            train[name]["fraction_of_peak"] = fraction if fraction <= PLAUSIBLE_FRACTION else None
        result["train"] = train
        result["train_speedup"] = train["ours"]["img_s"] / train["baseline"]["img_s"]
        write_json(result, args.out)  # a later phase that fails or times out leaves these figures
        result["accuracy"] = compare_metrics(trainer, data_dir, device)
        del trainer
    inference = bench_inference(device, amp_dtype, args.compile, args.inference_reps, args.inference_batch)
    result["inference"] = inference
    ours, baseline = inference["ours"], inference["baseline"]
    result["inference_latency_ratio"] = ours["latency_ms_batch1"] / baseline["latency_ms_batch1"]
    result["inference_throughput_ratio"] = ours["img_s_batchN"] / baseline["img_s_batchN"]
    print_summary(result)
    write_json(result, args.out)
    return result


def write_json(obj, path):
    write_json_atomic(obj, path)
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
