"""The Trainer: Adam + triangular2 CyclicLR on RMSE + (1 − SSIM), as the paper trains (docs/design.md §7).

Speed (docs/speed.md): batches come from a decoded cache (on the GPU when it fits), the
network runs channels_last under autocast, and the step loop never waits for the GPU:
a non-finite loss is skipped on the device by fused Adam and read back only every
--log-every steps. Under torchrun the same loop trains on N processes (distributed.py).
"""
import contextlib
import copy
import glob
import inspect
import json
import math
import os
import shutil
import signal
import time
import warnings
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import load_resumable, model_args, remove_checkpoint_temps, training_checkpoint
from checkpoint import save_checkpoint as write_checkpoint
from dataset import (
    DepthEstimationUnreal,
    EpochBatches,
    SplitCache,
    augment_pair,
    depth_conventions,
    epoch_seed,
    input_hw,
    paste_patches,
    random_crops,
)
from distributed import barrier, convert_batchnorm, init_distributed, max_across_ranks, sum_across_ranks
from evaluate import evaluate, format_metrics
from graphstep import GraphedStep
from hardware import autocast, select_amp_dtype, select_device, skip_update_unless_finite
from losses import DepthLoss
from model import DepthNet, count_parameters, load_weights
from plots import plot_training_curves, visualize_img
from tblog import TensorBoardLog
from utils import CheckpointError, UserError, rng_state, seed_everything, set_rng_state, write_json_atomic

# What a run writes into its folder (RUN_FILE_PATTERNS besides): the files a fresh run there removes.
# Nothing else in the folder is touched.
RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.jsonl", "train_log.jsonl", "curves.png",
             "demo_results.json", "demo_results.md", "vis", "tb")
RUN_FILE_PATTERNS = ("report_*_grid.png", "report_*_per_image.csv")


def claim_run_dir(run_dir, fresh, replace):
    """Make sure training can write to run_dir, and that a fresh run there does not mix with another.

    One run per folder: train_log.jsonl, metrics.jsonl, vis/ and tb/ of two runs would make one
    set of curves. A fresh run in a folder holding another run's checkpoints refuses to start,
    naming --resume and --run-dir, unless `replace` (--demo, whose folder runs/demo is its own);
    otherwise the other run's files are removed, and the run says so in one line.
    """
    old = sorted(n for n in RUN_FILES if os.path.exists(os.path.join(run_dir, n)))
    old += sorted(os.path.basename(p) for pattern in RUN_FILE_PATTERNS
                  for p in glob.glob(os.path.join(run_dir, pattern)))
    if fresh and old:
        checkpoints = [n for n in old if n.endswith(".pt")]
        if checkpoints and not replace:
            raise UserError(f"--run-dir {run_dir} holds another run ({', '.join(checkpoints)}): continue it with "
                            f"--resume {os.path.join(run_dir, 'last.pt')}, or start this one in another --run-dir")
        for name in old:
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        print(f"{run_dir}: removed an earlier run's {', '.join(old)}")
    # Only a probe: folders made for it are removed again, so that a run failing before it writes anything
    # (bad data, say) leaves no empty run folder behind; the run's files make their folders as they come.
    created = missing_folders(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise CheckpointError(f"cannot write to run directory {run_dir}: {err.strerror}; choose another with "
                              "--run-dir") from None
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def missing_folders(path):
    """The folders of `path` that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


class TrainStep(NamedTuple):
    """One applied training step: the batch as trained on (augmented with --augment), the prediction,
    the loss parts (tensors on the device), and whether its loss has been read back on the host."""

    rgb: torch.Tensor
    depth: torch.Tensor
    pred: torch.Tensor
    parts: dict
    checked: bool


class Trainer:
    """Trains a DepthNet as main.py's options say.

    Public, for main.py, demo.py, bench.py, ablate.py and the tests; everything else is private:
      Trainer(opts)           set up processes, data, model, optimiser; resume from opts.resume
      fit()                   the whole loop: epochs, validation, checkpoints, stop on signals
      epoch_batches(), train_step(rgb, depth), finish_epoch()
                              drive the loop one step at a time (train_step returns a TrainStep)
      settle_steps()          make the step count exact (on GPUs losses are read back only now and then)
      validate()              score val, log it, keep best.pt
      save_checkpoint(name)   write the whole training state to RUN_DIR/name
      stop_signal             the signal that stopped fit(), or None
    Attributes to read: model, scored_model (the average under --ema), ema, device, amp_dtype,
    train_set, val_set, cache, step, epoch, batch_in_epoch, optimizer, scheduler, run_dir.
    """

    # A fresh run in a folder holding another run's checkpoints refuses to start; subclasses whose
    # folders are their own (the ablation's variants) replace them.
    replaces_old_runs = False

    def __init__(self, opts):
        self.opts = opts
        self._setup_processes()
        if self.dist.is_main:  # before any data work: a folder it cannot use is reported at once
            claim_run_dir(opts.run_dir, fresh=not opts.resume, replace=opts.demo or self.replaces_old_runs)
        self._open_data()
        ckpt = load_resumable(opts.resume) if opts.resume else None
        self._build_model(model_args(ckpt)["init_depth"] if ckpt else None, weights=None if ckpt else opts.weights)
        self._build_optimiser()
        self._build_weight_average()
        self._reset_state()
        if ckpt:
            self._load_state(ckpt)
        self._net = self._wrap_model()
        self._build_graphed_step()
        self.run_dir = opts.run_dir
        self.tb = None  # --tensorboard: rank 0's event files in RUN_DIR/tb
        if self.dist.is_main:
            self._prepare_run_dir()
            self.tb = TensorBoardLog(self.run_dir) if opts.tensorboard else None
            print(self._summary())

    # ---------------------------------------------------------------- setting up
    def _setup_processes(self):
        """Device, process group (under torchrun), autocast dtype, seeds."""
        opts = self.opts
        self.device = select_device(opts.device)
        self.dist = init_distributed(self.device.type == "cuda")
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if opts.cuda_graphs and self.device.type != "cuda":
            raise UserError("--cuda-graphs needs a CUDA device (--device cuda); the CPU trains eagerly")
        if opts.cuda_graphs and self.dist.active:
            raise UserError("--cuda-graphs trains on one process: under torchrun, leave it out")
        if opts.batch_size % self.dist.world_size:
            raise UserError(f"--batch-size {opts.batch_size} is the global batch and must be divisible by the "
                            f"{self.dist.world_size} processes")
        self.amp_dtype = select_amp_dtype(opts.amp, self.device)
        seed_everything(opts.seed, opts.deterministic)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not opts.deterministic
        self._progress = not opts.quiet and self.dist.is_main

    def _open_data(self):
        """The train and val splits, the decoded cache (--cache auto) or the folder loader, the batch plan."""
        opts = self.opts
        # With the cache, files are decoded (and so checked) when it is built, and a cache whose
        # files are unchanged needs no second look; the folder loader checks them up front.
        conventions = {**depth_conventions(opts), "max_pixels": opts.max_pixels}
        self.train_set = DepthEstimationUnreal(opts.data_dir, "train", size=opts.image_size, check=opts.cache == "off",
                                               progress=self._progress, **conventions)
        self.val_set = (DepthEstimationUnreal(opts.data_dir, "val", size=opts.image_size, native=True,
                                              progress=self._progress, **conventions)
                        if opts.eval_every > 0 else None)
        self.cache = self._open_cache() if opts.cache == "auto" else None
        self._batch_plan = EpochBatches(len(self.train_set), opts.batch_size, opts.seed, self.dist.rank,
                                       self.dist.world_size)
        self._loader_generator = torch.Generator()
        self._loader = self._make_loader() if self.cache is None else None

    def _build_model(self, init_depth, weights):
        """The DepthNet on the device; its output bias starts at init_depth, else at the mean training depth."""
        opts = self.opts
        if init_depth is None:
            init_depth = self._train_stats.mean_depth
        self.init_depth = init_depth
        self.model = DepthNet(weights=weights, init_depth=init_depth, encoder=opts.encoder, skips=opts.skips,
                              train_stem=opts.train_stem)
        if self.dist.active:  # before the optimiser takes the parameters: the conversion makes new ones
            convert_batchnorm(self.model)
        self.model.to(self.device, memory_format=torch.channels_last if opts.channels_last else torch.contiguous_format)

    @property
    def _train_stats(self):
        """What the training split's check found (mean measured depth, holes): from the cache when there is one."""
        return self.cache if self.cache is not None else self.train_set

    def _build_optimiser(self):
        """The loss (summed across processes under torchrun; masked when the training depth has holes), Adam,
        triangular2 CyclicLR, the fp16 GradScaler."""
        opts = self.opts
        # The depth at or below which targets count nowhere: only for a data set with unmeasured pixels, so
        # that DepthEstimationUnreal trains on the paper's unmasked loss.
        self._hole_depth = opts.min_depth if self._train_stats.has_holes else None
        # One process adds up nothing, and a loss without the collective is one that torch.compile traces whole.
        reduce = sum_across_ranks if self.dist.active else None
        self._loss_fn = DepthLoss(opts.alpha, opts.beta, opts.grad_weight, opts.silog_weight, reduce=reduce,
                                  min_depth=self._hole_depth, max_depth=opts.max_depth)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Fused Adam takes a found_inf flag and then leaves weights and moments untouched on
        # the device: that is how a non-finite step is skipped without waiting for the GPU.
        adam = torch.optim.AdamW if opts.adamw else torch.optim.Adam
        self.optimizer = adam(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=True)
        # CyclicLR's default cycle_momentum=True stays, as in the author's code: with Adam it
        # cycles beta1 between 0.9 (at base lr) and 0.8 (at max lr).
        self.scheduler = torch.optim.lr_scheduler.CyclicLR(
            self.optimizer, base_lr=opts.lr, max_lr=opts.max_lr, step_size_up=opts.step_size_up,
            step_size_down=opts.step_size_down, mode="triangular2")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_weight_average(self):
        """--ema: a frozen copy of the model whose weights follow the trained ones as a moving average."""
        self.ema, self._ema_tensors = None, None
        if self.opts.ema > 0:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
            # The float tensors of both, paired, listed once rather than every step: they are updated in
            # place by the optimiser, by load_state_dict on a resume and by the average itself.
            pairs = [(a, t) for a, t in zip(self.ema.state_dict().values(), self.model.state_dict().values())
                     if t.is_floating_point()]
            self._ema_tensors = tuple(map(list, zip(*pairs)))

    @torch.no_grad()
    def _update_weight_average(self):
        """Move the averaged weights (and BatchNorm statistics) towards the trained ones.

        The decay is min(--ema, (1 + n) / (10 + n)) after n steps, so that the first steps, far
        from anything worth keeping, are soon forgotten rather than weighing for 1 / (1 - decay)
        steps. On GPUs a step skipped on the device for a non-finite loss still counts here: its
        weights are those of the step before, so the average moves towards weights it has seen.
        """
        decay = min(self.opts.ema, (1 + self.step) / (10 + self.step))
        averaged, trained = self._ema_tensors
        torch._foreach_lerp_(averaged, trained, 1.0 - decay)

    @property
    def scored_model(self):
        """The network that validation scores and best.pt and --eval use: the average under --ema."""
        return self.ema if self.ema is not None else self.model

    def _reset_state(self):
        """The position in training, the bad-step count and the stop state of a fresh run."""
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.best_rmse = math.inf
        self._last_eval_step = None
        self._bad_steps = 0
        # Losses of the steps not yet read on the host; on CUDA they are read every --log-every steps.
        self._unchecked_losses = []
        self._deferred_checks = self.device.type == "cuda"
        self.stop_signal, self._saving = None, False
        self._stop_agreed = False

    def _summary(self):
        """One line: the model, where and how it trains, the data."""
        opts = self.opts
        total, trainable = count_parameters(self.model)
        processes = f" x {self.dist.world_size} processes" if self.dist.active else ""
        if self.cache is None:
            data = "folder loader"
        elif self.cache.rgb.device.type == "cpu":
            data = "cache memory-mapped from disk"
        else:
            data = f"cache on {self.cache.rgb.device}"
        return (f"DepthNet ({opts.encoder}{', skips' if opts.skips else ''}): {total / 1e6:.2f}M parameters, "
                f"{trainable / 1e6:.2f}M trainable; device {self.device}{processes}, autocast "
                f"{self.amp_dtype or 'off'}, "
                f"{'compiled' if opts.compile else 'eager'}, data {data}, "
                f"{len(self.train_set)} train / {len(self.val_set) if self.val_set else 0} val images, "
                f"output bias {self.init_depth:.2f} m")

    def _open_cache(self):
        """The decoded training split; the first process of each node builds it, the others then load it.
        None where no cache folder has the disk space for it: the folder loader then reads the files."""
        if self.dist.local_rank == 0:
            cache = SplitCache.open(self.train_set, progress=self._progress)
        barrier()
        if self.dist.local_rank != 0:
            cache = SplitCache.open(self.train_set, progress=False)
        return cache.place(self.device) if cache is not None else None

    def _wrap_model(self):
        """The module the loop calls: the model, inside DDP under torchrun, compiled with --compile."""
        net = self.model
        if self.dist.active:
            # Buffers need no syncing per step: GlobalBatchNorm2d updates them identically on every
            # rank. Newer PyTorch calls the option forward_sync_buffers, older broadcast_buffers.
            options = inspect.signature(DistributedDataParallel).parameters
            name = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                          **{name: False})
        if self.opts.compile:
            net = torch.compile(net)
        return net

    # ---------------------------------------------------------------- the loop
    def fit(self):
        """Run epochs until --epochs, --max-steps or a stop signal; returns the last metrics."""
        metrics, start_step = None, self.step
        if self.epoch >= self.opts.epochs or self._should_stop():
            print(f"nothing to train: the run is at epoch {self.epoch}, step {self.step} "
                  f"(--epochs {self.opts.epochs}, --max-steps {self.opts.max_steps})")
        with self._stop_on_signals():
            while self.epoch < self.opts.epochs and not self._should_stop():
                if not self._run_epoch():
                    self.save_checkpoint("last.pt")  # stopped mid-epoch: keep the exact position
                    break
                if self.opts.eval_every > 0 and self.epoch % self.opts.eval_every == 0:
                    metrics = self._validate_on_main()
                self.save_checkpoint("last.pt")
                self._agree_on_stop()
            if self._final_validation_due(start_step):
                metrics = self._validate_on_main()
                self.save_checkpoint("last.pt")  # its best_rmse now counts this evaluation too
        if self.dist.is_main:
            plot_training_curves(self.run_dir, os.path.join(self.run_dir, "curves.png"))
        if self.tb:
            self.tb.close(vars(self.opts), metrics)
        if self.stop_signal and self.dist.is_main:
            print(f"stopped by {self.stop_signal} at step {self.step}; resume with: "
                  f"python main.py --resume {os.path.join(self.run_dir, 'last.pt')} (options not given again are the "
                  "run's own)")
        # Under torchrun no process may exit before rank 0 has written its files: torchrun stops
        # the others as soon as one exits with a non-zero status (as a stopped run does).
        barrier()
        return metrics

    def _validate_on_main(self):
        """Rank 0 scores val while the others wait; every rank marks this step evaluated. Rank 0's metrics."""
        metrics = self.validate() if self.dist.is_main else None
        self._last_eval_step = self.step
        barrier()
        return metrics

    def _final_validation_due(self, start_step):
        """Whether --max-steps ended this call of train() between two evaluations: the final weights
        are then scored too, so that a run that evaluates at all ends with its last state scored
        and a best.pt, however short it is."""
        signalled = self._stop_agreed if self.dist.active else self.stop_signal is not None
        reached_max = self.opts.max_steps is not None and self.step >= self.opts.max_steps
        return (self.opts.eval_every > 0 and reached_max and not signalled and self.step > start_step
                and self._last_eval_step != self.step)

    def _run_epoch(self):
        """One pass over the training set (from where a resume left off); False if stopped early."""
        self._net.train()
        batches = self.epoch_batches()
        bar = tqdm(batches, total=len(self._batch_plan), desc=f"epoch {self.epoch + 1}/{self.opts.epochs}",
                   dynamic_ncols=True, disable=not self._progress)
        t0, seen = time.perf_counter(), 0
        for rgb, depth in bar:
            done = self.train_step(rgb, depth)
            seen += rgb.shape[0] * self.dist.world_size
            if done is not None and done.checked and self.dist.is_main:
                if self._vis_due():
                    vis_path = os.path.join(self.run_dir, "vis", f"train_step{self.step:06d}.png")
                    visualize_img(done.rgb[0], done.depth[0], done.pred[0], vis_path, title=f"train, step {self.step}",
                                  min_depth=self._hole_depth)
                    if self.tb:
                        self.tb.picture("vis/train", vis_path, self.step)
                if self._log_due():
                    self._log_step(done.parts, bar, seen / (time.perf_counter() - t0))
            if self.step % self.opts.log_every == 0:
                self._agree_on_stop()
            # A stop on the epoch's last batch still counts as a finished epoch (its evaluation runs).
            if self._should_stop() and self.batch_in_epoch < self._batches_per_epoch():
                return False
        self.finish_epoch()
        return True

    def train_step(self, rgb, depth):
        """One step of the loop on a batch of (rgb, depth): --augment, forward, loss, backward, the
        optimiser step, then the step count, the moving average and the schedule (_count_step).

        Returns a TrainStep, or None for a step skipped for its non-finite loss. On GPUs a loss
        is read back only when host work needs the exact step count (_exact_step_needed), so a
        bad step may return a TrainStep with checked=False, to be un-counted by settle_steps.
        """
        if self.opts.augment or self.opts.paste or self.opts.crop:
            rgb, depth = self._augment_batch(rgb, depth)
        if self._graphed is not None:
            if rgb.shape[0] != self.opts.batch_size:  # a graph replays one shape: the epoch's last batch is skipped
                self.batch_in_epoch += 1
                return None
            return self._graphed_train_step(rgb, depth)
        loss, parts, pred = self._forward_backward_update(rgb, depth)
        self.batch_in_epoch += 1
        if not self._count_step(loss):
            return None
        checked = not self._deferred_checks or (self._exact_step_needed() and self.settle_steps())
        return TrainStep(rgb, depth, pred, parts, checked)

    def finish_epoch(self):
        """Settle the steps of the epoch just run and move on to the next one."""
        self.settle_steps()
        self.batch_in_epoch = 0
        self.epoch += 1

    def epoch_batches(self):
        """This process's (rgb, depth) batches of the current epoch, from where a resume left off."""
        self._batch_plan.set_epoch(self.epoch, self.batch_in_epoch)
        if self.cache is not None:
            return self.cache.batches(list(self._batch_plan), self.device)
        # Each DataLoader iterator draws its workers' base seed from this generator, not from the
        # global RNG, which a resumed run (one more iterator) would otherwise leave in another state.
        self._loader_generator.manual_seed(epoch_seed(self.opts.seed, self.epoch))
        return iter(self._loader)

    def _batches_per_epoch(self):
        return self._batch_plan.epoch_length

    def _forward_backward_update(self, rgb, depth):
        """Forward, loss, backward and one optimiser step; (loss, its parts, detached prediction).

        A step whose loss is not finite changes no weight: fused Adam skips it on the device
        (hardware.skip_update_unless_finite; under fp16 GradScaler's check of the gradients does),
        so nothing here reads the loss back and the host never waits for the GPU.
        """
        fmt = torch.channels_last if self.opts.channels_last else torch.contiguous_format
        rgb = rgb.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        depth = depth.to(self.device, non_blocking=True)
        with autocast(self.device.type, self.amp_dtype):
            pred = self._net(rgb)
        loss, parts = self._loss_fn(pred, depth)  # in fp32 at least, whatever autocast ran the network in
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if not self.scaler.is_enabled():
            skip_update_unless_finite(self.optimizer, loss)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), parts, pred.detach()

    def _build_graphed_step(self):
        """--cuda-graphs: the step as graphstep.GraphedStep, captured in a CUDA graph after a few steps."""
        self._graphed, self._graph, self._graph_out, self._warmup_left = None, None, None, 3
        if self.opts.cuda_graphs:
            batch_shape = (self.opts.batch_size, *(self.opts.crop or input_hw(self.opts.image_size)))
            self._graphed = GraphedStep(self.model, self._loss_fn, self.optimizer, self.scheduler, self.amp_dtype,
                                        self.opts.channels_last, batch_shape, self.ema, self.opts.ema)

    def _graphed_train_step(self, rgb, depth):
        """train_step under --cuda-graphs: the batch copied into the static buffers, then the graph replayed
        (the first steps run eagerly on a side stream, as capture needs; capture records, replay runs)."""
        g = self._graphed
        g.rgb.copy_(rgb, non_blocking=True)
        g.depth.copy_(depth, non_blocking=True)
        if self._graph is None and self._warmup_left > 0:
            self._warmup_left -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = g.step(g.rgb, g.depth)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            if self._graph is None:
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._graph_out = g.step(g.rgb, g.depth)
            self._graph.replay()
            out = self._graph_out
        loss, parts, pred = out
        self.batch_in_epoch += 1
        # The graph's outputs are overwritten by the next replay: keep this step's loss for the check.
        self._unchecked_losses.append(loss.clone())
        self.step += 1  # the graph counts, averages and schedules on the device; un-counted in settle_steps
        checked = self._exact_step_needed() and self.settle_steps()
        return TrainStep(g.rgb, g.depth, pred, parts, checked)

    def _count_step(self, loss):
        """Count an optimiser step: the step number, the moving average and the schedule move on together.
        Returns False for a step skipped for its non-finite loss, which counts as nothing.

        On CPUs, where reading a value costs nothing, the loss is read here. On GPUs it is read
        later, every --log-every steps (settle_steps), so that the host never waits for the GPU;
        the step is counted meanwhile, and un-counted there if it was skipped.
        """
        if self._deferred_checks:
            self._unchecked_losses.append(loss)
        elif not math.isfinite(float(loss)):
            self._skip_bad_step(float(loss), self.step + 1)
            return False
        else:
            self._bad_steps = 0
        if self.ema is not None:
            self._update_weight_average()
        self.scheduler.step()
        self.step += 1
        return True

    def _augment_batch(self, rgb, depth):
        """--augment, --crop and --paste: dataset.augment_pair, dataset.random_crops, then dataset.paste_patches,
        on the device, one random draw per image.

        Done here rather than in the Dataset so it is the same whatever loads the data, and
        runs where the batch will be used. The draws come from (seed, step), as EpochSampler's
        order comes from (seed, epoch): a resumed run sees the augmentations the interrupted
        one would have seen, wherever it stopped.
        """
        rgb = rgb.to(self.device, non_blocking=True)
        depth = depth.to(self.device, non_blocking=True)
        # Under torchrun each process draws its own (seed, step, rank) stream: the same draws on
        # every process would give the i-th image of each process the same flip and zoom.
        generator = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + self.step + (self.dist.rank << 40))
        if self.opts.augment:
            rgb, depth = augment_pair(rgb, depth, generator, max_scale=self.opts.max_zoom, min_depth=self._hole_depth,
                                      scale_depth=self.opts.zoom_closer)
        if self.opts.crop:
            rgb, depth = random_crops(rgb, depth, self.opts.crop, generator)
        if self.opts.paste:
            rgb, depth = paste_patches(rgb, depth, generator, prob=self.opts.paste)
        return rgb, depth

    def _skip_bad_step(self, value, step):
        """Warn about a skipped step; raise UserError after --max-bad-steps of them in a row."""
        self._bad_steps += 1
        if self.dist.is_main:
            warnings.warn(f"non-finite loss ({value}) at step {step}: step skipped ({self._bad_steps} in a row)",
                          stacklevel=2)
        if self._bad_steps >= self.opts.max_bad_steps:
            # last.pt is left as it is: the weights that produced these losses are not saved over it.
            last = os.path.join(self.run_dir, "last.pt")
            kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written yet"
            raise UserError(
                f"{self._bad_steps} non-finite losses in a row at step {step}: training stopped; {kept}. "
                f"Try a lower --lr or --max-lr, or --amp off")

    def settle_steps(self):
        """Make the step count exact: on GPUs, read the losses of the steps counted since the last
        check (one host sync), un-count the skipped ones, and set CyclicLR's lr and momentum back to
        the steps actually applied (the steps after a skipped one ran the schedule ahead). Returns
        whether the latest step was applied."""
        if not self._unchecked_losses:
            return True
        losses = torch.stack(self._unchecked_losses).tolist()
        self._unchecked_losses = []
        applied = self.step - len(losses)
        try:
            for value in losses:
                if math.isfinite(value):
                    applied += 1
                    self._bad_steps = 0
                else:
                    self._skip_bad_step(value, applied + 1)
        finally:
            if applied != self.step:
                self.step = applied
                self.scheduler.last_epoch = applied - 1
                self.scheduler.step()
        return math.isfinite(losses[-1])

    def _exact_step_needed(self):
        """Whether this step saves a picture, logs, or may end training: all need the exact step count."""
        reaching_max = self.opts.max_steps is not None and self.step >= self.opts.max_steps
        return self._vis_due() or self._log_due() or reaching_max

    def _vis_due(self):
        return self.opts.vis_every > 0 and self.step % self.opts.vis_every == 0

    def _log_due(self):
        return self.step % self.opts.log_every == 0 or self.step == 1

    def _make_loader(self):
        """The folder loader, the fallback to the cache: workers decode, batches come from batch_plan."""
        return DataLoader(self.train_set, batch_sampler=self._batch_plan, num_workers=self.opts.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=self.opts.workers > 0,
                          generator=self._loader_generator)

    def _agree_on_stop(self):
        """Under torchrun a signal may reach the processes at different steps, or only one of them
        (`kill PID`): they stop together at the next --log-every step (or epoch end) where any of
        them has seen one, and each then reports that signal, so that all exit alike."""
        if not self.dist.active:
            return
        seen = signal.Signals[self.stop_signal].value if self.stop_signal else 0
        agreed = max_across_ranks(seen, self.device)
        if agreed:
            self._stop_agreed = True
            self.stop_signal = self.stop_signal or signal.Signals(agreed).name

    def _should_stop(self):
        if self.opts.max_steps is not None and self.step >= self.opts.max_steps:
            return True
        return self._stop_agreed if self.dist.active else self.stop_signal is not None

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM end the current step, then training stops with a resumable last.pt."""
        main_pid = os.getpid()

        def handler(signum, frame):
            if os.getpid() != main_pid:  # a forked DataLoader worker: Ctrl-C reaches the whole process group
                return
            if self.stop_signal is not None:  # a second Ctrl-C: stop now, unless that would cost the checkpoint
                if self._saving:
                    print(f"{signal.Signals(signum).name} received: still writing a checkpoint; stopping once it is "
                          "complete", flush=True)
                    return
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name
            if self.dist.is_main:
                print(f"\n{self.stop_signal} received: finishing this step and writing last.pt (again to abort)",
                      flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ---------------------------------------------------------- evaluation, logs
    def _log_step(self, parts, bar, rate):
        """Progress bar and one train_log.jsonl line; only at log steps, since reading the loss waits for the GPU."""
        values = dict(zip(parts, torch.stack(list(parts.values())).tolist()))  # the loss and each of its terms
        lr, beta1 = self._lr_and_beta1()
        record = {"step": self.step, "epoch": self.epoch + self.batch_in_epoch / self._batches_per_epoch(),
                  "lr": lr, "beta1": beta1,
                  **values, "img_per_s": rate}
        with open(os.path.join(self.run_dir, "train_log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            self.tb.train_step(record)
        bar.set_postfix(loss=f"{values['loss']:.4f}", rmse=f"{values['rmse']:.3f}", lr=f"{record['lr']:.2e}",
                        img_s=f"{rate:.1f}")

    def _lr_and_beta1(self):
        """The learning rate and Adam's beta1 of the next step: the schedule's, on the device under --cuda-graphs."""
        if self._graphed is not None:
            return tuple(float(v) for v in self._graphed.schedule.at(self._graphed.applied))
        return self.scheduler.get_last_lr()[0], self.optimizer.param_groups[0]["betas"][0]

    def validate(self):
        """Both protocols on val; append to metrics.jsonl, keep best.pt on the lowest standard RMSE.

        In fp32, whatever autocast trains in: the recorded metrics, and so the choice of best.pt,
        are exactly what `--eval` of the checkpoint reports (docs/design.md §8).
        """
        metrics = evaluate(self.scored_model, self.val_set, self.device, amp_dtype=None,
                           num_workers=self.opts.workers)
        record = {"epoch": self.epoch, "step": self.step, "split": "val", "lr": self._lr_and_beta1()[0], **metrics}
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            self.tb.evaluation(self.step, metrics)
        tqdm.write(format_metrics(metrics, f"val after epoch {self.epoch} (step {self.step})"))
        if metrics["rmse"] < self.best_rmse:
            self.best_rmse = metrics["rmse"]
            self.save_checkpoint("best.pt", metrics)
        return metrics

    def _prepare_run_dir(self):
        """The run's folder and its vis/, made once the data and the model are ready: a run that fails earlier
        leaves nothing behind."""
        os.makedirs(os.path.join(self.run_dir, "vis"), exist_ok=True)
        remove_checkpoint_temps(self.run_dir)
        write_json_atomic(vars(self.opts), os.path.join(self.run_dir, "config.json"))

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self, metrics=None):
        position = {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                    "best_rmse": self.best_rmse}
        return training_checkpoint(self.model.model_args, self.opts.image_size, depth_conventions(self.opts),
                                   self.model, self.ema, self.optimizer,
                                   self.scheduler, self.scaler, position, vars(self.opts), metrics, rng_state())

    def save_checkpoint(self, name, metrics=None):
        """Write the whole training state to RUN_DIR/name (rank 0; every rank settles its step count first)."""
        self.settle_steps()
        if self._graphed is not None:  # Adam's state and the schedule's position live on the device while graphed
            self._graphed.write_back(self.optimizer, self.scheduler)
        if not self.dist.is_main:
            return
        self._saving = True  # training stops right after this save anyway if a signal came: let it finish
        try:
            write_checkpoint(self._checkpoint(metrics), os.path.join(self.run_dir, name))
        finally:
            self._saving = False

    def _load_state(self, ckpt):
        load_weights(self.model, ckpt["model"], self.opts.resume)
        if self.ema is not None:
            # --ema added on resuming a run that kept no average: the average starts from the weights.
            load_weights(self.ema, ckpt.get("ema", ckpt["model"]), self.opts.resume)
        # Checkpoints store the optimiser's fused/foreach choice; this loop needs fused Adam.
        for group in ckpt["optimizer"]["param_groups"]:
            group.update(fused=True, foreach=None)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt.get("scaler", {}))
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.batch_in_epoch = ckpt.get("batch_in_epoch", 0)
        self.best_rmse = ckpt.get("best_rmse", math.inf)
        set_rng_state(ckpt["rng"])
        print(f"resumed from {self.opts.resume}: epoch {self.epoch}, step {self.step}")

