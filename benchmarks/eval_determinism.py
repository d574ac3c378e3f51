"""What holds across batch sizes, world sizes and thread counts: the same `main.py --evaluate` of a digits run with
--eval_bsz 50 and 7, one process with 1 and 2 threads, and `torchrun --nproc_per_node 2` (gloo, 1 thread per
rank); how many PNG values differ from the 1-process, 1-thread, batch-50 set, by how much, and what it does to the
digit judge's accuracy and FD (digits_preset's report). Then the Inception FID (and precision/recall) of a small
set against a folder of held-out digits, scored in one process and by 2 ranks that share the feature extraction.

    python benchmarks/eval_determinism.py --run output/digits30 --fid_weights W.pth
    python benchmarks/eval_determinism.py --vae --fid_weights W.pth

With --vae: the KL-16 VAE path instead (a tiny model and the VAE, both with random weights, 32 px, in this
process): --eval_bsz 1, 2 and 4 and 2 threads against 1 thread and --eval_bsz 8, and the Inception FID between each
set and that one, next to the FID between two sets of other seeds (the sampling noise of such a set).

Writes benchmarks/results/eval_determinism.json. The Inception FID of a few dozen images is a rank-deficient
estimate: here only to compare one process with two ranks.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from util import digit_classifier  # noqa: E402
from util.checkpoint import save_json  # noqa: E402

VARIANTS = {  # name: (processes, threads per process, --eval_bsz)
    "1proc_1thread_bsz50": (1, 1, 50),
    "1proc_1thread_bsz7": (1, 1, 7),
    "1proc_2threads_bsz50": (1, 2, 50),
    "2ranks_1thread_bsz50": (2, 1, 50),
}


def evaluate(opts, name, nproc, threads, bsz, num_images, *scoring):
    out = os.path.join(opts.scratch, name)
    flags = ["main.py", "--preset", "digits", "--evaluate", "--resume", opts.run, "--eval_wo_ema", "--output_dir",
             out, "--num_images", str(num_images), "--eval_bsz", str(bsz), "--threads", str(threads),
             "--num_workers", "0", *(scoring or ["--skip_metrics"])]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(launcher + flags, cwd=REPO, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "eval_results.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def pixels(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names]).astype(np.int16)


def judge(opts, images):
    """The digits report's accuracy and FD (digits_preset.write_report) of uint8 NHWC digits, class-major."""
    data, size, per_class = "data/digits", 32, len(images) // 10
    clf, _ = digit_classifier.load_or_train(data, size, log=lambda m: None)
    x = torch.from_numpy(images.astype(np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = torch.arange(10).repeat_interleave(per_class)
    quality = digit_classifier.accuracy_report(clf, x, labels)
    div = digit_classifier.diversity(clf, x, *digit_classifier.load_image_folder(os.path.join(data, "train"), size),
                                     per_class)
    return quality["accuracy"], div["generated"]["fd"]


def reference_folder(opts, per_class):
    """The first `per_class` held-out digits of each class, as a folder."""
    folder = os.path.join(opts.scratch, f"heldout_{per_class}_per_class")
    for c in range(10):
        os.makedirs(os.path.join(folder, str(c)), exist_ok=True)
        src = os.path.join("data/digits/heldout", str(c))
        for n in sorted(os.listdir(src))[:per_class]:
            shutil.copyfile(os.path.join(src, n), os.path.join(folder, str(c), n))
    return folder


def vae_path(opts):
    from argparse import Namespace

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from helpers import write_vae_checkpoint
    from test_evaluation import make_args, tiny_model

    import engine_eval
    from models.tokenizers import build_tokenizer
    from util import metrics

    vae = build_tokenizer(Namespace(tokenizer="kl16", vae_path=str(write_vae_checkpoint(
        os.path.join(opts.scratch, "kl16_random.ckpt"))), vae_embed_dim=16, vae_unsafe_load=False))
    model, n = tiny_model(), opts.vae_images
    variants = {"1thread_bsz8": (1, 8, 7), "1thread_bsz1": (1, 1, 7), "1thread_bsz2": (1, 2, 7),
                "1thread_bsz4": (1, 4, 7), "2threads_bsz8": (2, 8, 7), "other_seed": (1, 8, 8)}
    folders = {}
    for name, (threads, bsz, seed) in variants.items():
        torch.set_num_threads(threads)
        args = make_args(os.path.join(opts.scratch, "vae", name), num_images=n, eval_bsz=bsz, seed=seed)
        folders[name] = os.path.join(args.output_dir, "images")
        engine_eval.generate_images(model, vae, args, folders[name])
    torch.set_num_threads(1)
    extractor = metrics.build_inception(opts.fid_weights, features=[metrics.FID_FEATURE])
    feats = {k: metrics.extract_features(f, extractor, names=[metrics.FID_FEATURE], num_workers=0)[
        metrics.FID_FEATURE] for k, f in folders.items()}
    base, rows = pixels(folders["1thread_bsz8"]), {}
    ref = metrics.features_to_stats(feats["1thread_bsz8"])
    for name in variants:
        diff = np.abs(pixels(folders[name]) - base)
        rows[name] = {"values_differing": int((diff > 0).sum()), "values": int(diff.size),
                      "images_differing": int((diff.reshape(len(diff), -1) > 0).any(1).sum()),
                      "max_abs_diff_of_255": int(diff.max()),
                      "fid_to_reference_set": metrics.frechet_distance(*metrics.features_to_stats(feats[name]), *ref)}
    return {"model": "transdiff_tiny (random weights) + KL-16 VAE (random weights), 32 px", "num_images": n,
            "num_sampling_steps": 4, "variants": {k: dict(zip(("threads", "eval_bsz", "seed"), v))
                                                  for k, v in variants.items()},
            "reference": "1thread_bsz8", "by_variant": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="output/digits30")
    p.add_argument("--fid_weights", required=True)
    p.add_argument("--num_images", type=int, default=200)
    p.add_argument("--fid_images", type=int, default=20, help="images of the Inception comparison (and reference)")
    p.add_argument("--scratch", default="output/eval_determinism")
    p.add_argument("--vae", action="store_true", help="the KL-16 VAE path (random weights) instead")
    p.add_argument("--vae_images", type=int, default=16)
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    if opts.vae:
        result = {"command": "python benchmarks/eval_determinism.py " + " ".join(argv or sys.argv[1:]),
                  **vae_path(opts), "note": "2 CPU cores shared with other jobs"}
        save_json(opts.out or "benchmarks/results/eval_determinism_vae.json", result)
        print(json.dumps(result, indent=1))
        return
    results = {name: evaluate(opts, name, *v, opts.num_images) for name, v in VARIANTS.items()}
    base_name = next(iter(VARIANTS))
    base = pixels(results[base_name]["folder"])
    rows = {}
    for name, r in results.items():
        images = pixels(r["folder"])
        diff = np.abs(images - base)
        accuracy, fd = judge(opts, images)
        rows[name] = {"judge_accuracy": accuracy, "judge_fd": fd,
                      "values_differing": int((diff > 0).sum()), "values": int(diff.size),
                      "images_differing": int((diff.reshape(len(diff), -1) > 0).any(1).sum()),
                      "max_abs_diff_of_255": int(diff.max()), "images_per_s": r["speed"]["images_per_s"]}
    ref = reference_folder(opts, opts.fid_images // 10)
    inception = {}
    for name, nproc in (("inception_1proc", 1), ("inception_2ranks", 2)):
        r = evaluate(opts, name, nproc, 1, 10, opts.fid_images, "--fid_ref_dir", ref, "--fid_weights",
                     opts.fid_weights)
        inception[name] = {k: r[k] for k in ("fid", "precision", "recall", "num_images", "num_ref_images")}
    result = {"command": "python benchmarks/eval_determinism.py " + " ".join(argv or sys.argv[1:]),
              "run": opts.run, "weights": "raw", "num_images": opts.num_images, "reference": base_name,
              "variants": {k: dict(zip(("processes", "threads", "eval_bsz"), v)) for k, v in VARIANTS.items()},
              "by_variant": rows, "inception": inception, "inception_reference": ref,
              "note": "2 CPU cores shared with other jobs"}
    save_json(opts.out or "benchmarks/results/eval_determinism.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
