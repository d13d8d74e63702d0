"""Model folders (--export pretrained): what they hold, every way of loading one (DepthNet.from_pretrained,
torch.hub, --ckpt, a Hub id from the cache), with the network blocked, and a one-line error for each kind of
damage."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from checkpoint import save_checkpoint
from conftest import REPO, SUBPROCESS_ENV, make_pair, train_tiny_run
from main import main
from model import DepthNet
from pretrained import is_hub_id, read_pretrained
from utils import CheckpointError, UserError

SIZE = 64
ARGS = {"encoder": "resnet18", "skips": False, "init_depth": 8.0}
METRICS = {"rmse": 3.25, "ssim": 0.5, "abs_rel": 0.25, "sq_rel": 1.5, "rmse_log": 0.3, "log10": 0.1, "delta1": 0.6,
           "delta2": 0.8, "delta3": 0.9, "challenge_rmse": 3.5, "challenge_ssim": 0.4, "n_images": 4}
CONFIG = {"data_dir": "data/somewhere/DepthEstimationUnreal", "encoder": "resnet18", "weights": "imagenet",
          "ema": 0.9, "image_size": SIZE, "max_steps": 7, "batch_size": 4}


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory):
    """best.pt as a run with --ema writes it: trained weights and, apart from them, their moving average."""
    torch.manual_seed(0)
    trained = DepthNet(weights=None, **ARGS)
    average = DepthNet(weights=None, **ARGS)  # other weights than `model`: which of the two is exported shows
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint({"model_args": ARGS, "input_size": SIZE, "depth": {"min_depth": 1e-3, "max_depth": 20.0,
                                                                       "depth_scale": 1000.0},
                     "model": trained.state_dict(), "ema": average.state_dict(), "optimizer": {"state": {}},
                     "epoch": 2, "step": 7, "config": CONFIG, "metrics": METRICS}, str(path))
    return path


@pytest.fixture(scope="module")
def folder(ema_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["--export", "pretrained", "--ckpt", str(ema_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "scene.png"
    Image.fromarray(make_pair(np.random.default_rng(3), (72, 100))[0]).save(path)
    return path


@pytest.fixture
def offline(monkeypatch):
    """No network: huggingface_hub offline, and every socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("the network is blocked in this test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ what --export pretrained writes

def test_export_writes_the_config_the_average_weights_and_a_model_card(folder, ema_checkpoint):
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    assert config["model_args"] == ARGS and config["input_size"] == SIZE
    assert config["depth"] == {"min_depth": 1e-3, "max_depth": 20.0, "depth_scale": 1000.0}
    assert "imagenet" not in text.lower()  # the run started from ImageNet weights; loading must never fetch them
    ckpt = torch.load(ema_checkpoint, weights_only=True)
    weights = load_file(folder / "model.safetensors")
    assert_same_state(weights, ckpt["ema"])  # the average, which --predict uses: not the trained weights
    assert not torch.equal(weights["decoder.0.0.weight"], ckpt["model"]["decoder.0.0.weight"])
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
    data_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    assert data_bytes < os.path.getsize(folder / "model.safetensors") < data_bytes + 100_000  # no optimiser state


def test_model_card_says_how_it_was_trained_and_scored(folder):
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    assert "ResNet-18" in card and "DepthEstimationUnreal" in card and "7 optimiser steps (2 epochs)" in card
    assert "--ema 0.9" in card and "--max-steps 7" in card and "--encoder resnet18" in card
    assert "data/somewhere" not in card  # the data folder's name, not where it lay on the training machine
    assert "| 3.2500 |" in card and "| 3.5000 |" in card and "step 7" in card and "**challenge**" in card
    assert "DepthNet.from_pretrained(" in card and "## Limits" in card and "## Licence" in card


def test_export_refuses_a_folder_with_other_files(ema_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a training run's options, which must survive
    assert main(["--export", "pretrained", "--ckpt", str(ema_checkpoint), "--out", str(run)]) == 1
    assert "already holds other files" in capsys.readouterr().err
    assert os.listdir(run) == ["config.json"] and (run / "config.json").read_text() == "{}"


def test_export_with_a_min_depth_beyond_the_checkpoints_range_writes_nothing(ema_checkpoint, tmp_path, capsys):
    """A folder whose config.json no loader would accept is never written: the typed depth options are checked
    against the checkpoint's own, as --eval and --predict check them."""
    out = tmp_path / "model"
    assert main(["--export", "pretrained", "--ckpt", str(ema_checkpoint), "--out", str(out), "--min-depth", "25"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --min-depth 25 must be below the maximum depth") and str(ema_checkpoint) in err
    assert "\n" not in err and not out.exists() and os.listdir(tmp_path) == []


def test_export_again_over_a_model_folder_replaces_it(ema_checkpoint, tmp_path):
    out = tmp_path / "model"
    for _ in range(2):
        assert main(["--export", "pretrained", "--ckpt", str(ema_checkpoint), "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folder left beside it
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]


# ------------------------------------------------------------------ loading it, offline

def test_from_pretrained_and_torch_hub_give_the_checkpoints_average_in_eval_mode(folder, ema_checkpoint, offline):
    net = DepthNet.from_pretrained(folder)
    hub = torch.hub.load(REPO, "depthnet", source="local", pretrained=str(folder))
    assert not net.training and not any(m.training for m in hub.modules())
    assert_same_state(state_of(net), state_of(hub))
    expected = DepthNet(weights=None, **ARGS)  # built independently, as the checkpoint's own loader would
    expected.load_state_dict(torch.load(ema_checkpoint, weights_only=True)["ema"])
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(hub(x), net(x), rtol=0, atol=0)
    assert net.input_size == SIZE and net.depth_conventions.max_depth == 20.0


def test_torch_hub_without_pretrained_builds_a_random_network_offline(offline):
    net = torch.hub.load(REPO, "depthnet", source="local", encoder="resnet18")
    assert net.encoder_name == "resnet18" and net.training


def test_predict_with_the_folder_writes_the_checkpoints_depth(folder, ema_checkpoint, image, tmp_path, offline):
    for name, ckpt in (("folder", folder), ("checkpoint", ema_checkpoint)):
        assert main(["--predict", str(image), "--ckpt", str(ckpt), "--out", str(tmp_path / name), "--device", "cpu",
                     "--quiet"]) == 0
    from_folder, from_checkpoint = (np.load(tmp_path / name / "scene.npy") for name in ("folder", "checkpoint"))
    assert from_folder.shape == (72, 100)
    np.testing.assert_allclose(from_folder, from_checkpoint, rtol=0, atol=1e-3)


def test_a_folder_joins_an_ensemble_and_is_evaluated(folder, ema_checkpoint, image, tiny_data, tmp_path, capsys):
    assert main(["--predict", str(image), "--ckpt", str(folder), str(ema_checkpoint), "--out", str(tmp_path / "p"),
                 "--device", "cpu", "--amp", "off", "--quiet"]) == 0
    assert main(["--predict", str(image), "--ckpt", str(ema_checkpoint), "--out", str(tmp_path / "one"),
                 "--device", "cpu", "--amp", "off", "--quiet"]) == 0
    # The mean of two copies of one network is that network's depth.
    np.testing.assert_allclose(np.load(tmp_path / "p" / "scene.npy"), np.load(tmp_path / "one" / "scene.npy"),
                               rtol=0, atol=1e-5)
    assert main(["--eval", "--data-dir", tiny_data, "--ckpt", str(folder), "--out", str(tmp_path / "reports"),
                 "--workers", "0", "--quiet", "--metrics-out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # no run's folder to write the reports to
        main(["--eval", "--data-dir", tiny_data, "--ckpt", str(folder), "--quiet"])
    assert refused.value.code == 2 and "writes its reports to --out" in capsys.readouterr().err


def test_video_and_the_web_page_take_the_folder(folder, ema_checkpoint, image, tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    clip = tmp_path / "clip.mp4"
    with imageio.get_writer(str(clip), format="FFMPEG", fps=4, codec="libx264", macro_block_size=1,
                            ffmpeg_log_level="error") as writer:
        for seed in range(3):
            writer.append_data(make_pair(np.random.default_rng(seed), (48, 64))[0])
    for name, ckpt in (("folder", folder), ("checkpoint", ema_checkpoint)):
        assert main(["--predict", str(clip), "--ckpt", str(ckpt), "--out", str(tmp_path / name), "--npy", "--device",
                     "cpu", "--quiet"]) == 0
    stacks = [np.load(tmp_path / name / "clip_depth.npy") for name in ("folder", "checkpoint")]
    assert stacks[0].shape == (3, 48, 64)
    np.testing.assert_array_equal(stacks[0], stacks[1])

    import app

    page = app.DepthPage(app.parse_options(["--ckpt", str(folder), "--device", "cpu"]))
    try:
        shown = page.predict(np.array(Image.open(image).convert("RGB")))
    finally:
        page.close()
    assert main(["--predict", str(image), "--ckpt", str(folder), "--out", str(tmp_path / "image"), "--device", "cpu",
                 "--quiet"]) == 0
    np.testing.assert_array_equal(shown, np.load(tmp_path / "image" / "scene.npy"))


def test_a_hub_id_loads_from_huggingface_hubs_cache_offline(folder, tmp_path, offline):
    """The Hub's cache layout: models--OWNER--NAME/refs/main names a snapshot holding the files."""
    repo = tmp_path / "hub" / "models--someone--depth"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    net = DepthNet.from_pretrained("someone/depth", cache_dir=str(tmp_path / "hub"))
    assert_same_state(state_of(net), state_of(DepthNet.from_pretrained(folder)))


def test_an_unknown_hub_id_offline_is_one_line(offline, image, tmp_path, capsys):
    assert main(["--predict", str(image), "--ckpt", "nobody/no-such-model", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "nobody/no-such-model" in err and "Hugging Face Hub" in err
    assert "Traceback" not in err


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert is_hub_id("someone/depth-v1.2")
    assert not is_hub_id("runs/best.pt") and not is_hub_id("best.pt") and not is_hub_id("a/b/c")
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("owner/name")  # a local folder comes first
    assert not is_hub_id("owner/mistyped")  # a path into a local folder, not the Hub's owner of that name


def test_a_training_runs_folder_is_pointed_to_its_checkpoint(ema_checkpoint, image, tmp_path, capsys):
    run = os.path.dirname(ema_checkpoint)
    assert main(["--predict", str(image), "--ckpt", run, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "has no config.json and no model.safetensors" in err and str(ema_checkpoint) in err


def test_save_pretrained_round_trip_keeps_weights_and_input_size(tmp_path):
    net = DepthNet(weights=None, encoder="resnet18", skips=True, init_depth=4.0)
    net.save_pretrained(tmp_path / "m", input_size=[64, 96], depth_conventions={"max_depth": 80.0})
    loaded = DepthNet.from_pretrained(tmp_path / "m")
    assert loaded.model_args == net.model_args and loaded.input_size == [64, 96]
    assert loaded.depth_conventions.max_depth == 80.0
    assert_same_state(state_of(loaded), state_of(net))
    assert "records no training run" in (tmp_path / "m" / "README.md").read_text()


def test_push_to_hub_without_huggingface_hub_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(UserError, match="pip install -r requirements.txt"):
        DepthNet(weights=None, encoder="resnet18").push_to_hub("someone/depth")


# ------------------------------------------------------------------ damaged folders: one line each

def remove_a_tensor(path):
    state = load_file(path)
    state.pop("decoder.7.bias")
    save_file(state, path)


def add_a_tensor(path):
    save_file({**load_file(path), "decoder.9.weight": torch.zeros(3)}, path)


def reshape_a_tensor(path):
    save_file({**load_file(path), "decoder.7.weight": torch.zeros(1, 1, 3, 3)}, path)


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def another_architecture(path):
    with open(path, "w") as f:
        json.dump({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768}, f)


DAMAGE = {
    "no config.json": ("config.json", os.remove, "has no config.json"),
    "no model.safetensors": ("model.safetensors", os.remove, "has no model.safetensors"),
    "a tensor removed": ("model.safetensors", remove_a_tensor, "lacks 1 tensor(s)"),
    "a tensor added": ("model.safetensors", add_a_tensor, "decoder.9.weight"),
    "a tensor reshaped": ("model.safetensors", reshape_a_tensor, "another shape"),
    "a truncated model.safetensors": ("model.safetensors", truncate, "truncated or corrupt"),
    "a truncated config.json": ("config.json", truncate, "truncated or not JSON"),
    "a config of another architecture": ("config.json", another_architecture, "another architecture"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_folder_is_refused_in_one_line(damage, folder, image, tmp_path, capsys):
    name, spoil, needle = DAMAGE[damage]
    copy = tmp_path / "model"
    copy.mkdir()
    for f in os.listdir(folder):
        (copy / f).write_bytes((folder / f).read_bytes())
    spoil(str(copy / name))
    assert main(["--predict", str(image), "--ckpt", str(copy), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err and name in err
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_pretrained(copy)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_importing_the_model_and_predict_path_loads_no_hub_client_or_pyplot():
    code = ("import sys, model, predict, inference, pretrained; "
            "print(sorted(m for m in ('huggingface_hub', 'matplotlib.pyplot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ the whole flow, as a user runs it

BLOCKED_MAIN = """import socket, sys, runpy
def refuse(*args, **kwargs):
    raise OSError("the network is blocked")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_short_ema_run_exported_predicts_the_same_depth_with_the_network_blocked(tiny_data, image, tmp_path):
    run = train_tiny_run(tiny_data, tmp_path / "run", "--encoder", "resnet18", "--ema", "0.9", "--vis-every", "0",
                         "--max-steps", "2", "--eval-every", "0")
    ckpt, out = run / "last.pt", tmp_path / "model"
    assert main(["--export", "pretrained", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    env = {**SUBPROCESS_ENV, "HF_HUB_OFFLINE": "1"}
    depths = []
    for name, source in (("folder", out), ("checkpoint", ckpt)):
        subprocess.run([sys.executable, "-c", BLOCKED_MAIN, "--predict", str(image), "--ckpt", str(source), "--out",
                        str(tmp_path / name), "--device", "cpu", "--quiet"], cwd=REPO, env=env, check=True)
        depths.append(np.load(tmp_path / name / "scene.npy"))
    np.testing.assert_allclose(depths[0], depths[1], rtol=0, atol=1e-3)
    remove_a_tensor(str(out / "model.safetensors"))
    done = subprocess.run([sys.executable, "-c", BLOCKED_MAIN, "--predict", str(image), "--ckpt", str(out), "--out",
                           str(tmp_path / "refused"), "--device", "cpu", "--quiet"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "lacks 1 tensor(s)" in done.stderr
