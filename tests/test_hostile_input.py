"""One list of bad files, fed to every surface that reads pictures: the data loader, --predict on a file,
on a folder and on a video, and the web page. Each ends in a one-line error or a correct result, with
nothing half-written, and the page goes on serving. Then the page's limits, stops, and one run per folder."""
import io
import os
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import app
import main
from conftest import make_pair
from dataset import MAX_PIXELS, DataError, DepthEstimationUnreal, read_picture, read_rgb

GOOD = (30, 40)  # H, W of the good pictures here


def png_header_claiming(width, height):
    """A PNG that is only a header saying width × height pixels: a few bytes that would decode to gigabytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_bad_files(folder):
    """{case: (path, expected (H, W) of a correct result, or None for a one-line error)} in `folder`."""
    os.makedirs(folder, exist_ok=True)
    rgb, _ = make_pair(np.random.default_rng(0), GOOD)
    photo = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": a phone photo taken upright
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    contents = {
        "zero_bytes.jpg": (b"", None),
        "truncated_jpeg.jpg": (encoded(photo, "JPEG", quality=95)[:300], None),
        "truncated_png.png": (encoded(photo, "PNG")[:100], None),
        "text.png": (b"this is a text file, not a picture\n", None),
        "huge_header.png": (png_header_claiming(50000, 50000), None),
        "one_pixel.png": (encoded(Image.new("RGB", (1, 1), "green"), "PNG"), (1, 1)),
        "cmyk.jpg": (encoded(Image.new("CMYK", (40, 30), (0, 128, 128, 0)), "JPEG"), GOOD),
        "sixteen_bit.png": (encoded(Image.fromarray(np.full(GOOD, 40000, np.uint16)), "PNG"), GOOD),
        "animated.gif": (encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), None),
        "rotated.jpg": (encoded(photo, "JPEG", exif=exif), (GOOD[1], GOOD[0])),
        "drawing.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", None),
    }
    cases = {}
    for name, (data, expected) in contents.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        cases[name] = (path, expected)
    os.mkdir(os.path.join(folder, "folder.jpg"))
    cases["folder.jpg"] = (os.path.join(folder, "folder.jpg"), None)
    os.symlink(os.path.join(folder, "gone.jpg"), os.path.join(folder, "dangling.jpg"))
    cases["dangling.jpg"] = (os.path.join(folder, "dangling.jpg"), None)
    return cases


CASES = sorted(["zero_bytes.jpg", "truncated_jpeg.jpg", "truncated_png.png", "text.png", "huge_header.png",
                "one_pixel.png", "cmyk.jpg", "sixteen_bit.png", "animated.gif", "rotated.jpg", "drawing.eps",
                "folder.jpg", "dangling.jpg"])


def copy_case(path, target):
    """A case under another name: a folder stays a folder, a dangling symlink a dangling symlink."""
    if os.path.isdir(path):
        os.mkdir(target)
    elif os.path.islink(path):
        os.symlink(os.readlink(path), target)
    else:
        target.write_bytes(open(path, "rb").read())
    return target


def one_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in text


def leftovers(folder):
    """Temporary files a writer left behind."""
    return [n for n in os.listdir(folder) if ".tmp" in n] if os.path.isdir(folder) else []


def run(capsys, *args):
    try:
        code = main.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_bad_files(str(tmp_path_factory.mktemp("bad")))


@pytest.fixture(scope="module")
def page(checkpoint):
    opened = app.DepthPage(app.parse_options(["--ckpt", str(checkpoint), "--device", "cpu"]))
    yield opened
    opened.close()


def test_the_list_holds_every_case(bad_files):
    assert sorted(bad_files) == CASES and len(CASES) == 13


@pytest.mark.parametrize("case", CASES)
def test_data_loader(case, bad_files, tmp_path):
    path, expected = bad_files[case]
    root = tmp_path / "data"
    os.makedirs(root / "rgb" / "train")
    os.makedirs(root / "depth" / "train")
    ext = os.path.splitext(case)[1]
    copy_case(path, root / "rgb" / "train" / f"0{ext}")
    np.save(root / "depth" / "train" / "0.npy", np.full(expected or GOOD, 5.0, np.float32))
    if expected is None:
        with pytest.raises(DataError) as caught:
            DepthEstimationUnreal(str(root), "train", size=32)
        assert one_line(str(caught.value))
    else:
        rgb, depth = DepthEstimationUnreal(str(root), "train", size=32)[0]
        assert rgb.shape == (3, 32, 32) and depth.shape == (1, 32, 32)


@pytest.mark.parametrize("case", CASES)
def test_predict_on_a_file(case, bad_files, checkpoint, tmp_path, capsys):
    path, expected = bad_files[case]
    out = tmp_path / "out"
    code, streams = run(capsys, "--predict", path, "--ckpt", checkpoint, "--out", out, "--device", "cpu", "--quiet",
                        "--workers", "0")
    stem = os.path.splitext(case)[0]
    if expected is None:
        assert code == 1 and one_line(streams.err), streams.err
        assert not (out / f"{stem}.npy").exists() and not (out / f"{stem}.png").exists()
    else:
        assert code == 0, streams.err
        assert np.load(out / f"{stem}.npy").shape == expected
    assert leftovers(out) == []


def test_predict_on_a_folder_of_every_case(bad_files, checkpoint, tmp_path, capsys):
    """The readable ones are predicted at their own size; each unreadable one is one 'skipped:' line."""
    folder = os.path.dirname(next(iter(bad_files.values()))[0])
    out = tmp_path / "out"
    code, streams = run(capsys, "--predict", folder, "--ckpt", checkpoint, "--out", out, "--device", "cpu", "--quiet",
                        "--workers", "0")
    listed = [c for c in CASES if os.path.splitext(c)[1] in (".jpg", ".png") and os.path.isfile(bad_files[c][0])]
    unreadable = [c for c in listed if bad_files[c][1] is None]
    assert code == 1 and f"{len(unreadable)} of {len(listed)} image(s) could not be read" in streams.err
    skipped = [line for line in streams.err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == len(unreadable) and all(any(c in line for line in skipped) for c in unreadable)
    for case in listed:
        stem = os.path.splitext(case)[0]
        written = out / f"{stem}.npy"
        assert written.exists() == (bad_files[case][1] is not None), case
        if written.exists():
            assert np.load(written).shape == bad_files[case][1]
    assert leftovers(out) == []


@pytest.mark.parametrize("case", CASES)
def test_predict_on_a_video(case, bad_files, checkpoint, tmp_path, capsys):
    """Each case, renamed as a clip: a one-line error and no output, or (what ffmpeg reads as frames: the
    animated GIF) a whole clip of depth."""
    pytest.importorskip("imageio_ffmpeg", reason="needs: pip install -r requirements-video.txt")
    path, _ = bad_files[case]
    clip = copy_case(path, tmp_path / "clip.mp4")
    out = tmp_path / "out"
    code, streams = run(capsys, "--predict", clip, "--ckpt", checkpoint, "--out", out, "--device", "cpu", "--quiet")
    if code == 0:
        assert "frame(s)" in streams.out and (out / "clip_depth.mp4").stat().st_size > 0
    else:
        assert code == 1 and one_line(streams.err), streams.err
        assert not (out / "clip_depth.mp4").exists()
    assert leftovers(out) == []


def test_a_video_with_frames_over_the_pixel_limit_is_refused_before_decoding(checkpoint, tmp_path, capsys):
    imageio = pytest.importorskip("imageio.v2", reason="needs: pip install -r requirements-video.txt")
    pytest.importorskip("imageio_ffmpeg", reason="needs: pip install -r requirements-video.txt")
    clip = tmp_path / "clip.mp4"
    imageio.mimwrite(clip, [np.zeros((64, 96, 3), np.uint8)] * 3, fps=5, macro_block_size=1)
    code, streams = run(capsys, "--predict", clip, "--ckpt", checkpoint, "--out", tmp_path / "out", "--device", "cpu",
                        "--quiet", "--max-pixels", "5000")
    assert code == 1 and one_line(streams.err) and "96 × 64 pixels" in streams.err and "--max-pixels" in streams.err


@pytest.mark.parametrize("case", CASES)
def test_the_page(case, bad_files, page):
    path, expected = bad_files[case]
    picture, text, view, files, state = page.on_photo(path, 90.0)
    if expected is None:
        assert (picture, view, files, state) == (None, None, None, None)
        assert text.startswith(f"**Could not read {case}**") and "Upload a JPEG or PNG photo" in text
        assert os.path.dirname(path) not in text  # the server's paths stay on the server
    else:
        assert state["depth"].shape == expected and os.path.isfile(picture)
    good = page.on_photo(bad_files["cmyk.jpg"][0], 90.0)  # and the page goes on serving
    assert good[4]["depth"].shape == GOOD


def test_pillows_own_warning_never_leaks(bad_files, recwarn):
    with pytest.raises(DataError, match="claims 2500 MP, more than the 16.8 MP allowed"):
        read_rgb(bad_files["huge_header.png"][0])
    with pytest.raises(DataError, match="more than the 10 pixels allowed"):
        read_rgb(bad_files["cmyk.jpg"][0], max_pixels=10)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
    assert MAX_PIXELS == 4096 * 4096


def test_the_pages_point_cloud_download_is_capped(page, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "PLY_POINTS", 300)
    rgb, _ = make_pair(np.random.default_rng(1), (60, 80))
    photo = tmp_path / "big.png"
    Image.fromarray(rgb).save(photo)
    _, _, _, files, _ = page.on_photo(str(photo), 90.0)
    ply = next(f for f in files if f.endswith(".ply"))
    with open(ply, "rb") as f:
        header = f.read(400).split(b"end_header")[0].decode("ascii")
    vertices = int(header.split("element vertex ")[1].split()[0])
    assert vertices == 15 * 20  # every 4th pixel of every 4th row: the fewest steps that stay within 300


# ------------------------------------------------------------------ one run per folder, stops
def train_args(data, run, *extra):
    return ["--data-dir", data, "--run-dir", run, "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--amp", "off", "--quiet", "--device", "cpu", "--vis-every", "1", *extra]


def test_a_fresh_run_in_a_folder_with_another_runs_checkpoint_is_refused(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _ = run(capsys, *train_args(tiny_data, run_dir, "--max-steps", "2", "--eval-every", "0"))
    assert code == 0 and (run_dir / "last.pt").exists()
    code, streams = run(capsys, *train_args(tiny_data, run_dir, "--max-steps", "1", "--eval-every", "0"))
    assert code == 1 and one_line(streams.err)
    assert f"--resume {run_dir / 'last.pt'}" in streams.err and "--run-dir" in streams.err


def test_a_fresh_run_removes_an_earlier_runs_logs_so_curves_never_mix(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "vis")
    (run_dir / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n')
    (run_dir / "vis" / "train_step000004.png").write_bytes(b"old")
    (run_dir / "notes.txt").write_text("mine")
    code, streams = run(capsys, *train_args(tiny_data, run_dir, "--max-steps", "2", "--eval-every", "0",
                                            "--log-every", "1"))
    assert code == 0 and "removed an earlier run's train_log.jsonl, vis" in streams.out
    steps = [int(line.split(":")[1].split(",")[0]) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(os.listdir(run_dir / "vis")) == ["train_step000001.png", "train_step000002.png"]
    assert (run_dir / "notes.txt").read_text() == "mine"  # nothing but a run's own files is touched


@pytest.mark.slow
def test_a_second_demo_starts_clean(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "demo"
    args = ["--demo", "--data-dir", tiny_data, "--run-dir", run_dir, "--image-size", "32", "--demo-steps", "2",
            "--batch-size", "4", "--workers", "0", "--quiet", "--device", "cpu"]
    assert run(capsys, *args)[0] == 0
    code, streams = run(capsys, *args)
    assert code == 0 and "removed an earlier run's" in streams.out
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 1  # step 1's, of this demo only


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_demo_stops_there_with_the_signals_status(tiny_data, tmp_path, capsys, monkeypatch, signum):
    import train

    fit = train.Trainer.fit

    def stopped_fit(self):
        self._stop.signal = signal.Signals(signum).name  # as if the signal came before the first step
        return fit(self)

    monkeypatch.setattr(train.Trainer, "fit", stopped_fit)
    run_dir = tmp_path / "demo"
    code, streams = run(capsys, "--demo", "--data-dir", tiny_data, "--run-dir", run_dir, "--image-size", "32",
                        "--demo-steps", "2", "--batch-size", "4", "--workers", "0", "--quiet", "--device", "cpu")
    assert code == 128 + signum
    assert not (run_dir / "demo_results.json").exists() and not (run_dir / "demo_results.md").exists()
    assert "constant mean" not in streams.out  # no baselines fitted, nothing scored


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_predict_on_a_folder_stops_at_a_signal_with_its_status(tiny_data, checkpoint, tmp_path, capsys,
                                                               monkeypatch, signum):
    import predict

    writes = []
    real = predict.write_outputs

    def write_then_signal(*args, **kwargs):
        real(*args, **kwargs)
        writes.append(1)
        if len(writes) == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(predict, "write_outputs", write_then_signal)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = tmp_path / "out"
        code, streams = run(capsys, "--predict", os.path.join(tiny_data, "rgb", "train"), "--ckpt", checkpoint,
                            "--out", out, "--device", "cpu", "--quiet", "--workers", "0", "--batch-size", "1")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 128 + signum and "interrupted" in streams.err
    assert len(writes) == 2 and len(list(out.glob("*.npy"))) == 2 and leftovers(out) == []


def test_an_unwritable_run_dir_is_reported_before_any_data_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, streams = run(capsys, *train_args(str(tmp_path / "no_data_here"), blocker / "run", "--max-steps", "1"))
    assert code == 1 and one_line(streams.err) and "cannot write to run directory" in streams.err
    assert str(blocker / "run") in streams.err and "--run-dir" in streams.err  # the folder, and the option to change


def test_misleading_errors_name_what_was_typed(checkpoint, tiny_data, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    code, streams = run(capsys, "--eval", "--ckpt", checkpoint, "--data-dir", tiny_data, "--metrics-out", folder,
                        "--no-report", "--quiet", "--workers", "0")
    assert code == 1 and one_line(streams.err) and f"{folder} is a folder" in streams.err and ".tmp" not in streams.err
    exported = tmp_path / "model.torchscript.pt"
    assert run(capsys, "--export", "torchscript", "--ckpt", checkpoint, "--out", exported)[0] == 0
    code, streams = run(capsys, "--eval", "--ckpt", exported, "--data-dir", tiny_data)
    assert code == 1 and "is a TorchScript model" in streams.err and "corrupt" not in streams.err
    code, streams = run(capsys, "--export", "torchscript", "--ckpt", checkpoint, "--out", folder)
    assert code == 1 and f"{folder} is a folder" in streams.err


def test_a_fresh_clone_without_data_is_told_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, streams = run(capsys, "--device", "cpu")
    assert code == 1 and one_line(streams.err) and "python get_data.py" in streams.err
    assert "synthetic.py --out data/DepthEstimationUnreal" not in streams.err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_predict_on_a_video_stops_at_a_signal_with_nothing_half_written(checkpoint, tmp_path, capsys, monkeypatch,
                                                                       signum):
    imageio = pytest.importorskip("imageio.v2", reason="needs: pip install -r requirements-video.txt")
    pytest.importorskip("imageio_ffmpeg", reason="needs: pip install -r requirements-video.txt")
    import video

    clip = tmp_path / "clip.mp4"
    imageio.mimwrite(clip, [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(8)], fps=5, macro_block_size=1)
    frames = []
    real = video.side_by_side

    def side_by_side_then_signal(*args):
        frames.append(1)
        if len(frames) == 3:
            os.kill(os.getpid(), signum)
        return real(*args)

    monkeypatch.setattr(video, "side_by_side", side_by_side_then_signal)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = tmp_path / "out"
        code, streams = run(capsys, "--predict", clip, "--ckpt", checkpoint, "--out", out, "--device", "cpu",
                            "--quiet", "--npy", "--batch-size", "2")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 128 + signum and "interrupted" in streams.err and len(frames) == 3
    assert os.listdir(out) == []  # no clip_depth.mp4, no .npy, no temporary file


# ------------------------------------------------------------------ a phone's photo, and the bomb
PHONE = (60, 80)  # H, W as stored; the EXIF turns it a quarter, so it shows 80 high and 60 wide
BUDGET = 3000  # --max-pixels: the photo's 4800 pixels fit at 1/2 (40 × 30)


@pytest.fixture(scope="module")
def phone_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phone")
    rgb, _ = make_pair(np.random.default_rng(2), PHONE)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=95, exif=exif)
    Image.fromarray(rgb).save(folder / "photo.png")
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")  # 144 MP of one bit: 17 kB on disk
    return folder


def test_a_jpeg_over_the_budget_is_decoded_at_a_half_and_gives_the_photos_size(phone_files):
    small, shown = read_picture(str(phone_files / "photo.jpg"), BUDGET, draft=True)
    assert shown == (80, 60) and small.shape == (40, 30, 3)
    full = read_rgb(str(phone_files / "photo.jpg"))
    # What the JPEG decoder makes at 1/2 is close to the full picture averaged over 2 × 2 blocks.
    blocks = full.reshape(40, 2, 30, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(small - blocks).mean() < 6
    # Data is never drafted: over the budget it is refused, within it the same pixels as ever.
    with pytest.raises(DataError, match="more than the 3000 pixels allowed"):
        read_rgb(str(phone_files / "photo.jpg"), BUDGET)
    assert np.array_equal(read_picture(str(phone_files / "photo.jpg"), draft=True)[0], full)


def test_a_jpeg_beyond_an_eighth_of_the_budget_is_still_refused(phone_files):
    with pytest.raises(DataError, match=r"more than the 50 pixels allowed even decoded at 1/8 of its size"):
        read_picture(str(phone_files / "photo.jpg"), 50, draft=True)


def test_predict_writes_a_drafted_photos_depth_at_its_own_size(phone_files, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code, streams = run(capsys, "--predict", phone_files / "photo.jpg", "--ckpt", checkpoint, "--out", out,
                        "--device", "cpu", "--quiet", "--max-pixels", BUDGET, "--png16", "--ply")
    assert code == 0, streams.err
    depth = np.load(out / "photo.npy")
    assert depth.shape == (80, 60) and depth.dtype == np.float32
    assert Image.open(out / "photo.png").size == (60, 80) and Image.open(out / "photo_mm.png").size == (60, 80)
    with open(out / "photo.ply", "rb") as f:
        header = f.read(400).split(b"end_header")[0].decode("ascii")
    assert int(header.split("element vertex ")[1].split()[0]) == int((depth > 0).sum())


@pytest.mark.parametrize("name", ["photo.png", "bomb.png"])
def test_pngs_keep_the_budget_on_every_surface(name, phone_files, checkpoint, tmp_path, capsys):
    budget = BUDGET if name == "photo.png" else MAX_PIXELS
    code, streams = run(capsys, "--predict", phone_files / name, "--ckpt", checkpoint, "--out", tmp_path / "out",
                        "--device", "cpu", "--quiet", "--max-pixels", budget)
    assert code == 1 and one_line(streams.err) and "--max-pixels" in streams.err, streams.err
    page = app.DepthPage(app.parse_options(["--ckpt", str(checkpoint), "--device", "cpu",
                                            "--max-pixels", str(budget)]))
    try:
        picture, text, *_ = page.on_photo(str(phone_files / name), 90.0)
        assert picture is None and "more than the" in text
        photo = page.on_photo(str(phone_files / "photo.jpg"), 90.0)  # a phone's JPEG over the budget works
        assert photo[4]["depth"].shape == (80, 60) and os.path.isfile(photo[0])
    finally:
        page.close()
