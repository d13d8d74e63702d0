"""Every kind of bad input ends in one `error:` line that names the file or option, never a traceback.

Most cases call main.main() in this process (fast: no interpreter start); a few run the real
command line to show that the whole of stderr is that one line, even with DataLoader workers.
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main
from checkpoint import load_checkpoint, save_checkpoint
from conftest import REPO
from dataset import DataError, DepthEstimationUnreal
from model import DepthNet
from utils import CheckpointError, user_error_message

SIZE = (48, 64)  # native H, W of the tiny files: any size works, the dataset resizes


def write_pair(root, split, stem, size=SIZE, seed=0):
    """One RGB JPEG and its depth .npy, related as in the real data (near is dark)."""
    rng = np.random.default_rng(seed)
    depth = rng.uniform(1.0, 30.0, size).astype(np.float32)
    rgb = np.repeat((np.clip(depth, 0, 20) / 20 * 255).astype(np.uint8)[..., None], 3, axis=2)
    os.makedirs(os.path.join(root, "rgb", split), exist_ok=True)
    os.makedirs(os.path.join(root, "depth", split), exist_ok=True)
    rgb_path = os.path.join(root, "rgb", split, f"{stem}.jpeg")
    depth_path = os.path.join(root, "depth", split, f"{stem}.npy")
    Image.fromarray(rgb).save(rgb_path, quality=95)
    np.save(depth_path, depth)
    return rgb_path, depth_path


def write_dataset(root, n_train=4, n_val=2):
    root = str(root)
    for i in range(n_train):
        write_pair(root, "train", str(i), seed=i)
    for i in range(n_val):
        write_pair(root, "val", str(i), seed=100 + i)
    return root


def run_main(capsys, *args):
    """main.main(args) → (exit code, stderr); argparse's exits count as exit codes."""
    try:
        code = main.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_error_line(code, stderr, *needles):
    """A non-zero exit, exactly one `error:` line holding every needle, and no traceback."""
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert str(needle) in errors[0], errors[0]
    return errors[0]


def train_args(data, tmp_path, *extra):
    return ["--data-dir", data, "--run-dir", tmp_path / "run", "--weights", "none", "--device", "cpu",
            "--workers", "0", "--batch-size", "2", "--image-size", "64", "--max-steps", "1", "--eval-every", "0",
            "--vis-every", "0", "--quiet", *extra]


def save_trained_like_checkpoint(path, model_state):
    """A checkpoint with this project's keys around `model_state` (no training needed)."""
    save_checkpoint({"model": model_state, "init_depth": 5.0, "config": {}, "metrics": {}}, str(path))


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data")


# ------------------------------------------------------------------------------ data on disk
def test_missing_data_directory(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, err = run_main(capsys, *train_args(missing, tmp_path))
    assert_one_error_line(code, err, os.path.join(str(missing), "rgb", "train"), "--data-dir")


def test_empty_split(capsys, tmp_path, data):
    for kind in ("rgb", "depth"):
        for name in os.listdir(os.path.join(data, kind, "train")):
            os.remove(os.path.join(data, kind, "train", name))
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, "'train' is empty", os.path.join(data, "rgb", "train"))


def test_unpaired_files(capsys, tmp_path, data):
    os.remove(os.path.join(data, "depth", "train", "2.npy"))
    os.remove(os.path.join(data, "rgb", "train", "3.jpeg"))
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, "unpaired", "1 RGB without depth (2)", "1 depth without RGB (3)")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_jpeg(capsys, tmp_path, data, damage):
    path = os.path.join(data, "rgb", "train", "1.jpeg")
    content = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2] if damage == "truncated" else os.urandom(len(content)))
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, "cannot read image", path)



def test_demo_with_a_damaged_first_training_image(capsys, tmp_path, data):
    """--demo reads the first training image for its input shape, before training starts: the same one line."""
    path = os.path.join(data, "rgb", "train", "0.jpeg")
    with open(path, "wb") as f:
        f.write(b"not a picture")
    run_dir = tmp_path / "run"
    code, err = run_main(capsys, "--demo", "--data-dir", data, "--device", "cpu", "--run-dir", run_dir, "--quiet")
    assert_one_error_line(code, err, path)
    assert not run_dir.exists()


@pytest.mark.parametrize("array, expected", [
    (np.zeros((48, 64, 3), np.float32), "shape (48, 64, 3)"),
    (np.zeros(48 * 64, np.float32), "shape (3072,)"),
    (np.zeros((48, 64), np.complex64), "dtype complex64"),
    (np.zeros((48, 64), bool), "dtype bool"),
    (np.array([{"depth": 1}], dtype=object), "holds Python objects, not numbers"),
])
def test_depth_of_wrong_shape_or_dtype(capsys, tmp_path, data, array, expected):
    path = os.path.join(data, "depth", "train", "2.npy")
    np.save(path, array, allow_pickle=True)
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, path, expected)


def test_truncated_depth_file(capsys, tmp_path, data):
    path = os.path.join(data, "depth", "train", "0.npy")
    content = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(content[:200])
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, "cannot read depth", path)


@pytest.mark.parametrize("content, expected", [
    (b"", "is not a NumPy .npy file (empty)"),
    (b"1.0 2.0\n3.0 4.0\n", "is not a NumPy .npy file (no .npy header)"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "is not a NumPy .npy file (no .npy header)"),
    (pickle.dumps([[1.0, 2.0]]), "is not a NumPy .npy file"),
    (b"PK\x03\x04" + b"\0" * 40, "is an .npz archive"),
])
def test_a_file_that_is_not_npy_is_said_so(capsys, tmp_path, data, content, expected):
    path = os.path.join(data, "depth", "train", "1.npy")
    with open(path, "wb") as f:
        f.write(content)
    code, err = run_main(capsys, *train_args(data, tmp_path))
    line = assert_one_error_line(code, err, path, expected)
    assert "allow_pickle" not in line


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_integer_npy_depth_is_read_as_a_16_bit_png_is(capsys, tmp_path, data, good_checkpoint, dtype):
    """Millimetres as integers give the figures of the same depth in metres, not depths clipped at the maximum."""
    def metrics():
        out = tmp_path / "m.json"
        code, err = run_main(capsys, "--eval", "--ckpt", good_checkpoint, "--data-dir", data, "--split", "val",
                             "--workers", "0", "--no-report", "--metrics-out", out, "--device", "cpu", "--quiet")
        assert code == 0, err
        return json.loads(out.read_text())

    paths = [os.path.join(data, "depth", "val", f"{i}.npy") for i in range(2)]
    millimetres = [np.round(np.load(p) * 1000) for p in paths]
    for p, mm in zip(paths, millimetres):
        np.save(p, (mm / 1000).astype(np.float32))  # metres that millimetres hold exactly
    in_metres = metrics()
    for p, mm in zip(paths, millimetres):
        np.save(p, mm.astype(dtype))
    in_millimetres = metrics()
    assert in_millimetres["rmse"] == pytest.approx(in_metres["rmse"], rel=1e-6)
    assert in_millimetres["abs_rel"] == pytest.approx(in_metres["abs_rel"], rel=1e-6)


def test_a_folder_and_a_symbolic_link_loop_are_named_as_such(capsys, tmp_path, data):
    os.makedirs(os.path.join(data, "rgb", "train", "9.jpeg"))
    write_pair(str(tmp_path / "spare"), "train", "9")
    os.replace(str(tmp_path / "spare" / "depth" / "train" / "9.npy"), os.path.join(data, "depth", "train", "9.npy"))
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, os.path.join(data, "rgb", "train", "9.jpeg"), "it is a folder, not a file")

    os.rmdir(os.path.join(data, "rgb", "train", "9.jpeg"))
    write_pair(str(tmp_path / "spare"), "train", "9")
    os.replace(str(tmp_path / "spare" / "rgb" / "train" / "9.jpeg"), os.path.join(data, "rgb", "train", "9.jpeg"))
    loop = os.path.join(data, "depth", "train", "9.npy")
    os.remove(loop)
    os.symlink(loop, loop)
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, loop, "symbolic link that leads back to itself")
    assert not (tmp_path / "run").exists()  # a run that fails before its first step leaves no folder


def damage_cache(folder, damage):
    """One of the ways a cache folder can hold what the cache did not write."""
    if damage == "a list as meta.json":
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump([1, 2, 3], f)
    elif damage == "an object array":
        np.save(os.path.join(folder, "rgb.npy"), np.array([np.zeros(2), "x"], dtype=object), allow_pickle=True)
    else:  # half the samples
        for name in ("rgb.npy", "depth.npy"):
            array = np.load(os.path.join(folder, name))
            np.save(os.path.join(folder, name), array[: len(array) // 2])


@pytest.mark.parametrize("damage", ["a list as meta.json", "an object array", "half the samples"])
def test_a_malformed_cache_is_a_warning_then_rebuilt(capsys, tmp_path, data, damage):
    assert run_main(capsys, *train_args(data, tmp_path))[0] == 0
    (folder,) = [os.path.join(data, ".cache", n) for n in os.listdir(os.path.join(data, ".cache"))]
    damage_cache(folder, damage)
    with pytest.warns(UserWarning, match="is not usable .*; rebuilding it"):
        code, err = run_main(capsys, *train_args(data, tmp_path / "again"))
    assert code == 0 and "Traceback" not in err, err
    assert np.load(os.path.join(folder, "rgb.npy"), mmap_mode="r").shape[0] == 4  # rebuilt whole


def test_max_pixels_applies_with_a_cache(capsys, tmp_path, data):
    assert run_main(capsys, *train_args(data, tmp_path))[0] == 0
    code, err = run_main(capsys, *train_args(data, tmp_path / "again", "--max-pixels", "100"))
    assert_one_error_line(code, err, "more than the 100 pixels allowed", "--max-pixels")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_depth_is_rejected_not_masked(capsys, tmp_path, data, bad_value):
    """Decision (documented in dataset.py): NaN/inf depth rejects the file, naming it."""
    path = os.path.join(data, "depth", "val", "1.npy")
    depth = np.load(path)
    depth[10, 20] = bad_value
    np.save(path, depth)
    code, err = run_main(capsys, *train_args(data, tmp_path, "--eval-every", "1"))
    assert_one_error_line(code, err, path, "NaN or inf", "rejected")


def test_rgb_and_depth_sizes_disagree(capsys, tmp_path, data):
    rgb_path, depth_path = write_pair(data, "train", "1", size=(48, 64))
    np.save(depth_path, np.ones((40, 64), np.float32))
    code, err = run_main(capsys, *train_args(data, tmp_path))
    assert_one_error_line(code, err, rgb_path, depth_path, "64×48", "64×40")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_grayscale_rgba_and_palette_images_are_converted(data, mode):
    jpeg = os.path.join(data, "rgb", "train", "1.jpeg")
    png = os.path.join(data, "rgb", "train", "1.png")
    Image.open(jpeg).convert(mode).save(png)
    os.remove(jpeg)
    dataset = DepthEstimationUnreal(data, "train", size=64)
    rgb, depth = dataset[1]
    assert rgb.shape == (3, 64, 64) and depth.shape == (1, 64, 64)
    raw_rgb, _ = dataset.load_raw(1)
    assert raw_rgb.shape == (48, 64, 3) and raw_rgb.dtype == np.uint8
    np.testing.assert_array_equal(raw_rgb, np.asarray(Image.open(png).convert("RGB")))


def test_every_file_is_checked_when_a_split_is_opened(data):
    """Before any training: a bad file among good ones fails the dataset's constructor, in this process."""
    path = os.path.join(data, "rgb", "train", "2.jpeg")
    content = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(content[:-300])  # the header is intact: only a full decode notices
    with pytest.raises(DataError, match="cannot read image " + path):
        DepthEstimationUnreal(data, "train")
    assert len(DepthEstimationUnreal(data, "train", check=False)) == 4


def test_bad_file_is_reported_by_the_main_process_with_workers(tmp_path, data):
    """Real CLI, --workers 2: the whole of stderr is one line (no worker traceback)."""
    path = os.path.join(data, "rgb", "train", "3.jpeg")
    with open(path, "wb") as f:
        f.write(b"not a jpeg")
    args = [str(a) for a in train_args(data, tmp_path)]
    args[args.index("--workers") + 1] = "2"
    result = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: cannot read image ") and path in result.stderr


def test_error_raised_inside_a_worker_prints_only_our_message(data):
    """A file that goes bad after the up-front check fails in a worker; main.py still prints one line."""
    dataset = DepthEstimationUnreal(data, "train", size=64)
    path = os.path.join(data, "depth", "train", "2.npy")
    np.save(path, np.full((48, 64), np.nan, np.float32))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what torch hands back from the worker
    message = user_error_message(caught.value)
    assert message == f"depth {path} contains NaN or inf; such files are rejected, not masked: fix or remove it"


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--lr", "-0.001"], "--lr must be positive, got -0.001"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--workers", "-1"], "--workers must be zero or positive"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--demo", "--demo-train", "-1"], "--demo-train must be at least 1, got -1"),
    (["--demo", "--demo-val", "0"], "--demo-val must be at least 1, got 0"),
    (["--demo", "--demo-test", "0"], "--demo-test must be at least 1, got 0"),
    (["--demo", "--demo-steps", "0"], "--demo-steps must be at least 1, got 0"),
    (["--image-size", "48"], "--image-size must be a positive multiple of 32"),
    (["--lr", "0.01", "--max-lr", "0.005"], "--max-lr (0.005) must be at least --lr (0.01)"),
    (["--batch-size", "two"], "argument --batch-size/--batch_size: invalid int value: 'two'"),
    (["--eval"], "--eval needs --ckpt"),
    (["--max-depth", "inf"], "--max-depth must be a finite number, got inf"),
    (["--depth-scale", "inf"], "--depth-scale must be a finite number, got inf"),
    (["--min-depth", "-1"], "--min-depth must be at least 0, got -1"),
    (["--min-depth", "30"], "--min-depth (30.0) must be below --max-depth (20.0)"),
    (["--eval", "--ckpt", "a.pt", "./a.pt"], "--ckpt names ./a.pt more than once"),
    (["--is_train", "false"], "--eval needs --ckpt"),
])
def test_out_of_range_options(capsys, args, needle):
    code, err = run_main(capsys, *args)
    assert code == 2  # argparse's usage error: the usage line, then "PROG: error: ..."
    assert_one_error_line(code, err, needle)


# ------------------------------------------------------------------------------ checkpoints
def test_eval_with_missing_checkpoint(capsys, tmp_path, data):
    code, err = run_main(capsys, "--eval", "--ckpt", tmp_path / "none.pt", "--data-dir", data, "--workers", "0")
    assert_one_error_line(code, err, str(tmp_path / "none.pt"), "not found")


def test_checkpoint_of_another_architecture_names_the_keys(capsys, tmp_path, data):
    state = DepthNet(weights=None).state_dict()
    state["decoder.8.weight"] = state.pop("decoder.7.weight")  # one layer renamed: "another architecture"
    path = tmp_path / "other.pt"
    save_trained_like_checkpoint(path, state)
    code, err = run_main(capsys, "--eval", "--ckpt", path, "--data-dir", data, "--workers", "0")
    assert_one_error_line(code, err, str(path), "another architecture", "'decoder.7.weight'", "'decoder.8.weight'")


def test_checkpoint_with_other_layer_shapes(capsys, tmp_path, data):
    state = DepthNet(weights=None).state_dict()
    state["decoder.2.weight"] = torch.zeros(64, 128, 1, 1)
    path = tmp_path / "narrow.pt"
    save_trained_like_checkpoint(path, state)
    code, err = run_main(capsys, "--eval", "--ckpt", path, "--data-dir", data, "--workers", "0")
    assert_one_error_line(code, err, str(path), "size mismatch for decoder.2.weight")


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_trained_like_checkpoint(path, DepthNet(weights=None).state_dict())
    return path


@pytest.mark.parametrize("keep", [0, 10, 1000, 0.5, -200])
def test_truncated_checkpoint(capsys, tmp_path, data, good_checkpoint, keep):
    content = good_checkpoint.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(content[: int(len(content) * keep) if isinstance(keep, float) else keep])
    code, err = run_main(capsys, "--eval", "--ckpt", path, "--data-dir", data, "--workers", "0")
    assert_one_error_line(code, err, str(path), "truncated or corrupt")


def test_truncated_checkpoint_message_is_whole_sentences(capsys, tmp_path, data, good_checkpoint):
    content = good_checkpoint.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(content[: len(content) // 2])
    code, err = run_main(capsys, "--eval", "--ckpt", path, "--data-dir", data, "--workers", "0")
    line = assert_one_error_line(code, err, str(path), "truncated or corrupt")
    assert line.endswith("use another file (a run keeps both last.pt and best.pt)")
    assert "(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory)" in line


def test_eval_min_depth_beyond_the_checkpoints_range_is_an_option_problem(capsys, tmp_path, data, good_checkpoint):
    # The checkpoint was trained to 20 m, the default: --min-depth 25 passes the option checks alone.
    code, err = run_main(capsys, "--eval", "--ckpt", good_checkpoint, "--data-dir", data, "--workers", "0",
                         "--min-depth", "25", "--device", "cpu", "--no-report")
    line = assert_one_error_line(code, err, "--min-depth 25 must be below the maximum depth", str(good_checkpoint))
    assert "depth file" not in line


def test_eval_reports_into_a_read_only_folder_fail_before_the_evaluation(capsys, tmp_path, data, good_checkpoint,
                                                                        monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    import evaluate

    def never(*args, **kwargs):
        pytest.fail("the evaluation ran before the unwritable --out was found")

    monkeypatch.setattr(evaluate, "evaluate", never)
    code, err = run_main(capsys, "--eval", "--ckpt", good_checkpoint, "--data-dir", data, "--workers", "0",
                         "--out", blocker / "reports", "--device", "cpu")
    assert_one_error_line(code, err, str(blocker / "reports"), "--out")


def test_one_checkpoint_twice_is_refused_on_the_page(capsys):
    from app import parse_options

    with pytest.raises(SystemExit):
        parse_options(["--ckpt", "a.pt", "a.pt"])
    assert_one_error_line(2, capsys.readouterr().err, "--ckpt names a.pt more than once")


def test_text_file_as_checkpoint(capsys, tmp_path, data):
    path = tmp_path / "notes.pt"
    path.write_text("hello\n")
    code, err = run_main(capsys, "--eval", "--ckpt", path, "--data-dir", data, "--workers", "0")
    assert_one_error_line(code, err, str(path), "truncated or corrupt")


class CreatesMarker:
    """Unpickling this would run `touch MARKER`: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("mode", ["eval", "resume"])
def test_checkpoint_crafted_to_run_code_is_refused(capsys, recwarn, tmp_path, data, writer, mode):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"model": CreatesMarker(marker), "config": {}}
    with open(path, "wb") as f:
        pickle.dump(payload, f) if writer == "pickle" else torch.save(payload, f)
    args = ("--eval", "--ckpt", path) if mode == "eval" else ("--resume", path)
    code, err = run_main(capsys, *args, "--data-dir", data, "--workers", "0")
    line = assert_one_error_line(code, err, "refused to load", str(path))
    assert "GLOBAL posix.system" in line or "Unsupported operand" in line  # torch's reason, not its advice
    assert not recwarn.list, [str(w.message) for w in recwarn]  # no torch warning printed beside the error
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_resume_from_a_checkpoint_without_training_state(capsys, tmp_path, data, good_checkpoint):
    code, err = run_main(capsys, *train_args(data, tmp_path, "--resume", good_checkpoint))
    assert_one_error_line(code, err, str(good_checkpoint), "no training state", "optimizer")


def test_resume_from_a_missing_checkpoint(capsys, tmp_path, data):
    code, err = run_main(capsys, *train_args(data, tmp_path, "--resume", tmp_path / "gone" / "last.pt"))
    assert_one_error_line(code, err, str(tmp_path / "gone" / "last.pt"), "not found")


def test_truncated_encoder_weights_file(capsys, tmp_path, data):
    path = tmp_path / "resnet34.pth"
    path.write_bytes(b"PK\x03\x04 half a zip")
    args = train_args(data, tmp_path)
    args[args.index("--weights") + 1] = path
    code, err = run_main(capsys, *args)
    assert_one_error_line(code, err, str(path), "truncated or corrupt")
