"""ablate.py: a tiny end-to-end ablation writes its table, chart and JSON; the combination rule."""
import json
import os

import pytest
from PIL import Image

import ablate


@pytest.mark.slow
def test_tiny_ablation_runs_end_to_end_and_writes_its_table(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    code = ablate.main(["--steps", "2", "--batch-size", "2", "--image-size", "64", "--variants", "paper,+skips",
                        "--data-dir", data, "--synth-train", "4", "--synth-val", "2", "--out", out, "--quiet"])
    assert code == 0
    assert len(os.listdir(os.path.join(data, "rgb", "train"))) == 4  # synthesised, as the data dir was absent

    table = open(os.path.join(out, "ablation.md")).read()
    for column in ("val RMSE", "SSIM", "AbsRel", "δ1", "parameters", "train images/s"):
        assert column in table
    assert "2 steps × batch 2" in table and "64 × 64" in table
    report = json.load(open(os.path.join(out, "ablation.json")))
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split("|")[1].strip() for r in rows] == ["paper", "+skips"]
    for row, name in zip(rows, ["paper", "+skips"]):
        result = report["results"][name]
        assert f"| {result['rmse']:.3f} |" in row and f"| {result['ssim']:.3f} |" in row
        assert result["steps"] == 2 and result["images_per_s"] > 0
    assert report["results"]["+skips"]["params"] > report["results"]["paper"]["params"]
    assert report["results"]["+skips"]["options"] == "--skips"

    with Image.open(os.path.join(out, "ablation.png")) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    run = os.path.join(out, "runs", "skips")
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["skips"] is True and config["max_steps"] == 2 and config["image_size"] == 64
    assert not os.path.exists(os.path.join(run, "last.pt"))  # no checkpoints without --keep-checkpoints


def test_combination_takes_every_improvement_and_only_the_best_encoder():
    results = {"paper": {"rmse": 3.0}, "+skips": {"rmse": 2.5}, "+augment": {"rmse": 3.2},
               "+resnet50": {"rmse": 2.8}, "+convnext_tiny": {"rmse": 2.6}, "+silog": {"rmse": 2.9}}
    assert ablate.choose_combination(results) == ["+skips", "+convnext_tiny", "+silog"]
    assert ablate.choose_combination({"paper": {"rmse": 1.0}, "+grad": {"rmse": 1.5}}) == []


def test_bad_variant_lists_are_rejected(capsys):
    with pytest.raises(SystemExit):
        ablate.parse_args(["--variants", "paper,+dropout"])
    assert "unknown variant(s) +dropout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.parse_args(["--variants", "+skips,best"])
    assert ablate.parse_args(["--variants", "best,paper,+skips,paper"]).variants == ["paper", "+skips", "best"]
