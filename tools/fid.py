"""FID between two image folders or statistics files, like ``python -m pytorch_fid A B``; prints one JSON line.

    python tools/fid.py A B [--prc] [--fid_weights W.pth] [--save_stats A_STATS.npz]
    python tools/fid.py A --save_stats A_STATS.npz      (statistics of A only, as pytorch-fid's --save-stats)

A and B are each an image folder (png/jpg/jpeg, searched recursively) or a statistics ``.npz`` holding ``mu`` and
``sigma`` (tools/make_fid_stats.py's, ADM's and MAR's reference files). ``--prc`` adds precision and recall
(Kynkäänniemi et al., k = 3) and needs two folders: A is taken as the generated set, B as the reference (precision:
how much of A lies in B's manifold). Features, statistics and distances are util.metrics' functions, the code that
``main.py --evaluate`` scores with. The Inception weights come from ``--fid_weights`` or torch-fidelity's cache;
nothing is downloaded (tools/fid_weights.py builds the file from a registry package). A progress bar per side and
the warnings go to stderr; stdout holds the JSON line only.

Output keys: fid, precision, recall (null without --prc), num_images_a, num_images_b (null for statistics that do not
record it), inception_weights and inception_weights_sha256 (null when both sides are statistics), seconds, and
saved_stats (the file --save_stats wrote, else null).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from util.cli import HelpFormatter, shown_path  # noqa: E402
from util.metrics import (  # noqa: E402
    FID_FEATURE,
    build_inception,
    extract_features,
    features_to_stats,
    file_sha256,
    frechet_distance,
    image_folder_dataset,
    load_stats,
    precision_recall,
    resolve_inception_weights,
    save_stats,
    stats_num_images,
)

PROG = "fid.py"
FEATURE_DIM = 2048  # Inception pool features: fewer images than this leave their covariance rank-deficient


def _kind(path: str | None) -> str | None:
    if path is None:
        return None
    if os.path.isdir(path):
        return "folder"
    if os.path.isfile(path) and path.endswith(".npz"):
        return "stats"
    raise FileNotFoundError(f"{path!r} is neither an image folder nor a statistics .npz file")


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def fid_of(a: str, b: str | None, prc: bool = False, weights: str | None = None, device: str | None = None,
           batch_size: int = 100, num_workers: int | None = None, save_stats_to: str | None = None,
           force: bool = False, progress: bool = True) -> dict:
    """The JSON record of A against B (B None: only A's statistics, into `save_stats_to`)."""
    kinds = (_kind(a), _kind(b))
    if b is None and save_stats_to is None:
        raise ValueError("give two sides A B, or one folder A with --save_stats OUT.npz")
    if prc and kinds != ("folder", "folder"):
        raise ValueError("--prc needs two image folders (statistics hold no samples)")
    if save_stats_to is not None:
        if kinds[0] != "folder":
            raise ValueError(f"--save_stats writes the statistics of image folder A; {a!r} is a statistics file")
        if not save_stats_to.endswith(".npz"):
            raise ValueError(f"--save_stats {save_stats_to!r} must end with .npz")
        if os.path.exists(save_stats_to) and not force:
            raise FileExistsError(f"--save_stats {save_stats_to!r} exists: pass --force to overwrite it")
    t0 = time.perf_counter()
    out = {"fid": None, "precision": None, "recall": None, "num_images_a": None, "num_images_b": None,
           "inception_weights": None, "inception_weights_sha256": None}
    datasets = {side: image_folder_dataset(path, recursive=True) for side, path, kind in (("a", a, kinds[0]),
                                                                                        ("b", b, kinds[1]))
                if kind == "folder"}
    for side, data in datasets.items():
        if len(data) < FEATURE_DIM:
            _warn(f"side {side.upper()} has {len(data)} images, fewer than the {FEATURE_DIM} feature dimensions: "
                  "the estimate is strongly biased upwards; compare FIDs only at equal image counts (papers use "
                  "50,000)")
    feats, stats = {}, {}
    for side, path, kind in (("a", a, kinds[0]), ("b", b, kinds[1])):
        if kind == "stats":  # read first: a bad file fails before the (long) feature extraction
            stats[side] = load_stats(path)
            out[f"num_images_{side}"] = stats_num_images(path)
    if datasets:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = build_inception(weights, device=device, features=[FID_FEATURE])
        path = resolve_inception_weights(weights)
        out["inception_weights"], out["inception_weights_sha256"] = shown_path(path), file_sha256(path)
        for side, data in datasets.items():
            name = a if side == "a" else b
            feats[side] = extract_features(data, model, names=[FID_FEATURE], batch_size=batch_size,
                                           num_workers=num_workers, device=device, verbose=progress,
                                           desc=f"{side.upper()} {os.path.basename(os.path.normpath(name))}")[
                FID_FEATURE]
            stats[side] = features_to_stats(feats[side])
            out[f"num_images_{side}"] = len(data)
            if progress:
                print(f"{PROG}: {side.upper()} = {name}: {len(data)} images, {time.perf_counter() - t0:.0f} s so far",
                      file=sys.stderr, flush=True)
    if save_stats_to is not None:
        save_stats(save_stats_to, *stats["a"], num_images=out["num_images_a"], force=force)
    if b is not None:
        if stats["a"][0].shape != stats["b"][0].shape:
            raise ValueError(f"A's statistics have {stats['a'][0].shape[0]} dimensions and B's "
                             f"{stats['b'][0].shape[0]}: both must be 2048-d Inception pool features")
        if progress:
            print(f"{PROG}: Fréchet distance: a {stats['a'][0].shape[0]}-d matrix square root (a minute or more on a "
                  "CPU)", file=sys.stderr, flush=True)
        out["fid"] = frechet_distance(*stats["a"], *stats["b"])
    if prc:
        out["precision"], out["recall"] = precision_recall(feats["a"], feats["b"])
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["saved_stats"] = save_stats_to
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("a", help="image folder or statistics .npz (the generated side for --prc)")
    p.add_argument("b", nargs="?", default=None,
                   help="image folder or statistics .npz (the reference side for --prc); may be left out with "
                        "--save_stats")
    p.add_argument("--prc", action="store_true", help="also precision and recall (k=3); needs two folders")
    p.add_argument("--save_stats", default=None, metavar="OUT.npz",
                   help="also write A's statistics (mu, sigma, num_images) here, for tools/fid.py, --fid_stats")
    p.add_argument("--force", action="store_true", help="overwrite an existing --save_stats file")
    p.add_argument("--fid_weights", default=None,
                   help="Inception weights file (default: torch-fidelity's cache; tools/fid_weights.py makes it)")
    p.add_argument("--device", default=None, help="where Inception runs (default: cuda if available, else cpu)")
    p.add_argument("--batch_size", type=int, default=100, help="images per Inception forward pass")
    p.add_argument("--num_workers", type=int, default=None, help="image decoding workers (default: up to 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = get_args_parser()
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error("--batch_size must be positive")
    try:
        out = fid_of(args.a, args.b, prc=args.prc, weights=args.fid_weights, device=args.device,
                     batch_size=args.batch_size, num_workers=args.num_workers, save_stats_to=args.save_stats,
                     force=args.force, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as e:  # one line, no traceback
        raise SystemExit(f"{PROG}: error: {e.args[0] if e.args else e}") from e
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
