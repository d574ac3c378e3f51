"""FID between two image folders or statistics files, like ``python -m pytorch_fid A B``; prints one JSON line.

    python tools/fid.py A B [--prc] [--fid_weights W.pth]

A and B are each an image folder (png/jpg/jpeg, searched recursively) or a statistics ``.npz`` holding ``mu`` and
``sigma`` (tools/make_fid_stats.py's, ADM's and MAR's reference files). ``--prc`` adds precision and recall
(Kynkäänniemi et al., k = 3) and needs two folders: A is taken as the generated set, B as the reference (precision:
how much of A lies in B's manifold). Everything goes through util.metrics.compute_metrics, the code that
``main.py --evaluate`` uses. The Inception weights come from ``--fid_weights`` or torch-fidelity's cache; nothing
is downloaded (tools/fid_weights.py builds the file from a registry package).

Output keys: fid, precision, recall (null without --prc), num_images_a, num_images_b (null for statistics that do not
record it), inception_weights and inception_weights_sha256 (null when both sides are statistics), seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.metrics import compute_metrics, frechet_distance, load_stats, stats_num_images  # noqa: E402


def _kind(path: str) -> str:
    if os.path.isdir(path):
        return "folder"
    if os.path.isfile(path) and path.endswith(".npz"):
        return "stats"
    raise FileNotFoundError(f"{path!r} is neither an image folder nor a statistics .npz file")


def fid_of(a: str, b: str, prc: bool = False, weights: str | None = None, device: str | None = None,
           batch_size: int = 100, num_workers: int | None = None) -> dict:
    kinds = (_kind(a), _kind(b))
    if prc and kinds != ("folder", "folder"):
        raise ValueError("--prc needs two image folders (statistics hold no samples)")
    t0 = time.perf_counter()
    if kinds == ("stats", "stats"):
        out = {"fid": frechet_distance(*load_stats(a), *load_stats(b)), "precision": None, "recall": None,
               "num_images_a": stats_num_images(a), "num_images_b": stats_num_images(b), "inception_weights": None,
               "inception_weights_sha256": None}
    else:
        swap = kinds == ("stats", "folder")  # FID is symmetric: the folder side is the one to extract
        gen, ref = (b, a) if swap else (a, b)
        ref_kw = {"ref_stats": ref} if _kind(ref) == "stats" else {"ref_dir": ref}
        m = compute_metrics(gen, **ref_kw, feature_extractor_weights_path=weights, device=device,
                            batch_size=batch_size, num_workers=num_workers, isc=False, prc=prc, gen_recursive=True)
        counts = (m["num_ref_images"], m["num_images"]) if swap else (m["num_images"], m["num_ref_images"])
        out = {"fid": m["fid"], "precision": m["precision"], "recall": m["recall"], "num_images_a": counts[0],
               "num_images_b": counts[1], "inception_weights": m["inception_weights"],
               "inception_weights_sha256": m["inception_weights_sha256"]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="image folder or statistics .npz (the generated side for --prc)")
    p.add_argument("b", help="image folder or statistics .npz (the reference side for --prc)")
    p.add_argument("--prc", action="store_true", help="also precision and recall (k=3); needs two folders")
    p.add_argument("--fid_weights", default=None,
                   help="Inception weights file (default: torch-fidelity's cache; tools/fid_weights.py makes it)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--num_workers", type=int, default=None)
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error("--batch_size must be positive")
    try:
        out = fid_of(args.a, args.b, prc=args.prc, weights=args.fid_weights, device=args.device,
                     batch_size=args.batch_size, num_workers=args.num_workers)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:  # bad inputs: one line, no traceback
        raise SystemExit(f"error: {e.args[0] if e.args else e}") from e
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
