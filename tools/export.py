"""Export a checkpoint's inference weights as safetensors, with what rebuilds model and tokenizer in its metadata.

    python tools/export.py ckpt/transdiff_l/ transdiff_l.safetensors --dtype bf16
    python tools/export.py output/digits digits.safetensors --raw

Writes the EMA weights (the raw ones with --raw) of a run folder, checkpoint file or another export; no optimizer
state, so a TransDiff-L training checkpoint of about 11 GB becomes about 2.7 GB (fp32) or 1.4 GB (bf16).
models.pretrained reads the file without unpickling anything (sample.py, demo.ipynb and main.py --evaluate
--resume take it like a checkpoint). The output is written atomically and never overwrites an existing file
without --force.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.pretrained import EXPORT_DTYPES, export_inference  # noqa: E402
from util.cli import HelpFormatter  # noqa: E402
from util.errors import OneLineParser, UserError  # noqa: E402


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("src", help="run folder, checkpoint-*.pth or .safetensors export")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--dtype", default="fp32", choices=list(EXPORT_DTYPES), help="dtype of the stored weights")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--load_step", default=None, help="checkpoint-<step>.pth of a run folder instead of the last")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    try:
        meta = export_inference(args.src, args.out, args.dtype, use_ema=not args.raw, step=args.load_step,
                                force=args.force)
    except (UserError, ValueError, FileExistsError) as e:
        p.error(str(e))
    print(f"{meta['weights']} weights of {args.src} as {args.dtype} -> {args.out} "
          f"({os.path.getsize(args.out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
