"""--predict on a video: NAME_depth.mp4 (RGB | depth) and --npy's float16 stack, checked against --predict on frames."""
import numpy as np
import pytest
from PIL import Image

from conftest import make_pair
from main import main
from plots import colorize_depth

imageio = pytest.importorskip("imageio.v2")
pytest.importorskip("imageio_ffmpeg")

FRAMES, HEIGHT, WIDTH = 10, 48, 64


def decode(path):
    """Every frame of a video, as imageio's ffmpeg reader (the one video.py uses) decodes it."""
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return [np.asarray(frame) for frame in reader]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 10-frame H.264 clip of synthetic scenes."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    rng = np.random.default_rng(0)
    with imageio.get_writer(str(path), format="FFMPEG", fps=8, codec="libx264", macro_block_size=1,
                            ffmpeg_log_level="error") as writer:
        for _ in range(FRAMES):
            writer.append_data(make_pair(rng, (HEIGHT, WIDTH))[0])
    return path


def test_video_depth_matches_predict_on_its_frames(clip, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["--predict", str(clip), "--ckpt", str(tiny_checkpoint), "--out", str(out), "--npy",
                 "--batch-size", "4", "--workers", "0", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip_depth.mp4", "clip_depth.npy"]

    # The clip is lossy: the reference is --predict on the frames as decoded, saved losslessly.
    frames = decode(clip)
    assert len(frames) == FRAMES
    frame_dir = tmp_path / "frames"
    frame_dir.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(frame_dir / f"{i}.png")
    assert main(["--predict", str(frame_dir), "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "ref"),
                 "--workers", "0", "--quiet"]) == 0
    expected = np.stack([np.load(tmp_path / "ref" / f"{i}.npy") for i in range(FRAMES)])

    stack = np.load(out / "clip_depth.npy")
    assert stack.dtype == np.float16 and stack.shape == (FRAMES, HEIGHT, WIDTH)
    np.testing.assert_allclose(stack.astype(np.float32), expected, rtol=1e-3, atol=1e-3)  # float16's precision
    assert expected.std(axis=(1, 2)).min() > 0  # a depth map per frame, not one constant

    written = decode(out / "clip_depth.mp4")
    assert len(written) == FRAMES and written[0].shape == (HEIGHT, 2 * WIDTH, 3)
    for frame, depth, shown in zip(frames, expected, written):
        colours = colorize_depth(depth, 0.0, 20.0, "magma")  # the fixed scale of --predict's PNGs, in every frame
        # H.264 again: close, not equal (a colour scale per frame would be off by far more)
        assert np.abs(shown[:, :WIDTH].astype(int) - frame).mean() < 3
        assert np.abs(shown[:, WIDTH:].astype(int) - colours).mean() < 3


def test_unreadable_video_is_a_one_line_error_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video" * 100)
    out = tmp_path / "out"
    assert main(["--predict", str(bad), "--ckpt", str(tiny_checkpoint), "--out", str(out), "--npy", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read video {bad}") and err.count("\n") == 1
    assert not out.exists()


def test_image_only_options_are_refused_for_a_video(clip, tiny_checkpoint, tmp_path, capsys):
    assert main(["--predict", str(clip), "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path), "--ply"]) == 1
    assert "--png16 and --ply are for images" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_odd_frame_heights_gain_a_row_for_h264():
    from video import side_by_side

    frame = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    pair = side_by_side(frame, np.full((5, 4), 10.0, np.float32), 20.0, "magma")
    assert pair.shape == (6, 8, 3)
    np.testing.assert_array_equal(pair[:5, :4], frame)
    np.testing.assert_array_equal(pair[5], pair[4])
