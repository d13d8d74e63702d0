"""Fetch the published DepthEstimationUnreal into data/DepthEstimationUnreal.

    python get_data.py                       # train 3,469 + val 600 pairs, about 600 MB
    python get_data.py --out DIR             # somewhere else

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


def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch the published DepthEstimationUnreal (train and val; about 600 MB) "
                                            "with a sparse git checkout, check it, and put it in --out.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("data", "DepthEstimationUnreal"), help="folder to create")
    p.add_argument("--url", default=SOURCE_URL, help="git repository holding the data set")
    p.add_argument("--commit", default=SOURCE_COMMIT, help="commit to take it from (full hash)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder: choose a folder to create")
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
