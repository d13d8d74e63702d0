"""get_data.py against a local git repository built here (a file:// URL), never the network."""
import os
import subprocess
import sys

import numpy as np
import pytest

import get_data
from conftest import REPO, SUBPROCESS_ENV, make_dataset

pytestmark = pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                                reason="git is not installed")

COUNTS = {"train": 3, "val": 2}


def git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A repository shaped like the published one: the data set's folder beside another, over two commits.

    Returns (file:// URL, first commit, second commit); the first holds COUNTS pairs, the second one more.
    """
    repo = tmp_path_factory.mktemp("source")
    git(repo, "init", "-q")
    make_dataset(repo / get_data.SOURCE_FOLDER, COUNTS)
    (repo / "CHALLENGE").mkdir()
    (repo / "CHALLENGE" / "weights.bin").write_bytes(b"\0" * 1000)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data")
    first = git(repo, "rev-parse", "HEAD")
    make_dataset(repo / "extra", {"train": 1})
    source = repo / get_data.SOURCE_FOLDER
    os.replace(repo / "extra" / "rgb" / "train" / "0.jpeg", source / "rgb" / "train" / "9.jpeg")
    os.replace(repo / "extra" / "depth" / "train" / "0.npy", source / "depth" / "train" / "9.npy")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one more pair")
    # A server must allow fetching a commit by hash; GitHub does, a local repository only when told to.
    git(repo, "config", "uploadpack.allowAnySHA1InWant", "true")
    return f"file://{repo}", first, git(repo, "rev-parse", "HEAD")


def test_fetches_only_the_folder_at_the_commit(source, tmp_path):
    url, first, _ = source
    out = tmp_path / "data" / "DepthEstimationUnreal"
    counts = get_data.fetch_dataset(str(out), url, first, expected_pairs=COUNTS, progress=False)
    assert counts == COUNTS
    assert sorted(os.listdir(out)) == ["depth", "rgb"]
    for split, n in COUNTS.items():
        assert sorted(os.listdir(out / "rgb" / split)) == [f"{i}.jpeg" for i in range(n)]
        assert sorted(os.listdir(out / "depth" / split)) == [f"{i}.npy" for i in range(n)]
    # Byte for byte what the repository holds at that commit.
    expected = make_dataset(tmp_path / "same", COUNTS)
    for name in ("rgb/train/2.jpeg", "depth/val/1.npy"):
        assert (out / name).read_bytes() == open(os.path.join(expected, name), "rb").read()
    # Nothing else is left beside the data set: no .git, no temporary folder, no other folder of the source.
    assert os.listdir(tmp_path / "data") == ["DepthEstimationUnreal"]


def test_wrong_pair_count_writes_nothing(source, tmp_path):
    url, _, second = source  # the second commit has 4 training pairs
    out = tmp_path / "DepthEstimationUnreal"
    with pytest.raises(get_data.FetchError, match="'train' has 4 pairs, 3 expected"):
        get_data.fetch_dataset(str(out), url, second, expected_pairs=COUNTS, progress=False)
    assert os.listdir(tmp_path) == []


def test_wrong_image_size_is_refused(source, tmp_path):
    url, first, _ = source
    with pytest.raises(get_data.FetchError, match="256×144, 320×240 expected"):
        get_data.fetch_dataset(str(tmp_path / "d"), url, first, expected_pairs=COUNTS, image_shape=(240, 320),
                               progress=False)
    assert os.listdir(tmp_path) == []


def test_corrupt_file_is_named(tmp_path):
    repo = tmp_path / "source"
    repo.mkdir()
    git(repo, "init", "-q")
    make_dataset(repo / get_data.SOURCE_FOLDER, COUNTS)
    np.save(repo / get_data.SOURCE_FOLDER / "depth" / "val" / "1.npy", np.full((144, 256), np.nan, np.float32))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data")
    git(repo, "config", "uploadpack.allowAnySHA1InWant", "true")
    with pytest.raises(get_data.FetchError, match=r"depth/val/1\.npy contains NaN"):
        get_data.fetch_dataset(str(tmp_path / "out"), f"file://{repo}", git(repo, "rev-parse", "HEAD"),
                               expected_pairs=COUNTS, progress=False)
    assert not (tmp_path / "out").exists()


def test_unreachable_source_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "DepthEstimationUnreal"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "get_data.py"), "--out", str(out), "--quiet",
                           "--url", f"file://{tmp_path}/no-such-repository"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: git fetch failed: ") and "Nothing was written" in last
    assert os.listdir(tmp_path) == []


def test_existing_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "DepthEstimationUnreal"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(get_data.FetchError, match="exists and is not empty"):
        get_data.fetch_dataset(str(out), "file:///nowhere", "0" * 40, progress=False)
    assert (out / "mine.txt").read_text() == "keep"
