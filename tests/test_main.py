"""main.py: options and their checks, course-template aliases, dispatch, train and evaluate end to end."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import main
from checkpoint import load_checkpoint
from conftest import REPO, SUBPROCESS_ENV, TRAINED_SIZE, make_dataset
from evaluate import METRIC_KEYS
from inference import load
from main import parse_options
from model import ENCODERS

MAIN = os.path.join(REPO, "main.py")
FAST = ["--weights", "none", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--quiet",
        "--encoder", "resnet18"]


def run_main(*args, timeout=300):
    return subprocess.run([sys.executable, MAIN, *map(str, args)], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    # Two training images at batch 2: one step per epoch, so --max-steps 2 runs two epochs.
    return make_dataset(tmp_path_factory.mktemp("cli_data"), {"train": 2, "val": 3}, size=(36, 64))


@pytest.mark.slow
def test_train_then_eval_end_to_end(cli_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_main("--data-dir", cli_data, "--run-dir", run_dir, "--max-steps", "2", "--eval-every", "1",
                      "--vis-every", "1", "--amp", "off", *FAST)
    assert result.returncode == 0, result.stderr
    assert "val after epoch 2 (step 2)" in result.stdout

    config = json.loads((run_dir / "config.json").read_text())
    assert config["data_dir"] == cli_data and config["batch_size"] == 2 and config["max_steps"] == 2
    ckpt = load_checkpoint(str(run_dir / "last.pt"))
    assert (ckpt["step"], ckpt["epoch"]) == (2, 2)
    assert os.path.isfile(run_dir / "best.pt")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 1), (2, 2)]
    for r in records:
        assert set(METRIC_KEYS) <= set(r) and r["n_images"] == 3
    pictures = sorted(os.listdir(run_dir / "vis"))
    assert pictures == ["train_step000001.png", "train_step000002.png"]
    with Image.open(run_dir / "vis" / pictures[0]) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert not [n for n in os.listdir(run_dir) if "tmp" in n]

    out = tmp_path / "metrics" / "m.json"
    result = run_main("--eval", "--ckpt", run_dir / "last.pt", "--data-dir", cli_data, "--split", "val",
                      "--metrics-out", out, "--workers", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert set(metrics) == set(METRIC_KEYS) and metrics["n_images"] == 3
    assert all(key in result.stdout for key in METRIC_KEYS[:-1])
    # The checkpoint holds the model that training evaluated last (both in fp32 here).
    for key in ("rmse", "ssim", "challenge_rmse", "challenge_ssim"):
        assert metrics[key] == pytest.approx(records[-1][key], abs=1e-4), key


def test_course_template_aliases(cli_data, tmp_path):
    run_dir = tmp_path / "template_run"
    code = main.main(["--data_dir", cli_data, "--ckpt_dir", str(run_dir), "--batch_size", "2", "--max_epochs", "1",
                      "--evaluate_every", "0", "--visualize_every", "0", "--is_train", "true", "--lr", "2e-3",
                      "--weights", "none", "--workers", "0", "--device", "cpu", "--amp", "off", "--quiet",
                      "--encoder", "resnet18", "--image-size", "64"])
    assert code == 0
    ckpt = load_checkpoint(str(run_dir / "last.pt"))
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
    assert ckpt["config"]["batch_size"] == 2 and ckpt["config"]["lr"] == 2e-3
    assert not os.path.exists(run_dir / "metrics.jsonl")

    out = tmp_path / "m.json"
    code = main.main(["--is_train", "False", "--ckpt_file", str(run_dir / "last.pt"), "--data_dir", cli_data,
                      "--metrics-out", str(out), "--workers", "0", "--device", "cpu"])
    assert code == 0
    assert set(json.loads(out.read_text())) == set(METRIC_KEYS)


@pytest.mark.parametrize("alias,option,value,expected", [
    ("--batch_size", "batch_size", "4", 4),
    ("--max_epochs", "epochs", "3", 3),
    ("--data_dir", "data_dir", "somewhere", "somewhere"),
    ("--ckpt_dir", "run_dir", "runs/x", "runs/x"),
    ("--evaluate_every", "eval_every", "5", 5),
    ("--visualize_every", "vis_every", "7", 7),
])
def test_alias_sets_the_same_option(alias, option, value, expected):
    assert getattr(main.parse_options([alias, value]), option) == expected


def test_is_train_parses_as_a_real_boolean():
    assert main.parse_options(["--is_train", "False", "--ckpt_file", "x.pt"]).eval is True
    assert main.parse_options(["--is_train", "true"]).eval is False


@pytest.mark.parametrize("args,option", [
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"),
    (["--eval"], "--ckpt"),
    (["--is_train", "false"], "--ckpt"),
    (["--max-steps", "0"], "--max-steps"),
    (["--lr", "1e-2", "--max-lr", "1e-3"], "--max-lr"),
    (["--workers", "-1"], "--workers"),
    (["--is_train", "maybe"], "--is_train"),
    (["--flip"], "--flip"),
    (["--export", "onnx", "--ckpt", "a.pt", "b.pt"], "--ckpt"),
    (["--eval", "--ckpt", "a.pt", "b.pt"], "--out"),
    (["--ema", "1"], "--ema"),
    (["--max-zoom", "0.5"], "--max-zoom"),
    (["--paste", "2"], "--paste"),
    (["--crop", "96", "100"], "--crop"),
    (["--image-size", "128", "--crop", "96", "160"], "--crop"),
    (["--zoom-closer"], "--zoom-closer"),
    (["--demo", "--no-augment", "--max-zoom", "2"], "--max-zoom"),
])
def test_bad_options_exit_with_one_line_naming_the_option(args, option, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # as a user runs it: --demo looks for its data under data/
    try:
        code = main.main([str(a) for a in args])
    except SystemExit as stop:  # argparse's own errors exit; ours return the status
        code = stop.code
    assert code != 0
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and option in errors[0], stderr


def test_user_errors_print_one_line_and_return_1(tmp_path, capsys):
    code = main.main(["--data-dir", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "run"), *FAST])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data folder") and "\n" not in err

    code = main.main(["--eval", "--ckpt", str(tmp_path / "missing.pt"), "--data-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "missing.pt" in err and "\n" not in err


# ------------------------------------------------------------------ options
def test_encoder_names_in_main_match_model():
    assert main.ENCODER_NAMES == tuple(ENCODERS)


def test_defaults_keep_the_paper_preset():
    opts = main.parse_options([])
    assert (opts.encoder, opts.skips, opts.augment, opts.grad_weight, opts.silog_weight, opts.image_size) == \
        ("resnet34", False, False, 0.0, 0.0, 224)


def test_bad_option_values_are_rejected(capsys):
    for argv in (["--image-size", "100"], ["--grad-weight", "-1"], ["--encoder", "vgg16"]):
        with pytest.raises(SystemExit):
            main.parse_options(argv)
    assert "--image-size must be a positive multiple of 32" in capsys.readouterr().err


def test_inference_uses_the_trained_image_size_unless_typed(checkpoint):
    opts = parse_options(["--predict", "x.png", "--ckpt", str(checkpoint)])
    assert load(opts.ckpt, "cpu", size=opts.image_size).size == TRAINED_SIZE
    opts = parse_options(["--export", "onnx", "--ckpt", str(checkpoint), "--image-size", "96"])
    assert load(opts.ckpt, "cpu", size=opts.image_size).size == 96


@pytest.mark.parametrize("argv", [["--predict", "x.png"], ["--export", "torchscript"]])
def test_predict_and_export_need_a_checkpoint(argv, capsys):
    with pytest.raises(SystemExit):
        main.main(argv)
    assert "needs --ckpt PATH" in capsys.readouterr().err


def test_help_shows_zero_defaults_but_not_missing_ones():
    text = " ".join(main.build_parser().format_help().split())  # argparse wraps lines: compare on single spaces
    options = text.split("options:", 1)[1]  # after the usage line, which names the options too
    assert "--seed SEED seed for weights, data order and every RNG (default: 0)" in options
    assert "(default: 0.0)" in options.split("--grad-weight", 1)[1].split("--silog-weight", 1)[0]
    assert "(default: 2)" in options.split("--eval-every", 1)[1].split("--vis-every", 1)[0]
    assert "(default: None)" not in options and "(default: False)" not in options
