"""Export a trained DepthNet to TorchScript or ONNX, checked against the eager model.

Both exports take RGB in [0, 1] of shape (B, 3, H, W) at the size the model was trained at, any
batch size B, and give depth in metres (B, 1, H, W): the raw network, without predict.py's resizing and
clamping. The file is written to a temporary path, loaded back, run on random input and
compared with the eager model; only a file that matches is renamed into place.
"""
import contextlib
import warnings

import numpy as np
import torch

from dataset import input_hw
from utils import UserError, atomic_path


def require_onnx():
    """Import the ONNX exporter and runtime, or say in one line how to install them."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter torch.onnx.export uses)
    except ImportError as err:
        raise UserError(f"--export onnx needs the packages onnx, onnxscript and onnxruntime ({err.name} is missing): "
                        "pip install onnx onnxscript onnxruntime, or use --export torchscript") from None
    return onnxruntime


@contextlib.contextmanager
def jit_deprecation_silenced():
    """torch.jit is deprecated upstream, yet TorchScript stays the format that libtorch (C++) loads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        yield


def save_torchscript(model, example, path):
    with jit_deprecation_silenced():
        traced = torch.jit.trace(model, example, check_trace=False)  # export_model compares the outputs itself
        torch.jit.save(traced, path)


def run_torchscript(path, x):
    with jit_deprecation_silenced():
        loaded = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return loaded(x).numpy()


def save_onnx(model, example, path):
    require_onnx()
    torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, verbose=False,
                      input_names=["rgb"], output_names=["depth"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))


def run_onnx(path, x):
    ort = require_onnx()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"rgb": x.numpy()})[0]


SAVE = {"torchscript": save_torchscript, "onnx": save_onnx}
RUN = {"torchscript": run_torchscript, "onnx": run_onnx}


def export_model(model, fmt, path, size=224, tolerance=1e-4, seed=0):
    """Write `model` as `fmt` to `path`; returns the max |exported − eager| on random input.

    Exports in fp32 on the CPU, so the file runs anywhere. Raises UserError, leaving no
    file behind, when the exported model differs from the eager one by more than `tolerance`.
    """
    if fmt not in SAVE:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(SAVE)}")
    model = model.float().cpu().eval()
    g = torch.Generator().manual_seed(seed)
    # Export with one batch size and check with another: the file must not be tied to the first.
    # (The example has two images: torch.export would treat a batch of one as a constant.)
    h, w = input_hw(size)
    example = torch.rand(2, 3, h, w, generator=g)
    check = torch.rand(1, 3, h, w, generator=g)
    with atomic_path(path) as tmp:
        SAVE[fmt](model, example, tmp)
        with torch.no_grad():
            expected = model(check).numpy()
        got = RUN[fmt](tmp, check)
        if got.shape != expected.shape:
            raise UserError(f"the {fmt} export gives shape {got.shape} for input {tuple(check.shape)}, the eager model "
                            f"{expected.shape}")
        diff = float(np.abs(got - expected).max())
        if not diff <= tolerance:
            raise UserError(f"the {fmt} export differs from the eager model by up to {diff:.3g} on random input "
                            f"(tolerance {tolerance:g}); nothing was written")
    return diff
