"""Split a data set's val split into two fixed halves, as split lists: choose recipes on one, report on the other.

    python scripts/val_halves.py data/DepthEstimationUnreal data/val_halves
    python main.py --eval --ckpt runs/X/last.pt --data-dir data/val_halves/first    # the first 300 by name
    python main.py --eval --ckpt runs/X/last.pt --data-dir data/val_halves/last     # the last 300

Each half is a folder holding only val.txt, whose lines point into DATA_DIR (in the natural order
of the names, 2 before 10), so nothing is copied.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import list_pairs  # noqa: E402


def write_halves(data_dir, out):
    pairs = list_pairs(data_dir, "val")
    middle = len(pairs) // 2
    for name, half in (("first", pairs[:middle]), ("last", pairs[middle:])):
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        lines = [f"{os.path.relpath(rgb, folder)} {os.path.relpath(depth, folder)}" for _, rgb, depth in half]
        with open(os.path.join(folder, "val.txt"), "w") as f:
            f.write(f"# the {name} {len(half)} of the {len(pairs)} val pairs of {data_dir}, by name\n")
            f.write("\n".join(lines) + "\n")
        print(f"{folder}/val.txt: {len(half)} pairs, {half[0][0]} … {half[-1][0]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("out")
    args = parser.parse_args()
    write_halves(args.data_dir, args.out)
