"""Make FID reference statistics (an .npz with ``mu``, ``sigma``, ``num_images``) with the Inception features that
``util.metrics.compute_metrics`` uses.

Sources:
  - an image folder (searched recursively for png/jpg/jpeg); ``--img_size N`` applies ADM's centre crop first
    (BOX halvings, BICUBIC resize of the short side to N, centre crop), as for ImageNet reference images;
  - an ADM reference batch ``.npz`` (``VIRTUAL_imagenet256_labeled.npz``, ``VIRTUAL_imagenet512.npz``): uint8 NHWC
    images under ``arr_0`` (memory-mapped when the file is uncompressed).

Note: an ADM reference batch holds only 10,000 images, but its own ``mu``/``sigma`` were computed by ADM over the
whole ImageNet training set; those (not statistics of the 10,000 images) are the standard reference. With
``--copy_batch_stats`` the tool copies them into a small statistics file instead of extracting features.

Examples (from the repository root):
  python tools/make_fid_stats.py VIRTUAL_imagenet256_labeled.npz fid_stats/adm_in256_stats.npz --copy_batch_stats
  python tools/make_fid_stats.py /data/imagenet/val fid_stats/in256_val_stats.npz --img_size 256 --fid_weights W.pth

The output is written atomically (temporary file, then rename) and never overwrites an existing file without --force.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from util.cli import HelpFormatter  # noqa: E402
from util.metrics import (  # noqa: E402
    FID_FEATURE,
    ArrayImageDataset,
    build_inception,
    extract_features,
    features_to_stats,
    image_folder_dataset,
    load_adm_images,
    load_stats,
    save_stats,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Make FID reference statistics (mu, sigma of 2048-d Inception pool features) as an .npz.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", help="image folder (recursive) or ADM reference batch .npz (uint8 NHWC images in arr_0)")
    p.add_argument("output", help="statistics file to write (.npz with mu, sigma, num_images)")
    p.add_argument(
        "--img_size",
        type=int,
        default=None,
        help="ADM centre crop + resize every image to this size first (default: use the images as they are)",
    )
    p.add_argument(
        "--fid_weights",
        default=None,
        help="torch-fidelity Inception weights (weights-inception-2015-12-05-6726825d.pth, or the file "
        "tools/fid_weights.py builds from a registry package); default: torch-fidelity's cache under "
        "$TORCH_HOME/hub/checkpoints (nothing is downloaded)",
    )
    p.add_argument(
        "--feature_layer",
        default=FID_FEATURE,
        choices=["64", "192", "768", "2048"],
        help="torch-fidelity Inception layer; 2048 (pool features) is the standard FID",
    )
    p.add_argument(
        "--copy_batch_stats",
        action="store_true",
        help="ADM reference batch only: copy its precomputed mu/sigma (whole training set, ADM's TensorFlow "
        "Inception) instead of computing statistics of its images; needs no weights (num_images is written as -1)",
    )
    p.add_argument("--npz_key", default="arr_0", help="array holding the images in an ADM reference batch")
    p.add_argument("--device", default=None, help="where Inception runs (default: cuda if available, else cpu)")
    p.add_argument("--batch_size", type=int, default=100, help="images per Inception forward pass")
    p.add_argument("--num_workers", type=int, default=4, help="image decoding workers")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return make_stats(args)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:  # bad inputs: a message, no traceback
        raise SystemExit(f"error: {e.args[0] if e.args else e}") from e


def make_stats(args: argparse.Namespace) -> int:
    if not args.output.endswith(".npz"):
        raise SystemExit(f"error: output {args.output!r} must end with .npz")
    if os.path.exists(args.output) and not args.force:
        raise SystemExit(f"error: {args.output!r} exists; pass --force to overwrite it")
    if args.img_size is not None and args.img_size <= 0:
        raise SystemExit("error: --img_size must be positive")

    if args.copy_batch_stats:
        if not (os.path.isfile(args.source) and args.source.endswith(".npz")):
            raise SystemExit(f"error: --copy_batch_stats needs an .npz reference batch, got {args.source!r}")
        mu, sigma = load_stats(args.source)
        save_stats(args.output, mu, sigma, num_images=-1, force=args.force)
        print(f"wrote {args.output}: mu {mu.shape}, sigma {sigma.shape} copied from {args.source}")
        return 0

    if os.path.isdir(args.source):
        dataset = image_folder_dataset(args.source, img_size=args.img_size)
        kind = "image folder"
    elif os.path.isfile(args.source) and args.source.endswith(".npz"):
        dataset = ArrayImageDataset(load_adm_images(args.source, key=args.npz_key), img_size=args.img_size)
        kind = "ADM reference batch"
    else:
        raise SystemExit(f"error: source {args.source!r} is neither a folder nor an .npz file")
    if len(dataset) < 2:
        raise SystemExit(f"error: need at least 2 images, {args.source!r} has {len(dataset)}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_inception(args.fid_weights, device=device, features=[args.feature_layer])
    print(f"{kind} {args.source}: {len(dataset)} images -> {args.output} (device {device})", flush=True)
    t0 = time.time()
    feats = extract_features(
        dataset,
        model,
        names=[args.feature_layer],
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        verbose=not args.quiet,
    )[args.feature_layer]
    mu, sigma = features_to_stats(feats)
    save_stats(args.output, mu, sigma, num_images=len(dataset), force=args.force)
    print(f"wrote {args.output}: mu {mu.shape}, sigma {sigma.shape}, {len(dataset)} images, {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
