"""bench.py: its SSIM variants agree with losses.py, and a tiny run writes a complete report."""
import json
import sys

import pytest
import torch

import bench
from losses import ssim


def test_ssim_implementations_of_bench_agree_with_losses():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 48, 64, generator=gen) * 20
    y = (x + torch.randn(2, 1, 48, 64, generator=gen)).clamp(0, 20)
    expected = float(ssim(x, y, data_range=1.0, padding="same"))
    for name, fn in bench.SSIM_VARIANTS.items():
        assert float(fn(x, y)) == pytest.approx(expected, abs=1e-5), name


@pytest.mark.slow
def test_bench_writes_its_report(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--images", "2",
                "--rounds", "1", "--inference-reps", "1", "--inference-batch", "2", "--workers", "0",
                "--out", str(out)])
    r = json.loads(out.read_text())
    for name in ("baseline", "ours"):
        assert r["train"][name]["steps"] == 1 and r["train"][name]["img_s"] > 0
        fraction = r["train"][name]["fraction_of_peak"]
        assert fraction is None or 0 < fraction <= bench.PLAUSIBLE_FRACTION
        assert r["train"][name]["peak_flops"] > 0
        assert r["inference"][name]["latency_ms_batch1"] > 0 and r["inference"][name]["img_s_batchN"] > 0
    assert r["train_speedup"] == pytest.approx(r["train"]["ours"]["img_s"] / r["train"]["baseline"]["img_s"])
    # ResNet-34 to layer4 is 3.6 GFLOPs at 224 × 224; the decoder's full-resolution layers add more.
    assert 7e9 < r["flops"]["forward_per_image"] < 10e9
    assert r["flops"]["train_per_image"] == 3 * r["flops"]["forward_per_image"]
    acc = r["accuracy"]
    assert acc["n_images"] == 2 and acc["abs_diff"]["rmse"] < 0.05 * acc["fp32"]["rmse"]


@pytest.mark.slow
def test_predict_cli_times_the_command_users_run(tmp_path):
    out = tmp_path / "cli.json"
    r = bench.main(["--device", "cpu", "--predict-cli", "--cli-images", "2", "--cli-reps", "1", "--workers", "0",
                    "--out", str(out)])
    assert json.loads(out.read_text())["cli"] == r["cli"]
    cli = r["cli"]
    assert cli["images_in_folder"] == 2 and cli["checkpoint_bytes"] > 90e6  # weights + Adam moments, float32
    for name in ("baseline", "ours"):
        runs = cli["runs_s"][f"{name}/one_image"]
        assert len(runs) == 1 and cli[name]["one_image_s"] == runs[0]
        assert cli[name]["one_image_s"] > 0 and cli[name]["folder_s"] > 0
        assert cli[name]["per_extra_image_ms"] == pytest.approx(
            1e3 * (cli[name]["folder_s"] - cli[name]["one_image_s"]) / (cli["images_in_folder"] - 1))
    assert cli["folder_s_ratio"] == pytest.approx(cli["ours"]["folder_s"] / cli["baseline"]["folder_s"])
    assert len(cli["runs_s"]["import_torchvision"]) == 1 and cli["import_torchvision_s"] > 0
    floor = cli["runs_s"]["import_torch_torchvision"][0]
    assert cli["model_folder_over_import_floor"] == pytest.approx(cli["runs_s"]["model_folder"][0] / floor)
    assert cli["checkpoint_over_import_floor"] == pytest.approx(cli["ours"]["one_image_s"] / floor)


def test_a_failing_command_is_an_error_with_its_output():
    with pytest.raises(RuntimeError, match="exited with 3:\nno checkpoint"):
        bench.run_timed([sys.executable, "-c", "import sys; print('no checkpoint'); sys.exit(3)"])


def test_profile_reports_where_a_training_step_goes(tmp_path):
    out = tmp_path / "profile.json"
    r = bench.main(["--device", "cpu", "--profile", "2", "--warmup", "1", "--batch-size", "2", "--images", "4",
                    "--workers", "0", "--out", str(out)])
    p = r["profile"]
    assert p["steps"] == 2 and p["wall_ms_per_step"] > 0
    assert p["device_busy_ms_per_step"] == 0 and p["kernels_per_step"] == 0  # a CPU run has no device kernels
    host = p["host_op_ms_per_step"]
    assert any(k.startswith("aten::") and "conv" in k for k in host)  # the convolutions are profiled
    assert sum(host.values()) <= 1.05 * p["wall_ms_per_step"]  # self times of ops within the wall time
    table = (tmp_path / "profile_ops.txt").read_text()
    assert "2 training steps of batch 2" in table and "Self CPU" in table
