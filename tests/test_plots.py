"""plots.py: training curves from the logs of resumed and killed runs, the step/epoch axis."""
import json

import pytest
from PIL import Image

from plots import plot_training_curves, step_epoch_maps


def test_training_curves_from_logs_of_a_resumed_and_killed_run(tmp_path):
    records = [{"step": s, "epoch": s / 10, "lr": 1e-3, "loss": 1.0, "rmse": 1.0, "ssim": 0.5}
               for s in (10, 20, 30, 20, 30)]
    lines = [json.dumps(r) for r in records] + ['{"step": 40, "epo']  # resumed at step 10, then killed mid-write
    (tmp_path / "train_log.jsonl").write_text("\n".join(lines))
    assert plot_training_curves(str(tmp_path), str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size[0] > 500 and im.size[1] > 300
    assert not plot_training_curves(str(tmp_path / "empty"), str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_step_epoch_axis_interpolates_both_ways():
    to_epoch, to_step = step_epoch_maps([{"step": 100, "epoch": 1.0}, {"step": 300, "epoch": 2.0}])
    assert to_epoch(50) == pytest.approx(0.5) and to_epoch(200) == pytest.approx(1.5)
    assert to_step(1.5) == pytest.approx(200)
    assert step_epoch_maps([]) == (None, None)
