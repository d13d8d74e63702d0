"""The checkpoint format, known here and nowhere else: what a checkpoint of this project holds, how it is
written (atomically) and read (torch.load with weights_only=True: a checkpoint can never run code).

A checkpoint is one dict of tensors and plain Python types:
  model_args   DepthNet's constructor arguments (encoder, skips, init_depth): DepthNet(**model_args)
  input_size   the network input it was trained at: a side S (square) or [H, W]
  depth        the data's depth conventions it was trained with: min_depth, max_depth (its range:
               predictions are clamped to it) and depth_scale (of 16-bit depth PNGs)
  model        the network's state dict; ema: the moving average's, under --ema (what was evaluated)
  optimizer, scheduler, scaler, rng            the training state that --resume continues from
  epoch, step, batch_in_epoch, best_rmse      where training stood
  config       the run's options, as its config.json
  metrics      the val metrics this checkpoint scored, when it was written after an evaluation
"""
import math
import os
import pickle
import warnings

import torch

from conventions import DepthConventions
from utils import CheckpointError, atomic_save, first_line

# What --resume needs besides the weights.
TRAINING_STATE = ("optimizer", "scheduler", "epoch", "step", "rng")
# The paper's input side: that of checkpoints that do not record theirs.
DEFAULT_INPUT_SIZE = 224


def training_checkpoint(model_args, input_size, conventions, model, ema, optimizer, scheduler, scaler, position, config,
                        metrics, rng):
    """The dict that Trainer saves: `position` holds epoch, step, batch_in_epoch and best_rmse."""
    return {
        "model_args": dict(model_args),
        "input_size": input_size if isinstance(input_size, int) else [int(v) for v in input_size],
        "depth": conventions.as_dict(),
        "model": model.state_dict(),
        **({"ema": ema.state_dict()} if ema is not None else {}),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        **position,
        "config": dict(config),
        "metrics": metrics or {},
        "rng": rng,
    }


def restore_training_state(ckpt, source, model, ema, optimizer, scheduler, scaler):
    """Load a training checkpoint's state into a fresh run's objects (--resume); returns where training stood:
    (epoch, step, batch_in_epoch, best_rmse). The RNGs are restored too."""
    from model import load_weights
    from utils import set_rng_state

    load_weights(model, ckpt["model"], source)
    if ema is not None:
        # --ema added on resuming a run that kept no average: the average starts from the weights.
        load_weights(ema, ckpt.get("ema", ckpt["model"]), source)
    # Checkpoints store the optimiser's fused/foreach choice; the training loop needs fused Adam.
    for group in ckpt["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=None)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt.get("scaler", {}))
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["step"], ckpt.get("batch_in_epoch", 0), ckpt.get("best_rmse", math.inf)


def save_checkpoint(obj, path):
    """Write a checkpoint atomically, with a one-line CheckpointError when the file cannot be written."""
    try:
        atomic_save(obj, path)
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; "
                              "the previous file is intact") from None


def remove_checkpoint_temps(directory):
    """Delete the temporary files (.NAME.pt.XXXX.tmp) of writers killed mid-save: each is a checkpoint's size."""
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(".tmp") and ".pt." in name:
            os.remove(os.path.join(directory, name))


def load_checkpoint(path, map_location="cpu", mmap=False):
    """A checkpoint of this project, or a one-line CheckpointError saying why `path` is not one.

    mmap=True maps the tensors instead of reading them: cheap when only the config is needed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; give a file written by training (e.g. runs/NAME/last.pt "
                              "or best.pt)")
    ckpt = torch_load_safely(path, map_location, mmap)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return ckpt


def load_resumable(path):
    """A checkpoint with everything a resumed run needs, or a CheckpointError saying what is missing."""
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_STATE if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} holds no training state ({', '.join(missing)} missing): "
                              "--resume needs a last.pt or best.pt written by training")
    return ckpt


def run_config(path):
    """The options of the run that wrote checkpoint `path` (what --resume inherits), without reading its tensors."""
    return load_checkpoint(path, mmap=True).get("config") or {}


def model_args(ckpt):
    """DepthNet's constructor arguments of a checkpoint. Files that predate the model_args entry kept the
    architecture in the run's options and the output bias at the top level."""
    if "model_args" in ckpt:
        return dict(ckpt["model_args"])
    config = ckpt.get("config") or {}
    return {"encoder": config.get("encoder", "resnet34"), "skips": bool(config.get("skips", False)),
            "init_depth": float(ckpt.get("init_depth", 0.0))}


def input_size(ckpt):
    """The network input the checkpoint was trained at: a side S, or [H, W]."""
    size = ckpt.get("input_size") or (ckpt.get("config") or {}).get("image_size") or DEFAULT_INPUT_SIZE
    return size if isinstance(size, int) else [int(v) for v in size]


def trained_conventions(ckpt):
    """The DepthConventions the checkpoint was trained with; the paper's for older files."""
    return DepthConventions.from_dict(ckpt.get("depth"))


def network_state(ckpt):
    """The weights a checkpoint's network is used with: the moving average when training kept one (--ema;
    it is what was evaluated), else the trained weights."""
    return ckpt.get("ema") or ckpt["model"]


def trained_network_state(path):
    """The network weights of `path` when it is a checkpoint written by training (--weights PATH fine-tunes
    from it); None for any other file, which --weights reads as a state dict of the encoder's network."""
    ckpt = torch_load_safely(path, mmap=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and ("config" in ckpt or "model_args" in ckpt):
        return network_state(ckpt)
    return None


def torch_load_safely(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True) whose failures are one-line CheckpointErrors naming `path`."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to our error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is truncated or corrupt (UnpicklingError: {first_sentence(err)}); "
                                  "use another file") from None
        raise CheckpointError(f"refused to load {path}: it holds something other than tensors and plain types "
                              f"({unpickler_reason(err)}); loading it could run code, so only load files you "
                              "trust") from None
    except Exception as err:  # a damaged file can fail in many ways (RuntimeError, EOFError, KeyError, ...)
        if "TorchScript" in str(err):
            raise CheckpointError(f"{path} is a TorchScript model (written by --export), not a checkpoint: give "
                                  "the best.pt or last.pt that training wrote; load the export with torch.jit.load"
                                  ) from None
        if mmap and "mmap" in str(err):  # not a zip-format file: read it whole, which also vets it
            return torch_load_safely(path, map_location, mmap=False)
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {first_sentence(err)}); "
                              "use another file (a run keeps both last.pt and best.pt)") from None


def first_sentence(err):
    """The first sentence of an error's message, whole: torch's zip reader follows its reason with a paragraph
    of advice that a length limit would cut mid-word."""
    line = first_line(err) if str(err).strip() else ""
    if not line:
        return "the file ends before its first record" if isinstance(err, EOFError) else "no message"
    sentence = line.split(". ", 1)[0].rstrip(".")
    if len(sentence) > 160:
        sentence = sentence[:160].rsplit(" ", 1)[0] + " ..."
    return sentence


def unpickler_reason(err):
    """The line of torch's long weights_only message that says what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.rstrip(".")
    return "see torch.load's weights_only documentation"
