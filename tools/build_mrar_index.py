"""Build an MRAR index (JSON lines {"cate": "<synset>", "files": [four names]}) from any ImageFolder.

    python tools/build_mrar_index.py --data_path ${IMAGENET_PATH} --output Imagenet2012_mrar_files.txt

The images of each class are shuffled with --seed and cut into groups of four (a remainder of fewer than
four is dropped); --repeats N makes N such passes with different shuffles. The same seed gives the same file.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.checkpoint import atomic_write  # noqa: E402
from util.data import IMG_EXTENSIONS, MRAR_INDEX_NAME, find_classes, resolve_train_dir, scan_folder  # noqa: E402


def build_rows(data_path, seed=0, repeats=1, group=4):
    root = resolve_train_dir(data_path)
    classes = find_classes(root)
    rng = np.random.default_rng(seed)
    by_class = {c: [] for c in classes}
    for path, label in scan_folder(root, classes, IMG_EXTENSIONS):
        by_class[classes[label]].append(os.path.relpath(path, os.path.join(root, classes[label])))
    rows = []
    for _ in range(repeats):
        for cate in classes:
            files = [by_class[cate][i] for i in rng.permutation(len(by_class[cate]))]
            rows += [{"cate": cate, "files": files[i:i + group]} for i in range(0, len(files) - group + 1, group)]
    return rows, root


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True, help="ImageNet root holding train/, or an ImageFolder")
    p.add_argument("--output", default=MRAR_INDEX_NAME)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="passes over each class, each with a new shuffle")
    args = p.parse_args(argv)
    rows, root = build_rows(args.data_path, args.seed, args.repeats)
    if not rows:
        p.error(f"no class under {root} has four images")

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    atomic_write(args.output, write)
    print(f"{len(rows)} groups of four from {len({r['cate'] for r in rows})} classes of {root} -> {args.output}")


if __name__ == "__main__":
    main()
