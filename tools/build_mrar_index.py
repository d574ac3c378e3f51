"""Build an MRAR index (JSON lines {"cate": "<synset>", "files": [four names]}) from any ImageFolder.

    python tools/build_mrar_index.py --data_path ${IMAGENET_PATH} --output Imagenet2012_mrar_files.txt

The images of each class are shuffled with --seed and cut into groups of four (a remainder of fewer than
four is dropped); --repeats N makes N such passes with different shuffles. The same seed gives the same file.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.cli import HelpFormatter  # noqa: E402
from util.data import MRAR_INDEX_NAME, build_mrar_rows, write_mrar_index  # noqa: E402
from util.errors import OneLineParser, exit_on_user_error  # noqa: E402


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--data_path", required=True, help="ImageNet root holding train/, or an ImageFolder")
    p.add_argument("--output", default=MRAR_INDEX_NAME, help="the JSON-lines index to write")
    p.add_argument("--seed", type=int, default=0, help="seeds the shuffle of each class")
    p.add_argument("--repeats", type=int, default=1, help="passes over each class, each with a new shuffle")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    with exit_on_user_error(p.prog):
        rows, root = build_mrar_rows(args.data_path, args.seed, args.repeats)
    if not rows:
        p.error(f"no class under {root} has four images")
    write_mrar_index(args.output, rows)
    print(f"{len(rows)} groups of four from {len({r['cate'] for r in rows})} classes of {root} -> {args.output}")


if __name__ == "__main__":
    main()
