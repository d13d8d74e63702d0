"""Depth from image files with a trained model, and the files written for each image.

Every image, whatever its size and mode (RGB, RGBA, grayscale), is preprocessed as in
training (docs/design.md §5: resized to the model's input size), and the prediction is resized
back to the image's own height × width and clamped to [0, max_depth], as the standard
evaluation protocol does (docs/design.md §8). Per input NAME.ext the output folder gets:
  NAME.npy     float32 depth in metres
  NAME.png     the depth colourised with a matplotlib colormap on the fixed scale [0, max_depth]
  NAME_mm.png  (png16) 16-bit depth in millimetres, for tools that read depth PNGs
  NAME.ply     (ply) a coloured point cloud, binary PLY
"""
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import MAX_PIXELS, RGB_EXTENSIONS, DataError, natural_key, read_picture, to_model_input
from plots import colorize_depth
from utils import UserError, atomic_path, make_output_folder, output_paths


def list_images(path):
    """The image files to predict: `path` itself, or the .jpeg/.jpg/.png files of folder `path` in natural order."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--predict {path}: no such file or folder")
    names = [n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in RGB_EXTENSIONS
             and os.path.isfile(os.path.join(path, n))]
    if not names:
        raise UserError(f"--predict {path}: the folder holds no {'/'.join(RGB_EXTENSIONS)} images")
    names.sort(key=lambda n: (natural_key(os.path.splitext(n)[0]), n))
    return [os.path.join(path, n) for n in names]


def image_output_paths(image_path, out_dir, png16=False, ply=False):
    """{kind: path} of the files written for one input image."""
    suffixes = {"npy": ".npy", "png": ".png", "png16": "_mm.png", "ply": ".ply"}
    wanted = {"npy", "png"} | ({"png16"} if png16 else set()) | ({"ply"} if ply else set())
    return output_paths(image_path, out_dir, {k: v for k, v in suffixes.items() if k in wanted})


def check_outputs(paths, out_dir, png16, ply):
    """Refuse inputs whose outputs would collide with each other or overwrite an input."""
    inputs = {os.path.realpath(p) for p in paths}
    owner = {}
    for p in paths:
        for out in image_output_paths(p, out_dir, png16, ply).values():
            real = os.path.realpath(out)
            if real in inputs:
                raise UserError(f"writing {out} would overwrite the input image {p}; choose another --out folder")
            if real in owner:
                raise UserError(f"{owner[real]} and {p} would both write {out}; rename one or predict them into "
                                "separate --out folders")
            owner[real] = p


# Rows of a picture written at a time: the float copies that colouring and the writers make stay this small.
ROWS_AT_A_TIME = 256


class ImageFiles(Dataset):
    """Image files as (index, model input, original height × width, RGB or None, error or None).

    An unreadable file yields its error message instead of raising, so that one bad
    file in a folder is reported and skipped while the rest are still predicted. A JPEG
    over the pixel budget (a phone's photo) is decoded at 1/2, 1/4 or 1/8 of its size
    (dataset.read_picture): the network needs only its input size, and the depth is still
    given at the photo's own height × width.
    """

    def __init__(self, paths, size, keep_rgb=False, max_pixels=MAX_PIXELS):
        self.paths, self.size, self.keep_rgb, self.max_pixels = paths, size, keep_rgb, max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            rgb, shown = read_picture(self.paths[index], self.max_pixels, draft=True)
        except DataError as err:
            return index, None, None, None, str(err)
        return index, to_model_input(rgb, self.size), shown, rgb if self.keep_rgb else None, None


def collate_images(items):
    """Stack the readable images' inputs; keep the failures' messages apart."""
    good = [it for it in items if it[4] is None]
    failed = [(it[0], it[4]) for it in items if it[4] is not None]
    inputs = torch.stack([it[1] for it in good]) if good else None
    return inputs, [it[0] for it in good], [it[2] for it in good], [it[3] for it in good], failed





def depth_to_points(depth, hfov_deg, rows=None):
    """(H·W, 3) float32 camera-space points of a planar (z-)depth map, pinhole camera, square pixels; with
    rows=(start, stop), those of these rows only.

    The principal point is the image centre and f = (W / 2) / tan(hfov / 2). Axes are
    OpenGL's (x right, y up, the camera looking along −z), the default view of MeshLab
    and Open3D, so the cloud opens upright, seen from the camera.
    """
    h, w = depth.shape
    start, stop = rows or (0, h)
    f = (w / 2) / math.tan(math.radians(hfov_deg) / 2)
    x = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / f
    y = (np.arange(start, stop, dtype=np.float32) + 0.5 - h / 2) / f
    z = depth[start:stop].astype(np.float32, copy=False)
    return np.stack([x[None, :] * z, -y[:, None] * z, -z], axis=-1).reshape(-1, 3)


def colours_at(rgb, shape, ys, xs):
    """(len(ys), len(xs), 3) uint8 colours of the pixels at rows ys and columns xs of a picture of `shape`
    (H, W), from `rgb`, which may be smaller (a photo decoded at 1/2ⁿ): each pixel takes the colour of the
    rgb pixel it falls in."""
    h, w = shape
    return rgb[(ys * rgb.shape[0] // h)[:, None], (xs * rgb.shape[1] // w)[None, :]]


def write_ply(path, rgb, depth, hfov_deg):
    """Binary little-endian PLY of every pixel with depth > 0, coloured by `rgb` (of the depth's size, or
    smaller: colours_at), written ROWS_AT_A_TIME rows at a time."""
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"comment predicted depth, horizontal field of view {hfov_deg:g} degrees; "
              "x right, y up, camera looking along -z\n"
              f"element vertex {int(np.count_nonzero(depth > 0))}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        for start in range(0, depth.shape[0], ROWS_AT_A_TIME):
            rows = (start, min(start + ROWS_AT_A_TIME, depth.shape[0]))
            keep = depth[rows[0]:rows[1]].reshape(-1) > 0
            vertex = np.empty(int(keep.sum()), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                                      ("red", "u1"), ("green", "u1"), ("blue", "u1")])
            vertex["x"], vertex["y"], vertex["z"] = depth_to_points(depth, hfov_deg, rows)[keep].T
            colours = colours_at(rgb, depth.shape, np.arange(*rows), np.arange(depth.shape[1])).reshape(-1, 3)
            vertex["red"], vertex["green"], vertex["blue"] = colours[keep].T
            vertex.tofile(f)


def millimetres_png16(depth):
    """HW uint16 depth in millimetres, rounded, converted ROWS_AT_A_TIME rows at a time."""
    out = np.empty(depth.shape, np.uint16)
    for start in range(0, depth.shape[0], ROWS_AT_A_TIME):
        out[start:start + ROWS_AT_A_TIME] = np.round(depth[start:start + ROWS_AT_A_TIME] * 1000.0)
    return out


def write_outputs(paths, depth, rgb, max_depth, cmap, hfov_deg):
    """Write every file in `paths` (from output_paths) for one image's depth."""
    with atomic_path(paths["npy"]) as tmp:
        np.save(tmp, depth.astype(np.float32, copy=False))
    with atomic_path(paths["png"]) as tmp:
        Image.fromarray(colorize_depth(depth, 0.0, max_depth, cmap)).save(tmp)
    if "png16" in paths:
        with atomic_path(paths["png16"]) as tmp:
            Image.fromarray(millimetres_png16(depth)).save(tmp)
    if "ply" in paths:
        write_ply(paths["ply"], rgb, depth, hfov_deg)


def predict_files(predictor, paths, out_dir, batch_size=32, num_workers=0, cmap="magma", png16=False, ply=False,
                  hfov_deg=90.0, quiet=False, max_pixels=MAX_PIXELS):
    """Predict every image in `paths` with an inference.Predictor, in batches, and write its files to `out_dir`.

    Returns (number written, [(path, message)] of the files skipped because they could not be read).
    """
    check_outputs(paths, out_dir, png16, ply)
    make_output_folder(out_dir)
    device, max_depth = predictor.device, predictor.conventions.max_depth
    # Worker processes cost a start-up and pay off only when reading overlaps with predicting.
    num_workers = num_workers if len(paths) > batch_size else 0
    loader = DataLoader(ImageFiles(paths, predictor.size, keep_rgb=ply, max_pixels=max_pixels), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_images, pin_memory=device.type == "cuda")
    written, skipped = 0, []
    with tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True, disable=quiet) as bar:
        for inputs, indices, sizes, rgbs, failed in loader:
            for index, message in failed:
                if len(paths) > 1:  # one file that cannot be read is the error itself (main.run_predict)
                    tqdm.write(f"skipped: {message}", file=sys.stderr)
                skipped.append((paths[index], message))
            if inputs is not None:
                depths = predictor.depth_maps(inputs.to(device, non_blocking=True), sizes)
                for index, depth, rgb in zip(indices, depths, rgbs):
                    try:
                        files = image_output_paths(paths[index], out_dir, png16, ply)
                        write_outputs(files, depth, rgb, max_depth, cmap, hfov_deg)
                    except OSError as err:
                        raise UserError(f"cannot write the outputs of {paths[index]} to {out_dir}: "
                                        f"{err.strerror or err}") from None
                    written += 1
            bar.update(len(indices) + len(failed))
    return written, skipped
