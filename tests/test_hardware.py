"""hardware.py: the device and autocast dtype that --device and --amp select."""
import pytest
import torch

import hardware
from hardware import autocast, select_amp_dtype, select_device
from utils import UserError

CPU = torch.device("cpu")


def test_device_selection():
    assert select_device("cpu") == CPU
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            select_device("cuda")


def test_named_autocast_dtypes():
    assert select_amp_dtype("off", CPU) is None
    assert select_amp_dtype("bf16", CPU) is torch.bfloat16
    assert select_amp_dtype("fp16", CPU) is torch.float16


@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_autocast_on_a_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(hardware, "cpu_runs_bf16", lambda: has_bf16)
    assert select_amp_dtype("auto", CPU) is expected


def test_autocast_none_runs_in_fp32_and_a_dtype_casts_matmuls():
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    with autocast("cpu", None):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_the_torch_internals_we_rely_on_still_behave():
    """cpu_runs_bf16 answers a bool; skip_update_unless_finite makes fused Adam skip a bad step and only that one."""
    assert isinstance(hardware.cpu_runs_bf16(), bool)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    for loss_value, moves in ((float("nan"), False), (1.0, True)):
        before = weight.detach().clone()
        optimizer.zero_grad()
        (weight.sum() * loss_value).backward()
        hardware.skip_update_unless_finite(optimizer, torch.tensor(loss_value))
        optimizer.step()
        assert torch.equal(weight.detach(), before) is not moves, loss_value
