"""The Trainer: Adam + triangular2 CyclicLR on RMSE + (1 − SSIM), as the paper trains (docs/design.md §7).

Every batch is one step: the step number, the schedule and the moving average move on
together, even when a non-finite loss made fused Adam skip the weights' update on the
device (as GradScaler counts its skipped steps). Nothing is ever un-counted, so the loop
need not wait for the GPU to know where it is: losses are read back on a CPU at once, on
a GPU every --log-every steps, and --max-bad-steps of them non-finite in a row stop the
run. Speed (docs/speed.md): batches come from a decoded cache (on the GPU when it fits),
the network runs channels_last under autocast. Under torchrun the same loop trains on N
processes (distributed.py).
"""
import contextlib
import copy
import glob
import json
import math
import os
import shutil
import signal
import time
import warnings
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (
    load_resumable,
    model_args,
    remove_checkpoint_temps,
    restore_training_state,
    training_checkpoint,
)
from checkpoint import save_checkpoint as write_checkpoint
from conventions import DepthConventions
from dataset import (
    DepthEstimationUnreal,
    EpochBatches,
    SplitCache,
    augment_batch,
    epoch_seed,
    input_hw,
    split_files,
)
from distributed import (
    barrier,
    convert_batchnorm,
    init_distributed,
    max_across_ranks,
    sum_across_ranks,
    wrap_for_processes,
)
from evaluate import evaluate, format_metrics
from graphstep import GraphedStep
from hardware import autocast, select_amp_dtype, select_device, skip_update_unless_finite
from losses import DepthLoss
from model import DepthNet, count_parameters
from plots import plot_training_curves, visualize_img
from tblog import TensorBoardLog
from utils import (
    CheckpointError,
    StopRequest,
    UserError,
    rng_state,
    seed_everything,
    write_json_atomic,
    write_probe,
)

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
        write_probe(run_dir)
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
    """One training step: the batch as trained on (augmented with --augment), the prediction and the
    loss parts (tensors on the device)."""

    rgb: torch.Tensor
    depth: torch.Tensor
    pred: torch.Tensor
    parts: dict


class WeightAverage:
    """--ema: `model`, a frozen copy of a network whose weights (and BatchNorm statistics) follow the trained
    ones as an exponential moving average.

    The decay is min(DECAY, (1 + n) / (10 + n)) after n steps, so that the first steps, far from
    anything worth keeping, are soon forgotten rather than weighing for 1 / (1 - decay) steps. A
    step skipped on the device for a non-finite loss counts here too: its weights are those of
    the step before, so the average moves towards weights it has seen.
    """

    def __init__(self, trained, decay):
        self.model, self.decay = copy.deepcopy(trained).eval().requires_grad_(False), decay
        # The float tensors of both, paired, listed once rather than every step: they are updated in
        # place by the optimiser, by load_state_dict on a resume and by the average itself.
        pairs = [(a, t) for a, t in zip(self.model.state_dict().values(), trained.state_dict().values())
                 if t.is_floating_point()]
        self._averaged, self._trained = map(list, zip(*pairs))

    @torch.no_grad()
    def update(self, step):
        """Move the average towards the trained weights after `step` steps."""
        torch._foreach_lerp_(self._averaged, self._trained, 1.0 - min(self.decay, (1 + step) / (10 + step)))


class Trainer:
    """Trains a DepthNet as main.py's options say.

    Public, for main.py, demo.py, bench.py, ablate.py and the tests; everything else is private:
      Trainer(opts)           set up processes, data, model, optimiser; resume from opts.resume
      fit()                   the whole loop: epochs, validation, checkpoints, stop on signals
      epoch_batches(), train_step(rgb, depth), finish_epoch()
                              drive the loop one step at a time (train_step returns a TrainStep)
      check_losses()          read back the losses not yet read; stop after --max-bad-steps non-finite
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
            position = restore_training_state(ckpt, opts.resume, self.model, self.ema, self.optimizer,
                                              self.scheduler, self.scaler)
            self.epoch, self.step, self.batch_in_epoch, self.best_rmse = position
            print(f"resumed from {opts.resume}: epoch {self.epoch}, step {self.step}")
        self._net = wrap_for_processes(self.model, self.dist, self.device)
        self._net = torch.compile(self._net) if opts.compile else self._net
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
        self.conventions = DepthConventions.of(opts)
        common = {"size": opts.image_size, "conventions": self.conventions, "max_pixels": opts.max_pixels,
                  "progress": self._progress}
        self.train_set = DepthEstimationUnreal(opts.data_dir, "train", check=opts.cache == "off", **common,
                                               **split_files(opts, "train"))
        self.val_set = (DepthEstimationUnreal(opts.data_dir, "val", native=True, **common, **split_files(opts, "val"))
                        if opts.eval_every > 0 else None)
        self.cache = self._open_cache() if opts.cache == "auto" else None
        self._batch_plan = EpochBatches(len(self.train_set), opts.batch_size, opts.seed, self.dist.rank,
                                       self.dist.world_size)
        self._loader_generator = torch.Generator()
        # The folder loader, the fallback to the cache: workers decode, batches come from the batch plan.
        self._loader = None if self.cache is not None else DataLoader(
            self.train_set, batch_sampler=self._batch_plan, num_workers=opts.workers, generator=self._loader_generator,
            pin_memory=self.device.type == "cuda", persistent_workers=opts.workers > 0)

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
        self._average = WeightAverage(self.model, self.opts.ema) if self.opts.ema > 0 else None
        self.ema = self._average.model if self._average else None

    @property
    def stop_signal(self):
        """The name of the signal that stopped fit() (SIGINT, SIGTERM), or None."""
        return self._stop.signal

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
        # Losses of the steps not yet read on the host. Reading one waits for the device: on a GPU
        # they are read at log and picture steps (every --log-every), on a CPU, where nothing waits, at once.
        self._unread_losses = []
        self._read_at_once = self.device.type != "cuda"
        self._stop = StopRequest("finishing this step and writing last.pt (again to abort)"
                                 if self.dist.is_main else None)
        self._stop_agreed = False

    def _summary(self):
        """One line: the model, where and how it trains, the data."""
        opts = self.opts
        total, trainable = count_parameters(self.model)
        processes = f" x {self.dist.world_size} processes" if self.dist.active else ""
        data = f"cache {self.cache.where}" if self.cache is not None else "folder loader"
        return (f"DepthNet ({opts.encoder}{', skips' if opts.skips else ''}): {total / 1e6:.2f}M parameters, "
                f"{trainable / 1e6:.2f}M trainable; device {self.device}{processes}, autocast "
                f"{self.amp_dtype or 'off'}, "
                f"{'compiled' if opts.compile else 'eager'}, data {data}, "
                f"{len(self.train_set)} train / {len(self.val_set) if self.val_set else 0} val images, "
                f"output bias {self.init_depth:.2f} m")

    def _open_cache(self):
        """The decoded training split (the first process of each node builds it), or None: no room for it."""
        if self.dist.local_rank == 0:
            cache = SplitCache.open(self.train_set, progress=self._progress)
        barrier()
        if self.dist.local_rank != 0:
            cache = SplitCache.open(self.train_set, progress=False)
        return cache.place(self.device) if cache is not None else None

    # ---------------------------------------------------------------- the loop
    def fit(self):
        """Run epochs until --epochs, --max-steps or a stop signal; returns the last metrics."""
        metrics, start_step = None, self.step
        if self.epoch >= self.opts.epochs or self._should_stop():
            print(f"nothing to train: the run is at epoch {self.epoch}, step {self.step} "
                  f"(--epochs {self.opts.epochs}, --max-steps {self.opts.max_steps})")
        with self._stop:
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
            if done is not None and self.dist.is_main and not self._bad_steps:
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
            if self._should_stop() and self.batch_in_epoch < self._batch_plan.epoch_length:
                return False
        self.finish_epoch()
        return True

    def train_step(self, rgb, depth):
        """One step of the loop on a batch of (rgb, depth): --augment, forward, loss, backward, the optimiser
        step, then the step count, the moving average and the schedule. Returns a TrainStep; None for an
        epoch's last, smaller batch under --cuda-graphs (a graph replays one shape), which is skipped.
        """
        if self.opts.augment or self.opts.paste or self.opts.crop:
            rgb, depth = self._augment_batch(rgb, depth)
        self.batch_in_epoch += 1
        if self._graphed is None:
            loss, parts, pred = self._forward_backward_update(rgb, depth)
            self._advance_schedule()
        elif rgb.shape[0] == self.opts.batch_size:  # the graph moves the schedule and the average on the device
            loss, parts, pred = self._graphed.replay(rgb, depth)
            rgb, depth = self._graphed.rgb, self._graphed.depth
        else:
            return None
        self.step += 1
        self._unread_losses.append(loss)
        if self._read_at_once or self._vis_due() or self._log_due():
            self.check_losses()  # before host work that would show this step
        return TrainStep(rgb, depth, pred, parts)

    def finish_epoch(self):
        """Read the epoch's last losses and move on to the next epoch."""
        self.check_losses()
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
        self._graphed = None
        if self.opts.cuda_graphs:
            batch_shape = (self.opts.batch_size, *(self.opts.crop or input_hw(self.opts.image_size)))
            self._graphed = GraphedStep(self.model, self._loss_fn, self.optimizer, self.scheduler, self.amp_dtype,
                                        self.opts.channels_last, batch_shape, self.ema, self.opts.ema)

    def _advance_schedule(self):
        """The moving average and CyclicLR move on one step, whether or not the device skipped the update."""
        if self._average is not None:
            self._average.update(self.step)
        self.scheduler.step()

    def _augment_batch(self, rgb, depth):
        """--augment, --crop and --paste on the device (dataset.augment_batch). The draws come from (seed,
        step), as the data order comes from (seed, epoch): a resumed run sees the augmentations the
        interrupted one would have seen. Under torchrun each process draws its own (seed, step, rank)
        stream: the same draws everywhere would give the i-th image of each process the same flip and zoom."""
        generator = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + self.step + (self.dist.rank << 40))
        return augment_batch(rgb.to(self.device, non_blocking=True), depth.to(self.device, non_blocking=True),
                             generator, self.opts, self._hole_depth)

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

    def check_losses(self):
        """Read the losses of the steps since the last read (one wait for the device): each non-finite one is
        reported, and --max-bad-steps of them in a row stop training."""
        if not self._unread_losses:
            return
        values = torch.stack(self._unread_losses).tolist()
        self._unread_losses = []
        for step, value in enumerate(values, start=self.step - len(values) + 1):
            if math.isfinite(value):
                self._bad_steps = 0
            else:
                self._skip_bad_step(value, step)

    def _vis_due(self):
        return self.opts.vis_every > 0 and self.step % self.opts.vis_every == 0

    def _log_due(self):
        return self.step % self.opts.log_every == 0 or self.step == 1

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
            self._stop.signal = self.stop_signal or signal.Signals(agreed).name

    def _should_stop(self):
        if self.opts.max_steps is not None and self.step >= self.opts.max_steps:
            return True
        return self._stop_agreed if self.dist.active else self.stop_signal is not None

    # ---------------------------------------------------------- evaluation, logs
    def _log_step(self, parts, bar, rate):
        """Progress bar and one train_log.jsonl line; only at log steps, since reading the loss waits for the GPU."""
        values = dict(zip(parts, torch.stack(list(parts.values())).tolist()))  # the loss and each of its terms
        lr, beta1 = self._lr_and_beta1()
        record = {"step": self.step, "epoch": self.epoch + self.batch_in_epoch / self._batch_plan.epoch_length,
                  "lr": lr, "beta1": beta1, **values, "img_per_s": rate}
        with open(os.path.join(self.run_dir, "train_log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            self.tb.train_step(record)
        bar.set_postfix(loss=f"{values['loss']:.4f}", rmse=f"{values['rmse']:.3f}", lr=f"{record['lr']:.2e}",
                        img_s=f"{rate:.1f}")

    def _lr_and_beta1(self):
        """The learning rate and Adam's beta1 of the next step: the schedule's, on the device under --cuda-graphs."""
        if self._graphed is not None:
            return tuple(float(v) for v in self._graphed.schedule.at(self._graphed.steps))
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
        """The run's folder and its vis/, made once data and model are ready: a run failing earlier leaves none."""
        os.makedirs(os.path.join(self.run_dir, "vis"), exist_ok=True)
        remove_checkpoint_temps(self.run_dir)
        write_json_atomic(vars(self.opts), os.path.join(self.run_dir, "config.json"))

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, name, metrics=None):
        """Write the whole training state to RUN_DIR/name (rank 0; every rank reads its last losses first, so
        that a run that --max-bad-steps stops saves nothing of it)."""
        self.check_losses()
        if self._graphed is not None:  # Adam's state and the schedule's position live on the device while graphed
            self._graphed.write_back(self.optimizer, self.scheduler)
        if not self.dist.is_main:
            return
        self._stop.protected = True  # training stops right after this save anyway if a signal came: let it finish
        try:
            position = {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                        "best_rmse": self.best_rmse}
            state = training_checkpoint(self.model.model_args, self.opts.image_size, self.conventions, self.model,
                                        self.ema, self.optimizer, self.scheduler, self.scaler, position,
                                        vars(self.opts), metrics, rng_state())
            write_checkpoint(state, os.path.join(self.run_dir, name))
        finally:
            self._stop.protected = False
