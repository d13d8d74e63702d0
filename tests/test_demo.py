"""`python main.py --demo`: the preset, and the whole quickstart at a tiny size."""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

import main
from checkpoint import load_checkpoint
from conftest import REPO, SUBPROCESS_ENV, make_dataset
from demo import recipe_line
from synthetic import ensure_dataset

PREDICTORS = {"model", "constant mean", "per-row mean", "mean map"}


def test_demo_preset_scales_the_recipe_to_a_cpu():
    opts = main.parse_options(["--demo", "--device", "cpu"])
    assert (opts.batch_size, opts.max_steps, opts.data_dir) == (8, 1600, os.path.join("data", "synthetic"))
    assert (opts.image_size, opts.skips, opts.augment, opts.paste, opts.silog_weight) == ([96, 160], True, True, 0.5,
                                                                                         0.5)
    assert recipe_line(opts).startswith("trained: paper model (ResNet-34) + skips + augmentation + copy-paste "
                                        "(p = 0.5) + SILog (weight 0.5) at 96 × 160, 1600 steps of batch 8, learning "
                                        "rates 0.000125 … 0.000625")
    # Two triangular2 cycles with the paper's 1 : 2 rise/fall, ending at (or within 5 steps of) the base lr.
    assert 0 <= opts.max_steps - 2 * (opts.step_size_up + opts.step_size_down) < 6
    assert abs(2 * opts.step_size_up - opts.step_size_down) <= 1  # 1 : 2, to a step
    # Learning rates scale with the batch against the paper's 32, then the recipe halves them.
    assert math.isclose(opts.lr, 1e-3 * 8 / 32 / 2) and math.isclose(opts.max_lr, 5e-3 * 8 / 32 / 2)


@pytest.mark.parametrize("image_hw, input_hw", [((144, 256), [96, 160]), ((50, 50), [128, 128]),
                                                ((375, 1242), [64, 224]), ((256, 144), [160, 96])])
def test_demo_preset_shapes_the_cpu_input_like_the_training_images(tmp_path, image_hw, input_hw):
    """About 128 × 128 pixels in the images' own shape, on 32's multiples: DepthEstimationUnreal, square
    images, KITTI's shape and a portrait one."""
    root = make_dataset(tmp_path, {"train": 1}, size=image_hw)
    opts = main.parse_options(["--demo", "--device", "cpu", "--data-dir", root])
    assert opts.image_size == input_hw
    height, width = input_hw
    assert abs(math.log(height / width) - math.log(image_hw[0] / image_hw[1])) < 0.25
    assert 0.6 < height * width / 128 ** 2 <= 1.0


def test_demo_preset_takes_the_shape_of_a_photo_upright_as_training_reads_it(tmp_path):
    """A phone photo stored 144 × 256 with EXIF "rotate 90°" trains upright, 256 × 144: so is its input shaped."""
    root = make_dataset(tmp_path, {"train": 1}, size=(144, 256))
    path = os.path.join(root, "rgb", "train", "0.jpeg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(path).save(path, exif=exif)
    opts = main.parse_options(["--demo", "--device", "cpu", "--data-dir", root])
    assert opts.image_size == [160, 96]


def test_demo_preset_gives_way_to_typed_options():
    opts = main.parse_options(["--demo", "--device", "cpu", "--batch-size", "16", "--lr", "2e-3",
                               "--demo-steps", "60", "--run-dir", "elsewhere", "--no-skips", "--no-augment", "--paste",
                               "0", "--silog-weight", "0", "--image-size", "128", "224", "--crop", "96", "160"])
    assert (opts.batch_size, opts.max_steps, opts.run_dir) == (16, 60, "elsewhere")
    assert (opts.image_size, opts.skips, opts.augment) == ([128, 224], False, False)
    assert (opts.paste, opts.silog_weight, opts.crop) == (0, 0, [96, 160])
    assert "trained: paper model (ResNet-34) + 96 × 160 windows at 128 × 224" in recipe_line(opts)
    assert math.isclose(opts.lr, 2e-3), "a typed --lr is never rescaled"
    assert math.isclose(opts.max_lr, 5e-3 * 16 / 32 / 2)
    assert (opts.step_size_up, opts.step_size_down) == (10, 20)


def test_demo_reuses_an_existing_data_set(tmp_path, capsys):
    (tmp_path / "rgb" / "train").mkdir(parents=True)
    ensure_dataset(str(tmp_path), 3, 1, 1, seed=0, progress=False)
    assert "using the data set in" in capsys.readouterr().out
    assert os.listdir(tmp_path / "rgb" / "train") == [], "nothing is synthesised over existing data"


def test_demo_end_to_end_at_a_tiny_size(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    # An empty TORCH_HOME: no cached ImageNet weights, so the demo must say it starts from random ones.
    env = {**SUBPROCESS_ENV, "TORCH_HOME": str(tmp_path / "torch_home")}
    result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--demo", "--demo-train", "5",
                             "--demo-val", "2", "--demo-test", "2", "--demo-steps", "2", "--image-size", "64",
                             "--data-dir", str(data), "--run-dir", str(run), "--workers", "0", "--device", "cpu",
                             "--encoder", "resnet18", "--quiet"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "starts from random weights" in result.stdout

    meta = json.loads((data / "meta.json").read_text())
    assert meta["counts"] == {"train": 5, "val": 2, "test": 2}
    assert sorted(os.listdir(data / "rgb" / "val")) == ["0.jpeg", "1.jpeg"]

    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(str(run / name))
        assert ckpt["step"] == 2 and ckpt["config"]["demo"] is True
    config = json.loads((run / "config.json").read_text())
    assert (config["batch_size"], config["image_size"], config["weights"]) == (8, 64, "none")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] == 2 and records[-1]["n_images"] == 2
    for picture in ["curves.png", *(os.path.join("vis", n) for n in os.listdir(run / "vis"))]:
        with Image.open(run / picture) as im:
            assert im.format == "PNG"
    assert os.listdir(run / "vis"), "at least one visualisation"

    summary = json.loads((run / "demo_results.json").read_text())
    assert summary["steps"] == 2 and summary["device"] == "cpu"
    assert set(summary["results"]) == {"val", "test"}
    for rows in summary["results"].values():
        assert set(rows) == PREDICTORS
        for metrics in rows.values():
            assert math.isfinite(metrics["rmse"]) and math.isfinite(metrics["challenge_rmse"])
            assert 0 <= metrics["rmse"] <= 20 and -1 <= metrics["ssim"] <= 1
    table = (run / "demo_results.md").read_text()
    assert table.count("\n") == 2 + 2 * len(PREDICTORS)
    assert "| val | per-row mean |" in table and "| val | per-row mean |" in result.stdout
    assert not [n for n in os.listdir(run) if "tmp" in n]


def test_scaled_cycle_keeps_the_papers_ratio_and_fits_two_cycles():
    from demo import scaled_cycle

    for steps in (6, 60, 600, 3000, 3001):
        up, down = scaled_cycle(steps)
        assert abs(down - 2 * up) <= 1  # 1 : 2, up to rounding
        assert 0 <= steps - 2 * (up + down) < 6
    assert scaled_cycle(1) == (1, 1)  # never a zero-length phase


def test_demo_preset_settles_the_epochs_from_the_data_set(tmp_path):
    # No data yet: the epochs needed for --max-steps over the scenes the demo will synthesise.
    opts = main.parse_options(["--demo", "--device", "cpu", "--data-dir", str(tmp_path / "absent"),
                               "--demo-train", "20", "--demo-steps", "7", "--batch-size", "4"])
    assert opts.epochs == math.ceil(7 / math.ceil(20 / 4))
    # An existing data set: its own number of training pairs counts.
    data = make_dataset(tmp_path / "data", {"train": 3}, size=(8, 8))
    opts = main.parse_options(["--demo", "--device", "cpu", "--data-dir", data, "--demo-steps", "7",
                               "--batch-size", "2"])
    assert opts.epochs == math.ceil(7 / 2)
    assert main.parse_options(["--demo", "--device", "cpu", "--data-dir", data, "--epochs", "9"]).epochs == 9


def test_demo_on_a_set_without_test_split_scores_val_and_keeps_a_best_checkpoint(tmp_path):
    """Like the published DepthEstimationUnreal (train and val only), with a run shorter than the
    evaluation interval: the final weights are still scored and best.pt written."""
    data = make_dataset(tmp_path / "data", {"train": 20, "val": 3})
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--demo", "--demo-steps", "2",
                             "--image-size", "64", "--data-dir", data, "--run-dir", str(run), "--workers", "0",
                             "--device", "cpu", "--weights", "none", "--encoder", "resnet18", "--quiet"],
                            cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "data" / "rgb")) == ["train", "val"], "nothing is synthesised"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2], "one evaluation, of the final weights (3 batches an epoch)"
    best = load_checkpoint(str(run / "best.pt"))
    assert best["step"] == 2 and best["metrics"]["rmse"] == records[0]["rmse"]
    summary = json.loads((run / "demo_results.json").read_text())
    assert set(summary["results"]) == {"val"} and set(summary["results"]["val"]) == PREDICTORS
    # The demo's table scores the same final weights as the run's own evaluation.
    assert math.isclose(summary["results"]["val"]["model"]["rmse"], records[0]["rmse"], rel_tol=5e-3)
