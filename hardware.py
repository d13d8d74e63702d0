"""Which device and which autocast dtype to run on, for training and inference alike, and the torch internals
the project relies on."""
import contextlib

import torch

from utils import UserError


def select_device(name):
    """--device: "auto" (CUDA when there is one), "cpu" or "cuda"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu or auto")
    return torch.device(name)


def select_amp_dtype(amp, device):
    """The autocast dtype for --amp: bf16 where the hardware runs it natively, else fp16 on CUDA, else none."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPUs without bf16 instructions autocast emulates it and runs slower than fp32.
    return torch.bfloat16 if cpu_runs_bf16() else None


# The two functions below use torch internals that no public API offers; they live here, and only
# here, so that a torch release that changes them is mended in one place (tests/test_hardware.py).


def cpu_runs_bf16():
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), which oneDNN uses.

    torch.ops.mkldnn._is_mkldnn_bf16_supported is private; torch has no public query."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def skip_update_unless_finite(optimizer, loss):
    """Make a fused Adam's next step() a no-op, on the device, when `loss` is not finite.

    Fused Adam reads the optimiser's `found_inf` attribute, the flag through which GradScaler
    tells it to skip a step with inf/NaN gradients, and then leaves weights and moments
    untouched. The attribute is undocumented, but it is how GradScaler itself drives the fused
    kernel; it lets a bad step be skipped without the host waiting to read the loss.
    """
    optimizer.found_inf = (~torch.isfinite(loss)).float()


def autocast(device_type, dtype):
    """torch.autocast in `dtype`, or no autocast at all when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def synchronize(device):
    """Wait for the work queued on a GPU, so that a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
