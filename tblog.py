"""--tensorboard: a training run's scalars, pictures and options as TensorBoard event files in RUN_DIR/tb.

Optional: it needs the tensorboard package (pip install -r requirements-tensorboard.txt).
`tensorboard --logdir runs` then shows every run side by side. The scalars are the values
train_log.jsonl and metrics.jsonl hold, at the same optimiser steps:
  train/loss, train/rmse, train/ssim (+ train/grad, train/silog when weighted), train/lr,
  train/beta1, train/img_per_s, train/epoch        every --log-every steps
  val/rmse, val/challenge_rmse, ... every metric    at each evaluation
  vis/train                                          the --vis-every pictures
  hparams: the run's options, with final/<metric> the last evaluation's metrics
"""
import math
import os

import numpy as np
from PIL import Image

from utils import UserError

INSTALL_HINT = "pip install -r requirements-tensorboard.txt"


def require_tensorboard():
    """Raise a one-line UserError unless torch's SummaryWriter can write event files."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; import it first for a clear failure)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None


def hparam_value(value):
    """Options as the hparams plugin accepts them: numbers, strings and booleans; anything else as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardLog:
    """Event files of one run, fed by the Trainer at its log steps, evaluations and pictures."""

    def __init__(self, run_dir):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), flush_secs=30)

    def train_step(self, record):
        """One train_log.jsonl record: every number in it but the step, at its step."""
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def evaluation(self, step, metrics):
        """Every val metric of both protocols, as metrics.jsonl records them."""
        for key, value in metrics.items():
            self.writer.add_scalar(f"val/{key}", value, step)

    def picture(self, tag, path, step):
        """A picture the run saved (vis/*.png), as it is on disk."""
        with Image.open(path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self, options, final_metrics=None):
        """The run's options as hparams, with the last evaluation's metrics, then flush everything."""
        metrics = {f"final/{k}": v for k, v in (final_metrics or {}).items() if math.isfinite(v)}
        # run_name "." keeps the hparams beside the scalars: one run in TensorBoard, not two.
        self.writer.add_hparams({k: hparam_value(v) for k, v in sorted(options.items())}, metrics, run_name=".")
        self.writer.close()
