"""Fetch the published DepthEstimationUnreal into data/DepthEstimationUnreal, or NYU Depth v2's official test split.

    python get_data.py                       # train 3,469 + val 600 pairs, about 600 MB
    python get_data.py --out DIR             # somewhere else
    python get_data.py nyu                   # NYU Depth v2's 654 test images into data/nyu (a 2.8 GB download)

The data set lives in a folder of a public git repository. A shallow, sparse checkout of
that folder at one fixed commit downloads only its files, not the repository's history or
its other folders. The pairs are then counted and every file decoded once, and only a
complete, checked data set is moved to --out: an interrupted or failed download leaves
nothing there. The published set has no test split (it was withheld).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

SOURCE_URL = "https://github.com/giovannilopopolo98/Deep_Learning_Challenge_2024.git"
SOURCE_COMMIT = "ccd46b4703a44960de9af3d3a79b317e2c93f266"
SOURCE_FOLDER = "DepthEstimationUnreal"
EXPECTED_PAIRS = {"train": 3469, "val": 600}
IMAGE_SHAPE = (144, 256)


class FetchError(Exception):
    """The data set could not be fetched or is not the one expected; the message says why."""


def run_git(args, cwd):
    """Run git in cwd, its progress shown as it comes; FetchError with git's last message if it fails."""
    proc = subprocess.Popen(["git", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    if proc.wait():
        text = tail.decode(errors="replace").replace("\r", "\n")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FetchError(f"git {args[0]} failed: {reason}")


def sparse_checkout(url, commit, folder, workdir):
    """Check out only `folder` of `url` at `commit` into workdir, without history."""
    if shutil.which("git") is None:
        raise FetchError("git is not installed: install it (e.g. apt-get install git) and run this again")
    run_git(["init", "--quiet"], workdir)
    run_git(["remote", "add", "origin", url], workdir)
    run_git(["sparse-checkout", "set", "--no-cone", f"/{folder}/"], workdir)
    # blob:none: the commit's trees come first, then the checkout asks for the blobs of `folder` alone.
    run_git(["fetch", "--depth", "1", "--filter=blob:none", "--progress", "origin", commit], workdir)
    run_git(["checkout", "--quiet", "FETCH_HEAD"], workdir)
    return os.path.join(workdir, folder)


def check_dataset(root, expected_pairs, image_shape, progress=True):
    """Pair counts per split and every file decoded once; FetchError naming what is wrong."""
    from dataset import check_files, list_pairs, read_depth
    from utils import UserError

    for split, expected in expected_pairs.items():
        try:
            pairs = list_pairs(root, split)
            # Counting costs nothing; decoding every file does, so a wrong count is reported first.
            if len(pairs) != expected:
                raise FetchError(f"split {split!r} has {len(pairs)} pairs, {expected} expected")
            check_files(pairs, desc=f"checking {split}", progress=progress)
        except UserError as err:
            raise FetchError(str(err)) from None
        shape = read_depth(pairs[0][2]).shape
        if image_shape and shape != image_shape:
            raise FetchError(f"{pairs[0][2]} is {shape[1]}×{shape[0]}, {image_shape[1]}×{image_shape[0]} expected")


def fetch_dataset(out, url=SOURCE_URL, commit=SOURCE_COMMIT, folder=SOURCE_FOLDER, expected_pairs=None,
                  image_shape=IMAGE_SHAPE, progress=True):
    """Download, check and move the data set to `out`; returns the pair counts per split."""
    expected_pairs = EXPECTED_PAIRS if expected_pairs is None else expected_pairs
    if os.path.exists(out) and os.listdir(out):
        raise FetchError(f"{out} exists and is not empty: remove it, or choose another folder with --out")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # The download lands beside `out`, on the same file system, so the final move is one rename.
    with tempfile.TemporaryDirectory(prefix=".get_data-", dir=parent) as workdir:
        root = sparse_checkout(url, commit, folder, workdir)
        if not os.path.isdir(root):
            raise FetchError(f"commit {commit} of {url} has no folder {folder!r}")
        check_dataset(root, expected_pairs, image_shape, progress)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(root, out)
    return expected_pairs


# NYU Depth v2's labelled frames (an HDF5 .mat) and the official train/test split of them, from its authors' site.
NYU_MAT_URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
NYU_SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
NYU_TEST_IMAGES = 654
# The focal length (pixels) of NYU's Kinect that the peers' lists give with every pair.
NYU_FOCAL = 518.8579
# The rows and columns of a labelled frame that hold the picture: outside them the frames have a white border,
# which the peers' official test split paints black (and which the Eigen crop leaves out).
NYU_PICTURE = (slice(7, 474), slice(7, 632))


def require_nyu_packages():
    """h5py (the .mat is HDF5) and scipy (splits.mat is a MATLAB v5 file); a FetchError naming the extras if not."""
    try:
        import h5py  # noqa: F401
        import scipy.io  # noqa: F401
    except ImportError as err:
        raise FetchError(f"python get_data.py nyu needs {err.name}: pip install -r requirements-nyu.txt") from None


def download(source, folder, progress=True):
    """The local path of `source`: a path is used as it is; a URL is downloaded into `folder` under its own file
    name (through a .part file, renamed when complete), or reused when a previous run left it there."""
    scheme = urllib.parse.urlparse(source).scheme
    if scheme not in ("http", "https", "ftp", "file"):
        if not os.path.isfile(source):
            raise FetchError(f"{source} not found")
        return source
    path = os.path.join(folder, os.path.basename(urllib.parse.urlparse(source).path))
    if os.path.isfile(path):
        print(f"using {path}, downloaded before")
        return path
    from tqdm import tqdm

    os.makedirs(folder, exist_ok=True)
    part = path + ".part"
    try:
        with urllib.request.urlopen(source, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path), disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and os.path.getsize(part) != total:
            raise FetchError(f"the download of {source} ended after {os.path.getsize(part)} of {total} bytes")
        os.replace(part, path)
    except OSError as err:
        raise FetchError(f"cannot download {source}: {getattr(err, 'reason', None) or err}") from None
    finally:
        if os.path.exists(part):
            os.remove(part)
    return path


def nyu_test_indices(splits_path, expected=NYU_TEST_IMAGES):
    """The 0-based indices of the official test frames (splits.mat's testNdxs, numbered from 1); FetchError if the
    file has not `expected` of them."""
    import scipy.io

    try:
        indices = sorted(int(i) - 1 for i in scipy.io.loadmat(splits_path)["testNdxs"].ravel())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FetchError(f"{splits_path} is not NYU's splits.mat ({type(err).__name__}: {err})") from None
    if len(indices) != expected:
        raise FetchError(f"{splits_path} lists {len(indices)} test images, {expected} expected")
    return indices


def nyu_scene(mat, index):
    """The scene type of frame `index` (bathroom, bedroom, ...): a MATLAB string, UTF-16 code units behind a
    reference."""
    return "".join(chr(c) for c in mat[mat["sceneTypes"][0, index]][()].ravel())


def write_nyu_pair(mat, index, folder):
    """Frame `index` of the labelled .mat as the peers' official test split holds it: SCENE/rgb_N.jpg (the white
    border painted black) and SCENE/sync_depth_N.png (the Kinect's raw depth in millimetres, 0 where it measured
    nothing), N the 0-based frame number. Returns its list line."""
    import numpy as np
    from PIL import Image

    scene = nyu_scene(mat, index)
    os.makedirs(os.path.join(folder, scene), exist_ok=True)
    rgb = np.asarray(mat["images"][index]).T  # MATLAB's column order: (3, W, H) in the file
    picture = np.zeros_like(rgb)
    picture[NYU_PICTURE] = rgb[NYU_PICTURE]
    # In the file's own dtype and truncated, as the peers' split was written: the same millimetres, bit for bit.
    depth_mm = (np.asarray(mat["rawDepths"][index]).T * 1000.0).astype(np.uint16)
    rgb_name, depth_name = f"{scene}/rgb_{index:05d}.jpg", f"{scene}/sync_depth_{index:05d}.png"
    Image.fromarray(picture).save(os.path.join(folder, rgb_name), quality=95)
    Image.fromarray(depth_mm).save(os.path.join(folder, depth_name))
    return f"{rgb_name} {depth_name} {NYU_FOCAL}\n"


def fetch_nyu(out, mat_source=NYU_MAT_URL, splits_source=NYU_SPLITS_URL, expected=NYU_TEST_IMAGES, progress=True):
    """Write NYU Depth v2's official test split into `out` (RGB, 16-bit PNG depth in millimetres, test.txt in the
    peers' format), from the labelled .mat and splits.mat (URLs, downloaded beside `out` and kept, or local paths).
    Nothing is written to `out` unless the whole split is. Returns the number of pairs."""
    require_nyu_packages()
    import h5py
    from tqdm import tqdm

    if os.path.exists(out) and os.listdir(out):
        raise FetchError(f"{out} exists and is not empty: remove it, or choose another folder with --out")
    parent = os.path.dirname(os.path.abspath(out))
    indices = nyu_test_indices(download(splits_source, parent, progress), expected)
    mat_path = download(mat_source, parent, progress)
    # Written beside `out`, on the same file system, so the final move is one rename.
    with tempfile.TemporaryDirectory(prefix=".get_data-", dir=parent) as workdir:
        root = os.path.join(workdir, "nyu")
        try:
            with h5py.File(mat_path, "r") as mat:
                lines = [write_nyu_pair(mat, i, root)
                         for i in tqdm(indices, desc="writing the test split", disable=not progress)]
        except (OSError, KeyError, ValueError, IndexError) as err:
            raise FetchError(f"{mat_path} is not NYU Depth v2's labelled .mat ({type(err).__name__}: {err})") from None
        with open(os.path.join(root, "test.txt"), "w", encoding="utf-8") as f:
            f.writelines(lines)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(root, out)
    return len(lines)


def main_nyu(args):
    print(f"writing NYU Depth v2's official test split into {args.out}", flush=True)
    try:
        count = fetch_nyu(args.out, args.mat, args.splits, progress=not args.quiet)
    except FetchError as err:
        print(f"error: {err}. Nothing was written to {args.out}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(f"{args.out}: {count} test pairs and test.txt; evaluate with python main.py --eval --ckpt CKPT "
          f"--data-dir {args.out} --split test --protocol nyu")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch the published DepthEstimationUnreal (train and val; about 600 MB) "
                                            "with a sparse git checkout, check it, and put it in --out; or, with "
                                            "nyu, NYU Depth v2's official 654-image test split.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", nargs="?", default="unreal", choices=["unreal", "nyu"],
                   help="unreal: DepthEstimationUnreal; nyu: NYU Depth v2's labelled .mat (2.8 GB, needs: pip install "
                        "-r requirements-nyu.txt), written as RGB, 16-bit PNG depth in millimetres and test.txt")
    p.add_argument("--out", default=None,
                   help="folder to create (default: data/DepthEstimationUnreal; data/nyu for nyu)")
    p.add_argument("--url", default=SOURCE_URL, help="git repository holding the data set")
    p.add_argument("--commit", default=SOURCE_COMMIT, help="commit to take it from (full hash)")
    p.add_argument("--mat", default=NYU_MAT_URL,
                   help="nyu: URL or local path of nyu_depth_v2_labeled.mat (a URL is downloaded beside --out and "
                        "kept)")
    p.add_argument("--splits", default=NYU_SPLITS_URL, help="nyu: URL or local path of the official splits.mat")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("data", "nyu" if args.dataset == "nyu" else "DepthEstimationUnreal")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder: choose a folder to create")
    if args.dataset == "nyu":
        if (args.url, args.commit) != (SOURCE_URL, SOURCE_COMMIT):
            p.error("--url and --commit are for DepthEstimationUnreal; nyu takes --mat and --splits")
        return main_nyu(args)
    if (args.mat, args.splits) != (NYU_MAT_URL, NYU_SPLITS_URL):
        p.error("--mat and --splits are for nyu: python get_data.py nyu --mat PATH")
    print(f"fetching {SOURCE_FOLDER}/ of {args.url} at {args.commit[:8]} into {args.out}", flush=True)
    try:
        counts = fetch_dataset(args.out, args.url, args.commit, progress=not args.quiet)
    except FetchError as err:
        print(f"error: {err}. Nothing was written to {args.out}; with no internet, copy the data set there by hand "
              f"(layout: README, 'The data')", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(f"{args.out}: " + ", ".join(f"{n} {split} pairs" for split, n in counts.items()) + ", every file checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
