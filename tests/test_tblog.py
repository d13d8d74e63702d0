"""--tensorboard: RUN_DIR/tb's event files hold what train_log.jsonl and metrics.jsonl hold, pictures and hparams."""
import json
import sys

import pytest

from conftest import train_tiny_run
from main import main


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_event_files_match_the_run_logs(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = train_tiny_run(tiny_data, tmp_path / "run", "--tensorboard", "--log-every", "1", "--vis-every", "2")
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    train = read_jsonl(run / "train_log.jsonl")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "rmse", "ssim", "lr", "beta1", "img_per_s", "epoch"):
        assert series(f"train/{key}") == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train], key
    assert train[0]["beta1"] == pytest.approx(0.9, abs=1e-3)  # CyclicLR cycles Adam's beta1 from 0.9 at base lr

    val = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in val] == [2, 4]
    for key in ("rmse", "ssim", "abs_rel", "sq_rel", "rmse_log", "log10", "delta1", "delta2", "delta3",
                "challenge_rmse", "challenge_ssim"):  # both protocols
        assert series(f"val/{key}") == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in val], key
        assert series(f"final/{key}")[0][1] == pytest.approx(val[-1][key], rel=1e-6)
    assert not any(tag.startswith("val/") and tag[4:] not in val[0] for tag in scalars)

    pictures = events.Images("vis/train")
    assert [p.step for p in pictures] == [2, 4] and (pictures[0].width, pictures[0].height) == (1200, 420)

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    config = json.loads((run / "config.json").read_text())
    assert set(start.hparams) == set(config)
    assert start.hparams["image_size"].number_value == 64 and start.hparams["encoder"].string_value == "resnet34"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "final/rmse" in {m.name.tag for m in experiment.metric_infos}


def test_tensorboard_without_its_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    assert main(["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--tensorboard"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --tensorboard needs the tensorboard package: pip install -r requirements-tensorboard.txt\n"
    assert not (tmp_path / "run").exists()
