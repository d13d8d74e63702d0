"""export.py: TorchScript and ONNX files that match the eager model, or no file at all."""
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TRAINED_SIZE
from export import export_model
from inference import load
from main import main
from model import DepthNet
from utils import UserError


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*deprecated")
def test_export_torchscript_matches_eager(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.torchscript.pt"
    assert main(["--export", "torchscript", "--ckpt", str(checkpoint), "--out", str(out)]) == 0
    assert "max |exported - eager|" in capsys.readouterr().out
    exported = torch.jit.load(str(out))
    model = load(str(checkpoint), "cpu").net
    x = torch.rand(2, 3, TRAINED_SIZE, TRAINED_SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.eval()(x), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_export_onnx_matches_eager(tmp_path):
    for package in ("onnx", "onnxscript"):
        pytest.importorskip(package)
    ort = pytest.importorskip("onnxruntime")
    model = DepthNet(weights=None, init_depth=10.0).eval()
    out = tmp_path / "model.onnx"
    export_model(model, "onnx", str(out), size=64)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"rgb": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=0, atol=1e-4)


def test_export_onnx_without_its_packages_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(UserError, match="pip install onnx onnxscript onnxruntime"):
        export_model(nn.Conv2d(3, 1, 1), "onnx", str(tmp_path / "m.onnx"), size=32)
    assert list(tmp_path.iterdir()) == []


def test_export_that_does_not_match_leaves_no_file(tmp_path):
    with pytest.raises(UserError, match="differs from the eager model"):
        export_model(nn.Conv2d(3, 1, 1), "torchscript", str(tmp_path / "m.pt"), size=32, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
