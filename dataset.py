"""DepthEstimationUnreal, or any supervised depth data set: RGB/depth pairs on disk, preprocessed as in
the paper (docs/design.md §5).

Layout: ROOT/rgb/SPLIT/NAME.{jpeg,jpg,png} and ROOT/depth/SPLIT/NAME.{npy,png}, paired by stem;
or the pairs a split list names (ROOT/SPLIT.txt, or a file given as --SPLIT-list): one
`RGB DEPTH [FOCAL]` a line, the peers' format, RGB relative to ROOT and depth to --gt-dir
(read_split_list). Depth is float .npy in metres or a single-channel 16-bit PNG read as
value / depth_scale metres. Pairs may have any size (RGB and depth of one pair the same).
Every sample is (rgb (3, H, W) float32 in [0, 1], depth (1, H, W) float32 metres in
[0, max_depth]) at the network's input size. Depth at or below min_depth is "not measured"
(0 in every common format): it is kept out of resizing, the loss, the metrics and the mean
depth (docs/design.md §5). Depth files holding NaN or inf are rejected with an error naming
the file, rather than masked: the real data set has none, so such a file means a broken export.

Every file is decoded once when a split is opened (check_files), in the main process: a
bad file then stops the run before training starts, with one line naming it, instead of
hours later inside a DataLoader worker, whose errors PyTorch re-raises wrapped in a
traceback. The pass runs on a few threads.

The same pass sums the clipped depth: its mean is the model's initial output bias, so no
second pass over the files is needed for it.

EpochSampler and EpochBatches fix the data order: a permutation per epoch derived from
(seed, epoch), cut into global batches and shared out across processes, the same from the
cache and from the folder loader.

SplitCache holds a split decoded once (uint8 RGB, float16 depth, at the input size), so that an
epoch needs no decoding. It lives on disk and is read through memory maps, so memory does not
grow with the split; on a GPU a cache that fits lives in device memory. Building it decodes
every file in the same way, which is then the check.

Training augmentation (augment_pair) is not applied here but by the Trainer, per batch on
the device: the same on every data-loading path, and cheap on a GPU.
"""
import codecs
import errno
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from conventions import PAPER
from utils import UserError, first_line, write_json_atomic

RGB_EXTENSIONS = (".jpeg", ".jpg", ".png")
DEPTH_EXTENSIONS = (".npy", ".png")
# The only formats decoded: other Pillow plugins reach far more code (EPS runs Ghostscript) for
# pictures no depth data set or camera produces.
IMAGE_FORMATS = ("JPEG", "PNG")
# The most pixels an image may have, read from its header before anything is decoded (--max-pixels):
# 4096 × 4096, more than a 12-megapixel phone photo. What the largest costs: docs/use.md.
MAX_PIXELS = 4096 * 4096
# The scales a JPEG decoder divides by while decoding (Pillow's draft mode), smallest first.
JPEG_DRAFT_SCALES = (2, 4, 8)
EXIF_ORIENTATION = 0x0112
SPLITS = ("train", "val", "test")
# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)


class DataError(UserError):
    """A problem with the data on disk, worded for the user: what is wrong, where, and the fix."""


class ImageError(DataError):
    """An image that cannot be read: `reason` says why in words that need no path (the web page shows it)."""

    def __init__(self, path, reason, fix):
        super().__init__(f"cannot read image {path}: {reason}. {fix}")
        self.reason = reason


def natural_key(stem):
    """Numbers in numeric order (2 before 10), then other names alphabetically."""
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def list_pairs(root, split, listing=None, gt_root=None):
    """[(name, rgb_path, depth_path)] of a split: list_split's pairs."""
    return list_split(root, split, listing, gt_root).pairs


class SplitList(NamedTuple):
    """A split's pairs [(name, rgb_path, depth_path)], the focal length (pixels) of each as its line gave it
    (None where it gave none, and for every pair of the folder layout), and how many listed pairs have no
    ground truth (DEPTH written as None), which are left out."""

    pairs: list
    focals: list
    without_gt: int = 0


def list_split(root, split, listing=None, gt_root=None):
    """A split as a SplitList: from the split list `listing` when given, else ROOT/SPLIT.txt when it exists, else
    the folders ROOT/rgb/SPLIT and ROOT/depth/SPLIT paired by stem, sorted numerically; DataError on any mismatch.
    gt_root: the folder a list's depth paths are relative to (--gt-dir; default: root)."""
    listing = listing or split_list_path(root, split)
    if listing is not None:
        return read_split_list(root, listing, gt_root)
    rgb_dir = os.path.join(root, "rgb", split)
    depth_dir = os.path.join(root, "depth", split)
    for d in (rgb_dir, depth_dir):
        if not os.path.isdir(d):
            raise DataError(
                f"data folder {d} not found: expected ROOT/rgb/{split}/*.jpeg and ROOT/depth/{split}/*.npy "
                f"(or ROOT/{split}.txt listing the pairs, or --{split}-list FILE) under --data-dir {root}; "
                "python get_data.py fetches DepthEstimationUnreal, python synthetic.py --out DIR writes a synthetic set"
            )
    rgb, depth = files_by_stem(rgb_dir, RGB_EXTENSIONS, "RGB"), files_by_stem(depth_dir, DEPTH_EXTENSIONS, "depth")
    if not rgb and not depth:
        raise DataError(f"split {split!r} is empty: no .jpeg/.jpg/.png in {rgb_dir} and no .npy/.png in {depth_dir}")
    only_rgb = sorted(set(rgb) - set(depth), key=natural_key)
    only_depth = sorted(set(depth) - set(rgb), key=natural_key)
    if only_rgb or only_depth:
        parts = []
        if only_rgb:
            parts.append(f"{len(only_rgb)} RGB without depth ({', '.join(only_rgb[:5])})")
        if only_depth:
            parts.append(f"{len(only_depth)} depth without RGB ({', '.join(only_depth[:5])})")
        raise DataError(f"unpaired files in {root} split {split!r}: " + "; ".join(parts) + ". Remove or complete them.")
    pairs = [(s, rgb[s], depth[s]) for s in sorted(rgb, key=natural_key)]
    return SplitList(pairs, [None] * len(pairs))


def split_list_path(root, split):
    """ROOT/SPLIT.txt when it exists, else None."""
    listing = os.path.join(root, f"{split}.txt")
    return listing if os.path.isfile(listing) else None


def split_exists(root, split, listing=None):
    """Whether ROOT holds the split at all: a split list (`listing`, or ROOT/SPLIT.txt) or its two folders."""
    return bool(listing) or split_list_path(root, split) is not None or os.path.isdir(os.path.join(root, "rgb", split))


def files_by_stem(directory, extensions, kind):
    """{stem: path} of the files of `directory` with one of `extensions`; DataError for two files of one stem."""
    found = {}
    for name in os.listdir(directory):
        stem, ext = os.path.splitext(name)
        if ext.lower() in extensions:
            if stem in found:
                raise DataError(f"two {kind} files for {stem!r} in {directory}: {os.path.basename(found[stem])} "
                                f"and {name}")
            found[stem] = os.path.join(directory, name)
    return found


# A line of a split list: RGB DEPTH, and optionally the focal length in pixels, as BTS, AdaBins, ZoeDepth and
# Depth Anything ship their lists (docs/data.md).
LIST_FORMAT = "RGB DEPTH [FOCAL] a line (a path with spaces in double quotes)"
# DEPTH written as this: a frame without ground truth (the peers' KITTI lists have them).
NO_DEPTH = "None"
# Lists whose frames without ground truth were already announced: a split is listed more than once in a run.
_ANNOUNCED = set()


def read_split_list(root, listing, gt_root=None):
    """The SplitList of a split list file: `RGB DEPTH [FOCAL]` a line, RGB relative to root and DEPTH to gt_root
    (default: root), even when written with a leading `/`; an absolute path that exists is used as it is. Blank
    lines and # comments are skipped; DEPTH `None` (no ground truth) leaves the pair out, said once with the
    count. Each pair is named by its RGB path without the extension, and is identified by its resolved files:
    `a`, `./a` and `sub/../a` are one pair. DataError naming the list, the line and the fix."""
    depth_option = "--gt-dir" if gt_root else "--data-dir (--gt-dir DIR gives them another root)"
    gt_root = gt_root or root
    pairs, focals, seen, names, without_gt = [], [], {}, {}, 0
    for number, text in list_lines(listing):
        where = f"{listing} line {number}"
        fields = list_fields(text, where)
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise DataError(f"{where}: expected two paths and an optional focal length, {LIST_FORMAT}; got "
                            f"{len(fields)} field(s). Quote a path that holds spaces, or remove the extra field")
        focal = list_focal(fields, where)
        if fields[1] == NO_DEPTH:
            without_gt += 1
            continue
        rgb_path = listed_file(root, fields[0], where, "RGB", "--data-dir")
        depth_path = listed_file(gt_root, fields[1], where, "depth", depth_option)
        check_depth_header(depth_path, where)
        identity = os.path.realpath(rgb_path)
        if identity in seen:
            raise DataError(f"{where}: {fields[0]} is listed twice (first on line {seen[identity]}, as the same "
                            "file): remove one of the lines")
        seen[identity] = number
        name = pair_name(root, fields[0], rgb_path)
        if name in names:
            raise DataError(f"{where}: {fields[0]} has the name {name!r} of the pair on line {names[name]} (names are "
                            "RGB paths without the extension); rename one of the files")
        names[name] = number
        pairs.append((name, rgb_path, depth_path))
        focals.append(focal)
    if not pairs:
        raise DataError(f"{listing} lists no pairs with ground truth; {LIST_FORMAT}, RGB relative to {root}")
    if without_gt:
        announce_without_gt(listing, without_gt, len(pairs) + without_gt)
    return SplitList(pairs, focals, without_gt)


def list_lines(listing):
    """(line number, text) of a split list read as UTF-8, with or without a byte-order mark; a DataError naming
    the line of a byte that is not UTF-8."""
    try:
        with open(listing, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"cannot read split list {listing}: {err.strerror}") from None
    if raw.startswith(codecs.BOM_UTF8):  # Windows editors write one
        raw = raw[len(codecs.BOM_UTF8):]
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{listing} line {number}: byte 0x{line[err.start]:02x} (column {err.start + 1}) is not "
                            "UTF-8; save the list as UTF-8") from None


def list_fields(text, where):
    """The fields of one line: split at whitespace, double-quoted fields kept whole, from # on a comment."""
    if '"' not in text:  # the common line, without shlex's character-by-character pass
        return text.split("#", 1)[0].split()
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split, lexer.quotes, lexer.escape = True, '"', ""
    try:
        return list(lexer)
    except ValueError:
        raise DataError(f"{where}: a double quote is not closed; {LIST_FORMAT}") from None


def list_focal(fields, where):
    """The third field of a line as a focal length in pixels; None when the line has none."""
    if len(fields) < 3:
        return None
    try:
        focal = float(fields[2])
    except ValueError:
        focal = math.nan
    if not math.isfinite(focal) or focal <= 0:
        raise DataError(f"{where}: the third field {fields[2]!r} is not a focal length (a positive number of "
                        f"pixels); {LIST_FORMAT}. Fix it, or leave the focal out")
    return focal


def listed_file(root, field, where, kind, option):
    """The file a list's path names: relative to root, even when written with a leading `/`; an absolute path
    that exists is used as it is. DataError naming the line when neither is a file."""
    path = os.path.join(root, field.lstrip("/\\"))
    if os.path.isfile(path):
        return path
    if os.path.isabs(field) and os.path.isfile(field):
        return field
    if os.path.lexists(path):  # a folder, a link loop, ...: say what it is, not that it is missing
        raise DataError(f"{where}: {kind} {path} cannot be read: {file_problem(path)}; fix the line or the file")
    raise DataError(f"{where}: {kind} file {path} not found ({kind} paths are relative to {option}, here {root}); "
                    "fix the line, the file or the option")


def check_depth_header(path, where):
    """DataError naming the list line of a depth PNG that is not single-channel 16-bit (read from its header)."""
    if os.path.splitext(path)[1].lower() != ".png":
        return
    try:
        with Image.open(path, formats=("PNG",)) as im:
            mode = im.mode
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        return  # a damaged file: reading it says what is wrong, with its path
    if mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"{where}: depth {path} is an 8-bit or colour PNG (mode {mode}), not depth; write depth as "
                        "a single-channel 16-bit PNG (metres x --depth-scale) or a float .npy")


def pair_name(root, field, path):
    """A listed pair's name: its RGB path relative to root, normalised, without the extension (an absolute path
    outside root: the path without its leading `/`)."""
    relative = os.path.normpath(field.lstrip("/\\"))
    if os.path.isabs(field) and not os.path.isfile(os.path.join(root, relative)):
        inside = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        relative = inside if not inside.startswith("..") else os.path.abspath(path).lstrip("/\\")
    return os.path.splitext(relative)[0].replace(os.sep, "/")


def announce_without_gt(listing, count, total):
    """Say once per list how many of its pairs have no ground truth and are skipped."""
    key = (os.path.abspath(listing), count, total)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(f"{listing}: {count} of {total} pairs have no ground truth (None); skipped")


def file_problem(path):
    """What stops `path` from being read as a file, in words ("it is a folder", a symbolic link loop, ...); None
    for a regular file. Named here, so that no such path is reported as merely "not found"."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "it is a folder, not a file"
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "it is a symbolic link that leads back to itself (a loop)"
            return "it is a symbolic link to a file that does not exist"
    if os.path.exists(path):
        return "it is not a regular file (a device, pipe or socket)"
    return "no such file"


def open_image(path, formats, max_pixels, draft=False):
    """Image.open of one of `formats` whose header says it has at most `max_pixels` pixels; ImageError if not.

    draft=True: a JPEG with more pixels passes when a scale of 1/2, 1/4 or 1/8 fits it (draft_to_fit then
    decodes it so); only beyond 1/8 is it refused. Pillow's own DecompressionBombWarning is silenced: the
    check here comes first and says more.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path, formats=formats)
        except Image.DecompressionBombError as err:  # a header beyond even Pillow's limit: say it as ours
            claimed = re.search(r"\((\d+) pixels\)", str(err))
            size = f"{int(claimed.group(1)) / 1e6:.0f} MP" if claimed else "too many pixels"
            raise ImageError(path, f"it claims {size}, more than the {pixel_count(max_pixels)} allowed",
                             "Downscale it, or raise --max-pixels") from None
    width, height = im.size
    if width * height > max_pixels:
        scale = jpeg_draft_scale(width, height, max_pixels) if draft and im.format == "JPEG" else None
        if scale is None:
            im.close()
            beyond = " even decoded at 1/8 of its size" if draft and im.format == "JPEG" else ""
            raise ImageError(path, f"it has {width} × {height} pixels ({pixel_count(width * height)}), more than the "
                                   f"{pixel_count(max_pixels)} allowed{beyond}", "Downscale it, or raise --max-pixels")
    return im


def draft_to_fit(im, max_pixels):
    """Make a JPEG of more than max_pixels decode at the largest 1/2ⁿ scale that fits (Pillow's draft mode,
    which the JPEG decoder does for almost nothing); anything else is left as it is."""
    width, height = im.size
    if width * height > max_pixels and im.format == "JPEG":
        scale = jpeg_draft_scale(width, height, max_pixels)
        im.draft(im.mode, (width // scale, height // scale))


def pixel_count(n):
    """A number of pixels in words: megapixels, or the count itself below a tenth of one."""
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} pixels"


def jpeg_draft_scale(width, height, max_pixels):
    """The smallest of 2, 4 and 8 by which a JPEG decoder can divide width × height (rounding up, as it does)
    to fit max_pixels; None if none does."""
    for scale in JPEG_DRAFT_SCALES:
        if -(-width // scale) * -(-height // scale) <= max_pixels:
            return scale
    return None


def read_rgb(path, max_pixels=MAX_PIXELS):
    """HWC uint8 RGB of a JPEG or PNG, upright as viewers show it; grayscale (8- or 16-bit), palette and RGBA
    images are converted. DataError for another format, a damaged file or more than max_pixels pixels.

    Data (training, validation, --eval) is read here, at full size and never drafted: a picture is the
    same input whatever the budget, and its depth map must match it pixel for pixel.
    """
    return read_picture(path, max_pixels)[0]


def read_picture(path, max_pixels=MAX_PIXELS, draft=False):
    """(HWC uint8 RGB as read_rgb, (H, W) of the picture as viewers show it). draft=True (--predict, the web
    page): a JPEG over max_pixels is decoded at the largest 1/2ⁿ scale that fits, so the RGB is smaller than
    (H, W), the size its depth is given at."""
    problem = file_problem(path)
    if problem:
        raise ImageError(path, problem, "Give the path of a picture file")
    try:
        with open_image(path, IMAGE_FORMATS, max_pixels, draft) as im:
            # The size before any draft, turned as the EXIF orientation turns the picture (5-8: a quarter turn).
            width, height = im.size
            if draft:
                draft_to_fit(im, max_pixels)
            quarter_turn = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            shown = (width, height) if quarter_turn else (height, width)
            ImageOps.exif_transpose(im, in_place=True)  # phone photos store their rotation in EXIF
            if im.mode.startswith("I"):  # 16-bit grayscale: convert("RGB") would clip it at 255
                gray = (np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=2), shown
            return np.array(im.convert("RGB")), shown
    except UnidentifiedImageError:
        raise ImageError(path, "it is not a JPEG or PNG file, the formats read here", "Convert or remove it") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = (err.strerror if isinstance(err, OSError) and err.strerror
                  else f"{type(err).__name__}: {first_line(err)}")
        raise ImageError(path, reason, "Re-export or remove the file") from None


def read_depth(path, depth_scale=PAPER.depth_scale, max_pixels=MAX_PIXELS):
    """HW float32 depth in metres from a float .npy (metres), an integer .npy or a 16-bit PNG (both value /
    depth_scale, as sensors store millimetres); rejects other files, wrong shapes, other dtypes, 8-bit or
    colour PNGs and NaN/inf."""
    problem = file_problem(path)
    if problem:
        raise DataError(f"cannot read depth {path}: {problem}. Fix the path or remove the pair.")
    if os.path.splitext(path)[1].lower() == ".png":
        return read_png_depth(path, depth_scale, max_pixels)
    depth = load_npy(path)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    integer = np.issubdtype(depth.dtype, np.integer)
    if depth.ndim != 2 or not (np.issubdtype(depth.dtype, np.floating) or integer):
        raise DataError(f"depth {path} has shape {depth.shape} and dtype {depth.dtype}; expected a 2-D array "
                        "(H, W): float in metres, or integer in units of 1 / --depth-scale metres")
    if integer:  # millimetres (or --depth-scale's unit), as a 16-bit PNG holds them
        return depth.astype(np.float32) / np.float32(depth_scale)
    depth = depth.astype(np.float32, copy=False)
    if not np.isfinite(depth).all():
        raise DataError(f"depth {path} contains NaN or inf; such files are rejected, not masked: fix or remove it")
    return depth


def load_npy(path):
    """The array of a .npy file, read without unpickling; DataError naming what the file is otherwise."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise DataError(f"cannot read depth {path}: {err.strerror or err}. Re-export or remove the file.") from None
    if magic[:4] == b"PK\x03\x04":  # an .npz archive renamed to .npy
        raise DataError(f"depth {path} is an .npz archive, not one array; save each depth map with np.save")
    if magic != b"\x93NUMPY":
        raise DataError(f"depth {path} is not a NumPy .npy file ({'empty' if not magic else 'no .npy header'}); "
                        "save depth maps with np.save, or as 16-bit PNGs")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):  # an object array: pickled Python objects, never loaded
            raise DataError(f"depth {path} holds Python objects, not numbers; save a numeric array with "
                            "np.save") from None
        raise DataError(f"cannot read depth {path}: {first_line(err)}. Re-export or remove the file.") from None
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read depth {path}: {first_line(err)}. Re-export or remove the file.") from None


def read_png_depth(path, depth_scale, max_pixels=MAX_PIXELS):
    """A single-channel 16-bit PNG as float32 metres (value / depth_scale); 0 stays 0, "not measured"."""
    try:
        with open_image(path, ("PNG",), max_pixels) as im:
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise DataError(f"depth {path} is an 8-bit or colour picture (PNG mode {im.mode}), not depth: a depth "
                                "PNG is single-channel 16-bit, read as value / --depth-scale metres")
            depth = np.asarray(im).astype(np.float32)
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read depth {path}: {err}. Re-export or remove the file.") from None
    return depth / np.float32(depth_scale)


def read_pair(rgb_path, depth_path, depth_scale=PAPER.depth_scale, max_pixels=MAX_PIXELS):
    """(rgb HWC uint8, depth HW float32) of one pair; DataError if a file is bad or their sizes disagree."""
    rgb, depth = read_rgb(rgb_path, max_pixels), read_depth(depth_path, depth_scale, max_pixels)
    if rgb.shape[:2] != depth.shape:
        raise DataError(f"{rgb_path} is {rgb.shape[1]}×{rgb.shape[0]} but {depth_path} is "
                        f"{depth.shape[1]}×{depth.shape[0]}; "
                        "RGB and depth must have one size: re-export or remove the pair")
    return rgb, depth


def map_in_threads(fn, items, desc, progress=True):
    """fn(item) for every item on a few threads of this process, yielded in order; a bar on long lists.

    PIL, NumPy and torch release the GIL while they decode, read and resize, so threads
    overlap well. If fn raises, or the caller stops early, the items not started are cancelled.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(fn, items)
        try:
            yield from tqdm(results, total=len(items), desc=desc, leave=False, disable=not progress or len(items) < 500)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def check_files(pairs, max_depth=PAPER.max_depth, min_depth=PAPER.min_depth, depth_scale=PAPER.depth_scale,
                max_pixels=MAX_PIXELS, desc="checking files", progress=True):
    """Decode every pair once, in this (the main) process; raises the first pair's DataError in file order.

    Returns (mean depth over the measured pixels, clipped to [0, max_depth]; whether any pixel
    is not measured), which this pass reads anyway: the model's initial output bias and the
    masked loss need no second pass.
    """
    def clipped_depth_sum(pair):
        _, depth = read_pair(pair[1], pair[2], depth_scale, max_pixels)
        return depth_sum(clip_depth(depth, min_depth, max_depth), min_depth)

    total, measured, count = 0.0, 0, 0
    for part_sum, part_measured, part_count in map_in_threads(clipped_depth_sum, pairs, desc, progress):
        total, measured, count = total + part_sum, measured + part_measured, count + part_count
    return split_stats(total, measured, count, pairs)


def split_stats(total, measured, count, pairs):
    """(mean measured depth, whether any pixel is not measured) of a split from its depth_sum parts."""
    if measured == 0:
        raise DataError(f"no depth map of the {len(pairs)} pair(s) from {pairs[0][2]} on holds a measured pixel "
                        "(all at or below --min-depth): check --depth-scale and the depth files")
    return total / measured, measured < count


def clip_depth(depth, min_depth=PAPER.min_depth, max_depth=PAPER.max_depth):
    """Depth clipped to [0, max_depth], the pixels at or below min_depth (not measured) set to 0."""
    clipped = np.clip(depth, 0.0, max_depth)
    return np.where(clipped > min_depth, clipped, np.float32(0.0))


def depth_sum(clipped, min_depth=PAPER.min_depth):
    """(sum of the measured pixels in float64, measured pixels, all pixels) of a clipped depth map
    (array or tensor): the parts of a split's mean depth."""
    clipped = torch.as_tensor(clipped)
    return float(clipped.double().sum()), int((clipped > min_depth).sum()), clipped.numel()


def split_files(opts, split):
    """Where a split's pairs are listed among main.py's options, as DepthEstimationUnreal's keyword arguments: the
    split list (--train-list, --val-list, --test-list) and the root of its depth paths (--gt-dir)."""
    return {"listing": getattr(opts, f"{split}_list", None), "gt_root": getattr(opts, "gt_dir", None)}


def input_hw(size):
    """(H, W) of a network input size: --image-size S (square, the paper's 224) or H W."""
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def to_model_input(rgb, size):
    """HWC uint8 RGB → (3, H, W) float in [0, 1]: the network's input, for training and prediction alike."""
    return resize_to(torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0), size)


def resize_to(t, size):
    """The paper's Resize((H, W)) + CenterCrop((H, W)), bilinear with antialiasing, on a (C, H, W) tensor."""
    h, w = input_hw(size)
    t = TF.resize(t, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(t, [h, w])


def resize_depth(depth, size, min_depth=PAPER.min_depth):
    """A (1, H, W) depth map resized as resize_to does, with its unmeasured pixels kept out.

    A map without holes is resized exactly as the paper does. With holes, bilinear resizing
    would blend measured depth with the holes' 0 and invent depths that were never measured;
    here each output pixel is the mask-weighted mean of the measured pixels under the filter
    (resize(depth · mask) / resize(mask)), and a pixel with no measured pixel under it stays a
    hole (docs/design.md §5).
    """
    measured = depth > min_depth
    if bool(measured.all()):
        return resize_to(depth, size)
    both = resize_to(torch.cat([depth * measured, measured.to(depth.dtype)]), size)
    return masked_mean(both[:1], both[1:])


def masked_mean(weighted, weight):
    """Resampled depth · mask over resampled mask: the mean of the measured depths under each output pixel,
    0 (a hole) where (almost) none was measured."""
    return torch.where(weight > 1e-3, weighted / weight.clamp_min(1e-3), torch.zeros_like(weighted))


def augment_pair(rgb, depth, generator=None, flip=True, max_scale=1.25, jitter=0.2, min_depth=None, scale_depth=False):
    """Paired training augmentation (--augment) of (3, H, W) + (1, H, W) tensors, or of a batch
    (B, 3, H, W) + (B, 1, H, W) on any device, each image with its own random draw.

    Geometry, identical for RGB and depth: a horizontal flip (p = 0.5 when `flip`), then a
    zoom by s ∈ [1, max_scale] about a random point, cropped back to H × W. Because s ≥ 1 the
    crop always lies inside the image: no black borders. Depth values are kept (a zoom is a
    narrower field of view), or with `scale_depth` divided by s (a camera s times closer, as
    Eigen et al., 2014, scale their training pairs). Both are resampled bilinearly, as the
    paper's resize treats both. Colour, RGB only: brightness, contrast and saturation, each
    scaled by a factor in [1 − jitter, 1 + jitter], then clipped to [0, 1]. With `min_depth`
    (a data set with unmeasured pixels) depth is resampled as resize_depth does: the
    mask-weighted mean of the measured pixels, holes staying holes.

    Seven uniforms per image are drawn on the CPU from `generator` (torch's global RNG when
    None, which the Trainer seeds and checkpoints) in a fixed order whatever the options, so
    a seed gives the same geometry on every device, with or without jitter.
    """
    single = rgb.dim() == 3
    if single:
        rgb, depth = rgb[None], depth[None]
    b, _, h, w = rgb.shape
    u = torch.rand(b, 7, generator=generator, dtype=torch.float64)
    sign = torch.where(u[:, 0] < 0.5, -1.0, 1.0) if flip else torch.ones(b, dtype=torch.float64)
    inv_scale = 1.0 / (1.0 + (max_scale - 1.0) * u[:, 1])
    # Output pixel (x, y) in [-1, 1] samples input (sign·x/s + tx, y/s + ty); |t| ≤ 1 − 1/s keeps it inside.
    tx = (1 - inv_scale) * (2 * u[:, 2] - 1)
    ty = (1 - inv_scale) * (2 * u[:, 3] - 1)
    zero = torch.zeros(b, dtype=torch.float64)
    theta = torch.stack([torch.stack([sign * inv_scale, zero, tx], 1), torch.stack([zero, inv_scale, ty], 1)], 1)
    theta = theta.to(device=rgb.device, dtype=torch.float32, non_blocking=True)
    depth = depth.float()
    parts = [rgb.float(), depth]
    if min_depth is not None:
        measured = (depth > min_depth).float()
        parts = [rgb.float(), depth * measured, measured]
    both = torch.cat(parts, dim=1)
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    both = F.grid_sample(both, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rgb, depth = both[:, :3], both[:, 3:4]
    if min_depth is not None:
        depth = masked_mean(depth, both[:, 4:])
    if scale_depth:
        depth = depth * inv_scale.to(device=depth.device, dtype=depth.dtype, non_blocking=True).view(b, 1, 1, 1)
    if jitter > 0:
        factors = (1 + jitter * (2 * u[:, 4:7] - 1)).to(device=rgb.device, dtype=torch.float32, non_blocking=True)
        rgb = jitter_colour(rgb, *factors.view(b, 3, 1, 1, 1).unbind(1))
    return (rgb[0], depth[0]) if single else (rgb, depth)


def paste_patches(rgb, depth, generator=None, prob=0.5, min_side=0.25, max_side=0.5):
    """Copy-paste between the images of a batch (--paste): with probability `prob` each image gets a
    rectangle of its neighbour's in the batch (image i takes from image i - 1), RGB and depth together,
    cut at one random place and pasted at another.

    The street scenes teach the network that depth follows the height in the picture (near at the
    bottom, far above the horizon); a pasted patch puts near objects with their true depth anywhere,
    so only what the patch looks like tells its depth. Sides are `min_side` … `max_side` of the
    image's, drawn separately for height and width. Seven uniforms per image, on the CPU, from
    `generator` (torch's global RNG when None), in a fixed order: a seed repeats on every device.
    Returns new tensors; a batch of one is returned unchanged.
    """
    b, _, h, w = rgb.shape
    u = torch.rand(b, 7, generator=generator, dtype=torch.float64)
    if b < 2:
        return rgb, depth
    out_rgb, out_depth = rgb.clone(), depth.clone()
    for i in torch.nonzero(u[:, 0] < prob).flatten().tolist():
        ph = max(1, round(h * (min_side + (max_side - min_side) * float(u[i, 1]))))
        pw = max(1, round(w * (min_side + (max_side - min_side) * float(u[i, 2]))))
        # Source and target corners drawn independently: the patch moves, up or down as often as sideways.
        sy, sx = int(u[i, 3] * (h - ph + 1)), int(u[i, 4] * (w - pw + 1))
        ty, tx = int(u[i, 5] * (h - ph + 1)), int(u[i, 6] * (w - pw + 1))
        source = i - 1
        out_rgb[i, :, ty:ty + ph, tx:tx + pw] = rgb[source, :, sy:sy + ph, sx:sx + pw]
        out_depth[i, :, ty:ty + ph, tx:tx + pw] = depth[source, :, sy:sy + ph, sx:sx + pw]
    return out_rgb, out_depth


def random_crops(rgb, depth, size, generator=None):
    """An (h, w) window of each image of a batch (B, C, H, W), RGB and depth alike, at a place drawn for each image
    (--crop): two uniforms per image, on the CPU, from `generator` (torch's global RNG when None).

    A window keeps the pictures' scale, so a network trained on windows sees objects at the size it will
    meet them in the whole picture, where a zoom enlarges them; and it moves the horizon up and down by up to
    H - h rows, so height in the picture says less about depth.
    """
    b, _, height, width = rgb.shape
    h, w = size
    if h > height or w > width:
        raise ValueError(f"a {h} x {w} crop does not fit in a {height} x {width} input: --crop must fit in "
                         "--image-size")
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64)
    places = list(zip((u[:, 0] * (height - h + 1)).long().tolist(), (u[:, 1] * (width - w + 1)).long().tolist()))

    def windows(maps):
        return torch.stack([maps[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(places)])

    return windows(rgb), windows(depth)


def augment_batch(rgb, depth, generator, opts, min_depth=None):
    """The training augmentation main.py's options ask for, on a batch where it lies (the device): --augment
    (augment_pair), then --crop (random_crops), then --paste (paste_patches), one random draw per image.
    Applied per batch by the Trainer rather than in the Dataset: the same whatever loads the data."""
    if opts.augment:
        rgb, depth = augment_pair(rgb, depth, generator, max_scale=opts.max_zoom, min_depth=min_depth,
                                  scale_depth=opts.zoom_closer)
    if opts.crop:
        rgb, depth = random_crops(rgb, depth, opts.crop, generator)
    if opts.paste:
        rgb, depth = paste_patches(rgb, depth, generator, prob=opts.paste)
    return rgb, depth


def jitter_colour(rgb, brightness, contrast, saturation):
    """Brightness, contrast and saturation of (B, 3, H, W) in [0, 1] by per-image factors (B, 1, 1, 1)."""
    # Built on the CPU, then copied without blocking: torch.tensor(..., device="cuda") would wait for the GPU.
    luma = torch.tensor(LUMA, dtype=rgb.dtype).to(rgb.device, non_blocking=True).view(1, 3, 1, 1)
    rgb = (rgb * brightness).clamp(0, 1)
    mean = (rgb * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    rgb = ((rgb - mean) * contrast + mean).clamp(0, 1)
    gray = (rgb * luma).sum(1, keepdim=True)
    return ((rgb - gray) * saturation + gray).clamp(0, 1)


class DepthEstimationUnreal(Dataset):
    """One split of DepthEstimationUnreal, or of any data set in its layout or listed in split files.

    size: the network input, S or (H, W). conventions: the depth range (clipped to [0, max_depth];
    at or below min_depth: not measured) and what a 16-bit PNG's values are divided by to give
    metres (conventions.DepthConventions). native=True adds a third item, the clipped depth at
    its own resolution, which the standard evaluation protocol compares against. check=False
    skips decoding every file up front (see the module's docstring); only for files checked
    moments ago. progress=False hides the bar of that check (--quiet). listing: the split list to
    read (--SPLIT-list; default ROOT/SPLIT.txt when it exists); gt_root: the folder its depth paths
    are relative to (--gt-dir; default root). focals: each pair's focal length in pixels, None
    where its list line gives none.
    """

    def __init__(self, root, split="train", size=224, conventions=PAPER, native=False, check=True, progress=True,
                 max_pixels=MAX_PIXELS, listing=None, gt_root=None):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.root, self.split, self.size, self.conventions, self.native = root, split, size, conventions, native
        self.min_depth, self.max_depth, self.depth_scale = conventions.min_depth, conventions.max_depth, \
            conventions.depth_scale
        self.max_pixels = max_pixels
        self.progress, self.listing, self.gt_root = progress, listing, gt_root
        listed = list_split(root, split, listing, gt_root)
        self.pairs, self.focals = listed.pairs, listed.focals
        self._stats = self.check() if check else None

    def check(self):
        """check_files on this split; returns (its mean measured depth, whether it has unmeasured pixels)."""
        return check_files(self.pairs, self.max_depth, self.min_depth, self.depth_scale, self.max_pixels,
                           desc=f"checking {self.split} files", progress=self.progress)

    @property
    def stats(self):
        """(mean measured depth, has holes), from the up-front check; a split opened with check=False runs
        that check on first use."""
        if self._stats is None:
            self._stats = self.check()
        return self._stats

    @property
    def mean_depth(self):
        """Mean clipped depth over the measured pixels of the split: the model's initial output bias."""
        return self.stats[0]

    @property
    def has_holes(self):
        """Whether some pixel of the split is not measured: the loss then masks (docs/design.md §6)."""
        return self.stats[1]

    def __len__(self):
        return len(self.pairs)

    @property
    def names(self):
        return [stem for stem, _, _ in self.pairs]

    def load_raw(self, index):
        """(rgb HWC uint8, depth HW float32 clipped to [0, max_depth], holes at 0) at the files' resolution."""
        _, rgb_path, depth_path = self.pairs[index]
        rgb, depth = read_pair(rgb_path, depth_path, self.depth_scale, self.max_pixels)
        return rgb, clip_depth(depth, self.min_depth, self.max_depth)

    def __getitem__(self, index):
        rgb, depth = self.load_raw(index)
        depth_t = torch.from_numpy(depth)[None]
        sample = (to_model_input(rgb, self.size), resize_depth(depth_t, self.size, self.min_depth))
        return sample + (depth_t,) if self.native else sample


# ------------------------------------------------------------------ data order
def epoch_seed(seed, epoch):
    """The seed of one epoch's randomness (its data order, its loader workers), from the run's seed."""
    return seed * 100_003 + epoch


class EpochSampler(Sampler):
    """A fresh permutation per epoch from (seed, epoch), starting at batch `start`.

    Deriving the order from the epoch number, rather than from a running generator,
    lets a resumed run see exactly the batches the interrupted one would have seen.
    """

    def __init__(self, n, seed, epoch, start=0, shuffle=True):
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        self.indices = order[start:].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class EpochBatches(Sampler):
    """This process's batches of one epoch, as lists of indices.

    EpochSampler's order is cut into global batches of `batch_size`, and each global batch
    into `world_size` contiguous parts, of which rank r takes part r. With one process these
    are exactly DataLoader(sampler=EpochSampler(...), batch_size=batch_size)'s batches, so the
    data order is the same from the cache, from the folder loader, and across resumes. A last
    global batch with fewer images than processes is dropped: some process would get none.
    """

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch, start_batch=0):
        order = EpochSampler(self.n, self.seed, epoch, start_batch * self.batch_size).indices
        self.epoch_length = start_batch  # batches in the whole epoch, those before start_batch included
        self.batches = []
        for i in range(0, len(order), self.batch_size):
            chunk = order[i:i + self.batch_size]
            if len(chunk) < self.world_size:
                break
            per_rank, extra = divmod(len(chunk), self.world_size)
            lo = self.rank * per_rank + min(self.rank, extra)
            self.batches.append(chunk[lo:lo + per_rank + (self.rank < extra)])
        self.epoch_length += len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


# ------------------------------------------------------------------ decoded cache
CACHE_VERSION = 3
# A cache resident on the GPU may take this share of the free memory; training needs the rest.
GPU_CACHE_SHARE = 0.5
# Samples copied to the GPU at a time: the host never holds more of the cache than this in its own memory.
GPU_COPY_CHUNK = 256
# Disk space a cache leaves free, so that checkpoints and logs still fit beside it.
CACHE_DISK_MARGIN = 1 << 30
CACHE_FILES = ("meta.json", "rgb.npy", "depth.npy")
CACHE_META_TYPES = {"version": int, "key": str, "count": int, "height": int, "width": int, "mean_depth": float,
                    "has_holes": bool}


class CacheInvalid(Exception):
    """A cache folder that is not what SplitCache writes: the message says what is wrong with it."""


def cache_key(dataset):
    """Hash of what the cached tensors depend on: every file's name, size and mtime, and every option that
    changes a sample (input size, depth range and scale, the pixel budget that refuses a file)."""
    files = []
    for stem, rgb_path, depth_path in dataset.pairs:
        rgb_st, depth_st = file_stat(rgb_path), file_stat(depth_path)
        files.append([stem, os.path.basename(rgb_path), rgb_st.st_size, rgb_st.st_mtime_ns,
                      depth_st.st_size, depth_st.st_mtime_ns])
    spec = [CACHE_VERSION, dataset.size, dataset.max_depth, dataset.min_depth, dataset.depth_scale,
            dataset.max_pixels, files]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def file_stat(path):
    """os.stat of a data file; DataError saying what the path is when it is not a readable file."""
    try:
        return os.stat(path)
    except OSError as err:
        raise DataError(f"cannot read {path}: {file_problem(path) or err.strerror}. Fix the path or remove the "
                        "pair.") from None


def cache_prefix(dataset):
    """SPLIT-HxW: the start of the names of a split's caches at one input size."""
    h, w = input_hw(dataset.size)
    return f"{dataset.split}-{h}x{w}"


def cache_dirs(root):
    """Where a split's cache may live: beside the data, else (read-only data) in the user's cache folder."""
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return [os.path.join(root, ".cache"), os.path.join(user, "depthnet", tag)]


def cache_nbytes(n, height, width):
    """Bytes of a cache of n samples at height × width: uint8 RGB and float16 depth."""
    return n * height * width * (3 + 2)


def remove_path(path):
    """Remove a file or a folder, whichever `path` is; nothing if it is gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def read_cache_meta(folder):
    """The cache's meta.json as a dict of CACHE_META_TYPES; CacheInvalid if it is anything else."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise CacheInvalid(f"meta.json unreadable ({type(err).__name__})") from None
    if not isinstance(meta, dict):
        raise CacheInvalid(f"meta.json holds a {type(meta).__name__}, not an object")
    for name, kind in CACHE_META_TYPES.items():
        value = meta.get(name)
        # JSON writes 3.0 as 3.0, but a bool is an int to Python: both ways round are checked.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise CacheInvalid(f"meta.json's {name!r} is {value!r}, not a {kind.__name__}")
    return meta


def open_cache_array(folder, name, dtype, shape):
    """A cache array (.npy) memory-mapped copy-on-write, so that it is read from disk as needed and never
    written back; CacheInvalid unless it is a plain array of `dtype` and `shape`."""
    path = os.path.join(folder, name)
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CacheInvalid(f"{name} unreadable ({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise CacheInvalid(f"{name} is an archive, not one array")
    if array.dtype != dtype or array.shape != shape:
        raise CacheInvalid(f"{name} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}")
    return array


class SplitCache:
    """A split decoded once: rgb (N, 3, H, W) uint8 and depth (N, 1, H, W) float16, on disk.

    Values are DepthEstimationUnreal's samples rounded to uint8 (RGB, error ≤ 0.5/255) and
    float16 (depth, relative error ≤ 2⁻¹¹, under 1 cm at 20 m). `mean_depth` is the split's
    mean clipped depth at native resolution, the model's initial output bias.

    On disk a cache is a folder SPLIT-HxW-KEY holding rgb.npy, depth.npy and meta.json (what it
    is: version, key, sample count, size, mean depth, holes). It is written sample by sample as it
    is built and read through memory maps, so the process holds a batch of it at a time, never the
    split: the operating system keeps in its file cache what fits and reads the rest as needed.
    Before use, a cache proves it is what SplitCache writes (meta.json's fields and types, both
    arrays' dtype and shape against the split); anything else is named in a warning, removed and
    rebuilt. On a GPU a cache that fits is copied there in chunks.
    """

    def __init__(self, rgb, depth, mean_depth, has_holes):
        self.rgb, self.depth, self.mean_depth, self.has_holes = rgb, depth, mean_depth, has_holes

    def __len__(self):
        return self.rgb.shape[0]

    @property
    def nbytes(self):
        return self.rgb.nbytes + self.depth.nbytes

    @classmethod
    def open(cls, dataset, build=True, progress=True):
        """The cache of `dataset`'s split: loaded if up to date and sound, else built (build=True) on disk; None
        if absent and not built, or where no cache folder has the disk space for it (then said in a warning)."""
        key = cache_key(dataset)
        name = f"{cache_prefix(dataset)}-{key}"
        for directory in cache_dirs(dataset.root):
            folder = os.path.join(directory, name)
            if os.path.lexists(folder):
                try:
                    return cls.load(folder, key, len(dataset), input_hw(dataset.size))
                except CacheInvalid as err:
                    warnings.warn(f"data cache {folder} is not usable ({err}); rebuilding it", stacklevel=2)
                    try:
                        remove_path(folder)
                    except OSError:
                        pass
        if not build:
            return None
        return cls.build(dataset, name, key, progress)

    @classmethod
    def load(cls, folder, key, count, size):
        """The cache in `folder`, checked against the split's key, sample count and (H, W); CacheInvalid if not."""
        if not os.path.isdir(folder):
            raise CacheInvalid("not a folder")
        meta = read_cache_meta(folder)
        h, w = size
        expected = {"version": CACHE_VERSION, "key": key, "count": count, "height": h, "width": w}
        for field, value in expected.items():
            if meta[field] != value:
                raise CacheInvalid(f"meta.json's {field!r} is {meta[field]!r}, expected {value!r}")
        if not (math.isfinite(meta["mean_depth"]) and meta["mean_depth"] > 0):
            raise CacheInvalid(f"meta.json's mean_depth is {meta['mean_depth']!r}")
        rgb = open_cache_array(folder, "rgb.npy", np.uint8, (count, 3, h, w))
        depth = open_cache_array(folder, "depth.npy", np.float16, (count, 1, h, w))
        return cls(torch.from_numpy(rgb), torch.from_numpy(depth), meta["mean_depth"], meta["has_holes"])

    @classmethod
    def build(cls, dataset, name, key, progress=True):
        """Decode every sample of the split once, on a few threads of this process, in file order, writing each
        into the cache files as it comes; then checked and opened as any cache is. None where no cache folder
        has the space for it."""
        n, (h, w) = len(dataset), input_hw(dataset.size)
        directory = cache_folder_with_space(dataset.root, cache_nbytes(n, h, w))
        if directory is None:
            return None
        folder = os.path.join(directory, name)
        partial = os.path.join(directory, f".{name}.building-{os.getpid()}")
        remove_path(partial)
        os.makedirs(partial)
        try:
            meta = cls.write(dataset, partial, progress)
            write_json_atomic({**meta, "version": CACHE_VERSION, "key": key}, os.path.join(partial, "meta.json"))
            remove_path(folder)
            os.rename(partial, folder)
        except BaseException:
            remove_path(partial)
            raise
        remove_stale_caches(directory, cache_prefix(dataset), name)
        return cls.load(folder, key, n, (h, w))

    @staticmethod
    def write(dataset, folder, progress=True):
        """Decode the split into folder/rgb.npy and folder/depth.npy; returns meta.json's fields but version and
        key. The files are memory maps written in file order: what is written goes to disk, not to this
        process's memory."""
        # check=False: decoding here reads every file anyway, and raises the first bad one's DataError.
        source = DepthEstimationUnreal(dataset.root, dataset.split, dataset.size, dataset.conventions, native=True,
                                       check=False, max_pixels=dataset.max_pixels, listing=dataset.listing,
                                       gt_root=dataset.gt_root)
        n, (h, w) = len(source), input_hw(source.size)
        rgb = np.lib.format.open_memmap(os.path.join(folder, "rgb.npy"), mode="w+", dtype=np.uint8,
                                        shape=(n, 3, h, w))
        depth = np.lib.format.open_memmap(os.path.join(folder, "depth.npy"), mode="w+", dtype=np.float16,
                                          shape=(n, 1, h, w))
        total, measured, count = 0.0, 0, 0

        def quantised(i):
            rgb_f, depth_f, native = source[i]
            return (rgb_f.mul(255.0).round_().clamp_(0, 255).to(torch.uint8), depth_f.to(torch.float16),
                    *depth_sum(native, dataset.min_depth))

        try:
            for i, (rgb_q, depth_q, part_sum, part_measured, part_count) in enumerate(
                    map_in_threads(quantised, range(n), f"caching {dataset.split} split", progress)):
                rgb[i], depth[i] = rgb_q.numpy(), depth_q.numpy()
                total, measured, count = total + part_sum, measured + part_measured, count + part_count
            rgb.flush()
            depth.flush()
        finally:
            del rgb, depth
        mean_depth, has_holes = split_stats(total, measured, count, source.pairs)
        return {"count": n, "height": h, "width": w, "mean_depth": float(mean_depth), "has_holes": bool(has_holes)}

    @property
    def where(self):
        """Where the cache is read from, in words."""
        return "memory-mapped from disk" if self.rgb.device.type == "cpu" else f"on {self.rgb.device}"

    def place(self, device):
        """On a GPU, copied there in chunks when it fits in GPU_CACHE_SHARE of the free memory; otherwise left
        where it is, memory-mapped from disk, each batch read from the file cache or the disk."""
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes <= GPU_CACHE_SHARE * free:
                self.rgb, self.depth = to_device_in_chunks(self.rgb, device), to_device_in_chunks(self.depth, device)
        return self

    def batches(self, batch_lists, device):
        """Yield (rgb float32 in [0, 1], depth float32) on `device` for each list of indices.

        On a GPU-resident cache the whole epoch's indices go to the device at once and each
        batch is a gather there: no host work and no synchronisation per step.
        """
        if not batch_lists:
            return
        order = torch.tensor([i for b in batch_lists for i in b], dtype=torch.long)
        order = order.to(self.rgb.device, non_blocking=True)
        start = 0
        for b in batch_lists:
            idx = order[start:start + len(b)]
            start += len(b)
            rgb, depth = self.rgb.index_select(0, idx), self.depth.index_select(0, idx)
            if rgb.device.type != device.type:  # a host cache ("cuda" and "cuda:0" are one device)
                rgb = rgb.pin_memory().to(device, non_blocking=True)
                depth = depth.pin_memory().to(device, non_blocking=True)
            yield rgb.float().div_(255.0), depth.float()


def to_device_in_chunks(tensor, device):
    """A copy of a (memory-mapped) host tensor on `device`, made GPU_COPY_CHUNK samples at a time."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    for i in range(0, tensor.shape[0], GPU_COPY_CHUNK):
        out[i:i + GPU_COPY_CHUNK] = tensor[i:i + GPU_COPY_CHUNK].to(device)
    return out


def cache_folder_with_space(root, nbytes):
    """The first of cache_dirs(root) that can be written and has room for nbytes; None, with a warning
    saying why and that training reads from the files, when none has."""
    tried = []
    for directory in cache_dirs(root):
        try:
            os.makedirs(directory, exist_ok=True)
            free = shutil.disk_usage(directory).free
        except OSError:
            continue
        if free >= nbytes + CACHE_DISK_MARGIN:
            return directory
        tried.append(f"{directory} has {free / 1e9:.1f} GB free")
    why = ("; ".join(tried) if tried else "the data folder and the user cache folder are read-only")
    warnings.warn(f"no decoded cache for {root}: it would take {nbytes / 1e9:.1f} GB on disk ({why}); training "
                  "reads the files instead, as with --cache off", stacklevel=3)
    return None


def remove_stale_caches(directory, prefix, keep):
    """Remove the split's other caches at this size in `directory`: older keys, older formats, and the
    leftovers of builds that were stopped."""
    stale = glob.glob(os.path.join(directory, f"{prefix}-*")) + glob.glob(os.path.join(directory, f".{prefix}-*"))
    for path in stale:
        if os.path.basename(path) != keep and not building_elsewhere(path):
            try:
                remove_path(path)
            except OSError:
                pass


def building_elsewhere(path):
    """Whether `path` is the partial folder of a build that a live process is still writing."""
    pid = path.rsplit(".building-", 1)[1] if ".building-" in path else ""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True
