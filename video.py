"""Depth of a video (--predict CLIP): NAME_depth.mp4, each frame and its colourised depth side by side,
and with --npy NAME_depth.npy, every frame's depth in metres as one float16 (frames, H, W) array.

Optional: needs imageio with imageio-ffmpeg (pip install -r requirements-video.txt), which
ships its own ffmpeg, so any video that ffmpeg reads works. Each frame is predicted exactly
as --predict predicts an image (inference.Predictor.depth_maps: the model's input size, the
prediction resized back to the frame's size and clamped to [0, max_depth]), in batches of
--batch-size. The clip is streamed: one batch of frames is in memory at a time, however
long the clip. The colour scale is the fixed [0, max_depth] of --predict's PNGs, so a
colour means the same distance in every frame (and in every clip and picture). Sound is
not copied.
"""
import contextlib
import math
import os
import shutil

import numpy as np
import torch
from tqdm import tqdm

from dataset import MAX_PIXELS, to_model_input
from plots import colorize_depth
from utils import UserError, atomic_path, make_output_folder, output_paths

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
INSTALL_HINT = "pip install -r requirements-video.txt"
QUALITY = 8  # imageio's 0-10 scale; 8 is libx264's -crf 10, close to lossless for depth colours


def is_video(path):
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def video_output_paths(video_path, out_dir):
    """{'mp4': NAME_depth.mp4, 'npy': NAME_depth.npy} in `out_dir` for input NAME.ext."""
    return output_paths(video_path, out_dir, {"mp4": "_depth.mp4", "npy": "_depth.npy"})


def import_imageio():
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio's FFMPEG plugin needs it; import it for a clear failure)
    except ImportError:
        raise UserError(f"--predict on a video needs imageio and imageio-ffmpeg: {INSTALL_HINT}") from None
    return imageio


def open_video(imageio, path, max_pixels=MAX_PIXELS):
    """(streaming frame reader, frames per second, estimated frame count or None) of a video file whose frames
    have at most max_pixels pixels (read from its header, before a frame is decoded)."""
    if not os.path.isfile(path):
        raise UserError(f"--predict {path}: no such file")
    try:
        reader = imageio.get_reader(path, format="FFMPEG")
        meta = reader.get_meta_data()
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot read video {path}: {str(err).strip().splitlines()[0]}") from None
    width, height = meta.get("size") or (0, 0)
    if width * height > max_pixels:
        reader.close()
        raise UserError(f"{path} has frames of {width} × {height} pixels ({width * height / 1e6:.1f} MP), more than "
                        f"--max-pixels {max_pixels} allows: downscale the video, or raise --max-pixels")
    fps = float(meta.get("fps") or 0) or 25.0
    duration = meta.get("duration")
    estimate = round(duration * fps) if duration and math.isfinite(duration) else None
    return reader, fps, estimate


def frame_batches(reader, batch_size, path):
    """The reader's HWC uint8 frames in lists of `batch_size`; a decoding failure is a UserError."""
    batch = []
    try:
        for frame in reader:
            batch.append(np.ascontiguousarray(frame[..., :3]))
            if len(batch) == batch_size:
                yield batch
                batch = []
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot decode video {path}: {str(err).strip().splitlines()[0]}") from None
    if batch:
        yield batch


def side_by_side(frame, depth, max_depth, cmap):
    """RGB | colourised depth, padded by a repeated last row to an even height (H.264 needs even sides)."""
    pair = np.concatenate([frame, colorize_depth(depth, 0.0, max_depth, cmap)], axis=1)
    return np.concatenate([pair, pair[-1:]], axis=0) if pair.shape[0] % 2 else pair


def write_npy_from_frames(frames_path, npy_path, count, height, width):
    """A .npy of shape (count, height, width) float16 whose data is the raw bytes of `frames_path`.

    The frames are written raw while the clip streams, since the frame count (which the
    .npy header states first) is known only at the end.
    """
    with atomic_path(npy_path) as tmp, open(tmp, "wb") as out, open(frames_path, "rb") as raw:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                   "fortran_order": False, "shape": (count, height, width)})
        shutil.copyfileobj(raw, out, length=1 << 24)


def predict_video(predictor, path, out_dir, batch_size=32, cmap="magma", npy=False, quiet=False, max_pixels=MAX_PIXELS):
    """Write NAME_depth.mp4 (and NAME_depth.npy with `npy`) for video `path` with an inference.Predictor;
    returns (frames, height, width).

    Nothing is left at the output paths unless the whole clip was written.
    """
    imageio = import_imageio()
    paths = video_output_paths(path, out_dir)
    if os.path.realpath(paths["mp4"]) == os.path.realpath(path):
        raise UserError(f"writing {paths['mp4']} would overwrite the input video; choose another --out folder")
    reader, fps, estimate = open_video(imageio, path, max_pixels)
    try:
        make_output_folder(out_dir)
    except UserError:
        reader.close()
        raise
    max_depth = predictor.conventions.max_depth
    count, shape = 0, None
    frames_path = paths["npy"] + ".frames.tmp"  # the --npy data, raw, until the frame count is known
    try:
        with contextlib.ExitStack() as stack:  # closed in reverse: writer, files, then mp4 renamed into place
            mp4_tmp = stack.enter_context(atomic_path(paths["mp4"]))
            raw = stack.enter_context(open(frames_path, "wb")) if npy else None
            bar = stack.enter_context(tqdm(total=estimate, unit="frame", desc="video", dynamic_ncols=True,
                                           disable=quiet))
            writer = imageio.get_writer(mp4_tmp, format="FFMPEG", fps=fps, codec="libx264", quality=QUALITY,
                                        macro_block_size=1, ffmpeg_log_level="error")
            stack.callback(writer.close)
            for frames in frame_batches(reader, batch_size, path):
                inputs = torch.stack([to_model_input(f, predictor.size) for f in frames]).to(predictor.device)
                depths = predictor.depth_maps(inputs, [f.shape[:2] for f in frames])
                for frame, depth in zip(frames, depths):
                    writer.append_data(side_by_side(frame, depth, max_depth, cmap))
                    if raw is not None:
                        raw.write(depth.astype(np.float16).tobytes())
                count, shape = count + len(frames), frames[0].shape[:2]
                bar.update(len(frames))
            if count == 0:
                raise UserError(f"video {path} holds no frames")
        if npy:
            write_npy_from_frames(frames_path, paths["npy"], count, *shape)
    finally:
        reader.close()
        if os.path.exists(frames_path):
            os.remove(frames_path)
    return count, shape[0], shape[1]
